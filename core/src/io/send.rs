//! The wave sender's I/O driver: TCP control server, a pacing send thread
//! that owns the [`WaveSender`] core and the UDP socket, and worker threads
//! that read image blocks and build repair encoders.
//!
//! Owns: threads, sockets, the image file, memory for loaded blocks and
//! encoders, metrics. Must not: make protocol decisions; it executes the
//! core's [`Action`]s and asks it what to transmit.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::dataplane::render::{Packetizer, Rendered, SymbolSource};
use crate::dataplane::sender::{Action, RxState, SenderConfig, Tx, WaveSender};
use crate::image::fec::BlockEncoder;
use crate::image::manifest::Manifest;
use crate::io::conn::{Conn, ConnError};
use crate::io::net;
use crate::wire::control::{self, Msg, SessionParams, PROTOCOL_VERSION};
use crate::wire::packet::{self, KEY_LEN};

/// Ethernet header bytes: the token bucket counts whole frames, as tbf
/// and switch ports do.
const ETH_HEADER: usize = 14;
const SEND_BATCH: usize = 32;

/// One wave to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The image file.
    pub image: PathBuf,
    /// Its manifest (checked against the file).
    pub manifest: Manifest,
    /// Interface the multicast leaves on (default: the route's).
    pub iface: Option<String>,
    /// Multicast group and port.
    pub group: SocketAddrV4,
    /// Where receivers connect (TCP).
    pub control: SocketAddr,
    /// Multicast TTL.
    pub ttl: u32,
    /// The receivers' report interval.
    pub feedback_ms: u32,
    /// A connection must say hello within this.
    pub hello_timeout: Duration,
    /// Datagrams per UDP GSO send (1 = plain `sendmmsg`).
    pub gso_segments: usize,
    /// The sender core's settings.
    pub cfg: SenderConfig,
    /// `wave` label on this wave's metrics (waves run side by side).
    pub wave_label: String,
}

/// Why a wave could not run.
#[derive(Debug, Error)]
pub enum SendError {
    /// The control listener could not bind.
    #[error("control listener on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The multicast socket could not be made.
    #[error("multicast socket: {0}")]
    Socket(std::io::Error),
    /// The image does not match its manifest or cannot be read.
    #[error("image source: {0}")]
    Image(String),
    /// A sender thread could not start or died.
    #[error("send thread failed: {0}")]
    Thread(String),
}

/// One receiver's end, in the wave's report.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverReport {
    /// Its name.
    pub name: String,
    /// `verified`, `failed: ...`, `unfinished: ...`.
    pub verdict: String,
    /// Verified.
    pub ok: bool,
    /// From the wave's start (or its join) to its verdict.
    pub seconds: Option<f64>,
    /// Blocks it had at start.
    pub resumed_blocks: u32,
    /// Datagrams it dropped for a bad tag.
    pub auth_failures: u64,
}

/// What a wave did.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    /// Every expected receiver verified.
    pub ok: bool,
    /// The image's size.
    pub image_bytes: u64,
    /// Its hash, hex.
    pub image_hash: String,
    /// Datagram bytes sent.
    pub wire_bytes: u64,
    /// Wave start to end.
    pub seconds: f64,
    /// Wave start to the last source symbol sent.
    pub source_seconds: f64,
    /// Image bits per second of the wave.
    pub goodput_bps: f64,
    /// The rate ceiling.
    pub rate_bps: u64,
    /// Source symbols sent once.
    pub source_packets: u64,
    /// Repair datagrams (fountain and resent source).
    pub repair_packets: u64,
    /// Of those, resent source symbols.
    pub resent_source_packets: u64,
    /// Of the resent source symbols, coded datagrams (XOR of several).
    pub coded_packets: u64,
    /// Probes.
    pub probe_packets: u64,
    /// Repair datagrams per 100 datagrams.
    pub repair_overhead_pct: f64,
    /// Receivers the wave waited for.
    pub expected_receivers: usize,
    /// Each receiver's end.
    pub receivers: Vec<ReceiverReport>,
    /// The image-source error that aborted the wave.
    pub error: Option<String>,
}

