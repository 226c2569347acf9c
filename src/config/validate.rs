//! Validation of a parsed [`Config`]: every check that serde's types
//! cannot express (ranges, cross-references between sections, rules a
//! profile's disks and RAID must satisfy), each error naming the key and
//! saying what was expected.
//!
//! Owns: the checks. Must not: read files or open sockets.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use rackcast_core::model::check_raid_level;

use super::{Config, ConfigError};

impl Config {
    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        self.validate_store(&bad)?;
        if let Some(id) = &self.appliance.id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(bad(
                    "appliance.id".into(),
                    "expected 1 to 64 of A-Z a-z 0-9 - _ .".into(),
                ));
            }
        }
        if self.appliance.standby
            && !self
                .appliance
                .store
                .as_deref()
                .is_some_and(crate::store::is_postgres_url)
        {
            return Err(bad(
                "appliance.standby".into(),
                "a standby pair shares its fleet record: store = \"postgres://...\"".into(),
            ));
        }
        if self.appliance.standby && self.appliance.control_listen.ip().is_unspecified() {
            return Err(bad(
                "appliance.standby".into(),
                "needs control_listen on the pair's virtual address, not a wildcard".into(),
            ));
        }
        if !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&self.appliance.lease_ttl)
        {
            return Err(bad(
                "appliance.lease_ttl".into(),
                "expected 3s ..= 10m".into(),
            ));
        }
        if self.dataplane.total_rate < 1_000_000 {
            return Err(bad(
                "dataplane.total_rate".into(),
                "expected at least 1M (bits/s)".into(),
            ));
        }
        if !self.dataplane.group_base.is_multicast() {
            return Err(bad(
                "dataplane.group_base".into(),
                format!("{} is not a multicast address", self.dataplane.group_base),
            ));
        }
        if !(Duration::from_millis(5)..=Duration::from_secs(1)).contains(&self.dataplane.feedback) {
            return Err(bad(
                "dataplane.feedback".into(),
                "expected 5ms ..= 1s".into(),
            ));
        }
        if !(1..=64).contains(&self.dataplane.gso_segments) {
            return Err(bad(
                "dataplane.gso_segments".into(),
                "expected 1 ..= 64".into(),
            ));
        }
        if !(0..=rackcast_core::image::packed::MAX_LEVEL).contains(&self.dataplane.zstd_level) {
            return Err(bad(
                "dataplane.zstd_level".into(),
                format!(
                    "expected 0 (off) ..= {}",
                    rackcast_core::image::packed::MAX_LEVEL
                ),
            ));
        }
        if self.waves.hello_timeout < Duration::from_secs(1) {
            return Err(bad(
                "waves.hello_timeout".into(),
                "expected at least 1s".into(),
            ));
        }
        if !(576..=9000).contains(&self.dataplane.mtu) {
            return Err(bad("dataplane.mtu".into(), "expected 576..=9000".into()));
        }
        if !(1..=256).contains(&self.bmc.parallel) {
            return Err(bad("bmc.parallel".into(), "expected 1 ..= 256".into()));
        }
        if !(self.bmc.power_on_per_second > 0.0 && self.bmc.power_on_per_second <= 1000.0) {
            return Err(bad(
                "bmc.power_on_per_second".into(),
                "expected more than 0 and at most 1000".into(),
            ));
        }
        if let Some(m) = &self.bmc.boot_mode {
            if m != "UEFI" && m != "Legacy" {
                return Err(bad(
                    "bmc.boot_mode".into(),
                    format!("{m:?}: expected \"UEFI\" or \"Legacy\""),
                ));
            }
        }
        if let Some(c) = &self.bmc.default_credential {
            if !self.bmc.credentials.contains_key(c) {
                return Err(bad(
                    "bmc.default_credential".into(),
                    format!("{c:?}: no [bmc.credentials.{c}]"),
                ));
            }
        }
        if self.waves.min_members == 0 {
            return Err(bad("waves.min_members".into(), "expected >= 1".into()));
        }
        if self.workflow.max_attempts == 0 {
            return Err(bad("workflow.max_attempts".into(), "expected >= 1".into()));
        }
        if self.appliance.max_agent_connections == 0 {
            return Err(bad(
                "appliance.max_agent_connections".into(),
                "expected >= 1".into(),
            ));
        }
        if self.appliance.max_inflight_bundles == 0 || self.appliance.max_inflight_transfers == 0 {
            return Err(bad(
                "appliance.max_inflight_*".into(),
                "expected >= 1".into(),
            ));
        }
        if self.agents.is_empty() {
            return Err(bad(
                "agents".into(),
                "expected at least one `arch = \"/path/to/rackcast-agent\"`".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, im) in self.images.iter().enumerate() {
            if !names.insert(im.name.as_str()) {
                return Err(bad(
                    format!("images[{i}].name"),
                    format!("duplicate image {:?}", im.name),
                ));
            }
        }
        for (i, m) in self.modules.iter().enumerate() {
            for id in &m.pci_ids {
                if !is_pci_id(id) {
                    return Err(bad(
                        format!("modules[{i}].pci_ids"),
                        format!("{id:?}: expected vendor:device in hex, like \"15b3:1017\""),
                    ));
                }
            }
        }
        if self.profiles.is_empty() {
            return Err(bad(
                "profiles".into(),
                "expected at least one [[profiles]]".into(),
            ));
        }
        let mut pnames = std::collections::HashSet::new();
        for (i, p) in self.profiles.iter().enumerate() {
            if !pnames.insert(p.name.as_str()) {
                return Err(bad(
                    format!("profiles[{i}].name"),
                    format!("duplicate profile {:?}", p.name),
                ));
            }
            if let Some(b) = &p.bios {
                let key = format!("profiles[{i}].bios");
                match (&b.redfish, &b.program) {
                    (Some(_), Some(_)) => {
                        return Err(bad(
                            key,
                            "expected one backend: `redfish` or `program`".into(),
                        ))
                    }
                    (None, None) => {
                        return Err(bad(
                            key,
                            "expected a backend: `redfish` (the BMC) or `program`".into(),
                        ))
                    }
                    (Some(r), None) => {
                        if b.attributes.is_empty() {
                            return Err(bad(
                                format!("{key}.attributes"),
                                "the Redfish backend needs the attributes wanted".into(),
                            ));
                        }
                        if let Some((sub, m)) = r.problem() {
                            return Err(bad(format!("{key}.redfish{sub}"), m));
                        }
                    }
                    (None, Some(_)) => {}
                }
            }
            if let Some(r) = &p.raid {
                let n = r.disks.count;
                if n > 0 {
                    check_raid_level(&r.level, n)
                        .map_err(|m| bad(format!("profiles[{i}].raid"), m))?;
                } else if check_raid_level(&r.level, usize::MAX).is_err() {
                    return Err(bad(
                        format!("profiles[{i}].raid.level"),
                        format!(
                            "{:?}: expected raid0, raid1, raid5, raid6 or raid10",
                            r.level
                        ),
                    ));
                }
            } else if p.target.is_none() {
                return Err(bad(
                    format!("profiles[{i}]"),
                    "expected `target` (a disk rule) or `raid` (the image goes to the array)"
                        .into(),
                ));
            }
            if let Some(r) = &p.raid {
                if !["1.0", "1.1", "1.2"].contains(&r.metadata.as_str()) {
                    return Err(bad(
                        format!("profiles[{i}].raid.metadata"),
                        format!("{:?}: expected \"1.0\", \"1.1\" or \"1.2\"", r.metadata),
                    ));
                }
                let key = format!("profiles[{i}].raid");
                match (&r.redfish, &r.program) {
                    (Some(_), Some(_)) => {
                        return Err(bad(
                            key,
                            "expected one backend: `redfish`, `program` or neither (mdadm)".into(),
                        ))
                    }
                    (Some(rf), None) => {
                        if p.target.is_none() {
                            return Err(bad(
                                format!("profiles[{i}]"),
                                "a Redfish RAID volume needs `target`: the disk rule that finds the volume as the OS sees it".into(),
                            ));
                        }
                        if let Some((sub, m)) = rf.problem() {
                            return Err(bad(format!("{key}.redfish{sub}"), m));
                        }
                    }
                    (None, _) => {
                        let array = r.array.as_deref().unwrap_or_default();
                        if r.program.is_none() && rackcast_core::raid::array_name(array).is_none() {
                            return Err(bad(
                                format!("{key}.array"),
                                format!(
                                    "{array:?}: the mdadm backend wants /dev/md/NAME (NAME: up to 32 letters, digits, - or _)"
                                ),
                            ));
                        }
                        if r.program.is_some() && r.array.is_none() {
                            return Err(bad(
                                format!("{key}.array"),
                                "the image target array is missing".into(),
                            ));
                        }
                    }
                }
            }
            for rule in p.target.iter().chain(p.raid.as_ref().map(|r| &r.disks)) {
                if rule.order != "smallest" && rule.order != "largest" {
                    return Err(bad(
                        format!("profiles[{i}] disk rule order"),
                        format!("{:?}: expected smallest or largest", rule.order),
                    ));
                }
            }
        }
        if let Some(d) = &self.boot.dhcp {
            let key = |k: &str| format!("boot.dhcp.{k}");
            if d.new_clients_per_second == 0 {
                return Err(bad(
                    key("new_clients_per_second"),
                    "expected at least 1 (0 would answer no new client)".into(),
                ));
            }
            match d.mode.as_str() {
                "proxy" => {}
                "full" => {
                    let (Some(a), Some(b), Some(m)) = (d.pool_start, d.pool_end, d.netmask) else {
                        return Err(bad(
                            key("pool_start"),
                            "full mode needs pool_start, pool_end and netmask".into(),
                        ));
                    };
                    let net = |ip: Ipv4Addr| u32::from(ip) & u32::from(m);
                    if u32::from(a) > u32::from(b) {
                        return Err(bad(
                            key("pool_end"),
                            "expected pool_end >= pool_start".into(),
                        ));
                    }
                    if net(a) != net(d.server_ip) || net(b) != net(d.server_ip) {
                        return Err(bad(
                            key("pool_start"),
                            format!(
                                "pool {a}-{b} is not in the subnet of server_ip {}",
                                d.server_ip
                            ),
                        ));
                    }
                }
                other => {
                    return Err(bad(
                        key("mode"),
                        format!("{other:?}: expected \"full\" or \"proxy\""),
                    ))
                }
            }
            if self.appliance.api_listen.is_none() {
                return Err(bad(
                    key("mode"),
                    "network boot needs appliance.api_listen (iPXE fetches its script there)"
                        .into(),
                ));
            }
        }
        if let Some(h) = &self.boot.http {
            if self.appliance.api_listen.is_none() {
                return Err(bad(
                    "boot.http".into(),
                    "needs appliance.api_listen (the scripts and files are served there)".into(),
                ));
            }
            for (k, v) in [("kernel", &h.kernel), ("initrd", &h.initrd)] {
                if v.contains('/') || v.starts_with('.') || v.is_empty() {
                    return Err(bad(
                        format!("boot.http.{k}"),
                        format!("{v:?}: expected a file name inside boot.http.files"),
                    ));
                }
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            if let Some(pr) = &d.profile {
                if !pnames.contains(pr.as_str()) {
                    return Err(bad(
                        format!("devices[{i}].profile"),
                        format!("no profile named {pr:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_pci_id(s: &str) -> bool {
    let Some((v, d)) = s.split_once(':') else {
        return false;
    };
    v.len() == 4
        && d.len() == 4
        && v.chars().all(|c| c.is_ascii_hexdigit())
        && d.chars().all(|c| c.is_ascii_hexdigit())
}

impl Config {
    /// `appliance.store`: a file, or a PostgreSQL URL that parses, carries
    /// no password (that goes in `store_password_file`, out of the config
    /// and of every log) and asks for TLS only with a CA to check it by.
    fn validate_store(
        &self,
        bad: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let a = &self.appliance;
        let url = match a.store.as_deref() {
            Some(s) if crate::store::is_postgres_url(s) => s,
            _ => {
                for (key, set) in [
                    ("store_password_file", a.store_password_file.is_some()),
                    ("store_ca", a.store_ca.is_some()),
                ] {
                    if set {
                        return Err(bad(
                            format!("appliance.{key}"),
                            "only for a postgres:// store".into(),
                        ));
                    }
                }
                return Ok(());
            }
        };
        let key = || "appliance.store".to_string();
        let cfg: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| bad(key(), format!("not a PostgreSQL URL: {e}")))?;
        if cfg.get_password().is_some() {
            return Err(bad(
                key(),
                "the URL holds a password: put it in appliance.store_password_file".into(),
            ));
        }
        if cfg.get_hosts().is_empty() {
            return Err(bad(key(), "the URL names no host".into()));
        }
        if matches!(cfg.get_ssl_mode(), postgres::config::SslMode::Require) && a.store_ca.is_none()
        {
            return Err(bad(
                "appliance.store_ca".into(),
                "sslmode=require needs the CA that signed the server's certificate".into(),
            ));
        }
        Ok(())
    }
}
