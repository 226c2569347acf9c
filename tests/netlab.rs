//! Data plane end to end over real sockets in network namespaces: the
//! `rackcast` sender and `rackcast-agent` receivers as separate processes,
//! a bridge between them, tbf rate and nftables random loss
//! (`netlab/lab.sh`). Needs root; under `CI=true` not being root fails.
//!
//! Every test builds its own lab under a unique prefix, bounds every
//! process with a deadline, and tears the lab down when it ends (also on
//! panic, via `Drop`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use common::wave::*;
use common::*;

/// One wave of `img` at `rate` to receivers d1..=dn, each writing
/// `outN`: the sender's output, the receivers' and their outputs' paths.
fn wave_to(lab: &Lab, img: &Path, n: usize, rate: &str) -> (Output, Vec<Output>, Vec<PathBuf>) {
    let outs: Vec<PathBuf> = (1..=n).map(|i| lab.file(&format!("out{i}"))).collect();
    let rx: Vec<Child> = (1..=n)
        .map(|i| receiver(lab, i, &outs[i - 1], &[]))
        .collect();
    let tx = sender(lab, img, rate, n, &[]);
    let sent = finish(tx, Duration::from_secs(90));
    let rx_out = rx
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(30)))
        .collect();
    (sent, rx_out, outs)
}

#[test]
fn three_receivers_two_with_loss_all_verify_with_coded_resends() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("a", 3, "200mbit", &[(1, 5.0), (2, 5.0)]);
    let img = make_image(&lab, 24, 1);
    let (sent, rx_out, outs) = wave_to(&lab, &img, 3, "200M");
    let report = last_json(&sent);
    assert!(sent.status.success(), "sender failed: {report}");
    assert_eq!(report["ok"], true);
    let receivers = report["receivers"].as_array().unwrap();
    assert_eq!(receivers.len(), 3);
    assert!(receivers.iter().all(|r| r["ok"] == true), "{report}");
    // 5 % loss toward d1 and d2 had to be repaired, with datagrams that
    // each fixed a loss at both (their losses are independent).
    assert!(report["repair_packets"].as_u64().unwrap() > 0, "{report}");
    assert!(report["coded_packets"].as_u64().unwrap() > 0, "{report}");
    for (o, path) in rx_out.iter().zip(&outs) {
        assert!(
            o.status.success(),
            "receiver failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let r = last_json(o);
        assert_eq!(r["verified"], true);
        assert_same(&img, path);
    }
    // Both lossy receivers solved coded datagrams (XOR, no decoding).
    for o in &rx_out[..2] {
        let r = last_json(o);
        assert!(r["coded"].as_u64().unwrap() > 0, "{r}");
    }
    // The lossy link really dropped packets: d1 (5 % loss) saw clearly
    // fewer than the sender sent (the clean d3 leaves before the last
    // repair rounds, so it is no yardstick).
    let lossy = last_json(&rx_out[0])["packets"].as_u64().unwrap();
    let sent = ["source_packets", "repair_packets", "probe_packets"]
        .iter()
        .map(|k| report[*k].as_u64().unwrap())
        .sum::<u64>();
    assert!(
        lossy * 100 < sent * 98,
        "lossy {lossy} vs {sent} packets sent"
    );
}

#[test]
fn killed_receiver_resumes_from_its_bitmap() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("b", 1, "100mbit", &[]);
    let img = make_image(&lab, 32, 2);
    let out = lab.file("out1");
    let first = receiver(&lab, 1, &out, &["--name", "dev1"]);
    let tx = sender(
        &lab,
        &img,
        "40M",
        1,
        &["--receiver-timeout", "20", "--interleave", "4"],
    );
    // ~7 s at 40 Mbit/s: kill the receiver part way through, once it has
    // saved some blocks (a fixed moment failed on a loaded CI run).
    let state = PathBuf::from(format!("{}.rcresume", out.display()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !state.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = first.id();
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = finish(first, Duration::from_secs(5));
    assert!(!killed.status.success());
    assert!(state.exists(), "resume state not written before the kill");
    let second = receiver(&lab, 1, &out, &["--name", "dev1"]);
    let r2 = finish(second, Duration::from_secs(60));
    let sent = finish(tx, Duration::from_secs(60));
    let rep = last_json(&r2);
    assert_eq!(rep["verified"], true, "{rep}");
    assert!(
        rep["resumed_blocks"].as_u64().unwrap() > 0,
        "nothing resumed: {rep}"
    );
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stdout)
    );
    assert_same(&img, &out);
    assert!(!state.exists(), "resume state left behind after success");
}

