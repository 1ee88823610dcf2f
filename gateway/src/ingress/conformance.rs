//! The last check before hand-off: every resource about to be queued is checked against base
//! R4 (fhirbolt's strict model) and against the profile it declares (rules read from
//! profiles/fhir). One failure refuses the whole request with an OperationOutcome naming the
//! rule and the path; nothing of it is queued, and the failure is counted.

use std::sync::Arc;

use http::{Request, StatusCode};
use mappings::ProfileValidator;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::outcome::{ApiError, Issue};

#[derive(Clone)]
pub struct CheckConformance {
    validator: Arc<ProfileValidator>,
}

pub fn layer(validator: Arc<ProfileValidator>) -> FilterLayer<CheckConformance> {
    FilterLayer::new(CheckConformance { validator })
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
            for broken in self.validator.check(&value) {
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
            if let Err(reason) = mappings::check_resource_value(resource.resource_type, value) {
                mappings::VALIDATION_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                issues.push(
                    Issue::error("structure", format!("not valid FHIR R4: {reason}"))
                        .at(resource.resource_type.to_owned()),
                );
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
        })
    }

    #[test]
    fn refuses_what_breaks_a_profile_naming_rule_and_path() {
        let mut check = CheckConformance {
            validator: Arc::new(ProfileValidator::embedded().unwrap()),
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
}