/// Orders from the appliance to a running wave.
#[derive(Debug, Clone)]
pub enum WaveCommand {
    /// A late member joins this wave.
    Expect(String),
    /// This wave's share of the total rate changed.
    SetRate(u64),
}

/// What a running wave tells the appliance.
#[derive(Debug, Clone, PartialEq)]
pub enum WaveEvent {
    /// A member's receiver ended: verified, or failed with a reason.
    Verdict {
        /// The member.
        name: String,
        /// Verified.
        ok: bool,
        /// What it said.
        detail: String,
    },
    /// Blocks done per member (every ~second).
    Progress {
        /// The member.
        name: String,
        /// Blocks done.
        done: u32,
        /// Blocks in the image.
        total: u32,
    },
}

/// The appliance's handle on a wave it runs: named members (nobody else
/// may join), commands in, verdicts and progress out.
pub struct WaveLink {
    /// Who may join at the start.
    pub members: Vec<String>,
    /// Late members and rate changes.
    pub commands: Receiver<WaveCommand>,
    /// Verdicts and progress.
    pub events: mpsc::UnboundedSender<WaveEvent>,
}

enum Event {
    Hello {
        name: String,
        out: mpsc::UnboundedSender<Msg>,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    Msg(u32, Msg),
    Disconnect(u32),
    Loaded(u32, Arc<Vec<u8>>),
    Encoder(u32, Arc<BlockEncoder>),
    SourceError(String),
}

enum Job {
    Load(u32),
    /// Build an encoder; with the block's data when it is still loaded
    /// (checked against the manifest when it was read), else read it.
    Encode(u32, Option<Arc<Vec<u8>>>),
}

/// Read `b` from the image and check it against the manifest, so a
/// changed, truncated or corrupt source never reaches the wire.
fn read_block(file: &File, m: &Manifest, b: u32) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; m.block_len(b)];
    file.read_exact_at(&mut data, m.block_offset(b))
        .map_err(|e| format!("block {b}: {e} (image shorter than its manifest?)"))?;
    if m.digest_block(b, &data) != m.blocks[b as usize].hash {
        return Err(format!(
            "block {b} does not match the manifest: the image changed or is corrupt"
        ));
    }
    Ok(data)
}

fn worker(file: Arc<File>, m: Arc<Manifest>, jobs: Receiver<Job>, events: Sender<Event>) {
    for job in jobs {
        let ev = match job {
            Job::Load(b) => match read_block(&file, &m, b) {
                Ok(d) => Event::Loaded(b, Arc::new(d)),
                Err(e) => Event::SourceError(e),
            },
            Job::Encode(b, Some(d)) => {
                Event::Encoder(b, Arc::new(BlockEncoder::new(&m.block_oti(b), &d)))
            }
            Job::Encode(b, None) => match read_block(&file, &m, b) {
                Ok(d) => Event::Encoder(b, Arc::new(BlockEncoder::new(&m.block_oti(b), &d))),
                Err(e) => Event::SourceError(e),
            },
        };
        if events.send(ev).is_err() {
            return;
        }
    }
}

/// Run one wave to its end. Returns the report; `report.ok` is true only
/// if every expected receiver verified the image.
pub async fn run_send(opts: SendOptions) -> Result<SendReport, SendError> {
    let listener = bind_control(opts.control).await?;
    run_wave(opts, listener, None).await
}

/// The wave's TCP control listener; bind it first to learn the address
/// (port 0 = any) that members must be told.
pub async fn bind_control(addr: SocketAddr) -> Result<TcpListener, SendError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SendError::Listen { addr, source })
}

