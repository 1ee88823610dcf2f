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

pub mod browse;
pub mod handoff;
pub mod provenance;
pub mod retention;

#[cfg(test)]
mod behaviour;
pub mod postgres;
pub mod sqlite;
pub mod stored_body;
pub mod throwaway_postgres;
mod writes;

use serde::Serialize;

use crate::delivery::BoxFuture;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("the outbox is shut down")]
    Closed,
    /// More writes are queued than the writer has room for: nothing was stored. The sender is
    /// asked to come back shortly rather than the queue (and memory) growing without bound.
    #[error("the outbox has more writes queued than it has room for")]
    Busy,
    /// As many messages are undelivered as the outbox may hold (`[delivery] max_pending`):
    /// nothing was stored; the sender comes back once delivery has caught up.
    #[error(
        "the outbox holds {pending} undelivered messages, its limit is {limit}: the destinations are not keeping up"
    )]
    Full { pending: u64, limit: u64 },
    /// Corrections refused by destinations whose policy is `corrections = "reject"`: the
    /// messages (by index in the enqueue) and their destinations. Nothing was stored.
    #[error("{} correction(s) refused by destination policy", .0.len())]
    CorrectionsRefused(Vec<(usize, String)>),
    /// Resources to retract that no destination was ever given (by index). Nothing was stored.
    #[error("{} resource(s) were never accepted", .0.len())]
    Unknown(Vec<usize>),
}

/// An accepted request as the outbox keeps it: its tracking id, and what it was about, for
/// the operators' message browser (found by device, vendor, patient or run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub id: String,
    pub facts: BatchFacts,
}

/// Who sent a request and what it was about; lists are distinct values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchFacts {
    /// The vendor's configured name, or `operator:<admin identity>`.
    pub sender: String,
    /// Serial numbers of the devices it named.
    pub devices: Vec<String>,
    /// Patients as `system|value`.
    pub patients: Vec<String>,
    /// ECMO run ids.
    pub runs: Vec<String>,
}

impl From<String> for Batch {
    fn from(id: String) -> Self {
        Self {
            id,
            facts: BatchFacts::default(),
        }
    }
}

impl From<&str> for Batch {
    fn from(id: &str) -> Self {
        id.to_owned().into()
    }
}

/// What enqueueing did with one message, compared with what the destination was last given
/// for the same resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Disposition {
    /// The first version of the resource.
    Created,
    /// A newer state of a resource that changes (a run's Procedure), or a changed resource
    /// that has no "amended" status (a Device).
    Updated,
    /// A corrected reading: sent as an update with `status = amended`.
    Amended,
    /// The same content as what was last accepted: nothing new is sent.
    Unchanged,
    /// An older state than one already accepted (its revision is lower): never sent.
    Superseded,
    /// Taken back: sent as an update with `status = entered-in-error`.
    Retracted,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Amended => "amended",
            Self::Unchanged => "unchanged",
            Self::Superseded => "superseded",
            Self::Retracted => "retracted",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "updated" => Self::Updated,
            "amended" => Self::Amended,
            "retracted" => Self::Retracted,
            _ => Self::Created,
        }
    }
}

/// Where one message went: its id (for `Unchanged` and `Superseded`, the message that holds
/// the content the destination gets) and what enqueueing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub message_id: i64,
    pub disposition: Disposition,
}

/// The fingerprint of a resource's content that tells a resend from a correction (128 bits
/// of SHA-256, computed by the caller, off the writer thread).
pub fn content_hash(body: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let mut hash = [0; 16];
    hash.copy_from_slice(&digest[..16]);
    hash
}

/// The resource JSON with another `status` (`amended` for a correction, `entered-in-error`
/// for a retraction), member order kept.
pub fn with_status(body: &[u8], status: &str) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut resource) => {
            resource["status"] = serde_json::Value::from(status);
            serde_json::to_vec(&resource).unwrap_or_else(|_| body.to_vec())
        }
        Err(_) => body.to_vec(),
    }
}

