//! The catalog of every metric rackcast exports, and their registration
//! at start.
//!
//! Owns: each metric's name, type, help text and the label values known
//! in advance, and [`register`], which describes them all and creates
//! every counter whose labels are known at zero, as Prometheus client
//! libraries do. Without it an error counter exists only after its first
//! error, so `rate()` and a dashboard panel show "no data" where the
//! truth is 0. Must not: count anything itself (the code that sees the
//! event increments the counter).
//!
//! A test of the appliance (`src/metrics_catalog_tests.rs`) reads the
//! sources and fails on a metric or a literal label value this catalog
//! does not list, and the fleet test checks with a real Prometheus that
//! every Grafana panel queries a metric the appliance exports.

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Set to the current value.
    Gauge,
    /// Observations in buckets (`_count`, `_sum`, `_bucket`).
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// The label whose values are known in advance, and those values:
    /// a counter is registered at zero for each. `None`: no label, or
    /// labels only known at run time (a wave, a device).
    pub known: Option<(&'static str, &'static [&'static str])>,
    /// Whether its other labels are only known at run time (a wave, a
    /// device, an image): then nothing is registered before they are.
    pub runtime_labels: bool,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        help,
        known: None,
        runtime_labels: false,
    }
}

const fn counter_by(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: &'static [&'static str],
) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        help,
        known: Some((label, values)),
        runtime_labels: false,
    }
}

const fn per_run(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        help,
        known: None,
        runtime_labels: true,
    }
}

/// Why an agent connection or message was refused
/// (`rackcast_agent_protocol_errors_total{kind}`).
pub const AGENT_PROTOCOL_ERRORS: &[&str] = &[
    "tls",
    "closed",
    "timeout",
    "out_of_order",
    "version",
    "write_timeout",
    "oversize",
    "malformed",
    "outbox_full",
    "replaced",
    "superseded",
    "foreign_bundle",
    "foreign_blob",
    "busy",
];

/// Why a wave's control connection or message was refused
/// (`rackcast_control_errors_total{kind}`).
pub const CONTROL_ERRORS: &[&str] = &[
    "connections",
    "tls",
    "out_of_order",
    "bad_hello",
    "malformed",
    "not_member",
    "bad_credential",
    "relay_refused",
];

/// The BMC actions the appliance takes (`rackcast_bmc_calls_total{action}`).
pub const BMC_ACTIONS: &[&str] = &["status", "on", "off", "cycle", "pxe_once"];

