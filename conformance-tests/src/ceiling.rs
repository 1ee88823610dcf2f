//! Ceiling servers for the benchmark: what a server over the gateway's own accept loop (mutual
//! TLS, HTTP/1.1 and HTTP/2 through hyper-util) can answer when it does only part of the
//! gateway's work. The gateway's figures are read as ratios to these, measured in the same run.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use gateway::server::{ServeOptions, serve_mtls};
use gateway::{BoxBody, BoxError};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// How much of the gateway's work a ceiling server does before it answers 202.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CeilingKind {
    /// Reads the body, answers 202.
    Bare,
    /// Also parses the body with serde_json (the build's features: arbitrary precision,
    /// preserved order, as the gateway) and serializes it again.
    Parse,
    /// Also appends the serialized body to a file and answers only after an fsync that it
    /// shares with every request that arrived while the previous fsync ran (group commit).
    Fsync,
}

impl CeilingKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Bare => "ceiling: hyper + rustls, 202",
            Self::Parse => "ceiling: + serde_json parse and serialize",
            Self::Fsync => "ceiling: + shared group-commit fsync",
        }
    }
}

/// Requests waiting for the group-commit thread at most; a full queue waits (back-pressure).
const FSYNC_QUEUE: usize = 4096;

type Durable = (Vec<u8>, oneshot::Sender<std::io::Result<()>>);

/// Appends what queued up while the previous fsync ran, syncs once, answers them all.
fn group_commit(mut file: File, mut queue: mpsc::Receiver<Durable>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while let Ok(next) = queue.try_recv() {
            group.push(next);
        }
        let written = group
            .iter()
            .try_for_each(|(body, _)| file.write_all(body))
            .and_then(|()| file.sync_data());
        for (_, reply) in group {
            let _ = reply.send(match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

fn answer(status: StatusCode, body: &'static str) -> Response<BoxBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    kind: CeilingKind,
    durable: Option<mpsc::Sender<Durable>>,
    request: Request<Incoming>,
) -> Result<Response<BoxBody>, BoxError> {
    let body = request.into_body().collect().await?.to_bytes();
    if kind == CeilingKind::Bare {
        return Ok(answer(StatusCode::ACCEPTED, r#"{"accepted":true}"#));
    }
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(answer(StatusCode::BAD_REQUEST, r#"{"error":"not JSON"}"#));
    };
    let serialized = serde_json::to_vec(&parsed)?;
    if let Some(durable) = durable {
        let (done, synced) = oneshot::channel();
        durable.send((serialized, done)).await?;
        synced.await??;
    }
    Ok(answer(StatusCode::ACCEPTED, r#"{"accepted":true}"#))
}

/// Serves a `kind` ceiling on `addr` until the process ends; `dir` holds the fsync'd file.
pub async fn serve(
    kind: CeilingKind,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    dir: &Path,
    listening: impl FnOnce(SocketAddr),
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    listening(listener.local_addr()?);
    let durable = if kind == CeilingKind::Fsync {
        let file = File::create(dir.join("ceiling.log"))?;
        let (queue, requests) = mpsc::channel(FSYNC_QUEUE);
        std::thread::Builder::new()
            .name("ceiling-fsync".into())
            .spawn(move || group_commit(file, requests))?;
        Some(queue)
    } else {
        None
    };
    let service =
        tower::service_fn(move |request: Request<Incoming>| handle(kind, durable.clone(), request));
    serve_mtls(
        listener,
        gateway::server::fixed_tls(tls),
        service,
        ServeOptions::default(),
        std::future::pending(),
    )
    .await;
    Ok(())
}
