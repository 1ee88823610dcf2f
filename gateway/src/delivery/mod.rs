//! Delivery to EHR FHIR servers, modelled on Vector's sinks: [`request_builder`] turns mapped
//! resources into FHIR HTTP requests, [`client`] is the tower client stack (concurrency limit,
//! retry, timeout, mutual-TLS hyper client), [`response`] decides what each answer means.
//!
//! Ingress hands batches over through the [`Handoff`] trait. [`DirectDelivery`] delivers while
//! the vendor waits and answers 200 only once every destination holds the data; a durable outbox
//! implements the same trait to answer 202 as soon as the batch is safely on disk.

pub mod breaker;
pub mod capabilities;
pub mod client;
pub mod fleet;
pub mod oru;
pub mod references;
pub mod request_builder;
pub mod response;
pub mod retry;
pub mod routing;
pub mod smart;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::StatusCode;
use mappings::MappedResource;
use serde_json::Value;

use crate::config::{BundleMode, DestinationSettings, WriteMode};
use crate::delivery::client::EhrClient;
use crate::delivery::request_builder::RequestBuilder;
use crate::delivery::response::{EntryOutcome, classify};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Resources mapped from one accepted request, on their way out.
#[derive(Debug, Clone)]
pub struct OutboundBatch {
    /// The ingress request id, to follow a batch through the logs.
    pub request_id: String,
    /// Who sent it and from which device model, for routing.
    pub vendor: String,
    pub model: String,
    pub resources: Arc<[MappedResource]>,
    /// Where each resource came from in the request (a JSON pointer), for answers that name it.
    pub origins: Vec<String>,
    /// For resources that change over time (a run's Procedure): how many events the state
    /// they describe includes. A state older than one already accepted is never sent after it.
    pub revision: Option<i64>,
    /// Who sent the batch and what made its resources, for their Provenance.
    pub source: Arc<mappings::ProvenanceSource>,
    /// Whom it is about, for the operators' message browser.
    pub subjects: Subjects,
    /// What describes the batch's devices (their DeviceMetrics), stored ahead of `resources`
    /// in the same write; not part of the answer to the vendor.
    pub descriptions: Vec<MappedResource>,
    /// The devices `descriptions` describe ([`crate::ingress::describe`]).
    pub described: Vec<crate::ingress::describe::DescribedDevice>,
}

/// The patients (`system|value`) and ECMO runs a batch is about, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    pub patients: Vec<String>,
    pub runs: Vec<String>,
}

impl Subjects {
    pub fn patient(&mut self, system: &str, value: &str) {
        let known = self.patients.iter().any(|p| {
            p.len() == system.len() + 1 + value.len()
                && p.starts_with(system)
                && p.ends_with(value)
                && p.as_bytes()[system.len()] == b'|'
        });
        if !known {
            self.patients.push(format!("{system}|{value}"));
        }
    }

    pub fn run(&mut self, run_id: &str) {
        if !self.runs.iter().any(|r| r == run_id) {
            self.runs.push(run_id.to_owned());
        }
    }
}

