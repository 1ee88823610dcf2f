//! The ingest API in XML (`application/xml`): a readings batch or a run event, read with
//! quick-xml as a stream into the same JSON values the JSON API produces, so the same schema
//! check and mapping apply. The format is documented by `profiles/xml/ingest.xsd`.
//!
//! Scalars are attributes; repeated things are repeated elements:
//! `<observationBatch><device serial=".." model=".."/><reading parameter="Flow" value="4.2"
//! unit="L/min" time=".."><flag value="in-alarm"/></reading></observationBatch>`.
//!
//! Hostile input is refused before it costs anything: no DOCTYPE (hence no entity
//! definitions, no expansion), only the predefined and character entities, a depth limit,
//! an attribute size and count limit, and UTF-8 only. Each refusal and each later issue
//! carries the line and column of the element concerned.

use std::collections::HashMap;

use bytes::Bytes;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use serde_json::{Map, Number, Value};

/// The XML namespace of the ingest documents (optional on input).
pub const NAMESPACE: &str = "https://fhir.ecmo-gateway.org/ns/ingest";

/// Deeper nesting than any valid document has.
const MAX_DEPTH: usize = 6;
/// Longer than any valid attribute value (the schema's longest string is 256).
const MAX_ATTRIBUTE_BYTES: usize = 1024;
const MAX_ATTRIBUTES: usize = 16;

/// Which document an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestDocument {
    ObservationBatch,
    RunEvent,
}

impl IngestDocument {
    fn root(self) -> &'static str {
        match self {
            Self::ObservationBatch => "observationBatch",
            Self::RunEvent => "runEvent",
        }
    }
}

/// How a child element becomes a JSON member: (parent, element, key, repeated, scalar from
/// its `value` attribute).
const ELEMENTS: &[(&str, &str, &str, bool, bool)] = &[
    ("observationBatch", "device", "device", false, false),
    ("observationBatch", "patient", "patient", false, false),
    ("observationBatch", "reading", "readings", true, false),
    ("reading", "flag", "flags", true, true),
    ("reading", "samples", "samples", false, false),
    ("samples", "sample", "data", true, true),
    ("runEvent", "patient", "patient", false, false),
    ("runEvent", "encounter", "encounter", false, false),
    ("runEvent", "console", "console", false, false),
    ("runEvent", "device", "device", false, false),
    ("runEvent", "indication", "indications", true, false),
    ("runEvent", "cannula", "cannulas", true, false),
    ("runEvent", "addedCannula", "cannula", false, false),
    ("runEvent", "complication", "complication", false, false),
    ("cannula", "site", "site", false, false),
    ("addedCannula", "site", "site", false, false),
];

/// Where each part of the document was (JSON pointer -> byte offset), for error answers. Line
/// and column are counted only for the part an error names: counting them for every element
/// would take time quadratic in the document's size.
#[derive(Debug, Clone, Default)]
pub struct XmlPositions {
    body: Bytes,
    by_pointer: HashMap<String, usize>,
}

impl XmlPositions {
    /// The line and column of `pointer`, or of its nearest ancestor that has a position.
    pub fn find(&self, pointer: &str) -> Option<(usize, usize)> {
        let mut p = pointer;
        let offset = loop {
            if let Some(offset) = self.by_pointer.get(p) {
                break *offset;
            }
            match p.rfind('/') {
                Some(0) | None => break *self.by_pointer.get("")?,
                Some(i) => p = &p[..i],
            }
        };
        Some(line_column(&self.body, offset))
    }
}

/// Why an XML body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (line {line}, column {column})")]
pub struct XmlError {
    pub reason: String,
    pub line: usize,
    pub column: usize,
}

/// An open element: its JSON object so far and where it goes in its parent.
struct Frame {
    name: String,
    pointer: String,
    key: String,
    repeated: bool,
    scalar: bool,
    object: Map<String, Value>,
}

