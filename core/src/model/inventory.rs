//! What a loader reports of its device's hardware: DMI, CPU, memory,
//! NICs, disks and storage controllers.
//!
//! Owns: the inventory's shape (it crosses the wire inside the device
//! protocol's `Hello`/`Inventory` messages, pinned by golden bytes in
//! `wire::device`) and the lookups every side needs (a disk name to its
//! path, the PCI ids). Must not: probe anything (the agent does).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    pub vendor: String,
    pub model: String,
    pub serial: String,
    #[serde(default)]
    pub uuid: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    pub count: u32,
    #[serde(default)]
    pub model: String,
}

/// PCI vendor:device, lower-case hex (`15b3:1017`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    #[serde(default)]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name (`sda`, `nvme0n1`) or, in the lab, a label.
    pub name: String,
    /// Device node or file the agent writes to.
    pub path: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub rotational: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageController {
    pub pci_id: String,
    #[serde(default)]
    pub name: String,
}

/// What the loader found on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub dmi: Dmi,
    pub cpu: Cpu,
    pub memory_bytes: u64,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
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
