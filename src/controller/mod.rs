//! `rackcast serve`: the appliance's driver around the workflow and wave
//! cores.
//!
//! Owns: one controller thread that holds every device record, the wave
//! scheduler and the store, and applies inputs one at a time (so a
//! transition, its log rows and the commands it causes are ordered and
//! committed before anything is sent); tokio tasks that move bytes for
//! agent connections (`agents`), run waves (`waves`, over
//! `rackcast_core::io::send`) and serve the REST API (`api`, with its
//! `views`). Start-up is `bootstrap`, the image catalogue `images`, bundle
//! generation `builder`. Must not: decide workflow or wave policy itself.

pub mod agents;
pub mod api;
pub mod auth;
mod bootstrap;
pub mod builder;
pub mod images;
mod service;
pub mod tls;
pub mod ui;
pub mod views;
mod waves;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Config;
use crate::store::{now_ms, Store};
use builder::{Builder, ImageEntry};
use rackcast_core::image::manifest::Manifest;
use rackcast_core::io::send::{self, WaveEvent};
use rackcast_core::model::{AgentMode, Outcome, Step, StepData};
use rackcast_core::waves::WaveScheduler;
use rackcast_core::wire::device::ApplianceMsg;
use rackcast_core::workflow::{self, Action, Device, Event, Millis, WorkflowConfig};

pub use bootstrap::serve;
pub use images::{add_image, image_manifest, manifest_path};
pub use views::{device_rows, DeviceRow, MemberProgress};
use waves::RunningWave;

