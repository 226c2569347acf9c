//! `rackcast-agent run`: the device side of the workflow. Loader mode
//! reports the inventory and fetches the bundle, verifies every hash, then
//! execs the bundle's agent, which runs the plan's steps, requests and
//! receives the image, and reports each step.
//!
//! Owns: the connection to the appliance (reconnect with backoff, resume
//! where the device stands), one command at a time (a newer command
//! replaces the one in progress), results kept until the appliance acks
//! them. Must not: decide the order of steps (the appliance does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use rackcast_core::backoff::Backoff;
use rackcast_core::io::conn::{map_io, Conn, Frame};
use rackcast_core::io::receive::{run_receive, Progress, ReceiveOptions};
use rackcast_core::model::{
    AgentMode, BlobRef, Bundle, Command, Inventory, OpRecord, Outcome, Plan, Program, Step,
    StepData, Work,
};
use rackcast_core::signing::TrustedKey;
use rackcast_core::wire::device::{AgentMsg, ApplianceMsg, DEVICE_PROTOCOL, MAX_FRAME};

/// Output kept per program (the tail: where the error usually is).
const MAX_OUTPUT: usize = 8 << 10;

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub server: SocketAddr,
    pub hardware: Option<PathBuf>,
    pub disks: Vec<PathBuf>,
    pub work_dir: PathBuf,
    pub device_id: Option<String>,
    pub bundle_dir: Option<PathBuf>,
    pub os_present: bool,
    pub iface: Option<String>,
    /// Give up when the appliance cannot be reached for this long.
    pub give_up: Duration,
    /// Fingerprint of the appliance's bundle-signing key (`--trust-key`
    /// or `rackcast.key=` on the kernel command line). With it, only an
    /// appliance holding that key is followed and only bundles it signed
    /// are run.
    pub trust_key: Option<String>,
}

type Request = (AgentMsg, oneshot::Sender<ApplianceMsg>);

