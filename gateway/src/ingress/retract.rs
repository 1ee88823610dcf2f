//! `POST /v1/observations/entered-in-error`: a device takes readings back. Each is named as it
//! was sent (parameter and time), turned into the Observation's identity the way the mapping
//! does it, and every destination that was given it gets the Observation again with
//! `status = entered-in-error` (its earlier versions stay in the EHR's history). A reading the
//! gateway never accepted is 404 and nothing of the request is done; retracting twice is
//! harmless.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::reload::LiveMappings;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tower::Service;
use tower::filter::{FilterLayer, Predicate};

use crate::delivery::{BoxFuture, Handoff};
use crate::ingress::map::{device_of, device_source};
use crate::ingress::validate::ReadingIssues;
use crate::outbox::Retraction;
use crate::outcome::{ApiError, Issue, fhir_json_response};
use crate::{BoxBody, BoxError};

/// The Observations a request takes back.
#[derive(Debug, Clone)]
pub struct Retractions {
    pub resources: Vec<Retraction>,
    /// The Observation identifier of each, for the answer.
    pub identifiers: Vec<String>,
    /// Where each was named in the request.
    pub origins: Vec<String>,
    /// The device, its vendor and the reason given, for the Provenance of the retraction.
    pub source: Arc<mappings::ProvenanceSource>,
}

#[derive(Clone)]
pub struct NameRetractions {
    mappings: LiveMappings,
}

pub fn layer(mappings: impl Into<LiveMappings>) -> FilterLayer<NameRetractions> {
    FilterLayer::new(NameRetractions {
        mappings: mappings.into(),
    })
}

impl Predicate<Request<Value>> for NameRetractions {
    type Request = Request<Retractions>;

    fn check(&mut self, request: Request<Value>) -> Result<Request<Retractions>, BoxError> {
        let (mut parts, body) = request.into_parts();
        let mut issues: Vec<Issue> = parts
            .extensions
            .remove::<ReadingIssues>()
            .unwrap_or_default()
            .0
            .into_values()
            .flatten()
            .collect();
        let tables = self.mappings.load();
        let (family, serial, _) = device_of(&tables, &body)?;
        let vendor = parts
            .extensions
            .get::<Arc<crate::ingress::VendorPolicy>>()
            .cloned();
        let mut named = Retractions {
            resources: Vec::new(),
            identifiers: Vec::new(),
            origins: Vec::new(),
            source: device_source(
                vendor.as_deref(),
                family,
                &body,
                body["reason"].as_str().map(str::to_owned),
            ),
        };
        let readings = body["readings"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (index, reading) in readings.iter().enumerate() {
            let at = |field: &str| format!("/readings/{index}/{field}");
            let name = reading["parameter"].as_str().unwrap_or_default();
            let Some(parameter) = family.parameter(name) else {
                issues.push(
                    Issue::error(
                        "code-invalid",
                        format!("parameter '{name}' is not defined for {}", family.display),
                    )
                    .at(at("parameter")),
                );
                continue;
            };
            let time =
                match mappings::DeviceTime::parse(reading["time"].as_str().unwrap_or_default()) {
                    Ok(time) => time,
                    Err(e) => {
                        issues.push(Issue::error("value", format!("time {e}")).at(at("time")));
                        continue;
                    }
                };
            // A waveform is named by its start, period and number of samples.
            let waveform = reading["samples"]["period"]
                .as_number()
                .zip(reading["samples"]["count"].as_u64());
            let identifier = match waveform {
                Some((period, count)) => mappings::waveform_identifier(
                    &family.id,
                    serial,
                    &parameter.code,
                    &time.compact_utc(),
                    period.as_str(),
                    usize::try_from(count).unwrap_or(usize::MAX),
                ),
                None => mappings::observation_identifier(
                    &family.id,
                    serial,
                    &parameter.code,
                    &time.compact_utc(),
                ),
            };
            named
                .resources
                .push(Retraction::observation(identifier.clone()));
            named.identifiers.push(identifier);
            named.origins.push(format!("/readings/{index}"));
        }
        if !issues.is_empty() {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, issues).into());
        }
        Ok(Request::from_parts(parts, named))
    }
}

/// Hands the retractions to delivery and answers with what each destination will get.
#[derive(Clone)]
pub struct RetractService {
    handoff: Arc<dyn Handoff>,
}

impl RetractService {
    pub fn new(handoff: Arc<dyn Handoff>) -> Self {
        Self { handoff }
    }
}

impl Service<Request<Retractions>> for RetractService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Retractions>) -> Self::Future {
        let handoff = self.handoff.clone();
        let request_id = crate::ingress::request_id(request.headers());
        let named = request.into_body();
        Box::pin(async move {
            let count = named.resources.len();
            match handoff.retract(named.resources, named.source).await {
                Ok(receipt) => {
                    tracing::info!(%request_id, resources = count, "readings retracted");
                    let resources: Vec<Value> = named
                        .identifiers
                        .iter()
                        .zip(&receipt.placements)
                        .map(|(identifier, placed)| {
                            let messages: serde_json::Map<String, Value> = placed
                                .iter()
                                .map(|(d, e)| (d.clone(), json!(e.message_id)))
                                .collect();
                            let dispositions: serde_json::Map<String, Value> = placed
                                .iter()
                                .map(|(d, e)| (d.clone(), json!(e.disposition.as_str())))
                                .collect();
                            json!({
                                "resourceType": "Observation",
                                "identifier": {"system": mappings::OBSERVATION_IDENTIFIER_SYSTEM, "value": identifier},
                                "messages": messages,
                                "dispositions": dispositions,
                            })
                        })
                        .collect();
                    Ok(fhir_json_response(
                        StatusCode::ACCEPTED,
                        &json!({
                            "status": "accepted",
                            "requestId": request_id,
                            "trackingId": receipt.tracking_id,
                            "resources": resources,
                        }),
                    ))
                }
                Err(error) => {
                    tracing::warn!(%request_id, resources = count, error = %error.loggable(), "retraction not done");
                    Err(crate::ingress::handoff::refusal(error, &[], &named.origins).into())
                }
            }
        })
    }
}
