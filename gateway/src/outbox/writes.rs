//! What the outbox decides when it stores, settles, replays and forgets messages, whatever
//! engine keeps them: resend or correction, older or newer run state, interval statistics,
//! retractions, Provenance. Each engine answers the questions of [`WriteTx`] in its own SQL
//! inside the transaction of one group commit, and hands its [`Writer`] the commands to apply.
//!
//! Every engine commits the same way: one writer takes a command, then whatever has queued up
//! while the previous commit was syncing, applies each inside its own savepoint (all or nothing
//! inside the shared commit) and answers each caller only once the commit that holds it is
//! durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use super::provenance::{self, Written};
use super::{
    Batch, BatchFacts, ChartInterval, ChartReading, ChartedRetraction, Disposition, Enqueued,
    NewMessage, OutboxError, Placements, ProvenancePlan, Purged, Retention, Retraction, Settle,
    content_hash, now_ms, time_key, with_status,
};
use crate::config::Corrections;
use crate::delivery::BoxFuture;

/// Commands more than this many are committed in the next group.
pub(super) const MAX_GROUP: usize = 512;

/// Commands queued for the writer at most. Requests are bounded upstream too (the request
/// limit), but this is the bound that holds whatever sends: a request that finds it full gets
/// 503 with Retry-After, the delivery workers and retention wait for room.
pub(super) const WRITER_QUEUE: usize = 1024;

/// Messages one retention command deletes: a bounded share of one group commit, so the
/// requests committed beside it do not wait long.
pub(super) const PURGE_CHUNK: u64 = 2000;

/// A write for the writer to apply.
pub(super) enum Command {
    Enqueue(
        Batch,
        Vec<NewMessage>,
        Option<ProvenancePlan>,
        oneshot::Sender<Result<Vec<Enqueued>, OutboxError>>,
    ),
    /// Outcomes, each with the body version delivery was given of a rewritable message.
    Settle(
        Vec<(i64, Settle, Option<i64>)>,
        oneshot::Sender<Result<(), OutboxError>>,
    ),
    Replay(
        Option<i64>,
        Option<String>,
        oneshot::Sender<Result<u64, OutboxError>>,
    ),
    /// Deletes up to [`PURGE_CHUNK`] messages past keeping.
    Purge(Retention, oneshot::Sender<Result<Purged, OutboxError>>),
    /// Gives free space back to the file system, a bounded amount; answers how many pages, and
    /// how many are left (an engine that does this on its own answers none).
    Vacuum(oneshot::Sender<Result<(u64, u64), OutboxError>>),
    Retract(
        Batch,
        Vec<Retraction>,
        Option<ProvenancePlan>,
        oneshot::Sender<Result<Placements, OutboxError>>,
    ),
}

/// Where a resource's state is kept for one destination.
#[derive(Debug, Clone, Copy)]
pub(super) struct StateKey<'a> {
    pub resource_type: &'a str,
    /// [`time_key`] of its identifier value.
    pub time_key: &'a str,
    pub logical_id: &'a str,
    pub destination: &'a str,
}

/// What the destination was last given for a resource, with that message's state.
#[derive(Debug, Clone)]
pub(super) struct Prior {
    pub content_hash: Vec<u8>,
    pub revision: Option<i64>,
    pub message_id: i64,
    /// `None` once the message has been purged (it was delivered).
    pub state: Option<String>,
}

/// The latest message about a resource at one destination, for a retraction.
pub(super) struct Holder {
    pub destination: String,
    pub message_id: i64,
    pub identifier_system: String,
    pub identifier_value: String,
    pub body: Vec<u8>,
    pub disposition: Disposition,
}

/// A settled message as retention and replay see it.
pub(super) struct Settled {
    pub id: i64,
    pub resource_type: String,
    pub identifier_value: String,
    pub logical_id: String,
    pub destination: String,
}

impl Settled {
    fn key(&self) -> StateKey<'_> {
        StateKey {
            resource_type: &self.resource_type,
            time_key: time_key(&self.resource_type, &self.identifier_value),
            logical_id: &self.logical_id,
            destination: &self.destination,
        }
    }
}

/// One message as stored, due at once.
pub(super) struct MessageRow<'a> {
    pub batch_id: &'a str,
    pub destination: &'a str,
    pub resource_type: &'a str,
    pub logical_id: &'a str,
    pub identifier_system: &'a str,
    pub identifier_value: &'a str,
    pub body: &'a [u8],
    pub upsert: bool,
    /// The message before it about the same resource at the same destination.
    pub predecessor: Option<i64>,
    pub disposition: Disposition,
    /// Not due before this time (a charting interval's end); due at once when absent.
    pub not_before_ms: Option<i64>,
}

impl MessageRow<'_> {
    /// When the message is first due.
    pub fn due_ms(&self, now: i64) -> i64 {
        self.not_before_ms.map_or(now, |due| due.max(now))
    }

    /// Its first body version: a charting interval's message may be rewritten, no other is.
    pub fn body_version(&self) -> Option<i64> {
        self.not_before_ms.map(|_| 0)
    }
}

