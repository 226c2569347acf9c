//! The wave sender core: which symbol goes next, when repair is due, when a
//! receiver is dropped and when the wave is over.
//!
//! Owns: send order (source symbols interleaved across a group of blocks;
//! repair driven by aggregated receiver feedback, taking turns with the
//! source while both have work), pacing through a
//! token bucket, the loss-driven rate, receiver liveness and the end
//! condition. Must not: touch sockets, files, threads or clocks. The I/O
//! driver (`dataplane::send`) calls `on_*` with events and `now`, drains
//! [`Action`]s and asks [`WaveSender::poll_transmit`] what to put on the wire.
//!
//! Repair rule: a receiver's report about block `b` counts only if it has
//! seen a packet sent after the last symbol of `b` (`seq_hi >= last_seq[b]`);
//! then symbols still missing there are lost, not in flight. Reports name
//! the exact source symbols missing; the sender collects them per block
//! until every live receiver has reported past the block, however far
//! behind the leader it runs (or `coding_hold` passed), and then resends
//! them coded (`coding`): each
//! datagram XORs one missing symbol of several receivers, its combination
//! announced to all receivers over TCP first, so a round costs about the
//! largest single loss and receivers only XOR. While that stays within
//! `source_resend_factor` times the largest shortfall it is used;
//! otherwise (or when a receiver misses too much to list) the sender
//! schedules `max over receivers (shortfall) + margin` fresh RaptorQ repair
//! symbols for `b`.
//! Probes (empty packets) advance `seq` while idle so the tail of the
//! stream is never stuck behind a lost last packet.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::dataplane::pacing::{RateController, TokenBucket};
use crate::image::manifest::Manifest;
use crate::wire::control::{Msg, Status, Verdict};
use crate::wire::packet::seq_ge;

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Receivers the wave waits for before sending.
    pub expected: usize,
    /// Start with whoever is ready once this passed (never wait forever).
    pub start_timeout: Duration,
    /// A receiver silent this long is dropped as failed.
    pub receiver_timeout: Duration,
    /// Rate ceiling, bits/s on the wire (Ethernet frame bytes).
    pub rate_bps: u64,
    /// Floor of the loss-driven rate control.
    pub min_rate_bps: u64,
    /// Worst-receiver loss above which the rate is cut.
    pub loss_threshold: f64,
    /// Blocks whose source symbols are interleaved round-robin.
    pub interleave: usize,
    /// Extra repair symbols per block and round: fixed part ...
    pub repair_margin: u32,
    /// ... plus this fraction of the shortfall.
    pub repair_margin_frac: f64,
    /// Encoders kept for repair at once (each holds ~2 blocks of memory).
    pub max_encoders: usize,
    /// Probe spacing while there is nothing else to send.
    pub probe_interval: Duration,
    /// Rate-control interval.
    pub rate_interval: Duration,
    /// Token bucket depth in bytes.
    pub burst_bytes: usize,
    /// Resend the exact source symbols receivers miss (instead of fountain
    /// repair) while their union is at most this factor times the largest
    /// shortfall: receivers then never run the RaptorQ decoder for the
    /// block. 0 = always fountain repair. Beyond the factor, one repair
    /// symbol fixing a different loss at every receiver is cheaper.
    pub source_resend_factor: f64,
    /// Longest the first report of missing symbols of a block waits for
    /// the other receivers' reports before its coded resends are planned.
    /// Planning normally waits exactly until every live receiver reported
    /// past the block, however far behind it runs (a receiver working
    /// through its socket buffer on a busy CPU, or a slow disk, is seconds
    /// of packets behind the leader): losses only pair up within one plan.
    /// This bounds the wait for a receiver that is alive but stuck.
    pub coding_hold: Duration,
    /// The receivers' report interval (the session's `feedback_ms`). A
    /// receiver with no report for [`STALE_REPORTS`] intervals (at least
    /// [`MIN_STALE`]) is not waited for.
    pub feedback: Duration,
    /// Packets the driver waits to have tokens for before waking: fewer,
    /// larger `sendmmsg` batches and no busy waiting (must fit the burst).
    pub pace_batch: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            expected: 1,
            start_timeout: Duration::from_secs(60),
            receiver_timeout: Duration::from_secs(15),
            rate_bps: 100_000_000,
            min_rate_bps: 10_000_000,
            loss_threshold: 0.25,
            interleave: 8,
            repair_margin: 2,
            repair_margin_frac: 0.05,
            max_encoders: 64,
            probe_interval: Duration::from_millis(5),
            rate_interval: Duration::from_millis(250),
            burst_bytes: 256 * 1024,
            pace_batch: 16,
            source_resend_factor: 4.0,
            coding_hold: Duration::from_secs(2),
            feedback: Duration::from_millis(20),
        }
    }
}

/// How often a sending wave logs where it stands (a heartbeat for the
/// operator; enough to tell a stuck queue from a slow receiver).
const STATE_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Missed report intervals after which a receiver is not waited for.
const STALE_REPORTS: u32 = 25;
/// ... but never less than this: a busy receiver's reports come late and
/// irregularly, and a receiver that died costs this wait only once.
const MIN_STALE: Duration = Duration::from_millis(500);
/// How often the set of receivers a plan waits for is recomputed (a wave
/// may have a thousand; `plan_due` runs on every report and transmit).
const WAIT_SET_REFRESH: Duration = Duration::from_millis(2);

/// Probe spacing while waiting for receivers before the wave starts.
const WAITING_PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tx {
    Symbol {
        seq: u32,
        block: u32,
        esi: u32,
    },
    /// XOR of the source symbols `esis` of `block`, announced as
    /// combination `id` (see [`Msg::Coded`]).
    Coded {
        seq: u32,
        block: u32,
        id: u32,
        esis: Vec<u32>,
    },
    Probe {
        seq: u32,
    },
}

/// What the I/O driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read `block` of the image and call `on_block_loaded`.
    Load(u32),
    /// Source data of `block` no longer needed.
    Release(u32),
    /// Build a repair encoder for `block` and call `on_encoder_ready`.
    BuildEncoder(u32),
    DropEncoder(u32),
    /// Send a control message to a receiver.
    Control(u32, Msg),
    /// Close a receiver's connection (after any queued message).
    Disconnect(u32),
    /// The wave ended; see [`WaveSender::summary`].
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Sending,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxState {
    /// Welcome sent, not joined yet.
    Joining,
    Ready,
    /// Connection lost; may come back under the same name.
    Disconnected {
        since: Instant,
    },
    Verified,
    Failed(String),
}

impl RxState {
    fn terminal(&self) -> bool {
        matches!(self, RxState::Verified | RxState::Failed(_))
    }
}

