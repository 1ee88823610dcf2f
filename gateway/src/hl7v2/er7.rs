//! HL7 v2 ER7 ("pipe and hat") messages: read and written here, because no well-kept Rust
//! crate reads them soundly (escapes with non-ASCII text, MSH-18 character sets, bounded work on
//! hostile input).
//!
//! A frame is first decoded to text by its MSH-18 character set, then split into segments
//! (CR, and LF or CRLF from senders that write files), fields, repetitions, components and
//! subcomponents by the delimiters MSH-1 and MSH-2 declare. Splitting borrows from the text;
//! escapes are decoded only for the values that are read. Every step is linear in the input.

use std::borrow::Cow;

/// Segments a message may have; far above any device's ORU^R01, well below what would matter.
pub const MAX_SEGMENTS: usize = 20_000;

/// HL7 table 0357 message error condition codes (v2.6), as ERR-3 carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    SegmentSequence,
    RequiredFieldMissing,
    DataType,
    TableValueNotFound,
    UnsupportedMessageType,
    UnsupportedEventCode,
    UnsupportedProcessingId,
    UnsupportedVersionId,
    UnknownKeyIdentifier,
    DuplicateKeyIdentifier,
    InternalError,
}

impl ErrorCode {
    /// The code and its HL7 text, as `ERR-3` writes them.
    pub fn code_and_text(self) -> (&'static str, &'static str) {
        match self {
            Self::SegmentSequence => ("100", "Segment sequence error"),
            Self::RequiredFieldMissing => ("101", "Required field missing"),
            Self::DataType => ("102", "Data type error"),
            Self::TableValueNotFound => ("103", "Table value not found"),
            Self::UnsupportedMessageType => ("200", "Unsupported message type"),
            Self::UnsupportedEventCode => ("201", "Unsupported event code"),
            Self::UnsupportedProcessingId => ("202", "Unsupported processing id"),
            Self::UnsupportedVersionId => ("203", "Unsupported version id"),
            Self::UnknownKeyIdentifier => ("204", "Unknown key identifier"),
            Self::DuplicateKeyIdentifier => ("205", "Duplicate key identifier"),
            Self::InternalError => ("207", "Application internal error"),
        }
    }
}

/// A place in a message, as ERR-2 (ERL) names it: segment id and its ordinal among segments of
/// that id (1-based), then field, repetition, component and subcomponent (0 = not narrowed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    pub segment: String,
    pub sequence: usize,
    pub field: usize,
    pub repetition: usize,
    pub component: usize,
    pub subcomponent: usize,
}

impl Location {
    pub fn segment(id: &str, sequence: usize) -> Self {
        Self {
            segment: id.to_owned(),
            sequence,
            ..Self::default()
        }
    }

    pub fn field(mut self, field: usize) -> Self {
        self.field = field;
        self.repetition = 1;
        self
    }

    pub fn component(mut self, component: usize) -> Self {
        self.component = component;
        self
    }

    /// `OBX-6.1` style, for messages to people.
    pub fn describe(&self) -> String {
        let mut text = self.segment.clone();
        if self.sequence > 1 {
            text.push_str(&format!("[{}]", self.sequence));
        }
        if self.field > 0 {
            text.push_str(&format!("-{}", self.field));
            if self.component > 0 {
                text.push_str(&format!(".{}", self.component));
            }
        }
        text
    }
}

/// Why a frame is not a readable message, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Er7Error {
    pub code: ErrorCode,
    pub location: Option<Location>,
    pub reason: String,
}

impl Er7Error {
    pub fn new(code: ErrorCode, location: Option<Location>, reason: impl Into<String>) -> Self {
        Self {
            code,
            location,
            reason: reason.into(),
        }
    }
}

/// The five delimiters of MSH-1 and MSH-2 (a truncation character of v2.7 and later, when
/// present, is only checked to be distinct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    pub field: char,
    pub component: char,
    pub repetition: char,
    pub escape: char,
    pub subcomponent: char,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
        }
    }
}

impl Delimiters {
    /// The MSH-2 text of these delimiters.
    pub fn encoding_characters(&self) -> String {
        [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ]
        .iter()
        .collect()
    }
}

