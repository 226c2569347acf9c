//! The service manager's side of `rackcast serve` (systemd `Type=notify`,
//! see `tools/deb/rackcast.service`): readiness once every listener is
//! bound, `RELOADING=1` .. `READY=1` around a SIGHUP, `STOPPING=1` at
//! shutdown, and the watchdog.
//!
//! The watchdog is fed only when the controller thread answers a
//! heartbeat through its inbox, so a wedged controller (the part that
//! drives every device and wave) gets the appliance restarted, not just a
//! stuck runtime. Without `NOTIFY_SOCKET` every call here does nothing.
//!
//! Owns: the notify messages and the watchdog task. Must not: decide
//! anything about devices or waves.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};

use super::Input;

/// A notify datagram that cannot be sent is logged, never fatal: the
/// appliance runs the same with or without a service manager.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "service manager notification not sent");
    }
}

/// Every listener is bound and the fleet record is loaded.
pub fn ready(devices: usize) {
    let status = format!("serving; {devices} devices in the fleet record");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A standby appliance is up and waits for the service address: the
/// unit is started (its pair's failover is what makes it serve).
pub fn standby(addr: std::net::IpAddr) {
    let status = format!("standby: waiting for {addr} to come to this host");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Feed the watchdog while there is no controller to ask (standby).
pub fn alive() {
    if sd_notify::watchdog_enabled().is_some() {
        send(&[NotifyState::Watchdog]);
    }
}

/// A SIGHUP arrived: the config is being read again.
pub fn reloading() {
    // MONOTONIC_USEC lets a newer systemd (Type=notify-reload) tie the
    // reload to this signal; older ones ignore it.
    match NotifyState::monotonic_usec_now() {
        Ok(t) => send(&[NotifyState::Reloading, t]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over, applied or refused (`status` says which).
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// With `WatchdogSec=` set (`WATCHDOG_USEC`), ask the controller for a
/// heartbeat three times per period and feed the watchdog on each answer.
pub fn spawn_watchdog(inbox: mpsc::UnboundedSender<Input>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 3).max(Duration::from_millis(100));
    tracing::info!(period_ms = period.as_millis() as u64, "service watchdog on");
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let (tx, rx) = oneshot::channel();
            if inbox.send(Input::Heartbeat(tx)).is_err() {
                break;
            }
            match tokio::time::timeout(every, rx).await {
                Ok(Ok(())) => send(&[NotifyState::Watchdog]),
                Ok(Err(_)) => break,
                Err(_) => tracing::error!(
                    waited_ms = every.as_millis() as u64,
                    "controller did not answer its heartbeat: watchdog not fed"
                ),
            }
        }
    });
}
