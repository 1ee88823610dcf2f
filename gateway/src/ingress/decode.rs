//! Decoding: the body is read (within the size limit) and parsed as JSON, or as the ingest XML
//! format (`application/xml`, see [`super::xml_ingest`]) into the same JSON. Unparseable bodies
//! get 400 with the line and column; other media types get 415.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::filter::{AsyncFilterLayer, AsyncPredicate};

use std::sync::Arc;

use super::xml_ingest::{self, IngestDocument};
use crate::BoxError;
use crate::outcome::{ApiError, Issue};

/// Decodes the body of one endpoint, which takes `document` when it comes as XML.
#[derive(Clone, Copy)]
pub struct DecodeBody {
    document: IngestDocument,
}

pub fn layer(document: IngestDocument) -> AsyncFilterLayer<DecodeBody> {
    AsyncFilterLayer::new(DecodeBody { document })
}

/// The body's format, by Content-Type (JSON when none is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Xml,
}

impl<B> AsyncPredicate<Request<B>> for DecodeBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Future = Pin<Box<dyn Future<Output = Result<Request<Value>, BoxError>> + Send>>;
    type Request = Request<Value>;

    fn check(&mut self, request: Request<B>) -> Self::Future {
        let document = self.document;
        Box::pin(async move {
            let format = match request.headers().get(header::CONTENT_TYPE) {
                None => Format::Json,
                Some(content_type) if is_json(content_type.as_bytes()) => Format::Json,
                Some(content_type) if is_xml(content_type.as_bytes()) => Format::Xml,
                Some(_) => {
                    return Err(ApiError::one(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        Issue::error(
                            "not-supported",
                            "the body must be JSON or XML: send Content-Type: application/json or application/xml",
                        ),
                    )
                    .into());
                }
            };
            let (parts, body) = request.into_parts();
            let bytes = read_body(body).await?;
            if format == Format::Xml {
                let (value, positions) = xml_ingest::parse(&bytes, document).map_err(|e| {
                    ApiError::one(
                        StatusCode::BAD_REQUEST,
                        Issue::error(
                            "structure",
                            format!("the body is not valid ingest XML: {}", e.reason),
                        )
                        .located(e.line, e.column)
                        .at("/"),
                    )
                })?;
                let mut request = Request::from_parts(parts, value);
                request.extensions_mut().insert(Arc::new(positions));
                return Ok(request);
            }
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::one(
                    StatusCode::BAD_REQUEST,
                    Issue::error(
                        "structure",
                        format!(
                            "the body is not valid JSON: {} (line {}, column {})",
                            describe(&e),
                            e.line(),
                            e.column()
                        ),
                    )
                    .at("/"),
                )
            })?;
            Ok(Request::from_parts(parts, value))
        })
    }
}

/// The whole body, within the size limit (over it: 413).
pub(crate) async fn read_body<B>(body: B) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Ok(body
        .collect()
        .await
        .map_err(|e| -> BoxError {
            let e: BoxError = e.into();
            if super::rescue::is_body_too_large(e.as_ref()) {
                super::rescue::too_large().into()
            } else {
                // The client broke off (or its connection did): its fault, not the
                // gateway's, and nobody is left to read a 500.
                tracing::debug!(error = %e, "request body broke off");
                ApiError::one(
                    StatusCode::BAD_REQUEST,
                    Issue::error(
                        "incomplete",
                        "the request body could not be read to its end (the connection closed or broke); nothing was accepted",
                    ),
                )
                .into()
            }
        })?
        .to_bytes())
}

/// A media type without its parameters, lower-cased.
fn essence(content_type: &[u8]) -> Vec<u8> {
    content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
        .to_ascii_lowercase()
}

/// `application/json`, `application/fhir+json` or any `+json` type, parameters ignored.
pub(crate) fn is_json(content_type: &[u8]) -> bool {
    let essence = essence(content_type);
    essence == b"application/json"
        || (essence.starts_with(b"application/") && essence.ends_with(b"+json"))
}

/// `application/xml`, `text/xml` or any `+xml` type, parameters ignored.
pub(crate) fn is_xml(content_type: &[u8]) -> bool {
    let essence = essence(content_type);
    essence == b"application/xml"
        || essence == b"text/xml"
        || (essence.starts_with(b"application/") && essence.ends_with(b"+xml"))
}

/// serde_json's message without its own " at line L column C" suffix.
fn describe(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    async fn decode(
        content_type: Option<&str>,
        body: &'static str,
    ) -> Result<Request<Value>, BoxError> {
        let mut request = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
        if let Some(ct) = content_type {
            request
                .headers_mut()
                .insert(header::CONTENT_TYPE, ct.parse().unwrap());
        }
        DecodeBody {
            document: IngestDocument::ObservationBatch,
        }
        .check(request)
        .await
    }

    fn status(error: BoxError) -> StatusCode {
        error.downcast_ref::<ApiError>().unwrap().status
    }

    #[tokio::test]
    async fn parses_json_bodies() {
        let request = decode(Some("application/json; charset=utf-8"), r#"{"a": 1.50}"#)
            .await
            .unwrap();
        assert_eq!(request.body()["a"].to_string(), "1.50");
        assert!(decode(None, "{}").await.is_ok());
        assert!(decode(Some("application/fhir+json"), "{}").await.is_ok());
    }

    #[tokio::test]
    async fn malformed_json_is_400_with_position() {
        let error = decode(Some("application/json"), "{\n \"a\": }")
            .await
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::BAD_REQUEST);
        assert!(
            api.issues[0].details.contains("line 2"),
            "{}",
            api.issues[0].details
        );
    }

    #[tokio::test]
    async fn other_media_types_are_415() {
        let error = decode(Some("text/csv"), "Flow,4.2").await.unwrap_err();
        assert_eq!(status(error), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn xml_bodies_become_the_same_json_with_positions() {
        let request = decode(
            Some("application/xml; charset=utf-8"),
            "<observationBatch><device serial=\"CH-1\" model=\"M\"/></observationBatch>",
        )
        .await
        .unwrap();
        assert_eq!(request.body()["device"]["serial"], "CH-1");
        assert!(
            request
                .extensions()
                .get::<Arc<xml_ingest::XmlPositions>>()
                .is_some()
        );
        let error = decode(Some("text/xml"), "<observationBatch>\n<device>")
            .await
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::BAD_REQUEST);
        assert!(api.issues[0].location.is_some(), "{:?}", api.issues);
    }

    /// A body that breaks off after its first bytes, as a client that goes away leaves it.
    struct BrokenBody(bool);

    impl Body for BrokenBody {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            let first = !std::mem::replace(&mut self.0, true);
            std::task::Poll::Ready(Some(if first {
                Ok(http_body::Frame::data(Bytes::from_static(b"{\"device\"")))
            } else {
                Err(std::io::ErrorKind::ConnectionReset.into())
            }))
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_400_not_500() {
        let error = read_body(BrokenBody(false)).await.unwrap_err();
        let api = error.downcast_ref::<ApiError>().expect("a typed refusal");
        assert_eq!(api.status, StatusCode::BAD_REQUEST);
        assert_eq!(api.issues[0].code, "incomplete");
    }

    #[tokio::test]
    async fn oversized_bodies_are_413() {
        let body =
            http_body_util::Limited::new(Full::new(Bytes::from_static(b"{\"a\": 12345}")), 4);
        let error = DecodeBody {
            document: IngestDocument::ObservationBatch,
        }
        .check(Request::new(body))
        .await
        .unwrap_err();
        assert_eq!(status(error), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
