//! The receiver's I/O driver: control connection, a receive thread that
//! owns the [`ReceiverCore`] and the multicast socket, and a writer thread
//! that decodes, checks and writes blocks and keeps their digests.
//!
//! Owns: the session with the sender, the receive thread and the
//! threads' lifecycle; the resume state (`resume`) and the writer
//! (`writer`) are their own modules. Must not: decide what a packet
//! means (the core does).
//!
//! Verification: every block's BLAKE3 digest (its chaining value in the
//! image's hash tree, `manifest::block_digest`) is computed from the bytes
//! about to be written and checked before the positioned write; blocks
//! found on the output at a resume are re-read and re-digested, zero blocks
//! digested from zeros. The whole-image BLAKE3 is the merge of those
//! digests — the hash of exactly the bytes written, with one hash pass per
//! block instead of a second pass reading the output back — and the verdict
//! is `Verified` only if it equals the manifest's.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use thiserror::Error;

use crate::backoff::Backoff;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::dataplane::receiver::{Counters, DecodeJob, ReceiverCore};

use crate::image::manifest::Manifest;
use crate::io::conn::{Conn, ConnError};
use crate::io::net::{self, RecvBatch};
use crate::wire::control::{self, Msg, SessionParams, Verdict, PROTOCOL_VERSION};

mod resume;
mod scan;
mod writer;

pub use resume::saved_blocks;
use resume::ResumeState;
use writer::{open_output, writer_loop, DecodeResult, Keep, Written};

use crate::io::send::BlockGate;

/// A relay's receiver: it takes its upstream's wave by unicast (no
/// multicast routing reaches its segment) and keeps what its own wave
/// sends, block by block as each is written.
#[derive(Debug)]
pub struct RelayTap {
    /// The UDP port the upstream copies the wave to, on the address this
    /// relay reaches it from (0: any free port).
    pub port: u16,
    /// The blocks file to keep compressed blocks' frames in (created or
    /// truncated, sized for the image's frames).
    pub frames: PathBuf,
    /// Told once the session is known: its manifest and the gate that
    /// opens block by block.
    pub joined: oneshot::Sender<(Manifest, Arc<BlockGate>)>,
}

/// One image to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The wave sender's control address.
    pub server: SocketAddr,
    /// The output: a file or a block device.
    pub out: PathBuf,
    /// Interface to join the group on (default: the one that reaches the
    /// sender).
    pub iface: Option<String>,
    /// Identity towards the sender; a restarted receiver reuses it.
    pub name: Option<String>,
    /// Resume state file (default: `<out>.rcresume`).
    pub state: Option<PathBuf>,
    /// Keep retrying the connection this long.
    pub connect_timeout: Duration,
    /// Give up when neither packets nor control messages came this long.
    pub idle_timeout: Duration,
    /// Socket receive buffer to ask for, bytes.
    pub rcvbuf: usize,
    /// Threads that decode and decompress blocks (at least 1).
    pub decoders: usize,
    /// Digest every block already on the output and take the ones that
    /// match (re-imaging a device that holds an earlier version), not
    /// only those a resume state lists.
    pub delta: bool,
    /// Fingerprint of the key the sender must prove in the TLS handshake
    /// (the appliance's; `None`: any key, still encrypted).
    pub trust_key: Option<String>,
    /// The device's credential: an appliance wave admits a member only
    /// with it.
    pub credential: Option<[u8; 32]>,
    /// The image the device's signed plan names: a session for any other
    /// image is refused before anything is written.
    pub expect_image: Option<[u8; 32]>,
    /// The output is a disk: it must exist and is written in place (never
    /// created, truncated or resized), whether a block device or, in a
    /// lab, a file standing in for one.
    pub disk: bool,
}

/// Decoding threads for this machine: compressed waves need several
/// cores per receiver at high rates, and idle ones cost nothing.
pub fn default_decoders() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

