//! FHIR-native devices: `POST /v1/fhir/Observation` and `POST /v1/fhir/Bundle` take
//! Observations a vendor already builds as FHIR R4, in JSON or XML (by Content-Type). Each must
//! follow our `ecmo-circuit-observation` profile; the gateway only fills in what is its own to
//! give: the business identifier (device family, serial, parameter, time, as for readings),
//! `meta.profile`, and the run's patient and Procedure when the console is in an ECMO run.
//! Then they take the same way as mapped readings: hand-off, outbox, delivery.
//!
//! The device is named by identifier, `https://fhir.ecmo-gateway.org/sid/device-serial/<maker>`
//! + serial; the vendor must own that device (by serial, or by a model of its family).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body::Body;
use mappings::{DeviceFamily, MappedResource, Mappings, TimeWindow};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::filter::{AsyncFilterLayer, AsyncPredicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::ingress::client_identity::VendorPolicy;
use crate::ingress::conformance::ConformanceRules;
use crate::ingress::decode::{is_json, is_xml, read_body};
use crate::ingress::describe::DeviceDescriptions;
use crate::ingress::device_clocks::DeviceClocks;
use crate::outcome::{ApiError, Issue};
use crate::reload::LiveMappings;
use crate::runs::{ConsolePeriods, RunRegistry};

/// The largest Bundle taken (entries), like a readings batch.
const MAX_ENTRIES: usize = 5000;

#[derive(Clone)]
pub struct FhirObservations {
    /// The tables as they are now; `mappings` holds them for the request at hand.
    live: LiveMappings,
    mappings: Arc<Mappings>,
    runs: Arc<RunRegistry>,
    rules: Arc<ConformanceRules>,
    /// The limits; `received_at` is set per request.
    window: TimeWindow,
    clocks: Arc<DeviceClocks>,
    descriptions: Arc<DeviceDescriptions>,
}

pub fn layer(
    mappings: impl Into<LiveMappings>,
    runs: Arc<RunRegistry>,
    rules: Arc<ConformanceRules>,
    window: TimeWindow,
    clocks: Arc<DeviceClocks>,
    descriptions: Arc<DeviceDescriptions>,
) -> AsyncFilterLayer<FhirObservations> {
    let live = mappings.into();
    AsyncFilterLayer::new(FhirObservations {
        mappings: live.load(),
        live,
        runs,
        rules,
        window,
        clocks,
        descriptions,
    })
}

fn refuse(status: StatusCode, issues: Vec<Issue>) -> BoxError {
    ApiError::new(status, issues).into()
}

fn bad_request(details: String) -> BoxError {
    refuse(
        StatusCode::BAD_REQUEST,
        vec![Issue::error("structure", details).at("/")],
    )
}

impl<B> AsyncPredicate<Request<B>> for FhirObservations
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Future = Pin<Box<dyn Future<Output = Result<Request<OutboundBatch>, BoxError>> + Send>>;
    type Request = Request<OutboundBatch>;

    fn check(&mut self, request: Request<B>) -> Self::Future {
        let mut this = self.clone();
        // The tables as they are when the request begins (a reload swaps them whole).
        this.mappings = self.live.load();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let xml = match parts.headers.get(header::CONTENT_TYPE) {
                None => false,
                Some(ct) if is_json(ct.as_bytes()) => false,
                Some(ct) if is_xml(ct.as_bytes()) => true,
                Some(_) => {
                    return Err(refuse(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        vec![Issue::error(
                            "not-supported",
                            "send application/fhir+json or application/fhir+xml",
                        )],
                    ));
                }
            };
            let bytes = read_body(body).await?;
            let bundle = parts.uri.path().ends_with("/Bundle");
            // (JSON pointer prefix, Observation) for every Observation sent.
            let observations = match (bundle, xml) {
                (false, false) => vec![(String::new(), json_body(&bytes)?)],
                (false, true) => vec![(
                    String::new(),
                    mappings::resource_from_xml("Observation", &bytes)
                        .map_err(|e| bad_request(format!("not a FHIR XML Observation: {e}")))?,
                )],
                (true, false) => json_bundle_entries(json_body(&bytes)?)?,
                (true, true) => xml_bundle_entries(&bytes)?,
            };
            let vendor = parts.extensions.get::<Arc<VendorPolicy>>().cloned();
            let Some(vendor) = vendor else {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    vec![Issue::error(
                        "forbidden",
                        "the request carries no vendor identity",
                    )],
                ));
            };
            let request_id = parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let prepared = this.prepare(&vendor, observations)?;
            // Routing by model: the family's first model (a FHIR Device reference names none).
            let model = prepared
                .devices
                .last()
                .and_then(|(family, _)| family.models.first().cloned())
                .unwrap_or_default();
            let agents = prepared
                .devices
                .iter()
                .map(|(family, serial)| mappings::DeviceAgent {
                    serial_system: family.serial_system.clone(),
                    serial: serial.clone(),
                    model: family.display.clone(),
                    firmware: None,
                })
                .collect();
            let tables: Vec<(String, String)> = prepared
                .devices
                .iter()
                .map(|(family, _)| crate::ingress::table_of(family))
                .collect();
            let mut batch = OutboundBatch {
                request_id,
                vendor: vendor.name.clone(),
                model,
                resources: prepared.resources.into(),
                origins: prepared.origins,
                revision: None,
                source: crate::ingress::provenance_source(Some(&vendor), agents, tables, None),
                subjects: prepared.subjects,
                descriptions: Vec::new(),
                described: Vec::new(),
            };
            for (family, serial) in &prepared.devices {
                this.descriptions.attach(&mut batch, family, serial)?;
            }
            Ok(Request::from_parts(parts, batch))
        })
    }
}

