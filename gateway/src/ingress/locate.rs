//! For XML bodies, every issue of a refusal also gets the line and column of the element it
//! concerns (`issue.location`), next to the JSON pointer (`issue.expression`) that the JSON and
//! XML APIs share.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use serde_json::Value;
use tower::{Layer, Service};

use super::xml_ingest::XmlPositions;
use crate::BoxError;
use crate::outcome::ApiError;

#[derive(Clone, Copy, Default)]
pub struct LocateLayer;

pub fn layer() -> LocateLayer {
    LocateLayer
}

impl<S> Layer<S> for LocateLayer {
    type Service = Locate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Locate { inner }
    }
}

#[derive(Clone)]
pub struct Locate<S> {
    inner: S,
}

impl<S> Service<Request<Value>> for Locate<S>
where
    S: Service<Request<Value>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Value>) -> Self::Future {
        let positions = request.extensions().get::<Arc<XmlPositions>>().cloned();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            match (result, positions) {
                (Err(error), Some(positions)) => Err(locate(error, &positions)),
                (result, _) => result,
            }
        })
    }
}

fn locate(error: BoxError, positions: &XmlPositions) -> BoxError {
    match error.downcast::<ApiError>() {
        Ok(mut api) => {
            for issue in &mut api.issues {
                if issue.location.is_none()
                    && let Some(pointer) = issue.expression.as_deref()
                    && pointer.starts_with('/')
                    && let Some((line, column)) = positions.find(pointer)
                {
                    issue.location = Some(format!("line {line}, column {column}"));
                }
            }
            api
        }
        Err(other) => other,
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::ingress::xml_ingest::{IngestDocument, parse};
    use crate::outcome::Issue;

    #[tokio::test]
    async fn refusals_of_xml_bodies_say_where() {
        let (value, positions) = parse(
            &bytes::Bytes::from_static(
                b"<observationBatch>\n  <device serial=\"CH 1\" model=\"M\"/>\n</observationBatch>",
            ),
            IngestDocument::ObservationBatch,
        )
        .unwrap();
        let mut request = Request::new(value);
        request.extensions_mut().insert(Arc::new(positions));
        let inner = tower::service_fn(|_: Request<Value>| async {
            Err::<(), BoxError>(
                ApiError::one(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Issue::error("invalid", "bad serial").at("/device/serial"),
                )
                .into(),
            )
        });
        let error = LocateLayer.layer(inner).oneshot(request).await.unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.issues[0].location.as_deref(), Some("line 2, column 3"));
    }
}