/// Inputs of the controller thread.
pub enum Input {
    Connected {
        conn_id: u64,
        mac: String,
        device_id: Option<String>,
        mode: AgentMode,
        /// BLAKE3 of the credential the agent presented.
        presented: Option<[u8; 32]>,
        /// Where it connected from (for the log of a refusal).
        peer: std::net::SocketAddr,
        out: Outbox,
        reply: oneshot::Sender<Result<Admitted, String>>,
    },
    Report {
        device: String,
        /// The connection it came on: only the device's current one counts.
        conn_id: u64,
        /// The connection's share of the inbox, given back once handled.
        share: Option<Share>,
        cmd_id: u64,
        outcome: Outcome,
        data: StepData,
        ops: Vec<rackcast_core::model::OpRecord>,
    },
    Progress {
        device: String,
        conn_id: u64,
        share: Option<Share>,
        cmd_id: u64,
        ops: Vec<rackcast_core::model::OpRecord>,
    },
    Disconnected {
        device: String,
        conn_id: u64,
    },
    BundleDone {
        device: String,
        result: Result<(String, Box<rackcast_core::model::Plan>), String>,
    },
    Wave {
        wave: i64,
        ev: WaveEvent,
    },
    WaveEnded {
        wave: i64,
        result: Result<Box<send::SendReport>, String>,
    },
    /// A network boot request (DHCP/PXE): the power-on trigger.
    /// A BMC call on a device ended: its row for the device's log.
    /// `create`: the call changed the machine, so an inventory machine
    /// without a record gets one (a status read never makes one).
    Bmc {
        device: String,
        mac: String,
        create: bool,
        ok: bool,
        detail: String,
        duration_ms: u64,
    },
    BootSeen {
        mac: String,
        how: String,
    },
    /// Operator: retry a failed device.
    Retry {
        device: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Reinstall {
        device: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Operator: install a device held for approval.
    Approve {
        device: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The HTTP boot service served a device a file.
    BootFile {
        mac: String,
        what: String,
    },
    Tick,
    /// SIGHUP: the config file read again (and valid); `applied` is told
    /// once it is in effect (the service manager's READY=1 waits for it).
    Reload(Box<Config>, tokio::sync::oneshot::Sender<()>),
    /// The service watchdog asks whether this loop still runs.
    Heartbeat(tokio::sync::oneshot::Sender<()>),
    Shutdown,
}

/// One of a connection's [`INBOX_SHARE`] places in the controller's
/// inbox: a connection waits for a free one before it reads on, so what
/// agents queue for the controller is bounded by the connections.
pub type Share = tokio::sync::OwnedSemaphorePermit;

/// Reports and progress one agent connection may have waiting for the
/// controller.
pub const INBOX_SHARE: usize = 8;
/// Blob chunks one device may have read and not yet written, over all its
/// connections.
pub const CHUNKS_PER_DEVICE: usize = 4;
/// Events of one device kept while the store fails (a full disk). Past
/// this its agent is disconnected (it repeats its report when it is back).
pub const STALLED_MAX: usize = 256;

/// An agent connection the controller admitted.
pub struct Admitted {
    /// The device's id.
    pub device: String,
    /// Its boot (bundle signatures are bound to it).
    pub boot: u64,
    /// A credential issued to this connection (a new boot's first
    /// contact); only here, in memory, is it ever in clear.
    pub credential: Option<[u8; 32]>,
    /// The device's blob chunks in flight, shared by all its connections:
    /// reconnecting does not give a device more of the appliance's
    /// transfer permits.
    pub chunks: Arc<Semaphore>,
}

/// Messages queued to one agent connection's writer, at most
/// [`Outbox::CAPACITY`]. A blob chunk carries its transfer permit: it is
/// released once the chunk left, so at most `max_inflight_transfers`
/// chunks are in memory, however slow the devices. An agent that lets its
/// queue fill has stopped reading: its connection is closed (it
/// reconnects and gets the command in progress again).
/// The writer's end of an [`Outbox`].
pub type OutboxRx = mpsc::Receiver<(ApplianceMsg, Option<Held>)>;

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<(ApplianceMsg, Option<Held>)>,
    kill: Arc<tokio::sync::Notify>,
}

impl Outbox {
    /// Messages one connection may have queued.
    pub const CAPACITY: usize = 64;

    /// A queue, its receiving end, and the signal that closes the
    /// connection when it overflows.
    pub fn new() -> (Outbox, OutboxRx, Arc<tokio::sync::Notify>) {
        let (tx, rx) = mpsc::channel(Outbox::CAPACITY);
        let kill = Arc::new(tokio::sync::Notify::new());
        (
            Outbox {
                tx,
                kill: kill.clone(),
            },
            rx,
            kill,
        )
    }

    /// Tell the connection to close (a newer one of its device took its
    /// place).
    pub fn close(&self) {
        self.kill.notify_one();
    }

    /// Queue `msg`; false when the connection is gone or its queue was
    /// full (then the connection is told to close).
    pub fn send(&self, msg: ApplianceMsg, held: Option<Held>) -> bool {
        match self.tx.try_send((msg, held)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "outbox_full")
                    .increment(1);
                tracing::warn!("agent does not read its queue; closing its connection");
                self.kill.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Transfer permits a queued blob chunk holds until it is written: the
/// appliance-wide one and its connection's.
pub struct Held {
    pub _global: tokio::sync::OwnedSemaphorePermit,
    pub _conn: tokio::sync::OwnedSemaphorePermit,
}

/// Device id from its boot MAC: stable across reboots and reinstalls.
pub fn device_id_for(mac: &str) -> String {
    format!("rc-{}", mac.to_ascii_lowercase().replace(':', ""))
}

pub struct Controller {
    cfg: Arc<Config>,
    /// Each network boot and loader connection, by device id: what a
    /// running bringup waits for.
    boots: tokio::sync::broadcast::Sender<String>,
    /// The live view (JSON) for `rackcast watch` and the web page, and
    /// what its wave rates are computed from.
    live: tokio::sync::watch::Sender<Arc<String>>,
    live_rates: HashMap<i64, views::RateWindow>,
    bringup: Arc<std::sync::Mutex<Option<crate::bringup::Status>>>,
    wf: WorkflowConfig,
    store: Box<dyn Store>,
    devices: HashMap<String, Device>,
    conns: HashMap<String, (u64, Outbox)>,
    /// Per device, events whose commit failed, oldest first (at most
    /// [`STALLED_MAX`]).
    stalled: HashMap<String, std::collections::VecDeque<(Event, Option<u64>)>>,
    /// Each device's blob chunks in flight ([`CHUNKS_PER_DEVICE`]).
    chunks: HashMap<String, Arc<Semaphore>>,
    /// Image blocks done/total per device in a running wave (shared with
    /// the API; not stored: it changes every second).
    progress: Progress,
    /// MACs of installed devices (the boot service sends them to disk).
    installed: crate::boot::server::Installed,
    assigned: Assigned,
    sched: WaveScheduler,
    waves: HashMap<i64, RunningWave>,
    images: HashMap<String, ImageEntry>,
    manifests: HashMap<String, Arc<Manifest>>,
    builder: Arc<Builder>,
    bundle_permits: Arc<Semaphore>,
    rt: tokio::runtime::Handle,
    inbox: mpsc::UnboundedSender<Input>,
    /// Wave control listeners' TLS (the appliance key's certificate).
    control_tls: Arc<rustls::ServerConfig>,
    /// The rack inventory and the policy for unknown machines.
    enroll: Arc<crate::enroll::Enrollment>,
    /// When the event log was last pruned.
    last_prune: Millis,
    /// Device leases (one appliance drives a device at a time in a shared
    /// fleet record).
    leases: Leases,
}

pub type Progress = Arc<std::sync::Mutex<HashMap<String, MemberProgress>>>;

/// Everything the tokio side shares.
#[derive(Clone)]
pub struct Shared {
    pub progress: Progress,
    /// MACs of installed devices (boot from disk).
    pub installed: crate::boot::server::Installed,
    pub cfg: Arc<Config>,
    pub builder: Arc<Builder>,
    pub inbox: mpsc::UnboundedSender<Input>,
    pub transfer_permits: Arc<Semaphore>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Signs every bundle served; its key is shown in `Welcome`.
    pub signer: Arc<rackcast_core::signing::BundleSigner>,
    /// Device id -> the bundle generated for it: a connection gets only
    /// its own device's bundle (bundles can carry BMC credentials).
    pub assigned: Assigned,
    /// Device control's TLS (the appliance key's certificate).
    pub control_tls: Arc<rustls::ServerConfig>,
    /// Agent connections held at once, in total and per source.
    pub agent_caps: crate::limits::Caps,
    /// The rack inventory and the policy for unknown machines (the boot
    /// services answer only what it lets in).
    pub enroll: Arc<crate::enroll::Enrollment>,
    /// The inventory machines' BMCs (power and boot control).
    pub bmcs: Arc<crate::bmc::Registry>,
    /// Network boots and loader connections, by device id.
    pub boots: tokio::sync::broadcast::Sender<String>,
    /// The running (or last) bringup, as the API shows it.
    pub bringup: Arc<std::sync::Mutex<Option<crate::bringup::Status>>>,
    /// The live view as JSON, newest first; `GET /api/events` streams it.
    pub live: tokio::sync::watch::Receiver<Arc<String>>,
    /// Read-only store handles for the API's requests.
    pub readers: Arc<crate::store::Readers>,
}

pub type Assigned = Arc<std::sync::RwLock<HashMap<String, String>>>;

/// This appliance's device leases: who it is in the fleet record, how
/// long a lease lasts, which devices it holds.
pub(crate) struct Leases {
    /// Whether the record is shared (PostgreSQL). A SQLite record is one
    /// appliance's (its state dir is locked): no lease is taken, renewed
    /// or checked, and a commit costs what it did before leases.
    pub(crate) shared: bool,
    pub(crate) me: String,
    pub(crate) ttl_ms: Millis,
    pub(crate) held: std::collections::HashSet<String>,
    pub(crate) last_renew: Millis,
}

impl Controller {
    /// Renew this appliance's leases (every third of their time to live),
    /// notice the ones another appliance took, and abort the running
    /// waves of appliances that stopped renewing theirs.
    fn renew_leases(&mut self, now: Millis) {
        if !self.leases.shared || now - self.leases.last_renew < self.leases.ttl_ms / 3 {
            return;
        }
        self.leases.last_renew = now;
        match self.store.renew_leases(&self.leases.me, self.leases.ttl_ms) {
            Ok(still) => {
                let still: std::collections::HashSet<String> = still.into_iter().collect();
                for id in self.leases.held.difference(&still) {
                    // Lapsed while this appliance could not renew (the
                    // database was out of reach) and taken by another: its
                    // next commit here is refused until that one's lapses.
                    tracing::warn!(device = %id, "device lease taken by another appliance");
                    metrics::counter!("rackcast_leases_lost_total").increment(1);
                }
                self.leases.held = still;
                metrics::gauge!("rackcast_leases_held").set(self.leases.held.len() as f64);
            }
            Err(e) => {
                tracing::error!(error = %e, "device leases not renewed");
                metrics::counter!("rackcast_store_errors_total").increment(1);
            }
        }
        match self.store.abort_waves(
            &self.leases.me,
            false,
            "its appliance stopped renewing its leases",
            now,
        ) {
            Ok(w) if !w.is_empty() => {
                tracing::warn!(waves = ?w, "waves of an appliance that is gone marked aborted");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "orphaned waves not checked"),
        }
    }

    /// Before this appliance first writes a device it does not hold: the
    /// record as stored, which another appliance may have moved on since
    /// it was loaded (the commit that follows takes the lease, or is
    /// refused while the other one's is live).
    fn take_over(&mut self, id: &str) -> Result<(), crate::store::StoreError> {
        if !self.leases.shared || self.leases.held.contains(id) {
            return Ok(());
        }
        let Some(mut fresh) = self.store.load_device(id)? else {
            return Ok(());
        };
        if let Some(mine) = self.devices.get(id) {
            fresh.connected = mine.connected;
            if fresh != *mine {
                tracing::info!(device = %id, step = %fresh.current_step().as_str(), "device record reloaded: another appliance moved it on");
                self.devices.insert(id.to_string(), fresh);
            }
        }
        Ok(())
    }

    /// After a restart: waves of the previous process are gone; devices
    /// that were imaging lose their wave (and retry into a new one, where
    /// their receivers resume from their bitmaps); devices that were
    /// waiting for a wave are queued again.
    fn recover(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        self.prune_events(now);
        let aborted = self.store.abort_waves(
            &self.leases.me,
            true,
            "appliance restarted while the wave ran",
            now,
        )?;
        if !aborted.is_empty() {
            tracing::warn!(waves = ?aborted, "waves of the previous run marked aborted");
        }
        for d in self.store.load_devices()? {
            if d.reached == Step::Done {
                if let Ok(mut set) = self.installed.write() {
                    set.insert(d.mac.clone());
                }
            }
            if let (Some(b), Ok(mut map)) = (&d.bundle, self.assigned.write()) {
                map.insert(d.id.clone(), b.clone());
            }
            self.devices.insert(d.id.clone(), d);
        }
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        for id in ids {
            let imaging = self.devices[&id]
                .running
                .as_ref()
                .is_some_and(|r| r.step == Step::Imaging);
            if imaging {
                self.apply(
                    &id,
                    Event::WaveLost {
                        wave: None,
                        why: "appliance restarted".into(),
                    },
                );
            } else if self.devices[&id].queued_for_image {
                if let Some(img) = self.devices[&id].image.clone() {
                    let acts = self.sched.enqueue(&id, &img, now);
                    self.wave_actions(acts);
                }
            }
        }
        let others = if self.leases.shared {
            self.store.leased_by_others(&self.leases.me)?
        } else {
            Vec::new()
        };
        if !others.is_empty() {
            tracing::warn!(
                devices = others.len(),
                holders = ?others.iter().map(|(_, h)| h.as_str()).collect::<std::collections::BTreeSet<_>>(),
                "devices driven by other appliances: taken over when their leases lapse"
            );
        }
        metrics::gauge!("rackcast_leases_held").set(0.0);
        tracing::info!(devices = self.devices.len(), appliance = %self.leases.me, "fleet record loaded");
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        while let Some(input) = rx.blocking_recv() {
            if matches!(input, Input::Shutdown) {
                break;
            }
            self.handle(input);
        }
        // A clean stop hands the devices over at once: a standby need not
        // wait for the leases to lapse.
        if self.leases.shared {
            match self.store.release_leases(&self.leases.me) {
                Ok(n) => tracing::info!(leases = n, "device leases released"),
                Err(e) => tracing::warn!(error = %e, "device leases not released; they lapse"),
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Connected {
                conn_id,
                mac,
                device_id,
                mode,
                presented,
                peer,
                out,
                reply,
            } => {
                let id = device_id
                    .filter(|i| self.devices.contains_key(i))
                    .unwrap_or_else(|| device_id_for(&mac));
                if let Err(why) = self.enroll_new(&id, &mac, "agent connected", now_ms()) {
                    let _ = reply.send(Err(why.to_string()));
                    return;
                }
                let (boot, issued) = match workflow::admission(
                    &self.devices[&id],
                    &mode,
                    presented.as_ref(),
                ) {
                    workflow::Admission::Refused(refusal) => {
                        metrics::counter!("rackcast_agent_refused_total", "reason" => refusal.label())
                            .increment(1);
                        tracing::warn!(device = %id, %mac, %peer, reason = refusal.reason(), "agent refused");
                        self.apply(
                            &id,
                            Event::ClaimRefused {
                                refusal,
                                peer: peer.to_string(),
                            },
                        );
                        let _ = reply.send(Err(refusal.reason().to_string()));
                        return;
                    }
                    workflow::Admission::Resume { boot } => (boot, None),
                    workflow::Admission::Issue { boot } => {
                        let c: [u8; 32] = rand::random();
                        (boot, Some(c))
                    }
                };
                // One device, one connection: the one it replaces (a dead
                // link not yet timed out, or a second connection of the
                // same credential) is closed and frees what it holds.
                if let Some((old, out)) = self.conns.insert(id.clone(), (conn_id, out)) {
                    if old != conn_id {
                        metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "replaced")
                            .increment(1);
                        tracing::info!(device = %id, conn_id = old, "connection replaced by a newer one");
                        out.close();
                    }
                }
                let chunks = self
                    .chunks
                    .entry(id.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(CHUNKS_PER_DEVICE)))
                    .clone();
                let _ = reply.send(Ok(Admitted {
                    device: id.clone(),
                    boot,
                    credential: issued,
                    chunks,
                }));
                let mode_was_loader = matches!(mode, AgentMode::Loader { .. });
                let done_agent = matches!(mode, AgentMode::Agent { .. })
                    && self.devices[&id].reached == Step::Done;
                self.apply(
                    &id,
                    Event::AgentConnected {
                        mode,
                        issued: issued.map(|c| *blake3::hash(&c).as_bytes()),
                    },
                );
                if done_agent {
                    self.send_finished(&id);
                }
                if mode_was_loader {
                    let _ = self.boots.send(id.clone());
                }
            }
            Input::Report {
                device,
                conn_id,
                share: _share,
                cmd_id,
                outcome,
                data,
                ops,
            } => {
                // The rack inventory lists this machine's serial: another
                // one (a MAC moved to another machine, or spoofed) is held
                // for an operator, not installed.
                if let (StepData::Inventory(inv), Some(d)) = (&data, self.devices.get(&device)) {
                    let mismatch = self.enroll.serial_mismatch(&d.mac, &inv.dmi.serial);
                    if let Some(why) = mismatch.filter(|_| self.is_current(&device, conn_id)) {
                        metrics::counter!("rackcast_enroll_held_total", "reason" => "serial_mismatch")
                            .increment(1);
                        tracing::warn!(%device, %why, "device held");
                        self.apply(&device, Event::Hold(why));
                    }
                }
                if !self.is_current(&device, conn_id) {
                    // A connection of a boot whose credential is void now
                    // (a newer boot claimed the device): its results are
                    // not this device's any more.
                    metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "superseded")
                        .increment(1);
                    tracing::warn!(%device, conn_id, "report from a superseded connection dropped");
                } else if self.devices.contains_key(&device) {
                    self.apply_acked(
                        &device,
                        Event::Report {
                            cmd_id,
                            outcome,
                            data,
                            ops,
                        },
                        Some(cmd_id),
                    );
                }
            }
            Input::Progress {
                device,
                conn_id,
                share: _share,
                cmd_id,
                ops,
            } => {
                if self.is_current(&device, conn_id) {
                    self.apply(&device, Event::Progress { cmd_id, ops });
                }
            }
            Input::Disconnected { device, conn_id } => {
                if self.conns.get(&device).is_some_and(|(c, _)| *c == conn_id) {
                    self.conns.remove(&device);
                    self.apply(&device, Event::AgentDisconnected);
                }
            }
            Input::BundleDone { device, result } => {
                let ev = match result {
                    // The record keeps the plan without BMC passwords
                    // (finding 9): only the bundle file carries them.
                    Ok((hash, plan)) => Event::BundleBuilt {
                        hash,
                        plan: Box::new(plan.without_secrets()),
                    },
                    Err(e) => Event::BundleFailed(e),
                };
                self.apply(&device, ev);
            }
            Input::Wave { wave, ev } => self.on_wave_event(wave, ev),
            Input::WaveEnded { wave, result } => self.on_wave_end(wave, result),
            Input::Retry { device, reply } => {
                let r = match self.devices.get(&device) {
                    None => Err(format!("no device {device}")),
                    Some(d) if d.failed.is_none() && d.reached == Step::Done => {
                        Err(format!("{device} is installed: reinstall it instead"))
                    }
                    Some(d) if d.failed.is_none() && d.connected => Err(format!(
                        "{device} has not failed and its agent is connected: nothing to retry"
                    )),
                    Some(_) => {
                        self.apply(&device, Event::Retry);
                        Ok(())
                    }
                };
                let _ = reply.send(r);
            }
            Input::Reinstall { device, reply } => {
                let r = match self.devices.get(&device) {
                    None => Err(format!("no device {device}")),
                    Some(d) if d.reached != Step::Done => Err(format!(
                        "{device} is not installed (it is at {}): nothing to reinstall",
                        d.current_step()
                    )),
                    Some(_) => {
                        self.apply(&device, Event::Reinstall);
                        Ok(())
                    }
                };
                let _ = reply.send(r);
            }
            Input::BootFile { mac, what } => {
                let id = device_id_for(&mac);
                if self.devices.contains_key(&id) {
                    self.apply(&id, Event::BootFileServed(what));
                } else {
                    // Files are fetched after the DHCP request that made
                    // the record; an unknown MAC is someone guessing URLs.
                    metrics::counter!("rackcast_boot_files_unknown_device_total").increment(1);
                    tracing::warn!(%mac, %what, "boot file served to an unknown device");
                }
            }
            Input::Bmc {
                device,
                mac,
                create,
                ok,
                detail,
                duration_ms,
            } => {
                let now = now_ms();
                let known = self.devices.contains_key(&device)
                    || (create
                        && self
                            .enroll_new(&device, &mac, "power control through its BMC", now)
                            .is_ok());
                if known {
                    self.apply_at(
                        &device,
                        Event::Bmc {
                            ok,
                            detail,
                            duration_ms,
                        },
                        None,
                        now,
                    );
                }
            }
            Input::BootSeen { mac, how } => {
                let id = device_id_for(&mac);
                // One clock reading for the new record and its first
                // event: the power-on row is the device's first.
                let now = now_ms();
                if self.enroll_new(&id, &mac, &how, now).is_ok() {
                    self.apply_at(&id, Event::BootSeen(how), None, now);
                    let _ = self.boots.send(id);
                }
            }
            Input::Approve { device, reply } => {
                let r = match self.devices.get(&device) {
                    None => Err(format!("no device {device}")),
                    Some(d) if d.approved => Err(format!("{device} is not awaiting approval")),
                    Some(_) => {
                        self.apply(&device, Event::Approve);
                        Ok(())
                    }
                };
                let _ = reply.send(r);
            }
            Input::Tick => self.on_tick(),
            Input::Reload(new, applied) => {
                self.reload(*new);
                let _ = applied.send(());
            }
            Input::Heartbeat(alive) => {
                let _ = alive.send(());
            }
            Input::Shutdown => {}
        }
    }

    /// A record for a MAC seen for the first time, as the enrollment
    /// policy says (known and `auto`: installed; `approve`: held after its
    /// inventory, at most `max_pending` of them; `known`: none). `Ok` when
    /// the device has a record (already or now).
    fn enroll_new(
        &mut self,
        id: &str,
        mac: &str,
        how: &str,
        now: Millis,
    ) -> Result<(), &'static str> {
        if self.devices.contains_key(id) {
            return Ok(());
        }
        let pending = self
            .devices
            .values()
            .filter(|d| !d.approved && d.reached != Step::Done)
            .count();
        let approved = match self.enroll.decide(mac, pending) {
            crate::enroll::Decision::Install => true,
            crate::enroll::Decision::Hold => false,
            crate::enroll::Decision::Refuse(why) => {
                metrics::counter!("rackcast_enroll_refused_total").increment(1);
                tracing::warn!(%mac, %how, why, "unknown device refused");
                return Err(why);
            }
        };
        let mut d = Device::new(id, &mac.to_ascii_lowercase(), now);
        d.approved = approved;
        tracing::info!(device = %id, %mac, %how, approved, "new device");
        self.devices.insert(id.to_string(), d);
        Ok(())
    }

    /// `conn_id` is the device's current (last admitted) connection.
    fn is_current(&self, device: &str, conn_id: u64) -> bool {
        self.conns.get(device).is_some_and(|(c, _)| *c == conn_id)
    }

    fn send_to(&self, device: &str, msg: ApplianceMsg) {
        if let Some((_, out)) = self.conns.get(device) {
            out.send(msg, None);
        }
    }

    /// Apply one workflow event: commit the record and its log rows in one
    /// transaction, then carry out the rest.
    fn apply(&mut self, id: &str, ev: Event) {
        self.apply_acked(id, ev, None);
    }

    /// `ack`: the report being applied; its Ack goes out once the result
    /// is durable (or was already), before any command it causes.
    fn apply_acked(&mut self, id: &str, ev: Event, ack: Option<u64>) {
        self.apply_at(id, ev, ack, now_ms());
    }

    /// [`Self::apply_acked`] at `now`.
    fn apply_at(&mut self, id: &str, ev: Event, ack: Option<u64>, now: Millis) {
        if let Some(queue) = self.stalled.get_mut(id) {
            // Behind an event the store could not take: in order, or not
            // at all. A timer check is made again on the next tick.
            if matches!(ev, Event::Tick) {
                return;
            }
            if queue.len() < STALLED_MAX {
                queue.push_back((ev, ack));
            } else {
                metrics::counter!("rackcast_store_events_dropped_total").increment(1);
                tracing::error!(
                    device = id,
                    "store still failing; event dropped, agent disconnected to repeat"
                );
                if let Some((_, out)) = self.conns.get(id) {
                    out.close();
                }
            }
            return;
        }
        if let Err(e) = self.try_apply(id, ev.clone(), ack, now) {
            tracing::error!(device = id, error = %e, "store commit failed; event kept and retried");
            metrics::counter!("rackcast_store_errors_total").increment(1);
            self.stalled
                .entry(id.to_string())
                .or_default()
                .push_back((ev, ack));
        }
    }

    /// Events the store failed to commit, retried in order every tick
    /// (a full disk freed, a lock released): nothing is lost and nothing
    /// overtakes them.
    fn retry_stalled(&mut self) {
        let ids: Vec<String> = self.stalled.keys().cloned().collect();
        for id in ids {
            while let Some((ev, ack)) = self.stalled.get_mut(&id).and_then(|q| q.pop_front()) {
                if let Err(e) = self.try_apply(&id, ev.clone(), ack, now_ms()) {
                    tracing::debug!(device = %id, error = %e, "store commit failed again");
                    if let Some(q) = self.stalled.get_mut(&id) {
                        q.push_front((ev, ack));
                    }
                    break;
                }
            }
            if self.stalled.get(&id).is_some_and(|q| q.is_empty()) {
                self.stalled.remove(&id);
                tracing::info!(device = %id, "store commits resumed; kept events applied");
            }
        }
    }

    /// Commit `ev`'s record and rows, then carry out its actions; an
    /// error means nothing happened (the record and memory are as before).
    fn try_apply(
        &mut self,
        id: &str,
        ev: Event,
        ack: Option<u64>,
        now: Millis,
    ) -> Result<(), crate::store::StoreError> {
        self.take_over(id)?;
        let Some(dev) = self.devices.get(id) else {
            return Ok(());
        };
        let mut next = dev.clone();
        let actions = workflow::on_event(&mut next, &self.wf, now, ev);
        let rows: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Record(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let inv = actions.iter().find_map(|a| match a {
            Action::StoreInventory(i) => Some(i.as_ref()),
            _ => None,
        });
        if next == *dev && rows.is_empty() && inv.is_none() {
            if let Some(cmd_id) = ack {
                self.send_to(id, ApplianceMsg::Ack { cmd_id });
            }
            self.perform(id, actions);
            return Ok(());
        }
        self.store.commit(&next, &rows, inv)?;
        if self.leases.shared {
            self.leases.held.insert(id.to_string());
        }
        for r in &rows {
            tracing::info!(device = id, step = %r.step, kind = %r.kind, detail = %r.detail, "device event");
        }
        if next.bundle != dev.bundle {
            if let Ok(mut map) = self.assigned.write() {
                match &next.bundle {
                    Some(b) => map.insert(id.to_string(), b.clone()),
                    None => map.remove(id),
                };
            }
        }
        let finished_now = next.reached == Step::Done && dev.reached != Step::Done;
        if next.reached == Step::Done || dev.reached == Step::Done {
            if let Ok(mut set) = self.installed.write() {
                if next.reached == Step::Done {
                    set.insert(next.mac.clone());
                } else {
                    set.remove(&next.mac);
                }
            }
        }
        self.devices.insert(id.to_string(), next);
        if let Some(cmd_id) = ack {
            self.send_to(id, ApplianceMsg::Ack { cmd_id });
        }
        self.perform(id, actions);
        if finished_now {
            self.send_finished(id);
        }
        Ok(())
    }

    fn send_finished(&self, id: &str) {
        self.send_to(
            id,
            ApplianceMsg::Finished {
                detail: "installation complete".into(),
            },
        );
    }

    fn perform(&mut self, id: &str, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Record(_) | Action::StoreInventory(_) => {}
                Action::Send(cmd) => self.send_to(id, ApplianceMsg::Run(cmd)),
                Action::BuildBundle => self.build_bundle(id),
                Action::RequestWave { image } => {
                    let acts = self.sched.enqueue(id, &image, now_ms());
                    self.wave_actions(acts);
                }
                Action::LeaveWave => {
                    self.sched.remove(id);
                    if let Ok(mut p) = self.progress.lock() {
                        p.remove(id);
                    }
                }
                Action::StepFinished {
                    step,
                    ok,
                    duration_ms,
                } => {
                    metrics::histogram!(
                        "rackcast_step_duration_seconds",
                        "step" => step.as_str(),
                        "result" => if ok { "ok" } else { "failed" }
                    )
                    .record(duration_ms as f64 / 1000.0);
                }
            }
        }
    }

