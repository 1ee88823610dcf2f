//! Validation against the ingest JSON Schema (profiles/schemas).
//!
//! Problems with the batch as a whole (device, patient, the readings array) refuse it here.
//! Problems inside single readings are passed on as [`ReadingIssues`], so that the mapping
//! step can add its own findings for the other readings and the vendor gets every problem in
//! one answer.

use std::collections::BTreeMap;

use http::{Request, StatusCode};
use serde_json::Value;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::outcome::{ApiError, Issue};
use crate::validation::Schemas;

/// Schema issues of individual readings, by reading index.
#[derive(Debug, Clone, Default)]
pub struct ReadingIssues(pub BTreeMap<usize, Vec<Issue>>);

#[derive(Clone)]
pub struct ValidateSchema {
    schemas: Schemas,
    schema: &'static str,
}

pub fn layer(schemas: Schemas, schema: &'static str) -> FilterLayer<ValidateSchema> {
    assert!(
        schemas.get(schema).is_some(),
        "schema '{schema}' is embedded"
    );
    FilterLayer::new(ValidateSchema { schemas, schema })
}

/// `/readings/<i>/...` -> `i`.
pub fn reading_index(pointer: &str) -> Option<usize> {
    pointer
        .strip_prefix("/readings/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

impl Predicate<Request<Value>> for ValidateSchema {
    type Request = Request<Value>;

    fn check(&mut self, mut request: Request<Value>) -> Result<Request<Value>, BoxError> {
        let Some(schema) = self.schemas.get(self.schema) else {
            return Err(format!("schema '{}' missing", self.schema).into());
        };
        let issues = schema.check(request.body());
        if issues.is_empty() {
            return Ok(request);
        }
        let batch_level = issues.iter().any(|issue| {
            issue
                .expression
                .as_deref()
                .and_then(reading_index)
                .is_none()
        });
        if batch_level {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, issues).into());
        }
        let mut by_reading = ReadingIssues::default();
        for issue in issues {
            if let Some(index) = issue.expression.as_deref().and_then(reading_index) {
                by_reading.0.entry(index).or_default().push(issue);
            }
        }
        request.extensions_mut().insert(by_reading);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validate(body: Value) -> Result<Request<Value>, BoxError> {
        let schemas = Schemas::embedded().unwrap();
        ValidateSchema {
            schemas,
            schema: "observation-batch",
        }
        .check(Request::new(body))
    }

    #[test]
    fn batch_level_problems_are_422_at_once() {
        let error = validate(json!({"device": {"serial": "CH-1"}, "readings": []})).unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(api.issues.len(), 2, "{:?}", api.issues);
    }

    #[test]
    fn reading_level_problems_travel_on() {
        let request = validate(json!({
            "device": {"serial": "CH-1", "model": "CARDIOHELP"},
            "readings": [
                {"parameter": "Flow", "value": 4, "unit": "L/min", "time": "2026-11-21T10:00:00Z"},
                {"parameter": "Flow", "value": "4", "unit": "L/min", "time": "2026-11-21T10:00:00Z"}
            ]
        }))
        .unwrap();
        let issues = request.extensions().get::<ReadingIssues>().unwrap();
        assert_eq!(issues.0.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn pointer_to_reading_index() {
        assert_eq!(reading_index("/readings/12/value"), Some(12));
        assert_eq!(reading_index("/readings/3"), Some(3));
        assert_eq!(reading_index("/readings"), None);
        assert_eq!(reading_index("/device/serial"), None);
    }
}
