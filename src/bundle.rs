//! Deployment-agent bundles: the hardware report a loader sends, and the
//! bundle the appliance generates from it (claims 8, 12, 23, 24).
//!
//! Owns: the inventory and bundle formats, the rules that pick a device
//! profile (DMI vendor/model), driver/tool modules (PCI ids), the RAID
//! member disks and the image target (disk size/model/serial rules, never
//! `/dev/sdX` order), and the content address (BLAKE3) of a bundle. Must
//! not: do I/O. Blob bytes are referenced by hash; the controller stores
//! and serves them, the agent verifies every hash before running anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bundle format version: a loader refuses bundles it does not know.
pub const BUNDLE_VERSION: u16 = 1;

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

/// A program the agent runs on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub argv: Vec<String>,
    pub timeout_s: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BiosPlan {
    /// Wanted attributes (`BootMode = "Uefi"`), for the BIOS backend.
    pub attributes: BTreeMap<String, String>,
    /// Redfish backend: the BMC, with its credentials (bundles are served
    /// to the profile's devices only by hash and never logged).
    #[serde(default)]
    pub redfish: Option<crate::redfish::RedfishTarget>,
    /// Program-runner backend; gets the attributes as `RC_BIOS_<NAME>`.
    pub program: Option<Program>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaidPlan {
    /// `raid0`, `raid1`, `raid5`, `raid6`, `raid10`.
    pub level: String,
    /// Member disks by kernel name (`sda`), chosen by the profile's rule;
    /// the agent maps names to paths from its own inventory, so identical
    /// machines share one bundle.
    pub members: Vec<String>,
    /// The array's path (`/dev/md/rackcast`): the image target.
    #[serde(default)]
    pub array: String,
    /// Destroy a mismatching array or other RAID metadata on the members
    /// instead of failing.
    #[serde(default)]
    pub wipe: bool,
    /// md superblock format for a new array (`1.2`, or `1.0` for RAID1
    /// halves that legacy firmware boots).
    #[serde(default = "md_metadata")]
    pub metadata: String,
    /// Hardware RAID through the BMC (instead of mdadm): a Redfish Volume
    /// named `volume_name` over the controller drives `drive_rule` picks
    /// (on the device: the drives are the controller's, not the OS's).
    #[serde(default)]
    pub redfish: Option<crate::redfish::RedfishTarget>,
    #[serde(default)]
    pub drive_rule: Option<DiskRule>,
    #[serde(default)]
    pub volume_name: String,
    /// Program-runner backend (instead of mdadm); gets `RC_RAID_LEVEL`,
    /// `RC_RAID_MEMBERS` and `RC_RAID_ARRAY`.
    pub program: Option<Program>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePlan {
    pub name: String,
    pub hash: String,
    pub size: u64,
    /// Where the image is written: a disk by kernel name (see
    /// [`RaidPlan::members`]) or the RAID array's path.
    pub target: String,
}

/// What the device's agent does, step by step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub profile: String,
    pub bios: Option<BiosPlan>,
    pub raid: Option<RaidPlan>,
    pub programs: Vec<Program>,
    pub image: ImagePlan,
    pub post_install: Vec<Program>,
    pub boot_to_disk: Option<Program>,
}

/// A file of the bundle, by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub name: String,
    /// BLAKE3, hex.
    pub hash: String,
    pub size: u64,
    pub executable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    pub name: String,
    pub blob: BlobRef,
    /// Run once after the bundle is unpacked (load a driver, install a
    /// tool); `{file}` in argv is the module's path.
    pub load: Option<Program>,
}

/// The bundle: what the loader downloads, verifies and runs. It holds no
/// device identity, so devices of the same hardware and plan share one
/// bundle (one address, built and stored once) and different hardware
/// gets a different one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub version: u16,
    pub arch: String,
    pub agent: BlobRef,
    pub modules: Vec<ModuleRef>,
    pub plan: Plan,
}

impl Bundle {
    /// Canonical bytes; their BLAKE3 is the bundle's address.
    pub fn to_bytes(&self) -> Vec<u8> {
        // postcard of plain data (strings, maps in key order, vectors)
        // cannot fail and is deterministic.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn hash_hex(&self) -> String {
        blake3::hash(&self.to_bytes()).to_hex().to_string()
    }

    /// Parse bundle bytes and check them against the address they were
    /// fetched by.
    pub fn from_verified_bytes(bytes: &[u8], want_hash: &str) -> Result<Bundle, BundleError> {
        let got = blake3::hash(bytes).to_hex().to_string();
        if got != want_hash {
            return Err(BundleError::HashMismatch {
                want: want_hash.to_string(),
                got,
            });
        }
        let b: Bundle =
            postcard::from_bytes(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        if b.version != BUNDLE_VERSION {
            return Err(BundleError::Version(b.version));
        }
        Ok(b)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle hash mismatch: want {want}, got {got}")]
    HashMismatch { want: String, got: String },
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("bundle version {0} is not supported")]
    Version(u16),
    #[error("no device profile matches DMI vendor {vendor:?} model {model:?}")]
    NoProfile { vendor: String, model: String },
    #[error("no agent binary for architecture {0:?}")]
    NoAgent(String),
    #[error("profile {profile}: {why}")]
    Rule { profile: String, why: String },
    #[error("image {0:?} is not in the image store")]
    NoImage(String),
}

/// Glob with `*` only (vendor/model strings are free text).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Which disks a rule picks, robust to their order and count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRule {
    /// `smallest` or `largest` first.
    #[serde(default = "default_order")]
    pub order: String,
    /// How many disks (0 = all that match).
    #[serde(default)]
    pub count: usize,
    /// Only disks whose model matches this glob.
    #[serde(default)]
    pub model: Option<String>,
    /// Only solid-state (true) or rotational (false) disks.
    #[serde(default)]
    pub ssd: Option<bool>,
    #[serde(default)]
    pub min_size_bytes: Option<u64>,
    /// Only the disk with this serial.
    #[serde(default)]
    pub serial: Option<String>,
}

