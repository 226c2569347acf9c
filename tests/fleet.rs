//! The appliance end to end: `rackcast serve` in the appliance namespace,
//! `rackcast-agent run` in every device namespace (hardware description
//! files, disk files), through every workflow step to `done`; a killed
//! appliance; bad input on the control plane. Needs root (netns).

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::rack::*;
use common::*;
use serde_json::Value;

/// Device `i` had its BIOS changed through its BMC exactly once: two
/// attributes staged (BootMode already as wanted), reset, read back; the
/// emulator now holds the wanted values; the password is in no log.
fn assert_bios_changed_once(rack: &Rack, i: usize, ev: &[Value]) {
    let op = |name: &str| -> String {
        ev.iter()
            .filter(|e| e["kind"] == "op")
            .filter_map(|e| e["detail"].as_str())
            .find(|d| d.starts_with(&format!("{name} ok")))
            .unwrap_or_else(|| panic!("device {i}: no {name} ok row"))
            .to_string()
    };
    let diff = op("bios-diff");
    assert!(
        diff.contains("2 to change: EmbeddedSata: \"Raid\" -> \"Ahci\", ProcTurboMode: \"Enabled\" -> \"Disabled\"")
            && diff.contains("already as wanted: BootMode=\"Uefi\""),
        "device {i}: {diff}"
    );
    assert!(op("bios-stage").contains("PATCH http://198.18.1.1:8000/redfish/v1/Systems/"));
    assert!(op("bios-apply").contains("ResetType=ForceRestart"));
    assert!(op("bios-verify").contains("3 as wanted"));
    let bmc = &rack.bmcs[i - 1];
    let bios = bmc.bios();
    assert_eq!(bios["ProcTurboMode"], "Disabled", "device {i}: {bios}");
    assert_eq!(bios["EmbeddedSata"], "Ahci", "device {i}: {bios}");
    assert_eq!(bmc.count("PATCH", "/BIOS/Settings"), 1, "device {i}");
    assert_eq!(bmc.count("POST", "ComputerSystem.Reset"), 1, "device {i}");
    for text in [
        rack.serve_log(),
        fs::read_to_string(rack.lab.file(&format!("agent{i}.log"))).unwrap_or_default(),
        serde_json::to_string(ev).unwrap(),
    ] {
        assert!(
            !text.contains(BMC_PASSWORD),
            "device {i}: BMC password in a log"
        );
    }
}

/// Blocks an agent's resume states (`WORK_DIR/*.rcresume`) say are on its
/// disk; 0 without one.
fn resumable_blocks(work_dir: &Path) -> u32 {
    let Ok(dir) = fs::read_dir(work_dir) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".rcresume"))
        .filter_map(|e| rackcast_core::io::receive::saved_blocks(&e.path()))
        .max()
        .unwrap_or(0)
}

/// Extra config: a `[waves]` policy and every device on the R650 profile
/// (one image, so one wave).
fn all_r650(n: usize, waves: &str) -> String {
    let mut s = format!("[waves]\n{waves}\n");
    for i in 1..=n {
        s.push_str(&format!(
            "[[devices]]\nmac = \"{}\"\nprofile = \"r650\"\n",
            mac(i)
        ));
    }
    s
}

/// The operator's reinstall of an installed device (only that starts
/// one over: a loader alone is refused).
/// `n` devices on the R650 profile (one image, one wave) with `waves`
/// settings, on a 100 Mbit lab.
fn r650_rack(tag: &str, n: usize, waves: &str, mib: (u64, u64), rate_pct: u64) -> Rack {
    Rack::build(tag, n, "100mbit", mib, &all_r650(n, waves), false, rate_pct)
}

/// Two R650 devices in one wave, their appliance's record in a private
/// PostgreSQL server on lab host `db` (198.18.0.5); `None` (the test is
/// skipped, and says why) where PostgreSQL is not installed.
fn rack_on_postgres(tag: &str) -> Option<(Rack, common::pg::Pg)> {
    if let Some(why) = common::pg::Pg::unavailable() {
        skip(&why);
        return None;
    }
    let waves = "min_members = 2\nstart_after = \"20s\"\nmember_timeout = \"20s\"";
    let mut rack = r650_rack(tag, 2, waves, (64, 8), 80);
    let db = rack.lab.host("db", "198.18.0.5");
    let pg = common::pg::Pg::start(Some(&db), "198.18.0.5");
    rack.use_store(&pg);
    Some((rack, pg))
}