/// What the hand-off did with a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Receipt {
    /// Every destination holds every resource (direct delivery), entry by entry in order.
    Delivered {
        destinations: Vec<DestinationReceipt>,
    },
    /// Durably queued (outbox): `tracking_id` follows the batch; `messages[i]` lists, for
    /// resource `i`, each destination it is routed to with what the outbox did there.
    Accepted {
        tracking_id: String,
        messages: Vec<Vec<(String, crate::outbox::Enqueued)>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct DestinationReceipt {
    pub destination: String,
    pub entries: Vec<EntryOutcome>,
}

/// Why a destination does not hold a batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// The EHR refused the content (a 4xx other than 408/429); resending will not help.
    #[error("destination '{destination}' refused the resources with HTTP {status}")]
    Rejected {
        destination: String,
        status: StatusCode,
        /// The EHR's OperationOutcome, kept as it sent it.
        outcome: Option<Value>,
    },
    /// Down, overloaded or too slow after every attempt; the same batch may be sent again.
    #[error("destination '{destination}' is unavailable: {reason}")]
    Unavailable {
        destination: String,
        reason: String,
        retry_after: Option<u32>,
    },
    /// The connection itself is refused (TLS alert, certificate not trusted): an operator must
    /// fix the configuration; retrying would hammer the EHR for nothing.
    #[error("destination '{destination}' cannot be reached as configured: {reason}")]
    Misconfigured { destination: String, reason: String },
    /// The routing rules send this resource to no destination: a configuration gap.
    #[error("no destination takes {resource_type} resources from this device")]
    Unroutable { resource_type: String },
    /// A waveform (resource index in the batch) that no destination takes (`waveforms`).
    #[error("no destination takes waveforms")]
    WaveformsNotTaken { index: usize },
    /// Readings that correct what a destination already has, where its policy is to never
    /// overwrite (`corrections = "reject"`): `(resource index in the batch, destination)`.
    #[error("{} correction(s) refused by destination policy", refused.len())]
    CorrectionsRefused { refused: Vec<(usize, String)> },
    /// Resources to retract that were never accepted (by index in the request).
    #[error("{} resource(s) were never accepted", unknown.len())]
    UnknownResources { unknown: Vec<usize> },
    /// The gateway has no room for more right now (its outbox queue is full): nothing was
    /// accepted, and the same batch may be sent again shortly.
    #[error("the gateway is busy")]
    Busy,
    /// The outbox holds as many undelivered messages as it may (`[delivery] max_pending`):
    /// nothing was accepted; the destinations have to catch up first.
    #[error("the outbox holds {pending} undelivered messages, its limit is {limit}")]
    Backlog { pending: u64, limit: u64 },
    /// What this delivery mode cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// A reference the destination needs literal points to nothing it holds (or to more
    /// than one thing): held for later, or dead-lettered (`hold` false).
    #[error("destination '{destination}': {reason}")]
    Unresolved {
        destination: String,
        reason: String,
        hold: bool,
    },
}

impl DeliveryError {
    /// The error as logs may carry it: what the reason of an unresolved reference says (the
    /// patient's identifier) stays in the message's record and the answer to the device.
    pub fn loggable(&self) -> String {
        match self {
            Self::Unresolved { destination, .. } => format!(
                "destination '{destination}': a reference cannot be resolved (the message's last error says which)"
            ),
            other => other.to_string(),
        }
    }
}

/// What a retraction did: per resource, each destination with its message.
#[derive(Debug, Clone, PartialEq)]
pub struct RetractReceipt {
    pub tracking_id: String,
    pub placements: crate::outbox::Placements,
}

/// Where ingress leaves an accepted batch.
pub trait Handoff: Send + Sync + 'static {
    fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>>;

    /// Takes resources back (`entered-in-error`) at every destination that was given them.
    /// Only a hand-off that records what each destination got can; others refuse.
    fn retract(
        &self,
        resources: Vec<crate::outbox::Retraction>,
        source: Arc<mappings::ProvenanceSource>,
    ) -> BoxFuture<Result<RetractReceipt, DeliveryError>> {
        let _ = (resources, source);
        Box::pin(async {
            Err(DeliveryError::Unsupported(
                "retracting readings needs the outbox ([delivery] mode = \"outbox\"): direct delivery keeps no record of what each EHR was given".into(),
            ))
        })
    }
}

/// One configured EHR: how to write to it and the client stack that talks to it.
#[derive(Clone)]
pub struct Destination {
    pub name: Arc<str>,
    builder: RequestBuilder,
    bundle: BundleMode,
    max_bundle_entries: usize,
    client: EhrClient,
    /// Literal references, for destinations that need them.
    references: Option<Arc<references::LiteralReferences>>,
    /// HL7 v2 receivers (`kind = "hl7v2"`): Observations go out as ORU^R01 over MLLP.
    oru: Option<Arc<oru::OruSender>>,
}

