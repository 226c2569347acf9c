//! Enrollment: which machines this appliance installs, after MAAS's
//! New -> Commission flow. A rack inventory (CSV) and `[[devices]]` name
//! the known machines; `[enroll] policy` says what happens to the others.
//!
//! Owns: reading the rack inventory (a header row, `mac` required,
//! `serial`, `hostname`, `rack`, `slot` read, every further column kept as
//! a label) and the decision for a MAC seen for the first time. Must not:
//! create records or answer boots (the controller and boot services do,
//! with this module's answer).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::{Config, EnrollPolicy};

/// One machine of the rack inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryRow {
    /// Boot interface MAC, lower case.
    pub mac: String,
    /// The serial its DMI must report (checked at inventory).
    pub serial: Option<String>,
    pub hostname: Option<String>,
    pub rack: Option<String>,
    pub slot: Option<String>,
    /// Its BMC: `redfish+http://HOST[:PORT]`, `https://HOST` (Redfish) or
    /// `ipmi://HOST[:PORT]` (IPMI over LAN, through ipmitool).
    pub bmc: Option<String>,
    /// The name of its BMC login (`[bmc.credentials.NAME]`).
    pub bmc_credential: Option<String>,
    /// Every further column, by its header.
    pub labels: BTreeMap<String, String>,
}