    fn build_bundle(&mut self, id: &str) {
        let Some(dev) = self.devices.get(id) else {
            return;
        };
        let inv = match self.store.inventory(id) {
            Ok(Some(i)) => i,
            Ok(None) => {
                let _ = self.inbox.send(Input::BundleDone {
                    device: id.to_string(),
                    result: Err("no inventory recorded".into()),
                });
                return;
            }
            Err(e) => {
                let _ = self.inbox.send(Input::BundleDone {
                    device: id.to_string(),
                    result: Err(e.to_string()),
                });
                return;
            }
        };
        let (builder, permits, inbox) = (
            self.builder.clone(),
            self.bundle_permits.clone(),
            self.inbox.clone(),
        );
        let (device, mac, images) = (id.to_string(), dev.mac.clone(), self.images.clone());
        let row = self.enroll.row(&mac).cloned();
        let reinstall = dev.reinstall;
        self.rt.spawn(async move {
            // Bounded: 1,000 devices inventoried at once do not build
            // 1,000 bundles at once.
            let _permit = permits.acquire_owned().await;
            let result = tokio::task::spawn_blocking(move || {
                builder
                    .build(&mac, row.as_ref(), &inv, &images, reinstall)
                    .map(|(h, p)| (h, Box::new(p)))
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("bundle builder crashed: {e}")));
            let _ = inbox.send(Input::BundleDone { device, result });
        });
    }