#[derive(Debug, Clone)]
pub struct ReceiverInfo {
    pub name: String,
    pub state: RxState,
    pub joined_at: Instant,
    pub ended_at: Option<Instant>,
    pub resumed_blocks: u32,
    pub last_heard: Instant,
    pub status: Status,
    prev_received: u64,
    prev_expected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EncState {
    None,
    Requested,
    Ready,
}

/// Counters for the summary and metrics.
#[derive(Debug, Clone, Default)]
pub struct SendStats {
    pub source_packets: u64,
    /// Fountain repair symbols plus resent source symbols.
    pub repair_packets: u64,
    /// Of `repair_packets`, resent source symbols (plain or coded).
    pub resent_source_packets: u64,
    /// Of `resent_source_packets`, coded datagrams (XOR of several).
    pub coded_packets: u64,
    pub probe_packets: u64,
    pub rate_bps: u64,
    pub started_at: Option<Instant>,
    /// When the last source symbol left.
    pub source_done_at: Option<Instant>,
    pub finished_at: Option<Instant>,
}

pub struct WaveSender {
    cfg: SenderConfig,
    manifest: Manifest,
    /// Source symbols per block.
    k: Vec<u32>,
    /// Blocks that go on the wire, in image order.
    order: Vec<u32>,
    phase: Phase,
    created: Instant,
    bucket: TokenBucket,
    rate: RateController,
    next_rate_tick: Instant,
    next_state_log: Instant,
    worst_loss: f64,
    frame_bytes: usize,
    seq: u32,
    // Source cursor: group index, round (ESI), position within the group.
    group: usize,
    round: u32,
    pos: usize,
    source_done_all: bool,
    loaded: Vec<bool>,
    load_requested: Vec<bool>,
    source_done: Vec<bool>,
    last_seq: Vec<u32>,
    next_esi: Vec<u32>,
    pending_repair: Vec<u32>,
    repair_queue: VecDeque<u32>,
    /// Missing source ESIs reported per block and receiver, not planned yet.
    needs: Vec<BTreeMap<u32, Vec<u32>>>,
    /// Receivers that reported past the block since its needs started.
    heard: Vec<std::collections::BTreeSet<u32>>,
    /// Receivers a plan waits for (ready, receiving, reporting), and when
    /// that list was made.
    wait_for: (Option<Instant>, Vec<u32>),
    /// Whose turn the next datagram is: source or repair.
    source_turn: bool,
    /// When the first of a block's current needs arrived.
    need_since: Vec<Option<Instant>>,
    /// Blocks with needs waiting to be planned.
    coding_wait: Vec<u32>,
    /// Planned resends per block (one ESI: plain, several: coded with the
    /// announced combination id), and the blocks that have some.
    resend: Vec<VecDeque<(u32, Vec<u32>)>>,
    resend_queue: VecDeque<u32>,
    /// Next combination id per block.
    next_combo: Vec<u32>,
    /// Largest shortfall reported for a block since its last repair round.
    max_short: Vec<u32>,
    /// Decided once per block when its group's first round reaches it:
    /// every ready receiver already has the block, so its source symbols
    /// are skipped (checking receivers per symbol would cost N x the list
    /// lengths on every packet).
    skip_source: Vec<bool>,
    enc: Vec<EncState>,
    enc_lru: VecDeque<u32>,
    last_send: Instant,
    receivers: BTreeMap<u32, ReceiverInfo>,
    /// Named membership (appliance waves): only these names may join;
    /// value = since when the member is expected. `None`: anyone may join
    /// (the `rackcast send` CLI).
    members: Option<BTreeMap<String, Instant>>,
    /// Members that never connected within the receiver timeout.
    dropped: Vec<(String, String)>,
    actions: VecDeque<Action>,
    pub stats: SendStats,
}

impl WaveSender {
    /// `frame_bytes`: bytes one symbol packet costs on the wire (Ethernet
    /// frame), the unit the token bucket counts.
    pub fn new(
        cfg: SenderConfig,
        manifest: Manifest,
        frame_bytes: usize,
        now: Instant,
    ) -> WaveSender {
        let n = manifest.block_count() as usize;
        let k: Vec<u32> = (0..n as u32).map(|b| manifest.source_symbols(b)).collect();
        let order: Vec<u32> = manifest.data_blocks().collect();
        let mut s = WaveSender {
            bucket: TokenBucket::new(cfg.rate_bps, cfg.burst_bytes.max(frame_bytes), now),
            rate: RateController::new(cfg.rate_bps, cfg.min_rate_bps, cfg.loss_threshold),
            next_rate_tick: now + cfg.rate_interval,
            next_state_log: now + STATE_LOG_INTERVAL,
            worst_loss: 0.0,
            frame_bytes,
            cfg,
            seq: 0,
            group: 0,
            round: 0,
            pos: 0,
            source_done_all: order.is_empty(),
            loaded: vec![false; n],
            load_requested: vec![false; n],
            source_done: vec![false; n],
            last_seq: vec![0; n],
            next_esi: k.clone(),
            pending_repair: vec![0; n],
            repair_queue: VecDeque::new(),
            needs: vec![BTreeMap::new(); n],
            heard: vec![std::collections::BTreeSet::new(); n],
            wait_for: (None, Vec::new()),
            source_turn: false,
            need_since: vec![None; n],
            coding_wait: Vec::new(),
            resend: vec![VecDeque::new(); n],
            resend_queue: VecDeque::new(),
            next_combo: vec![0; n],
            max_short: vec![0; n],
            skip_source: vec![false; n],
            enc: vec![EncState::None; n],
            enc_lru: VecDeque::new(),
            k,
            order,
            manifest,
            phase: Phase::Waiting,
            created: now,
            last_send: now,
            receivers: BTreeMap::new(),
            members: None,
            dropped: Vec::new(),
            actions: VecDeque::new(),
            stats: SendStats::default(),
        };
        s.stats.rate_bps = s.cfg.rate_bps;
        s.request_group_loads(0);
        s.request_group_loads(1);
        s
    }

    /// Restrict the wave to named members and expect `name` (a device the
    /// scheduler put in this wave; late members join a running wave). The
    /// wave does not end while an expected member has not connected, until
    /// the receiver timeout drops it.
    pub fn expect_member(&mut self, name: &str, now: Instant) {
        let members = self.members.get_or_insert_with(BTreeMap::new);
        members.entry(name.to_string()).or_insert(now);
    }

