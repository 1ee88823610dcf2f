//! One `DeliveryWorker` per destination: takes due messages from the outbox in order, sends
//! them as transactions (or one by one), several at once, and settles every message. A
//! refused transaction is split in halves until what is left is delivered or a single
//! refused entry, so one poisoned message is dead-lettered while the others are delivered, and
//! an EHR that refuses big transactions gets smaller ones from then on; transient failures
//! reschedule each message on its own budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mappings::MappedResource;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::BundleMode;
use crate::delivery::breaker::CircuitBreaker;
use crate::delivery::response::classify;
use crate::delivery::{DeliveryError, Destination};
use crate::outbox::{Outbox, Pending, Settle, now_ms};

/// How a worker batches and retries (from the destination's settings).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub max_batch: usize,
    /// How long a partial batch waits for more messages before it is sent.
    pub linger: Duration,
    /// Attempts per message before it is dead-lettered.
    pub message_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub breaker_max_cooldown: Duration,
    /// Batches in flight at once, at most.
    pub max_in_flight: usize,
    /// Longest `Retry-After` of the EHR honoured.
    pub retry_after_max: Duration,
}

/// How long a configuration error (the EHR refusing our certificate) pauses a destination.
const MISCONFIGURED_PAUSE: Duration = Duration::from_secs(300);

pub struct DeliveryWorker {
    shared: Arc<Shared>,
    outbox: Arc<dyn Outbox>,
    breaker: CircuitBreaker,
}

/// What the worker's send tasks share.
struct Shared {
    destination: Destination,
    settings: WorkerSettings,
    /// Bundle size the destination takes (starts at `max_batch`; lowered when it refuses a
    /// transaction for its size).
    bundle_limit: AtomicUsize,
}

/// What a send says about the destination itself.
enum Health {
    Up,
    Down { retry_after: Option<Duration> },
    Misconfigured,
}

impl Health {
    /// Down or refusing the connection: the rest of the batch waits (`leave_unsent`).
    fn halts_batch(&self) -> bool {
        !matches!(self, Health::Up)
    }
}

/// What one batch's send task hands back: the health it saw, whether its outcomes were
/// recorded, and the lowest of its messages still pending (to be sent again).
type Sent = (Health, Result<(), crate::outbox::OutboxError>, Option<i64>);

/// What the worker waits for when it cannot start another batch now.
enum Wake {
    /// The window is full: a batch in flight must finish first.
    Completion,
    /// A pause (linger, open breaker) that new messages do not cut short.
    After(Duration),
    /// Nothing is due: new messages, or the next due time.
    Idle(Duration),
}

impl DeliveryWorker {
    pub fn new(
        destination: Destination,
        outbox: Arc<dyn Outbox>,
        settings: WorkerSettings,
    ) -> Self {
        let breaker = CircuitBreaker::new(
            settings.breaker_failures,
            settings.breaker_cooldown,
            settings.breaker_max_cooldown,
        );
        Self {
            shared: Arc::new(Shared {
                bundle_limit: AtomicUsize::new(settings.max_batch),
                destination,
                settings,
            }),
            outbox,
            breaker,
        }
    }

