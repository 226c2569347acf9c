//! Process bootstrap of `rackcast serve`: the state-dir lock, the store,
//! images, signing key and metrics recorder, the controller thread, the
//! boot services, the agent listener, the REST API, the tick, readiness
//! and the watchdog (`service`), SIGHUP reload, and shutdown on
//! SIGINT/SIGTERM.
//!
//! Owns: start-up order (every listener bound before READY=1) and the
//! tasks' handles. Must not: handle an input (the controller loop does).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rackcast_core::waves::{Policy, WaveScheduler};
use rackcast_core::workflow::{Millis, WorkflowConfig};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::builder::Builder;
use super::images::load_images;
use super::{agents, api, service, Assigned, Controller, Input, Progress, Shared};
use crate::config::Config;

/// Run the appliance until SIGINT/SIGTERM; SIGHUP reads `path` again.
pub async fn serve(cfg: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let fds = rackcast_core::io::raise_fd_limit();
    tracing::info!(open_files = fds, "file descriptor limit");
    let cfg = Arc::new(cfg);
    cfg.ensure_state_dir()?;
    // One appliance per state dir: a second `serve` (a unit started twice,
    // a forgotten foreground run) would recover and drive the same devices.
    let _lock = lock_state_dir(&cfg.appliance.state_dir)?;
    let service_ip = cfg.appliance.control_listen.ip();
    if cfg.appliance.standby && !wait_for_address(service_ip).await {
        return Ok(());
    }
    // The store's client blocks (PostgreSQL's runs its own runtime): open
    // it off the async workers.
    let loc = cfg.store_location();
    let shared_record = matches!(loc, crate::store::StoreLocation::Postgres(_));
    tracing::info!(store = %loc, "fleet record");
    let (mut store, images, manifests) = {
        let (at, cfg) = (loc.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || {
            let mut store = crate::store::open(&at)
                .with_context(|| format!("opening the fleet record {at}"))?;
            let (images, manifests) = load_images(&cfg, store.as_mut())?;
            anyhow::Ok((store, images, manifests))
        })
        .await??
    };
    let builder = Arc::new(Builder::new(&cfg).map_err(anyhow::Error::msg)?);
    let signer = Arc::new(rackcast_core::signing::BundleSigner::load_or_create(
        &cfg.signing_key_path(),
    )?);
    tracing::info!(fingerprint = %signer.fingerprint(), "appliance key (bundle signatures, control-plane TLS)");
    let control_tls = super::tls::control_config(&signer)?;
    let enroll = Arc::new(crate::enroll::Enrollment::from_config(&cfg)?);
    tracing::info!(policy = ?cfg.enroll.policy, known = enroll.known(), "enrollment");
    let bmcs = Arc::new(crate::bmc::Registry::load(&cfg, &enroll)?);
    tracing::info!(machines = bmcs.len(), "BMC registry");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    rackcast_core::io::metrics::register();
    let (inbox, rx) = mpsc::unbounded_channel();
    // An empty view until the first tick: a watcher connecting in the
    // first half second gets something it can read.
    let empty = super::views::LiveView {
        devices: Vec::new(),
        waves: Vec::new(),
        bringup: None,
    };
    let (live_tx, live_rx) =
        tokio::sync::watch::channel(Arc::new(serde_json::to_string(&empty).unwrap_or_default()));
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
        control_tls: control_tls.clone(),
        enroll: enroll.clone(),
        bmcs,
        boots: tokio::sync::broadcast::channel(4096).0,
        bringup: Default::default(),
        live: live_rx,
        readers: crate::store::Readers::new(loc),
        agent_caps: crate::limits::Caps::new(
            cfg.appliance.max_agent_connections,
            agents::MAX_PER_SOURCE,
        ),
    };
    let wf = WorkflowConfig {
        step_timeout_ms: cfg.workflow.step_timeout.as_millis() as Millis,
        imaging_timeout_ms: cfg.workflow.imaging_timeout.as_millis() as Millis,
        max_attempts: cfg.workflow.max_attempts,
        retry_backoff_ms: cfg.workflow.retry_backoff.as_millis() as Millis,
    };
    // On a shared record every device commit takes or renews its lease:
    // one appliance at a time drives a device.
    if shared_record {
        store.set_lease_holder(
            &cfg.appliance_id(),
            cfg.appliance.lease_ttl.as_millis() as Millis,
        );
    }
    let mut ctl = Controller {
        boots: shared.boots.clone(),
        live: live_tx,
        live_rates: HashMap::new(),
        bringup: shared.bringup.clone(),
        sched: WaveScheduler::new(Policy {
            min_members: cfg.waves.min_members,
            start_after_ms: cfg.waves.start_after.as_millis() as Millis,
            total_rate: cfg.dataplane.total_rate,
        }),
        cfg: cfg.clone(),
        wf,
        store,
        devices: HashMap::new(),
        conns: HashMap::new(),
        chunks: HashMap::new(),
        stalled: HashMap::new(),
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
        control_tls,
        enroll: enroll.clone(),
        last_prune: 0,
        leases: super::Leases {
            shared: shared_record,
            me: cfg.appliance_id(),
            ttl_ms: cfg.appliance.lease_ttl.as_millis() as Millis,
            held: Default::default(),
            last_renew: 0,
        },
    };
    // The controller thread owns the store from here: it recovers the
    // fleet record (the store's client blocks, so never on a tokio
    // worker), says how many devices it knows, then runs.
    let installed = ctl.installed.clone();
    let (recovered_tx, recovered) = oneshot::channel();
    let ctl_thread = std::thread::Builder::new()
        .name("rc-controller".into())
        .spawn(move || {
            let r = ctl.recover().map(|()| ctl.devices.len());
            let ok = r.is_ok();
            let _ = recovered_tx.send(r);
            if ok {
                ctl.run(rx);
            }
        })?;
    let known = recovered
        .await
        .map_err(|_| anyhow::anyhow!("the controller thread ended during recovery"))??;
    // Every listener is bound before the appliance says it is ready: a
    // port in use stops the start with the reason.
    if let Some(t) = cfg.boot.tftp.clone() {
        let limits = rackcast_core::boot::tftp::Limits {
            max_blksize: t.max_blksize.clamp(512, 65464),
            max_window: t.max_window.max(1),
            ..Default::default()
        };
        let iface = t.iface.clone();
        let tftp = crate::boot::tftp_server::bind_tftp(t.root, t.iface, limits)
            .with_context(|| format!("TFTP on {iface} (port 69)"))?;
        tokio::spawn(tftp);
    }
    {
        let inbox2 = inbox.clone();
        let trigger: crate::boot::server::BootTrigger = Box::new(move |mac, how| {
            let _ = inbox2.send(Input::BootSeen { mac, how });
        });
        if let Some(dhcp) =
            crate::boot::server::bind_dhcp(cfg.clone(), installed, enroll.clone(), trigger)
                .context("DHCP (port 67)")?
        {
            tokio::spawn(dhcp);
        }
    }
    let control = rackcast_core::io::limits::listen(cfg.appliance.control_listen)
        .with_context(|| format!("control_listen {}", cfg.appliance.control_listen))?;
    tracing::info!(addr = %cfg.appliance.control_listen, "control plane listening");
    tokio::spawn(agents::accept_loop(control, shared.clone()));
    if let Some(addr) = cfg.appliance.api_listen {
        let l = rackcast_core::io::limits::listen(addr)
            .with_context(|| format!("api_listen {addr}"))?;
        tracing::info!(%addr, "provisioning HTTP (iPXE scripts, loader files) listening");
        tokio::spawn(api::serve_boot(l, shared.clone()));
    }
    if let Some(addr) = cfg.appliance.operator_listen {
        super::tls::ensure_certificate(&cfg)?;
        let tls = super::tls::server_config(&cfg)?;
        let l = rackcast_core::io::limits::listen(addr)
            .with_context(|| format!("operator_listen {addr}"))?;
        let l = super::tls::TlsListener::spawn(l, tls)?;
        tracing::info!(%addr, "operator API and /metrics listening (HTTPS, bearer tokens)");
        tokio::spawn(api::serve_operator(l, shared.clone()));
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    service::spawn_watchdog(inbox.clone());
    service::ready(known);
    tracing::info!(devices = known, "appliance ready");
    let mut address_check = tokio::time::interval(Duration::from_millis(500));
    let mut lost_address = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = address_check.tick(), if cfg.appliance.standby => {
                if !address_is_local(service_ip) {
                    // The pair's failover gave the address to the other
                    // appliance: two may not serve one rack. The leases
                    // are released on the way out, so it takes over now.
                    tracing::error!(address = %service_ip, "the service address left this host; stopping (the other appliance of the pair serves)");
                    lost_address = true;
                    break;
                }
            }
            _ = hup.recv() => {
                service::reloading();
                match Config::load(&path) {
                    // A config that does not load changes nothing: the
                    // appliance goes on with the one it has.
                    Ok(new) => {
                        // READY=1 only once the controller has it in effect.
                        let (applied, done) = tokio::sync::oneshot::channel();
                        let _ = inbox.send(Input::Reload(Box::new(new), applied));
                        match tokio::time::timeout(Duration::from_secs(30), done).await {
                            Ok(Ok(())) => service::reloaded("serving; config reloaded"),
                            _ => {
                                tracing::error!("the controller did not apply the reloaded config within 30 s");
                                service::reloaded("serving; config reload not confirmed, see the log");
                            }
                        }
                    }
                    Err(e) => {
                        metrics::counter!("rackcast_config_reloads_total", "result" => "refused").increment(1);
                        tracing::error!(error = %e, "config reload (SIGHUP) refused; the running config stays");
                        service::reloaded("serving; config reload refused, see the log");
                    }
                }
            }
        }
    }
    service::stopping();
    tracing::info!("shutting down");
    let _ = inbox.send(Input::Shutdown);
    let _ = tokio::task::spawn_blocking(move || ctl_thread.join()).await;
    if lost_address {
        anyhow::bail!("the service address {service_ip} left this host");
    }
    Ok(())
}

/// Whether `ip` is an address of this host now (a socket can bind it).
fn address_is_local(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Standby: wait until the service address (moved by the pair's
/// keepalived) is on this host before binding or recovering anything.
/// `false` when told to stop while waiting.
async fn wait_for_address(ip: std::net::IpAddr) -> bool {
    if address_is_local(ip) {
        tracing::info!(address = %ip, "standby: the service address is here; serving");
        return true;
    }
    tracing::info!(address = %ip, "standby: waiting for the service address to come to this host");
    service::standby(ip);
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return false;
    };
    let mut iv = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return false,
            _ = term.recv() => return false,
            _ = iv.tick() => {
                service::alive();
                if address_is_local(ip) {
                    tracing::info!(address = %ip, "standby: the service address came to this host; taking over");
                    return true;
                }
            }
        }
    }
}

/// An exclusive `flock` on `<state_dir>/serve.lock`, held while the
/// returned file is open; the holder's pid is written in it for the
/// message a second appliance gets.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("serve.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        anyhow::bail!(
            "another rackcast serve (pid {}) holds state_dir {}: one appliance per state dir",
            holder.trim(),
            dir.display()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}