impl Destination {
    pub fn from_settings(settings: &DestinationSettings) -> Result<Self, client::ClientError> {
        Ok(Self {
            name: settings.name.as_str().into(),
            builder: RequestBuilder::new(
                &settings.name,
                &settings.base_url,
                settings.write,
                settings.format,
            ),
            bundle: settings.bundle,
            max_bundle_entries: settings.max_bundle_entries,
            client: EhrClient::new(settings)?,
            references: (settings.references == references::ReferenceStyle::Literal).then(|| {
                Arc::new(
                    references::LiteralReferences::new(
                        &settings.base_url,
                        settings.write,
                        settings.reference_cache_ttl,
                        settings.unknown_patient,
                    )
                    .with_encounter(settings.encounter),
                )
            }),
            oru: match settings.kind {
                crate::config::DestinationKind::Hl7v2 => {
                    Some(Arc::new(oru::OruSender::new(settings)?))
                }
                crate::config::DestinationKind::Fhir => None,
            },
        })
    }

    /// The ORU^R01 sender of an HL7 v2 destination.
    pub fn oru(&self) -> Option<&oru::OruSender> {
        self.oru.as_deref()
    }

    /// `resources` as this destination needs them for one request (`together`: one
    /// transaction): with literal references where it wants them, each or why it waits.
    pub async fn prepare(
        &self,
        resources: &[MappedResource],
        together: bool,
    ) -> Result<Vec<Result<MappedResource, DeliveryError>>, DeliveryError> {
        let Some(references) = &self.references else {
            return Ok(resources.iter().cloned().map(Ok).collect());
        };
        Ok(references
            .rewrite(&self.client, &self.name, resources, together)
            .await?
            .into_iter()
            .map(|r| {
                r.map_err(|u| DeliveryError::Unresolved {
                    destination: self.name.to_string(),
                    reason: u.reason,
                    hold: u.hold,
                })
            })
            .collect())
    }

    /// Writes one resource; for a destination that takes plain creates only, after a search
    /// on its business key, so that what an earlier attempt (whose answer was lost) or an
    /// earlier process (killed after sending) wrote is found rather than written twice.
    pub async fn write_one(
        &self,
        resource: &MappedResource,
    ) -> Result<response::EntryOutcome, DeliveryError> {
        if self.write_mode() == WriteMode::Create {
            let token = format!(
                "{}|{}",
                resource.identifier_system, resource.identifier_value
            );
            let held = references::find(
                &self.client,
                self.builder.base(),
                &self.name,
                resource.resource_type,
                mappings::business_key_parameter(resource.resource_type),
                &token,
            )
            .await?;
            if let Some(id) = held.first() {
                if resource.upsert {
                    return Err(DeliveryError::Unsupported(format!(
                        "destination '{}' takes creates only (write = \"create\"), and it holds this {} already: the change (a run's new state, a retraction) cannot be sent; update it there by hand",
                        self.name, resource.resource_type
                    )));
                }
                return Ok(response::EntryOutcome {
                    status: "200 OK".into(),
                    location: Some(format!("{}/{id}", resource.resource_type)),
                });
            }
        }
        let request = self.builder.single(resource)?;
        classify::single(&self.name, self.client.send(request).await)
    }

    /// Whether this destination makes references literal.
    pub fn literal_references(&self) -> bool {
        self.references.is_some()
    }

    /// Notes where the EHR keeps a resource it took (for literal references to it).
    pub fn delivered(&self, resource: &MappedResource, location: Option<&str>) {
        if let Some(references) = &self.references {
            references.learn(resource, location);
        }
    }

    pub fn write_mode(&self) -> WriteMode {
        self.builder.write_mode()
    }

    pub fn bundle_mode(&self) -> BundleMode {
        self.bundle
    }

    pub fn request_builder(&self) -> &RequestBuilder {
        &self.builder
    }

    pub fn client(&self) -> &EhrClient {
        &self.client
    }

