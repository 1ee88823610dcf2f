//! Content negotiation, FHIR style: `_format` in the query (json, xml, or a media type) wins
//! over `Accept`; FHIR resources the gateway answers with (OperationOutcome,
//! CapabilityStatement) are then written as `application/fhir+xml` or `application/fhir+json`.
//! An `Accept` that allows neither gets 406. Other bodies (schemas, receipts) are JSON.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::outcome::{ApiError, FHIR_JSON, Issue};
use crate::{BoxBody, BoxError, full_body};

pub const FHIR_XML: &str = "application/fhir+xml";

/// What the client wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Json,
    Xml,
    /// Nothing we can write (406).
    Neither,
}

/// `_format` first, then `Accept` (by q-value, first listed wins ties), JSON by default.
pub fn wanted<B>(request: &Request<B>) -> Wanted {
    if let Some(format) = request.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "_format")
            .map(|(_, v)| v.to_owned())
    }) {
        let format = percent_encoding::percent_decode_str(&format)
            .decode_utf8_lossy()
            .to_ascii_lowercase();
        return match media_kind(format.trim()) {
            Some(kind) => kind,
            None => Wanted::Neither,
        };
    }
    let Some(accept) = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
    else {
        return Wanted::Json;
    };
    let mut best: Option<(f32, Wanted)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let kind = match media.as_str() {
            "*/*" | "application/*" => Some(Wanted::Json),
            m => media_kind(m),
        };
        if let Some(kind) = kind
            && q > 0.0
            && best.is_none_or(|(bq, _)| q > bq)
        {
            best = Some((q, kind));
        }
    }
    best.map_or(Wanted::Neither, |(_, kind)| kind)
}

fn media_kind(media: &str) -> Option<Wanted> {
    match media {
        "json" | "application/json" | "application/fhir+json" | "text/json" => Some(Wanted::Json),
        "xml" | "application/xml" | "application/fhir+xml" | "text/xml" => Some(Wanted::Xml),
        _ => None,
    }
}

#[derive(Clone, Copy, Default)]
pub struct NegotiateLayer;

pub fn layer() -> NegotiateLayer {
    NegotiateLayer
}

impl<S> Layer<S> for NegotiateLayer {
    type Service = Negotiate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Negotiate { inner }
    }
}

#[derive(Clone)]
pub struct Negotiate<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Negotiate<S>
where
    S: Service<Request<B>, Response = Response<BoxBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let wanted = wanted(&request);
        if wanted == Wanted::Neither {
            let refusal = ApiError::one(
                StatusCode::NOT_ACCEPTABLE,
                Issue::error(
                    "not-supported",
                    "the gateway answers in application/fhir+json or application/fhir+xml (Accept or _format)",
                ),
            );
            return Box::pin(async move { Ok(refusal.into_response()) });
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            if wanted == Wanted::Json || !is_fhir_json(&response) {
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            let json = body.collect().await?.to_bytes();
            let bytes = match mappings::resource_to_xml(&json) {
                Ok(xml) => {
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_XML));
                    parts.headers.remove(header::CONTENT_LENGTH);
                    let mut out = Vec::with_capacity(xml.len() + 40);
                    out.extend_from_slice(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
                    out.extend_from_slice(&xml);
                    Bytes::from(out)
                }
                // Not one of ours to convert: left as the JSON it is.
                Err(_) => json,
            };
            Ok(Response::from_parts(parts, full_body(bytes)))
        })
    }
}

fn is_fhir_json(response: &Response<BoxBody>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes() == FHIR_JSON.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, accept: Option<&str>) -> Request<()> {
        let mut r = Request::get(uri);
        if let Some(a) = accept {
            r = r.header(header::ACCEPT, a);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn format_parameter_wins_over_accept() {
        assert_eq!(wanted(&request("/metadata", None)), Wanted::Json);
        assert_eq!(
            wanted(&request(
                "/metadata?_format=xml",
                Some("application/fhir+json")
            )),
            Wanted::Xml
        );
        assert_eq!(
            wanted(&request("/metadata?_format=application%2Ffhir%2Bxml", None)),
            Wanted::Xml
        );
        assert_eq!(
            wanted(&request("/metadata?_format=json", Some("application/xml"))),
            Wanted::Json
        );
        assert_eq!(
            wanted(&request("/metadata?_format=csv", None)),
            Wanted::Neither
        );
    }

    #[test]
    fn accept_by_quality() {
        let w = |a| wanted(&request("/", Some(a)));
        assert_eq!(w("application/fhir+xml"), Wanted::Xml);
        assert_eq!(
            w("application/fhir+json;q=0.5, application/fhir+xml"),
            Wanted::Xml
        );
        assert_eq!(w("application/xml;q=0.4, */*;q=0.8"), Wanted::Json);
        assert_eq!(w("text/html, */*"), Wanted::Json);
        assert_eq!(w("text/html"), Wanted::Neither);
        assert_eq!(w("application/fhir+xml;q=0"), Wanted::Neither);
    }
}