fn json_body(bytes: &[u8]) -> Result<Value, BoxError> {
    serde_json::from_slice(bytes).map_err(|e| {
        bad_request(format!(
            "the body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// The Observations of a JSON Bundle (`batch`, `transaction` or `collection`).
fn json_bundle_entries(bundle: Value) -> Result<Vec<(String, Value)>, BoxError> {
    if bundle["resourceType"] != "Bundle" {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec![Issue::error("invalid", "expected a Bundle").at("/resourceType")],
        ));
    }
    check_bundle_type(bundle["type"].as_str())?;
    let Value::Array(entries) = bundle["entry"].clone() else {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec![Issue::error("required", "the Bundle has no entries").at("/entry")],
        ));
    };
    check_entry_count(entries.len())?;
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| (format!("/entry/{i}/resource"), e["resource"].take()))
        .collect())
}

fn check_bundle_type(kind: Option<&str>) -> Result<(), BoxError> {
    match kind {
        Some("batch" | "transaction" | "collection") => Ok(()),
        other => Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec![
                Issue::error(
                    "value",
                    format!(
                        "Bundle.type must be batch, transaction or collection, not {}",
                        other.unwrap_or("missing")
                    ),
                )
                .at("/type"),
            ],
        )),
    }
}

fn check_entry_count(n: usize) -> Result<(), BoxError> {
    if n == 0 || n > MAX_ENTRIES {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            vec![
                Issue::error(
                    "value",
                    format!("a Bundle takes 1 to {MAX_ENTRIES} entries, this one has {n}"),
                )
                .at("/entry"),
            ],
        ));
    }
    Ok(())
}

