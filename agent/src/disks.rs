//! Disk safety on the device: the disk a plan means, found again in this
//! boot's enumeration by serial and size (never by kernel name, which can
//! change between boots), and the refusals before anything is written.
//!
//! Owns: resolving a plan's [`DiskId`] against the inventory, and the
//! checks on a write target: it exists (nothing is ever created in its
//! place), it is not mounted, not the agent's own root, not in use by
//! another device (md, dm), and holds no filesystem or partition table
//! unless the plan says wipe (`blkid -p`). Must not: write to a disk.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use rackcast_core::model::{Disk, DiskId, ImagePlan, Inventory};

/// The one disk of `inv` with `id`'s serial and size.
pub(crate) fn resolve<'a>(inv: &'a Inventory, id: &DiskId) -> Result<&'a Disk> {
    let same = |d: &&Disk| d.serial.trim() == id.serial && d.size_bytes == id.size_bytes;
    let found: Vec<&Disk> = inv.disks.iter().filter(same).collect();
    match found.as_slice() {
        [d] => Ok(d),
        [] => {
            let by_serial = inv
                .disks
                .iter()
                .find(|d| d.serial.trim() == id.serial)
                .map(|d| format!(" (a disk with that serial is {} bytes)", d.size_bytes))
                .unwrap_or_default();
            bail!(
                "no disk with serial {:?} and {} bytes on this machine{by_serial}: refusing to write any other",
                id.serial,
                id.size_bytes
            )
        }
        many => bail!(
            "{} disks have serial {:?} and {} bytes ({}): refusing to guess",
            many.len(),
            id.serial,
            id.size_bytes,
            many.iter()
                .map(|d| d.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The path of a plan's image target in this boot: its disk by serial
/// and size, or the array's path.
pub(crate) fn image_target(inv: &Inventory, image: &ImagePlan) -> Result<String> {
    match &image.target_disk {
        Some(id) => Ok(resolve(inv, id)?.path.clone()),
        None => Ok(inv.resolve_disk(&image.target)),
    }
}

/// Check that `path` may be written as a whole-disk target; `wipe`: a
/// filesystem or partition table on it may be overwritten. Returns what
/// was checked, for the device's log.
pub(crate) fn check_target(path: &Path, wipe: bool) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "target {} does not exist: refusing (nothing is created in its place)",
            path.display()
        )
    })?;
    let mut checked = vec![format!("{} exists", path.display())];
    if meta.file_type().is_block_device() {
        let (major, minor) = split_dev(meta.rdev());
        let ours = with_partitions(major, minor);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for (mm, mountpoint) in mounted(&mountinfo) {
            if ours.contains(&mm) {
                if mountpoint == "/" {
                    bail!(
                        "{} holds this agent's own root filesystem: refusing",
                        path.display()
                    );
                }
                bail!(
                    "{} (or a partition of it) is mounted on {mountpoint}: refusing",
                    path.display()
                );
            }
        }
        checked.push("not mounted".into());
        let holders = std::fs::read_dir(format!("/sys/dev/block/{major}:{minor}/holders"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !holders.is_empty() {
            bail!(
                "{} is in use by {}: refusing",
                path.display(),
                holders.join(", ")
            );
        }
        checked.push("no holders".into());
    }
    match signatures(path)? {
        None => checked.push("no filesystem or partition table (blkid)".into()),
        Some(found) if wipe => checked.push(format!("holds {found}; the plan says wipe")),
        Some(found) => bail!(
            "{} holds {found} (blkid): refusing to overwrite it; the profile's `wipe = true` or an operator's `rackcast reinstall` allows it",
            path.display()
        ),
    }
    Ok(checked.join(", "))
}

/// A `dev_t` as (major, minor), glibc's encoding.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// `(major, minor)` of a disk and of each of its partitions.
fn with_partitions(major: u32, minor: u32) -> Vec<(u32, u32)> {
    let mut out = vec![(major, minor)];
    if let Ok(dir) = std::fs::read_dir(format!("/sys/dev/block/{major}:{minor}")) {
        for e in dir.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Some(mm) = std::fs::read_to_string(p.join("dev"))
                    .ok()
                    .and_then(|s| parse_mm(s.trim()))
                {
                    out.push(mm);
                }
            }
        }
    }
    out
}

fn parse_mm(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `(major:minor, mount point)` of every mount in a mountinfo text.
fn mounted(mountinfo: &str) -> Vec<((u32, u32), String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let mm = parse_mm(f.nth(2)?)?;
            let _root = f.next()?;
            let point = f.next()?;
            Some((mm, point.to_string()))
        })
        .collect()
}

