//! `rackcast serve` configuration (TOML): listen addresses, data plane,
//! wave policy, workflow limits, images, agents, module catalogue and
//! device profiles. `rackcast.example.toml` in the repository documents
//! every key.
//!
//! Owns: parsing and validation, with errors that name the key and say
//! what was expected. Must not: open sockets or files other than the
//! config itself (paths are checked when used, where the error can say
//! which device needed them).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use rackcast_core::model::DiskRule;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration like \"30s\" or \"5m\": {e}"
        ))
    })
}

fn de_rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    rackcast_core::parse_rate(&s).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub appliance: ApplianceConfig,
    pub dataplane: DataplaneConfig,
    #[serde(default)]
    pub waves: WavePolicy,
    #[serde(default)]
    pub workflow: WorkflowLimits,
    /// Agent binary per CPU architecture (`x86_64 = "/path"`).
    pub agents: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub images: Vec<ImageConfig>,
    #[serde(default)]
    pub modules: Vec<ModuleConfig>,
    pub profiles: Vec<ProfileConfig>,
    #[serde(default)]
    pub devices: Vec<DeviceOverride>,
    #[serde(default)]
    pub boot: BootConfig,
    #[serde(default)]
    pub enroll: EnrollConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub bmc: BmcConfig,
}

/// The machines' BMCs, reached over the management network for power
/// and boot control. Each device's BMC address and credential name come
/// from the rack inventory's `bmc` and `bmc_credential` columns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcConfig {
    /// Credentials by name: `[bmc.credentials.NAME]`.
    #[serde(default)]
    pub credentials: BTreeMap<String, BmcCredential>,
    /// The credential of inventory rows without `bmc_credential`.
    pub default_credential: Option<String>,
    /// One BMC call (a request, or an ipmitool run) gives up after this.
    #[serde(default = "d_bmc_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Wait this long for a power change to read back.
    #[serde(default = "d_bmc_settle", deserialize_with = "de_duration")]
    pub settle: Duration,
    /// Check Redfish BMCs' TLS certificates (most ship self-signed ones).
    #[serde(default)]
    pub tls_verify: bool,
    /// BMCs called at once by one operator action.
    #[serde(default = "d_bmc_parallel")]
    pub parallel: usize,
    /// `rackcast bringup`: machines powered on per second (the inrush
    /// limit of the rack's power distribution).
    #[serde(default = "d_power_on_per_second")]
    pub power_on_per_second: f64,
    /// A machine that has not network-booted this long after its
    /// power-on is reported...
    #[serde(default = "d_boot_timeout", deserialize_with = "de_duration")]
    pub boot_timeout: Duration,
    /// ...and power-cycled again this many times.
    #[serde(default)]
    pub retries: u32,
    /// `UEFI` or `Legacy`: set as `BootSourceOverrideMode` with PXE-once
    /// where the BMC shows that property (default: leave the mode alone).
    pub boot_mode: Option<String>,
    /// The IPMI 2.0 cipher suite ipmitool asks for (`-C`).
    #[serde(default = "d_cipher_suite")]
    pub ipmi_cipher_suite: u8,
}

impl Default for BmcConfig {
    fn default() -> Self {
        BmcConfig {
            credentials: BTreeMap::new(),
            default_credential: None,
            timeout: d_bmc_timeout(),
            settle: d_bmc_settle(),
            tls_verify: false,
            parallel: d_bmc_parallel(),
            power_on_per_second: d_power_on_per_second(),
            boot_timeout: d_boot_timeout(),
            retries: 0,
            boot_mode: None,
            ipmi_cipher_suite: d_cipher_suite(),
        }
    }
}

/// A BMC login. The password is only ever in its own file, readable by
/// the appliance's user alone (checked at load): never in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcCredential {
    pub username: String,
    pub password_file: PathBuf,
}