#[test]
fn late_joiner_gets_what_it_missed() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("f", 2, "100mbit", &[]);
    let img = make_image(&lab, 24, 6);
    let (o1, o2) = (lab.file("out1"), lab.file("out2"));
    let early = receiver(&lab, 1, &o1, &[]);
    let tx = sender(&lab, &img, "40M", 1, &[]);
    // The wave starts with one receiver; the second joins ~2 s into a ~5 s
    // transfer and must be served the blocks that went by before it came.
    std::thread::sleep(Duration::from_secs(2));
    let late = receiver(&lab, 2, &o2, &[]);
    let r1 = finish(early, Duration::from_secs(60));
    let r2 = finish(late, Duration::from_secs(60));
    let sent = finish(tx, Duration::from_secs(60));
    let report = last_json(&sent);
    assert!(sent.status.success(), "{report}");
    assert_eq!(report["receivers"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(last_json(&r1)["verified"], true);
    assert_eq!(last_json(&r2)["verified"], true);
    assert!(
        report["repair_packets"].as_u64().unwrap() > 1000,
        "late joiner was not served: {report}"
    );
    assert_same(&img, &o1);
    assert_same(&img, &o2);
}

#[test]
fn receives_onto_a_block_device_over_old_data() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("g", 1, "200mbit", &[]);
    let img = make_image(&lab, 12, 7);
    // A "disk" full of old data: zero blocks of the image must be written
    // as zeros, not skipped as on a fresh sparse file.
    let dev = LoopDev::new(&lab.file("disk"), 16, 0xAA);
    let rx = receiver(&lab, 1, &dev.path, &[]);
    let tx = sender(&lab, &img, "100M", 1, &[]);
    let sent = finish(tx, Duration::from_secs(60));
    let r = finish(rx, Duration::from_secs(30));
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stdout)
    );
    assert_eq!(last_json(&r)["verified"], true);
    let want = fs::read(&img).unwrap();
    let mut got = vec![0u8; want.len()];
    {
        use std::io::Read;
        let mut f = fs::File::open(&dev.path).unwrap();
        f.read_exact(&mut got).unwrap();
    }
    assert!(got == want, "device content differs from the image");
    // A device's resume state lives in /run/rackcast, never in /dev, and
    // is removed after success.
    let name = dev.path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!PathBuf::from(format!("{}.rcresume", dev.path.display())).exists());
    assert!(!Path::new("/run/rackcast")
        .join(format!("{name}.rcresume"))
        .exists());
}

#[test]
fn early_receiver_outlasts_its_idle_timeout_while_the_wave_waits() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("h", 2, "200mbit", &[]);
    let img = make_image(&lab, 4, 8);
    let (o1, o2) = (lab.file("out1"), lab.file("out2"));
    // d1 gives up after 2 s without a valid packet; the wave waits ~4 s for
    // d2. Keep-alive probes must hold d1 until the wave starts.
    let early = receiver(&lab, 1, &o1, &["--idle-timeout", "2"]);
    let tx = sender(&lab, &img, "100M", 2, &[]);
    std::thread::sleep(Duration::from_secs(4));
    let late = receiver(&lab, 2, &o2, &[]);
    let r1 = finish(early, Duration::from_secs(30));
    let r2 = finish(late, Duration::from_secs(30));
    let sent = finish(tx, Duration::from_secs(30));
    assert_eq!(last_json(&r1)["verified"], true, "{}", last_json(&r1));
    assert_eq!(last_json(&r2)["verified"], true);
    assert!(sent.status.success());
    assert_same(&img, &o1);
}

/// A real Prometheus server scrapes the sender's exporter during a wave;
/// its query API then has the wave's counters.
#[test]
fn real_prometheus_scrapes_the_sender() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("p", 1, "100mbit", &[]);
    let img = make_image(&lab, 12, 9);
    let Some(prom) = Prometheus::start(
        &lab,
        "app",
        "198.18.0.1:9090",
        "198.18.0.1:9464",
        "/metrics",
    ) else {
        return;
    };
    let out = lab.file("out1");
    let rx = receiver(&lab, 1, &out, &[]);
    // ~3.5 s at 30 Mbit/s: several scrapes while the wave runs.
    let tx = sender(&lab, &img, "30M", 1, &["--metrics", "198.18.0.1:9464"]);
    let sent = finish(tx, Duration::from_secs(60));
    let r = finish(rx, Duration::from_secs(30));
    assert!(sent.status.success());
    assert_eq!(last_json(&r)["verified"], true);
    let packets = prom.query("max_over_time(rackcast_packets_sent_total[5m])");
    let progress = prom.query("max_over_time(rackcast_receiver_progress_ratio[5m])");
    drop(prom);
    assert!(
        packets.is_some_and(|p| p > 1000.0),
        "scraped packets counter: {packets:?}"
    );
    assert!(
        progress.is_some_and(|p| p > 0.0),
        "scraped receiver progress: {progress:?}"
    );
}

