//! `POST /v1/runs/{run-id}/events`: a run event is checked against the run (and every other
//! run on the same console), stored, and the run's resources are handed off.

use std::sync::Arc;

use http::{Request, StatusCode};
use serde_json::Value;
use tower::filter::{AsyncFilterLayer, AsyncPredicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::ingress::client_identity::VendorPolicy;
use crate::outcome::{ApiError, Issue};
use crate::runs::{RunError, RunRegistry};

#[derive(Clone)]
pub struct ApplyRunEvent {
    runs: Arc<RunRegistry>,
}

pub fn layer(runs: Arc<RunRegistry>) -> AsyncFilterLayer<ApplyRunEvent> {
    AsyncFilterLayer::new(ApplyRunEvent { runs })
}

/// `/v1/runs/{run-id}/events` -> `run-id`, if it is a valid id.
pub fn run_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v1/runs/")?.strip_suffix("/events")?;
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(id)
}

pub fn refusal(error: RunError) -> ApiError {
    match error {
        RunError::Invalid(crate::runs::event::Unreadable { at, why }) => ApiError::one(
            StatusCode::UNPROCESSABLE_ENTITY,
            Issue::error("invalid", why).at(at),
        ),
        RunError::Conflict(conflict) => ApiError::one(
            StatusCode::CONFLICT,
            Issue::error("conflict", conflict.0).at("/time"),
        ),
        RunError::Forbidden(why) => ApiError::one(
            StatusCode::FORBIDDEN,
            Issue::error("forbidden", why).at("/console"),
        ),
        RunError::Mapping(why) => {
            tracing::error!(%why, "the run's resources cannot be built; check the mapping tables");
            ApiError::one(
                StatusCode::INTERNAL_SERVER_ERROR,
                Issue::error(
                    "exception",
                    "the gateway cannot build this run's FHIR resources; the event was stored, the integration team has been told (the gateway's log)",
                ),
            )
        }
        RunError::Storage(why) => {
            tracing::error!(%why, "run store failure");
            ApiError::one(
                StatusCode::SERVICE_UNAVAILABLE,
                Issue::error("transient", "the run store cannot be written; resend later"),
            )
            .retry_after(5)
        }
    }
}

impl AsyncPredicate<Request<Value>> for ApplyRunEvent {
    type Request = Request<OutboundBatch>;
    type Future = crate::delivery::BoxFuture<Result<Request<OutboundBatch>, BoxError>>;

    fn check(&mut self, request: Request<Value>) -> Self::Future {
        let runs = self.runs.clone();
        // The run store's fsync is waited for on a blocking thread, not an async worker.
        Box::pin(async move {
            tokio::task::spawn_blocking(move || apply(&runs, request))
                .await
                .map_err(|e| {
                    BoxError::from(refusal(RunError::Storage(format!("run event task: {e}"))))
                })?
        })
    }
}

fn apply(runs: &RunRegistry, request: Request<Value>) -> Result<Request<OutboundBatch>, BoxError> {
    let (parts, body) = request.into_parts();
    let Some(run_id) = run_id(parts.uri.path()) else {
        return Err(ApiError::one(
            StatusCode::NOT_FOUND,
            Issue::error(
                "not-found",
                "the run id must be 1-64 letters, digits, '.', '_' or '-'",
            ),
        )
        .into());
    };
    let vendor = parts
        .extensions
        .get::<Arc<VendorPolicy>>()
        .cloned()
        .ok_or_else(|| {
            BoxError::from(ApiError::one(
                StatusCode::FORBIDDEN,
                Issue::error("forbidden", "no vendor identity"),
            ))
        })?;
    let applied = runs
        .apply(run_id, &body, &vendor)
        .map_err(|e| BoxError::from(refusal(e)))?;
    tracing::info!(vendor = %vendor.name, status = applied.status, resources = applied.resources.len(), "run event applied");
    let mut subjects = crate::delivery::Subjects::default();
    subjects.patient(&applied.patient.0, &applied.patient.1);
    subjects.run(run_id);
    let batch = OutboundBatch {
        subjects,
        request_id: crate::ingress::request_id(&parts.headers),
        vendor: vendor.name.clone(),
        model: applied.model,
        origins: vec!["/".to_owned(); applied.resources.len()],
        resources: applied.resources.into(),
        revision: Some(applied.revision),
        source: crate::ingress::provenance_source(
            Some(&vendor),
            applied.devices,
            applied.tables,
            None,
        ),
        // A run's Devices are its own resources; their metrics come with their readings.
        descriptions: Vec::new(),
        described: Vec::new(),
    };
    Ok(Request::from_parts(parts, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway's own failure to build FHIR is a 500 (not a 503 that says resend later);
    /// a store that cannot be written is the 503.
    #[test]
    fn mapping_failures_are_500_and_store_failures_503() {
        let mapping = refusal(RunError::Mapping("no code".into())).into_response();
        assert_eq!(mapping.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(mapping.headers().get("retry-after").is_none());
        let storage = refusal(RunError::Storage("disk full".into())).into_response();
        assert_eq!(storage.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(storage.headers()["retry-after"], "5");
    }

    #[test]
    fn run_ids_from_paths() {
        assert_eq!(run_id("/v1/runs/R-2026.001/events"), Some("R-2026.001"));
        assert_eq!(run_id("/v1/runs//events"), None);
        assert_eq!(run_id("/v1/runs/a b/events"), None);
        assert_eq!(run_id("/v1/runs/x/other"), None);
    }
}