pub use provenance::ProvenancePlan;

/// A message is due only when no earlier message about its resource is still pending.
const NOT_BLOCKED: &str = "(m.predecessor IS NULL OR NOT EXISTS (SELECT 1 FROM messages p WHERE p.id = m.predecessor AND p.state = 'pending'))";

/// Per resource, each destination with what happened there.
pub type Placements = Vec<Vec<(String, Enqueued)>>;

/// A resource to take back, by its type, logical id and business identifier value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retraction {
    pub resource_type: String,
    pub logical_id: String,
    pub identifier_value: String,
    /// The reading's interval at each charting destination: taken back there while it
    /// charts this reading.
    pub charted: Vec<ChartedRetraction>,
}

/// A retracted reading's interval at one charting destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartedRetraction {
    pub destination: String,
    pub slot_logical_id: String,
    pub slot_identifier_value: String,
    /// The reading's device time: the interval's revision while it charts this reading.
    pub reading_ms: i64,
    /// At a destination that charts a statistic of the interval: which, and the interval
    /// (the statistic is worked out again without the reading).
    pub statistic: Option<ChartInterval>,
}

/// An interval whose Observation charts a statistic of its readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChartInterval {
    pub statistic: mappings::ChartStatistic,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// A reading as one value of its interval's statistic (see [`NewMessage::chart_reading`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartReading {
    pub interval: ChartInterval,
    /// The reading's device time: one value per reading and interval, a resend or correction
    /// of it replaces its value.
    pub reading_ms: i64,
    /// Its decimal value; `None` when the device marked it invalid.
    pub value: Option<String>,
}

impl Retraction {
    /// The reading whose Observation identifier value is `identifier_value`.
    pub fn observation(identifier_value: String) -> Self {
        Self {
            resource_type: "Observation".into(),
            logical_id: mappings::logical_id(
                mappings::OBSERVATION_IDENTIFIER_SYSTEM,
                &identifier_value,
            ),
            identifier_value,
            charted: Vec::new(),
        }
    }
}

/// Where a resource sits in the stores keyed by resource: an Observation by the device time
/// that ends its identifier value (see [`mappings::observation_identifier`]), everything else
/// at the start. New readings carry the latest times, so their rows are appended to a few
/// pages instead of written at random across the whole table (its logical id is a hash): that
/// is what a commit writes to disk, and to the log, per reading.
pub fn time_key<'a>(resource_type: &str, identifier_value: &'a str) -> &'a str {
    match resource_type {
        "Observation" => identifier_value
            .rsplit_once(':')
            .map_or(identifier_value, |(_, time)| time),
        _ => "",
    }
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
    /// [`content_hash`] of `body`.
    pub content_hash: [u8; 16],
    /// Conditional update instead of conditional create.
    pub upsert: bool,
    /// For resources that change over time: the revision of the state `body` describes.
    pub revision: Option<i64>,
    /// What a changed Observation does at this destination.
    pub corrections: crate::config::Corrections,
    /// At a charting destination, the Observation of a reading's interval (see
    /// [`mappings::chart_slot`]; `revision` is the reading's device time, so a later reading of
    /// the interval replaces it): not due before this time (the interval's end and the settle
    /// time), and until it is sent a later reading rewrites it rather than queueing behind it.
    pub chart_due_ms: Option<i64>,
    /// At a destination that charts a statistic of each interval: `body` is the reading's
    /// Observation of the interval, which the outbox sends with the statistic of every value
    /// the interval has then (see [`mappings::summarized`]); `revision` is not used.
    pub chart_reading: Option<ChartReading>,
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

/// What [`Outbox::due`] found.
#[derive(Debug, Clone, Default)]
pub struct Due {
    pub messages: Vec<Pending>,
    /// Where the next call may start: every pending message before it is one of those in
    /// flight or one of `messages`, until one of them is pending again without being in flight.
    pub resume_from: i64,
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

impl Settle {
    /// Delivered or dead: the message is no longer pending.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Delivered { .. } | Self::Dead { .. })
    }
}

