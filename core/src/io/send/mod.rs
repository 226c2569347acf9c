//! The wave sender's I/O driver: TCP control server, a pacing send thread
//! (`pacer`) that owns the [`WaveSender`](crate::dataplane::sender::WaveSender)
//! core and the UDP socket, and worker threads that read image blocks and
//! build repair encoders.
//!
//! Owns: the control listener and one task per receiver connection, the
//! worker threads and the image file, the wave's options and report.
//! Must not: make protocol decisions; the pacer executes the core's
//! actions and asks it what to transmit.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::dataplane::sender::SenderConfig;
use crate::image::fec::BlockEncoder;
use crate::image::manifest::Manifest;
use crate::image::packed::WireSource;
use crate::io::conn::{Conn, ConnError};
use crate::io::net;
use crate::wire::control::{self, Msg, SessionParams, PROTOCOL_VERSION};
use crate::wire::packet::KEY_LEN;

mod pacer;

use pacer::{raise_priority, send_loop, LoopSetup};

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
    /// The prepared blocks file: frames of the blocks the manifest says
    /// travel compressed (`image::packed`).
    pub frames: Option<PathBuf>,
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
    /// The control listener's TLS: a certificate for the appliance's key
    /// (`io::tls::server_config`), so members know whom they talk to.
    pub tls: Arc<rustls::ServerConfig>,
    /// A relay's wave: blocks may be read only once its upstream receiver
    /// has written them (`None`: the whole image is there).
    pub gate: Option<Arc<BlockGate>>,
}

/// The blocks a relay's own wave may read: its upstream receiver marks
/// each one as it writes it, and a load of a block that is not there yet
/// is parked here, not holding a worker, until it is. So a relay
/// re-multicasts block by block, never waiting for the whole image.
#[derive(Debug, Default)]
pub struct BlockGate {
    state: std::sync::Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    ready: Vec<bool>,
    parked: Vec<Job>,
    jobs: Option<Sender<Job>>,
    failed: Option<String>,
}