/// What `blkid -p` finds on `path` (a filesystem, RAID member, partition
/// table), or `None`. blkid missing or failing is an error: the check
/// fails closed.
fn signatures(path: &Path) -> Result<Option<String>> {
    let blkid = ["/sbin/blkid", "/usr/sbin/blkid"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("blkid");
    let out = std::process::Command::new(blkid)
        .args(["-p", "-o", "export"])
        .arg(path)
        .output()
        .with_context(|| {
            format!(
                "running {blkid} (util-linux) to check {} for filesystems",
                path.display()
            )
        })?;
    // 2: nothing found (util-linux); 0: found.
    match out.status.code() {
        Some(2) => Ok(None),
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(describe(&text).or(Some("an unknown signature".into())))
        }
        _ => bail!(
            "{blkid} -p {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// "an ext4 filesystem", "a gpt partition table", ... from blkid's
/// export lines.
fn describe(export: &str) -> Option<String> {
    let get = |k: &str| {
        export
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    match (get("PTTYPE"), get("TYPE")) {
        (Some(pt), _) => Some(format!("a {pt} partition table")),
        (None, Some(t)) => Some(format!("a {t} signature")),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str, size: u64) -> Disk {
        Disk {
            name: name.into(),
            path: format!("/dev/{name}"),
            size_bytes: size,
            serial: serial.into(),
            ..Default::default()
        }
    }

    /// Kernel names moved between boots (sda is now sdb): the plan's disk
    /// is found by serial and size, never by name; no match or two
    /// matches is a refusal.
    #[test]
    fn the_plans_disk_is_found_by_serial_and_size_only() {
        let id = DiskId {
            serial: "B1".into(),
            size_bytes: 100,
        };
        let inv = Inventory {
            disks: vec![disk("sda", "S1", 50), disk("sdb", "B1", 100)],
            ..Default::default()
        };
        assert_eq!(resolve(&inv, &id).unwrap().path, "/dev/sdb");
        let resized = Inventory {
            disks: vec![disk("sda", "B1", 90)],
            ..Default::default()
        };
        let e = resolve(&resized, &id).unwrap_err().to_string();
        assert!(
            e.contains("no disk with serial") && e.contains("90 bytes"),
            "{e}"
        );
        let gone = Inventory {
            disks: vec![disk("sda", "S1", 100)],
            ..Default::default()
        };
        assert!(resolve(&gone, &id).is_err());
        let twins = Inventory {
            disks: vec![disk("sda", "B1", 100), disk("sdb", "B1", 100)],
            ..Default::default()
        };
        assert!(resolve(&twins, &id)
            .unwrap_err()
            .to_string()
            .contains("refusing to guess"));
    }

    #[test]
    fn mountinfo_lines_give_device_numbers_and_mount_points() {
        let text = "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n\
                    23 22 8:17 / /srv rw - xfs /dev/sdb1 rw\n\
                    24 22 0:21 / /proc rw - proc proc rw\n";
        let m = mounted(text);
        assert_eq!(m[0], ((8, 2), "/".to_string()));
        assert_eq!(m[1], ((8, 17), "/srv".to_string()));
        assert_eq!(m.len(), 3);
    }

    /// A missing target is refused (and not created); a file holding an
    /// ext4 filesystem (made by Debian's mkfs.ext4) is refused unless the
    /// plan says wipe; an empty one passes.
    #[test]
    fn targets_are_refused_when_missing_or_holding_a_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("sdz");
        let e = check_target(&missing, true).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(!missing.exists());
        let blank = dir.path().join("blank");
        std::fs::write(&blank, vec![0xAAu8; 4 << 20]).unwrap();
        let ok = check_target(&blank, false).unwrap();
        assert!(ok.contains("no filesystem"), "{ok}");
        let fs = dir.path().join("fs");
        std::fs::write(&fs, vec![0u8; 8 << 20]).unwrap();
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&fs)
            .status();
        if !mkfs.is_ok_and(|s| s.success()) {
            panic!("mkfs.ext4 (e2fsprogs) is needed for this test");
        }
        let e = check_target(&fs, false).unwrap_err().to_string();
        assert!(e.contains("ext4") && e.contains("refusing"), "{e}");
        let ok = check_target(&fs, true).unwrap();
        assert!(ok.contains("the plan says wipe"), "{ok}");
    }

    #[test]
    fn blkid_export_is_described() {
        assert_eq!(
            describe("DEVNAME=/x\nTYPE=ext4\nUSAGE=filesystem\n").as_deref(),
            Some("a ext4 signature")
        );
        assert_eq!(
            describe("PTUUID=1\nPTTYPE=gpt\n").as_deref(),
            Some("a gpt partition table")
        );
        assert_eq!(describe("DEVNAME=/x\n"), None);
    }
}
