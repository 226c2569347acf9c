//! The wave's pacing thread: owns the [`WaveSender`] core and the
//! multicast socket, feeds the core the events of connections and
//! workers, carries out its actions, renders and sends what it allows
//! (UDP GSO batches), and reports the wave at its end.
//!
//! Owns: the thread's loop, loaded blocks and encoders while the wave
//! runs, the send counters and metrics. Must not: make protocol
//! decisions (the core does) or talk TCP (the control tasks in `mod.rs`
//! do).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::mpsc;

use super::{
    CredentialHash, Event, Job, ReceiverReport, SendReport, WaveCommand, WaveEvent, WaveLink,
    ETH_HEADER, SEND_BATCH,
};
use crate::dataplane::render::{Packetizer, Rendered, SymbolSource};
use crate::dataplane::sender::{Action, RxState, SenderConfig, Tx, WaveSender};
use crate::image::fec::BlockEncoder;
use crate::image::manifest::Manifest;
use crate::io::net;
use crate::wire::control::{Msg, SessionParams};
use crate::wire::packet;

/// Pacing is only as good as the pacer's wakeups: a pacer that waits for a
/// CPU longer than the token bucket's depth loses rate for good. Ask for
/// the lowest real-time priority (SCHED_FIFO 1: runs as soon as it wakes;
/// the kernel's RT throttling still caps it at 95 % of a CPU), else nice
/// -10, else run as we are and say so. Needs root or CAP_SYS_NICE.
pub(super) fn raise_priority() {
    // SAFETY: sched_setscheduler/setpriority on our own thread (tid 0 /
    // gettid) with a valid sched_param.
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 {
            return;
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, -10) == 0 {
            return;
        }
    }
    tracing::info!(
        error = %std::io::Error::last_os_error(),
        "cannot raise the pacing thread's priority; pacing may lag on a busy host"
    );
}

/// What the pacing thread starts from.
pub(super) struct LoopSetup {
    pub(super) gso_segments: usize,
    pub(super) cfg: SenderConfig,
    pub(super) session: Arc<SessionParams>,
    /// Metrics label.
    pub(super) wave: String,
}

