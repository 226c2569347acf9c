//! `rackcast serve`: the appliance's driver around the workflow and wave
//! cores.
//!
//! Owns: one controller thread that holds every device record, the wave
//! scheduler and the store, and applies inputs one at a time (so a
//! transition, its log rows and the commands it causes are ordered and
//! committed before anything is sent); tokio tasks that move bytes for
//! agent connections (`server`), run waves (`dataplane::send`) and serve
//! the REST API (`api`). Must not: decide workflow or wave policy itself.

pub mod api;
pub mod builder;
pub mod server;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Config;
use crate::store::{now_ms, ImageRecord, SqliteStore, Store, WaveRecord};
use builder::{Builder, ImageEntry};
use rackcast_core::dataplane::sender::SenderConfig;
use rackcast_core::image::manifest::Manifest;
use rackcast_core::io::send::{self, SendOptions, WaveCommand, WaveEvent, WaveLink};
use rackcast_core::model::{AgentMode, Outcome, Step, StepData, WaveJoin};
use rackcast_core::waves::{Policy, WaveAction, WaveScheduler};
use rackcast_core::wire::device::ApplianceMsg;
use rackcast_core::workflow::{self, Action, Device, Event, Millis, WorkflowConfig};

/// Inputs of the controller thread.
pub enum Input {
    Connected {
        conn_id: u64,
        mac: String,
        device_id: Option<String>,
        mode: AgentMode,
        out: Outbox,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Report {
        device: String,
        cmd_id: u64,
        outcome: Outcome,
        data: StepData,
        ops: Vec<rackcast_core::model::OpRecord>,
    },
    Progress {
        device: String,
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
    /// The HTTP boot service served a device a file.
    BootFile {
        mac: String,
        what: String,
    },
    Tick,
    Shutdown,
}

/// Messages to one agent connection's writer. A blob chunk carries its
/// transfer permit: it is released once the chunk left, so at most
/// `max_inflight_transfers` chunks are in memory, however slow the devices.
pub type Outbox = mpsc::UnboundedSender<(ApplianceMsg, Option<tokio::sync::OwnedSemaphorePermit>)>;

/// Device id from its boot MAC: stable across reboots and reinstalls.
pub fn device_id_for(mac: &str) -> String {
    format!("rc-{}", mac.to_ascii_lowercase().replace(':', ""))
}

struct RunningWave {
    image: String,
    /// Where members connect (the wave's TCP control listener).
    control: SocketAddr,
    commands: crossbeam_channel::Sender<WaveCommand>,
    record: WaveRecord,
}

pub struct Controller {
    cfg: Arc<Config>,
    wf: WorkflowConfig,
    store: Box<dyn Store>,
    devices: HashMap<String, Device>,
    conns: HashMap<String, (u64, Outbox)>,
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
}

pub type Progress = Arc<std::sync::Mutex<HashMap<String, (u32, u32)>>>;

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
}

pub type Assigned = Arc<std::sync::RwLock<HashMap<String, String>>>;

/// Where the appliance keeps an image's manifest.
pub fn manifest_path(cfg: &Config, name: &str) -> std::path::PathBuf {
    cfg.appliance
        .state_dir
        .join("manifests")
        .join(format!("{name}.rcmanifest"))
}

/// The image's manifest: the stored one if it still describes the file
/// (size and mtime checked by `load_for`), else built now and stored.
pub fn image_manifest(
    cfg: &Config,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<Manifest> {
    let mpath = manifest_path(cfg, name);
    if let Ok(m) = Manifest::load_for(path, &mpath) {
        return Ok(m);
    }
    tracing::info!(image = name, path = %path.display(), "building manifest");
    let ss =
        rackcast_core::wire::packet::symbol_size_for_mtu(cfg.dataplane.mtu).ok_or_else(|| {
            anyhow::anyhow!(
                "dataplane.mtu {} leaves no room for a symbol",
                cfg.dataplane.mtu
            )
        })?;
    let m = Manifest::build(path, rackcast_core::image::manifest::DEFAULT_BLOCK_SIZE, ss)
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
    if let Some(dir) = mpath.parent() {
        std::fs::create_dir_all(dir)?;
    }
    m.save(path, &mpath)
        .map_err(|e| anyhow::anyhow!("image {name}: {e}"))?;
    Ok(m)
}

/// Register a new image (config or `rackcast images add`).
pub fn add_image(
    cfg: &Config,
    store: &mut dyn Store,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<ImageRecord> {
    let path = std::fs::canonicalize(path)
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
    let m = image_manifest(cfg, name, &path)?;
    let rec = ImageRecord {
        name: name.to_string(),
        path: path.display().to_string(),
        size: m.image_size,
        hash: m.image_hash_hex(),
        block_size: m.block_size,
        added_at: now_ms(),
    };
    store.put_image(&rec)?;
    Ok(rec)
}

type ImageMaps = (HashMap<String, ImageEntry>, HashMap<String, Arc<Manifest>>);

/// Register the config's images, then load every image of the store.
fn load_images(cfg: &Config, store: &mut dyn Store) -> anyhow::Result<ImageMaps> {
    for im in &cfg.images {
        add_image(cfg, store, &im.name, &im.path)?;
    }
    let mut images = HashMap::new();
    let mut manifests = HashMap::new();
    for rec in store.images()? {
        let path = std::path::PathBuf::from(&rec.path);
        match image_manifest(cfg, &rec.name, &path) {
            Ok(m) if m.image_hash_hex() == rec.hash => {
                manifests.insert(rec.name.clone(), Arc::new(m));
                images.insert(
                    rec.name.clone(),
                    ImageEntry {
                        name: rec.name.clone(),
                        path,
                        hash: rec.hash.clone(),
                        size: rec.size,
                    },
                );
            }
            Ok(_) => {
                tracing::error!(image = %rec.name, "image changed since it was added; not served")
            }
            Err(e) => {
                tracing::error!(image = %rec.name, error = %e, "image not usable; not served")
            }
        }
    }
    Ok((images, manifests))
}

/// Run the appliance until SIGINT/SIGTERM.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let fds = rackcast_core::io::raise_fd_limit();
    tracing::info!(open_files = fds, "file descriptor limit");
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.appliance.state_dir)?;
    let mut store = SqliteStore::open(&cfg.store_path())?;
    let (images, manifests) = load_images(&cfg, &mut store)?;
    let builder = Arc::new(Builder::new(&cfg).map_err(anyhow::Error::msg)?);
    let signer = Arc::new(rackcast_core::signing::BundleSigner::load_or_create(
        &cfg.signing_key_path(),
    )?);
    tracing::info!(fingerprint = %signer.fingerprint(), "bundle-signing key");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let (inbox, rx) = mpsc::unbounded_channel();
    let shared = Shared {
        progress: Progress::default(),
        installed: crate::boot::server::Installed::default(),
        cfg: cfg.clone(),
        builder: builder.clone(),
        inbox: inbox.clone(),
        transfer_permits: Arc::new(Semaphore::new(cfg.appliance.max_inflight_transfers)),
        metrics,
        signer,
        assigned: Assigned::default(),
    };
    let wf = WorkflowConfig {
        step_timeout_ms: cfg.workflow.step_timeout.as_millis() as Millis,
        imaging_timeout_ms: cfg.workflow.imaging_timeout.as_millis() as Millis,
        max_attempts: cfg.workflow.max_attempts,
        retry_backoff_ms: cfg.workflow.retry_backoff.as_millis() as Millis,
    };
    let mut ctl = Controller {
        sched: WaveScheduler::new(Policy {
            min_members: cfg.waves.min_members,
            start_after_ms: cfg.waves.start_after.as_millis() as Millis,
            total_rate: cfg.dataplane.total_rate,
        }),
        cfg: cfg.clone(),
        wf,
        store: Box::new(store),
        devices: HashMap::new(),
        conns: HashMap::new(),
        progress: shared.progress.clone(),
        installed: shared.installed.clone(),
        assigned: shared.assigned.clone(),
        waves: HashMap::new(),
        images,
        manifests,
        builder,
        bundle_permits: Arc::new(Semaphore::new(cfg.appliance.max_inflight_bundles)),
        rt: tokio::runtime::Handle::current(),
        inbox: inbox.clone(),
    };
    ctl.recover()?;
    if let Some(t) = cfg.boot.tftp.clone() {
        let limits = rackcast_core::boot::tftp::Limits {
            max_blksize: t.max_blksize.clamp(512, 65464),
            max_window: t.max_window.max(1),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = crate::boot::tftp_server::run_tftp(t.root, t.iface, limits).await {
                tracing::error!(error = %e, "TFTP service stopped");
            }
        });
    }
    if cfg.boot.dhcp.is_some() {
        let installed = ctl.installed.clone();
        let inbox2 = inbox.clone();
        let trigger: crate::boot::server::BootTrigger = Box::new(move |mac, how| {
            let _ = inbox2.send(Input::BootSeen { mac, how });
        });
        let c = cfg.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::boot::server::run_dhcp(c, installed, trigger).await {
                tracing::error!(error = %e, "DHCP service stopped");
            }
        });
    }
    let control = tokio::net::TcpListener::bind(cfg.appliance.control_listen).await?;
    tracing::info!(addr = %cfg.appliance.control_listen, "control plane listening");
    tokio::spawn(server::accept_loop(control, shared.clone()));
    if let Some(addr) = cfg.appliance.api_listen {
        let l = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "REST API and /metrics listening");
        tokio::spawn(api::serve_api(l, shared.clone()));
    }
    let tick = inbox.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(500));
        loop {
            iv.tick().await;
            if tick.send(Input::Tick).is_err() {
                break;
            }
        }
    });
    let ctl_thread = std::thread::Builder::new()
        .name("rc-controller".into())
        .spawn(move || ctl.run(rx))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = inbox.send(Input::Shutdown);
    let _ = tokio::task::spawn_blocking(move || ctl_thread.join()).await;
    Ok(())
}

