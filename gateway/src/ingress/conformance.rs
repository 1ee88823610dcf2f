//! The last check before hand-off: every resource about to be queued is checked against base
//! R4 (the official R4 JSON Schema for primitive formats and element names, fhirbolt's strict
//! model for structure and cardinality) and against the profile it declares (rules read from
//! profiles/fhir). One failure refuses the whole request with an OperationOutcome naming the
//! rule and the path; nothing of it is queued, and the failure is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Request, StatusCode};
use mappings::ProfileValidator;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::fhir_schema::R4Schema;
use crate::outcome::{ApiError, Issue};

/// Built resources refused by the check since start (served by the admin API).
pub static VALIDATION_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Everything a built resource is checked against, compiled once at start-up.
pub struct ConformanceRules {
    pub profiles: ProfileValidator,
    pub r4: R4Schema,
}

impl ConformanceRules {
    pub fn embedded() -> Result<Self, String> {
        Ok(Self {
            profiles: ProfileValidator::embedded()?,
            r4: R4Schema::embedded().map_err(|e| e.to_string())?,
        })
    }

    /// Every rule `resource` breaks: the R4 JSON Schema, our profiles, fhirbolt's strict model.
    /// Paths are FHIRPath-like (`Observation.code.coding[0]`).
    pub fn issues(&self, resource_type: &str, resource: serde_json::Value) -> Vec<Issue> {
        let mut issues = Vec::new();
        for broken in self.r4.check(resource_type, &resource) {
            issues.push(
                Issue::error(
                    "structure",
                    format!("not valid FHIR R4 (JSON Schema): {}", broken.message),
                )
                .at(fhir_path(resource_type, &broken.pointer)),
            );
        }
        for broken in self.profiles.check(&resource) {
            issues.push(
                Issue::error(
                    "invariant",
                    format!(
                        "profile rule '{}' of {}: {}",
                        broken.rule, broken.profile, broken.message
                    ),
                )
                .at(broken.path),
            );
        }
        if let Err(reason) = mappings::check_resource_value(resource_type, resource) {
            issues.push(
                Issue::error("structure", format!("not valid FHIR R4: {reason}"))
                    .at(resource_type.to_owned()),
            );
        }
        issues
    }
}

#[derive(Clone)]
pub struct CheckConformance {
    rules: Arc<ConformanceRules>,
}

pub fn layer(rules: Arc<ConformanceRules>) -> FilterLayer<CheckConformance> {
    FilterLayer::new(CheckConformance { rules })
}

impl Predicate<Request<OutboundBatch>> for CheckConformance {
    type Request = Request<OutboundBatch>;

    fn check(
        &mut self,
        request: Request<OutboundBatch>,
    ) -> Result<Request<OutboundBatch>, BoxError> {
        let mut issues = Vec::new();
        for resource in request.body().resources.iter() {
            let value: serde_json::Value = match serde_json::from_slice(&resource.json) {
                Ok(value) => value,
                Err(e) => {
                    issues.push(Issue::error(
                        "structure",
                        format!("{} is not JSON: {e}", resource.resource_type),
                    ));
                    continue;
                }
            };
            let before = issues.len();
            issues.extend(self.rules.issues(resource.resource_type, value));
            if issues.len() > before {
                VALIDATION_FAILURES.fetch_add(1, Ordering::Relaxed);
            }
        }
        if issues.is_empty() {
            return Ok(request);
        }
        // Our own mapping produced it: a table or profile change went wrong, not the vendor.
        tracing::error!(
            issues = issues.len(),
            "a built resource breaks a profile rule; nothing of the request was queued"
        );
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, {
            let mut all = vec![Issue::error(
                "exception",
                "the gateway built a resource that breaks its own profiles, so nothing of this request was sent; the hospital's integration team has to fix the mapping",
            )];
            all.extend(issues);
            all
        })
        .into())
    }
}

/// `/code/coding/0/system` under `Observation` -> `Observation.code.coding[0].system`, the
/// way the profile rules name elements.
fn fhir_path(resource_type: &str, pointer: &str) -> String {
    let mut path = resource_type.to_owned();
    for segment in pointer.split('/').skip(1) {
        if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
            path.push('[');
            path.push_str(segment);
            path.push(']');
        } else {
            path.push('.');
            path.push_str(segment);
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: &[u8]) -> Request<OutboundBatch> {
        Request::new(OutboundBatch {
            request_id: "r".into(),
            vendor: "v".into(),
            model: "m".into(),
            resources: vec![mappings::MappedResource {
                resource_type: "Observation",
                id: "0".into(),
                identifier_system: mappings::OBSERVATION_IDENTIFIER_SYSTEM.into(),
                identifier_value: "x".into(),
                json: json.to_vec(),
                upsert: false,
            }]
            .into(),
            origins: vec!["/readings/0".into()],
            revision: None,
            source: crate::outbox::provenance::test_source(),
        })
    }

    #[test]
    fn refuses_what_breaks_a_profile_naming_rule_and_path() {
        let mut check = CheckConformance {
            rules: Arc::new(ConformanceRules::embedded().unwrap()),
        };
        let error = check
            .check(batch(br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"meta":{"profile":["https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-circuit-observation"]}}"#))
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        let paths: Vec<_> = api
            .issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(paths.contains(&"Observation.identifier"), "{paths:?}");
        assert!(paths.contains(&"Observation.device"), "{paths:?}");
        assert!(
            api.issues
                .iter()
                .any(|i| i.details.contains("required binding"))
        );
    }

    #[test]
    fn refuses_broken_primitives_that_the_typed_model_lets_through() {
        let mut check = CheckConformance {
            rules: Arc::new(ConformanceRules::embedded().unwrap()),
        };
        // A decimal written as text and a dateTime without a time zone.
        let error = check
            .check(batch(br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"effectiveDateTime":"2026-11-21T10:15:00","valueQuantity":{"value":"4.2"}}"#))
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        let paths: Vec<_> = api
            .issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(
            paths.contains(&"Observation.effectiveDateTime"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"Observation.valueQuantity.value"),
            "{paths:?}"
        );
        assert_eq!(
            fhir_path("Procedure", "/bodySite/1/coding/0/code"),
            "Procedure.bodySite[1].coding[0].code"
        );
    }
}