struct Report {
    cmd_id: u64,
    outcome: Outcome,
    data: StepData,
    ops: Vec<OpRecord>,
    /// Exec this after the appliance acked the report (new bundle agent).
    then_exec: Option<PathBuf>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let mut inventory = match &args.hardware {
        Some(p) => crate::inventory::from_file(p)?,
        None => crate::inventory::probe(),
    };
    if !args.disks.is_empty() {
        inventory.disks = crate::inventory::disks_from_paths(&args.disks)?;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mac = boot_mac(&inventory, &cmdline)?;
    let mode = match &args.bundle_dir {
        Some(dir) => AgentMode::Agent {
            bundle: read_bundle_hash(dir)?,
        },
        None => AgentMode::Loader {
            os_present: args.os_present,
        },
    };
    let mut device_id = args.device_id.clone();
    let mut pending: Option<Report> = None;
    let mut current: Option<(u64, tokio::task::JoinHandle<Report>)> = None;
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<Request>();
    let mut finished = false;
    if args.trust_key.is_none() {
        tracing::warn!(
            "no appliance key to trust (--trust-key / rackcast.key=): bundles are checked by hash only"
        );
    }
    let mut link = Link {
        dialer: rackcast_core::io::conn::Dialer::new(args.server),
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 200),
        refused_since: None,
    };
    loop {
        let hello = AgentMsg::Hello {
            protocol: DEVICE_PROTOCOL,
            mac: mac.clone(),
            device_id: device_id.clone(),
            mode: mode.clone(),
        };
        let (conn, id, trusted) = link.connect(&args, hello).await?;
        tracing::info!(device = %id, trusted = trusted.is_some(), "connected to the appliance");
        device_id = Some(id.clone());
        let (mut sink, mut frames) = conn.split();
        if let Some(r) = &pending {
            let _ = sink.send(report_frame(r)?).await;
        }
        let mut waiting: HashMap<String, oneshot::Sender<ApplianceMsg>> = HashMap::new();
        let mut ping = tokio::time::interval(Duration::from_secs(10));
        let ctx = Ctx {
            device: id.clone(),
            inventory: inventory.clone(),
            work_dir: args.work_dir.clone(),
            bundle_dir: args.bundle_dir.clone(),
            iface: args.iface.clone(),
            requests: req_tx.clone(),
            trusted,
        };
        let lost: Result<()> = loop {
            tokio::select! {
                // Pings every 10 s get Pongs: silence for 35 s is a dead
                // path (no FIN), not a quiet appliance.
                frame = tokio::time::timeout(Duration::from_secs(35), frames.next()) => {
                    let Ok(frame) = frame else {
                        break Err(anyhow!("no message from the appliance for 35 s"));
                    };
                    let msg = match frame {
                        None => break Err(anyhow!("appliance closed the connection")),
                        Some(Err(e)) => break Err(map_io(e, MAX_FRAME).into()),
                        Some(Ok(f)) => match ApplianceMsg::decode(&f) {
                            Ok(m) => m,
                            Err(e) => break Err(e.into()),
                        },
                    };
                    match msg {
                        ApplianceMsg::Run(cmd) => {
                            if pending.as_ref().is_some_and(|p| p.cmd_id == cmd.cmd_id) {
                                // Done already; the report is on its way.
                                if let Some(r) = &pending {
                                    let _ = sink.send(report_frame(r)?).await;
                                }
                                continue;
                            }
                            if current.as_ref().is_some_and(|(c, _)| *c == cmd.cmd_id) {
                                continue;
                            }
                            if args.bundle_dir.is_none()
                                && !matches!(cmd.work, Work::Inventory | Work::FetchBundle { .. })
                            {
                                // Plan steps are for the bundle's agent; the
                                // appliance repeats this one when it connects.
                                tracing::debug!(cmd = cmd.cmd_id, step = %cmd.step, "plan step left to the bundle's agent");
                                continue;
                            }
                            if let Some((old, h)) = current.take() {
                                tracing::warn!(old, new = cmd.cmd_id, "newer command replaces the one in progress");
                                h.abort();
                            }
                            tracing::info!(cmd = cmd.cmd_id, step = %cmd.step, "running step");
                            let c = ctx.clone();
                            let id = cmd.cmd_id;
                            current = Some((id, tokio::spawn(async move { execute(c, cmd).await })));
                        }
                        ApplianceMsg::Ack { cmd_id } => {
                            if pending.as_ref().is_some_and(|p| p.cmd_id == cmd_id) {
                                let r = pending.take();
                                if let Some(bin) = r.and_then(|r| r.then_exec) {
                                    let _ = sink.close().await;
                                    return exec_agent(&bin, &args, &id);
                                }
                                if finished && current.is_none() {
                                    let _ = sink.close().await;
                                    return Ok(());
                                }
                            }
                        }
                        ApplianceMsg::Bundle { ref hash, .. } | ApplianceMsg::BlobChunk { ref hash, .. } => {
                            let key = match &msg {
                                ApplianceMsg::Bundle { .. } => format!("bundle:{hash}"),
                                ApplianceMsg::BlobChunk { offset, .. } => format!("blob:{hash}:{offset}"),
                                _ => String::new(),
                            };
                            if let Some(tx) = waiting.remove(&key) {
                                let _ = tx.send(msg);
                            }
                        }
                        ApplianceMsg::Error { message } => {
                            // Fails whatever download waits; the step
                            // reports it and the appliance decides.
                            waiting.clear();
                            break Err(anyhow!("appliance: {message}"));
                        }
                        ApplianceMsg::Finished { detail } => {
                            tracing::info!(%detail, "appliance says the device is done");
                            if pending.is_none() && current.is_none() {
                                let _ = sink.close().await;
                                return Ok(());
                            }
                            // The last report's Ack is still to come.
                            finished = true;
                        }
                        ApplianceMsg::Pong | ApplianceMsg::Welcome { .. } => {}
                    }
                }
                Some((req, reply)) = req_rx.recv() => {
                    let key = match &req {
                        AgentMsg::GetBundle { hash } => Some(format!("bundle:{hash}")),
                        AgentMsg::GetBlob { hash, offset } => Some(format!("blob:{hash}:{offset}")),
                        AgentMsg::Progress { .. } => None,
                        _ => continue,
                    };
                    if let Some(key) = key {
                        waiting.insert(key, reply);
                    }
                    if sink.send(bytes::Bytes::from(req.encode()?)).await.is_err() {
                        break Err(anyhow!("connection lost"));
                    }
                }
                done = async {
                    match &mut current {
                        Some((_, h)) => h.await,
                        None => std::future::pending().await,
                    }
                } => {
                    current = None;
                    match done {
                        Ok(r) => {
                            tracing::info!(cmd = r.cmd_id, outcome = ?r.outcome, "step finished");
                            let f = report_frame(&r)?;
                            pending = Some(r);
                            if sink.send(f).await.is_err() {
                                break Err(anyhow!("connection lost"));
                            }
                        }
                        Err(e) if e.is_cancelled() => {}
                        Err(e) => tracing::error!(error = %e, "step task crashed"),
                    }
                }
                _ = ping.tick() => {
                    if sink.send(bytes::Bytes::from(AgentMsg::Ping.encode()?)).await.is_err() {
                        break Err(anyhow!("connection lost"));
                    }
                }
            }
        };
        if let Err(e) = lost {
            tracing::warn!(error = %e, "control connection lost; reconnecting");
        }
        tokio::time::sleep(link.backoff.current()).await;
    }
}

