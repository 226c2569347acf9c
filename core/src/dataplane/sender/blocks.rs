//! Per-block state of a wave: one [`BlockState`] per block of the image,
//! in place of a dozen parallel vectors, and the LRU of repair encoders.
//!
//! Owns: what the sender knows and has pending about one block (data
//! loaded, source sent, last sequence number, next repair ESI, reported
//! needs, planned resends, encoder state). Must not: decide anything
//! about the block (the schedule and repair planning do).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use super::{Action, WaveSender};

/// Where a block's repair encoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EncState {
    None,
    Requested,
    Ready,
}

/// What the sender knows and has pending about one block.
#[derive(Debug, Clone)]
pub(super) struct BlockState {
    /// Source symbols.
    pub(super) k: u32,
    /// Its data is in memory (the driver loaded it).
    pub(super) loaded: bool,
    /// A load was asked for and not released since.
    pub(super) load_requested: bool,
    /// Every source symbol has been sent once.
    pub(super) source_done: bool,
    /// Sequence number of the block's latest datagram: a report counts
    /// for the block only once the receiver saw a packet after it.
    pub(super) last_seq: u32,
    /// Next fresh repair ESI.
    pub(super) next_esi: u32,
    /// Fountain repair symbols still to send.
    pub(super) pending_repair: u32,
    /// Missing source ESIs reported per receiver, not planned yet.
    pub(super) needs: BTreeMap<u32, Vec<u32>>,
    /// Receivers that reported past the block since its needs started.
    pub(super) heard: BTreeSet<u32>,
    /// When the first of the current needs arrived.
    pub(super) need_since: Option<Instant>,
    /// Planned resends (one ESI: plain, several: coded with the announced
    /// combination id).
    pub(super) resend: VecDeque<(u32, Vec<u32>)>,
    /// Next combination id.
    pub(super) next_combo: u32,
    /// Largest shortfall reported since the last repair round.
    pub(super) max_short: u32,
    /// Decided once when its group's first round reaches it: every ready
    /// receiver already has the block, so its source symbols are skipped
    /// (checking receivers per symbol would cost N x the list lengths on
    /// every packet).
    pub(super) skip_source: bool,
    pub(super) enc: EncState,
}

impl BlockState {
    pub(super) fn new(k: u32) -> BlockState {
        BlockState {
            k,
            loaded: false,
            load_requested: false,
            source_done: false,
            last_seq: 0,
            next_esi: k,
            pending_repair: 0,
            needs: BTreeMap::new(),
            heard: BTreeSet::new(),
            need_since: None,
            resend: VecDeque::new(),
            next_combo: 0,
            max_short: 0,
            skip_source: false,
            enc: EncState::None,
        }
    }
}

impl WaveSender {
    /// A block's data arrived. Returns false if it is no longer wanted (it
    /// was released while being read): the driver then drops it.
    pub fn on_block_loaded(&mut self, b: u32) -> bool {
        let bi = b as usize;
        if bi < self.blocks.len() && self.blocks[bi].load_requested {
            self.blocks[bi].loaded = true;
            true
        } else {
            false
        }
    }

    /// Block `b`'s repair encoder is built (the driver holds it).
    pub fn on_encoder_ready(&mut self, b: u32) {
        let bi = b as usize;
        if bi < self.blocks.len() && self.blocks[bi].enc == EncState::Requested {
            self.blocks[bi].enc = EncState::Ready;
            self.touch_encoder(b);
            self.evict_encoders();
        }
    }

    pub(super) fn touch_encoder(&mut self, b: u32) {
        self.enc_lru.retain(|x| *x != b);
        self.enc_lru.push_back(b);
    }

    pub(super) fn evict_encoders(&mut self) {
        let mut budget = self.enc_lru.len();
        while self.enc_lru.len() > self.cfg.max_encoders && budget > 0 {
            budget -= 1;
            let Some(b) = self.enc_lru.pop_front() else {
                break;
            };
            if self.blocks[b as usize].pending_repair > 0 {
                self.enc_lru.push_back(b);
                continue;
            }
            self.blocks[b as usize].enc = EncState::None;
            self.actions.push_back(Action::DropEncoder(b));
        }
    }
}
