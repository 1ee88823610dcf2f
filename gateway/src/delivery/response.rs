//! What an EHR's answer means for the resources sent: delivered (with the EHR's id and
//! version), refused (with its OperationOutcome), or not known yet (unavailable).

use http::{StatusCode, header};
use serde_json::Value;

use crate::BoxError;
use crate::delivery::DeliveryError;
use crate::delivery::client::EhrResponse;
use crate::delivery::retry::{is_retryable_status, retry_after, tls_failure};

/// The EHR's answer for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOutcome {
    /// `201 Created` (new) or `200 OK` (already there, or updated).
    pub status: String,
    /// `Observation/123/_history/1` as the EHR gave it, if it did.
    pub location: Option<String>,
}

impl EntryOutcome {
    pub fn created(&self) -> bool {
        self.status.starts_with("201")
    }
}

pub mod classify {
    use super::*;

    /// A single create/update answer.
    pub fn single(
        destination: &str,
        answer: Result<EhrResponse, BoxError>,
    ) -> Result<EntryOutcome, DeliveryError> {
        let response = accepted(destination, answer)?;
        let location = response
            .headers()
            .get(header::LOCATION)
            .or_else(|| response.headers().get(header::CONTENT_LOCATION))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(EntryOutcome {
            status: status_line(response.status()),
            location,
        })
    }

    /// A transaction answer: a `transaction-response` Bundle with one entry per entry sent.
    pub fn transaction(
        destination: &str,
        answer: Result<EhrResponse, BoxError>,
        sent: usize,
    ) -> Result<Vec<EntryOutcome>, DeliveryError> {
        let response = accepted(destination, answer)?;
        let malformed = |why: &str| DeliveryError::Unavailable {
            destination: destination.to_owned(),
            reason: format!("transaction-response {why}"),
            retry_after: None,
        };
        let bundle: Value =
            serde_json::from_slice(response.body()).map_err(|_| malformed("is not JSON"))?;
        let entries = bundle["entry"]
            .as_array()
            .ok_or_else(|| malformed("has no entries"))?;
        if bundle["resourceType"] != "Bundle" || entries.len() != sent {
            return Err(malformed("does not answer every entry"));
        }
        Ok(entries
            .iter()
            .map(|entry| EntryOutcome {
                status: entry["response"]["status"]
                    .as_str()
                    .unwrap_or("200")
                    .to_owned(),
                location: entry["response"]["location"].as_str().map(str::to_owned),
            })
            .collect())
    }

    fn accepted(
        destination: &str,
        answer: Result<EhrResponse, BoxError>,
    ) -> Result<EhrResponse, DeliveryError> {
        let response = match answer {
            Ok(response) => response,
            Err(error) => return Err(from_error(destination, error)),
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if is_retryable_status(status) {
            return Err(DeliveryError::Unavailable {
                destination: destination.to_owned(),
                reason: format!("HTTP {status} after every attempt"),
                retry_after: retry_after(response.headers())
                    .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
            });
        }
        let outcome = serde_json::from_slice::<Value>(response.body())
            .ok()
            .filter(|v| v["resourceType"] == "OperationOutcome");
        Err(DeliveryError::Rejected {
            destination: destination.to_owned(),
            status,
            outcome,
        })
    }

    fn from_error(destination: &str, error: BoxError) -> DeliveryError {
        if let Some(tls) = tls_failure(error.as_ref()) {
            return DeliveryError::Misconfigured {
                destination: destination.to_owned(),
                reason: format!("TLS: {tls}"),
            };
        }
        let reason = if error.is::<tower::timeout::error::Elapsed>() {
            "timed out".to_owned()
        } else {
            let mut text = error.to_string();
            let mut cause = error.source();
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            text
        };
        DeliveryError::Unavailable {
            destination: destination.to_owned(),
            reason,
            retry_after: None,
        }
    }

    fn status_line(status: StatusCode) -> String {
        format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Response;

    fn answer(status: u16, body: &str) -> Result<EhrResponse, BoxError> {
        Ok(Response::builder()
            .status(status)
            .header("location", "Observation/1/_history/1")
            .body(Bytes::from(body.to_owned()))
            .unwrap())
    }

    #[test]
    fn created_and_existing_are_delivered() {
        let e = classify::single("ehr", answer(201, "")).unwrap();
        assert!(e.created());
        assert_eq!(e.location.as_deref(), Some("Observation/1/_history/1"));
        assert!(!classify::single("ehr", answer(200, "")).unwrap().created());
    }

    #[test]
    fn refusal_keeps_the_operation_outcome() {
        let oo = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid"}]}"#;
        match classify::single("ehr", answer(422, oo)).unwrap_err() {
            DeliveryError::Rejected {
                status, outcome, ..
            } => {
                assert_eq!(status, 422);
                assert_eq!(outcome.unwrap()["issue"][0]["code"], "invalid");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exhausted_retries_are_unavailable() {
        assert!(matches!(
            classify::single("ehr", answer(503, "")).unwrap_err(),
            DeliveryError::Unavailable { .. }
        ));
    }

    #[test]
    fn transaction_must_answer_every_entry() {
        let body = r#"{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":"201 Created","location":"Observation/9/_history/1"}}]}"#;
        let entries = classify::transaction("ehr", answer(200, body), 1).unwrap();
        assert_eq!(
            entries[0].location.as_deref(),
            Some("Observation/9/_history/1")
        );
        assert!(classify::transaction("ehr", answer(200, body), 2).is_err());
    }
}
