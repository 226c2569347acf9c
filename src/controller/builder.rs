//! Bundle generation: from a device's inventory to its bundle (agent for
//! its arch, modules by PCI id, BIOS profile by DMI, RAID members and image
//! target by disk rules, step plan), and the content-addressed blob store
//! the bundles point into.
//!
//! Owns: the blob index (hash -> file), the bundle files under
//! `<state_dir>/bundles/<hash>`. Must not: talk to devices or the store.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::{Config, ProfileConfig};
use rackcast_core::model::{
    glob_match, BiosPlan, BlobRef, Bundle, BundleError, DiskId, ImagePlan, Inventory, ModuleRef,
    Plan, RaidPlan, BUNDLE_VERSION,
};

/// One image the appliance can send.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    pub name: String,
    pub path: PathBuf,
    pub hash: String,
    pub size: u64,
    /// Prepared blocks file (compressed blocks' frames), if any.
    pub frames: Option<PathBuf>,
}

pub struct Builder {
    cfg: Config,
    bundles_dir: PathBuf,
    /// hash -> (path, size)
    blobs: HashMap<String, (PathBuf, u64)>,
    /// Blob hashes of each bundle served so far.
    bundle_blobs: std::sync::Mutex<HashMap<String, std::collections::HashSet<String>>>,
    agents: HashMap<String, BlobRef>,
    modules: Vec<(crate::config::ModuleConfig, BlobRef)>,
    identity: crate::identity::Templates,
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().to_hex().to_string(), n))
}