#[test]
fn forged_packets_are_counted_and_ignored() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("c", 2, "100mbit", &[]);
    let img = make_image(&lab, 16, 3);
    let out = lab.file("out1");
    let rx = receiver(&lab, 1, &out, &[]);
    let tx = sender(&lab, &img, "30M", 1, &[]);
    // A second host on the segment learns the session id from the wire and
    // floods forged symbols (wrong key) and truncated datagrams.
    let mut f = lab.cmd("d2", &bin("rc-forge"));
    f.args([
        "--group",
        "239.255.7.1:9000",
        "--sniff",
        "--count",
        "3000",
        "--seconds",
        "15",
    ]);
    let forged = finish(f.spawn().unwrap(), Duration::from_secs(30));
    assert!(
        forged.status.success(),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    let r = finish(rx, Duration::from_secs(60));
    let sent = finish(tx, Duration::from_secs(30));
    let rep = last_json(&r);
    assert_eq!(rep["verified"], true, "{rep}");
    assert!(rep["auth_failures"].as_u64().unwrap() >= 1000, "{rep}");
    assert!(rep["malformed"].as_u64().unwrap() >= 100, "{rep}");
    assert!(sent.status.success());
    assert_same(&img, &out);
}

#[test]
fn corrupt_image_source_is_never_reported_good() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("d", 1, "100mbit", &[]);
    let img = make_image(&lab, 8, 4);
    // Flip a byte in block 3 behind the manifest's back (same size, same
    // mtime): only the per-block check at read time can catch it.
    let mtime = fs::metadata(&img).unwrap().modified().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 3 * 1048576 + 17).unwrap();
        b[0] ^= 0xff;
        f.write_all_at(&b, 3 * 1048576 + 17).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let out = lab.file("out1");
    let rx = receiver(&lab, 1, &out, &[]);
    let tx = sender(&lab, &img, "50M", 1, &[]);
    let sent = finish(tx, Duration::from_secs(60));
    let r = finish(rx, Duration::from_secs(30));
    assert!(
        !sent.status.success(),
        "sender reported success for a corrupt source"
    );
    let rep = last_json(&sent);
    assert!(
        rep["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not match the manifest"),
        "{rep}"
    );
    assert!(!r.status.success());
    let rr = last_json(&r);
    assert_eq!(rr["verified"], false);
    assert!(
        rr["reason"].as_str().unwrap_or("").contains("sender"),
        "{rr}"
    );

    // Truncated source: refused before anything is sent.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(5 * 1048576).unwrap();
    drop(f);
    let tx = sender(&lab, &img, "50M", 1, &[]);
    let sent = finish(tx, Duration::from_secs(30));
    assert!(!sent.status.success());
    let err = String::from_utf8_lossy(&sent.stderr);
    // The manifest records the image's size and mtime: the truncated
    // image is not the one it describes.
    assert!(err.contains("size or mtime changed"), "{err}");
}

#[test]
fn manifest_of_another_image_is_refused() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("e", 1, "100mbit", &[]);
    let img = make_image(&lab, 4, 5);
    let other = lab.file("other");
    fs::copy(&img, &other).unwrap();
    let mut c = lab.cmd("app", &bin("rackcast"));
    c.arg("send")
        .arg(&other)
        .arg("--manifest")
        .arg(format!("{}.rcmanifest", img.display()))
        .args(["--iface", "srv0", "--group", "239.255.7.1:9000"])
        .args([
            "--control",
            "198.18.0.1:7000",
            "--rate",
            "10M",
            "--receivers",
            "1",
        ]);
    let out = finish(c.spawn().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was built for another version"), "{err}");
}

