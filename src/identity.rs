//! Each machine's identity for its installed OS: a cloud-init NoCloud
//! seed rendered from the profile's templates (minijinja) over the
//! device's facts.
//!
//! Owns: loading and checking the templates at start (a template that
//! does not compile stops `serve`, naming its file), the facts a
//! template sees, and rendering with undefined names as errors (a typo
//! fails the device's bundle with the template's name, it does not
//! render an empty hostname). Must not: write anything to a machine (the
//! agent's `identity_written` step does) or read the store.
//!
//! Facts: `device`, `mac`, `serial` (DMI), `hostname` (the rack
//! inventory's, else the device id), `rack`, `slot`, `labels` (the
//! inventory's further columns), `image`, `profile`, and `inventory`
//! (the hardware report: `dmi`, `cpu`, `memory_bytes`, `nics`, `disks`).
//! Templates should quote values with `| tojson` (JSON is YAML): a
//! label holding a newline then cannot add keys to the seed.

use std::collections::HashMap;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use rackcast_core::model::{Inventory, Seed};

use crate::config::Config;
use crate::enroll::InventoryRow;

/// `meta-data` when a profile gives no template.
pub const DEFAULT_META_DATA: &str =
    "instance-id: {{ device | tojson }}\nlocal-hostname: {{ hostname | tojson }}\n";

/// The device's facts, as templates see them.
#[derive(Debug, Clone, Serialize)]
pub struct Facts<'a> {
    pub device: &'a str,
    pub mac: &'a str,
    pub serial: &'a str,
    pub hostname: String,
    pub rack: Option<&'a str>,
    pub slot: Option<&'a str>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub image: &'a str,
    pub profile: &'a str,
    pub inventory: &'a Inventory,
}

impl<'a> Facts<'a> {
    pub fn new(
        device: &'a str,
        mac: &'a str,
        row: Option<&'a InventoryRow>,
        inventory: &'a Inventory,
        image: &'a str,
        profile: &'a str,
    ) -> Facts<'a> {
        Facts {
            device,
            mac,
            serial: &inventory.dmi.serial,
            hostname: row
                .and_then(|r| r.hostname.clone())
                .unwrap_or_else(|| device.to_string()),
            rack: row.and_then(|r| r.rack.as_deref()),
            slot: row.and_then(|r| r.slot.as_deref()),
            labels: row.map(|r| r.labels.clone()).unwrap_or_default(),
            image,
            profile,
            inventory,
        }
    }
}

/// Every profile's compiled templates.
pub struct Templates {
    env: Environment<'static>,
    /// Profile -> whether it has a network-config template.
    profiles: HashMap<String, bool>,
}

fn name(profile: &str, file: &str) -> String {
    format!("{profile}/{file}")
}

/// Strict about undefined names, no HTML escaping (seeds are YAML),
/// files end as they were written.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env
}

