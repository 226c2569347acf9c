//! Power and boot control through each machine's BMC, against the real
//! peers: a Redfish BMC (sushy-tools' emulator, libvirt test driver) and
//! an IPMI BMC (OpenIPMI's `ipmi_sim`) driven by Debian's `ipmitool`,
//! plus a BMC that refuses the appliance's login and one that is down.
//! Needs root (netns).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::rack::{device_id, mac};
use common::*;
use serde_json::Value;

struct PowerLab {
    lab: Lab,
    config: PathBuf,
    serve: std::process::Child,
    redfish: Bmc,
    ipmi: IpmiSim,
}

impl Drop for PowerLab {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

impl PowerLab {
    /// Four inventory machines: d1 behind a Redfish BMC, d2 behind an
    /// IPMI BMC, d3 naming d1's BMC with a login it refuses, d4 naming a
    /// BMC address where nothing answers.
    fn up() -> PowerLab {
        let lab = Lab::up("pw", 4, "100mbit", &[]);
        let redfish = Bmc::start_on(&lab, "d1", "198.18.0.11");
        let ipmi = IpmiSim::start(&lab, "d2", "198.18.0.12", None);
        let pw = |name: &str, text: &str| password_file(&lab, name, text, 0o600);
        let state = lab.file("state");
        fs::create_dir_all(&state).unwrap();
        let config = lab.file("rackcast.toml");
        let known: Vec<(String, String)> = (1..=4).map(|i| (mac(i), format!("SN{i}"))).collect();
        let known: Vec<(&str, &str)> = known
            .iter()
            .map(|(m, s)| (m.as_str(), s.as_str()))
            .collect();
        let img = make_image(&lab, 2, 1);
        let mut cfg = ApplianceConfig::new(&state, &bin("rackcast-agent"), "50M", "239.255.32.1")
            .image("img", &img)
            .known(&known)
            .section(format!(
                "[[profiles]]\nname = \"any\"\nimage = \"img\"\ntarget = {{ order = \"largest\", count = 1 }}\n\n\
                 [bmc]\ntimeout = \"5s\"\nsettle = \"10s\"\n\
                 [bmc.credentials.lab]\nusername = \"{BMC_USER}\"\npassword_file = \"{}\"\n\
                 [bmc.credentials.ipmi]\nusername = \"{IPMI_USER}\"\npassword_file = \"{}\"\n\
                 [bmc.credentials.stale]\nusername = \"{BMC_USER}\"\npassword_file = \"{}\"\n",
                pw("lab", BMC_PASSWORD).display(),
                pw("ipmi", IPMI_PASSWORD).display(),
                pw("stale", "an-old-password").display(),
            ));
        cfg.inventory_columns = vec![
            (
                "bmc".into(),
                vec![
                    format!("redfish+http://198.18.0.11:{BMC_PORT}"),
                    "ipmi://198.18.0.12".into(),
                    format!("redfish+http://198.18.0.11:{BMC_PORT}"),
                    format!("redfish+http://198.18.0.14:{BMC_PORT}"),
                ],
            ),
            (
                "bmc_credential".into(),
                ["lab", "ipmi", "stale", "lab"].map(String::from).to_vec(),
            ),
        ];
        cfg.write(&config);
        let serve = start_serve(&lab, &config);
        PowerLab {
            lab,
            config,
            serve,
            redfish,
            ipmi,
        }
    }

    /// `rackcast ARGS --config C`, as an operator runs it on the
    /// appliance.
    fn cli(&self, args: &[&str]) -> Output {
        operator_cli(&self.lab, &self.config, args)
            .output()
            .unwrap()
    }

    /// `rackcast power ACTION DEVICES --json`: (exit ok, one result per
    /// call).
    fn power(&self, action: &str, devices: &[&str]) -> (bool, Vec<Value>) {
        let mut args = vec!["power", action];
        args.extend_from_slice(devices);
        args.push("--json");
        let out = self.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "power {action} {devices:?}: {e}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v.as_array().cloned().unwrap())
    }