/// One member behind a slow port (a tbf of 20 Mbit on its switch port, on
/// a 100 Mbit wave) and two clean ones: the clean ones do not wait for
/// it (done in about the image's time at the wave's rate), it falls
/// behind, is caught up after them, and all three verify.
#[test]
fn a_slow_member_does_not_hold_the_clean_ones() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("s", 3, "100mbit", &[]);
    lab.slow_port(1, "20mbit");
    let img = make_image(&lab, 16, 3);
    let (sent, rx_out, outs) = wave_to(&lab, &img, 3, "100M");
    let report = last_json(&sent);
    assert!(sent.status.success(), "sender failed: {report}");
    for (o, path) in rx_out.iter().zip(&outs) {
        assert_eq!(last_json(o)["verified"], true, "{}", last_json(o));
        assert_same(&img, path);
    }
    let rxs = report["receivers"].as_array().unwrap();
    let secs = |name_end: &str| {
        let r = rxs
            .iter()
            .find(|r| r["name"].as_str().unwrap_or("").ends_with(name_end))
            .unwrap_or_else(|| panic!("no receiver {name_end} in {report}"));
        (r["seconds"].as_f64().unwrap(), r["fell_behind"] == true)
    };
    let (slow, slow_behind) = secs("@198.18.0.11");
    let clean: Vec<(f64, bool)> = ["@198.18.0.12", "@198.18.0.13"]
        .iter()
        .map(|n| secs(n))
        .collect();
    eprintln!("slow member {slow:.2} s, clean ones {clean:?}");
    assert!(slow_behind, "{report}");
    assert_eq!(report["fell_behind"], 1, "{report}");
    // 16 MiB at 100 Mbit is ~1.4 s; at 20 Mbit ~7 s.
    for (t, behind) in &clean {
        assert!(!behind, "{report}");
        assert!(*t < 4.0, "a clean member took {t:.2} s: {report}");
        assert!(*t * 2.0 < slow, "clean {t:.2} s, slow {slow:.2} s");
    }
}

/// Relays across segments (no multicast routing between them): a central
/// `rackcast send` to four devices on its segment and one relay on the
/// other; the relay takes the wave by unicast and re-multicasts it to
/// four devices there, block by block. The image travels compressed
/// (frames kept and forwarded as they came, never recompressed), with
/// zero blocks; 2 % loss on the way to the relay is repaired by the
/// central sender, 3 % toward one device behind the relay by the relay
/// alone. Every device ends byte-exact; the central wave sees one member
/// from the far segment (the relay); the relay's wave ends shortly after
/// its own copy verified, not a whole wave later.
/// The relay lab: 4 devices on the central segment, a relay and 4 on
/// the second; a compressible 40 MiB image with zero blocks, its
/// manifest and blocks file. Returns the image, its manifest and frames,
/// and the relay's cache directory.
fn relay_lab(lab: &Lab) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    lab.segment(4);
    let img = lab.file("image");
    let st = std::process::Command::new(bin("rc-mkimage"))
        .arg(&img)
        .args(["--mib", "40", "--zero-every", "5", "--tail", "777"])
        .args(["--compressible", "--seed", "21"])
        .status()
        .unwrap();
    assert!(st.success());
    let frames = lab.file("image.rcblocks");
    let st = std::process::Command::new(bin("rackcast"))
        .arg("manifest")
        .arg(&img)
        .args(["--zstd", "3", "--frames"])
        .arg(&frames)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    (
        img,
        lab.file("image.rcmanifest"),
        frames,
        lab.file("relay-cache"),
    )
}

/// `rackcast relay` on x-rly: upstream the central sender, its own wave
/// to the 4 devices of the second segment at `rate`.
fn start_relay(lab: &Lab, cache: &Path, rate: &str) -> Child {
    let mut relay = lab.cmd("x-rly", &bin("rackcast"));
    relay
        .arg("relay")
        .args(["--upstream", "198.18.0.1:7000", "--name", "relay-b"])
        .arg("--cache")
        .arg(cache)
        .args(["--iface", "r0", "--group", "239.255.8.1:9000"])
        .args(["--control", "198.18.2.1:7001", "--rate", rate])
        .args(["--receivers", "4", "--start-timeout", "30", "--json"]);
    relay.spawn().expect("spawn relay")
}

/// Receivers on the second segment, from the relay, writing `outs`.
fn far_receivers(lab: &Lab, outs: &[PathBuf]) -> Vec<Child> {
    outs.iter()
        .enumerate()
        .map(|(i, out)| {
            let mut c = lab.cmd(&format!("x-e{}", i + 1), &bin("rackcast-agent"));
            c.arg("receive")
                .args(["--server", "198.18.2.1:7001", "--iface", "e0", "--json"])
                .args(["--connect-timeout", "20", "--idle-timeout", "20"])
                .arg("--out")
                .arg(out);
            c.spawn().expect("spawn receiver")
        })
        .collect()
}

