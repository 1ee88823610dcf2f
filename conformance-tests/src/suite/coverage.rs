//! What the scenarios must cover, and what they miss: every parameter entry of every mapping
//! table, every run event type of the ingest API, and every class of error a client can
//! provoke. A gap fails the build (`tests/suite/scenarios.rs`).

use std::collections::BTreeSet;

use mappings::Mappings;
use serde_json::Value;

use super::Scenario;

/// Every class of error a client can provoke through the ingest API, with what it must get.
/// (Errors a client cannot provoke, such as an EHR refusing a write or a mapping table that
/// breaks a profile, are covered by the Rust end-to-end tests with fault injection.)
pub const ERROR_CLASSES: &[(&str, &str)] = &[
    (
        "no-client-certificate",
        "TLS without a client certificate: handshake refused",
    ),
    (
        "untrusted-client-certificate",
        "a certificate from a CA the gateway does not trust: handshake refused",
    ),
    (
        "expired-client-certificate",
        "an expired certificate: handshake refused",
    ),
    (
        "unknown-vendor",
        "a trusted certificate that names no configured vendor: 403",
    ),
    (
        "foreign-device",
        "readings for a device the vendor does not own: 403",
    ),
    (
        "foreign-run",
        "run events for a console the vendor does not own: 403",
    ),
    (
        "malformed-json",
        "a body that is not JSON: 400 with line and column",
    ),
    (
        "malformed-xml",
        "an XML body that is not well-formed or not the endpoint's document: 400 with line and column",
    ),
    (
        "hostile-xml",
        "XML with a DOCTYPE, entity references, deep nesting, huge attributes or bad UTF-8: 400, nothing expanded",
    ),
    (
        "unsupported-media-type",
        "a body in a format the gateway does not read: 415",
    ),
    ("payload-too-large", "a body over the size limit: 413"),
    (
        "schema-violation",
        "JSON that breaks the ingest schema: 422, every problem with its pointer",
    ),
    (
        "unknown-parameter",
        "a parameter the device's mapping table does not have: 422",
    ),
    (
        "unit-not-accepted",
        "a unit the parameter's mapping does not accept: 422",
    ),
    (
        "implausible-value",
        "a value outside the parameter's plausible range: 422",
    ),
    (
        "waveform-not-taken",
        "a waveform the gateway cannot take (FHIR SampledData in several dimensions or with limits, or samples no destination takes): 422",
    ),
    (
        "fhir-profile-violation",
        "a FHIR resource from a FHIR-native device that breaks the ECMO profile: 422, each rule with its path",
    ),
    (
        "future-timestamp",
        "a reading timed ahead of the gateway's clock: 422",
    ),
    (
        "stale-timestamp",
        "a reading older than max_past_age: 422, not charted as if current",
    ),
    (
        "invalid-timestamp",
        "a time FHIR cannot hold (year 0000, an offset beyond 14:00): 422, never a 500",
    ),
    (
        "contradicting-duplicate",
        "one reading twice in a request with different values: 422 naming both",
    ),
    (
        "foreign-identifier",
        "a FHIR-native Observation carrying an identifier the gateway did not derive: 422",
    ),
    (
        "metric-differs-from-code",
        "a FHIR-native Observation whose device names the DeviceMetric of another parameter: 422",
    ),
    (
        "malformed-metric-identifier",
        "a FHIR-native Observation naming a DeviceMetric whose identifier is not serial:code: 422",
    ),
    (
        "ambiguous-device-model",
        "a FHIR-native Observation of a maker with several device families that have its parameter, whose device.display names none of their models: 422",
    ),
    (
        "unknown-reading",
        "taking back (entered-in-error) a reading the gateway never accepted: 404",
    ),
    (
        "no-patient-no-run",
        "a reading that names no patient from a console in no run: 422",
    ),
    (
        "patient-differs-from-run",
        "readings naming another patient than the console's run: 409",
    ),
    (
        "event-id-reused",
        "a run event id sent again with other content: 409",
    ),
    (
        "impossible-run-event",
        "a run event that cannot happen in the run's state: 409",
    ),
    ("unknown-route", "a path the gateway does not serve: 404"),
    (
        "not-acceptable",
        "an Accept or _format that allows neither FHIR JSON nor FHIR XML: 406",
    ),
    ("method-not-allowed", "a method the path does not take: 405"),
];

/// What no scenario covers; empty everywhere means complete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Gaps {
    /// `family-id/VendorName` of mapping entries no accepted reading with a checked
    /// Observation at the EHR exercises.
    pub parameters: Vec<String>,
    /// Run event types never accepted in a scenario.
    pub run_events: Vec<String>,
    /// Error classes no step provokes.
    pub error_classes: Vec<String>,
    /// `errorClass` values in scenarios that are not in [`ERROR_CLASSES`].
    pub unknown_error_classes: Vec<String>,
}

impl Gaps {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The run event types the ingest schema allows.
pub fn run_event_types() -> Vec<String> {
    let schema: Value = serde_json::from_str(include_str!(
        "../../../profiles/schemas/run-event.schema.json"
    ))
    .unwrap_or_default();
    schema["properties"]["type"]["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect()
}

fn accepted(status: Option<u16>) -> bool {
    matches!(status, Some(200 | 202))
}

pub fn gaps(scenarios: &[Scenario], mappings: &Mappings) -> Gaps {
    let mut parameters = BTreeSet::new();
    let mut events = BTreeSet::new();
    let mut classes = BTreeSet::new();
    for step in scenarios.iter().flat_map(|s| &s.steps) {
        if let Some(class) = &step.expect.error_class {
            classes.insert(class.clone());
        }
        let Some(body) = &step.request.json else {
            continue;
        };
        if !accepted(step.expect.status) {
            continue;
        }
        let path = step.request.path.as_str();
        if path.starts_with("/v1/runs/")
            && path.ends_with("/events")
            && let Some(t) = body["type"].as_str()
        {
            events.insert(t.to_owned());
        }
        if path != "/v1/observations" {
            continue;
        }
        let Some(family) = body["device"]["model"]
            .as_str()
            .and_then(|m| mappings.family_for_model(m))
        else {
            continue;
        };
        let checked: Vec<&str> = step
            .ehr
            .iter()
            .filter(|e| e.resource_type == "Observation" && e.count >= 1)
            .map(|e| e.identifier.value.as_str())
            .collect();
        for reading in body["readings"].as_array().into_iter().flatten() {
            let Some(parameter) = reading["parameter"]
                .as_str()
                .and_then(|p| family.parameter(p))
            else {
                continue;
            };
            let prefix = format!("{}:", family.id);
            let code = format!(":{}:", parameter.code);
            if checked
                .iter()
                .any(|v| v.starts_with(&prefix) && v.contains(&code))
            {
                parameters.insert((family.id.clone(), parameter.code.clone()));
            }
        }
    }
    let mut gaps = Gaps::default();
    for family in mappings.families() {
        for parameter in family.parameters() {
            if !parameters.contains(&(family.id.clone(), parameter.code.clone())) {
                gaps.parameters
                    .push(format!("{}/{}", family.id, parameter.vendor));
            }
        }
    }
    gaps.run_events = run_event_types()
        .into_iter()
        .filter(|t| !events.contains(t))
        .collect();
    gaps.error_classes = ERROR_CLASSES
        .iter()
        .filter(|(c, _)| !classes.contains(*c))
        .map(|(c, _)| (*c).to_owned())
        .collect();
    gaps.unknown_error_classes = classes
        .into_iter()
        .filter(|c| !ERROR_CLASSES.iter().any(|(k, _)| k == c))
        .collect();
    gaps
}
