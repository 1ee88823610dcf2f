//! Routing by method and path; unknown paths get 404 and known paths with the wrong method 405,
//! both as OperationOutcomes.

use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::delivery::BoxFuture;
use crate::ingress::schemas;
use crate::outcome::{ApiError, Issue};
use crate::validation::Schemas;
use crate::{BoxBody, BoxError};

pub type Route<B> = BoxCloneSyncService<Request<B>, Response<BoxBody>, BoxError>;

pub struct Router<B> {
    observations: Route<B>,
    run_events: Route<B>,
    fhir_observations: Route<B>,
    retractions: Route<B>,
    schemas: Schemas,
}

// Not derived: a derive would require the body type to be Clone.
impl<B> Clone for Router<B> {
    fn clone(&self) -> Self {
        Self {
            observations: self.observations.clone(),
            run_events: self.run_events.clone(),
            fhir_observations: self.fhir_observations.clone(),
            retractions: self.retractions.clone(),
            schemas: self.schemas.clone(),
        }
    }
}

impl<B> Router<B> {
    pub fn new(
        observations: Route<B>,
        run_events: Route<B>,
        fhir_observations: Route<B>,
        retractions: Route<B>,
        schemas: Schemas,
    ) -> Self {
        Self {
            observations,
            run_events,
            fhir_observations,
            retractions,
            schemas,
        }
    }
}

fn method_not_allowed(allowed: &str) -> BoxError {
    ApiError::one(
        StatusCode::METHOD_NOT_ALLOWED,
        Issue::error("not-supported", format!("use {allowed} on this path")),
    )
    .into()
}

impl<B: Send + 'static> Service<Request<B>> for Router<B> {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        match (path, request.method()) {
            ("/v1/observations", &Method::POST) => {
                Box::pin(self.observations.clone().oneshot(request))
            }
            ("/v1/observations/entered-in-error", &Method::POST) => {
                Box::pin(self.retractions.clone().oneshot(request))
            }
            ("/v1/observations" | "/v1/observations/entered-in-error", _) => {
                Box::pin(async { Err(method_not_allowed("POST")) })
            }
            ("/v1/fhir/Observation" | "/v1/fhir/Bundle", &Method::POST) => {
                Box::pin(self.fhir_observations.clone().oneshot(request))
            }
            ("/v1/fhir/Observation" | "/v1/fhir/Bundle", _) => {
                Box::pin(async { Err(method_not_allowed("POST")) })
            }
            ("/metadata", &Method::GET) => {
                Box::pin(async { Ok(crate::ingress::metadata::serve()) })
            }
            (p, &Method::POST) if p.starts_with("/v1/runs/") && p.ends_with("/events") => {
                Box::pin(self.run_events.clone().oneshot(request))
            }
            (p, _) if p.starts_with("/v1/runs/") && p.ends_with("/events") => {
                Box::pin(async { Err(method_not_allowed("POST")) })
            }
            (p, &Method::GET) if p.starts_with("/v1/schemas/") => {
                let name = p.trim_start_matches("/v1/schemas/").to_owned();
                let result = schemas::serve(&self.schemas, &name).map_err(Into::into);
                Box::pin(async move { result })
            }
            (p, _) if p.starts_with("/v1/schemas/") => {
                Box::pin(async { Err(method_not_allowed("GET")) })
            }
            _ => {
                let path = path.to_owned();
                Box::pin(async move {
                    Err(ApiError::one(
                        StatusCode::NOT_FOUND,
                        Issue::error(
                            "not-found",
                            format!("no endpoint at {path}; see the README's ingest API"),
                        ),
                    )
                    .into())
                })
            }
        }
    }
}