/// Why the rack inventory could not be read.
#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("rack inventory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rack inventory {path}, line {line}: {message}")]
    Bad {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// What to do with a MAC the appliance has no record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Install it (known, or policy `auto`).
    Install,
    /// Record and inventory it, then hold it for `rackcast approve`.
    Hold,
    /// Make no record, answer nothing; the text says why.
    Refuse(&'static str),
}

/// The known machines and the policy for the rest.
#[derive(Debug, Clone)]
pub struct Enrollment {
    policy: EnrollPolicy,
    max_pending: usize,
    rows: HashMap<String, InventoryRow>,
}

impl Enrollment {
    /// From the config: `[[devices]]` MACs and the inventory file's rows.
    pub fn from_config(cfg: &Config) -> Result<Enrollment, EnrollError> {
        let mut rows = match &cfg.enroll.inventory {
            Some(p) => read_inventory(p)?,
            None => HashMap::new(),
        };
        for d in &cfg.devices {
            let mac = d.mac.to_ascii_lowercase();
            rows.entry(mac.clone()).or_insert(InventoryRow {
                mac,
                ..Default::default()
            });
        }
        Ok(Enrollment {
            policy: cfg.enroll.policy,
            max_pending: cfg.enroll.max_pending,
            rows,
        })
    }

    /// Everything installed, nothing known (tools and tests of other
    /// parts).
    pub fn auto() -> Enrollment {
        Enrollment {
            policy: EnrollPolicy::Auto,
            max_pending: usize::MAX,
            rows: HashMap::new(),
        }
    }

    /// The inventory row of `mac`, if it is known.
    pub fn row(&self, mac: &str) -> Option<&InventoryRow> {
        self.rows.get(&mac.to_ascii_lowercase())
    }

    /// Every known machine's row.
    pub fn rows(&self) -> impl Iterator<Item = &InventoryRow> {
        self.rows.values()
    }

    /// Known machines.
    pub fn known(&self) -> usize {
        self.rows.len()
    }

    /// Whether the boot services answer `mac` at all: under `known`, an
    /// unknown MAC gets no lease, no boot file and no script.
    pub fn answers(&self, mac: &str) -> bool {
        self.policy != EnrollPolicy::Known || self.row(mac).is_some()
    }

    /// A MAC without a record; `pending`: unknown devices already held.
    pub fn decide(&self, mac: &str, pending: usize) -> Decision {
        if self.row(mac).is_some() {
            return Decision::Install;
        }
        match self.policy {
            EnrollPolicy::Auto => Decision::Install,
            EnrollPolicy::Known => {
                Decision::Refuse("unknown device: not in the rack inventory (enroll policy known)")
            }
            EnrollPolicy::Approve if pending >= self.max_pending => Decision::Refuse(
                "unknown device: too many devices already await approval (enroll.max_pending)",
            ),
            EnrollPolicy::Approve => Decision::Hold,
        }
    }

    /// The inventory says `mac` has another serial than the machine
    /// reports: why, for the hold.
    pub fn serial_mismatch(&self, mac: &str, reported: &str) -> Option<String> {
        let want = self.row(mac)?.serial.as_deref()?;
        (!want.eq_ignore_ascii_case(reported.trim())).then(|| {
            format!(
                "serial mismatch: the rack inventory says {want:?} for {mac}, the machine reports {reported:?}"
            )
        })
    }
}

/// Read a rack inventory file.
pub fn read_inventory(path: &Path) -> Result<HashMap<String, InventoryRow>, EnrollError> {
    let text = std::fs::read(path).map_err(|source| EnrollError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_inventory(&text).map_err(|(line, message)| EnrollError::Bad {
        path: path.to_path_buf(),
        line,
        message,
    })
}

/// Parse a rack inventory: `Err((line, why))` on the first bad line.
pub fn parse_inventory(text: &[u8]) -> Result<HashMap<String, InventoryRow>, (u64, String)> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text);
    let headers: Vec<String> = r
        .headers()
        .map_err(|e| (1, e.to_string()))?
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let Some(mac_col) = col("mac") else {
        return Err((1, "no `mac` column in the header row".into()));
    };
    let mut rows = HashMap::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| (e.position().map_or(0, |p| p.line()), e.to_string()))?;
        let line = rec.position().map_or(0, |p| p.line());
        let get = |i: Option<usize>| {
            i.and_then(|i| rec.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let mac = get(Some(mac_col))
            .unwrap_or_default()
            .to_ascii_lowercase()
            .replace('-', ":");
        if !rackcast_core::wire::device::valid_mac(&mac) {
            return Err((line, format!("{mac:?} is not a MAC like aa:bb:cc:dd:ee:ff")));
        }
        let known = [
            "mac",
            "serial",
            "hostname",
            "rack",
            "slot",
            "bmc",
            "bmc_credential",
        ];
        let labels = headers
            .iter()
            .enumerate()
            .filter(|(_, h)| !known.contains(&h.as_str()))
            .filter_map(|(i, h)| get(Some(i)).map(|v| (h.clone(), v)))
            .collect();
        let row = InventoryRow {
            mac: mac.clone(),
            serial: get(col("serial")),
            hostname: get(col("hostname")),
            rack: get(col("rack")),
            slot: get(col("slot")),
            bmc: get(col("bmc")),
            bmc_credential: get(col("bmc_credential")),
            labels,
        };
        if rows.insert(mac.clone(), row).is_some() {
            return Err((line, format!("{mac} is listed twice")));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "\
# rack A, first row
MAC,Serial,Hostname,Rack,Slot,Role
52:54:00:00:00:01, SN1 ,web1,A,1,frontend
52-54-00-00-00-02,,db1,A,2,
";

    fn enroll(policy: EnrollPolicy, max_pending: usize) -> Enrollment {
        Enrollment {
            policy,
            max_pending,
            rows: parse_inventory(CSV.as_bytes()).unwrap(),
        }
    }

    #[test]
    fn inventory_rows_are_read_with_their_labels() {
        let rows = parse_inventory(CSV.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        let r = &rows["52:54:00:00:00:01"];
        assert_eq!(r.serial.as_deref(), Some("SN1"));
        assert_eq!(r.hostname.as_deref(), Some("web1"));
        assert_eq!(
            (r.rack.as_deref(), r.slot.as_deref()),
            (Some("A"), Some("1"))
        );
        assert_eq!(r.labels["role"], "frontend");
        let r2 = &rows["52:54:00:00:00:02"];
        assert_eq!(r2.serial, None);
        assert!(r2.labels.is_empty());
    }

    #[test]
    fn bad_inventories_name_the_line() {
        let e = parse_inventory(b"serial\nX\n").unwrap_err();
        assert!(e.1.contains("no `mac` column"), "{e:?}");
        let e = parse_inventory(b"mac\n52:54:00:00:00:01\nzz\n").unwrap_err();
        assert_eq!(e.0, 3, "{e:?}");
        assert!(e.1.contains("not a MAC"));
        let e = parse_inventory(b"mac\n52:54:00:00:00:01\n52:54:00:00:00:01\n").unwrap_err();
        assert!(e.1.contains("listed twice"), "{e:?}");
        // A row with more fields than the header is an error, not a guess.
        let e = parse_inventory(b"mac,serial\n52:54:00:00:00:01,A,B\n").unwrap_err();
        assert_eq!(e.0, 2, "{e:?}");
    }

    #[test]
    fn policies_decide_for_unknown_macs_only() {
        let known = "52:54:00:00:00:01";
        let stranger = "02:00:00:00:00:99";
        for p in [
            EnrollPolicy::Known,
            EnrollPolicy::Approve,
            EnrollPolicy::Auto,
        ] {
            assert_eq!(enroll(p, 4).decide(known, 100), Decision::Install, "{p:?}");
            assert_eq!(
                enroll(p, 4).decide(&known.to_uppercase(), 0),
                Decision::Install
            );
        }
        assert!(matches!(
            enroll(EnrollPolicy::Known, 4).decide(stranger, 0),
            Decision::Refuse(_)
        ));
        assert!(!enroll(EnrollPolicy::Known, 4).answers(stranger));
        assert!(enroll(EnrollPolicy::Known, 4).answers(known));
        assert_eq!(
            enroll(EnrollPolicy::Approve, 4).decide(stranger, 3),
            Decision::Hold
        );
        // The held are bounded: spoofed MACs cannot grow the record.
        assert!(matches!(
            enroll(EnrollPolicy::Approve, 4).decide(stranger, 4),
            Decision::Refuse(why) if why.contains("max_pending")
        ));
        assert!(enroll(EnrollPolicy::Approve, 4).answers(stranger));
        assert_eq!(
            enroll(EnrollPolicy::Auto, 0).decide(stranger, 9),
            Decision::Install
        );
    }

    #[test]
    fn a_known_serial_must_match() {
        let e = enroll(EnrollPolicy::Approve, 4);
        assert_eq!(e.serial_mismatch("52:54:00:00:00:01", "sn1"), None);
        let why = e.serial_mismatch("52:54:00:00:00:01", "OTHER").unwrap();
        assert!(
            why.contains("\"SN1\"") && why.contains("\"OTHER\""),
            "{why}"
        );
        // No serial listed, or not known: nothing to compare.
        assert_eq!(e.serial_mismatch("52:54:00:00:00:02", "X"), None);
        assert_eq!(e.serial_mismatch("02:00:00:00:00:99", "X"), None);
    }
}
