//! `rackcast-agent run`: the device side of the workflow, its session
//! with the appliance. Loader mode reports the inventory and fetches the
//! bundle (`loader`), then execs the bundle's agent, which runs the plan's
//! steps (`plan`), receives the image (`image`), and reports each step.
//!
//! Owns: the connection to the appliance (reconnect with backoff, resume
//! where the device stands), one command at a time (a newer command
//! replaces the one in progress), results kept until the appliance acks
//! them. Must not: decide the order of steps (the appliance does) or run
//! one itself (`plan::execute` does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use rackcast_core::backoff::Backoff;
use rackcast_core::io::conn::{map_io, Conn, Frame};
use rackcast_core::model::{AgentMode, Inventory, OpRecord, Outcome, StepData, Work};
use rackcast_core::signing::TrustedKey;
use rackcast_core::wire::device::{
    AgentMsg, ApplianceMsg, CREDENTIAL_LEN, DEVICE_PROTOCOL, MAX_FRAME,
};

use crate::plan::{execute, Ctx};

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

pub(crate) type Request = (AgentMsg, oneshot::Sender<ApplianceMsg>);

pub(crate) struct Report {
    pub(crate) cmd_id: u64,
    pub(crate) outcome: Outcome,
    pub(crate) data: StepData,
    pub(crate) ops: Vec<OpRecord>,
    /// Exec this after the appliance acked the report (new bundle agent).
    pub(crate) then_exec: Option<PathBuf>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let mut inventory = match &args.hardware {
        Some(p) => crate::inventory::from_file(p)?,
        None => crate::inventory::probe(),
    };
    if !args.disks.is_empty() {
        let named = crate::inventory::disks_from_paths(&args.disks)?;
        inventory.disks = crate::inventory::keep_identity(named, &inventory.disks);
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
    // Handed over by the loader that exec'd us (same boot); otherwise the
    // appliance issues one at this boot's first contact.
    let mut credential = take_inherited_credential();
    let mut args = args;
    let mut pending: Option<Report> = None;
    let mut current: Option<(u64, tokio::task::JoinHandle<Report>)> = None;
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<Request>();
    let mut finished = false;
    if args.trust_key.is_none() {
        tracing::warn!(
            "no appliance key to trust (--trust-key / rackcast.key=): the first appliance key seen is trusted for this run"
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
            credential,
        };
        let w = link.connect(&args, hello).await?;
        let (conn, id, trusted) = (w.conn, w.device, w.trusted);
        if let Some(c) = w.issued {
            tracing::info!(device = %id, boot = w.boot, "credential issued for this boot");
            credential = Some(c);
        }
        let Some(cred) = credential else {
            bail!("the appliance issued no credential and we hold none");
        };
        if args.trust_key.is_none() {
            // Trust on first use: every later connection (and the bundle's
            // agent) must meet this same key.
            tracing::warn!(key = %trusted.fingerprint(), "trusting the appliance key seen first");
            args.trust_key = Some(trusted.fingerprint());
        }
        tracing::info!(device = %id, boot = w.boot, key = %trusted.fingerprint(), "connected to the appliance");
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
            boot: w.boot,
            credential: cred,
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
                                    return exec_agent(&bin, &args, &id, &cred);
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
    /// Connect over TLS (the appliance proves the trusted key), say
    /// `hello` and take the appliance's `Welcome`. Retries with backoff;
    /// gives up after `--give-up` unreachable or untrusted.
    async fn connect(&mut self, args: &RunArgs, hello: AgentMsg) -> Result<Welcomed> {
        let tls = rackcast_core::io::tls::client_config(args.trust_key.as_deref())?;
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
            let (stream, trusted) = match rackcast_core::io::tls::connect(&tls, stream).await {
                Ok(s) => match rackcast_core::io::tls::peer_key(&s)
                    .map(|k| TrustedKey::check(&k, &rackcast_core::signing::fingerprint(&k)))
                {
                    Some(Ok(t)) => (s, t),
                    _ => bail!("the appliance's certificate holds no Ed25519 key"),
                },
                Err(e) => {
                    // Not our appliance (or not yet: another host on its
                    // address). Keep trying, never follow it.
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
            };
            let mut conn = Conn::new(stream, MAX_FRAME);
            conn.send(&hello).await?;
            let w = match conn.recv::<ApplianceMsg>(Duration::from_secs(30)).await {
                Ok(ApplianceMsg::Welcome {
                    device_id,
                    boot,
                    credential,
                    ..
                }) => (device_id, boot, credential),
                Ok(ApplianceMsg::Error { message }) => bail!("appliance refused us: {message}"),
                Ok(other) => bail!("expected Welcome, got {other:?}"),
                Err(e) => {
                    tracing::warn!(error = %e, "handshake failed; reconnecting");
                    tokio::time::sleep(self.backoff.current()).await;
                    continue;
                }
            };
            self.refused_since = None;
            return Ok(Welcomed {
                conn,
                device: w.0,
                boot: w.1,
                issued: w.2,
                trusted,
            });
        }
    }
}

/// An admitted connection.
struct Welcomed {
    conn: Conn,
    device: String,
    boot: u64,
    /// A credential issued now (a new boot's first contact).
    issued: Option<[u8; CREDENTIAL_LEN]>,
    /// The key the appliance proved in the handshake.
    trusted: TrustedKey,
}

/// The environment variable a loader hands its boot's credential to the
/// bundle's agent in (hex). Only the exec'd process gets it; it is
/// removed from our environment once read.
const CREDENTIAL_ENV: &str = "RACKCAST_CREDENTIAL";

fn take_inherited_credential() -> Option<[u8; CREDENTIAL_LEN]> {
    let v = std::env::var(CREDENTIAL_ENV).ok()?;
    std::env::remove_var(CREDENTIAL_ENV);
    let mut out = [0u8; CREDENTIAL_LEN];
    if v.len() != CREDENTIAL_LEN * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(v.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
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

/// Replace this process with the bundle's agent (same boot: it gets the
/// credential and the key this connection proved).
fn exec_agent(bin: &Path, args: &RunArgs, device: &str, cred: &[u8; CREDENTIAL_LEN]) -> Result<()> {
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
    c.env(
        CREDENTIAL_ENV,
        blake3::Hash::from_bytes(*cred).to_hex().as_str(),
    );
    let err = c.exec();
    Err(anyhow!("exec {}: {err}", bin.display()))
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