    /// Runs until `shutdown` turns true. Messages in flight then stay pending and are sent
    /// again after a restart (writes are idempotent).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let (_keep, retire) = watch::channel(false);
        self.run_until(shutdown, retire).await
    }

    /// [`run`](Self::run), and when `retire` turns true (its configuration was replaced):
    /// takes nothing more, lets the batches in flight finish and settle, then returns, so a
    /// successor starts with nothing of this destination in flight.
    ///
    /// Up to `max_in_flight` batches are sent at once, each of messages the others do not
    /// hold; a message waits while an earlier one about its resource is pending, in flight
    /// included, so per-resource order holds whatever finishes first. The window opens one
    /// batch per success and closes to one on a failure (additive increase, as TCP and
    /// Vector's adaptive concurrency do), so a struggling EHR sees one request at a time.
    pub async fn run_until(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut retire: watch::Receiver<bool>,
    ) {
        let name = self.shared.destination.name.clone();
        let settings = self.shared.settings.clone();
        let notify = self.outbox.notifier(&name);
        let mut lingered = false;
        let mut window = 1usize;
        let mut tasks: JoinSet<Sent> = JoinSet::new();
        // Message ids of each task in flight, and all of them.
        let mut owners: HashMap<tokio::task::Id, Vec<i64>> = HashMap::new();
        let mut flying: HashSet<i64> = HashSet::new();
        // Every pending message before this id is in flight (see `Outbox::due`).
        let mut from = 0;
        let mut rewinds = self.outbox.rewinds();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if *retire.borrow() {
                // In-flight sends settle themselves; a shutdown meanwhile leaves them pending.
                tokio::select! {
                    _ = async { while tasks.join_next().await.is_some() {} } => {}
                    _ = shutdown.wait_for(|stop| *stop) => {}
                }
                tracing::info!(destination = %name, "delivery worker retired: its configuration was replaced");
                break;
            }
            let rewound = self.outbox.rewinds();
            if rewound != rewinds {
                rewinds = rewound;
                from = 0;
            }
            let wake = match self.breaker.blocked_for() {
                Some(wait) if tasks.is_empty() => Wake::After(wait),
                Some(_) => Wake::Completion,
                None if tasks.len() >= window => Wake::Completion,
                None => {
                    let now = now_ms();
                    match self
                        .outbox
                        .due(&name, now, self.shared.batch_limit(), &flying, from)
                        .await
                    {
                        Err(error) => {
                            tracing::error!(destination = %name, %error, "cannot read the outbox");
                            Wake::After(Duration::from_secs(1))
                        }
                        Ok(due) if due.messages.is_empty() => {
                            from = due.resume_from;
                            lingered = false;
                            match self.outbox.next_due(&name).await {
                                Ok(Some(at)) => Wake::Idle(Duration::from_millis(
                                    (at - now).clamp(5, 1000) as u64,
                                )),
                                _ => Wake::Idle(Duration::from_secs(1)),
                            }
                        }
                        // Not taken, so `from` stays where it was.
                        Ok(due)
                            if due.messages.len() < self.shared.batch_limit()
                                && !settings.linger.is_zero()
                                && !lingered
                                && tasks.is_empty() =>
                        {
                            lingered = true;
                            Wake::After(settings.linger)
                        }
                        Ok(due) => {
                            lingered = false;
                            from = due.resume_from;
                            let due = due.messages;
                            let ids: Vec<i64> = due.iter().map(|p| p.id).collect();
                            flying.extend(&ids);
                            let shared = self.shared.clone();
                            let outbox = self.outbox.clone();
                            let sent = ids.clone();
                            // Each task settles its own messages: settles of bundles that
                            // finish together share one group commit (fsync).
                            let task = tasks.spawn(async move {
                                let (outcomes, health) = shared.deliver(due).await;
                                count_outcomes(&shared.destination.name, &outcomes);
                                let done: HashSet<i64> = outcomes
                                    .iter()
                                    .filter(|(_, settle)| settle.is_final())
                                    .map(|(id, _)| *id)
                                    .collect();
                                let settled = outbox.settle(outcomes).await;
                                let pending = sent.into_iter();
                                let lowest_pending = match settled {
                                    Ok(()) => pending.filter(|id| !done.contains(id)).min(),
                                    Err(_) => pending.min(),
                                };
                                (health, settled, lowest_pending)
                            });
                            owners.insert(task.id(), ids);
                            continue;
                        }
                    }
                }
            };
            let (pause, listen) = match wake {
                Wake::Completion => (None, false),
                Wake::After(wait) => (Some(wait), false),
                Wake::Idle(wait) => (Some(wait), true),
            };
            tokio::select! {
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (id, sent) = match joined {
                        Ok((id, sent)) => (id, Some(sent)),
                        Err(error) => {
                            tracing::error!(destination = %name, %error, "delivery task failed; its messages stay pending");
                            (error.id(), None)
                        }
                    };
                    let ids = owners.remove(&id).unwrap_or_default();
                    // Messages pending again and no longer in flight: looked at again.
                    let lowest_pending = match &sent {
                        Some((_, _, lowest)) => *lowest,
                        None => ids.iter().copied().min(),
                    };
                    if let Some(lowest) = lowest_pending {
                        from = from.min(lowest);
                    }
                    match sent {
                        Some((health, settled, _)) => {
                            window = self.record(health, window);
                            if let Err(error) = settled {
                                // The messages stay pending and are sent again: harmless,
                                // writes are idempotent.
                                tracing::error!(destination = %name, %error, messages = ids.len(), "cannot record delivery outcomes");
                                window = 1;
                            }
                        }
                        None => window = 1,
                    }
                    for message in &ids {
                        flying.remove(message);
                    }
                }
                _ = notify.notified(), if listen => {}
                _ = tokio::time::sleep(pause.unwrap_or_default()), if pause.is_some() => {}
                _ = shutdown.changed() => {}
                Ok(()) = retire.changed() => {}
            }
        }
    }

    /// Feeds a batch's health to the breaker; returns the new window.
    fn record(&mut self, health: Health, window: usize) -> usize {
        let window = self.window_after(health, window);
        crate::metrics::metrics()
            .breaker_open
            .get_or_create(&crate::metrics::DestinationLabel {
                destination: self.shared.destination.name.to_string(),
            })
            .set(i64::from(self.breaker.blocked_for().is_some()));
        window
    }

    fn window_after(&mut self, health: Health, window: usize) -> usize {
        match health {
            Health::Up => {
                self.breaker.record_success();
                (window + 1).min(self.shared.settings.max_in_flight.max(1))
            }
            Health::Down { retry_after } => {
                self.breaker.record_failure();
                if let Some(after) = retry_after {
                    self.breaker.open_for(after);
                }
                1
            }
            Health::Misconfigured => {
                self.breaker.open_for(MISCONFIGURED_PAUSE);
                1
            }
        }
    }
}

