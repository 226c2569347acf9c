//! Helpers for data-plane tests: a `rackcast send` in the lab's `app`
//! namespace, `rackcast-agent receive` on device `dK`, byte-exact output
//! checks and loop devices standing in for disks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::{bin, Lab};

/// `rackcast send IMG` with the manifest `rackcast manifest` wrote beside it.
pub fn sender(lab: &Lab, img: &Path, rate: &str, receivers: usize, extra: &[&str]) -> Child {
    let manifest = PathBuf::from(format!("{}.rcmanifest", img.display()));
    sender_with(lab, img, &manifest, rate, receivers, extra)
}

/// `rackcast send IMG --manifest MANIFEST` (add `--frames` in `extra`).
pub fn sender_with(
    lab: &Lab,
    img: &Path,
    manifest: &Path,
    rate: &str,
    receivers: usize,
    extra: &[&str],
) -> Child {
    sender_cmd(lab, img, manifest, rate, receivers, extra)
        .spawn()
        .expect("spawn sender")
}

/// The command [`sender_with`] runs.
pub fn sender_cmd(
    lab: &Lab,
    img: &Path,
    manifest: &Path,
    rate: &str,
    receivers: usize,
    extra: &[&str],
) -> Command {
    let mut c = lab.cmd("app", &bin("rackcast"));
    c.arg("send")
        .arg(img)
        .arg("--manifest")
        .arg(manifest)
        .args(["--iface", "srv0", "--group", "239.255.7.1:9000"])
        .args(["--control", "198.18.0.1:7000", "--rate", rate])
        .args(["--receivers", &receivers.to_string(), "--json"])
        .args(["--start-timeout", "30"])
        .args(extra);
    c
}

/// `rackcast-agent receive --out OUT` on device `dDEV`.
pub fn receiver(lab: &Lab, dev: usize, out: &Path, extra: &[&str]) -> Child {
    receiver_cmd(lab, dev, out, extra)
        .spawn()
        .expect("spawn receiver")
}

/// The command [`receiver`] runs.
pub fn receiver_cmd(lab: &Lab, dev: usize, out: &Path, extra: &[&str]) -> Command {
    let mut c = lab.cmd(&format!("d{dev}"), &bin("rackcast-agent"));
    c.arg("receive")
        .args(["--server", "198.18.0.1:7000", "--iface", "d0", "--json"])
        .args(["--connect-timeout", "20"])
        .args(if extra.contains(&"--idle-timeout") {
            &[][..]
        } else {
            &["--idle-timeout", "20"][..]
        })
        .arg("--out")
        .arg(out)
        .args(extra);
    c
}

pub fn assert_same(a: &Path, b: &Path) {
    let x = fs::read(a).unwrap();
    let y = fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: length",
        a.display(),
        b.display()
    );
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

/// A loop device standing in for a disk; detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    pub fn new(backing: &Path, mib: u64, fill: u8) -> LoopDev {
        fs::write(backing, vec![fill; (mib << 20) as usize]).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
