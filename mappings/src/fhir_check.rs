//! Structural checks of FHIR R4 JSON against the typed model, for receivers (the reference
//! EHR) that must refuse what a real FHIR server would refuse: unknown elements, wrong types,
//! missing required elements.

use fhirbolt::model::r4::resources::{
    CodeSystem, Device, DeviceMetric, Observation, Procedure, Provenance, StructureDefinition,
    ValueSet,
};
use fhirbolt::serde::{DeserializationConfig, DeserializationMode};

/// Resource types the gateway sends, checked strictly; other types are not checked here.
pub const CHECKED_TYPES: &[&str] = &[
    "Observation",
    "Procedure",
    "Device",
    "DeviceMetric",
    "Provenance",
    "StructureDefinition",
    "ValueSet",
    "CodeSystem",
];

/// Ok when `json` is a valid R4 resource of `resource_type`, or of a type not in
/// [`CHECKED_TYPES`]; otherwise the parser's reason.
///
/// fhirbolt 0.4.0 cannot read a JSON number into a FHIR decimal with the current serde_json
/// (`arbitrary_precision` makes it ask for a string, and it fails on every `valueQuantity`).
/// Numbers are therefore handed to it as their exact text, which its decimal reader accepts;
/// the check still covers element names, nesting, cardinality and required elements. The
/// integer elements of what the gateway emits (a waveform's `SampledData.dimensions`, and in
/// conformance resources e.g. `ElementDefinition.min`) are left numbers, as fhirbolt wants.
pub fn check_resource_json(resource_type: &str, json: &[u8]) -> Result<(), String> {
    if !CHECKED_TYPES.contains(&resource_type) {
        return Ok(());
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    check_resource_value(resource_type, value)
}

/// [`check_resource_json`] for a resource already parsed (it is consumed).
pub fn check_resource_value(
    resource_type: &str,
    mut value: serde_json::Value,
) -> Result<(), String> {
    if !CHECKED_TYPES.contains(&resource_type) {
        return Ok(());
    }
    numbers_as_text(&mut value);
    let strict = Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    });
    let result = match resource_type {
        "Observation" => fhirbolt::json::from_json_value::<Observation>(value, strict).map(drop),
        "Procedure" => fhirbolt::json::from_json_value::<Procedure>(value, strict).map(drop),
        "Device" => fhirbolt::json::from_json_value::<Device>(value, strict).map(drop),
        "DeviceMetric" => fhirbolt::json::from_json_value::<DeviceMetric>(value, strict).map(drop),
        "Provenance" => fhirbolt::json::from_json_value::<Provenance>(value, strict).map(drop),
        "StructureDefinition" => {
            fhirbolt::json::from_json_value::<StructureDefinition>(value, strict).map(drop)
        }
        "ValueSet" => fhirbolt::json::from_json_value::<ValueSet>(value, strict).map(drop),
        _ => fhirbolt::json::from_json_value::<CodeSystem>(value, strict).map(drop),
    };
    result.map_err(|e| e.to_string())
}

/// Integer-typed elements of the checked types, which fhirbolt reads as numbers: R4's
/// `unsignedInt`/`integer` elements here (`ElementDefinition.min`, `.maxLength`,
/// `CodeSystem.count`, `ValueSet.expansion.total`/`.offset`, a waveform's
/// `SampledData.dimensions`) and every `[x]` choice of an integer type (`valueInteger`,
/// `minValueUnsignedInt`, ...).
fn is_integer_element(key: &str) -> bool {
    matches!(
        key,
        "min" | "maxLength" | "count" | "total" | "offset" | "dimensions"
    ) || key.ends_with("Integer")
        || key.ends_with("UnsignedInt")
        || key.ends_with("PositiveInt")
}

pub(crate) fn numbers_as_text(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) => *value = serde_json::Value::String(n.as_str().to_owned()),
        serde_json::Value::Array(items) => items.iter_mut().for_each(numbers_as_text),
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let integers = is_integer_element(key)
                    && (item.is_number()
                        || item
                            .as_array()
                            .is_some_and(|a| a.iter().all(|v| v.is_number())));
                if !integers {
                    numbers_as_text(item);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_check_finds_structural_errors() {
        let good = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":4.25}}"#;
        assert!(check_resource_json("Observation", good).is_ok());
        let missing_status = br#"{"resourceType":"Observation","code":{"text":"x"}}"#;
        assert!(check_resource_json("Observation", missing_status).is_err());
        let unknown = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"colour":"red"}"#;
        assert!(
            check_resource_json("Observation", unknown)
                .unwrap_err()
                .contains("colour")
        );
        // fhirbolt takes a decimal written as a JSON string; it does catch wrong structure.
        let wrong_type = br#"{"resourceType":"Observation","status":"final","code":"x"}"#;
        assert!(check_resource_json("Observation", wrong_type).is_err());
    }
}
