//! Whole-wave simulation: the sender core and several receiver cores,
//! driven the way their I/O drivers drive them, on a simulated clock.
//!
//! Owns: a model of the send driver's pacing loop (`io::send`: block loads
//! and encoders finish on worker threads in any order; actions are carried
//! out in the order the core queued them; datagrams are rendered by the
//! driver's own `render::Packetizer`), of the control connections (ordered,
//! delayed, closed on a kill) and of the multicast link (per-receiver
//! random loss, delay).
//! It checks what a unit test of either core alone cannot: that the two
//! together always end, with every surviving receiver holding the exact
//! image, under late joins, kills, restarts and loss. Must not: use sockets,
//! threads or the wall clock (runs are seeded and repeatable).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::receiver::{decode_block, DecodeJob, DecodeOutcome, ReceiverCore};
use super::render::{Packetizer, Rendered, SymbolSource};
use super::sender::{Action, SenderConfig, SlowMembers, WaveSender};
use crate::image::fec::BlockEncoder;
use crate::image::manifest::Manifest;
use crate::wire::control::{Msg, Verdict};
use crate::wire::packet;

const KEY: [u8; 32] = [9; 32];
const SESSION: u32 = 77;
const SYMBOL: usize = 512;
const STEP: Duration = Duration::from_micros(500);
const FEEDBACK: Duration = Duration::from_millis(20);
const TICK: Duration = Duration::from_millis(10);
/// Simulated time after which a wave counts as hung.
const LIMIT: Duration = Duration::from_secs(40);

/// What the simulated send thread holds: the image, the blocks it has
/// "loaded" and the encoders it built.
struct SimSource<'a> {
    data: &'a [u8],
    m: &'a Manifest,
    held: &'a HashMap<u32, ()>,
    encoders: &'a HashMap<u32, BlockEncoder>,
}

impl SymbolSource for SimSource<'_> {
    fn block(&self, b: u32) -> Option<&[u8]> {
        self.held.get(&b)?;
        let at = usize::try_from(self.m.block_offset(b)).ok()?;
        self.data.get(at..at + self.m.block_len(b))
    }
    fn encoder(&self, b: u32) -> Option<&BlockEncoder> {
        self.encoders.get(&b)
    }
}

/// One device of a scenario.
#[derive(Clone)]
struct Device {
    name: String,
    /// When it connects, from the start of the simulation.
    join_at: Duration,
    loss: f64,
    /// Killed (power loss) once this share of its blocks is done.
    kill_at: Option<f64>,
    /// Started again this long after the kill.
    restart_after: Option<Duration>,
    /// Its port's rate, bits/s (a tbf with a 50 ms queue, as the netlab
    /// bench's slow port): what does not fit is dropped.
    link_bps: Option<u64>,
    /// Every datagram lost in this span from the start (a receiver
    /// starved of CPU, a flapping link).
    stall: Option<(Duration, Duration)>,
    /// The port is slow (`link_bps`) only until this long from the start.
    slow_until: Option<Duration>,
}

impl Device {
    fn new(name: &str, loss: f64) -> Device {
        Device {
            name: name.to_string(),
            join_at: Duration::ZERO,
            loss,
            kill_at: None,
            restart_after: None,
            link_bps: None,
            stall: None,
            slow_until: None,
        }
    }

    #[cfg(test)]
    fn slow(name: &str, link_bps: u64) -> Device {
        Device {
            link_bps: Some(link_bps),
            ..Device::new(name, 0.0)
        }
    }
}

/// The longest a datagram waits in a slow port's queue before it is
/// dropped (tbf `latency`).
const LINK_QUEUE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq)]
enum End {
    Running,
    /// Reported its verified image.
    Verified,
    /// Killed and not started again.
    Dead,
    /// The sender ended its session (`Finish` or a closed connection).
    Refused(String),
}

struct SimRx {
    dev: Device,
    started: bool,
    /// Sender-side id of the live connection.
    conn: Option<u32>,
    core: Option<ReceiverCore>,
    /// The device's disk: survives a kill, like the resume bitmap.
    disk: Vec<u8>,
    on_disk: Vec<bool>,
    udp: VecDeque<(Instant, Arc<Vec<u8>>)>,
    ctl: VecDeque<(Instant, Msg)>,
    decoding: Vec<(Instant, DecodeJob)>,
    next_status: Instant,
    restart_at: Option<Instant>,
    reported: bool,
    end: End,
    /// When its slow port is free again.
    link_free: Instant,
    /// When it reported a verified image, from the start.
    verified_at: Option<Duration>,
}

enum Work {
    Load(u32),
    Encode(u32),
}

enum ToSender {
    Msg(u32, Msg),
    Disconnect(u32),
}