fn reinstall(rack: &Rack, i: usize) {
    let out = rack.cli_output(&["reinstall", &device_id(i)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The device's event log: every step completed or skipped exactly once
/// and in order, durations on completed agent steps, every row chained
/// to the one before it (none lost), no step completed twice (none
/// duplicated), every start closed by one result.
fn check_log(rack: &Rack, i: usize) -> Vec<Value> {
    let ev = rack.cli(&["log", &device_id(i)]);
    let ev = ev.as_array().cloned().unwrap();
    // Each bundle the device ran was signed by this appliance's key.
    let signed = format!("verified with appliance key {}", rack.key());
    assert!(
        ev.iter().any(|e| e["step"] == "agent_delivered"
            && e["kind"] == "op"
            && e["detail"].as_str().unwrap_or("").contains(&signed)),
        "device {i}: no {signed:?} in its log"
    );
    let finals: Vec<(String, String)> = ev
        .iter()
        .filter(|e| e["kind"] == "ok" || e["kind"] == "skipped")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let steps: Vec<&str> = finals.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(steps, STEP_ORDER, "device {i} log order: {finals:?}");
    for e in &ev {
        if e["kind"] == "ok"
            && !["loader_booted", "done", "image_verified"].contains(&e["step"].as_str().unwrap())
        {
            assert!(
                e["duration_ms"].is_u64(),
                "device {i}: {} ok without duration",
                e["step"]
            );
        }
    }
    for w in ev.windows(2) {
        assert_eq!(
            w[0]["to_state"], w[1]["from_state"],
            "device {i}: log rows do not chain: {} then {}",
            w[0], w[1]
        );
    }
    let mut open: HashMap<String, u32> = HashMap::new();
    for e in &ev {
        let step = e["step"].as_str().unwrap().to_string();
        match e["kind"].as_str().unwrap() {
            "started" => {
                let c = open.entry(step.clone()).or_default();
                assert_eq!(*c, 0, "device {i}: {step} started twice without a result");
                *c = 1;
            }
            "ok" | "failed" => {
                if let Some(c) = open.get_mut(&step) {
                    *c = 0;
                }
            }
            _ => {}
        }
    }
    let unclosed: Vec<&String> = open
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(s, _)| s)
        .collect();
    assert!(
        unclosed.is_empty(),
        "device {i}: steps started and never closed by a result: {unclosed:?}"
    );
    ev
}

#[test]
fn rack_of_eight_two_profiles_two_images_concurrent_waves() {
    if !can_run() {
        return;
    }
    let n = 8;
    let mut rack = Rack::new(
        "fl",
        n,
        "300mbit",
        (48, 40),
        // The whole rack powered on within a second (the inrush pacing is
        // power.rs's): both images' members get ready together.
        "[waves]\nmin_members = 3\nstart_after = \"3s\"\nmember_timeout = \"20s\"\n\
         [bmc]\npower_on_per_second = 8.0\nboot_timeout = \"60s\"",
    );
    rack.with_os = vec![6, 8];
    // A real Prometheus scrapes the appliance's /metrics for the whole
    // bring-up (it runs in device 8's namespace: any host on the LAN).
    // The rack is brought up by `rackcast bringup` through the machines'
    // BMCs. Seven have an IPMI BMC (OpenIPMI's simulator) whose chassis
    // boots the machine when it powers on; device 2 keeps its Redfish
    // BMC (sushy-tools), whose reset only changes a state: the test plays
    // that machine, starting its agent once the BMC reads back On.
    let ipmi: Vec<usize> = (1..=n).filter(|&i| i != 2).collect();
    let machines = rack.machines_behind_ipmi(&ipmi);
    let prom = Prometheus::start_operator(&rack.lab, "d8", "198.18.0.18:9090", &rack.config);
    // The emulated system starts on: off first, as the rack stands.
    let off = rack
        .cli_cmd(&["power", "off", &device_id(2)])
        .output()
        .unwrap();
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    let redfish_system = rack.bmcs[1].system();
    let bringup = rack
        .cli_cmd(&["bringup", "--rack", "lab"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rack.bmcs[1].get(&redfish_system)["PowerState"] != "On" {
        assert!(Instant::now() < deadline, "device 2 never powered on");
        std::thread::sleep(Duration::from_millis(200));
    }
    rack.start_agent(2);
    let out = finish(bringup, Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("8 of 8 machine(s) network-booted"), "{text}");
    for (m, &i) in machines.iter().zip(&ipmi) {
        assert!(m.powered(), "device {i} powered on by its BMC");
        assert_eq!(
            m.history().first().map(String::as_str),
            Some("power=1"),
            "device {i}"
        );
    }
    rack.wait_for("all devices done", Duration::from_secs(240), all_done(n));
    // Every agent exits 0 when told its device is done.
    let out = finish(rack.agents[1].take().unwrap(), Duration::from_secs(20));
    assert!(out.status.success(), "agent 2 exit {:?}", out.status);
    for &i in &ipmi {
        let deadline = Instant::now() + Duration::from_secs(20);
        while rack.machine_exit(i).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(rack.machine_exit(i), Some(0), "agent {i} exit");
    }
    // Each power-on was paced and logged on the machine, as the BMC
    // answered and read it back.
    for i in 1..=n {
        let rows = rack.bmc_rows(i);
        let via = if i == 2 { "redfish+http" } else { "ipmi://" };
        assert!(
            rows.iter()
                .any(|r| r.starts_with("bringup: power on via ") && r.contains(via)),
            "device {i}: {rows:?}"
        );
    }
    let devs = rack.devices();
    let by_id: HashMap<String, Value> = devs
        .iter()
        .map(|d| (d["device"].as_str().unwrap().to_string(), d.clone()))
        .collect();
    for i in 1..=n {
        let d = &by_id[&device_id(i)];
        let image = if i % 2 == 1 && i != 3 {
            "debian"
        } else {
            "rocky"
        };
        assert_eq!(d["image"], image, "device {i}");
        // R650 (odd): image on the largest disk; generic: the smallest.
        let disk = rack.lab.file(&if i % 2 == 1 {
            format!("d{i}-disk-big.img")
        } else {
            format!("d{i}-disk-small.img")
        });
        assert_image_on(&disk, &rack.images[image]);
        let ev = check_log(&rack, i);
        let kinds = |step: &str| -> Vec<String> {
            ev.iter()
                .filter(|e| e["step"] == step && (e["kind"] == "ok" || e["kind"] == "skipped"))
                .map(|e| e["kind"].as_str().unwrap().to_string())
                .collect()
        };
        if i % 2 == 1 {
            // The R650's identity: the NoCloud seed on its disk, read
            // back on the host with mtools, is its template over its
            // facts; its log shows what was written.
            let meta = seed_file(&disk, "meta-data");
            assert_eq!(
                meta,
                format!(
                    "instance-id: \"{}\"\nlocal-hostname: \"node{i}\"\n",
                    device_id(i)
                ),
                "device {i}"
            );
            let user = seed_file(&disk, "user-data");
            assert!(
                user.starts_with("#cloud-config\n") && user.contains(SSH_KEY),
                "device {i}: {user}"
            );
            let net = seed_file(&disk, "network-config");
            assert!(
                net.contains(&format!("addresses: [\"198.18.7.{i}/24\"]"))
                    && net.contains(&format!("macaddress: \"{}\"", mac(i))),
                "device {i}: {net}"
            );
            assert_eq!(kinds("identity_written"), ["ok"], "device {i}");
            let seeded = ev
                .iter()
                .find(|e| e["step"] == "identity_written" && e["kind"] == "ok")
                .unwrap();
            assert!(
                seeded["detail"].as_str().unwrap().contains("seed blake3"),
                "{seeded}"
            );
            assert!(ev.iter().any(|e| e["kind"] == "op"
                && e["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("local-hostname: \"node{i}\""))));
            // The R650 profile's BIOS went through the device's BMC:
            // only what differed was changed, then read back.
            assert_eq!(kinds("bios_configured"), ["ok"], "device {i}");
            assert_bios_changed_once(&rack, i, &ev);
            assert_eq!(kinds("raid_configured"), ["skipped"]);
        } else {
            // The generic boxes' RAID controller got its RAID1 volume
            // through their BMC before the image came.
            assert_eq!(kinds("bios_configured"), ["skipped"], "device {i}");
            assert_eq!(kinds("raid_configured"), ["ok"], "device {i}");
            assert_eq!(kinds("identity_written"), ["skipped"], "device {i}");
            assert!(ev.iter().any(|e| e["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("redfish-volume-create ok: POST ")));
            assert_eq!(rack.bmcs[i - 1].count("POST", "/Volumes"), 1, "device {i}");
        }
    }
    // Both entry paths: network-booted loader and an agent started from
    // an installed OS (with its disks given by path).
    let booted = |i: usize| {
        check_log(&rack, i)
            .iter()
            .find(|e| e["step"] == "loader_booted")
            .map(|e| e["detail"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(booted(1), "loader network-booted");
    assert_eq!(booted(6), "loader started from the installed OS");
    // Device 1's NIC pulls the module: its load program ran and was logged.
    let ev1 = check_log(&rack, 1);
    assert!(ev1.iter().any(|e| e["detail"]
        .as_str()
        .unwrap()
        .contains("mlx firmware tool loaded")));
    // Bundles: a plan names the disks it writes by serial (issue 15,
    // finding 10), so even identical machines get bundles of their own;
    // different hardware differs beyond that (profile, module, target).
    let bundle = |i: usize| by_id[&device_id(i)]["bundle"].as_str().unwrap().to_string();
    assert_ne!(
        bundle(5),
        bundle(7),
        "each R650's bundle names its own disk"
    );
    assert_ne!(
        bundle(2),
        bundle(4),
        "each generic box's bundle names its own disks"
    );
    assert_ne!(
        bundle(1),
        bundle(5),
        "the NIC module makes device 1's bundle differ"
    );
    assert_ne!(bundle(5), bundle(2), "different hardware, different bundle");
    assert_ne!(bundle(3), bundle(5), "another image, another plan");
    // Two waves (one per image) ran at the same time.
    let waves = rack.cli(&["waves"]);
    let waves = waves.as_array().unwrap();
    let first = |img: &str| {
        waves
            .iter()
            .find(|w| w["image"] == img)
            .unwrap_or_else(|| panic!("no wave for {img}: {waves:?}"))
            .clone()
    };
    let (a, b) = (first("debian"), first("rocky"));
    for w in [&a, &b] {
        assert_eq!(w["state"], "finished", "{w}");
        assert!(w["verified"].as_u64().unwrap() >= 1);
    }
    let span = |w: &Value| {
        (
            w["created_at"].as_i64().unwrap(),
            w["ended_at"].as_i64().unwrap(),
        )
    };
    let ((a0, a1), (b0, b1)) = (span(&a), span(&b));
    assert!(
        a0 < b1 && b0 < a1,
        "waves did not overlap: debian {a0}..{a1}, rocky {b0}..{b1}"
    );
    let verified: u64 = waves.iter().map(|w| w["verified"].as_u64().unwrap()).sum();
    assert_eq!(
        verified, n as u64,
        "every device verified in some wave: {waves:?}"
    );
    // The REST API and a Prometheus-format /metrics answer too.
    let api = rack.api("/api/devices").unwrap();
    assert_eq!(api.as_array().unwrap().len(), n);
    let text = rack.http_get("/metrics");
    assert!(
        text.contains("rackcast_devices{state=\"done\"} 8"),
        "{}",
        tail(&text, 30)
    );
    assert!(text.contains("rackcast_step_duration_seconds_count{step=\"imaging\",result=\"ok\"}"));
    // What the operator's Prometheus saw, by PromQL: devices per state
    // and the waves' goodput.
    if let Some(prom) = prom {
        let done = prom.wait_value(
            "sum(rackcast_devices{state=\"done\"})",
            Duration::from_secs(10),
            |v| v == n as f64,
        );
        assert_eq!(done, Some(n as f64), "devices done, as scraped");
        let running = prom.query("max_over_time(rackcast_devices{state=\"running\"}[10m])");
        assert!(
            running.is_some_and(|v| v >= 1.0),
            "a scrape saw devices running: {running:?}"
        );
        let goodput = prom.wait_value(
            "min(rackcast_wave_goodput_bps)",
            Duration::from_secs(10),
            |v| v > 1e6,
        );
        assert!(
            goodput.is_some_and(|v| v > 1e6),
            "both images' waves report a goodput above 1 Mbit/s: {goodput:?}"
        );
        // Every panel of the shipped dashboards queries a metric this
        // appliance exports: each has a series in the operator's
        // Prometheus (the counters of errors that never happened too).
        let mut checked = 0;
        for f in fs::read_dir(root().join("tools/grafana"))
            .unwrap()
            .flatten()
        {
            let v: Value = serde_json::from_str(&fs::read_to_string(f.path()).unwrap()).unwrap();
            for expr in rackcast_core::io::metrics::dashboard_queries(&v) {
                for name in rackcast_core::io::metrics::names_in(&expr) {
                    let n = prom.query(&format!("count({{__name__=\"{name}\"}})"));
                    assert!(
                        n.is_some_and(|c| c >= 1.0),
                        "{}: {expr:?} queries {name}, which Prometheus never scraped from the appliance",
                        f.path().display()
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 15, "only {checked} panel metrics checked");
    }
    // Reinstall through the BMC: a done machine is set to boot from the
    // network once and reset, both read back and logged. (The emulator
    // has no machine to boot: its reset changes nothing more.)
    let resets = rack.bmcs[1].count("POST", "ComputerSystem.Reset");
    let before = rack.bmc_rows(2).len();
    let text = rack.cli_text(&["reinstall", &device_id(2)]);
    assert!(
        text.contains("set to boot from the network once and reset"),
        "{text}"
    );
    assert_eq!(
        rack.bmcs[1].count("POST", "ComputerSystem.Reset"),
        resets + 1
    );
    assert_eq!(
        rack.bmcs[1].get(&redfish_system)["Boot"]["BootSourceOverrideTarget"],
        "Pxe"
    );
    let rows = rack.bmc_rows(2)[before..].to_vec();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0].starts_with("power pxe_once via redfish+http://198.18.0.12:8000"),
        "{rows:?}"
    );
    assert!(
        rows[1].starts_with("power cycle via") && rows[1].contains("read back PowerState On"),
        "{rows:?}"
    );
}

#[test]
fn appliance_killed_mid_wave_resumes_every_device() {
    if !can_run() {
        return;
    }
    let n = 4;
    // Every device on the R650 profile: one image, one wave of four.
    let waves = "min_members = 4\nstart_after = \"20s\"\nmember_timeout = \"20s\"";
    let mut rack = r650_rack("fk", n, waves, (64, 64), 80);
    for i in 1..=n {
        rack.start_agent(i);
    }
    // Kill -9 the appliance once the wave has moved a good part of the
    // image (64 MiB at 100 Mbit/s takes ~6 s).
    rack.wait_for(
        "all four imaging in one wave",
        Duration::from_secs(120),
        |d| {
            d.len() == n
                && d.iter()
                    .all(|x| x["step"] == "imaging" && x["state"] == "running" && x["wave"] == 1)
        },
    );
    // Progress, not a fixed sleep: on a loaded CI machine the wave may
    // not have written anything 2.5 s after it started.
    // (Zero blocks count as progress from the start: a fifth of this
    // image. What a device can resume from is in its resume state.)
    let states: Vec<PathBuf> = (1..=n)
        .map(|i| rack.lab.file(&format!("work{i}")))
        .collect();
    rack.wait_for(
        "half the image on every device, saved for resuming",
        Duration::from_secs(120),
        |d| {
            // Half: a resumed device must need clearly less than a fresh
            // one (the assertions below), and the zero fifth of the image
            // counts as progress from the start.
            d.len() == n
                && d.iter()
                    .all(|x| x["progress"].as_f64().is_some_and(|p| p >= 50.0))
                && states.iter().all(|s| resumable_blocks(s) > 0)
        },
    );
    let logs_before: Vec<Vec<Value>> = (1..=n)
        .map(|i| {
            rack.cli(&["log", &device_id(i)])
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    rack.kill_serve();
    std::thread::sleep(Duration::from_millis(500));
    rack.start_serve();
    rack.wait_for(
        "all devices done after the restart",
        Duration::from_secs(180),
        all_done(n),
    );
    let waves = rack.cli(&["waves"]);
    let waves = waves.as_array().unwrap();
    assert!(waves.iter().any(|w| w["state"] == "aborted"), "{waves:?}");
    assert!(waves.iter().any(|w| w["state"] == "finished"));
    let devs = rack.devices();
    // What a receiver that resumed nothing would need: the image's
    // non-zero blocks (zero blocks are never sent).
    let image = fs::read(&rack.images["debian"]).unwrap();
    let nonzero_bytes = image
        .chunks(1 << 20)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count() as u64
        * (1 << 20);
    let symbol = rackcast_core::wire::packet::symbol_size_for_mtu(1500).unwrap() as u64;
    for i in 1..=n {
        let disk = rack.lab.file(&format!("d{i}-disk-big.img"));
        let d = devs.iter().find(|d| d["device"] == device_id(i)).unwrap();
        assert_eq!(d["image"], "debian");
        assert_image_on(&disk, &rack.images["debian"]);
        let ev = check_log(&rack, i);
        // The restart kept every row from before the kill, unchanged and
        // in order: the log after it begins with exactly those rows.
        let before = &logs_before[i - 1];
        assert!(
            ev.len() > before.len() && ev[..before.len()] == before[..],
            "device {i}: the log before the kill ({} rows) is not a prefix of the log after it ({} rows)",
            before.len(),
            ev.len()
        );
        assert!(
            ev.iter().any(|e| e["step"] == "imaging"
                && e["kind"] == "failed"
                && e["detail"]
                    .as_str()
                    .unwrap()
                    .contains("appliance restarted")),
            "device {i}: the lost wave is in the log"
        );
        // Every device resumed: the receive that verified the image
        // started from blocks already on its disk, and took fewer bytes
        // off the wire than a fresh receiver needs.
        let done = ev
            .iter()
            .rev()
            .filter_map(|e| e["detail"].as_str())
            .find(|d| d.contains("receive-image ok"))
            .unwrap_or_else(|| panic!("device {i}: no verified receive in its log"));
        let number_before = |what: &str| -> u64 {
            let at = done
                .find(what)
                .unwrap_or_else(|| panic!("{what:?} in {done:?}"));
            done[..at]
                .split_whitespace()
                .last()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("number before {what:?} in {done:?}"))
        };
        let resumed = number_before(" blocks in place");
        let received = number_before(" packets") * symbol;
        assert!(resumed > 0, "device {i} resumed nothing: {done}");
        assert!(
            received < nonzero_bytes,
            "device {i} took {received} bytes after the restart, a fresh receiver needs {nonzero_bytes}: {done}"
        );
    }
}

#[test]
fn bad_input_gets_clear_errors_and_the_others_are_served() {
    if !can_run() {
        return;
    }
    let mut rack = Rack::new("fb", 1, "300mbit", (8, 8), "[waves]\nstart_after = \"1s\"");
    // The real device works through all of this.
    rack.start_agent(1);
    let app_ns = rack.lab.ns("app");
    let bad = |case: &str| -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &app_ns, "python3"])
            .arg(root().join("tests/fixtures/bad_agent.py"))
            .args(["198.18.0.1", "7100", case])
            .arg(rackcast_core::wire::device::DEVICE_PROTOCOL.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for (case, want) in [
        ("plaintext", ""),
        ("garbage", "malformed"),
        ("oversize", "larger than"),
        ("version", "protocol version 99 not supported"),
        ("bad_mac", "not aa:bb:cc:dd:ee:ff"),
    ] {
        let r = bad(case);
        assert!(
            r["closed"].as_bool().unwrap(),
            "{case}: connection left open: {r}"
        );
        if case == "plaintext" {
            assert_eq!(r["frames"], 0, "plain TCP got an answer: {r}");
            continue;
        }
        assert!(
            r["text"].as_str().unwrap().contains(want),
            "{case}: answer {r} lacks {want:?}"
        );
    }
    // A loader told to trust another key follows no appliance holding a
    // different one: no bundle is fetched, it gives up with the reason.
    let wrong = "ab".repeat(32);
    let hw = rack.lab.file("untrusting.json");
    let mut desc: Value =
        serde_json::from_str(&fs::read_to_string(rack.lab.file("d1.json")).unwrap()).unwrap();
    desc["nics"][0]["mac"] = "02:bb:00:00:00:09".into();
    fs::write(&hw, desc.to_string()).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &rack.lab.ns("d1")])
        .arg(bin("rackcast-agent"))
        .args(["run", "--server", "198.18.0.1:7100", "--iface", "d0"])
        .args([
            "--give-up",
            "2",
            "--os-present",
            "false",
            "--trust-key",
            &wrong,
        ])
        .arg("--hardware")
        .arg(&hw)
        .arg("--work-dir")
        .arg(rack.lab.file("work-untrusting"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("is not the trusted key {wrong}"))
            && err.contains("no trusted appliance"),
        "{err}"
    );
    assert!(
        fs::read_dir(rack.lab.file("work-untrusting"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "the untrusting loader stored something"
    );
    rack.wait_for("the real device done", Duration::from_secs(120), |d| {
        d.iter()
            .any(|x| x["device"] == device_id(1) && x["state"] == "done")
    });
    // Another device's bundle (BMC credentials inside) is not served.
    let theirs = rack
        .devices()
        .into_iter()
        .find(|d| d["device"] == device_id(1))
        .and_then(|d| d["bundle"].as_str().map(str::to_string))
        .unwrap();
    let r = bad(&format!("foreign_bundle={theirs}"));
    assert!(
        r["text"].as_str().unwrap().contains("is not this device's") && r["closed"] == true,
        "{r}"
    );
    let r = bad("midstep");
    assert!(
        r["frames"].as_u64().unwrap() >= 2,
        "welcome and a command: {r}"
    );
    rack.wait_for("the real device done", Duration::from_secs(120), |d| {
        d.iter()
            .any(|x| x["device"] == device_id(1) && x["state"] == "done")
    });
    // The device that vanished mid-step is recorded, its step still open
    // (its timeout will fail it), the appliance still up.
    let devs = rack.devices();
    let ghost = devs
        .iter()
        .find(|d| d["mac"] == "02:bb:00:00:00:02")
        .expect("mid-step device recorded");
    assert_eq!(ghost["state"], "running", "{ghost}");
    assert_eq!(ghost["step"], "inventoried");
    assert!(
        !devs.iter().any(|d| d["mac"] == "02:bb:00:00:00:01"),
        "a wrong-version hello must not create a device"
    );
    let text = rack.http_get("/metrics");
    for kind in ["tls", "malformed", "oversize", "version", "foreign_bundle"] {
        assert!(
            text.contains(&format!(
                "rackcast_agent_protocol_errors_total{{kind=\"{kind}\"}}"
            )),
            "no {kind} counter in:\n{}",
            tail(&text, 40)
        );
    }
    assert!(
        rack.serve.as_mut().unwrap().try_wait().unwrap().is_none(),
        "appliance died"
    );
}

#[test]
fn failed_step_is_logged_and_retried_by_the_operator() {
    if !can_run() {
        return;
    }
    let marker_dir = std::env::temp_dir().join(format!("rcflaky{}", std::process::id()));
    let _ = fs::remove_dir_all(&marker_dir);
    fs::create_dir_all(&marker_dir).unwrap();
    let marker = marker_dir.join("fixed");
    let extra = format!(
        r#"
[[profiles]]
name = "flaky"
image = "rocky"
target = {{ order = "smallest", count = 1 }}
programs = [ {{ name = "raid-firmware", argv = ["sh", "-c", "test -e {m} || {{ echo controller firmware too old >&2; exit 3; }}"] }} ]

[[devices]]
mac = "{mac}"
profile = "flaky"
"#,
        m = marker.display(),
        mac = mac(1)
    );
    let mut rack = Rack::new("fr", 1, "300mbit", (8, 8), &extra);
    rack.start_agent(1);
    // 4 attempts (automatic retries with backoff), then it waits.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ev = rack
            .cli_opt(&["log", &device_id(1)])
            .unwrap_or(Value::Array(vec![]));
        let waiting = ev.as_array().unwrap().iter().any(|e| {
            e["kind"] == "failed"
                && e["detail"]
                    .as_str()
                    .unwrap()
                    .contains("waiting for `rackcast retry`")
        });
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "never gave up: {ev}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let devs = rack.devices();
    assert_eq!(devs[0]["state"], "failed");
    assert_eq!(devs[0]["step"], "programs_run");
    assert!(devs[0]["detail"]
        .as_str()
        .unwrap()
        .contains("raid-firmware failed"));
    let ev = rack.cli(&["log", &device_id(1)]);
    let ev = ev.as_array().unwrap();
    let failures = ev
        .iter()
        .filter(|e| e["kind"] == "failed" && e["step"] == "programs_run")
        .count();
    assert_eq!(failures, 4, "max_attempts = 4");
    assert!(ev.iter().any(|e| e["kind"] == "op"
        && e["detail"]
            .as_str()
            .unwrap()
            .contains("(exit 3): controller firmware too old")));
    // The operator fixes the cause and retries.
    fs::write(&marker, "").unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &rack.lab.ns("app")])
        .arg(bin("rackcast"))
        .args(["retry", &device_id(1), "--config"])
        .arg(&rack.config)
        .env("RACKCAST_TOKEN", operator_token(&rack.config, "admin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rack.wait_for("retried device done", Duration::from_secs(90), all_done(1));
    check_log(&rack, 1);
    let _ = fs::remove_dir_all(&marker_dir);
}

#[test]
fn wave_takes_a_late_member_drops_a_silent_one_and_the_device_comes_back() {
    if !can_run() {
        return;
    }
    let n = 4;
    let waves = "min_members = 3\nstart_after = \"1s\"\nmember_timeout = \"4s\"";
    // Half the link for the wave (~15 s for 90 MiB): the late device's
    // bundle download has room beside it, so it joins this wave even on a
    // loaded machine.
    let mut rack = r650_rack("fw", n, waves, (90, 8), 50);
    for i in 1..=3 {
        rack.start_agent(i);
    }
    rack.wait_for("three imaging in wave 1", Duration::from_secs(120), |d| {
        d.iter()
            .filter(|x| x["step"] == "imaging" && x["state"] == "running" && x["wave"] == 1)
            .count()
            == 3
    });
    // A late device joins the running wave.
    rack.start_agent(4);
    rack.wait_for("device 4 in wave 1", Duration::from_secs(60), |d| {
        d.iter()
            .any(|x| x["device"] == device_id(4) && x["wave"] == 1 && x["step"] == "imaging")
    });
    // Device 2 dies mid-wave (power loss: its agent is killed) once it has
    // a part of the image to resume from (its resume state names blocks:
    // progress alone starts at a fifth, the zero blocks).
    let state2 = rack.lab.file("work2");
    rack.wait_for(
        "device 2 with blocks saved for resuming",
        Duration::from_secs(60),
        |_| resumable_blocks(&state2) > 0,
    );
    if let Some(mut a) = rack.agents[1].take() {
        let _ = a.kill();
        let _ = a.wait();
    }
    rack.wait_for("the others done", Duration::from_secs(120), |d| {
        [1, 3, 4].iter().all(|i| {
            d.iter()
                .any(|x| x["device"] == device_id(*i) && x["state"] == "done")
        })
    });
    let waves = rack.cli(&["waves"]);
    let w1 = waves
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == 1)
        .unwrap()
        .clone();
    assert_eq!(w1["state"], "finished", "{w1}");
    assert_eq!(w1["verified"], 3, "{w1}");
    assert!(w1["failed"].as_u64().unwrap() >= 1, "{w1}");
    let ev2 = rack.cli(&["log", &device_id(2)]);
    assert!(
        ev2.as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "imaging"
                && e["kind"] == "failed"
                && e["detail"].as_str().unwrap().contains("wave lost")),
        "device 2's dropped membership is in its log: {ev2}"
    );
    // The device comes back (powered on again: its loader starts): it
    // gets its bundle again, rejoins a new wave, resumes its blocks.
    rack.start_agent(2);
    rack.wait_for("device 2 done", Duration::from_secs(120), all_done(n));
    for i in 1..=n {
        assert_image_on(
            &rack.lab.file(&format!("d{i}-disk-big.img")),
            &rack.images["debian"],
        );
        check_log(&rack, i);
    }
    let ev2 = check_log(&rack, 2);
    assert!(ev2.iter().any(|e| e["detail"]
        .as_str()
        .unwrap()
        .contains("loader rebooted: bundle delivered again")));
    assert!(ev2.iter().any(|e| {
        let d = e["detail"].as_str().unwrap();
        e["kind"] == "op" && d.contains("receive-image ok") && !d.contains(" 0 resumed blocks")
    }));
}

/// The fleet record on a real PostgreSQL server on the lab network: a
/// wave installs every device, the database crashes and comes back in
/// the middle of it, and every device's log is still whole and in order,
/// in the database, with no secret in the appliance's log.
#[test]
fn a_rack_on_a_postgres_fleet_record_rides_out_a_database_crash() {
    if !can_run() {
        return;
    }
    let n = 2;
    let Some((mut rack, pg)) = rack_on_postgres("fp") else {
        return;
    };
    for i in 1..=n {
        rack.start_agent(i);
    }
    rack.wait_for("both imaging in one wave", Duration::from_secs(120), |d| {
        d.len() == n
            && d.iter()
                .all(|x| x["step"] == "imaging" && x["state"] == "running")
    });
    // The database dies as a crash would (every connection cut, no
    // checkpoint) and is back 3 s later: the appliance keeps the events it
    // could not commit and writes them, in order, once it reconnects.
    pg.stop();
    std::thread::sleep(Duration::from_secs(3));
    pg.start_again();
    rack.wait_for("all done", Duration::from_secs(180), all_done(n));
    for i in 1..=n {
        assert_image_on(
            &rack.lab.file(&format!("d{i}-disk-big.img")),
            &rack.images["debian"],
        );
        let ev = check_log(&rack, i);
        // What the CLI showed is what the database holds.
        let rows = pg
            .sql(&format!(
                "SELECT COUNT(*) FROM events WHERE device_id = '{}'",
                device_id(i)
            ))
            .unwrap();
        assert_eq!(rows, ev.len().to_string(), "device {i}");
    }
    let waves = rack.cli(&["waves"]);
    assert!(
        waves
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "finished" && w["verified"] == n),
        "{waves}"
    );
    assert_eq!(
        pg.sql("SELECT COUNT(*) FROM devices").unwrap(),
        n.to_string()
    );
    let log = fs::read_to_string(rack.lab.file("serve.log")).unwrap();
    let pw = fs::read_to_string(&pg.password_file).unwrap();
    assert!(
        !log.contains(pw.trim()),
        "the database password is in the log"
    );
    assert!(
        log.contains(&format!("postgres://198.18.0.5:{}/rackcast", pg.port)),
        "the log names the fleet record (without credentials)"
    );
    // The crash was felt, and survived by reconnecting.
    assert!(
        log.contains("store connection lost; reconnecting"),
        "no reconnect in the appliance's log"
    );
}

/// `[appliance]` lines added to a config file's text.
fn with_appliance(cfg: &str, lines: &str) -> String {
    cfg.replacen("[appliance]\n", &format!("[appliance]\n{lines}"), 1)
}

/// An active/standby pair on one segment, sharing a PostgreSQL fleet
/// record, keepalived moving the service address: the active appliance is
/// killed (-9) mid-wave; the standby takes the address, waits out the
/// dead one's leases, and every device finishes under it, byte-checked,
/// with its whole log in order and the dead appliance's wave aborted.
#[test]
fn the_standby_finishes_every_device_when_the_active_appliance_is_killed() {
    use common::keepalived::{have_keepalived, Keepalived, Side};
    if !can_run() {
        return;
    }
    if !have_keepalived() {
        skip("keepalived is not installed");
        return;
    }
    let n = 2;
    let Some((mut rack, pg)) = rack_on_postgres("fo") else {
        return;
    };
    rack.kill_serve();
    // 198.18.0.1, where devices reach the appliance, becomes the pair's
    // virtual address: the active one keeps .2, the standby has .3.
    let app = rack.lab.ns("app");
    for args in [
        ["addr", "del", "198.18.0.1/24", "dev", "srv0"],
        ["addr", "add", "198.18.0.2/24", "dev", "srv0"],
    ] {
        let st = Command::new("ip")
            .args(["-n", &app])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    let b_ns = rack.lab.host_with("b", "198.18.0.3", "srv0");
    let base = fs::read_to_string(&rack.config).unwrap();
    let state_a = rack.lab.file("state");
    let a_cfg = with_appliance(
        &base,
        "id = \"app-a\"\nstandby = true\nlease_ttl = \"6s\"\n",
    );
    fs::write(&rack.config, &a_cfg).unwrap();
    // The standby shares the active one's keys (what the devices' agents
    // pin and the operator's CLI trusts), nothing else of its state.
    let b_config = rack.lab.file("rackcast-b.toml");
    let b_cfg = with_appliance(
        &a_cfg.replace("id = \"app-a\"", "id = \"app-b\"").replace(
            &format!("state_dir = \"{}\"", state_a.display()),
            &format!("state_dir = \"{}\"", rack.lab.file("state-b").display()),
        ),
        &format!(
            "signing_key = \"{a}/signing.key\"\noperator_cert = \"{a}/operator-cert.pem\"\noperator_key = \"{a}/operator-key.pem\"\n",
            a = state_a.display()
        ),
    );
    assert!(b_cfg.contains("state-b") && b_cfg.contains("app-b"));
    fs::write(&b_config, &b_cfg).unwrap();
    let b_log = rack.lab.file("serve-b.log");
    let mut serve_a = spawn_serve(&app, &rack.config, &rack.lab.file("serve.log"));
    let mut serve_b = spawn_serve(&b_ns, &b_config, &b_log);
    let dir = rack.lab.dir.clone();
    let _ka = Keepalived::start(
        &dir,
        Side {
            name: "a",
            ns: &app,
            iface: "srv0",
            own: "198.18.0.2",
            peer: "198.18.0.3",
            priority: 150,
            tracks: serve_a.id(),
        },
        "198.18.0.1",
    );
    let _kb = Keepalived::start(
        &dir,
        Side {
            name: "b",
            ns: &b_ns,
            iface: "srv0",
            own: "198.18.0.3",
            peer: "198.18.0.2",
            priority: 100,
            tracks: serve_b.id(),
        },
        "198.18.0.1",
    );
    // A is elected (higher priority) and starts serving.
    let serve_log = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serve_log(&rack.lab.file("serve.log")).contains("standby: the service address came") {
        assert!(
            Instant::now() < deadline,
            "the active appliance never got the address:\n{}",
            _ka.log()
        );
        assert!(serve_a.try_wait().unwrap().is_none(), "appliance A exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(serve_b.try_wait().unwrap().is_none(), "appliance B exited");
    for i in 1..=n {
        rack.start_agent(i);
    }
    rack.wait_for("both imaging in one wave", Duration::from_secs(120), |d| {
        d.len() == n
            && d.iter()
                .all(|x| x["step"] == "imaging" && x["state"] == "running")
    });
    let states: Vec<PathBuf> = (1..=n)
        .map(|i| rack.lab.file(&format!("work{i}")))
        .collect();
    rack.wait_for(
        "blocks saved for resuming on every device",
        Duration::from_secs(120),
        |_| states.iter().all(|s| resumable_blocks(s) > 0),
    );
    // The active appliance dies.
    let _ = serve_a.kill();
    let _ = serve_a.wait();
    let killed = Instant::now();
    rack.wait_for(
        "every device done under the standby",
        Duration::from_secs(180),
        all_done(n),
    );
    let took = killed.elapsed();
    let blog = serve_log(&b_log);
    assert!(
        blog.contains("standby: the service address came to this host"),
        "{blog}"
    );
    for i in 1..=n {
        assert_image_on(
            &rack.lab.file(&format!("d{i}-disk-big.img")),
            &rack.images["debian"],
        );
        let ev = check_log(&rack, i);
        assert!(
            ev.iter().any(|e| e["step"] == "imaging"
                && e["kind"] == "failed"
                && e["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("appliance restarted")),
            "device {i}: the lost wave is in its log"
        );
        let rows = pg
            .sql(&format!(
                "SELECT COUNT(*) FROM events WHERE device_id = '{}'",
                device_id(i)
            ))
            .unwrap();
        assert_eq!(rows, ev.len().to_string(), "device {i}");
    }
    // A's wave was aborted, B's finished with every device; B holds the
    // devices now.
    let waves = pg
        .sql("SELECT appliance || ':' || state || ':' || verified FROM waves ORDER BY id")
        .unwrap();
    assert!(waves.contains("app-a:aborted"), "{waves}");
    assert!(waves.contains(&format!("app-b:finished:{n}")), "{waves}");
    let holders = pg.sql("SELECT DISTINCT holder FROM device_leases").unwrap();
    assert_eq!(holders, "app-b");
    eprintln!(
        "standby finished the rack {:.1} s after the kill",
        took.as_secs_f64()
    );
    let _ = serve_b.kill();
    let _ = serve_b.wait();
}

/// The control-plane benchmark tool keeps working (its numbers come from
/// release builds; this only checks that a simulated fleet completes).
#[test]
fn fleet_sim_completes_a_small_fleet() {
    if !can_run() {
        return;
    }
    let out = Command::new(bin("fleet-sim"))
        .args(["--devices", "40", "--timeout", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap();
    let v: Value = serde_json::from_str(line).unwrap();
    // What the appliance's store says, not the argument echoed back.
    assert_eq!(v["devices_done"], 40, "{line}");
    assert!(v["appliance_peak_rss_mib"].as_f64().unwrap() > 1.0);
}

#[test]
fn bios_over_redfish_is_idempotent_names_refused_attributes_and_waits_for_the_bmc() {
    if !can_run() {
        return;
    }
    // d1, d3: the R650 profile; d2: a profile wanting an attribute this
    // BIOS does not have.
    let extra = format!(
        "[waves]\nstart_after = \"1s\"\n\n\
         [[profiles]]\nname = \"r650-typo\"\nimage = \"debian\"\n\
         target = {{ order = \"largest\", count = 1 }}\n\
         bios = {{ attributes = {{ BootMode = \"Uefi\", NoSuchKnob = \"On\" }}, redfish = {} }}\n\n\
         [[devices]]\nmac = \"{}\"\nprofile = \"r650\"\n\
         [[devices]]\nmac = \"{}\"\nprofile = \"r650-typo\"\n\
         [[devices]]\nmac = \"{}\"\nprofile = \"r650\"\n",
        redfish_cfg(),
        mac(1),
        mac(2),
        mac(3)
    );
    let mut rack = Rack::build("fi", 3, "300mbit", (8, 8), &extra, false, 80);
    // d3's BMC is down when its BIOS step starts.
    rack.bmcs[2].stop();
    for i in 1..=3 {
        rack.start_agent(i);
    }
    let log_has = |rack: &Rack, i: usize, needle: &str| {
        rack.cli_opt(&["log", &device_id(i)])
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .any(|e| e["detail"].as_str().unwrap_or("").contains(needle))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log_has(&rack, 3, "BMC unreachable") {
        assert!(Instant::now() < deadline, "{}", rack.serve_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A retryable failure: the step fails with the reason, is retried
    // with backoff, and goes through once the BMC answers.
    rack.bmcs[2].restart();
    rack.wait_for("d1 and d3 done, d2 failed", Duration::from_secs(120), |d| {
        let st = |i: usize| {
            d.iter()
                .find(|x| x["device"] == device_id(i))
                .map(|x| x["state"].as_str().unwrap_or("").to_string())
                .unwrap_or_default()
        };
        st(1) == "done" && st(3) == "done" && st(2) == "failed"
    });
    for i in [1, 3] {
        let ev = check_log(&rack, i);
        assert_bios_changed_once(&rack, i, &ev);
    }
    let ev3 = rack.cli(&["log", &device_id(3)]);
    let ev3 = ev3.as_array().unwrap();
    let failed = ev3
        .iter()
        .position(|e| {
            e["step"] == "bios_configured"
                && e["kind"] == "failed"
                && e["detail"].as_str().unwrap().contains("BMC unreachable")
        })
        .expect("d3's failed BIOS attempt");
    let retried = ev3
        .iter()
        .position(|e| e["step"] == "bios_configured" && e["kind"] == "retry")
        .expect("d3 retried");
    let ok = ev3
        .iter()
        .position(|e| e["step"] == "bios_configured" && e["kind"] == "ok")
        .expect("d3's BIOS step ok");
    assert!(failed < retried && retried < ok);
    // The attribute the BIOS lacks is named; nothing was sent to the BMC.
    assert!(log_has(
        &rack,
        2,
        "BIOS attribute NoSuchKnob is not offered by this machine's BIOS"
    ));
    assert_eq!(rack.bmcs[1].count("PATCH", "/"), 0);
    assert_eq!(rack.bmcs[1].count("POST", "/"), 0);
    let d2 = rack
        .devices()
        .into_iter()
        .find(|x| x["device"] == device_id(2))
        .unwrap();
    assert_eq!(d2["step"], "bios_configured", "{d2}");

    // Reinstall d1 (the operator re-arms it, its loader runs again): the
    // BIOS is already as wanted, so no PATCH and no reset this time.
    let out = finish(rack.agents[0].take().unwrap(), Duration::from_secs(20));
    assert!(out.status.success());
    reinstall(&rack, 1);
    // The reinstall went through d1's BMC: PXE once, then one reset.
    let resets = rack.bmcs[0].count("POST", "ComputerSystem.Reset");
    assert_eq!(resets, 2, "the BIOS step's reset and the reinstall's");
    rack.start_agent(1);
    rack.wait_for("d1 reinstalled", Duration::from_secs(120), |d| {
        d.iter()
            .any(|x| x["device"] == device_id(1) && x["state"] == "done")
            && log_has(&rack, 1, "already as wanted, nothing to change")
    });
    assert_eq!(rack.bmcs[0].count("PATCH", "/BIOS/Settings"), 1);
    assert_eq!(
        rack.bmcs[0].count("POST", "ComputerSystem.Reset"),
        resets,
        "the second install's BIOS step reset nothing"
    );
    // The bundles (with the BMC password) are the appliance user's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(rack.lab.file("state/bundles"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn hardware_raid_volume_through_redfish_is_created_read_back_and_reused() {
    if !can_run() {
        return;
    }
    // The BMC's RAID controller has drives of 40, 20 and 20 GB: RAID1 over
    // the two smallest; the image goes to the OS disk the rule finds.
    let extra = format!(
        "[waves]\nstart_after = \"1s\"\n\n\
         [[profiles]]\nname = \"r650-hwraid\"\nimage = \"debian\"\n\
         target = {{ order = \"largest\", count = 1 }}\n\
         [profiles.raid]\nlevel = \"raid1\"\ndisks = {{ order = \"smallest\", count = 2 }}\n\
         redfish = {}\n\n\
         [[devices]]\nmac = \"{}\"\nprofile = \"r650-hwraid\"\n",
        redfish_cfg(),
        mac(1)
    );
    let mut rack = Rack::build("fh", 1, "300mbit", (8, 8), &extra, false, 80);
    rack.start_agent(1);
    rack.wait_for("device done", Duration::from_secs(120), all_done(1));
    let ev = check_log(&rack, 1);
    let op = |ev: &[Value], name: &str| -> String {
        ev.iter()
            .filter_map(|e| e["detail"].as_str())
            .rfind(|d| d.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row"))
            .to_string()
    };
    let inspect = op(&ev, "raid-inspect");
    assert!(
        inspect.starts_with("raid-inspect ok")
            && inspect.contains("Drives/hdd-a (20000000000 bytes), /redfish/v1/Systems/")
            && inspect.contains("Drives/hdd-b (20000000000 bytes)")
            && !inspect.contains("hdd-big (")
            && inspect.ends_with("-> Create"),
        "{inspect}"
    );
    let create = op(&ev, "redfish-volume-create");
    assert!(
        create.starts_with("redfish-volume-create ok")
            && create.contains("\"RAIDType\":\"RAID1\"")
            && create.contains("\"CapacityBytes\":20000000000"),
        "{create}"
    );
    let verify = op(&ev, "raid-verify");
    assert!(
        verify.starts_with("raid-verify ok") && verify.contains("Mirrored 20000000000 bytes"),
        "{verify}"
    );
    // The controller now has that volume (read with curl from the device).
    let bmc = &rack.bmcs[0];
    let sys = bmc.system();
    let vols = bmc.get(&format!("{sys}/Storage/1/Volumes"));
    assert_eq!(vols["Members@odata.count"], 1, "{vols}");
    let v = bmc.get(vols["Members"][0]["@odata.id"].as_str().unwrap());
    assert_eq!(
        (v["Name"].as_str(), v["VolumeType"].as_str()),
        (Some("rackcast"), Some("Mirrored"))
    );
    assert_eq!(bmc.count("POST", "/Volumes"), 1);

    // Installed again: the volume is found and reused, not created twice.
    let out = finish(rack.agents[0].take().unwrap(), Duration::from_secs(20));
    assert!(out.status.success());
    reinstall(&rack, 1);
    let rows = ev.len();
    rack.start_agent(1);
    // Done again: a `done ok` row after the first install's rows (the
    // device table alone still says done from before).
    rack.wait_for("device reinstalled", Duration::from_secs(120), |_| {
        rack.cli_opt(&["log", &device_id(1)])
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| {
                a.iter()
                    .skip(rows)
                    .any(|e| e["step"] == "done" && e["kind"] == "ok")
            })
    });
    let ev = rack.cli(&["log", &device_id(1)]);
    let ev = ev.as_array().unwrap();
    assert!(
        ev[rows..].iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .contains("existing RAID1 volume rackcast matches: reused")),
        "{:?}",
        &ev[rows..]
    );
    assert_eq!(rack.bmcs[0].count("POST", "/Volumes"), 1);
}

/// A device behind a slow port in an appliance wave (a 20 Mbit tbf on its
/// switch port; the rack runs at 200 Mbit): the operator sees it behind
/// (`rackcast devices`, the REST API and `/metrics`), its wave-mate is
/// verified well before it, and it is caught up and installed.
#[test]
fn a_slow_device_is_shown_behind_and_caught_up_after_its_wave() {
    if !can_run() {
        return;
    }
    let n = 3;
    // Devices 1 and 3 take one image (one wave: it starts once both are
    // ready), device 2 the other.
    let mut rack = Rack::build(
        "sl",
        n,
        "200mbit",
        (24, 16),
        "[waves]\nmin_members = 2\nstart_after = \"60s\"\nmember_timeout = \"30s\"",
        false,
        80,
    );
    rack.lab.slow_port(1, "20mbit");
    for i in 1..=n {
        rack.start_agent(i);
    }
    let slow = device_id(1);
    rack.wait_for(
        "device 1 shown behind its wave",
        Duration::from_secs(180),
        |devs| {
            devs.iter()
                .any(|d| d["device"] == slow.as_str() && d["behind"] == true)
        },
    );
    let text = rack.http_get("/metrics");
    assert!(
        text.lines()
            .any(|l| l.starts_with("rackcast_wave_members_behind{") && l.ends_with(" 1")),
        "{}",
        tail(&text, 40)
    );
    let api = rack.api("/api/devices").unwrap();
    assert!(
        api.as_array()
            .unwrap()
            .iter()
            .any(|d| d["device"] == slow.as_str() && d["behind"] == true),
        "{api}"
    );
    let waves = rack.cli(&["waves"]);
    assert!(
        waves
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "running"
                && w["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("behind the others")
                && w["detail"].as_str().unwrap_or("").contains(slow.as_str())),
        "{waves}"
    );
    let table = rack.cli_text(&["devices"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&slow) && l.contains("behind")),
        "{table}"
    );
    rack.wait_for("all devices done", Duration::from_secs(240), all_done(n));
    let verified_at = |i: usize| -> i64 {
        check_log(&rack, i)
            .iter()
            .find(|e| e["step"] == "image_verified" && e["kind"] == "ok")
            .and_then(|e| e["at"].as_i64())
            .unwrap_or_else(|| panic!("device {i}: no image_verified"))
    };
    let (t1, t3) = (verified_at(1), verified_at(3));
    // 24 MiB: ~1.2 s at the rack's 160 Mbit, ~10 s at 20 Mbit.
    assert!(
        t1 - t3 > 4_000,
        "the clean device was not done well before the slow one: {t3} vs {t1}"
    );
    for i in [1, 3] {
        assert_image_on(
            &rack.lab.file(&format!("d{i}-disk-big.img")),
            &rack.images["debian"],
        );
    }
    let waves = rack.cli(&["waves"]);
    assert!(
        waves
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["image"] == "debian"
                && w["detail"].as_str().unwrap_or("").contains("1 fell behind")),
        "{waves}"
    );
    let text = rack.http_get("/metrics");
    assert!(
        text.lines().any(
            |l| l.starts_with("rackcast_wave_members_fell_behind_total{") && l.ends_with(" 1")
        ),
        "{}",
        tail(&text, 40)
    );
}
