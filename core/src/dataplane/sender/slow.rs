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

/// Weight of one report in a receiver's smoothed loss. Reports come every
/// feedback interval (20 ms by default), so about 10 of them make up most
/// of it: a receiver that lost everything for a moment (starved of CPU,
/// a link flap: one report's interval) stays under the threshold, while
/// 80 % loss passes it within 2 reports and 20 % within about 7.
const LOSS_WEIGHT: f64 = 0.1;
/// Reports a receiver's loss must rest on before it can fall behind.
const MIN_SAMPLES: u32 = 5;
/// A member falls behind only above this loss ...
const BEHIND_MIN_LOSS: f64 = 0.10;
/// ... and above twice the best keeping-up member's loss plus this: equal
/// members on a lossy network all keep up (the rate and the repair follow
/// them, as before), one far worse than the others falls behind.
const BEHIND_MARGIN: f64 = 0.05;
/// A member behind whose loss came back under this (and near the best
/// keeping-up member's) rejoins the wave: what held it has passed, and
/// its backlog is repaired like a late joiner's.
const REJOIN_LOSS: f64 = 0.075;
/// A member catching up is sent to at what it took of the rate then, times
/// this (a little above, so the rate control finds its ceiling from there
/// instead of from the full rate).
const CATCH_UP_HEADROOM: f64 = 1.1;

impl ReceiverInfo {
    /// One report's loss over its interval.
    pub(super) fn took_loss(&mut self, loss: f64) {
        // From 0, not from the first report: a member's first intervals
        // (joining mid-burst) must not make it look lossy for the next
        // 20 reports.
        self.loss += LOSS_WEIGHT * (loss - self.loss);
        self.loss_samples = self.loss_samples.saturating_add(1);
        self.interval_loss = self.interval_loss.max(loss);
    }

    /// It fell behind the others and is not done: waiting for its
    /// catch-up, or in it (what operators are shown).
    pub fn is_behind(&self) -> bool {
        self.fell_behind && !self.state.terminal()
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
            let recovered: Vec<u32> = self
                .receivers
                .iter()
                .filter(|(_, r)| {
                    r.behind
                        && r.state == RxState::Ready
                        && r.loss < REJOIN_LOSS
                        && r.loss <= best + BEHIND_MARGIN
                })
                .map(|(id, _)| *id)
                .collect();
            for id in recovered {
                self.rejoin(id);
            }
        }
        let behind = self
            .receivers
            .values()
            .filter(|r| r.behind && !r.state.terminal())
            .count();
        let keeping_up = self
            .receivers
            .values()
            .filter(|r| !r.behind && !r.state.terminal())
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

    /// A member behind keeps up again: its reports are planned and its
    /// loss sets the rate as before, and it no longer counts as behind.
    fn rejoin(&mut self, id: u32) {
        let Some(r) = self.receivers.get_mut(&id) else {
            return;
        };
        r.behind = false;
        r.fell_behind = false;
        self.stats.rejoined += 1;
        self.wait_for.0 = None;
        tracing::info!(
            receiver = id,
            name = %r.name,
            loss_pct = r.loss * 100.0,
            "member behind keeps up again; it rejoins the wave"
        );
    }

    /// No member keeps up any more: serve those behind, from the rate the
    /// best of them took (unless that was random loss the rate control
    /// ignores anyway), measuring their loss afresh.
    fn catch_up(&mut self, now: Instant) {
        let took = self
            .receivers
            .values()
            .filter(|r| r.behind && !r.state.terminal())
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
            .filter(|r| r.behind && !r.state.terminal())
        {
            r.behind = false;
            r.loss = 0.0;
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
