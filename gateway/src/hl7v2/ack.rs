//! The ACK^R01 the gateway answers each message with (original acknowledgment mode):
//!
//! - `AA` only once the readings are durably in the outbox, as the HTTP API's 202;
//! - `AE` for content the sender must fix (do not resend unchanged), with one ERR per problem:
//!   ERR-2 where (segment^sequence^field^repetition^component), ERR-3 the table 0357 code,
//!   ERR-4 the severity, ERR-8 the reason in words;
//! - `AR` for a message the gateway does not take (type, version, processing id) or cannot take
//!   now (outbox full, storage unavailable: resend later).
//!
//! An AA can carry ERR segments of severity W (a result skipped because the device sent none).
//!
//! A sender asking for an accept acknowledgment (MSH-15 `AL`, or `ER`/`SU` when it applies)
//! gets the commit ACK instead, CA/CE/CR, with the same meaning: the gateway's commit is the
//! durable outbox. Otherwise MSH-16 says whether the application ACK is sent (`NE` never, `ER`
//! only for errors, `SU` only for successes; empty or `AL`: always), on the same connection, as
//! IHE PCD-01 does. The answer is never sent later on a connection of the gateway's own.

use super::er7::{self, Charset, Delimiters, Er7Error, Location};
use super::pcd01::Header;

/// MSA-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    Accept,
    Error,
    Reject,
}

impl AckCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "AA",
            Self::Error => "AE",
            Self::Reject => "AR",
        }
    }

    /// The commit (accept) acknowledgment of the same outcome.
    fn as_commit_str(self) -> &'static str {
        match self {
            Self::Accept => "CA",
            Self::Error => "CE",
            Self::Reject => "CR",
        }
    }
}

/// MSA-1 of the answer to a message with `header` whose outcome is `code`, as MSH-15 and
/// MSH-16 ask for it; None when the sender asked for no answer in this case.
pub fn answer_code(header: &Header, code: AckCode) -> Option<&'static str> {
    let wanted = |condition: &str| match condition {
        "NE" => false,
        "ER" => code != AckCode::Accept,
        "SU" => code == AckCode::Accept,
        _ => true,
    };
    let accept = header.accept_ack.as_str();
    if matches!(accept, "AL" | "ER" | "SU") && wanted(accept) {
        return Some(code.as_commit_str());
    }
    wanted(&header.application_ack).then(|| code.as_str())
}

/// The ACK of a message as its sender asked for it (see [`answer_code`]); None for none.
pub fn respond(
    header: &Header,
    code: AckCode,
    problems: &[(Severity, &Er7Error)],
    control_id: &str,
    now: time::OffsetDateTime,
) -> Option<Vec<u8>> {
    answer_code(header, code).map(|msa| write_as(header, msa, problems, control_id, now))
}

/// ERR-4 (HL7 table 0516).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// Writes the ACK with MSA-1 `code`, whatever MSH-15 and MSH-16 ask (for frames whose header
/// cannot be trusted, and for receivers that always answer).
pub fn write(
    header: &Header,
    code: AckCode,
    problems: &[(Severity, &Er7Error)],
    control_id: &str,
    now: time::OffsetDateTime,
) -> Vec<u8> {
    write_as(header, code.as_str(), problems, control_id, now)
}

/// Writes the ACK, in the message's delimiters and character set.
fn write_as(
    header: &Header,
    msa: &str,
    problems: &[(Severity, &Er7Error)],
    control_id: &str,
    now: time::OffsetDateTime,
) -> Vec<u8> {
    let d = header.delimiters;
    let f = d.field;
    let mut text = String::with_capacity(256 + problems.len() * 160);
    text.push_str("MSH");
    text.push(f);
    text.push_str(&d.encoding_characters());
    // Sender and receiver swapped; they are echoed as sent (already escaped).
    for part in [
        &header.receiving_application,
        &header.receiving_facility,
        &header.sending_application,
        &header.sending_facility,
    ] {
        text.push(f);
        text.push_str(part);
    }
    text.push(f);
    text.push_str(&er7::dtm(now));
    text.push(f);
    text.push(f);
    text.push_str("ACK");
    text.push(d.component);
    text.push_str("R01");
    text.push(d.component);
    text.push_str("ACK");
    text.push(f);
    er7::escape_into(&mut text, control_id, d);
    text.push(f);
    text.push_str(if header.processing_id.is_empty() {
        "P"
    } else {
        &header.processing_id
    });
    text.push(f);
    text.push_str(if header.version.is_empty() {
        "2.6"
    } else {
        &header.version
    });
    // MSH-13 to MSH-17 empty, MSH-18 the character set.
    for _ in 13..=18 {
        text.push(f);
    }
    text.push_str(header.charset.name());
    text.push('\r');

    text.push_str("MSA");
    text.push(f);
    text.push_str(msa);
    text.push(f);
    text.push_str(&header.control_id);
    text.push('\r');

    for (severity, problem) in problems {
        text.push_str("ERR");
        text.push(f);
        text.push(f);
        if let Some(location) = &problem.location {
            write_location(&mut text, location, d);
        }
        text.push(f);
        let (code, name) = problem.code.code_and_text();
        text.push_str(code);
        text.push(d.component);
        text.push_str(name);
        text.push(d.component);
        text.push_str("HL70357");
        text.push(f);
        text.push(match severity {
            Severity::Error => 'E',
            Severity::Warning => 'W',
        });
        // ERR-5 to ERR-7 empty, ERR-8 the user message.
        for _ in 5..=8 {
            text.push(f);
        }
        er7::escape_into(&mut text, &problem.reason, d);
        text.push('\r');
    }
    er7::encode(&text, header.charset)
}

