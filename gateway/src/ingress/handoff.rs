//! Hand-off: the mapped batch goes to delivery through the [`Handoff`] trait; the answer says
//! what happened, per resource and destination.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use serde::Serialize;
use tower::Service;

use crate::delivery::{BoxFuture, DeliveryError, Handoff, OutboundBatch, Receipt};
use crate::ingress::client_identity::VendorPolicy;
use crate::outcome::{ApiError, Issue, Severity, fhir_json_response};
use crate::{BoxBody, BoxError};

/// Seconds a vendor is told to wait when a destination is down and said nothing better.
const RETRY_AFTER_UNAVAILABLE: u32 = 30;

/// Seconds a vendor is told to wait when the outbox queue is full (a burst: it drains fast).
const RETRY_AFTER_BUSY: u32 = 1;

#[derive(Clone)]
pub struct HandoffService {
    handoff: Arc<dyn Handoff>,
}

impl HandoffService {
    pub fn new(handoff: Arc<dyn Handoff>) -> Self {
        Self { handoff }
    }
}

impl Service<Request<OutboundBatch>> for HandoffService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<OutboundBatch>) -> Self::Future {
        let handoff = self.handoff.clone();
        let vendor = request
            .extensions()
            .get::<Arc<VendorPolicy>>()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let batch = request.into_body();
        Box::pin(async move {
            let count = batch.resources.len();
            let request_id = batch.request_id.clone();
            let resources = batch.resources.clone();
            let origins = batch.origins.clone();
            let started = std::time::Instant::now();
            let submitted = handoff.submit(batch).await;
            crate::metrics::metrics()
                .handoff_seconds
                .observe(started.elapsed().as_secs_f64());
            match submitted {
                Ok(receipt) => {
                    // One count per type, not per resource: a batch is mostly Observations.
                    let mut by_type: Vec<(&'static str, u64)> = Vec::with_capacity(4);
                    for resource in resources.iter() {
                        match by_type
                            .iter_mut()
                            .find(|(t, _)| *t == resource.resource_type)
                        {
                            Some((_, n)) => *n += 1,
                            None => by_type.push((resource.resource_type, 1)),
                        }
                    }
                    for (resource_type, count) in by_type {
                        crate::metrics::metrics()
                            .accepted
                            .get_or_create(&crate::metrics::VendorType {
                                vendor: vendor.to_string(),
                                resource_type,
                            })
                            .inc_by(count);
                    }
                    let status = match &receipt {
                        Receipt::Delivered { .. } => {
                            tracing::info!(%request_id, %vendor, resources = count, "batch delivered");
                            StatusCode::OK
                        }
                        Receipt::Accepted {
                            tracking_id,
                            messages,
                        } => {
                            let message_ids = messages.iter().flatten().map(|(_, e)| e.message_id);
                            tracing::info!(
                                %request_id,
                                %tracking_id,
                                %vendor,
                                resources = count,
                                first_message_id = message_ids.clone().min(),
                                last_message_id = message_ids.max(),
                                "batch accepted into the outbox"
                            );
                            StatusCode::ACCEPTED
                        }
                    };
                    Ok(fhir_json_response(
                        status,
                        &receipt_json(&request_id, &resources, &receipt),
                    ))
                }
                Err(error) => {
                    tracing::warn!(%request_id, %vendor, resources = count, error = %error.loggable(), "batch not delivered");
                    Err(refusal(error, &resources, &origins).into())
                }
            }
        })
    }
}

/// What direct delivery did at one destination, as far as the EHR's answer tells: without a
/// record of what each EHR was given, a conditional create that found the identifier cannot
/// tell a resend from a correction, so the device hears `existing` (a corrected value was not
/// applied; the outbox applies corrections) rather than nothing.
fn direct_disposition(
    entry: &crate::delivery::response::EntryOutcome,
    upsert: bool,
) -> &'static str {
    match (entry.created(), upsert) {
        (true, _) => "created",
        (false, true) => "updated",
        (false, false) => "existing",
    }
}

/// The answer to a request that was delivered or queued, written straight from borrowed
/// parts: a `serde_json::Value` built per resource and then serialized was a twentieth of the
/// gateway's CPU on batches of 100.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReceiptBody<'a> {
    status: &'static str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracking_id: Option<&'a str>,
    resources: Vec<ReceiptEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReceiptEntry<'a> {
    resource_type: &'a str,
    identifier: ReceiptIdentifier<'a>,
    /// Delivered: each destination's status line for the resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    destinations: Option<PerDestination<'a, &'a str>>,
    /// Queued: the outbox message per destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<PerDestination<'a, i64>>,
    dispositions: PerDestination<'a, &'static str>,
}

#[derive(Serialize)]
struct ReceiptIdentifier<'a> {
    system: &'a str,
    value: &'a str,
}

/// A JSON object from destination names, in the order of the destinations.
struct PerDestination<'a, V>(Vec<(&'a str, V)>);

impl<V: Serialize> Serialize for PerDestination<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

