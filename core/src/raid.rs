//! Linux software RAID, declarative: the array a plan wants, what the
//! disks hold now (as `mdadm --export` reports it), and what to do.
//!
//! Owns: parsing `mdadm --detail --export` and `mdadm --examine --export`,
//! the decision (reuse a matching array, assemble one that is there but
//! stopped, create on blank disks, refuse or wipe on anything else) and
//! the verification after. Must not: run mdadm (the agent does, logging
//! each command) or pick the member disks (the bundle's disk rule did).

use std::collections::{BTreeMap, BTreeSet};

/// `KEY=value` lines of `mdadm --export` output.
pub fn parse_export(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('\'').trim_matches('"').to_string(),
            )
        })
        .collect()
}

/// A running array (`mdadm --detail --export ARRAY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayState {
    /// `raid1`, ...
    pub level: String,
    /// Members the array is made of.
    pub raid_devices: usize,
    /// The array's UUID.
    pub uuid: String,
    /// Member device paths (`MD_DEVICE_*_DEV`).
    pub members: BTreeSet<String>,
}

impl ArrayState {
    /// From `mdadm --detail --export` output; `None` if it lists no array.
    pub fn from_detail(text: &str) -> Option<ArrayState> {
        let kv = parse_export(text);
        let members = kv
            .iter()
            .filter(|(k, _)| k.starts_with("MD_DEVICE_") && k.ends_with("_DEV"))
            .map(|(_, v)| v.clone())
            .collect();
        Some(ArrayState {
            level: kv.get("MD_LEVEL")?.clone(),
            raid_devices: kv.get("MD_DEVICES")?.parse().ok()?,
            uuid: kv.get("MD_UUID").cloned().unwrap_or_default(),
            members,
        })
    }
}

/// What a member disk's md superblock says (`mdadm --examine --export`);
/// `None` when it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    /// The level of the array it belongs to.
    pub level: String,
    /// That array's member count.
    pub raid_devices: usize,
    /// That array's UUID.
    pub uuid: String,
}

impl MemberState {
    /// From `mdadm --examine --export` output; `None` without a superblock.
    pub fn from_examine(text: &str) -> Option<MemberState> {
        let kv = parse_export(text);
        Some(MemberState {
            level: kv.get("MD_LEVEL")?.clone(),
            raid_devices: kv.get("MD_DEVICES")?.parse().ok()?,
            uuid: kv.get("MD_UUID")?.clone(),
        })
    }
}

/// The array a plan wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// `raid0`, `raid1`, `raid5`, `raid6`, `raid10`.
    pub level: String,
    /// Member device paths, resolved from the plan's disk names.
    pub members: BTreeSet<String>,
    /// Destroy a mismatching array or foreign superblocks instead of failing.
    pub wipe: bool,
}

/// What to do about the array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The array is running as wanted: nothing to do.
    Reuse,
    /// The members carry one matching array that is not running.
    Assemble,
    /// Blank members: create the array.
    Create,
    /// Something else is there and the profile allows wiping: stop the
    /// running array (if any), zero the members' superblocks, create.
    WipeAndCreate {
        /// What was there.
        why: String,
    },
    /// Something else is there: the step fails with this reason.
    Refuse {
        /// What was there.
        why: String,
    },
}

fn matches(level: &str, devices: usize, w: &Wanted) -> bool {
    level == w.level && devices == w.members.len()
}

