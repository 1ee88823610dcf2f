//! The official FHIR R4 JSON Schema (`profiles/fhir-r4/fhir.schema.json`, HL7's
//! `http://hl7.org/fhir/json-schema/4.0`), compiled once per resource type we emit.
//!
//! It checks what fhirbolt's strict model lets through: primitive formats (dateTime, date,
//! code, id, uri, decimal as a JSON number rather than text), unknown elements and value types.
//! fhirbolt still checks cardinality and required elements, which the schema leaves out for
//! primitives that may carry extensions instead.

use std::collections::HashMap;

use serde_json::{Value, json};

const R4_SCHEMA: &str = include_str!("../../profiles/fhir-r4/fhir.schema.json");

/// The resource types the gateway emits and therefore checks.
pub const EMITTED_TYPES: &[&str] = &["Observation", "Procedure", "Device", "DeviceMetric"];

#[derive(Debug, thiserror::Error)]
#[error("FHIR R4 JSON Schema: {0}")]
pub struct R4SchemaError(String);

/// One violation: where in the resource (JSON pointer) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R4Violation {
    pub pointer: String,
    pub message: String,
}

/// Compiled validators by resource type.
pub struct R4Schema {
    by_type: HashMap<&'static str, jsonschema::Validator>,
}

impl R4Schema {
    /// Validators for the types the gateway emits.
    pub fn embedded() -> Result<Self, R4SchemaError> {
        Self::for_types(EMITTED_TYPES)
    }

    /// Validators for `types` (e.g. the conformance resources in profiles/fhir).
    pub fn for_types(types: &[&'static str]) -> Result<Self, R4SchemaError> {
        // The definitions are borrowed as raw text and only those our types reach are parsed:
        // parsing all 3 MB of them would cost ~30 MB of peak memory at start.
        let document: R4Document<'static> =
            serde_json::from_str(R4_SCHEMA).map_err(|e| R4SchemaError(e.to_string()))?;
        if !document.definitions.contains_key("Observation") {
            return Err(R4SchemaError("no resource definitions".into()));
        }
        for resource_type in types {
            if !document.definitions.contains_key(resource_type) {
                return Err(R4SchemaError(format!("no resource type {resource_type}")));
            }
        }
        // Only what the types reach is kept (a few dozen data types of 680 definitions).
        let definitions =
            reachable(&document.definitions, types).map_err(|e| R4SchemaError(e.to_string()))?;
        let mut by_type = HashMap::new();
        for resource_type in types {
            // The official root is a oneOf over every resource; ours is one of its definitions,
            // with the definitions beside it so that every `#/definitions/...` resolves.
            let root = json!({
                "$schema": "http://json-schema.org/draft-06/schema#",
                "$ref": format!("#/definitions/{resource_type}"),
                "definitions": definitions,
            });
            let validator = jsonschema::draft6::options()
                .build(&root)
                .map_err(|e| R4SchemaError(format!("{resource_type}: {e}")))?;
            by_type.insert(*resource_type, validator);
        }
        Ok(Self { by_type })
    }

    /// Every violation of `resource` (a type we do not emit has none).
    pub fn check(&self, resource_type: &str, resource: &Value) -> Vec<R4Violation> {
        let Some(validator) = self.by_type.get(resource_type) else {
            return Vec::new();
        };
        if validator.is_valid(resource) {
            return Vec::new();
        }
        validator
            .iter_errors(resource)
            .map(|e| R4Violation {
                pointer: e.instance_path().to_string(),
                message: e.to_string(),
            })
            .collect()
    }
}

/// The official schema's definitions, unparsed.
#[derive(serde::Deserialize)]
struct R4Document<'a> {
    #[serde(borrow)]
    definitions: HashMap<&'a str, &'a serde_json::value::RawValue>,
}