/// Parses `body` as the `document` endpoint's XML into the JSON the JSON API would take.
pub fn parse(body: &Bytes, document: IngestDocument) -> Result<(Value, XmlPositions), XmlError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let (line, column) = line_column(body, e.valid_up_to());
        XmlError {
            reason: "the body is not UTF-8".into(),
            line,
            column,
        }
    })?;
    let fail = |reason: String, offset: u64| {
        let (line, column) = line_column(body, offset as usize);
        XmlError {
            reason,
            line,
            column,
        }
    };
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.trim_text(true);
    config.check_end_names = true;
    let mut positions = XmlPositions {
        body: body.clone(),
        by_pointer: HashMap::new(),
    };
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Value> = None;
    loop {
        // Where the next markup starts (the whitespace before it is not part of it).
        let mut offset = reader.buffer_position();
        while body
            .get(offset as usize)
            .is_some_and(u8::is_ascii_whitespace)
        {
            offset += 1;
        }
        let event = reader
            .read_event()
            .map_err(|e| fail(format!("malformed XML: {e}"), reader.error_position()))?;
        match event {
            Event::Decl(_) | Event::Comment(_) => {}
            Event::DocType(_) => {
                return Err(fail(
                    "a DOCTYPE is not allowed (no DTDs, no entity definitions)".into(),
                    offset,
                ));
            }
            Event::PI(_) => {
                return Err(fail(
                    "processing instructions are not allowed".into(),
                    offset,
                ));
            }
            Event::Text(t) if t.xml10_content().trim().is_empty() => {}
            Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                return Err(fail(
                    "text content is not allowed here: values are attributes".into(),
                    offset,
                ));
            }
            Event::Start(_) | Event::Empty(_) if root.is_some() => {
                return Err(fail("content after the document element".into(), offset));
            }
            Event::Start(ref start) | Event::Empty(ref start) => {
                let empty = matches!(event, Event::Empty(_));
                if stack.len() >= MAX_DEPTH {
                    return Err(fail(
                        format!("elements are nested deeper than {MAX_DEPTH} levels"),
                        offset,
                    ));
                }
                let name = local_name(start);
                let (key, repeated, scalar, pointer) = match stack.last_mut() {
                    None => {
                        if name != document.root() {
                            return Err(fail(
                                format!(
                                    "the document element must be <{}>, not <{name}>",
                                    document.root()
                                ),
                                offset,
                            ));
                        }
                        (String::new(), false, false, String::new())
                    }
                    Some(parent) => {
                        let rule = ELEMENTS
                            .iter()
                            .find(|(p, e, ..)| *p == parent.name && *e == name);
                        let (key, repeated, scalar) = match rule {
                            Some((_, _, key, repeated, scalar)) => {
                                ((*key).to_owned(), *repeated, *scalar)
                            }
                            // Unknown: kept, so the schema names it with its pointer.
                            None => (name.clone(), false, false),
                        };
                        let pointer = if repeated {
                            let index = parent
                                .object
                                .get(&key)
                                .and_then(Value::as_array)
                                .map_or(0, Vec::len);
                            format!("{}/{key}/{index}", parent.pointer)
                        } else {
                            format!("{}/{key}", parent.pointer)
                        };
                        (key, repeated, scalar, pointer)
                    }
                };
                let position = offset as usize;
                positions.by_pointer.insert(pointer.clone(), position);
                let object = attributes(start, &name, &pointer, position, &mut positions)
                    .map_err(|reason| fail(reason, offset))?;
                let frame = Frame {
                    name,
                    pointer,
                    key,
                    repeated,
                    scalar,
                    object,
                };
                if empty {
                    close(frame, &mut stack, &mut root);
                } else {
                    stack.push(frame);
                }
            }
            Event::End(_) => {
                let Some(frame) = stack.pop() else {
                    return Err(fail("unexpected end tag".into(), offset));
                };
                close(frame, &mut stack, &mut root);
            }
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(fail(
            "the document ends inside an element".into(),
            body.len() as u64,
        ));
    }
    let root = root.ok_or_else(|| fail("no document element".into(), 0))?;
    Ok((root, positions))
}

fn close(frame: Frame, stack: &mut [Frame], root: &mut Option<Value>) {
    let Frame {
        key,
        repeated,
        scalar,
        mut object,
        ..
    } = frame;
    let value = if scalar {
        object.remove("value").unwrap_or(Value::Null)
    } else {
        Value::Object(object)
    };
    match stack.last_mut() {
        None => *root = Some(value),
        Some(parent) => {
            if repeated {
                match parent
                    .object
                    .entry(key)
                    .or_insert_with(|| Value::Array(Vec::new()))
                {
                    Value::Array(items) => items.push(value),
                    other => *other = Value::Array(vec![value]),
                }
            } else {
                parent.object.insert(key, value);
            }
        }
    }
}

fn local_name(start: &BytesStart<'_>) -> String {
    start.local_name().as_ref().to_owned()
}

