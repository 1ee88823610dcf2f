//! The outbox as ingress's hand-off: route each resource to its destinations, store it
//! durably, answer with a tracking id.

use std::sync::Arc;

use crate::config::{ChartingSettings, Corrections};
use crate::delivery::routing::RouteFilter;
use crate::delivery::{BoxFuture, DeliveryError, Handoff, OutboundBatch, Receipt, RetractReceipt};
use crate::outbox::{
    Batch, BatchFacts, ChartInterval, ChartReading, ChartedRetraction, NewMessage, Outbox,
    OutboxError, ProvenancePlan, Retraction, content_hash,
};

fn unavailable(error: OutboxError) -> DeliveryError {
    DeliveryError::Unavailable {
        destination: "outbox".into(),
        reason: error.to_string(),
        retry_after: Some(5),
    }
}

/// A destination as the hand-off sees it: its name, what it takes, its correction policy and
/// whether it takes Provenance.
#[derive(Debug, Clone)]
pub struct Route {
    pub destination: String,
    pub only: RouteFilter,
    pub corrections: Corrections,
    pub provenance: bool,
    /// One Observation per parameter per interval instead of every reading.
    pub charting: Option<ChartingSettings>,
    /// Takes waveforms (Observations with SampledData); others never get them.
    pub waveforms: bool,
}

impl From<&crate::config::DestinationSettings> for Route {
    fn from(settings: &crate::config::DestinationSettings) -> Self {
        // An HL7 v2 receiver gets Observations (ORU^R01 has no place for the rest).
        let oru = settings.kind == crate::config::DestinationKind::Hl7v2;
        let mut only = settings.only.clone();
        if oru {
            only.resource_types = vec!["Observation".into()];
        }
        Self {
            destination: settings.name.clone(),
            only,
            corrections: settings.corrections,
            provenance: settings.provenance && !oru,
            charting: settings.charting,
            waveforms: settings.waveforms,
        }
    }
}

pub struct OutboxHandoff {
    outbox: Arc<dyn Outbox>,
    /// Swapped whole when destinations are reloaded; a request routes with the table it
    /// found when it began.
    table: arc_swap::ArcSwap<RouteTable>,
}

struct RouteTable {
    routes: Arc<[Route]>,
    /// Destinations that take Provenance.
    provenance: Arc<[String]>,
}

impl RouteTable {
    fn new(routes: Vec<Route>) -> Self {
        let provenance = routes
            .iter()
            .filter(|r| r.provenance)
            .map(|r| r.destination.clone())
            .collect();
        Self {
            routes: routes.into(),
            provenance,
        }
    }

    fn plan(&self, source: Arc<mappings::ProvenanceSource>) -> Option<ProvenancePlan> {
        (!self.provenance.is_empty()).then(|| ProvenancePlan {
            source,
            destinations: self.provenance.clone(),
        })
    }
}

impl OutboxHandoff {
    pub fn new(outbox: Arc<dyn Outbox>, routes: Vec<Route>) -> Self {
        Self {
            outbox,
            table: arc_swap::ArcSwap::from_pointee(RouteTable::new(routes)),
        }
    }

    /// The destinations requests are routed to from now on.
    pub fn set_routes(&self, routes: Vec<Route>) {
        self.table.store(Arc::new(RouteTable::new(routes)));
    }
}

/// `resource` as the message for `target`.
fn message(
    target: &Route,
    resource: &mappings::MappedResource,
    content_hash: [u8; 16],
    revision: Option<i64>,
) -> NewMessage {
    NewMessage {
        destination: target.destination.clone(),
        resource_type: resource.resource_type.to_owned(),
        logical_id: resource.id.clone(),
        identifier_system: resource.identifier_system.to_string(),
        identifier_value: resource.identifier_value.clone(),
        body: resource.json.clone(),
        content_hash,
        upsert: resource.upsert,
        revision,
        corrections: target.corrections,
        chart_due_ms: None,
        chart_reading: None,
    }
}

