//! The appliance alone (no simulated rack): one `rackcast serve` in a
//! netns lab with the boot services a test configures, for the boot
//! service tests (`boot.rs`) and the attacks on them (`security.rs`).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Every machine: the image onto its largest disk.
pub const ANY_PROFILE: &str =
    "[[profiles]]\nname = \"any\"\nimage = \"img\"\ntarget = { order = \"largest\", count = 1 }\n";

pub struct Appliance {
    pub lab: Lab,
    pub config: PathBuf,
    pub serve: Option<Child>,
    /// The log line that says the service under test is up.
    pub ready: String,
}

/// What an appliance installs: the agent binary its bundles carry, the
/// image's bytes, the profiles (TOML), and the machines its rack inventory
/// lists, `(mac, serial)`.
pub struct Install<'a> {
    pub agent: &'a std::path::Path,
    pub image: &'a [u8],
    pub profile: &'a str,
    pub known: &'a [(&'a str, &'a str)],
}

impl Appliance {
    /// Full-mode DHCP with pool `198.18.0.a..=198.18.0.b`.
    pub fn new(tag: &str, n: usize, pool: (u8, u8)) -> Appliance {
        let boot = format!(
            "[boot.dhcp]\nmode = \"full\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n\
             pool_start = \"198.18.0.{}\"\npool_end = \"198.18.0.{}\"\n\
             netmask = \"255.255.255.0\"\nlease_time = \"10m\"\n",
            pool.0, pool.1
        );
        Appliance::with_boot(tag, n, &boot, "DHCP service listening")
    }

    /// An appliance whose config ends with `boot` (its `[boot.*]`
    /// sections); started and waited for until its log shows `ready`.
    pub fn with_boot(tag: &str, n: usize, boot: &str, ready: &str) -> Appliance {
        Appliance::with_parts(
            tag,
            n,
            boot,
            ready,
            Install {
                agent: &bin("rackcast-agent"),
                image: &[7u8; 1 << 20],
                profile: ANY_PROFILE,
                known: &[],
            },
        )
    }

    /// `with_boot` with the bundles' agent binary and the image's bytes
    /// given; `{dir}` in `boot` stands for the lab's file folder.
    pub fn with_parts(tag: &str, n: usize, boot: &str, ready: &str, install: Install) -> Appliance {
        let Install {
            agent,
            image,
            profile,
            known,
        } = install;
        let lab = Lab::up(tag, n, "200mbit", &[]);
        let dir = lab.dir.clone();
        let boot = boot.replace("{dir}", &dir.display().to_string());
        let img = dir.join("img");
        fs::write(&img, image).unwrap();
        let config = dir.join("rackcast.toml");
        ApplianceConfig::new(&dir.join("state"), agent, "100M", "239.255.61.1")
            .known(known)
            .image("img", &img)
            .section(profile)
            .section(boot)
            .write(&config);
        let mut a = Appliance {
            lab,
            config,
            serve: None,
            ready: ready.to_string(),
        };
        a.start();
        a
    }

    pub fn start(&mut self) {
        // A restart appends to the same log: wait for a new ready line.
        let before = self.log().matches(&self.ready).count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.file("serve.log"))
            .unwrap();
        self.serve = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.lab.ns("app")])
                .arg(bin("rackcast"))
                .args(["serve", "--log", "info", "--config"])
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(&self.ready).count() == before {
            assert!(Instant::now() < deadline, "not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.lab.file("serve.log")).unwrap_or_default()
    }

    /// busybox udhcpc in device `i`: one lease, no interface change.
    pub fn udhcpc(&self, i: usize, extra: &[&str]) -> Output {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns(&format!("d{i}"))])
            .args(["busybox", "udhcpc", "-i", "d0", "-n", "-q", "-f"])
            .args(["-t", "3", "-T", "1", "-s", "/bin/true"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, Duration::from_secs(20))
    }

    /// `rackcast ARGS --config ...` in the appliance namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        operator_cli(&self.lab, &self.config, args)
            .output()
            .unwrap()
    }

    pub fn devices(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["devices", "--json"]).stdout).unwrap()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process stopped when the test ends, also on panic.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
