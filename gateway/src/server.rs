//! The mutual-TLS accept loop: handshake under a deadline, the peer's identity read once per
//! connection, HTTP/1.1 and HTTP/2 through hyper-util, a connection cap and graceful shutdown.
//!
//! Generic over the request service so that the reference EHR in conformance-tests serves the
//! same way the gateway does.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use crate::peer::PeerIdentity;
use crate::{BoxBody, BoxError};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests may take to finish after shutdown is asked for.
    pub drain_timeout: Duration,
    /// Serve connections that brought no client certificate (their requests carry no
    /// [`PeerIdentity`]). Only a server whose TLS config lets such clients finish the
    /// handshake sees them: the reference EHR taking bearer tokens alone. The gateway's
    /// listeners require certificates and leave this off.
    pub anonymous_clients: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(10),
            anonymous_clients: false,
        }
    }
}

/// The TLS configuration a listener uses for its next handshake: swapped whole when
/// certificates are reloaded, while open connections keep the one they began with.
pub type LiveTls = Arc<arc_swap::ArcSwap<ServerConfig>>;

/// A TLS configuration that never changes (the reference EHR, the benchmark's servers).
pub fn fixed_tls(config: Arc<ServerConfig>) -> LiveTls {
    Arc::new(arc_swap::ArcSwap::new(config))
}

/// The next connection, once a permit of `permits` (the connection cap) is free; `None` once
/// `shutdown` completes. A failed accept (out of file descriptors and the like) is logged and
/// retried after a pause instead of spinning.
pub(crate) async fn next_connection(
    listener: &TcpListener,
    permits: Option<&Arc<Semaphore>>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    what: &'static str,
) -> Option<(
    tokio::net::TcpStream,
    SocketAddr,
    Option<tokio::sync::OwnedSemaphorePermit>,
)> {
    let permit = match permits {
        Some(permits) => tokio::select! {
            _ = &mut *shutdown => return None,
            permit = permits.clone().acquire_owned() => Some(permit.ok()?),
        },
        None => None,
    };
    loop {
        tokio::select! {
            _ = &mut *shutdown => return None,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, remote, permit));
                }
                Err(error) => {
                    tracing::warn!(%error, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then drains.
///
/// Every request carries the connection's [`PeerIdentity`] in its extensions; connections
/// whose handshake fails never reach the service.
pub async fn serve_mtls<S>(
    listener: TcpListener,
    tls: LiveTls,
    service: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http = auto::Builder::new(TokioExecutor::new());
    // Without a timer the header read timeout is silently inactive.
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    http.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections));
    tokio::pin!(shutdown);

    while let Some((tcp, remote, permit)) =
        next_connection(&listener, Some(&permits), &mut shutdown, "HTTPS").await
    {
        let acceptor = TlsAcceptor::from(tls.load_full());
        let service = service.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = options.handshake_timeout;
        let anonymous_clients = options.anonymous_clients;
        tokio::spawn(async move {
            let _permit = permit;
            let Some((tls, peer)) =
                handshake(&acceptor, tcp, remote, handshake_timeout, anonymous_clients).await
            else {
                return;
            };
            let service = service.map_request(move |mut request: Request<Incoming>| {
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                request
            });
            let connection = http
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%remote, error = %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}

pub(crate) async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    timeout: Duration,
    anonymous_clients: bool,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Option<PeerIdentity>,
)> {
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // The reason (no certificate, unknown issuer, expired) is what an integration team
            // needs to fix a vendor's set-up; it names no patient.
            tracing::info!(%remote, %error, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "TLS handshake timed out");
            return None;
        }
    };
    let chain = tls.get_ref().1.peer_certificates();
    if chain.is_none() && anonymous_clients {
        return Some((tls, None));
    }
    match chain.and_then(PeerIdentity::from_chain) {
        Some(peer) => Some((tls, Some(peer))),
        None => {
            tracing::info!(%remote, "client certificate has no readable subject; closing");
            None
        }
    }
}