struct Sim {
    rng: StdRng,
    data: Vec<u8>,
    m: Manifest,
    s: WaveSender,
    t0: Instant,
    rxs: Vec<SimRx>,
    /// Image blocks the driver holds (`send::Held::loaded`).
    held: HashMap<u32, ()>,
    encoders: HashMap<u32, BlockEncoder>,
    work: Vec<(Instant, Work)>,
    to_sender: VecDeque<(Instant, ToSender)>,
    /// Transmissions the driver had no data for (the real driver logs
    /// "not loaded; skipped" and the datagram is lost for good).
    skipped: u64,
    last_tick: Instant,
    /// Receiver index by the sender's connection id.
    by_conn: HashMap<u32, usize>,
    /// Where the run's work went.
    cost: Cost,
    /// The session's report interval (`sender::report_interval`).
    s_feedback: Duration,
}

/// Real time spent in each side's code during a run, and the control
/// messages each way: the simulation is single-threaded, so real time
/// in a core's calls is that core's CPU time.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    /// In the sender core's control calls: hellos, reports, ticks,
    /// actions (plans).
    pub sender_control: Duration,
    /// In `poll_transmit` and rendering (tagging) its datagrams.
    pub sender_send: Duration,
    /// Datagrams the sender sent.
    pub datagrams: u64,
    /// In the receivers: datagrams, plans, decoding and checking blocks.
    pub receivers: Duration,
    /// Control messages to the sender (status reports, verdicts).
    pub to_sender: u64,
    /// Control messages from the sender (plans, session ends).
    pub from_sender: u64,
}

/// Size of the simulated image and how the sender sends it.
#[derive(Clone, Copy)]
struct Shape {
    blocks: usize,
    block_size: usize,
    interleave: usize,
    rate_bps: u64,
}

#[cfg(test)]
const SMALL: Shape = Shape {
    blocks: 40,
    block_size: 16 * 1024,
    interleave: 4,
    rate_bps: 40_000_000,
};

fn image(shape: Shape, seed: u64) -> (Vec<u8>, Manifest) {
    let (blocks, bs) = (shape.blocks, shape.block_size);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data: Vec<u8> = (0..blocks * bs - 300).map(|_| rng.random()).collect();
    for b in (3..blocks).step_by(7) {
        let end = ((b + 1) * bs).min(data.len());
        data[b * bs..end].fill(0);
    }
    let m = Manifest::of_bytes(&data, bs as u32, SYMBOL as u16).expect("valid shape");
    (data, m)
}

/// Take the items whose time has come out of `q` (any order).
fn take_due<T>(q: &mut Vec<(Instant, T)>, now: Instant) -> Vec<T> {
    let mut due = Vec::new();
    let mut i = 0;
    while i < q.len() {
        if q[i].0 > now {
            i += 1;
        } else {
            due.push(q.swap_remove(i).1);
        }
    }
    due
}

impl Sim {
    fn new(shape: Shape, devices: &[Device], expected: usize, seed: u64) -> Sim {
        Sim::with_policy(shape, devices, expected, seed, SlowMembers::default())
    }