    /// Whether `name` may join.
    pub fn admits(&self, name: &str) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains_key(name))
    }

    /// Members dropped because they never connected, since the last call.
    pub fn take_dropped(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.dropped)
    }

    /// Share of a total rate (see `RateController::set_max_rate`).
    pub fn set_rate_ceiling(&mut self, bps: u64, now: Instant) {
        self.rate.set_max_rate(bps);
        let r = self.rate.current();
        if r != self.bucket.rate_bps() {
            self.bucket.set_rate(r, now);
            self.stats.rate_bps = r;
        }
    }

    /// Expected members with no connection yet.
    fn pending_members(&self) -> usize {
        self.members.as_ref().map_or(0, |m| {
            m.keys()
                .filter(|n| !self.receivers.values().any(|r| &r.name == *n))
                .count()
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn receivers(&self) -> &BTreeMap<u32, ReceiverInfo> {
        &self.receivers
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn group_range(&self, g: usize) -> std::ops::Range<usize> {
        let w = self.cfg.interleave.max(1);
        let start = (g * w).min(self.order.len());
        start..((g + 1) * w).min(self.order.len())
    }

    fn request_group_loads(&mut self, g: usize) {
        for i in self.group_range(g) {
            let b = self.order[i] as usize;
            if !self.load_requested[b] {
                self.load_requested[b] = true;
                self.actions.push_back(Action::Load(b as u32));
            }
        }
    }

    // ---- events -------------------------------------------------------

    /// A receiver said hello; returns its id. A known name whose receiver
    /// is gone (disconnected or finished) takes its old slot back: a
    /// restarted device. A known name that still looks connected is a
    /// device that came back before its old connection timed out (power
    /// cycle): the newest connection wins, the old one is told and closed.
    pub fn on_hello(&mut self, name: &str, now: Instant) -> u32 {
        let existing = self
            .receivers
            .iter()
            .find(|(_, r)| r.name == name)
            .map(|(id, r)| (*id, r.state.clone()));
        let next_id = self.receivers.keys().next_back().map_or(1, |k| k + 1);
        let id = match existing {
            Some((old, RxState::Joining | RxState::Ready)) => {
                tracing::warn!(
                    receiver = old,
                    name,
                    "same name connected again; replacing the old connection"
                );
                self.receivers.remove(&old);
                self.actions.push_back(Action::Control(
                    old,
                    Msg::Finish {
                        reason: "replaced by a newer connection with the same name".into(),
                    },
                ));
                self.actions.push_back(Action::Disconnect(old));
                next_id
            }
            Some((old, _)) => old,
            None => next_id,
        };
        let info = ReceiverInfo {
            name: name.to_string(),
            state: RxState::Joining,
            joined_at: now,
            ended_at: None,
            resumed_blocks: 0,
            last_heard: now,
            status: Status::default(),
            prev_received: 0,
            prev_expected: 0,
        };
        tracing::info!(
            receiver = id,
            name,
            reconnect = existing.is_some(),
            "receiver connected"
        );
        self.receivers.insert(id, info);
        id
    }

    pub fn on_message(&mut self, id: u32, msg: Msg, now: Instant) {
        let Some(rx) = self.receivers.get_mut(&id) else {
            return;
        };
        rx.last_heard = now;
        match msg {
            Msg::Ready { resumed_blocks } => {
                if rx.state == RxState::Joining {
                    rx.state = RxState::Ready;
                    rx.resumed_blocks = resumed_blocks;
                }
            }
            Msg::Status(st) => self.on_status(id, st, now),
            Msg::Done(v) => {
                rx.ended_at = Some(now);
                rx.state = match v {
                    Verdict::Verified { image_hash } if image_hash == self.manifest.image_hash => {
                        RxState::Verified
                    }
                    Verdict::Verified { .. } => {
                        RxState::Failed("reported a hash that is not the manifest's".into())
                    }
                    Verdict::Failed { reason } => RxState::Failed(reason),
                };
                tracing::info!(receiver = id, state = ?rx.state, "receiver finished");
                self.actions.push_back(Action::Control(
                    id,
                    Msg::Finish {
                        reason: "verdict received".into(),
                    },
                ));
                self.actions.push_back(Action::Disconnect(id));
            }
            Msg::Error { message } => {
                self.fail(id, format!("receiver error: {message}"), now);
            }
            // A receiver has no business sending these.
            Msg::Hello { .. } | Msg::Welcome { .. } | Msg::Finish { .. } | Msg::Coded { .. } => {
                self.fail(id, "unexpected message from receiver".into(), now);
            }
        }
        self.maybe_start(now);
        self.maybe_finish(now);
    }

    pub fn on_disconnect(&mut self, id: u32, now: Instant) {
        if let Some(rx) = self.receivers.get_mut(&id) {
            if !rx.state.terminal() {
                tracing::warn!(receiver = id, name = %rx.name, "receiver connection lost");
                rx.state = RxState::Disconnected { since: now };
            }
        }
        self.maybe_finish(now);
    }

    fn fail(&mut self, id: u32, reason: String, now: Instant) {
        if let Some(rx) = self.receivers.get_mut(&id) {
            if rx.state.terminal() {
                return;
            }
            tracing::warn!(receiver = id, name = %rx.name, %reason, "receiver dropped");
            rx.state = RxState::Failed(reason.clone());
            rx.ended_at = Some(now);
            self.actions
                .push_back(Action::Control(id, Msg::Finish { reason }));
            self.actions.push_back(Action::Disconnect(id));
        }
    }

    fn on_status(&mut self, id: u32, st: Status, now: Instant) {
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
            let loss = 1.0 - (dr as f64 / de as f64).min(1.0);
            self.worst_loss = self.worst_loss.max(loss);
        }
        rx.prev_received = st.received;
        rx.prev_expected = st.expected;
        if matches!(rx.state, RxState::Joining) {
            rx.state = RxState::Ready;
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
                    Some((g, bits)) if *g == b && bi < self.k.len() => gap_esis(bits, self.k[bi]),
                    _ => None,
                };
                if bi < self.k.len() && self.source_done[bi] && seq_ge(st.seq_hi, self.last_seq[bi])
                {
                    want.push((b, short.min(self.k[bi]), g));
                }
            }
        }
        for &(first, len) in &st.missing {
            let end = first.saturating_add(len).min(frontier);
            for b in first..end {
                let bi = b as usize;
                if self.manifest.blocks[bi].zero || !self.source_done[bi] {
                    continue;
                }
                // A block with nothing received: either all its packets
                // were lost after the receiver joined, or it joined late.
                if !st.seen_any || seq_ge(st.seq_hi, self.last_seq[bi]) {
                    want.push((b, self.k[bi], Some((0..self.k[bi]).collect())));
                }
            }
        }
        // This report is past every waiting block it has seen the end of.
        for &b in &self.coding_wait {
            let bi = b as usize;
            if seq_ge(st.seq_hi, self.last_seq[bi]) {
                self.heard[bi].insert(id);
            }
        }
        rx.status = st;
        for (b, short, gaps) in want {
            self.schedule(id, b, short, gaps, now);
        }
        self.plan_due(now);
    }

    /// One past the last block whose source symbols may all have been sent.
    fn source_frontier(&self) -> u32 {
        if self.source_done_all {
            return self.k.len() as u32;
        }
        let r = self.group_range(self.group);
        match r.end.checked_sub(1).and_then(|i| self.order.get(i)) {
            Some(&b) => b + 1,
            None => self.k.len() as u32,
        }
    }

    fn margin(&self, short: u32) -> u32 {
        short + self.cfg.repair_margin + (short as f64 * self.cfg.repair_margin_frac).ceil() as u32
    }

    /// Receiver `rx`'s need for block `b`: its missing source symbols wait
    /// for the other receivers' (coded resends); without a list, fountain
    /// repair.
    fn schedule(&mut self, rx: u32, b: u32, short: u32, gaps: Option<Vec<u32>>, now: Instant) {
        let bi = b as usize;
        self.max_short[bi] = self.max_short[bi].max(short);
        if let Some(g) = gaps {
            if self.cfg.source_resend_factor > 0.0 && self.pending_repair[bi] == 0 {
                if !self.resend[bi].is_empty() {
                    // The last round of `b` is still queued: what this
                    // report misses is mostly not even sent yet. Its next
                    // report past that round counts.
                    return;
                }
                let k = self.k[bi];
                self.needs[bi].insert(rx, g.into_iter().filter(|e| *e < k).collect());
                self.heard[bi].insert(rx);
                if self.need_since[bi].is_none() {
                    self.need_since[bi] = Some(now);
                    self.coding_wait.push(b);
                }
                if !self.loaded[bi] && !self.load_requested[bi] {
                    self.load_requested[bi] = true;
                    self.actions.push_back(Action::Load(b));
                }
                return;
            }
        }
        let n = self.margin(self.max_short[bi]);
        self.schedule_repair(b, n);
    }

    fn wait_set_fresh(&self, now: Instant) -> bool {
        self.wait_for
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < WAIT_SET_REFRESH)
    }

    /// Plan the coded resends of every waiting block that every live
    /// receiver reported past, or whose hold expired.
    fn plan_due(&mut self, now: Instant) {
        if self.coding_wait.is_empty() {
            return;
        }
        if !self.wait_set_fresh(now) {
            let stale = (self.cfg.feedback * STALE_REPORTS).max(MIN_STALE);
            // A receiver that still has not seen a packet well after it
            // joined will need every block anyway: pairing it gains
            // nothing, waiting for it costs.
            let ids = self
                .receivers
                .iter()
                .filter(|(_, r)| {
                    r.state == RxState::Ready
                        && (r.status.seen_any || now.saturating_duration_since(r.joined_at) < stale)
                        && now.saturating_duration_since(r.last_heard) < stale
                })
                .map(|(id, _)| *id)
                .collect();
            self.wait_for = (Some(now), ids);
        }
        let hold = self.cfg.coding_hold;
        let due: Vec<u32> = self
            .coding_wait
            .iter()
            .copied()
            .filter(|&b| {
                let bi = b as usize;
                self.wait_for.1.iter().all(|id| self.heard[bi].contains(id))
                    || self.need_since[bi].is_some_and(|t| now.saturating_duration_since(t) >= hold)
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let ready_ids: Vec<u32> = self
            .receivers
            .iter()
            .filter(|(_, r)| r.state == RxState::Ready)
            .map(|(id, _)| *id)
            .collect();
        for b in due {
            self.coding_wait.retain(|x| *x != b);
            self.plan_block(b, &ready_ids);
        }
    }

    fn plan_block(&mut self, b: u32, ready: &[u32]) {
        let bi = b as usize;
        let needs = std::mem::take(&mut self.needs[bi]);
        tracing::debug!(
            block = b,
            receivers = needs.len(),
            heard = self.heard[bi].len(),
            waiting_for = self.wait_for.1.len(),
            "planning resends"
        );
        self.heard[bi].clear();
        self.need_since[bi] = None;
        if self.pending_repair[bi] > 0 {
            return;
        }
        // Many receivers short on one block: one fountain symbol serves
        // them all, and pairing that many would cost more than it saves.
        let Some(combos) = super::coding::plan(&needs) else {
            let n = self.margin(self.max_short[bi]);
            self.schedule_repair(b, n);
            return;
        };
        if combos.is_empty() {
            return;
        }
        let limit = self.cfg.source_resend_factor * self.max_short[bi] as f64
            + self.cfg.repair_margin as f64;
        if combos.len() as f64 > limit {
            let n = self.margin(self.max_short[bi]);
            self.schedule_repair(b, n);
            return;
        }
        // Announce the multi-symbol combinations before they are sent:
        // ids are numbered in plan order, singles (plain resends) skipped.
        let coded: Vec<Vec<u32>> = combos.iter().filter(|c| c.len() > 1).cloned().collect();
        let first = self.next_combo[bi];
        if !coded.is_empty() {
            self.next_combo[bi] = first.saturating_add(coded.len() as u32);
            for &id in ready {
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
        if self.resend[bi].is_empty() {
            self.resend_queue.push_back(b);
        }
        let mut id = first;
        for c in combos {
            let this = id;
            if c.len() > 1 {
                id += 1;
            }
            self.resend[bi].push_back((this, c));
        }
        if !self.loaded[bi] && !self.load_requested[bi] {
            self.load_requested[bi] = true;
            self.actions.push_back(Action::Load(b));
        }
    }

    fn schedule_repair(&mut self, b: u32, n: u32) {
        let bi = b as usize;
        if self.pending_repair[bi] == 0 {
            self.repair_queue.push_back(b);
        }
        self.pending_repair[bi] = self.pending_repair[bi].max(n);
        match self.enc[bi] {
            EncState::None => {
                self.enc[bi] = EncState::Requested;
                self.actions.push_back(Action::BuildEncoder(b));
            }
            EncState::Requested => {}
            EncState::Ready => self.touch_encoder(b),
        }
    }

    /// A block's data arrived. Returns false if it is no longer wanted (it
    /// was released while being read): the driver then drops it.
    pub fn on_block_loaded(&mut self, b: u32) -> bool {
        let bi = b as usize;
        if bi < self.loaded.len() && self.load_requested[bi] {
            self.loaded[bi] = true;
            true
        } else {
            false
        }
    }

    pub fn on_encoder_ready(&mut self, b: u32) {
        let bi = b as usize;
        if bi < self.enc.len() && self.enc[bi] == EncState::Requested {
            self.enc[bi] = EncState::Ready;
            self.touch_encoder(b);
            self.evict_encoders();
        }
    }

    fn touch_encoder(&mut self, b: u32) {
        self.enc_lru.retain(|x| *x != b);
        self.enc_lru.push_back(b);
    }

    fn evict_encoders(&mut self) {
        let mut budget = self.enc_lru.len();
        while self.enc_lru.len() > self.cfg.max_encoders && budget > 0 {
            budget -= 1;
            let Some(b) = self.enc_lru.pop_front() else {
                break;
            };
            if self.pending_repair[b as usize] > 0 {
                self.enc_lru.push_back(b);
                continue;
            }
            self.enc[b as usize] = EncState::None;
            self.actions.push_back(Action::DropEncoder(b));
        }
    }

    /// Periodic housekeeping: start policy, receiver timeouts, rate control.
    pub fn on_tick(&mut self, now: Instant) {
        let timeout = self.cfg.receiver_timeout;
        let stale: Vec<u32> = self
            .receivers
            .iter()
            .filter(|(_, r)| !r.state.terminal())
            .filter(|(_, r)| match r.state {
                RxState::Disconnected { since } => now.saturating_duration_since(since) >= timeout,
                _ => now.saturating_duration_since(r.last_heard) >= timeout,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.fail(id, format!("no report for {} s", timeout.as_secs()), now);
        }
        if let Some(members) = &mut self.members {
            let never: Vec<String> = members
                .iter()
                .filter(|(n, since)| {
                    now.saturating_duration_since(**since) >= timeout
                        && !self.receivers.values().any(|r| &r.name == *n)
                })
                .map(|(n, _)| n.clone())
                .collect();
            for n in never {
                members.remove(&n);
                tracing::warn!(name = %n, "wave member never connected; dropped");
                self.dropped
                    .push((n, format!("never joined within {} s", timeout.as_secs())));
            }
        }
        if self.phase == Phase::Sending && now >= self.next_state_log {
            self.next_state_log = now + STATE_LOG_INTERVAL;
            self.log_state();
        }
        if now >= self.next_rate_tick {
            self.next_rate_tick = now + self.cfg.rate_interval;
            let r = self.rate.on_interval(self.worst_loss);
            if r != self.bucket.rate_bps() {
                tracing::info!(rate_bps = r, worst_loss = self.worst_loss, "rate changed");
                self.bucket.set_rate(r, now);
            }
            self.stats.rate_bps = r;
            self.worst_loss = 0.0;
        }
        self.maybe_start(now);
        self.maybe_finish(now);
    }

    fn maybe_start(&mut self, now: Instant) {
        if self.phase != Phase::Waiting {
            return;
        }
        let ready = self
            .receivers
            .values()
            .filter(|r| r.state == RxState::Ready)
            .count();
        let waited = now.saturating_duration_since(self.created);
        if ready >= self.cfg.expected || (ready > 0 && waited >= self.cfg.start_timeout) {
            tracing::info!(ready, expected = self.cfg.expected, "wave starts");
            self.phase = Phase::Sending;
            self.stats.started_at = Some(now);
        } else if waited >= self.cfg.start_timeout {
            tracing::warn!("no receiver ready before the start timeout");
            self.finish(now);
        }
    }

    fn maybe_finish(&mut self, now: Instant) {
        if self.phase != Phase::Sending {
            return;
        }
        let all_in = self.receivers.len() >= self.cfg.expected
            || now.saturating_duration_since(self.created) >= self.cfg.start_timeout;
        if all_in
            && self.pending_members() == 0
            && self.receivers.values().all(|r| r.state.terminal())
        {
            self.finish(now);
        }
    }

    fn finish(&mut self, now: Instant) {
        self.phase = Phase::Finished;
        self.stats.finished_at = Some(now);
        let open: Vec<u32> = self
            .receivers
            .iter()
            .filter(|(_, r)| !r.state.terminal())
            .map(|(id, _)| *id)
            .collect();
        for id in open {
            self.fail(id, "wave ended".into(), now);
        }
        self.actions.push_back(Action::Finished);
    }

    // ---- transmit -----------------------------------------------------

    /// Earliest instant at which `poll_transmit` may return something new
    /// (pacing or probe), or `None` when not sending.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        if self.phase != Phase::Sending {
            return None;
        }
        if self.has_work() {
            let batch = self.cfg.pace_batch.max(1) * self.frame_bytes;
            Some(now + self.bucket.wait_for(now, batch.min(self.cfg.burst_bytes)))
        } else {
            Some(self.last_send + self.cfg.probe_interval)
        }
    }

    fn has_work(&mut self) -> bool {
        self.repair_queue
            .iter()
            .any(|b| self.enc[*b as usize] == EncState::Ready)
            || self.resend_queue.iter().any(|b| self.loaded[*b as usize])
            || self
                .source_cursor()
                .is_some_and(|b| self.loaded[b as usize])
    }

    /// Append up to `max` transmissions allowed now to `out`.
    pub fn poll_transmit(&mut self, now: Instant, max: usize, out: &mut Vec<Tx>) {
        if self.phase == Phase::Waiting {
            // Receivers that joined early see the wave is alive (their
            // idle timeout counts valid packets) while others still come.
            if now >= self.last_send + WAITING_PROBE_INTERVAL {
                out.push(Tx::Probe {
                    seq: self.bump_seq(),
                });
                self.stats.probe_packets += 1;
                self.last_send = now;
            }
            return;
        }
        if self.phase != Phase::Sending {
            return;
        }
        // Plans wait for reports (planned in `on_status`); here only the
        // holds and the receivers gone stale, every few ms.
        if !self.wait_set_fresh(now) {
            self.plan_due(now);
        }
        let allowed = self.bucket.available(now, self.frame_bytes, max);
        let mut sent = 0;
        while sent < allowed {
            // Source and repair take turns while both have work: a late
            // joiner's (or a slow receiver's) backlog of whole blocks must
            // not hold the rest of the image from everybody else.
            self.source_turn = !self.source_turn;
            let tx = if self.source_turn {
                self.next_source()
                    .or_else(|| self.next_repair())
                    .or_else(|| self.next_resend())
            } else {
                self.next_repair()
                    .or_else(|| self.next_resend())
                    .or_else(|| self.next_source())
            };
            if let Some(tx) = tx {
                out.push(tx);
                sent += 1;
            } else {
                break;
            }
        }
        if sent > 0 {
            self.last_send = now;
        } else if now >= self.last_send + self.cfg.probe_interval {
            out.push(Tx::Probe {
                seq: self.bump_seq(),
            });
            self.stats.probe_packets += 1;
            self.last_send = now;
        }
        // The bucket pays only for symbols that left (probes are free:
        // they are tiny and only sent while idle).
        self.bucket.consume(sent * self.frame_bytes);
    }

    fn bump_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    fn next_repair(&mut self) -> Option<Tx> {
        let idx = self
            .repair_queue
            .iter()
            .position(|b| self.enc[*b as usize] == EncState::Ready)?;
        let b = self.repair_queue[idx];
        let bi = b as usize;
        let esi = self.next_esi[bi];
        if esi > crate::wire::packet::MAX_ESI {
            // ESI space of this block exhausted (2^24 symbols): nothing
            // more can be sent for it; receivers will time out on it.
            self.pending_repair[bi] = 0;
            self.repair_queue.remove(idx);
            return None;
        }
        self.next_esi[bi] += 1;
        self.pending_repair[bi] -= 1;
        if self.pending_repair[bi] == 0 {
            self.repair_queue.remove(idx);
            self.max_short[bi] = 0;
        }
        let seq = self.bump_seq();
        self.last_seq[bi] = seq;
        self.stats.repair_packets += 1;
        Some(Tx::Symbol { seq, block: b, esi })
    }

    /// Move the source cursor past finished rounds, groups and blocks
    /// that need no source symbol, and return the block it points at.
    fn source_cursor(&mut self) -> Option<u32> {
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
                .map(|i| self.k[self.order[i] as usize])
                .max()
                .unwrap_or(0);
            if self.round >= max_k {
                // Group complete: release it (blocks still being resent
                // keep their data), prefetch the one after next.
                for i in range {
                    let b = self.order[i];
                    if self.resend[b as usize].is_empty() && self.needs[b as usize].is_empty() {
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
                self.skip_source[bi] = self.all_ready_have(b);
            }
            if self.round >= self.k[bi] || self.skip_source[bi] {
                self.mark_source_done_if_last(bi);
                self.pos += 1;
                continue;
            }
            return Some(b);
        }
    }

    fn next_source(&mut self) -> Option<Tx> {
        let b = self.source_cursor()?;
        let bi = b as usize;
        if !self.loaded[bi] {
            return None;
        }
        let esi = self.round;
        self.pos += 1;
        let seq = self.bump_seq();
        self.last_seq[bi] = seq;
        if esi + 1 == self.k[bi] {
            self.source_done[bi] = true;
        }
        self.stats.source_packets += 1;
        Some(Tx::Symbol { seq, block: b, esi })
    }

    fn release(&mut self, b: u32) {
        let bi = b as usize;
        if self.loaded[bi] || self.load_requested[bi] {
            self.loaded[bi] = false;
            self.load_requested[bi] = false;
            self.actions.push_back(Action::Release(b));
        }
    }

    /// Whether `b` is in the group being sent or the one prefetched.
    fn in_source_window(&self, b: u32) -> bool {
        !self.source_done_all
            && (self.group..self.group + 2).any(|g| self.group_range(g).any(|i| self.order[i] == b))
    }

    fn next_resend(&mut self) -> Option<Tx> {
        let idx = self
            .resend_queue
            .iter()
            .position(|b| self.loaded[*b as usize])?;
        let b = self.resend_queue[idx];
        let bi = b as usize;
        let (id, esis) = self.resend[bi].pop_front()?;
        if self.resend[bi].is_empty() {
            self.resend_queue.remove(idx);
            if self.pending_repair[bi] == 0 {
                self.max_short[bi] = 0;
            }
            if !self.in_source_window(b) && self.needs[bi].is_empty() {
                self.release(b);
            }
        }
        let seq = self.bump_seq();
        self.last_seq[bi] = seq;
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

    fn mark_source_done_if_last(&mut self, bi: usize) {
        if !self.source_done[bi] && self.round >= self.k[bi].saturating_sub(1) {
            self.source_done[bi] = true;
        }
    }

    /// Every ready receiver already reported `b` complete (resumed
    /// receivers): its source symbols would help nobody.
    fn all_ready_have(&self, b: u32) -> bool {
        let mut any = false;
        for r in self.receivers.values() {
            match r.state {
                RxState::Ready | RxState::Joining | RxState::Disconnected { .. } => {
                    if !r.status.seen_any && r.resumed_blocks == 0 {
                        return false;
                    }
                    if status_needs(&r.status, b) || r.status.blocks_done == 0 {
                        return false;
                    }
                    any = true;
                }
                _ => {}
            }
        }
        any
    }

    fn log_state(&self) {
        let held = self.loaded.iter().filter(|l| **l).count();
        let resend_waiting_for_data = self
            .resend_queue
            .iter()
            .filter(|b| !self.loaded[**b as usize])
            .count();
        let resends: usize = self.resend.iter().map(VecDeque::len).sum();
        // Counts by state and the furthest behind: one bounded line
        // however large the wave.
        let mut counts = [0usize; 5];
        let mut behind: Vec<(u32, &str)> = Vec::new();
        for r in self.receivers.values() {
            let i = match r.state {
                RxState::Joining => 0,
                RxState::Ready => {
                    behind.push((r.status.blocks_done, &r.name));
                    1
                }
                RxState::Disconnected { .. } => 2,
                RxState::Verified => 3,
                RxState::Failed(_) => 4,
            };
            counts[i] += 1;
        }
        behind.sort_unstable();
        let slowest: Vec<String> = behind
            .iter()
            .take(4)
            .map(|(done, name)| format!("{name}:{done}/{}", self.k.len()))
            .collect();
        let receivers = format!(
            "joining {} ready {} disconnected {} verified {} failed {}; slowest {}",
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            counts[4],
            slowest.join(" ")
        );
        tracing::info!(
            source_frontier = self.source_frontier(),
            source_done = self.source_done_all,
            resend_blocks = self.resend_queue.len(),
            resend_waiting_for_data,
            resends,
            repair_blocks = self.repair_queue.len(),
            coding_wait = self.coding_wait.len(),
            held,
            encoders = self.enc_lru.len(),
            rate_bps = self.bucket.rate_bps(),
            sent = self.stats.source_packets + self.stats.repair_packets,
            receivers = %receivers,
            "wave state"
        );
    }

    /// Summary lines per receiver, by id.
    pub fn summary(&self) -> Vec<(u32, ReceiverInfo)> {
        self.receivers
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    pub fn current_rate(&self) -> u64 {
        self.bucket.rate_bps()
    }
}

fn status_needs(st: &Status, b: u32) -> bool {
    st.partial.iter().any(|(x, _)| *x == b)
        || st.missing.iter().any(|(f, l)| b >= *f && (b - f) < *l)
}

/// ESIs set in a receiver's gap bitmap for a block of `k` source symbols;
/// `None` if the bitmap does not fit the block (then fountain repair).
fn gap_esis(bits: &[u8], k: u32) -> Option<Vec<u32>> {
    if bits.len() != (k as usize).div_ceil(8) {
        return None;
    }
    let esis: Vec<u32> = (0..k)
        .filter(|e| bits[(e / 8) as usize] & (1 << (e % 8)) != 0)
        .collect();
    (!esis.is_empty()).then_some(esis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::BlockInfo;

    fn manifest(blocks: usize, zero: &[usize]) -> Manifest {
        Manifest {
            image_size: blocks as u64 * 4096,
            image_hash: [9; 32],
            block_size: 4096,
            symbol_size: 1024,
            blocks: (0..blocks)
                .map(|i| BlockInfo {
                    hash: [0; 32],
                    zero: zero.contains(&i),
                })
                .collect(),
        }
    }

    fn cfg(expected: usize) -> SenderConfig {
        SenderConfig {
            expected,
            interleave: 2,
            rate_bps: 1_000_000_000,
            ..Default::default()
        }
    }

    /// Run the sender's actions the way the driver would: loads and
    /// encoders complete at once.
    fn pump(s: &mut WaveSender) -> Vec<Action> {
        let mut seen = Vec::new();
        while let Some(a) = s.poll_action() {
            match a {
                Action::Load(b) => {
                    s.on_block_loaded(b);
                }
                Action::BuildEncoder(b) => s.on_encoder_ready(b),
                _ => {}
            }
            seen.push(a);
        }
        seen
    }

    fn drain(s: &mut WaveSender, now: Instant) -> Vec<Tx> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            pump(s);
            let before = out.len();
            s.poll_transmit(now, 64, &mut out);
            if out.len() == before || matches!(out.last(), Some(Tx::Probe { .. })) {
                break;
            }
        }
        out
    }

    #[test]
    fn waits_for_expected_receivers_then_interleaves_source() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), manifest(5, &[3]), 1100, t0);
        pump(&mut s);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        let mut out = Vec::new();
        s.poll_transmit(t0 + Duration::from_secs(1), 64, &mut out);
        // Only a keep-alive probe while waiting, no symbols.
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            matches!(out[0], Tx::Probe { .. }),
            "sent before all receivers were ready"
        );
        let b = s.on_hello("b", t0);
        s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
        let txs = drain(&mut s, t0 + Duration::from_millis(1));
        let syms: Vec<(u32, u32)> = txs
            .iter()
            .filter_map(|t| match t {
                Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
                _ => None,
            })
            .collect();
        // Groups of 2 blocks, round-robin inside a group, zero block 3 skipped.
        assert_eq!(
            &syms[..8],
            &[
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1),
                (0, 2),
                (1, 2),
                (0, 3),
                (1, 3)
            ]
        );
        assert_eq!(syms.len(), 16);
        assert!(!syms.iter().any(|(b, _)| *b == 3));
        // Sequence numbers are consecutive.
        for (i, t) in txs.iter().enumerate() {
            if let Tx::Symbol { seq, .. } = t {
                assert_eq!(*seq, i as u32 + 1, "probe sent while waiting took seq 0");
            }
        }
    }

    #[test]
    fn repair_is_max_shortfall_plus_margin_and_only_after_seen() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), manifest(2, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        let b = s.on_hello("b", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
        let txs = drain(&mut s, t0);
        assert_eq!(
            txs.iter()
                .filter(|t| matches!(t, Tx::Symbol { .. }))
                .count(),
            8
        );
        // Receiver a's report predates the last symbol of block 1: ignored.
        let early = Status {
            seq_hi: 5,
            seen_any: true,
            partial: vec![(1, 2)],
            ..Default::default()
        };
        s.on_message(a, Msg::Status(early), t0);
        pump(&mut s);
        assert!(drain(&mut s, t0)
            .iter()
            .all(|t| matches!(t, Tx::Probe { .. })));
        let st = |short| Status {
            seq_hi: 8,
            seen_any: true,
            partial: vec![(0, short)],
            ..Default::default()
        };
        s.on_message(a, Msg::Status(st(1)), t0);
        s.on_message(b, Msg::Status(st(3)), t0);
        let txs = drain(&mut s, t0 + Duration::from_millis(1));
        let rep: Vec<_> = txs
            .iter()
            .filter_map(|t| match t {
                Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
                _ => None,
            })
            .collect();
        // max(1, 3) + 2 fixed + ceil(3 * 0.05) = 6 fresh ESIs from K=4.
        assert_eq!(rep, (4..10).map(|e| (0, e)).collect::<Vec<_>>());
        // A stale repeat of the same report does not trigger more.
        s.on_message(b, Msg::Status(st(3)), t0);
        assert!(drain(&mut s, t0 + Duration::from_millis(2))
            .iter()
            .all(|t| matches!(t, Tx::Probe { .. })));
    }

    #[test]
    fn ends_when_all_verified_or_dropped() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), manifest(2, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        let b = s.on_hello("b", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(
            a,
            Msg::Done(Verdict::Verified {
                image_hash: [9; 32],
            }),
            t0,
        );
        assert!(!s.is_finished());
        // b goes silent: dropped after the timeout, and the wave ends.
        s.on_tick(t0 + Duration::from_secs(16));
        assert!(s.is_finished());
        let sum = s.summary();
        assert_eq!(sum[0].1.state, RxState::Verified);
        assert!(matches!(sum[1].1.state, RxState::Failed(_)));
    }

    #[test]
    fn same_name_again_replaces_a_live_connection_and_reclaims_a_dead_one() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), manifest(1, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        pump(&mut s);
        // Still "connected" (a power-cycled device's old TCP session):
        // the new connection gets a new slot, the old one is closed.
        let a2 = s.on_hello("a", t0);
        assert_ne!(a, a2);
        let acts = pump(&mut s);
        assert!(acts.contains(&Action::Disconnect(a)), "{acts:?}");
        assert_eq!(s.receivers().len(), 1);
        // Messages still arriving on the old connection are ignored.
        s.on_message(
            a,
            Msg::Done(Verdict::Verified {
                image_hash: [9; 32],
            }),
            t0,
        );
        assert!(s.receivers().values().all(|r| r.state == RxState::Joining));
        // After a clean disconnect the same name takes its slot back.
        s.on_disconnect(a2, t0);
        assert_eq!(s.on_hello("a", t0), a2);
    }

    #[test]
    fn wrong_hash_verdict_is_a_failure() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(1), manifest(1, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(
            a,
            Msg::Done(Verdict::Verified {
                image_hash: [1; 32],
            }),
            t0,
        );
        assert!(s.is_finished());
        assert!(matches!(s.summary()[0].1.state, RxState::Failed(_)));
    }

    #[test]
    fn start_timeout_starts_with_present_and_never_waits_forever() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(3), manifest(1, &[]), 1100, t0);
        s.on_tick(t0 + Duration::from_secs(61));
        assert!(s.is_finished(), "nobody came: must end");
        let mut s = WaveSender::new(cfg(3), manifest(1, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(
            a,
            Msg::Status(Status::default()),
            t0 + Duration::from_secs(55),
        );
        s.on_tick(t0 + Duration::from_secs(61));
        assert!(!drain(&mut s, t0 + Duration::from_secs(61)).is_empty());
    }

    #[test]
    fn reconnect_keeps_identity_and_late_joiner_gets_source_again() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(1), manifest(2, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        drain(&mut s, t0);
        s.on_disconnect(a, t0);
        let a2 = s.on_hello("a", t0);
        assert_eq!(a, a2);
        s.on_message(a2, Msg::Ready { resumed_blocks: 1 }, t0);
        let st = Status {
            seq_hi: 0,
            seen_any: false,
            blocks_done: 1,
            missing: vec![(1, 1)],
            ..Default::default()
        };
        s.on_message(a2, Msg::Status(st), t0);
        // A whole block missing at one receiver: its source symbols again
        // (no encoder, no decoding at the receiver).
        assert_eq!(
            symbols(&drain(&mut s, t0 + Duration::from_millis(1))),
            vec![(1, 0), (1, 1), (1, 2), (1, 3)]
        );
        assert_eq!(s.stats.resent_source_packets, 4);
    }

    fn symbols(txs: &[Tx]) -> Vec<(u32, u32)> {
        txs.iter()
            .filter_map(|t| match t {
                Tx::Symbol { block, esi, .. } => Some((*block, *esi)),
                _ => None,
            })
            .collect()
    }

    fn two_ready(s: &mut WaveSender, t0: Instant) -> (u32, u32) {
        let a = s.on_hello("a", t0);
        let b = s.on_hello("b", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_message(b, Msg::Ready { resumed_blocks: 0 }, t0);
        drain(s, t0);
        s.on_message(a, behind(), t0);
        s.on_message(b, behind(), t0);
        (a, b)
    }

    /// A report from a receiver still working through the first packets.
    fn behind() -> Msg {
        Msg::Status(Status {
            seq_hi: 1,
            seen_any: true,
            partial: vec![(0, 62)],
            ..Default::default()
        })
    }

    fn bitmap(esis: &[u32], k: u32) -> Vec<u8> {
        let mut b = vec![0u8; (k as usize).div_ceil(8)];
        for e in esis {
            b[(*e / 8) as usize] |= 1 << (e % 8);
        }
        b
    }

    fn gap_report(block: u32, gaps: Vec<u32>) -> Msg {
        Msg::Status(Status {
            seq_hi: 100,
            seen_any: true,
            partial: vec![(block, gaps.len() as u32)],
            source_gaps: vec![(block, bitmap(&gaps, 64))],
            ..Default::default()
        })
    }

    fn coded(txs: &[Tx]) -> Vec<(u32, u32, Vec<u32>)> {
        txs.iter()
            .filter_map(|t| match t {
                Tx::Coded {
                    block, id, esis, ..
                } => Some((*block, *id, esis.clone())),
                _ => None,
            })
            .collect()
    }

    fn big_block() -> Manifest {
        Manifest {
            image_size: 64 * 1024,
            image_hash: [9; 32],
            block_size: 64 * 1024,
            symbol_size: 1024,
            blocks: vec![BlockInfo {
                hash: [0; 32],
                zero: false,
            }],
        }
    }

    #[test]
    fn losses_are_resent_coded_once_every_receiver_reported() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
        let (a, b) = two_ready(&mut s, t0);
        s.on_message(a, gap_report(0, vec![3, 9]), t0);
        // One report in: the block waits for the other receiver's, which
        // runs far behind but keeps reporting.
        for ms in [1, 60, 120, 180] {
            let at = t0 + Duration::from_millis(ms);
            s.on_message(b, behind(), at);
            let txs = drain(&mut s, at);
            assert!(symbols(&txs).is_empty() && coded(&txs).is_empty());
        }
        s.on_message(
            b,
            gap_report(0, vec![9, 40]),
            t0 + Duration::from_millis(200),
        );
        let plans: Vec<_> = pump(&mut s)
            .into_iter()
            .filter_map(|a| match a {
                Action::Control(
                    id,
                    Msg::Coded {
                        block,
                        first,
                        combos,
                    },
                ) => Some((id, block, first, combos)),
                _ => None,
            })
            .collect();
        // 3 ^ 40 repairs a (has 40) and b (has 3); 9, lost at both, goes
        // plain. Two datagrams instead of the union's three; both
        // receivers learn the combination before it is sent.
        assert_eq!(
            plans,
            vec![(a, 0, 0, vec![vec![3, 40]]), (b, 0, 0, vec![vec![3, 40]])]
        );
        let txs = drain(&mut s, t0 + Duration::from_millis(202));
        assert_eq!(coded(&txs), vec![(0, 0, vec![3, 40])]);
        assert_eq!(symbols(&txs), vec![(0, 9)]);
        assert_eq!(
            (s.stats.resent_source_packets, s.stats.coded_packets),
            (2, 1)
        );
    }

    /// Reports keep coming while a round is on the wire; they must not
    /// queue the same symbols again (a late joiner's whole-block needs
    /// once starved the source that way).
    #[test]
    fn reports_during_a_queued_round_do_not_requeue_it() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(1), big_block(), 1100, t0);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        drain(&mut s, t0);
        s.on_message(a, gap_report(0, vec![3, 9]), t0);
        pump(&mut s);
        let mut first = Vec::new();
        s.poll_transmit(t0 + Duration::from_millis(1), 1, &mut first);
        assert_eq!(symbols(&first), vec![(0, 3)]);
        s.on_message(a, gap_report(0, vec![3, 9]), t0);
        let rest = drain(&mut s, t0 + Duration::from_millis(2));
        assert_eq!(symbols(&rest), vec![(0, 9)]);
        assert_eq!(s.stats.resent_source_packets, 2);
    }

    /// A receiver that lost whole blocks (a late joiner) gets them
    /// resent, but the rest of the image keeps flowing to everybody.
    #[test]
    fn a_backlog_of_resends_shares_the_wire_with_the_source() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(1), manifest(8, &[]), 1100, t0);
        let a = s.on_hello("a", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        pump(&mut s);
        let mut first = Vec::new();
        s.poll_transmit(t0, 8, &mut first);
        assert_eq!(symbols(&first).len(), 8, "{first:?}");
        // Blocks 0 and 1 (the first group) never arrived.
        let st = Status {
            seq_hi: 8,
            seen_any: true,
            missing: vec![(0, 8)],
            ..Default::default()
        };
        s.on_message(a, Msg::Status(st), t0);
        pump(&mut s);
        let mut next = Vec::new();
        s.poll_transmit(t0 + Duration::from_millis(1), 8, &mut next);
        let (old, new): (Vec<_>, Vec<_>) = symbols(&next).into_iter().partition(|(b, _)| *b < 2);
        assert_eq!((old.len(), new.len()), (4, 4), "{next:?}");
    }

    #[test]
    fn a_silent_receiver_is_waited_for_only_a_few_report_intervals() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
        let (a, _b) = two_ready(&mut s, t0);
        s.on_message(a, gap_report(0, vec![3, 9]), t0);
        assert!(symbols(&drain(&mut s, t0 + Duration::from_millis(100))).is_empty());
        assert!(symbols(&drain(&mut s, t0 + Duration::from_millis(499))).is_empty());
        // b has not reported for 25 intervals (500 ms at least): stale.
        let txs = drain(&mut s, t0 + Duration::from_millis(502));
        assert_eq!(symbols(&txs), vec![(0, 3), (0, 9)]);
    }

    #[test]
    fn a_receiver_reporting_but_never_past_the_block_holds_it_only_until_the_hold() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(cfg(2), big_block(), 1100, t0);
        let (a, b) = two_ready(&mut s, t0);
        s.on_message(a, gap_report(0, vec![3, 9]), t0);
        let mut sent = Vec::new();
        for ms in (20..=2100).step_by(20) {
            let at = t0 + Duration::from_millis(ms);
            s.on_message(b, behind(), at);
            let txs = drain(&mut s, at);
            if !symbols(&txs).is_empty() {
                sent.push((ms, symbols(&txs)));
            }
        }
        assert_eq!(sent, vec![(2000, vec![(0, 3), (0, 9)])]);
    }

    #[test]
    fn conflicting_losses_beyond_the_factor_get_fountain_repair() {
        // a, b, c each miss two symbols, every pair shared: no two can go
        // in one datagram, 3 resends > factor 1 x max shortfall 2 + 0.
        let t0 = Instant::now();
        let mut c = cfg(3);
        c.source_resend_factor = 1.0;
        c.repair_margin = 0;
        let mut s = WaveSender::new(c, big_block(), 1100, t0);
        let ids: Vec<u32> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                let id = s.on_hello(n, t0);
                s.on_message(id, Msg::Ready { resumed_blocks: 0 }, t0);
                id
            })
            .collect();
        drain(&mut s, t0);
        for (id, gaps) in ids.iter().zip([vec![1, 2], vec![2, 3], vec![3, 1]]) {
            s.on_message(*id, gap_report(0, gaps), t0);
        }
        let sent = symbols(&drain(&mut s, t0 + Duration::from_millis(1)));
        assert!(sent.iter().all(|(_, esi)| *esi >= 64), "{sent:?}");
        // max shortfall 2 + 0 + ceil(0.1) = 3 fresh repair symbols.
        assert_eq!(sent.len(), 3);
    }
}

