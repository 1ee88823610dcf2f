//! `GET /metadata`: the gateway's CapabilityStatement: what it takes in, in which formats, and
//! which profiles the resources it emits declare.

use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::BoxBody;
use crate::outcome::fhir_json_response;

pub fn capability_statement() -> Value {
    let profiles = |of: &str| -> Vec<String> {
        mappings::profiles()
            .into_iter()
            .filter(|(_, t)| t == of)
            .map(|(url, _)| url)
            .collect()
    };
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "publisher": "ECMO FHIR gateway project",
        "kind": "instance",
        "software": {"name": "ECMO FHIR gateway", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "ECMO device data in over mutual TLS, FHIR R4 out to hospital EHRs. Ingest: POST /v1/observations (readings) and POST /v1/runs/{run-id}/events (ECMO runs), as JSON (schemas at GET /v1/schemas/{observation-batch|run-event}) or XML (profiles/xml/ingest.xsd); FHIR-native devices: POST /v1/fhir/Observation and /v1/fhir/Bundle with Observations following the ecmo-circuit-observation profile, FHIR JSON or XML. Errors are OperationOutcomes, in FHIR JSON or XML by Accept or _format."
        },
        "fhirVersion": "4.0.1",
        "format": [
            "application/fhir+json",
            "application/fhir+xml",
            "application/json",
            "application/xml"
        ],
        "rest": [{
            "mode": "server",
            "documentation": "The resources below are written to the configured EHRs (conditional create, or conditional update for runs), not served here; each declares its profile in meta.profile.",
            "security": {"description": "Mutual TLS: a client certificate chained to a configured vendor CA is required; the certificate's subject names the vendor, the configuration the devices it may post for."},
            "resource": [
                {"type": "Observation", "supportedProfile": profiles("Observation"), "documentation": "One per device reading."},
                {"type": "Procedure", "supportedProfile": profiles("Procedure"), "documentation": "One per ECMO run, and one per mode segment, circuit change and weaning trial."},
                {"type": "Device", "supportedProfile": profiles("Device"), "documentation": "One per device of an ECMO circuit (console, monitor, analyser), and per module of a device with its channel (HL7 PoCD VMD and channel, ecmo-device-component), between the device and its metrics."},
                {"type": "DeviceMetric", "supportedProfile": profiles("DeviceMetric"), "documentation": "One per parameter of a device (HL7 PoCD): whether the device measures, sets or calculates it; its parent is the channel of the module it comes from. Observations point at it."}
            ]
        }]
    })
}

pub fn serve() -> Response<BoxBody> {
    fhir_json_response(StatusCode::OK, &capability_statement())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_emitted_profile() {
        let c = super::capability_statement();
        let listed: Vec<&str> = c["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r["supportedProfile"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
            })
            .collect();
        for profile in [
            mappings::OBSERVATION_PROFILE,
            mappings::RUN_PROFILE,
            mappings::RUN_ACTIVITY_PROFILE,
            mappings::DEVICE_PROFILE,
        ] {
            assert!(listed.contains(&profile), "{profile}");
        }
    }
}