    fn with_policy(
        shape: Shape,
        devices: &[Device],
        expected: usize,
        seed: u64,
        slow_members: SlowMembers,
    ) -> Sim {
        let (data, m) = image(shape, seed);
        let t0 = Instant::now();
        let cfg = SenderConfig {
            expected,
            interleave: shape.interleave,
            rate_bps: shape.rate_bps,
            receiver_timeout: Duration::from_secs(2),
            max_encoders: 4,
            slow_members,
            ..Default::default()
        };
        // As the send driver sets it up: the session's report interval
        // for this many receivers, plans holding at least three of them.
        let feedback = super::sender::report_interval(FEEDBACK, devices.len());
        let cfg = SenderConfig {
            feedback,
            coding_hold: cfg.coding_hold.max(feedback * 3),
            ..cfg
        };
        let frame = packet::datagram_len(SYMBOL) + 42;
        let s = WaveSender::new(cfg, m.clone(), frame, t0);
        let rxs = devices
            .iter()
            .map(|d| SimRx {
                dev: d.clone(),
                started: false,
                conn: None,
                core: None,
                disk: vec![0; data.len()],
                on_disk: vec![false; m.blocks.len()],
                udp: VecDeque::new(),
                ctl: VecDeque::new(),
                decoding: Vec::new(),
                next_status: t0,
                restart_at: None,
                reported: false,
                end: End::Running,
                link_free: t0,
                verified_at: None,
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            data,
            m,
            s,
            t0,
            rxs,
            held: HashMap::new(),
            encoders: HashMap::new(),
            work: Vec::new(),
            to_sender: VecDeque::new(),
            skipped: 0,
            last_tick: t0,
            by_conn: HashMap::new(),
            cost: Cost::default(),
            s_feedback: feedback,
        }
    }

    fn block(&self, b: u32) -> &[u8] {
        &self.data[self.m.block_offset(b) as usize..][..self.m.block_len(b)]
    }

    /// TCP: in order, about a millisecond.
    fn ctl_at(&mut self, q_last: Option<Instant>, now: Instant) -> Instant {
        let at = now + Duration::from_micros(self.rng.random_range(300..1500));
        q_last.map_or(at, |l| at.max(l))
    }

    #[cfg(test)]
    fn run(&mut self) -> Duration {
        match self.try_run() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    /// Run the wave to its end; an error if it is still running after
    /// [`LIMIT`] of simulated time.
    fn try_run(&mut self) -> Result<Duration, String> {
        let mut now = self.t0;
        while !self.s.is_finished() {
            if now - self.t0 >= LIMIT {
                return Err(format!("wave hung after {LIMIT:?}: {}", self.describe()));
            }
            self.receivers_connect(now);
            self.sender_inbox(now);
            self.workers(now);
            for _ in 0..4 {
                self.actions(now);
                if now >= self.last_tick + TICK {
                    let t = std::time::Instant::now();
                    self.s.on_tick(now);
                    self.cost.sender_control += t.elapsed();
                    self.last_tick = now;
                    self.actions(now);
                }
                if !self.transmit(now) {
                    break;
                }
            }
            self.receivers_step(now);
            now += STEP;
        }
        self.actions(now);
        Ok(now - self.t0)
    }

    fn describe(&self) -> String {
        let mut s = format!("sender {:?}\n", self.s.stats);
        for (id, r) in self.s.summary() {
            s += &format!("  sender's receiver {id} {}: {:?}\n", r.name, r.state);
        }
        for r in &self.rxs {
            s += &format!(
                "  device {}: {:?}, conn {:?}, blocks done {:?}, counters {:?}\n",
                r.dev.name,
                r.end,
                r.conn,
                r.core.as_ref().map(|c| c.blocks_done()),
                r.core.as_ref().map(|c| c.counters.clone()),
            );
        }
        s
    }

    fn receivers_connect(&mut self, now: Instant) {
        for i in 0..self.rxs.len() {
            let r = &self.rxs[i];
            let due = (!r.started && now >= self.t0 + r.dev.join_at)
                || r.restart_at.is_some_and(|t| now >= t);
            if !due || r.end != End::Running && r.end != End::Dead {
                continue;
            }
            let name = r.dev.name.clone();
            self.rxs[i].started = true;
            self.rxs[i].restart_at = None;
            self.rxs[i].end = End::Running;
            // The driver's `Event::Hello`.
            assert!(self.s.admits(&name));
            let t = std::time::Instant::now();
            let id = self.s.on_hello(&name, now);
            self.cost.sender_control += t.elapsed();
            self.by_conn.insert(id, i);
            let mut core = ReceiverCore::new(self.m.clone(), SESSION, KEY);
            let mut resumed = 0;
            for b in 0..self.m.block_count() {
                if self.rxs[i].on_disk[b as usize] {
                    core.mark_done(b);
                    resumed += 1;
                } else if self.m.blocks[b as usize].zero {
                    core.mark_done(b);
                }
            }
            let at = self.ctl_at(self.to_sender.back().map(|x| x.0), now);
            self.to_sender.push_back((
                at,
                ToSender::Msg(
                    id,
                    Msg::Ready {
                        resumed_blocks: resumed,
                    },
                ),
            ));
            let r = &mut self.rxs[i];
            r.conn = Some(id);
            r.core = Some(core);
            r.reported = false;
            r.next_status = now + self.s_feedback;
        }
    }

    fn sender_inbox(&mut self, now: Instant) {
        while self.to_sender.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, ev)) = self.to_sender.pop_front() else {
                break;
            };
            let t = std::time::Instant::now();
            match ev {
                ToSender::Msg(id, msg) => {
                    self.cost.to_sender += 1;
                    self.s.on_message(id, msg, now)
                }
                ToSender::Disconnect(id) => self.s.on_disconnect(id, now),
            }
            self.cost.sender_control += t.elapsed();
        }
    }

    /// Worker threads: each job finishes after its own delay, so loads
    /// and encoders complete out of order.
    fn workers(&mut self, now: Instant) {
        for w in take_due(&mut self.work, now) {
            match w {
                Work::Load(b) => {
                    if self.s.on_block_loaded(b) {
                        self.held.insert(b, ());
                    }
                }
                Work::Encode(b) => {
                    let e = BlockEncoder::new(&self.m.block_oti(b), self.block(b));
                    self.encoders.insert(b, e);
                    self.s.on_encoder_ready(b);
                }
            }
        }
    }

    fn actions(&mut self, now: Instant) {
        loop {
            let t = std::time::Instant::now();
            let a = self.s.poll_action();
            self.cost.sender_control += t.elapsed();
            let Some(a) = a else {
                break;
            };
            let done_at = now + Duration::from_micros(self.rng.random_range(100..4000));
            match a {
                Action::Load(b) => self.work.push((done_at, Work::Load(b))),
                Action::Release(b) => {
                    self.held.remove(&b);
                }
                Action::BuildEncoder(b) => self.work.push((done_at, Work::Encode(b))),
                Action::DropEncoder(b) => {
                    self.encoders.remove(&b);
                }
                Action::Control(id, msg) => {
                    self.cost.from_sender += 1;
                    if let Some(i) = self.conn_index(id) {
                        let at = self.ctl_at(self.rxs[i].ctl.back().map(|x| x.0), now);
                        self.rxs[i].ctl.push_back((at, msg));
                    }
                }
                Action::Disconnect(id) => {
                    if let Some(i) = self.conn_index(id) {
                        let at = self.ctl_at(self.rxs[i].ctl.back().map(|x| x.0), now);
                        self.rxs[i].ctl.push_back((
                            at,
                            Msg::Finish {
                                reason: "connection closed".into(),
                            },
                        ));
                        self.rxs[i].conn = None;
                        self.by_conn.remove(&id);
                    }
                }
                Action::Finished => {}
            }
        }
    }

    /// The receiver holding the sender's connection `id`.
    fn conn_index(&self, id: u32) -> Option<usize> {
        self.by_conn
            .get(&id)
            .copied()
            .filter(|&i| self.rxs[i].conn == Some(id))
    }

    /// One `poll_transmit`; false when it gave nothing. Datagrams are
    /// rendered by the send driver's own [`Packetizer`].
    fn transmit(&mut self, now: Instant) -> bool {
        let t = std::time::Instant::now();
        let mut txs = Vec::new();
        self.s.poll_transmit(now, 64, &mut txs);
        let mut pk = Packetizer::new(KEY, SESSION, SYMBOL, txs.len());
        let mut out: Vec<Arc<Vec<u8>>> = Vec::new();
        let src = SimSource {
            data: &self.data,
            m: &self.m,
            held: &self.held,
            encoders: &self.encoders,
        };
        for tx in &txs {
            match pk.render(tx, &self.m, &src) {
                Ok(Rendered::Batched) => {}
                Ok(Rendered::Probe(p)) => out.push(Arc::new(p.to_vec())),
                Err(_) => self.skipped += 1,
            }
        }
        pk.seal();
        out.extend(
            pk.batch()
                .chunks(pk.datagram_len())
                .map(|d| Arc::new(d.to_vec())),
        );
        self.cost.sender_send += t.elapsed();
        self.cost.datagrams += out.len() as u64;
        for d in out {
            for i in 0..self.rxs.len() {
                if self.rxs[i].core.is_none() {
                    continue;
                }
                if self.rng.random::<f64>() < self.rxs[i].dev.loss {
                    continue;
                }
                if let Some((from, to)) = self.rxs[i].dev.stall {
                    if now >= self.t0 + from && now < self.t0 + to {
                        continue;
                    }
                }
                let mut at = now + Duration::from_micros(300);
                let slow_now = self.rxs[i]
                    .dev
                    .slow_until
                    .is_none_or(|until| now < self.t0 + until);
                if let (Some(bps), true) = (self.rxs[i].dev.link_bps, slow_now) {
                    let wire = (d.len() + 42) as f64 * 8.0 / bps as f64;
                    let done = self.rxs[i].link_free.max(now) + Duration::from_secs_f64(wire);
                    if done - now > LINK_QUEUE {
                        continue;
                    }
                    self.rxs[i].link_free = done;
                    at = done + Duration::from_micros(300);
                }
                self.rxs[i].udp.push_back((at, d.clone()));
            }
        }
        !txs.is_empty()
    }

    fn receivers_step(&mut self, now: Instant) {
        let t = std::time::Instant::now();
        for i in 0..self.rxs.len() {
            if self.rxs[i].core.is_some() {
                self.receiver_step(i, now);
            }
        }
        self.cost.receivers += t.elapsed();
    }

    fn send_to_sender(&mut self, now: Instant, ev: ToSender) {
        let at = self.ctl_at(self.to_sender.back().map(|x| x.0), now);
        self.to_sender.push_back((at, ev));
    }

    fn receiver_step(&mut self, i: usize, now: Instant) {
        let m = self.m.clone();
        let t0 = self.t0;
        let decode_delay = Duration::from_micros(self.rng.random_range(50..2000));
        let r = &mut self.rxs[i];
        let Some(core) = r.core.as_mut() else {
            return;
        };
        let mut jobs = Vec::new();
        // Plans and the end of the session (TCP).
        let mut refused = None;
        while r.ctl.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, msg)) = r.ctl.pop_front() else {
                break;
            };
            match msg {
                Msg::Coded {
                    block,
                    first,
                    combos,
                } => core.on_coded_plan(block, first, combos, &mut jobs),
                Msg::Finish { reason } => {
                    refused = Some(reason);
                    break;
                }
                _ => {}
            }
        }
        // One recvmmsg batch.
        let mut batch: Vec<Arc<Vec<u8>>> = Vec::new();
        while batch.len() < 64 && r.udp.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, d)) = r.udp.pop_front() {
                batch.push(d);
            }
        }
        let views: Vec<&[u8]> = batch.iter().map(|d| d.as_slice()).collect();
        core.on_datagrams(&views, &mut jobs);
        for j in jobs {
            r.decoding.push((now + decode_delay, j));
        }
        // The writer: decode, check, write.
        for job in take_due(&mut r.decoding, now) {
            let b = job.block;
            match decode_block(&m, job) {
                DecodeOutcome::Good { data, .. } => {
                    let off = m.block_offset(b) as usize;
                    r.disk[off..off + data.len()].copy_from_slice(&data);
                    r.on_disk[b as usize] = true;
                    core.on_decoded(b, Ok(()));
                }
                DecodeOutcome::NeedMore(a) => core.on_decoded(b, Err(Some(a))),
                // The simulation's manifests are raw: no frame to be bad.
                DecodeOutcome::HashMismatch | DecodeOutcome::Undecodable(_) => {
                    core.on_decoded(b, Err(None))
                }
            }
        }
        let done = f64::from(core.blocks_done()) / f64::from(m.block_count());
        let conn = r.conn;
        let mut to_sender = Vec::new();
        if core.is_complete() && !r.reported {
            r.reported = true;
            let verdict = if r.disk == self.data {
                r.verified_at = Some(now - t0);
                Verdict::Verified {
                    image_hash: m.image_hash,
                }
            } else {
                Verdict::Failed {
                    reason: "image differs".into(),
                }
            };
            to_sender.push(Msg::Done(verdict));
        } else if now >= r.next_status && !r.reported {
            r.next_status = now + self.s_feedback;
            to_sender.push(Msg::Status(core.status()));
        }
        let kill = r.dev.kill_at.is_some_and(|f| done >= f) && !r.reported;
        if let Some(reason) = refused {
            r.core = None;
            r.end = if r.reported {
                End::Verified
            } else {
                End::Refused(reason)
            };
        } else if kill {
            // Power loss: in-memory state gone, the disk stays.
            r.dev.kill_at = None;
            r.core = None;
            r.conn = None;
            r.udp.clear();
            r.ctl.clear();
            r.decoding.clear();
            r.end = End::Dead;
            r.restart_at = r.dev.restart_after.map(|d| now + d);
            if let Some(id) = conn {
                self.by_conn.remove(&id);
                self.send_to_sender(now, ToSender::Disconnect(id));
            }
            return;
        }
        if let Some(id) = conn {
            for msg in to_sender {
                self.send_to_sender(now, ToSender::Msg(id, msg));
            }
        }
    }
}