    /// Event-log retention: rows older than `[events] retention` go (at
    /// start, then hourly).
    fn prune_events(&mut self, now: Millis) {
        let keep = self.cfg.events.retention.as_millis() as Millis;
        self.last_prune = now;
        if keep == 0 {
            return;
        }
        match self.store.prune_events(now - keep) {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("rackcast_events_pruned_total").increment(n);
                tracing::info!(rows = n, "event log rows past their retention removed");
            }
            Err(e) => {
                metrics::counter!("rackcast_store_errors_total").increment(1);
                tracing::error!(error = %e, "event log retention");
            }
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.renew_leases(now);
        self.retry_stalled();
        if now - self.last_prune >= 3_600_000 {
            self.prune_events(now);
        }
        let ids: Vec<String> = self
            .devices
            .values()
            .filter(|d| d.running.is_some() || d.failed.is_some())
            .map(|d| d.id.clone())
            .collect();
        for id in ids {
            self.apply(&id, Event::Tick);
        }
        let counts: Vec<(String, usize)> = {
            let mut images: Vec<String> = self.images.keys().cloned().collect();
            images.sort();
            images
                .into_iter()
                .map(|i| {
                    let n = self.expected_for(&i);
                    (i, n)
                })
                .collect()
        };
        let acts = self.sched.on_tick(now, |img| {
            counts
                .iter()
                .find(|(i, _)| i == img)
                .map_or(usize::MAX, |(_, n)| *n)
        });
        self.wave_actions(acts);
        let mut per_state: HashMap<&'static str, usize> = HashMap::new();
        for d in self.devices.values() {
            *per_state.entry(d.state()).or_default() += 1;
        }
        for s in [
            "idle",
            "running",
            "waiting_for_wave",
            "awaiting_approval",
            "failed",
            "done",
        ] {
            metrics::gauge!("rackcast_devices", "state" => s)
                .set(per_state.get(s).copied().unwrap_or(0) as f64);
        }
        metrics::gauge!("rackcast_waves_running").set(self.waves.len() as f64);
        self.publish_live(now);
    }