/// Where one message stands, for the tracking-id lookup.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    pub message_id: i64,
    pub destination: String,
    pub resource_type: String,
    pub identifier: String,
    /// `created`, `updated` or `amended`: how the message writes the resource.
    pub disposition: Disposition,
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

/// What one destination's queue holds now ([`Outbox::queue_depths`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDepth {
    pub destination: String,
    pub pending: u64,
    pub dead: u64,
    /// Age of the oldest pending message, in seconds.
    pub oldest_pending_seconds: Option<f64>,
}

/// The statement of [`Outbox::queue_depths`]'s pending side, for both engines: the partial
/// index of pending messages counted per destination, and the creation time of the first
/// (ids follow acceptance) read from its row alone. `{indexed_by}` pins SQLite's index.
const PENDING_DEPTHS_SQL: &str =
    "SELECT p.destination, p.n, m.created_ms FROM (SELECT destination, COUNT(*) AS n, MIN(id) AS oldest
       FROM messages {indexed_by} WHERE state = 'pending' GROUP BY destination) p
     JOIN messages m ON m.id = p.oldest ORDER BY p.destination";

/// The per-destination dead letters of [`Outbox::queue_depths`].
const DEAD_DEPTHS_SQL: &str = "SELECT destination, COUNT(*) FROM messages {indexed_by} WHERE state = 'dead' GROUP BY destination";

