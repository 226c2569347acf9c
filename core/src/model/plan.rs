//! The deployment plan the appliance generates for a device: BIOS, RAID,
//! programs, the image and its target, and the disk rules that pick
//! disks by size/model/serial, never by `/dev/sdX` order.
//!
//! Owns: the plan types (carried inside the bundle) and the rules'
//! evaluation over an [`Inventory`]. Must not: do I/O or choose a
//! profile (the appliance's builder does).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Disk, RedfishTarget};

/// A program the agent runs on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// Its name in the device's log.
    pub name: String,
    /// Program and arguments (`{file}` stands for a module's path).
    pub argv: Vec<String>,
    /// Killed after this many seconds.
    pub timeout_s: u64,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The BIOS step: wanted attributes and the backend that sets them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BiosPlan {
    /// Wanted attributes (`BootMode = "Uefi"`), for the BIOS backend.
    pub attributes: BTreeMap<String, String>,
    /// Redfish backend: the BMC, with its credentials (bundles are served
    /// to the profile's devices only by hash and never logged).
    #[serde(default)]
    pub redfish: Option<RedfishTarget>,
    /// Program-runner backend; gets the attributes as `RC_BIOS_<NAME>`.
    pub program: Option<Program>,
}

/// The RAID step: md array, hardware volume through the BMC, or a
/// program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaidPlan {
    /// `raid0`, `raid1`, `raid5`, `raid6`, `raid10`.
    pub level: String,
    /// Member disks by kernel name (`sda`), chosen by the profile's rule;
    /// the agent maps names to paths from its own inventory, so identical
    /// machines share one bundle.
    pub members: Vec<String>,
    /// The members by serial and size, in the order of `members`.
    #[serde(default)]
    pub member_disks: Vec<DiskId>,
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
    pub redfish: Option<RedfishTarget>,
    /// Which controller drives form the volume.
    #[serde(default)]
    pub drive_rule: Option<DiskRule>,
    /// The volume's name (reused when it matches).
    #[serde(default)]
    pub volume_name: String,
    /// Program-runner backend (instead of mdadm); gets `RC_RAID_LEVEL`,
    /// `RC_RAID_MEMBERS` and `RC_RAID_ARRAY`.
    pub program: Option<Program>,
}

/// The image step: which image, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePlan {
    /// The image's name in the appliance's store.
    pub name: String,
    /// Its whole BLAKE3, hex.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where the image is written: a disk by kernel name (see
    /// [`RaidPlan::members`]) or the RAID array's path. For a disk, the
    /// name is what the inventory said; the agent finds the disk by
    /// [`ImagePlan::target_disk`].
    pub target: String,
    /// The target disk by serial and size (`None`: an array): the agent
    /// writes only the disk of this boot's enumeration that matches.
    #[serde(default)]
    pub target_disk: Option<DiskId>,
    /// Write over a disk that holds a filesystem or partition table (the
    /// profile's `wipe`, or an operator's reinstall); without it such a
    /// disk is refused.
    #[serde(default)]
    pub wipe: bool,
}

/// A disk as a plan names it: by what stays when kernel names change
/// between boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    /// Its serial number (or WWN) as the inventory reported it.
    pub serial: String,
    /// Its capacity in bytes.
    pub size_bytes: u64,
}

impl DiskId {
    /// The identity of an inventoried disk; `None` without a serial (such
    /// a disk cannot be told apart safely).
    pub fn of(d: &Disk) -> Option<DiskId> {
        let serial = d.serial.trim();
        (!serial.is_empty()).then(|| DiskId {
            serial: serial.to_string(),
            size_bytes: d.size_bytes,
        })
    }
}

/// What the device's agent does, step by step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The device profile that made it.
    pub profile: String,
    /// BIOS settings (`None`: the step is skipped).
    pub bios: Option<BiosPlan>,
    /// RAID (`None`: skipped).
    pub raid: Option<RaidPlan>,
    /// Configuration programs, before the image.
    pub programs: Vec<Program>,
    /// The image and its target.
    pub image: ImagePlan,
    /// Programs after the image is verified.
    pub post_install: Vec<Program>,
    /// Makes the device boot its disk next.
    pub boot_to_disk: Option<Program>,
    /// The machine's identity for its installed OS: a cloud-init NoCloud
    /// seed written into the image after it is verified (`None`: the
    /// step is skipped).
    #[serde(default)]
    pub seed: Option<Seed>,
}

/// A cloud-init NoCloud seed, rendered from the profile's templates over
/// the device's facts when its bundle is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    /// `meta-data`: `instance-id` and `local-hostname`.
    pub meta_data: String,
    /// `user-data`: SSH keys and whatever the template adds.
    pub user_data: String,
    /// `network-config` (version 2), if the profile has one.
    pub network_config: Option<String>,
}

impl Plan {
    /// The plan without its secrets (BMC passwords): what the fleet
    /// record keeps. The bundle, served only to its device over TLS,
    /// carries them; the record, read by reports and backups, does not.
    pub fn without_secrets(mut self) -> Plan {
        let targets = [
            self.bios.as_mut().and_then(|b| b.redfish.as_mut()),
            self.raid.as_mut().and_then(|r| r.redfish.as_mut()),
        ];
        for t in targets.into_iter().flatten() {
            t.password.clear();
        }
        self
    }
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
    /// Only disks at least this large.
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

    #[test]
    fn the_record_plan_has_no_bmc_password() {
        let bmc = RedfishTarget {
            url: "https://bmc".into(),
            username: "root".into(),
            password: "s3cret".into(),
            system: None,
            reset: "ForceRestart".into(),
            tls_verify: false,
            settle_timeout_s: 60,
        };
        let plan = Plan {
            profile: "p".into(),
            bios: Some(BiosPlan {
                attributes: BTreeMap::new(),
                redfish: Some(bmc.clone()),
                program: None,
            }),
            raid: Some(RaidPlan {
                level: "raid1".into(),
                members: vec![],
                member_disks: vec![],
                array: String::new(),
                wipe: false,
                metadata: md_metadata(),
                redfish: Some(bmc),
                drive_rule: None,
                volume_name: "v".into(),
                program: None,
            }),
            programs: vec![],
            image: ImagePlan {
                name: "i".into(),
                hash: "h".into(),
                size: 1,
                target: "sda".into(),
                target_disk: None,
                wipe: false,
            },
            post_install: vec![],
            boot_to_disk: None,
            seed: None,
        };
        let json = serde_json::to_string(&plan.clone().without_secrets()).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("root"), "the rest stays: {json}");
        assert!(serde_json::to_string(&plan).unwrap().contains("s3cret"));
    }
}