/// Run one wave on an already bound control listener; with a `link`, only
/// its members may join and the appliance steers the wave through it.
pub async fn run_wave(
    opts: SendOptions,
    listener: TcpListener,
    link: Option<WaveLink>,
) -> Result<SendReport, SendError> {
    let sock = net::sender_socket(opts.iface.as_deref(), opts.group, opts.ttl)
        .map_err(SendError::Socket)?;
    let file = File::open(&opts.image)
        .map_err(|e| SendError::Image(format!("{}: {e}", opts.image.display())))?;
    let len = file
        .metadata()
        .map_err(|e| SendError::Image(e.to_string()))?
        .len();
    if len != opts.manifest.image_size {
        return Err(SendError::Image(format!(
            "{} is {len} bytes, its manifest says {}",
            opts.image.display(),
            opts.manifest.image_size
        )));
    }
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill(&mut key);
    let session = SessionParams {
        session_id: rand::rng().random(),
        group: opts.group,
        key,
        manifest: opts.manifest.clone(),
        feedback_ms: opts.feedback_ms,
    };
    let session = Arc::new(session);
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();

    let accept_tx = ev_tx.clone();
    let accept_session = session.clone();
    let hello_timeout = opts.hello_timeout;
    let rx_timeout = opts.cfg.receiver_timeout;
    let acceptor = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let tx = accept_tx.clone();
                    let s = accept_session.clone();
                    tokio::spawn(async move {
                        if let Err(e) =
                            serve_receiver(stream, tx, s, hello_timeout, rx_timeout).await
                        {
                            tracing::warn!(%peer, error = %e, "control connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    let m = Arc::new(opts.manifest.clone());
    let file = Arc::new(file);
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (f, m, j, e) = (file.clone(), m.clone(), job_rx.clone(), ev_tx.clone());
        handles.push(std::thread::spawn(move || worker(f, m, j, e)));
    }
    drop(ev_tx);
    let cfg = opts.cfg.clone();
    let expected = cfg.expected;
    let gso_segments = opts.gso_segments;
    let wave_label = opts.wave_label.clone();
    let sess = session.clone();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("rc-pacer".into())
        .spawn(move || {
            raise_priority();
            let setup = LoopSetup {
                gso_segments,
                cfg,
                session: sess,
                wave: wave_label,
            };
            let _ = done_tx.send(send_loop(setup, sock, ev_rx, job_tx, link));
        })
        .map_err(|e| SendError::Thread(e.to_string()))?;
    let report = done_rx
        .await
        .map_err(|_| SendError::Thread("pacing thread died".into()))?;
    acceptor.abort();
    for h in handles {
        let _ = h.join();
    }
    let mut report = report;
    report.expected_receivers = expected;
    Ok(report)
}

async fn serve_receiver(
    stream: TcpStream,
    events: Sender<Event>,
    session: Arc<SessionParams>,
    hello_timeout: Duration,
    rx_timeout: Duration,
) -> Result<(), ConnError> {
    let mut conn = Conn::new(stream, control::MAX_FRAME);
    let name = match conn.recv(hello_timeout).await {
        Ok(Msg::Hello { name, .. }) => name,
        Ok(other) => {
            let m = format!("expected Hello, got {}", msg_name(&other));
            conn.close_with_error(m.clone()).await;
            metrics::counter!("rackcast_control_errors_total", "kind" => "out_of_order")
                .increment(1);
            return Err(ConnError::Protocol(control::ControlError::Malformed(m)));
        }
        Err(e) => {
            metrics::counter!("rackcast_control_errors_total", "kind" => "bad_hello").increment(1);
            conn.close_with_error(e.to_string()).await;
            return Err(e);
        }
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Msg>();
    let (id_tx, id_rx) = oneshot::channel();
    if events
        .send(Event::Hello {
            name,
            out: out_tx,
            reply: id_tx,
        })
        .is_err()
    {
        conn.close_with_error("wave is over".into()).await;
        return Ok(());
    }
    let id = match id_rx.await {
        Ok(Ok(id)) => id,
        Ok(Err(why)) => {
            tracing::warn!(reason = %why, "receiver refused");
            conn.close_with_error(why).await;
            return Ok(());
        }
        Err(_) => {
            conn.close_with_error("wave is over".into()).await;
            return Ok(());
        }
    };
    conn.send(&Msg::Welcome {
        protocol: PROTOCOL_VERSION,
        receiver_id: id,
        session: (*session).clone(),
    })
    .await?;
    let (mut sink, mut stream) = conn.split();
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let Ok(bytes) = control::emit(&m) else {
                continue;
            };
            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // A receiver closes as soon as its verdict is acknowledged; our Finish
    // may then meet a closed socket and the read a reset. That is the
    // normal end, not a failure to report.
    let mut verdict_sent = false;
    let result = loop {
        let next = tokio::time::timeout(rx_timeout, stream.next()).await;
        let msg = match next {
            Err(_) => break Err(ConnError::Timeout(rx_timeout)),
            Ok(None) => break Ok(()),
            Ok(Some(Err(_))) if verdict_sent => break Ok(()),
            Ok(Some(Err(e))) => break Err(ConnError::Io(e)),
            Ok(Some(Ok(frame))) => match control::parse(&frame) {
                Ok(m) => m,
                Err(e) => {
                    metrics::counter!("rackcast_control_errors_total", "kind" => "malformed")
                        .increment(1);
                    break Err(e.into());
                }
            },
        };
        verdict_sent |= matches!(msg, Msg::Done(_));
        if events.send(Event::Msg(id, msg)).is_err() {
            break Ok(());
        }
    };
    let _ = events.send(Event::Disconnect(id));
    // The writer ends when the core drops our sender (Disconnect action)
    // or the wave ends; don't let it linger past that.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

/// Pacing is only as good as the pacer's wakeups: a pacer that waits for a
/// CPU longer than the token bucket's depth loses rate for good. Ask for
/// the lowest real-time priority (SCHED_FIFO 1: runs as soon as it wakes;
/// the kernel's RT throttling still caps it at 95 % of a CPU), else nice
/// -10, else run as we are and say so. Needs root or CAP_SYS_NICE.
fn raise_priority() {
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

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Ready { .. } => "Ready",
        Msg::Status(_) => "Status",
        Msg::Done(_) => "Done",
        Msg::Welcome { .. } => "Welcome",
        Msg::Finish { .. } => "Finish",
        Msg::Error { .. } => "Error",
        Msg::Coded { .. } => "Coded",
    }
}

/// What the pacing thread starts from.
struct LoopSetup {
    gso_segments: usize,
    cfg: SenderConfig,
    session: Arc<SessionParams>,
    /// Metrics label.
    wave: String,
}

#[allow(clippy::too_many_lines)]
fn send_loop(
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
    let mut held = Held::default();
    let mut txs: Vec<Tx> = Vec::with_capacity(SEND_BATCH);
    let mut next_tick = t0;
    metrics::gauge!("rackcast_wave_blocks", "wave" => wave.clone()).set(m.block_count() as f64);
    let mut reporter = link.map(|l| {
        for name in &l.members {
            core.expect_member(name, t0);
        }
        LinkReporter {
            link: l,
            reported: std::collections::HashSet::new(),
            next_progress: t0,
        }
    });

    'outer: loop {
        let now = Instant::now();
        // Membership first: a member the appliance just added may already
        // be saying hello. Then events: they may unblock sends.
        if let Some(r) = &mut reporter {
            r.commands(&mut core, now);
        }
        while let Ok(ev) = events.try_recv() {
            held.on_event(&mut core, ev);
        }
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
                Ok(ev) => {
                    if let Some(r) = &mut reporter {
                        r.commands(&mut core, Instant::now());
                    }
                    held.on_event(&mut core, ev);
                }
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
            Event::Hello { name, out, reply } => {
                if core.is_finished() {
                    let _ = reply.send(Err("wave is over".into()));
                } else if !core.admits(&name) {
                    metrics::counter!("rackcast_control_errors_total", "kind" => "not_member")
                        .increment(1);
                    let _ = reply.send(Err(format!("{name:?} is not a member of this wave")));
                } else {
                    let id = core.on_hello(&name, now);
                    self.outs.insert(id, out);
                    let _ = reply.send(Ok(id));
                }
            }
            Event::Msg(id, msg) => core.on_message(id, msg, now),
            Event::Disconnect(id) => {
                self.outs.remove(&id);
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
    fn commands(&mut self, core: &mut WaveSender, now: Instant) {
        while let Ok(c) = self.link.commands.try_recv() {
            match c {
                WaveCommand::Expect(name) => {
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
            if !matches!(r.state, RxState::Verified | RxState::Failed(_)) {
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
                });
            }
        }
    }
}

fn publish_metrics(core: &WaveSender, wave: &str) {
    let st = &core.stats;
    let w = wave.to_string();
    metrics::gauge!("rackcast_rate_bps", "wave" => w.clone()).set(core.current_rate() as f64);
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