fn d_bmc_timeout() -> Duration {
    Duration::from_secs(20)
}
fn d_bmc_settle() -> Duration {
    Duration::from_secs(30)
}
fn d_bmc_parallel() -> usize {
    16
}
fn d_power_on_per_second() -> f64 {
    2.0
}
fn d_boot_timeout() -> Duration {
    Duration::from_secs(600)
}
fn d_cipher_suite() -> u8 {
    3
}

/// The device event log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Rows older than this are removed (at start, then hourly); "0s"
    /// keeps every row.
    #[serde(default = "d_retention", deserialize_with = "de_duration")]
    pub retention: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: d_retention(),
        }
    }
}

fn d_retention() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}

/// Which machines the appliance installs (MAAS's New -> Commission).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// `known`: only devices in the rack inventory or `[[devices]]`;
    /// others are not answered. `approve` (default): unknown devices are
    /// inventoried, then wait for `rackcast approve`. `auto`: every
    /// device that network-boots is installed.
    #[serde(default)]
    pub policy: EnrollPolicy,
    /// The rack inventory: a CSV with a header row; `mac` is required,
    /// `serial`, `hostname`, `rack` and `slot` are read, further columns
    /// are kept as labels.
    pub inventory: Option<PathBuf>,
    /// Unknown devices held at once awaiting approval (`approve`): past
    /// it, further unknown MACs are refused, so spoofed boots cannot grow
    /// the record without bound.
    #[serde(default = "d_max_pending")]
    pub max_pending: usize,
}

impl Default for EnrollConfig {
    fn default() -> Self {
        EnrollConfig {
            policy: EnrollPolicy::default(),
            inventory: None,
            max_pending: d_max_pending(),
        }
    }
}

fn d_max_pending() -> usize {
    1024
}

/// See [`EnrollConfig::policy`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrollPolicy {
    Known,
    #[default]
    Approve,
    Auto,
}

/// The network boot service (each part optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    pub dhcp: Option<DhcpSection>,
    pub tftp: Option<TftpSection>,
    pub http: Option<HttpBootSection>,
}

/// iPXE's second stage over HTTP (on `appliance.api_listen`): the
/// per-device script at `/boot/<mac>.ipxe` and the loader's files at
/// `/boot/files/...` (byte ranges supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpBootSection {
    /// Folder with the loader kernel and initrd.
    pub files: PathBuf,
    #[serde(default = "d_kernel")]
    pub kernel: String,
    #[serde(default = "d_initrd")]
    pub initrd: String,
    /// Extra kernel command line (e.g. `console=ttyS0`).
    #[serde(default)]
    pub cmdline: String,
}

fn d_kernel() -> String {
    "vmlinuz".into()
}
fn d_initrd() -> String {
    "initrd.img".into()
}

/// Read-only TFTP for the firmware's first file (iPXE).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TftpSection {
    /// Files are served from under this folder only.
    pub root: PathBuf,
    pub iface: String,
    /// Largest block size granted (blksize option).
    #[serde(default = "d_blksize")]
    pub max_blksize: usize,
    /// Largest window granted (windowsize option).
    #[serde(default = "d_window")]
    pub max_window: u16,
}

fn d_blksize() -> usize {
    1468
}
fn d_window() -> u16 {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSection {
    /// `full` (address pool, isolated provisioning network) or `proxy`
    /// (beside an existing DHCP server: PXE clients only, no addresses).
    pub mode: String,
    /// Interface the service answers on.
    pub iface: String,
    /// This appliance's address on it (option 54, next-server).
    pub server_ip: Ipv4Addr,
    pub pool_start: Option<Ipv4Addr>,
    pub pool_end: Option<Ipv4Addr>,
    pub netmask: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default = "d_lease", deserialize_with = "de_duration")]
    pub lease_time: Duration,
    #[serde(default = "d_bios_file")]
    pub bios_file: String,
    #[serde(default = "d_uefi_file")]
    pub uefi_x64_file: String,
    #[serde(default = "d_arm_file")]
    pub uefi_arm64_file: String,
    /// New clients (no lease, not heard from in the last second) answered
    /// per second, and the burst: a rack powered on at once is admitted
    /// at this pace (PXE firmware retries its DISCOVER), a spoofed
    /// `chaddr` flood fills the pool and the device records no faster.
    #[serde(default = "d_new_clients")]
    pub new_clients_per_second: u32,
}

