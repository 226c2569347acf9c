//! Power and boot control through each machine's BMC: Redfish
//! (`ComputerSystem.Reset`, `Boot.BootSourceOverride*`) or, for BMCs
//! without it, IPMI over LAN through Debian's `ipmitool`.
//!
//! Owns: the BMC registry (each inventory machine's BMC address and
//! login, passwords read from files only the appliance may read), one
//! call per [`PowerOp`] with the read-back that proves it, and the text
//! of what was asked, what the BMC answered and what was read back.
//! Must not: write the device's log or decide when to call (the
//! controller records each call's row; `rackcast bringup` and the
//! operator API decide), or let a password reach a log, an argument
//! list or an error text (ipmitool gets it in its environment, `-E`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use rackcast_core::io::redfish::{Redfish, RedfishError};
use rackcast_core::model::RedfishTarget;

use crate::config::{BmcConfig, Config};
use crate::enroll::Enrollment;

/// What an operator (or bringup) asks a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerOp {
    /// Read the power state.
    Status,
    On,
    /// Hard off.
    Off,
    /// Off and on again (on if it was off).
    Cycle,
    /// Boot from the network once, at the next boot.
    PxeOnce,
}

impl PowerOp {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerOp::Status => "status",
            PowerOp::On => "on",
            PowerOp::Off => "off",
            PowerOp::Cycle => "cycle",
            PowerOp::PxeOnce => "pxe_once",
        }
    }

    pub fn parse(s: &str) -> Option<PowerOp> {
        [
            PowerOp::Status,
            PowerOp::On,
            PowerOp::Off,
            PowerOp::Cycle,
            PowerOp::PxeOnce,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    /// Whether it changes the machine (and so may create its record).
    pub fn changes(self) -> bool {
        self != PowerOp::Status
    }
}

/// How a BMC is spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// A Redfish service at this base URL.
    Redfish { url: String },
    /// IPMI 2.0 (RMCP+) at this host and UDP port.
    Ipmi { host: String, port: u16 },
}

/// Read an inventory `bmc` value: `ipmi://HOST[:PORT]`, `https://HOST`,
/// `http://HOST[:PORT]` or `redfish+http(s)://...` (Redfish).
pub fn parse_address(s: &str) -> Result<Protocol, String> {
    let bad = |why: &str| format!("{s:?}: {why}");
    if let Some(rest) = s.strip_prefix("ipmi://") {
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            None => (rest, 623),
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("expected ipmi://HOST[:PORT]"));
        }
        return Ok(Protocol::Ipmi {
            host: host.to_string(),
            port,
        });
    }
    let url = s.strip_prefix("redfish+").unwrap_or(s);
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Err(bad(
            "expected https://HOST (Redfish), redfish+http://HOST:PORT or ipmi://HOST[:PORT]",
        ));
    };
    // Credentials come from [bmc.credentials], never from the address.
    if rest.is_empty() || rest.contains('@') {
        return Err(bad("expected a host, without a user or password"));
    }
    Ok(Protocol::Redfish {
        url: url.trim_end_matches('/').to_string(),
    })
}

/// A BMC login; the password never reaches Debug output.
#[derive(Clone)]
pub struct Login {
    pub username: String,
    password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// One machine's BMC.
#[derive(Debug, Clone)]
pub struct Entry {
    pub device: String,
    pub mac: String,
    pub rack: Option<String>,
    /// As the inventory wrote it (for tables and logs).
    pub address: String,
    pub protocol: Protocol,
    pub login: Arc<Login>,
}

/// Why the BMC registry could not be made.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("rack inventory, {mac}: bmc {message}")]
    Address { mac: String, message: String },
    #[error("rack inventory, {mac}: no bmc_credential and no [bmc] default_credential")]
    NoCredential { mac: String },
    #[error("rack inventory, {mac}: bmc_credential {name:?} is not a [bmc.credentials.{name}]")]
    UnknownCredential { mac: String, name: String },
    #[error("[bmc.credentials.{name}] password_file {path}: {message}")]
    Password {
        name: String,
        path: String,
        message: String,
    },
}

/// Every inventory machine that has a BMC, by device id.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

/// Read a password file that only its owner may read.
fn read_password(name: &str, path: &std::path::Path) -> Result<String, RegistryError> {
    let err = |message: String| RegistryError::Password {
        name: name.to_string(),
        path: path.display().to_string(),
        message,
    };
    // A BMC password opens the machine's console.
    crate::secret::read_private(path).map_err(err)
}

