//! BIOS settings, declarative: what a profile wants, what the BIOS has,
//! the difference, and the check after the change.
//!
//! Owns: the comparison of wanted attributes (strings in the profile)
//! with the typed values a BMC reports, the typed values to send, the
//! verification after apply, and the one procedure every backend follows
//! (`configure`: read, diff, stage only what differs, apply, read back,
//! compare), recording each operation for the device's event log. Must
//! not: speak a protocol (a [`BiosBackend`] does: Redfish in
//! `crate::redfish`, a vendor tool can be another) or decide when the
//! step runs (the workflow does).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::workflow::OpRecord;

pub type Attributes = Map<String, Value>;

#[derive(Debug, Error, PartialEq)]
pub enum BiosError {
    #[error("BIOS attribute {0} is not offered by this machine's BIOS")]
    NotOffered(String),
    #[error("BIOS attribute {attr}: {value:?} is not a valid {kind}")]
    BadValue {
        attr: String,
        value: String,
        kind: &'static str,
    },
    #[error("BIOS attributes read back different after apply: {}", list_mismatches(.0))]
    Mismatch(Vec<Mismatch>),
    /// The backend could not do what was asked (BMC unreachable, HTTP
    /// error, refused PATCH); the text names the attribute when the BMC
    /// did. Worth a retry when `retryable`.
    #[error("{message}")]
    Backend { message: String, retryable: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub attr: String,
    pub wanted: String,
    pub got: Value,
}

fn list_mismatches(m: &[Mismatch]) -> String {
    m.iter()
        .map(|m| format!("{} wanted {:?}, reads {}", m.attr, m.wanted, m.got))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What has to change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BiosDiff {
    /// Attribute -> the value to send, typed like the current value.
    pub changes: Attributes,
    /// (attribute, current value) for the ones already as wanted.
    pub unchanged: Vec<(String, Value)>,
    /// (attribute, current value) before the change.
    pub before: Vec<(String, Value)>,
}

/// Whether the BMC's `current` value is what the profile's `wanted`
/// string means. Profiles are TOML strings; BMCs report strings, numbers
/// and booleans.
pub fn same(current: &Value, wanted: &str) -> bool {
    match current {
        Value::String(s) => s == wanted,
        Value::Bool(b) => wanted.eq_ignore_ascii_case(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_f64(), wanted.trim().parse::<f64>()) {
            (Some(a), Ok(b)) => a == b,
            _ => false,
        },
        Value::Null => wanted.is_empty(),
        _ => false,
    }
}

/// The wanted string as a value of the current value's type.
fn typed(attr: &str, current: &Value, wanted: &str) -> Result<Value, BiosError> {
    let bad = |kind| BiosError::BadValue {
        attr: attr.to_string(),
        value: wanted.to_string(),
        kind,
    };
    Ok(match current {
        Value::Bool(_) => match wanted.to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("boolean")),
        },
        Value::Number(_) => {
            if let Ok(i) = wanted.trim().parse::<i64>() {
                Value::from(i)
            } else {
                let f: f64 = wanted.trim().parse().map_err(|_| bad("number"))?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| bad("number"))?
            }
        }
        _ => Value::String(wanted.to_string()),
    })
}

/// Compare. An attribute the BIOS does not have is an error naming it:
/// sending it would be refused (or, worse, silently ignored).
pub fn diff(
    current: &Attributes,
    wanted: &BTreeMap<String, String>,
) -> Result<BiosDiff, BiosError> {
    let mut d = BiosDiff::default();
    for (k, want) in wanted {
        let cur = current
            .get(k)
            .ok_or_else(|| BiosError::NotOffered(k.clone()))?;
        if same(cur, want) {
            d.unchanged.push((k.clone(), cur.clone()));
        } else {
            d.changes.insert(k.clone(), typed(k, cur, want)?);
            d.before.push((k.clone(), cur.clone()));
        }
    }
    Ok(d)
}