impl Templates {
    /// Read and compile every profile's identity templates.
    pub fn load(cfg: &Config) -> Result<Templates, String> {
        let mut env = environment();
        let mut profiles = HashMap::new();
        for p in &cfg.profiles {
            let Some(id) = &p.identity else { continue };
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("profiles {} identity: {}: {e}", p.name, path.display()))
            };
            let meta = match &id.meta_data {
                Some(path) => read(path)?,
                None => DEFAULT_META_DATA.to_string(),
            };
            let mut files = vec![("meta-data", meta), ("user-data", read(&id.user_data)?)];
            if let Some(path) = &id.network_config {
                files.push(("network-config", read(path)?));
            }
            for (file, src) in files {
                env.add_template_owned(name(&p.name, file), src)
                    .map_err(|e| format!("profiles {} identity {file}: {e}", p.name))?;
            }
            profiles.insert(p.name.clone(), id.network_config.is_some());
        }
        Ok(Templates { env, profiles })
    }

    /// The seed of a device of `profile` (`None`: the profile has no
    /// identity templates).
    pub fn render(&self, profile: &str, facts: &Facts) -> Result<Option<Seed>, String> {
        let Some(&network) = self.profiles.get(profile) else {
            return Ok(None);
        };
        let one = |file: &str| -> Result<String, String> {
            self.env
                .get_template(&name(profile, file))
                .and_then(|t| t.render(facts))
                .map_err(|e| format!("identity template {file} of profile {profile}: {e:#}"))
        };
        Ok(Some(Seed {
            meta_data: one("meta-data")?,
            user_data: one("user-data")?,
            network_config: if network {
                Some(one("network-config")?)
            } else {
                None
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        serde_json::from_value(serde_json::json!({
            "dmi": {"vendor": "Dell Inc.", "model": "R650", "serial": "SN1"},
            "cpu": {"arch": "x86_64", "count": 8},
            "memory_bytes": 1u64 << 36,
            "nics": [{"name": "eno1", "mac": "02:aa:00:00:00:01", "pci_id": "8086:1521"}],
            "disks": [],
        }))
        .unwrap()
    }

    fn templates(user: &str, net: Option<&str>) -> Templates {
        let mut env = environment();
        env.add_template_owned(name("p", "meta-data"), DEFAULT_META_DATA.to_string())
            .unwrap();
        env.add_template_owned(name("p", "user-data"), user.to_string())
            .unwrap();
        if let Some(n) = net {
            env.add_template_owned(name("p", "network-config"), n.to_string())
                .unwrap();
        }
        Templates {
            env,
            profiles: [("p".to_string(), net.is_some())].into(),
        }
    }

    #[test]
    fn a_seed_is_rendered_from_the_inventory_row_and_the_hardware() {
        let row = InventoryRow {
            mac: "02:aa:00:00:00:01".into(),
            hostname: Some("web1".into()),
            rack: Some("A".into()),
            labels: [("addr".to_string(), "198.18.5.11/24".to_string())].into(),
            ..Default::default()
        };
        let inv = inventory();
        let facts = Facts::new("rc-02aa00000001", &row.mac, Some(&row), &inv, "debian", "p");
        let t = templates(
            "#cloud-config\nhostname: {{ hostname | tojson }}\n",
            Some("version: 2\nethernets:\n  {{ inventory.nics[0].name }}:\n    addresses: [{{ labels.addr | tojson }}]\n"),
        );
        let seed = t.render("p", &facts).unwrap().unwrap();
        assert_eq!(
            seed.meta_data,
            "instance-id: \"rc-02aa00000001\"\nlocal-hostname: \"web1\"\n"
        );
        assert!(seed.user_data.contains("hostname: \"web1\""));
        assert!(seed
            .network_config
            .unwrap()
            .contains("eno1:\n    addresses: [\"198.18.5.11/24\"]"));
        assert!(t.render("other", &facts).unwrap().is_none());
    }

    #[test]
    fn an_undefined_name_fails_the_render_and_values_cannot_add_keys() {
        let inv = inventory();
        let facts = Facts::new("rc-1", "02:aa:00:00:00:01", None, &inv, "debian", "p");
        let t = templates("host: {{ hostnme }}\n", None);
        let e = t.render("p", &facts).unwrap_err();
        assert!(e.contains("user-data") && e.contains("undefined"), "{e}");
        // Without an inventory row the device id is the hostname.
        let row = InventoryRow {
            hostname: Some("x\nruncmd: [reboot]".into()),
            ..Default::default()
        };
        let facts = Facts::new("rc-1", "m", Some(&row), &inv, "debian", "p");
        let t = templates("#cloud-config\n", None);
        let seed = t.render("p", &facts).unwrap().unwrap();
        assert!(
            seed.meta_data
                .contains(r#"local-hostname: "x\nruncmd: [reboot]""#),
            "quoted on one line: {}",
            seed.meta_data
        );
    }
}
