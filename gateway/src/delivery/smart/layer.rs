//! `Authorization: Bearer` on every request to a SMART destination. A 401 means the EHR no
//! longer takes the token (revoked, or expired early): it is renewed once and the request sent
//! again; a 401 to the new token is a configuration error, not something to retry.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{StatusCode, header};
use tower::{Layer, Service, ServiceExt};

use super::{SmartError, TokenSource};
use crate::BoxError;
use crate::delivery::BoxFuture;
use crate::delivery::client::{EhrRequest, EhrResponse};
use crate::delivery::retry::clone_request;

#[derive(Clone)]
pub struct BearerAuthLayer {
    source: Arc<TokenSource>,
}

impl BearerAuthLayer {
    pub fn new(source: Arc<TokenSource>) -> Self {
        Self { source }
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            source: self.source.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    source: Arc<TokenSource>,
}

fn with_token(mut request: EhrRequest, token: &super::AccessToken) -> EhrRequest {
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, token.authorization().clone());
    request
}

impl<S> Service<EhrRequest> for BearerAuth<S>
where
    S: Service<EhrRequest, Response = EhrResponse, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = EhrResponse;
    type Error = BoxError;
    type Future = BoxFuture<Result<EhrResponse, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: EhrRequest) -> Self::Future {
        // The clone that was made ready goes with this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let source = self.source.clone();
        Box::pin(async move {
            let token = source.token().await?;
            let again = clone_request(&request);
            let response = ready.call(with_token(request, &token)).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let Some(again) = again else {
                return Ok(response);
            };
            source.invalidate(&token);
            let token = source.token().await?;
            let response = ready.oneshot(with_token(again, &token)).await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                return Err(SmartError::NotAuthorized.into());
            }
            Ok(response)
        })
    }
}
