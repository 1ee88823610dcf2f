//! Prometheus metrics, served at `GET /metrics` on the admin listener (OpenMetrics text).
//!
//! Labels are routes, status codes, vendor names, destination names, resource types and
//! outcome words: never a patient, a device serial, a run or a value, so a metric can be
//! shipped wherever the operators' dashboards live.
//!
//! | metric | labels |
//! |---|---|
//! | `ecmo_ingest_requests_total` | `route`, `status` |
//! | `ecmo_ingest_request_duration_seconds` | `route` |
//! | `ecmo_ingest_resources_total` (accepted) | `vendor`, `resource_type` |
//! | `ecmo_handoff_duration_seconds` (enqueue, fsync included; or direct delivery) | |
//! | `ecmo_delivery_requests_total` | `destination`, `status` (`2xx`..`5xx`, `error`) |
//! | `ecmo_delivery_request_duration_seconds` (EHR round trip) | `destination` |
//! | `ecmo_deliveries_total` (messages settled) | `destination`, `outcome` (`delivered`, `retry`, `postponed`, `dead`) |
//! | `ecmo_destination_breaker_open` | `destination` |
//! | `ecmo_smart_token_requests_total` | `destination`, `outcome` (`issued`, `refused`, `unavailable`) |
//! | `ecmo_outbox_pending`, `ecmo_outbox_oldest_pending_seconds`, `ecmo_outbox_dead` (at scrape) | `destination` |
//! | `ecmo_certificate_expiry_days` (at scrape) | `role`, `subject` |
//! | `ecmo_config_reloads_total` | `outcome` (`ok`, `failed`) |
//! | `ecmo_hl7v2_messages_total` (MLLP messages answered) | `ack` (`AA`, `AE`, `AR`) |
//! | `ecmo_outbox_commit_duration_seconds` (SQLite: one group commit, fsync included) | |
//! | `ecmo_outbox_checkpoint_duration_seconds` (SQLite: WAL copied back to the file) | `mode` (`passive`, `restart`) |
//! | `ecmo_outbox_writer_held_seconds` (SQLite: the writer waiting out a restart checkpoint) | |

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VendorType {
    pub vendor: String,
    pub resource_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationStatus {
    pub destination: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationOutcome {
    pub destination: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckpointMode {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabel {
    pub ack: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    pub role: String,
    pub subject: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to about 16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub request_seconds: Histograms<Route>,
    pub accepted: Family<VendorType, Counter>,
    pub handoff_seconds: Histogram,
    pub delivery_requests: Family<DestinationStatus, Counter>,
    pub delivery_seconds: Histograms<DestinationLabel>,
    pub deliveries: Family<DestinationOutcome, Counter>,
    pub breaker_open: Family<DestinationLabel, Gauge>,
    pub tokens: Family<DestinationOutcome, Counter>,
    pub outbox_pending: Family<DestinationLabel, Gauge>,
    pub outbox_dead: Family<DestinationLabel, Gauge>,
    pub outbox_oldest_seconds: Family<DestinationLabel, Gauge>,
    pub certificate_days: Family<CertificateLabel, Gauge>,
    pub reloads: Family<Outcome, Counter>,
    pub hl7_messages: Family<AckLabel, Counter>,
    /// Disk latency as the requests waiting for a commit see it.
    pub outbox_commit_seconds: Histogram,
    pub outbox_checkpoint_seconds: Histograms<CheckpointMode>,
    /// Only observed when the writer did wait: each is a stall of every request in flight.
    pub outbox_writer_held_seconds: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            accepted: Family::default(),
            handoff_seconds: latency(),
            delivery_requests: Family::default(),
            delivery_seconds: Family::new_with_constructor(latency),
            deliveries: Family::default(),
            breaker_open: Family::default(),
            tokens: Family::default(),
            outbox_pending: Family::default(),
            outbox_dead: Family::default(),
            outbox_oldest_seconds: Family::default(),
            certificate_days: Family::default(),
            reloads: Family::default(),
            hl7_messages: Family::default(),
            outbox_commit_seconds: latency(),
            outbox_checkpoint_seconds: Family::new_with_constructor(latency),
            outbox_writer_held_seconds: latency(),
            registry: Registry::default(),
        };
        registry.register(
            "ecmo_hl7v2_messages",
            "HL7 v2 messages answered over MLLP, by ACK code",
            m.hl7_messages.clone(),
        );
        registry.register(
            "ecmo_ingest_requests",
            "Vendor requests answered, by route and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "ecmo_ingest_request_duration_seconds",
            "Time from request to answer, by route",
            m.request_seconds.clone(),
        );
        registry.register(
            "ecmo_ingest_resources",
            "FHIR resources accepted (mapped and handed off), by vendor and type",
            m.accepted.clone(),
        );
        registry.register(
            "ecmo_handoff_duration_seconds",
            "Hand-off of an accepted request: outbox enqueue with its fsync, or direct delivery",
            m.handoff_seconds.clone(),
        );
        registry.register(
            "ecmo_delivery_requests",
            "Requests to destinations, by status class",
            m.delivery_requests.clone(),
        );
        registry.register(
            "ecmo_delivery_request_duration_seconds",
            "Round trip of one request to a destination",
            m.delivery_seconds.clone(),
        );
        registry.register(
            "ecmo_deliveries",
            "Outbox messages settled, by destination and outcome",
            m.deliveries.clone(),
        );
        registry.register(
            "ecmo_destination_breaker_open",
            "1 while a destination's circuit breaker holds its sends back",
            m.breaker_open.clone(),
        );
        registry.register(
            "ecmo_smart_token_requests",
            "SMART Backend Services token requests, by outcome",
            m.tokens.clone(),
        );
        registry.register(
            "ecmo_outbox_pending",
            "Messages waiting for a destination",
            m.outbox_pending.clone(),
        );
        registry.register(
            "ecmo_outbox_dead",
            "Dead letters kept for a destination",
            m.outbox_dead.clone(),
        );
        registry.register(
            "ecmo_outbox_oldest_pending_seconds",
            "Age of a destination's oldest pending message",
            m.outbox_oldest_seconds.clone(),
        );
        registry.register(
            "ecmo_certificate_expiry_days",
            "Days until a configured certificate expires",
            m.certificate_days.clone(),
        );
        registry.register(
            "ecmo_config_reloads",
            "Configuration reloads (certificates, CAs, vendors), by outcome",
            m.reloads.clone(),
        );
        registry.register(
            "ecmo_outbox_commit_duration_seconds",
            "One group commit of the SQLite outbox, fsync included",
            m.outbox_commit_seconds.clone(),
        );
        registry.register(
            "ecmo_outbox_checkpoint_duration_seconds",
            "One checkpoint of the SQLite outbox's WAL, by mode",
            m.outbox_checkpoint_seconds.clone(),
        );
        registry.register(
            "ecmo_outbox_writer_held_seconds",
            "Time the SQLite outbox's writer waited for a restart checkpoint, when it waited",
            m.outbox_writer_held_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// A status as a label: its class, or `error` when there was no answer.
pub fn status_class(status: Option<http::StatusCode>) -> &'static str {
    match status.map(|s| s.as_u16() / 100) {
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        Some(_) => "other",
        None => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_labels() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RouteStatus {
                route: "/v1/observations",
                status: 202,
            })
            .inc();
        m.deliveries
            .get_or_create(&DestinationOutcome {
                destination: "ehr".into(),
                outcome: "delivered",
            })
            .inc_by(3);
        m.handoff_seconds.observe(0.002);
        m.outbox_checkpoint_seconds
            .get_or_create(&CheckpointMode { mode: "restart" })
            .observe(0.3);
        let text = m.render();
        assert!(
            text.contains(
                r#"ecmo_outbox_checkpoint_duration_seconds_bucket{le="0.512",mode="restart"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"ecmo_ingest_requests_total{route="/v1/observations",status="202"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"ecmo_deliveries_total{destination="ehr",outcome="delivered"} 3"#));
        assert!(text.contains("ecmo_handoff_duration_seconds_count 1"));
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(status_class(Some(http::StatusCode::BAD_GATEWAY)), "5xx");
        assert_eq!(status_class(None), "error");
    }
}