/// The character sets of MSH-18 the gateway reads (HL7 table 0211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// MSH-18 empty or `ASCII`: 7-bit only.
    Ascii,
    /// `8859/1`: Latin-1, one byte per character.
    Latin1,
    /// `UNICODE UTF-8`.
    Utf8,
}

impl Charset {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ascii => "ASCII",
            Self::Latin1 => "8859/1",
            Self::Utf8 => "UNICODE UTF-8",
        }
    }
}

fn msh(field: usize) -> Location {
    Location::segment("MSH", 1).field(field)
}

/// Reads a frame's delimiters and character set from its MSH segment, then its text.
pub fn decode(frame: &[u8]) -> Result<(Cow<'_, str>, Delimiters, Charset), Er7Error> {
    let frame = frame.trim_ascii_start();
    if !frame.starts_with(b"MSH") {
        return Err(Er7Error::new(
            ErrorCode::SegmentSequence,
            Some(Location::segment("MSH", 1)),
            "the message must begin with an MSH segment",
        ));
    }
    let header = &frame[3..];
    let bad_delimiters = || {
        Er7Error::new(
            ErrorCode::DataType,
            Some(msh(2)),
            "MSH-1 and MSH-2 must declare five distinct delimiters (usually |^~\\&), none a letter, digit, space or line end",
        )
    };
    if header.len() < 5 {
        return Err(bad_delimiters());
    }
    let field = header[0];
    let encoding: Vec<u8> = header[1..]
        .iter()
        .copied()
        .take_while(|&b| b != field && b != b'\r' && b != b'\n')
        .collect();
    if !(4..=5).contains(&encoding.len()) {
        return Err(bad_delimiters());
    }
    let mut all = vec![field];
    all.extend_from_slice(&encoding);
    for (i, &b) in all.iter().enumerate() {
        if !b.is_ascii_punctuation() || all[..i].contains(&b) {
            return Err(bad_delimiters());
        }
    }
    let delimiters = Delimiters {
        field: field as char,
        component: encoding[0] as char,
        repetition: encoding[1] as char,
        escape: encoding[2] as char,
        subcomponent: encoding[3] as char,
    };
    // MSH-18 by counting field separators on the (ASCII) header line.
    let line_end = frame
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(frame.len());
    let charset_field = frame[..line_end]
        .split(|&b| b == field)
        .nth(17)
        .unwrap_or_default();
    let charset_name = charset_field
        .split(|&b| b == delimiters.repetition as u8)
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let charset = match charset_name {
        b"" | b"ASCII" => Charset::Ascii,
        b"8859/1" => Charset::Latin1,
        b"UNICODE UTF-8" => Charset::Utf8,
        other => {
            return Err(Er7Error::new(
                ErrorCode::TableValueNotFound,
                Some(msh(18)),
                format!(
                    "character set '{}' is not supported: send ASCII, 8859/1 or UNICODE UTF-8",
                    String::from_utf8_lossy(other)
                ),
            ));
        }
    };
    let text = match charset {
        Charset::Ascii if frame.is_ascii() => Cow::Borrowed(ascii(frame)),
        Charset::Ascii => {
            return Err(Er7Error::new(
                ErrorCode::DataType,
                Some(msh(18)),
                "the message has bytes outside ASCII but declares no character set in MSH-18 (UNICODE UTF-8 or 8859/1)",
            ));
        }
        Charset::Utf8 => match std::str::from_utf8(frame) {
            Ok(text) => Cow::Borrowed(text),
            Err(e) => {
                return Err(Er7Error::new(
                    ErrorCode::DataType,
                    Some(msh(18)),
                    format!(
                        "MSH-18 declares UNICODE UTF-8 but byte {} is not valid UTF-8",
                        e.valid_up_to()
                    ),
                ));
            }
        },
        Charset::Latin1 if frame.is_ascii() => Cow::Borrowed(ascii(frame)),
        Charset::Latin1 => Cow::Owned(frame.iter().map(|&b| b as char).collect()),
    };
    Ok((text, delimiters, charset))
}

fn ascii(bytes: &[u8]) -> &str {
    // Checked to be ASCII by the caller, so valid UTF-8.
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// A message split into segments and fields, borrowing its text.
#[derive(Debug)]
pub struct Message<'a> {
    pub delimiters: Delimiters,
    segments: Vec<Segment<'a>>,
}

