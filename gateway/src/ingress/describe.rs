//! Device descriptions: the modules and channels of a device and the DeviceMetrics of its
//! parameters (the HL7 PoCD containment tree), which its Observations point at, go into the
//! outbox ahead of the device's readings, parents first, in the same durable write, so that an
//! EHR never holds an Observation whose DeviceMetric (or a metric whose channel) is missing.
//!
//! Once per device and table version per path: the outbox would find them unchanged anyway,
//! but finding that out costs a stored-state lookup per metric and destination, on every
//! request. So the path remembers which devices it has durably handed off (after a 2xx, never
//! before: a refused request describes its device again next time). After a restart the
//! first request of each device sends them again and the outbox drops them as unchanged.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use mappings::DeviceFamily;
use tower::{Layer, Service};

use crate::delivery::OutboundBatch;
use crate::outcome::{ApiError, Issue};
use crate::{BoxBody, BoxError};

/// Devices remembered at most; beyond it the memory starts again (each device then costs one
/// more look in the outbox, nothing more).
const MAX_REMEMBERED: usize = 100_000;

/// One device under one version of its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DescribedDevice([u8; 16]);

impl DescribedDevice {
    fn of(family: &DeviceFamily, serial: &str) -> Self {
        let mut key = Vec::with_capacity(family.id.len() + family.version.len() + serial.len() + 2);
        for part in [&family.id, &family.version] {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        key.extend_from_slice(serial.as_bytes());
        Self(crate::outbox::content_hash(&key))
    }
}

/// The devices a path has durably described.
#[derive(Debug, Default)]
pub struct DeviceDescriptions {
    handed_off: Mutex<HashSet<DescribedDevice>>,
}

impl DeviceDescriptions {
    /// Adds to `batch` the description of device `serial` (modules, channels, metrics), unless
    /// this path has handed it off already.
    pub fn attach(
        &self,
        batch: &mut OutboundBatch,
        family: &DeviceFamily,
        serial: &str,
    ) -> Result<(), ApiError> {
        let device = DescribedDevice::of(family, serial);
        if batch.described.contains(&device) || self.lock().contains(&device) {
            return Ok(());
        }
        let described = mappings::device_description(family, serial).map_err(|error| {
            tracing::error!(family = %family.id, %error, "device metrics could not be built");
            ApiError::one(
                StatusCode::INTERNAL_SERVER_ERROR,
                Issue::error(
                    "exception",
                    "the gateway could not describe the device's parameters; nothing was stored",
                ),
            )
        })?;
        batch.descriptions.extend(described);
        batch.described.push(device);
        Ok(())
    }

    fn remember(&self, devices: &[DescribedDevice]) {
        let mut handed_off = self.lock();
        if handed_off.len() + devices.len() > MAX_REMEMBERED {
            handed_off.clear();
        }
        handed_off.extend(devices.iter().copied());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<DescribedDevice>> {
        self.handed_off.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layer that remembers a batch's devices once the hand-off took it.
    pub fn layer(self: &Arc<Self>) -> RememberDescribedLayer {
        RememberDescribedLayer {
            descriptions: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RememberDescribedLayer {
    descriptions: Arc<DeviceDescriptions>,
}

impl<S> Layer<S> for RememberDescribedLayer {
    type Service = RememberDescribed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RememberDescribed {
            inner,
            descriptions: self.descriptions.clone(),
        }
    }
}

/// Around the hand-off: a 2xx means the batch, its device descriptions with it, is durable.
#[derive(Clone)]
pub struct RememberDescribed<S> {
    inner: S,
    descriptions: Arc<DeviceDescriptions>,
}

impl<S> Service<Request<OutboundBatch>> for RememberDescribed<S>
where
    S: Service<Request<OutboundBatch>, Response = Response<BoxBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<OutboundBatch>) -> Self::Future {
        let described = request.body().described.clone();
        let descriptions = self.descriptions.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            if response.status().is_success() && !described.is_empty() {
                descriptions.remember(&described);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn batch() -> OutboundBatch {
        OutboundBatch {
            request_id: "r".into(),
            vendor: "v".into(),
            model: "CARDIOHELP-i".into(),
            resources: Vec::new().into(),
            origins: Vec::new(),
            revision: None,
            source: crate::ingress::provenance_source(None, Vec::new(), Vec::new(), None),
            subjects: Default::default(),
            descriptions: Vec::new(),
            described: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_device_is_described_until_a_hand_off_takes_it_then_not_again() {
        let tables = mappings::Mappings::embedded().unwrap();
        let family = tables.family_for_model("CARDIOHELP-i").unwrap();
        let descriptions = Arc::new(DeviceDescriptions::default());
        let answering = |status: StatusCode| {
            descriptions.layer().layer(tower::service_fn(
                move |_: Request<OutboundBatch>| async move {
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(status)
                            .body(crate::full_body(bytes::Bytes::new()))
                            .unwrap(),
                    )
                },
            ))
        };

        let mut first = batch();
        descriptions.attach(&mut first, family, "CH-1").unwrap();
        // Twice in one batch (a Bundle of two Observations of one device): described once.
        descriptions.attach(&mut first, family, "CH-1").unwrap();
        assert_eq!(
            first.descriptions.len(),
            mappings::device_description(family, "CH-1").unwrap().len()
        );
        // Parents first: the modules and channels, then the metrics that hang under them.
        let types: Vec<&str> = first.descriptions.iter().map(|d| d.resource_type).collect();
        let metrics_from = types.iter().position(|t| *t == "DeviceMetric").unwrap();
        assert!(types[..metrics_from].iter().all(|t| *t == "Device"));
        assert!(types[metrics_from..].iter().all(|t| *t == "DeviceMetric"));
        // Refused: nothing was stored, so the next request describes the device again.
        answering(StatusCode::SERVICE_UNAVAILABLE)
            .oneshot(Request::new(first))
            .await
            .unwrap();
        let mut second = batch();
        descriptions.attach(&mut second, family, "CH-1").unwrap();
        assert!(!second.descriptions.is_empty());
        answering(StatusCode::ACCEPTED)
            .oneshot(Request::new(second))
            .await
            .unwrap();
        let mut third = batch();
        descriptions.attach(&mut third, family, "CH-1").unwrap();
        assert!(third.descriptions.is_empty(), "handed off already");
        // Another device of the same family is new.
        descriptions.attach(&mut third, family, "CH-2").unwrap();
        assert!(!third.descriptions.is_empty());
    }
}
