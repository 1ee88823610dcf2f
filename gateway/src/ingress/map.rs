//! Mapping: each reading of a validated batch becomes an Observation through the device
//! family's table (mappings crate). Every refused reading is reported, together with the schema
//! issues of other readings; one bad reading refuses the whole batch, so that a batch is
//! either charted entirely or not at all.
//!
//! The patient comes from the ECMO run the console is in at the reading's time (consoles do
//! not know their patient); a batch that names a different patient than that run is refused
//! with 409, and a reading outside every run of its console with no patient named gets 422.

use std::sync::Arc;

use http::{Request, StatusCode};
use mappings::{
    DeviceContext, Mappings, PatientRef, Reading, ReadingFlags, ReadingValue, RunLink, TimeWindow,
};
use serde_json::Value;
use time::OffsetDateTime;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::delivery::{OutboundBatch, Subjects};
use crate::ingress::describe::DeviceDescriptions;
use crate::ingress::device_clocks::DeviceClocks;
use crate::ingress::validate::ReadingIssues;
use crate::outcome::{ApiError, Issue};
use crate::reload::LiveMappings;
use crate::runs::RunRegistry;

#[derive(Clone)]
pub struct MapObservations {
    mappings: LiveMappings,
    runs: Arc<RunRegistry>,
    /// The limits; `received_at` is set per request.
    window: TimeWindow,
    clocks: Arc<DeviceClocks>,
    descriptions: Arc<DeviceDescriptions>,
}

pub fn layer(
    mappings: impl Into<LiveMappings>,
    runs: Arc<RunRegistry>,
    window: TimeWindow,
    clocks: Arc<DeviceClocks>,
    descriptions: Arc<DeviceDescriptions>,
) -> FilterLayer<MapObservations> {
    FilterLayer::new(MapObservations {
        mappings: mappings.into(),
        runs,
        window,
        clocks,
        descriptions,
    })
}

fn unprocessable(issues: Vec<Issue>) -> BoxError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, issues).into()
}

impl Predicate<Request<Value>> for MapObservations {
    type Request = Request<OutboundBatch>;

