//! The bringup driver: runs [`rackcast_core::bringup`] for the machines
//! an operator named, calling their BMCs and feeding it the boots the
//! controller sees.
//!
//! Owns: the task of one bringup (one at a time), its BMC calls (each a
//! row of the device's log, through the controller), the missed-boot rows
//! and counter, and the status the API shows. Must not: decide pace,
//! deadlines or retries (the core does) or change device records itself.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use rackcast_core::bringup::{Action, Bringup, Config, Machine};
use rackcast_core::workflow::Millis;

use crate::bmc::{Entry, PowerOp};
use crate::controller::{Input, Shared};
use crate::store::now_ms;

/// What `GET /api/bringup` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub started_at: Millis,
    pub finished: bool,
    /// Machines left out: already past their first boot (a bringup never
    /// power-cycles a running machine), with their state.
    pub skipped: Vec<(String, String)>,
    pub machines: Vec<Machine>,
}

/// Start a bringup of `entries` (in rack order) unless one is running.
pub fn start(
    s: &Shared,
    entries: Vec<Entry>,
    skipped: Vec<(String, String)>,
) -> Result<Status, String> {
    let now = now_ms();
    let cfg = Config {
        per_second: s.cfg.bmc.power_on_per_second,
        boot_timeout_ms: s.cfg.bmc.boot_timeout.as_millis() as Millis,
        retries: s.cfg.bmc.retries,
    };
    let core = Bringup::new(entries.iter().map(|e| e.device.clone()).collect(), cfg, now);
    let status = Status {
        started_at: now,
        finished: core.finished(),
        skipped,
        machines: core.machines().to_vec(),
    };
    {
        let mut slot = s
            .bringup
            .lock()
            .map_err(|_| "bringup state poisoned".to_string())?;
        if slot.as_ref().is_some_and(|st| !st.finished) {
            return Err("a bringup is running: wait for it (GET /api/bringup)".into());
        }
        *slot = Some(status.clone());
    }
    // Subscribed before the first power-on: no boot is missed.
    let boots = s.boots.subscribe();
    tokio::spawn(run(s.clone(), core, entries, boots));
    Ok(status)
}

fn publish(s: &Shared, core: &Bringup) {
    if let Ok(mut slot) = s.bringup.lock() {
        if let Some(st) = slot.as_mut() {
            st.machines = core.machines().to_vec();
            st.finished = core.finished();
        }
    }
}

fn log(s: &Shared, e: &Entry, ok: bool, detail: String, took: Duration) {
    let _ = s.inbox.send(Input::Bmc {
        device: e.device.clone(),
        mac: e.mac.clone(),
        create: true,
        ok,
        detail,
        duration_ms: took.as_millis() as u64,
    });
}

async fn run(
    s: Shared,
    mut core: Bringup,
    entries: Vec<Entry>,
    mut boots: broadcast::Receiver<String>,
) {
    let by_id: HashMap<String, Entry> =
        entries.into_iter().map(|e| (e.device.clone(), e)).collect();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Result<(), String>)>();
    let timeout = s.cfg.bmc.boot_timeout;
    tracing::info!(machines = by_id.len(), "bringup started");
    loop {
        for a in core.on_tick(now_ms()) {
            match &a {
                Action::PowerOn(d) | Action::PowerCycle(d) => {
                    let op = if matches!(a, Action::PowerOn(_)) {
                        PowerOp::On
                    } else {
                        // Off and on again (on, if it was off).
                        PowerOp::Cycle
                    };
                    let Some(e) = by_id.get(d.as_str()).cloned() else {
                        continue;
                    };
                    let (s, done) = (s.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let t = std::time::Instant::now();
                        let r = crate::bmc::call(&e, op, &s.cfg.bmc).await;
                        let took = t.elapsed();
                        let what = format!("bringup: power {} via {}", op.as_str(), e.address);
                        match &r {
                            Ok(done) => log(&s, &e, true, format!("{what}: {}", done.detail), took),
                            Err(f) => log(&s, &e, false, format!("{what}: {}", f.message), took),
                        }
                        let _ = done.send((e.device.clone(), r.map(|_| ()).map_err(|f| f.message)));
                    });
                }
                Action::NotBooted {
                    device,
                    attempt,
                    will_retry,
                } => {
                    metrics::counter!("rackcast_power_on_not_booted_total").increment(1);
                    tracing::warn!(%device, attempt = *attempt, will_retry = *will_retry, "no network boot after power-on");
                    if let Some(e) = by_id.get(device.as_str()) {
                        log(
                            &s,
                            e,
                            false,
                            format!(
                                "bringup: no network boot within {} after power-on (attempt {attempt}){}",
                                humantime::format_duration(timeout),
                                if *will_retry { "; power-cycling it again" } else { "; given up" }
                            ),
                            Duration::ZERO,
                        );
                    }
                }
            }
        }
        publish(&s, &core);
        if core.finished() {
            break;
        }
        let now = now_ms();
        let wait = core
            .next_wakeup()
            .map(|t| (t - now).clamp(0, 1000))
            .unwrap_or(1000);
        tokio::select! {
            b = boots.recv() => match b {
                Ok(dev) => core.booted(&dev, now_ms()),
                // Boots were missed under a flood of them: the machines'
                // deadlines still hold; a missed one is retried or reported.
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "bringup: boot notifications missed");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Some((dev, r)) = done_rx.recv() => core.power_done(&dev, r, now_ms()),
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
        }
    }
    let booted = core
        .machines()
        .iter()
        .filter(|m| matches!(m.phase, rackcast_core::bringup::Phase::Booted { .. }))
        .count();
    tracing::info!(booted, machines = core.machines().len(), "bringup finished");
}