/// Live progress for a CLI bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Blocks in the image.
    pub total_blocks: AtomicU32,
    /// Blocks assembled.
    pub done_blocks: AtomicU32,
    /// Blocks checked and written.
    pub verified_blocks: AtomicU32,
    /// The image's size.
    pub image_bytes: AtomicU64,
}

/// Why a receiver could not run.
#[derive(Debug, Error)]
pub enum ReceiveError {
    /// The sender did not answer within the connect timeout.
    #[error("cannot reach sender {addr}: {source}")]
    Connect {
        /// The sender.
        addr: SocketAddr,
        /// The last error.
        source: io::Error,
    },
    /// The control session failed.
    #[error("control connection to the sender: {0}")]
    Control(#[from] ConnError),
    /// The sender said no (not a member, wave over).
    #[error("sender refused us: {0}")]
    Refused(String),
    /// The output could not be opened, sized or written.
    #[error("output {path}: {source}")]
    Output {
        /// The output.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The multicast socket could not be made.
    #[error("multicast socket: {0}")]
    Socket(io::Error),
}

/// What a receiver did.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    /// The written image hashes to the manifest's.
    pub verified: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// The manifest's image hash, hex.
    pub image_hash: String,
    /// The image's size.
    pub image_bytes: u64,
    /// Connect to verdict.
    pub seconds: f64,
    /// Blocks found on the output at start.
    pub resumed_blocks: u32,
    /// Datagrams received.
    pub packets: u64,
    /// Symbols taken.
    pub symbols: u64,
    /// Datagrams dropped for a bad tag.
    pub auth_failures: u64,
    /// Datagrams of another session.
    pub wrong_session: u64,
    /// Datagrams that did not parse or fit the image.
    pub malformed: u64,
    /// Symbols already had.
    pub duplicates: u64,
    /// Coded resends solved by XOR.
    pub coded: u64,
    /// Decodes that needed more symbols.
    pub decode_retries: u64,
    /// Blocks whose digest did not match (asked for again).
    pub hash_failures: u64,
    /// First symbols dropped while the assembly window was full (the
    /// blocks were asked for again).
    pub window_full: u64,
    /// Of the blocks found on the output at start, data (non-zero) ones.
    pub resumed_data_blocks: u32,
    /// The final flush after the last write (writeback ran during the
    /// wave, so this is what was left).
    pub flush_seconds: f64,
}

// ---- threads ---------------------------------------------------------------

/// CPU time (user + system) the calling thread has used so far, for the
/// debug log's per-thread cost lines.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Bytes of assembled blocks queued for the decoders, at most. A receiver
/// whose CPU or disk falls behind for a while (several receivers
/// decompressing on a few cores) holds its blocks here instead of
/// dropping datagrams the sender would have to resend; past it, the
/// receive thread waits and the socket buffer takes the rest (or drops
/// it, and the sender repairs).
const QUEUE_BYTES: u64 = 128 << 20;

/// Reads per `recvmmsg` (each may hold many GRO-coalesced datagrams).
const BATCH: usize = 64;
/// Sleep between polls once the socket queue is empty. Measured in the
/// netlab bench (500 Mbit/s): 5 ms saved the receive thread ~0.06 CPU-s
/// per 256 MiB at N=1 and 5 % loss (fewer wakeups, fuller batches), but
/// 8 receivers on 2 cores then finished their last blocks later (N=8 waves
/// of 5.05-7.58 s against 4.81-5.02 s at 2 ms in the same hour).
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A `Msg::Coded` plan: block, first id, combinations.
type CodedPlan = (u32, u32, Vec<Vec<u32>>);

struct RecvLoop {
    core: ReceiverCore,
    sock: std::net::UdpSocket,
    plans: crossbeam_channel::Receiver<CodedPlan>,
    jobs: crossbeam_channel::Sender<DecodeJob>,
    /// Bytes in `jobs` (the decoders subtract what they take).
    queued: Arc<AtomicU64>,
    done: crossbeam_channel::Receiver<DecodeResult>,
    status: mpsc::UnboundedSender<control::Status>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    feedback: Duration,
    idle_timeout: Duration,
}

impl RecvLoop {
    /// Queue a block for the decoders, waiting while `QUEUE_BYTES` are
    /// queued (the socket buffer takes the datagrams meanwhile, or drops
    /// them). False when the session is stopping.
    fn hand_over(&mut self, job: DecodeJob) -> bool {
        let bytes = job.asm.bytes() as u64;
        let mut last_status = Instant::now();
        loop {
            let q = self.queued.load(Ordering::Relaxed);
            if q == 0 || q + bytes <= QUEUE_BYTES {
                break;
            }
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            // Keep the sender hearing from us while the decoders catch
            // up: silence past its timeout drops us.
            if last_status.elapsed() >= self.feedback {
                if self.status.send(self.core.status()).is_err() {
                    return false;
                }
                last_status = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        self.jobs.send(job).is_ok()
    }

    /// Counters at the end, and why it ended early if it did.
    fn run(mut self) -> (Counters, Option<String>) {
        let mut batch = RecvBatch::new(BATCH);
        let mut ready = Vec::new();
        let mut next_feedback = Instant::now();
        let mut last_valid = Instant::now();
        let mut last_count = 0u64;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return (self.core.counters.clone(), None);
            }
            let n = match batch.recv(&self.sock) {
                Ok(n) => n,
                Err(e) => return (self.core.counters.clone(), Some(format!("receive: {e}"))),
            };
            if n < BATCH {
                // Queue drained: let packets accumulate instead of taking
                // a wakeup per datagram (the socket buffer holds far more
                // than one interval).
                std::thread::sleep(POLL_INTERVAL);
            }
            // Plans first: their coded datagrams may be in this batch.
            while let Ok((b, first, combos)) = self.plans.try_recv() {
                self.core.on_coded_plan(b, first, combos, &mut ready);
            }
            let datagrams: Vec<&[u8]> = (0..batch.datagrams()).map(|k| batch.datagram(k)).collect();
            self.core.on_datagrams(&datagrams, &mut ready);
            for job in ready.drain(..) {
                if !self.hand_over(job) {
                    return (self.core.counters.clone(), None);
                }
            }
            while let Ok((b, r, spare)) = self.done.try_recv() {
                self.core.on_decoded(b, r);
                if let Some(buf) = spare {
                    self.core.recycle(buf);
                }
            }
            self.progress
                .done_blocks
                .store(self.core.blocks_done(), Ordering::Relaxed);
            let now = Instant::now();
            let valid = self.core.counters.symbols + self.core.counters.probes;
            if valid != last_count {
                last_count = valid;
                last_valid = now;
            } else if now.duration_since(last_valid) > self.idle_timeout {
                return (
                    self.core.counters.clone(),
                    Some(format!(
                        "no valid packet for {} s",
                        self.idle_timeout.as_secs()
                    )),
                );
            }
            if now >= next_feedback {
                next_feedback = now + self.feedback;
                if self.status.send(self.core.status()).is_err() {
                    return (self.core.counters.clone(), None);
                }
            }
            if self.core.is_complete() {
                // Every block is in; the writer may still digest zero
                // blocks and flush the output, which can take seconds on
                // a real disk. Keep reporting meanwhile (the sender drops
                // a receiver silent for its receiver timeout) and keep the
                // job channel open, until the session stops this loop
                // after the verdict.
                loop {
                    if self.stop.load(Ordering::Relaxed)
                        || self.status.send(self.core.status()).is_err()
                    {
                        return (self.core.counters.clone(), None);
                    }
                    std::thread::sleep(self.feedback);
                }
            }
        }
    }
}

fn default_name(local: &SocketAddr) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let host =
        if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "receiver".into()
        };
    format!("{host}@{}", local.ip())
}

