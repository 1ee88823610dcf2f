//! When to send a request to an EHR again, and how long to wait first.
//!
//! Retried: 408, 429, 500, 502, 503, 504, timeouts and connection failures, with exponential
//! backoff and jitter (tower's), or after the EHR's `Retry-After` when it gives one. Never
//! retried: other statuses, and TLS failures, which are configuration errors.
//!
//! Retries of one destination share a budget (tower's, with linkerd's defaults: a fifth of
//! the requests of the last 10 s plus 10 a second), so an EHR that fails everything gets
//! about one request per request sent, not `max_attempts` of each.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode, header};
use tower::retry::Policy;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;

use crate::BoxError;
use crate::delivery::client::{EhrRequest, EhrResponse};

/// A `Retry-After` longer than this is not waited out while a vendor waits for the answer;
/// the EHR's value is passed back instead.
pub const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// One per destination; each request works on a clone (its own attempts, the shared budget).
#[derive(Clone)]
pub struct EhrRetryPolicy {
    attempts_left: u32,
    backoff: ExponentialBackoff,
    budget: Arc<TpsBudget>,
    max_attempts: u32,
}

impl EhrRetryPolicy {
    pub fn new(max_attempts: u32) -> Result<Self, tower::retry::backoff::InvalidBackoff> {
        Self::with_budget(
            max_attempts,
            TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        )
    }

    pub fn with_budget(
        max_attempts: u32,
        budget: TpsBudget,
    ) -> Result<Self, tower::retry::backoff::InvalidBackoff> {
        let backoff = ExponentialBackoffMaker::new(
            Duration::from_millis(50),
            Duration::from_secs(2),
            0.5,
            HasherRng::default(),
        )?
        .make_backoff();
        Ok(Self {
            attempts_left: max_attempts,
            backoff,
            budget: Arc::new(budget),
            max_attempts,
        })
    }
}

/// Whether an answer status means "try again later".
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` in seconds (the HTTP-date form is not used by FHIR servers in practice).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The TLS failure in an error's cause chain, if any.
pub fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

/// Why an error is the configuration's fault, if it is: a TLS failure (the EHR refuses our
/// certificate, or we its) or a SMART token refusal. Never retried; the destination pauses.
pub fn configuration_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(tls) = tls_failure(error) {
        return Some(format!("TLS: {tls}"));
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(smart) = e.downcast_ref::<crate::delivery::smart::SmartError>() {
            return smart.is_configuration().then(|| format!("SMART: {smart}"));
        }
        cause = e.source();
    }
    None
}

impl Policy<EhrRequest, EhrResponse, BoxError> for EhrRetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut EhrRequest,
        result: &mut Result<EhrResponse, BoxError>,
    ) -> Option<Self::Future> {
        // Asked after every attempt; after the first, the request pays into the budget.
        if self.attempts_left == self.max_attempts {
            self.budget.deposit();
        }
        if self.attempts_left <= 1 {
            return None;
        }
        let wait = match result {
            Ok(response) if is_retryable_status(response.status()) => {
                match retry_after(response.headers()) {
                    Some(wait) if wait > MAX_INLINE_RETRY_AFTER => return None,
                    Some(wait) => Some(wait),
                    None => None,
                }
            }
            Ok(_) => return None,
            Err(error) if configuration_failure(error.as_ref()).is_some() => return None,
            Err(_) => None,
        };
        if !self.budget.withdraw() {
            return None;
        }
        self.attempts_left -= 1;
        Some(match wait {
            Some(wait) => tokio::time::sleep(wait),
            None => self.backoff.next_backoff(),
        })
    }

    fn clone_request(&mut self, request: &EhrRequest) -> Option<EhrRequest> {
        clone_request(request)
    }
}

/// A copy of a request to send again (http::Request is not Clone, for its extensions; the
/// body is reference-counted bytes).
pub fn clone_request(request: &EhrRequest) -> Option<EhrRequest> {
    let mut clone = http::Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version())
        .body(request.body().clone())
        .ok()?;
    *clone.headers_mut() = request.headers().clone();
    Some(clone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Response;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::{ServiceBuilder, ServiceExt};

    fn request() -> EhrRequest {
        http::Request::post("https://ehr/fhir")
            .body(Bytes::from_static(b"{}").into())
            .unwrap()
    }

    /// A service answering `statuses` in turn, counting calls.
    fn scripted(
        statuses: &'static [(u16, Option<&'static str>)],
    ) -> (
        Arc<AtomicU32>,
        impl tower::Service<EhrRequest, Response = EhrResponse, Error = BoxError, Future = impl Send>
        + Clone,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let svc = tower::service_fn(move |_req: EhrRequest| {
            let n = counter.fetch_add(1, Ordering::SeqCst) as usize;
            let (status, retry_after) = statuses[n.min(statuses.len() - 1)];
            async move {
                let mut response = Response::builder().status(status);
                if let Some(seconds) = retry_after {
                    response = response.header("retry-after", seconds);
                }
                Ok::<_, BoxError>(response.body(Bytes::new()).unwrap())
            }
        });
        (calls, svc)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_unavailable_until_success() {
        let (calls, svc) = scripted(&[(503, None), (429, Some("1")), (201, None)]);
        let svc = ServiceBuilder::new()
            .retry(EhrRetryPolicy::new(3).unwrap())
            .service(svc);
        let response = svc.oneshot(request()).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_max_attempts_and_on_client_errors() {
        let (calls, svc) = scripted(&[(503, None)]);
        let svc = ServiceBuilder::new()
            .retry(EhrRetryPolicy::new(3).unwrap())
            .service(svc);
        assert_eq!(svc.oneshot(request()).await.unwrap().status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let (calls, svc) = scripted(&[(422, None), (201, None)]);
        let svc = ServiceBuilder::new()
            .retry(EhrRetryPolicy::new(3).unwrap())
            .service(svc);
        assert_eq!(svc.oneshot(request()).await.unwrap().status(), 422);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn long_retry_after_is_passed_back_not_waited() {
        let (calls, svc) = scripted(&[(503, Some("120")), (201, None)]);
        let svc = ServiceBuilder::new()
            .retry(EhrRetryPolicy::new(3).unwrap())
            .service(svc);
        assert_eq!(svc.oneshot(request()).await.unwrap().status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_of_a_destination_stop_when_its_budget_is_spent() {
        let (calls, svc) = scripted(&[(503, None)]);
        // A reserve of 2 retries and nothing earned by requests.
        let policy =
            EhrRetryPolicy::with_budget(3, TpsBudget::new(Duration::from_secs(1), 2, 0.0)).unwrap();
        let svc = ServiceBuilder::new().retry(policy).service(svc);
        for _ in 0..5 {
            assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 503);
        }
        // 5 requests and 2 retries, where 3 attempts each would have made 15.
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn finds_tls_failures_in_io_errors() {
        let io = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(tls_failure(&io).is_some());
        assert!(tls_failure(&std::io::Error::other("reset")).is_none());
    }
}
