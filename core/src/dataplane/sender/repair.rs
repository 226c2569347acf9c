//! Repair planning: receivers' reports turned into coded resends of the
//! exact missing source symbols (paired across receivers, see `coding`)
//! or fresh RaptorQ repair symbols, and the transmits that carry them.
//!
//! Owns: when a report counts (`seq_hi` past the block's last symbol),
//! how long a block's needs wait for the other receivers, the choice
//! between coded resends and fountain repair, and the resend/repair
//! queues. Must not: pick source symbols (the schedule does).

use std::time::Instant;

use super::{Action, EncState, RxState, Tx, WaveSender};
use crate::wire::control::{Msg, Status};
use crate::wire::packet::seq_ge;

impl WaveSender {
    pub(super) fn on_status(&mut self, id: u32, st: Status, now: Instant) {
        // Blocks past the source frontier cannot be due yet: don't walk them
        // (a new receiver reports the whole image as missing).
        let frontier = self.source_frontier();
        let Some(rx) = self.receivers.get_mut(&id) else {
            return;
        };
        // Loss over the interval since this receiver's previous report.
        let dr = st.received.saturating_sub(rx.prev_received);
        let de = st.expected.saturating_sub(rx.prev_expected);
        if de >= 50 {
            rx.took_loss(1.0 - (dr as f64 / de as f64).min(1.0));
        }
        rx.prev_received = st.received;
        rx.prev_expected = st.expected;
        let became_ready = matches!(rx.state, RxState::Joining);
        let first_packet = st.seen_any && !rx.status.seen_any;
        if became_ready {
            rx.state = RxState::Ready;
        }
        if became_ready || first_packet {
            self.wait_for.0 = None;
        }
        if rx.behind {
            // Its needs wait for its catch-up: planning them now would
            // spend the others' rate on what it cannot take anyway.
            rx.status = st;
            return;
        }
        // (block, shortfall, exact missing source ESIs if known)
        let mut want: Vec<(u32, u32, Option<Vec<u32>>)> = Vec::new();
        if st.seen_any {
            let mut gaps = st.source_gaps.iter().peekable();
            for &(b, short) in &st.partial {
                let bi = b as usize;
                while gaps.peek().is_some_and(|(g, _)| *g < b) {
                    gaps.next();
                }
                let g = match gaps.peek() {
                    Some((g, bits)) if *g == b && bi < self.blocks.len() => {
                        gap_esis(bits, self.blocks[bi].k)
                    }
                    _ => None,
                };
                if bi < self.blocks.len()
                    && self.blocks[bi].source_done
                    && seq_ge(st.seq_hi, self.blocks[bi].last_seq)
                {
                    want.push((b, short.min(self.blocks[bi].k), g));
                }
            }
        }
        for &(first, len) in &st.missing {
            let end = first.saturating_add(len).min(frontier);
            for b in first..end {
                let bi = b as usize;
                if self.manifest.blocks[bi].zero || !self.blocks[bi].source_done {
                    continue;
                }
                // A block with nothing received: either all its packets
                // were lost after the receiver joined, or it joined late.
                if !st.seen_any || seq_ge(st.seq_hi, self.blocks[bi].last_seq) {
                    want.push((b, self.blocks[bi].k, Some((0..self.blocks[bi].k).collect())));
                }
            }
        }
        // This report is past every waiting block it has seen the end of.
        for &b in &self.coding_wait {
            let bi = b as usize;
            if seq_ge(st.seq_hi, self.blocks[bi].last_seq) {
                self.blocks[bi].heard.insert(id);
            }
        }
        rx.status = st;
        for (b, short, gaps) in want {
            self.schedule(id, b, short, gaps, now);
        }
        self.plan_due(now);
    }

    pub(super) fn margin(&self, short: u32) -> u32 {
        short + self.cfg.repair_margin + (short as f64 * self.cfg.repair_margin_frac).ceil() as u32
    }