impl Controller {
    /// After a restart: waves of the previous process are gone; devices
    /// that were imaging lose their wave (and retry into a new one, where
    /// their receivers resume from their bitmaps); devices that were
    /// waiting for a wave are queued again.
    fn recover(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        let aborted = self
            .store
            .abort_running_waves("appliance restarted while the wave ran", now)?;
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
        tracing::info!(devices = self.devices.len(), "fleet record loaded");
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        while let Some(input) = rx.blocking_recv() {
            if matches!(input, Input::Shutdown) {
                break;
            }
            self.handle(input);
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Connected {
                conn_id,
                mac,
                device_id,
                mode,
                out,
                reply,
            } => {
                let id = device_id
                    .filter(|i| self.devices.contains_key(i))
                    .unwrap_or_else(|| device_id_for(&mac));
                if !self.devices.contains_key(&id) {
                    let d = Device::new(&id, &mac.to_ascii_lowercase(), now_ms());
                    tracing::info!(device = %id, %mac, "new device");
                    self.devices.insert(id.clone(), d);
                }
                self.conns.insert(id.clone(), (conn_id, out));
                let _ = reply.send(Ok(id.clone()));
                let done_agent = matches!(mode, AgentMode::Agent { .. })
                    && self.devices[&id].reached == Step::Done;
                self.apply(&id, Event::AgentConnected(mode));
                if done_agent {
                    self.send_finished(&id);
                }
            }
            Input::Report {
                device,
                cmd_id,
                outcome,
                data,
                ops,
            } => {
                if self.devices.contains_key(&device) {
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
                cmd_id,
                ops,
            } => {
                if self.devices.contains_key(&device) {
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
                    Ok((hash, plan)) => Event::BundleBuilt { hash, plan },
                    Err(e) => Event::BundleFailed(e),
                };
                self.apply(&device, ev);
            }
            Input::Wave { wave, ev } => self.on_wave_event(wave, ev),
            Input::WaveEnded { wave, result } => self.on_wave_end(wave, result),
            Input::Retry { device, reply } => {
                let r = match self.devices.get(&device) {
                    None => Err(format!("no device {device}")),
                    Some(d) if d.failed.is_none() => Err(format!("{device} has not failed")),
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
            Input::BootSeen { mac, how } => {
                let id = device_id_for(&mac);
                if !self.devices.contains_key(&id) {
                    tracing::info!(device = %id, %mac, %how, "new device powered on");
                    self.devices.insert(
                        id.clone(),
                        Device::new(&id, &mac.to_ascii_lowercase(), now_ms()),
                    );
                }
                self.apply(&id, Event::BootSeen(how));
            }
            Input::Tick => self.on_tick(),
            Input::Shutdown => {}
        }
    }

    fn send_to(&self, device: &str, msg: ApplianceMsg) {
        if let Some((_, out)) = self.conns.get(device) {
            let _ = out.send((msg, None));
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
        let Some(dev) = self.devices.get(id) else {
            return;
        };
        let mut next = dev.clone();
        let actions = workflow::on_event(&mut next, &self.wf, now_ms(), ev);
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
            return;
        }
        if let Err(e) = self.store.commit(&next, &rows, inv) {
            // Nothing was recorded, so nothing happens: the agent repeats
            // its report after reconnecting, timeouts fire again.
            tracing::error!(device = id, error = %e, "store commit failed; event not applied");
            metrics::counter!("rackcast_store_errors_total").increment(1);
            return;
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
        self.rt.spawn(async move {
            // Bounded: 1,000 devices inventoried at once do not build
            // 1,000 bundles at once.
            let _permit = permits.acquire_owned().await;
            let result = tokio::task::spawn_blocking(move || {
                builder
                    .build(&mac, &inv, &images)
                    .map(|(h, p)| (h, Box::new(p)))
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("bundle builder crashed: {e}")));
            let _ = inbox.send(Input::BundleDone { device, result });
        });
    }

    fn expected_for(&self, image: &str) -> usize {
        self.devices
            .values()
            .filter(|d| d.image.as_deref() == Some(image))
            .filter(|d| d.reached < Step::ImageVerified)
            .filter(|d| d.failed.as_ref().is_none_or(|f| f.retry_at.is_some()))
            .count()
    }

    fn on_tick(&mut self) {
        let now = now_ms();
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
        for s in ["idle", "running", "waiting_for_wave", "failed", "done"] {
            metrics::gauge!("rackcast_devices", "state" => s)
                .set(per_state.get(s).copied().unwrap_or(0) as f64);
        }
        metrics::gauge!("rackcast_waves_running").set(self.waves.len() as f64);
    }

    fn wave_actions(&mut self, acts: Vec<WaveAction>) {
        for a in acts {
            match a {
                WaveAction::Start { image, members } => self.start_wave(&image, members),
                WaveAction::Join { wave, device } => {
                    if let Some(w) = self.waves.get(&wave) {
                        let _ = w.commands.send(WaveCommand::Expect(device.clone()));
                        let join = self.join_for(wave, &w.image);
                        if let Some(j) = join {
                            self.apply(&device, Event::WaveAssigned(j));
                        }
                    }
                }
                WaveAction::Rates(rates) => {
                    for (id, bps) in rates {
                        if let Some(w) = self.waves.get(&id) {
                            let _ = w.commands.send(WaveCommand::SetRate(bps));
                        }
                    }
                }
            }
        }
    }

    fn join_for(&self, wave: i64, image: &str) -> Option<WaveJoin> {
        let w = self.waves.get(&wave)?;
        let img = self.images.get(image)?;
        Some(WaveJoin {
            wave_id: wave,
            control: w.control,
            image: image.to_string(),
            image_hash: img.hash.clone(),
            image_size: img.size,
        })
    }

    fn start_wave(&mut self, image: &str, members: Vec<String>) {
        let (Some(img), Some(manifest)) = (self.images.get(image), self.manifests.get(image))
        else {
            for m in &members {
                self.apply(
                    m,
                    Event::WaveLost {
                        wave: None,
                        why: format!("image {image} is not served"),
                    },
                );
            }
            return;
        };
        let (img, manifest) = (img.clone(), manifest.clone());
        let now = now_ms();
        let group_port = self.cfg.dataplane.port;
        let id = match self.store.create_wave(image, "", now) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "cannot record wave");
                return;
            }
        };
        let base = u32::from(self.cfg.dataplane.group_base);
        let group = Ipv4Addr::from(base.wrapping_add(((id - 1).rem_euclid(256)) as u32));
        let bind = SocketAddr::new(self.cfg.dataplane.bind, 0);
        let listener = match self.rt.block_on(send::bind_control(bind)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "wave control listener");
                for m in &members {
                    self.apply(
                        m,
                        Event::WaveLost {
                            wave: None,
                            why: e.to_string(),
                        },
                    );
                }
                return;
            }
        };
        let control = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "wave control address");
                return;
            }
        };
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let opts = SendOptions {
            image: img.path.clone(),
            manifest: (*manifest).clone(),
            iface: self.cfg.dataplane.iface.clone(),
            group: SocketAddrV4::new(group, group_port),
            control,
            ttl: self.cfg.dataplane.ttl,
            feedback_ms: 20,
            hello_timeout: Duration::from_secs(10),
            gso_segments: 16,
            wave_label: id.to_string(),
            cfg: SenderConfig {
                expected: members.len(),
                start_timeout: self.cfg.waves.member_timeout,
                receiver_timeout: self.cfg.waves.member_timeout,
                rate_bps: self.cfg.dataplane.total_rate,
                ..Default::default()
            },
        };
        let link = WaveLink {
            members: members.clone(),
            commands: cmd_rx,
            events: ev_tx,
        };
        let record = WaveRecord {
            id,
            image: image.to_string(),
            state: "running".into(),
            group: format!("{group}:{group_port}"),
            created_at: now,
            ended_at: None,
            members: members.len() as u32,
            verified: 0,
            failed: 0,
            detail: format!("members connect to {control}"),
        };
        if let Err(e) = self.store.update_wave(&record) {
            tracing::error!(error = %e, "cannot record wave");
        }
        tracing::info!(wave = id, image, members = members.len(), %group, %control, "wave starts");
        let inbox = self.inbox.clone();
        let inbox2 = self.inbox.clone();
        self.rt.spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if inbox2.send(Input::Wave { wave: id, ev }).is_err() {
                    break;
                }
            }
        });
        self.rt.spawn(async move {
            let result = send::run_wave(opts, listener, Some(link))
                .await
                .map(Box::new)
                .map_err(|e| e.to_string());
            let _ = inbox.send(Input::WaveEnded { wave: id, result });
        });
        self.waves.insert(
            id,
            RunningWave {
                image: image.to_string(),
                control,
                commands: cmd_tx,
                record,
            },
        );
        let acts = self.sched.started(id, image, &members);
        self.wave_actions(acts);
        for m in members {
            if let Some(j) = self.join_for(id, image) {
                self.apply(&m, Event::WaveAssigned(j));
            }
        }
    }

    fn on_wave_event(&mut self, wave: i64, ev: WaveEvent) {
        match ev {
            WaveEvent::Progress { name, done, total } => {
                metrics::gauge!("rackcast_device_image_progress_ratio", "device" => name.clone())
                    .set(f64::from(done) / f64::from(total.max(1)));
                let (mut d, mut t) = (0u64, 0u64);
                if let Ok(mut p) = self.progress.lock() {
                    p.insert(name, (done, total));
                    for dev in self.devices.values().filter(|x| x.wave == Some(wave)) {
                        if let Some((a, b)) = p.get(&dev.id) {
                            d += u64::from(*a);
                            t += u64::from(*b);
                        }
                    }
                }
                metrics::gauge!("rackcast_wave_progress_ratio", "wave" => wave.to_string())
                    .set(d as f64 / t.max(1) as f64);
            }
            WaveEvent::Verdict { name, ok, detail } => {
                if let Some(w) = self.waves.get_mut(&wave) {
                    if ok {
                        w.record.verified += 1;
                    } else {
                        w.record.failed += 1;
                    }
                    let _ = self.store.update_wave(&w.record);
                }
                tracing::info!(wave, device = %name, ok, %detail, "wave member verdict");
                // The agent's own report carries the verified hash; a
                // failed receiver ends the device's imaging step here.
                if !ok {
                    self.apply(
                        &name,
                        Event::WaveLost {
                            wave: Some(wave),
                            why: detail,
                        },
                    );
                }
            }
        }
    }

    fn on_wave_end(&mut self, wave: i64, result: Result<Box<send::SendReport>, String>) {
        let Some(mut w) = self.waves.remove(&wave) else {
            return;
        };
        let acts = self.sched.finished(wave);
        self.wave_actions(acts);
        w.record.ended_at = Some(now_ms());
        match &result {
            Ok(rep) => {
                w.record.state = "finished".into();
                w.record.members = rep.receivers.len() as u32;
                w.record.verified = rep.receivers.iter().filter(|r| r.ok).count() as u32;
                w.record.failed = w.record.members - w.record.verified;
                metrics::gauge!("rackcast_wave_goodput_bps", "image" => w.image.clone())
                    .set(rep.goodput_bps);
                w.record.detail = format!(
                    "{:.2} s, goodput {:.1} Mbit/s, repair overhead {:.1} %",
                    rep.seconds,
                    rep.goodput_bps / 1e6,
                    rep.repair_overhead_pct
                );
            }
            Err(e) => {
                w.record.state = "aborted".into();
                w.record.detail = e.clone();
            }
        }
        let _ = self.store.update_wave(&w.record);
        tracing::info!(wave, state = %w.record.state, verified = w.record.verified, "wave ended");
        // Members still imaging in this wave lost it.
        let lost: Vec<String> = self
            .devices
            .values()
            .filter(|d| d.wave == Some(wave))
            .filter(|d| d.running.as_ref().is_some_and(|r| r.step == Step::Imaging))
            .map(|d| d.id.clone())
            .collect();
        for id in lost {
            // The agent may still report success just after the sender
            // ended (its Done was the last message): give it the imaging
            // timeout rather than failing it here, unless the wave failed.
            if result.is_err() {
                self.apply(
                    &id,
                    Event::WaveLost {
                        wave: Some(wave),
                        why: "wave aborted".into(),
                    },
                );
            }
        }
    }
}

/// One line of `rackcast devices` / `GET /api/devices`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceRow {
    pub device: String,
    pub mac: String,
    pub state: String,
    pub step: String,
    pub wave: Option<i64>,
    pub image: Option<String>,
    pub bundle: Option<String>,
    /// Image progress in percent while the device is in a running wave.
    pub progress: Option<f64>,
    pub detail: String,
}

pub fn device_rows(devs: &[Device], progress: &HashMap<String, (u32, u32)>) -> Vec<DeviceRow> {
    devs.iter()
        .map(|d| DeviceRow {
            progress: progress
                .get(&d.id)
                .filter(|_| d.wave.is_some() && d.reached < Step::ImageVerified)
                .map(|(a, b)| f64::from(*a) * 100.0 / f64::from((*b).max(1))),
            device: d.id.clone(),
            mac: d.mac.clone(),
            state: d.state().to_string(),
            step: d.current_step().to_string(),
            wave: d.wave,
            image: d.image.clone(),
            bundle: d.bundle.clone(),
            detail: d
                .failed
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_default(),
        })
        .collect()
}
