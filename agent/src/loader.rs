//! The loader's download: the bundle by its address, its signature
//! against the trusted key, every blob by its BLAKE3, unpacked into the
//! bundle directory the bundle's agent runs from.
//!
//! Owns: the bundle directory's content. Must not: run anything from it
//! before every hash checked out.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use rackcast_core::model::{BlobRef, Bundle, OpRecord};
use rackcast_core::wire::device::{AgentMsg, ApplianceMsg};

use crate::plan::{run_program, Ctx};

/// Download the bundle and its blobs, verify every hash, make it
/// runnable. Returns the agent binary to exec.
pub(crate) async fn fetch_bundle(
    ctx: &Ctx,
    hash: &str,
    ops: &mut Vec<OpRecord>,
) -> Result<PathBuf> {
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
            ctx.trusted
                .verify_bundle(hash, &ctx.device, ctx.boot, &signature)?;
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
            "bundle {hash}: agent {} + {} modules, every BLAKE3 verified; signature for {} boot {} verified with appliance key {}",
            bundle.agent.hash,
            bundle.modules.len(),
            ctx.device,
            ctx.boot,
            ctx.trusted.fingerprint()
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

pub(crate) fn load_bundle(dir: &Path) -> Result<Bundle> {
    let bytes = std::fs::read(dir.join("bundle.bin"))
        .with_context(|| format!("bundle in {}", dir.display()))?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    Ok(Bundle::from_verified_bytes(&bytes, &hash)?)
}