    /// Receiver `rx`'s need for block `b`: its missing source symbols wait
    /// for the other receivers' (coded resends); without a list, fountain
    /// repair.
    pub(super) fn schedule(
        &mut self,
        rx: u32,
        b: u32,
        short: u32,
        gaps: Option<Vec<u32>>,
        now: Instant,
    ) {
        let bi = b as usize;
        self.blocks[bi].max_short = self.blocks[bi].max_short.max(short);
        if let Some(g) = gaps {
            if self.cfg.source_resend_factor > 0.0 && self.blocks[bi].pending_repair == 0 {
                if !self.blocks[bi].resend.is_empty() {
                    // The last round of `b` is still queued: what this
                    // report misses is mostly not even sent yet. Its next
                    // report past that round counts.
                    return;
                }
                let k = self.blocks[bi].k;
                self.blocks[bi]
                    .needs
                    .insert(rx, g.into_iter().filter(|e| *e < k).collect());
                self.blocks[bi].heard.insert(rx);
                if self.blocks[bi].need_since.is_none() {
                    self.blocks[bi].need_since = Some(now);
                    self.coding_wait.push(b);
                }
                if !self.blocks[bi].loaded && !self.blocks[bi].load_requested {
                    self.blocks[bi].load_requested = true;
                    self.actions.push_back(Action::Load(b));
                }
                return;
            }
        }
        let n = self.margin(self.blocks[bi].max_short);
        self.schedule_repair(b, n);
    }

    /// Plan the coded resends of every waiting block that every live
    /// receiver reported past, or whose hold expired.
    pub(super) fn plan_due(&mut self, now: Instant) {
        if self.coding_wait.is_empty() {
            return;
        }
        if !self.wait_set_fresh(now) {
            self.refresh_wait_set(now);
        }
        let hold = self.cfg.coding_hold;
        let due: Vec<u32> = self
            .coding_wait
            .iter()
            .copied()
            .filter(|&b| {
                let bi = b as usize;
                // `heard` holds receiver ids: fewer of them than the wait
                // set cannot cover it, so the walk over the wait set (O(N))
                // runs about once per block and round, not on every report.
                let heard = &self.blocks[bi].heard;
                (heard.len() >= self.wait_for.1.len()
                    && self.wait_for.1.iter().all(|id| heard.contains(id)))
                    || self.blocks[bi]
                        .need_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= hold)
            })
            .collect();
        if due.is_empty() {
            return;
        }
        for b in due {
            self.coding_wait.retain(|x| *x != b);
            self.plan_block(b);
        }
    }

    pub(super) fn plan_block(&mut self, b: u32) {
        let bi = b as usize;
        let needs = std::mem::take(&mut self.blocks[bi].needs);
        tracing::debug!(
            block = b,
            receivers = needs.len(),
            heard = self.blocks[bi].heard.len(),
            waiting_for = self.wait_for.1.len(),
            "planning resends"
        );
        self.blocks[bi].heard.clear();
        self.blocks[bi].need_since = None;
        if self.blocks[bi].pending_repair > 0 {
            return;
        }
        // Many receivers short on one block: one fountain symbol serves
        // them all, and pairing that many would cost more than it saves.
        let Some(combos) = crate::dataplane::coding::plan(&needs) else {
            let n = self.margin(self.blocks[bi].max_short);
            self.schedule_repair(b, n);
            return;
        };
        if combos.is_empty() {
            return;
        }
        let limit = self.cfg.source_resend_factor * self.blocks[bi].max_short as f64
            + self.cfg.repair_margin as f64;
        if combos.len() as f64 > limit {
            let n = self.margin(self.blocks[bi].max_short);
            self.schedule_repair(b, n);
            return;
        }
        // Announce the multi-symbol combinations before they are sent:
        // ids are numbered in plan order, singles (plain resends) skipped.
        let coded: Vec<Vec<u32>> = combos.iter().filter(|c| c.len() > 1).cloned().collect();
        let first = self.blocks[bi].next_combo;
        if !coded.is_empty() {
            self.blocks[bi].next_combo = first.saturating_add(coded.len() as u32);
            // Only the receivers whose needs the plan covers can use it
            // (at most `coding::MAX_RECEIVERS`): the others have the
            // block, or will get a plan of their own after their next
            // report. So a plan costs O(its receivers), never O(wave).
            let to: Vec<u32> = needs
                .keys()
                .copied()
                .filter(|id| {
                    self.receivers
                        .get(id)
                        .is_some_and(|r| r.state == RxState::Ready)
                })
                .collect();
            for id in to {
                self.actions.push_back(Action::Control(
                    id,
                    Msg::Coded {
                        block: b,
                        first,
                        combos: coded.clone(),
                    },
                ));
            }
        }
        if self.blocks[bi].resend.is_empty() {
            self.resend_queue.push_back(b);
        }
        let mut id = first;
        for c in combos {
            let this = id;
            if c.len() > 1 {
                id += 1;
            }
            self.blocks[bi].resend.push_back((this, c));
        }
        if !self.blocks[bi].loaded && !self.blocks[bi].load_requested {
            self.blocks[bi].load_requested = true;
            self.actions.push_back(Action::Load(b));
        }
    }

    pub(super) fn schedule_repair(&mut self, b: u32, n: u32) {
        let bi = b as usize;
        if self.blocks[bi].pending_repair == 0 {
            self.repair_queue.push_back(b);
        }
        self.blocks[bi].pending_repair = self.blocks[bi].pending_repair.max(n);
        match self.blocks[bi].enc {
            EncState::None => {
                self.blocks[bi].enc = EncState::Requested;
                self.actions.push_back(Action::BuildEncoder(b));
            }
            EncState::Requested => {}
            EncState::Ready => self.touch_encoder(b),
        }
    }

    pub(super) fn next_repair(&mut self) -> Option<Tx> {
        let idx = self
            .repair_queue
            .iter()
            .position(|b| self.blocks[*b as usize].enc == EncState::Ready)?;
        let b = self.repair_queue[idx];
        let bi = b as usize;
        let esi = self.blocks[bi].next_esi;
        if esi > crate::wire::packet::MAX_ESI {
            // ESI space of this block exhausted (2^24 symbols): nothing
            // more can be sent for it; receivers will time out on it.
            self.blocks[bi].pending_repair = 0;
            self.repair_queue.remove(idx);
            return None;
        }
        self.blocks[bi].next_esi += 1;
        self.blocks[bi].pending_repair -= 1;
        if self.blocks[bi].pending_repair == 0 {
            self.repair_queue.remove(idx);
            self.blocks[bi].max_short = 0;
        }
        let seq = self.bump_seq();
        self.blocks[bi].last_seq = seq;
        self.stats.repair_packets += 1;
        Some(Tx::Symbol { seq, block: b, esi })
    }

    pub(super) fn next_resend(&mut self) -> Option<Tx> {
        let idx = self
            .resend_queue
            .iter()
            .position(|b| self.blocks[*b as usize].loaded)?;
        let b = self.resend_queue[idx];
        let bi = b as usize;
        let (id, esis) = self.blocks[bi].resend.pop_front()?;
        if self.blocks[bi].resend.is_empty() {
            self.resend_queue.remove(idx);
            if self.blocks[bi].pending_repair == 0 {
                self.blocks[bi].max_short = 0;
            }
            if !self.in_source_window(b) && self.blocks[bi].needs.is_empty() {
                self.release(b);
            }
        }
        let seq = self.bump_seq();
        self.blocks[bi].last_seq = seq;
        self.stats.repair_packets += 1;
        self.stats.resent_source_packets += 1;
        if let [esi] = esis[..] {
            Some(Tx::Symbol { seq, block: b, esi })
        } else {
            self.stats.coded_packets += 1;
            Some(Tx::Coded {
                seq,
                block: b,
                id,
                esis,
            })
        }
    }
}