/// Every wanted attribute reads as wanted.
pub fn verify(after: &Attributes, wanted: &BTreeMap<String, String>) -> Result<(), BiosError> {
    let bad: Vec<Mismatch> = wanted
        .iter()
        .filter(|(k, w)| !after.get(*k).is_some_and(|v| same(v, w)))
        .map(|(k, w)| Mismatch {
            attr: k.clone(),
            wanted: w.clone(),
            got: after.get(k).cloned().unwrap_or(Value::Null),
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(BiosError::Mismatch(bad))
    }
}

/// A way to reach a machine's BIOS settings. Redfish is one
/// (`crate::redfish::RedfishBios`); a vendor command-line tool can be
/// another.
pub trait BiosBackend {
    /// Where the settings live, for the log (no credentials).
    fn describe(&self) -> String;
    /// The current attributes.
    fn read(&mut self) -> impl Future<Output = Result<Attributes, BiosError>> + Send;
    /// Stage `changes` as pending settings.
    fn stage(
        &mut self,
        changes: &Attributes,
    ) -> impl Future<Output = Result<String, BiosError>> + Send;
    /// Make pending settings take effect (a reset); returns what it did.
    fn apply(&mut self) -> impl Future<Output = Result<String, BiosError>> + Send;
}

/// How long to wait for the settings to read back after apply, and how
/// often to look.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    pub timeout: Duration,
    pub interval: Duration,
}

