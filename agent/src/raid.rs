//! Software RAID on the device with mdadm: inspect what the disks hold,
//! then reuse, assemble, create (or wipe and create) the plan's array and
//! verify it. The decision is `rackcast::raid`'s; this module only runs
//! mdadm, and every command it runs is an operation in the device's log.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, SeekFrom};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rackcast::bundle::{Inventory, RaidPlan};
use rackcast::raid::{self, ArrayState, Decision, MemberState, Wanted};
use rackcast::workflow::OpRecord;

const MDADM_TIMEOUT: Duration = Duration::from_secs(120);

struct Mdadm<'a> {
    ops: &'a mut Vec<OpRecord>,
}

impl Mdadm<'_> {
    /// Run mdadm; `log`: record it as an operation (inspection reads that
    /// may fail by design are summarised by the caller instead).
    async fn run(&mut self, args: &[&str], log: bool) -> Result<(bool, String)> {
        let t = Instant::now();
        let out = tokio::time::timeout(
            MDADM_TIMEOUT,
            tokio::process::Command::new("mdadm")
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| anyhow!("mdadm {} timed out", args.join(" ")))?
        .map_err(|e| anyhow!("cannot run mdadm (is it in the loader?): {e}"))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        if log {
            self.ops.push(OpRecord {
                op: "mdadm".into(),
                ok: out.status.success(),
                exit_code: out.status.code(),
                duration_ms: t.elapsed().as_millis() as u64,
                detail: format!("mdadm {}: {}", args.join(" "), text.trim()),
            });
        }
        Ok((out.status.success(), text))
    }

    async fn checked(&mut self, args: &[&str]) -> Result<String> {
        let (ok, text) = self.run(args, true).await?;
        if !ok {
            bail!("mdadm {} failed: {}", args.join(" "), text.trim());
        }
        Ok(text)
    }

    async fn running(&mut self, array: &str) -> Result<Option<ArrayState>> {
        let (ok, text) = self.run(&["--detail", "--export", array], false).await?;
        Ok(if ok {
            ArrayState::from_detail(&text)
        } else {
            None
        })
    }
}

fn size_of(path: &str) -> Result<u64> {
    let mut f = std::fs::File::open(path).map_err(|e| anyhow!("{path}: {e}"))?;
    Ok(f.seek(SeekFrom::End(0))?)
}

/// Bring the plan's array into being; returns what was done.
pub async fn configure(
    plan: &RaidPlan,
    inv: &Inventory,
    image_size: u64,
    ops: &mut Vec<OpRecord>,
) -> Result<String> {
    if !std::path::Path::new("/proc/mdstat").exists() {
        bail!("this kernel has no software RAID (md) support: /proc/mdstat is missing");
    }
    let array = plan.array.as_str();
    let members: BTreeSet<String> = plan.members.iter().map(|m| inv.resolve_disk(m)).collect();
    let w = Wanted {
        level: plan.level.clone(),
        members: members.clone(),
        wipe: plan.wipe,
    };
    let name = raid::array_name(array)
        .ok_or_else(|| anyhow!("array path {array:?} is not /dev/md/NAME"))?;
    let t = Instant::now();
    let mut md = Mdadm { ops };
    let running = md.running(array).await?;
    let mut found = BTreeMap::new();
    for m in &members {
        let (ok, text) = md.run(&["--examine", "--export", m], false).await?;
        found.insert(
            m.clone(),
            if ok {
                MemberState::from_examine(&text)
            } else {
                None
            },
        );
    }
    let decision = raid::decide(&w, running.as_ref(), &found);
    let seen = found
        .iter()
        .map(|(d, s)| match s {
            Some(s) => format!(
                "{d}: {} member ({} devices, array {})",
                s.level, s.raid_devices, s.uuid
            ),
            None => format!("{d}: no RAID metadata"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    md.ops.push(OpRecord {
        op: "raid-inspect".into(),
        ok: !matches!(decision, Decision::Refuse { .. }),
        exit_code: None,
        duration_ms: t.elapsed().as_millis() as u64,
        detail: format!(
            "{array}: {}; {seen}; wanted {} over {} -> {decision:?}",
            match &running {
                Some(a) => format!("running {} ({} devices)", a.level, a.raid_devices),
                None => "not running".into(),
            },
            w.level,
            members.iter().cloned().collect::<Vec<_>>().join(" ")
        ),
    });
    let mut create_args: Vec<String> = vec![
        "--create".into(),
        array.into(),
        "--run".into(),
        format!("--metadata={}", plan.metadata),
        format!("--name={name}"),
        format!("--level={}", w.level),
        format!("--raid-devices={}", members.len()),
    ];
    create_args.extend(members.iter().cloned());
    let create_args: Vec<&str> = create_args.iter().map(String::as_str).collect();
    let what = match decision {
        Decision::Refuse { why } => bail!("RAID: {why}"),
        Decision::Reuse => format!("existing {} array {array} matches: reused", w.level),
        Decision::Assemble => {
            let mut a = vec!["--assemble", array, "--run"];
            a.extend(members.iter().map(String::as_str));
            md.checked(&a).await?;
            format!("existing {} array {array} assembled and reused", w.level)
        }
        Decision::Create => {
            md.checked(&create_args).await?;
            format!("created {} array {array}", w.level)
        }
        Decision::WipeAndCreate { why } => {
            if running.is_some() {
                md.checked(&["--stop", array]).await?;
            }
            for m in &members {
                md.checked(&["--zero-superblock", m]).await?;
            }
            md.checked(&create_args).await?;
            format!("wiped ({why}) and created {} array {array}", w.level)
        }
    };
    // Verify what runs now, and that the image fits.
    let t = Instant::now();
    let detail = md.checked(&["--detail", "--export", array]).await?;
    let state = ArrayState::from_detail(&detail)
        .ok_or_else(|| anyhow!("mdadm --detail {array}: unreadable answer"))?;
    let size = size_of(array)?;
    let verdict = raid::verify(&w, &state).and_then(|()| {
        if size < image_size {
            Err(format!(
                "array holds {size} bytes, the image needs {image_size}"
            ))
        } else {
            Ok(())
        }
    });
    md.ops.push(OpRecord {
        op: "raid-verify".into(),
        ok: verdict.is_ok(),
        exit_code: None,
        duration_ms: t.elapsed().as_millis() as u64,
        detail: match &verdict {
            Ok(()) => format!(
                "{array}: {} over {} ({size} bytes, array {})",
                state.level,
                state.members.iter().cloned().collect::<Vec<_>>().join(" "),
                state.uuid
            ),
            Err(e) => format!("{array}: {e}"),
        },
    });
    verdict.map_err(|e| anyhow!("RAID verify: {e}"))?;
    Ok(what)
}
