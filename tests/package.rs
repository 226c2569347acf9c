//! The Debian packages as an operator installs them: `cargo deb` builds
//! the appliance's and the agent's `.deb` from this build's binaries,
//! `dpkg -i` installs them on this machine (user, directories and
//! permissions from the maintainer scripts), `systemd-analyze verify`
//! accepts the unit, and the installed `rackcast serve` runs the way the
//! unit starts it: as the package's user with only the unit's
//! capabilities, speaking the sd_notify protocol (ready once every
//! listener is bound, watchdog, reload, stop) to a notify socket.
//! Removal and purge leave the fleet record. Needs root; changes this
//! machine's packages, so it refuses to run where rackcast is installed.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const UNIT: &str = "/usr/lib/systemd/system/rackcast.service";

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Whether this test may install and remove the packages here.
fn ready() -> bool {
    if !can_run() {
        return false;
    }
    let deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !deb {
        skip("cargo-deb is not installed (netlab/ensure-deps.sh test installs it)");
        return false;
    }
    if !Path::new("/usr/bin/systemd-analyze").exists() {
        skip("systemd-analyze is missing (package systemd)");
        return false;
    }
    let ours = ["rackcast", "rackcast-agent"].iter().any(|p| installed(p))
        || Path::new("/var/lib/rackcast").exists()
        || Path::new("/etc/rackcast").exists()
        || Command::new("getent")
            .args(["passwd", "rackcast"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if ours {
        skip("rackcast is installed on this machine (or its user or directories exist); this test installs and purges it");
        return false;
    }
    true
}

/// Purges what the test installed and the state the packages keep on
/// purge (the fleet record and its user), also when the test fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "rackcast", "rackcast-agent"])
            .stdout(Stdio::null())
            .status();
        let _ = fs::remove_dir_all("/var/lib/rackcast");
        let _ = fs::remove_dir_all("/etc/rackcast");
        let _ = Command::new("deluser")
            .args(["--system", "--quiet", "rackcast"])
            .status();
        let _ = Command::new("delgroup")
            .args(["--system", "--quiet", "rackcast"])
            .status();
    }
}

/// Both packages, built by cargo-deb from the binaries the tests run
/// (`--profile dev --no-build`: the layout and scripts are what is
/// tested; a release `.deb` differs only in its binaries' build).
fn build_debs(out: &Path) -> (PathBuf, PathBuf) {
    let target = bin("rackcast")
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .to_path_buf();
    let mut debs = Vec::new();
    for pkg in ["rackcast", "rackcast-agent"] {
        let o = run(Command::new("cargo")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", &target)
            .args(["deb", "-p", pkg, "--profile", "dev", "--no-build", "--fast"])
            .arg("-o")
            .arg(out));
        let path = String::from_utf8_lossy(&o.stdout)
            .lines()
            .rev()
            .find(|l| l.ends_with(".deb"))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("cargo deb -p {pkg} named no .deb"));
        debs.push(path);
    }
    (debs.remove(0), debs.remove(0))
}

