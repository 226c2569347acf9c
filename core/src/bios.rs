//! BIOS settings, declarative: what a profile wants, what the BIOS has,
//! the difference, and the check after the change.
//!
//! Owns: the comparison of wanted attributes (strings in the profile)
//! with the typed values a BMC reports, the typed values to send, the
//! verification after apply, and the one procedure every backend follows
//! (`configure`: read, diff, stage only what differs, apply, read back,
//! compare). Must not: speak a protocol or wait for a BMC (the agent's
//! `bios` module runs the procedure over a backend: Redfish, or a vendor
//! tool) or decide when the step runs (the workflow does).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;

/// BIOS attributes as a BMC reports them: name to typed JSON value.
pub type Attributes = Map<String, Value>;

/// Why the BIOS step cannot reach what the profile wants.
#[derive(Debug, Error, PartialEq)]
pub enum BiosError {
    /// The BIOS has no such attribute.
    #[error("BIOS attribute {0} is not offered by this machine's BIOS")]
    NotOffered(String),
    /// The wanted value does not fit the attribute's type.
    #[error("BIOS attribute {attr}: {value:?} is not a valid {kind}")]
    BadValue {
        /// The attribute.
        attr: String,
        /// The wanted value, as the profile has it.
        value: String,
        /// The type the BMC reports the attribute as.
        kind: &'static str,
    },
    /// After apply, these read back different.
    #[error("BIOS attributes read back different after apply: {}", list_mismatches(.0))]
    Mismatch(Vec<Mismatch>),
    /// The backend could not do what was asked (BMC unreachable, HTTP
    /// error, refused PATCH); the text names the attribute when the BMC
    /// did. Worth a retry when `retryable`.
    #[error("{message}")]
    Backend {
        /// What the backend said.
        message: String,
        /// Whether trying again later can help (an unreachable BMC).
        retryable: bool,
    },
}

#[cfg(feature = "redfish")]
impl From<crate::io::redfish::RedfishError> for BiosError {
    fn from(e: crate::io::redfish::RedfishError) -> BiosError {
        BiosError::Backend {
            message: e.message,
            retryable: e.retryable,
        }
    }
}

/// An attribute that reads back different from what was wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The attribute.
    pub attr: String,
    /// What the profile wants.
    pub wanted: String,
    /// What the BMC reads back.
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

impl BiosError {
    /// Whether trying again later can help.
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
}