fn receipt_json<'a>(
    request_id: &'a str,
    resources: &'a [mappings::MappedResource],
    receipt: &'a Receipt,
) -> ReceiptBody<'a> {
    let entries = resources
        .iter()
        .enumerate()
        .map(|(index, resource)| {
            let identifier = ReceiptIdentifier {
                system: &resource.identifier_system,
                value: &resource.identifier_value,
            };
            match receipt {
                Receipt::Delivered { destinations } => {
                    let reached = || {
                        destinations.iter().filter_map(move |destination| {
                            Some((
                                destination.destination.as_str(),
                                destination.entries.get(index)?,
                            ))
                        })
                    };
                    ReceiptEntry {
                        resource_type: resource.resource_type,
                        identifier,
                        destinations: Some(PerDestination(
                            reached()
                                .map(|(name, entry)| (name, entry.status.as_str()))
                                .collect(),
                        )),
                        messages: None,
                        dispositions: PerDestination(
                            reached()
                                .map(|(name, entry)| {
                                    (name, direct_disposition(entry, resource.upsert))
                                })
                                .collect(),
                        ),
                    }
                }
                Receipt::Accepted { messages, .. } => {
                    let queued = messages.get(index).map(Vec::as_slice).unwrap_or_default();
                    ReceiptEntry {
                        resource_type: resource.resource_type,
                        identifier,
                        destinations: None,
                        messages: Some(PerDestination(
                            queued
                                .iter()
                                .map(|(name, enqueued)| (name.as_str(), enqueued.message_id))
                                .collect(),
                        )),
                        dispositions: PerDestination(
                            queued
                                .iter()
                                .map(|(name, enqueued)| {
                                    (name.as_str(), enqueued.disposition.as_str())
                                })
                                .collect(),
                        ),
                    }
                }
            }
        })
        .collect();
    match receipt {
        Receipt::Delivered { .. } => ReceiptBody {
            status: "delivered",
            request_id,
            tracking_id: None,
            resources: entries,
        },
        Receipt::Accepted { tracking_id, .. } => ReceiptBody {
            status: "accepted",
            request_id,
            tracking_id: Some(tracking_id),
            resources: entries,
        },
    }
}