    fn check(&mut self, request: Request<Value>) -> Result<Request<OutboundBatch>, BoxError> {
        let (mut parts, body) = request.into_parts();
        // The tables as they are when the request begins (a reload swaps them whole).
        let tables = self.mappings.load();
        let schema_issues = parts
            .extensions
            .remove::<ReadingIssues>()
            .unwrap_or_default();
        let (family, serial, model) = device_of(&tables, &body)?;
        let patient = body["patient"]["system"]
            .as_str()
            .zip(body["patient"]["value"].as_str())
            .map(|(system, value)| PatientRef { system, value });
        let context = DeviceContext {
            family,
            serial,
            model,
            patient,
            window: TimeWindow {
                received_at: OffsetDateTime::now_utc(),
                ..self.window
            },
        };

        let readings = body["readings"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let periods = self.runs.console_periods(serial);
        let mut resources = Vec::with_capacity(readings.len());
        let mut origins = Vec::with_capacity(readings.len());
        let mut issues = Vec::new();
        let mut newest: Option<OffsetDateTime> = None;
        let mut subjects = Subjects::default();
        for (index, reading) in readings.iter().enumerate() {
            if let Some(found) = schema_issues.0.get(&index) {
                issues.extend(found.iter().cloned());
                continue;
            }
            let Some(mut reading) = reading_of(reading) else {
                issues.push(
                    Issue::error("structure", "reading does not have the documented shape")
                        .at(format!("/readings/{index}")),
                );
                continue;
            };
            let instant = mappings::DeviceTime::parse(reading.time)
                .ok()
                .map(|t| t.instant);
            newest = newest.max(instant);
            let run = instant.and_then(|at| periods.at(at));
            match (&run, patient) {
                (Some(run), Some(named))
                    if run.patient_system != named.system || run.patient_value != named.value =>
                {
                    // The run's patient is not echoed: it is not this vendor's to learn.
                    return Err(ApiError::one(
                        StatusCode::CONFLICT,
                        Issue::error(
                            "conflict",
                            format!(
                                "the batch names a patient, but console '{serial}' is in an ECMO run of a different patient at this time; check the console and the patient"
                            ),
                        )
                        .at("/patient"),
                    )
                    .into());
                }
                (None, None) => {
                    issues.push(
                        Issue::error(
                            "required",
                            format!(
                                "no ECMO run of console '{serial}' covers this time and the batch names no patient: post the run's started event first, or name the patient"
                            ),
                        )
                        .at(format!("/readings/{index}/time")),
                    );
                    continue;
                }
                _ => {}
            }
            match (&run, patient) {
                (Some(run), _) => {
                    subjects.patient(&run.patient_system, &run.patient_value);
                    subjects.run(&run.run_id);
                }
                (None, Some(named)) => subjects.patient(named.system, named.value),
                (None, None) => {}
            }
            reading.run = run.as_deref().map(|run| RunLink {
                run_id: &run.run_id,
                patient: PatientRef {
                    system: &run.patient_system,
                    value: &run.patient_value,
                },
            });
            match tables.map_reading(&context, &reading) {
                Ok(resource) if issues.is_empty() => {
                    resources.push(resource);
                    origins.push(format!("/readings/{index}"));
                }
                Ok(_) => {}
                Err(error) => issues.push(
                    Issue::error(error.issue_code(), error.to_string())
                        .at(format!("/readings/{index}/{}", error.field().name())),
                ),
            }
        }
        // Refused or not, the batch says how far the console's clock is from ours.
        if let Some(newest) = newest {
            self.clocks
                .record(&family.id, serial, context.window.received_at, newest);
        }
        if !issues.is_empty() {
            return Err(unprocessable(issues));
        }
        let vendor = parts
            .extensions
            .get::<Arc<crate::ingress::VendorPolicy>>()
            .cloned();
        let mut batch = OutboundBatch {
            request_id: crate::ingress::request_id(&parts.headers),
            vendor: vendor.as_ref().map(|v| v.name.clone()).unwrap_or_default(),
            model: model.to_owned(),
            resources: resources.into(),
            origins,
            revision: None,
            source: device_source(vendor.as_deref(), family, &body, None),
            subjects,
            descriptions: Vec::new(),
            described: Vec::new(),
        };
        self.descriptions.attach(&mut batch, family, serial)?;
        Ok(Request::from_parts(parts, batch))
    }
}

/// The Provenance facts of a request that names one device (`body.device`, read by
/// [`device_of`]): its serial, model and firmware, its family's table, and the sender.
pub(crate) fn device_source(
    vendor: Option<&crate::ingress::VendorPolicy>,
    family: &mappings::DeviceFamily,
    body: &Value,
    reason: Option<String>,
) -> Arc<mappings::ProvenanceSource> {
    let device = &body["device"];
    let text = |field: &str| device[field].as_str().map(str::to_owned);
    let agent = mappings::DeviceAgent {
        serial_system: family.serial_system.clone(),
        serial: text("serial").unwrap_or_default(),
        model: text("model").unwrap_or_default(),
        firmware: text("firmware"),
    };
    crate::ingress::provenance_source(
        vendor,
        vec![agent],
        [crate::ingress::table_of(family)],
        reason,
    )
}

/// The batch's device and its mapping table: one rule for every request that names a device.
pub(crate) fn device_of<'a, 'm>(
    mappings: &'m Mappings,
    body: &'a Value,
) -> Result<(&'m mappings::DeviceFamily, &'a str, &'a str), BoxError> {
    // The schema guarantees these shapes; a missing piece here is still answered, not panicked.
    let device = &body["device"];
    let (Some(serial), Some(model)) = (device["serial"].as_str(), device["model"].as_str()) else {
        return Err(unprocessable(vec![
            Issue::error("required", "device serial and model are required").at("/device"),
        ]));
    };
    let Some(family) = mappings.family_for_model(model) else {
        return Err(unprocessable(vec![
            Issue::error(
                "code-invalid",
                format!(
                    "device model '{model}' has no mapping table; supported models: {}",
                    mappings.models().join(", ")
                ),
            )
            .at("/device/model"),
        ]));
    };
    Ok((family, serial, model))
}

/// A reading borrowed from the JSON: no copies of its strings.
fn reading_of(value: &Value) -> Option<Reading<'_>> {
    let reading_value = match (&value["value"], &value["samples"]) {
        (Value::Number(number), Value::Null) => ReadingValue::Number(number.as_str()),
        (Value::Bool(b), Value::Null) => ReadingValue::Boolean(*b),
        (Value::Null, Value::Object(samples)) => ReadingValue::Samples {
            period: match samples.get("period")? {
                Value::Number(period) => period.as_str(),
                _ => return None,
            },
            data: samples.get("data")?.as_array()?,
        },
        _ => return None,
    };
    let mut flags = ReadingFlags::default();
    for flag in value["flags"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        flags.insert(flag.as_str().and_then(ReadingFlags::from_name)?);
    }
    Some(Reading {
        parameter: value["parameter"].as_str()?,
        value: reading_value,
        unit: value["unit"].as_str(),
        time: value["time"].as_str()?,
        flags,
        run: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(body: Value) -> Result<Request<OutboundBatch>, BoxError> {
        let dir = tempfile::tempdir().unwrap();
        let mappings = Arc::new(Mappings::embedded().unwrap());
        let mut layer = MapObservations {
            runs: RunRegistry::open(&dir.path().join("runs.sqlite"), mappings.clone()).unwrap(),
            mappings: mappings.into(),
            window: TimeWindow {
                received_at: OffsetDateTime::UNIX_EPOCH,
                max_future_skew: time::Duration::minutes(5),
                max_past_age: time::Duration::hours(24),
            },
            clocks: Arc::default(),
            descriptions: Arc::default(),
        };
        layer.check(Request::new(body))
    }

    fn now() -> String {
        OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    }

    #[test]
    fn maps_every_reading() {
        let request = map(json!({
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
            "readings": [
                {"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": now()},
                {"parameter": "Bubble", "value": false, "time": now()}
            ]
        }))
        .unwrap();
        assert_eq!(request.body().resources.len(), 2);
    }

    #[test]
    fn reports_all_refused_readings_with_pointers() {
        let error = map(json!({
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
            "readings": [
                {"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": now()},
                {"parameter": "Flw", "value": 4.2, "unit": "L/min", "time": now()},
                {"parameter": "Flow", "value": 40, "unit": "L/min", "time": now()},
                {"parameter": "Flow", "value": 4, "unit": "gal", "time": now()}
            ]
        }))
        .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::UNPROCESSABLE_ENTITY);
        let pointers: Vec<_> = api
            .issues
            .iter()
            .map(|i| i.expression.clone().unwrap())
            .collect();
        assert_eq!(
            pointers,
            [
                "/readings/1/parameter",
                "/readings/2/value",
                "/readings/3/unit"
            ]
        );
    }

    #[test]
    fn unknown_model_is_named() {
        let error = map(json!({
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "X-1", "model": "Rotaflow"},
            "readings": [{"parameter": "Flow", "value": 1, "unit": "L/min", "time": now()}]
        }))
        .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.issues[0].expression.as_deref(), Some("/device/model"));
        assert!(api.issues[0].details.contains("CARDIOHELP"));
    }
}