    fn log(&self, i: usize) -> Vec<Value> {
        let out = self.cli(&["log", &device_id(i), "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    }

    fn metrics(&self) -> String {
        let token = operator_token(&self.config, "viewer");
        operator_curl(
            &self.lab.ns("app"),
            &self.config,
            Some(&token),
            "/metrics",
            &[],
        )
        .1
    }

    fn redfish_power(&self) -> String {
        self.redfish.get(&self.redfish.system())["PowerState"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// A BMC password file `NAME.pw` in the lab folder, with `mode`.
fn password_file(lab: &Lab, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = lab.file(&format!("{name}.pw"));
    fs::write(&p, format!("{text}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn one(results: &[Value], dev: usize) -> &Value {
    results
        .iter()
        .find(|r| r["device"] == device_id(dev))
        .unwrap_or_else(|| panic!("no result for device {dev}: {results:?}"))
}

#[test]
fn power_and_pxe_once_through_redfish_and_ipmi_read_back_and_are_logged() {
    if !can_run() || !have_ipmi() {
        return;
    }
    let p = PowerLab::up();
    // Counters exist at zero before the first call, as dashboards need.
    let m = p.metrics();
    for series in [
        "rackcast_bmc_calls_total{action=\"on\"}",
        "rackcast_bmc_failures_total{action=\"cycle\"}",
        "rackcast_agent_protocol_errors_total{kind=\"malformed\"}",
        "rackcast_store_errors_total",
    ] {
        assert_eq!(metric(&m, series), Some(0.0), "{series} at start:\n{m}");
    }

    // `bmc check`: which BMCs answer, changing nothing.
    let out = p.cli(&["bmc", "check", "--json"]);
    assert!(
        !out.status.success(),
        "two BMCs do not answer: exit status 1"
    );
    let check: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(check.len(), 4, "{check:?}");
    assert_eq!(one(&check, 1)["ok"], true);
    assert_eq!(
        one(&check, 1)["powered"],
        true,
        "the emulated system starts on"
    );
    assert_eq!(one(&check, 2)["ok"], true);
    assert_eq!(
        one(&check, 2)["powered"],
        false,
        "the simulated chassis starts off"
    );
    let refused = one(&check, 3);
    assert_eq!(refused["ok"], false);
    assert_eq!(
        refused["retryable"], false,
        "a refused login does not get better: {refused}"
    );
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("refused our credentials"),
        "{refused}"
    );
    let down = one(&check, 4);
    assert_eq!(down["ok"], false);
    assert_eq!(
        down["retryable"], true,
        "a BMC that is down may come back: {down}"
    );
    assert!(
        down["detail"].as_str().unwrap().contains("unreachable"),
        "{down}"
    );
    let text = String::from_utf8_lossy(&p.cli(&["bmc", "check"]).stdout).into_owned();
    assert!(text.contains("4 BMC(s): 2 answered, 2 did not"), "{text}");
    assert_eq!(p.redfish_power(), "On", "check changed nothing");
    assert!(
        p.ipmi.history().is_empty(),
        "check changed nothing: {:?}",
        p.ipmi.history()
    );
    let devices = p.cli(&["devices", "--json"]);
    let devices: Value = serde_json::from_slice(&devices.stdout).unwrap();
    assert_eq!(
        devices.as_array().map(Vec::len),
        Some(0),
        "a check makes no records"
    );

    // Off and on, read back from each BMC.
    let (ok, r) = p.power("off", &[&device_id(1)]);
    assert!(ok, "{r:?}");
    assert_eq!(one(&r, 1)["powered"], false);
    assert_eq!(p.redfish_power(), "Off");
    let (ok, r) = p.power("on", &[&device_id(1), &mac(2)]);
    assert!(ok, "{r:?}");
    assert_eq!(one(&r, 1)["powered"], true);
    assert_eq!(one(&r, 2)["powered"], true);
    assert_eq!(p.redfish_power(), "On");
    assert!(p.ipmi.powered());
    assert_eq!(p.ipmi.history(), ["power=1"]);

    // A cycle: the IPMI chassis went off and on again; the Redfish BMC
    // got its reset.
    let resets = p.redfish.count("POST", "ComputerSystem.Reset");
    let (ok, r) = p.power("cycle", &[&device_id(1), &device_id(2)]);
    assert!(ok, "{r:?}");
    assert_eq!(p.redfish.count("POST", "ComputerSystem.Reset"), resets + 1);
    assert!(
        one(&r, 1)["detail"]
            .as_str()
            .unwrap()
            .contains("ResetType=ForceRestart"),
        "{r:?}"
    );
    assert_eq!(p.ipmi.history(), ["power=1", "power=0", "power=1"]);
    assert!(p.ipmi.powered());

    // PXE at the next boot, read back.
    let (ok, r) = p.power("pxe-once", &[&device_id(1), &device_id(2)]);
    assert!(ok, "{r:?}");
    assert_eq!(
        p.redfish.get(&p.redfish.system())["Boot"]["BootSourceOverrideTarget"],
        "Pxe"
    );
    assert_eq!(p.ipmi.boot(), "pxe");
    let d2 = one(&r, 2)["detail"].as_str().unwrap();
    assert!(d2.contains("boot device Force PXE, next boot only"), "{d2}");

    // The refused and the missing BMC: clear failures, retryable or not.
    let (ok, r) = p.power("on", &[&device_id(3), &device_id(4)]);
    assert!(!ok, "failed calls fail the command");
    assert_eq!(one(&r, 3)["retryable"], false);
    assert_eq!(one(&r, 4)["retryable"], true);

    // Every call is a row of the device's log: asked, answered, read back.
    let rows = |i: usize, kind: &str| -> Vec<String> {
        p.log(i)
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["detail"].as_str().unwrap().to_string())
            .collect()
    };
    let d1 = rows(1, "bmc");
    assert_eq!(d1.len(), 4, "off, on, cycle, pxe_once: {d1:?}");
    assert!(
        d1[0].starts_with("power off via redfish+http://198.18.0.11:8000: asked POST")
            && d1[0].contains("ResetType=ForceOff")
            && d1[0].ends_with("read back PowerState Off"),
        "{}",
        d1[0]
    );
    let d2 = rows(2, "bmc");
    assert_eq!(d2.len(), 3, "{d2:?}");
    assert!(
        d2[0].contains("asked `chassis power on`") && d2[0].contains("Chassis Power is on"),
        "{}",
        d2[0]
    );
    assert_eq!(rows(3, "bmc_failed").len(), 1);
    assert_eq!(rows(4, "bmc_failed").len(), 1);
    // A powered-on machine that has not booted yet stays at its first
    // step; no row claims it booted.
    assert!(p.log(1).iter().all(|e| e["kind"] != "ok"), "{:?}", p.log(1));

    // The counters moved; no password in the appliance's log.
    let m = p.metrics();
    assert_eq!(
        metric(&m, "rackcast_bmc_calls_total{action=\"on\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "rackcast_bmc_failures_total{action=\"on\"}"),
        Some(2.0)
    );
    // Two checks, two silent BMCs each.
    assert_eq!(
        metric(&m, "rackcast_bmc_failures_total{action=\"status\"}"),
        Some(4.0)
    );
    let serve_log = fs::read_to_string(p.lab.file("serve.log")).unwrap();
    for secret in [BMC_PASSWORD, IPMI_PASSWORD, "an-old-password"] {
        assert!(
            !serve_log.contains(secret),
            "a BMC password reached the log"
        );
    }

    // A whole rack off needs --yes; without it nothing is asked.
    let out = p.cli(&["power", "off", "--rack", "lab"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("add --yes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(p.ipmi.powered() && p.redfish_power() == "On");
    // A viewer cannot power machines.
    let viewer = operator_token(&p.config, "viewer");
    let (code, _) = operator_curl(
        &p.lab.ns("app"),
        &p.config,
        Some(&viewer),
        "/api/power",
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"action":"off","all":true}"#,
        ],
    );
    assert_eq!(code, 403);
    assert!(p.ipmi.powered(), "the viewer's request changed nothing");
}

/// A password file others can read is refused at start, naming it.
#[test]
fn a_bmc_password_file_others_can_read_stops_the_appliance() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("pf", 1, "100mbit", &[]);
    let state = lab.file("state");
    fs::create_dir_all(&state).unwrap();
    let pw = password_file(&lab, "lab", "pw", 0o644);
    let config = lab.file("rackcast.toml");
    let img = make_image(&lab, 2, 1);
    let mut cfg = ApplianceConfig::new(&state, &bin("rackcast-agent"), "50M", "239.255.33.1")
        .image("img", &img)
        .known(&[(&mac(1), "SN1")])
        .section(format!(
            "[[profiles]]\nname = \"any\"\nimage = \"img\"\ntarget = {{ order = \"largest\", count = 1 }}\n\n\
             [bmc.credentials.lab]\nusername = \"root\"\npassword_file = \"{}\"\n",
            pw.display()
        ));
    cfg.inventory_columns = vec![
        ("bmc".into(), vec!["ipmi://198.18.0.11".into()]),
        ("bmc_credential".into(), vec!["lab".into()]),
    ];
    cfg.write(&config);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("app")])
        .arg(bin("rackcast"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("password_file")
            && err.contains("chmod 600")
            && err.contains(&pw.display().to_string()),
        "{err}"
    );
}

/// `rackcast bringup --rack R`: two machines behind IPMI BMCs whose
/// chassis boots the loader (the agent) when its power comes on, one
/// behind a Redfish BMC that powers on but never boots. The two are
/// powered on a second apart (the inrush limit) and arrive; the third is
/// reported, power-cycled once (`retries = 1`), and given up.
#[test]
fn bringup_paces_power_ons_and_reports_a_machine_that_does_not_boot() {
    if !can_run() || !have_ipmi() {
        return;
    }
    let lab = Lab::up("bu", 3, "100mbit", &[]);
    let state = lab.file("state");
    fs::create_dir_all(&state).unwrap();
    let config = lab.file("rackcast.toml");
    let pw = |name: &str, text: &str| password_file(&lab, name, text, 0o600);
    let img = make_image(&lab, 2, 1);
    let known: Vec<(String, String)> = (1..=3).map(|i| (mac(i), format!("SN{i}"))).collect();
    let known: Vec<(&str, &str)> = known
        .iter()
        .map(|(m, s)| (m.as_str(), s.as_str()))
        .collect();
    let mut cfg = ApplianceConfig::new(&state, &bin("rackcast-agent"), "50M", "239.255.34.1")
        .image("img", &img)
        .known(&known)
        .section(format!(
            "[[profiles]]\nname = \"any\"\nimage = \"img\"\ntarget = {{ order = \"largest\", count = 1 }}\n\n\
             [bmc]\ntimeout = \"5s\"\nsettle = \"10s\"\npower_on_per_second = 1.0\nboot_timeout = \"4s\"\nretries = 1\n\
             [bmc.credentials.ipmi]\nusername = \"{IPMI_USER}\"\npassword_file = \"{}\"\n\
             [bmc.credentials.lab]\nusername = \"{BMC_USER}\"\npassword_file = \"{}\"\n",
            pw("ipmi", IPMI_PASSWORD).display(),
            pw("lab", BMC_PASSWORD).display(),
        ));
    cfg.inventory_columns = vec![
        (
            "bmc".into(),
            vec![
                "ipmi://198.18.0.11".into(),
                "ipmi://198.18.0.12".into(),
                format!("redfish+http://198.18.0.13:{BMC_PORT}"),
            ],
        ),
        (
            "bmc_credential".into(),
            ["ipmi", "ipmi", "lab"].map(String::from).to_vec(),
        ),
    ];
    cfg.write(&config);
    let mut serve = start_serve(&lab, &config);
    let key = {
        let out = Command::new(bin("rackcast"))
            .args(["key", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // The machines: what their chassis boots is the loader.
    let sims: Vec<IpmiSim> = (1..=2)
        .map(|i| {
            let hw = lab.file(&format!("d{i}.json"));
            let disk = lab.file(&format!("d{i}-disk.img"));
            fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
            fs::write(
                &hw,
                serde_json::json!({
                    "dmi": {"vendor": "Lab", "model": "Box", "serial": format!("SN{i}")},
                    "cpu": {"arch": "x86_64", "count": 2},
                    "memory_bytes": 4u64 << 30,
                    "nics": [{"name": "d0", "mac": mac(i), "pci_id": "8086:1521"}],
                    "disks": [{"name": "sda", "path": disk, "size_bytes": 16u64 << 20, "model": "D", "serial": format!("S{i}")}],
                })
                .to_string(),
            )
            .unwrap();
            let agent = format!(
                "{} run --server 198.18.0.1:7100 --iface d0 --give-up 60 --trust-key {key} --hardware {} --os-present false --work-dir {}",
                bin("rackcast-agent").display(),
                hw.display(),
                lab.file(&format!("work{i}")).display()
            );
            IpmiSim::start(&lab, &format!("d{i}"), &format!("198.18.0.1{i}"), Some(&agent))
        })
        .collect();
    let redfish = Bmc::start_on(&lab, "d3", "198.18.0.13");
    // The emulated system starts on: off first, so the bringup powers it on.
    let cli = |args: &[&str]| -> Output { operator_cli(&lab, &config, args).output().unwrap() };
    assert!(cli(&["power", "off", &device_id(3)]).status.success());

    let out = cli(&["bringup", "--rack", "lab"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = serve.kill();
    let _ = serve.wait();
    // Read the log with the appliance stopped: the store is the record.
    let log = |i: usize| -> Vec<Value> {
        let out = Command::new(bin("rackcast"))
            .args(["log", &device_id(i), "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("log {i}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
            .as_array()
            .cloned()
            .unwrap()
    };
    assert!(
        !out.status.success(),
        "a machine did not boot: exit 1\n{text}"
    );
    assert!(text.contains("2 of 3 machine(s) network-booted"), "{text}");
    for i in 1..=2 {
        assert!(
            text.contains(&format!("{}  network-booted", device_id(i)))
                || text
                    .lines()
                    .any(|l| l.contains(&device_id(i)) && l.ends_with("network-booted")),
            "{text}"
        );
        assert!(sims[i - 1].powered(), "device {i} on");
        let ev = log(i);
        assert!(
            ev.iter()
                .any(|e| e["step"] == "loader_booted" && e["kind"] == "ok"),
            "device {i}: its loader came up: {ev:?}"
        );
    }
    assert!(
        text.lines().any(|l| l.contains(&device_id(3)) && l.contains("did NOT network-boot (2 attempt(s))")),
        "{text}"
    );
    // A second between power-ons: the inrush limit.
    // When each power-on call started: the row is written when it
    // ended, with its duration.
    let powered_at = |i: usize| -> i64 {
        let ev = log(i);
        let row = ev
            .iter()
            .find(|e| {
                e["kind"] == "bmc"
                    && e["detail"]
                        .as_str()
                        .unwrap()
                        .starts_with("bringup: power on")
            })
            .unwrap_or_else(|| panic!("device {i}: no bringup power-on row"));
        row["at"].as_i64().unwrap() - row["duration_ms"].as_i64().unwrap()
    };
    let (t1, t2, t3) = (powered_at(1), powered_at(2), powered_at(3));
    assert!(
        t2 - t1 >= 900 && t3 - t2 >= 900,
        "power-ons at {t1}, {t2}, {t3}"
    );
    // The machine that never booted: reported, cycled, reported, given up.
    let d3: Vec<String> = log(3)
        .iter()
        .filter(|e| e["kind"] == "bmc" || e["kind"] == "bmc_failed")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    let want = [
        "bringup: power on via",
        "bringup: no network boot within 4s after power-on (attempt 1); power-cycling it again",
        "bringup: power cycle via",
        "bringup: no network boot within 4s after power-on (attempt 2); given up",
    ];
    let seen: Vec<&str> = d3
        .iter()
        .skip(1) // the operator's power off
        .map(String::as_str)
        .collect();
    assert_eq!(seen.len(), want.len(), "{d3:#?}");
    for (s, w) in seen.iter().zip(want) {
        assert!(s.starts_with(w), "{s:?} should start with {w:?}\n{d3:#?}");
    }
    drop(redfish);
    drop(sims);
}
