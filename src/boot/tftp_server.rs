//! The TFTP service's I/O driver: a read-only server on port 69 bound to
//! the provisioning interface, one task and one socket (transfer id) per
//! transfer, files only from under the configured root.
//!
//! Owns: sockets, file reads, path checks (no `..`, no escaping the root
//! through symlinks), TFTP error answers (file not found, access violation
//! for writes and traversal, unknown transfer id). Must not: decide the
//! transfer's course (the [`ReadTransfer`] core does).

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::store::now_ms;
use rackcast_core::boot::tftp::{Limits, ReadTransfer, TxAction};
use rackcast_core::wire::tftp::{self as tftp_wire, Packet};

const ERR_NOT_FOUND: u16 = 1;
const ERR_ACCESS: u16 = 2;
const ERR_ILLEGAL: u16 = 4;
const ERR_UNKNOWN_TID: u16 = 5;
const ERR_OPTION: u16 = 8;
/// Transfers at once, in all and per client address: each holds a socket
/// and a file, for at most `retries` x the (capped) timeout when stalled.
const MAX_TRANSFERS: usize = 128;
const MAX_TRANSFERS_PER_CLIENT: u32 = 4;

/// Resolve a requested name under `root`, or say which TFTP error it is.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf, (u16, String)> {
    let rel = Path::new(name.trim_start_matches('/'));
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err((ERR_ACCESS, format!("{name}: outside the boot root")));
    }
    let p = root.join(rel);
    let real =
        std::fs::canonicalize(&p).map_err(|_| (ERR_NOT_FOUND, format!("{name}: not found")))?;
    let real_root =
        std::fs::canonicalize(root).map_err(|e| (ERR_NOT_FOUND, format!("boot root: {e}")))?;
    if !real.starts_with(&real_root) {
        return Err((ERR_ACCESS, format!("{name}: outside the boot root")));
    }
    if !real.is_file() {
        return Err((ERR_NOT_FOUND, format!("{name}: not a file")));
    }
    Ok(real)
}

async fn send_error(sock: &UdpSocket, to: SocketAddr, code: u16, message: &str) {
    let mut buf = Vec::new();
    if tftp_wire::emit(
        &Packet::Error {
            code,
            message: message.to_string(),
        },
        &mut buf,
    )
    .is_ok()
    {
        let _ = sock.send_to(&buf, to).await;
    }
}

fn count(kind: &'static str) {
    metrics::counter!("rackcast_tftp_requests_total", "result" => kind).increment(1);
}

/// Bind the TFTP socket on `iface` now (a port in use is a start-up
/// error); the returned future serves reads from `root` until dropped.
pub fn bind_tftp(
    root: PathBuf,
    iface: String,
    limits: Limits,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    let sock = super::iface_socket(&iface, 69)?;
    let root = Arc::new(root);
    let limits = Arc::new(limits);
    let caps = crate::limits::Caps::new(MAX_TRANSFERS, MAX_TRANSFERS_PER_CLIENT);
    tracing::info!(root = %root.display(), %iface, "TFTP service listening");
    Ok(async move {
        let mut buf = vec![0u8; 1024];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "TFTP receive");
                    continue;
                }
            };
            match tftp_wire::parse(&buf[..n]) {
                Ok(Packet::Rrq {
                    file,
                    mode,
                    options,
                }) => {
                    if mode != "octet" && mode != "netascii" {
                        count("bad_mode");
                        send_error(&sock, peer, ERR_ILLEGAL, "mode must be octet").await;
                        continue;
                    }
                    let path = match resolve(&root, &file) {
                        Ok(p) => p,
                        Err((code, msg)) => {
                            count(if code == ERR_ACCESS {
                                "denied"
                            } else {
                                "not_found"
                            });
                            tracing::info!(%peer, file = %file, reason = %msg, "TFTP request refused");
                            send_error(&sock, peer, code, &msg).await;
                            continue;
                        }
                    };
                    let slot = match caps.take(peer.ip()) {
                        Ok(s) => s,
                        Err(full) => {
                            count("busy");
                            tracing::warn!(%peer, file = %file, "TFTP request refused: transfers {}", full.reason());
                            send_error(&sock, peer, 0, "server busy; try again").await;
                            continue;
                        }
                    };
                    let (iface, limits) = (iface.clone(), limits.clone());
                    tokio::spawn(async move {
                        // Held for the transfer's life.
                        let _slot = slot;
                        match transfer(&iface, peer, &path, &options, &limits).await {
                            Ok(Served::File(bytes)) => {
                                count("ok");
                                tracing::info!(%peer, file = %file, bytes, "TFTP transfer done");
                            }
                            Ok(Served::SizeOnly) => {
                                count("size_query");
                                tracing::debug!(%peer, file = %file, "TFTP size query answered");
                            }
                            Err(e) => {
                                count("failed");
                                tracing::warn!(%peer, file = %file, error = %e, "TFTP transfer failed");
                            }
                        }
                    });
                }
                Ok(Packet::Wrq { file, .. }) => {
                    count("write_refused");
                    tracing::info!(%peer, file = %file, "TFTP write refused");
                    send_error(&sock, peer, ERR_ACCESS, "read-only server").await;
                }
                Ok(_) => {
                    count("unexpected");
                    send_error(&sock, peer, ERR_UNKNOWN_TID, "no such transfer").await;
                }
                Err(e) => {
                    count("malformed");
                    tracing::debug!(%peer, error = %e, "TFTP packet dropped");
                }
            }
        }
    })
}

