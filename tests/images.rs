//! `rackcast images add` with compressed and qcow2 sources, through the
//! real CLI against a real store: the raw image lands in the image store
//! named by its BLAKE3 and is registered with that hash; a corrupt or
//! truncated source is refused with a clear error and leaves no image
//! (neither a row nor a file). No network: runs as any user.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;

fn images(config: &Path) -> Vec<serde_json::Value> {
    let out = cli(config, &["images", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A 5 MiB image, mostly zeros, with data in three places.
fn raw_image() -> Vec<u8> {
    let mut v = vec![0u8; 5 << 20];
    for (i, b) in v[..300_000].iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8;
    }
    v[(3 << 20) + 17] = 1;
    v[(5 << 20) - 1] = 2;
    v
}

fn zstd_with_checksum(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
    e.include_checksum(true).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn leftovers(store: &Path) -> Vec<String> {
    fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.ends_with(".img"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compressed_and_qcow2_sources_are_added_as_raw_images_and_bad_ones_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("rackcast.toml");
    ApplianceConfig::new(&state, &bin("rackcast-agent"), "100M", "239.255.62.1")
        .section("[[profiles]]\nname = \"any\"\nimage = \"debian\"\ntarget = { order = \"largest\", count = 1 }\n")
        .write(&config);
    let data = raw_image();
    let hash = blake3::hash(&data).to_hex().to_string();
    let store = state.join("images");

    // zstd, as the zstd CLI writes it (content checksums on).
    let zst = dir.path().join("debian.img.zst");
    fs::write(&zst, zstd_with_checksum(&data)).unwrap();
    let out = cli(&config, &["images", "add", "debian", zst.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = images(&config);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "debian");
    assert_eq!(list[0]["hash"], hash.as_str());
    assert_eq!(list[0]["size"], data.len() as u64);
    let stored = store.join(format!("{hash}.img"));
    assert_eq!(list[0]["path"], stored.to_str().unwrap());
    assert_eq!(fs::read(&stored).unwrap(), data);

    // qcow2 through qemu-img (qemu-utils).
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        let raw = dir.path().join("rocky.raw");
        fs::write(&raw, &data[..4 << 20]).unwrap();
        let qcow = dir.path().join("rocky.qcow2");
        qcow2_of(&raw, &qcow);
        let out = cli(&config, &["images", "add", "rocky", qcow.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rocky = images(&config)
            .into_iter()
            .find(|i| i["name"] == "rocky")
            .expect("rocky registered");
        assert_eq!(
            rocky["hash"],
            blake3::hash(&data[..4 << 20]).to_hex().to_string().as_str()
        );
    } else {
        skip("qemu-img missing (qemu-utils)");
    }
    let before = images(&config);

    // The config takes raw images only: a compressed one there stops
    // `serve` before it listens, naming the way to add it.
    let cfg2 = dir.path().join("compressed-in-config.toml");
    ApplianceConfig::new(&state, &bin("rackcast-agent"), "100M", "239.255.62.1")
        .image("debian", &zst)
        .section("[[profiles]]\nname = \"any\"\nimage = \"debian\"\ntarget = { order = \"largest\", count = 1 }\n")
        .write(&cfg2);
    let out = Command::new(bin("rackcast"))
        .args(["serve", "--config"])
        .arg(&cfg2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is a zstd source; add it with `rackcast images add"),
        "{err}"
    );

    // Corrupt and truncated sources: a clear error, no image, no file.
    let good = zstd_with_checksum(&data);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for (what, bytes) in [
        ("corrupt", flipped),
        ("truncated", good[..good.len() / 2].to_vec()),
    ] {
        let src = dir.path().join(format!("{what}.img.zst"));
        fs::write(&src, &bytes).unwrap();
        let out = cli(&config, &["images", "add", what, src.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains("is corrupt or truncated"), "{what}: {err}");
        assert_eq!(images(&config), before, "{what}: the image list changed");
        assert!(
            leftovers(&store).is_empty(),
            "{what}: {:?}",
            leftovers(&store)
        );
    }
}
