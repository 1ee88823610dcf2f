//! Liveness and readiness for an orchestrator (Kubernetes, systemd, a load balancer), on a
//! plain HTTP port of their own: no client certificate, nothing in the answers but a status
//! word, so it can be left open to the node while the vendor and admin listeners stay mutual
//! TLS.
//!
//! | | |
//! |---|---|
//! | `GET /livez` | 200 while the process serves requests at all |
//! | `GET /readyz` | 200 while it takes data: listening, not shutting down, its outbox readable; 503 with the reason word otherwise |

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::outbox::Outbox;

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const STOPPING: u8 = 2;

/// Where the gateway is in its life, and what readiness asks of it.
pub struct Probes {
    phase: AtomicU8,
    outbox: Option<Arc<dyn Outbox>>,
    /// A destination whose next due time is read to prove the outbox answers (a cheap,
    /// indexed query, unlike counting the queue).
    probe_destination: String,
}

impl Probes {
    pub fn new(outbox: Option<Arc<dyn Outbox>>, probe_destination: &str) -> Self {
        Self {
            phase: AtomicU8::new(STARTING),
            outbox,
            probe_destination: probe_destination.to_owned(),
        }
    }

    /// The vendor listener is up.
    pub fn serving(&self) {
        self.phase.store(SERVING, Ordering::SeqCst);
    }

    /// Shutdown has begun: take no new work (in-flight requests still finish).
    pub fn stopping(&self) {
        self.phase.store(STOPPING, Ordering::SeqCst);
    }

    /// Ready, or the word that says why not.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        match self.phase.load(Ordering::SeqCst) {
            STARTING => return Err("starting"),
            STOPPING => return Err("shutting down"),
            _ => {}
        }
        if let Some(outbox) = &self.outbox {
            let read = tokio::time::timeout(
                Duration::from_secs(2),
                outbox.next_due(&self.probe_destination),
            )
            .await;
            if !matches!(read, Ok(Ok(_))) {
                tracing::warn!("readiness: the outbox cannot be read");
                return Err("outbox unavailable");
            }
        }
        Ok(())
    }

    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET, "/livez") => (StatusCode::OK, r#"{"status":"alive"}"#.to_owned()),
            (&Method::GET, "/readyz") => match self.readiness().await {
                Ok(()) => (StatusCode::OK, r#"{"status":"ready"}"#.to_owned()),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(r#"{{"status":"not ready","reason":"{why}"}}"#),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                r#"{"status":"no such probe"}"#.to_owned(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Serves the probes on `listener` (plain HTTP/1.1) until `stop` completes.
pub async fn serve(listener: TcpListener, probes: Arc<Probes>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    while let Some((tcp, _, _)) =
        crate::server::next_connection(&listener, None, &mut stop, "probes").await
    {
        let probes = probes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let probes = probes.clone();
                async move { Ok::<_, std::convert::Infallible>(probes.answer(&request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_while_serving() {
        let probes = Probes::new(None, "ehr");
        assert_eq!(probes.readiness().await, Err("starting"));
        probes.serving();
        assert_eq!(probes.readiness().await, Ok(()));
        probes.stopping();
        assert_eq!(probes.readiness().await, Err("shutting down"));
    }
}