/// One point of the scaling curve: `receivers` members with independent
/// loss spread over `loss` (fractions), every `late_every`-th joining
/// `late_by` after the start, every `kill_every`-th killed half way and
/// started again 100 ms later (it resumes from its disk).
#[derive(Debug, Clone)]
pub struct ScaleCase {
    /// Members of the wave.
    pub receivers: usize,
    /// Each member's loss is drawn from this range (fractions).
    pub loss: (f64, f64),
    /// Every n-th member joins late (0: none).
    pub late_every: usize,
    /// How late.
    pub late_by: Duration,
    /// Every n-th member is killed half way and restarted (0: none).
    pub kill_every: usize,
    /// Image size in bytes (rounded to whole blocks of `block_size`).
    pub image_bytes: usize,
    /// Block size in bytes.
    pub block_size: usize,
    /// The wave's rate, bits/s.
    pub rate_bps: u64,
    /// Seed of the image, the losses and the timings.
    pub seed: u64,
}

/// What one simulated wave cost.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    /// Simulated time from the start to the wave's end.
    pub wave: Duration,
    /// Members that verified the exact image.
    pub verified: usize,
    /// Where the work went (real time of each side's code).
    pub cost: Cost,
    /// Sender core state at the end, as `WaveSender::state_bytes` counts it.
    pub sender_state_bytes: usize,
}

