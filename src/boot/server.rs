//! The DHCP service's I/O driver: UDP sockets on port 67 (and 4011 in
//! proxy mode) bound to the provisioning interface, the [`DhcpServer`]
//! core, lease persistence, and the power-on trigger to the controller.
//!
//! Owns: sockets and their errors (a bad datagram is counted and dropped;
//! the service keeps serving). Must not: decide the answer (the core does)
//! or a device's state (the controller does).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use crate::config::{Config, DhcpSection};
use crate::store::{now_ms, StoreLocation};
use rackcast_core::boot::dhcp::{
    mac_string, BootChoice, BootFiles, Destination, DhcpAction, DhcpConfig, DhcpServer, Firmware,
    Mode, Pool,
};
use rackcast_core::wire::dhcp as dhcp_wire;

/// MACs of installed devices: they boot their disk.
pub type Installed = Arc<RwLock<HashSet<String>>>;

/// A boot request seen: (MAC, how it booted).
pub type BootTrigger = Box<dyn Fn(String, String) + Send + Sync>;

pub fn core_config(d: &DhcpSection, api: SocketAddr) -> DhcpConfig {
    let mode = match (d.mode.as_str(), d.pool_start, d.pool_end, d.netmask) {
        ("full", Some(start), Some(end), Some(netmask)) => Mode::Full(Pool {
            start,
            end,
            netmask,
            router: d.router,
            dns: d.dns.clone(),
            lease_secs: d.lease_time.as_secs().clamp(60, u64::from(u32::MAX)) as u32,
        }),
        _ => Mode::Proxy,
    };
    DhcpConfig {
        server_ip: d.server_ip,
        mode,
        boot: BootFiles {
            bios: d.bios_file.clone(),
            uefi_x64: d.uefi_x64_file.clone(),
            uefi_arm64: d.uefi_arm64_file.clone(),
            script_base: format!("http://{api}/boot"),
        },
        decline_hold_ms: 10 * 60_000,
        offer_hold_ms: 60_000,
        new_clients_per_sec: d.new_clients_per_second,
        per_client_per_sec: 10,
    }
}

fn describe(c: &rackcast_core::boot::dhcp::ClientInfo) -> String {
    let fw = match c.firmware {
        Some(Firmware::BiosX86) => "legacy BIOS PXE".to_string(),
        Some(Firmware::UefiX64) => "x86-64 UEFI PXE".to_string(),
        Some(Firmware::UefiArm64) => "ARM64 UEFI PXE".to_string(),
        Some(Firmware::Other(n)) => format!("PXE arch {n}"),
        None => "PXE".to_string(),
    };
    let mut s = if c.ipxe { format!("iPXE ({fw})") } else { fw };
    if let Some(u) = &c.uuid {
        s.push_str(&format!(", uuid {u}"));
    }
    s
}

/// A lease change for the store.
enum LeaseOp {
    Save(rackcast_core::boot::dhcp::Lease),
    Forget([u8; 6]),
}

/// Lease changes waiting for the store, at most: DHCP answers never wait
/// on a store write; past this many the change is counted and dropped
/// (the client's next renewal writes it again).
const LEASE_QUEUE: usize = 1024;

