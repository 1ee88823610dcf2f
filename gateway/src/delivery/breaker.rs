//! A circuit breaker per destination: after `threshold` failed sends in a row the worker stops
//! sending for a cool-down, then sends one batch as a probe; each failed probe doubles the
//! cool-down up to a ceiling, the first success closes the breaker. A dead EHR gets a probe
//! now and then instead of a stream of requests.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
    consecutive_failures: u32,
    cooldown: Duration,
    open_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, base_cooldown: Duration, max_cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            base_cooldown,
            max_cooldown: max_cooldown.max(base_cooldown),
            consecutive_failures: 0,
            cooldown: base_cooldown,
            open_until: None,
        }
    }

    /// How long to hold off before the next send, if the breaker is open.
    pub fn blocked_for(&self) -> Option<Duration> {
        let until = self.open_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    pub fn state(&self) -> BreakerState {
        if self.blocked_for().is_some() {
            BreakerState::Open
        } else {
            BreakerState::Closed
        }
    }

    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.cooldown = self.base_cooldown;
        self.open_until = None;
    }

    pub fn record_failure(&mut self) {
        self.consecutive_failures += 1;
        if self.consecutive_failures >= self.threshold {
            self.open_for(self.cooldown);
            self.cooldown = (self.cooldown * 2).min(self.max_cooldown);
        }
    }

    /// Opens for at least `duration` (an EHR's Retry-After, or a configuration error).
    pub fn open_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        if self.open_until.is_none_or(|current| current < until) {
            self.open_until = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_backs_off_on_failed_probes() {
        let mut breaker = CircuitBreaker::new(3, Duration::from_secs(1), Duration::from_secs(4));
        breaker.record_failure();
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record_failure();
        assert_eq!(breaker.blocked_for(), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.state(), BreakerState::Closed, "probe allowed");
        breaker.record_failure();
        assert_eq!(breaker.blocked_for(), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(2)).await;
        breaker.record_failure();
        assert_eq!(breaker.blocked_for(), Some(Duration::from_secs(4)));
        tokio::time::advance(Duration::from_secs(4)).await;
        breaker.record_failure();
        assert_eq!(
            breaker.blocked_for(),
            Some(Duration::from_secs(4)),
            "ceiling"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        breaker.record_success();
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