/// The definitions `roots` reach through `$ref`, parsed, by name. `contained` may hold any
/// resource, which would reach every definition; the gateway never sends contained resources,
/// so `ResourceList` becomes a schema nothing matches.
fn reachable(
    all: &HashMap<&str, &serde_json::value::RawValue>,
    roots: &[&str],
) -> Result<Value, serde_json::Error> {
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    match (key.as_str(), item.as_str()) {
                        ("$ref", Some(target)) => {
                            out.push(target.trim_start_matches("#/definitions/"));
                        }
                        _ => refs(item, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
            _ => {}
        }
    }
    let mut kept = serde_json::Map::new();
    let mut pending: Vec<String> = roots.iter().map(|r| (*r).to_owned()).collect();
    while let Some(name) = pending.pop() {
        if kept.contains_key(&name) {
            continue;
        }
        let definition: Value = if name == "ResourceList" {
            json!({"description": "contained resources are not sent by this gateway", "not": {}})
        } else {
            match all.get(name.as_str()) {
                Some(raw) => serde_json::from_str(raw.get())?,
                None => Value::Null,
            }
        };
        let mut found = Vec::new();
        refs(&definition, &mut found);
        pending.extend(found.into_iter().map(str::to_owned));
        kept.insert(name, definition);
    }
    Ok(Value::Object(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "https://fhir.ecmo-gateway.org/CodeSystem/ecmo", "code": "pump-blood-flow"}]},
            "effectiveDateTime": "2026-11-21T10:15:00Z",
            "valueQuantity": {"value": 4.2, "unit": "L/min", "system": "http://unitsofmeasure.org", "code": "L/min"}
        })
    }

    #[test]
    fn accepts_valid_and_names_each_broken_primitive() {
        let schema = R4Schema::embedded().unwrap();
        assert_eq!(schema.check("Observation", &observation()), vec![]);

        let mut o = observation();
        o["valueQuantity"]["value"] = json!("4.2");
        o["effectiveDateTime"] = json!("21/11/2026 10:15");
        o["status"] = json!("final ");
        o["colour"] = json!("blue");
        let pointers: Vec<String> = schema
            .check("Observation", &o)
            .into_iter()
            .map(|v| v.pointer)
            .collect();
        for expected in ["/valueQuantity/value", "/effectiveDateTime", "/status", ""] {
            assert!(
                pointers.iter().any(|p| p == expected),
                "{expected}: {pointers:?}"
            );
        }
        // Contained resources are not ours to send.
        let mut o = observation();
        o["contained"] = json!([{"resourceType": "Patient"}]);
        assert_eq!(schema.check("Observation", &o)[0].pointer, "/contained/0");
        // A dateTime with hours but no time zone breaks R4.
        let mut o = observation();
        o["effectiveDateTime"] = json!("2026-11-21T10:15:00");
        assert_eq!(schema.check("Observation", &o).len(), 1);
    }

    #[test]
    fn our_conformance_resources_are_valid_r4() {
        let schema =
            R4Schema::for_types(&["StructureDefinition", "ValueSet", "CodeSystem"]).unwrap();
        let mut checked = 0;
        for (file, text) in mappings::CONFORMANCE_RESOURCES {
            let resource: Value = serde_json::from_str(text).unwrap();
            let resource_type = resource["resourceType"].as_str().unwrap();
            assert!(schema.by_type.contains_key(resource_type), "{file}");
            let violations = schema.check(resource_type, &resource);
            assert!(violations.is_empty(), "{file}: {violations:?}");
            checked += 1;
        }
        assert!(checked >= 18, "{checked}");
    }

    #[test]
    fn only_reachable_definitions_are_compiled() {
        let document: R4Document<'static> = serde_json::from_str(R4_SCHEMA).unwrap();
        let kept = reachable(&document.definitions, EMITTED_TYPES).unwrap();
        let names = kept.as_object().unwrap();
        assert!(names.contains_key("Quantity") && names.contains_key("Extension"));
        assert!(!names.contains_key("Patient") && !names.contains_key("Bundle"));
        assert!(names.len() < 100, "{}", names.len());
    }

    #[test]
    fn types_we_do_not_emit_are_not_checked() {
        let schema = R4Schema::embedded().unwrap();
        assert!(schema.check("Patient", &json!({"nonsense": 1})).is_empty());
    }
}
