//! The retention schedule: deletes what the outbox no longer needs to keep (delivered messages
//! and dead letters past their keeping time) and gives the space back, so the file neither
//! grows forever nor holds patient data longer than configured.

use std::sync::Arc;
use std::time::Duration;

use super::{Outbox, Retention, now_ms};

/// How long the outbox keeps what is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delivered messages (already stretched to the correction window: see [`Self::new`]).
    pub keep_delivered: Duration,
    pub keep_dead: Duration,
}

impl RetentionPolicy {
    /// A delivered reading is kept while a correction of it can still be accepted (a reading
    /// is taken up to `correction_window` after its time): forgetting it sooner would let a
    /// changed value pass for a new reading, which the EHR's conditional create drops.
    pub fn new(keep_delivered: Duration, keep_dead: Duration, correction_window: Duration) -> Self {
        Self {
            keep_delivered: keep_delivered.max(correction_window),
            keep_dead,
        }
    }

    /// The cut-offs of a pass at `now_ms`.
    pub fn at(&self, now_ms: i64) -> Retention {
        let before = |keep: Duration| now_ms.saturating_sub(keep.as_millis() as i64);
        Retention {
            delivered_before_ms: before(self.keep_delivered),
            dead_before_ms: before(self.keep_dead),
        }
    }

    /// Often enough that nothing stays much past its time, seldom enough to cost nothing: a
    /// tenth of the shorter keeping time, between 1 s and 5 min.
    pub fn period(&self) -> Duration {
        (self.keep_delivered.min(self.keep_dead) / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// Runs a pass at start and then every [`RetentionPolicy::period`] until `stopped`.
pub async fn run(
    outbox: Arc<dyn Outbox>,
    policy: RetentionPolicy,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(policy.period());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        match outbox.purge(policy.at(now_ms())).await {
            Ok(purged) => {
                if purged.dead > 0 {
                    tracing::warn!(
                        dead_letters = purged.dead,
                        keep_dead_s = policy.keep_dead.as_secs(),
                        "dead letters past keep_dead deleted without being delivered"
                    );
                }
                if purged.delivered > 0 || purged.pages_freed > 0 {
                    tracing::info!(
                        delivered = purged.delivered,
                        pages_freed = purged.pages_freed,
                        "outbox retention pass"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox retention pass failed; the next one retries")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn delivered_readings_are_kept_through_the_correction_window() {
        let policy = RetentionPolicy::new(Duration::from_secs(60), DAY, DAY);
        assert_eq!(policy.keep_delivered, DAY);
        let policy = RetentionPolicy::new(7 * DAY, DAY, DAY);
        assert_eq!(policy.keep_delivered, 7 * DAY);
    }

    #[test]
    fn cut_offs_and_period_follow_the_keeping_times() {
        let policy = RetentionPolicy::new(7 * DAY, 30 * DAY, DAY);
        let now = 100 * DAY.as_millis() as i64;
        assert_eq!(
            policy.at(now),
            Retention {
                delivered_before_ms: 93 * DAY.as_millis() as i64,
                dead_before_ms: 70 * DAY.as_millis() as i64,
            }
        );
        assert_eq!(policy.period(), Duration::from_secs(300));
        let short = RetentionPolicy::new(Duration::from_secs(2), DAY, Duration::ZERO);
        assert_eq!(short.period(), Duration::from_secs(1));
    }
}
