//! The request path, assembled in one place. Read it top to bottom: that is the order a request
//! meets each layer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use mappings::Mappings;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::delivery::Handoff;
use crate::ingress::client_identity::Vendors;
use crate::ingress::handoff::HandoffService;
use crate::ingress::router::Router;
use crate::ingress::xml_ingest::IngestDocument;
use crate::ingress::{
    authorize, client_identity, conformance, decode, fhir_native, locate, map, negotiate, rescue,
    run_events, validate,
};
use crate::runs::RunRegistry;
use crate::validation::Schemas;
use crate::{BoxBody, BoxError};

/// The knobs of the request path (from `[server]` and `[readings]` in the config).
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub max_future_skew: Duration,
}

/// Builds the stack once; the accept loop clones it per connection, and every clone shares
/// the concurrency limit.
pub fn build_stack<B>(
    settings: IngressSettings,
    vendors: Vendors,
    mappings: Arc<Mappings>,
    schemas: Schemas,
    runs: Arc<RunRegistry>,
    conformance_rules: Arc<conformance::ConformanceRules>,
    handoff: Arc<dyn Handoff>,
) -> impl Service<Request<B>, Response = Response<BoxBody>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + std::error::Error + Send + Sync + 'static,
{
    // POST /v1/observations, after routing.
    let observations = ServiceBuilder::new()
        .layer(decode::layer(IngestDocument::ObservationBatch))
        .layer(locate::layer())
        .layer(authorize::layer())
        .layer(validate::layer(schemas.clone(), "observation-batch"))
        .layer(map::layer(
            mappings.clone(),
            runs.clone(),
            settings.max_future_skew,
        ))
        .layer(conformance::layer(conformance_rules.clone()))
        .service(HandoffService::new(handoff.clone()));

    // POST /v1/fhir/Observation and /v1/fhir/Bundle, after routing.
    let fhir_observations = ServiceBuilder::new()
        .layer(fhir_native::layer(
            mappings.clone(),
            runs.clone(),
            conformance_rules.clone(),
            settings.max_future_skew,
        ))
        .service(HandoffService::new(handoff.clone()));

    // POST /v1/runs/{run-id}/events, after routing.
    let run_events = ServiceBuilder::new()
        .layer(decode::layer(IngestDocument::RunEvent))
        .layer(locate::layer())
        .layer(validate::layer(schemas.clone(), "run-event"))
        .layer(run_events::layer(runs))
        .layer(conformance::layer(conformance_rules))
        .service(HandoffService::new(handoff));

    ServiceBuilder::new()
        .map_response(box_body)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::x_request_id())
        // Outside the rescue, so that refusals are negotiated too.
        .layer(negotiate::layer())
        // Inside tracing, so that a refusal is traced as the 4xx it is, not as a failure.
        .map_result(rescue::rescue)
        .map_response(|response: Response<_>| rescue::outcome_for_bare_413(box_body(response)))
        .layer(RequestBodyLimitLayer::new(settings.max_body_bytes))
        .timeout(settings.request_timeout)
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(
            settings.max_concurrent_requests,
        ))
        .layer(client_identity::layer(vendors))
        .service(Router::new(
            BoxCloneSyncService::new(observations),
            BoxCloneSyncService::new(run_events),
            BoxCloneSyncService::new(fhir_observations),
            schemas,
        ))
}

fn box_body<D>(response: Response<D>) -> Response<BoxBody>
where
    D: Body<Data = Bytes> + Send + Sync + 'static,
    D::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::Full;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::config::VendorSettings;
    use crate::delivery::{BoxFuture, DeliveryError, OutboundBatch, Receipt};
    use crate::peer::PeerIdentity;

    /// Records what it is handed, after an optional delay.
    #[derive(Default)]
    struct Recorder {
        delay: Duration,
        received: Mutex<Vec<usize>>,
    }

    impl Handoff for Arc<Recorder> {
        fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
            let recorder = self.clone();
            Box::pin(async move {
                tokio::time::sleep(recorder.delay).await;
                recorder
                    .received
                    .lock()
                    .unwrap()
                    .push(batch.resources.len());
                Ok(Receipt::Delivered {
                    destinations: vec![],
                })
            })
        }
    }

    fn stack(
        recorder: Arc<Recorder>,
        max_concurrent_requests: usize,
        request_timeout: Duration,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        let settings = IngressSettings {
            request_timeout,
            max_body_bytes: 4096,
            max_concurrent_requests,
            max_future_skew: Duration::from_secs(300),
        };
        let vendors = Vendors::new(&[VendorSettings {
            name: "getinge".into(),
            identity: "getinge".into(),
            serials: vec![],
            models: vec!["CARDIOHELP-i".into()],
        }]);
        let mappings = Arc::new(Mappings::embedded().unwrap());
        // The registry's file outlives the test process' interest in it: a temp dir per stack.
        let dir = tempfile::tempdir().unwrap().keep();
        let runs = RunRegistry::open(&dir.join("runs.sqlite"), mappings.clone()).unwrap();
        build_stack(
            settings,
            vendors,
            mappings,
            Schemas::embedded().unwrap(),
            runs,
            Arc::new(conformance::ConformanceRules::embedded().unwrap()),
            Arc::new(recorder),
        )
    }

    fn post(body: Vec<u8>, peer: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::post("/v1/observations")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        if let Some(name) = peer {
            request.extensions_mut().insert(PeerIdentity {
                names: vec![name.to_owned()].into(),
            });
        }
        request
    }

    fn batch() -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        serde_json::to_vec(&json!({
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
            "readings": [{"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": now}]
        }))
        .unwrap()
    }

    async fn outcome(response: Response<BoxBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn delivers_and_tags_the_request_id() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(*recorder.received.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_request_without_a_vendor_is_refused_before_decoding() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(b"not even json".to_vec(), None))
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        assert!(
            response.headers().contains_key("x-request-id"),
            "refusals carry the id too"
        );
        assert!(recorder.received.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_load_beyond_the_concurrency_limit() {
        let recorder = Arc::new(Recorder {
            delay: Duration::from_secs(1),
            ..Recorder::default()
        });
        let svc = stack(recorder.clone(), 1, Duration::from_secs(5));
        let first = tokio::spawn(svc.clone().oneshot(post(batch(), Some("getinge"))));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let shed = svc
            .clone()
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        assert_eq!(outcome(shed).await["issue"][0]["code"], "throttled");
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_requests_time_out_with_an_outcome() {
        let recorder = Arc::new(Recorder {
            delay: Duration::from_secs(60),
            ..Recorder::default()
        });
        let response = stack(recorder.clone(), 8, Duration::from_secs(1))
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(outcome(response).await["issue"][0]["code"], "timeout");
    }

    #[tokio::test]
    async fn oversized_bodies_get_413_as_an_outcome() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(vec![b' '; 5000], Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(
            response.headers()["content-type"],
            crate::outcome::FHIR_JSON
        );
        assert_eq!(outcome(response).await["issue"][0]["code"], "too-long");
    }
}
