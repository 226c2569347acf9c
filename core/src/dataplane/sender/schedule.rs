//! The source schedule: blocks go out in groups of `interleave`, one
//! round of ESIs across the group at a time, with the next group
//! prefetched; blocks every ready receiver already has are skipped.
//!
//! Owns: the source cursor, block loads and releases. Must not: decide
//! repair (repair planning does) or pace (the token bucket in `mod.rs`).

use super::{Action, Tx, WaveSender};

impl WaveSender {
    pub(super) fn group_range(&self, g: usize) -> std::ops::Range<usize> {
        let w = self.cfg.interleave.max(1);
        let start = (g * w).min(self.order.len());
        start..((g + 1) * w).min(self.order.len())
    }

    pub(super) fn request_group_loads(&mut self, g: usize) {
        for i in self.group_range(g) {
            let b = self.order[i] as usize;
            if !self.blocks[b].load_requested {
                self.blocks[b].load_requested = true;
                self.actions.push_back(Action::Load(b as u32));
            }
        }
    }

    /// One past the last block whose source symbols may all have been sent.
    pub(super) fn source_frontier(&self) -> u32 {
        if self.source_done_all {
            return self.blocks.len() as u32;
        }
        let r = self.group_range(self.group);
        match r.end.checked_sub(1).and_then(|i| self.order.get(i)) {
            Some(&b) => b + 1,
            None => self.blocks.len() as u32,
        }
    }

    /// Move the source cursor past finished rounds, groups and blocks
    /// that need no source symbol, and return the block it points at.
    pub(super) fn source_cursor(&mut self) -> Option<u32> {
        loop {
            if self.source_done_all {
                return None;
            }
            let range = self.group_range(self.group);
            if range.is_empty() {
                self.source_done_all = true;
                self.stats.source_done_at = Some(self.last_send);
                return None;
            }
            let max_k = range
                .clone()
                .map(|i| self.blocks[self.order[i] as usize].k)
                .max()
                .unwrap_or(0);
            if self.round >= max_k {
                // Group complete: release it (blocks still being resent
                // keep their data), prefetch the one after next.
                for i in range {
                    let b = self.order[i];
                    if self.blocks[b as usize].resend.is_empty()
                        && self.blocks[b as usize].needs.is_empty()
                    {
                        self.release(b);
                    }
                }
                self.group += 1;
                self.round = 0;
                self.pos = 0;
                self.request_group_loads(self.group + 1);
                continue;
            }
            let Some(i) = range.clone().nth(self.pos) else {
                self.pos = 0;
                self.round += 1;
                continue;
            };
            let b = self.order[i];
            let bi = b as usize;
            if self.round == 0 {
                self.blocks[bi].skip_source = self.all_ready_have(b);
            }
            if self.round >= self.blocks[bi].k || self.blocks[bi].skip_source {
                self.mark_source_done_if_last(bi);
                self.pos += 1;
                continue;
            }
            return Some(b);
        }
    }

    pub(super) fn next_source(&mut self) -> Option<Tx> {
        let b = self.source_cursor()?;
        let bi = b as usize;
        if !self.blocks[bi].loaded {
            return None;
        }
        let esi = self.round;
        self.pos += 1;
        let seq = self.bump_seq();
        self.blocks[bi].last_seq = seq;
        if esi + 1 == self.blocks[bi].k {
            self.blocks[bi].source_done = true;
        }
        self.stats.source_packets += 1;
        Some(Tx::Symbol { seq, block: b, esi })
    }

    pub(super) fn release(&mut self, b: u32) {
        let bi = b as usize;
        if self.blocks[bi].loaded || self.blocks[bi].load_requested {
            self.blocks[bi].loaded = false;
            self.blocks[bi].load_requested = false;
            self.actions.push_back(Action::Release(b));
        }
    }

    /// Whether `b` is in the group being sent or the one prefetched.
    pub(super) fn in_source_window(&self, b: u32) -> bool {
        !self.source_done_all
            && (self.group..self.group + 2).any(|g| self.group_range(g).any(|i| self.order[i] == b))
    }

    pub(super) fn mark_source_done_if_last(&mut self, bi: usize) {
        if !self.blocks[bi].source_done && self.round >= self.blocks[bi].k.saturating_sub(1) {
            self.blocks[bi].source_done = true;
        }
    }
}
