//! The tower client stack towards one EHR, outermost first: concurrency limit, retry (each
//! attempt under its own timeout), then hyper over mutual TLS.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use crate::BoxError;
use crate::config::DestinationSettings;
use crate::delivery::retry::EhrRetryPolicy;
use crate::delivery::smart::TokenSource;
use crate::delivery::smart::layer::BearerAuthLayer;
use std::sync::Arc;

/// EHR answers larger than this are cut off (a transaction-response of 500 entries is ~100 kB).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("destination '{0}': {1}")]
    Tls(String, crate::tls::TlsError),
    #[error("destination '{0}': retry backoff: {1}")]
    Backoff(String, String),
    #[error("destination '{0}': {1}")]
    Smart(String, crate::delivery::smart::SmartError),
    #[error(transparent)]
    Oru(#[from] crate::delivery::oru::OruConfigError),
}

/// TCP with Nagle off: a request's headers and body leave at once instead of waiting ~40 ms
/// for the peer's delayed ACK.
pub fn tcp_connector() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(Duration::from_secs(5)));
    tcp
}

/// A request to an EHR and its answer, body read in full.
pub type EhrRequest = Request<Full<Bytes>>;
pub type EhrResponse = Response<Bytes>;

/// The hyper client over (mutual) TLS towards one EHR: its requests and, for a SMART
/// destination, its token requests.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn https_client(settings: &DestinationSettings) -> Result<HttpsClient, ClientError> {
    let identity = settings
        .client_cert
        .as_deref()
        .zip(settings.client_key.as_deref());
    https_client_with(&settings.ca, identity, settings.concurrency)
        .map_err(|e| ClientError::Tls(settings.name.clone(), e))
}

/// A client trusting `ca` for the EHR's certificate and presenting `identity` if given, with
/// up to `idle_connections` kept open.
pub fn https_client_with(
    ca: &[std::path::PathBuf],
    identity: Option<(&std::path::Path, &std::path::Path)>,
    idle_connections: usize,
) -> Result<HttpsClient, crate::tls::TlsError> {
    let tls = crate::tls::client_config(ca, identity)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        // HTTP/1.1 only: under TLS 1.3 an EHR refuses our client certificate after the
        // handshake, and over HTTP/2 that alert is swallowed by the connection task (the
        // request sees a broken pipe, which looks transient and would be retried). Over
        // HTTP/1.1 the request itself reads the alert and is classified as configuration.
        .enable_http1()
        .wrap_connector(tcp_connector());
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(idle_connections)
        .build::<_, Full<Bytes>>(https))
}

/// Sends `request` and reads the answer in full (up to [`MAX_RESPONSE_BYTES`]).
pub async fn fetch(client: &HttpsClient, request: EhrRequest) -> Result<EhrResponse, BoxError> {
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// A cloneable handle on one destination's client stack; clones share the connection pool
/// and the concurrency limit.
#[derive(Clone)]
pub struct EhrClient {
    service: BoxCloneSyncService<EhrRequest, EhrResponse, BoxError>,
    /// SMART destinations: where their bearer tokens come from.
    tokens: Option<Arc<TokenSource>>,
    /// The bare connection pool, for what goes around the stack (the CapabilityStatement).
    http: HttpsClient,
}

impl EhrClient {
    pub fn new(settings: &DestinationSettings) -> Result<Self, ClientError> {
        let hyper_client = https_client(settings)?;
        let tokens = settings
            .smart
            .as_ref()
            .map(|smart| {
                TokenSource::new(
                    &settings.name,
                    &settings.base_url,
                    smart,
                    hyper_client.clone(),
                    settings.timeout,
                )
                .map(Arc::new)
            })
            .transpose()
            .map_err(|e| ClientError::Smart(settings.name.clone(), e))?;
        let http = hyper_client.clone();
        let destination = settings.name.clone();
        // Each request's round trip and status class, retries and token requests apart.
        let send = tower::service_fn(move |request: EhrRequest| {
            let hyper_client = hyper_client.clone();
            let destination = destination.clone();
            async move {
                let started = std::time::Instant::now();
                let answer = fetch(&hyper_client, request).await;
                let metrics = crate::metrics::metrics();
                let status = answer.as_ref().ok().map(|r| r.status());
                metrics
                    .delivery_requests
                    .get_or_create(&crate::metrics::DestinationStatus {
                        destination: destination.clone(),
                        status: crate::metrics::status_class(status),
                    })
                    .inc();
                metrics
                    .delivery_seconds
                    .get_or_create(&crate::metrics::DestinationLabel { destination })
                    .observe(started.elapsed().as_secs_f64());
                answer
            }
        });
        Ok(Self {
            service: client_stack(send, settings, tokens.clone())?,
            tokens,
            http,
        })
    }

    pub async fn send(&self, request: EhrRequest) -> Result<EhrResponse, BoxError> {
        self.service.clone().oneshot(request).await
    }

    /// The connection pool without the stack's layers (no retries, no token).
    pub fn http(&self) -> &HttpsClient {
        &self.http
    }

    /// The token state of a SMART destination, for the admin API.
    pub fn tokens(&self) -> Option<&Arc<TokenSource>> {
        self.tokens.as_ref()
    }
}

/// The layers around the HTTP client, outermost first (Vector's order): rate limit (optional,
/// behind a buffer so the handle stays cloneable), concurrency limit, retry, per-attempt
/// timeout, bearer token (SMART destinations).
pub fn client_stack<S>(
    send: S,
    settings: &DestinationSettings,
    tokens: Option<Arc<TokenSource>>,
) -> Result<BoxCloneSyncService<EhrRequest, EhrResponse, BoxError>, ClientError>
where
    S: tower::Service<EhrRequest, Response = EhrResponse, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let retry = EhrRetryPolicy::new(settings.max_attempts)
        .map_err(|e| ClientError::Backoff(settings.name.clone(), e.to_string()))?;
    let inner = ServiceBuilder::new()
        .concurrency_limit(settings.concurrency)
        .retry(retry)
        .timeout(settings.timeout)
        .option_layer(tokens.map(BearerAuthLayer::new))
        .service(send);
    Ok(match settings.rate_limit {
        Some(per_second) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .buffer(1024)
                .rate_limit(u64::from(per_second.get()), Duration::from_secs(1))
                .service(inner),
        ),
        None => BoxCloneSyncService::new(inner),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn settings(rate_limit: Option<u32>) -> DestinationSettings {
        let text = format!(
            "name = \"ehr\"\nbase_url = \"https://ehr/fhir\"\nca = [\"ca.pem\"]\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n{}",
            rate_limit
                .map(|n| format!("rate_limit = {n}\n"))
                .unwrap_or_default()
        );
        toml::from_str(&text).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spreads_requests_over_time() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let send = tower::service_fn(move |_req: EhrRequest| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(Bytes::new())) }
        });
        let client = client_stack(send, &settings(Some(2)), None).unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..5 {
            let request = http::Request::post("https://ehr/fhir")
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.clone().oneshot(request).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        // 2 per second: the fifth request goes out in the third second.
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
