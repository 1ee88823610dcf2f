//! Fair admission: each vendor may hold at most its share of the requests in progress, so one
//! busy or misbehaving vendor (a console in a resend loop, a backfill) cannot take every slot of
//! the gateway's request limit and starve the consoles of other vendors. A request beyond its
//! vendor's share is refused at once with 503 and Retry-After; nothing of it is stored.
//!
//! It sits inside the global limit and after the client identity, so the vendor is known and a
//! refused request gives its global slot back at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, StatusCode};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::BoxError;
use crate::delivery::BoxFuture;
use crate::ingress::client_identity::VendorPolicy;
use crate::outcome::{ApiError, Issue};

/// Seconds a vendor over its share is told to wait.
const RETRY_AFTER_OVER_SHARE: u32 = 1;

/// The requests in progress per vendor name, each bounded by the same share.
#[derive(Clone)]
pub struct VendorShares {
    share: usize,
    // One entry per configured vendor: the map is as bounded as the vendor list.
    in_progress: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl VendorShares {
    pub fn new(share: usize) -> Self {
        VendorShares {
            share: share.max(1),
            in_progress: Arc::default(),
        }
    }

    fn of(&self, vendor: &str) -> Arc<Semaphore> {
        let mut map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(semaphore) = map.get(vendor) {
            return semaphore.clone();
        }
        let semaphore = Arc::new(Semaphore::new(self.share));
        map.insert(vendor.to_owned(), semaphore.clone());
        semaphore
    }
}

pub fn layer(share: usize) -> VendorShareLayer {
    VendorShares::new(share).layer()
}

impl VendorShares {
    /// A layer counting against these shares (several listeners may share them).
    pub fn layer(&self) -> VendorShareLayer {
        VendorShareLayer {
            shares: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct VendorShareLayer {
    shares: VendorShares,
}

impl<S> Layer<S> for VendorShareLayer {
    type Service = VendorShare<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VendorShare {
            inner,
            shares: self.shares.clone(),
        }
    }
}

#[derive(Clone)]
pub struct VendorShare<S> {
    inner: S,
    shares: VendorShares,
}

impl<S, B> Service<Request<B>> for VendorShare<S>
where
    S: Service<Request<B>, Error = BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The identity layer before this one refuses a request without a vendor.
        let Some(vendor) = request.extensions().get::<Arc<VendorPolicy>>() else {
            return Box::pin(std::future::ready(Err(over_share())));
        };
        let Ok(permit) = self.shares.of(&vendor.name).try_acquire_owned() else {
            tracing::debug!(vendor = %vendor.name, "request refused: vendor at its share of the request limit");
            return Box::pin(std::future::ready(Err(over_share())));
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let answer = response.await;
            drop(permit);
            answer
        })
    }
}

fn over_share() -> BoxError {
    ApiError::one(
        StatusCode::SERVICE_UNAVAILABLE,
        Issue::error(
            "throttled",
            "this vendor has its full share of the gateway's requests in progress; retry shortly",
        ),
    )
    .retry_after(RETRY_AFTER_OVER_SHARE)
    .into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    fn vendor(name: &str) -> Arc<VendorPolicy> {
        Arc::new(VendorPolicy::of_models(name, &[]))
    }

    fn request(vendor: &Arc<VendorPolicy>) -> Request<()> {
        let mut request = Request::new(());
        request.extensions_mut().insert(vendor.clone());
        request
    }

    #[tokio::test]
    async fn a_vendor_over_its_share_is_refused_and_others_still_get_in() {
        // The inner service holds each request until told to finish it.
        let (release, held) = tokio::sync::watch::channel(false);
        let inner = tower::service_fn(move |_: Request<()>| {
            let mut held = held.clone();
            async move {
                held.wait_for(|done| *done).await.ok();
                Ok::<_, BoxError>("done")
            }
        });
        let service = layer(2).layer(inner);
        let busy = vendor("busy");
        let other = vendor("other");

        let first = tokio::spawn(service.clone().oneshot(request(&busy)));
        let second = tokio::spawn(service.clone().oneshot(request(&busy)));
        while service.shares.of("busy").available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Both are in progress: a third of the same vendor is refused at once.
        let refused = service.clone().oneshot(request(&busy)).await.unwrap_err();
        let api = refused.downcast_ref::<ApiError>().expect("a typed refusal");
        let response = api.clone().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");

        // Another vendor is not held back by the busy one: its request is admitted.
        let for_other = tokio::spawn(service.clone().oneshot(request(&other)));
        while service.shares.of("other").available_permits() == 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(service.shares.of("busy").available_permits(), 0);
        release.send(true).unwrap();
        assert_eq!(for_other.await.unwrap().unwrap(), "done");
        assert_eq!(first.await.unwrap().unwrap(), "done");
        assert_eq!(second.await.unwrap().unwrap(), "done");

        // Finished requests give their places back.
        assert_eq!(service.oneshot(request(&busy)).await.unwrap(), "done");
    }

    #[tokio::test]
    async fn a_request_without_a_vendor_is_refused() {
        let inner = tower::service_fn(|_: Request<()>| async { Ok::<_, BoxError>("done") });
        let refused = layer(1)
            .layer(inner)
            .oneshot(Request::new(()))
            .await
            .unwrap_err();
        assert!(refused.is::<ApiError>());
    }
}
