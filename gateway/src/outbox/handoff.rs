//! The outbox as ingress's hand-off: route each resource to its destinations, store it
//! durably, answer with a tracking id.

use std::sync::Arc;

use crate::delivery::routing::RouteFilter;
use crate::delivery::{BoxFuture, DeliveryError, Handoff, OutboundBatch, Receipt};
use crate::outbox::{NewMessage, Outbox};

pub struct OutboxHandoff {
    outbox: Arc<dyn Outbox>,
    routes: Arc<[(String, RouteFilter)]>,
}

impl OutboxHandoff {
    /// `routes`: each destination's name and what it takes.
    pub fn new(outbox: Arc<dyn Outbox>, routes: Vec<(String, RouteFilter)>) -> Self {
        Self {
            outbox,
            routes: routes.into(),
        }
    }
}

impl Handoff for OutboxHandoff {
    fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        let outbox = self.outbox.clone();
        let routes = self.routes.clone();
        Box::pin(async move {
            let mut messages = Vec::with_capacity(batch.resources.len() * routes.len());
            let mut placed = Vec::with_capacity(batch.resources.len());
            for resource in batch.resources.iter() {
                let targets: Vec<&str> = routes
                    .iter()
                    .filter(|(_, only)| {
                        only.accepts(&batch.vendor, &batch.model, resource.resource_type)
                    })
                    .map(|(name, _)| name.as_str())
                    .collect();
                if targets.is_empty() {
                    return Err(DeliveryError::Unroutable {
                        resource_type: resource.resource_type.to_owned(),
                    });
                }
                placed.push(targets.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>());
                for target in targets {
                    messages.push(NewMessage {
                        destination: target.to_owned(),
                        resource_type: resource.resource_type.to_owned(),
                        logical_id: resource.id.clone(),
                        identifier_system: resource.identifier_system.to_string(),
                        identifier_value: resource.identifier_value.clone(),
                        body: resource.json.clone(),
                        upsert: resource.upsert,
                    });
                }
            }
            let tracking_id = uuid::Uuid::new_v4().to_string();
            let ids = outbox
                .enqueue(tracking_id.clone(), messages)
                .await
                .map_err(|e| DeliveryError::Unavailable {
                    destination: "outbox".into(),
                    reason: e.to_string(),
                    retry_after: Some(5),
                })?;
            let mut ids = ids.into_iter();
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
}