/// Run one simulated wave of `case` on the simulated clock, with the real
/// sender and receiver cores; every member that was not killed for good
/// must hold the exact image, or this is an error naming what went wrong.
pub fn run_scale(case: &ScaleCase) -> Result<ScaleReport, String> {
    let mut rng = StdRng::seed_from_u64(case.seed ^ 0xca5e);
    let devices: Vec<Device> = (0..case.receivers)
        .map(|i| {
            let mut d = Device::new(
                &format!("rx{i}"),
                rng.random_range(case.loss.0..=case.loss.1.max(case.loss.0)),
            );
            if case.late_every > 0 && i % case.late_every == case.late_every - 1 {
                d.join_at = case.late_by;
            }
            if case.kill_every > 0 && i % case.kill_every == case.kill_every / 2 {
                d.kill_at = Some(0.5);
                d.restart_after = Some(Duration::from_millis(100));
            }
            d
        })
        .collect();
    let blocks = case.image_bytes.div_ceil(case.block_size).max(1);
    let shape = Shape {
        blocks,
        block_size: case.block_size,
        interleave: 8,
        rate_bps: case.rate_bps,
    };
    let expected = devices.iter().filter(|d| d.join_at.is_zero()).count();
    let mut sim = Sim::new(shape, &devices, expected, case.seed);
    let wave = sim.try_run()?;
    if sim.skipped > 0 {
        return Err(format!("{} transmissions without data", sim.skipped));
    }
    let mut verified = 0;
    for r in &sim.rxs {
        if r.end == End::Dead {
            continue;
        }
        if r.disk != sim.data {
            return Err(format!(
                "{} does not hold the image: {:?}",
                r.dev.name, r.end
            ));
        }
        verified += 1;
    }
    Ok(ScaleReport {
        wave,
        verified,
        cost: sim.cost.clone(),
        sender_state_bytes: sim.s.state_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sender::RxState;

    /// Every scenario over several seeds: the wave ends, nothing was sent
    /// from data the driver did not hold, and each device that stayed (or
    /// came back) holds the exact image.
    fn check(shape: Shape, devices: &[Device], expected: usize, seeds: std::ops::Range<u64>) {
        for seed in seeds {
            let sim = Sim::new(shape, devices, expected, seed);
            run_checked(sim, seed);
        }
    }

    /// Run one wave and check it (see [`check`]): every device that stayed
    /// verified the exact image, or is reported failed if it died.
    fn run_checked(mut sim: Sim, seed: u64) -> Sim {
        let took = sim.run();
        let summary = sim.s.summary();
        assert_eq!(
            sim.skipped,
            0,
            "seed {seed}: transmissions without data: {}",
            sim.describe()
        );
        for r in &sim.rxs {
            let state = summary
                .iter()
                .find(|(_, x)| x.name == r.dev.name)
                .map(|(_, x)| x.state.clone());
            if r.end == End::Dead {
                assert!(
                    matches!(state, Some(RxState::Failed(_))),
                    "seed {seed}: {} dead, sender says {state:?}",
                    r.dev.name
                );
                continue;
            }
            assert_eq!(
                state,
                Some(RxState::Verified),
                "seed {seed} after {took:?}: {}",
                sim.describe()
            );
            assert!(
                r.disk == sim.data,
                "seed {seed}: {} image differs",
                r.dev.name
            );
        }
        sim
    }

    /// When each device verified, by name.
    fn verified_at(sim: &Sim) -> HashMap<String, Duration> {
        sim.rxs
            .iter()
            .filter_map(|r| Some((r.dev.name.clone(), r.verified_at?)))
            .collect()
    }

    /// A wave long enough for the rate control and the slow-member rules to
    /// act (about 1.1 s at full rate; telling a slow member takes ~0.1 s).
    const MID: Shape = Shape {
        blocks: 360,
        block_size: 16 * 1024,
        interleave: 8,
        rate_bps: 40_000_000,
    };

    /// The slowest of `names` in `t`.
    fn slowest(t: &HashMap<String, Duration>, names: &[&str]) -> Duration {
        names
            .iter()
            .filter_map(|n| t.get(*n).copied())
            .max()
            .unwrap_or_default()
    }

    /// Seconds to send `sim`'s image (its data blocks, framed) at `bps`.
    fn ideal_secs(sim: &Sim, bps: u64) -> f64 {
        let frame = (packet::datagram_len(SYMBOL) + 42) as f64;
        sim.m.data_bytes() as f64 / SYMBOL as f64 * frame * 8.0 / bps as f64
    }

    /// One member behind a port at a fifth of the wave's rate: the others
    /// finish within 1.1 x their time without it (with the `wait` policy they
    /// take about as long as it does), and it verifies in about the image's
    /// time at its own port's rate. With `drop`, it is failed and the others
    /// are as fast.
    #[test]
    fn a_slow_member_costs_only_itself() {
        let fast = ["a", "b", "c"];
        let devs_fast: Vec<Device> = fast.iter().map(|n| Device::new(n, 0.0)).collect();
        let mut devs = devs_fast.clone();
        devs.push(Device::slow("slow", MID.rate_bps / 5));
        for seed in 0..3 {
            let base = run_checked(Sim::new(MID, &devs_fast, 3, seed), seed);
            let base_t = slowest(&verified_at(&base), &fast);
            let sim = run_checked(Sim::new(MID, &devs, 4, seed), seed);
            let t = verified_at(&sim);
            let ideal = ideal_secs(&sim, MID.rate_bps / 5);
            eprintln!(
                "seed {seed}: alone {base_t:?}; with a slow member {:?}, slow {:?} (its port's time {ideal:.2} s); {:?}",
                slowest(&t, &fast),
                t.get("slow"),
                sim.s.stats
            );
            assert!(
                slowest(&t, &fast).as_secs_f64() <= 1.1 * base_t.as_secs_f64(),
                "seed {seed}: the others waited: {:?} against {base_t:?}",
                slowest(&t, &fast)
            );
            assert!(
                t["slow"].as_secs_f64() <= 1.3 * ideal,
                "seed {seed}: slow member took {:?}, its port's time is {ideal:.2} s",
                t["slow"]
            );
            assert_eq!(sim.s.stats.fell_behind, 1);
            assert_eq!(sim.s.stats.caught_up, 1);

            let wait = run_checked(
                Sim::with_policy(MID, &devs, 4, seed, SlowMembers::Wait),
                seed,
            );
            let tw = verified_at(&wait);
            assert!(
                slowest(&tw, &fast).as_secs_f64() > 2.0 * base_t.as_secs_f64(),
                "seed {seed}: with `wait` the others should wait for it: {:?}",
                slowest(&tw, &fast)
            );
            assert_eq!(wait.s.stats.fell_behind, 0);
        }
        let mut dropped = Sim::with_policy(MID, &devs, 4, 0, SlowMembers::Drop);
        dropped.run();
        let states: HashMap<String, RxState> = dropped
            .s
            .summary()
            .into_iter()
            .map(|(_, r)| (r.name, r.state))
            .collect();
        assert!(
            matches!(&states["slow"], RxState::Failed(why) if why.contains("fell behind")),
            "{:?}",
            states["slow"]
        );
        for n in fast {
            assert_eq!(states[n], RxState::Verified, "{n}");
        }
    }

    /// A quarter of the members (2 of 8) behind ports at half the wave's
    /// rate: the others are not slowed, and the slow ones verify in about the
    /// image's time at their ports' rate.
    #[test]
    fn a_quarter_of_the_members_at_half_rate() {
        let fast = ["a", "b", "c", "d", "e", "f"];
        let mut devs: Vec<Device> = fast.iter().map(|n| Device::new(n, 0.0)).collect();
        let base_t = slowest(
            &verified_at(&run_checked(Sim::new(MID, &devs, 6, 0), 0)),
            &fast,
        );
        devs.push(Device::slow("s1", MID.rate_bps / 2));
        devs.push(Device::slow("s2", MID.rate_bps / 2));
        for seed in 0..2 {
            let sim = run_checked(Sim::new(MID, &devs, 8, seed), seed);
            let t = verified_at(&sim);
            let ideal = ideal_secs(&sim, MID.rate_bps / 2);
            let slow = slowest(&t, &["s1", "s2"]).as_secs_f64();
            eprintln!(
                "seed {seed}: alone {base_t:?}; others {:?}; slow {slow:.3} s (ideal {ideal:.3} s, {:.3} x)",
                slowest(&t, &fast),
                slow / ideal
            );
            assert!(slowest(&t, &fast).as_secs_f64() <= 1.1 * base_t.as_secs_f64());
            assert!(
                slow <= 1.3 * ideal,
                "slow ones took {slow:.2} s, ideal {ideal:.2} s"
            );
        }
    }

    /// A member losing 20 % of its datagrams, the others none: the clean
    /// ones finish within 1.05 x their time without it, and it verifies.
    #[test]
    fn a_lossy_member_costs_only_itself() {
        let clean = ["a", "b", "c"];
        let devs_clean: Vec<Device> = clean.iter().map(|n| Device::new(n, 0.0)).collect();
        let mut devs = devs_clean.clone();
        devs.push(Device::new("lossy", 0.2));
        for seed in 0..3 {
            let base = slowest(
                &verified_at(&run_checked(Sim::new(MID, &devs_clean, 3, seed), seed)),
                &clean,
            );
            let sim = run_checked(Sim::new(MID, &devs, 4, seed), seed);
            let t = verified_at(&sim);
            eprintln!(
                "seed {seed}: alone {base:?}; with a lossy member {:?}, lossy {:?}",
                slowest(&t, &clean),
                t.get("lossy")
            );
            assert!(
                slowest(&t, &clean).as_secs_f64() <= 1.05 * base.as_secs_f64(),
                "seed {seed}: {:?} against {base:?}",
                slowest(&t, &clean)
            );
            assert_eq!(sim.s.stats.fell_behind, 1);
        }
    }

    /// A member that receives nothing for 150 ms (starved of CPU, a link
    /// flap) does not fall behind: its reports show the gap as one interval,
    /// and the smoothed loss stays under the threshold; its backlog is
    /// repaired as before and everyone verifies.
    #[test]
    fn a_member_stalled_for_a_moment_does_not_fall_behind() {
        let mut devs: Vec<Device> = ["a", "b", "c"]
            .iter()
            .map(|n| Device::new(n, 0.0))
            .collect();
        let mut stalled = Device::new("stalled", 0.0);
        stalled.stall = Some((Duration::from_millis(100), Duration::from_millis(250)));
        devs.push(stalled);
        for seed in 0..3 {
            let sim = run_checked(Sim::new(MID, &devs, 4, seed), seed);
            assert_eq!(sim.s.stats.fell_behind, 0, "seed {seed}");
        }
    }

    /// A member whose port is slow for the wave's first 0.4 s falls behind,
    /// keeps up again once its port is back, and rejoins the wave before the
    /// others are done (no catch-up); everyone verifies.
    #[test]
    fn a_member_slow_for_a_while_rejoins_the_wave() {
        let long = Shape { blocks: 720, ..MID };
        let mut devs: Vec<Device> = ["a", "b", "c"]
            .iter()
            .map(|n| Device::new(n, 0.0))
            .collect();
        let mut slowed = Device::slow("slowed", long.rate_bps / 5);
        slowed.slow_until = Some(Duration::from_millis(400));
        devs.push(slowed);
        for seed in 0..2 {
            let sim = run_checked(Sim::new(long, &devs, 4, seed), seed);
            eprintln!("seed {seed}: {:?} {:?}", verified_at(&sim), sim.s.stats);
            assert_eq!(sim.s.stats.fell_behind, 1, "seed {seed}");
            assert_eq!(sim.s.stats.rejoined, 1, "seed {seed}");
            assert_eq!(sim.s.stats.caught_up, 0, "seed {seed}");
        }
    }

    /// Members equally lossy all keep up: nobody falls behind, and the wave
    /// takes what it takes with the `wait` policy.
    #[test]
    fn equally_lossy_members_all_keep_up() {
        let devs: Vec<Device> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| Device::new(n, 0.05))
            .collect();
        for seed in 0..3 {
            let sim = run_checked(Sim::new(MID, &devs, 4, seed), seed);
            assert_eq!(sim.s.stats.fell_behind, 0, "seed {seed}");
        }
    }

    #[test]
    fn lossy_receivers_all_finish() {
        let devs = [
            Device::new("a", 0.0),
            Device::new("b", 0.05),
            Device::new("c", 0.15),
        ];
        check(SMALL, &devs, 3, 0..6);
    }

    #[test]
    fn late_joiner_and_a_receiver_killed_and_restarted() {
        let mut late = Device::new("late", 0.02);
        late.join_at = Duration::from_millis(60);
        let mut killed = Device::new("killed", 0.05);
        killed.kill_at = Some(0.3);
        killed.restart_after = Some(Duration::from_millis(300));
        let devs = [Device::new("a", 0.02), killed, Device::new("c", 0.1), late];
        check(SMALL, &devs, 3, 0..6);
    }

    #[test]
    fn a_killed_receiver_that_stays_dead_does_not_hold_the_others() {
        let mut killed = Device::new("killed", 0.05);
        killed.kill_at = Some(0.2);
        let mut late = Device::new("late", 0.05);
        late.join_at = Duration::from_millis(40);
        let devs = [Device::new("a", 0.05), killed, Device::new("c", 0.0), late];
        check(SMALL, &devs, 3, 0..6);
    }

    /// Hunting ground for rare interleavings: `RC_SIM_SEEDS=500 cargo test
    /// -p rackcast-core --release --lib sim::many -- --ignored`.
    #[test]
    #[ignore]
    fn many_seeds_fleet_shape() {
        let n: u64 = std::env::var("RC_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(50);
        let shape = Shape {
            blocks: 60,
            block_size: 128 * 1024,
            interleave: 8,
            rate_bps: 60_000_000,
        };
        let mut late = Device::new("d4", 0.01);
        late.join_at = Duration::from_millis(250);
        let mut killed = Device::new("d2", 0.01);
        killed.kill_at = Some(0.25);
        let devs = [
            Device::new("d1", 0.01),
            killed,
            Device::new("d3", 0.03),
            late,
        ];
        check(shape, &devs, 3, 0..n);
    }
}