/// The Observations of an XML Bundle: the envelope is read as a stream, each entry's resource
/// is cut out and read strictly on its own (never the whole `Resource` enum).
fn xml_bundle_entries(xml: &[u8]) -> Result<Vec<(String, Value)>, BoxError> {
    use quick_xml::events::Event;
    let text = std::str::from_utf8(xml).map_err(|_| bad_request("the body is not UTF-8".into()))?;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut path: Vec<String> = Vec::new();
    let mut kind: Option<String> = None;
    let mut cuts: Vec<(usize, usize, String)> = Vec::new();
    let mut open: Option<(usize, String)> = None;
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader
            .read_event()
            .map_err(|e| bad_request(format!("the body is not valid XML: {e}")))?;
        match &event {
            Event::DocType(_) => return Err(bad_request("a DOCTYPE is not allowed".into())),
            Event::Start(e) | Event::Empty(e) => {
                let name = e.local_name().as_ref().to_owned();
                if path.is_empty() && name != "Bundle" {
                    return Err(bad_request(format!("expected a <Bundle>, got <{name}>")));
                }
                if path.len() == 1 && name == "type" {
                    kind = e
                        .attributes()
                        .flatten()
                        .find(|a| a.key.as_ref() == "value")
                        .map(|a| a.value.into_owned());
                }
                let at_resource = path.len() == 3 && path[1] == "entry" && path[2] == "resource";
                if at_resource && open.is_none() {
                    let start = before
                        + xml[before..]
                            .iter()
                            .position(|b| *b == b'<')
                            .unwrap_or_default();
                    if matches!(event, Event::Empty(_)) {
                        cuts.push((start, reader.buffer_position() as usize, name.clone()));
                    } else {
                        open = Some((start, name.clone()));
                    }
                }
                if matches!(event, Event::Start(_)) {
                    path.push(name);
                }
            }
            Event::End(_) => {
                path.pop();
                if path.len() == 3
                    && let Some((start, name)) = open.take()
                {
                    cuts.push((start, reader.buffer_position() as usize, name));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    check_bundle_type(kind.as_deref())?;
    check_entry_count(cuts.len())?;
    let mut out = Vec::with_capacity(cuts.len());
    let mut issues = Vec::new();
    for (i, (start, end, name)) in cuts.into_iter().enumerate() {
        let pointer = format!("/entry/{i}/resource");
        if name != "Observation" {
            issues.push(
                Issue::error(
                    "not-supported",
                    format!("only Observations are taken, not {name}"),
                )
                .at(pointer),
            );
            continue;
        }
        match mappings::resource_from_xml("Observation", &xml[start..end]) {
            Ok(value) => out.push((pointer, value)),
            Err(e) => issues.push(
                Issue::error(
                    "structure",
                    format!("not a valid FHIR XML Observation: {e}"),
                )
                .at(pointer),
            ),
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, issues))
    }
}

/// The Observations of a request, checked and completed, with the devices they name.
struct Prepared<'m> {
    subjects: crate::delivery::Subjects,
    resources: Vec<MappedResource>,
    origins: Vec<String>,
    devices: Vec<(&'m DeviceFamily, String)>,
}

impl FhirObservations {
    /// Every Observation checked and completed; every problem of every entry at once.
    fn prepare(
        &self,
        vendor: &VendorPolicy,
        observations: Vec<(String, Value)>,
    ) -> Result<Prepared<'_>, BoxError> {
        let mut resources = Vec::with_capacity(observations.len());
        let mut origins = Vec::with_capacity(observations.len());
        let mut issues = Vec::new();
        let mut devices: Vec<(&DeviceFamily, String)> = Vec::new();
        let mut subjects = crate::delivery::Subjects::default();
        let window = TimeWindow {
            received_at: OffsetDateTime::now_utc(),
            ..self.window
        };
        // One look at the run index per console, as for a readings batch.
        let mut periods: HashMap<String, ConsolePeriods> = HashMap::new();
        for (pointer, observation) in observations {
            match self.prepare_one(
                vendor,
                &pointer,
                observation,
                &window,
                &mut periods,
                &mut subjects,
            ) {
                Ok((resource, family, serial)) => {
                    if !devices
                        .iter()
                        .any(|(f, s)| f.id == family.id && *s == serial)
                    {
                        devices.push((family, serial));
                    }
                    resources.push(resource);
                    origins.push(if pointer.is_empty() {
                        "/".to_owned()
                    } else {
                        pointer
                    });
                }
                Err(Refusal::Forbidden(issue)) => {
                    return Err(refuse(StatusCode::FORBIDDEN, vec![issue]));
                }
                Err(Refusal::Conflict(issue)) => {
                    return Err(refuse(StatusCode::CONFLICT, vec![issue]));
                }
                Err(Refusal::Invalid(found)) => issues.extend(found),
            }
        }
        if !issues.is_empty() {
            return Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, issues));
        }
        Ok(Prepared {
            subjects,
            resources,
            origins,
            devices,
        })
    }

    fn prepare_one(
        &self,
        vendor: &VendorPolicy,
        pointer: &str,
        mut observation: Value,
        window: &TimeWindow,
        periods: &mut HashMap<String, ConsolePeriods>,
        subjects: &mut crate::delivery::Subjects,
    ) -> Result<(MappedResource, &DeviceFamily, String), Refusal> {
        let at = |field: &str| format!("{pointer}{field}");
        let invalid = |code: &'static str, field: &str, details: String| {
            Refusal::Invalid(vec![Issue::error(code, details).at(at(field))])
        };
        if observation["resourceType"] != "Observation" {
            return Err(invalid(
                "not-supported",
                "/resourceType",
                "only Observations are taken here".into(),
            ));
        }
        let device = &observation["device"]["identifier"];
        let (Some(system), Some(value)) = (device["system"].as_str(), device["value"].as_str())
        else {
            return Err(invalid(
                "required",
                "/device/identifier",
                format!(
                    "the device must be referenced by identifier: system {}<maker>, value = serial number (or, as the gateway writes it, its DeviceMetric: system {}<maker>, value = serial:code)",
                    mappings::DEVICE_SERIAL_SYSTEM_PREFIX,
                    mappings::DEVICE_METRIC_SYSTEM_PREFIX
                ),
            ));
        };
        // The device by its serial, or by its DeviceMetric for the parameter (the shape the
        // gateway itself writes, which a vendor may echo).
        // A maker's families share these systems (serials are unique per maker): which family
        // is told by the parameter, and where two of them have it, by the device's display.
        let by_serial = self.families_of(|f| f.serial_system == system);
        let by_metric = self.families_of(|f| f.metric_system == system);
        let (families, serial, metric_code) = if !by_serial.is_empty() {
            (by_serial, value, None)
        } else if !by_metric.is_empty() {
            let Some((serial, code)) = mappings::parse_metric_identifier(value) else {
                return Err(invalid(
                    "value",
                    "/device/identifier/value",
                    format!("a DeviceMetric of '{system}' is named serial:code, not '{value}'"),
                ));
            };
            (by_metric, serial, Some(code.to_owned()))
        } else {
            return Err(invalid(
                "code-invalid",
                "/device/identifier/system",
                format!("no mapping table for devices of '{system}'"),
            ));
        };
        let serial = serial.to_owned();
        let families: Vec<&DeviceFamily> = families
            .into_iter()
            .filter(|f| f.models.iter().any(|m| vendor.may_post_for(&serial, m)))
            .collect();
        if families.is_empty() {
            tracing::info!(vendor = %vendor.name, "device not owned by the posting vendor");
            return Err(Refusal::Forbidden(
                Issue::error(
                    "forbidden",
                    format!(
                        "vendor '{}' may not post for device '{serial}': the gateway's configuration does not give it this device",
                        vendor.name
                    ),
                )
                .at(at("/device/identifier/value")),
            ));
        }
        let Some(code) = observation["code"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["system"] == mappings::ECMO_CODE_SYSTEM)
            .and_then(|c| c["code"].as_str())
            .map(str::to_owned)
        else {
            return Err(invalid(
                "required",
                "/code/coding",
                format!(
                    "a coding from {} names the circuit parameter",
                    mappings::ECMO_CODE_SYSTEM
                ),
            ));
        };
        if let Some(named) = metric_code.filter(|named| *named != code) {
            return Err(invalid(
                "value",
                "/device/identifier/value",
                format!(
                    "the device names the DeviceMetric of '{named}', but the Observation's code is '{code}'"
                ),
            ));
        }
        let with_code: Vec<&DeviceFamily> = families
            .iter()
            .copied()
            .filter(|f| f.parameters().iter().any(|p| p.code == code))
            .collect();
        let display = observation["device"]["display"]
            .as_str()
            .unwrap_or_default();
        let family = match with_code[..] {
            [] => {
                return Err(invalid(
                    "code-invalid",
                    "/code/coding",
                    format!(
                        "'{code}' is not a parameter of {} devices",
                        families
                            .iter()
                            .map(|f| f.display.as_str())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ));
            }
            [family] => family,
            _ => match with_code.iter().find(|f| {
                f.models
                    .iter()
                    .any(|m| display == format!("{} {m}", f.manufacturer))
            }) {
                Some(family) => family,
                None => {
                    return Err(invalid(
                        "value",
                        "/device/display",
                        format!(
                            "'{code}' is a parameter of several {} devices: device.display names the model as the gateway writes it ({})",
                            with_code[0].manufacturer,
                            with_code
                                .iter()
                                .flat_map(|f| f
                                    .models
                                    .iter()
                                    .map(|m| format!("'{} {m}'", f.manufacturer)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            },
        };
        let parameter = family
            .parameters()
            .iter()
            .find(|p| p.code == code)
            .expect("the family was chosen by this code");
        // The same unit conversion and plausibility rules as a reading in JSON or XML.
        check_value(family, parameter, &mut observation)
            .map_err(|(field, error)| invalid(error.issue_code(), field, error.to_string()))?;
        let Some(time_text) = observation["effectiveDateTime"].as_str().map(str::to_owned) else {
            return Err(invalid(
                "required",
                "/effectiveDateTime",
                "effectiveDateTime (with seconds and a time zone) is required".into(),
            ));
        };
        let time = mappings::DeviceTime::parse(&time_text)
            .map_err(|e| invalid("value", "/effectiveDateTime", format!("time {e}")))?;
        self.clocks
            .record(&family.id, &serial, window.received_at, time.instant);
        window
            .check(&time)
            .map_err(|e| invalid("value", "/effectiveDateTime", format!("time {e}")))?;
        // The business identifier is the gateway's, derived from the device the vendor owns,
        // the parameter and the time, as for a reading: a vendor cannot write into another
        // device's (or another vendor's) Observations by choosing an identifier.
        let identifier_value = match waveform_shape(&observation) {
            Some((period, count)) => mappings::waveform_identifier(
                &family.id,
                &serial,
                &code,
                &time.compact_utc(),
                &period,
                count,
            ),
            None => {
                mappings::observation_identifier(&family.id, &serial, &code, &time.compact_utc())
            }
        };
        if let Some(given) = observation["identifier"].as_array()
            && let Some(index) = given.iter().position(|i| {
                i["system"] != mappings::OBSERVATION_IDENTIFIER_SYSTEM
                    || i["value"].as_str() != Some(identifier_value.as_str())
            })
        {
            return Err(invalid(
                "value",
                &format!("/identifier/{index}"),
                format!(
                    "leave the identifier out: the gateway assigns it from the device, parameter and time ({}|{identifier_value})",
                    mappings::OBSERVATION_IDENTIFIER_SYSTEM
                ),
            ));
        }
        observation["identifier"] = json!([
            {"system": mappings::OBSERVATION_IDENTIFIER_SYSTEM, "value": identifier_value}
        ]);
        // The run's patient and Procedure.
        let run = periods
            .entry(serial.clone())
            .or_insert_with(|| self.runs.console_periods(&serial))
            .at(time.instant);
        let named = &observation["subject"]["identifier"];
        match (&run, named["value"].as_str()) {
            (Some(run), Some(value))
                if named["system"].as_str() != Some(run.patient_system.as_str())
                    || value != run.patient_value =>
            {
                return Err(Refusal::Conflict(
                    Issue::error(
                        "conflict",
                        format!(
                            "the Observation names a patient, but console '{serial}' is in an ECMO run of a different patient at this time"
                        ),
                    )
                    .at(at("/subject")),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "required",
                    "/subject",
                    format!(
                        "no ECMO run of console '{serial}' covers this time and the Observation names no patient (subject.identifier)"
                    ),
                ));
            }
            _ => {}
        }
        match &run {
            Some(run) => {
                subjects.patient(&run.patient_system, &run.patient_value);
                subjects.run(&run.run_id);
            }
            None => {
                if let (Some(system), Some(value)) =
                    (named["system"].as_str(), named["value"].as_str())
                {
                    subjects.patient(system, value);
                }
            }
        }
        if let Some(run) = &run {
            observation["subject"] = json!({"type": "Patient", "identifier": {
                "system": run.patient_system, "value": run.patient_value}});
            if observation["partOf"].is_null() {
                observation["partOf"] = json!([{"type": "Procedure", "identifier": {
                    "system": mappings::RUN_IDENTIFIER_SYSTEM, "value": run.run_id}}]);
            }
        }
        // The device's metric for the parameter, as in the Observations the gateway builds
        // (PoCD): the vendor names the device, the gateway its DeviceMetric.
        observation["device"] = json!({"type": "DeviceMetric", "identifier": {
            "system": family.metric_system,
            "value": mappings::metric_identifier(&serial, &code)},
            "display": format!("{} {serial}", family.display)});
        // Ours to give: the profile, and the id (the destination assigns or derives it).
        let profiles = observation["meta"]["profile"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !profiles.iter().any(|p| p == mappings::OBSERVATION_PROFILE) {
            let mut profiles = profiles;
            profiles.push(json!(mappings::OBSERVATION_PROFILE));
            observation["meta"]["profile"] = Value::Array(profiles);
        }
        if let Some(o) = observation.as_object_mut() {
            o.remove("id");
        }
        let problems = self.rules.issues("Observation", observation.clone());
        if !problems.is_empty() {
            return Err(Refusal::Invalid(
                problems
                    .into_iter()
                    .map(|mut issue| {
                        // FHIRPath of the rule, and where in what was sent.
                        issue.details = format!(
                            "{} ({})",
                            issue.details,
                            issue.expression.take().unwrap_or_default()
                        );
                        issue.at(if pointer.is_empty() { "/" } else { pointer })
                    })
                    .collect(),
            ));
        }
        let json = serde_json::to_vec(&observation).unwrap_or_default();
        Ok((
            MappedResource {
                resource_type: "Observation",
                id: mappings::logical_id(
                    mappings::OBSERVATION_IDENTIFIER_SYSTEM,
                    &identifier_value,
                ),
                identifier_system: mappings::OBSERVATION_IDENTIFIER_SYSTEM.into(),
                identifier_value,
                json,
                upsert: false,
            },
            family,
            serial,
        ))
    }

    fn families_of(&self, matches: impl Fn(&DeviceFamily) -> bool) -> Vec<&DeviceFamily> {
        self.mappings
            .families()
            .iter()
            .filter(|f| matches(f))
            .collect()
    }
}

/// `valueQuantity` through the family's table (unit accepted, converted, in range, rounded as
/// for readings); `valueBoolean` only for true/false parameters. The error names the field.
fn check_value(
    family: &DeviceFamily,
    parameter: &mappings::Parameter,
    observation: &mut Value,
) -> Result<(), (&'static str, Box<mappings::ReadingError>)> {
    if !observation["valueSampledData"].is_null() {
        return check_waveform(family, parameter, observation);
    }
    let quantity = &observation["valueQuantity"];
    let boolean_kind = matches!(parameter.kind, mappings::ParameterKind::Boolean);
    if quantity.is_null() {
        if !observation["valueBoolean"].is_null() && !boolean_kind {
            return Err((
                "/valueBoolean",
                Box::new(mappings::ReadingError::NotABoolean {
                    parameter: parameter.vendor.clone(),
                    value: observation["valueBoolean"].to_string(),
                }),
            ));
        }
        return Ok(());
    }
    if boolean_kind {
        return Err((
            "/valueQuantity",
            Box::new(mappings::ReadingError::NotABoolean {
                parameter: parameter.vendor.clone(),
                value: quantity["value"].to_string(),
            }),
        ));
    }
    let unit = quantity["code"]
        .as_str()
        .or_else(|| quantity["unit"].as_str())
        .unwrap_or_default()
        .to_owned();
    let value = match &quantity["value"] {
        Value::Number(n) => n.as_str().to_owned(),
        _ => {
            return Err((
                "/valueQuantity/value",
                Box::new(mappings::ReadingError::NotANumber {
                    parameter: parameter.vendor.clone(),
                }),
            ));
        }
    };
    let field = |e: &mappings::ReadingError| match e.field() {
        mappings::ReadingField::Unit => "/valueQuantity/code",
        _ => "/valueQuantity/value",
    };
    match family.check_quantity(parameter, &value, &unit) {
        Ok(Some(checked)) => {
            let decimal: Value = serde_json::from_str(&checked.decimal).unwrap_or(Value::Null);
            observation["valueQuantity"] = json!({
                "value": decimal,
                "unit": checked.display,
                "system": mappings::UCUM,
                "code": checked.ucum,
            });
            Ok(())
        }
        Ok(None) => Err((
            "/valueQuantity/value",
            Box::new(mappings::ReadingError::InvalidMarker {
                parameter: parameter.vendor.clone(),
                value,
            }),
        )),
        Err(e) => Err((field(&e), Box::new(e))),
    }
}

/// The period and sample count of a checked waveform Observation, which its identifier ends
/// with as a reading's waveform's does.
fn waveform_shape(observation: &Value) -> Option<(String, usize)> {
    let sampled = &observation["valueSampledData"];
    let period = sampled["period"].as_number()?.as_str().to_owned();
    let count = sampled["data"].as_str()?.split_whitespace().count();
    Some((period, count))
}

/// `valueSampledData` through the family's table as a reading's waveform: one dimension, the
/// samples (`origin` + `factor` x each, `E` for an error) converted into the table's unit,
/// each in range (the error names the sample), written with origin 0 and no factor. Limits
/// (`lowerLimit`, `upperLimit`, `L`/`U` samples) are in the device's terms and refused rather
/// than carried over unconverted.
fn check_waveform(
    family: &DeviceFamily,
    parameter: &mappings::Parameter,
    observation: &mut Value,
) -> Result<(), (&'static str, Box<mappings::ReadingError>)> {
    let refused =
        |field: &'static str| Err((field, Box::new(mappings::ReadingError::NativeWaveform)));
    if matches!(parameter.kind, mappings::ParameterKind::Boolean) {
        return Err((
            "/valueSampledData",
            Box::new(mappings::ReadingError::NotAWaveform {
                parameter: parameter.vendor.clone(),
            }),
        ));
    }
    let sampled = &observation["valueSampledData"];
    if sampled["dimensions"].as_u64() != Some(1) {
        return refused("/valueSampledData/dimensions");
    }
    if !sampled["lowerLimit"].is_null() || !sampled["upperLimit"].is_null() {
        return refused("/valueSampledData/lowerLimit");
    }
    let Some(period) = sampled["period"].as_number().map(|p| p.as_str().to_owned()) else {
        return refused("/valueSampledData/period");
    };
    let number = |value: &Value| {
        value
            .as_number()
            .and_then(|n| n.as_str().parse::<f64>().ok())
    };
    let origin = &sampled["origin"];
    let (Some(offset), Some(unit)) = (
        number(&origin["value"]),
        origin["code"].as_str().or_else(|| origin["unit"].as_str()),
    ) else {
        return refused("/valueSampledData/origin");
    };
    let factor = match &sampled["factor"] {
        Value::Null => 1.0,
        value => match number(value) {
            Some(factor) => factor,
            None => return refused("/valueSampledData/factor"),
        },
    };
    let unit = unit.to_owned();
    let mut data = Vec::new();
    for token in sampled["data"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
    {
        data.push(match token {
            "E" => Value::Null,
            _ => match token.parse::<f64>() {
                // Written as the device did where nothing is scaled.
                Ok(_) if offset == 0.0 && factor == 1.0 => {
                    Value::Number(token.parse().map_err(|_| {
                        (
                            "/valueSampledData/data",
                            Box::new(mappings::ReadingError::NativeWaveform),
                        )
                    })?)
                }
                Ok(raw) => serde_json::Number::from_f64(offset + factor * raw)
                    .map_or(Value::Null, Value::Number),
                Err(_) => return refused("/valueSampledData/data"),
            },
        });
    }
    if data.is_empty() {
        return refused("/valueSampledData/data");
    }
    match family.check_waveform(parameter, &period, &data, &unit) {
        Ok(checked) => {
            let period: Value = serde_json::from_str(&period).unwrap_or(Value::Null);
            observation["valueSampledData"] = json!({
                "origin": {"value": 0, "unit": checked.display, "system": mappings::UCUM,
                           "code": checked.ucum},
                "period": period,
                "dimensions": 1,
                "data": checked.data,
            });
            Ok(())
        }
        Err(e) => Err((
            match e.field() {
                mappings::ReadingField::Unit => "/valueSampledData/origin/code",
                _ => "/valueSampledData/data",
            },
            Box::new(e),
        )),
    }
}

enum Refusal {
    Forbidden(Issue),
    Conflict(Issue),
    Invalid(Vec<Issue>),
}