/// One segment: its id, its ordinal among segments of that id, and its raw fields.
#[derive(Debug)]
pub struct Segment<'a> {
    pub id: &'a str,
    pub sequence: usize,
    /// `fields[0]` is the id; for MSH `fields[1]` is MSH-2 (MSH-1 is the separator itself).
    fields: Vec<&'a str>,
}

impl<'a> Message<'a> {
    pub fn parse(text: &'a str, delimiters: Delimiters) -> Result<Self, Er7Error> {
        let mut segments = Vec::new();
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for line in text.split(['\r', '\n']) {
            if line.trim().is_empty() {
                continue;
            }
            if segments.len() == MAX_SEGMENTS {
                return Err(Er7Error::new(
                    ErrorCode::SegmentSequence,
                    None,
                    format!("the message has more than {MAX_SEGMENTS} segments"),
                ));
            }
            let fields: Vec<&str> = line.split(delimiters.field).collect();
            let id = fields[0];
            if id.len() != 3
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(Er7Error::new(
                    ErrorCode::SegmentSequence,
                    None,
                    format!(
                        "segment {} does not begin with a three-character segment id",
                        segments.len() + 1
                    ),
                ));
            }
            let sequence = match counts.iter_mut().find(|(seen, _)| *seen == id) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.push((id, 1));
                    1
                }
            };
            segments.push(Segment {
                id,
                sequence,
                fields,
            });
        }
        Ok(Self {
            delimiters,
            segments,
        })
    }

    pub fn segments(&self) -> &[Segment<'a>] {
        &self.segments
    }

    /// The first segment with `id`.
    pub fn first(&self, id: &str) -> Option<&Segment<'a>> {
        self.segments.iter().find(|s| s.id == id)
    }
}

impl<'a> Segment<'a> {
    /// Field `n` as HL7 numbers it (MSH-1 is the field separator, so MSH-2 is the first stored
    /// field); empty when absent.
    pub fn field(&self, n: usize) -> &'a str {
        let index = if self.id == "MSH" {
            n.wrapping_sub(1)
        } else {
            n
        };
        if n == 0 || index == 0 {
            return "";
        }
        self.fields.get(index).copied().unwrap_or_default()
    }

    /// Where field `n` of this segment is.
    pub fn location(&self, n: usize) -> Location {
        Location::segment(self.id, self.sequence).field(n)
    }
}

/// The repetitions of a field.
pub fn repetitions(raw: &str, delimiters: Delimiters) -> impl Iterator<Item = &str> {
    raw.split(delimiters.repetition)
}

/// Component `n` (1-based) of one repetition; empty when absent.
pub fn component(raw: &str, n: usize, delimiters: Delimiters) -> &str {
    n.checked_sub(1)
        .and_then(|i| raw.split(delimiters.component).nth(i))
        .unwrap_or_default()
}

/// Subcomponent `n` (1-based) of one component; empty when absent.
pub fn subcomponent(raw: &str, n: usize, delimiters: Delimiters) -> &str {
    n.checked_sub(1)
        .and_then(|i| raw.split(delimiters.subcomponent).nth(i))
        .unwrap_or_default()
}

/// Why a value's escapes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EscapeError(pub String);

/// The text of a value with its escape sequences decoded: `\F\ \S\ \T\ \R\ \E\` become the
/// delimiters, `\Xhh..\` the bytes it spells (UTF-8, else Latin-1), `\.br\` a line break;
/// highlighting (`\H\ \N\`) and other formatting are dropped. An unterminated or unknown
/// escape is an error rather than a guess.
pub fn unescape(raw: &str, delimiters: Delimiters) -> Result<Cow<'_, str>, EscapeError> {
    if !raw.contains(delimiters.escape) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(delimiters.escape) {
        out.push_str(&rest[..start]);
        let after = &rest[start + delimiters.escape.len_utf8()..];
        let Some(end) = after.find(delimiters.escape) else {
            return Err(EscapeError(
                "an escape sequence is not closed by the escape character".into(),
            ));
        };
        let sequence = &after[..end];
        match sequence {
            "F" => out.push(delimiters.field),
            "S" => out.push(delimiters.component),
            "T" => out.push(delimiters.subcomponent),
            "R" => out.push(delimiters.repetition),
            "E" => out.push(delimiters.escape),
            "H" | "N" => {}
            ".br" => out.push('\n'),
            s if s.starts_with('X') => out.push_str(&hex_text(&s[1..])?),
            s if s.starts_with('.') => {}
            s => {
                return Err(EscapeError(format!(
                    "unknown escape sequence '{}{s}{}'",
                    delimiters.escape, delimiters.escape
                )));
            }
        }
        rest = &after[end + delimiters.escape.len_utf8()..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

fn hex_text(hex: &str) -> Result<String, EscapeError> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EscapeError(format!(
            "escape \\X{hex}\\ must be pairs of hexadecimal digits"
        )));
    }
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_default())
        .collect();
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    })
}

