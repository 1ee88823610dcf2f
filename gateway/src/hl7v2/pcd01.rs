//! IHE PCD-01 (DEV-01) ORU^R01 -> the observation batch the JSON API takes.
//!
//! The message becomes the same JSON document a vendor would post to `/v1/observations`, so it
//! then meets the same rules in the same place: schema, device authorization, mapping table,
//! units, ranges, time window, runs. Only what is HL7 v2's own is checked here: the message
//! type, version and processing id, NM and DTM syntax, escapes, one device and one patient per
//! message. Every JSON pointer the batch has is remembered with the HL7 field it came from, so a
//! refusal names the segment and field (ERR-2), not a JSON pointer the sender never wrote.
//!
//! What is read:
//! - MSH-9 `ORU^R01`, MSH-11 `P` or `D` (training data, `T`, is refused: it must not reach a
//!   chart), MSH-12 2.5 to 2.9, MSH-10 echoed in the ACK.
//! - PID-3: the patient identifier, preferring the `MR` repetition. Its system comes from the
//!   assigning authority: an OID (HD-2 with HD-3 `ISO`) or URI (`URI`), or a namespace id the
//!   configuration names (`[hl7v2.patient_identifier_systems]`). PID absent: no patient (a run
//!   may supply one).
//! - OBX-18 (equipment instance identifier): EI-1 is the device serial (an EUI-64 in PCD-01),
//!   EI-2 the device model that selects the mapping table. The MDS-level OBX (containment
//!   `n.0.0.0`) is preferred; every OBX-18 of a message must name the same device.
//! - OBX-2 `NM` with OBX-5 the value. OBX-3 names the parameter: a code of the family's table
//!   in MDC, LOINC or SNOMED CT (`MDC`, `LN`, `SCT`), either CWE triplet, when exactly one
//!   parameter has it; otherwise the identifier is the device's own parameter name (private
//!   codes, e.g. `Flow^Blood flow^99CH`). OBX-6: UCUM (or local) as written, MDC unit codes
//!   through the unit table. OBX-14 the time, else OBR-7; both with seconds and an offset.
//! - OBX-11: F, R, C and P are results; X with no value is skipped with a warning in the ACK,
//!   X with a value is recorded as invalid (dataAbsentReason); D and W (deletions) are refused:
//!   retractions go to `/v1/observations/entered-in-error`.
//! - OBX-2 `NA`: a waveform, its samples the components of OBX-5 (an empty one an invalid
//!   sample), its sample period the OBX right after it (MDC_ATTR_TIME_PD_SAMP in ms, as the
//!   IHE PCD Waveform Content Module places it).
//! - OBX without a type and value (MDS, VMD and channel descriptions) carry device identity
//!   only. Other value types are refused, never dropped.

use std::collections::HashMap;

use mappings::{DeviceFamily, Mappings};
use serde_json::{Map, Value, json};

use super::er7::{
    self, Charset, Delimiters, Er7Error, ErrorCode, Location, Message, Segment, component,
    repetitions, subcomponent,
};

/// How many problems one ACK lists at most.
const MAX_PROBLEMS: usize = 50;

/// The MDC coding system of the mapping tables, as OBX-3 names it (`MDC`).
const MDC: &str = "urn:iso:std:iso:11073:10101";

/// What the ACK echoes and how it is written.
#[derive(Debug, Clone)]
pub struct Header {
    pub delimiters: Delimiters,
    pub charset: Charset,
    /// MSH-3 to MSH-6 as sent (escaped), swapped into the ACK.
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    pub control_id: String,
    pub processing_id: String,
    pub version: String,
    /// MSH-15 and MSH-16: the accept (commit) and application acknowledgments asked for.
    pub accept_ack: String,
    pub application_ack: String,
}

impl Header {
    /// Reads MSH as far as it can, so that even a refused message's ACK echoes MSH-10.
    pub fn read(message: &Message<'_>, charset: Charset) -> Self {
        let msh = message.first("MSH");
        let field = |n: usize| msh.map(|s| s.field(n)).unwrap_or_default().to_owned();
        let d = message.delimiters;
        Self {
            delimiters: d,
            charset,
            sending_application: field(3),
            sending_facility: field(4),
            receiving_application: field(5),
            receiving_facility: field(6),
            control_id: field(10),
            processing_id: component(&field(11), 1, d).to_owned(),
            version: component(&field(12), 1, d).to_owned(),
            accept_ack: field(15).trim().to_owned(),
            application_ack: field(16).trim().to_owned(),
        }
    }
}

/// Whether a refusal is of the message as such (AR: type, version, processing id) or of its
/// content (AE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Reject,
    Error,
}

/// A converted message: the batch, where each pointer came from, and warnings for the ACK.
#[derive(Debug)]
pub struct Converted {
    pub batch: Value,
    pub places: Places,
    pub warnings: Vec<Er7Error>,
    pub readings: usize,
}

/// JSON pointer -> the HL7 field it was read from.
#[derive(Debug, Default)]
pub struct Places(Vec<(String, Location)>);

impl Places {
    fn put(&mut self, pointer: impl Into<String>, location: Location) {
        self.0.push((pointer.into(), location));
    }