    /// Take a reloaded config: its `[waves]` and `[workflow]` apply to
    /// waves started and steps timed from now on (a running wave keeps
    /// the policy it started with and finishes); a change anywhere else
    /// is logged as needing a restart and not applied.
    fn reload(&mut self, new: Config) {
        let old = self.cfg.clone();
        use std::fmt::Debug;
        let mut changed: Vec<String> = Vec::new();
        let mut note = |name: &str, a: &dyn Debug, b: &dyn Debug| {
            let (a, b) = (format!("{a:?}"), format!("{b:?}"));
            if a != b {
                changed.push(format!("{name} {a} -> {b}"));
            }
        };
        let (ow, nw) = (&old.waves, &new.waves);
        note("waves.min_members", &ow.min_members, &nw.min_members);
        note("waves.start_after", &ow.start_after, &nw.start_after);
        note(
            "waves.member_timeout",
            &ow.member_timeout,
            &nw.member_timeout,
        );
        note("waves.hello_timeout", &ow.hello_timeout, &nw.hello_timeout);
        note("waves.slow_members", &ow.slow_members, &nw.slow_members);
        let (of, nf) = (&old.workflow, &new.workflow);
        note("workflow.step_timeout", &of.step_timeout, &nf.step_timeout);
        note(
            "workflow.imaging_timeout",
            &of.imaging_timeout,
            &nf.imaging_timeout,
        );
        note("workflow.max_attempts", &of.max_attempts, &nf.max_attempts);
        note(
            "workflow.retry_backoff",
            &of.retry_backoff,
            &nf.retry_backoff,
        );
        // Everything else is read once at start (listeners, state, images,
        // profiles, inventory, BMCs): say so rather than half-apply it.
        let differs = |a: &dyn Debug, b: &dyn Debug| format!("{a:?}") != format!("{b:?}");
        let restart: Vec<&str> = [
            ("appliance", differs(&old.appliance, &new.appliance)),
            ("dataplane", differs(&old.dataplane, &new.dataplane)),
            ("agents", differs(&old.agents, &new.agents)),
            ("images", differs(&old.images, &new.images)),
            ("modules", differs(&old.modules, &new.modules)),
            ("profiles", differs(&old.profiles, &new.profiles)),
            ("devices", differs(&old.devices, &new.devices)),
            ("boot", differs(&old.boot, &new.boot)),
            ("enroll", differs(&old.enroll, &new.enroll)),
            ("bmc", differs(&old.bmc, &new.bmc)),
        ]
        .into_iter()
        .filter_map(|(name, d)| d.then_some(name))
        .collect();
        let mut merged = (*old).clone();
        merged.waves = new.waves.clone();
        merged.workflow = new.workflow.clone();
        self.sched.set_policy(rackcast_core::waves::Policy {
            min_members: merged.waves.min_members,
            start_after_ms: merged.waves.start_after.as_millis() as Millis,
            total_rate: merged.dataplane.total_rate,
        });
        self.wf = WorkflowConfig {
            step_timeout_ms: merged.workflow.step_timeout.as_millis() as Millis,
            imaging_timeout_ms: merged.workflow.imaging_timeout.as_millis() as Millis,
            max_attempts: merged.workflow.max_attempts,
            retry_backoff_ms: merged.workflow.retry_backoff.as_millis() as Millis,
        };
        self.cfg = Arc::new(merged);
        metrics::counter!("rackcast_config_reloads_total", "result" => "ok").increment(1);
        tracing::info!(
            changed = %if changed.is_empty() { "nothing".to_string() } else { changed.join(", ") },
            running_waves = self.waves.len(),
            "config reloaded (SIGHUP): applies to waves and steps from now on"
        );
        if !restart.is_empty() {
            tracing::warn!(
                sections = %restart.join(", "),
                "config reloaded (SIGHUP): these sections changed but are read only at start: restart the appliance to apply them"
            );
        }
    }