fn d_lease() -> Duration {
    Duration::from_secs(3600)
}
fn d_bios_file() -> String {
    "undionly.kpxe".into()
}
fn d_uefi_file() -> String {
    "ipxe.efi".into()
}
fn d_new_clients() -> u32 {
    50
}
fn d_arm_file() -> String {
    "ipxe-arm64.efi".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// Agents connect here (TCP control plane).
    pub control_listen: SocketAddr,
    /// Provisioning HTTP: per-device iPXE scripts and the loader's files,
    /// nothing else (devices on the provisioning LAN fetch them).
    pub api_listen: Option<SocketAddr>,
    /// Operator API and `/metrics` over HTTPS, with bearer tokens
    /// (`rackcast token create`). Off when unset.
    pub operator_listen: Option<SocketAddr>,
    /// The operator listener's certificate and key (PEM). Default
    /// `<state_dir>/operator-cert.pem` and `operator-key.pem`, made on first
    /// start (self-signed; the CLI pins it).
    pub operator_cert: Option<PathBuf>,
    pub operator_key: Option<PathBuf>,
    /// Blobs, bundles, manifests.
    pub state_dir: PathBuf,
    /// The fleet record: a SQLite file (default `<state_dir>/rackcast.db`)
    /// or a `postgres://user@host:port/db` URL shared by appliances.
    pub store: Option<String>,
    /// The PostgreSQL password, in a file readable by the appliance only
    /// (so it stays out of the config and the process list).
    pub store_password_file: Option<PathBuf>,
    /// PEM CA the PostgreSQL server's certificate must chain to; with
    /// `sslmode=require` in the URL the connection is TLS or nothing.
    pub store_ca: Option<PathBuf>,
    /// Ed25519 bundle-signing key (default `<state_dir>/signing.key`,
    /// made on first start). Its fingerprint goes on network-booted
    /// loaders' kernel command line (`rackcast.key=`).
    pub signing_key: Option<PathBuf>,
    #[serde(default = "d_bundles")]
    pub max_inflight_bundles: usize,
    #[serde(default = "d_transfers")]
    pub max_inflight_transfers: usize,
    /// Every read on a control connection must complete within this.
    #[serde(default = "d_read_timeout", deserialize_with = "de_duration")]
    pub read_timeout: Duration,
    /// Agent connections held at once on the control listener (one per
    /// device, plus reconnects not yet noticed as gone).
    #[serde(default = "d_agent_connections")]
    pub max_agent_connections: usize,
    /// This appliance's name in a shared fleet record: the holder of its
    /// device leases and the owner of its waves. Default: the host name.
    /// Appliances sharing one PostgreSQL record need distinct ones.
    pub id: Option<String>,
    /// How long a device's lease lasts past its appliance's last renewal
    /// (renewed every third of it): how long a standby waits before it
    /// takes over the devices of an appliance that died.
    #[serde(default = "d_lease_ttl", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// One of an active/standby pair on one segment: serve only while
    /// `control_listen`'s address (a virtual address keepalived moves) is
    /// on this host; wait for it before starting, stop when it leaves.
    #[serde(default)]
    pub standby: bool,
}

fn d_lease_ttl() -> Duration {
    Duration::from_secs(15)
}