    /// The field of `pointer`, or of its nearest parent that has one.
    pub fn find(&self, pointer: &str) -> Option<&Location> {
        self.0
            .iter()
            .filter(|(p, _)| {
                pointer == p
                    || (pointer.starts_with(p.as_str())
                        && pointer.as_bytes().get(p.len()) == Some(&b'/'))
            })
            .max_by_key(|(p, _)| p.len())
            .map(|(_, l)| l)
    }
}

/// Settings of the PCD-01 reading (from `[hl7v2]`).
#[derive(Debug, Clone, Default)]
pub struct Pcd01Settings {
    /// Assigning authority namespace id (PID-3.4.1) -> patient identifier system URI.
    pub patient_identifier_systems: HashMap<String, String>,
}

/// Checks MSH and turns the message into an observation batch.
pub fn convert(
    message: &Message<'_>,
    header: &Header,
    mappings: &Mappings,
    settings: &Pcd01Settings,
) -> Result<Converted, (Refusal, Vec<Er7Error>)> {
    check_header(message, header).map_err(|e| (Refusal::Reject, vec![e]))?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut places = Places::default();
    let d = message.delimiters;
    let mut batch = Map::new();

    // The device.
    let device = device_of(message, &mut problems);
    let family = device
        .as_ref()
        .and_then(|device| mappings.family_for_model(&device.model));
    if let Some(device) = &device {
        places.put("/device", device.location.clone());
        places.put("/device/serial", device.location.clone().component(1));
        places.put("/device/model", device.location.clone().component(2));
        batch.insert(
            "device".into(),
            json!({"serial": device.serial, "model": device.model}),
        );
    }

    // The patient.
    let pids: Vec<&Segment<'_>> = message
        .segments()
        .iter()
        .filter(|s| s.id == "PID")
        .collect();
    if let Some(extra) = pids.get(1) {
        problems.push(Er7Error::new(
            ErrorCode::SegmentSequence,
            Some(Location::segment("PID", extra.sequence)),
            "one message carries one patient's results: send each patient's in its own message",
        ));
    }
    if let Some(pid) = pids.first() {
        match patient_of(pid, d, settings) {
            Ok(Some((system, value, location))) => {
                places.put("/patient", location.clone());
                places.put("/patient/system", location.clone().component(4));
                places.put("/patient/value", location.component(1));
                batch.insert("patient".into(), json!({"system": system, "value": value}));
            }
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }

    // The readings.
    let mut readings = Vec::new();
    let mut observation_time: Option<&Segment<'_>> = None;
    let mut first_obx = None;
    let segments = message.segments();
    let mut attribute_of_previous = false;
    for (i, segment) in segments.iter().enumerate() {
        // A waveform's sample period OBX belongs to the waveform before it.
        if std::mem::take(&mut attribute_of_previous) {
            continue;
        }
        match segment.id {
            "OBR" => observation_time = Some(segment),
            "OBX" => {
                first_obx.get_or_insert_with(|| segment.location(0));
                let index = readings.len();
                let sample_period = segments
                    .get(i + 1)
                    .filter(|next| segment.field(2) == "NA" && is_sample_period(next, d));
                attribute_of_previous = sample_period.is_some();
                match reading_of(
                    segment,
                    sample_period,
                    observation_time,
                    d,
                    family,
                    mappings,
                ) {
                    Ok(Some((reading, fields))) => {
                        let at = format!("/readings/{index}");
                        places.put(at.clone(), Location::segment("OBX", segment.sequence));
                        for (name, location) in fields {
                            places.put(format!("{at}/{name}"), location);
                        }
                        readings.push(reading);
                    }
                    Ok(None) => {}
                    Err(Skipped::Warning(w)) => warnings.push(w),
                    Err(Skipped::Problem(e)) => problems.push(e),
                }
            }
            _ => {}
        }
        if problems.len() >= MAX_PROBLEMS {
            break;
        }
    }
    let readings_place = first_obx.unwrap_or_else(|| Location::segment("OBX", 1));
    places.put("/readings", readings_place.clone());
    if readings.is_empty() && problems.is_empty() {
        problems.push(Er7Error::new(
            ErrorCode::RequiredFieldMissing,
            Some(readings_place),
            "the message has no OBX with a numeric (NM) value: nothing to record",
        ));
    }
    if !problems.is_empty() {
        problems.truncate(MAX_PROBLEMS);
        return Err((Refusal::Error, problems));
    }
    let count = readings.len();
    batch.insert("readings".into(), Value::Array(readings));
    Ok(Converted {
        batch: Value::Object(batch),
        places,
        warnings,
        readings: count,
    })
}

fn check_header(message: &Message<'_>, header: &Header) -> Result<(), Er7Error> {
    let d = message.delimiters;
    let msh = message.first("MSH").ok_or_else(|| {
        Er7Error::new(
            ErrorCode::SegmentSequence,
            Some(Location::segment("MSH", 1)),
            "the message has no MSH segment",
        )
    })?;
    let kind = msh.field(9);
    if component(kind, 1, d) != "ORU" {
        return Err(Er7Error::new(
            ErrorCode::UnsupportedMessageType,
            Some(msh.location(9).component(1)),
            format!(
                "message type '{}' is not taken here: the gateway takes device results as ORU^R01 (IHE PCD-01)",
                component(kind, 1, d)
            ),
        ));
    }
    if component(kind, 2, d) != "R01" {
        return Err(Er7Error::new(
            ErrorCode::UnsupportedEventCode,
            Some(msh.location(9).component(2)),
            format!(
                "trigger event '{}' is not taken: send ORU^R01",
                component(kind, 2, d)
            ),
        ));
    }
    if header.control_id.is_empty() {
        return Err(Er7Error::new(
            ErrorCode::RequiredFieldMissing,
            Some(msh.location(10)),
            "MSH-10 (message control id) is required: the ACK names it",
        ));
    }
    match header.processing_id.as_str() {
        "P" | "D" => {}
        "T" => {
            return Err(Er7Error::new(
                ErrorCode::UnsupportedProcessingId,
                Some(msh.location(11)),
                "training messages (MSH-11 T) are not recorded: their values would reach patients' charts",
            ));
        }
        other => {
            return Err(Er7Error::new(
                ErrorCode::UnsupportedProcessingId,
                Some(msh.location(11)),
                format!("processing id '{other}' is not taken: send P (production)"),
            ));
        }
    }
    let version = header.version.as_str();
    if ![
        "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9",
    ]
    .contains(&version)
    {
        return Err(Er7Error::new(
            ErrorCode::UnsupportedVersionId,
            Some(msh.location(12)),
            format!(
                "HL7 version '{version}' is not taken: IHE PCD-01 messages are 2.6 (2.5 to 2.9 are read)"
            ),
        ));
    }
    Ok(())
}

struct Device {
    serial: String,
    model: String,
    location: Location,
}

/// The one device of the message, from OBX-18 (the MDS-level OBX first).
fn device_of(message: &Message<'_>, problems: &mut Vec<Er7Error>) -> Option<Device> {
    let d = message.delimiters;
    let obxs: Vec<&Segment<'_>> = message
        .segments()
        .iter()
        .filter(|s| s.id == "OBX" && !s.field(18).is_empty())
        .collect();
    let is_mds = |s: &&&Segment<'_>| {
        let containment = s.field(4);
        let mut levels = containment.split('.');
        levels.next().is_some_and(|l| !l.is_empty()) && levels.all(|l| l == "0")
    };
    let Some(chosen) = obxs.iter().find(is_mds).or(obxs.first()) else {
        problems.push(Er7Error::new(
            ErrorCode::RequiredFieldMissing,
            Some(
                message
                    .first("OBX")
                    .map_or_else(|| Location::segment("OBX", 1), |s| s.location(18)),
            ),
            "no OBX names the device: OBX-18 (equipment instance identifier) needs the serial or EUI-64 in EI-1 and the model in EI-2",
        ));
        return None;
    };
    let location = chosen.location(18);
    let first = repetitions(chosen.field(18), d).next().unwrap_or_default();
    let read = |n: usize, what: &str, problems: &mut Vec<Er7Error>| -> Option<String> {
        match er7::unescape(component(first, n, d), d) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Ok(_) => {
                problems.push(Er7Error::new(
                    ErrorCode::RequiredFieldMissing,
                    Some(location.clone().component(n)),
                    format!("OBX-18.{n} must give the device's {what}"),
                ));
                None
            }
            Err(e) => {
                problems.push(Er7Error::new(
                    ErrorCode::DataType,
                    Some(location.clone().component(n)),
                    e.0,
                ));
                None
            }
        }
    };
    let serial = read(
        1,
        "serial number or EUI-64 (EI-1, entity identifier)",
        problems,
    );
    let model = read(
        2,
        "model (EI-2, namespace id), which selects the mapping table",
        problems,
    );
    for other in &obxs {
        let entity = component(
            repetitions(other.field(18), d).next().unwrap_or_default(),
            1,
            d,
        );
        if serial.as_deref().is_some_and(|s| {
            er7::unescape(entity, d)
                .map(|e| e.trim() != s)
                .unwrap_or(true)
        }) {
            problems.push(Er7Error::new(
                ErrorCode::UnknownKeyIdentifier,
                Some(other.location(18).component(1)),
                "one message carries one device's results: this OBX-18 names another device than the message's first",
            ));
            break;
        }
    }
    Some(Device {
        serial: serial?,
        model: model?,
        location,
    })
}

