//! The wave sender core: which symbol goes next, when repair is due, when a
//! receiver is dropped and when the wave is over.
//!
//! Owns: send order (source symbols interleaved across a group of blocks;
//! repair driven by aggregated receiver feedback, taking turns with the
//! source while both have work), pacing through a
//! token bucket, the loss-driven rate, receiver liveness and the end
//! condition. Must not: touch sockets, files, threads or clocks. The I/O
//! driver (`io::send`) calls `on_*` with events and `now`, drains
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

mod blocks;

use blocks::{BlockState, EncState};
mod membership;
mod repair;
mod schedule;
mod slow;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dataplane::pacing::{RateController, TokenBucket};
use crate::image::manifest::Manifest;
use crate::wire::control::{Msg, Status};

/// What a wave does with a member that cannot keep up with the others: a
/// slow port, NIC or disk, a congested uplink, a lossy cable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowMembers {
    /// The wave goes on at the pace of the members that keep up; a member
    /// whose loss is far above theirs falls behind: its loss no longer
    /// sets the rate, its needs are not planned, and it keeps every
    /// symbol that reaches it (any symbol of a fountain code helps). Once
    /// the others are done, what it still lacks is sent at the rate it
    /// takes (several behind: the fastest of them first, the same way).
    #[default]
    CatchUp,
    /// The whole wave slows to the slowest member (the loss-driven rate
    /// follows the worst receiver), as udpcast and UFTP do.
    Wait,
    /// A member that falls behind is failed, and the others go on.
    Drop,
}

impl std::str::FromStr for SlowMembers {
    type Err = String;

    fn from_str(s: &str) -> Result<SlowMembers, String> {
        match s {
            "catch_up" | "catch-up" => Ok(SlowMembers::CatchUp),
            "wait" => Ok(SlowMembers::Wait),
            "drop" => Ok(SlowMembers::Drop),
            other => Err(format!(
                "slow members: expected catch_up, wait or drop, not {other:?}"
            )),
        }
    }
}

/// How a wave sender behaves.
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
    /// receiver with no report for 25 intervals (at least 500 ms) is not
    /// waited for.
    pub feedback: Duration,
    /// Packets the driver waits to have tokens for before waking: fewer,
    /// larger `sendmmsg` batches and no busy waiting (must fit the burst).
    pub pace_batch: usize,
    /// What to do with a member that cannot keep up.
    pub slow_members: SlowMembers,
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
            slow_members: SlowMembers::CatchUp,
        }
    }
}

/// How often a sending wave logs where it stands (a heartbeat for the
/// operator; enough to tell a stuck queue from a slow receiver).
const STATE_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Receiver reports a wave's sender takes per second, at most, however
/// many receivers it has: past `REPORT_BUDGET / base` receivers the
/// report interval grows with N (1,000 receivers at a 20 ms base report
/// every 50 ms). A report costs the sender O(its size), so this bounds
/// the control work a wave adds to the send thread.
pub const REPORT_BUDGET: u32 = 20_000;

/// The report interval for a wave of `receivers` whose configured
/// interval is `base`: `base`, or longer so that all of them together
/// send at most [`REPORT_BUDGET`] reports a second.
pub fn report_interval(base: Duration, receivers: usize) -> Duration {
    let spread = Duration::from_micros(receivers as u64 * 1_000_000 / u64::from(REPORT_BUDGET));
    base.max(spread)
}

/// Missed report intervals after which a receiver is not waited for.
const STALE_REPORTS: u32 = 25;
/// ... but never less than this: a busy receiver's reports come late and
/// irregularly, and a receiver that died costs this wait only once.
const MIN_STALE: Duration = Duration::from_millis(500);
/// How often the transmit path checks the plans' holds.
const PLAN_CHECK: Duration = Duration::from_millis(2);
/// How long the set of receivers a plan waits for is kept when no
/// receiver became ready, ended, or lost or regained its connection (each
/// of which rebuilds it at once): rebuilding walks every receiver, a
/// wave may have a thousand, and a receiver goes stale only over
/// `STALE_REPORTS` intervals, so noticing that a few ms late costs
/// nothing.
const WAIT_SET_MAX_AGE: Duration = Duration::from_millis(20);