impl Shared {
    async fn deliver(&self, due: Vec<Pending>) -> (Vec<(i64, Settle)>, Health) {
        let name = self.destination.name.to_string();
        // (message id, attempts so far, resource); unknown types are dead-lettered at once.
        let mut resources: Vec<(i64, u32, MappedResource)> = Vec::with_capacity(due.len());
        let mut outcomes: Vec<(i64, Settle)> = Vec::new();
        for p in due {
            match resource_of(&p) {
                Some(resource) => resources.push((p.id, p.attempts, resource)),
                None => outcomes.push((
                    p.id,
                    Settle::Dead {
                        error: format!("unknown resource type '{}'", p.resource_type),
                        outcome: None,
                    },
                )),
            }
        }
        if let Some(oru) = self.destination.oru() {
            return self.deliver_oru(oru, resources, outcomes).await;
        }
        let builder = self.destination.request_builder();
        let client = self.destination.client();
        let transactions = self.destination.bundle_mode() == BundleMode::Transaction;
        let mut health = Health::Up;
        // Pieces of the batch still to send, as index ranges. A refused transaction is split
        // in halves: a poisoned entry is found in log2(n) requests while the rest go through,
        // and a bundle refused for its size finds the size the EHR takes.
        // With each piece, the split it is a half of: (size of the refused parent, halves
        // delivered so far).
        let mut pieces: Vec<(std::ops::Range<usize>, Option<usize>)> =
            vec![(0..resources.len(), None)];
        let mut splits: Vec<(usize, u8)> = Vec::new();
        while let Some((piece, split)) = pieces.pop() {
            let part = &resources[piece.clone()];
            if part.is_empty() {
                continue;
            }
            if health.halts_batch() {
                leave_unsent(part, &mut outcomes);
                continue;
            }
            // Bigger than what the EHR has since been found to take: left pending, unsettled,
            // so the worker sends it again as bundles of the right size, several at once.
            if transactions && part.len() > self.batch_limit() {
                continue;
            }
            if transactions && part.len() > 1 {
                // Copied only where references are rewritten for this destination.
                let rewritten;
                let part = if self.destination.literal_references() {
                    rewritten = match self.prepared(part, &mut outcomes, &mut health).await {
                        Some(prepared) if !prepared.is_empty() => prepared,
                        _ => continue,
                    };
                    rewritten.as_slice()
                } else {
                    part
                };
                let batch: Vec<MappedResource> = part.iter().map(|(_, _, r)| r.clone()).collect();
                let result = match builder.transaction(&batch) {
                    Ok(request) => {
                        classify::transaction(&name, client.send(request).await, batch.len())
                    }
                    Err(error) => Err(error),
                };
                match result {
                    Ok(entries) => {
                        outcomes.extend(part.iter().zip(entries).map(|((id, _, resource), e)| {
                            self.destination.delivered(resource, e.location.as_deref());
                            (
                                *id,
                                Settle::Delivered {
                                    status: e.status,
                                    location: e.location,
                                },
                            )
                        }));
                        if let Some(i) = split {
                            splits[i].1 += 1;
                            if splits[i].1 == 2 {
                                // Both halves went through where the whole was refused: it
                                // was the size, not an entry.
                                self.learn(splits[i].0, splits[i].0.div_ceil(2));
                            }
                        }
                    }
                    Err(DeliveryError::Rejected { .. }) => {
                        let middle = piece.start + piece.len() / 2;
                        splits.push((piece.len(), 0));
                        let split = Some(splits.len() - 1);
                        pieces.push((middle..piece.end, split));
                        pieces.push((piece.start..middle, split));
                    }
                    Err(error) => {
                        health = self.health_of(&error);
                        outcomes
                            .extend(part.iter().map(|(id, attempts, _)| {
                                (*id, self.reschedule(*attempts, &error))
                            }));
                    }
                }
                continue;
            }
            for (n, one) in part.iter().enumerate() {
                if health.halts_batch() {
                    leave_unsent(&part[n..], &mut outcomes);
                    break;
                }
                let rewritten;
                let (id, attempts, resource) = if self.destination.literal_references() {
                    rewritten = self
                        .prepared(std::slice::from_ref(one), &mut outcomes, &mut health)
                        .await;
                    match rewritten.as_deref() {
                        Some([one]) => one,
                        _ => continue,
                    }
                } else {
                    one
                };
                let result = self.destination.write_one(resource).await;
                let settle = match result {
                    Ok(entry) => {
                        self.destination
                            .delivered(resource, entry.location.as_deref());
                        Settle::Delivered {
                            status: entry.status,
                            location: entry.location,
                        }
                    }
                    Err(error) => {
                        if !matches!(error, DeliveryError::Rejected { .. }) {
                            health = self.health_of(&error);
                        }
                        self.reschedule(*attempts, &error)
                    }
                };
                outcomes.push((*id, settle));
            }
        }
        (outcomes, health)
    }