/// The agent's way to the appliance: connection attempts, the delays
/// between them, and how long the appliance has been unreachable or
/// untrusted.
struct Link {
    dialer: rackcast_core::io::conn::Dialer,
    backoff: Backoff,
    /// A connection to a host without the trusted key is not reaching
    /// the appliance: counted apart, as connects succeed meanwhile.
    refused_since: Option<Instant>,
}

impl Link {
    /// Connect, say `hello` and take the appliance's `Welcome`: its id
    /// for this device and, when a key is to be trusted, the checked key.
    /// Retries with backoff; gives up after `--give-up` unreachable or
    /// untrusted.
    async fn connect(
        &mut self,
        args: &RunArgs,
        hello: AgentMsg,
    ) -> Result<(Conn, String, Option<TrustedKey>)> {
        loop {
            let stream = match self.dialer.attempt().await {
                Ok(s) => s,
                Err(e) => {
                    let now = Instant::now();
                    if self.backoff.failing_for(now) >= args.give_up {
                        bail!(
                            "appliance {} unreachable for {:?}: {e}",
                            args.server,
                            args.give_up
                        );
                    }
                    let wait = self.backoff.failed(now);
                    tracing::warn!(error = %e, retry_in = ?wait, "appliance unreachable");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            self.backoff.succeeded();
            let mut conn = Conn::new(stream, MAX_FRAME);
            conn.send(&hello).await?;
            let (id, trusted) = match conn.recv::<ApplianceMsg>(Duration::from_secs(30)).await {
                Ok(ApplianceMsg::Welcome {
                    device_id: id,
                    signer,
                    ..
                }) => match &args.trust_key {
                    None => (id, None),
                    Some(fp) => match TrustedKey::check(&signer, fp) {
                        Ok(k) => (id, Some(k)),
                        Err(e) => {
                            // Not our appliance (or not yet: another host on
                            // its address). Keep trying, never follow it.
                            let since = *self.refused_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= args.give_up {
                                bail!(
                                    "no trusted appliance at {} for {:?}: {e}",
                                    args.server,
                                    args.give_up
                                );
                            }
                            let wait = self.backoff.failed(Instant::now());
                            tracing::error!(error = %e, retry_in = ?wait, "refusing the appliance");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    },
                },
                Ok(ApplianceMsg::Error { message }) => bail!("appliance refused us: {message}"),
                Ok(other) => bail!("expected Welcome, got {other:?}"),
                Err(e) => {
                    tracing::warn!(error = %e, "handshake failed; reconnecting");
                    tokio::time::sleep(self.backoff.current()).await;
                    continue;
                }
            };
            self.refused_since = None;
            return Ok((conn, id, trusted));
        }
    }
}

fn report_frame(r: &Report) -> Result<bytes::Bytes> {
    let m = AgentMsg::Report {
        cmd_id: r.cmd_id,
        outcome: r.outcome.clone(),
        data: r.data.clone(),
        ops: r.ops.clone(),
    };
    Ok(bytes::Bytes::from(m.encode()?))
}

/// The boot interface's MAC: the one iPXE booted from when it put
/// `rackcast.mac=` on the kernel command line and this machine has that
/// NIC (a server with four ports must not be known by whichever one the
/// kernel listed first), else the first NIC with a real address.
fn boot_mac(inv: &Inventory, cmdline: &str) -> Result<String> {
    let real = |m: &String| rackcast_core::wire::device::valid_mac(m) && m != "00:00:00:00:00:00";
    let macs: Vec<String> = inv
        .nics
        .iter()
        .map(|n| n.mac.to_ascii_lowercase())
        .filter(real)
        .collect();
    let booted = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rackcast.mac="))
        .map(str::to_ascii_lowercase)
        .filter(|m| macs.contains(m));
    booted
        .or_else(|| macs.into_iter().next())
        .ok_or_else(|| anyhow!("no network interface with a MAC address in the inventory"))
}

fn read_bundle_hash(dir: &Path) -> Result<String> {
    let bytes = std::fs::read(dir.join("bundle.bin"))
        .with_context(|| format!("bundle in {}", dir.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

fn load_bundle(dir: &Path) -> Result<Bundle> {
    let bytes = std::fs::read(dir.join("bundle.bin"))
        .with_context(|| format!("bundle in {}", dir.display()))?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    Ok(Bundle::from_verified_bytes(&bytes, &hash)?)
}

/// Replace this process with the bundle's agent.
fn exec_agent(bin: &Path, args: &RunArgs, device: &str) -> Result<()> {
    let dir = bin.parent().unwrap_or(Path::new("."));
    tracing::info!(agent = %bin.display(), "starting the bundle's agent");
    let mut c = std::process::Command::new(bin);
    c.arg("run")
        .arg("--server")
        .arg(args.server.to_string())
        .arg("--work-dir")
        .arg(&args.work_dir)
        .arg("--device-id")
        .arg(device)
        .arg("--bundle-dir")
        .arg(dir);
    if let Some(h) = &args.hardware {
        c.arg("--hardware").arg(h);
    }
    for d in &args.disks {
        c.arg("--disk").arg(d);
    }
    if let Some(i) = &args.iface {
        c.arg("--iface").arg(i);
    }
    if let Some(k) = &args.trust_key {
        c.arg("--trust-key").arg(k);
    }
    let err = c.exec();
    Err(anyhow!("exec {}: {err}", bin.display()))
}

#[derive(Clone)]
struct Ctx {
    device: String,
    inventory: Inventory,
    work_dir: PathBuf,
    bundle_dir: Option<PathBuf>,
    iface: Option<String>,
    requests: mpsc::UnboundedSender<Request>,
    /// The appliance's key, when this device was told which to trust.
    trusted: Option<TrustedKey>,
}

impl Ctx {
    /// Send without waiting for an answer (progress of a command).
    fn tell(&self, msg: AgentMsg) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.requests.send((msg, tx));
    }

    async fn ask(&self, msg: AgentMsg) -> Result<ApplianceMsg> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((msg, tx))
            .map_err(|_| anyhow!("agent stopping"))?;
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .map_err(|_| anyhow!("no answer from the appliance in 60 s"))?
            .map_err(|_| anyhow!("connection lost during download"))
    }
}

async fn execute(ctx: Ctx, cmd: Command) -> Report {
    let mut ops = Vec::new();
    let mut then_exec = None;
    let r: Result<(String, StepData)> = match &cmd.work {
        Work::Inventory => Ok((
            format!(
                "{} {} serial {}, {} CPUs, {} disks, {} NICs",
                ctx.inventory.dmi.vendor,
                ctx.inventory.dmi.model,
                ctx.inventory.dmi.serial,
                ctx.inventory.cpu.count,
                ctx.inventory.disks.len(),
                ctx.inventory.nics.len()
            ),
            StepData::Inventory(Box::new(ctx.inventory.clone())),
        )),
        Work::FetchBundle { hash } => fetch_bundle(&ctx, hash, &mut ops).await.map(|bin| {
            then_exec = Some(bin);
            (format!("bundle {hash} verified"), StepData::None)
        }),
        Work::RunPlan => run_plan(&ctx, cmd.cmd_id, cmd.step, &mut ops)
            .await
            .map(|d| (d, StepData::None)),
        Work::RequestImage => plan_of(&ctx).map(|p| {
            (
                format!(
                    "requests image {} for {}",
                    p.image.name,
                    ctx.inventory.resolve_disk(&p.image.target)
                ),
                StepData::None,
            )
        }),
        Work::JoinWave(join) => receive_image(&ctx, join, &mut ops).await,
    };
    let (outcome, data) = match r {
        Ok((detail, data)) => (Outcome::Ok { detail }, data),
        Err(e) => {
            then_exec = None;
            (
                Outcome::Failed {
                    reason: format!("{e:#}"),
                },
                StepData::None,
            )
        }
    };
    Report {
        cmd_id: cmd.cmd_id,
        outcome,
        data,
        ops,
        then_exec,
    }
}

fn plan_of(ctx: &Ctx) -> Result<Plan> {
    let dir = ctx
        .bundle_dir
        .as_ref()
        .ok_or_else(|| anyhow!("no bundle: the loader cannot run plan steps"))?;
    Ok(load_bundle(dir)?.plan)
}

/// Download the bundle and its blobs, verify every hash, make it
/// runnable. Returns the agent binary to exec.
async fn fetch_bundle(ctx: &Ctx, hash: &str, ops: &mut Vec<OpRecord>) -> Result<PathBuf> {
    let t = Instant::now();
    let bytes = match ctx
        .ask(AgentMsg::GetBundle {
            hash: hash.to_string(),
        })
        .await?
    {
        ApplianceMsg::Bundle {
            bytes, signature, ..
        } => {
            if let Some(k) = &ctx.trusted {
                k.verify_bundle(hash, &signature)?;
            }
            bytes
        }
        other => bail!("expected the bundle, got {other:?}"),
    };
    let bundle = Bundle::from_verified_bytes(&bytes, hash)?;
    let dir = ctx.work_dir.join(format!("bundle-{hash}"));
    std::fs::create_dir_all(&dir)?;
    for blob in std::iter::once(&bundle.agent).chain(bundle.modules.iter().map(|m| &m.blob)) {
        fetch_blob(ctx, blob, &dir).await?;
    }
    std::fs::write(dir.join("bundle.bin"), &bytes)?;
    ops.push(OpRecord {
        op: "fetch-bundle".into(),
        ok: true,
        exit_code: None,
        duration_ms: t.elapsed().as_millis() as u64,
        detail: format!(
            "bundle {hash}: agent {} + {} modules, every BLAKE3 verified; {}",
            bundle.agent.hash,
            bundle.modules.len(),
            match &ctx.trusted {
                Some(k) => format!("signature verified with trusted key {}", k.fingerprint()),
                None => "no trusted key given: signature not checked".to_string(),
            }
        ),
    });
    for m in &bundle.modules {
        if let Some(load) = &m.load {
            let file = dir.join(&m.blob.name);
            let mut p = load.clone();
            for a in &mut p.argv {
                *a = a.replace("{file}", &file.display().to_string());
            }
            let op = run_program(ctx, &p, &HashMap::new()).await;
            let ok = op.ok;
            ops.push(op);
            if !ok {
                bail!("module {} failed to load", m.name);
            }
        }
    }
    Ok(dir.join(&bundle.agent.name))
}

async fn fetch_blob(ctx: &Ctx, blob: &BlobRef, dir: &Path) -> Result<()> {
    let path = dir.join(&blob.name);
    if blob.name.contains('/') || blob.name.starts_with('.') {
        bail!("blob name {:?} is not a plain file name", blob.name);
    }
    // Already here and intact (re-delivery after a reboot of the loader).
    if let Ok(data) = std::fs::read(&path) {
        if blake3::hash(&data).to_hex().as_str() == blob.hash {
            return Ok(());
        }
    }
    let mut h = blake3::Hasher::new();
    let mut out = Vec::with_capacity(blob.size as usize);
    while (out.len() as u64) < blob.size {
        let offset = out.len() as u64;
        match ctx
            .ask(AgentMsg::GetBlob {
                hash: blob.hash.clone(),
                offset,
            })
            .await?
        {
            ApplianceMsg::BlobChunk {
                data,
                total,
                offset: o,
                ..
            } if o == offset && total == blob.size && !data.is_empty() => {
                h.update(&data);
                out.extend_from_slice(&data);
            }
            other => bail!("blob {}: unexpected answer {other:?}", blob.hash),
        }
    }
    let got = h.finalize().to_hex().to_string();
    if got != blob.hash {
        bail!("blob {} hashes to {got}: refused", blob.name);
    }
    let tmp = dir.join(format!(".{}.tmp", blob.name));
    std::fs::write(&tmp, &out)?;
    if blob.executable {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

async fn run_plan(ctx: &Ctx, cmd_id: u64, step: Step, ops: &mut Vec<OpRecord>) -> Result<String> {
    let plan = plan_of(ctx)?;
    let mut env = HashMap::new();
    env.insert(
        "RC_IMAGE_TARGET".to_string(),
        ctx.inventory.resolve_disk(&plan.image.target),
    );
    let programs: Vec<Program> = match step {
        Step::BiosConfigured => {
            let b = plan
                .bios
                .as_ref()
                .ok_or_else(|| anyhow!("plan has no BIOS part"))?;
            if let Some(target) = &b.redfish {
                let settle = crate::bios::Settle {
                    timeout: Duration::from_secs(target.settle_timeout_s),
                    interval: Duration::from_secs(2),
                };
                let mut bmc = crate::redfish::RedfishBios::new(target.clone())?;
                // The reset may restart this very machine: what was done
                // before it goes to the appliance first.
                let mut flush =
                    |done: Vec<OpRecord>| ctx.tell(AgentMsg::Progress { cmd_id, ops: done });
                return Ok(crate::bios::configure(
                    &mut bmc,
                    &b.attributes,
                    settle,
                    ops,
                    &mut flush,
                )
                .await?);
            }
            for (k, v) in &b.attributes {
                env.insert(format!("RC_BIOS_{k}"), v.clone());
            }
            env.insert(
                "RC_BIOS_ATTRIBUTES".into(),
                b.attributes.keys().cloned().collect::<Vec<_>>().join(" "),
            );
            b.program.iter().cloned().collect()
        }
        Step::RaidConfigured => {
            let r = plan
                .raid
                .as_ref()
                .ok_or_else(|| anyhow!("plan has no RAID part"))?;
            if let Some(target) = &r.redfish {
                return crate::raid::configure_volume(r, target, plan.image.size, ops).await;
            }
            if r.program.is_none() {
                return crate::raid::configure(r, &ctx.inventory, plan.image.size, ops).await;
            }
            env.insert("RC_RAID_ARRAY".into(), r.array.clone());
            env.insert("RC_RAID_LEVEL".into(), r.level.clone());
            let members: Vec<String> = r
                .members
                .iter()
                .map(|m| ctx.inventory.resolve_disk(m))
                .collect();
            env.insert("RC_RAID_MEMBERS".into(), members.join(" "));
            r.program.iter().cloned().collect()
        }
        Step::ProgramsRun => plan.programs.clone(),
        Step::PostInstall => plan.post_install.clone(),
        Step::BootToDisk => plan.boot_to_disk.iter().cloned().collect(),
        other => bail!("step {other} has no programs"),
    };
    let mut names = Vec::new();
    for p in &programs {
        let op = run_program(ctx, p, &env).await;
        let ok = op.ok;
        let detail = op.detail.clone();
        ops.push(op);
        if !ok {
            bail!(
                "program {} failed: {}",
                p.name,
                detail.lines().last().unwrap_or("")
            );
        }
        names.push(p.name.clone());
    }
    Ok(format!("ran {}", names.join(", ")))
}

/// Run one program with its timeout; output (tail, bounded) and exit
/// code go to the event log.
async fn run_program(ctx: &Ctx, p: &Program, env: &HashMap<String, String>) -> OpRecord {
    let t = Instant::now();
    let Some((bin, rest)) = p.argv.split_first() else {
        return OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: 0,
            detail: "empty argv".into(),
        };
    };
    let mut c = tokio::process::Command::new(bin);
    c.args(rest)
        .envs(env)
        .envs(&p.env)
        .env("RC_DEVICE", &ctx.device)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let res = tokio::time::timeout(Duration::from_secs(p.timeout_s), c.output()).await;
    let ms = t.elapsed().as_millis() as u64;
    match res {
        Err(_) => OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: ms,
            detail: format!("timed out after {} s (killed)", p.timeout_s),
        },
        Ok(Err(e)) => OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: ms,
            detail: format!("cannot start {bin}: {e}"),
        },
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if text.len() > MAX_OUTPUT {
                let mut cut = text.len() - MAX_OUTPUT;
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                text = format!("[...{cut} bytes cut...]{}", &text[cut..]);
            }
            OpRecord {
                op: p.name.clone(),
                ok: out.status.success(),
                exit_code: out.status.code(),
                duration_ms: ms,
                detail: text.trim_end().to_string(),
            }
        }
    }
}

async fn receive_image(
    ctx: &Ctx,
    join: &rackcast_core::model::WaveJoin,
    ops: &mut Vec<OpRecord>,
) -> Result<(String, StepData)> {
    let plan = plan_of(ctx)?;
    if plan.image.hash != join.image_hash {
        bail!(
            "wave sends image {} ({}), the bundle plans {} ({})",
            join.image,
            join.image_hash,
            plan.image.name,
            plan.image.hash
        );
    }
    let state = ctx.work_dir.join(format!(
        "{}.rcresume",
        &join.image_hash[..16.min(join.image_hash.len())]
    ));
    let target = ctx.inventory.resolve_disk(&plan.image.target);
    let opts = ReceiveOptions {
        server: join.control,
        out: PathBuf::from(&target),
        iface: ctx.iface.clone(),
        name: Some(ctx.device.clone()),
        state: Some(state),
        connect_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        rcvbuf: 16 << 20,
    };
    let t = Instant::now();
    let progress = std::sync::Arc::new(Progress::default());
    let rep = run_receive(opts, progress)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    ops.push(OpRecord {
        op: "receive-image".into(),
        ok: rep.verified,
        exit_code: None,
        duration_ms: t.elapsed().as_millis() as u64,
        detail: format!(
            "wave {} -> {}: {} bytes, {} packets, {} resumed blocks, {} auth failures{}",
            join.wave_id,
            target,
            rep.image_bytes,
            rep.packets,
            rep.resumed_blocks,
            rep.auth_failures,
            rep.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    });
    if !rep.verified {
        bail!(
            "image not verified: {}",
            rep.reason.unwrap_or_else(|| "unknown".into())
        );
    }
    Ok((
        format!("image {} written to {target} and verified", join.image),
        StepData::ImageWritten {
            hash: rep.image_hash,
            bytes: rep.image_bytes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rackcast_core::model::Nic;

    fn inv(macs: &[&str]) -> Inventory {
        Inventory {
            nics: macs
                .iter()
                .map(|m| Nic {
                    mac: m.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn boot_mac_prefers_the_nic_ipxe_booted_from() {
        let i = inv(&[
            "00:00:00:00:00:00",
            "52:54:00:00:00:01",
            "52:54:00:00:00:02",
        ]);
        assert_eq!(boot_mac(&i, "quiet").unwrap(), "52:54:00:00:00:01");
        assert_eq!(
            boot_mac(&i, "console=ttyS0 rackcast.mac=52:54:00:00:00:02").unwrap(),
            "52:54:00:00:00:02"
        );
        // A MAC this machine does not have is not trusted.
        assert_eq!(
            boot_mac(&i, "rackcast.mac=52:54:00:00:00:09").unwrap(),
            "52:54:00:00:00:01"
        );
        assert!(boot_mac(&inv(&["00:00:00:00:00:00"]), "").is_err());
    }
}
