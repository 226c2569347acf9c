//! Compressed images end to end over real sockets in network namespaces:
//! images added from `.zst` and qcow2 sources travel as zstd frames and
//! verify at three receivers (one lossy); a frame the sender vouches for
//! that decompresses to the wrong bytes, or past its block (a zip bomb),
//! ends the receiver with a clear error and is never written; delta
//! re-imaging sends only the blocks a device lacks; an image far larger
//! than a memory limit put on sender and receivers ends verified; an http
//! source resumes after a killed download and is checked.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::wave::*;
use common::*;
use rackcast_core::image::manifest::Wire;
use rackcast_core::image::packed::{self, PackOptions};

/// A compressible test image (lines of words, every 5th MiB zero).
fn text_image(path: &Path, mib: u64, seed: u64) {
    let st = Command::new(bin("rc-mkimage"))
        .arg(path)
        .args(["--mib", &mib.to_string(), "--zero-every", "5"])
        .args(["--tail", "1234", "--compressible"])
        .args(["--seed", &seed.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Send `img` (manifest and frames given) to receivers d1..=dn; returns
/// the sender's report and each receiver's.
fn wave(
    lab: &Lab,
    img: &Path,
    manifest: &Path,
    frames: Option<&Path>,
    outs: &[PathBuf],
    rx_extra: &[&str],
) -> (serde_json::Value, Vec<Output>) {
    let rx: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| receiver(lab, i + 1, o, rx_extra))
        .collect();
    let frames_arg: Vec<String> = frames
        .map(|f| vec!["--frames".to_string(), f.display().to_string()])
        .unwrap_or_default();
    let extra: Vec<&str> = frames_arg.iter().map(String::as_str).collect();
    let tx = sender_with(lab, img, manifest, "200M", outs.len(), &extra);
    let sent = finish(tx, Duration::from_secs(120));
    let rx_out: Vec<Output> = rx
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(30)))
        .collect();
    (last_json(&sent), rx_out)
}

#[test]
fn zst_and_qcow2_images_are_added_then_travel_compressed_to_three_receivers() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("z", 3, "200mbit", &[(3, 5.0)]);
    let state = lab.file("state");
    let config = lab.file("rackcast.toml");
    ApplianceConfig::new(&state, &bin("rackcast-agent"), "200M", "239.255.63.1")
        .section("[[profiles]]\nname = \"any\"\nimage = \"zst\"\ntarget = { order = \"largest\", count = 1 }\n")
        .write(&config);
    let store_manifests = state.join("manifests");

    // Two different images: one arrives as .zst (zstd CLI, checksummed),
    // one as qcow2 (qemu-img).
    let raw_zst = lab.file("a.img");
    text_image(&raw_zst, 16, 1);
    let zst = lab.file("a.img.zst");
    let st = Command::new("zstd")
        .args(["-q", "-3", "--check", "-o"])
        .arg(&zst)
        .arg(&raw_zst)
        .status()
        .unwrap();
    assert!(st.success());
    let raw_q = lab.file("b.img");
    text_image(&raw_q, 16, 2);
    let qcow = lab.file("b.qcow2");
    qcow2_of(&raw_q, &qcow);

    for (name, source, raw) in [("zst", &zst, &raw_zst), ("qcow", &qcow, &raw_q)] {
        let text = ok(&cli(
            &config,
            &["images", "add", name, source.to_str().unwrap()],
        ));
        assert!(text.contains(" bytes blake3 "), "{text}");
        let out = cli(&config, &["images", "list", "--json"]);
        ok(&out);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let rec = list.iter().find(|r| r["name"] == name).expect("image row");
        let stored = PathBuf::from(rec["path"].as_str().unwrap());
        // Prepared files are named by the image's hash, not by its name.
        let hash = rec["hash"].as_str().unwrap();
        let manifest = store_manifests.join(format!("{hash}.rcmanifest"));
        let frames = store_manifests.join(format!("{hash}.zstd6.rcblocks"));
        let m = rackcast_core::image::manifest::Manifest::load_for(&stored, &manifest).unwrap();
        assert!(m.compressed_blocks() > 0, "{name}: nothing compressed");
        assert!(
            m.data_bytes() * 2 < m.nonzero_bytes(),
            "{name}: {} wire bytes for {} image bytes",
            m.data_bytes(),
            m.nonzero_bytes()
        );

        let outs: Vec<PathBuf> = (1..=3)
            .map(|i| lab.file(&format!("{name}-out{i}")))
            .collect();
        let (report, rx) = wave(&lab, &stored, &manifest, Some(&frames), &outs, &[]);
        assert_eq!(report["ok"], true, "{name}: {report}");
        // Less went on the wire than the image's non-zero bytes, though
        // the lossy receiver needed repair.
        let wire = report["wire_bytes"].as_u64().unwrap();
        assert!(wire < m.nonzero_bytes(), "{name}: {wire} wire bytes");
        assert!(report["repair_packets"].as_u64().unwrap() > 0, "{report}");
        // qemu-img rounds a qcow2's size up to whole sectors: the stored
        // raw image is the source plus those zeros.
        let want = fs::read(raw).unwrap();
        let stored_bytes = fs::read(&stored).unwrap();
        assert_eq!(stored_bytes[..want.len()], want[..], "{name}");
        assert!(stored_bytes[want.len()..].iter().all(|b| *b == 0));
        for (o, path) in rx.iter().zip(&outs) {
            let r = last_json(o);
            assert_eq!(r["verified"], true, "{name}: {r}");
            assert_same(&stored, path);
        }
    }
}

