//! Attacks from other hosts on the provisioning LAN against the real
//! appliance in network namespaces (issue 15's findings, one test each as
//! they are closed). Each must fail closed: refused, counted, logged, with
//! nothing changed for the victim, while legitimate operators and devices
//! carry on. Needs root (netns).

mod common;

use std::time::Duration;

use common::rack::*;
use common::*;

fn state_of(rack: &Rack, i: usize) -> String {
    rack.devices()
        .iter()
        .find(|d| d["device"] == device_id(i))
        .map(|d| d["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn denied(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("rackcast_api_denied_total{{reason=\"{reason}\"}}"),
    )
}

/// Finding 1, unauthenticated reinstall: another host on the LAN (here
/// device 2's namespace) asks to reinstall an installed device with no
/// token, with a viewer token, as a cross-site form would (admin token,
/// form body), and on the provisioning listener. Every try is refused and
/// counted, and the device stays installed; the admin's JSON request
/// then works, and a revoked token is refused.
#[test]
fn operator_api_refuses_anonymous_viewer_and_form_actions() {
    if !can_run() {
        return;
    }
    let mut rack = Rack::new("sa", 2, "300mbit", (8, 8), "");
    rack.start_agent(1);
    rack.start_agent(2);
    rack.wait_for("both devices done", Duration::from_secs(180), all_done(2));
    let attacker = rack.lab.ns("d2");
    let path = format!("/api/devices/{}/reinstall", device_id(1));
    let json = [
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{}",
    ];

    let (code, body) = operator_curl(&attacker, &rack.config, None, &path, &json);
    assert_eq!(code, 401, "no token: {body}");
    let (code, _) = operator_curl(&attacker, &rack.config, Some("rct_0000guess"), &path, &json);
    assert_eq!(code, 401, "a guessed token");
    let viewer = operator_token(&rack.config, "viewer");
    let (code, body) = operator_curl(&attacker, &rack.config, Some(&viewer), &path, &json);
    assert_eq!(code, 403, "viewer: {body}");
    // What a cross-site form can send: a form body (even with a token a
    // browser would never attach by itself).
    let admin = operator_token(&rack.config, "admin");
    let form = ["-X", "POST", "-d", "x=1"];
    let (code, body) = operator_curl(&attacker, &rack.config, Some(&admin), &path, &form);
    assert_eq!(code, 415, "form post: {body}");
    // The provisioning listener serves boot files only; plain HTTP on
    // the operator port is no way around TLS.
    let api = format!("http://{}{path}", ApplianceConfig::API);
    assert_eq!(http_status(&attacker, &json, &api), "404");
    let plain = format!("http://{}/api/devices", ApplianceConfig::OPERATOR);
    assert_ne!(http_status(&attacker, &[], &plain), "200");

    assert_eq!(state_of(&rack, 1), "done", "the victim stays installed");
    let log = rack.cli(&["log", &device_id(1)]);
    assert!(
        !log.to_string().contains("reinstall requested"),
        "no reinstall reached the device: {log}"
    );
    let metrics = rack.http_get("/metrics");
    assert!(denied(&metrics, "no bearer token") >= 1.0, "{metrics}");
    assert!(denied(&metrics, "unknown token") >= 1.0);
    assert!(denied(&metrics, "needs an admin token") >= 1.0);
    assert!(
        denied(
            &metrics,
            "an action needs a JSON body (Content-Type: application/json)"
        ) >= 1.0
    );
    let serve = rack.serve_log();
    assert!(
        serve.contains("operator API request refused"),
        "refusals logged"
    );
    assert!(
        !serve.contains(&admin) && !serve.contains(&viewer),
        "no token in the log"
    );

    // The operator, with the admin token and JSON, reinstalls device 1.
    let (code, body) = operator_curl(
        &rack.lab.ns("app"),
        &rack.config,
        Some(&admin),
        &path,
        &json,
    );
    assert_eq!(code, 200, "{body}");
    assert_ne!(
        state_of(&rack, 1),
        "done",
        "the operator's reinstall re-armed it"
    );
    assert_eq!(state_of(&rack, 2), "done");
    // A revoked token is refused from then on.
    let out = cli(&rack.config, &["token", "revoke", "tests-viewer"]);
    assert!(out.status.success());
    let (code, _) = operator_curl(&attacker, &rack.config, Some(&viewer), "/api/devices", &[]);
    assert_eq!(code, 401, "revoked");
}

/// Finding 6, blobs: a host that names itself a new device asks for the
/// agent blob every bundle carries. `GetBlob` serves only the blobs of
/// the asking device's own bundle: refused, counted, connection closed.
#[test]
fn get_blob_serves_only_the_callers_bundle() {
    if !can_run() {
        return;
    }
    use rackcast_core::model::AgentMode;
    use rackcast_core::wire::device::{AgentMsg, ApplianceMsg, DEVICE_PROTOCOL};
    let mut rack = Rack::new("sb", 1, "300mbit", (8, 8), "");
    rack.start_agent(1);
    rack.wait_for("device done", Duration::from_secs(180), all_done(1));
    // The agent binary the victim's bundle carries (a stripped copy).
    let agent = std::fs::read(rack.lab.dir.join("rackcast-agent")).unwrap();
    let hash = blake3::hash(&agent).to_hex().to_string();
    let mut raw = RawAgent::connect(&rack.lab.ns("d1"));
    raw.send(&AgentMsg::Hello {
        protocol: DEVICE_PROTOCOL,
        mac: "02:ee:00:00:00:42".into(),
        device_id: None,
        mode: AgentMode::Loader { os_present: false },
        credential: None,
    });
    raw.send(&AgentMsg::GetBlob {
        hash: hash.clone(),
        offset: 0,
    });
    let mut refused = None;
    while let Some(m) = raw.recv() {
        match m {
            ApplianceMsg::BlobChunk { .. } => panic!("served another device's blob"),
            ApplianceMsg::Error { message } => {
                refused = Some(message);
                break;
            }
            _ => {}
        }
    }
    let why = refused.expect("an error, then the connection closed");
    assert!(why.contains("is not in this device's bundle"), "{why}");
    assert!(raw.recv().is_none(), "closed after the refusal");
    let metrics = rack.http_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rackcast_agent_protocol_errors_total{kind=\"foreign_blob\"} ")),
        "{metrics}"
    );
}