/// ESIs set in a receiver's gap bitmap for a block of `k` source symbols;
/// `None` if the bitmap does not fit the block (then fountain repair).
/// Runs on every report for every block it lists: it visits set bits
/// only (a 1 MiB block's bitmap is 733 bits, ~2 % of them set).
fn gap_esis(bits: &[u8], k: u32) -> Option<Vec<u32>> {
    if bits.len() != (k as usize).div_ceil(8) {
        return None;
    }
    let mut esis = Vec::new();
    for (i, chunk) in bits.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let mut w = u64::from_le_bytes(word);
        while w != 0 {
            let e = i as u32 * 64 + w.trailing_zeros();
            if e < k {
                esis.push(e);
            }
            w &= w - 1;
        }
    }
    (!esis.is_empty()).then_some(esis)
}

#[cfg(test)]
mod gap_tests {
    use super::gap_esis;
    use proptest::prelude::*;

    proptest! {
        /// The same ESIs, in order, as the plain bit-by-bit reading.
        #[test]
        fn gap_esis_reads_every_set_bit_below_k(bits in proptest::collection::vec(any::<u8>(), 0..200), k in 0u32..1600) {
            let plain = (bits.len() == (k as usize).div_ceil(8)).then(|| {
                (0..k).filter(|e| bits[(e / 8) as usize] & (1 << (e % 8)) != 0).collect::<Vec<u32>>()
            });
            let plain = plain.and_then(|v| (!v.is_empty()).then_some(v));
            prop_assert_eq!(gap_esis(&bits, k), plain);
        }
    }

    #[test]
    fn bits_past_k_are_ignored() {
        // k = 10: two bytes, bits 10..16 of the last byte are padding.
        assert_eq!(
            gap_esis(&[0b1000_0001, 0b1111_1110], 10),
            Some(vec![0, 7, 9])
        );
        assert_eq!(gap_esis(&[0, 0b1111_1100], 10), None);
        assert_eq!(gap_esis(&[1], 10), None, "a bitmap of the wrong length");
    }
}
