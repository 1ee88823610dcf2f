//! Counts every vendor request by route and status and times it (see `crate::metrics`).
//! Outside the rescue, so a refusal counts as the 4xx the vendor got.

use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tower::{Layer, Service};

use crate::delivery::BoxFuture;
use crate::metrics::{Route, RouteStatus, metrics};

/// The route of a path, as metrics and logs name it: never the path itself, which names a run.
pub fn route_of(path: &str) -> &'static str {
    if path.starts_with("/v1/runs/") {
        return "/v1/runs/{run-id}/events";
    }
    if path.starts_with("/v1/schemas/") {
        return "/v1/schemas/{name}";
    }
    match path {
        "/v1/observations" => "/v1/observations",
        "/v1/observations/entered-in-error" => "/v1/observations/entered-in-error",
        "/v1/fhir/Observation" => "/v1/fhir/Observation",
        "/v1/fhir/Bundle" => "/v1/fhir/Bundle",
        "/metadata" => "/metadata",
        _ => "(other)",
    }
}

#[derive(Clone, Copy, Default)]
pub struct RecordLayer;

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Record<S> {
        Record { inner }
    }
}

#[derive(Clone)]
pub struct Record<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for Record<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let route = route_of(request.uri().path());
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            if let Ok(response) = &result {
                let status = response.status().as_u16();
                metrics()
                    .requests
                    .get_or_create(&RouteStatus { route, status })
                    .inc();
            }
            metrics()
                .request_seconds
                .get_or_create(&Route { route })
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_never_carry_a_run_id() {
        assert_eq!(
            route_of("/v1/runs/RUN-77/events"),
            "/v1/runs/{run-id}/events"
        );
        assert_eq!(route_of("/v1/observations"), "/v1/observations");
        assert_eq!(route_of("/v1/anything/else"), "(other)");
    }
}