/// Whether `path` is a block device (a real disk, not a file).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Beside a file output; for a block device (whose directory is /dev) in
/// /run/rackcast, named after the device.
fn default_state_path(out: &Path) -> PathBuf {
    if is_block_device(out) {
        let dir = PathBuf::from("/run/rackcast");
        let _ = std::fs::create_dir_all(&dir);
        let name = out
            .file_name()
            .map_or("device".into(), |n| n.to_string_lossy().into_owned());
        dir.join(format!("{name}.rcresume"))
    } else {
        PathBuf::from(format!("{}.rcresume", out.display()))
    }
}

async fn connect(addr: SocketAddr, within: Duration) -> Result<TcpStream, ReceiveError> {
    let deadline = Instant::now() + within;
    // Receivers usually start before the sender: retry every 20 ms for the
    // first 2 s (a refused connect costs one RST), then back off to 1 s so
    // a rack waiting for a down appliance does not flood it.
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1), 150)
        .steady_for(Duration::from_secs(2));
    let mut dialer = crate::io::conn::Dialer::new(addr);
    loop {
        match dialer.attempt().await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + backoff.current() < deadline => {
                tracing::debug!(error = %e, "sender not reachable yet; retrying");
                tokio::time::sleep(backoff.failed(Instant::now())).await;
            }
            Err(source) => return Err(ReceiveError::Connect { addr, source }),
        }
    }
}

