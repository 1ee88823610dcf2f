//! FHIR XML through fhirbolt's typed model, for EHRs that want `application/fhir+xml` and for
//! clients that ask for XML answers. Only concrete resource types: never the whole `Resource`
//! enum (a Bundle is assembled around these by the caller), which would cost a quarter of an
//! hour of compile time.

use fhirbolt::model::r4::resources::{
    CapabilityStatement, Device, DeviceMetric, Observation, OperationOutcome, Procedure, Provenance,
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
    "DeviceMetric",
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
        "DeviceMetric" => via::<DeviceMetric>(value),
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
    // fhirbolt unwraps namespace names as UTF-8 (a panic on other bytes): refuse them first.
    let text = std::str::from_utf8(xml).map_err(|e| format!("the XML is not UTF-8: {e}"))?;
    screen_tags(text)?;
    match resource_type {
        "Observation" => back::<Observation>(xml),
        "Procedure" => back::<Procedure>(xml),
        "Device" => back::<Device>(xml),
        "DeviceMetric" => back::<DeviceMetric>(xml),
        "Provenance" => back::<Provenance>(xml),
        "OperationOutcome" => back::<OperationOutcome>(xml),
        other => Err(format!("no XML reader for {other}")),
    }
}

/// The most attributes a FHIR XML element is let carry (`value`, `id`, `url`, `xmlns` and a
/// narrative's XHTML attributes need far fewer).
pub const MAX_ATTRIBUTES_PER_ELEMENT: usize = 16;
/// The most namespace declarations one element is let carry.
pub const MAX_NAMESPACE_DECLARATIONS_PER_ELEMENT: usize = 4;

/// fhirbolt reads XML with quick-xml 0.25, whose duplicate-attribute check is quadratic in
/// the attributes of a tag (RUSTSEC-2026-0194) and whose namespace resolver allocates for
/// every declaration without bound (RUSTSEC-2026-0195). A pass with the current quick-xml
/// (linear, no resolver) refuses such tags before fhirbolt sees them.
fn screen_tags(xml: &str) -> Result<(), String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(tag) | Event::Empty(tag)) => {
                let (mut attributes, mut namespaces) = (0, 0);
                for attribute in tag.attributes().with_checks(false) {
                    let attribute =
                        attribute.map_err(|e| format!("the XML is not well-formed: {e}"))?;
                    attributes += 1;
                    let key = attribute.key.as_ref();
                    if key == "xmlns" || key.starts_with("xmlns:") {
                        namespaces += 1;
                    }
                    if attributes > MAX_ATTRIBUTES_PER_ELEMENT
                        || namespaces > MAX_NAMESPACE_DECLARATIONS_PER_ELEMENT
                    {
                        let name = tag.name().as_ref().to_owned();
                        return Err(format!(
                            "element <{name}> has more than {MAX_ATTRIBUTES_PER_ELEMENT} attributes \
                             or {MAX_NAMESPACE_DECLARATIONS_PER_ELEMENT} namespace declarations"
                        ));
                    }
                }
            }
            Ok(Event::Eof) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("the XML is not well-formed: {e}")),
        }
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
    fn a_namespace_that_is_not_utf8_is_refused_not_a_panic() {
        let xml = b"<Observation xmlns=\"http://hl7.org/fhir\xff\"><status value=\"final\"/></Observation>";
        let refused = resource_from_xml("Observation", xml).unwrap_err();
        assert!(refused.contains("not UTF-8"), "{refused}");
    }

    #[test]
    fn an_element_with_many_attributes_or_namespaces_never_reaches_fhirbolt() {
        let attributes: String = (0..100_000).map(|i| format!(" a{i}=\"x\"")).collect();
        let xml = format!(
            r#"<Observation xmlns="http://hl7.org/fhir"><status{attributes}/></Observation>"#
        );
        let refused = resource_from_xml("Observation", xml.as_bytes()).unwrap_err();
        assert!(
            refused.contains("<status> has more than 16 attributes"),
            "{refused}"
        );

        let namespaces: String = (0..5)
            .map(|i| format!(" xmlns:n{i}=\"urn:x{i}\""))
            .collect();
        let xml = format!(
            r#"<Observation xmlns="http://hl7.org/fhir"{namespaces}><status value="final"/></Observation>"#
        );
        let refused = resource_from_xml("Observation", xml.as_bytes()).unwrap_err();
        assert!(refused.contains("namespace declarations"), "{refused}");
    }

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
