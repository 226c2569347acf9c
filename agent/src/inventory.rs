//! Hardware inventory of the device the agent runs on: DMI, CPU, memory,
//! NICs with PCI ids, disks, storage controllers, read from /sys and
//! /proc. A lab device passes `--hardware FILE` (JSON of the same shape)
//! instead: its namespace has no hardware of its own.

use std::fs;
use std::path::Path;

use rackcast_core::model::{Cpu, Disk, Dmi, Inventory, Nic, StorageController};

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `0x15b3` + `0x1017` -> `15b3:1017`.
fn pci_id(dev: &Path) -> Option<String> {
    let v = read(dev.join("vendor"));
    let d = read(dev.join("device"));
    let v = v.strip_prefix("0x")?;
    let d = d.strip_prefix("0x")?;
    Some(format!("{v}:{d}").to_ascii_lowercase())
}

pub fn probe() -> Inventory {
    let dmi = Dmi {
        vendor: read("/sys/class/dmi/id/sys_vendor"),
        model: read("/sys/class/dmi/id/product_name"),
        serial: read("/sys/class/dmi/id/product_serial"),
        uuid: read("/sys/class/dmi/id/product_uuid"),
    };
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = Cpu {
        arch: std::env::consts::ARCH.to_string(),
        count: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default(),
    };
    let memory_bytes = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let mut nics = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            let p = e.path();
            nics.push(Nic {
                mac: read(p.join("address")),
                pci_id: pci_id(&p.join("device")),
                name,
            });
        }
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    let mut disks = Vec::new();
    let mut controllers = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "md", "sr"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                continue;
            }
            let p = e.path();
            let sectors: u64 = read(p.join("size")).parse().unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            disks.push(Disk {
                path: format!("/dev/{name}"),
                size_bytes: sectors * 512,
                model: read(p.join("device/model")),
                // SCSI/SATA/NVMe disks name it under device/; virtio-blk
                // beside it; a WWN where there is no serial.
                serial: [
                    p.join("device/serial"),
                    p.join("serial"),
                    p.join("wwid"),
                    p.join("device/wwid"),
                ]
                .iter()
                .map(read)
                .find(|s| !s.is_empty())
                .unwrap_or_default(),
                rotational: read(p.join("queue/rotational")) == "1",
                name,
            });
            // The controller is the PCI function above the disk.
            if let Ok(real) = fs::canonicalize(p.join("device")) {
                if let Some(ctrl) = real.ancestors().find(|a| pci_id(a).is_some()) {
                    if let Some(id) = pci_id(ctrl) {
                        if !controllers
                            .iter()
                            .any(|c: &StorageController| c.pci_id == id)
                        {
                            controllers.push(StorageController {
                                pci_id: id,
                                name: ctrl
                                    .file_name()
                                    .map(|n| n.to_string_lossy().into_owned())
                                    .unwrap_or_default(),
                            });
                        }
                    }
                }
            }
        }
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Inventory {
        dmi,
        cpu,
        memory_bytes,
        nics,
        disks,
        storage_controllers: controllers,
    }
}

/// The lab's stand-in for real hardware.
pub fn from_file(path: &Path) -> anyhow::Result<Inventory> {
    let text = fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("hardware file {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("hardware file {}: {e}", path.display()))
}

/// Running from an installed OS rather than the network-booted loader
/// (whose root is a RAM filesystem).
pub fn os_present() -> bool {
    read("/proc/mounts")
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        .is_some_and(|fs| fs != "rootfs" && fs != "tmpfs" && fs != "ramfs")
}

/// Disks given by path (`--disk`) keep the serial, model and kind the
/// enumeration (or hardware description) found at the same path: plans
/// name disks by serial, so a disk without one cannot be written.
pub fn keep_identity(named: Vec<Disk>, enumerated: &[Disk]) -> Vec<Disk> {
    named
        .into_iter()
        .map(|mut d| {
            if let Some(k) = enumerated.iter().find(|k| k.path == d.path) {
                d.serial = k.serial.clone();
                d.model = k.model.clone();
                d.rotational = k.rotational;
            }
            d
        })
        .collect()
}

/// Disks given by path (`--disk`): size from the file or block device,
/// name from the file name.
pub fn disks_from_paths(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<Disk>> {
    use std::io::{Seek, SeekFrom};
    let mut out = Vec::new();
    for p in paths {
        let mut f = fs::File::open(p).map_err(|e| anyhow::anyhow!("disk {}: {e}", p.display()))?;
        // Seeking to the end gives the size of files and block devices alike.
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(|e| anyhow::anyhow!("disk {}: {e}", p.display()))?;
        let name = p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        out.push(Disk {
            name,
            path: p.display().to_string(),
            size_bytes: size,
            model: String::new(),
            serial: String::new(),
            rotational: false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, serial: &str) -> Disk {
        Disk {
            name: path.rsplit('/').next().unwrap_or(path).to_string(),
            path: path.to_string(),
            size_bytes: 1 << 30,
            model: if serial.is_empty() { "" } else { "SSD" }.to_string(),
            serial: serial.to_string(),
            rotational: false,
        }
    }

    /// An agent started from an installed OS names its disks by path;
    /// they keep the serial the enumeration found there, and a path the
    /// enumeration does not know stays without one (refused later).
    #[test]
    fn disks_named_by_path_keep_their_serial() {
        let enumerated = [disk("/dev/sda", "S1"), disk("/dev/sdb", "S2")];
        let named = vec![disk("/dev/sdb", ""), disk("/var/tmp/x.img", "")];
        let kept = keep_identity(named, &enumerated);
        assert_eq!(kept[0].serial, "S2");
        assert_eq!(kept[0].model, "SSD");
        assert_eq!(kept[1].serial, "");
    }
}