impl Registry {
    /// From the rack inventory's `bmc` and `bmc_credential` columns.
    pub fn load(cfg: &Config, enroll: &Enrollment) -> Result<Registry, RegistryError> {
        let mut logins: BTreeMap<String, Arc<Login>> = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for row in enroll.rows() {
            let Some(address) = &row.bmc else { continue };
            let protocol = parse_address(address).map_err(|message| RegistryError::Address {
                mac: row.mac.clone(),
                message,
            })?;
            let name = row
                .bmc_credential
                .clone()
                .or_else(|| cfg.bmc.default_credential.clone())
                .ok_or_else(|| RegistryError::NoCredential {
                    mac: row.mac.clone(),
                })?;
            let login = match logins.get(&name) {
                Some(l) => l.clone(),
                None => {
                    let c = cfg.bmc.credentials.get(&name).ok_or_else(|| {
                        RegistryError::UnknownCredential {
                            mac: row.mac.clone(),
                            name: name.clone(),
                        }
                    })?;
                    let l = Arc::new(Login {
                        username: c.username.clone(),
                        password: read_password(&name, &c.password_file)?,
                    });
                    logins.insert(name.clone(), l.clone());
                    l
                }
            };
            let device = crate::controller::device_id_for(&row.mac);
            entries.insert(
                device.clone(),
                Entry {
                    device,
                    mac: row.mac.clone(),
                    rack: row.rack.clone(),
                    address: address.clone(),
                    protocol,
                    login,
                },
            );
        }
        Ok(Registry { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, device: &str) -> Option<&Entry> {
        self.entries.get(device)
    }

    /// The machines an operator named: devices (ids or MACs), a rack, or
    /// all. A named device without a BMC is an error, not a silent skip.
    pub fn select(&self, sel: &Selection) -> Result<Vec<Entry>, String> {
        if sel.all {
            return Ok(self.entries.values().cloned().collect());
        }
        let mut out = Vec::new();
        if let Some(r) = &sel.rack {
            out.extend(
                self.entries
                    .values()
                    .filter(|e| e.rack.as_deref() == Some(r.as_str()))
                    .cloned(),
            );
            if out.is_empty() {
                return Err(format!("no machine of rack {r:?} has a BMC"));
            }
        }
        for d in &sel.devices {
            let id = if d.contains(':') {
                crate::controller::device_id_for(d)
            } else {
                d.clone()
            };
            match self.entries.get(&id) {
                Some(e) if !out.iter().any(|o: &Entry| o.device == id) => out.push(e.clone()),
                Some(_) => {}
                None => return Err(format!("{id} has no BMC in the rack inventory")),
            }
        }
        if out.is_empty() {
            return Err("name devices, --rack R or --all".into());
        }
        Ok(out)
    }
}

/// Which machines an action is for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Selection {
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub rack: Option<String>,
    #[serde(default)]
    pub all: bool,
}

/// A call that did what was asked, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The power state read back (`None`: not read, PXE-once).
    pub powered: Option<bool>,
    /// Asked; answered; read back.
    pub detail: String,
}

/// A call that failed: what was asked and what happened; `retryable`
/// when trying again later can help (unreachable, 5xx, not read back).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct Failed {
    pub message: String,
    pub retryable: bool,
}

impl From<RedfishError> for Failed {
    fn from(e: RedfishError) -> Failed {
        Failed {
            message: e.message,
            retryable: e.retryable,
        }
    }
}