/// Writes a manifest whose block `forged` travels as `frame` (with the
/// frame's true digest, so the sender's check passes) while the block's
/// own digest stays the image's: what a broken or hostile image store
/// would serve.
fn forge(img: &Path, dir: &Path, forged: u32, frame: &[u8]) -> (PathBuf, PathBuf) {
    let data = fs::read(img).unwrap();
    let mut frames = Vec::new();
    let mut m = packed::pack(
        &data[..],
        data.len() as u64,
        1 << 20,
        rackcast_core::wire::packet::symbol_size_for_mtu(1500).unwrap(),
        PackOptions {
            level: Some(3),
            threads: 2,
        },
        &mut frames,
        &mut |_| {},
    )
    .unwrap();
    // Rebuild the frames file with the forged frame in its place.
    let mut out = Vec::new();
    let mut at = 0usize;
    for (b, info) in m.blocks.iter_mut().enumerate() {
        if let Wire::Zstd { len, .. } = info.wire {
            let own = &frames[at..at + len as usize];
            at += len as usize;
            if b as u32 == forged {
                info.wire = Wire::Zstd {
                    len: frame.len() as u32,
                    digest: *blake3::hash(frame).as_bytes(),
                };
                out.extend_from_slice(frame);
            } else {
                out.extend_from_slice(own);
            }
        }
    }
    assert!(
        matches!(m.blocks[forged as usize].wire, Wire::Zstd { .. }),
        "block {forged} must travel compressed"
    );
    m.validate().unwrap();
    let mpath = dir.join(format!("forged{forged}.rcmanifest"));
    let fpath = dir.join(format!("forged{forged}.rcblocks"));
    m.save(img, &mpath).unwrap();
    fs::write(&fpath, out).unwrap();
    (mpath, fpath)
}

