//! The BIOS step on the device: one procedure over any backend (read,
//! diff, stage only what differs, apply, read back, compare), each
//! operation recorded for the device's event log.
//!
//! Owns: the [`BiosBackend`] trait and [`configure`]. Must not: compare
//! values itself (`rackcast_core::bios` does) or speak a protocol (a
//! backend does: [`crate::redfish::RedfishBios`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use rackcast_core::bios::{diff, verify, Attributes, BiosError};
use rackcast_core::model::OpRecord;
use serde_json::Value;

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