/// [`QueueDepth`]s from the rows of the two statements above.
fn queue_depths_of(
    pending: Vec<(String, i64, i64)>,
    dead: Vec<(String, i64)>,
    now: i64,
) -> Vec<QueueDepth> {
    let mut depths: std::collections::BTreeMap<String, QueueDepth> = pending
        .into_iter()
        .map(|(destination, count, oldest_ms)| {
            let depth = QueueDepth {
                destination: destination.clone(),
                pending: count as u64,
                dead: 0,
                oldest_pending_seconds: Some((now - oldest_ms).max(0) as f64 / 1000.0),
            };
            (destination, depth)
        })
        .collect();
    for (destination, count) in dead {
        depths
            .entry(destination.clone())
            .or_insert_with(|| QueueDepth {
                destination,
                pending: 0,
                dead: 0,
                oldest_pending_seconds: None,
            })
            .dead = count as u64;
    }
    depths.into_values().collect()
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
    /// Stores the messages durably under `batch_id`, each compared with what its destination
    /// was last given for the same resource; returns what happened to each, in order. All or
    /// nothing: a refused correction stores none of them.
    ///
    /// With a `provenance` plan, each destination that takes Provenance also gets, in the same
    /// commit, one Provenance per kind of write the batch made there (see [`provenance`]).
    fn enqueue(
        &self,
        batch: Batch,
        messages: Vec<NewMessage>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Vec<Enqueued>, OutboxError>>;
    /// Takes resources back at every destination that was given them: one message each,
    /// carrying the last content with `status = entered-in-error`, after whatever is pending
    /// about it. Returns, per resource, each destination with what happened (`Unchanged` when
    /// already retracted). All or nothing: a resource never accepted stores none of them.
    fn retract(
        &self,
        batch: Batch,
        resources: Vec<Retraction>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Placements, OutboxError>>;
    /// Up to `limit` pending messages of `destination` due at `now_ms`, oldest first, each the
    /// oldest pending one of its resource: a message waits while an earlier message about the
    /// same resource is pending (retrying), so per resource the destination gets them in
    /// acceptance order, and a batch never holds two messages about one resource.
    /// Messages `in_flight` (being sent by this worker) are skipped; since they are pending,
    /// later messages about their resources wait for them.
    ///
    /// Only messages from id `from` on are looked at: the caller promises that every pending
    /// message before it is in flight, and passes on [`Due::resume_from`], so a destination
    /// with many messages in flight is not walked from its oldest one on every call.
    fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
        in_flight: &std::collections::HashSet<i64>,
        from: i64,
    ) -> BoxFuture<Result<Due, OutboxError>>;
    /// Counts the changes that made messages pending again behind a worker's
    /// [`Due::resume_from`] (replays of dead letters): a worker that sees it change looks
    /// from the start again.
    fn rewinds(&self) -> u64;
    /// When the next pending message of `destination` becomes due, if any is pending.
    fn next_due(&self, destination: &str) -> BoxFuture<Result<Option<i64>, OutboxError>>;
    /// Records outcomes, durably, in one commit.
    fn settle(&self, outcomes: Vec<(i64, Settle)>) -> BoxFuture<Result<(), OutboxError>>;
    fn batch_status(&self, batch_id: &str) -> BoxFuture<Result<Vec<MessageStatus>, OutboxError>>;
    /// Every message kept, counted per destination and state: a walk of the whole table,
    /// for an operator's look at the queues.
    fn stats(&self) -> BoxFuture<Result<Vec<DestinationStats>, OutboxError>>;
    /// Pending and dead messages of each destination that has any, read from their partial
    /// indexes alone: what every metrics scrape asks, at a cost that does not grow with the
    /// delivered messages retention keeps.
    fn queue_depths(&self) -> BoxFuture<Result<Vec<QueueDepth>, OutboxError>>;
    fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DeadLetter>, OutboxError>>;
    fn dead_letter(&self, message_id: i64) -> BoxFuture<Result<Option<DeadLetter>, OutboxError>>;
    /// Makes dead letters pending again with a fresh budget: one, or all (of a destination).
    /// A dead letter about a resource that later messages have moved on from is not replayed
    /// (it would take the destination back to an older state). Returns how many.
    fn replay(
        &self,
        message_id: Option<i64>,
        destination: Option<&str>,
    ) -> BoxFuture<Result<u64, OutboxError>>;
    /// Wakes `destination`'s worker when new messages arrive.
    fn notifier(&self, destination: &str) -> std::sync::Arc<tokio::sync::Notify>;
    /// Deletes what `retention` says is past keeping (never a pending message) and gives the
    /// space back to the file system, a bounded amount of work at a time so that accepting and
    /// delivering go on meanwhile.
    fn purge(&self, retention: Retention) -> BoxFuture<Result<Purged, OutboxError>>;
    /// Accepted messages that match `query`, newest first (the message browser).
    fn search(
        &self,
        query: browse::MessageQuery,
    ) -> BoxFuture<Result<Vec<browse::MessageSummary>, OutboxError>>;
    /// One message with its FHIR and the destination's answer.
    fn message(
        &self,
        message_id: i64,
    ) -> BoxFuture<Result<Option<browse::MessageDetail>, OutboxError>>;
    /// The latest readings accepted for run `run_id` (one per reading, whatever the number of
    /// destinations), newest first, for the live run view.
    fn run_readings(
        &self,
        run_id: &str,
        limit: usize,
    ) -> BoxFuture<Result<Vec<browse::RunReading>, OutboxError>>;
    /// Durable commits (fsyncs) so far: with group commit, fewer than the writes they hold.
    fn commits(&self) -> u64;
}

/// The cut-off times of one retention pass (milliseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delivered messages settled before this are forgotten. A delivered reading is forgotten
    /// with what its destination was given for it, so the caller keeps it at least as long as
    /// a correction of it can still be accepted (`max_past_age` + `max_future_skew`).
    pub delivered_before_ms: i64,
    /// Dead letters settled before this are deleted, and what their destinations were said to
    /// hold for them with them (a resend is then a new message, not taken for a duplicate).
    pub dead_before_ms: i64,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub delivered: u64,
    pub dead: u64,
    /// File pages given back to the file system.
    pub pages_freed: u64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