/// After our verdict: return once the sender's kernel has acknowledged
/// everything we sent (the verdict can no longer be lost by our closing),
/// or the sender answered or closed, or `within` passed. Messages that
/// arrive meanwhile are read and dropped: closing a socket with unread
/// input resets the connection instead of ending it cleanly.
///
/// Waiting for the acknowledgement and not for the sender's `Finish`: on a
/// lossy downlink the sender's `Finish` and `FIN` both carry that
/// acknowledgement, so losing one of them does not hold the receiver for a
/// TCP retransmission timeout.
async fn await_delivery(
    fd: std::os::fd::RawFd,
    stream: &mut crate::io::conn::FrameStream,
    within: Duration,
) -> &'static str {
    let deadline = tokio::time::Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(_)) => {}
                Some(Err(_)) => return "connection error",
                None => return "sender closed",
            },
            _ = tick.tick() => match crate::io::conn::unacked_bytes(fd) {
                Ok(0) => return "acknowledged",
                Ok(_) => {}
                Err(_) => return "cannot query the socket",
            },
            _ = tokio::time::sleep_until(deadline) => return "timed out",
        }
    }
}

/// The verdict on the written image's hash (or the error that ended the
/// session); drops the resume state when it must not be reused.
fn judge(
    outcome: Result<[u8; 32], String>,
    m: &Manifest,
    state_path: &Path,
) -> (bool, Option<String>, Verdict) {
    let (verified, reason) = match outcome {
        Ok(h) if h == m.image_hash => (true, None),
        Ok(h) => (
            false,
            Some(format!(
                "written image hashes to {}, manifest says {}",
                blake3::Hash::from_bytes(h).to_hex(),
                m.image_hash_hex()
            )),
        ),
        Err(e) => (false, Some(e)),
    };
    let verdict = if verified {
        // Done: a later run must not "resume" into a finished image.
        let _ = std::fs::remove_file(state_path);
        Verdict::Verified {
            image_hash: m.image_hash,
        }
    } else {
        if reason
            .as_deref()
            .is_some_and(|r| r.starts_with("written image hashes"))
        {
            // The resume state led to a bad image: do not reuse it.
            let _ = std::fs::remove_file(state_path);
        }
        Verdict::Failed {
            reason: reason.clone().unwrap_or_default(),
        }
    };
    (verified, reason, verdict)
}

/// Receive one image. `Ok(report)` with `report.verified == false` is a
/// clean failure (reason given, reported to the sender); `Err` means we
/// could not even take part.
pub async fn run_receive(
    opts: ReceiveOptions,
    progress: Arc<Progress>,
) -> Result<ReceiveReport, ReceiveError> {
    run_receive_tapped(opts, progress, None).await
}

