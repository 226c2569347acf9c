//! Retry delays, sans-IO: how long to wait after a failure, growing while
//! failures continue and back to the start after a success.
//!
//! Owns: the delay arithmetic every reconnect loop shares (the
//! `io::conn::Dialer`'s attempt windows, the receiver's connect
//! to a wave sender, the agent's connection to the appliance). Must not:
//! sleep or read a clock; callers pass `now` and do the waiting.

use std::time::{Duration, Instant};

/// Delays between attempts: `first` while failures have lasted less than
/// `steady`, then each failure multiplies the delay by `growth_pct / 100`,
/// up to `max`. [`Backoff::succeeded`] starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    growth_pct: u32,
    steady: Duration,
    delay: Duration,
    failing_since: Option<Instant>,
}

impl Backoff {
    /// Starts at `first`, grows by `growth_pct` percent per failure (200:
    /// doubles) up to `max`.
    pub fn new(first: Duration, max: Duration, growth_pct: u32) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            growth_pct: growth_pct.max(100),
            steady: Duration::ZERO,
            delay: first,
            failing_since: None,
        }
    }

    /// Keep the first delay until failures have lasted `steady` (a peer
    /// that is expected to come up any moment is retried at full pace).
    pub fn steady_for(mut self, steady: Duration) -> Backoff {
        self.steady = steady;
        self
    }

    /// The delay the next failure waits (or the window of the next
    /// attempt), without counting a failure.
    pub fn current(&self) -> Duration {
        self.delay
    }

    /// A failure at `now`: returns how long to wait before the next
    /// attempt, and grows the delay for the one after.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let since = *self.failing_since.get_or_insert(now);
        let d = self.delay;
        if now.saturating_duration_since(since) >= self.steady {
            let grown = d.saturating_mul(self.growth_pct) / 100;
            self.delay = grown.min(self.max);
        }
        d
    }

    /// How long failures have lasted (zero after a success).
    pub fn failing_for(&self, now: Instant) -> Duration {
        self.failing_since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }

    /// A success: the next failure waits `first` again.
    pub fn succeeded(&mut self) {
        self.delay = self.first;
        self.failing_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let t = Instant::now();
        let mut b = Backoff::new(200 * MS, 5000 * MS, 200);
        let waits: Vec<u128> = (0..7).map(|_| b.failed(t).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.current(), 5000 * MS);
        b.succeeded();
        assert_eq!(b.failed(t), 200 * MS);
        assert_eq!(b.current(), 400 * MS);
    }

    #[test]
    fn steady_keeps_the_first_delay_until_failures_lasted_that_long() {
        let t = Instant::now();
        let mut b = Backoff::new(20 * MS, 1000 * MS, 150).steady_for(2000 * MS);
        for i in 0..100 {
            assert_eq!(b.failed(t + i * 20 * MS), 20 * MS, "failure {i}");
        }
        assert_eq!(b.failing_for(t + 1999 * MS), 1999 * MS);
        // Past 2 s of failures it grows by half per failure, to the cap.
        assert_eq!(b.failed(t + 2000 * MS), 20 * MS);
        assert_eq!(b.failed(t + 2020 * MS), 30 * MS);
        assert_eq!(b.failed(t + 2050 * MS), 45 * MS);
        let mut last = Duration::ZERO;
        for i in 0..40 {
            last = b.failed(t + 3000 * MS + i * MS);
        }
        assert_eq!(last, 1000 * MS);
        b.succeeded();
        assert_eq!(b.failing_for(t + 5000 * MS), Duration::ZERO);
        assert_eq!(b.failed(t + 5000 * MS), 20 * MS);
    }
}