/// Every metric, appliance and data plane.
pub const CATALOG: &[Metric] = &[
    // Boot services.
    counter(
        "rackcast_dhcp_replies_total",
        "DHCP and proxyDHCP replies sent",
    ),
    counter_by(
        "rackcast_dhcp_dropped_total",
        "DHCP datagrams dropped or not answered, by reason",
        "reason",
        &[
            "malformed",
            "unknown_device",
            "not a BOOTREQUEST",
            "not an Ethernet client",
            "no message type",
            "proxyDHCP answers PXE clients only",
            "device boots from its disk",
            "request for another server",
            "message type not used by proxyDHCP",
            "address pool exhausted",
            "client chose another server",
            "declined addresses at their bound",
            "decline recorded",
            "release recorded",
            "message type not handled",
            "new clients over their rate",
        ],
    ),
    counter_by(
        "rackcast_tftp_requests_total",
        "TFTP requests, by result",
        "result",
        &[
            "ok",
            "size_query",
            "failed",
            "busy",
            "bad_mode",
            "write_refused",
            "unexpected",
            "malformed",
        ],
    ),
    counter(
        "rackcast_boot_files_unknown_device_total",
        "boot files asked for by a MAC with no record",
    ),
    // Enrollment and agents.
    counter(
        "rackcast_enroll_refused_total",
        "unknown devices refused by the enroll policy",
    ),
    counter_by(
        "rackcast_enroll_held_total",
        "devices held for an operator, by reason",
        "reason",
        &["serial_mismatch"],
    ),
    counter_by(
        "rackcast_agent_refused_total",
        "agent connections refused, by reason",
        "reason",
        &[
            "wrong_credential",
            "already_claimed",
            "installed",
            "connections",
            "connections_per_source",
        ],
    ),
    counter_by(
        "rackcast_agent_protocol_errors_total",
        "agent connections closed or messages dropped for a protocol error, by kind",
        "kind",
        AGENT_PROTOCOL_ERRORS,
    ),
    // Operator API.
    counter_by(
        "rackcast_api_denied_total",
        "operator API requests refused by authorization, by reason",
        "reason",
        &[
            "no bearer token",
            "unknown token",
            "needs an admin token",
            "an action needs a JSON body (Content-Type: application/json)",
        ],
    ),
    counter_by(
        "rackcast_api_refused_total",
        "operator API connections refused before HTTP, by reason",
        "reason",
        &[
            "tls",
            "tls timeout",
            "too many at once",
            "too many from this address",
        ],
    ),
    // Store.
    counter("rackcast_store_errors_total", "store writes that failed"),
    counter(
        "rackcast_store_events_dropped_total",
        "events dropped after the store kept failing",
    ),
    counter(
        "rackcast_events_pruned_total",
        "event-log rows removed past their retention",
    ),
    counter(
        "rackcast_leases_lost_total",
        "device leases this appliance held and another took after they lapsed",
    ),
    Metric {
        name: "rackcast_leases_held",
        kind: Kind::Gauge,
        help: "device leases this appliance holds in the fleet record",
        known: None,
        runtime_labels: false,
    },
    counter_by(
        "rackcast_config_reloads_total",
        "config reloads on SIGHUP, by result",
        "result",
        &["ok", "refused"],
    ),
    // Workflow and waves.
    Metric {
        name: "rackcast_devices",
        kind: Kind::Gauge,
        help: "devices by workflow state",
        known: None,
        runtime_labels: false,
    },
    Metric {
        name: "rackcast_waves_running",
        kind: Kind::Gauge,
        help: "waves running now",
        known: None,
        runtime_labels: false,
    },
    per_run(
        "rackcast_step_duration_seconds",
        Kind::Histogram,
        "workflow step durations, by step and result",
    ),
    per_run(
        "rackcast_device_image_progress_ratio",
        Kind::Gauge,
        "share of its image a device has, by device",
    ),
    per_run(
        "rackcast_wave_progress_ratio",
        Kind::Gauge,
        "share of the image its members have, by wave",
    ),
    per_run(
        "rackcast_wave_goodput_bps",
        Kind::Gauge,
        "image bits made durable per second by the last wave of an image",
    ),
    // BMC power control.
    counter_by(
        "rackcast_bmc_calls_total",
        "BMC power and boot calls that succeeded, by action",
        "action",
        BMC_ACTIONS,
    ),
    counter_by(
        "rackcast_bmc_failures_total",
        "BMC power and boot calls that failed, by action",
        "action",
        BMC_ACTIONS,
    ),
    counter(
        "rackcast_power_on_not_booted_total",
        "devices that did not network-boot in time after a power-on",
    ),
    // Data plane (the wave sender).
    counter(
        "rackcast_relay_copy_bytes_total",
        "datagram bytes copied by unicast to relays on other segments",
    ),
    per_run(
        "rackcast_bytes_sent_total",
        Kind::Counter,
        "bytes sent, by wave",
    ),
    per_run(
        "rackcast_packets_sent_total",
        Kind::Counter,
        "packets sent, by wave",
    ),
    per_run(
        "rackcast_source_packets_total",
        Kind::Counter,
        "source symbols sent, by wave",
    ),
    per_run(
        "rackcast_repair_packets_total",
        Kind::Counter,
        "repair symbols and coded resends sent, by wave",
    ),
    per_run(
        "rackcast_probe_packets_total",
        Kind::Counter,
        "rate-probe packets sent, by wave",
    ),
    per_run(
        "rackcast_wave_members_fell_behind_total",
        Kind::Counter,
        "members that fell behind the others, by wave",
    ),
    per_run(
        "rackcast_wave_members_behind",
        Kind::Gauge,
        "members behind the others now, by wave",
    ),
    per_run("rackcast_rate_bps", Kind::Gauge, "send rate, by wave"),
    per_run("rackcast_wave_blocks", Kind::Gauge, "blocks, by wave"),
    per_run(
        "rackcast_wave_image_bytes",
        Kind::Gauge,
        "image bytes, by wave",
    ),
    per_run(
        "rackcast_wave_source_wire_bytes",
        Kind::Gauge,
        "bytes the image's blocks take on the wire, by wave",
    ),
    per_run(
        "rackcast_receivers",
        Kind::Gauge,
        "a wave's receivers by state",
    ),
    per_run(
        "rackcast_receiver_progress_ratio",
        Kind::Gauge,
        "share of the image a receiver has",
    ),
    per_run(
        "rackcast_receiver_auth_failures",
        Kind::Gauge,
        "packets a receiver dropped for a bad authentication tag",
    ),
    per_run(
        "rackcast_receiver_malformed_packets",
        Kind::Gauge,
        "packets a receiver dropped as malformed",
    ),
    per_run(
        "rackcast_receiver_decode_failures",
        Kind::Gauge,
        "blocks a receiver failed to decode or verify",
    ),
    Metric {
        name: "rackcast_control_errors_total",
        kind: Kind::Counter,
        help: "wave control connections closed or messages refused, by kind",
        known: Some(("kind", CONTROL_ERRORS)),
        runtime_labels: false,
    },
];

/// The catalog entry of `name`; a histogram's `_count`, `_sum` and
/// `_bucket` series are found under the histogram.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOG.iter().find(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_count", "_sum", "_bucket"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(m.name)))
    })
}

/// The `rackcast_*` metric names a PromQL expression queries.
pub fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("rackcast_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every panel query (`expr`) of a Grafana dashboard's JSON.
pub fn dashboard_queries(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(e) = o.get("expr").and_then(|e| e.as_str()) {
                    out.push(e.to_string());
                }
                o.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Describe every metric and create each counter whose labels are known
/// at zero. Call once, after the recorder is installed.
pub fn register() {
    for m in CATALOG {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
        if m.kind != Kind::Counter || m.runtime_labels {
            continue;
        }
        match m.known {
            None => {
                metrics::counter!(m.name).increment(0);
            }
            Some((label, values)) => {
                for v in values {
                    metrics::counter!(m.name, label => *v).increment(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("rackcast_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
        }
    }

    #[test]
    fn names_in_finds_each_metric_of_an_expression() {
        assert_eq!(
            names_in("rackcast_repair_packets_total / clamp_min(rackcast_source_packets_total, 1)"),
            [
                "rackcast_repair_packets_total",
                "rackcast_source_packets_total"
            ]
        );
        let dash = serde_json::json!({"panels": [{"targets": [{"expr": "sum(rackcast_rate_bps)"}]},
            {"panels": [{"targets": [{"expr": "rackcast_devices"}]}]}]});
        assert_eq!(
            dashboard_queries(&dash),
            ["sum(rackcast_rate_bps)", "rackcast_devices"]
        );
    }

    #[test]
    fn histogram_series_are_found_under_their_histogram() {
        let h = find("rackcast_step_duration_seconds_count").map(|m| m.name);
        assert_eq!(h, Some("rackcast_step_duration_seconds"));
        assert!(find("rackcast_devices_count").is_none());
        assert!(find("rackcast_nothing").is_none());
    }
}