    /// An HL7 v2 receiver: one ORU^R01 per Observation, in order, each settled by its ACK.
    /// Once the receiver is unreachable the rest wait for the next attempt unsent.
    async fn deliver_oru(
        &self,
        oru: &crate::delivery::oru::OruSender,
        resources: Vec<(i64, u32, MappedResource)>,
        mut outcomes: Vec<(i64, Settle)>,
    ) -> (Vec<(i64, Settle)>, Health) {
        let mut health = Health::Up;
        for (n, (id, attempts, resource)) in resources.iter().enumerate() {
            if health.halts_batch() {
                leave_unsent(&resources[n..], &mut outcomes);
                break;
            }
            let settle = match oru.send(resource).await {
                Ok(entry) => Settle::Delivered {
                    status: entry.status,
                    location: None,
                },
                Err(error) => {
                    if !matches!(error, DeliveryError::Rejected { .. }) {
                        health = self.health_of(&error);
                    }
                    self.reschedule(*attempts, &error)
                }
            };
            outcomes.push((*id, settle));
        }
        (outcomes, health)
    }

    /// `part` as the destination needs it for one request (a transaction when it has more
    /// than one): resources whose references cannot be made literal are settled here (held
    /// or dead), the rest come back to be sent. None when the lookups themselves failed (the
    /// whole part is rescheduled).
    async fn prepared(
        &self,
        part: &[(i64, u32, MappedResource)],
        outcomes: &mut Vec<(i64, Settle)>,
        health: &mut Health,
    ) -> Option<Vec<(i64, u32, MappedResource)>> {
        // A half of a refused transaction is prepared again: what waits was settled already.
        let settled: HashSet<i64> = outcomes.iter().map(|(id, _)| *id).collect();
        let part: Vec<&(i64, u32, MappedResource)> = part
            .iter()
            .filter(|(id, _, _)| !settled.contains(id))
            .collect();
        let resources: Vec<MappedResource> = part.iter().map(|(_, _, r)| r.clone()).collect();
        match self.destination.prepare(&resources, part.len() > 1).await {
            Ok(prepared) => {
                let mut ready = Vec::with_capacity(part.len());
                for ((id, attempts, _), result) in part.iter().zip(prepared) {
                    match result {
                        Ok(resource) => ready.push((*id, *attempts, resource)),
                        Err(error) => outcomes.push((*id, self.reschedule(*attempts, &error))),
                    }
                }
                Some(ready)
            }
            Err(error) => {
                *health = self.health_of(&error);
                outcomes.extend(
                    part.iter()
                        .map(|(id, attempts, _)| (*id, self.reschedule(*attempts, &error))),
                );
                None
            }
        }
    }

