//! Shared netns lab helpers for the integration tests: binaries, the
//! namespace lab (`netlab/lab.sh`) torn down on drop, bounded waits.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Binaries of the other workspace members live beside ours.
pub fn bin(name: &str) -> PathBuf {
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_rackcast"));
    let p = ours.parent().expect("target dir").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "netns tests must run as root in CI"
        );
        eprintln!("skipping: network namespace tests need root");
    }
    is_root
}

pub struct Lab {
    pub prefix: String,
    pub n: usize,
    pub dir: PathBuf,
}

impl Lab {
    pub fn up(tag: &str, n: usize, rate: &str, loss: &[(usize, f64)]) -> Lab {
        let prefix = format!("rt{tag}{}-", std::process::id() % 100_000);
        let mut args = vec![
            "up".to_string(),
            prefix.clone(),
            n.to_string(),
            "--rate".into(),
            rate.into(),
        ];
        for (d, pct) in loss {
            args.push("--loss".into());
            args.push(format!("{d}={pct}"));
        }
        let st = Command::new(root().join("netlab/lab.sh"))
            .args(&args)
            .status()
            .expect("lab.sh");
        assert!(st.success(), "lab.sh up failed");
        let dir = std::env::temp_dir().join(format!("{prefix}files"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Lab { prefix, n, dir }
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    pub fn cmd(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(root().join("netlab/lab.sh"))
            .args(["down", &self.prefix, &self.n.to_string()])
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Wait for a child with a deadline; kill it past the deadline.
pub fn finish(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("output"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "process exceeded {within:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

pub fn last_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON line\nstdout:\n{s}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).expect("json")
}

pub fn make_image(lab: &Lab, mib: u64, seed: u64) -> PathBuf {
    let img = lab.file("image");
    let st = Command::new(bin("rc-mkimage"))
        .arg(&img)
        .args([
            "--mib",
            &mib.to_string(),
            "--zero-every",
            "5",
            "--tail",
            "4321",
        ])
        .args(["--seed", &seed.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new(bin("rackcast"))
        .arg("manifest")
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    img
}
