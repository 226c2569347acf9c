//! Agent connections: handshake, framing, timeouts, bundle and blob
//! downloads. Workflow messages go to the controller thread; downloads are
//! served here (bounded by the transfer semaphore) so a slow device never
//! holds up the controller.
//!
//! Owns: one task per connection and its error handling (a bad frame gets
//! an `Error` message and a closed connection; the appliance keeps
//! serving the others). Must not: change device state.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{Input, Shared};
use rackcast_core::io::conn::{map_io, Conn, ConnError, Frame};
use rackcast_core::wire::device::{
    AgentMsg, ApplianceMsg, BLOB_CHUNK, DEVICE_PROTOCOL, HELLO_MAX_FRAME, MAX_FRAME,
};

use std::time::Duration;

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// How long a blob request waits for a transfer permit before the device
/// is told to come back.
const PERMIT_WAIT: Duration = Duration::from_secs(10);
/// A write to an agent that takes longer than this ends the connection
/// (and frees what its queue held).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection must say Hello within this after its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Agent connections from one source address at once. A device has one
/// (two for a moment while a reconnect replaces a dead one); a NAT or a
/// relay in front of many devices is not a design case.
pub const MAX_PER_SOURCE: u32 = 8;

pub async fn accept_loop(listener: TcpListener, shared: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Capped before the handshake: a flood of connections holds
                // at most its share of slots, each for at most the
                // handshake and Hello deadlines.
                let slot = match shared.agent_caps.take(peer.ip()) {
                    Ok(s) => s,
                    Err(full) => {
                        metrics::counter!("rackcast_agent_refused_total", "reason" => match full {
                            crate::limits::Full::Total => "connections",
                            crate::limits::Full::Source => "connections_per_source",
                        })
                        .increment(1);
                        tracing::warn!(%peer, reason = full.reason(), "agent connection refused");
                        drop(stream);
                        continue;
                    }
                };
                let s = shared.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = serve_agent(stream, peer, s).await {
                        tracing::warn!(%peer, error = %e, "agent connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

fn count_error(kind: &'static str) {
    metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => kind).increment(1);
}

async fn serve_agent(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    shared: Shared,
) -> Result<(), ConnError> {
    let read_timeout = shared.cfg.appliance.read_timeout;
    let stream = match rackcast_core::io::tls::accept(&shared.control_tls, stream).await {
        Ok(s) => s,
        Err(e) => {
            count_error("tls");
            return Err(e.into());
        }
    };
    // Until it is admitted, the peer's frames are capped at a Hello's
    // size, and it has the handshake deadline's worth of time to say it.
    let mut conn = Conn::new(stream, HELLO_MAX_FRAME);
    let hello: AgentMsg = match conn.recv(HELLO_TIMEOUT.min(read_timeout)).await {
        Ok(m) => m,
        Err(e) => {
            count_error(match e {
                ConnError::Oversize(_) => "oversize",
                ConnError::Timeout(_) => "timeout",
                ConnError::Closed | ConnError::Io(_) => "closed",
                _ => "malformed",
            });
            conn.close_with(ApplianceMsg::Error {
                message: format!("expected Hello: {e}"),
            })
            .await;
            return Err(e);
        }
    };
    let AgentMsg::Hello {
        protocol,
        mac,
        device_id,
        mode,
        credential,
    } = hello
    else {
        count_error("out_of_order");
        conn.close_with(ApplianceMsg::Error {
            message: "expected Hello first".into(),
        })
        .await;
        return Ok(());
    };
    if protocol != DEVICE_PROTOCOL {
        count_error("version");
        conn.close_with(ApplianceMsg::Error {
            message: format!(
                "protocol version {protocol} not supported (appliance speaks {DEVICE_PROTOCOL})"
            ),
        })
        .await;
        return Ok(());
    }
    let conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx, kill) = super::Outbox::new();
    let shares = std::sync::Arc::new(tokio::sync::Semaphore::new(super::INBOX_SHARE));
    let (reply_tx, reply_rx) = oneshot::channel();
    if shared
        .inbox
        .send(Input::Connected {
            conn_id,
            mac: mac.clone(),
            device_id,
            mode,
            presented: credential.map(|c| *blake3::hash(&c).as_bytes()),
            peer,
            out: out_tx.clone(),
            reply: reply_tx,
        })
        .is_err()
    {
        return Ok(());
    }
    let super::Admitted {
        device,
        boot,
        credential,
        chunks: conn_permits,
    } = match reply_rx.await {
        Ok(Ok(a)) => a,
        Ok(Err(why)) => {
            conn.close_with(ApplianceMsg::Error { message: why }).await;
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    tracing::info!(%device, %mac, boot, new_boot = credential.is_some(), "agent connected");
    conn.set_max_frame(MAX_FRAME);
    // Welcome goes first on the writer: queue it before anything else.
    let (mut sink, mut frames) = conn.split();
    let welcome = ApplianceMsg::Welcome {
        protocol: DEVICE_PROTOCOL,
        device_id: device.clone(),
        boot,
        credential,
    }
    .encode()?;
    sink.send(bytes::Bytes::from(welcome)).await?;
    let writer = tokio::spawn(async move {
        while let Some((m, permit)) = out_rx.recv().await {
            let Ok(bytes) = m.encode() else { continue };
            let last = matches!(m, ApplianceMsg::Error { .. });
            drop(m);
            let sent =
                tokio::time::timeout(WRITE_TIMEOUT, sink.send(bytes::Bytes::from(bytes))).await;
            drop(permit);
            match sent {
                Ok(Ok(())) if !last => {}
                Ok(_) => break,
                Err(_) => {
                    count_error("write_timeout");
                    tracing::warn!("agent does not read its connection; closing it");
                    break;
                }
            }
        }
        // Whatever is still queued (and the permits it holds) goes now.
        out_rx.close();
        while out_rx.try_recv().is_ok() {}
        let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
    });
    let result = loop {
        let next = tokio::select! {
            n = tokio::time::timeout(read_timeout, frames.next()) => n,
            _ = kill.notified() => break Ok(()),
        };
        let frame = match next {
            Err(_) => break Err(ConnError::Timeout(read_timeout)),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => {
                let e = map_io(e, MAX_FRAME);
                if matches!(e, ConnError::Oversize(_)) {
                    count_error("oversize");
                    out_tx.send(
                        ApplianceMsg::Error {
                            message: format!("frame larger than {MAX_FRAME} bytes"),
                        },
                        None,
                    );
                }
                break Err(e);
            }
            Ok(Some(Ok(f))) => f,
        };
        let msg = match AgentMsg::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                count_error("malformed");
                out_tx.send(
                    ApplianceMsg::Error {
                        message: e.to_string(),
                    },
                    None,
                );
                break Err(e);
            }
        };
        // Reports and progress wait for a place in the controller's inbox
        // (the connection reads nothing meanwhile: TCP pushes back).
        let share = if matches!(msg, AgentMsg::Report { .. } | AgentMsg::Progress { .. }) {
            match shares.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => break Ok(()),
            }
        } else {
            None
        };
        match msg {
            AgentMsg::Report {
                cmd_id,
                outcome,
                data,
                ops,
            } => {
                if shared
                    .inbox
                    .send(Input::Report {
                        device: device.clone(),
                        conn_id,
                        share,
                        cmd_id,
                        outcome,
                        data,
                        ops,
                    })
                    .is_err()
                {
                    break Ok(());
                }
            }
            AgentMsg::Progress { cmd_id, ops } => {
                if shared
                    .inbox
                    .send(Input::Progress {
                        device: device.clone(),
                        conn_id,
                        share,
                        cmd_id,
                        ops,
                    })
                    .is_err()
                {
                    break Ok(());
                }
            }
            AgentMsg::GetBundle { hash } => {
                let ours = shared
                    .assigned
                    .read()
                    .map(|m| m.get(&device) == Some(&hash))
                    .unwrap_or(false);
                let reply = match shared.builder.bundle_path(&hash) {
                    _ if !ours => {
                        metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "foreign_bundle")
                            .increment(1);
                        tracing::warn!(%device, %hash, "agent asked for a bundle that is not its device's");
                        ApplianceMsg::Error {
                            message: format!("bundle {hash} is not this device's"),
                        }
                    }
                    Some(p) => match tokio::fs::read(&p).await {
                        Ok(bytes) => ApplianceMsg::Bundle {
                            signature: shared.signer.sign_bundle(&hash, &device, boot).to_vec(),
                            hash,
                            bytes,
                        },
                        Err(e) => ApplianceMsg::Error {
                            message: format!("bundle {hash}: {e}"),
                        },
                    },
                    None => ApplianceMsg::Error {
                        message: format!("no bundle {hash}"),
                    },
                };
                let fatal = matches!(reply, ApplianceMsg::Error { .. });
                out_tx.send(reply, None);
                if fatal {
                    break Ok(());
                }
            }
            AgentMsg::GetBlob { hash, offset } => {
                // Only the blobs of the bundle this device was given.
                let bundle = shared
                    .assigned
                    .read()
                    .ok()
                    .and_then(|m| m.get(&device).cloned());
                let ours = bundle.is_some_and(|b| shared.builder.bundle_has_blob(&b, &hash));
                // Chunks in memory are bounded per connection and in all;
                // a device that cannot get a permit in time is told to come
                // back later instead of holding its place in the queue.
                let permit = if ours {
                    match conn_permits.clone().try_acquire_owned() {
                        Ok(own) => match tokio::time::timeout(
                            PERMIT_WAIT,
                            shared.transfer_permits.clone().acquire_owned(),
                        )
                        .await
                        {
                            Ok(Ok(p)) => Some((own, p)),
                            _ => None,
                        },
                        Err(_) => None,
                    }
                } else {
                    None
                };
                let reply = match (&permit, shared.builder.blob(&hash)) {
                    _ if !ours => {
                        metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "foreign_blob")
                            .increment(1);
                        tracing::warn!(%device, %hash, "agent asked for a blob that is not in its bundle");
                        ApplianceMsg::Error {
                            message: format!("blob {hash} is not in this device's bundle"),
                        }
                    }
                    (None, _) => {
                        metrics::counter!("rackcast_agent_protocol_errors_total", "kind" => "busy")
                            .increment(1);
                        tracing::warn!(%device, "blob transfers all taken; the agent will come back");
                        ApplianceMsg::Error {
                            message: "appliance busy: too many blob transfers; try again".into(),
                        }
                    }
                    (Some(_), Some((path, total))) if offset <= total => {
                        read_chunk(path, offset, total, hash).await
                    }
                    _ => ApplianceMsg::Error {
                        message: format!("no blob {hash} at offset {offset}"),
                    },
                };
                let permit = permit.map(|(conn, global)| super::Held {
                    _global: global,
                    _conn: conn,
                });
                let fatal = matches!(reply, ApplianceMsg::Error { .. });
                out_tx.send(reply, permit);
                if fatal {
                    break Ok(());
                }
            }
            AgentMsg::Ping => {
                out_tx.send(ApplianceMsg::Pong, None);
            }
            AgentMsg::Hello { .. } => {
                count_error("out_of_order");
                out_tx.send(
                    ApplianceMsg::Error {
                        message: "Hello twice".into(),
                    },
                    None,
                );
                break Ok(());
            }
        }
    };
    let _ = shared.inbox.send(Input::Disconnected {
        device: device.clone(),
        conn_id,
    });
    drop(out_tx);
    // The writer gets a moment to flush a last error; a peer that does not
    // read meanwhile loses it, and its queued chunks free their permits.
    let abort = writer.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
    tracing::info!(%device, ?result, "agent disconnected");
    result
}

async fn read_chunk(
    path: std::path::PathBuf,
    offset: u64,
    total: u64,
    hash: String,
) -> ApplianceMsg {
    let r = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        let n = (total - offset).min(BLOB_CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)?;
        Ok(buf)
    })
    .await;
    match r {
        Ok(Ok(data)) => ApplianceMsg::BlobChunk {
            hash,
            offset,
            total,
            data,
        },
        Ok(Err(e)) => ApplianceMsg::Error {
            message: format!("blob {hash}: {e}"),
        },
        Err(e) => ApplianceMsg::Error {
            message: format!("blob {hash}: {e}"),
        },
    }
}
