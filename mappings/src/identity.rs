use sha2::{Digest, Sha256};

/// The Observation's business identifier value: device family, serial, our parameter code and
/// the device's own timestamp in UTC (the Personal Health Device IG's pattern). A resend of the
/// same reading yields the same identifier, so a conditional create can never duplicate it.
///
/// `:` separates the parts; serials may not contain it (the ingest schema forbids it).
pub fn observation_identifier(family: &str, serial: &str, code: &str, compact_utc: &str) -> String {
    let mut value =
        String::with_capacity(family.len() + serial.len() + code.len() + compact_utc.len() + 3);
    for (i, part) in [family, serial, code, compact_utc].into_iter().enumerate() {
        if i > 0 {
            value.push(':');
        }
        value.push_str(part);
    }
    value
}

/// A waveform's Observation identifier value: a reading's, with the waveform's duration after
/// its start (ISO 8601, `...:20261121T081500.250Z/PT8S`), so that it never meets a single
/// reading of the same time, nor a waveform of another length. `period` is the milliseconds
/// between samples as the device wrote them.
pub fn waveform_identifier(
    family: &str,
    serial: &str,
    code: &str,
    compact_utc: &str,
    period: &str,
    count: usize,
) -> String {
    let millis = (period.parse::<f64>().unwrap_or(0.0) * count as f64).round();
    let seconds = format!("{:.3}", millis / 1000.0);
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    observation_identifier(family, serial, code, &format!("{compact_utc}/PT{seconds}S"))
}

/// A FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`) derived from an identifier: the first 128 bits of
/// SHA-256 over `system|value`, in hex. Destinations that accept client-assigned ids get a PUT
/// to this id, which is as idempotent as a conditional create and needs no search.
pub fn logical_id(system: &str, value: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(system.as_bytes());
    hasher.update(b"|");
    hasher.update(value.as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(32);
    for byte in &digest[..16] {
        use std::fmt::Write;
        let _ = write!(id, "{byte:02x}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_and_id_are_stable() {
        let v = observation_identifier(
            "getinge-cardiohelp",
            "CH-1",
            "pump-blood-flow",
            "20261121T101500.000Z",
        );
        assert_eq!(
            v,
            "getinge-cardiohelp:CH-1:pump-blood-flow:20261121T101500.000Z"
        );
        let id = logical_id(crate::OBSERVATION_IDENTIFIER_SYSTEM, &v);
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, logical_id(crate::OBSERVATION_IDENTIFIER_SYSTEM, &v));
        assert_ne!(
            id,
            logical_id(crate::OBSERVATION_IDENTIFIER_SYSTEM, "other")
        );
    }
}