    /// The most entries a batch gets now: the configured size, or less once the EHR has shown
    /// that it refuses bigger transactions.
    fn batch_limit(&self) -> usize {
        self.bundle_limit
            .load(Ordering::Relaxed)
            .clamp(1, self.settings.max_batch.max(1))
    }

    /// The EHR refused a transaction of `refused` entries and took both halves, the larger
    /// of `size`: from now on bundles hold at most `size` (for this process; configure
    /// `max_bundle_entries` to start there).
    fn learn(&self, refused: usize, size: usize) {
        let before = self.bundle_limit.fetch_min(size, Ordering::Relaxed);
        if size < before {
            tracing::warn!(destination = %self.destination.name, refused, size, "the destination refuses bigger transactions; sending at most this many entries per bundle");
        }
    }

    /// The EHR's `Retry-After` (seconds) as waited for: at most `retry_after_max`.
    fn honoured(&self, retry_after: Option<u32>) -> Option<Duration> {
        retry_after.map(|seconds| {
            Duration::from_secs(u64::from(seconds)).min(self.settings.retry_after_max)
        })
    }

    fn health_of(&self, error: &DeliveryError) -> Health {
        match error {
            DeliveryError::Rejected { .. }
            | DeliveryError::Unroutable { .. }
            | DeliveryError::WaveformsNotTaken { .. }
            | DeliveryError::CorrectionsRefused { .. }
            | DeliveryError::UnknownResources { .. }
            | DeliveryError::Unsupported(_)
            | DeliveryError::Unresolved { .. }
            | DeliveryError::Busy
            | DeliveryError::Backlog { .. } => Health::Up,
            DeliveryError::Unavailable { retry_after, .. } => Health::Down {
                retry_after: self.honoured(*retry_after),
            },
            DeliveryError::Misconfigured {
                destination,
                reason,
            } => {
                tracing::error!(%destination, %reason, "destination refuses the gateway's connection; fix the configuration (paused)");
                Health::Misconfigured
            }
        }
    }

    /// What one failed attempt means for a message that had `attempts` before it.
    fn reschedule(&self, attempts: u32, error: &DeliveryError) -> Settle {
        let now = now_ms();
        match error {
            DeliveryError::Rejected {
                status, outcome, ..
            } => Settle::Dead {
                error: format!("refused by the destination with HTTP {}", status.as_u16()),
                outcome: outcome.as_ref().map(|o| o.to_string()),
            },
            DeliveryError::Unroutable { resource_type } => Settle::Dead {
                error: format!("no destination takes {resource_type}"),
                outcome: None,
            },
            DeliveryError::CorrectionsRefused { .. }
            | DeliveryError::WaveformsNotTaken { .. }
            | DeliveryError::UnknownResources { .. }
            | DeliveryError::Unsupported(_)
            | DeliveryError::Unresolved { hold: false, .. } => Settle::Dead {
                error: error.to_string(),
                outcome: None,
            },
            // Held: tried again with backoff, on the message's own budget.
            DeliveryError::Unresolved {
                reason, hold: true, ..
            } => self.retry_later(attempts, "held through", reason, None),
            // The gateway's own queue, not the EHR: tried again soon, no attempt spent.
            DeliveryError::Busy | DeliveryError::Backlog { .. } => Settle::Postpone {
                at_ms: now + 1000,
                error: error.to_string(),
            },
            // Due again at once: the pause is the breaker's, in this process, so a restart
            // with a mended configuration sends without waiting it out.
            DeliveryError::Misconfigured { reason, .. } => Settle::Postpone {
                at_ms: now,
                error: reason.clone(),
            },
            DeliveryError::Unavailable {
                reason,
                retry_after,
                ..
            } => self.retry_later(attempts, "gave up after", reason, *retry_after),
        }
    }

