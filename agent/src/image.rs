//! The image step on the device: receive the wave's image onto the plan's
//! target with the core's receiver and report the verified hash.
//!
//! Owns: the receive options and the operation record. Must not: decide
//! where the image goes (the plan does).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use rackcast_core::io::receive::{run_receive, Progress, ReceiveOptions};
use rackcast_core::model::{OpRecord, StepData};

use crate::plan::{plan_of, Ctx};

pub(crate) async fn receive_image(
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
    // The disk the plan means, found again in this boot's enumeration by
    // serial and size; an array by its path.
    let target = crate::disks::image_target(&ctx.inventory, &plan.image)?;
    // A target this agent already began writing this image to (a wave
    // cut short, an appliance restart) holds the image's own partition
    // table by now: that is our partial write, which the resume state
    // continues, not someone's data. The claim names the target, so a
    // state left for another disk never opens this one.
    let claim = state.with_extension("target");
    let ours = state.exists() && std::fs::read_to_string(&claim).is_ok_and(|t| t == target);
    let t = Instant::now();
    match crate::disks::check_target(std::path::Path::new(&target), plan.image.wipe || ours) {
        Ok(what) => {
            let what = if ours {
                format!("{what}; it holds this image's partial write (resume state): continuing it")
            } else {
                what
            };
            ops.push(OpRecord::timed("disk-check", true, t, what));
        }
        Err(e) => {
            ops.push(OpRecord::timed("disk-check", false, t, format!("{e:#}")));
            return Err(e);
        }
    }
    std::fs::write(&claim, &target).with_context(|| format!("{}", claim.display()))?;
    let opts = ReceiveOptions {
        server: join.control,
        out: PathBuf::from(&target),
        iface: ctx.iface.clone(),
        name: Some(ctx.device.clone()),
        state: Some(state),
        connect_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        rcvbuf: 16 << 20,
        decoders: rackcast_core::io::receive::default_decoders(),
        // A disk that is re-imaged usually holds the previous version:
        // blocks whose digest already matches are not sent again.
        delta: rackcast_core::io::receive::is_block_device(std::path::Path::new(&target)),
        trust_key: Some(ctx.trusted.fingerprint()),
        credential: Some(ctx.credential),
        expect_image: Some(*blake3::Hash::from_hex(&plan.image.hash)?.as_bytes()),
        disk: true,
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
            "wave {} -> {}: {} bytes, {} packets, {} blocks in place ({} data), final flush {:.2} s, {} auth failures{}",
            join.wave_id,
            target,
            rep.image_bytes,
            rep.packets,
            rep.resumed_blocks,
            rep.resumed_data_blocks,
            rep.flush_seconds,
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
    // Written and verified: the disk now holds an installed OS, which
    // only a wipe (a reinstall) may overwrite.
    let _ = std::fs::remove_file(&claim);
    Ok((
        format!("image {} written to {target} and verified", join.image),
        StepData::ImageWritten {
            hash: rep.image_hash,
            bytes: rep.image_bytes,
        },
    ))
}