/// The element's attributes as JSON members; each gets the element's position.
fn attributes(
    start: &BytesStart<'_>,
    element: &str,
    pointer: &str,
    position: usize,
    positions: &mut XmlPositions,
) -> Result<Map<String, Value>, String> {
    let mut object = Map::new();
    for (n, attribute) in start.attributes().with_checks(true).enumerate() {
        if n >= MAX_ATTRIBUTES {
            return Err(format!(
                "<{element}> has more than {MAX_ATTRIBUTES} attributes"
            ));
        }
        let attribute = attribute.map_err(|e| format!("malformed attribute: {e}"))?;
        let key: String = attribute.key.as_ref().to_owned();
        if key == "xmlns" || key.starts_with("xmlns:") {
            continue;
        }
        if attribute.value.len() > MAX_ATTRIBUTE_BYTES {
            return Err(format!(
                "attribute '{key}' of <{element}> is longer than {MAX_ATTRIBUTE_BYTES} bytes"
            ));
        }
        let text = attribute
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| {
                format!(
                    "attribute '{key}' of <{element}>: {e} (only the predefined entities are allowed)"
                )
            })?;
        let value = typed(element, &key, &text);
        positions
            .by_pointer
            .insert(format!("{pointer}/{key}"), position);
        object.insert(key, value);
    }
    Ok(object)
}