#[test]
fn forged_frames_and_zip_bombs_end_in_clear_errors_and_are_never_written() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("f", 1, "200mbit", &[]);
    let img = lab.file("img");
    text_image(&img, 6, 3);
    let data = fs::read(&img).unwrap();
    let block = 1u32;
    let span = (block as usize) << 20..(block as usize + 1) << 20;

    // A valid frame of other bytes: passes the frame digest, fails the
    // block's digest after decompression.
    let mut other = data[span.clone()].to_vec();
    other[100] ^= 0x20;
    let wrong = zstd::bulk::compress(&other, 3).unwrap();
    // A frame that expands to 64 MiB: a zip bomb in a 1 MiB block.
    let bomb = zstd::bulk::compress(&vec![b'x'; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 1 << 20);

    for (frame, expect) in [
        (&wrong, "fail the block's digest"),
        (&bomb, "compressed frame is bad"),
    ] {
        let (m, f) = forge(&img, &lab.dir, block, frame);
        let out = lab.file("out");
        let _ = fs::remove_file(&out);
        let (report, rx) = wave(&lab, &img, &m, Some(&f), std::slice::from_ref(&out), &[]);
        assert_eq!(report["ok"], false, "{report}");
        let r = last_json(&rx[0]);
        assert_eq!(r["verified"], false, "{r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(reason.contains(expect), "{reason}");
        assert!(reason.contains(&format!("block {block}")), "{reason}");
        // Never written: the forged block's range holds no byte of it (the
        // output is a fresh sparse file, so it reads as zeros).
        let got = fs::read(&out).unwrap();
        assert!(
            got[span.clone()].iter().all(|b| *b == 0),
            "forged block was written"
        );
    }
}

#[test]
fn delta_reimaging_sends_only_the_changed_blocks() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("r", 2, "200mbit", &[]);
    // Version 1 of a 120 MiB image; version 2 changes 8 of its blocks,
    // half in the part a receiver scans before it says Ready, half in
    // the part it scans alongside the wave.
    let v1 = lab.file("v1");
    text_image(&v1, 120, 4);
    let v2 = lab.file("image");
    let mut data = fs::read(&v1).unwrap();
    for b in [2usize, 11, 23, 37, 70, 88, 101, 118] {
        data[(b << 20) + 999] ^= 0x55;
    }
    fs::write(&v2, &data).unwrap();
    let st = Command::new(bin("rackcast"))
        .arg("manifest")
        .arg(&v2)
        .args(["--zstd", "3", "--frames"])
        .arg(lab.file("image.rcblocks"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let manifest = lab.file("image.rcmanifest");
    let frames = lab.file("image.rcblocks");
    let outs = [lab.file("out1"), lab.file("out2")];

    // A full wave of version 2 to two fresh devices.
    let t = Instant::now();
    let (full, rx) = wave(&lab, &v2, &manifest, Some(&frames), &outs, &["--delta"]);
    let full_s = t.elapsed().as_secs_f64();
    assert_eq!(full["ok"], true, "{full}");
    for o in &rx {
        assert_eq!(last_json(o)["resumed_data_blocks"], 0);
    }
    // The same devices now hold version 1 (an earlier install).
    for o in &outs {
        fs::copy(&v1, o).unwrap();
    }
    let t = Instant::now();
    let (delta, rx) = wave(&lab, &v2, &manifest, Some(&frames), &outs, &["--delta"]);
    let delta_s = t.elapsed().as_secs_f64();
    assert_eq!(delta["ok"], true, "{delta}");
    for (o, path) in rx.iter().zip(&outs) {
        let r = last_json(o);
        assert_eq!(r["verified"], true, "{r}");
        // 121 blocks (120 MiB and a tail), 24 zero: of the 97 data
        // blocks, the 89 unchanged ones were found in place: 48 in the
        // first 64 MiB, scanned before Ready, and 41 past it, by the scan
        // alongside the wave.
        assert_eq!(r["resumed_data_blocks"], 89, "{r}");
        assert_same(&v2, path);
    }
    let n = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap();
    let (fw, dw) = (n(&full, "wire_bytes"), n(&delta, "wire_bytes"));
    let (fs_, ds) = (n(&full, "source_packets"), n(&delta, "source_packets"));
    eprintln!(
        "delta re-imaging: full wave {fw} wire bytes ({fs_} source packets) in {full_s:.2} s, delta wave {dw} wire bytes ({ds} source packets) in {delta_s:.2} s ({:.1} % of the bytes)",
        dw as f64 * 100.0 / fw as f64
    );
    // 8 of 97 data blocks changed: the source pass sends about a twelfth
    // of a full wave's symbols, never more than a fifth. (Repair on top
    // depends on what a loaded test machine drops, so it is not counted.)
    assert!(ds * 5 < fs_, "delta {ds} vs full {fs_} source packets");
}

/// A memory cgroup (v1, as this kernel mounts it; v2 where it is the
/// only hierarchy) holding the processes started through it; removed on
/// drop.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new(name: &str, limit: u64) -> Option<MemCgroup> {
        let (base, v2) = if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            (PathBuf::from("/sys/fs/cgroup/memory"), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else {
            return None;
        };
        let dir = base.join(name);
        fs::create_dir_all(&dir).ok()?;
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        fs::write(dir.join(file), limit.to_string()).ok()?;
        Some(MemCgroup { dir, v2 })
    }

    /// `c` run inside the group, its peak resident set written to
    /// `rss_to` (KiB, by `/usr/bin/time`).
    fn wrap(&self, c: Command, rss_to: &Path) -> Command {
        let mut w = Command::new("sh");
        w.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .args(["/usr/bin/time", "-f", "%M", "-o"])
            .arg(rss_to)
            .arg(c.get_program())
            .args(c.get_args());
        w.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        w
    }

    fn peak(&self) -> u64 {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        fs::read_to_string(self.dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn oom_kills(&self) -> u64 {
        let (f, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        fs::read_to_string(self.dir.join(f))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Processes are gone by now; an empty group can be removed.
        let _ = fs::remove_dir(&self.dir);
    }
}

#[test]
fn an_image_larger_than_the_memory_limit_ends_verified() {
    if !can_run() {
        return;
    }
    const LIMIT: u64 = 512 << 20;
    let lab = Lab::up("m", 1, "500mbit", &[]);
    // 6 GiB, sparse: one random MiB every 8 (768 MiB of data, more than
    // the limit), zeros between. Built in place, never in memory.
    let img = lab.file("big");
    {
        use rand::{RngCore, SeedableRng};
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&img).unwrap();
        f.set_len(6 << 30).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut buf = vec![0u8; 1 << 20];
        for mib in (0..6 << 10).step_by(8) {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, (mib as u64) << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    let st = Command::new(bin("rackcast"))
        .arg("manifest")
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let Some(cg) = MemCgroup::new(&format!("{}mem", lab.prefix), LIMIT) else {
        skip("no memory cgroup controller");
        return;
    };
    let out = lab.file("big-out");
    let (rx_rss, tx_rss) = (lab.file("rx.rss"), lab.file("tx.rss"));
    let rx = cg
        .wrap(receiver_cmd(&lab, 1, &out, &[]), &rx_rss)
        .spawn()
        .unwrap();
    let tx = cg
        .wrap(
            sender_cmd(
                &lab,
                &img,
                &PathBuf::from(format!("{}.rcmanifest", img.display())),
                "500M",
                1,
                &[],
            ),
            &tx_rss,
        )
        .spawn()
        .unwrap();
    let sent = finish(tx, Duration::from_secs(240));
    let r = finish(rx, Duration::from_secs(60));
    let report = last_json(&sent);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(last_json(&r)["verified"], true);
    assert_eq!(cg.oom_kills(), 0, "a process was killed for memory");
    let rss = |p: &Path| -> u64 {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().lines().last()?.trim().parse::<u64>().ok())
            .map_or(0, |kib| kib << 10)
    };
    let (rx_peak, tx_peak) = (rss(&rx_rss), rss(&tx_rss));
    eprintln!(
        "6 GiB image under a {LIMIT}-byte limit: receiver peak RSS {rx_peak}, sender {tx_peak}, group peak {} (page cache included)",
        cg.peak()
    );
    // Each process's own memory stays a fraction of the limit, whatever
    // the image size (the page cache is the kernel's and is reclaimed).
    assert!(
        rx_peak > 0 && rx_peak < 256 << 20,
        "receiver peak RSS {rx_peak}"
    );
    assert!(
        tx_peak > 0 && tx_peak < 256 << 20,
        "sender peak RSS {tx_peak}"
    );
    // The copy is the image: compare by hash, streaming (not in memory).
    let hash = |p: &Path| {
        let mut h = blake3::Hasher::new();
        h.update_reader(fs::File::open(p).unwrap()).unwrap();
        h.finalize()
    };
    assert_eq!(hash(&img), hash(&out));
}

/// busybox httpd (ETag, Range) in a lab namespace; killed on drop.
struct HttpServer(std::process::Child);

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn store_leftovers(store: &Path) -> Vec<String> {
    fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn http_sources_resume_after_a_killed_download_and_are_checked() {
    if !can_run() {
        return;
    }
    // 20 Mbit/s out of the appliance namespace, where the server runs:
    // slow enough to kill a download half way.
    let lab = Lab::up("h", 1, "20mbit", &[]);
    let www = lab.file("www");
    fs::create_dir_all(&www).unwrap();
    let raw = lab.file("os.img");
    text_image(&raw, 24, 5);
    let st = Command::new("zstd")
        .args(["-q", "-3", "--check", "-o"])
        .arg(www.join("os.img.zst"))
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let mut httpd = lab.cmd("app", Path::new("busybox"));
    httpd
        .args(["httpd", "-f", "-p", "198.18.0.1:8089", "-h"])
        .arg(&www);
    let _server = HttpServer(httpd.spawn().unwrap());
    let state = lab.file("state");
    let config = lab.file("rackcast.toml");
    ApplianceConfig::new(&state, &bin("rackcast-agent"), "20M", "239.255.64.1")
        .section("[[profiles]]\nname = \"any\"\nimage = \"os\"\ntarget = { order = \"largest\", count = 1 }\n")
        .write(&config);
    let store = state.join("images");
    let add = |name: &str, url: &str, extra: &[&str]| {
        let mut c = lab.cmd("d1", &bin("rackcast"));
        c.args(["images", "add", name, url])
            .args(extra)
            .arg("--config")
            .arg(&config);
        c
    };
    let url = "http://198.18.0.1:8089/os.img.zst";

    // Kill the first download once part of it is on the disk.
    let mut first = add("os", url, &[]).spawn().unwrap();
    let (part, _) = rackcast::download::partial_paths(&store, url);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::metadata(&part).map_or(0, |m| m.len()) < 1 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = first.kill();
    let _ = first.wait();
    let had = fs::metadata(&part).map_or(0, |m| m.len());
    let whole = fs::metadata(www.join("os.img.zst")).unwrap().len();
    assert!(
        had >= 1 << 20 && had < whole,
        "{had} of {whole} bytes before the kill"
    );

    // The next run resumes and ends with the right image, nothing left over.
    let out = finish(
        add("os", url, &[]).spawn().unwrap(),
        Duration::from_secs(60),
    );
    let text = ok(&out);
    assert!(text.contains("resumed the download at"), "{text}");
    let want = blake3::hash(&fs::read(&raw).unwrap()).to_hex().to_string();
    assert!(text.contains(&want), "{text}");
    assert!(store.join(format!("{want}.img")).exists());
    assert!(
        store_leftovers(&store).is_empty(),
        "{:?}",
        store_leftovers(&store)
    );

    // A download that is not what the operator named is refused and removed.
    let out = finish(
        add("bad", url, &["--blake3", &"0".repeat(64)])
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected 0000"), "{err}");
    assert!(
        store_leftovers(&store).is_empty(),
        "{:?}",
        store_leftovers(&store)
    );
    // So is a missing file, with the server's answer.
    let out = finish(
        add("gone", "http://198.18.0.1:8089/nothing.zst", &[])
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered 404"), "{err}");
    let out = cli(&config, &["images", "list", "--json"]);
    let names: Vec<String> = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["os"]);
}
