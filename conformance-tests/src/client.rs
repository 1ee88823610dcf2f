//! An HTTPS client with a client certificate, as a vendor, the gateway or an operator holds.

use std::path::Path;

use bytes::Bytes;
use gateway::BoxError;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Clone)]
pub struct MtlsClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `Authorization` sent with every request (an EHR sandbox's bearer token).
    authorization: Option<http::HeaderValue>,
}

/// An answer, body read in full.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// This answer, if its status is `status`; otherwise panics showing the body (for tests).
    #[track_caller]
    pub fn expect_status(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The `trackingId` of a receipt (panics without one, for tests).
    #[track_caller]
    pub fn tracking_id(&self) -> String {
        self.json()["trackingId"]
            .as_str()
            .expect("a receipt with a trackingId")
            .to_owned()
    }

    /// The `expression` pointers of an OperationOutcome's issues.
    pub fn issue_pointers(&self) -> Vec<String> {
        self.json()["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["expression"][0].as_str().map(str::to_owned))
            .collect()
    }
}

impl MtlsClient {
    /// Trusts `ca` for the server and presents `cert`/`key`; `None` presents no certificate.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, BoxError> {
        gateway::install_crypto_provider();
        let roots = gateway::tls::load_roots(&[ca.to_owned()])?;
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let tls = match identity {
            Some((cert, key)) => builder.with_client_auth_cert(
                gateway::tls::load_certs(cert)?,
                gateway::tls::load_key(key)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(gateway::delivery::client::tcp_connector());
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            authorization: None,
        })
    }

    /// This client, sending `Authorization: Bearer <token>` with every request (marked
    /// sensitive, so it never shows in debug output).
    pub fn with_bearer_token(self, token: &str) -> Result<Self, BoxError> {
        let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))?;
        value.set_sensitive(true);
        Ok(self.with_authorization(value))
    }

    /// This client, sending `authorization` with every request.
    pub fn with_authorization(mut self, authorization: http::HeaderValue) -> Self {
        self.authorization = Some(authorization);
        self
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Answer, BoxError> {
        self.send_with_headers(method, url, content_type, &[], body)
            .await
    }

    /// [`Self::send`] with extra request headers (e.g. `Accept`).
    pub async fn send_with_headers(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, BoxError> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let response = self.client.request(request.body(Full::new(body))?).await?;
        let (parts, body) = response.into_parts();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }

    pub async fn post_json(&self, url: &str, body: &Value) -> Result<Answer, BoxError> {
        self.send(
            Method::POST,
            url,
            Some("application/json"),
            Bytes::from(serde_json::to_vec(body)?),
        )
        .await
    }

    pub async fn get(&self, url: &str) -> Result<Answer, BoxError> {
        self.send(Method::GET, url, None, Bytes::new()).await
    }

    pub async fn delete(&self, url: &str) -> Result<Answer, BoxError> {
        self.send(Method::DELETE, url, None, Bytes::new()).await
    }
}
