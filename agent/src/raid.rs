//! Software RAID on the device with mdadm: inspect what the disks hold,
//! then reuse, assemble, create (or wipe and create) the plan's array and
//! verify it. The decision is `rackcast_core::raid`'s; this module only runs
//! mdadm, and every command it runs is an operation in the device's log.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, SeekFrom};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rackcast_core::model::OpRecord;
use rackcast_core::model::{Inventory, RaidPlan};
use rackcast_core::raid::{self, ArrayState, Decision, MemberState, Wanted};

const MDADM_TIMEOUT: Duration = Duration::from_secs(120);

struct Mdadm<'a> {
    ops: &'a mut Vec<OpRecord>,
}

impl Mdadm<'_> {
    /// Run mdadm; `log`: record it as an operation (inspection reads that
    /// may fail by design are summarised by the caller instead).
    async fn run(&mut self, args: &[&str], log: bool) -> Result<(bool, String)> {
        let out = crate::command::run("mdadm", args, &[], None, MDADM_TIMEOUT)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => anyhow!("mdadm {} timed out", args.join(" ")),
                _ => anyhow!("cannot run mdadm (is it in the loader?): {e}"),
            })?;
        let text = out.stdout + &out.stderr;
        if log {
            self.ops.push(OpRecord {
                op: "mdadm".into(),
                ok: out.ok,
                exit_code: out.code,
                duration_ms: out.ms,
                detail: format!("mdadm {}: {}", args.join(" "), text.trim()),
            });
        }
        Ok((out.ok, text))
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
    // Members by serial and size in this boot's enumeration (plans made
    // before disks had identities name them only by kernel name).
    let members: BTreeSet<String> = if plan.member_disks.is_empty() {
        plan.members.iter().map(|m| inv.resolve_disk(m)).collect()
    } else {
        plan.member_disks
            .iter()
            .map(|id| crate::disks::resolve(inv, id).map(|d| d.path.clone()))
            .collect::<Result<_>>()?
    };
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
    // A member without md metadata is a plain disk: the image-target
    // rules hold for it (exists, not mounted, not our root, no other
    // filesystem unless the plan says wipe).
    for (m, state) in &found {
        if state.is_none() {
            let t = Instant::now();
            match crate::disks::check_target(std::path::Path::new(m), plan.wipe) {
                Ok(what) => md.ops.push(OpRecord::timed("disk-check", true, t, what)),
                Err(e) => {
                    md.ops
                        .push(OpRecord::timed("disk-check", false, t, format!("{e:#}")));
                    return Err(e);
                }
            }
        }
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
    md.ops.push(OpRecord::timed(
        "raid-inspect",
        !matches!(decision, Decision::Refuse { .. }),
        t,
        format!(
            "{array}: {}; {seen}; wanted {} over {} -> {decision:?}",
            match &running {
                Some(a) => format!("running {} ({} devices)", a.level, a.raid_devices),
                None => "not running".into(),
            },
            w.level,
            members.iter().cloned().collect::<Vec<_>>().join(" ")
        ),
    ));
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
    md.ops.push(OpRecord::timed(
        "raid-verify",
        verdict.is_ok(),
        t,
        match &verdict {
            Ok(()) => format!(
                "{array}: {} over {} ({size} bytes, array {})",
                state.level,
                state.members.iter().cloned().collect::<Vec<_>>().join(" "),
                state.uuid
            ),
            Err(e) => format!("{array}: {e}"),
        },
    ));
    verdict.map_err(|e| anyhow!("RAID verify: {e}"))?;
    Ok(what)
}