/// Open the store on its own thread (its client blocks), read the bound
/// leases, and keep writing lease changes there in order.
fn lease_writer(
    loc: StoreLocation,
) -> anyhow::Result<(
    Vec<rackcast_core::boot::dhcp::Lease>,
    std::sync::mpsc::SyncSender<LeaseOp>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LeaseOp>(LEASE_QUEUE);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("rc-leases".into())
        .spawn(move || {
            let opened = crate::store::open(&loc).and_then(|mut s| {
                let l = s.leases()?;
                Ok((s, l))
            });
            let mut st = match opened {
                Ok((s, l)) => {
                    let _ = ready_tx.send(Ok(l));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for op in rx {
                let r = match op {
                    LeaseOp::Save(l) => st.save_lease(&l),
                    LeaseOp::Forget(mac) => st.forget_lease(&mac),
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "DHCP lease not written to the store");
                    metrics::counter!("rackcast_store_errors_total").increment(1);
                }
            }
        })?;
    let leases = ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the lease store thread ended"))??;
    Ok((leases, tx))
}

/// Bind the DHCP service's sockets now (a port in use is a start-up
/// error, not a dead service behind a ready appliance); the returned
/// future serves until it is dropped. `None` without `[boot.dhcp]`.
pub fn bind_dhcp(
    cfg: Arc<Config>,
    installed: Installed,
    enroll: Arc<crate::enroll::Enrollment>,
    trigger: BootTrigger,
) -> anyhow::Result<Option<impl std::future::Future<Output = ()> + Send>> {
    let Some(d) = cfg.boot.dhcp.clone() else {
        return Ok(None);
    };
    let api = cfg
        .appliance
        .api_listen
        .ok_or_else(|| anyhow::anyhow!("boot.dhcp needs appliance.api_listen"))?;
    let (leases, store) = lease_writer(cfg.store_location())?;
    let mut core = DhcpServer::new(core_config(&d, api), leases);
    let s67 = super::iface_socket(&d.iface, 67)?;
    let s4011 = if d.mode == "proxy" {
        Some(super::iface_socket(&d.iface, 4011)?)
    } else {
        None
    };
    tracing::info!(iface = %d.iface, mode = %d.mode, "DHCP service listening");
    Ok(Some(async move {
        let mut b67 = vec![0u8; 2048];
        let mut b4011 = vec![0u8; 2048];
        loop {
            let (n, from, port) = tokio::select! {
                r = s67.recv_from(&mut b67) => match r {
                    Ok((n, from)) => (n, from, 67u16),
                    Err(e) => { tracing::warn!(error = %e, "DHCP receive"); continue; }
                },
                r = async {
                    match &s4011 {
                        Some(s) => s.recv_from(&mut b4011).await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Ok((n, from)) => (n, from, 4011u16),
                    Err(e) => { tracing::warn!(error = %e, "DHCP receive"); continue; }
                },
            };
            let data = if port == 67 { &b67[..n] } else { &b4011[..n] };
            let msg = match dhcp_wire::parse(data) {
                Ok(m) => m,
                Err(e) => {
                    metrics::counter!("rackcast_dhcp_dropped_total", "reason" => "malformed")
                        .increment(1);
                    tracing::debug!(%from, error = %e, "DHCP datagram dropped");
                    continue;
                }
            };
            let client = rackcast_core::boot::dhcp::client_info(&msg);
            if let Some(c) = &client {
                if !enroll.answers(&mac_string(&c.mac)) {
                    // `[enroll] policy = "known"`: a machine not in the rack
                    // inventory gets no lease and no boot file.
                    metrics::counter!("rackcast_dhcp_dropped_total", "reason" => "unknown_device")
                        .increment(1);
                    tracing::debug!(mac = %mac_string(&c.mac), "DHCP from an unknown device ignored");
                    continue;
                }
            }
            let choice = match client {
                Some(c)
                    if installed
                        .read()
                        .map(|s| s.contains(&mac_string(&c.mac)))
                        .unwrap_or(false) =>
                {
                    BootChoice::LocalDisk
                }
                _ => BootChoice::Install,
            };
            for a in core.handle(&msg, port, now_ms(), choice) {
                match a {
                    DhcpAction::Reply { msg, to } => {
                        let bytes = match dhcp_wire::emit(&msg) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(error = %e, "DHCP reply encode");
                                continue;
                            }
                        };
                        let sock = if port == 4011 {
                            s4011.as_ref().unwrap_or(&s67)
                        } else {
                            &s67
                        };
                        let dest = match to {
                            Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
                            Destination::Unicast(ip, p) => SocketAddrV4::new(ip, p),
                            Destination::Relay(ip) => SocketAddrV4::new(ip, 67),
                        };
                        // proxyDHCP answers on 4011 go back to the client's port.
                        let dest = if port == 4011 {
                            match from {
                                SocketAddr::V4(f) if !f.ip().is_unspecified() => f,
                                _ => dest,
                            }
                        } else {
                            dest
                        };
                        if let Err(e) = sock.send_to(&bytes, dest).await {
                            tracing::warn!(%dest, error = %e, "DHCP send");
                        }
                        metrics::counter!("rackcast_dhcp_replies_total").increment(1);
                    }
                    DhcpAction::SaveLease(l) => {
                        tracing::info!(mac = %mac_string(&l.mac), ip = %l.ip, "DHCP lease bound");
                        if store.try_send(LeaseOp::Save(l)).is_err() {
                            tracing::error!("lease not stored: the store is behind");
                            metrics::counter!("rackcast_store_errors_total").increment(1);
                        }
                    }
                    DhcpAction::ForgetLease(mac) => {
                        if store.try_send(LeaseOp::Forget(mac)).is_err() {
                            tracing::error!("lease not removed: the store is behind");
                            metrics::counter!("rackcast_store_errors_total").increment(1);
                        }
                    }
                    DhcpAction::BootSeen(c) => {
                        let mut how = describe(&c);
                        if choice == BootChoice::LocalDisk {
                            how.push_str("; installed: no boot file, the firmware boots its disk");
                        }
                        trigger(mac_string(&c.mac), how)
                    }
                    DhcpAction::Ignored(why) => {
                        metrics::counter!("rackcast_dhcp_dropped_total", "reason" => why)
                            .increment(1);
                        if why == "address pool exhausted" {
                            tracing::warn!(
                                mac = ?rackcast_core::boot::dhcp::client_info(&msg).map(|c| mac_string(&c.mac)),
                                "DHCP pool exhausted: no offer"
                            );
                        } else {
                            tracing::debug!(why, "DHCP request not answered");
                        }
                    }
                }
            }
        }
    }))
}