fn d_agent_connections() -> usize {
    8192
}
fn d_bundles() -> usize {
    16
}
fn d_transfers() -> usize {
    32
}
fn d_read_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interface the multicast goes out of.
    pub iface: Option<String>,
    /// Address the waves' TCP control listeners bind to (devices reach it).
    pub bind: std::net::IpAddr,
    /// Shared by all running waves.
    #[serde(deserialize_with = "de_rate")]
    pub total_rate: u64,
    /// Wave n uses group `group_base + n` (within 239.255.0.0/16 in labs).
    pub group_base: Ipv4Addr,
    #[serde(default = "d_port")]
    pub port: u16,
    #[serde(default = "d_mtu")]
    pub mtu: usize,
    #[serde(default = "d_ttl")]
    pub ttl: u32,
    /// How often a wave's receivers report (loss, gaps, progress); the
    /// sender's repair planning waits in units of it.
    #[serde(default = "d_feedback", deserialize_with = "de_duration")]
    pub feedback: Duration,
    /// Datagrams per UDP GSO send (1: plain sendmmsg). A path that refuses
    /// GSO falls back to sendmmsg by itself.
    #[serde(default = "d_gso")]
    pub gso_segments: usize,
    /// zstd level of blocks prepared when an image is added (0: send every
    /// block raw). Decompression speed hardly depends on the level; level
    /// 6 compresses ~4x slower than 3 for ~9 % fewer bytes on OS images.
    #[serde(default = "d_zstd_level")]
    pub zstd_level: i32,
}

