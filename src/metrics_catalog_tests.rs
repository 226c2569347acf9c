//! The metric catalog (`rackcast_core::io::metrics`) against the code
//! that emits metrics and the Grafana dashboards that query them: a
//! metric or a label value missing from the catalog would not be
//! registered at zero, and a panel querying a metric nobody exports
//! shows "no data" forever.

use std::path::{Path, PathBuf};

use rackcast_core::io::metrics::{dashboard_queries, find, names_in, CATALOG};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(metric, Some(literal label value))` for every `counter!`, `gauge!`
/// and `histogram!` call, and the helpers that pass a literal through.
fn emitted() -> Vec<(String, String, Option<String>)> {
    let mut files = Vec::new();
    for d in ["src", "core/src", "agent/src"] {
        rust_files(&root().join(d), &mut files);
    }
    let helpers = [
        ("count_error(\"", "rackcast_agent_protocol_errors_total"),
        ("count(\"", "rackcast_tftp_requests_total"),
    ];
    let mut out = Vec::new();
    for f in files {
        if f.ends_with("metrics_catalog_tests.rs") || f.ends_with("io/metrics.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let at = f.display().to_string();
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (i, _) in text.match_indices(mac) {
                let rest = text[i + mac.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let name = &rest[..rest.find('"').unwrap()];
                // The call's arguments: up to its closing parenthesis.
                let args = &rest[..rest.find(')').unwrap_or(rest.len())];
                let mut value = None;
                if let Some(j) = args.find("=> \"") {
                    let v = &args[j + 4..];
                    value = Some(v[..v.find('"').unwrap()].to_string());
                }
                out.push((at.clone(), name.to_string(), value));
            }
        }
        // Only the files that define the helper call it by that name.
        for (call, metric) in helpers {
            if !text.contains(&format!("\"{metric}\"")) {
                continue;
            }
            for (i, _) in text.match_indices(call) {
                let v = &text[i + call.len()..];
                out.push((
                    at.clone(),
                    metric.to_string(),
                    Some(v[..v.find('"').unwrap()].to_string()),
                ));
            }
        }
    }
    out
}

#[test]
fn every_emitted_metric_and_literal_label_is_catalogued() {
    let all = emitted();
    assert!(
        all.len() > 40,
        "the scan found only {} metric calls: it is broken",
        all.len()
    );
    for (file, name, value) in &all {
        let m = find(name).unwrap_or_else(|| panic!("{file}: {name} is not in the catalog"));
        if let (Some(v), Some((label, values))) = (value, m.known) {
            assert!(
                values.contains(&v.as_str()),
                "{file}: {name}{{{label}={v:?}}} is not registered at zero: add it to the catalog"
            );
        }
    }
    // And the other way: nothing catalogued that no code emits.
    for m in CATALOG {
        assert!(
            all.iter().any(|(_, n, _)| n == m.name),
            "{} is catalogued but nothing emits it",
            m.name
        );
    }
}

/// Every panel query of `tools/grafana/*.json`: (dashboard, expr).
pub fn grafana_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root().join("tools/grafana"))
        .unwrap()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        out.extend(
            dashboard_queries(&v)
                .into_iter()
                .map(|x| (p.display().to_string(), x)),
        );
    }
    out
}

#[test]
fn every_grafana_panel_queries_catalogued_metrics() {
    let q = grafana_queries();
    assert!(q.len() >= 10, "only {} panel queries found", q.len());
    for (dash, expr) in q {
        let names = names_in(&expr);
        assert!(
            !names.is_empty(),
            "{dash}: {expr:?} names no rackcast metric"
        );
        for n in names {
            assert!(
                find(&n).is_some(),
                "{dash}: {expr:?} queries {n}, which nothing exports"
            );
        }
    }
}