/// Probe spacing while waiting for receivers before the wave starts.
const WAITING_PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tx {
    /// A source (ESI < K) or repair symbol.
    Symbol {
        /// The datagram's sequence number.
        seq: u32,
        /// The block.
        block: u32,
        /// The symbol.
        esi: u32,
    },
    /// XOR of the source symbols `esis` of `block`, announced as
    /// combination `id` (see [`Msg::Coded`]).
    Coded {
        /// The datagram's sequence number.
        seq: u32,
        /// The block.
        block: u32,
        /// The combination id.
        id: u32,
        /// The source symbols XORed.
        esis: Vec<u32>,
    },
    /// An empty datagram that moves the sequence on while idle.
    Probe {
        /// The datagram's sequence number.
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
    /// The encoder of `block` is not needed any more.
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

/// Where a receiver stands in the wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxState {
    /// Welcome sent, not joined yet.
    Joining,
    /// Joined the group and reporting.
    Ready,
    /// Connection lost; may come back under the same name.
    Disconnected {
        /// Since when.
        since: Instant,
    },
    /// Reported the manifest's image hash.
    Verified,
    /// Dropped, or reported a failure; the text says why.
    Failed(String),
}

impl RxState {
    /// Verified or failed: nothing more happens to it in this wave.
    pub fn terminal(&self) -> bool {
        matches!(self, RxState::Verified | RxState::Failed(_))
    }
}

/// What the sender knows of one receiver.
#[derive(Debug, Clone)]
pub struct ReceiverInfo {
    /// Its name (the device id in appliance waves).
    pub name: String,
    /// Where it stands.
    pub state: RxState,
    /// When it said hello.
    pub joined_at: Instant,
    /// When it verified or failed.
    pub ended_at: Option<Instant>,
    /// Blocks it had on its output at start.
    pub resumed_blocks: u32,
    /// Its last message.
    pub last_heard: Instant,
    /// Its last report.
    pub status: Status,
    /// Its loss, smoothed over its reports (0..1).
    pub loss: f64,
    /// It fell behind the wave (`SlowMembers::CatchUp`): served once the
    /// members that keep up are done.
    pub behind: bool,
    /// It fell behind at some point of the wave.
    pub fell_behind: bool,
    /// Its worst loss since the last rate-control interval.
    interval_loss: f64,
    /// Reports that measured its loss (since it joined, or since its
    /// catch-up began).
    loss_samples: u32,
    prev_received: u64,
    prev_expected: u64,
}

/// Counters for the summary and metrics.
#[derive(Debug, Clone, Default)]
pub struct SendStats {
    /// Source symbols sent (first time).
    pub source_packets: u64,
    /// Fountain repair symbols plus resent source symbols.
    pub repair_packets: u64,
    /// Of `repair_packets`, resent source symbols (plain or coded).
    pub resent_source_packets: u64,
    /// Of `resent_source_packets`, coded datagrams (XOR of several).
    pub coded_packets: u64,
    /// Probes sent.
    pub probe_packets: u64,
    /// The pacing rate now, bits/s.
    pub rate_bps: u64,
    /// When sending started.
    pub started_at: Option<Instant>,
    /// When the last source symbol left.
    pub source_done_at: Option<Instant>,
    /// When the wave ended.
    pub finished_at: Option<Instant>,
    /// Members that fell behind the wave (`SlowMembers::CatchUp`).
    pub fell_behind: u64,
    /// Members caught up after the others were done.
    pub caught_up: u64,
    /// Members behind that kept up again before that (a passing stall).
    pub rejoined: u64,
}

/// The wave sender core. Its parts live in the submodules: membership
/// (`membership`), per-block state (`blocks`), repair planning (`repair`)
/// and the source schedule (`schedule`); this file holds the phases,
/// pacing and the transmit loop.
pub struct WaveSender {
    cfg: SenderConfig,
    manifest: Manifest,
    /// One per block of the image.
    blocks: Vec<BlockState>,
    /// Blocks that go on the wire, in image order.
    order: Vec<u32>,
    phase: Phase,
    created: Instant,
    bucket: TokenBucket,
    rate: RateController,
    next_rate_tick: Instant,
    next_state_log: Instant,
    frame_bytes: usize,
    seq: u32,
    // Source cursor: group index, round (ESI), position within the group.
    group: usize,
    round: u32,
    pos: usize,
    source_done_all: bool,
    /// Blocks with fountain repair symbols pending.
    repair_queue: VecDeque<u32>,
    /// Receivers a plan waits for (ready, receiving, reporting), and when
    /// that list was made.
    wait_for: (Option<Instant>, Vec<u32>),
    /// When the transmit path next checks the plans' holds.
    next_plan_check: Instant,
    /// Whose turn the next datagram is: source or repair.
    source_turn: bool,
    /// Blocks with needs waiting to be planned.
    coding_wait: Vec<u32>,
    /// Blocks with planned resends.
    resend_queue: VecDeque<u32>,
    /// Blocks with an encoder, least recently used first.
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
    /// Counters for the summary and metrics.
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
        let blocks: Vec<BlockState> = (0..manifest.block_count())
            .map(|b| BlockState::new(manifest.source_symbols(b)))
            .collect();
        let order: Vec<u32> = manifest.data_blocks().collect();
        let mut s = WaveSender {
            bucket: TokenBucket::new(cfg.rate_bps, cfg.burst_bytes.max(frame_bytes), now),
            rate: RateController::new(cfg.rate_bps, cfg.min_rate_bps, cfg.loss_threshold),
            next_rate_tick: now + cfg.rate_interval,
            next_state_log: now + STATE_LOG_INTERVAL,
            frame_bytes,
            cfg,
            seq: 0,
            group: 0,
            round: 0,
            pos: 0,
            source_done_all: order.is_empty(),
            repair_queue: VecDeque::new(),
            wait_for: (None, Vec::new()),
            next_plan_check: now,
            source_turn: false,
            coding_wait: Vec::new(),
            resend_queue: VecDeque::new(),
            enc_lru: VecDeque::new(),
            blocks,
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

    /// Share of a total rate (see `RateController::set_max_rate`).
    pub fn set_rate_ceiling(&mut self, bps: u64, now: Instant) {
        self.rate.set_max_rate(bps);
        let r = self.rate.current();
        if r != self.bucket.rate_bps() {
            self.bucket.set_rate(r, now);
            self.stats.rate_bps = r;
        }
    }

    /// The heap this core holds for its wave, counted from its
    /// collections (element sizes and lengths, a BTree entry as its key
    /// and value; allocator slack not counted): what grows with blocks
    /// and receivers. The manifest is the image's, not counted.
    pub fn state_bytes(&self) -> usize {
        use std::mem::size_of;
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                size_of::<BlockState>()
                    + b.needs
                        .values()
                        .map(|v| 4 + 24 + v.len() * 4)
                        .sum::<usize>()
                    + b.heard.len() * 4
                    + b.resend
                        .iter()
                        .map(|(_, v)| 28 + v.len() * 4)
                        .sum::<usize>()
            })
            .sum();
        let receivers: usize = self
            .receivers
            .values()
            .map(|r| {
                4 + size_of::<ReceiverInfo>()
                    + r.name.len()
                    + (r.status.missing.len() + r.status.partial.len()) * 8
                    + r.status
                        .source_gaps
                        .iter()
                        .map(|(_, g)| 28 + g.len())
                        .sum::<usize>()
            })
            .sum();
        let members = self
            .members
            .as_ref()
            .map_or(0, |m| m.keys().map(|k| k.len() + 24 + 16).sum());
        blocks
            + receivers
            + members
            + self.order.len() * 4
            + (self.repair_queue.len() + self.resend_queue.len() + self.enc_lru.len()) * 4
            + (self.coding_wait.len() + self.wait_for.1.len()) * 4
            + self.actions.len() * size_of::<Action>()
    }

    /// The image it sends.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Receivers by id.
    pub fn receivers(&self) -> &BTreeMap<u32, ReceiverInfo> {
        &self.receivers
    }

    /// The wave ended.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Periodic housekeeping: start policy, receiver timeouts, rate control.
    pub fn on_tick(&mut self, now: Instant) {
        self.expire_receivers(now);
        if self.phase == Phase::Sending && now >= self.next_state_log {
            self.next_state_log = now + STATE_LOG_INTERVAL;
            self.log_state();
        }
        self.sort_out_slow(now);
        if now >= self.next_rate_tick {
            self.next_rate_tick = now + self.cfg.rate_interval;
            let worst_loss = self.take_worst_loss();
            let r = self.rate.on_interval(worst_loss);
            if r != self.bucket.rate_bps() {
                tracing::info!(rate_bps = r, worst_loss, "rate changed");
                self.bucket.set_rate(r, now);
            }
            self.stats.rate_bps = r;
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
        // Cheapest first: while any receiver runs (most ticks) nothing
        // else is looked at.
        if all_in
            && self.receivers.values().all(|r| r.state.terminal())
            && self.pending_members() == 0
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
            .any(|b| self.blocks[*b as usize].enc == EncState::Ready)
            || self
                .resend_queue
                .iter()
                .any(|b| self.blocks[*b as usize].loaded)
            || self
                .source_cursor()
                .is_some_and(|b| self.blocks[b as usize].loaded)
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
        if now >= self.next_plan_check {
            self.next_plan_check = now + PLAN_CHECK;
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

    fn log_state(&self) {
        let held = self.blocks.iter().filter(|b| b.loaded).count();
        let resend_waiting_for_data = self
            .resend_queue
            .iter()
            .filter(|b| !self.blocks[**b as usize].loaded)
            .count();
        let resends: usize = self.blocks.iter().map(|b| b.resend.len()).sum();
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
            .map(|(done, name)| format!("{name}:{done}/{}", self.blocks.len()))
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

    /// The pacing rate now, bits/s.
    pub fn current_rate(&self) -> u64 {
        self.bucket.rate_bps()
    }
}
