//! Members that cannot keep up (see [`SlowMembers`]): each receiver's
//! smoothed loss, falling behind, and catching up those behind once the
//! others are done.
//!
//! Owns: `ReceiverInfo::{loss, behind}` and which receivers' loss sets the
//! wave's rate. Must not: plan repair (the repair module skips the reports
//! of members behind) or pick symbols.
//!
//! Why this and not layered multicast: a fountain code makes every symbol
//! useful to every receiver that lacks its block, so a member behind keeps
//! whatever share of the wave reaches it through its slow port or lossy
//! cable, and only the rest is sent again, at its own rate, after the
//! others are done. Its total is about the image at its own rate; the
//! others never wait. Layers would also spare the slow port the traffic
//! it drops, at the cost of per-layer groups, joins and a rate ladder
//! whose steps decide how close to its port a slow member gets.

use std::time::Instant;

use super::{Phase, ReceiverInfo, RxState, SlowMembers, WaveSender};

/// Weight of one report in a receiver's smoothed loss (reports come every
/// feedback interval, 20 ms by default: ~5 reports make up most of it).
const LOSS_WEIGHT: f64 = 0.2;
/// Reports a receiver's loss must rest on before it can fall behind.
const MIN_SAMPLES: u32 = 5;
/// A member falls behind only above this loss ...
const BEHIND_MIN_LOSS: f64 = 0.10;
/// ... and above twice the best keeping-up member's loss plus this: equal
/// members on a lossy network all keep up (the rate and the repair follow
/// them, as before), one far worse than the others falls behind.
const BEHIND_MARGIN: f64 = 0.05;
/// A member catching up is sent to at what it took of the rate then, times
/// this (a little above, so the rate control finds its ceiling from there
/// instead of from the full rate).
const CATCH_UP_HEADROOM: f64 = 1.1;

impl ReceiverInfo {
    /// One report's loss over its interval.
    pub(super) fn took_loss(&mut self, loss: f64) {
        self.loss = if self.loss_samples == 0 {
            loss
        } else {
            self.loss + LOSS_WEIGHT * (loss - self.loss)
        };
        self.loss_samples = self.loss_samples.saturating_add(1);
        self.interval_loss = self.interval_loss.max(loss);
    }

    fn active(&self) -> bool {
        !self.state.terminal()
    }
}

impl WaveSender {
    /// The worst loss since the last call among the receivers whose loss
    /// sets the rate (all of them, or those keeping up); starts the next
    /// interval.
    pub(super) fn take_worst_loss(&mut self) -> f64 {
        let mut worst = 0.0f64;
        for r in self.receivers.values_mut() {
            if !r.behind {
                worst = worst.max(r.interval_loss);
            }
            r.interval_loss = 0.0;
        }
        worst
    }

    /// Members whose loss is far above the best keeping-up member's fall
    /// behind (or are dropped, by policy); once none keeps up any more,
    /// those behind are caught up.
    pub(super) fn sort_out_slow(&mut self, now: Instant) {
        if self.cfg.slow_members == SlowMembers::Wait || self.phase != Phase::Sending {
            return;
        }
        let measured = |r: &ReceiverInfo| {
            r.state == RxState::Ready && !r.behind && r.loss_samples >= MIN_SAMPLES
        };
        let best = self
            .receivers
            .values()
            .filter(|r| measured(r))
            .map(|r| r.loss)
            .fold(f64::INFINITY, f64::min);
        if best.is_finite() {
            let slow: Vec<(u32, f64)> = self
                .receivers
                .iter()
                .filter(|(_, r)| {
                    measured(r) && r.loss > BEHIND_MIN_LOSS && r.loss > 2.0 * best + BEHIND_MARGIN
                })
                .map(|(id, r)| (*id, r.loss))
                .collect();
            for (id, loss) in slow {
                self.fall_behind(id, loss, best, now);
            }
        }
        let behind = self
            .receivers
            .values()
            .filter(|r| r.behind && r.active())
            .count();
        let keeping_up = self
            .receivers
            .values()
            .filter(|r| !r.behind && r.active())
            .count();
        if behind > 0 && keeping_up == 0 && self.pending_members() == 0 {
            self.catch_up(now);
        }
    }

    fn fall_behind(&mut self, id: u32, loss: f64, best: f64, now: Instant) {
        let Some(r) = self.receivers.get_mut(&id) else {
            return;
        };
        if self.cfg.slow_members == SlowMembers::Drop {
            let why = format!(
                "fell behind the wave: {:.0} % loss against {:.0} % for the best member",
                loss * 100.0,
                best * 100.0
            );
            self.fail(id, why, now);
            return;
        }
        r.behind = true;
        r.fell_behind = true;
        self.stats.fell_behind += 1;
        tracing::warn!(
            receiver = id,
            name = %r.name,
            loss_pct = loss * 100.0,
            best_pct = best * 100.0,
            "member fell behind the wave; it keeps what reaches it and catches up after the others"
        );
        // Its needs already waiting for a plan would hold that plan.
        for b in std::mem::take(&mut self.coding_wait) {
            let bs = &mut self.blocks[b as usize];
            bs.needs.remove(&id);
            bs.heard.remove(&id);
            if bs.needs.is_empty() {
                bs.need_since = None;
            } else {
                self.coding_wait.push(b);
            }
        }
        self.wait_for.0 = None;
    }

    /// No member keeps up any more: serve those behind, from the rate the
    /// best of them took (unless that was random loss the rate control
    /// ignores anyway), measuring their loss afresh.
    fn catch_up(&mut self, now: Instant) {
        let took = self
            .receivers
            .values()
            .filter(|r| r.behind && r.active())
            .map(|r| 1.0 - r.loss)
            .fold(0.0f64, f64::max);
        let rate = self.bucket.rate_bps();
        if took < 1.0 - self.cfg.loss_threshold {
            let r = self
                .rate
                .set_current((rate as f64 * took * CATCH_UP_HEADROOM) as u64);
            self.bucket.set_rate(r, now);
            self.stats.rate_bps = r;
        }
        let mut names = Vec::new();
        for r in self
            .receivers
            .values_mut()
            .filter(|r| r.behind && r.active())
        {
            r.behind = false;
            r.loss_samples = 0;
            r.interval_loss = 0.0;
            names.push(r.name.clone());
        }
        self.stats.caught_up += names.len() as u64;
        self.wait_for.0 = None;
        tracing::info!(
            members = %names.join(" "),
            rate_bps = self.bucket.rate_bps(),
            "the members keeping up are done; catching up the ones behind"
        );
    }
}