/// PID-3 -> (system, value, where), preferring the medical record number.
fn patient_of(
    pid: &Segment<'_>,
    d: Delimiters,
    settings: &Pcd01Settings,
) -> Result<Option<(String, String, Location)>, Er7Error> {
    let location = pid.location(3);
    let mut candidates: Vec<(usize, &str)> = repetitions(pid.field(3), d)
        .enumerate()
        .filter(|(_, cx)| !component(cx, 1, d).is_empty())
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    candidates.sort_by_key(|(_, cx)| component(cx, 5, d) != "MR");
    let mut first_refusal = None;
    for (index, cx) in candidates {
        let mut at = location.clone();
        at.repetition = index + 1;
        let authority = component(cx, 4, d);
        let namespace = subcomponent(authority, 1, d);
        let universal = subcomponent(authority, 2, d);
        let system = match subcomponent(authority, 3, d) {
            "ISO" if is_oid(universal) => Some(format!("urn:oid:{universal}")),
            "URI" if universal.contains(':') => Some(universal.to_owned()),
            _ => settings.patient_identifier_systems.get(namespace).cloned(),
        };
        let Some(system) = system else {
            first_refusal.get_or_insert_with(|| {
                Er7Error::new(
                    ErrorCode::TableValueNotFound,
                    Some(at.clone().component(4)),
                    format!(
                        "the patient identifier's assigning authority '{namespace}' is not known: give its OID (PID-3.4.2, with PID-3.4.3 ISO) or name it under [hl7v2.patient_identifier_systems]"
                    ),
                )
            });
            continue;
        };
        let value = er7::unescape(component(cx, 1, d), d)
            .map_err(|e| Er7Error::new(ErrorCode::DataType, Some(at.clone().component(1)), e.0))?;
        return Ok(Some((system, value.trim().to_owned(), at)));
    }
    Err(first_refusal.unwrap_or_else(|| {
        Er7Error::new(
            ErrorCode::DataType,
            Some(location),
            "no readable patient identifier",
        )
    }))
}