impl BlockGate {
    /// A gate over `blocks` blocks, none there yet.
    pub fn new(blocks: u32) -> Arc<BlockGate> {
        Arc::new(BlockGate {
            state: std::sync::Mutex::new(GateState {
                ready: vec![false; blocks as usize],
                ..Default::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A worker that panicked holding the lock left plain data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `b` is written: its parked loads go to the workers.
    pub fn mark_ready(&self, b: u32) {
        let mut st = self.lock();
        let Some(r) = st.ready.get_mut(b as usize) else {
            return;
        };
        *r = true;
        let parked = std::mem::take(&mut st.parked);
        let (now, later): (Vec<Job>, Vec<Job>) = parked.into_iter().partition(|j| j.block() == b);
        st.parked = later;
        if let Some(tx) = &st.jobs {
            for j in now {
                let _ = tx.send(j);
            }
        }
    }

    /// Whether block `b` is there.
    pub fn is_ready(&self, b: u32) -> bool {
        self.lock().ready.get(b as usize).copied().unwrap_or(false)
    }

    /// The upstream failed: no more blocks will come. Parked and later
    /// loads fail, which ends the wave with this reason.
    pub fn fail(&self, why: String) {
        let mut st = self.lock();
        st.failed.get_or_insert(why);
        let parked = std::mem::take(&mut st.parked);
        if let Some(tx) = &st.jobs {
            for j in parked {
                let _ = tx.send(j);
            }
        }
    }

    fn attach(&self, jobs: Sender<Job>) {
        self.lock().jobs = Some(jobs);
    }

    /// The wave is over: let the workers' job queue close.
    fn detach(&self) {
        let mut st = self.lock();
        st.jobs = None;
        st.parked.clear();
    }

    /// The job to run now, or `None` once parked until its block is
    /// written; an error once the upstream failed.
    fn admit(&self, job: Job) -> Result<Option<Job>, String> {
        let mut st = self.lock();
        match st.ready.get(job.block() as usize) {
            Some(true) => Ok(Some(job)),
            Some(false) => {
                if let Some(why) = &st.failed {
                    return Err(format!("upstream: {why}"));
                }
                st.parked.push(job);
                Ok(None)
            }
            None => Err(format!("block {} is outside the image", job.block())),
        }
    }
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
    /// It fell behind the others and was caught up after them
    /// (`slow_members = catch_up`).
    pub fell_behind: bool,
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
    /// Members that fell behind the others (served after them).
    pub fell_behind: u64,
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

/// A wave's control connections at once (a thousand members and their
/// reconnects fit).
pub const MAX_CONTROL_CONNECTIONS: usize = 4096;
/// A wave's control connections from one source address at once.
pub const MAX_CONTROL_PER_SOURCE: u32 = 4;
/// Relays one wave copies its datagrams to: each copy is the wave's rate
/// again on the sender's uplink.
pub const MAX_RELAYS: usize = 8;

/// BLAKE3 of a member's device credential: what a wave holds to check
/// the credential a receiver presents (it never holds the credential).
pub type CredentialHash = [u8; 32];

/// Orders from the appliance to a running wave.
#[derive(Debug, Clone)]
pub enum WaveCommand {
    /// A late member joins this wave, with its credential's hash.
    Expect(String, CredentialHash),
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
        /// It fell behind the others and is not done: waiting for its
        /// catch-up, or in it.
        behind: bool,
    },
}

/// The appliance's handle on a wave it runs: named members (nobody else
/// may join), commands in, verdicts and progress out.
pub struct WaveLink {
    /// Who may join at the start, each with its credential's hash: only a
    /// receiver presenting that credential is admitted under the name.
    pub members: Vec<(String, CredentialHash)>,
    /// Late members and rate changes.
    pub commands: Receiver<WaveCommand>,
    /// Verdicts and progress.
    pub events: mpsc::UnboundedSender<WaveEvent>,
    /// Members that are relays: only they may ask for a unicast copy of
    /// the wave (`Hello::relay_port`).
    pub relays: Vec<String>,
}

enum Event {
    Hello {
        name: String,
        credential: Option<[u8; 32]>,
        /// A relay's unicast address: its connection's source address
        /// and the port its Hello named.
        relay: Option<SocketAddrV4>,
        out: mpsc::UnboundedSender<Msg>,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    Msg(u32, Msg),
    Disconnect(u32),
    Loaded(u32, Arc<Vec<u8>>),
    Encoder(u32, Arc<BlockEncoder>),
    SourceError(String),
}

#[derive(Debug)]
enum Job {
    Load(u32),
    /// Build an encoder; with the block's data when it is still loaded
    /// (checked against the manifest when it was read), else read it.
    Encode(u32, Option<Arc<Vec<u8>>>),
}

impl Job {
    fn block(&self) -> u32 {
        match self {
            Job::Load(b) | Job::Encode(b, _) => *b,
        }
    }
}

fn worker(
    src: Arc<WireSource>,
    m: Arc<Manifest>,
    jobs: Receiver<Job>,
    events: Sender<Event>,
    gate: Option<Arc<BlockGate>>,
) {
    for job in jobs {
        let job = match &gate {
            None => job,
            Some(g) => match g.admit(job) {
                Ok(Some(j)) => j,
                Ok(None) => continue,
                Err(e) => {
                    if events.send(Event::SourceError(e)).is_err() {
                        return;
                    }
                    continue;
                }
            },
        };
        let ev = match job {
            Job::Load(b) => match src.read(&m, b) {
                Ok(d) => Event::Loaded(b, Arc::new(d)),
                Err(e) => Event::SourceError(e),
            },
            Job::Encode(b, Some(d)) => {
                Event::Encoder(b, Arc::new(BlockEncoder::new(&m.block_oti(b), &d)))
            }
            Job::Encode(b, None) => match src.read(&m, b) {
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
    crate::io::limits::listen(addr).map_err(|source| SendError::Listen { addr, source })
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
    let len = std::fs::metadata(&opts.image)
        .map_err(|e| SendError::Image(format!("{}: {e}", opts.image.display())))?
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
        // More receivers report less often: the sender's report load
        // stays bounded (`REPORT_BUDGET`).
        feedback_ms: u32::try_from(
            crate::dataplane::sender::report_interval(
                Duration::from_millis(u64::from(opts.feedback_ms)),
                opts.cfg.expected,
            )
            .as_millis(),
        )
        .unwrap_or(opts.feedback_ms),
    };
    let session = Arc::new(session);
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();

    let accept_tx = ev_tx.clone();
    let accept_session = session.clone();
    let accept_tls = opts.tls.clone();
    let hello_timeout = opts.hello_timeout;
    let rx_timeout = opts.cfg.receiver_timeout;
    // Control connections held at once: a flood of connections (before
    // any Hello) holds at most its share, each for the Hello deadline.
    let caps = crate::io::limits::Caps::new(MAX_CONTROL_CONNECTIONS, MAX_CONTROL_PER_SOURCE);
    let acceptor = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let slot = match caps.take(peer.ip()) {
                        Ok(s) => s,
                        Err(full) => {
                            metrics::counter!("rackcast_control_errors_total", "kind" => "connections")
                                .increment(1);
                            tracing::warn!(%peer, reason = full.reason(), "wave control connection refused");
                            continue;
                        }
                    };
                    let tx = accept_tx.clone();
                    let s = accept_session.clone();
                    let tls = accept_tls.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) =
                            serve_receiver(stream, tls, tx, s, hello_timeout, rx_timeout).await
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
    let file = Arc::new(
        WireSource::open(&opts.image, opts.frames.as_deref(), &m).map_err(SendError::Image)?,
    );
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    if let Some(g) = &opts.gate {
        g.attach(job_tx.clone());
    }
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (f, m, j, e) = (file.clone(), m.clone(), job_rx.clone(), ev_tx.clone());
        let g = opts.gate.clone();
        handles.push(std::thread::spawn(move || worker(f, m, j, e, g)));
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
    if let Some(g) = &opts.gate {
        g.detach();
    }
    for h in handles {
        let _ = h.join();
    }
    let mut report = report;
    report.expected_receivers = expected;
    Ok(report)
}

async fn serve_receiver(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    events: Sender<Event>,
    session: Arc<SessionParams>,
    hello_timeout: Duration,
    rx_timeout: Duration,
) -> Result<(), ConnError> {
    let peer = stream.peer_addr().ok();
    let stream = match crate::io::tls::accept(&tls, stream).await {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!("rackcast_control_errors_total", "kind" => "tls").increment(1);
            return Err(e.into());
        }
    };
    // Until the receiver is admitted, its frames are capped at a Hello's
    // size: an anonymous peer cannot make the sender reserve megabytes.
    let mut conn = Conn::new(stream, control::HELLO_MAX_FRAME);
    let (name, credential, relay_port) = match conn.recv(hello_timeout).await {
        Ok(Msg::Hello {
            name,
            credential,
            relay_port,
            ..
        }) => (name, credential, relay_port),
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
    // The copy goes where the connection comes from, never to an address
    // the peer names: a Hello cannot aim the wave at a third host.
    let relay = match (relay_port, peer) {
        (Some(port), Some(SocketAddr::V4(p))) => Some(SocketAddrV4::new(*p.ip(), port)),
        (Some(_), _) => {
            conn.close_with_error("a relay must connect over IPv4".into())
                .await;
            return Ok(());
        }
        (None, _) => None,
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Msg>();
    let (id_tx, id_rx) = oneshot::channel();
    if events
        .send(Event::Hello {
            name,
            credential,
            relay,
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
    conn.set_max_frame(control::RECEIVER_MAX_FRAME);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A load of a block the relay has not written yet waits without a
    /// worker, goes out when the block is written, and fails (ending the
    /// relay's wave) when the upstream fails.
    #[test]
    fn the_gate_parks_loads_until_their_block_is_written() {
        let gate = BlockGate::new(4);
        let (tx, rx) = crossbeam_channel::unbounded();
        gate.attach(tx);
        gate.mark_ready(0);
        assert!(matches!(gate.admit(Job::Load(0)), Ok(Some(Job::Load(0)))));
        assert!(matches!(gate.admit(Job::Load(2)), Ok(None)));
        assert!(matches!(gate.admit(Job::Encode(3, None)), Ok(None)));
        assert!(rx.try_recv().is_err(), "nothing runs before its block");
        gate.mark_ready(2);
        assert!(matches!(rx.try_recv(), Ok(Job::Load(2))));
        assert!(rx.try_recv().is_err(), "only block 2's load");
        assert!(gate.admit(Job::Load(9)).is_err(), "outside the image");
        gate.fail("connection reset".into());
        // The parked encode comes back and now fails with the reason.
        let j = rx.try_recv().expect("parked jobs are released on failure");
        let e = gate.admit(j).expect_err("the upstream failed");
        assert!(e.contains("connection reset"), "{e}");
        // Blocks that are there still load.
        assert!(matches!(gate.admit(Job::Load(2)), Ok(Some(_))));
        gate.detach();
        drop(gate);
        assert!(rx.recv().is_err(), "the job queue closes with the wave");
    }
}