pub(super) fn send_loop(
    setup: LoopSetup,
    sock: std::net::UdpSocket,
    events: Receiver<Event>,
    jobs: Sender<Job>,
    link: Option<WaveLink>,
) -> SendReport {
    let LoopSetup {
        gso_segments,
        cfg,
        session,
        wave,
    } = setup;
    let m = &session.manifest;
    let symbol_size = m.symbol_size as usize;
    let frame = packet::datagram_len(symbol_size) + packet::IP_UDP_OVERHEAD + ETH_HEADER;
    let t0 = Instant::now();
    // Plans wait for receivers that stopped reporting only a few report
    // intervals, and at least three intervals for a stuck one, whatever
    // interval the session uses.
    let mut cfg = cfg;
    cfg.feedback = Duration::from_millis(u64::from(session.feedback_ms.max(1)));
    cfg.coding_hold = cfg.coding_hold.max(cfg.feedback * 3);
    let mut core = WaveSender::new(cfg.clone(), m.clone(), frame, t0);
    let mut wire = Wire {
        pk: Packetizer::new(session.key, session.session_id, symbol_size, SEND_BATCH),
        sock,
        gso: gso_segments,
        wire_bytes: 0,
        send_errors: 0,
        render_errors: 0,
        bytes_sent: metrics::counter!("rackcast_bytes_sent_total", "wave" => wave.clone()),
        packets_sent: metrics::counter!("rackcast_packets_sent_total", "wave" => wave.clone()),
    };
    let mut txs: Vec<Tx> = Vec::with_capacity(SEND_BATCH);
    let mut next_tick = t0;
    metrics::gauge!("rackcast_wave_blocks", "wave" => wave.clone()).set(m.block_count() as f64);
    // Image bytes against the bytes its blocks take on the wire (zero
    // blocks unsent, compressed blocks as frames): goodput in image bytes
    // can exceed the link rate.
    metrics::gauge!("rackcast_wave_image_bytes", "wave" => wave.clone()).set(m.image_size as f64);
    metrics::gauge!("rackcast_wave_source_wire_bytes", "wave" => wave.clone())
        .set(m.data_bytes() as f64);
    let mut held = Held {
        gso: gso_segments,
        ..Default::default()
    };
    let mut reporter = link.map(|l| {
        let mut creds = HashMap::new();
        for (name, cred) in &l.members {
            core.expect_member(name, t0);
            creds.insert(name.clone(), *cred);
        }
        held.credentials = Some(creds);
        held.relay_names = Some(l.relays.iter().cloned().collect());
        LinkReporter {
            link: l,
            reported: std::collections::HashSet::new(),
            next_progress: t0,
        }
    });

    'outer: loop {
        let now = Instant::now();
        // Membership first (late members, rate changes), then events.
        if let Some(r) = &mut reporter {
            r.commands(&mut core, &mut held, now);
        }
        drain_events(&mut reporter, &mut core, &mut held, &events);
        if let Some(e) = &held.error {
            tracing::error!(error = %e, "image source failed; aborting wave");
            for (_, o) in held.outs.drain() {
                let _ = o.send(Msg::Finish {
                    reason: format!("sender aborted: {e}"),
                });
            }
            break 'outer;
        }
        if held.carry_out(&mut core, &jobs) {
            break 'outer;
        }
        if now >= next_tick {
            core.on_tick(now);
            next_tick = now + Duration::from_millis(10);
            publish_metrics(&core, &wave);
            if let Some(r) = &mut reporter {
                r.report(&mut core, now);
            }
            continue;
        }
        txs.clear();
        core.poll_transmit(now, SEND_BATCH, &mut txs);
        if !txs.is_empty() {
            wire.transmit(&txs, m, &held);
            continue;
        }
        // Nothing to send now: sleep until pacing, a probe or an event.
        let wake = core
            .poll_timeout(now)
            .unwrap_or(now + Duration::from_millis(10))
            .min(next_tick);
        let wait = wake.saturating_duration_since(Instant::now());
        if wait > Duration::from_micros(50) {
            match events.recv_timeout(wait) {
                Ok(ev) => take_event(&mut reporter, &mut core, &mut held, ev),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    if let Some(r) = &mut reporter {
        r.report(&mut core, Instant::now());
    }
    // Give queued Finish messages a moment to leave; receivers that miss
    // one see the connection close, which ends them just as well.
    drop(std::mem::take(&mut held.outs));
    std::thread::sleep(Duration::from_millis(5));

    send_report(&core, held.error, &cfg, m, wire.wire_bytes)
}

/// Every queued event, each after the commands queued before it. The
/// appliance queues a late member's `Expect` before it tells the device
/// to join, so when that member's Hello is taken from `events` its
/// `Expect` is already in `commands`: draining the commands before each
/// event (not once per batch) means it is never refused as a stranger.
fn drain_events(
    reporter: &mut Option<LinkReporter>,
    core: &mut WaveSender,
    held: &mut Held,
    events: &Receiver<Event>,
) {
    while let Ok(ev) = events.try_recv() {
        take_event(reporter, core, held, ev);
    }
}

/// One event, after the commands queued before it (see `drain_events`).
fn take_event(
    reporter: &mut Option<LinkReporter>,
    core: &mut WaveSender,
    held: &mut Held,
    ev: Event,
) {
    if let Some(r) = reporter {
        r.commands(core, held, Instant::now());
    }
    held.on_event(core, ev);
}

/// The wave's summary from the core's counters and receivers.
fn send_report(
    core: &WaveSender,
    error: Option<String>,
    cfg: &SenderConfig,
    m: &Manifest,
    wire_bytes: u64,
) -> SendReport {
    let st = core.stats.clone();
    let end = st.finished_at.unwrap_or_else(Instant::now);
    let seconds = st
        .started_at
        .map_or(0.0, |s| end.saturating_duration_since(s).as_secs_f64());
    let receivers: Vec<ReceiverReport> = core
        .summary()
        .into_iter()
        .map(|(_, r)| ReceiverReport {
            ok: r.state == RxState::Verified,
            verdict: match &r.state {
                RxState::Verified => "verified".into(),
                RxState::Failed(why) => format!("failed: {why}"),
                other => format!("unfinished: {other:?}"),
            },
            seconds: r.ended_at.map(|e| {
                let from = st.started_at.unwrap_or(r.joined_at).max(r.joined_at);
                e.saturating_duration_since(from).as_secs_f64()
            }),
            resumed_blocks: r.resumed_blocks,
            auth_failures: r.status.auth_failures,
            fell_behind: r.fell_behind,
            name: r.name,
        })
        .collect();
    let verified = receivers.iter().filter(|r| r.ok).count();
    let sym = (st.source_packets + st.repair_packets).max(1);
    SendReport {
        ok: error.is_none() && verified >= cfg.expected && verified == receivers.len(),
        image_bytes: m.image_size,
        image_hash: m.image_hash_hex(),
        wire_bytes,
        seconds,
        source_seconds: match (st.started_at, st.source_done_at) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        },
        goodput_bps: if seconds > 0.0 {
            m.image_size as f64 * 8.0 / seconds
        } else {
            0.0
        },
        rate_bps: cfg.rate_bps,
        source_packets: st.source_packets,
        repair_packets: st.repair_packets,
        resent_source_packets: st.resent_source_packets,
        coded_packets: st.coded_packets,
        fell_behind: st.fell_behind,
        probe_packets: st.probe_packets,
        repair_overhead_pct: st.repair_packets as f64 * 100.0 / sym as f64,
        expected_receivers: cfg.expected,
        receivers,
        error,
    }
}

/// The send thread's side of the wire: the datagram batch, the socket,
/// and what went out (or did not).
struct Wire {
    pk: Packetizer,
    sock: std::net::UdpSocket,
    /// Datagrams per GSO send; 1 once the path refused GSO.
    gso: usize,
    wire_bytes: u64,
    send_errors: u64,
    render_errors: u64,
    bytes_sent: metrics::Counter,
    packets_sent: metrics::Counter,
}

impl Wire {
    /// Render `txs` (probes go at once) and send the batch.
    fn transmit(&mut self, txs: &[Tx], m: &Manifest, held: &Held) {
        self.pk.clear();
        for tx in txs {
            match self.pk.render(tx, m, held) {
                Ok(Rendered::Batched) => {}
                Ok(Rendered::Probe(p)) => {
                    let _ = self.sock.send(p);
                    for r in &held.relays {
                        let _ = r.sock.send(p);
                    }
                }
                Err(e) => {
                    self.render_errors += 1;
                    if self.render_errors % 1000 == 1 {
                        tracing::error!(error = %e, "datagram not rendered; skipped");
                    }
                }
            }
        }
        self.pk.seal();
        let n = self.pk.len();
        let dlen = self.pk.datagram_len();
        let mut off = 0;
        while off < n {
            let slice = &self.pk.batch()[off * dlen..];
            match net::send_batch(&self.sock, slice, dlen, n - off, self.gso) {
                Ok(k) => off += k,
                Err(e) => {
                    if self.gso > 1 && e.raw_os_error() == Some(libc::EIO) {
                        tracing::warn!("UDP GSO refused by the path; falling back to sendmmsg");
                        self.gso = 1;
                        continue;
                    }
                    // ENOBUFS under a full qdisc: the packets are lost
                    // like any other loss; FEC repairs them.
                    self.send_errors += 1;
                    if self.send_errors % 1000 == 1 {
                        tracing::warn!(error = %e, "send failed");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    break;
                }
            }
        }
        self.wire_bytes += (off * dlen) as u64;
        self.bytes_sent.increment((off * dlen) as u64);
        self.packets_sent.increment(off as u64);
        // The same datagrams to each relay: what left for the group, no
        // more (a relay is one more receiver, behind a router).
        for r in &held.relays {
            r.send(&self.pk.batch()[..off * dlen], dlen, off);
        }
    }
}

/// A relay on another segment and the socket its copy of the wave goes
/// out on (connected to the relay's address).
struct RelayCopy {
    id: u32,
    to: std::net::SocketAddrV4,
    sock: std::net::UdpSocket,
    gso: std::cell::Cell<usize>,
    errors: std::cell::Cell<u64>,
}

impl RelayCopy {
    fn send(&self, batch: &[u8], dlen: usize, count: usize) {
        let mut off = 0;
        while off < count {
            match net::send_batch(
                &self.sock,
                &batch[off * dlen..],
                dlen,
                count - off,
                self.gso.get(),
            ) {
                Ok(k) => off += k,
                Err(e) => {
                    if self.gso.get() > 1 && e.raw_os_error() == Some(libc::EIO) {
                        self.gso.set(1);
                        continue;
                    }
                    // A relay that went away (ICMP unreachable) or a full
                    // queue: its loss, repaired by its reports or ended by
                    // its timeout; never the wave's.
                    self.errors.set(self.errors.get() + 1);
                    if self.errors.get() % 1000 == 1 {
                        tracing::warn!(relay = %self.to, error = %e, "copy to relay failed");
                    }
                    break;
                }
            }
        }
        metrics::counter!("rackcast_relay_copy_bytes_total").increment((off * dlen) as u64);
    }
}

/// What the send thread holds for the core: connections' outboxes, loaded
/// blocks, built encoders, and the first image-source error.
#[derive(Default)]
struct Held {
    outs: HashMap<u32, mpsc::UnboundedSender<Msg>>,
    loaded: HashMap<u32, Arc<Vec<u8>>>,
    encoders: HashMap<u32, Arc<BlockEncoder>>,
    error: Option<String>,
    /// Member name -> BLAKE3 of its credential, in an appliance wave
    /// (`None`: a lab wave that admits anyone).
    credentials: Option<HashMap<String, CredentialHash>>,
    /// Members that may be relays (`None`: a lab wave, anyone may).
    relay_names: Option<std::collections::HashSet<String>>,
    /// Relays the wave is copied to.
    relays: Vec<RelayCopy>,
    gso: usize,
}

impl Held {
    /// Carry out the core's queued actions; true once the wave is over.
    fn carry_out(&mut self, core: &mut WaveSender, jobs: &Sender<Job>) -> bool {
        while let Some(a) = core.poll_action() {
            match a {
                Action::Load(b) => {
                    let _ = jobs.send(Job::Load(b));
                }
                Action::Release(b) => {
                    self.loaded.remove(&b);
                }
                Action::BuildEncoder(b) => {
                    let _ = jobs.send(Job::Encode(b, self.loaded.get(&b).cloned()));
                }
                Action::DropEncoder(b) => {
                    self.encoders.remove(&b);
                }
                Action::Control(id, msg) => {
                    if let Some(o) = self.outs.get(&id) {
                        let _ = o.send(msg);
                    }
                }
                Action::Disconnect(id) => {
                    self.outs.remove(&id);
                    self.relays.retain(|r| r.id != id);
                }
                Action::Finished => return true,
            }
        }
        false
    }

    /// Feed one event from a connection or worker into the core.
    fn on_event(&mut self, core: &mut WaveSender, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Hello {
                name,
                credential,
                relay,
                out,
                reply,
            } => {
                let proven = match &self.credentials {
                    None => true,
                    Some(c) => match (c.get(&name), credential) {
                        (Some(want), Some(got)) => *blake3::hash(&got).as_bytes() == *want,
                        _ => false,
                    },
                };
                if core.is_finished() {
                    let _ = reply.send(Err("wave is over".into()));
                } else if !core.admits(&name) {
                    metrics::counter!("rackcast_control_errors_total", "kind" => "not_member")
                        .increment(1);
                    let _ = reply.send(Err(format!("{name:?} is not a member of this wave")));
                } else if !proven {
                    // A host naming a member without its credential: it
                    // must neither get the key nor displace the member.
                    metrics::counter!("rackcast_control_errors_total", "kind" => "bad_credential")
                        .increment(1);
                    tracing::warn!(member = %name, "wave Hello without the member's credential refused");
                    let _ = reply.send(Err(format!(
                        "{name:?}: credential missing or not this member's"
                    )));
                } else {
                    let copy = match relay {
                        None => None,
                        Some(to) => match self.relay_copy(&name, to) {
                            Ok(c) => Some(c),
                            Err(why) => {
                                metrics::counter!("rackcast_control_errors_total", "kind" => "relay_refused")
                                    .increment(1);
                                tracing::warn!(member = %name, relay = %to, reason = %why, "relay refused");
                                let _ = reply.send(Err(why));
                                return;
                            }
                        },
                    };
                    let id = core.on_hello(&name, now);
                    self.outs.insert(id, out);
                    if let Some(mut c) = copy {
                        c.id = id;
                        tracing::info!(member = %name, relay = %c.to, "copying the wave to a relay");
                        self.relays.push(c);
                    }
                    let _ = reply.send(Ok(id));
                }
            }
            Event::Msg(id, msg) => core.on_message(id, msg, now),
            Event::Disconnect(id) => {
                self.outs.remove(&id);
                self.relays.retain(|r| r.id != id);
                core.on_disconnect(id, now);
            }
            Event::Loaded(b, d) => {
                if core.on_block_loaded(b) {
                    self.loaded.insert(b, d);
                }
            }
            Event::Encoder(b, e) => {
                self.encoders.insert(b, e);
                core.on_encoder_ready(b);
            }
            Event::SourceError(e) => self.error = Some(e),
        }
    }
}

impl Held {
    /// The copy a relay asked for, if this wave grants it: only members
    /// named as relays (any receiver of a lab wave), a few at most, and a
    /// relay that reconnects replaces its earlier copy.
    fn relay_copy(&mut self, name: &str, to: std::net::SocketAddrV4) -> Result<RelayCopy, String> {
        if let Some(names) = &self.relay_names {
            if !names.contains(name) {
                return Err(format!("{name:?} is not a relay of this wave"));
            }
        }
        if to.ip().is_multicast() || to.ip().is_broadcast() || to.ip().is_unspecified() {
            return Err(format!("relay address {to} is not a unicast address"));
        }
        self.relays.retain(|r| r.to != to);
        if self.relays.len() >= super::MAX_RELAYS {
            return Err(format!(
                "this wave already copies to {} relays",
                super::MAX_RELAYS
            ));
        }
        let sock = net::relay_socket(to).map_err(|e| format!("relay socket to {to}: {e}"))?;
        Ok(RelayCopy {
            id: 0,
            to,
            sock,
            gso: std::cell::Cell::new(self.gso.max(1)),
            errors: std::cell::Cell::new(0),
        })
    }
}

impl SymbolSource for Held {
    fn block(&self, b: u32) -> Option<&[u8]> {
        self.loaded.get(&b).map(|d| d.as_slice())
    }
    fn encoder(&self, b: u32) -> Option<&BlockEncoder> {
        self.encoders.get(&b).map(|e| e.as_ref())
    }
}

struct LinkReporter {
    link: WaveLink,
    reported: std::collections::HashSet<String>,
    next_progress: Instant,
}

impl LinkReporter {
    fn commands(&mut self, core: &mut WaveSender, held: &mut Held, now: Instant) {
        while let Ok(c) = self.link.commands.try_recv() {
            match c {
                WaveCommand::Expect(name, cred) => {
                    if let Some(c) = &mut held.credentials {
                        c.insert(name.clone(), cred);
                    }
                    // A member that failed earlier in this wave may come back.
                    self.reported.remove(&name);
                    core.expect_member(&name, now);
                }
                WaveCommand::SetRate(bps) => core.set_rate_ceiling(bps, now),
            }
        }
    }

    fn report(&mut self, core: &mut WaveSender, now: Instant) {
        for (name, why) in core.take_dropped() {
            self.reported.insert(name.clone());
            let _ = self.link.events.send(WaveEvent::Verdict {
                name,
                ok: false,
                detail: why,
            });
        }
        for r in core.receivers().values() {
            if !r.state.terminal() {
                // Back after a failure (restarted device): report it again.
                self.reported.remove(&r.name);
            }
            let verdict = match &r.state {
                RxState::Verified => Some((true, "verified".to_string())),
                RxState::Failed(why) => Some((false, why.clone())),
                _ => None,
            };
            if let Some((ok, detail)) = verdict {
                if self.reported.insert(r.name.clone()) {
                    let _ = self.link.events.send(WaveEvent::Verdict {
                        name: r.name.clone(),
                        ok,
                        detail,
                    });
                }
            }
        }
        if now >= self.next_progress {
            self.next_progress = now + Duration::from_secs(1);
            let total = core.manifest().block_count();
            for r in core.receivers().values() {
                let _ = self.link.events.send(WaveEvent::Progress {
                    name: r.name.clone(),
                    done: r.status.blocks_done,
                    total,
                    behind: r.is_behind(),
                });
            }
        }
    }
}

fn publish_metrics(core: &WaveSender, wave: &str) {
    let st = &core.stats;
    let w = wave.to_string();
    metrics::gauge!("rackcast_rate_bps", "wave" => w.clone()).set(core.current_rate() as f64);
    let behind = core.receivers().values().filter(|r| r.is_behind()).count();
    metrics::gauge!("rackcast_wave_members_behind", "wave" => w.clone()).set(behind as f64);
    metrics::counter!("rackcast_wave_members_fell_behind_total", "wave" => w.clone())
        .absolute(st.fell_behind);
    metrics::counter!("rackcast_source_packets_total", "wave" => w.clone())
        .absolute(st.source_packets);
    metrics::counter!("rackcast_repair_packets_total", "wave" => w.clone())
        .absolute(st.repair_packets);
    metrics::counter!("rackcast_probe_packets_total", "wave" => w.clone())
        .absolute(st.probe_packets);
    let total = core.manifest().block_count().max(1) as f64;
    let (mut active, mut verified, mut failed) = (0u32, 0u32, 0u32);
    for r in core.receivers().values() {
        match r.state {
            RxState::Verified => verified += 1,
            RxState::Failed(_) => failed += 1,
            _ => active += 1,
        }
    }
    metrics::gauge!("rackcast_receivers", "wave" => w.clone(), "state" => "active")
        .set(active as f64);
    metrics::gauge!("rackcast_receivers", "wave" => w.clone(), "state" => "verified")
        .set(verified as f64);
    metrics::gauge!("rackcast_receivers", "wave" => w, "state" => "failed").set(failed as f64);
    for r in core.receivers().values() {
        let name = r.name.clone();
        metrics::gauge!("rackcast_receiver_progress_ratio", "receiver" => name.clone())
            .set(r.status.blocks_done as f64 / total);
        metrics::gauge!("rackcast_receiver_auth_failures", "receiver" => name.clone())
            .set(r.status.auth_failures as f64);
        metrics::gauge!("rackcast_receiver_malformed_packets", "receiver" => name.clone())
            .set(r.status.malformed as f64);
        metrics::gauge!("rackcast_receiver_decode_failures", "receiver" => name)
            .set(r.status.decode_failures as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::{BlockInfo, Wire};

    fn manifest() -> Manifest {
        Manifest {
            image_size: 4 * 4096,
            image_hash: [9; 32],
            block_size: 4096,
            symbol_size: 1024,
            blocks: (0..4)
                .map(|_| BlockInfo {
                    hash: [0; 32],
                    zero: false,
                    wire: Wire::Raw,
                })
                .collect(),
        }
    }

    /// A receiver's Hello as its control task hands it to the pacer: the
    /// answer, and the outbox the pacer would write to.
    fn hello(
        events: &Sender<Event>,
        name: &str,
        credential: [u8; 32],
    ) -> (
        tokio::sync::oneshot::Receiver<Result<u32, String>>,
        mpsc::UnboundedReceiver<Msg>,
    ) {
        hello_relay(events, name, credential, None)
    }

    fn hello_relay(
        events: &Sender<Event>,
        name: &str,
        credential: [u8; 32],
        relay: Option<std::net::SocketAddrV4>,
    ) -> (
        tokio::sync::oneshot::Receiver<Result<u32, String>>,
        mpsc::UnboundedReceiver<Msg>,
    ) {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (reply, answer) = tokio::sync::oneshot::channel();
        events
            .send(Event::Hello {
                name: name.into(),
                credential: Some(credential),
                relay,
                out,
                reply,
            })
            .unwrap();
        (answer, out_rx)
    }

    /// The race fleet-sim found at 5,000 devices: the appliance queues a
    /// late member's Expect, tells the device, and the device's Hello
    /// arrives in `events` while the pacer is between its command drain
    /// and its event drain. The member must be admitted, never refused.
    #[test]
    fn a_late_members_hello_behind_the_command_drain_is_admitted() {
        let t0 = Instant::now();
        let cfg = SenderConfig {
            expected: 1,
            ..Default::default()
        };
        let mut core = WaveSender::new(cfg, manifest(), 1100, t0);
        // An appliance wave: it started with one member, as send_loop
        // sets it up from the link.
        core.expect_member("first", t0);
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let (wave_tx, _wave_rx) = mpsc::unbounded_channel();
        let mut held = Held {
            credentials: Some(HashMap::from([("first".to_string(), [1u8; 32])])),
            ..Default::default()
        };
        let mut reporter = Some(LinkReporter {
            link: WaveLink {
                members: Vec::new(),
                commands: cmd_rx,
                events: wave_tx,
                relays: Vec::new(),
            },
            reported: std::collections::HashSet::new(),
            next_progress: t0,
        });
        // The pacer has just drained its commands (nothing there yet).
        if let Some(r) = &mut reporter {
            r.commands(&mut core, &mut held, t0);
        }
        // Now the appliance adds the member and the member says hello.
        let credential = [7u8; 32];
        cmd_tx
            .send(WaveCommand::Expect(
                "late".into(),
                *blake3::hash(&credential).as_bytes(),
            ))
            .unwrap();
        let (mut answer, _out) = hello(&ev_tx, "late", credential);
        // Its Hello is taken with the rest of the event batch.
        drain_events(&mut reporter, &mut core, &mut held, &ev_rx);
        match answer.try_recv() {
            Ok(Ok(_)) => {}
            other => panic!("the late member was not admitted: {other:?}"),
        }
        // A stranger is still refused.
        let (mut answer, _out) = hello(&ev_tx, "stranger", credential);
        drain_events(&mut reporter, &mut core, &mut held, &ev_rx);
        match answer.try_recv() {
            Ok(Err(e)) => assert!(e.contains("is not a member of this wave"), "{e}"),
            other => panic!("a stranger was admitted: {other:?}"),
        }
    }

    /// Only a member the appliance names as a relay gets a unicast copy of
    /// the wave; a lab wave grants it to any receiver, up to
    /// `MAX_RELAYS`, and a relay that reconnects replaces its copy.
    #[test]
    fn relay_copies_go_to_relays_only_and_are_capped() {
        let t0 = Instant::now();
        let to = |port: u16| std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        let answer_of = |held: &mut Held, core: &mut WaveSender, name: &str, relay| {
            let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
            let (mut answer, out) = hello_relay(&ev_tx, name, [3u8; 32], relay);
            held.on_event(core, ev_rx.try_recv().unwrap());
            (answer.try_recv().unwrap(), out)
        };
        // An appliance wave: two proven members, one of them a relay.
        let mut core = WaveSender::new(SenderConfig::default(), manifest(), 1100, t0);
        core.expect_member("dev", t0);
        core.expect_member("rly", t0);
        let cred = *blake3::hash(&[3u8; 32]).as_bytes();
        let mut held = Held {
            credentials: Some(HashMap::from([("dev".into(), cred), ("rly".into(), cred)])),
            relay_names: Some(["rly".to_string()].into_iter().collect()),
            gso: 16,
            ..Default::default()
        };
        let (r, _o1) = answer_of(&mut held, &mut core, "dev", Some(to(9100)));
        let e = r.expect_err("a device asked for a copy");
        assert!(e.contains("is not a relay of this wave"), "{e}");
        assert!(held.relays.is_empty());
        let (r, _o2) = answer_of(&mut held, &mut core, "rly", Some(to(9101)));
        let id = r.expect("the relay is admitted");
        assert_eq!(held.relays.len(), 1);
        assert_eq!((held.relays[0].id, held.relays[0].to), (id, to(9101)));
        // Its connection ends: no more copies.
        held.on_event(&mut core, Event::Disconnect(id));
        assert!(held.relays.is_empty());

        // A lab wave: anyone, up to the cap; the same address replaces.
        let mut core = WaveSender::new(SenderConfig::default(), manifest(), 1100, t0);
        let mut held = Held {
            gso: 16,
            ..Default::default()
        };
        let mut outs = Vec::new();
        for i in 0..super::super::MAX_RELAYS {
            let (r, o) = answer_of(
                &mut held,
                &mut core,
                &format!("r{i}"),
                Some(to(9200 + i as u16)),
            );
            r.expect("under the cap");
            outs.push(o);
        }
        let (r, _o) = answer_of(&mut held, &mut core, "r0", Some(to(9200)));
        r.expect("a relay reconnecting from its address replaces its copy");
        assert_eq!(held.relays.len(), super::super::MAX_RELAYS);
        let (r, _o) = answer_of(&mut held, &mut core, "one-more", Some(to(9300)));
        let e = r.expect_err("past the cap");
        assert!(e.contains("already copies to"), "{e}");
        let (r, _o) = answer_of(&mut held, &mut core, "plain", None);
        r.expect("a plain receiver needs no copy");
        assert_eq!(held.relays.len(), super::super::MAX_RELAYS);
    }
}