    /// Another attempt after the backoff (and the EHR's `Retry-After`, as honoured), or a dead
    /// letter once the message's attempts are used up (`why` says how it ended).
    fn retry_later(
        &self,
        attempts: u32,
        why: &str,
        reason: &str,
        retry_after: Option<u32>,
    ) -> Settle {
        if attempts + 1 >= self.settings.message_attempts {
            return Settle::Dead {
                error: format!("{why} {} attempts; last: {reason}", attempts + 1),
                outcome: None,
            };
        }
        let backoff = backoff(
            attempts + 1,
            self.settings.backoff_base,
            self.settings.backoff_max,
        );
        let after = self.honoured(retry_after).unwrap_or_default();
        Settle::Retry {
            at_ms: now_ms() + backoff.max(after).as_millis() as i64,
            error: reason.to_owned(),
        }
    }
}

/// What is left of a batch once its destination is down or refuses the connection: not sent
/// now (sending it would ignore the EHR's `Retry-After` and the breaker), due again as soon
/// as the breaker lets the worker send, without spending an attempt. Parts of a refused
/// transaction may hold messages already settled; those keep their outcome.
fn leave_unsent(part: &[(i64, u32, MappedResource)], outcomes: &mut Vec<(i64, Settle)>) {
    let settled: HashSet<i64> = outcomes.iter().map(|(id, _)| *id).collect();
    let at_ms = now_ms();
    outcomes.extend(
        part.iter()
            .filter(|(id, _, _)| !settled.contains(id))
            .map(|(id, _, _)| {
                (
                    *id,
                    Settle::Postpone {
                        at_ms,
                        error: UNSENT.to_owned(),
                    },
                )
            }),
    );
}

/// The reason a message left unsent carries until it is sent.
const UNSENT: &str = "not sent yet: the destination failed earlier in the same batch";

/// Counts settled messages by outcome (`crate::metrics`).
fn count_outcomes(destination: &str, outcomes: &[(i64, Settle)]) {
    let metrics = crate::metrics::metrics();
    for (_, settle) in outcomes {
        let outcome = match settle {
            Settle::Delivered { .. } => "delivered",
            Settle::Retry { .. } => "retry",
            Settle::Postpone { .. } => "postponed",
            Settle::Dead { .. } => "dead",
        };
        metrics
            .deliveries
            .get_or_create(&crate::metrics::DestinationOutcome {
                destination: destination.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// Exponential backoff with "equal jitter": between half and all of `base * 2^(attempt-1)`,
/// capped at `max`. Computed here rather than by tower's backoff because the delay is stored
/// with the message and must survive a restart.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    exp / 2 + exp.mul_f64(fastrand::f64() / 2.0)
}

fn resource_of(p: &Pending) -> Option<MappedResource> {
    Some(MappedResource {
        resource_type: mappings::resource_type_name(&p.resource_type)?,
        id: p.logical_id.clone(),
        identifier_system: if p.identifier_system == mappings::OBSERVATION_IDENTIFIER_SYSTEM {
            mappings::OBSERVATION_IDENTIFIER_SYSTEM.into()
        } else {
            p.identifier_system.clone().into()
        },
        identifier_value: p.identifier_value.clone(),
        json: p.body.clone(),
        upsert: p.upsert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        for attempt in 1..10 {
            let exp = base.saturating_mul(1 << (attempt - 1)).min(max);
            let b = backoff(attempt, base, max);
            assert!(b >= exp / 2 && b <= exp, "{attempt}: {b:?}");
        }
        assert!(backoff(40, base, max) <= max);
    }
}
