//! What a loader reports of its device's hardware: DMI, CPU, memory,
//! NICs, disks and storage controllers.
//!
//! Owns: the inventory's shape (it crosses the wire inside the device
//! protocol's `Hello`/`Inventory` messages, pinned by golden bytes in
//! `wire::device`) and the lookups every side needs (a disk name to its
//! path, the PCI ids). Must not: probe anything (the agent does).

use serde::{Deserialize, Serialize};

/// The machine's SMBIOS/DMI identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    /// System manufacturer (`Dell Inc.`): profiles match it by glob.
    pub vendor: String,
    /// Product name (`PowerEdge R650`): profiles match it by glob.
    pub model: String,
    /// System serial number.
    pub serial: String,
    /// System UUID, when the firmware reports one.
    #[serde(default)]
    pub uuid: String,
}

/// The CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// `x86_64`, `aarch64`, ...: picks the agent binary of the bundle.
    pub arch: String,
    /// Logical CPUs.
    pub count: u32,
    /// Model name, as /proc/cpuinfo has it.
    #[serde(default)]
    pub model: String,
}

/// A network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Kernel name (`eno1`).
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// PCI vendor:device, lower-case hex (`15b3:1017`): selects driver
    /// and tool modules.
    #[serde(default)]
    pub pci_id: Option<String>,
}

/// A disk the OS sees.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name (`sda`, `nvme0n1`) or, in the lab, a label.
    pub name: String,
    /// Device node or file the agent writes to.
    pub path: String,
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Model string: disk rules match it by glob.
    #[serde(default)]
    pub model: String,
    /// Serial number: disk rules match it by glob.
    #[serde(default)]
    pub serial: String,
    /// Spinning disk (`false`: SSD/NVMe).
    #[serde(default)]
    pub rotational: bool,
}

/// A storage controller (RAID HBA, NVMe, SATA).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageController {
    /// PCI vendor:device, lower-case hex: selects modules.
    pub pci_id: String,
    /// Its name, when the system tells.
    #[serde(default)]
    pub name: String,
}

/// What the loader found on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Identity: vendor, model, serial.
    pub dmi: Dmi,
    /// CPUs.
    pub cpu: Cpu,
    /// Installed memory in bytes.
    pub memory_bytes: u64,
    /// Network interfaces.
    pub nics: Vec<Nic>,
    /// Disks.
    pub disks: Vec<Disk>,
    /// Storage controllers.
    #[serde(default)]
    pub storage_controllers: Vec<StorageController>,
}

impl Inventory {
    /// A plan's disk reference: a disk name of this inventory maps to its
    /// path; anything else (an array path) is used as it is.
    pub fn resolve_disk(&self, target: &str) -> String {
        self.disks
            .iter()
            .find(|d| d.name == target)
            .map_or_else(|| target.to_string(), |d| d.path.clone())
    }

    /// Every PCI id on the device (NICs and storage controllers).
    pub fn pci_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .nics
            .iter()
            .filter_map(|n| n.pci_id.clone())
            .chain(self.storage_controllers.iter().map(|c| c.pci_id.clone()))
            .map(|s| s.to_ascii_lowercase())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}