impl Builder {
    /// Hash every agent binary and module file of the config (once, at
    /// start: bundles then cost no I/O but writing their small manifest).
    pub fn new(cfg: &Config) -> Result<Builder, String> {
        let bundles_dir = cfg.appliance.state_dir.join("bundles");
        std::fs::create_dir_all(&bundles_dir)
            .map_err(|e| format!("{}: {e}", bundles_dir.display()))?;
        // Bundles can carry BMC credentials: the appliance's user only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bundles_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("{}: {e}", bundles_dir.display()))?;
        }
        let mut blobs = HashMap::new();
        let mut agents = HashMap::new();
        for (arch, path) in &cfg.agents {
            let (hash, size) =
                hash_file(path).map_err(|e| format!("agents.{arch}: {}: {e}", path.display()))?;
            blobs.insert(hash.clone(), (path.clone(), size));
            agents.insert(
                arch.clone(),
                BlobRef {
                    name: "rackcast-agent".into(),
                    hash,
                    size,
                    executable: true,
                },
            );
        }
        let mut modules = Vec::new();
        for m in &cfg.modules {
            let (hash, size) = hash_file(&m.file)
                .map_err(|e| format!("modules {}: {}: {e}", m.name, m.file.display()))?;
            blobs.insert(hash.clone(), (m.file.clone(), size));
            let name = m
                .file
                .file_name()
                .map_or_else(|| m.name.clone(), |n| n.to_string_lossy().into_owned());
            modules.push((
                m.clone(),
                BlobRef {
                    name,
                    hash,
                    size,
                    executable: true,
                },
            ));
        }
        Ok(Builder {
            cfg: cfg.clone(),
            bundles_dir,
            blobs,
            bundle_blobs: Default::default(),
            agents,
            modules,
            identity: crate::identity::Templates::load(cfg)?,
        })
    }

    /// Path and size of a blob, if the appliance serves it.
    pub fn blob(&self, hash: &str) -> Option<(PathBuf, u64)> {
        self.blobs.get(hash).cloned()
    }

    /// Whether blob `blob` belongs to bundle `bundle` (its agent or one of
    /// its modules), read from the bundle file on the disk (checked
    /// against its hash) and kept.
    pub fn bundle_has_blob(&self, bundle: &str, blob: &str) -> bool {
        if let Ok(cache) = self.bundle_blobs.lock() {
            if let Some(set) = cache.get(bundle) {
                return set.contains(blob);
            }
        }
        let Some(path) = self.bundle_path(bundle) else {
            return false;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        let Ok(b) = rackcast_core::model::Bundle::from_verified_bytes(&bytes, bundle) else {
            return false;
        };
        let set: std::collections::HashSet<String> = std::iter::once(b.agent.hash.clone())
            .chain(b.modules.iter().map(|m| m.blob.hash.clone()))
            .collect();
        let has = set.contains(blob);
        if let Ok(mut cache) = self.bundle_blobs.lock() {
            // Bundles are few (one per hardware kind and profile); bound
            // it anyway.
            if cache.len() >= 4096 {
                cache.clear();
            }
            cache.insert(bundle.to_string(), set);
        }
        has
    }

    pub fn bundle_path(&self, hash: &str) -> Option<PathBuf> {
        if hash.len() != 64 || !hash.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let p = self.bundles_dir.join(hash);
        p.exists().then_some(p)
    }

    fn profile_for(&self, mac: &str, inv: &Inventory) -> Result<&ProfileConfig, BundleError> {
        let ov = self
            .cfg
            .devices
            .iter()
            .find(|d| d.mac.eq_ignore_ascii_case(mac));
        if let Some(name) = ov.and_then(|o| o.profile.as_ref()) {
            if let Some(p) = self.cfg.profiles.iter().find(|p| &p.name == name) {
                return Ok(p);
            }
        }
        self.cfg
            .profiles
            .iter()
            .find(|p| {
                glob_match(&p.vendor, &inv.dmi.vendor) && glob_match(&p.model, &inv.dmi.model)
            })
            .ok_or_else(|| BundleError::NoProfile {
                vendor: inv.dmi.vendor.clone(),
                model: inv.dmi.model.clone(),
            })
    }

    /// Generate (and store) the bundle for one device.
    /// The bundle for a device; `reinstall`: an operator asked to
    /// install it again (its target may hold the previous OS: the plan
    /// says wipe).
    pub fn build(
        &self,
        mac: &str,
        row: Option<&crate::enroll::InventoryRow>,
        inv: &Inventory,
        images: &HashMap<String, ImageEntry>,
        reinstall: bool,
    ) -> Result<(String, Plan), BundleError> {
        let p = self.profile_for(mac, inv)?;
        let rule_err = |why: String| BundleError::Rule {
            profile: p.name.clone(),
            why,
        };
        let agent = self
            .agents
            .get(&inv.cpu.arch)
            .cloned()
            .ok_or_else(|| BundleError::NoAgent(inv.cpu.arch.clone()))?;
        let pci = inv.pci_ids();
        let modules: Vec<ModuleRef> = self
            .modules
            .iter()
            .filter(|(m, _)| {
                m.pci_ids
                    .iter()
                    .any(|id| pci.contains(&id.to_ascii_lowercase()))
            })
            .map(|(m, blob)| ModuleRef {
                name: m.name.clone(),
                blob: blob.clone(),
                load: m.load.as_ref().map(|l| l.to_program()),
            })
            .collect();
        let image_name = self
            .cfg
            .devices
            .iter()
            .find(|d| d.mac.eq_ignore_ascii_case(mac))
            .and_then(|d| d.image.clone())
            .unwrap_or_else(|| p.image.clone());
        let img = images
            .get(&image_name)
            .ok_or_else(|| BundleError::NoImage(image_name.clone()))?;
        // A BMC's config as the bundle carries it (password file read now).
        let redfish_target = |c: Option<&crate::config::RedfishConfig>, key: &str| {
            c.map(|c| c.to_target())
                .transpose()
                .map_err(|e| rule_err(format!("{key}: {e}")))
        };
        let raid = match &p.raid {
            Some(r) if r.redfish.is_some() => {
                // The controller's drives are picked on the device, from
                // what its BMC lists.
                if r.disks.count > 0 {
                    rackcast_core::model::check_raid_level(&r.level, r.disks.count)
                        .map_err(rule_err)?;
                }
                Some(RaidPlan {
                    level: r.level.clone(),
                    members: Vec::new(),
                    member_disks: Vec::new(),
                    array: String::new(),
                    wipe: r.wipe,
                    metadata: r.metadata.clone(),
                    redfish: redfish_target(r.redfish.as_ref(), "raid.redfish")?,
                    drive_rule: Some(r.disks.clone()),
                    volume_name: r.volume_name.clone(),
                    program: None,
                })
            }
            Some(r) => {
                let members = r.disks.select(&inv.disks).map_err(rule_err)?;
                rackcast_core::model::check_raid_level(&r.level, members.len())
                    .map_err(rule_err)?;
                let usable = raid_capacity(&r.level, &members);
                if usable < img.size {
                    return Err(rule_err(format!(
                        "{} over {} holds about {usable} bytes, less than image {} ({} bytes)",
                        r.level,
                        members
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(" "),
                        img.name,
                        img.size
                    )));
                }
                // Members are found again on the device by serial and size,
                // never by the kernel names this inventory happened to use.
                let member_disks = members
                    .iter()
                    .map(|d| DiskId::of(d).ok_or_else(|| no_serial(d)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(rule_err)?;
                Some(RaidPlan {
                    level: r.level.clone(),
                    members: members.iter().map(|d| d.name.clone()).collect(),
                    member_disks,
                    array: r.array.clone().unwrap_or_default(),
                    wipe: r.wipe,
                    metadata: r.metadata.clone(),
                    redfish: None,
                    drive_rule: None,
                    volume_name: String::new(),
                    program: r.program.as_ref().map(|x| x.to_program()),
                })
            }
            None => None,
        };
        let (target, target_disk) = match (&p.raid, &p.target) {
            (Some(r), _) if r.redfish.is_none() => (r.array.clone().unwrap_or_default(), None),
            // No RAID, or a hardware volume the OS sees as a disk.
            (_, Some(rule)) => {
                let d = rule.select(&inv.disks).map_err(rule_err)?;
                let disk = d.first().ok_or_else(|| rule_err("no target disk".into()))?;
                if disk.size_bytes < img.size {
                    return Err(rule_err(format!(
                        "target disk {} ({} bytes) is smaller than image {} ({} bytes)",
                        disk.path, disk.size_bytes, img.name, img.size
                    )));
                }
                let id = DiskId::of(disk).ok_or_else(|| rule_err(no_serial(disk)))?;
                (disk.name.clone(), Some(id))
            }
            (_, None) => return Err(rule_err("no image target".into())),
        };
        let bios = match &p.bios {
            Some(b) => Some(BiosPlan {
                attributes: b.attributes.clone(),
                redfish: redfish_target(b.redfish.as_ref(), "bios.redfish")?,
                program: b.program.as_ref().map(|x| x.to_program()),
            }),
            None => None,
        };
        let plan = Plan {
            profile: p.name.clone(),
            bios,
            raid,
            programs: p.programs.iter().map(|x| x.to_program()).collect(),
            image: ImagePlan {
                name: img.name.clone(),
                hash: img.hash.clone(),
                size: img.size,
                target,
                target_disk,
                wipe: p.wipe || reinstall,
            },
            post_install: p.post_install.iter().map(|x| x.to_program()).collect(),
            boot_to_disk: p.boot_to_disk.as_ref().map(|x| x.to_program()),
            seed: {
                let device = super::device_id_for(mac);
                let facts = crate::identity::Facts::new(&device, mac, row, inv, &img.name, &p.name);
                self.identity.render(&p.name, &facts).map_err(rule_err)?
            },
        };
        let bundle = Bundle {
            version: BUNDLE_VERSION,
            arch: inv.cpu.arch.clone(),
            agent,
            modules,
            plan: plan.clone(),
        };
        let bytes = bundle.to_bytes();
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let path = self.bundles_dir.join(&hash);
        if !path.exists() {
            // Write then rename: a reader never sees half a bundle. Devices
            // of the same hardware build the same bundle at the same time:
            // each writes its own temporary file; the renames are atomic
            // and put identical bytes in place.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self.bundles_dir.join(format!(".{hash}.{n}.tmp"));
            let r = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                return Err(BundleError::Malformed(format!("{}: {e}", path.display())));
            }
        }
        Ok((hash, plan))
    }
}

fn no_serial(d: &rackcast_core::model::Disk) -> String {
    format!(
        "disk {} ({}) reports no serial: rackcast finds a target disk by serial and size, never by kernel name, so it cannot write this one safely",
        d.name, d.path
    )
}

/// About what an md array over `members` holds: each member keeps room
/// for md's superblock and data offset (mdadm reserves up to 128 MiB on
/// large disks, less on small ones). The agent checks the real array size
/// before writing.
fn raid_capacity(level: &str, members: &[&rackcast_core::model::Disk]) -> u64 {
    let usable: Vec<u64> = members
        .iter()
        .map(|d| {
            d.size_bytes
                .saturating_sub((d.size_bytes / 8).clamp(1 << 20, 128 << 20))
        })
        .collect();
    rackcast_core::raid::capacity(level, &usable)
}
