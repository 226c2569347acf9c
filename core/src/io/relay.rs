//! A relay: one receiver of an upstream wave (by unicast: no multicast
//! routing reaches its segment) that re-multicasts the image on its own
//! segment as a wave of its own, block by block as each block is written
//! and checked, never waiting for the whole image.
//!
//! Its members' feedback is answered by its own wave (its own repair and
//! coded resends); upstream it is one member, so only its aggregate need
//! crosses the router.
//!
//! Owns: running the upstream receiver and the local wave side by side,
//! the cache files between them, and the relay's report. Must not: make
//! protocol decisions (the sender and receiver cores do) or decide who is
//! in either wave (the upstream sender and the relay's caller do).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::io::receive::{
    run_receive_tapped, Progress, ReceiveError, ReceiveOptions, ReceiveReport, RelayTap,
};
use crate::io::send::{run_wave, SendError, SendOptions, SendReport, WaveLink};

/// What the local wave sends, known once the upstream session is: the
/// relay's copy of the image as it is being written, and the gate that
/// opens block by block.
pub struct LocalImage {
    /// The relay's copy of the image.
    pub image: PathBuf,
    /// The upstream's manifest.
    pub manifest: crate::image::manifest::Manifest,
    /// The kept frames, when the image travels compressed.
    pub frames: Option<PathBuf>,
    /// Blocks written so far.
    pub gate: Arc<crate::io::send::BlockGate>,
}

/// Builds the local wave's options around its image.
pub type LocalWave = Box<dyn FnOnce(LocalImage) -> SendOptions + Send>;

/// A relay's two halves.
pub struct RelayOptions {
    /// The upstream session; `out` is the relay's copy of the image (made
    /// fresh for each wave: every block comes from upstream and is checked).
    pub upstream: ReceiveOptions,
    /// The UDP port the upstream copies its wave to (0: any).
    pub port: u16,
    /// Where compressed blocks' frames are kept for the local wave.
    pub frames: PathBuf,
    /// The local wave (its `image`, `manifest`, `frames` and `gate` must
    /// be the [`LocalImage`]'s).
    pub local: LocalWave,
    /// Its control listener (bound by the caller, to tell members).
    pub listener: TcpListener,
    /// Its members, in an appliance's relay.
    pub link: Option<WaveLink>,
}

/// What a relay did.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    /// Both halves succeeded: the relay's copy verified and every local
    /// member verified.
    pub ok: bool,
    /// The relay's own session with its upstream.
    pub upstream: Option<ReceiveReport>,
    /// The local wave.
    pub local: Option<SendReport>,
    /// From the relay's own copy verified to its local wave's end: a
    /// relay that pipelines finishes its segment shortly after its copy,
    /// one that waited for the whole image would take the whole local
    /// wave again.
    pub tail_seconds: Option<f64>,
    /// What went wrong, when something did.
    pub error: Option<String>,
}

/// Why a relay could not run at all.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The upstream session did not even start.
    #[error("upstream: {0}")]
    Upstream(#[from] ReceiveError),
    /// The local wave could not start.
    #[error("local wave: {0}")]
    Local(#[from] SendError),
}

/// Run one relayed wave to its end.
pub async fn run_relay(opts: RelayOptions) -> Result<RelayReport, RelayError> {
    let RelayOptions {
        upstream,
        port,
        frames,
        local,
        listener,
        link,
    } = opts;
    let out = upstream.out.clone();
    // Never resume into an earlier wave's cache: its frames are not
    // checked against this manifest, and a stale resume state would mark
    // blocks done that the local wave then could not read.
    let state = upstream
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.rcresume", out.display())));
    let _ = std::fs::remove_file(&state);
    let mut upstream = upstream;
    upstream.state = Some(state);
    upstream.delta = false;
    upstream.disk = false;
    let (joined_tx, joined_rx) = oneshot::channel();
    let tap = RelayTap {
        port,
        frames: frames.clone(),
        joined: joined_tx,
    };
    let up = tokio::spawn(async move {
        let r = run_receive_tapped(upstream, Arc::new(Progress::default()), Some(tap)).await;
        (r, Instant::now())
    });
    let (manifest, gate) = match joined_rx.await {
        Ok(j) => j,
        // The session ended before it was known: its error says why.
        Err(_) => {
            return match up.await {
                Ok((Err(e), _)) => Err(RelayError::Upstream(e)),
                Ok((Ok(r), _)) => Ok(RelayReport {
                    ok: false,
                    error: r.reason.clone(),
                    upstream: Some(r),
                    local: None,
                    tail_seconds: None,
                }),
                Err(e) => Ok(RelayReport {
                    ok: false,
                    upstream: None,
                    local: None,
                    tail_seconds: None,
                    error: Some(format!("upstream task: {e}")),
                }),
            }
        }
    };
    tracing::info!(
        image = %manifest.image_hash_hex(),
        blocks = manifest.block_count(),
        "relay joined its upstream; starting the local wave"
    );
    let local = local(LocalImage {
        image: out,
        frames: (crate::image::packed::frames_len(&manifest) > 0).then_some(frames),
        manifest,
        gate,
    });
    let local_report = run_wave(local, listener, link).await;
    let local_end = Instant::now();
    let (up, tail_seconds) = match up.await {
        Ok((r, up_end)) => (
            r,
            Some(local_end.saturating_duration_since(up_end).as_secs_f64()),
        ),
        Err(e) => (
            Err(ReceiveError::Refused(format!("upstream task: {e}"))),
            None,
        ),
    };
    let (upstream, up_err) = match up {
        Ok(r) => {
            let err = (!r.verified).then(|| {
                format!(
                    "upstream not verified: {}",
                    r.reason.clone().unwrap_or_default()
                )
            });
            (Some(r), err)
        }
        Err(e) => (None, Some(format!("upstream: {e}"))),
    };
    let (local, local_err) = match local_report {
        Ok(r) => {
            let err = (!r.ok).then(|| {
                r.error
                    .clone()
                    .unwrap_or_else(|| "a local member did not verify".into())
            });
            (Some(r), err)
        }
        Err(e) => (None, Some(format!("local wave: {e}"))),
    };
    let error = up_err.or(local_err);
    Ok(RelayReport {
        ok: error.is_none(),
        upstream,
        local,
        tail_seconds,
        error,
    })
}