/// A reading as the Observation of its interval at a charting destination; `None` for what
/// is not a reading the gateway rendered (a FHIR-native Observation keeps the vendor's
/// identifier), which goes as it is.
fn charted(
    target: &Route,
    charting: &ChartingSettings,
    resource: &mappings::MappedResource,
) -> Option<NewMessage> {
    if resource.resource_type != "Observation"
        || resource.identifier_system != mappings::OBSERVATION_IDENTIFIER_SYSTEM
    {
        return None;
    }
    let slot = mappings::chart_slot(&resource.identifier_value, charting.interval)?;
    let body = mappings::with_observation_identifier(
        &resource.json,
        &resource.identifier_value,
        &slot.identifier_value,
    )?;
    let settle = i64::try_from(charting.settle.as_millis()).unwrap_or(i64::MAX);
    // A statistic of the interval's quantities; a parameter of another kind (a boolean) is
    // charted as its latest reading.
    let chart_reading = charting.summary.statistic().and_then(|statistic| {
        let value = match mappings::chart_value(&body) {
            mappings::ChartValue::Decimal(value) => Some(value),
            mappings::ChartValue::Absent => None,
            mappings::ChartValue::Other => return None,
        };
        Some(ChartReading {
            interval: ChartInterval {
                statistic,
                start_ms: slot.start_ms,
                end_ms: slot.end_ms,
            },
            reading_ms: slot.reading_ms,
            value,
        })
    });
    Some(NewMessage {
        destination: target.destination.clone(),
        resource_type: resource.resource_type.to_owned(),
        logical_id: slot.logical_id,
        identifier_system: resource.identifier_system.to_string(),
        identifier_value: slot.identifier_value,
        content_hash: content_hash(&body),
        body,
        upsert: true,
        revision: Some(slot.reading_ms),
        corrections: target.corrections,
        chart_due_ms: Some(slot.end_ms.saturating_add(settle)),
        chart_reading,
    })
}