fn default_order() -> String {
    "smallest".into()
}

impl DiskRule {
    /// The disks this rule selects, in rule order (size, then serial and
    /// name as tie-breakers so the choice never depends on probe order).
    pub fn select<'a>(&self, disks: &'a [Disk]) -> Result<Vec<&'a Disk>, String> {
        let mut d: Vec<&Disk> = disks
            .iter()
            .filter(|d| {
                self.model
                    .as_deref()
                    .is_none_or(|m| glob_match(m, &d.model))
            })
            .filter(|d| self.ssd.is_none_or(|s| s != d.rotational))
            .filter(|d| self.min_size_bytes.is_none_or(|m| d.size_bytes >= m))
            .filter(|d| self.serial.as_deref().is_none_or(|s| s == d.serial))
            .collect();
        d.sort_by(|a, b| {
            a.size_bytes
                .cmp(&b.size_bytes)
                .then_with(|| a.serial.cmp(&b.serial))
                .then_with(|| a.name.cmp(&b.name))
        });
        match self.order.as_str() {
            "smallest" => {}
            "largest" => d.reverse(),
            o => {
                return Err(format!(
                    "disk rule order {o:?}: expected smallest or largest"
                ))
            }
        }
        if self.count > 0 {
            if d.len() < self.count {
                return Err(format!(
                    "disk rule wants {} disks, {} match",
                    self.count,
                    d.len()
                ));
            }
            d.truncate(self.count);
        }
        if d.is_empty() {
            return Err("disk rule matches no disk".into());
        }
        Ok(d)
    }
}

fn md_metadata() -> String {
    "1.2".into()
}

/// RAID levels and the member counts they need.
pub fn check_raid_level(level: &str, members: usize) -> Result<(), String> {
    let min = match level {
        "raid0" | "raid1" => 2,
        "raid5" => 3,
        "raid6" | "raid10" => 4,
        other => {
            return Err(format!(
                "RAID level {other:?}: expected raid0, raid1, raid5, raid6 or raid10"
            ))
        }
    };
    if members < min {
        return Err(format!("{level} needs at least {min} disks, got {members}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gb: u64, model: &str, serial: &str, rot: bool) -> Disk {
        Disk {
            name: name.into(),
            path: format!("/dev/{name}"),
            size_bytes: gb << 30,
            model: model.into(),
            serial: serial.into(),
            rotational: rot,
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("PowerEdge R6*", "PowerEdge R650"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*f", "abcde"));
        assert!(glob_match("QEMU", "QEMU"));
        assert!(!glob_match("QEMU", "QEMU2"));
    }

    #[test]
    fn disk_rules_do_not_depend_on_probe_order() {
        let mut disks = vec![
            disk("sda", 960, "SSD-A", "s3", false),
            disk("sdb", 480, "SSD-A", "s2", false),
            disk("sdc", 4000, "HDD-X", "h1", true),
            disk("sdd", 480, "SSD-A", "s1", false),
            disk("sde", 4000, "HDD-X", "h2", true),
        ];
        let os = DiskRule {
            order: "smallest".into(),
            count: 2,
            model: None,
            ssd: Some(true),
            min_size_bytes: None,
            serial: None,
        };
        let pick = |disks: &[Disk]| {
            os.select(disks)
                .map(|v| v.iter().map(|d| d.serial.clone()).collect::<Vec<_>>())
        };
        let first = pick(&disks).unwrap();
        assert_eq!(first, vec!["s1", "s2"]);
        disks.reverse();
        assert_eq!(pick(&disks).unwrap(), first);
        disks.swap(0, 3);
        assert_eq!(pick(&disks).unwrap(), first);

        let data = DiskRule {
            order: "largest".into(),
            count: 0,
            model: Some("HDD-*".into()),
            ssd: None,
            min_size_bytes: None,
            serial: None,
        };
        let got: Vec<_> = data
            .select(&disks)
            .unwrap()
            .iter()
            .map(|d| d.serial.clone())
            .collect();
        assert_eq!(got, vec!["h2", "h1"]);
        let too_many = DiskRule {
            count: 4,
            ..os.clone()
        };
        assert!(too_many.select(&disks).unwrap_err().contains("wants 4"));
        assert!(check_raid_level("raid10", 3).is_err());
        assert!(check_raid_level("raid1", 2).is_ok());
        assert!(check_raid_level("raid7", 9).is_err());
    }

    #[test]
    fn bundle_hash_is_checked() {
        let b = Bundle {
            version: BUNDLE_VERSION,
            arch: "x86_64".into(),
            agent: BlobRef {
                name: "rackcast-agent".into(),
                hash: "00".into(),
                size: 1,
                executable: true,
            },
            modules: vec![],
            plan: Plan {
                profile: "p".into(),
                bios: None,
                raid: None,
                programs: vec![],
                image: ImagePlan {
                    name: "img".into(),
                    hash: "ab".into(),
                    size: 1,
                    target: "/dev/sda".into(),
                },
                post_install: vec![],
                boot_to_disk: None,
            },
        };
        let bytes = b.to_bytes();
        let h = b.hash_hex();
        assert_eq!(Bundle::from_verified_bytes(&bytes, &h).unwrap(), b);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            Bundle::from_verified_bytes(&bad, &h),
            Err(BundleError::HashMismatch { .. })
        ));
        assert!(matches!(
            Bundle::from_verified_bytes(&bytes[..3], &blake3::hash(&bytes[..3]).to_hex()),
            Err(BundleError::Malformed(_))
        ));
    }
}