    /// Build the live view from memory (never the store) and publish it
    /// if it changed.
    fn publish_live(&mut self, now: Millis) {
        let mut devs: Vec<Device> = self.devices.values().cloned().collect();
        devs.sort_by(|a, b| a.id.cmp(&b.id));
        let progress = self.progress.lock().map(|p| p.clone()).unwrap_or_default();
        let devices = views::device_rows(&devs, &progress);
        let mut waves = Vec::new();
        let mut ids: Vec<i64> = self.waves.keys().copied().collect();
        ids.sort();
        for id in ids {
            let w = &self.waves[&id];
            let (mut d, mut t) = (0u64, 0u64);
            for dev in devs.iter().filter(|x| x.wave == Some(id)) {
                if let Some(m) = progress.get(&dev.id) {
                    d += u64::from(m.done);
                    t += u64::from(m.total);
                }
            }
            let share = d as f64 / t.max(1) as f64;
            let size = self
                .manifests
                .get(&w.image)
                .map_or(0.0, |m| m.image_size as f64);
            // Image bytes each member has, on average.
            let bytes = share * size;
            let rate = self.live_rates.entry(id).or_default().push(now, bytes);
            let left = (1.0 - share) * size;
            waves.push(views::LiveWave {
                id,
                image: w.image.clone(),
                members: w.record.members,
                verified: w.record.verified,
                failed: w.record.failed,
                progress: share,
                rate_bps: rate * 8.0,
                eta_s: (rate > 0.0).then(|| left / rate),
                behind: w.behind.iter().cloned().collect(),
            });
        }
        self.live_rates.retain(|id, _| self.waves.contains_key(id));
        let bringup = self
            .bringup
            .lock()
            .ok()
            .and_then(|b| b.as_ref().and_then(|s| serde_json::to_value(s).ok()));
        let view = views::LiveView {
            devices,
            waves,
            bringup,
        };
        if let Ok(json) = serde_json::to_string(&view) {
            self.live.send_if_modified(|cur| {
                if cur.as_str() == json {
                    false
                } else {
                    *cur = Arc::new(json);
                    true
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that stops reading fills its queue: the next message is
    /// refused and its connection told to close, instead of the queue
    /// growing.
    #[tokio::test]
    async fn a_full_outbox_closes_the_connection() {
        let (out, mut rx, kill) = Outbox::new();
        for _ in 0..Outbox::CAPACITY {
            assert!(out.send(ApplianceMsg::Pong, None));
        }
        let closed = kill.notified();
        assert!(!out.send(ApplianceMsg::Pong, None));
        tokio::time::timeout(std::time::Duration::from_secs(1), closed)
            .await
            .expect("the connection was told to close");
        // What was queued is still there for the writer, and no more.
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, Outbox::CAPACITY);
        drop(rx);
        assert!(!out.send(ApplianceMsg::Pong, None), "gone");
    }
}
