//! The durable outbox between ingress and delivery.
//!
//! Ingress answers 202 only once [`Outbox::enqueue`] has returned, which is after the batch is
//! on disk (fsync'd). Each destination's [`crate::delivery::worker::DeliveryWorker`] takes due
//! messages, sends them and settles each one: delivered (with the EHR's location), retry later,
//! or dead-lettered (with the EHR's OperationOutcome). Every accepted message therefore ends in a
//! terminal state its tracking id shows, and `accepted = delivered + dead + pending` always holds.
//!
//! The trait is what a shared engine implements to let several gateway replicas share one queue
//! (PostgreSQL with `FOR UPDATE SKIP LOCKED`, see the README); [`sqlite::SqliteOutbox`] is the
//! embedded default.

pub mod handoff;
pub mod sqlite;

use serde::Serialize;

use crate::delivery::BoxFuture;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("the outbox is shut down")]
    Closed,
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// One resource for one destination, as ingress hands it over.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub destination: String,
    pub resource_type: String,
    pub logical_id: String,
    pub identifier_system: String,
    pub identifier_value: String,
    pub body: Vec<u8>,
    /// Conditional update instead of conditional create.
    pub upsert: bool,
}

/// A message due for delivery.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub resource_type: String,
    pub logical_id: String,
    pub identifier_system: String,
    pub identifier_value: String,
    pub body: Vec<u8>,
    pub upsert: bool,
    /// Attempts already made.
    pub attempts: u32,
}

/// How a delivery attempt ended for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// The EHR holds it: its status line and location (`Observation/12/_history/1`).
    Delivered {
        status: String,
        location: Option<String>,
    },
    /// Not this time; try again at `at_ms` (unix ms). Counts as an attempt.
    Retry { at_ms: i64, error: String },
    /// Not now, through no fault of the message (destination paused); does not count.
    Postpone { at_ms: i64, error: String },
    /// Never: refused by the EHR or out of attempts. Kept for an operator to replay.
    Dead {
        error: String,
        /// The EHR's OperationOutcome, as JSON.
        outcome: Option<String>,
    },
}

/// Where one message stands, for the tracking-id lookup.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    pub message_id: i64,
    pub destination: String,
    pub resource_type: String,
    pub identifier: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub attempts: u32,
    pub location: Option<String>,
    pub last_error: Option<String>,
}

/// Counts per destination; `accepted = delivered + dead + pending`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStats {
    pub destination: String,
    pub accepted: u64,
    pub delivered: u64,
    pub dead: u64,
    pub pending: u64,
    /// Age of the oldest pending message, in seconds.
    pub oldest_pending_seconds: Option<f64>,
}

/// A dead-lettered message with why.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: i64,
    pub batch_id: String,
    pub destination: String,
    pub resource_type: String,
    pub identifier: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub outcome: Option<serde_json::Value>,
    pub created_at_ms: i64,
}

/// Storage of accepted messages until they are delivered or dead-lettered.
pub trait Outbox: Send + Sync + 'static {
    /// Stores the messages durably under `batch_id`; returns their message ids, in order.
    fn enqueue(
        &self,
        batch_id: String,
        messages: Vec<NewMessage>,
    ) -> BoxFuture<Result<Vec<i64>, OutboxError>>;
    /// Up to `limit` pending messages of `destination` due at `now_ms`, oldest first.
    fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<Pending>, OutboxError>>;
    /// When the next pending message of `destination` becomes due, if any is pending.
    fn next_due(&self, destination: &str) -> BoxFuture<Result<Option<i64>, OutboxError>>;
    /// Records outcomes, durably, in one commit.
    fn settle(&self, outcomes: Vec<(i64, Settle)>) -> BoxFuture<Result<(), OutboxError>>;
    fn batch_status(&self, batch_id: &str) -> BoxFuture<Result<Vec<MessageStatus>, OutboxError>>;
    fn stats(&self) -> BoxFuture<Result<Vec<DestinationStats>, OutboxError>>;
    fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DeadLetter>, OutboxError>>;
    fn dead_letter(&self, message_id: i64) -> BoxFuture<Result<Option<DeadLetter>, OutboxError>>;
    /// Makes dead letters pending again with a fresh budget: one, or all (of a destination).
    /// Returns how many.
    fn replay(
        &self,
        message_id: Option<i64>,
        destination: Option<&str>,
    ) -> BoxFuture<Result<u64, OutboxError>>;
    /// Wakes `destination`'s worker when new messages arrive.
    fn notifier(&self, destination: &str) -> std::sync::Arc<tokio::sync::Notify>;
    /// Forgets delivered messages settled before `before_ms` (pending and dead ones are kept
    /// whatever their age). Returns how many.
    fn purge_delivered(&self, before_ms: i64) -> BoxFuture<Result<u64, OutboxError>>;
    /// Durable commits (fsyncs) so far: with group commit, fewer than the writes they hold.
    fn commits(&self) -> u64;
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