    /// Sends every resource of the batch; Ok only when the EHR holds all of them.
    pub async fn deliver(
        &self,
        resources: &[MappedResource],
    ) -> Result<DestinationReceipt, DeliveryError> {
        let mut entries = Vec::with_capacity(resources.len());
        match self.bundle {
            BundleMode::Transaction => {
                for chunk in resources.chunks(self.max_bundle_entries) {
                    // Copied only where references are rewritten for this destination.
                    let rewritten;
                    let chunk = if self.references.is_some() {
                        rewritten = self
                            .prepare(chunk, true)
                            .await?
                            .into_iter()
                            .collect::<Result<Vec<_>, _>>()?;
                        rewritten.as_slice()
                    } else {
                        chunk
                    };
                    let request = self.builder.transaction(chunk)?;
                    let answer = self.client.send(request).await;
                    let written = classify::transaction(&self.name, answer, chunk.len())?;
                    for (resource, entry) in chunk.iter().zip(&written) {
                        self.delivered(resource, entry.location.as_deref());
                    }
                    entries.extend(written);
                }
            }
            // Literal references: one at a time, so a resource is written (and its id
            // known) before what refers to it.
            BundleMode::Single if self.references.is_some() => {
                for resource in resources {
                    let mut prepared = self.prepare(std::slice::from_ref(resource), false).await?;
                    let resource = prepared
                        .pop()
                        .ok_or_else(|| DeliveryError::Unsupported("nothing to send".into()))??;
                    let entry = self.write_one(&resource).await?;
                    self.delivered(&resource, entry.location.as_deref());
                    entries.push(entry);
                }
            }
            BundleMode::Single => {
                let mut tasks = tokio::task::JoinSet::new();
                for (index, resource) in resources.iter().enumerate() {
                    let destination = self.clone();
                    let resource = resource.clone();
                    tasks.spawn(async move { (index, destination.write_one(&resource).await) });
                }
                let mut ordered = vec![None; resources.len()];
                while let Some(joined) = tasks.join_next().await {
                    let (index, outcome) = joined.map_err(|e| DeliveryError::Unavailable {
                        destination: self.name.to_string(),
                        reason: format!("delivery task failed: {e}"),
                        retry_after: None,
                    })?;
                    ordered[index] = Some(outcome?);
                }
                entries.extend(ordered.into_iter().flatten());
            }
        }
        Ok(DestinationReceipt {
            destination: self.name.to_string(),
            entries,
        })
    }
}

/// Delivers while the vendor waits: the answer is 200 only when every destination has
/// confirmed, so a 2xx never stands for data that could still be lost.
pub struct DirectDelivery {
    destinations: Arc<[Destination]>,
}

impl DirectDelivery {
    pub fn new(destinations: Vec<Destination>) -> Self {
        Self {
            destinations: destinations.into(),
        }
    }
}

impl Handoff for DirectDelivery {
    fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        let destinations = self.destinations.clone();
        Box::pin(async move {
            // A destination takes waveforms only in outbox mode (the config says so).
            if let Some(index) = batch.resources.iter().position(|r| r.is_waveform()) {
                return Err(DeliveryError::WaveformsNotTaken { index });
            }
            // Destinations are independent: all are tried, each in its own task.
            let mut tasks = tokio::task::JoinSet::new();
            // The devices' DeviceMetrics the Observations point at go first, as in the outbox;
            // the receipt is about the request's own resources.
            let descriptions: Arc<[MappedResource]> = batch.descriptions.clone().into();
            for (index, destination) in destinations.iter().cloned().enumerate() {
                let resources = batch.resources.clone();
                let descriptions = descriptions.clone();
                tasks.spawn(async move {
                    if !descriptions.is_empty()
                        && let Err(error) = destination.deliver(&descriptions).await
                    {
                        return (index, Err(error));
                    }
                    (index, destination.deliver(&resources).await)
                });
            }
            let mut results = vec![None; destinations.len()];
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((index, result)) => results[index] = Some(result),
                    Err(e) => {
                        return Err(DeliveryError::Unavailable {
                            destination: "?".into(),
                            reason: format!("delivery task failed: {e}"),
                            retry_after: None,
                        });
                    }
                }
            }
            let mut receipts = Vec::with_capacity(results.len());
            let mut first_error = None;
            for result in results.into_iter().flatten() {
                match result {
                    Ok(receipt) => receipts.push(receipt),
                    Err(error) => {
                        tracing::warn!(request_id = %batch.request_id, error = %error.loggable(), "delivery failed");
                        first_error.get_or_insert(error);
                    }
                }
            }
            match first_error {
                Some(error) => Err(error),
                None => Ok(Receipt::Delivered {
                    destinations: receipts,
                }),
            }
        })
    }
}
