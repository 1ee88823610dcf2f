//! `GET /v1/schemas/<name>`: the JSON Schemas vendors validate against, served from the same
//! source the gateway checks with.

use http::{HeaderValue, Response, StatusCode, header};

use crate::outcome::{ApiError, Issue};
use crate::validation::Schemas;
use crate::{BoxBody, full_body};

pub fn serve(schemas: &Schemas, name: &str) -> Result<Response<BoxBody>, ApiError> {
    let schema = schemas.get(name).ok_or_else(|| {
        ApiError::one(
            StatusCode::NOT_FOUND,
            Issue::error(
                "not-found",
                format!(
                    "no schema '{name}'; available: {}",
                    schemas.names().join(", ")
                ),
            ),
        )
    })?;
    let mut response = Response::new(full_body(schema.source.clone()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/schema+json"),
    );
    Ok(response)
}
