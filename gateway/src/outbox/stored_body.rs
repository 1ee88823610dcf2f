//! Message bodies as the outbox keeps them on disk: zstd frames against a fixed dictionary
//! trained on the resources the gateway writes.
//!
//! A reading's Observation is about 1.3 KiB of JSON of which only its ids, value and times
//! differ from the reading before; the SQLite outbox's cost per reading is partly those bytes
//! (inserted, written to the WAL, checkpointed, read back for delivery), and at a retention of
//! days they are most of the disk. Compressed against a dictionary of what such resources have
//! in common, a body keeps only what differs (about a tenth of it). Both outboxes use this; the
//! SQL never looks into a body.
//!
//! A stored body starts with [`FORMAT_V1`]; one without it (written before compression, or a
//! body that could not be compressed) is read as it is: no JSON, XML or HL7 v2 body starts with
//! a NUL byte. The dictionary of a format never changes once released, or what an outbox holds
//! could not be read: a better one is a new format, read beside the old.

use std::cell::RefCell;
use std::sync::LazyLock;

use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

use super::OutboxError;

/// The first bytes of a body compressed against [`DICTIONARY_V1`].
const FORMAT_V1: [u8; 2] = [0, 1];

/// A zstd dictionary (16 KiB, with its own entropy tables, so a small frame does not build
/// them) trained by `zstd --train --maxdict=16384` on the 642 bodies (Observations of every
/// mapped family, Devices, DeviceMetrics, Procedures, Provenances; synthetic data only) that
/// the demo's outbox held after the conformance suite ran against it. Frozen: see the module
/// documentation.
const DICTIONARY_V1: &[u8] = include_bytes!("stored_body_dictionary_v1.zdict");

/// zstd's fastest regular level: with the dictionary it already keeps about a tenth of a
/// reading, and higher levels cost the writer more than the bytes they save.
const LEVEL: i32 = 1;

/// No body the gateway stores is larger (ingest bodies are limited far below it): a frame that
/// claims more is corrupt and is refused rather than allocated.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

static ENCODER_V1: LazyLock<EncoderDictionary<'static>> =
    LazyLock::new(|| EncoderDictionary::copy(DICTIONARY_V1, LEVEL));
static DECODER_V1: LazyLock<DecoderDictionary<'static>> =
    LazyLock::new(|| DecoderDictionary::copy(DICTIONARY_V1));

thread_local! {
    // One context per thread (the writer thread, the blocking pool): zstd's contexts are not
    // shared, and making one per body would cost more than compressing it.
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `body` as it is stored: compressed, or as it is if zstd fails (which only running out of
/// memory makes it do; [`read`] takes both).
pub fn stored(body: &[u8]) -> Vec<u8> {
    COMPRESSOR
        .with_borrow_mut(|compressor| {
            if compressor.is_none() {
                *compressor = Some(new_compressor().ok()?);
            }
            let compressor = compressor.as_mut()?;
            let frame = compressor.compress(body).ok()?;
            let mut out = Vec::with_capacity(FORMAT_V1.len() + frame.len());
            out.extend_from_slice(&FORMAT_V1);
            out.extend_from_slice(&frame);
            Some(out)
        })
        .unwrap_or_else(|| body.to_vec())
}

fn new_compressor() -> std::io::Result<Compressor<'static>> {
    let mut compressor = Compressor::with_prepared_dictionary(&ENCODER_V1)?;
    // A damaged frame fails its checksum instead of passing for a resource (one read with
    // another dictionary is refused anyway: every frame names its dictionary's id).
    compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    Ok(compressor)
}

/// A body as it was given to [`stored`], from what the outbox holds.
pub fn read(stored: Vec<u8>) -> Result<Vec<u8>, OutboxError> {
    let Some(frame) = stored.strip_prefix(&FORMAT_V1) else {
        if stored.first() == Some(&0) {
            return Err(corrupt("an unknown format"));
        }
        return Ok(stored);
    };
    let size = Decompressor::upper_bound(frame).ok_or_else(|| corrupt("no content size"))?;
    if size > MAX_BODY_BYTES {
        return Err(corrupt("a content size over the limit"));
    }
    DECOMPRESSOR.with_borrow_mut(|decompressor| {
        if decompressor.is_none() {
            *decompressor = Some(
                Decompressor::with_prepared_dictionary(&DECODER_V1)
                    .map_err(|e| corrupt(&e.to_string()))?,
            );
        }
        decompressor
            .as_mut()
            .ok_or_else(|| OutboxError::Storage("zstd: no decompression context".into()))?
            .decompress(frame, size)
            .map_err(|e| corrupt(&e.to_string()))
    })
}

/// [`read`] for a body that may be absent (a left join, a message without one).
pub fn read_optional(stored: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, OutboxError> {
    stored.map(read).transpose()
}

fn corrupt(what: &str) -> OutboxError {
    OutboxError::Storage(format!("a stored message body has {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = r#"{"resourceType":"Observation","id":"0193a3f0-7c1e-7d42-9b1a-5f0e2c8d4a11","identifier":[{"system":"https://fhir.ecmo-gateway.org/sid/observation","value":"getinge-cardiohelp:CH-0042:pump-blood-flow:20261121T081500.250Z"}],"status":"final","valueQuantity":{"value":4.21,"unit":"L/min","system":"http://unitsofmeasure.org","code":"L/min"}}"#;

    #[test]
    fn a_body_reads_back_as_it_was_given_and_smaller() {
        let kept = stored(READING.as_bytes());
        assert!(kept.starts_with(&FORMAT_V1));
        assert!(kept.len() < READING.len() / 2, "{} bytes", kept.len());
        assert_eq!(read(kept).unwrap(), READING.as_bytes());
        for body in [&b""[..], b"x", &[0xff; 3000], b"MSH|^~\\&|GW\r"] {
            assert_eq!(read(stored(body)).unwrap(), body);
        }
    }

    #[test]
    fn a_body_stored_before_compression_reads_as_it_is() {
        for body in [
            READING.as_bytes(),
            b"<Observation/>",
            b"MSH|^~\\&|GW\r",
            b"",
        ] {
            assert_eq!(read(body.to_vec()).unwrap(), body);
        }
    }

    #[test]
    fn a_damaged_or_unknown_body_is_an_error_not_a_resource() {
        let mut kept = stored(READING.as_bytes());
        let last = kept.len() - 1;
        kept[last] ^= 0x55;
        assert!(read(kept).is_err());
        assert!(read(vec![0, 2, 1, 2, 3]).is_err());
        assert!(read(vec![0, 1, 0x28, 0xb5]).is_err());
        assert!(read(vec![0]).is_err());
    }

    /// The dictionary is a trained one (zstd's magic number, then its id, which every frame
    /// names, so a frame is never read with another), and the resources it was trained on
    /// keep a small part of their bytes.
    #[test]
    fn the_dictionary_is_a_trained_zstd_dictionary() {
        assert_eq!(DICTIONARY_V1[..4], [0x37, 0xa4, 0x30, 0xec]);
        let device = r#"{"resourceType":"Device","identifier":[{"system":"https://fhir.ecmo-gateway.org/sid/device-serial/getinge","value":"CH-0042"}],"status":"active","manufacturer":"Getinge","deviceName":[{"name":"CARDIOHELP-i","type":"model-name"}],"modelNumber":"CARDIOHELP-i"}"#;
        for body in [READING, device] {
            let kept = stored(body.as_bytes()).len();
            assert!(kept * 3 < body.len(), "{kept} bytes kept of {}", body.len());
        }
    }
}