/// Attribute text as the JSON type the schema expects: a reading's value is a number or a
/// boolean, a waveform's period and samples numbers, `alive` a boolean; anything that does not parse stays text for the schema to name.
fn typed(element: &str, key: &str, text: &str) -> Value {
    match (element, key, text) {
        ("reading", "value", "true") | ("runEvent", "alive", "true") => Value::Bool(true),
        ("reading", "value", "false") | ("runEvent", "alive", "false") => Value::Bool(false),
        ("reading", "value", _) | ("samples", "period", _) | ("sample", "value", _) => text
            .parse::<Number>()
            .map(Value::Number)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        _ => Value::String(text.to_owned()),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(body: &[u8], offset: usize) -> (usize, usize) {
    let before = &body[..offset.min(body.len())];
    #[cfg(test)]
    tests::SCANNED.with(|n| n.set(n.get() + before.len()));
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    thread_local! {
        /// Bytes [`line_column`] has looked at on this thread.
        pub static SCANNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Work linear in the document: a valid one with 20,000 elements costs no line counting
    /// at all (it cost a scan from the start per element, quadratic), and an error's position
    /// one scan up to it.
    #[test]
    fn positions_are_counted_only_for_an_error() {
        let readings: String = (0..20_000)
            .map(|n| {
                format!(
                    "<reading parameter=\"Flow\" value=\"{n}\" time=\"2026-11-21T10:00:00Z\"/>\n"
                )
            })
            .collect();
        let xml = format!("<observationBatch>\n{readings}</observationBatch>");
        SCANNED.with(|n| n.set(0));
        let (_, positions) = batch(&xml).unwrap();
        assert_eq!(SCANNED.with(|n| n.get()), 0);
        assert_eq!(positions.find("/readings/19999/value"), Some((20_001, 1)));
        assert!(SCANNED.with(|n| n.get()) <= xml.len());
    }

    fn batch(xml: &str) -> Result<(Value, XmlPositions), XmlError> {
        parse(
            &Bytes::copy_from_slice(xml.as_bytes()),
            IngestDocument::ObservationBatch,
        )
    }

    #[test]
    fn a_batch_reads_as_the_json_api_would_take_it() {
        let (value, positions) = batch(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<observationBatch xmlns="https://fhir.ecmo-gateway.org/ns/ingest">
  <!-- one cycle -->
  <device serial="CH-1" model="CARDIOHELP-i"/>
  <patient system="urn:oid:1.2.3" value="MRN &amp; 7"/>
  <reading parameter="Flow" value="4.250" unit="L/min" time="2026-11-21T10:00:00Z"/>
  <reading parameter="Bubble" value="false" time="2026-11-21T10:00:00Z">
    <flag value="in-alarm"/><flag value="test-data"/>
  </reading>
</observationBatch>"#,
        )
        .unwrap();
        assert_eq!(
            value,
            json!({
                "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
                "patient": {"system": "urn:oid:1.2.3", "value": "MRN & 7"},
                "readings": [
                    {"parameter": "Flow", "value": value["readings"][0]["value"], "unit": "L/min", "time": "2026-11-21T10:00:00Z"},
                    {"parameter": "Bubble", "value": false, "time": "2026-11-21T10:00:00Z", "flags": ["in-alarm", "test-data"]}
                ]
            })
        );
        // The device's digits are kept, as in JSON.
        assert_eq!(value["readings"][0]["value"].to_string(), "4.250");
        assert_eq!(positions.find("/readings/1/value"), Some((7, 3)));
        assert_eq!(positions.find("/readings/1/flags/1"), Some((8, 29)));
        assert_eq!(positions.find("/nothing/here"), Some((2, 1)));
    }

    #[test]
    fn run_events_with_lists_and_single_cannula() {
        let (value, _) = parse(
            &Bytes::from_static(br#"<runEvent eventId="s" type="started" time="2026-11-21T10:00:00Z" mode="vv" alive="true">
  <patient system="urn:oid:1" value="M"/>
  <indication code="67782005"/>
  <cannula id="d" role="drainage" laterality="left"><site code="83419000"/></cannula>
  <cannula id="r" role="return"><site code="12123001" display="internal jugular vein"/></cannula>
  <addedCannula id="a" role="return"><site code="7657000"/></addedCannula>
  <console serial="CH-1" model="CARDIOHELP-i" eui64="00-1B-C5-0A-00-00-0C-4A"/>
</runEvent>"#),
            IngestDocument::RunEvent,
        )
        .unwrap();
        assert_eq!(value["alive"], json!(true));
        assert_eq!(value["indications"], json!([{"code": "67782005"}]));
        assert_eq!(
            value["cannulas"][1]["site"]["display"],
            "internal jugular vein"
        );
        assert_eq!(value["cannula"]["id"], "a");
        assert_eq!(value["console"]["serial"], "CH-1");
        assert_eq!(value["console"]["eui64"], "00-1B-C5-0A-00-00-0C-4A");
        // The run-event schema takes what the XML gives.
        let schemas = crate::validation::Schemas::embedded().unwrap();
        let issues = schemas.get("run-event").unwrap().check(&value);
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn hostile_and_broken_xml_is_refused_with_a_position() {
        let cases: &[(&[u8], &str, usize)] = &[
            (
                b"<?xml version=\"1.0\"?>\n<!DOCTYPE x [<!ENTITY a \"aaaa\">]>\n<observationBatch/>",
                "DOCTYPE",
                2,
            ),
            (
                b"<observationBatch>\n<patient value=\"&xxe;\"/></observationBatch>",
                "entities",
                2,
            ),
            (
                b"<observationBatch><a><b><c><d><e><f><g/></f></e></d></c></b></a></observationBatch>",
                "deeper",
                1,
            ),
            (b"<observationBatch>\n\n  <device serial=\"\xff\"/>", "UTF-8", 3),
            (b"<observationBatch><device></observationBatch>", "malformed", 1),
            (b"<observationBatch>4.2</observationBatch>", "text content", 1),
            (b"<runEvent/>", "must be <observationBatch>", 1),
            (b"<observationBatch><device>", "ends inside", 1),
            (b"<observationBatch/><observationBatch/>", "after the document", 1),
            (b"<?php echo 1 ?><observationBatch/>", "processing instructions", 1),
        ];
        for (xml, needle, line) in cases {
            let error =
                parse(&Bytes::from_static(xml), IngestDocument::ObservationBatch).unwrap_err();
            assert!(error.reason.contains(needle), "{needle}: {error}");
            assert_eq!(error.line, *line, "{needle}: {error}");
        }
        let huge = format!(
            "<observationBatch><device serial=\"{}\"/></observationBatch>",
            "x".repeat(100_000)
        );
        assert!(batch(&huge).unwrap_err().reason.contains("longer than"));
        let many: String = (0..40).map(|i| format!(" a{i}=\"1\"")).collect();
        let many = format!("<observationBatch><device{many}/></observationBatch>");
        assert!(batch(&many).unwrap_err().reason.contains("more than"));
    }

    #[test]
    fn unknown_parts_are_kept_for_the_schema_to_name() {
        let (value, positions) =
            batch("<observationBatch>\n<device serial=\"1\" colour=\"red\"/>\n<gadget/></observationBatch>").unwrap();
        assert_eq!(value["device"]["colour"], "red");
        assert_eq!(value["gadget"], json!({}));
        assert_eq!(positions.find("/gadget"), Some((3, 1)));
        // A value that is not a number stays text, for the schema to refuse.
        let (value, _) =
            batch(r#"<observationBatch><reading value="4,2"/></observationBatch>"#).unwrap();
        assert_eq!(value["readings"][0]["value"], "4,2");
    }
}