/// One call to `e`'s BMC, bounded by `cfg.timeout` per request and
/// `cfg.settle` for the read-back. Counted in
/// `rackcast_bmc_calls_total` / `rackcast_bmc_failures_total`.
pub async fn call(e: &Entry, op: PowerOp, cfg: &BmcConfig) -> Result<Done, Failed> {
    let limit = cfg.timeout * 3 + cfg.settle;
    let r = match tokio::time::timeout(limit, call_inner(e, op, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(Failed {
            message: format!("{} did not finish within {limit:?}", op.as_str()),
            retryable: true,
        }),
    };
    match &r {
        Ok(_) => {
            metrics::counter!("rackcast_bmc_calls_total", "action" => op.as_str()).increment(1)
        }
        Err(f) => {
            metrics::counter!("rackcast_bmc_failures_total", "action" => op.as_str()).increment(1);
            tracing::warn!(device = %e.device, bmc = %e.address, action = op.as_str(), error = %f.message, "BMC call failed");
        }
    }
    r
}

async fn call_inner(e: &Entry, op: PowerOp, cfg: &BmcConfig) -> Result<Done, Failed> {
    match &e.protocol {
        Protocol::Redfish { url } => {
            let mut s = RedfishPower::connect(url, &e.login, cfg).await?;
            s.run(op, cfg).await
        }
        Protocol::Ipmi { host, port } => {
            Ipmi {
                host,
                port: *port,
                login: &e.login,
                cfg,
            }
            .run(op)
            .await
        }
    }
}

// ---------------------------------------------------------------- Redfish

struct RedfishPower {
    bmc: Redfish,
    system: String,
    sys: Value,
}

impl RedfishPower {
    async fn connect(url: &str, login: &Login, cfg: &BmcConfig) -> Result<RedfishPower, Failed> {
        let mut bmc = Redfish::new(RedfishTarget {
            url: url.to_string(),
            username: login.username.clone(),
            password: login.password.clone(),
            system: None,
            reset: "ForceRestart".into(),
            tls_verify: cfg.tls_verify,
            settle_timeout_s: cfg.settle.as_secs(),
        })?;
        let system = bmc.system_path().await?;
        let sys = bmc.get(&system).await?;
        Ok(RedfishPower { bmc, system, sys })
    }

    fn power_state(sys: &Value) -> String {
        sys["PowerState"].as_str().unwrap_or("unknown").to_string()
    }

    /// The Reset action's target and the first of `wanted` it offers
    /// (a BMC that lists no allowable values is taken to offer them).
    fn reset_kind(&self, wanted: &[&'static str]) -> Result<(String, &'static str), Failed> {
        let reset = &self.sys["Actions"]["#ComputerSystem.Reset"];
        let target = reset["target"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/Actions/ComputerSystem.Reset", self.system));
        let allowed: Vec<&str> = reset["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        wanted
            .iter()
            .find(|w| allowed.is_empty() || allowed.contains(w))
            .map(|w| (target, *w))
            .ok_or_else(|| Failed {
                message: format!(
                    "the BMC offers none of {} (it offers {})",
                    wanted.join(", "),
                    allowed.join(", ")
                ),
                retryable: false,
            })
    }

    async fn reset(
        &mut self,
        wanted: &[&'static str],
        then_on: bool,
        cfg: &BmcConfig,
    ) -> Result<Done, Failed> {
        let before = Self::power_state(&self.sys);
        let (target, kind) = self.reset_kind(wanted)?;
        self.bmc.post(&target, json!({ "ResetType": kind })).await?;
        let want = if then_on { "On" } else { "Off" };
        let seen = self.wait_for(want, cfg).await?;
        Ok(Done {
            powered: Some(then_on),
            detail: format!(
                "asked POST {} ResetType={kind} (PowerState was {before}); BMC accepted; read back PowerState {seen}",
                self.bmc.url(&target)
            ),
        })
    }

    async fn wait_for(&mut self, want: &str, cfg: &BmcConfig) -> Result<String, Failed> {
        let deadline = Instant::now() + cfg.settle;
        loop {
            self.sys = self.bmc.get(&self.system).await?;
            let p = Self::power_state(&self.sys);
            if p == want {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                return Err(Failed {
                    message: format!(
                        "the BMC accepted the reset but PowerState reads {p}, not {want}, after {:?}",
                        cfg.settle
                    ),
                    retryable: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn run(&mut self, op: PowerOp, cfg: &BmcConfig) -> Result<Done, Failed> {
        let p = Self::power_state(&self.sys);
        let on = p == "On";
        match op {
            PowerOp::Status => Ok(Done {
                powered: Some(on),
                detail: format!("GET {}: PowerState {p}", self.bmc.url(&self.system)),
            }),
            PowerOp::On if on => Ok(Done {
                powered: Some(true),
                detail: "PowerState already On: no reset sent".into(),
            }),
            PowerOp::On => self.reset(&["On", "ForceOn"], true, cfg).await,
            PowerOp::Off if p == "Off" => Ok(Done {
                powered: Some(false),
                detail: "PowerState already Off: no reset sent".into(),
            }),
            PowerOp::Off => self.reset(&["ForceOff"], false, cfg).await,
            PowerOp::Cycle if on => self.reset(&["PowerCycle", "ForceRestart"], true, cfg).await,
            PowerOp::Cycle => self.reset(&["On", "ForceOn"], true, cfg).await,
            PowerOp::PxeOnce => self.pxe_once(cfg).await,
        }
    }

    async fn pxe_once(&mut self, cfg: &BmcConfig) -> Result<Done, Failed> {
        let mut boot = json!({
            "BootSourceOverrideTarget": "Pxe",
            "BootSourceOverrideEnabled": "Once",
        });
        // The mode only where the BMC has the property: setting it where
        // it has none is refused by most.
        let mode = cfg
            .boot_mode
            .as_ref()
            .filter(|_| self.sys["Boot"].get("BootSourceOverrideMode").is_some());
        if let Some(m) = mode {
            boot["BootSourceOverrideMode"] = json!(m);
        }
        let body = json!({ "Boot": boot });
        self.bmc
            .call(reqwest::Method::PATCH, &self.system, Some(body.clone()))
            .await?;
        self.sys = self.bmc.get(&self.system).await?;
        let b = &self.sys["Boot"];
        let target = b["BootSourceOverrideTarget"].as_str().unwrap_or("none");
        let enabled = b["BootSourceOverrideEnabled"].as_str().unwrap_or("none");
        let asked = format!("asked PATCH {} {body}", self.bmc.url(&self.system));
        if target != "Pxe" || enabled == "Disabled" {
            return Err(Failed {
                message: format!(
                    "{asked}; BMC accepted; read back target {target}, enabled {enabled}: not PXE"
                ),
                retryable: false,
            });
        }
        // Some BMCs (sushy-tools' libvirt driver among them) keep the
        // override Continuous: the machine then network-boots every time,
        // and the appliance's boot service sends an installed machine to
        // its disk, so this is noted, not failed.
        let note = if enabled == "Once" {
            String::new()
        } else {
            format!(" (the BMC keeps it {enabled}: later boots are sent to the disk by the boot service)")
        };
        let mode_seen = b["BootSourceOverrideMode"]
            .as_str()
            .map(|m| format!(", mode {m}"))
            .unwrap_or_default();
        Ok(Done {
            powered: None,
            detail: format!(
                "{asked}; BMC accepted; read back target {target}, enabled {enabled}{mode_seen}{note}"
            ),
        })
    }
}

// ---------------------------------------------------------------- IPMI

struct Ipmi<'a> {
    host: &'a str,
    port: u16,
    login: &'a Login,
    cfg: &'a BmcConfig,
}

/// Whether ipmitool's complaint is about who we are (retrying with the
/// same login cannot help) rather than reaching the BMC.
fn ipmi_auth_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "unauthorized name",
        "invalid user",
        "rakp 2 hmac",
        "password",
        "insufficient privilege",
    ]
    .iter()
    .any(|k| t.contains(k))
}

/// `Chassis Power is on` -> Some(true).
fn ipmi_power(text: &str) -> Option<bool> {
    let l = text.lines().find(|l| l.contains("Chassis Power is"))?;
    match l.rsplit(' ').next()?.trim() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

impl Ipmi<'_> {
    async fn ipmitool(&self, args: &[&str]) -> Result<String, Failed> {
        let mut cmd = tokio::process::Command::new("ipmitool");
        cmd.args(["-I", "lanplus", "-C"])
            .arg(self.cfg.ipmi_cipher_suite.to_string())
            .args(["-H", self.host, "-p"])
            .arg(self.port.to_string())
            .args(["-U", &self.login.username, "-E", "-N", "2", "-R", "2"])
            .args(args)
            // -E: the password from the environment, never in argv (which
            // every user of the host can read in /proc).
            .env("IPMI_PASSWORD", &self.login.password)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let asked = format!("ipmitool {}", args.join(" "));
        let out = match tokio::time::timeout(self.cfg.timeout, cmd.output()).await {
            Err(_) => {
                return Err(Failed {
                    message: format!("{asked}: no answer within {:?}", self.cfg.timeout),
                    retryable: true,
                })
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Failed {
                    message: "ipmitool is not installed (Debian package ipmitool)".into(),
                    retryable: false,
                })
            }
            Ok(Err(e)) => {
                return Err(Failed {
                    message: format!("{asked}: {e}"),
                    retryable: true,
                })
            }
            Ok(Ok(o)) => o,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // ipmitool warns on stderr about cipher suite discovery even when
        // the call works; only the exit status says whether it did.
        if !out.status.success() {
            let why: String = stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ")
                .chars()
                .take(300)
                .collect();
            return Err(Failed {
                retryable: !ipmi_auth_failure(&why),
                message: format!("{asked}: {why}"),
            });
        }
        Ok(stdout)
    }

    async fn status(&self) -> Result<(bool, String), Failed> {
        let out = self.ipmitool(&["chassis", "power", "status"]).await?;
        let on = ipmi_power(&out).ok_or_else(|| Failed {
            message: format!("chassis power status: unexpected answer {out:?}"),
            retryable: false,
        })?;
        Ok((on, out))
    }

    async fn power(&self, verb: &str, want_on: bool) -> Result<Done, Failed> {
        let (was, _) = self.status().await?;
        let answered = self.ipmitool(&["chassis", "power", verb]).await?;
        let deadline = Instant::now() + self.cfg.settle;
        // A cycle is off then on: only "on" after it proves the on half.
        loop {
            let (on, seen) = self.status().await?;
            if on == want_on {
                return Ok(Done {
                    powered: Some(on),
                    detail: format!(
                        "asked `chassis power {verb}` (power was {}); BMC answered {answered:?}; read back {seen:?}",
                        if was { "on" } else { "off" }
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(Failed {
                    message: format!(
                        "`chassis power {verb}` answered {answered:?} but power reads {seen:?} after {:?}",
                        self.cfg.settle
                    ),
                    retryable: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn run(&self, op: PowerOp) -> Result<Done, Failed> {
        match op {
            PowerOp::Status => {
                let (on, seen) = self.status().await?;
                Ok(Done {
                    powered: Some(on),
                    detail: format!("`chassis power status`: {seen:?}"),
                })
            }
            PowerOp::On => self.power("on", true).await,
            PowerOp::Off => self.power("off", false).await,
            PowerOp::Cycle => {
                let (on, _) = self.status().await?;
                self.power(if on { "cycle" } else { "on" }, true).await
            }
            PowerOp::PxeOnce => {
                let answered = self.ipmitool(&["chassis", "bootdev", "pxe"]).await?;
                let flags = self.ipmitool(&["chassis", "bootparam", "get", "5"]).await?;
                let device = flags
                    .lines()
                    .find_map(|l| l.split_once("Boot Device Selector :"))
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default();
                let once = flags.contains("Options apply to only next boot");
                if device != "Force PXE" {
                    return Err(Failed {
                        message: format!(
                            "`chassis bootdev pxe` answered {answered:?} but the boot flags read back device {device:?}"
                        ),
                        retryable: false,
                    });
                }
                Ok(Done {
                    powered: None,
                    detail: format!(
                        "asked `chassis bootdev pxe`; BMC answered {answered:?}; read back boot device {device}, {}",
                        if once { "next boot only" } else { "persistent" }
                    ),
                })
            }
        }
    }
}

/// The result of one call, for the API and the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallResult {
    pub device: String,
    pub bmc: String,
    pub action: PowerOp,
    pub ok: bool,
    /// Power read back (status, on, off, cycle).
    pub powered: Option<bool>,
    /// Asked, answered, read back; or what failed.
    pub detail: String,
    /// A failure that trying again later can help.
    pub retryable: bool,
    /// How long the call took.
    pub duration_ms: u64,
}

impl CallResult {
    pub fn of(e: &Entry, op: PowerOp, r: Result<Done, Failed>, took: Duration) -> CallResult {
        let duration_ms = took.as_millis() as u64;
        match r {
            Ok(d) => CallResult {
                device: e.device.clone(),
                bmc: e.address.clone(),
                action: op,
                ok: true,
                powered: d.powered,
                detail: d.detail,
                retryable: false,
                duration_ms,
            },
            Err(f) => CallResult {
                device: e.device.clone(),
                bmc: e.address.clone(),
                action: op,
                ok: false,
                powered: None,
                detail: f.message,
                retryable: f.retryable,
                duration_ms,
            },
        }
    }
}

/// Run `ops` in order on each of `entries`, at most `cfg.parallel`
/// machines at once; a machine's later ops are skipped after a failure.
pub async fn call_many(entries: Vec<Entry>, ops: &[PowerOp], cfg: &BmcConfig) -> Vec<CallResult> {
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.parallel.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (i, e) in entries.into_iter().enumerate() {
        let (permits, cfg, ops) = (permits.clone(), cfg.clone(), ops.to_vec());
        set.spawn(async move {
            let _p = permits.acquire_owned().await;
            let mut out = Vec::new();
            for op in ops {
                let t = Instant::now();
                let r = call(&e, op, &cfg).await;
                let r = CallResult::of(&e, op, r, t.elapsed());
                let ok = r.ok;
                out.push(r);
                if !ok {
                    break;
                }
            }
            (i, out)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(x) = r {
            all.push(x);
        }
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().flat_map(|(_, v)| v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn addresses_name_their_protocol() {
        assert_eq!(
            parse_address("ipmi://198.18.0.42").unwrap(),
            Protocol::Ipmi {
                host: "198.18.0.42".into(),
                port: 623
            }
        );
        assert_eq!(
            parse_address("ipmi://198.18.0.42:6230").unwrap(),
            Protocol::Ipmi {
                host: "198.18.0.42".into(),
                port: 6230
            }
        );
        assert_eq!(
            parse_address("redfish+http://198.18.0.41:8000/").unwrap(),
            Protocol::Redfish {
                url: "http://198.18.0.41:8000".into()
            }
        );
        assert_eq!(
            parse_address("https://bmc-a1").unwrap(),
            Protocol::Redfish {
                url: "https://bmc-a1".into()
            }
        );
        for bad in [
            "198.18.0.42",
            "ipmi://",
            "ipmi://h:port",
            "https://admin:pw@bmc",
            "ftp://x",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipmitool_answers_are_read() {
        assert_eq!(ipmi_power("Chassis Power is on"), Some(true));
        assert_eq!(ipmi_power("x\nChassis Power is off\n"), Some(false));
        assert_eq!(ipmi_power("Error"), None);
        assert!(ipmi_auth_failure(
            "Error: Unable to establish IPMI v2 / RMCP+ session; RAKP 2 HMAC is invalid"
        ));
        assert!(!ipmi_auth_failure(
            "Error: Unable to establish IPMI v2 / RMCP+ session"
        ));
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let l = Login {
            username: "root".into(),
            password: "s3cret-bmc".into(),
        };
        assert!(!format!("{l:?}").contains("s3cret"));
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "pw\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_password("lab", &p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password("lab", &p).unwrap(), "pw");
    }

    #[test]
    fn selection_names_devices_racks_or_all() {
        let login = Arc::new(Login {
            username: "u".into(),
            password: "p".into(),
        });
        let mk = |i: u8, rack: &str| {
            let mac = format!("02:aa:00:00:00:{i:02x}");
            let device = crate::controller::device_id_for(&mac);
            (
                device.clone(),
                Entry {
                    device,
                    mac,
                    rack: Some(rack.into()),
                    address: "ipmi://198.18.0.9".into(),
                    protocol: Protocol::Ipmi {
                        host: "198.18.0.9".into(),
                        port: 623,
                    },
                    login: login.clone(),
                },
            )
        };
        let reg = Registry {
            entries: [mk(1, "A"), mk(2, "A"), mk(3, "B")].into_iter().collect(),
        };
        let sel = |devices: &[&str], rack: Option<&str>, all: bool| Selection {
            devices: devices.iter().map(|s| s.to_string()).collect(),
            rack: rack.map(str::to_string),
            all,
        };
        assert_eq!(reg.select(&sel(&[], None, true)).unwrap().len(), 3);
        assert_eq!(reg.select(&sel(&[], Some("A"), false)).unwrap().len(), 2);
        let one = reg
            .select(&sel(&["02:aa:00:00:00:03"], None, false))
            .unwrap();
        assert_eq!(one[0].device, "rc-02aa00000003");
        assert!(reg.select(&sel(&["rc-02aa000000ff"], None, false)).is_err());
        assert!(reg.select(&sel(&[], Some("Z"), false)).is_err());
        assert!(reg.select(&sel(&[], None, false)).is_err());
    }
}
