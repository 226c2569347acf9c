//! Redfish client for a machine's BMC: the BIOS settings backend.
//!
//! Owns: finding the ComputerSystem and following its links as a client
//! must (`Bios`, the settings object named by `@Redfish.Settings`, the
//! `#ComputerSystem.Reset` action target; no guessed paths), the HTTP
//! calls with basic auth and timeouts, and turning BMC answers into
//! errors that say what was refused and whether a retry can help. Must
//! not: decide what to change (`rackcast_core::bios` does) or log credentials
//! (`RedfishTarget`'s Debug hides the password; URLs never carry it).

use std::time::Duration;

use serde_json::{json, Value};

use rackcast_core::bios::{Attributes, BiosError};
use rackcast_core::model::RedfishTarget;

use crate::bios::BiosBackend;

fn backend(message: String, retryable: bool) -> BiosError {
    BiosError::Backend { message, retryable }
}

/// The text of a Redfish error body: `error.message` and every
/// `@Message.ExtendedInfo[].Message` (which usually names the attribute).
fn redfish_message(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.chars().take(300).collect();
    };
    let e = &v["error"];
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = e["message"].as_str() {
        parts.push(m.to_string());
    }
    if let Some(infos) = e["@Message.ExtendedInfo"].as_array() {
        for i in infos {
            if let Some(m) = i["Message"].as_str() {
                parts.push(m.to_string());
            }
        }
    }
    if parts.is_empty() {
        body.chars().take(300).collect()
    } else {
        parts.join("; ")
    }
}

/// Where the BIOS settings of one system live, found by following links.
#[derive(Debug, Clone)]
struct Links {
    bios: String,
    settings: String,
    reset_target: String,
    reset_allowed: Vec<String>,
}

/// One BMC: HTTP with basic auth and timeouts, and the system to act on.
pub struct Redfish {
    target: RedfishTarget,
    base: String,
    http: reqwest::Client,
    system: Option<String>,
}

impl Redfish {
    pub fn new(target: RedfishTarget) -> Result<Redfish, BiosError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(!target.tls_verify)
            .build()
            .map_err(|e| backend(format!("HTTP client: {e}"), false))?;
        Ok(Redfish {
            base: target.url.trim_end_matches('/').to_string(),
            target,
            http,
            system: None,
        })
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// One request: the body's text and the `Location` header. Errors say
    /// whether a retry can help (unreachable, 5xx) or not (401/403, 4xx).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(String, Option<String>), BiosError> {
        let url = self.url(path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .basic_auth(&self.target.username, Some(&self.target.password))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            // Not reachable (yet): the BMC is down or resetting.
            backend(
                format!("BMC unreachable: {method} {url}: {}", error_chain(&e)),
                true,
            )
        })?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(backend(
                format!("BMC refused our credentials: {method} {url}: HTTP {status}"),
                false,
            ));
        }
        if !status.is_success() {
            return Err(backend(
                format!("{method} {url}: HTTP {status}: {}", redfish_message(&text)),
                status.is_server_error(),
            ));
        }
        Ok((text, location))
    }

    /// A request whose answer is JSON (or empty: `Null`).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, BiosError> {
        let (text, _) = self.send(method.clone(), path, body).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| backend(format!("{method} {}: not JSON: {e}", self.url(path)), false))
    }

    pub async fn get(&self, path: &str) -> Result<Value, BiosError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// POST that creates a resource: its `Location`, if the BMC says.
    pub async fn create(&self, path: &str, body: Value) -> Result<Option<String>, BiosError> {
        let (text, location) = self.send(reqwest::Method::POST, path, Some(body)).await?;
        // Some BMCs answer with the new resource instead of a Location.
        Ok(location.or_else(|| {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["@odata.id"].as_str().map(str::to_string))
        }))
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, BiosError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, BiosError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// The ComputerSystem and the path of its link `rel` (`Bios`,
    /// `Storage`), which it must have.
    pub async fn system_link(&mut self, rel: &str) -> Result<(Value, String), BiosError> {
        let system = self.system_path().await?;
        let sys = self.get(&system).await?;
        let link = sys[rel]["@odata.id"]
            .as_str()
            .ok_or_else(|| backend(format!("{system} has no {rel} resource"), false))?
            .to_string();
        Ok((sys, link))
    }

    /// The ComputerSystem's path: the configured id, or the only member.
    pub async fn system_path(&mut self) -> Result<String, BiosError> {
        if let Some(p) = &self.system {
            return Ok(p.clone());
        }
        let system_path = match &self.target.system {
            Some(id) => format!("/redfish/v1/Systems/{id}"),
            None => {
                let members = members(&self.get("/redfish/v1/Systems").await?);
                match members.as_slice() {
                    [one] => one.to_string(),
                    other => {
                        return Err(backend(
                            format!(
                                "the BMC has {} systems ({}); name one in bios.redfish.system",
                                other.len(),
                                other.join(", ")
                            ),
                            false,
                        ))
                    }
                }
            }
        };
        self.system = Some(system_path.clone());
        Ok(system_path)
    }
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
fn members(v: &Value) -> Vec<String> {
    v["Members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["@odata.id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

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
            .map_err(|e| match e {
                BiosError::Backend { message, retryable } => backend(
                    format!("the BMC refused {}: {message}", names.join(", ")),
                    retryable,
                ),
                other => other,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redfish_errors_are_read_with_their_extended_info() {
        let body = r#"{"error":{"code":"Base.1.0.GeneralError","message":"A general error has occurred.",
            "@Message.ExtendedInfo":[{"MessageId":"Base.1.0.PropertyValueNotInList",
            "Message":"The value Foo for the property BootMode is not in the list of acceptable values."}]}}"#;
        let m = redfish_message(body);
        assert!(m.contains("BootMode") && m.contains("general error"), "{m}");
        assert_eq!(redfish_message("not json"), "not json");
    }
}
