//! What an EHR's answer means for the resources sent: delivered (with the EHR's id and
//! version), refused (with its OperationOutcome), or not known yet (unavailable).

use http::{StatusCode, header};
use serde_json::Value;

use crate::BoxError;
use crate::delivery::DeliveryError;
use crate::delivery::client::EhrResponse;
use crate::delivery::retry::{configuration_failure, is_retryable_status, retry_after};

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
    use std::borrow::Cow;

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
        let entries = if is_xml(&response) {
            xml_transaction_response(response.body())
        } else {
            json_transaction_response(response.body())
        }
        .map_err(|why| malformed(&why))?;
        if entries.len() != sent {
            return Err(malformed("does not answer every entry"));
        }
        // A transaction's entries succeed together or not at all, and each says how
        // (`response.status` is required): an entry without a 2xx status is an answer that
        // cannot be trusted, so none is taken as delivered (sending again is harmless).
        if let Some(index) = entries.iter().position(|e| !e.status.starts_with('2')) {
            return Err(malformed(&format!(
                "entry {index} has no 2xx status ('{}')",
                entries[index].status
            )));
        }
        Ok(entries)
    }

    /// The parts of a JSON `transaction-response` that tell what happened, read as borrowed
    /// fields; the rest (a returned resource, an OperationOutcome per entry) is skipped
    /// without being built.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ResponseBundle<'a> {
        #[serde(borrow)]
        resource_type: Option<Cow<'a, str>>,
        #[serde(borrow)]
        entry: Option<Vec<ResponseEntry<'a>>>,
    }

    #[derive(serde::Deserialize)]
    struct ResponseEntry<'a> {
        #[serde(borrow)]
        response: Option<EntryResponse<'a>>,
    }

    #[derive(serde::Deserialize)]
    struct EntryResponse<'a> {
        #[serde(borrow)]
        status: Option<Cow<'a, str>>,
        #[serde(borrow)]
        location: Option<Cow<'a, str>>,
    }

    fn json_transaction_response(body: &[u8]) -> Result<Vec<EntryOutcome>, String> {
        let bundle: ResponseBundle<'_> = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                format!("is not a Bundle of entries with responses ({e})")
            } else {
                "is not JSON".to_owned()
            }
        })?;
        if bundle.resource_type.as_deref() != Some("Bundle") {
            return Err("is not a Bundle".into());
        }
        let entries = bundle.entry.ok_or("has no entries")?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let response = entry.response;
                EntryOutcome {
                    status: response
                        .as_ref()
                        .and_then(|r| r.status.as_deref())
                        .unwrap_or_default()
                        .to_owned(),
                    location: response.and_then(|r| r.location).map(Cow::into_owned),
                }
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
        let outcome = if is_xml(&response) {
            mappings::resource_from_xml("OperationOutcome", response.body()).ok()
        } else {
            serde_json::from_slice::<Value>(response.body())
                .ok()
                .filter(|v| v["resourceType"] == "OperationOutcome")
        };
        Err(DeliveryError::Rejected {
            destination: destination.to_owned(),
            status,
            outcome,
        })
    }

    fn is_xml(response: &EhrResponse) -> bool {
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("xml"))
    }

    /// `Bundle/entry/response/{status,location}` of an XML transaction-response, read as a
    /// stream (the Bundle as a whole is never deserialized into the typed model).
    fn xml_transaction_response(body: &[u8]) -> Result<Vec<EntryOutcome>, String> {
        use quick_xml::events::Event;
        let text = std::str::from_utf8(body).map_err(|_| "is not UTF-8".to_owned())?;
        let mut reader = quick_xml::Reader::from_str(text);
        let mut path: Vec<String> = Vec::new();
        let mut entries: Vec<EntryOutcome> = Vec::new();
        loop {
            let event = reader
                .read_event()
                .map_err(|e| format!("is not XML: {e}"))?;
            let (start, empty) = match &event {
                Event::Start(e) => (Some(e), false),
                Event::Empty(e) => (Some(e), true),
                Event::End(_) => {
                    path.pop();
                    continue;
                }
                Event::DocType(_) => return Err("has a DOCTYPE".into()),
                Event::Eof => break,
                _ => continue,
            };
            let Some(start) = start else { continue };
            let name = start.local_name().as_ref().to_owned();
            if path.is_empty() && name != "Bundle" {
                return Err(format!("is a {name}, not a Bundle"));
            }
            let depth = path.len();
            if depth == 1 && name == "entry" {
                entries.push(EntryOutcome {
                    status: String::new(),
                    location: None,
                });
            }
            if depth == 3
                && path[1] == "entry"
                && path[2] == "response"
                && (name == "status" || name == "location")
                && let Some(entry) = entries.last_mut()
            {
                let value = start
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == "value")
                    .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
                    .map(|v| v.into_owned());
                if let Some(value) = value {
                    if name == "status" {
                        entry.status = value;
                    } else {
                        entry.location = Some(value);
                    }
                }
            }
            if !empty {
                path.push(name);
            }
        }
        if entries.is_empty() {
            return Err("has no entries".into());
        }
        Ok(entries)
    }

    fn from_error(destination: &str, error: BoxError) -> DeliveryError {
        if let Some(reason) = configuration_failure(error.as_ref()) {
            return DeliveryError::Misconfigured {
                destination: destination.to_owned(),
                reason,
            };
        }
        let reason = if error.is::<tower::timeout::error::Elapsed>() {
            "timed out".to_owned()
        } else {
            crate::error_chain(error.as_ref())
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

    /// What an EHR adds to its answer (the resources it stored, an outcome per entry, escaped
    /// text) is read past; an answer of the wrong shape is a malformed answer, retried.
    #[test]
    fn a_transaction_answer_is_read_for_status_and_location_only() {
        let body = r#"{"resourceType":"Bundle","id":"x","type":"transaction-response","entry":[{"resource":{"resourceType":"Observation","valueQuantity":{"value":3.140000000000000000001}},"response":{"status":"201 Created","location":"Observation\/9\/_history\/1","outcome":{"resourceType":"OperationOutcome","issue":[]}}}]}"#;
        let entries = classify::transaction("ehr", answer(200, body), 1).unwrap();
        assert_eq!(entries[0].status, "201 Created");
        assert_eq!(
            entries[0].location.as_deref(),
            Some("Observation/9/_history/1")
        );
        for (body, why) in [
            ("not json", "is not JSON"),
            (
                r#"{"resourceType":"Bundle","entry":[{"response":{"status":201}}]}"#,
                "is not a Bundle of entries",
            ),
            (
                r#"{"resourceType":"OperationOutcome","issue":[]}"#,
                "is not a Bundle",
            ),
            (
                r#"{"resourceType":"Bundle","type":"transaction-response"}"#,
                "has no entries",
            ),
        ] {
            match classify::transaction("ehr", answer(200, body), 1) {
                Err(DeliveryError::Unavailable { reason, .. }) => {
                    assert!(reason.contains(why), "{body}: {reason}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_transaction_entry_without_a_success_status_is_not_taken_as_delivered() {
        for entry in [
            r#"{"response":{"location":"Observation/9/_history/1"}}"#,
            r#"{"response":{"status":"400 Bad Request"}}"#,
            r#"{}"#,
        ] {
            let body = format!(
                r#"{{"resourceType":"Bundle","type":"transaction-response","entry":[{{"response":{{"status":"201 Created"}}}},{entry}]}}"#
            );
            match classify::transaction("ehr", answer(200, &body), 2) {
                Err(DeliveryError::Unavailable { reason, .. }) => {
                    assert!(reason.contains("entry 1"), "{reason}")
                }
                other => panic!("{entry}: {other:?}"),
            }
        }
        let mut xml = http::Response::new(bytes::Bytes::from_static(
            br#"<Bundle xmlns="http://hl7.org/fhir"><type value="transaction-response"/><entry><response><location value="Observation/1/_history/1"/></response></entry></Bundle>"#,
        ));
        xml.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/fhir+xml"),
        );
        assert!(matches!(
            classify::transaction("ehr", Ok(xml), 1),
            Err(DeliveryError::Unavailable { .. })
        ));
    }

    #[test]
    fn xml_answers_are_read() {
        let mut ok = http::Response::new(bytes::Bytes::from_static(
            br#"<?xml version="1.0"?><Bundle xmlns="http://hl7.org/fhir"><type value="transaction-response"/>
<entry><response><status value="201 Created"/><location value="Observation/1/_history/1"/></response></entry>
<entry><response><status value="200 OK"/></response></entry></Bundle>"#,
        ));
        ok.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/fhir+xml;charset=utf-8"),
        );
        let entries = classify::transaction("ehr", Ok(ok), 2).unwrap();
        assert_eq!(entries[0].status, "201 Created");
        assert_eq!(
            entries[0].location.as_deref(),
            Some("Observation/1/_history/1")
        );
        assert_eq!(entries[1].status, "200 OK");

        let mut refused = http::Response::new(bytes::Bytes::from_static(
            br#"<OperationOutcome xmlns="http://hl7.org/fhir"><issue><severity value="error"/><code value="invalid"/><diagnostics value="bad code"/></issue></OperationOutcome>"#,
        ));
        *refused.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        refused.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/fhir+xml"),
        );
        match classify::single("ehr", Ok(refused)) {
            Err(DeliveryError::Rejected {
                outcome: Some(o), ..
            }) => {
                assert_eq!(o["issue"][0]["diagnostics"], "bad code")
            }
            other => panic!("{other:?}"),
        }
    }
}