/// Decide from the running array at the wanted path (if any) and each
/// member's superblock.
pub fn decide(
    w: &Wanted,
    running: Option<&ArrayState>,
    members: &BTreeMap<String, Option<MemberState>>,
) -> Decision {
    let other = |why: String| {
        if w.wipe {
            Decision::WipeAndCreate { why }
        } else {
            Decision::Refuse {
                why: format!("{why}; the profile does not allow wiping (raid.wipe)"),
            }
        }
    };
    if let Some(a) = running {
        if matches(&a.level, a.raid_devices, w) && a.members == w.members {
            return Decision::Reuse;
        }
        return other(format!(
            "a different array is running: {} over {} ({} devices), wanted {} over {}",
            a.level,
            a.members.iter().cloned().collect::<Vec<_>>().join(" "),
            a.raid_devices,
            w.level,
            w.members.iter().cloned().collect::<Vec<_>>().join(" ")
        ));
    }
    let found: Vec<(&String, &MemberState)> = members
        .iter()
        .filter_map(|(d, m)| m.as_ref().map(|m| (d, m)))
        .collect();
    if found.is_empty() {
        return Decision::Create;
    }
    let uuids: BTreeSet<&str> = found.iter().map(|(_, m)| m.uuid.as_str()).collect();
    let all_members = found.len() == w.members.len();
    if all_members && uuids.len() == 1 && matches(&found[0].1.level, found[0].1.raid_devices, w) {
        return Decision::Assemble;
    }
    other(format!(
        "the disks carry other RAID metadata: {}",
        found
            .iter()
            .map(|(d, m)| format!(
                "{d}: {} of {} devices, array {}",
                m.level, m.raid_devices, m.uuid
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// After create/assemble: the array runs as wanted.
pub fn verify(w: &Wanted, a: &ArrayState) -> Result<(), String> {
    if !matches(&a.level, a.raid_devices, w) {
        return Err(format!(
            "array is {} with {} devices, wanted {} with {}",
            a.level,
            a.raid_devices,
            w.level,
            w.members.len()
        ));
    }
    if a.members != w.members {
        return Err(format!(
            "array members are {:?}, wanted {:?}",
            a.members, w.members
        ));
    }
    Ok(())
}

/// Bytes an array of `level` over members of these (usable) sizes holds:
/// the smallest member bounds every one.
pub fn capacity(level: &str, sizes: &[u64]) -> u64 {
    let n = sizes.len() as u64;
    let min = sizes.iter().copied().min().unwrap_or(0);
    match level {
        "raid0" => min * n,
        "raid1" => min,
        "raid5" => min * n.saturating_sub(1),
        "raid6" => min * n.saturating_sub(2),
        "raid10" => min * n / 2,
        _ => 0,
    }
}

/// md's `--name` for an array path: `/dev/md/rackcast` -> `rackcast`.
pub fn array_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/dev/md/")?;
    (!name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'))
    .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETAIL: &str = "MD_LEVEL=raid1\nMD_DEVICES=2\nMD_METADATA=1.2\n\
        MD_UUID=0e5a3b1c:11111111:22222222:33333333\nMD_DEVNAME=rackcast\n\
        MD_DEVICE_dev_vdb_ROLE=0\nMD_DEVICE_dev_vdb_DEV=/dev/vdb\n\
        MD_DEVICE_dev_vdc_ROLE=1\nMD_DEVICE_dev_vdc_DEV=/dev/vdc\n";
    const EXAMINE: &str = "MD_LEVEL=raid1\nMD_DEVICES=2\nMD_NAME=any:rackcast\n\
        MD_UUID=0e5a3b1c:11111111:22222222:33333333\nMD_UPDATE_TIME=1795665891\n\
        MD_DEV_UUID=aaaa:bbbb:cccc:dddd\nMD_EVENTS=17\n";

    fn wanted(level: &str, m: &[&str], wipe: bool) -> Wanted {
        Wanted {
            level: level.into(),
            members: m.iter().map(|s| s.to_string()).collect(),
            wipe,
        }
    }

    fn members(m: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<MemberState>> {
        m.iter()
            .map(|(d, t)| (d.to_string(), t.and_then(MemberState::from_examine)))
            .collect()
    }

    #[test]
    fn mdadm_export_output_is_read() {
        let a = ArrayState::from_detail(DETAIL).unwrap();
        assert_eq!(a.level, "raid1");
        assert_eq!(a.raid_devices, 2);
        assert_eq!(a.members.len(), 2);
        let m = MemberState::from_examine(EXAMINE).unwrap();
        assert_eq!(m.uuid, a.uuid);
        // No superblock: mdadm prints nothing useful.
        assert_eq!(MemberState::from_examine(""), None);
        assert_eq!(ArrayState::from_detail("MD_LEVEL=raid1\n"), None);
    }

    #[test]
    fn decisions() {
        let w = wanted("raid1", &["/dev/vdb", "/dev/vdc"], false);
        let a = ArrayState::from_detail(DETAIL).unwrap();
        let blank = members(&[("/dev/vdb", None), ("/dev/vdc", None)]);
        let ours = members(&[("/dev/vdb", Some(EXAMINE)), ("/dev/vdc", Some(EXAMINE))]);
        assert_eq!(decide(&w, Some(&a), &ours), Decision::Reuse);
        assert_eq!(decide(&w, None, &ours), Decision::Assemble);
        assert_eq!(decide(&w, None, &blank), Decision::Create);
        // One member still blank (replaced disk) or another level: not ours.
        let half = members(&[("/dev/vdb", Some(EXAMINE)), ("/dev/vdc", None)]);
        assert!(matches!(decide(&w, None, &half), Decision::Refuse { .. }));
        let w0 = wanted("raid0", &["/dev/vdb", "/dev/vdc"], false);
        let Decision::Refuse { why } = decide(&w0, Some(&a), &ours) else {
            panic!()
        };
        assert!(why.contains("raid1") && why.contains("raid.wipe"), "{why}");
        let w0 = wanted("raid0", &["/dev/vdb", "/dev/vdc"], true);
        assert!(matches!(
            decide(&w0, None, &ours),
            Decision::WipeAndCreate { .. }
        ));
        // Other members than the running array's.
        let w3 = wanted("raid1", &["/dev/vdb", "/dev/vdd"], false);
        assert!(matches!(
            decide(&w3, Some(&a), &ours),
            Decision::Refuse { .. }
        ));
        assert!(verify(&w, &a).is_ok());
        assert!(verify(&w3, &a).is_err());
    }

    #[test]
    fn array_names() {
        assert_eq!(array_name("/dev/md/rackcast"), Some("rackcast"));
        assert_eq!(array_name("/dev/md0"), None);
        assert_eq!(array_name("/dev/md/a/b"), None);
    }
}

/// Hardware RAID through Redfish: the Volume a plan wants on a storage
/// controller, and what the controller reports.
pub mod volume {
    use std::collections::BTreeSet;

    /// Redfish vocabulary for a level: `RAIDType` (Volume v1.3+) and the
    /// older `VolumeType`, which some BMCs still report alone.
    pub fn redfish_types(level: &str) -> Option<(&'static str, &'static str)> {
        Some(match level {
            "raid0" => ("RAID0", "NonRedundant"),
            "raid1" => ("RAID1", "Mirrored"),
            "raid5" => ("RAID5", "StripedWithParity"),
            "raid6" => ("RAID6", "StripedWithParity"),
            "raid10" => ("RAID10", "SpannedMirrors"),
            _ => return None,
        })
    }

    pub use super::capacity;

    /// A volume the controller reports.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Seen {
        /// The volume's `@odata.id`.
        pub path: String,
        /// Its `Name`.
        pub name: String,
        /// `RAIDType`, when reported.
        pub raid_type: Option<String>,
        /// `VolumeType`, when reported.
        pub volume_type: Option<String>,
        /// `Links.Drives`, when the BMC reports them.
        pub drives: BTreeSet<String>,
        /// `CapacityBytes`.
        pub capacity: u64,
    }

    /// The volume a plan wants.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Wanted {
        /// Its name.
        pub name: String,
        /// `raid0`, `raid1`, ...
        pub level: String,
        /// Drive `@odata.id`s chosen by the profile's rule.
        pub drives: BTreeSet<String>,
        /// Replace a mismatching volume of that name instead of failing.
        pub wipe: bool,
    }

    /// What to do about the volume.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Decision {
        /// This volume (`@odata.id`) is as wanted.
        Reuse(String),
        /// None of that name: create it.
        Create,
        /// Delete this volume, then create (the profile allows wiping).
        Replace {
            /// The volume to delete.
            path: String,
            /// How it differs.
            why: String,
        },
        /// A volume of that name differs and wiping is not allowed.
        Refuse {
            /// How it differs.
            why: String,
        },
    }

    /// Whether `v` is the wanted volume (type by `RAIDType`, else by
    /// `VolumeType`; drives when reported).
    pub fn check(w: &Wanted, v: &Seen) -> Result<(), String> {
        let (raid, vol) =
            redfish_types(&w.level).ok_or_else(|| format!("RAID level {} unknown", w.level))?;
        let type_ok = match (&v.raid_type, &v.volume_type) {
            (Some(r), _) => r == raid,
            (None, Some(t)) => t == vol,
            (None, None) => false,
        };
        if !type_ok {
            return Err(format!(
                "volume {} is {}, wanted {raid}",
                v.name,
                v.raid_type
                    .clone()
                    .or_else(|| v.volume_type.clone())
                    .unwrap_or_else(|| "of unknown type".into())
            ));
        }
        if !v.drives.is_empty() && v.drives != w.drives {
            return Err(format!(
                "volume {} spans {:?}, wanted {:?}",
                v.name, v.drives, w.drives
            ));
        }
        Ok(())
    }

    /// Reuse, create, replace or refuse, from the volumes the controller
    /// has.
    pub fn decide(w: &Wanted, existing: &[Seen]) -> Decision {
        let other = |path: &str, why: String| {
            if w.wipe {
                Decision::Replace {
                    path: path.to_string(),
                    why,
                }
            } else {
                Decision::Refuse {
                    why: format!("{why}; the profile does not allow wiping (raid.wipe)"),
                }
            }
        };
        if let Some(v) = existing.iter().find(|v| v.name == w.name) {
            return match check(w, v) {
                Ok(()) => Decision::Reuse(v.path.clone()),
                Err(why) => other(&v.path, why),
            };
        }
        if let Some(v) = existing
            .iter()
            .find(|v| v.drives.iter().any(|d| w.drives.contains(d)))
        {
            return other(
                &v.path,
                format!("volume {} already uses the chosen drives", v.name),
            );
        }
        Decision::Create
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn seen(name: &str, raid: Option<&str>, vol: Option<&str>, drives: &[&str]) -> Seen {
            Seen {
                path: format!("/v/{name}"),
                name: name.into(),
                raid_type: raid.map(Into::into),
                volume_type: vol.map(Into::into),
                drives: drives.iter().map(|d| d.to_string()).collect(),
                capacity: 1 << 30,
            }
        }

        #[test]
        fn volume_decisions() {
            let w = Wanted {
                name: "rackcast".into(),
                level: "raid1".into(),
                drives: ["/d/1", "/d/2"].iter().map(|d| d.to_string()).collect(),
                wipe: false,
            };
            assert_eq!(decide(&w, &[]), Decision::Create);
            // Reported by RAIDType, or only by the older VolumeType.
            let ok = seen("rackcast", Some("RAID1"), None, &["/d/1", "/d/2"]);
            assert_eq!(decide(&w, &[ok]), Decision::Reuse("/v/rackcast".into()));
            let old = seen("rackcast", None, Some("Mirrored"), &[]);
            assert!(matches!(decide(&w, &[old]), Decision::Reuse(_)));
            let wrong = seen("rackcast", Some("RAID0"), None, &[]);
            assert!(matches!(
                decide(&w, std::slice::from_ref(&wrong)),
                Decision::Refuse { .. }
            ));
            let busy = seen("data", Some("RAID5"), None, &["/d/2", "/d/3"]);
            assert!(matches!(decide(&w, &[busy]), Decision::Refuse { .. }));
            let wipe = Wanted {
                wipe: true,
                ..w.clone()
            };
            assert!(matches!(decide(&wipe, &[wrong]), Decision::Replace { .. }));
            assert_eq!(capacity("raid1", &[10, 12]), 10);
            assert_eq!(capacity("raid5", &[10, 10, 10]), 20);
            assert_eq!(capacity("raid10", &[10, 10, 10, 10]), 20);
        }
    }
}
