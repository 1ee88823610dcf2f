//! The admin API from the command line (`gateway deliveries ...`), over mutual TLS.

use std::path::Path;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::BoxError;

/// Sends one request to the admin API; returns the status and the body as text.
pub async fn call(
    base_url: &str,
    method: Method,
    path: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(u16, String), BoxError> {
    let tls = crate::tls::client_config(&[ca.to_owned()], Some((cert, key)))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(crate::delivery::client::tcp_connector());
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let uri = format!("{}{path}", base_url.trim_end_matches('/'));
    let response = client
        .request(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