#[cfg(test)]
mod membership_tests {
    use super::*;
    use crate::image::manifest::BlockInfo;

    fn manifest() -> Manifest {
        Manifest {
            image_size: 4096,
            image_hash: [9; 32],
            block_size: 4096,
            symbol_size: 1024,
            blocks: vec![BlockInfo {
                hash: [0; 32],
                zero: false,
            }],
        }
    }

    #[test]
    fn named_members_only_and_a_member_that_never_joins_is_dropped() {
        let t0 = Instant::now();
        let cfg = SenderConfig {
            expected: 1,
            receiver_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let mut s = WaveSender::new(cfg, manifest(), 1100, t0);
        assert!(s.admits("anyone"), "open wave without members");
        s.expect_member("d-1", t0);
        s.expect_member("d-2", t0);
        assert!(s.admits("d-2"));
        assert!(!s.admits("intruder"));
        let a = s.on_hello("d-1", t0);
        s.on_message(a, Msg::Ready { resumed_blocks: 0 }, t0);
        s.on_tick(t0);
        s.on_message(
            a,
            Msg::Done(Verdict::Verified {
                image_hash: [9; 32],
            }),
            t0,
        );
        s.on_tick(t0 + Duration::from_secs(1));
        assert!(!s.is_finished(), "d-2 is still expected");
        s.on_tick(t0 + Duration::from_secs(6));
        assert_eq!(s.take_dropped().len(), 1);
        s.on_tick(t0 + Duration::from_secs(6));
        assert!(s.is_finished());
    }

    #[test]
    fn rate_ceiling_changes_the_pacing_rate() {
        let t0 = Instant::now();
        let mut s = WaveSender::new(SenderConfig::default(), manifest(), 1100, t0);
        s.set_rate_ceiling(20_000_000, t0);
        assert_eq!(s.current_rate(), 20_000_000);
    }
}