fn d_port() -> u16 {
    9000
}
fn d_mtu() -> usize {
    1500
}
fn d_ttl() -> u32 {
    1
}
fn d_feedback() -> Duration {
    Duration::from_millis(20)
}
fn d_gso() -> usize {
    16
}
fn d_zstd_level() -> i32 {
    6
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WavePolicy {
    /// Start once this many members are ready and `start_after` passed
    /// since the first one; a wave also starts when every device expected
    /// for the image is ready.
    #[serde(default = "d_min_members")]
    pub min_members: usize,
    #[serde(default = "d_start_after", deserialize_with = "de_duration")]
    pub start_after: Duration,
    /// A member silent this long is dropped as failed.
    #[serde(default = "d_member_timeout", deserialize_with = "de_duration")]
    pub member_timeout: Duration,
    /// A connection to a wave's control listener must say hello within
    /// this (a member that connects and says nothing holds no slot).
    #[serde(default = "d_hello_timeout", deserialize_with = "de_duration")]
    pub hello_timeout: Duration,
    /// A member that cannot keep up with the others (slow port, NIC or
    /// disk, lossy cable): `catch_up` (the wave goes on without waiting;
    /// it is served what it lacks after the others), `wait` (the wave
    /// slows to it) or `drop` (it fails).
    #[serde(default)]
    pub slow_members: rackcast_core::dataplane::sender::SlowMembers,
}

fn d_min_members() -> usize {
    1
}
fn d_start_after() -> Duration {
    Duration::from_secs(30)
}
fn d_member_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_hello_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for WavePolicy {
    fn default() -> Self {
        WavePolicy {
            min_members: d_min_members(),
            start_after: d_start_after(),
            member_timeout: d_member_timeout(),
            hello_timeout: d_hello_timeout(),
            slow_members: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowLimits {
    #[serde(default = "d_step_timeout", deserialize_with = "de_duration")]
    pub step_timeout: Duration,
    #[serde(default = "d_imaging_timeout", deserialize_with = "de_duration")]
    pub imaging_timeout: Duration,
    #[serde(default = "d_attempts")]
    pub max_attempts: u32,
    #[serde(default = "d_backoff", deserialize_with = "de_duration")]
    pub retry_backoff: Duration,
}

fn d_step_timeout() -> Duration {
    Duration::from_secs(600)
}
fn d_imaging_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn d_attempts() -> u32 {
    3
}
fn d_backoff() -> Duration {
    Duration::from_secs(5)
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        WorkflowLimits {
            step_timeout: d_step_timeout(),
            imaging_timeout: d_imaging_timeout(),
            max_attempts: d_attempts(),
            retry_backoff: d_backoff(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramConfig {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default = "d_prog_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn d_prog_timeout() -> Duration {
    Duration::from_secs(300)
}

impl ProgramConfig {
    pub fn to_program(&self) -> rackcast_core::model::Program {
        rackcast_core::model::Program {
            name: self.name.clone(),
            argv: self.argv.clone(),
            timeout_s: self.timeout.as_secs().max(1),
            env: self.env.clone(),
        }
    }
}

/// A driver or tool in the catalogue, selected by PCI id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub name: String,
    /// `vendor:device` in hex, e.g. `15b3:1017`.
    pub pci_ids: Vec<String>,
    pub file: PathBuf,
    pub load: Option<ProgramConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiosConfig {
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Backend: the machine's BMC over Redfish...
    pub redfish: Option<RedfishConfig>,
    /// ...or a program (a vendor tool) given the attributes as
    /// `RC_BIOS_<NAME>`.
    pub program: Option<ProgramConfig>,
}

/// A profile's BMC. The Redfish Host Interface has one address on every
/// machine of a model, so devices of one profile share it (and a bundle).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedfishConfig {
    pub url: String,
    pub username: String,
    /// The password, or `password_file` (read when bundles are built).
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// ComputerSystem id (default: the only one the BMC lists).
    pub system: Option<String>,
    /// ResetType that applies pending settings.
    #[serde(default = "d_reset")]
    pub reset: String,
    /// Check the BMC's TLS certificate (most BMCs ship self-signed ones).
    #[serde(default = "d_true")]
    pub tls_verify: bool,
    /// Wait this long for the settings to read back after the reset.
    #[serde(default = "d_settle", deserialize_with = "de_duration")]
    pub settle_timeout: Duration,
}

fn d_volume_name() -> String {
    "rackcast".into()
}

fn d_metadata() -> String {
    "1.2".into()
}

fn d_reset() -> String {
    "ForceRestart".into()
}
fn d_true() -> bool {
    true
}
fn d_settle() -> Duration {
    Duration::from_secs(600)
}

impl RedfishConfig {
    /// What is wrong with it: (the key below `redfish`, the message).
    fn problem(&self) -> Option<(&'static str, String)> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Some((
                ".url",
                format!("{:?}: expected http:// or https://", self.url),
            ));
        }
        if self.password.is_some() == self.password_file.is_some() {
            return Some(("", "expected one of password and password_file".into()));
        }
        None
    }

    pub fn to_target(&self) -> Result<rackcast_core::model::RedfishTarget, String> {
        let password = match (&self.password, &self.password_file) {
            (Some(p), None) => p.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("password_file {}: {e}", f.display()))?,
            _ => return Err("expected one of password and password_file".into()),
        };
        Ok(rackcast_core::model::RedfishTarget {
            url: self.url.clone(),
            username: self.username.clone(),
            password,
            system: self.system.clone(),
            reset: self.reset.clone(),
            tls_verify: self.tls_verify,
            settle_timeout_s: self.settle_timeout.as_secs(),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaidConfig {
    pub level: String,
    pub disks: DiskRule,
    /// The md array the image goes to (e.g. `/dev/md/rackcast`); the
    /// mdadm backend's.
    pub array: Option<String>,
    /// Hardware RAID: a volume through the BMC over the controller drives
    /// `disks` picks; the image then goes to the profile's `target` (the
    /// volume as the OS sees it).
    pub redfish: Option<RedfishConfig>,
    #[serde(default = "d_volume_name")]
    pub volume_name: String,
    /// Destroy a mismatching array or other RAID metadata on the chosen
    /// disks instead of failing the step.
    #[serde(default)]
    pub wipe: bool,
    /// md superblock format: "1.2" (default, at the start) or "1.0" (at
    /// the end: each RAID1 half then looks like a plain disk to legacy
    /// firmware, which can boot from it).
    #[serde(default = "d_metadata")]
    pub metadata: String,
    /// A program instead of the built-in mdadm backend (hardware
    /// controllers' vendor tools).
    pub program: Option<ProgramConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub name: String,
    /// DMI vendor glob (`*` matches anything).
    #[serde(default = "star")]
    pub vendor: String,
    #[serde(default = "star")]
    pub model: String,
    pub image: String,
    /// Image target when there is no RAID: the first disk of this rule.
    pub target: Option<DiskRule>,
    /// Write the image over a target that holds a filesystem or
    /// partition table (re-imaging in place). Without it such a disk is
    /// refused; an operator's `rackcast reinstall` implies it for that
    /// device's next install.
    #[serde(default)]
    pub wipe: bool,
    pub bios: Option<BiosConfig>,
    pub raid: Option<RaidConfig>,
    #[serde(default)]
    pub programs: Vec<ProgramConfig>,
    #[serde(default)]
    pub post_install: Vec<ProgramConfig>,
    pub boot_to_disk: Option<ProgramConfig>,
    /// Each machine's identity in its installed OS: templates of a
    /// cloud-init NoCloud seed, written after post-install.
    pub identity: Option<IdentityConfig>,
}

/// A profile's identity templates (minijinja; see `src/identity.rs` for
/// the facts they see). Read and checked when `serve` starts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `meta-data` (default: `instance-id` and `local-hostname`).
    pub meta_data: Option<PathBuf>,
    /// `user-data` (SSH keys and the rest of `#cloud-config`).
    pub user_data: PathBuf,
    /// `network-config` version 2 (static addresses, VLANs, bonds).
    pub network_config: Option<PathBuf>,
}

fn star() -> String {
    "*".into()
}

/// Per-device overrides by MAC (a subset gets another OS: claim 29).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    pub mac: String,
    pub image: Option<String>,
    pub profile: Option<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// This appliance's name in the fleet record (`appliance.id`, else
    /// the host name).
    pub fn appliance_id(&self) -> String {
        if let Some(id) = &self.appliance.id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "rackcast".into())
    }

    /// Where the fleet record is.
    pub fn store_location(&self) -> crate::store::StoreLocation {
        use crate::store::StoreLocation;
        let a = &self.appliance;
        match a.store.as_deref().map(StoreLocation::parse) {
            None => StoreLocation::Sqlite(a.state_dir.join("rackcast.db")),
            Some(StoreLocation::Postgres(mut t)) => {
                t.password_file = a.store_password_file.clone();
                t.ca_file = a.store_ca.clone();
                StoreLocation::Postgres(t)
            }
            Some(file) => file,
        }
    }

    /// The operator listener's certificate and key files.
    pub fn operator_tls_paths(&self) -> (PathBuf, PathBuf) {
        let a = &self.appliance;
        (
            a.operator_cert
                .clone()
                .unwrap_or_else(|| a.state_dir.join("operator-cert.pem")),
            a.operator_key
                .clone()
                .unwrap_or_else(|| a.state_dir.join("operator-key.pem")),
        )
    }

    /// Create the state dir (owner only: it holds keys, secrets and the
    /// store) or narrow an existing one to owner only. A state dir that
    /// belongs to another user (the packaged service runs as `rackcast`)
    /// is refused, even to root: files root made there (the store's
    /// journal, a key) would lock the appliance out of its own state.
    pub fn ensure_state_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let dir = &self.appliance.state_dir;
        if let Ok(m) = std::fs::metadata(dir) {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if m.uid() != me {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "state_dir {} belongs to uid {}, not to this user (uid {me}): run this as \
                         its owner (the packaged service's user: `sudo -u rackcast rackcast ...`)",
                        dir.display(),
                        m.uid()
                    ),
                ));
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.appliance
            .signing_key
            .clone()
            .unwrap_or_else(|| self.appliance.state_dir.join("signing.key"))
    }
}

#[cfg(test)]
pub(crate) mod tests;
mod validate;