fn show(v: &[(String, Value)]) -> String {
    v.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bring the BIOS to `wanted`: read, compare, stage only what differs,
/// apply, read back until it matches (or `settle.timeout`), compare.
/// Already as wanted: nothing staged, no reset. Every operation is
/// pushed to `ops`; the result says what happened. Right before apply
/// (a reset, which may restart the machine running this) the operations
/// so far are handed to `flush` and taken out of `ops`, so they are
/// recorded even if nothing after the reset is.
pub async fn configure<B: BiosBackend>(
    backend: &mut B,
    wanted: &BTreeMap<String, String>,
    settle: Settle,
    ops: &mut Vec<OpRecord>,
    flush: &mut (dyn FnMut(Vec<OpRecord>) + Send),
) -> Result<String, BiosError> {
    let t = Instant::now();
    let current = match backend.read().await {
        Ok(c) => c,
        Err(e) => {
            ops.push(OpRecord::timed(
                "bios-read",
                false,
                t,
                format!("{}: {e}", backend.describe()),
            ));
            return Err(e);
        }
    };
    ops.push(OpRecord::timed(
        "bios-read",
        true,
        t,
        format!("{}: {} attributes", backend.describe(), current.len()),
    ));
    let t = Instant::now();
    let d = match diff(&current, wanted) {
        Ok(d) => d,
        Err(e) => {
            ops.push(OpRecord::timed("bios-diff", false, t, e.to_string()));
            return Err(e);
        }
    };
    if d.changes.is_empty() {
        let detail = format!(
            "already as wanted, nothing to change (no PATCH, no reset): {}",
            show(&d.unchanged)
        );
        ops.push(OpRecord::timed("bios-diff", true, t, detail.clone()));
        return Ok(detail);
    }
    let changes: Vec<String> = d
        .before
        .iter()
        .map(|(k, old)| format!("{k}: {old} -> {}", d.changes[k]))
        .collect();
    ops.push(OpRecord::timed(
        "bios-diff",
        true,
        t,
        format!(
            "{} to change: {}; already as wanted: {}",
            changes.len(),
            changes.join(", "),
            if d.unchanged.is_empty() {
                "none".to_string()
            } else {
                show(&d.unchanged)
            }
        ),
    ));
    let t = Instant::now();
    match backend.stage(&d.changes).await {
        Ok(what) => ops.push(OpRecord::timed("bios-stage", true, t, what)),
        Err(e) => {
            ops.push(OpRecord::timed("bios-stage", false, t, e.to_string()));
            return Err(e);
        }
    }
    flush(std::mem::take(ops));
    let t = Instant::now();
    match backend.apply().await {
        Ok(what) => ops.push(OpRecord::timed("bios-apply", true, t, what)),
        Err(e) => {
            ops.push(OpRecord::timed("bios-apply", false, t, e.to_string()));
            return Err(e);
        }
    }
    let t = Instant::now();
    let mut reads = 0u32;
    loop {
        reads += 1;
        let last = t.elapsed() >= settle.timeout;
        let result = match backend.read().await {
            Ok(after) => verify(&after, wanted),
            Err(e) if e.is_retryable() && !last => {
                // The BMC is busy with the reset: look again.
                tokio::time::sleep(settle.interval).await;
                continue;
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                let detail = format!(
                    "read back after apply ({reads} reads): {} as wanted",
                    wanted.len()
                );
                ops.push(OpRecord::timed("bios-verify", true, t, detail));
                return Ok(format!(
                    "changed {} and verified: {}",
                    changes.len(),
                    changes.join(", ")
                ));
            }
            Err(e) if last => {
                ops.push(OpRecord::timed("bios-verify", false, t, e.to_string()));
                return Err(e);
            }
            Err(_) => tokio::time::sleep(settle.interval).await,
        }
    }
}

impl BiosError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BiosError::Backend {
                retryable: true,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(v: Value) -> Attributes {
        v.as_object().cloned().unwrap()
    }

    fn want(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn diff_sends_only_what_differs_typed_like_the_bmc() {
        let cur = attrs(json!({
            "BootMode": "Bios", "ProcTurboMode": "Enabled", "QuietBoot": true,
            "NumCores": 10, "Ratio": 1.5
        }));
        let d = diff(
            &cur,
            &want(&[
                ("BootMode", "Uefi"),
                ("ProcTurboMode", "Enabled"),
                ("QuietBoot", "False"),
                ("NumCores", "12"),
                ("Ratio", "1.5"),
            ]),
        )
        .unwrap();
        assert_eq!(
            Value::Object(d.changes),
            json!({"BootMode": "Uefi", "QuietBoot": false, "NumCores": 12})
        );
        assert_eq!(d.unchanged.len(), 2);
        assert!(matches!(
            diff(&cur, &want(&[("NoSuch", "x")])),
            Err(BiosError::NotOffered(a)) if a == "NoSuch"
        ));
        assert!(matches!(
            diff(&cur, &want(&[("QuietBoot", "maybe")])),
            Err(BiosError::BadValue {
                kind: "boolean",
                ..
            })
        ));
        assert!(matches!(
            diff(&cur, &want(&[("NumCores", "many")])),
            Err(BiosError::BadValue { kind: "number", .. })
        ));
    }

    #[test]
    fn verify_names_every_attribute_that_reads_back_different() {
        let w = want(&[("A", "1"), ("B", "x"), ("C", "y")]);
        let after = attrs(json!({"A": 1, "B": "z"}));
        let Err(BiosError::Mismatch(m)) = verify(&after, &w) else {
            panic!("mismatch expected")
        };
        let names: Vec<&str> = m.iter().map(|m| m.attr.as_str()).collect();
        assert_eq!(names, ["B", "C"]);
        let text = BiosError::Mismatch(m).to_string();
        assert!(text.contains("B wanted \"x\", reads \"z\""), "{text}");
        assert!(verify(&attrs(json!({"A": 1.0, "B": "x", "C": "y"})), &w).is_ok());
    }

    /// A BIOS in memory: staged values take effect on apply, after
    /// `lag` more reads (a BMC still showing the old values).
    struct FakeBios {
        current: Attributes,
        pending: Attributes,
        lag: u32,
        calls: Vec<&'static str>,
        refuse: Option<String>,
    }

    impl BiosBackend for FakeBios {
        fn describe(&self) -> String {
            "fake".into()
        }
        async fn read(&mut self) -> Result<Attributes, BiosError> {
            self.calls.push("read");
            if self.lag > 0 {
                self.lag -= 1;
            } else {
                let p = std::mem::take(&mut self.pending);
                self.current.extend(p);
            }
            Ok(self.current.clone())
        }
        async fn stage(&mut self, changes: &Attributes) -> Result<String, BiosError> {
            self.calls.push("stage");
            if let Some(r) = &self.refuse {
                return Err(BiosError::Backend {
                    message: format!("BMC refused {r}"),
                    retryable: false,
                });
            }
            self.pending = changes.clone();
            Ok("staged".into())
        }
        async fn apply(&mut self) -> Result<String, BiosError> {
            self.calls.push("apply");
            Ok("reset".into())
        }
    }

    fn settle() -> Settle {
        Settle {
            timeout: Duration::from_secs(5),
            interval: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn configure_changes_applies_verifies_and_is_idempotent() {
        let mut b = FakeBios {
            current: attrs(json!({"BootMode": "Bios", "Virt": "Enabled"})),
            pending: Attributes::new(),
            lag: 0,
            calls: vec![],
            refuse: None,
        };
        let w = want(&[("BootMode", "Uefi"), ("Virt", "Enabled")]);
        let mut ops = vec![];
        let mut flushed = vec![];
        let r = configure(&mut b, &w, settle(), &mut ops, &mut |f| flushed.push(f))
            .await
            .unwrap();
        assert!(r.contains("BootMode: \"Bios\" -> \"Uefi\""), "{r}");
        assert_eq!(b.calls, ["read", "stage", "apply", "read"]);
        // Read, diff and stage went out before the reset; the rest after.
        let names = |v: &[OpRecord]| v.iter().map(|o| o.op.clone()).collect::<Vec<_>>();
        assert_eq!(flushed.len(), 1);
        assert_eq!(names(&flushed[0]), ["bios-read", "bios-diff", "bios-stage"]);
        assert_eq!(names(&ops), ["bios-apply", "bios-verify"]);
        // Second run: nothing staged, no reset.
        b.calls.clear();
        let mut ops = vec![];
        let r = configure(&mut b, &w, settle(), &mut ops, &mut |_| {})
            .await
            .unwrap();
        assert!(r.starts_with("already as wanted"), "{r}");
        assert_eq!(b.calls, ["read"]);
    }

    #[tokio::test]
    async fn configure_waits_for_a_lagging_read_back_then_fails_on_a_mismatch() {
        let mut b = FakeBios {
            current: attrs(json!({"BootMode": "Bios"})),
            pending: Attributes::new(),
            lag: 3,
            calls: vec![],
            refuse: None,
        };
        let w = want(&[("BootMode", "Uefi")]);
        let mut ops = vec![];
        // lag 3: the first read (before the change) consumes one.
        configure(&mut b, &w, settle(), &mut ops, &mut |_| {})
            .await
            .unwrap();
        assert!(
            ops.last().unwrap().detail.contains("3 reads"),
            "{:?}",
            ops.last()
        );

        // A BMC that accepts the change and then ignores it.
        struct Ignoring(Attributes);
        impl BiosBackend for Ignoring {
            fn describe(&self) -> String {
                "ignoring".into()
            }
            async fn read(&mut self) -> Result<Attributes, BiosError> {
                Ok(self.0.clone())
            }
            async fn stage(&mut self, _: &Attributes) -> Result<String, BiosError> {
                Ok("ok".into())
            }
            async fn apply(&mut self) -> Result<String, BiosError> {
                Ok("ok".into())
            }
        }
        let mut ops = vec![];
        let short = Settle {
            timeout: Duration::from_millis(20),
            interval: Duration::from_millis(5),
        };
        let e = configure(
            &mut Ignoring(attrs(json!({"BootMode": "Bios"}))),
            &w,
            short,
            &mut ops,
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("BootMode wanted \"Uefi\""), "{e}");
        assert!(!ops.last().unwrap().ok);
    }

    #[tokio::test]
    async fn a_refused_stage_fails_the_step_naming_it() {
        let mut b = FakeBios {
            current: attrs(json!({"BootMode": "Bios"})),
            pending: Attributes::new(),
            lag: 0,
            calls: vec![],
            refuse: Some("BootMode".into()),
        };
        let mut ops = vec![];
        let e = configure(
            &mut b,
            &want(&[("BootMode", "Uefi")]),
            settle(),
            &mut ops,
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("BootMode"));
        assert_eq!(b.calls, ["read", "stage"], "no reset after a refusal");
        assert!(!ops.last().unwrap().ok);
    }
}
