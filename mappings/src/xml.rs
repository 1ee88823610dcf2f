//! FHIR XML through fhirbolt's typed model, for EHRs that want `application/fhir+xml` and for
//! clients that ask for XML answers. Only concrete resource types: never the whole `Resource`
//! enum (a Bundle is assembled around these by the caller), which would cost a quarter of an
//! hour of compile time.

use fhirbolt::model::r4::resources::{
    CapabilityStatement, Device, Observation, OperationOutcome, Procedure, Provenance,
};
use fhirbolt::serde::{
    DeserializationConfig, DeserializationMode, DeserializeResourceOwned, SerializeResource,
};
use serde_json::Value;

use crate::fhir_check::numbers_as_text;

/// The resource types that can be written and read as XML here.
pub const XML_TYPES: &[&str] = &[
    "Observation",
    "Procedure",
    "Device",
    "Provenance",
    "OperationOutcome",
    "CapabilityStatement",
];

/// A FHIR JSON resource as FHIR XML (`<Observation xmlns="http://hl7.org/fhir">...`, no XML
/// declaration, so it can be embedded in a Bundle).
pub fn resource_to_xml(json: &[u8]) -> Result<Vec<u8>, String> {
    let value: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    resource_value_to_xml(value)
}

/// [`resource_to_xml`] for a parsed resource (it is consumed).
pub fn resource_value_to_xml(mut value: Value) -> Result<Vec<u8>, String> {
    let resource_type = value["resourceType"]
        .as_str()
        .ok_or("no resourceType")?
        .to_owned();
    numbers_as_text(&mut value);
    match resource_type.as_str() {
        "Observation" => via::<Observation>(value),
        "Procedure" => via::<Procedure>(value),
        "Device" => via::<Device>(value),
        "Provenance" => via::<Provenance>(value),
        "OperationOutcome" => via::<OperationOutcome>(value),
        "CapabilityStatement" => via::<CapabilityStatement>(value),
        other => Err(format!("no XML writer for {other}")),
    }
}

fn via<T: DeserializeResourceOwned + SerializeResource>(value: Value) -> Result<Vec<u8>, String> {
    let strict = Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    });
    let typed: T = fhirbolt::json::from_json_value(value, strict).map_err(|e| e.to_string())?;
    let xml = fhirbolt::xml::to_vec(&typed, None).map_err(|e| e.to_string())?;
    Ok(without_declaration(xml))
}

/// fhirbolt always writes `<?xml ...?>`; an embedded resource must not have it.
fn without_declaration(mut xml: Vec<u8>) -> Vec<u8> {
    if xml.starts_with(b"<?xml")
        && let Some(end) = xml.windows(2).position(|w| w == b"?>")
    {
        let mut start = end + 2;
        while xml.get(start).is_some_and(u8::is_ascii_whitespace) {
            start += 1;
        }
        xml.drain(..start);
    }
    xml
}

/// A FHIR XML resource of `resource_type` read strictly (unknown elements, wrong types and
/// broken structure are errors) and returned as FHIR JSON.
pub fn resource_from_xml(resource_type: &str, xml: &[u8]) -> Result<Value, String> {
    match resource_type {
        "Observation" => back::<Observation>(xml),
        "Procedure" => back::<Procedure>(xml),
        "Device" => back::<Device>(xml),
        "Provenance" => back::<Provenance>(xml),
        "OperationOutcome" => back::<OperationOutcome>(xml),
        other => Err(format!("no XML reader for {other}")),
    }
}

fn back<T: DeserializeResourceOwned + SerializeResource>(xml: &[u8]) -> Result<Value, String> {
    let strict = Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    });
    let typed: T = fhirbolt::xml::from_slice(xml, strict).map_err(|e| e.to_string())?;
    fhirbolt::json::to_json_value(typed, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn observation_round_trips_through_xml() {
        let observation: Value = serde_json::from_str(r#"{
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "https://fhir.ecmo-gateway.org/CodeSystem/ecmo", "code": "pump-blood-flow"}], "text": "Flow & more"},
            "effectiveDateTime": "2026-11-21T10:15:00Z",
            "valueQuantity": {"value": 4.20, "unit": "L/min", "system": "http://unitsofmeasure.org", "code": "L/min"}
        }"#).unwrap();
        let xml = String::from_utf8(resource_value_to_xml(observation.clone()).unwrap()).unwrap();
        assert!(
            xml.starts_with("<Observation xmlns=\"http://hl7.org/fhir\">"),
            "{xml}"
        );
        assert!(xml.contains("<value value=\"4.20\"/>"), "{xml}");
        assert!(xml.contains("Flow &#38; more"), "{xml}");
        let back = resource_from_xml("Observation", xml.as_bytes()).unwrap();
        assert_eq!(back["valueQuantity"]["value"].to_string(), "4.20");
        assert_eq!(back["code"], observation["code"]);
    }

    #[test]
    fn operation_outcome_to_xml() {
        let xml = resource_value_to_xml(json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "value", "details": {"text": "too high"}, "location": ["line 2, column 3"], "expression": ["/readings/0/value"]}]})).unwrap();
        let xml = String::from_utf8(xml).unwrap();
        assert!(xml.contains("<severity value=\"error\"/>"), "{xml}");
        assert!(
            xml.contains("<expression value=\"/readings/0/value\"/>"),
            "{xml}"
        );
        assert!(
            resource_value_to_xml(json!({"resourceType": "OperationOutcome", "colour": 1}))
                .is_err()
        );
    }
}
