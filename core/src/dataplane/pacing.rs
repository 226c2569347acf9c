//! Pacing: a `now`-driven token bucket and the loss-driven rate controller.
//!
//! Owns: how many bytes may leave at a given instant, and how the wave rate
//! reacts to receiver loss reports. Must not: sleep, read clocks or touch
//! sockets; callers pass `now` and do the waiting.
//!
//! Rate control (documented in README): every report interval the sender
//! passes the worst receiver's loss fraction over that interval. Above
//! `loss_threshold` the rate is cut multiplicatively (x0.85, not below
//! `min_rate`); at or below `loss_threshold / 2` it grows back additively by
//! 5 % of the configured rate per interval up to the configured ceiling.
//! Random link loss below the threshold is repaired by FEC and never slows a
//! wave; only loss that looks like congestion does.

use std::time::{Duration, Instant};

/// Token bucket in bytes. Tokens accrue at `rate` bytes/s up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate_bps` in bits per second; `burst` in bytes.
    pub fn new(rate_bps: u64, burst: usize, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate_bps as f64 / 8.0,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Change the rate from `now` on (tokens earned so far are kept).
    pub fn set_rate(&mut self, rate_bps: u64, now: Instant) {
        self.refill(now);
        self.rate = rate_bps as f64 / 8.0;
    }

    /// The current rate, bits/s.
    pub fn rate_bps(&self) -> u64 {
        (self.rate * 8.0) as u64
    }

    /// How many packets of `size` bytes may go now (at most `max`); the
    /// tokens for them are taken.
    pub fn take(&mut self, now: Instant, size: usize, max: usize) -> usize {
        let n = self.available(now, size, max);
        self.consume(n * size);
        n
    }

    /// How many packets of `size` bytes could go now (at most `max`),
    /// without taking tokens.
    pub fn available(&mut self, now: Instant, size: usize, max: usize) -> usize {
        self.refill(now);
        ((self.tokens / size as f64).floor() as usize).min(max)
    }

    /// Pay for `bytes` that left.
    pub fn consume(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// Time until one packet of `size` bytes may go.
    pub fn wait_for(&mut self, now: Instant, size: usize) -> Duration {
        self.refill(now);
        let short = size as f64 - self.tokens;
        if short <= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.rate)
        }
    }
}

/// Loss-driven rate adjustment between `min_rate` and `max_rate` (bit/s).
#[derive(Debug, Clone)]
pub struct RateController {
    max_rate: u64,
    min_rate: u64,
    loss_threshold: f64,
    current: u64,
}

impl RateController {
    /// A controller between `min_rate` and `max_rate`, cutting when the worst loss exceeds `loss_threshold`.
    pub fn new(max_rate: u64, min_rate: u64, loss_threshold: f64) -> RateController {
        RateController {
            max_rate,
            min_rate: min_rate.min(max_rate),
            loss_threshold,
            current: max_rate,
        }
    }

    /// The rate it allows now, bits/s.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// New ceiling (waves sharing a total rate are re-split when one starts
    /// or ends): the current rate drops to it at once and climbs to it as
    /// usual.
    pub fn set_max_rate(&mut self, max_rate: u64) {
        self.max_rate = max_rate.max(1);
        self.min_rate = self.min_rate.min(self.max_rate);
        self.current = self.current.min(self.max_rate);
    }

    /// Start again from `bps` (within the floor and the ceiling); returns
    /// the rate set.
    pub fn set_current(&mut self, bps: u64) -> u64 {
        self.current = bps.clamp(self.min_rate, self.max_rate);
        self.current
    }

    /// Feed the worst receiver loss fraction of the last interval; returns
    /// the new rate.
    pub fn on_interval(&mut self, worst_loss: f64) -> u64 {
        if worst_loss > self.loss_threshold {
            self.current = ((self.current as f64 * 0.85) as u64).max(self.min_rate);
        } else if worst_loss <= self.loss_threshold / 2.0 {
            self.current = (self.current + self.max_rate / 20).min(self.max_rate);
        }
        self.current
    }
}

#[cfg(test)]
mod rate_ceiling_tests {
    use super::*;

    #[test]
    fn ceiling_applies_at_once_and_rate_climbs_back_to_it() {
        let mut r = RateController::new(1_000_000_000, 10_000_000, 0.25);
        r.set_max_rate(400_000_000);
        assert_eq!(r.current(), 400_000_000);
        assert_eq!(r.on_interval(0.5), 340_000_000);
        for _ in 0..10 {
            r.on_interval(0.0);
        }
        assert_eq!(r.current(), 400_000_000);
        r.set_max_rate(800_000_000);
        assert_eq!(r.current(), 400_000_000);
        assert_eq!(r.on_interval(0.0), 440_000_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_rate() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s, burst of 10 packets of 1000 bytes.
        let mut b = TokenBucket::new(8_000_000, 10_000, t0);
        assert_eq!(b.take(t0, 1000, 64), 10);
        assert_eq!(b.take(t0, 1000, 64), 0);
        assert_eq!(b.wait_for(t0, 1000), Duration::from_millis(1));
        // Over one simulated second exactly 1000 more packets go.
        let mut sent = 0;
        for ms in 1..=1000u64 {
            sent += b.take(t0 + Duration::from_millis(ms), 1000, 64);
        }
        assert_eq!(sent, 1000);
        // A long idle gap refills only up to the burst.
        assert_eq!(b.take(t0 + Duration::from_secs(60), 1000, 1000), 10);
    }

    #[test]
    fn bucket_respects_max_and_rate_change() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(8_000_000, 100_000, t0);
        assert_eq!(b.take(t0, 1000, 32), 32);
        b.set_rate(16_000_000, t0);
        assert_eq!(b.rate_bps(), 16_000_000);
        let _ = b.take(t0, 1000, 1000);
        assert_eq!(b.take(t0 + Duration::from_millis(10), 1000, 1000), 20);
    }

    #[test]
    fn controller_cuts_and_recovers() {
        let mut c = RateController::new(500_000_000, 50_000_000, 0.10);
        assert_eq!(c.on_interval(0.05), 500_000_000);
        assert_eq!(c.on_interval(0.2), 425_000_000);
        // Between threshold/2 and threshold: hold.
        assert_eq!(c.on_interval(0.08), 425_000_000);
        for _ in 0..40 {
            c.on_interval(0.5);
        }
        assert_eq!(c.current(), 50_000_000);
        for _ in 0..40 {
            c.on_interval(0.0);
        }
        assert_eq!(c.current(), 500_000_000);
    }
}