/// Appends `text` with every delimiter (and line break) escaped.
pub fn escape_into(out: &mut String, text: &str, delimiters: Delimiters) {
    let e = delimiters.escape;
    for c in text.chars() {
        let code = match c {
            c if c == delimiters.field => "F",
            c if c == delimiters.component => "S",
            c if c == delimiters.subcomponent => "T",
            c if c == delimiters.repetition => "R",
            c if c == e => "E",
            '\r' | '\n' => ".br",
            c => {
                out.push(c);
                continue;
            }
        };
        out.push(e);
        out.push_str(code);
        out.push(e);
    }
}

/// An HL7 DTM to the second, with the offset: `YYYYMMDDHHMMSS+HHMM`.
pub fn dtm(at: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year][month][day][hour][minute][second][offset_hour sign:mandatory][offset_minute]"
    );
    at.format(&format).unwrap_or_default()
}

/// Text in the character set a message is written in: characters it cannot hold become `?`.
pub fn encode(text: &str, charset: Charset) -> Vec<u8> {
    match charset {
        Charset::Utf8 => text.as_bytes().to_vec(),
        Charset::Latin1 => text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect(),
        Charset::Ascii => text
            .chars()
            .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORU: &str = "MSH|^~\\&|DIS|ICU|GW|HOSP|20261206101500+0100||ORU^R01^ORU_R01|MSG-1|P|2.6|||NE|AL||UNICODE UTF-8\rPID|||MRN-1^^^&1.2.3&ISO^MR~X^^^LOCAL^VN\rOBX|1|NM|Flow^Flow^99ECMO|1.1.1.1|4.2|L/min^^UCUM|||||F\r";

    fn parsed(text: &str) -> Message<'_> {
        Message::parse(text, Delimiters::default()).unwrap()
    }

    #[test]
    fn fields_components_and_repetitions_as_hl7_numbers_them() {
        let (text, delimiters, charset) = decode(ORU.as_bytes()).unwrap();
        assert_eq!(charset, Charset::Utf8);
        assert_eq!(delimiters, Delimiters::default());
        let message = Message::parse(&text, delimiters).unwrap();
        let msh = message.first("MSH").unwrap();
        assert_eq!(msh.field(2), "^~\\&");
        assert_eq!(msh.field(3), "DIS");
        assert_eq!(msh.field(10), "MSG-1");
        assert_eq!(component(msh.field(9), 2, delimiters), "R01");
        let pid = message.first("PID").unwrap();
        let ids: Vec<&str> = repetitions(pid.field(3), delimiters).collect();
        assert_eq!(ids.len(), 2);
        let authority = component(ids[0], 4, delimiters);
        assert_eq!(subcomponent(authority, 2, delimiters), "1.2.3");
        assert_eq!(subcomponent(authority, 3, delimiters), "ISO");
        let obx = message.first("OBX").unwrap();
        assert_eq!(obx.field(5), "4.2");
        assert_eq!(obx.field(40), "");
        assert_eq!(obx.location(6).describe(), "OBX-6");
    }

    #[test]
    fn segments_end_with_cr_lf_or_crlf() {
        for end in ["\r", "\n", "\r\n"] {
            let text = ORU.replace('\r', end);
            let message = parsed(&text);
            let ids: Vec<&str> = message.segments().iter().map(|s| s.id).collect();
            assert_eq!(ids, ["MSH", "PID", "OBX"], "{end:?}");
        }
    }

    #[test]
    fn other_delimiters_are_read_from_msh() {
        let text = "MSH#*%!$#A#B\rOBX#1#NM#a*b*c";
        let (text, delimiters, _) = decode(text.as_bytes()).unwrap();
        assert_eq!(delimiters.field, '#');
        assert_eq!(delimiters.component, '*');
        let message = Message::parse(&text, delimiters).unwrap();
        let obx = message.first("OBX").unwrap();
        assert_eq!(component(obx.field(3), 2, delimiters), "b");
    }

    #[test]
    fn wrong_encoding_characters_are_refused_naming_msh_2() {
        for bad in [
            "MSH|^~|A",
            "MSH|^^\\&|A",
            "MSH|^~\\a|A",
            "MSH",
            "MSH|^~\\&&&&|A",
            "PID|1",
        ] {
            let error = decode(bad.as_bytes()).unwrap_err();
            assert!(error.location.is_some(), "{bad}");
        }
        assert_eq!(
            decode(b"MSH|^~|A")
                .unwrap_err()
                .location
                .unwrap()
                .describe(),
            "MSH-2"
        );
    }

    #[test]
    fn character_sets() {
        let latin = b"MSH|^~\\&|A|B|||||ORU^R01|1|P|2.6||||||8859/1\rNTE|1||Gr\xfc\xdfe";
        let (text, _, charset) = decode(latin).unwrap();
        assert_eq!(charset, Charset::Latin1);
        assert!(text.ends_with("Grüße"));
        let undeclared = b"MSH|^~\\&|A|B\rNTE|1||Gr\xc3\xbc\xc3\x9fe";
        assert_eq!(decode(undeclared).unwrap_err().location.unwrap().field, 18);
        let bad_utf8 = b"MSH|^~\\&|A|B|||||ORU^R01|1|P|2.6||||||UNICODE UTF-8\rNTE|1||\xff";
        assert_eq!(decode(bad_utf8).unwrap_err().code, ErrorCode::DataType);
        let unknown = b"MSH|^~\\&|A|B|||||ORU^R01|1|P|2.6||||||ISO IR87";
        assert_eq!(
            decode(unknown).unwrap_err().code,
            ErrorCode::TableValueNotFound
        );
        assert_eq!(encode("5 °C", Charset::Latin1), b"5 \xb0C");
        assert_eq!(encode("5 °C", Charset::Ascii), b"5 ?C");
    }

    #[test]
    fn escapes_round_trip_and_decode() {
        let d = Delimiters::default();
        let mut out = String::new();
        escape_into(&mut out, "a|b^c&d~e\\f\ng", d);
        assert_eq!(out, "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\g");
        assert_eq!(unescape(&out, d).unwrap(), "a|b^c&d~e\\f\ng");
        assert_eq!(unescape("M\\XC3BC\\ller", d).unwrap(), "Müller");
        assert_eq!(unescape("\\XFC\\", d).unwrap(), "ü");
        assert_eq!(unescape("\\H\\bold\\N\\", d).unwrap(), "bold");
        assert!(matches!(unescape("plain", d).unwrap(), Cow::Borrowed(_)));
        assert!(unescape("open \\F", d).is_err());
        assert!(unescape("\\Q\\", d).is_err());
        assert!(unescape("\\XZZ\\", d).is_err());
    }

    #[test]
    fn segment_ids_are_checked_and_counted() {
        assert!(Message::parse("MSH|^~\\&\rpid|1", Delimiters::default()).is_err());
        let message = parsed("MSH|^~\\&\rOBX|1\rOBR|1\rOBX|2");
        let sequences: Vec<usize> = message.segments().iter().map(|s| s.sequence).collect();
        assert_eq!(sequences, [1, 1, 1, 2]);
    }

    #[test]
    fn long_input_is_split_in_linear_time() {
        // 10 000 segments of 100 fields each: must not take quadratic time (a test of the
        // shape only; no timing is asserted).
        let mut text = String::from("MSH|^~\\&|A\r");
        for _ in 0..10_000 {
            text.push_str("NTE");
            text.push_str(&"|x".repeat(100));
            text.push('\r');
        }
        assert_eq!(parsed(&text).segments().len(), 10_001);
        text.push_str(&"NTE|1\r".repeat(MAX_SEGMENTS));
        assert!(Message::parse(&text, Delimiters::default()).is_err());
    }
}
