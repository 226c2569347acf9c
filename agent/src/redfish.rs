//! Redfish client for a machine's BMC: the BIOS settings backend.
//!
//! Owns: finding the ComputerSystem and following its links as a client
//! must (`Bios`, the settings object named by `@Redfish.Settings`, the
//! `#ComputerSystem.Reset` action target; no guessed paths), the HTTP
//! calls with basic auth and timeouts, and turning BMC answers into
//! errors that say what was refused and whether a retry can help. Must
//! not: decide what to change (`rackcast_core::bios` does) or log credentials
//! (`RedfishTarget`'s Debug hides the password; URLs never carry it).

use serde_json::json;

use rackcast_core::bios::{Attributes, BiosError};
use rackcast_core::io::redfish::{members, Redfish, RedfishError};
use rackcast_core::model::RedfishTarget;

use crate::bios::BiosBackend;

fn backend(message: String, retryable: bool) -> BiosError {
    BiosError::Backend { message, retryable }
}

/// Where the BIOS settings of one system live, found by following links.
#[derive(Debug, Clone)]
struct Links {
    bios: String,
    settings: String,
    reset_target: String,
    reset_allowed: Vec<String>,
}

pub struct RedfishBios {
    bmc: Redfish,
    links: Option<Links>,
}

impl RedfishBios {
    pub fn new(target: RedfishTarget) -> Result<RedfishBios, BiosError> {
        Ok(RedfishBios {
            bmc: Redfish::new(target)?,
            links: None,
        })
    }

    async fn links(&mut self) -> Result<Links, BiosError> {
        if let Some(l) = &self.links {
            return Ok(l.clone());
        }
        let (sys, bios) = self.bmc.system_link("Bios").await?;
        let system_path = self.bmc.system_path().await?;
        let reset = &sys["Actions"]["#ComputerSystem.Reset"];
        let reset_target = reset["target"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{system_path}/Actions/ComputerSystem.Reset"));
        let reset_allowed = reset["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let b = self.bmc.get(&bios).await?;
        let settings = b["@Redfish.Settings"]["SettingsObject"]["@odata.id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{bios}/Settings"));
        let l = Links {
            bios,
            settings,
            reset_target,
            reset_allowed,
        };
        self.links = Some(l.clone());
        Ok(l)
    }
}

/// A drive behind a storage controller, as the BMC reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSeen {
    pub path: String,
    pub id: String,
    pub capacity: u64,
    pub model: String,
    pub serial: String,
    pub ssd: bool,
}

/// A storage controller (Redfish `Storage`) with its drives and volumes.
#[derive(Debug, Clone)]
pub struct StorageSeen {
    pub path: String,
    pub name: String,
    pub drives: Vec<DriveSeen>,
    pub volumes: String,
}

/// Hardware RAID volumes through the BMC: read controllers, drives and
/// volumes (following `Storage`, `Drives` and `Volumes` links), create
/// and delete volumes.
pub struct RedfishStorage {
    pub bmc: Redfish,
}

impl RedfishStorage {
    pub fn new(target: RedfishTarget) -> Result<RedfishStorage, BiosError> {
        Ok(RedfishStorage {
            bmc: Redfish::new(target)?,
        })
    }

    pub async fn controllers(&mut self) -> Result<Vec<StorageSeen>, BiosError> {
        let (_, col) = self.bmc.system_link("Storage").await?;
        let mut out = Vec::new();
        for path in members(&self.bmc.get(&col).await?) {
            let st = self.bmc.get(&path).await?;
            let mut drives = Vec::new();
            for d in st["Drives"].as_array().into_iter().flatten() {
                let Some(dp) = d["@odata.id"].as_str() else {
                    continue;
                };
                let dv = self.bmc.get(dp).await?;
                drives.push(DriveSeen {
                    path: dp.to_string(),
                    id: dv["Id"].as_str().unwrap_or_default().to_string(),
                    capacity: dv["CapacityBytes"].as_u64().unwrap_or(0),
                    model: dv["Model"].as_str().unwrap_or_default().to_string(),
                    serial: dv["SerialNumber"].as_str().unwrap_or_default().to_string(),
                    ssd: dv["MediaType"].as_str() == Some("SSD"),
                });
            }
            out.push(StorageSeen {
                name: st["Name"].as_str().unwrap_or_default().to_string(),
                volumes: st["Volumes"]["@odata.id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{path}/Volumes")),
                path,
                drives,
            });
        }
        Ok(out)
    }

    pub async fn volume(&self, path: &str) -> Result<rackcast_core::raid::volume::Seen, BiosError> {
        let v = self.bmc.get(path).await?;
        Ok(rackcast_core::raid::volume::Seen {
            path: path.to_string(),
            name: v["Name"].as_str().unwrap_or_default().to_string(),
            raid_type: v["RAIDType"].as_str().map(str::to_string),
            volume_type: v["VolumeType"].as_str().map(str::to_string),
            drives: v["Links"]["Drives"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["@odata.id"].as_str().map(str::to_string))
                .collect(),
            capacity: v["CapacityBytes"].as_u64().unwrap_or(0),
        })
    }

    pub async fn volumes(
        &self,
        col: &str,
    ) -> Result<Vec<rackcast_core::raid::volume::Seen>, BiosError> {
        let mut out = Vec::new();
        for p in members(&self.bmc.get(col).await?) {
            out.push(self.volume(&p).await?);
        }
        Ok(out)
    }
}

/// The `@odata.id`s of a collection's `Members`.
impl BiosBackend for RedfishBios {
    fn describe(&self) -> String {
        match &self.links {
            Some(l) => self.bmc.url(&l.bios),
            None => format!("Redfish BMC {}", self.bmc.base),
        }
    }

    async fn read(&mut self) -> Result<Attributes, BiosError> {
        let l = self.links().await?;
        let b = self.bmc.get(&l.bios).await?;
        b["Attributes"]
            .as_object()
            .cloned()
            .ok_or_else(|| backend(format!("{} has no Attributes", l.bios), false))
    }

    async fn stage(&mut self, changes: &Attributes) -> Result<String, BiosError> {
        let l = self.links().await?;
        let names: Vec<&str> = changes.keys().map(String::as_str).collect();
        self.bmc
            .call(
                reqwest::Method::PATCH,
                &l.settings,
                Some(json!({ "Attributes": changes })),
            )
            .await
            .map_err(|e: RedfishError| {
                backend(
                    format!("the BMC refused {}: {}", names.join(", "), e.message),
                    e.retryable,
                )
            })?;
        Ok(format!(
            "PATCH {}: {}",
            self.bmc.url(&l.settings),
            names.join(", ")
        ))
    }

    async fn apply(&mut self) -> Result<String, BiosError> {
        let l = self.links().await?;
        let kind = &self.bmc.target.reset;
        if !l.reset_allowed.is_empty() && !l.reset_allowed.iter().any(|a| a == kind) {
            return Err(backend(
                format!(
                    "ResetType {kind} is not offered by the BMC (it offers {})",
                    l.reset_allowed.join(", ")
                ),
                false,
            ));
        }
        self.bmc
            .post(&l.reset_target, json!({ "ResetType": kind }))
            .await?;
        Ok(format!(
            "POST {} ResetType={kind}: pending settings apply on this reset",
            self.bmc.url(&l.reset_target)
        ))
    }
}
