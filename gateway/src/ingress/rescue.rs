//! The one place where errors become answers: typed errors from any layer are recovered from
//! the boxed error and turned into a status and an OperationOutcome. Nothing else in the stack
//! formats an error response.

use http::{Response, StatusCode};
use tower::load_shed::error::Overloaded;
use tower::timeout::error::Elapsed;

use crate::outcome::{ApiError, Issue};
use crate::{BoxBody, BoxError};

/// Seconds a shed request is told to wait before trying again.
const RETRY_AFTER_OVERLOADED: u32 = 1;

pub fn rescue(result: Result<Response<BoxBody>, BoxError>) -> Result<Response<BoxBody>, BoxError> {
    match result {
        Ok(response) => Ok(response),
        Err(error) => Ok(refusal_of(error).into_response()),
    }
}

/// The status and issues an error of the request path answers with (the HTTP answer above,
/// and the HL7 v2 ACK).
pub fn refusal_of(error: BoxError) -> ApiError {
    if let Some(api) = error.downcast_ref::<ApiError>() {
        api.clone()
    } else if error.is::<Overloaded>() {
        ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "throttled",
                "the gateway is at its request limit; retry shortly",
            ),
        )
        .retry_after(RETRY_AFTER_OVERLOADED)
    } else if error.is::<Elapsed>() {
        ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "timeout",
                "the request took longer than the gateway allows; resending it is harmless",
            ),
        )
        .retry_after(5)
    } else if is_body_too_large(error.as_ref()) {
        too_large()
    } else {
        tracing::error!(%error, "unexpected error in the request path");
        ApiError::one(
            StatusCode::INTERNAL_SERVER_ERROR,
            Issue::error("exception", "internal error; the request was not accepted"),
        )
    }
}

pub fn too_large() -> ApiError {
    ApiError::one(
        StatusCode::PAYLOAD_TOO_LARGE,
        Issue::error(
            "too-long",
            "the request body is larger than the gateway accepts; send smaller batches",
        ),
    )
}

pub fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// tower-http's body limit answers an oversized `Content-Length` itself, with a plain-text
/// body; give it the same OperationOutcome as every other refusal.
pub fn outcome_for_bare_413(response: Response<BoxBody>) -> Response<BoxBody> {
    let bare = response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_none_or(|v| v.as_bytes() != crate::outcome::FHIR_JSON.as_bytes());
    if bare {
        too_large().into_response()
    } else {
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn outcome(
        result: Result<Response<BoxBody>, BoxError>,
    ) -> (StatusCode, serde_json::Value) {
        let response = rescue(result).unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn maps_each_error_kind() {
        let (status, body) = outcome(Err(Box::new(Overloaded::new()))).await;
        assert_eq!(status, 503);
        assert_eq!(body["issue"][0]["code"], "throttled");
        let (status, _) = outcome(Err(Box::new(Elapsed::new()))).await;
        assert_eq!(status, 503);
        let api = ApiError::one(StatusCode::FORBIDDEN, Issue::error("forbidden", "no"));
        let (status, body) = outcome(Err(Box::new(api))).await;
        assert_eq!(status, 403);
        assert_eq!(body["resourceType"], "OperationOutcome");
        let (status, body) = outcome(Err("boom".into())).await;
        assert_eq!(status, 500);
        assert_eq!(body["issue"][0]["code"], "exception");
    }
}