fn is_oid(text: &str) -> bool {
    !text.is_empty()
        && text
            .split('.')
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
}

enum Skipped {
    Warning(Er7Error),
    Problem(Er7Error),
}

type ReadingFields = Vec<(&'static str, Location)>;

/// MDC_ATTR_TIME_PD_SAMP: the OBX after a waveform (NA) that gives its sample period, as the
/// IHE PCD Waveform Content Module places it.
pub const SAMPLE_PERIOD: (&str, &str) = ("67980", "MDC_ATTR_TIME_PD_SAMP");

/// MDC_DIM_MILLI_SEC: the unit of a sample period.
pub const MILLISECONDS: (&str, &str) = ("264338", "MDC_DIM_MILLI_SEC");

fn is_sample_period(obx: &Segment<'_>, d: Delimiters) -> bool {
    let code = obx.field(3);
    obx.id == "OBX"
        && (component(code, 1, d) == SAMPLE_PERIOD.0 || component(code, 2, d) == SAMPLE_PERIOD.1)
}

/// A waveform's samples (OBX-5 of an NA result, an empty component an invalid sample) every
/// period milliseconds (the MDC_ATTR_TIME_PD_SAMP OBX after it, in `ms`).
fn waveform_samples(
    obx: &Segment<'_>,
    value_raw: &str,
    period: Option<&Segment<'_>>,
    d: Delimiters,
) -> Result<Value, Skipped> {
    let problem = |code, location: Location, text: String| {
        Skipped::Problem(Er7Error::new(code, Some(location), text))
    };
    let Some(period) = period else {
        return Err(problem(
            ErrorCode::RequiredFieldMissing,
            obx.location(2),
            "a waveform (NA) needs its sample period in the OBX right after it: 67980^MDC_ATTR_TIME_PD_SAMP^MDC in ms (264338^MDC_DIM_MILLI_SEC^MDC)".into(),
        ));
    };
    let unit = period.field(6);
    let milliseconds = [1, 2, 4, 5].iter().any(|&n| {
        let code = component(unit, n, d);
        code == MILLISECONDS.0 || code == MILLISECONDS.1 || code == "ms"
    });
    if !milliseconds {
        return Err(problem(
            ErrorCode::DataType,
            period.location(6),
            format!(
                "the sample period's unit '{unit}' is not milliseconds (264338^MDC_DIM_MILLI_SEC^MDC or ms)"
            ),
        ));
    }
    let every = nm_number(period.field(5)).ok_or_else(|| {
        problem(
            ErrorCode::DataType,
            period.location(5),
            "the sample period is not an NM number".into(),
        )
    })?;
    let mut data = Vec::new();
    for (k, sample) in value_raw.split(d.component).enumerate() {
        if sample.trim().is_empty() {
            data.push(Value::Null);
            continue;
        }
        data.push(Value::Number(nm_number(sample).ok_or_else(|| {
            problem(
                ErrorCode::DataType,
                obx.location(5).component(k + 1),
                format!("sample {} is not an NM number", k + 1),
            )
        })?));
    }
    Ok(json!({"period": every, "data": data}))
}

/// One OBX -> one reading of the batch (None for device descriptions without a value).
fn reading_of(
    obx: &Segment<'_>,
    sample_period: Option<&Segment<'_>>,
    obr: Option<&Segment<'_>>,
    d: Delimiters,
    family: Option<&DeviceFamily>,
    mappings: &Mappings,
) -> Result<Option<(Value, ReadingFields)>, Skipped> {
    let value_type = obx.field(2);
    let value_raw = repetitions(obx.field(5), d).next().unwrap_or_default();
    let status = obx.field(11);
    if value_type.is_empty() && value_raw.is_empty() {
        return Ok(None);
    }
    let problem = |code, location: Location, text: String| {
        Skipped::Problem(Er7Error::new(code, Some(location), text))
    };
    let coded = matches!(value_type, "CWE" | "CE" | "CNE" | "ST");
    let waveform = value_type == "NA";
    if value_type != "NM" && !coded && !waveform {
        return Err(problem(
            ErrorCode::DataType,
            obx.location(2),
            format!(
                "value type '{value_type}' is not taken: the gateway maps numeric results (NM), waveforms (NA) and yes/no states (CWE, CE, CNE or ST with Y or N); other types are refused rather than dropped"
            ),
        ));
    }
    let mut flags = Vec::new();
    match status {
        "F" | "R" | "C" | "P" | "" => {}
        "X" if value_raw.is_empty() => {
            return Err(Skipped::Warning(Er7Error::new(
                ErrorCode::RequiredFieldMissing,
                Some(obx.location(5)),
                "the device could not obtain this result (OBX-11 X) and sent no value; nothing was recorded for it",
            )));
        }
        "X" => flags.push("invalid"),
        "D" | "W" => {
            return Err(problem(
                ErrorCode::TableValueNotFound,
                obx.location(11),
                format!(
                    "result status '{status}' deletes an earlier result: send retractions to /v1/observations/entered-in-error"
                ),
            ));
        }
        other => {
            return Err(problem(
                ErrorCode::TableValueNotFound,
                obx.location(11),
                format!("result status '{other}' is not one of F, R, C, P or X"),
            ));
        }
    }
    if value_raw.is_empty() {
        return Err(problem(
            ErrorCode::RequiredFieldMissing,
            obx.location(5),
            "OBX-5 has no value".into(),
        ));
    }
    let value = if waveform {
        if obx.field(5).contains(d.repetition) {
            return Err(problem(
                ErrorCode::DataType,
                obx.location(5),
                "a waveform is one NA value, its samples the components: OBX-5 repeats".into(),
            ));
        }
        waveform_samples(obx, value_raw, sample_period, d)?
    } else if coded {
        // HL7 table 0136 (yes/no indicator), as a boolean the mapping table checks.
        match component(value_raw, 1, d).trim() {
            "Y" => Value::Bool(true),
            "N" => Value::Bool(false),
            other => {
                return Err(problem(
                    ErrorCode::TableValueNotFound,
                    obx.location(5).component(1),
                    format!(
                        "{value_type} value '{other}' is not taken: coded results are yes/no states, Y or N (HL7 table 0136)"
                    ),
                ));
            }
        }
    } else {
        Value::Number(nm_number(value_raw).ok_or_else(|| {
            problem(
                ErrorCode::DataType,
                obx.location(5),
                "OBX-5 is not an NM number (digits with an optional sign and decimal point)".into(),
            )
        })?)
    };
    let parameter = parameter_of(obx, d, family).map_err(Skipped::Problem)?;
    let mut reading = Map::new();
    reading.insert("parameter".into(), Value::String(parameter));
    let mut fields = vec![("parameter", obx.location(3)), ("flags", obx.location(11))];
    if waveform {
        reading.insert("samples".into(), value);
        fields.push(("samples", obx.location(5)));
        if let Some(period) = sample_period {
            fields.push(("samples/period", period.location(5)));
        }
    } else {
        reading.insert("value".into(), value);
        fields.push(("value", obx.location(5)));
    }
    let unit = unit_of(obx.field(6), d, mappings)
        .map_err(|e| problem(ErrorCode::DataType, obx.location(6).component(1), e))?;
    if let Some(unit) = unit {
        reading.insert("unit".into(), Value::String(unit));
        fields.push(("unit", obx.location(6)));
    } else {
        fields.push(("unit", obx.location(6)));
    }
    let (time_raw, time_at) = match (obx.field(14), obr) {
        ("", Some(obr)) if !obr.field(7).is_empty() => (obr.field(7), obr.location(7)),
        (own, _) => (own, obx.location(14)),
    };
    if time_raw.is_empty() {
        return Err(problem(
            ErrorCode::RequiredFieldMissing,
            obx.location(14),
            "the result has no time: OBX-14, or OBR-7 of its OBR, is required".into(),
        ));
    }
    let time = dtm_to_rfc3339(component(time_raw, 1, d))
        .map_err(|why| problem(ErrorCode::DataType, time_at.clone(), why))?;
    reading.insert("time".into(), Value::String(time));
    fields.push(("time", time_at));
    if !flags.is_empty() {
        reading.insert("flags".into(), json!(flags));
    }
    Ok(Some((Value::Object(reading), fields)))
}

/// The family parameter OBX-3 names: a standard code held by exactly one parameter, else the
/// identifier as the device's own name (the mapping then says whether it knows it).
fn parameter_of(
    obx: &Segment<'_>,
    d: Delimiters,
    family: Option<&DeviceFamily>,
) -> Result<String, Er7Error> {
    let cwe = obx.field(3);
    let at = obx.location(3);
    let unescaped = |n: usize| {
        er7::unescape(component(cwe, n, d), d)
            .map(|t| t.trim().to_owned())
            .map_err(|e| Er7Error::new(ErrorCode::DataType, Some(at.clone().component(n)), e.0))
    };
    let identifier = unescaped(1)?;
    if identifier.is_empty() {
        return Err(Er7Error::new(
            ErrorCode::RequiredFieldMissing,
            Some(at.component(1)),
            "OBX-3 needs an identifier: the parameter's code",
        ));
    }
    let Some(family) = family else {
        return Ok(identifier);
    };
    for first in [1, 4] {
        let code = unescaped(first)?;
        let system = match component(cwe, first + 2, d) {
            "MDC" => MDC,
            "LN" => "http://loinc.org",
            "SCT" | "SNM" | "SNOMED-CT" => "http://snomed.info/sct",
            _ => continue,
        };
        let holders: Vec<&str> = family
            .parameters()
            .iter()
            .filter(|p| p.codings.iter().any(|(s, c, _)| s == system && *c == code))
            .map(|p| p.vendor.as_str())
            .collect();
        match holders.as_slice() {
            [one] => return Ok((*one).to_owned()),
            [] => {}
            several => {
                return Err(Er7Error::new(
                    ErrorCode::TableValueNotFound,
                    Some(at.component(first)),
                    format!(
                        "code {code} names more than one parameter of {} ({}): send the device's own parameter name in OBX-3 instead (e.g. {}^^99{})",
                        family.display,
                        several.join(", "),
                        several[0],
                        family.id.to_ascii_uppercase().replace('-', ""),
                    ),
                ));
            }
        }
    }
    Ok(identifier)
}

/// OBX-6 -> the unit as the mapping table takes it: UCUM or local spellings as written, MDC
/// unit codes through the unit table.
fn unit_of(cwe: &str, d: Delimiters, mappings: &Mappings) -> Result<Option<String>, String> {
    let code = er7::unescape(component(cwe, 1, d), d).map_err(|e| e.0)?;
    let code = code.trim();
    if code.is_empty() {
        return Ok(None);
    }
    if component(cwe, 3, d) == "MDC" {
        return mappings
            .ucum_for_mdc_unit(code)
            .map(|ucum| Some(ucum.to_owned()))
            .ok_or_else(|| {
                format!(
                    "MDC unit code {code} is not in the gateway's unit table: send the UCUM unit (e.g. L/min^^UCUM)"
                )
            });
    }
    Ok(Some(code.to_owned()))
}

/// An HL7 NM value as a JSON number with the same digits: `+1.50` -> `1.50`, `.5` -> `0.5`,
/// `007` -> `7`.
fn nm_number(raw: &str) -> Option<serde_json::Number> {
    let raw = raw.trim();
    let (negative, digits) = match raw.as_bytes().first()? {
        b'-' => (true, &raw[1..]),
        b'+' => (false, &raw[1..]),
        _ => (false, raw),
    };
    let (whole, fraction) = match digits.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (digits, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole)
        || !fraction.is_none_or(all_digits)
        || (whole.is_empty() && fraction.is_none_or(str::is_empty))
        || whole.len() + fraction.map_or(0, str::len) > 40
    {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let mut text = String::with_capacity(raw.len() + 2);
    if negative {
        text.push('-');
    }
    text.push_str(if whole.is_empty() { "0" } else { whole });
    if let Some(fraction) = fraction.filter(|f| !f.is_empty()) {
        text.push('.');
        text.push_str(fraction);
    }
    serde_json::from_str(&text).ok()
}

/// An HL7 DTM (`YYYYMMDDHHMMSS[.S[S[S[S]]]]+/-ZZZZ`) as RFC 3339. Seconds and the offset are
/// required: a reading's time must say when, and in which zone, it was taken.
pub fn dtm_to_rfc3339(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let (local, offset) = match raw.rfind(['+', '-']) {
        Some(at) => (&raw[..at], Some(&raw[at..])),
        None => (raw, None),
    };
    let (seconds, fraction) = match local.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (local, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if seconds.len() != 14 || !digits(seconds) {
        return Err(format!(
            "time '{raw}' must be an HL7 DTM to the second, YYYYMMDDHHMMSS, with a zone offset (+HHMM or -HHMM)"
        ));
    }
    if let Some(f) = fraction
        && (f.is_empty() || f.len() > 4 || !digits(f))
    {
        return Err(format!(
            "time '{raw}' has a fraction of a second that is not 1 to 4 digits"
        ));
    }
    let Some(offset) = offset.filter(|o| o.len() == 5 && digits(&o[1..])) else {
        return Err(format!(
            "time '{raw}' has no zone offset: write it as YYYYMMDDHHMMSS+HHMM (or -HHMM)"
        ));
    };
    let s = seconds;
    let mut text = format!(
        "{}-{}-{}T{}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        &s[12..14]
    );
    if let Some(f) = fraction {
        text.push('.');
        text.push_str(f);
    }
    text.push_str(&offset[..3]);
    text.push(':');
    text.push_str(&offset[3..]);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Pcd01Settings {
        Pcd01Settings {
            patient_identifier_systems: [(
                "HOSP".to_owned(),
                "urn:oid:1.2.36.146.595.217.0.1".to_owned(),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn run(text: &str) -> Result<Converted, (Refusal, Vec<Er7Error>)> {
        let (text, delimiters, charset) = er7::decode(text.as_bytes()).unwrap();
        let message = Message::parse(&text, delimiters).unwrap();
        let header = Header::read(&message, charset);
        convert(
            &message,
            &header,
            &Mappings::embedded().unwrap(),
            &settings(),
        )
    }

    const MSH: &str = "MSH|^~\\&|DIS^0012340000000001^EUI-64|ICU|GW|HOSP|20261206101500+0100||ORU^R01^ORU_R01|MSG-1|P|2.6|||NE|AL||UNICODE UTF-8\r";

    fn message(rest: &str) -> String {
        format!("{MSH}{rest}")
    }

    #[test]
    fn a_cardiohelp_message_becomes_the_json_batch() {
        let converted = run(&message(
            "PID|||MRN-7^^^HOSP^MR\r\
             OBR|1|||182777000^monitoring of patient^SCT|||20261206101500+0100\r\
             OBX|1||ECMO^ECMO console^99ECMO|1.0.0.0|||||||X|||||||CH-1001^CARDIOHELP-i^^L\r\
             OBX|2|NM|Flow^Blood flow^99CH|1.1.1.1|+4.20|265216^MDC_DIM_X_L_PER_MIN^MDC|||||F|||20261206101455+0100\r\
             OBX|3|NM|150332^MDC_SAT_O2_VEN^MDC|1.1.1.2|72|%^^UCUM|||||F\r\
             OBX|4|NM|RPM^Pump speed^99CH|1.1.1.3|3500|/min^^UCUM|||||X|||20261206101455+0100\r\
             OBX|5|NM|PVen^^99CH|1.1.1.4||mm[Hg]^^UCUM|||||X|||20261206101455+0100\r\
             OBX|6|CWE|Bubble^Bubble detected^99CH|1.1.1.5|N^No^HL70136||||||F|||20261206101455+0100\r",
        ))
        .unwrap();
        // As JSON text: the value keeps the device's digits (4.20, not 4.2).
        let expected: Value = serde_json::from_str(
            r#"{
                "device": {"serial": "CH-1001", "model": "CARDIOHELP-i"},
                "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-7"},
                "readings": [
                    {"parameter": "Flow", "value": 4.20, "unit": "L/min", "time": "2026-12-06T10:14:55+01:00"},
                    {"parameter": "SvO2", "value": 72, "unit": "%", "time": "2026-12-06T10:15:00+01:00"},
                    {"parameter": "RPM", "value": 3500, "unit": "/min", "time": "2026-12-06T10:14:55+01:00", "flags": ["invalid"]},
                    {"parameter": "Bubble", "value": false, "time": "2026-12-06T10:14:55+01:00"}
                ]
            }"#,
        )
        .unwrap();
        assert_eq!(converted.batch, expected);
        assert_eq!(converted.warnings.len(), 1);
        assert_eq!(
            converted.warnings[0].location.as_ref().unwrap().describe(),
            "OBX[5]-5"
        );
        let at = |p: &str| converted.places.find(p).unwrap().describe();
        assert_eq!(at("/readings/0/unit"), "OBX[2]-6");
        assert_eq!(at("/readings/1/time"), "OBR-7");
        assert_eq!(at("/readings/2/parameter"), "OBX[4]-3");
        assert_eq!(at("/readings/1"), "OBX[3]");
        assert_eq!(at("/device/model"), "OBX-18.2");
        assert_eq!(at("/patient/value"), "PID-3.1");
    }

    #[test]
    fn a_waveform_is_an_na_value_and_the_sample_period_after_it() {
        let converted = run(&message(
            "OBX|1||ECMO^ECMO console^99ECMO|1.0.0.0|||||||X|||||||CH-1001^CARDIOHELP-i^^L\r\
             OBX|2|NA|PVen^^99CH|1.1.1.1|-32.5^-31^^+0.50|266016^MDC_DIM_MMHG^MDC|||||F|||20261206101455.250+0100\r\
             OBX|3|NM|67980^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.1.1|8|264338^MDC_DIM_MILLI_SEC^MDC|||||F\r\
             OBX|4|NM|Flow^^99CH|1.1.1.2|4.2|L/min^^UCUM|||||F|||20261206101455+0100\r",
        ))
        .unwrap();
        let expected: Value = serde_json::from_str(
            r#"[
                {"parameter": "PVen", "samples": {"period": 8, "data": [-32.5, -31, null, 0.50]}, "unit": "mm[Hg]", "time": "2026-12-06T10:14:55.250+01:00"},
                {"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": "2026-12-06T10:14:55+01:00"}
            ]"#,
        )
        .unwrap();
        assert_eq!(converted.batch["readings"], expected);
        let at = |p: &str| converted.places.find(p).unwrap().describe();
        assert_eq!(at("/readings/0/samples/data/3"), "OBX[2]-5");
        assert_eq!(at("/readings/0/samples/period"), "OBX[3]-5");
        assert_eq!(at("/readings/1/value"), "OBX[4]-5");

        // Without its period, with another unit or a sample that is no number: refused, named.
        for (period, location) in [
            ("", "OBX-2"),
            (
                "OBX|3|NM|67980^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.1.1|8|264320^MDC_DIM_SEC^MDC|||||F\r",
                "OBX[2]-6",
            ),
            (
                "OBX|3|NM|67980^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.1.1|fast|ms^^UCUM|||||F\r",
                "OBX[2]-5",
            ),
        ] {
            let (refusal, errors) = run(&message(&format!(
                "OBX|1|NA|PVen^^99CH|1.1.1.1|-32.5^-31|mm[Hg]^^UCUM|||||F|||20261206101455+0100||||CH-1^CARDIOHELP-i\r{period}"
            )))
            .unwrap_err();
            assert_eq!(refusal, Refusal::Error);
            assert_eq!(
                errors[0].location.as_ref().unwrap().describe(),
                location,
                "{period}"
            );
        }
        let (_, errors) = run(&message(
            "OBX|1|NA|PVen^^99CH|1.1.1.1|-32.5^x^1|mm[Hg]^^UCUM|||||F|||20261206101455+0100||||CH-1^CARDIOHELP-i\r\
             OBX|2|NM|67980^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.1.1|8|ms|||||F\r",
        ))
        .unwrap_err();
        assert_eq!(errors[0].location.as_ref().unwrap().describe(), "OBX-5.2");
    }

    #[test]
    fn message_type_version_and_processing_id_are_rejected_with_ar() {
        for (from, to, field) in [
            ("ORU^R01^ORU_R01", "ADT^A01", "MSH-9.1"),
            ("ORU^R01^ORU_R01", "ORU^R30", "MSH-9.2"),
            ("|P|2.6|", "|T|2.6|", "MSH-11"),
            ("|P|2.6|", "|P|2.3|", "MSH-12"),
            ("|MSG-1|", "||", "MSH-10"),
        ] {
            let text = message(
                "OBX|1|NM|Flow^^99CH||4|L/min|||||F|||20261206101455+0100||||CH-1^CARDIOHELP-i",
            )
            .replacen(from, to, 1);
            let (refusal, errors) = run(&text).unwrap_err();
            assert_eq!(refusal, Refusal::Reject, "{to}");
            assert_eq!(
                errors[0].location.as_ref().unwrap().describe(),
                field,
                "{to}"
            );
        }
    }

    #[test]
    fn content_problems_are_all_named() {
        let (refusal, errors) = run(&message(
            "PID|||MRN-7^^^UNKNOWN^MR\r\
             OBX|1|ST|Mode^^99CH|1.1.1.1|LPM||||||F|||20261206101455+0100||||CH-1^CARDIOHELP-i\r\
             OBX|2|NM|Flow^^99CH|1.1.1.2|4,2|L/min^^UCUM|||||F|||20261206101455+0100\r\
             OBX|3|NM|Flow^^99CH|1.1.1.3|4.2|L/min^^UCUM|||||F|||20261206101455\r\
             OBX|4|NM|Flow^^99CH|1.1.1.4|4.2|L/min^^UCUM|||||D|||20261206101455+0100\r\
             OBX|5|NM|TVen^^99CH|1.1.1.5|4.2|12345^MDC_DIM_NOTHING^MDC|||||F|||20261206101455+0100\r\
             OBX|6|NM|188436^MDC_TEMP_BLD^MDC|1.1.1.6|36.6|Cel^^UCUM|||||F|||20261206101455+0100\r\
             OBX|7|NM|Flow^^99CH|1.1.1.7|4.2|L/min^^UCUM|||||F|||20261206101455+0100||||CH-2^CARDIOHELP-i\r",
        ))
        .unwrap_err();
        assert_eq!(refusal, Refusal::Error);
        let places: Vec<String> = errors
            .iter()
            .map(|e| e.location.as_ref().unwrap().describe())
            .collect();
        assert_eq!(
            places,
            [
                "OBX[7]-18.1",
                "PID-3.4",
                "OBX-5.1",
                "OBX[2]-5",
                "OBX[3]-14",
                "OBX[4]-11",
                "OBX[5]-6.1",
                "OBX[6]-3.1"
            ]
        );
        assert!(
            errors[7].reason.contains("TVen, TArt"),
            "{}",
            errors[7].reason
        );
    }

    #[test]
    fn a_message_without_a_device_or_readings_is_refused() {
        let (_, errors) = run(&message(
            "OBX|1|NM|Flow^^99CH||4|L/min|||||F|||20261206101455+0100\r",
        ))
        .unwrap_err();
        assert_eq!(errors[0].location.as_ref().unwrap().describe(), "OBX-18");
        let (_, errors) = run(&message("PID|||1^^^HOSP\r")).unwrap_err();
        assert_eq!(errors[0].code, ErrorCode::RequiredFieldMissing);
    }

    #[test]
    fn patient_identifiers_by_oid_uri_or_configured_namespace() {
        let d = Delimiters::default();
        let pid = |text: &'static str| {
            let message = Message::parse(text, d).unwrap();
            patient_of(&message.segments()[0], d, &settings()).map(|p| p.map(|(s, v, _)| (s, v)))
        };
        assert_eq!(
            pid("PID|||A^^^X^VN~B^^^&1.2.3&ISO^MR").unwrap(),
            Some(("urn:oid:1.2.3".into(), "B".into()))
        );
        assert_eq!(
            pid("PID|||C^^^&https://h.example/mrn&URI").unwrap(),
            Some(("https://h.example/mrn".into(), "C".into()))
        );
        assert_eq!(
            pid("PID|||D^^^HOSP").unwrap(),
            Some(("urn:oid:1.2.36.146.595.217.0.1".into(), "D".into()))
        );
        assert_eq!(pid("PID|1||").unwrap(), None);
        assert!(pid("PID|||E^^^&not an oid&ISO").is_err());
    }

    #[test]
    fn nm_values_keep_their_digits() {
        for (raw, json) in [
            ("4.20", "4.20"),
            ("+1.5", "1.5"),
            ("-0.5", "-0.5"),
            (".5", "0.5"),
            ("5.", "5"),
            ("007", "7"),
            ("-32000", "-32000"),
        ] {
            assert_eq!(nm_number(raw).unwrap().to_string(), json, "{raw}");
        }
        for bad in ["", "-", ".", "1e5", "4,2", "1.2.3", "NaN", "+-1", " "] {
            assert!(nm_number(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn dtm_needs_seconds_and_an_offset() {
        assert_eq!(
            dtm_to_rfc3339("20261206101455.123-0500").unwrap(),
            "2026-12-06T10:14:55.123-05:00"
        );
        assert_eq!(
            dtm_to_rfc3339("20261206101455+0000").unwrap(),
            "2026-12-06T10:14:55+00:00"
        );
        for bad in [
            "20261206101455",
            "202612061014+0100",
            "20261206101455.+0100",
            "20261206101455.12345+0100",
            "2026120610145x+0100",
            "20261206101455+01",
            "",
        ] {
            assert!(dtm_to_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
