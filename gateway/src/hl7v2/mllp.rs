//! MLLP (the HL7 Minimal Lower Layer Protocol) framing: `<VT> message <FS><CR>`.
//!
//! A tokio-util codec, so the listener, the suite's MLLP sender and its reference receiver frame
//! the same way. Frames are bounded; a partial frame is scanned once, not again on every read;
//! line ends between frames are tolerated (some senders add them), anything else is not.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

const START: u8 = 0x0B;
const END: u8 = 0x1C;
const END_CR: u8 = 0x0D;

#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    #[error("MLLP frame larger than {0} bytes")]
    TooLarge(usize),
    #[error("bytes outside an MLLP frame (a frame begins with 0x0B)")]
    OutsideFrame,
    #[error("the connection closed in the middle of an MLLP frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_frame: usize,
    /// How much of a partial frame has been searched for its end already.
    scanned: usize,
}

impl MllpCodec {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            scanned: 0,
        }
    }

    /// Whether `buf` holds the beginning of a frame not yet complete.
    pub fn in_frame(buf: &BytesMut) -> bool {
        buf.iter().any(|&b| !matches!(b, b'\r' | b'\n'))
    }
}

impl Decoder for MllpCodec {
    type Item = Bytes;
    type Error = MllpError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        let blank = buf
            .iter()
            .take_while(|&&b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            buf.advance(blank);
            self.scanned = self.scanned.saturating_sub(blank);
        }
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first != START {
            return Err(MllpError::OutsideFrame);
        }
        let from = self.scanned.max(1);
        let found = buf[from..]
            .windows(2)
            .position(|w| w == [END, END_CR])
            .map(|i| from + i);
        match found {
            Some(end) => {
                self.scanned = 0;
                if end - 1 > self.max_frame {
                    return Err(MllpError::TooLarge(self.max_frame));
                }
                let mut frame = buf.split_to(end + 2);
                frame.truncate(end);
                frame.advance(1);
                Ok(Some(frame.freeze()))
            }
            None => {
                if buf.len() > self.max_frame + 3 {
                    return Err(MllpError::TooLarge(self.max_frame));
                }
                // The last byte may be the first of the end pair: look at it again.
                self.scanned = buf.len().saturating_sub(1);
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if Self::in_frame(buf) => Err(MllpError::Truncated),
            None => Ok(None),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, message: T, buf: &mut BytesMut) -> Result<(), MllpError> {
        let message = message.as_ref();
        buf.reserve(message.len() + 3);
        buf.put_u8(START);
        buf.put_slice(message);
        buf.put_slice(&[END, END_CR]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> Result<Vec<Bytes>, MllpError> {
        let mut codec = MllpCodec::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // Byte by byte: frames split across reads.
        for &b in input {
            buf.put_u8(b);
            while let Some(frame) = codec.decode(&mut buf)? {
                out.push(frame);
            }
        }
        if let Some(frame) = codec.decode_eof(&mut buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    #[test]
    fn frames_split_across_reads_and_several_per_read() {
        let input = b"\x0bMSH|a\x1c\x0d\r\n\x0bMSH|b\rOBX|1\x1c\x0d";
        let out = frames(input, 100).unwrap();
        assert_eq!(out, [&b"MSH|a"[..], &b"MSH|b\rOBX|1"[..]]);
        // All at once.
        let mut codec = MllpCodec::new(100);
        let mut buf = BytesMut::from(&input[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"MSH|a"[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap(),
            &b"MSH|b\rOBX|1"[..]
        );
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn a_lone_fs_inside_a_message_is_not_its_end() {
        let out = frames(b"\x0bA\x1cB\x1c\x0d", 100).unwrap();
        assert_eq!(out, [&b"A\x1cB"[..]]);
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            frames(b"MSH|no start block", 100),
            Err(MllpError::OutsideFrame)
        ));
        assert!(matches!(
            frames(b"\x0bMSH|never ends", 100),
            Err(MllpError::Truncated)
        ));
        assert!(matches!(
            frames(&[&b"\x0b"[..], &[b'x'; 200], b"\x1c\x0d"].concat(), 100),
            Err(MllpError::TooLarge(100))
        ));
        // Exactly at the limit is fine.
        assert_eq!(
            frames(&[&b"\x0b"[..], &[b'x'; 100], b"\x1c\x0d"].concat(), 100)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn encodes_what_it_decodes() {
        let mut codec = MllpCodec::new(100);
        let mut buf = BytesMut::new();
        codec.encode(b"MSH|x", &mut buf).unwrap();
        assert_eq!(&buf[..], b"\x0bMSH|x\x1c\x0d");
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"MSH|x"[..]);
    }
}