impl Handoff for OutboxHandoff {
    fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        let outbox = self.outbox.clone();
        let table = self.table.load();
        let routes = table.routes.clone();
        let plan = table.plan(batch.source.clone());
        Box::pin(async move {
            let mut messages = Vec::with_capacity(
                (batch.descriptions.len() + batch.resources.len()) * routes.len(),
            );
            // The devices' descriptions first, to every destination that takes their type
            // (none may: a destination of Observations only); the answer does not list them.
            for resource in &batch.descriptions {
                let hash = content_hash(&resource.json);
                for target in routes.iter().filter(|route| {
                    route
                        .only
                        .accepts(&batch.vendor, &batch.model, resource.resource_type)
                }) {
                    messages.push(message(target, resource, hash, None));
                }
            }
            let described = messages.len();
            let mut placed = Vec::with_capacity(batch.resources.len());
            // Resource index of each message, to name a refused correction.
            let mut resource_of = Vec::with_capacity(batch.resources.len() * routes.len());
            for (index, resource) in batch.resources.iter().enumerate() {
                let waveform = resource.is_waveform();
                let targets: Vec<&Route> = routes
                    .iter()
                    .filter(|route| {
                        route
                            .only
                            .accepts(&batch.vendor, &batch.model, resource.resource_type)
                            && (route.waveforms || !waveform)
                    })
                    .collect();
                if targets.is_empty() && waveform {
                    return Err(DeliveryError::WaveformsNotTaken { index });
                }
                if targets.is_empty() {
                    return Err(DeliveryError::Unroutable {
                        resource_type: resource.resource_type.to_owned(),
                    });
                }
                placed.push(
                    targets
                        .iter()
                        .map(|t| t.destination.clone())
                        .collect::<Vec<_>>(),
                );
                let hash = content_hash(&resource.json);
                let revision = batch.revision.filter(|_| resource.upsert);
                for target in targets {
                    resource_of.push(index);
                    messages.push(
                        target
                            .charting
                            .as_ref()
                            .and_then(|charting| charted(target, charting, resource))
                            .unwrap_or_else(|| message(target, resource, hash, revision)),
                    );
                }
            }
            let tracking_id = new_tracking_id();
            let facts = BatchFacts {
                sender: batch.vendor.clone(),
                devices: serials(&batch.source),
                patients: batch.subjects.patients.clone(),
                runs: batch.subjects.runs.clone(),
            };
            let ids = outbox
                .enqueue(
                    Batch {
                        id: tracking_id.clone(),
                        facts,
                    },
                    messages,
                    plan,
                )
                .await
                .map_err(|e| match e {
                    OutboxError::CorrectionsRefused(refused) => DeliveryError::CorrectionsRefused {
                        // A description is never a correction (it is written by update).
                        refused: refused
                            .into_iter()
                            .filter_map(|(message, destination)| {
                                let index = *resource_of.get(message.checked_sub(described)?)?;
                                Some((index, destination))
                            })
                            .collect(),
                    },
                    OutboxError::Busy => DeliveryError::Busy,
                    OutboxError::Full { pending, limit } => {
                        DeliveryError::Backlog { pending, limit }
                    }
                    other => unavailable(other),
                })?;
            let mut ids = ids.into_iter().skip(described);
            let messages = placed
                .into_iter()
                .map(|targets| {
                    targets
                        .into_iter()
                        .filter_map(|t| ids.next().map(|id| (t, id)))
                        .collect()
                })
                .collect();
            Ok(Receipt::Accepted {
                tracking_id,
                messages,
            })
        })
    }

    fn retract(
        &self,
        mut resources: Vec<Retraction>,
        source: Arc<mappings::ProvenanceSource>,
    ) -> BoxFuture<Result<RetractReceipt, DeliveryError>> {
        let outbox = self.outbox.clone();
        let table = self.table.load();
        for resource in resources
            .iter_mut()
            .filter(|r| r.resource_type == "Observation")
        {
            resource.charted = table
                .routes
                .iter()
                .filter_map(|route| {
                    let charting = route.charting?;
                    let slot = mappings::chart_slot(&resource.identifier_value, charting.interval)?;
                    Some(ChartedRetraction {
                        destination: route.destination.clone(),
                        slot_logical_id: slot.logical_id,
                        slot_identifier_value: slot.identifier_value,
                        reading_ms: slot.reading_ms,
                        statistic: charting.summary.statistic().map(|statistic| ChartInterval {
                            statistic,
                            start_ms: slot.start_ms,
                            end_ms: slot.end_ms,
                        }),
                    })
                })
                .collect();
        }
        let facts = BatchFacts {
            sender: match &source.sender {
                mappings::Sender::Vendor { name, .. } => name.clone(),
                mappings::Sender::Operator { certificate } => format!("operator:{certificate}"),
            },
            devices: serials(&source),
            ..BatchFacts::default()
        };
        let plan = table.plan(source);
        Box::pin(async move {
            let tracking_id = new_tracking_id();
            let placements = outbox
                .retract(
                    Batch {
                        id: tracking_id.clone(),
                        facts,
                    },
                    resources,
                    plan,
                )
                .await
                .map_err(|e| match e {
                    OutboxError::Unknown(unknown) => DeliveryError::UnknownResources { unknown },
                    OutboxError::Busy => DeliveryError::Busy,
                    other => unavailable(other),
                })?;
            Ok(RetractReceipt {
                tracking_id,
                placements,
            })
        })
    }
}

/// The serial numbers of the devices a request came from, each once.
fn serials(source: &mappings::ProvenanceSource) -> Vec<String> {
    let mut serials: Vec<String> = Vec::with_capacity(source.devices.len());
    for device in &source.devices {
        if !serials.contains(&device.serial) {
            serials.push(device.serial.clone());
        }
    }
    serials
}

/// A batch's tracking id: a UUID whose leading bits are the time (version 7), so the outbox's
/// index of batches grows at its end instead of taking a write at a random page per request.
fn new_tracking_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
