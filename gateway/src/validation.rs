//! The ingest API's JSON Schemas (profiles/schemas), compiled once at start-up.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::outcome::Issue;

/// The schemas the gateway checks payloads against and serves at `GET /v1/schemas/<name>`.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "observation-batch",
        include_str!("../../profiles/schemas/observation-batch.schema.json"),
    ),
    (
        "run-event",
        include_str!("../../profiles/schemas/run-event.schema.json"),
    ),
    (
        "reading-retraction",
        include_str!("../../profiles/schemas/reading-retraction.schema.json"),
    ),
];

/// The longest `reason` a retraction may give, as its schema says (in characters): an
/// operator's retraction through the admin API takes the same.
pub fn retraction_reason_max_chars() -> usize {
    static MAX: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        EMBEDDED
            .iter()
            .find(|(name, _)| *name == "reading-retraction")
            .and_then(|(_, source)| serde_json::from_str::<Value>(source).ok())
            .and_then(|schema| schema["properties"]["reason"]["maxLength"].as_u64())
            .map_or(500, |max| max as usize)
    });
    *MAX
}

#[derive(Debug, thiserror::Error)]
#[error("schema '{name}': {reason}")]
pub struct SchemaError {
    pub name: String,
    pub reason: String,
}

/// One compiled schema with its source text.
pub struct Schema {
    pub source: Bytes,
    validator: jsonschema::Validator,
}

impl Schema {
    /// Every violation at once, each with the JSON pointer of the offending value, in
    /// document order.
    pub fn check(&self, instance: &Value) -> Vec<Issue> {
        let mut issues: Vec<Issue> = self
            .validator
            .iter_errors(instance)
            .map(|error| {
                let pointer = error.instance_path().to_string();
                let code = match error.kind() {
                    jsonschema::error::ValidationErrorKind::Required { .. } => "required",
                    _ => "invalid",
                };
                Issue::error(code, error.to_string()).at(if pointer.is_empty() {
                    "/".to_owned()
                } else {
                    pointer
                })
            })
            .collect();
        issues
            .sort_by_cached_key(|issue| document_order(issue.expression.as_deref().unwrap_or("")));
        issues
    }
}

/// A sort key that puts `/readings/2` before `/readings/10`.
fn document_order(pointer: &str) -> Vec<(u64, String)> {
    pointer
        .split('/')
        .map(|segment| match segment.parse::<u64>() {
            Ok(index) => (index, String::new()),
            Err(_) => (0, segment.to_owned()),
        })
        .collect()
}

/// All ingest schemas by name; cheap to clone.
#[derive(Clone)]
pub struct Schemas {
    by_name: Arc<HashMap<&'static str, Schema>>,
}

impl Schemas {
    pub fn embedded() -> Result<Self, SchemaError> {
        let mut by_name = HashMap::new();
        for (name, text) in EMBEDDED {
            let err = |reason: String| SchemaError {
                name: (*name).to_owned(),
                reason,
            };
            let value: Value = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&value)
                .map_err(|e| err(e.to_string()))?;
            by_name.insert(
                *name,
                Schema {
                    source: Bytes::from_static(text.as_bytes()),
                    validator,
                },
            );
        }
        Ok(Self {
            by_name: Arc::new(by_name),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Schema> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.by_name.keys().copied().collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_every_violation_with_its_pointer() {
        let schemas = Schemas::embedded().unwrap();
        let schema = schemas.get("observation-batch").unwrap();
        let issues = schema.check(&json!({
            "device": {"serial": "bad serial!", "model": "CARDIOHELP"},
            "readings": [
                {"parameter": "Flow", "value": "4.2", "unit": "L/min", "time": "2026-11-21T10:00:00Z"},
                {"parameter": "Flow", "value": 4.2, "time": "not a time", "extra": 1}
            ]
        }));
        let pointers: Vec<_> = issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(pointers.contains(&"/device/serial"), "{pointers:?}");
        assert!(pointers.contains(&"/readings/0/value"), "{pointers:?}");
        assert!(pointers.contains(&"/readings/1/time"), "{pointers:?}");
        assert!(pointers.contains(&"/readings/1"), "{pointers:?}");
    }

    #[test]
    fn accepts_a_good_batch() {
        let schemas = Schemas::embedded().unwrap();
        let issues = schemas.get("observation-batch").unwrap().check(&json!({
            "device": {"serial": "CH-0042", "model": "CARDIOHELP-i"},
            "patient": {"system": "urn:oid:1.2.3", "value": "MRN-1"},
            "readings": [{"parameter": "Flow", "value": 4.2, "unit": "L/min",
                          "time": "2026-11-21T10:00:00Z", "flags": ["in-alarm"]}]
        }));
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn a_reading_has_a_value_or_a_waveform_of_bounded_samples() {
        let schemas = Schemas::embedded().unwrap();
        let schema = schemas.get("observation-batch").unwrap();
        let reading = |extra: serde_json::Value| {
            let mut reading = json!({"parameter": "Flow", "unit": "mL/min",
                                     "time": "2026-11-21T10:00:00Z"});
            reading
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            json!({"device": {"serial": "CH-0042", "model": "CARDIOHELP-i"},
                   "readings": [reading]})
        };
        let pointers = |batch: serde_json::Value| -> Vec<String> {
            schema
                .check(&batch)
                .into_iter()
                .filter_map(|i| i.expression)
                .collect()
        };
        assert!(
            pointers(reading(
                json!({"samples": {"period": 8, "data": [4200, null]}})
            ))
            .is_empty()
        );
        // Neither, or both.
        assert_eq!(pointers(reading(json!({}))), ["/readings/0"]);
        assert_eq!(
            pointers(reading(
                json!({"value": 4.2, "samples": {"period": 8, "data": [1]}})
            )),
            ["/readings/0"]
        );
        assert_eq!(
            pointers(reading(json!({"samples": {"period": 0, "data": [1]}}))),
            ["/readings/0/samples/period"]
        );
        assert_eq!(
            pointers(reading(json!({"samples": {"period": 8, "data": [1, "2"]}}))),
            ["/readings/0/samples/data/1"]
        );
        let many = vec![json!(1); 10_001];
        assert_eq!(
            pointers(reading(json!({"samples": {"period": 8, "data": many}}))),
            ["/readings/0/samples/data"]
        );
    }
}