fn mode_owner(p: &str) -> (u32, String, String) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let name = |db: &str, id: u32| {
        let o = Command::new("getent")
            .args([db, &id.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split(':')
            .next()
            .unwrap_or("")
            .to_string()
    };
    (
        m.permissions().mode() & 0o7777,
        name("passwd", m.uid()),
        name("group", m.gid()),
    )
}

/// One `Key=value` of the installed unit (the last one, as systemd reads it).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

/// The notify socket's messages, one datagram at a time, until one has
/// `want` (bounded by `within`).
fn await_notify(sock: &UnixDatagram, want: &str, within: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

#[test]
fn debs_install_and_the_packaged_service_runs_as_its_unit_says() {
    if !ready() {
        return;
    }
    let work = tempfile::Builder::new().prefix("rcdeb").tempdir().unwrap();
    let (appliance_deb, agent_deb) = build_debs(work.path());
    let _cleanup = Installed;
    run(Command::new("dpkg")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-i")
        .arg(&agent_deb)
        .arg(&appliance_deb));
    assert!(installed("rackcast") && installed("rackcast-agent"));

    // What the maintainer scripts made: a system user, the state dir
    // ours alone, the config readable by the service's group only.
    let pw = run(Command::new("getent").args(["passwd", "rackcast"]));
    let pw = String::from_utf8_lossy(&pw.stdout).to_string();
    let uid: u32 = pw.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system user: {pw}");
    assert!(
        pw.trim_end()
            .ends_with(":/var/lib/rackcast:/usr/sbin/nologin"),
        "{pw}"
    );
    assert_eq!(
        mode_owner("/var/lib/rackcast"),
        (0o700, "rackcast".into(), "rackcast".into())
    );
    assert_eq!(
        mode_owner("/etc/rackcast"),
        (0o750, "root".into(), "rackcast".into())
    );
    assert_eq!(
        mode_owner("/etc/rackcast/rackcast.toml"),
        (0o640, "root".into(), "rackcast".into())
    );
    for exe in [
        "/usr/bin/rackcast",
        "/usr/lib/rackcast/x86_64/rackcast-agent",
    ] {
        assert_eq!(mode_owner(exe).0, 0o755, "{exe}");
    }
    for f in [
        "/usr/share/doc/rackcast/examples/rack.csv",
        "/usr/share/doc/rackcast/examples/identity/user-data.j2",
        "/usr/share/rackcast/build-loader-initrd.sh",
        "/usr/share/rackcast/grafana/rackcast-appliance.json",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    // The shipped config is the documented example, and it parses.
    let shipped = fs::read_to_string("/etc/rackcast/rackcast.toml").unwrap();
    assert_eq!(
        shipped,
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rackcast.example.toml"))
            .unwrap()
    );
    rackcast::config::Config::parse(&shipped, Path::new("/etc/rackcast/rackcast.toml"))
        .unwrap_or_else(|e| panic!("the shipped config does not parse: {e}"));
    // Installed, neither enabled nor started: the DHCP service starts
    // when the operator says so.
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/rackcast.service").exists());

    // systemd's own check of the installed unit.
    let v = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(v.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("rackcast.service"),
        "systemd-analyze verify: {said}"
    );
    let unit = fs::read_to_string(UNIT).unwrap();
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit_value(&unit, "User"), "rackcast");

    // The installed appliance, started as the unit starts it, in a lab:
    // the package's user, the unit's capabilities and nothing else, the
    // agent from the agent package, DHCP + TFTP + both HTTP listeners.
    let lab = Lab::up("deb", 1, "200mbit", &[]);
    let tftp = Path::new("/var/lib/rackcast/tftp");
    fs::create_dir_all(tftp).unwrap();
    fs::write(tftp.join("undionly.kpxe"), b"not really iPXE").unwrap();
    let img = Path::new("/var/lib/rackcast/img.raw");
    fs::write(img, vec![7u8; 1 << 20]).unwrap();
    run(Command::new("chown").args(["-R", "rackcast:rackcast", "/var/lib/rackcast"]));
    let cfg = ApplianceConfig::new(
        Path::new("/var/lib/rackcast"),
        Path::new("/usr/lib/rackcast/x86_64/rackcast-agent"),
        "100M",
        "239.255.62.1",
    )
    .image("img", img)
    .section("[[profiles]]\nname = \"any\"\nimage = \"img\"\ntarget = { order = \"largest\", count = 1 }\n")
    .section(
        "[boot.dhcp]\nmode = \"full\"\niface = \"srv0\"\nserver_ip = \"198.18.0.1\"\n\
         pool_start = \"198.18.0.100\"\npool_end = \"198.18.0.120\"\n\
         netmask = \"255.255.255.0\"\nlease_time = \"10m\"\n\n\
         [boot.tftp]\nroot = \"/var/lib/rackcast/tftp\"\niface = \"srv0\"\n",
    );
    let config = Path::new("/etc/rackcast/rackcast.toml");
    cfg.write(config);
    // The notify socket in a folder the service's user can reach.
    let notify_dir = tempfile::Builder::new()
        .prefix("rcnotify")
        .tempdir()
        .unwrap();
    fs::set_permissions(notify_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o666)).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let caps: Vec<String> = unit_value(&unit, "AmbientCapabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let caps = caps.join(",");
    let exec = unit_value(&unit, "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let umask = unit_value(&unit, "UMask");
    let start_unit = |log: &Path| {
        let err = fs::File::create(log).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("app"), "setpriv"])
            .args(["--reuid=rackcast", "--regid=rackcast", "--init-groups"])
            .arg(format!("--inh-caps=-all,{caps}"))
            .arg(format!("--ambient-caps=-all,{caps}"))
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg("--no-new-privs")
            // UMask= of the unit, then exec ExecStart=.
            .args(["sh", "-c", &format!("umask {umask} && exec \"$@\""), "sh"])
            .args(&argv)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1500000")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap()
    };
    let log = lab.file("serve.log");
    // Stopped by PID when the test ends, also on a failure (its user
    // cannot be removed while it runs).
    struct Serve(std::process::Child);
    impl Drop for Serve {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut serve = Serve(start_unit(&log));
    let serve_pid = serve.0.id();
    let mut seen = Vec::new();
    await_notify(&notify, "READY=1", Duration::from_secs(30), &mut seen);
    // Ready means every listener is bound.
    let said = fs::read_to_string(&log).unwrap();
    for l in [
        "TFTP service listening",
        "DHCP service listening",
        "control plane listening",
        "provisioning HTTP (iPXE scripts, loader files) listening",
        "operator API and /metrics listening",
    ] {
        assert!(said.contains(l), "READY=1 before {l:?}:\n{said}");
    }
    assert!(
        seen.iter().any(|m| m.contains("STATUS=serving; 0 devices")),
        "{seen:?}"
    );
    // The state the service made is its user's, its key owner-only.
    assert_eq!(
        mode_owner("/var/lib/rackcast/signing.key"),
        (0o600, "rackcast".into(), "rackcast".into())
    );
    // It serves: a real DHCP client gets a lease through the privileged
    // port the capability allows.
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.ns("d1")])
        .args(["busybox", "udhcpc", "-i", "d0", "-n", "-q", "-f"])
        .args(["-t", "3", "-T", "1", "-s", "/bin/true"])
        .output()
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(t.contains("obtained from 198.18.0.1"), "{t}");
    // The watchdog is fed (every 0.5 s for a 1.5 s WatchdogSec).
    let mut fed = 0;
    for _ in 0..3 {
        await_notify(&notify, "WATCHDOG=1", Duration::from_secs(3), &mut seen);
        fed += 1;
    }
    assert_eq!(fed, 3);
    // systemctl reload: RELOADING=1, then READY=1 again.
    seen.clear();
    run(Command::new("kill").args(["-HUP", &serve_pid.to_string()]));
    await_notify(&notify, "RELOADING=1", Duration::from_secs(5), &mut seen);
    await_notify(&notify, "READY=1", Duration::from_secs(5), &mut seen);
    assert!(
        fs::read_to_string(&log)
            .unwrap()
            .contains("config reloaded (SIGHUP)"),
        "{seen:?}"
    );
    // A second appliance on the same state (the unit started twice, a
    // forgotten foreground run) stops at once with the reason and never
    // says ready.
    let log2 = lab.file("serve2.log");
    let second = start_unit(&log2);
    let out = finish(second, Duration::from_secs(20));
    assert!(!out.status.success());
    let said2 = fs::read_to_string(&log2).unwrap();
    assert!(
        said2.contains(&format!(
            "another rackcast serve (pid {serve_pid}) holds state_dir /var/lib/rackcast"
        )),
        "{said2}"
    );
    // systemctl stop: STOPPING=1 and a clean exit.
    seen.clear();
    run(Command::new("kill").args(["-TERM", &serve_pid.to_string()]));
    await_notify(&notify, "STOPPING=1", Duration::from_secs(5), &mut seen);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = serve.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    let _ = fs::File::open(&log).unwrap().read_to_string(&mut rest);
    assert!(!rest.contains("panicked"), "{rest}");

    // Removal keeps the config (a conffile) and the state; purge removes
    // the config and still keeps the fleet record and the signing key.
    run(Command::new("dpkg").args(["-r", "rackcast", "rackcast-agent"]));
    assert!(!Path::new("/usr/bin/rackcast").exists());
    assert!(!Path::new(UNIT).exists());
    assert!(config.exists());
    run(Command::new("dpkg").args(["--purge", "rackcast", "rackcast-agent"]));
    assert!(!config.exists());
    assert!(Path::new("/var/lib/rackcast/signing.key").exists());
}