/// A delivery failure as the vendor sees it: whether to resend, and what the EHR said.
/// `resources` and their `origins` (JSON pointers) name what a refusal is about.
pub fn refusal(
    error: DeliveryError,
    resources: &[mappings::MappedResource],
    origins: &[String],
) -> ApiError {
    match error {
        DeliveryError::UnknownResources { unknown } => ApiError::new(
            StatusCode::NOT_FOUND,
            unknown
                .into_iter()
                .map(|index| {
                    Issue::error(
                        "not-found",
                        "the gateway never accepted this reading, so there is nothing to take back; nothing of this request was done",
                    )
                    .at(origins.get(index).cloned().unwrap_or_else(|| "/".into()))
                })
                .collect(),
        ),
        DeliveryError::Busy => ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "throttled",
                "the gateway has more to store than it has room for right now; nothing of this request was accepted, resend it after Retry-After",
            ),
        )
        .retry_after(RETRY_AFTER_BUSY),
        DeliveryError::Backlog { pending, limit } => ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "throttled",
                format!("the gateway holds {pending} undelivered messages, its limit is {limit}: its destinations are not keeping up; nothing of this request was accepted, resend it after Retry-After"),
            ),
        )
        .retry_after(RETRY_AFTER_UNAVAILABLE),
        DeliveryError::Unsupported(reason) => ApiError::one(
            StatusCode::NOT_IMPLEMENTED,
            Issue::error("not-supported", reason),
        ),
        DeliveryError::WaveformsNotTaken { index } => ApiError::one(
            StatusCode::UNPROCESSABLE_ENTITY,
            Issue::error(
                "not-supported",
                "no destination of this gateway takes waveforms; nothing of this request was accepted. Send single readings (value), or ask the integration team for a destination with waveforms = true",
            )
            .at({
                // A reading's samples, or a FHIR Observation's SampledData.
                let origin = origins.get(index).map_or("", String::as_str);
                if origin.starts_with("/readings/") {
                    format!("{origin}/samples")
                } else {
                    format!("{}/valueSampledData", origin.trim_end_matches('/'))
                }
            }),
        ),
        DeliveryError::CorrectionsRefused { refused } => ApiError::new(
            StatusCode::CONFLICT,
            refused
                .into_iter()
                .map(|(index, destination)| {
                    let identifier = resources
                        .get(index)
                        .map_or("", |r| r.identifier_value.as_str());
                    Issue::error(
                        "conflict",
                        format!(
                            "this reading ({identifier}) was already sent with another value, and destination '{destination}' does not take corrections; nothing of this request was accepted. Resend it without this reading, or ask the integration team how corrections reach this EHR"
                        ),
                    )
                    .at(origins.get(index).cloned().unwrap_or_else(|| "/".into()))
                })
                .collect(),
        ),
        DeliveryError::Rejected {
            destination,
            status,
            outcome,
        } => {
            let mut issues = vec![Issue::error(
                "processing",
                format!(
                    "destination '{destination}' refused the resources (HTTP {}); its findings follow. Resending after the cause is fixed is harmless",
                    status.as_u16()
                ),
            )];
            // The EHR's own issues, kept as it worded them.
            for issue in outcome
                .as_ref()
                .and_then(|o| o["issue"].as_array())
                .into_iter()
                .flatten()
            {
                let text = issue["details"]["text"]
                    .as_str()
                    .or_else(|| issue["diagnostics"].as_str())
                    .unwrap_or("(no details)");
                let mut ours = Issue::error("processing", format!("{destination}: {text}"));
                if issue["severity"] == "warning" {
                    ours.severity = Severity::Warning;
                }
                if let Some(expression) = issue["expression"][0].as_str() {
                    ours = ours.at(expression.to_owned());
                }
                issues.push(ours);
            }
            ApiError::new(StatusCode::BAD_GATEWAY, issues)
        }
        DeliveryError::Unavailable {
            destination,
            retry_after,
            ..
        } => ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "transient",
                format!("destination '{destination}' is unavailable; nothing was accepted, resend the batch later"),
            ),
        )
        .retry_after(retry_after.unwrap_or(RETRY_AFTER_UNAVAILABLE)),
        DeliveryError::Unroutable { resource_type } => {
            tracing::error!(%resource_type, "routing sends a resource nowhere; fix [destination.only]");
            ApiError::one(
                StatusCode::INTERNAL_SERVER_ERROR,
                Issue::error(
                    "exception",
                    format!("the gateway's routing sends {resource_type} resources from this device nowhere; nothing was accepted"),
                ),
            )
        }
        // The reason names the patient or device identifier the vendor sent: fine to tell it,
        // not to log it.
        DeliveryError::Unresolved {
            destination,
            reason,
            hold: true,
        } => ApiError::one(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "transient",
                format!("destination '{destination}' cannot take this yet: {reason}; nothing was accepted, resend the batch later"),
            ),
        )
        .retry_after(RETRY_AFTER_UNAVAILABLE),
        DeliveryError::Unresolved {
            destination,
            reason,
            hold: false,
        } => ApiError::one(
            StatusCode::UNPROCESSABLE_ENTITY,
            Issue::error(
                "processing",
                format!("destination '{destination}': {reason}; nothing was accepted"),
            ),
        ),
        DeliveryError::Misconfigured { destination, reason } => {
            tracing::error!(%destination, %reason, "destination refuses the gateway's connection; fix the configuration");
            ApiError::one(
                StatusCode::BAD_GATEWAY,
                Issue::error(
                    "exception",
                    format!("the gateway cannot connect to destination '{destination}' as configured; the hospital's integration team has to fix it"),
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(value: &str) -> mappings::MappedResource {
        mappings::MappedResource {
            resource_type: "Observation",
            id: "0".into(),
            identifier_system: "urn:x".into(),
            identifier_value: value.into(),
            json: vec![],
            upsert: false,
        }
    }

    /// The receipts as vendors read them: keys in this order, destinations in theirs.
    #[test]
    fn receipts_name_each_resource_and_what_each_destination_did() {
        let resources = [resource("a"), resource("b")];
        let queued = |id| crate::outbox::Enqueued {
            message_id: id,
            disposition: crate::outbox::Disposition::Created,
        };
        let accepted = Receipt::Accepted {
            tracking_id: "t-1".into(),
            messages: vec![
                vec![("ehr".into(), queued(7)), ("archive".into(), queued(8))],
                vec![],
            ],
        };
        assert_eq!(
            serde_json::to_string(&receipt_json("r-1", &resources, &accepted)).unwrap(),
            r#"{"status":"accepted","requestId":"r-1","trackingId":"t-1","resources":[{"resourceType":"Observation","identifier":{"system":"urn:x","value":"a"},"messages":{"ehr":7,"archive":8},"dispositions":{"ehr":"created","archive":"created"}},{"resourceType":"Observation","identifier":{"system":"urn:x","value":"b"},"messages":{},"dispositions":{}}]}"#
        );
        let entry = |status: &str| crate::delivery::response::EntryOutcome {
            status: status.into(),
            location: None,
        };
        let delivered = Receipt::Delivered {
            destinations: vec![crate::delivery::DestinationReceipt {
                destination: "ehr".into(),
                entries: vec![entry("201 Created"), entry("200 OK")],
            }],
        };
        assert_eq!(
            serde_json::to_string(&receipt_json("r-2", &resources, &delivered)).unwrap(),
            r#"{"status":"delivered","requestId":"r-2","resources":[{"resourceType":"Observation","identifier":{"system":"urn:x","value":"a"},"destinations":{"ehr":"201 Created"},"dispositions":{"ehr":"created"}},{"resourceType":"Observation","identifier":{"system":"urn:x","value":"b"},"destinations":{"ehr":"200 OK"},"dispositions":{"ehr":"existing"}}]}"#
        );
    }

    #[test]
    fn a_full_outbox_queue_is_a_503_with_retry_after() {
        let response = refusal(DeliveryError::Busy, &[], &[]).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }
}