/// Hardware RAID through the BMC: pick the controller drives by the
/// plan's rule, then reuse, create or (wipe allowed) replace the named
/// Redfish Volume, and read it back.
pub async fn configure_volume(
    plan: &RaidPlan,
    target: &rackcast_core::model::RedfishTarget,
    image_size: u64,
    ops: &mut Vec<OpRecord>,
) -> Result<String> {
    use rackcast_core::raid::volume::{self, Decision};
    let rule = plan
        .drive_rule
        .as_ref()
        .ok_or_else(|| anyhow!("plan has no drive rule for the RAID volume"))?;
    let (raid_type, volume_type) = volume::redfish_types(&plan.level)
        .ok_or_else(|| anyhow!("RAID level {} unknown", plan.level))?;
    let t = Instant::now();
    let mut st = crate::redfish::RedfishStorage::new(target.clone())?;
    let controllers = match st.controllers().await {
        Ok(c) => c,
        Err(e) => {
            ops.push(OpRecord::timed("raid-inspect", false, t, e.to_string()));
            return Err(e.into());
        }
    };
    // The first controller whose drives satisfy the rule.
    let mut chosen = None;
    for c in &controllers {
        let as_disks: Vec<rackcast_core::model::Disk> = c
            .drives
            .iter()
            .map(|d| rackcast_core::model::Disk {
                name: d.id.clone(),
                path: d.path.clone(),
                size_bytes: d.capacity,
                model: d.model.clone(),
                serial: d.serial.clone(),
                rotational: !d.ssd,
            })
            .collect();
        if let Ok(sel) = rule.select(&as_disks) {
            let picked: Vec<(String, u64)> =
                sel.iter().map(|d| (d.path.clone(), d.size_bytes)).collect();
            chosen = Some((c, picked));
            break;
        }
    }
    let Some((ctrl, picked)) = chosen else {
        let seen = controllers
            .iter()
            .map(|c| format!("{}: {} drives", c.path, c.drives.len()))
            .collect::<Vec<_>>()
            .join("; ");
        let why = format!("no storage controller has drives matching the profile's rule ({seen})");
        ops.push(OpRecord::timed("raid-inspect", false, t, why.clone()));
        bail!(why);
    };
    rackcast_core::model::check_raid_level(&plan.level, picked.len()).map_err(|e| anyhow!(e))?;
    let existing = st.volumes(&ctrl.volumes).await?;
    let w = volume::Wanted {
        name: plan.volume_name.clone(),
        level: plan.level.clone(),
        drives: picked.iter().map(|(p, _)| p.clone()).collect(),
        wipe: plan.wipe,
    };
    let decision = volume::decide(&w, &existing);
    ops.push(OpRecord::timed("raid-inspect",
        !matches!(decision, Decision::Refuse { .. }),
        t,
        format!(
            "controller {} ({}): drives {}; volumes: {}; wanted {raid_type} volume {:?} over {} -> {decision:?}",
            ctrl.path,
            ctrl.name,
            picked
                .iter()
                .map(|(p, s)| format!("{p} ({s} bytes)"))
                .collect::<Vec<_>>()
                .join(", "),
            if existing.is_empty() {
                "none".to_string()
            } else {
                existing
                    .iter()
                    .map(|v| format!("{} {:?}", v.name, v.raid_type.as_ref().or(v.volume_type.as_ref())))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            w.name,
            picked.len()
        ),
    ));
    let sizes: Vec<u64> = picked.iter().map(|(_, s)| *s).collect();
    let body = serde_json::json!({
        "Name": w.name,
        "RAIDType": raid_type,
        // Older BMCs (and the sushy-tools emulator) know only VolumeType.
        "VolumeType": volume_type,
        "CapacityBytes": volume::capacity(&plan.level, &sizes),
        "Links": { "Drives": picked.iter().map(|(p, _)| serde_json::json!({ "@odata.id": p })).collect::<Vec<_>>() },
    });
    let (path, what) = match decision {
        Decision::Refuse { why } => bail!("RAID: {why}"),
        Decision::Reuse(path) => (
            path,
            format!("existing {raid_type} volume {} matches: reused", w.name),
        ),
        Decision::Create | Decision::Replace { .. } => {
            let mut done = String::new();
            if let Decision::Replace { path, why } = &decision {
                let t = Instant::now();
                st.bmc.delete(path).await?;
                ops.push(OpRecord::timed(
                    "redfish-volume-delete",
                    true,
                    t,
                    format!("DELETE {path}: {why}"),
                ));
                done = format!("replaced ({why}); ");
            }
            let t = Instant::now();
            let created = st.bmc.create(&ctrl.volumes, body.clone()).await;
            let loc = match created {
                Ok(l) => l,
                Err(e) => {
                    ops.push(OpRecord::timed(
                        "redfish-volume-create",
                        false,
                        t,
                        e.to_string(),
                    ));
                    return Err(e.into());
                }
            };
            ops.push(OpRecord::timed(
                "redfish-volume-create",
                true,
                t,
                format!(
                    "POST {} {body} -> {}",
                    ctrl.volumes,
                    loc.as_deref().unwrap_or("no Location")
                ),
            ));
            // Without a Location, find it by name.
            let path = match loc {
                Some(l) => l,
                None => st
                    .volumes(&ctrl.volumes)
                    .await?
                    .into_iter()
                    .find(|v| v.name == w.name)
                    .map(|v| v.path)
                    .ok_or_else(|| anyhow!("volume {} not listed after creation", w.name))?,
            };
            (path, format!("{done}created {raid_type} volume {}", w.name))
        }
    };
    // Read back what the controller now reports.
    let t = Instant::now();
    let path = path
        .strip_prefix(&target.url.trim_end_matches('/').to_string())
        .unwrap_or(&path)
        .to_string();
    let v = st.volume(&path).await?;
    let verdict = volume::check(&w, &v).and_then(|()| {
        if v.capacity < image_size {
            Err(format!(
                "volume holds {} bytes, the image needs {image_size}",
                v.capacity
            ))
        } else {
            Ok(())
        }
    });
    ops.push(OpRecord::timed(
        "raid-verify",
        verdict.is_ok(),
        t,
        match &verdict {
            Ok(()) => format!(
                "{path}: {} {} bytes{}",
                v.raid_type
                    .clone()
                    .or(v.volume_type.clone())
                    .unwrap_or_default(),
                v.capacity,
                if v.drives.is_empty() {
                    " (the BMC does not list the volume's drives)".to_string()
                } else {
                    format!(
                        " over {}",
                        v.drives.iter().cloned().collect::<Vec<_>>().join(" ")
                    )
                }
            ),
            Err(e) => format!("{path}: {e}"),
        },
    ));
    verdict.map_err(|e| anyhow!("RAID verify: {e}"))?;
    Ok(what)
}