/// [`run_receive`] for a relay (`tap`): the wave comes by unicast, and
/// its blocks are kept for the relay's own wave. The gate fails with the
/// reason if the session does not verify.
pub async fn run_receive_tapped(
    opts: ReceiveOptions,
    progress: Arc<Progress>,
    tap: Option<RelayTap>,
) -> Result<ReceiveReport, ReceiveError> {
    let mut gate_on_exit: Option<Arc<BlockGate>> = None;
    let r = receive_session(opts, progress, tap, &mut gate_on_exit).await;
    if let Some(g) = gate_on_exit {
        match &r {
            Ok(rep) if rep.verified => {}
            Ok(rep) => g.fail(rep.reason.clone().unwrap_or_else(|| "not verified".into())),
            Err(e) => g.fail(e.to_string()),
        }
    }
    r
}

async fn receive_session(
    opts: ReceiveOptions,
    progress: Arc<Progress>,
    tap: Option<RelayTap>,
    gate_on_exit: &mut Option<Arc<BlockGate>>,
) -> Result<ReceiveReport, ReceiveError> {
    let t0 = Instant::now();
    let stream = connect(opts.server, opts.connect_timeout).await?;
    let local = stream
        .local_addr()
        .map_err(|source| ReceiveError::Connect {
            addr: opts.server,
            source,
        })?;
    let name = opts.name.clone().unwrap_or_else(|| default_name(&local));
    // Without --iface, join on the address that reaches the sender: a
    // network-booted device has no multicast (or default) route to choose
    // an interface by.
    let local_v4 = match local.ip() {
        std::net::IpAddr::V4(a) if !a.is_loopback() => Some(a),
        _ => None,
    };
    // A relay's socket is bound before its Hello names the port.
    let relay_sock = match &tap {
        None => None,
        Some(t) => {
            let ip = match local.ip() {
                std::net::IpAddr::V4(a) => a,
                std::net::IpAddr::V6(_) => {
                    return Err(ReceiveError::Socket(io::Error::other(
                        "a relay reaches its upstream over IPv4 only",
                    )))
                }
            };
            let s =
                net::relay_receiver_socket(std::net::SocketAddrV4::new(ip, t.port), opts.rcvbuf)
                    .map_err(ReceiveError::Socket)?;
            let port = s.local_addr().map_err(ReceiveError::Socket)?.port();
            Some((s, port))
        }
    };
    let fd = stream.as_raw_fd();
    let tls = crate::io::tls::client_config(opts.trust_key.as_deref()).map_err(ConnError::from)?;
    let stream = crate::io::tls::connect(&tls, stream)
        .await
        .map_err(ConnError::from)?;
    let mut conn = Conn::new(stream, control::MAX_FRAME);
    conn.send(&Msg::Hello {
        protocol: PROTOCOL_VERSION,
        name: name.clone(),
        credential: opts.credential,
        relay_port: relay_sock.as_ref().map(|(_, p)| *p),
    })
    .await?;
    let session: SessionParams = match conn.recv(Duration::from_secs(30)).await? {
        Msg::Welcome { session, .. } => session,
        Msg::Error { message } => return Err(ReceiveError::Refused(message)),
        other => {
            conn.close_with_error("expected Welcome".into()).await;
            return Err(ReceiveError::Refused(format!(
                "unexpected first message {other:?}"
            )));
        }
    };
    if let Some(want) = opts.expect_image {
        if session.manifest.image_hash != want {
            let why = format!(
                "the wave sends image {}, the plan names {}",
                session.manifest.image_hash_hex(),
                blake3::Hash::from_bytes(want).to_hex()
            );
            conn.close_with_error(why.clone()).await;
            return Err(ReceiveError::Refused(why));
        }
    }
    let m = Arc::new(session.manifest.clone());
    let n = m.block_count();
    progress.total_blocks.store(n, Ordering::Relaxed);
    progress.image_bytes.store(m.image_size, Ordering::Relaxed);
    tracing::info!(%name, blocks = n, bytes = m.image_size, image = %m.image_hash_hex(), group = %session.group, "joined wave");

    let state_path = opts
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&opts.out));
    let mut resume = ResumeState::load(&state_path, &m);
    let keep = opts.delta || (0..n).any(|b| resume.has(b));
    let out = Arc::new(
        open_output(&opts.out, &m, keep, opts.disk).map_err(|source| ReceiveError::Output {
            path: opts.out.clone(),
            source,
        })?,
    );
    let keep = match tap {
        None => None,
        Some(t) => {
            let gate = BlockGate::new(n);
            for b in m.zero_blocks() {
                gate.mark_ready(b);
            }
            let (offsets, len) = crate::image::packed::frame_offsets(&m);
            let frames = if len == 0 {
                None
            } else {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&t.frames)
                    .and_then(|f| f.set_len(len).map(|()| f))
                    .map_err(|source| ReceiveError::Output {
                        path: t.frames.clone(),
                        source,
                    })?;
                Some(f)
            };
            *gate_on_exit = Some(gate.clone());
            let _ = t.joined.send(((*m).clone(), gate.clone()));
            Some(Keep {
                frames,
                offsets,
                gate,
            })
        }
    };
    let mut core = ReceiverCore::new((*m).clone(), session.session_id, session.key);
    let decoders = opts.decoders.max(1);
    // What is on the output already: the image's first part now, so our
    // first report (before Ready) names what the sender must not send
    // first; the rest alongside the wave.
    let mut visits = scan::plan(&m, &out, &resume, opts.delta);
    let rest = visits.split_off(scan::ready_split(&m, &visits));
    let mut digests: Vec<Option<[u8; 32]>> = vec![None; n as usize];
    let mut in_place = scan::InPlace::default();
    for d in scan::scan_now(&m, &out, &visits, decoders) {
        if let writer::Decoded::Fatal(why) = d {
            return Err(ReceiveError::Output {
                path: opts.out.clone(),
                source: io::Error::other(why),
            });
        }
        if let Some(b) = in_place.take(&m, &d, &mut digests, &mut resume) {
            core.mark_done(b);
        }
    }
    // A fresh file reads as zeros where the image is zero: those blocks
    // are done now, digested from zeros by the writer while it waits.
    let zero_blocks: Vec<u32> = if out.fresh {
        m.zero_blocks().collect()
    } else {
        Vec::new()
    };
    for b in &zero_blocks {
        core.mark_done(*b);
    }
    let before_ready = in_place;
    if before_ready.found > 0 || !rest.is_empty() {
        tracing::info!(
            found = before_ready.found,
            found_data = before_ready.found_data,
            scanning_alongside = rest.len(),
            delta = opts.delta,
            "blocks already on the output"
        );
    }
    let sock = match relay_sock {
        Some((s, _)) => s,
        None => net::receiver_socket(opts.iface.as_deref(), local_v4, session.group, opts.rcvbuf)
            .map_err(ReceiveError::Socket)?,
    };

    let stop = Arc::new(AtomicBool::new(false));
    // Bounded in bytes (`QUEUE_BYTES`), counted in `queued`.
    let (job_tx, job_rx) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let (status_tx, mut status_rx) = mpsc::unbounded_channel();
    let (plan_tx, plan_rx) = crossbeam_channel::unbounded();
    let (verdict_tx, verdict_rx) = oneshot::channel::<Written>();
    let (good_tx, good_rx) = crossbeam_channel::bounded(decoders * 2);
    scan::spawn_rest(
        m.clone(),
        out.clone(),
        rest,
        decoders,
        stop.clone(),
        good_tx.clone(),
    );
    {
        let setup = writer::WriterSetup {
            m: m.clone(),
            out,
            resume,
            digests,
            zero_blocks,
            in_place,
            jobs: job_rx,
            queued: queued.clone(),
            done: done_tx,
            good: (good_tx, good_rx),
            decoders,
            progress: progress.clone(),
            stop: stop.clone(),
            keep,
        };
        std::thread::spawn(move || {
            let r = writer_loop(setup);
            tracing::debug!(cpu_s = thread_cpu().as_secs_f64(), "writer thread done");
            let _ = verdict_tx.send(r);
        });
    }
    // What is already in place, told before Ready: the wave may start the
    // moment we are ready, and must not send blocks we have (delta
    // re-imaging, resume) while waiting for our first periodic report.
    let initial = (before_ready.found > 0).then(|| core.status());
    let recv = RecvLoop {
        core,
        sock,
        plans: plan_rx,
        jobs: job_tx,
        queued,
        done: done_rx,
        status: status_tx,
        progress: progress.clone(),
        stop: stop.clone(),
        feedback: Duration::from_millis(session.feedback_ms.clamp(5, 5000) as u64),
        idle_timeout: opts.idle_timeout,
    };
    let recv_handle = std::thread::spawn(move || {
        let r = recv.run();
        tracing::debug!(cpu_s = thread_cpu().as_secs_f64(), "receive thread done");
        r
    });

    if let Some(st) = initial {
        conn.send(&Msg::Status(st)).await?;
    }
    conn.send(&Msg::Ready {
        resumed_blocks: before_ready.found,
    })
    .await?;
    let (mut sink, mut stream) = conn.split();
    let mut verdict_rx = verdict_rx;
    let mut flush = Duration::ZERO;
    let mut found = before_ready;
    let outcome: Result<[u8; 32], String> = loop {
        tokio::select! {
            st = status_rx.recv() => {
                if let Some(st) = st {
                    let Ok(bytes) = control::emit(&Msg::Status(st)) else { continue };
                    if let Err(e) = sink.send(bytes::Bytes::from(bytes)).await {
                        break Err(format!("lost the control connection to the sender: {e}"));
                    }
                }
            }
            v = &mut verdict_rx => {
                match v {
                    Ok(w) => {
                        flush = w.flush;
                        found = w.in_place;
                        break w.hash;
                    }
                    Err(_) => break Err("writer thread ended unexpectedly".into()),
                }
            }
            msg = tokio::time::timeout(opts.idle_timeout, stream.next()) => {
                match msg {
                    Err(_) => break Err(format!("sender silent for {} s", opts.idle_timeout.as_secs())),
                    Ok(None) => break Err("sender closed the control connection".into()),
                    Ok(Some(Err(e))) => break Err(format!("lost the control connection to the sender: {e}")),
                    Ok(Some(Ok(frame))) => match control::parse(&frame) {
                        Ok(Msg::Finish { reason }) => break Err(format!("sender ended the session: {reason}")),
                        Ok(Msg::Error { message }) => break Err(format!("sender error: {message}")),
                        Ok(Msg::Coded { block, first, combos }) => {
                            let _ = plan_tx.send((block, first, combos));
                        }
                        Ok(_) => {}
                        Err(e) => break Err(format!("bad message from sender: {e}")),
                    },
                }
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    let counters = match recv_handle.join() {
        Ok((c, None)) => c,
        Ok((c, Some(e))) => {
            tracing::warn!(error = %e, "receive loop");
            c
        }
        Err(_) => Counters::default(),
    };
    let (verified, reason, verdict) = judge(outcome, &m, &state_path);
    if let Ok(bytes) = control::emit(&Msg::Done(verdict)) {
        let sent = Instant::now();
        if sink.send(bytes::Bytes::from(bytes)).await.is_ok() {
            let why = await_delivery(fd, &mut stream, Duration::from_secs(2)).await;
            tracing::debug!(
                waited_ms = sent.elapsed().as_millis() as u64,
                why,
                "verdict delivered"
            );
        }
    }
    Ok(ReceiveReport {
        verified,
        reason,
        image_hash: m.image_hash_hex(),
        image_bytes: m.image_size,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_blocks: found.found,
        packets: counters.packets,
        symbols: counters.symbols,
        auth_failures: counters.auth_failures,
        wrong_session: counters.wrong_session,
        malformed: counters.malformed + counters.bad_block + counters.bad_length,
        duplicates: counters.duplicates,
        coded: counters.coded,
        decode_retries: counters.decode_retries,
        hash_failures: counters.hash_failures,
        window_full: counters.window_full,
        resumed_data_blocks: found.found_data,
        flush_seconds: flush.as_secs_f64(),
    })
}
