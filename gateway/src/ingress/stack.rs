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
use crate::ingress::{authorize, client_identity, decode, map, rescue, validate};
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
        .layer(decode::layer())
        .layer(authorize::layer())
        .layer(validate::layer(schemas.clone(), "observation-batch"))
        .layer(map::layer(mappings, settings.max_future_skew))
        .service(HandoffService::new(handoff));

    ServiceBuilder::new()
        .map_response(box_body)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::x_request_id())
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
        .service(Router::new(BoxCloneSyncService::new(observations), schemas))
}

fn box_body<D>(response: Response<D>) -> Response<BoxBody>
where
    D: Body<Data = Bytes> + Send + Sync + 'static,
    D::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed())
}