fn write_location(text: &mut String, location: &Location, d: Delimiters) {
    er7::escape_into(text, &location.segment, d);
    let parts = [
        location.sequence,
        location.field,
        location.repetition,
        location.component,
        location.subcomponent,
    ];
    let used = parts.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
    for n in &parts[..used] {
        text.push(d.component);
        if *n > 0 {
            text.push_str(&n.to_string());
        }
    }
}

/// A header for answering a frame that could not be read at all (default delimiters, no
/// control id to echo).
pub fn unreadable_header() -> Header {
    Header {
        delimiters: Delimiters::default(),
        charset: Charset::Ascii,
        sending_application: String::new(),
        sending_facility: String::new(),
        receiving_application: String::new(),
        receiving_facility: String::new(),
        control_id: String::new(),
        processing_id: String::new(),
        version: String::new(),
        accept_ack: String::new(),
        application_ack: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hl7v2::er7::{ErrorCode, Message};

    #[test]
    fn msh_15_and_16_choose_the_answer() {
        let header = |accept: &str, application: &str| Header {
            accept_ack: accept.into(),
            application_ack: application.into(),
            ..unreadable_header()
        };
        use AckCode::{Accept, Error, Reject};
        for (accept, application, outcome, answer) in [
            ("", "", Accept, Some("AA")),
            ("", "", Error, Some("AE")),
            ("NE", "AL", Accept, Some("AA")),
            ("NE", "AL", Reject, Some("AR")),
            ("AL", "NE", Accept, Some("CA")),
            ("AL", "NE", Error, Some("CE")),
            ("AL", "AL", Reject, Some("CR")),
            ("ER", "NE", Accept, None),
            ("ER", "NE", Error, Some("CE")),
            ("SU", "AL", Error, Some("AE")),
            ("NE", "NE", Accept, None),
            ("NE", "ER", Accept, None),
            ("NE", "ER", Error, Some("AE")),
            ("NE", "SU", Accept, Some("AA")),
        ] {
            assert_eq!(
                answer_code(&header(accept, application), outcome),
                answer,
                "{accept}|{application} {outcome:?}"
            );
        }
    }

    #[test]
    fn an_ack_echoes_the_control_id_and_names_each_problem() {
        let text = "MSH|^~\\&|DIS|ICU|GW|HOSP|20261206101500+0100||ORU^R01^ORU_R01|MSG-1|P|2.6|||NE|AL||8859/1\r";
        let (text, d, charset) = er7::decode(text.as_bytes()).unwrap();
        let message = Message::parse(&text, d).unwrap();
        let header = Header::read(&message, charset);
        let problem = Er7Error::new(
            ErrorCode::TableValueNotFound,
            Some(Location::segment("OBX", 3).field(6).component(1)),
            "unit 'gal|x' is not accepted; 5 °C",
        );
        let warning = Er7Error::new(ErrorCode::RequiredFieldMissing, None, "skipped");
        let ack = write(
            &header,
            AckCode::Error,
            &[(Severity::Error, &problem), (Severity::Warning, &warning)],
            "ACK-9",
            time::macros::datetime!(2026-12-06 10:15:01 +01:00),
        );
        // Latin-1, as the message declared.
        let ack: String = ack.iter().map(|&b| b as char).collect();
        let lines: Vec<&str> = ack.split('\r').collect();
        assert_eq!(
            lines[0],
            "MSH|^~\\&|GW|HOSP|DIS|ICU|20261206101501+0100||ACK^R01^ACK|ACK-9|P|2.6||||||8859/1"
        );
        assert_eq!(lines[1], "MSA|AE|MSG-1");
        assert_eq!(
            lines[2],
            "ERR||OBX^3^6^1^1|103^Table value not found^HL70357|E||||unit 'gal\\F\\x' is not accepted; 5 °C"
        );
        assert_eq!(
            lines[3],
            "ERR|||101^Required field missing^HL70357|W||||skipped"
        );
        // It reads back as a message.
        let bytes = er7::encode(&ack, Charset::Latin1);
        let (text, d, _) = er7::decode(&bytes).unwrap();
        let parsed = Message::parse(&text, d).unwrap();
        assert_eq!(parsed.first("MSA").unwrap().field(2), "MSG-1");
    }
}