/// How a read request ended well.
enum Served {
    File(u64),
    /// The client only wanted the file's size: UEFI PXE firmware asks
    /// for `tsize`, reads our OACK and aborts, then asks again for the
    /// file. Not a failure.
    SizeOnly,
}

async fn transfer(
    iface: &str,
    peer: SocketAddr,
    path: &Path,
    options: &[(String, String)],
    limits: &Limits,
) -> anyhow::Result<Served> {
    let sock = super::iface_socket(iface, 0)?;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let (mut t, mut acts) = ReadTransfer::start(options, size, limits, now_ms());
    let mut oack: Option<Vec<u8>> = None;
    let mut out = Vec::with_capacity(t.blksize() + 4);
    let mut data = vec![0u8; t.blksize()];
    let mut inbuf = vec![0u8; 1024];
    loop {
        for a in acts.drain(..) {
            match a {
                TxAction::SendOack(opts) => {
                    tftp_wire::emit(&Packet::Oack { options: opts }, &mut out)?;
                    oack = Some(out.clone());
                    sock.send_to(&out, peer).await?;
                }
                TxAction::SendBlock { block, offset, len } => {
                    file.seek(SeekFrom::Start(offset))?;
                    file.read_exact(&mut data[..len])?;
                    out.clear();
                    out.extend_from_slice(&tftp_wire::OP_DATA.to_be_bytes());
                    out.extend_from_slice(&(block as u16).to_be_bytes());
                    out.extend_from_slice(&data[..len]);
                    sock.send_to(&out, peer).await?;
                }
                TxAction::Finished => return Ok(Served::File(size)),
                TxAction::Fail(why) => anyhow::bail!(why),
            }
        }
        let wait = (t.deadline() - now_ms()).max(1) as u64;
        match tokio::time::timeout(Duration::from_millis(wait), sock.recv_from(&mut inbuf)).await {
            Err(_) => {
                acts = t.on_timeout(now_ms());
                if t.oack_pending() {
                    if let Some(o) = &oack {
                        sock.send_to(o, peer).await?;
                    }
                }
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok((n, from))) => {
                if from != peer {
                    send_error(&sock, from, ERR_UNKNOWN_TID, "unknown transfer id").await;
                    continue;
                }
                match tftp_wire::parse(&inbuf[..n]) {
                    Ok(Packet::Ack { block }) => acts = t.on_ack(block, now_ms()),
                    Ok(Packet::Error { code, message }) => {
                        let asked_size =
                            options.iter().any(|(k, _)| k.eq_ignore_ascii_case("tsize"));
                        if t.oack_pending() && asked_size {
                            return Ok(Served::SizeOnly);
                        }
                        if code == ERR_OPTION {
                            anyhow::bail!("client refused our options: {message}");
                        }
                        anyhow::bail!("client error {code}: {message}");
                    }
                    _ => {} // ignore anything else from the client
                }
            }
        }
    }
}
