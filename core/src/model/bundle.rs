//! Deployment-agent bundles: what the appliance generates from a device's
//! inventory (claims 8, 12, 23, 24) and the loader downloads.
//!
//! Owns: the bundle format (agent, driver/tool modules by PCI id, the
//! plan), its canonical bytes and content address (BLAKE3), and the
//! check of fetched bytes against that address. Must not: do I/O. Blob bytes are referenced by hash; the controller stores
//! and serves them, the agent verifies every hash before running anything.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Plan, Program};

/// Bundle format version: a loader refuses bundles it does not know.
pub const BUNDLE_VERSION: u16 = 3;

/// A file of the bundle, by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// File name in the unpacked bundle.
    pub name: String,
    /// BLAKE3, hex.
    pub hash: String,
    /// Bytes.
    pub size: u64,
    /// Unpacked with the executable bit.
    pub executable: bool,
}

/// A driver or tool module the device's PCI ids selected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    /// The module's name in the catalogue.
    pub name: String,
    /// Its file.
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
    /// [`BUNDLE_VERSION`].
    pub version: u16,
    /// The CPU architecture its agent is built for.
    pub arch: String,
    /// The deployment agent binary.
    pub agent: BlobRef,
    /// Modules for the device's hardware.
    pub modules: Vec<ModuleRef>,
    /// What the agent does.
    pub plan: Plan,
}

impl Bundle {
    /// Canonical bytes; their BLAKE3 is the bundle's address.
    pub fn to_bytes(&self) -> Vec<u8> {
        // postcard of plain data (strings, maps in key order, vectors)
        // cannot fail and is deterministic.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// The bundle's address: BLAKE3 of [`Self::to_bytes`], hex.
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

/// Why a bundle could not be used or built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BundleError {
    /// The fetched bytes are not the bundle asked for.
    #[error("bundle hash mismatch: want {want}, got {got}")]
    HashMismatch {
        /// The address asked for.
        want: String,
        /// The BLAKE3 of what arrived.
        got: String,
    },
    /// The bytes do not decode.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// A format this agent does not know.
    #[error("bundle version {0} is not supported")]
    Version(u16),
    /// No profile fits the hardware.
    #[error("no device profile matches DMI vendor {vendor:?} model {model:?}")]
    NoProfile {
        /// The device's DMI vendor.
        vendor: String,
        /// The device's DMI model.
        model: String,
    },
    /// No agent binary for the device's CPU.
    #[error("no agent binary for architecture {0:?}")]
    NoAgent(String),
    /// A profile's rule cannot be met on this hardware.
    #[error("profile {profile}: {why}")]
    Rule {
        /// The profile.
        profile: String,
        /// What failed.
        why: String,
    },
    /// The profile names an image the store does not have.
    #[error("image {0:?} is not in the image store")]
    NoImage(String),
}

#[cfg(test)]
mod tests {
    use crate::model::*;

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
                    target_disk: None,
                    wipe: false,
                },
                post_install: vec![],
                boot_to_disk: None,
                seed: None,
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