/// Which settled messages retention looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SettledState {
    Delivered,
    Dead,
}

/// The questions the write logic asks of its store, inside the transaction of one commit.
pub(super) trait WriteTx {
    /// Starts the all-or-nothing part of one command.
    fn savepoint(&mut self) -> Result<(), OutboxError>;
    /// Keeps what the command wrote.
    fn release(&mut self) -> Result<(), OutboxError>;
    /// Undoes what the command wrote.
    fn rollback_to_savepoint(&mut self) -> Result<(), OutboxError>;
    /// Writes what the command has left to write (an engine may hold writes back to send
    /// them together); a failure fails the command.
    fn finish_command(&mut self) -> Result<(), OutboxError> {
        Ok(())
    }
    /// The resources the messages of one enqueue are about, before any is looked up: an
    /// engine may take their locks and read their states at once.
    fn will_enqueue(&mut self, _keys: &[StateKey<'_>]) -> Result<(), OutboxError> {
        Ok(())
    }

    /// Records what request `batch_id` was about (for the message browser).
    fn record_batch(
        &mut self,
        batch_id: &str,
        facts: &BatchFacts,
        now: i64,
    ) -> Result<(), OutboxError>;
    fn prior(&mut self, key: StateKey<'_>) -> Result<Option<Prior>, OutboxError>;
    /// Whether the message's body may be rewritten (a charting interval's).
    fn is_rewritable(&mut self, message_id: i64) -> Result<bool, OutboxError>;
    /// How a message writes its resource: conditional update or create, and its disposition.
    fn written_as(&mut self, message_id: i64) -> Result<(bool, Disposition), OutboxError>;
    /// Replaces a pending message's body and counts one more body version.
    fn rewrite_body(&mut self, message_id: i64, body: &[u8]) -> Result<(), OutboxError>;
    /// Records what `key`'s destination is now being given (a revision of `None` keeps the
    /// one recorded).
    fn upsert_state(
        &mut self,
        key: StateKey<'_>,
        content_hash: &[u8],
        revision: Option<i64>,
        message_id: i64,
    ) -> Result<(), OutboxError>;
    /// Points `key`'s state at another message, and at another content hash when given.
    fn point_state(
        &mut self,
        key: StateKey<'_>,
        message_id: i64,
        content_hash: Option<&[u8]>,
    ) -> Result<(), OutboxError>;
    /// The body of the message `key`'s state names.
    fn state_body(&mut self, key: StateKey<'_>) -> Result<Option<Vec<u8>>, OutboxError>;
    /// Stores `row` as a pending message; its id.
    fn insert_message(&mut self, row: &MessageRow<'_>, now: i64) -> Result<i64, OutboxError>;
    /// The latest message about a resource at every destination that holds one, by
    /// destination.
    fn holders(
        &mut self,
        resource_type: &str,
        time_key: &str,
        logical_id: &str,
    ) -> Result<Vec<Holder>, OutboxError>;
    /// A message's identifier system, body and disposition.
    fn restating(&mut self, message_id: i64)
    -> Result<(String, Vec<u8>, Disposition), OutboxError>;

    /// Keeps a reading's value of an interval; a changed value is no longer retracted.
    fn keep_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
        value: Option<&str>,
    ) -> Result<(), OutboxError>;
    /// The interval's values that count, in reading order.
    fn chart_values(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<Vec<String>, OutboxError>;
    /// Flags a reading's value as taken back; whether it was not already.
    fn retract_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
    ) -> Result<bool, OutboxError>;
    /// The interval's readings not taken back (invalid ones included).
    fn chart_readings_left(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<u64, OutboxError>;

    /// The body version of a message, if it is rewritable.
    fn body_version(&mut self, id: i64) -> Result<Option<i64>, OutboxError>;
    /// Makes a pending message due at `at_ms`.
    fn make_due(&mut self, id: i64, at_ms: i64) -> Result<(), OutboxError>;
    /// Records one delivery outcome of a pending message.
    fn settle(&mut self, id: i64, outcome: &Settle, now: i64) -> Result<(), OutboxError>;
    /// Dead letters: one, or all (of a destination).
    fn dead_letters(
        &mut self,
        id: Option<i64>,
        destination: Option<&str>,
    ) -> Result<Vec<Settled>, OutboxError>;
    /// Makes a dead letter pending again, due now with a fresh budget; how many it made.
    fn make_pending_again(&mut self, id: i64, now: i64) -> Result<u64, OutboxError>;

    /// Up to `limit` messages in `state` settled before `before_ms`.
    fn settled_before(
        &mut self,
        state: SettledState,
        before_ms: i64,
        limit: u64,
    ) -> Result<Vec<Settled>, OutboxError>;
    /// Forgets `key`'s state if it still names `message_id`.
    fn forget_state(&mut self, key: StateKey<'_>, message_id: i64) -> Result<(), OutboxError>;
    /// Deletes a message and its body.
    fn delete_message(&mut self, id: i64) -> Result<(), OutboxError>;
    /// Forgets up to `limit` interval values of readings before `before_ms`.
    fn forget_chart_values(&mut self, before_ms: i64, limit: u64) -> Result<(), OutboxError>;
    /// Forgets requests before `before_ms` none of whose messages are kept.
    fn forget_batches(&mut self, before_ms: i64) -> Result<(), OutboxError>;
    /// See [`Command::Vacuum`].
    fn vacuum(&mut self) -> Result<(u64, u64), OutboxError>;
}

/// What one command did, for its caller.
#[derive(Default)]
pub(super) struct Applied {
    pub enqueued: Vec<Enqueued>,
    pub count: u64,
    pub retracted: Placements,
    pub purged: Purged,
}

/// How [`apply_group`] keeps one command's failure from the others of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isolation {
    /// Each command inside its own savepoint: a failing one is rolled back alone.
    PerCommand,
    /// No savepoints: the first failing command fails the whole attempt
    /// ([`apply_group`] answers `None`), which the caller rolls back and applies again
    /// [`Isolation::PerCommand`]. SQLite copies every page a savepoint's command first changes
    /// into the savepoint's journal; most groups apply whole and need none of it.
    Optimistic,
}

/// Applies each command of a group; `Err` when the transaction itself failed (nothing of the
/// group may be committed), `None` when a command failed under [`Isolation::Optimistic`].
pub(super) fn apply_group<T: WriteTx>(
    tx: &mut T,
    group: &[Command],
    isolation: Isolation,
) -> Result<Option<Vec<Result<Applied, OutboxError>>>, OutboxError> {
    let mut results = Vec::with_capacity(group.len());
    let per_command = isolation == Isolation::PerCommand;
    for command in group {
        if per_command {
            tx.savepoint()?;
        }
        let result = apply(tx, command).and_then(|applied| {
            tx.finish_command()?;
            Ok(applied)
        });
        match (&result, per_command) {
            (Err(_), false) => return Ok(None),
            (Err(_), true) => {
                tx.rollback_to_savepoint()?;
                tx.release()?;
            }
            (Ok(_), true) => tx.release()?,
            (Ok(_), false) => {}
        }
        results.push(result);
    }
    Ok(Some(results))
}

/// Answers each command of a committed (or failed) group.
pub(super) fn answer(group: Vec<Command>, results: Vec<Result<Applied, OutboxError>>) {
    for (command, outcome) in group.into_iter().zip(results) {
        match command {
            Command::Enqueue(_, _, _, reply) => {
                let _ = reply.send(outcome.map(|o| o.enqueued));
            }
            Command::Settle(_, reply) => {
                let _ = reply.send(outcome.map(|_| ()));
            }
            Command::Replay(_, _, reply) => {
                let _ = reply.send(outcome.map(|o| o.count));
            }
            Command::Purge(_, reply) => {
                let _ = reply.send(outcome.map(|o| o.purged));
            }
            Command::Vacuum(reply) => {
                let _ = reply.send(outcome.map(|o| (o.purged.pages_freed, o.count)));
            }
            Command::Retract(_, _, _, reply) => {
                let _ = reply.send(outcome.map(|o| o.retracted));
            }
        }
    }
}

/// The same error for every command of a group whose transaction failed.
pub(super) fn failed(
    group: &[Command],
    e: &dyn std::fmt::Display,
) -> Vec<Result<Applied, OutboxError>> {
    (0..group.len())
        .map(|_| Err(OutboxError::Storage(e.to_string())))
        .collect()
}

fn apply<T: WriteTx>(tx: &mut T, command: &Command) -> Result<Applied, OutboxError> {
    let now = now_ms();
    match command {
        Command::Enqueue(
            Batch {
                id: batch_id,
                facts,
            },
            messages,
            plan,
            _,
        ) => {
            tx.record_batch(batch_id, facts, now)?;
            let keys: Vec<StateKey<'_>> = messages
                .iter()
                .map(|m| StateKey {
                    resource_type: &m.resource_type,
                    time_key: time_key(&m.resource_type, &m.identifier_value),
                    logical_id: &m.logical_id,
                    destination: &m.destination,
                })
                .collect();
            tx.will_enqueue(&keys)?;
            let mut enqueued = Vec::with_capacity(messages.len());
            let mut refused = Vec::new();
            for (index, message) in messages.iter().enumerate() {
                match enqueue_one(tx, batch_id, message, now)? {
                    Some(done) => enqueued.push(done),
                    None => refused.push((index, message.destination.clone())),
                }
            }
            if !refused.is_empty() {
                return Err(OutboxError::CorrectionsRefused(refused));
            }
            if let Some(plan) = plan {
                let written: Vec<Written<'_>> = messages
                    .iter()
                    .zip(&enqueued)
                    .map(|(m, done)| Written {
                        destination: &m.destination,
                        disposition: done.disposition,
                        resource_type: &m.resource_type,
                        identifier_system: &m.identifier_system,
                        identifier_value: &m.identifier_value,
                    })
                    .collect();
                // A Provenance goes when the last interval it names at its destination does.
                let due_at = |destination: &str| {
                    messages
                        .iter()
                        .filter(|m| m.destination == destination)
                        .filter_map(|m| m.chart_due_ms)
                        .max()
                };
                store_provenance(
                    tx,
                    batch_id,
                    &provenance::owed(plan, batch_id, &written),
                    &due_at,
                    now,
                )?;
            }
            Ok(Applied {
                enqueued,
                ..Applied::default()
            })
        }
        Command::Retract(
            Batch {
                id: batch_id,
                facts,
            },
            resources,
            plan,
            _,
        ) => {
            tx.record_batch(batch_id, facts, now)?;
            let mut retracted = Vec::with_capacity(resources.len());
            let mut targets = Vec::new();
            let mut unknown = Vec::new();
            for (index, resource) in resources.iter().enumerate() {
                let (mut done, mut identifiers) = retract_one(tx, batch_id, resource, now)?;
                for charted in &resource.charted {
                    if let Some((placed, identified)) = retract_charted(tx, batch_id, charted, now)?
                    {
                        done.push(placed);
                        identifiers.extend(identified);
                    }
                }
                if done.is_empty() {
                    unknown.push(index);
                }
                targets.extend(identifiers);
                retracted.push(done);
            }
            if !unknown.is_empty() {
                return Err(OutboxError::Unknown(unknown));
            }
            if let Some(plan) = plan {
                let written: Vec<Written<'_>> = retracted
                    .iter()
                    .flatten()
                    .zip(&targets)
                    .map(
                        |((destination, done), (resource_type, system, value))| Written {
                            destination,
                            disposition: done.disposition,
                            resource_type,
                            identifier_system: system,
                            identifier_value: value,
                        },
                    )
                    .collect();
                store_provenance(
                    tx,
                    batch_id,
                    &provenance::owed(plan, batch_id, &written),
                    &|_| None,
                    now,
                )?;
            }
            Ok(Applied {
                retracted,
                ..Applied::default()
            })
        }
        Command::Settle(outcomes, _) => {
            for (id, settle, sent_version) in outcomes {
                // A charting interval rewritten while its older body was in flight: what the
                // EHR got is not what the outbox holds, so it is sent again, now.
                if let Some(sent) = sent_version
                    && tx
                        .body_version(*id)?
                        .is_some_and(|current| current != *sent)
                {
                    tx.make_due(*id, now)?;
                    continue;
                }
                tx.settle(*id, settle, now)?;
            }
            Ok(Applied::default())
        }
        Command::Purge(retention, _) => Ok(Applied {
            purged: purge(tx, retention)?,
            ..Applied::default()
        }),
        Command::Vacuum(_) => {
            let (freed, left) = tx.vacuum()?;
            Ok(Applied {
                count: left,
                purged: Purged {
                    pages_freed: freed,
                    ..Purged::default()
                },
                ..Applied::default()
            })
        }
        Command::Replay(id, destination, _) => {
            // Only the latest message about a resource: replaying an older one would take the
            // destination back to a state it has moved on from.
            let dead = tx.dead_letters(*id, destination.as_deref())?;
            let mut count = 0;
            for letter in dead {
                let latest = tx.prior(letter.key())?.map(|p| p.message_id);
                if latest.is_some_and(|latest| latest != letter.id) {
                    continue;
                }
                count += tx.make_pending_again(letter.id, now)?;
            }
            Ok(Applied {
                count,
                ..Applied::default()
            })
        }
    }
}

/// How one message is stored, decided against the destination's [`Prior`].
struct Write {
    upsert: bool,
    /// The `status` the body is sent with instead of its own.
    status: Option<&'static str>,
    disposition: Disposition,
}

/// Deletes up to [`PURGE_CHUNK`] messages past keeping: delivered ones first, then dead
/// letters. A delivered reading goes with what its destination was given for it (readings
/// are many; runs and devices are few and keep theirs, for the order of their updates); a
/// dead letter goes with it for every resource, or a resend of the same content would be
/// taken for one already delivered.
fn purge<T: WriteTx>(tx: &mut T, retention: &Retention) -> Result<Purged, OutboxError> {
    let delivered = tx.settled_before(
        SettledState::Delivered,
        retention.delivered_before_ms,
        PURGE_CHUNK,
    )?;
    let room = PURGE_CHUNK - delivered.len() as u64;
    let dead = tx.settled_before(SettledState::Dead, retention.dead_before_ms, room)?;
    for (is_dead, message) in delivered
        .iter()
        .map(|m| (false, m))
        .chain(dead.iter().map(|m| (true, m)))
    {
        if is_dead || message.resource_type == "Observation" {
            tx.forget_state(message.key(), message.id)?;
        }
        tx.delete_message(message.id)?;
    }
    // Values of intervals whose readings are older than any correction still taken.
    tx.forget_chart_values(retention.delivered_before_ms, PURGE_CHUNK)?;
    tx.forget_batches(retention.delivered_before_ms.min(retention.dead_before_ms))?;
    Ok(Purged {
        delivered: delivered.len() as u64,
        dead: dead.len() as u64,
        pages_freed: 0,
    })
}

/// Stores one message unless it changes nothing; `None` when its destination refuses the
/// correction it is.
pub(super) fn enqueue_one<T: WriteTx>(
    tx: &mut T,
    batch_id: &str,
    m: &NewMessage,
    now: i64,
) -> Result<Option<Enqueued>, OutboxError> {
    let summarized;
    let m = match &m.chart_reading {
        Some(reading) => {
            summarized = with_interval_statistic(tx, m, reading)?;
            &summarized
        }
        None => m,
    };
    let key = StateKey {
        resource_type: &m.resource_type,
        time_key: time_key(&m.resource_type, &m.identifier_value),
        logical_id: &m.logical_id,
        destination: &m.destination,
    };
    let prior = tx.prior(key)?;
    // A charting interval's message still pending is rewritten by a later reading rather
    // than followed by an update: the EHR gets one write per interval. Should delivery hold
    // the older body, its settle sees the version moved on and sends the message again.
    let unsent_interval = match &prior {
        Some(p) if m.chart_due_ms.is_some() && p.state.as_deref() == Some("pending") => {
            tx.is_rewritable(p.message_id)?
        }
        _ => false,
    };
    let first = Write {
        upsert: m.upsert,
        status: None,
        disposition: Disposition::Created,
    };
    let write = match &prior {
        None => first,
        Some(p)
            if m.upsert
                && m.revision
                    .zip(p.revision)
                    .is_some_and(|(new, old)| new < old) =>
        {
            return Ok(Some(Enqueued {
                message_id: p.message_id,
                disposition: Disposition::Superseded,
            }));
        }
        Some(p) if p.content_hash == m.content_hash && p.state.as_deref() != Some("dead") => {
            return Ok(Some(Enqueued {
                message_id: p.message_id,
                disposition: Disposition::Unchanged,
            }));
        }
        // The same content again after the destination refused it: written as it was then.
        Some(p) if p.content_hash == m.content_hash => {
            let (upsert, disposition) = tx.written_as(p.message_id)?;
            Write {
                upsert,
                status: match disposition {
                    Disposition::Amended => Some("amended"),
                    Disposition::Retracted => Some("entered-in-error"),
                    _ => None,
                },
                disposition,
            }
        }
        Some(p) if unsent_interval => {
            tx.rewrite_body(p.message_id, &m.body)?;
            tx.upsert_state(key, &m.content_hash, m.revision, p.message_id)?;
            return Ok(Some(Enqueued {
                message_id: p.message_id,
                disposition: Disposition::Updated,
            }));
        }
        // An interval the destination may already have as final changes after the fact:
        // amended, as FHIR says of a result changed after release (HL7 v2 out: OBX-11 C).
        Some(_) if m.upsert => Write {
            status: m.chart_due_ms.is_some().then_some("amended"),
            disposition: Disposition::Updated,
            ..first
        },
        Some(_) if m.resource_type == "Observation" => match m.corrections {
            Corrections::Amend => Write {
                upsert: true,
                status: Some("amended"),
                disposition: Disposition::Amended,
            },
            Corrections::Reject => return Ok(None),
        },
        // A changed resource without an "amended" status (a Device): brought up to date.
        Some(_) => Write {
            upsert: true,
            status: None,
            disposition: Disposition::Updated,
        },
    };
    let restated;
    let body = match write.status {
        Some(status) => {
            restated = with_status(&m.body, status);
            &restated
        }
        None => &m.body,
    };
    let message_id = tx.insert_message(
        &MessageRow {
            batch_id,
            destination: &m.destination,
            resource_type: &m.resource_type,
            logical_id: &m.logical_id,
            identifier_system: &m.identifier_system,
            identifier_value: &m.identifier_value,
            body,
            upsert: write.upsert,
            predecessor: prior.as_ref().map(|p| p.message_id),
            disposition: write.disposition,
            not_before_ms: m.chart_due_ms,
        },
        now,
    )?;
    tx.upsert_state(key, &m.content_hash, m.revision, message_id)?;
    Ok(Some(Enqueued {
        message_id,
        disposition: write.disposition,
    }))
}

/// A reading of an interval charted as a statistic: its value is kept with the interval's
/// others, and the message becomes the interval's Observation with the statistic of them all,
/// written as any update of the interval is (the same content is unchanged).
fn with_interval_statistic<T: WriteTx>(
    tx: &mut T,
    m: &NewMessage,
    reading: &ChartReading,
) -> Result<NewMessage, OutboxError> {
    tx.keep_chart_value(
        &m.destination,
        &m.logical_id,
        reading.reading_ms,
        reading.value.as_deref(),
    )?;
    // An invalid reading has no unit: the interval's Observation as last written has.
    let stored = match reading.value {
        Some(_) => None,
        None => tx.state_body(StateKey {
            resource_type: "Observation",
            time_key: time_key("Observation", &m.identifier_value),
            logical_id: &m.logical_id,
            destination: &m.destination,
        })?,
    };
    let body = summarize_interval(
        tx,
        &m.destination,
        &m.logical_id,
        reading.interval,
        stored.as_deref().unwrap_or(&m.body),
    )?
    .unwrap_or_else(|| m.body.clone());
    // Field by field: the reading's own body is not copied only to be replaced.
    Ok(NewMessage {
        destination: m.destination.clone(),
        resource_type: m.resource_type.clone(),
        logical_id: m.logical_id.clone(),
        identifier_system: m.identifier_system.clone(),
        identifier_value: m.identifier_value.clone(),
        content_hash: content_hash(&body),
        body,
        upsert: m.upsert,
        revision: None,
        corrections: m.corrections,
        chart_due_ms: m.chart_due_ms,
        chart_reading: None,
    })
}

/// `template` with the statistic of the interval's values as kept now; `None` when it is not
/// an Observation that can carry it.
fn summarize_interval<T: WriteTx>(
    tx: &mut T,
    destination: &str,
    slot_logical_id: &str,
    interval: ChartInterval,
    template: &[u8],
) -> Result<Option<Vec<u8>>, OutboxError> {
    let values = tx.chart_values(destination, slot_logical_id)?;
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    Ok(mappings::summarized(
        template,
        interval.statistic,
        &values,
        interval.start_ms,
        interval.end_ms,
    ))
}

/// A resource by type and business identifier (system, value).
type Identified = (String, String, String);

/// What a write did at one destination.
type Placed = (String, Enqueued);

/// Per destination what a retraction did, and the resource each entry is about.
type Retracted = (Vec<(String, Enqueued)>, Vec<Identified>);

/// Takes one resource back at every destination that holds a message about it.
fn retract_one<T: WriteTx>(
    tx: &mut T,
    batch_id: &str,
    resource: &Retraction,
    now: i64,
) -> Result<Retracted, OutboxError> {
    let time_key = time_key(&resource.resource_type, &resource.identifier_value);
    let holders = tx.holders(&resource.resource_type, time_key, &resource.logical_id)?;
    let mut done = Vec::with_capacity(holders.len());
    let mut identified = Vec::with_capacity(holders.len());
    for h in holders {
        identified.push((
            resource.resource_type.clone(),
            h.identifier_system.clone(),
            h.identifier_value.clone(),
        ));
        if h.disposition == Disposition::Retracted {
            done.push((
                h.destination,
                Enqueued {
                    message_id: h.message_id,
                    disposition: Disposition::Unchanged,
                },
            ));
            continue;
        }
        // The content hash stays the device's: a resend of the retracted value changes nothing.
        let message_id = tx.insert_message(
            &MessageRow {
                batch_id,
                destination: &h.destination,
                resource_type: &resource.resource_type,
                logical_id: &resource.logical_id,
                identifier_system: &h.identifier_system,
                identifier_value: &h.identifier_value,
                body: &with_status(&h.body, "entered-in-error"),
                upsert: true,
                predecessor: Some(h.message_id),
                disposition: Disposition::Retracted,
                not_before_ms: None,
            },
            now,
        )?;
        tx.point_state(
            StateKey {
                resource_type: &resource.resource_type,
                time_key,
                logical_id: &resource.logical_id,
                destination: &h.destination,
            },
            message_id,
            None,
        )?;
        done.push((
            h.destination,
            Enqueued {
                message_id,
                disposition: Disposition::Retracted,
            },
        ));
    }
    Ok((done, identified))
}

/// Takes a reading back at a charting destination: its interval's Observation is restated
/// as entered-in-error while it charts this reading (its revision is the reading's time); a
/// later reading of the interval already replaced it otherwise. `None` when the destination
/// never charted the interval.
fn retract_charted<T: WriteTx>(
    tx: &mut T,
    batch_id: &str,
    charted: &ChartedRetraction,
    now: i64,
) -> Result<Option<(Placed, Vec<Identified>)>, OutboxError> {
    let key = StateKey {
        resource_type: "Observation",
        time_key: time_key("Observation", &charted.slot_identifier_value),
        logical_id: &charted.slot_logical_id,
        destination: &charted.destination,
    };
    let Some(Prior {
        revision,
        message_id,
        ..
    }) = tx.prior(key)?
    else {
        return Ok(None);
    };
    let (identifier_system, body, disposition) = tx.restating(message_id)?;
    // One resource named per placement, as `retract_one` does.
    let identified = vec![(
        "Observation".to_owned(),
        identifier_system.clone(),
        charted.slot_identifier_value.clone(),
    )];
    let unchanged = Enqueued {
        message_id,
        disposition: Disposition::Unchanged,
    };
    if disposition == Disposition::Retracted {
        return Ok(Some(((charted.destination.clone(), unchanged), identified)));
    }
    if let Some(interval) = charted.statistic {
        // The statistic of the interval's other values; with none left it is taken back.
        if !tx.retract_chart_value(
            &charted.destination,
            &charted.slot_logical_id,
            charted.reading_ms,
        )? {
            return Ok(Some(((charted.destination.clone(), unchanged), identified)));
        }
        if tx.chart_readings_left(&charted.destination, &charted.slot_logical_id)? > 0 {
            let body = summarize_interval(
                tx,
                &charted.destination,
                &charted.slot_logical_id,
                interval,
                &body,
            )?
            .unwrap_or(body);
            let update = NewMessage {
                destination: charted.destination.clone(),
                resource_type: "Observation".into(),
                logical_id: charted.slot_logical_id.clone(),
                identifier_system,
                identifier_value: charted.slot_identifier_value.clone(),
                content_hash: content_hash(&body),
                body,
                upsert: true,
                revision: None,
                corrections: Corrections::Amend,
                // Due at once (a queued message of the interval keeps its own time).
                chart_due_ms: Some(now),
                chart_reading: None,
            };
            let placed = enqueue_one(tx, batch_id, &update, now)?.unwrap_or(unchanged);
            return Ok(Some(((charted.destination.clone(), placed), identified)));
        }
    } else if revision != Some(charted.reading_ms) {
        return Ok(Some(((charted.destination.clone(), unchanged), identified)));
    }
    let withdrawn = with_status(&body, "entered-in-error");
    let restated = tx.insert_message(
        &MessageRow {
            batch_id,
            destination: &charted.destination,
            resource_type: "Observation",
            logical_id: &charted.slot_logical_id,
            identifier_system: &identifier_system,
            identifier_value: &charted.slot_identifier_value,
            body: &withdrawn,
            upsert: true,
            predecessor: Some(message_id),
            disposition: Disposition::Retracted,
            not_before_ms: None,
        },
        now,
    )?;
    // A statistic's interval holds what it was last sent: a later reading whose statistic
    // comes out as before charts it again (its readings' resends are kept out by their flag).
    let withdrawn_hash = charted.statistic.map(|_| content_hash(&withdrawn));
    tx.point_state(key, restated, withdrawn_hash.as_ref().map(|h| &h[..]))?;
    Ok(Some((
        (
            charted.destination.clone(),
            Enqueued {
                message_id: restated,
                disposition: Disposition::Retracted,
            },
        ),
        identified,
    )))
}

/// Stores the Provenances a write owes, as messages of the same batch: each is new (its key
/// names the batch), so it has no predecessor and no resource state.
fn store_provenance<T: WriteTx>(
    tx: &mut T,
    batch_id: &str,
    owed: &[(String, mappings::MappedResource)],
    due_at: &dyn Fn(&str) -> Option<i64>,
    now: i64,
) -> Result<(), OutboxError> {
    for (destination, resource) in owed {
        tx.insert_message(
            &MessageRow {
                batch_id,
                destination,
                resource_type: resource.resource_type,
                logical_id: &resource.id,
                identifier_system: &resource.identifier_system,
                identifier_value: &resource.identifier_value,
                body: &resource.json,
                upsert: false,
                predecessor: None,
                disposition: Disposition::Created,
                not_before_ms: due_at(destination),
            },
            now,
        )?;
    }
    Ok(())
}

/// The side of an outbox that every engine shares: the writer's queue, the wake-ups of the
/// delivery workers, the bound on undelivered messages, and the body versions delivery holds.
pub(super) struct Writer {
    queue: mpsc::Sender<Command>,
    commits: Arc<AtomicU64>,
    rewinds: Arc<AtomicU64>,
    notifiers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Undelivered messages, as last counted by the engine.
    pub pending: Arc<AtomicU64>,
    /// New requests are refused while `pending` is at this or above.
    pending_limit: AtomicU64,
    /// The body version delivery was given of each rewritable message it holds (charting
    /// intervals, see `enqueue_one`): settled against the version then current.
    handed_out: Mutex<HashMap<i64, i64>>,
}

impl Writer {
    /// A writer over `queue`, whose engine counts its commits in `commits` and what is
    /// undelivered in `pending`.
    pub fn new(
        queue: mpsc::Sender<Command>,
        commits: Arc<AtomicU64>,
        pending: Arc<AtomicU64>,
    ) -> Self {
        Self {
            queue,
            commits,
            rewinds: Arc::default(),
            notifiers: Mutex::default(),
            pending,
            pending_limit: AtomicU64::new(u64::MAX),
            handed_out: Mutex::default(),
        }
    }

    pub fn set_pending_limit(&self, limit: u64) {
        self.pending_limit.store(limit, Ordering::Relaxed);
    }

    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub fn rewinds(&self) -> u64 {
        self.rewinds.load(Ordering::Acquire)
    }

    pub fn notifier(&self, destination: &str) -> Arc<Notify> {
        self.notifiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(destination.to_owned())
            .or_default()
            .clone()
    }

    fn all_notifiers(&self) -> Vec<Arc<Notify>> {
        self.notifiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Remembers the body versions of rewritable messages handed to delivery.
    pub fn hand_out(&self, versions: Vec<(i64, i64)>) {
        if !versions.is_empty() {
            self.handed_out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(versions);
        }
    }

    /// Hands a write that a vendor waits for to the writer, or refuses it at once with
    /// [`OutboxError::Busy`] when the queue is full.
    fn write_or_refuse<R: Send + 'static>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<R, OutboxError>>) -> Command,
    ) -> BoxFuture<Result<R, OutboxError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.queue.try_send(command(tx));
        Box::pin(async move {
            sent.map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => OutboxError::Busy,
                mpsc::error::TrySendError::Closed(_) => OutboxError::Closed,
            })?;
            rx.await.map_err(|_| OutboxError::Closed)?
        })
    }

    pub fn enqueue(
        &self,
        batch: Batch,
        messages: Vec<NewMessage>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Vec<Enqueued>, OutboxError>> {
        let destinations: Vec<String> = {
            let mut d: Vec<String> = messages.iter().map(|m| m.destination.clone()).collect();
            d.sort();
            d.dedup();
            d
        };
        let notifiers: Vec<Arc<Notify>> = destinations.iter().map(|d| self.notifier(d)).collect();
        let pending = self.pending.load(Ordering::Relaxed);
        let limit = self.pending_limit.load(Ordering::Relaxed);
        if pending >= limit {
            return Box::pin(async move { Err(OutboxError::Full { pending, limit }) });
        }
        let stored =
            self.write_or_refuse(|reply| Command::Enqueue(batch, messages, provenance, reply));
        Box::pin(async move {
            let enqueued = stored.await?;
            notifiers.iter().for_each(|n| n.notify_one());
            Ok(enqueued)
        })
    }

    pub fn settle(&self, outcomes: Vec<(i64, Settle)>) -> BoxFuture<Result<(), OutboxError>> {
        let outcomes: Vec<(i64, Settle, Option<i64>)> = {
            let mut handed_out = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
            outcomes
                .into_iter()
                .map(|(id, settle)| {
                    let version = handed_out.remove(&id);
                    (id, settle, version)
                })
                .collect()
        };
        // A rewritten interval may stay pending behind where delivery looks from (it took it
        // as delivered): delivery looks from the start again. Only charting intervals do this.
        let rewind = outcomes
            .iter()
            .any(|(_, _, version)| version.is_some())
            .then(|| self.rewinds.clone());
        let settled = send(self.queue.clone(), |reply| Command::Settle(outcomes, reply));
        Box::pin(async move {
            settled.await?;
            if let Some(rewinds) = rewind {
                rewinds.fetch_add(1, Ordering::Release);
            }
            Ok(())
        })
    }

    pub fn replay(
        &self,
        message_id: Option<i64>,
        destination: Option<&str>,
    ) -> BoxFuture<Result<u64, OutboxError>> {
        let destination = destination.map(str::to_owned);
        let notifiers = self.all_notifiers();
        let replayed = send(self.queue.clone(), |reply| {
            Command::Replay(message_id, destination, reply)
        });
        let rewinds = self.rewinds.clone();
        Box::pin(async move {
            let count = replayed.await?;
            if count > 0 {
                rewinds.fetch_add(1, Ordering::Release);
            }
            notifiers.iter().for_each(|n| n.notify_one());
            Ok(count)
        })
    }

    pub fn retract(
        &self,
        batch: Batch,
        resources: Vec<Retraction>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Placements, OutboxError>> {
        let notifiers = self.all_notifiers();
        let retracted =
            self.write_or_refuse(|reply| Command::Retract(batch, resources, provenance, reply));
        Box::pin(async move {
            let retracted = retracted.await?;
            notifiers.iter().for_each(|n| n.notify_one());
            Ok(retracted)
        })
    }

    /// Deletes what is past keeping a chunk per command, then gives the space back.
    pub fn purge(&self, retention: Retention) -> BoxFuture<Result<Purged, OutboxError>> {
        let writer = self.queue.clone();
        Box::pin(async move {
            let mut purged = Purged::default();
            loop {
                let chunk = send(writer.clone(), |reply| Command::Purge(retention, reply)).await?;
                purged.delivered += chunk.delivered;
                purged.dead += chunk.dead;
                if chunk.delivered + chunk.dead < PURGE_CHUNK {
                    break;
                }
            }
            loop {
                let (freed, left) = send(writer.clone(), Command::Vacuum).await?;
                purged.pages_freed += freed;
                if left == 0 || freed == 0 {
                    break;
                }
            }
            Ok(purged)
        })
    }
}

/// Hands `command` to the writer once it has room; resolves once the commit that holds it is
/// durable.
fn send<R: Send + 'static>(
    writer: mpsc::Sender<Command>,
    command: impl FnOnce(oneshot::Sender<Result<R, OutboxError>>) -> Command,
) -> impl std::future::Future<Output = Result<R, OutboxError>> + Send + 'static {
    let (tx, rx) = oneshot::channel();
    let command = command(tx);
    async move {
        writer
            .send(command)
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }
}