#[test]
fn a_relay_carries_a_wave_to_a_segment_without_multicast_routing() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("rl", 4, "1gbit", &[]);
    let (img, manifest, frames, cache) = relay_lab(&lab);
    lab.port_loss("sw", "vx-rt", 2.0);
    lab.port_loss("x-sw2", "ve1", 3.0);
    let relay = start_relay(&lab, &cache, "100M");
    let outs_a: Vec<PathBuf> = (1..=4).map(|i| lab.file(&format!("a{i}"))).collect();
    let outs_b: Vec<PathBuf> = (1..=4).map(|i| lab.file(&format!("b{i}"))).collect();
    let rx_a: Vec<Child> = (1..=4)
        .map(|i| receiver(&lab, i, &outs_a[i - 1], &[]))
        .collect();
    let rx_b = far_receivers(&lab, &outs_b);
    let frames_arg = frames.display().to_string();
    let tx = sender_with(&lab, &img, &manifest, "100M", 5, &["--frames", &frames_arg]);
    let sent = finish(tx, Duration::from_secs(120));
    let relayed = finish(relay, Duration::from_secs(60));
    let central = last_json(&sent);
    assert!(sent.status.success(), "central wave: {central}");
    let members: Vec<&str> = central["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 5, "{central}");
    assert!(members.contains(&"relay-b"), "{members:?}");
    assert!(
        !members.iter().any(|m| m.contains("198.18.2.")),
        "a far-segment device reached the central wave: {members:?}"
    );
    let report = last_json(&relayed);
    assert!(
        relayed.status.success(),
        "relay: {report}\n{}",
        String::from_utf8_lossy(&relayed.stderr)
    );
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["upstream"]["verified"], true, "{report}");
    let local = &report["local"];
    assert_eq!(local["receivers"].as_array().unwrap().len(), 4, "{report}");
    // The relay repaired its own segment's loss.
    assert!(local["repair_packets"].as_u64().unwrap() > 0, "{report}");
    // The upstream's repair reached the relay through the lossy router
    // port: its copy saw fewer packets than were sent and still verified.
    let sent_packets = ["source_packets", "repair_packets", "probe_packets"]
        .iter()
        .map(|k| central[*k].as_u64().unwrap())
        .sum::<u64>();
    let got = report["upstream"]["packets"].as_u64().unwrap();
    assert!(got < sent_packets, "{got} of {sent_packets}");
    // Pipelined: the local wave ended well within its own length after
    // the relay's copy verified (waiting for the whole image first would
    // take the whole local wave again).
    let tail = report["tail_seconds"].as_f64().unwrap();
    let whole = local["seconds"].as_f64().unwrap();
    assert!(
        tail < whole * 0.5,
        "tail {tail} s of a {whole} s local wave"
    );
    for c in rx_a.into_iter().chain(rx_b) {
        let o = finish(c, Duration::from_secs(30));
        assert!(
            o.status.success(),
            "receiver: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(last_json(&o)["verified"], true);
    }
    for out in outs_a.iter().chain(&outs_b) {
        assert_same(&img, out);
    }
    assert_same(&img, &cache.join("image"));
}

/// The central wave dies mid-image (its sender killed): the relay's copy
/// cannot be finished, so its own wave ends with that reason instead of
/// waiting or sending what it does not have; the relay exits non-zero,
/// every device behind it ends unverified, and no copy (the relay's
/// included) is the image.
#[test]
fn a_relay_whose_upstream_dies_fails_its_segment_closed() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("rf", 4, "1gbit", &[]);
    let (img, manifest, frames, cache) = relay_lab(&lab);
    let relay = start_relay(&lab, &cache, "100M");
    let outs_b: Vec<PathBuf> = (1..=4).map(|i| lab.file(&format!("b{i}"))).collect();
    let rx_b = far_receivers(&lab, &outs_b);
    let frames_arg = frames.display().to_string();
    // Only the relay upstream, at a rate that leaves time to kill it.
    let mut tx = sender_with(&lab, &img, &manifest, "20M", 1, &["--frames", &frames_arg]);
    // Until every device behind the relay has joined its wave (made its
    // output), then some way into the image (~12 MB on the wire at
    // 20 Mbit/s: about 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !outs_b.iter().all(|o| o.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay's wave never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2000));
    let _ = tx.kill();
    let _ = tx.wait();
    let relayed = finish(relay, Duration::from_secs(60));
    assert!(!relayed.status.success(), "the relay reported success");
    let report = last_json(&relayed);
    assert_eq!(report["ok"], false, "{report}");
    let why = report["error"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("upstream"), "{report}");
    for c in rx_b {
        let o = finish(c, Duration::from_secs(60));
        assert!(
            !o.status.success(),
            "a device behind the relay exited 0: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let want = fs::read(&img).unwrap();
    for out in outs_b.iter().chain([&cache.join("image")]) {
        assert_ne!(fs::read(out).unwrap_or_default(), want, "{}", out.display());
    }
}
