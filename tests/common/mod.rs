//! Shared netns lab helpers for the integration tests: binaries, the
//! namespace lab (`netlab/lab.sh`) torn down on drop, bounded waits.
#![allow(dead_code)]

pub mod appliance;
pub mod keepalived;
pub mod pg;
pub mod rack;
mod skip;
pub mod wave;

pub use skip::skip;

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

/// Whether the network-namespace tests can run (root); else a skip.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root {
        skip("network namespace tests need root");
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

    /// One more host on the lab's switch (`lab.sh host`): its namespace
    /// name. Removed with the lab.
    pub fn host(&self, name: &str, addr: &str) -> String {
        self.host_with(name, addr, "h0")
    }

    /// [`Lab::host`] whose interface is named `iface` (a standby
    /// appliance's, named as the active one's).
    pub fn host_with(&self, name: &str, addr: &str, iface: &str) -> String {
        let st = Command::new(root().join("netlab/lab.sh"))
            .args(["host", &self.prefix, name, addr, iface])
            .status()
            .expect("lab.sh host");
        assert!(st.success(), "lab.sh host {name} {addr}");
        format!("{}x-{name}", self.prefix)
    }

    /// A second segment behind a router (`lab.sh segment`): relay host
    /// `x-rly` (198.18.2.1, iface r0) and devices `x-e1..x-eN`
    /// (198.18.2.(10+i), iface e0); unicast routed, multicast not.
    pub fn segment(&self, n: usize) {
        let st = Command::new(root().join("netlab/lab.sh"))
            .args(["segment", &self.prefix, &n.to_string()])
            .status()
            .expect("lab.sh segment");
        assert!(st.success(), "lab.sh segment {n}");
    }

    /// Random loss toward `port` of switch `sw` (`sw`, or `x-sw2` of the
    /// second segment).
    pub fn port_loss(&self, sw: &str, port: &str, pct: f64) {
        let st = Command::new(root().join("netlab/lab.sh"))
            .args(["portloss", &self.prefix, sw, port, &pct.to_string()])
            .status()
            .expect("lab.sh portloss");
        assert!(st.success(), "lab.sh portloss {sw} {port}");
    }

    /// Limit device `dev`'s switch port to `rate` (a tbf with a 50 ms
    /// queue, as `lab.sh --slow`): a slow port, NIC or disk.
    pub fn slow_port(&self, dev: usize, rate: &str) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.ns("sw"), "tc", "qdisc", "replace"])
            .args(["dev", &format!("vd{dev}"), "root", "tbf", "rate", rate])
            .args(["burst", "64kb", "latency", "50ms"])
            .status()
            .expect("tc");
        assert!(st.success(), "tc on device {dev}'s port");
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

/// Workflow limits of a lab appliance (`[workflow]`).
pub struct Workflow {
    pub step_timeout: &'static str,
    pub imaging_timeout: &'static str,
    pub retry_backoff: &'static str,
    pub max_attempts: u32,
}

/// A lab appliance's configuration, built field by field. [`Self::write`]
/// checks it with the appliance's own parser before writing it, so a test
/// with a wrong key fails at once, naming it. The appliance listens on
/// the lab's appliance address: agents on 7100, API and /metrics on 7180.
pub struct ApplianceConfig {
    pub state_dir: PathBuf,
    pub read_timeout: Option<&'static str>,
    /// `[dataplane] iface`.
    pub iface: Option<&'static str>,
    pub total_rate: String,
    pub group_base: &'static str,
    pub workflow: Option<Workflow>,
    /// The agent binary bundles carry (`[agents] x86_64`).
    pub agent: PathBuf,
    pub images: Vec<(String, PathBuf)>,
    /// Further sections as TOML (modules, profiles, devices, waves, boot).
    pub sections: Vec<String>,
    /// The rack inventory (`[enroll] inventory`): MAC and serial of each
    /// known machine. Empty: no inventory (unknown machines are held for
    /// approval, the default policy).
    pub known: Vec<(String, String)>,
    /// Further rack-inventory columns: `(header, one value per known
    /// machine)`, e.g. `bmc` and `bmc_credential`.
    pub inventory_columns: Vec<(String, Vec<String>)>,
}

impl ApplianceConfig {
    pub const CONTROL: &'static str = "198.18.0.1:7100";
    /// Provisioning HTTP: iPXE scripts and loader files.
    pub const API: &'static str = "198.18.0.1:7180";
    /// Operator API and /metrics (HTTPS, bearer tokens).
    pub const OPERATOR: &'static str = "198.18.0.1:7443";

    pub fn new(state_dir: &Path, agent: &Path, total_rate: &str, group_base: &'static str) -> Self {
        ApplianceConfig {
            state_dir: state_dir.to_path_buf(),
            read_timeout: None,
            iface: None,
            total_rate: total_rate.to_string(),
            group_base,
            workflow: None,
            agent: agent.to_path_buf(),
            images: Vec::new(),
            sections: Vec::new(),
            known: Vec::new(),
            inventory_columns: Vec::new(),
        }
    }

    /// Machines the rack inventory lists, `(mac, serial)`.
    pub fn known(mut self, machines: &[(&str, &str)]) -> Self {
        self.known
            .extend(machines.iter().map(|(m, s)| (m.to_string(), s.to_string())));
        self
    }

    /// Where the rack inventory goes: beside the state folder.
    pub fn inventory_path(&self) -> PathBuf {
        self.state_dir.with_file_name("rack-inventory.csv")
    }

    pub fn image(mut self, name: &str, path: &Path) -> Self {
        self.images.push((name.to_string(), path.to_path_buf()));
        self
    }

    pub fn section(mut self, toml: impl Into<String>) -> Self {
        self.sections.push(toml.into());
        self
    }

    pub fn toml(&self) -> String {
        let mut t = format!(
            "[appliance]\ncontrol_listen = \"{}\"\napi_listen = \"{}\"\noperator_listen = \"{}\"\nstate_dir = \"{}\"\n",
            Self::CONTROL,
            Self::API,
            Self::OPERATOR,
            self.state_dir.display()
        );
        if let Some(r) = self.read_timeout {
            t += &format!("read_timeout = \"{r}\"\n");
        }
        t += "\n[dataplane]\n";
        if let Some(i) = self.iface {
            t += &format!("iface = \"{i}\"\n");
        }
        t += &format!(
            "bind = \"198.18.0.1\"\ntotal_rate = \"{}\"\ngroup_base = \"{}\"\n",
            self.total_rate, self.group_base
        );
        if let Some(w) = &self.workflow {
            t += &format!(
                "\n[workflow]\nstep_timeout = \"{}\"\nimaging_timeout = \"{}\"\nretry_backoff = \"{}\"\nmax_attempts = {}\n",
                w.step_timeout, w.imaging_timeout, w.retry_backoff, w.max_attempts
            );
        }
        t += &format!("\n[agents]\nx86_64 = \"{}\"\n", self.agent.display());
        for (name, path) in &self.images {
            t += &format!(
                "\n[[images]]\nname = \"{name}\"\npath = \"{}\"\n",
                path.display()
            );
        }
        if !self.known.is_empty() {
            t += &format!(
                "\n[enroll]\ninventory = \"{}\"\n",
                self.inventory_path().display()
            );
        }
        for s in &self.sections {
            t += "\n";
            t += s;
            t += "\n";
        }
        t
    }

    /// Check with the appliance's parser, then write to `path`.
    pub fn write(&self, path: &Path) {
        let text = self.toml();
        if let Err(e) = rackcast::config::Config::parse(&text, path) {
            panic!("lab config does not parse: {e}\n{text}");
        }
        if !self.known.is_empty() {
            let mut csv = String::from("mac,serial,hostname,rack,slot");
            for (h, _) in &self.inventory_columns {
                csv += &format!(",{h}");
            }
            csv += "\n";
            for (i, (mac, serial)) in self.known.iter().enumerate() {
                csv += &format!("{mac},{serial},node{},lab,{}", i + 1, i + 1);
                for (_, v) in &self.inventory_columns {
                    csv += &format!(",{}", v.get(i).map(String::as_str).unwrap_or(""));
                }
                csv += "\n";
            }
            fs::write(self.inventory_path(), csv).unwrap();
        }
        fs::write(path, text).unwrap();
    }
}

/// A real Prometheus server in a lab namespace, scraping `target`
/// (`host:port`) every 500 ms; stopped on drop. `None` when Prometheus is
/// not installed outside CI (a skip, counted); in CI that fails.
pub struct Prometheus {
    child: Child,
    ns: String,
    listen: String,
}

impl Prometheus {
    pub fn start(
        lab: &Lab,
        host: &str,
        listen: &str,
        target: &str,
        path: &str,
    ) -> Option<Prometheus> {
        Prometheus::start_with(lab, host, listen, target, path, "")
    }

    /// Scraping the appliance's operator listener the way an operator
    /// sets it up: HTTPS trusting the appliance's certificate, a viewer
    /// token from a file.
    pub fn start_operator(
        lab: &Lab,
        host: &str,
        listen: &str,
        config: &Path,
    ) -> Option<Prometheus> {
        operator_token(config, "viewer");
        let extra = format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n    authorization:\n      credentials_file: {}\n",
            operator_cert(config).display(),
            config.with_extension("viewer.token").display()
        );
        Prometheus::start_with(
            lab,
            host,
            listen,
            ApplianceConfig::OPERATOR,
            "/metrics",
            &extra,
        )
    }

    fn start_with(
        lab: &Lab,
        host: &str,
        listen: &str,
        target: &str,
        path: &str,
        extra: &str,
    ) -> Option<Prometheus> {
        if Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            skip("prometheus not installed (netlab/ensure-deps.sh test installs it)");
            return None;
        }
        let cfg = lab.file(&format!("prometheus-{host}.yml"));
        fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: rackcast\n    metrics_path: {path}\n{extra}    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(host), "prometheus"])
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                lab.file(&format!("tsdb-{host}")).display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus");
        let p = Prometheus {
            child,
            ns: lab.ns(host),
            listen: listen.to_string(),
        };
        // It scrapes a few seconds after it starts: wait until the target
        // shows up (`up` has a value, 0 while the target is not running).
        let ready = Instant::now() + Duration::from_secs(30);
        while p.query("up").is_none() {
            assert!(Instant::now() < ready, "prometheus never listed its target");
            std::thread::sleep(Duration::from_millis(250));
        }
        Some(p)
    }

    /// The first value of a PromQL instant query; `None` if it has none.
    pub fn query(&self, q: &str) -> Option<f64> {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-sf",
                "--max-time",
                "5",
                "-G",
            ])
            .arg(format!("http://{}/api/v1/query", self.listen))
            .arg("--data-urlencode")
            .arg(format!("query={q}"))
            .output()
            .expect("curl");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse().ok())
    }

    /// Wait until `q` has a value `ok` accepts (scrapes lag the events).
    pub fn wait_value(&self, q: &str, within: Duration, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.query(q);
            if v.is_some_and(&ok) || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sushy-tools venv `netlab/ensure-deps.sh test` makes.
pub fn sushy() -> PathBuf {
    root().join("target/sushy-venv/bin/sushy-emulator")
}

/// Where each lab device's BMC answers: the same address in every device
/// namespace, like the Redfish Host Interface of real machines (so
/// devices of one profile share one bundle).
pub const BMC_IP: &str = "198.18.1.1";
pub const BMC_PORT: u16 = 8000;
pub const BMC_USER: &str = "rcadmin";
pub const BMC_PASSWORD: &str = "lab-bmc-pw-7f3a";

/// The emulated machine's RAID controller: two 20 GB drives and one of
/// 40 GB (listed big-first: rules pick by size, not order), no volumes
/// (sizes fit the test hypervisor's 100 GiB storage pool).
/// The libvirt test hypervisor's one system has this UUID; its storage
/// pool is `default-pool`.
const BMC_STORAGE: &str = "\
SUSHY_EMULATOR_STORAGE_POOL = 'default-pool'
SUSHY_EMULATOR_STORAGE = {'6695eb01-f6a4-8304-79aa-97f2502e193f': [{'Id': '1', 'Name': 'RAID controller',
  'StorageControllers': [{'MemberId': '0', 'Name': 'Integrated RAID', 'SpeedGbps': 12}],
  'Drives': ['hdd-big', 'hdd-a', 'hdd-b']}]}
SUSHY_EMULATOR_DRIVES = {('6695eb01-f6a4-8304-79aa-97f2502e193f', '1'): [
  {'Id': 'hdd-big', 'Name': 'Drive 0', 'CapacityBytes': 40000000000, 'Protocol': 'SAS'},
  {'Id': 'hdd-a', 'Name': 'Drive 1', 'CapacityBytes': 20000000000, 'Protocol': 'SAS'},
  {'Id': 'hdd-b', 'Name': 'Drive 2', 'CapacityBytes': 20000000000, 'Protocol': 'SAS'}]}
SUSHY_EMULATOR_VOLUMES = {('6695eb01-f6a4-8304-79aa-97f2502e193f', '1'): []}
";

/// A Redfish emulator (sushy-tools, libvirt driver over the in-process
/// test hypervisor: BIOS support, no daemon) in a device namespace, on
/// [`BMC_IP`], with basic auth. Stopped on drop.
pub struct Bmc {
    child: Option<Child>,
    pub log: PathBuf,
    conf: PathBuf,
    ns: String,
    ip: String,
}

impl Bmc {
    pub fn start(lab: &Lab, host: &str) -> Bmc {
        Bmc::start_on(lab, host, BMC_IP)
    }

    /// On `ip` (an address the namespace has, or [`BMC_IP`], which is put
    /// on its loopback): a BMC reached over the lab network.
    pub fn start_on(lab: &Lab, host: &str, ip: &str) -> Bmc {
        let exe = sushy();
        assert!(
            exe.exists(),
            "{} missing: run netlab/ensure-deps.sh test",
            exe.display()
        );
        let ns = lab.ns(host);
        // On the namespace's loopback (this kernel has no dummy links):
        // local to the device, like a Host Interface.
        if ip == BMC_IP {
            let _ = Command::new("ip")
                .args(["-n", &ns, "addr", "replace"])
                .arg(format!("{BMC_IP}/32"))
                .args(["dev", "lo"])
                .status();
        }
        let htpasswd = lab.file(&format!("bmc-{host}.htpasswd"));
        if !htpasswd.exists() {
            let out = Command::new(root().join("target/sushy-venv/bin/python"))
                .args([
                    "-c",
                    &format!(
                        "import bcrypt; print('{BMC_USER}:' + bcrypt.hashpw(b'{BMC_PASSWORD}', bcrypt.gensalt(rounds=4)).decode())"
                    ),
                ])
                .output()
                .unwrap();
            assert!(out.status.success());
            fs::write(&htpasswd, &out.stdout).unwrap();
        }
        // The Host Interface address (for the agent) and the device's
        // address on the lab network (the appliance's power control, as a
        // management network reaches a BMC).
        let listen = if ip == BMC_IP { "0.0.0.0" } else { ip };
        let conf = lab.file(&format!("bmc-{host}.conf"));
        fs::write(
            &conf,
            format!(
                "SUSHY_EMULATOR_LISTEN_IP = '{listen}'\nSUSHY_EMULATOR_LISTEN_PORT = {BMC_PORT}\n\
                 SUSHY_EMULATOR_LIBVIRT_URI = 'test:///default'\n\
                 SUSHY_EMULATOR_AUTH_FILE = '{}'\n\
                 SUSHY_EMULATOR_STATE_DIR = '{}'\n{BMC_STORAGE}",
                htpasswd.display(),
                lab.file(&format!("bmc-{host}-state")).display()
            ),
        )
        .unwrap();
        let log = lab.file(&format!("bmc-{host}.log"));
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&exe)
            .arg("--config")
            .arg(&conf)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let bmc = Bmc {
            child: Some(child),
            log,
            conf,
            ns,
            ip: ip.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bmc.text().contains("Running on") {
            assert!(
                Instant::now() < deadline,
                "Redfish emulator did not start:\n{}",
                bmc.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bmc
    }

    pub fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests of `method` to a path containing `part` seen so far.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.text()
            .lines()
            .filter(|l| l.contains(&format!("{method} /")) && l.contains(part))
            .count()
    }

    /// GET a Redfish path from inside the device namespace (real curl).
    pub fn get(&self, path: &str) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "-m", "10", "-u"])
            .arg(format!("{BMC_USER}:{BMC_PASSWORD}"))
            .arg(format!("http://{}:{BMC_PORT}{path}", self.ip))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("GET {path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The path of the (only) system this BMC lists.
    pub fn system(&self) -> String {
        self.get("/redfish/v1/Systems")["Members"][0]["@odata.id"]
            .as_str()
            .unwrap_or_else(|| panic!("no system on the BMC at {}", self.ip))
            .to_string()
    }

    /// The system's current BIOS attributes, following the links.
    pub fn bios(&self) -> serde_json::Value {
        let systems = self.get("/redfish/v1/Systems");
        let sys = systems["Members"][0]["@odata.id"]
            .as_str()
            .unwrap()
            .to_string();
        let bios = self.get(&sys)["Bios"]["@odata.id"]
            .as_str()
            .unwrap()
            .to_string();
        self.get(&bios)["Attributes"].clone()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again (same namespace, config and log); BIOS state is the
    /// emulator's memory, so it starts from the defaults.
    pub fn restart(&mut self) {
        self.stop();
        let out = fs::OpenOptions::new().append(true).open(&self.log).unwrap();
        let before = self.text().matches("Running on").count();
        self.child = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .arg(sushy())
                .arg("--config")
                .arg(&self.conf)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.text().matches("Running on").count() == before {
            assert!(
                Instant::now() < deadline,
                "emulator restart:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether ipmitool, OpenIPMI's ipmi_sim and sushy-tools are here (else a
/// skip, which fails under CI).
pub fn have_ipmi() -> bool {
    let ok = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(ok("ipmitool") && ok("ipmi_sim")) {
        skip("ipmitool and ipmi_sim missing: run netlab/ensure-deps.sh test");
        return false;
    }
    if !sushy().exists() {
        skip("sushy-tools missing: run netlab/ensure-deps.sh test");
        return false;
    }
    true
}

/// OpenIPMI's BMC simulator (`ipmi_sim`, Debian package openipmi) in a
/// device namespace, answering IPMI 2.0 over LAN on `ip`:623 for one
/// admin user. Its chassis is the simulator's `chassis_control` program:
/// power and boot device kept in files, every power change appended to a
/// history, as a real BMC drives the board's power and reset lines.
pub struct IpmiSim {
    child: Option<Child>,
    dir: PathBuf,
    pub log: PathBuf,
}

pub const IPMI_USER: &str = "rcipmi";
pub const IPMI_PASSWORD: &str = "lab-ipmi-pw-91c";

impl IpmiSim {
    /// `machine`: a shell command the chassis runs when its power comes
    /// on (the machine booting, in the device namespace), killed when it
    /// goes off.
    pub fn start(lab: &Lab, host: &str, ip: &str, machine: Option<&str>) -> IpmiSim {
        let dir = lab.file(&format!("ipmi-{host}"));
        fs::create_dir_all(dir.join("chassis")).unwrap();
        if let Some(m) = machine {
            let on = dir.join("on-power.sh");
            fs::write(&on, format!("#!/bin/sh\nexec {m}\n")).unwrap();
            fs::set_permissions(&on, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let hal = dir.join("chassis.sh");
        fs::write(
            &hal,
            format!(
                "#!/bin/sh\n\
                 # ipmi_sim chassis_control: DEVICE get PARM... | DEVICE set PARM VAL...\n\
                 d={chassis}; shift; op=$1; shift\n\
                 case $op in\n\
                 get) for p in \"$@\"; do case $p in\n\
                   power) echo \"power:$(cat $d/power 2>/dev/null || echo 0)\";;\n\
                   boot) echo \"boot:$(cat $d/boot 2>/dev/null || echo default)\";;\n\
                   *) echo \"Invalid parameter: $p\"; exit 1;; esac; done;;\n\
                 set) while [ $# -ge 2 ]; do case $1 in\n\
                   power) echo $2 > $d/power; echo power=$2 >> $d/history\n\
                     if [ -f $d/machine.pid ]; then kill -TERM -$(cat $d/machine.pid) 2>/dev/null; rm -f $d/machine.pid; fi\n\
                     if [ $2 = 1 ] && [ -x $d/../on-power.sh ]; then\n\
                       setsid $d/../on-power.sh </dev/null >>$d/../machine.log 2>&1 & echo $! > $d/machine.pid; fi;;\n\
                   boot) echo $2 > $d/boot; echo boot=$2 >> $d/history;;\n\
                   reset) echo reset >> $d/history;;\n\
                   *) echo \"Invalid parameter: $1\"; exit 1;; esac; shift 2; done;;\n\
                 *) exit 1;;\n\
                 esac\n",
                chassis = dir.join("chassis").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&hal, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let conf = dir.join("lan.conf");
        fs::write(
            &conf,
            format!(
                "name \"rc{host}\"\nset_working_mc 0x20\n  startlan 1\n    addr {ip} 623\n    priv_limit admin\n\
                 allowed_auths_callback md5\n    allowed_auths_user md5\n    allowed_auths_operator md5\n    allowed_auths_admin md5\n\
                 guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{} 0x20\"\n\
                 user 2 true \"{IPMI_USER}\" \"{IPMI_PASSWORD}\" admin 10 md5\n",
                hal.display()
            ),
        )
        .unwrap();
        let emu = dir.join("sim.emu");
        fs::write(
            &emu,
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .unwrap();
        let log = dir.join("sim.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(host), "ipmi_sim", "-n", "-c"])
            .arg(&conf)
            .arg("-f")
            .arg(&emu)
            .arg("-s")
            .arg(dir.join("state"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("ipmi_sim (Debian package openipmi)");
        // Up when the UDP port is bound.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = Command::new("ip")
                .args(["netns", "exec", &lab.ns(host), "ss", "-uln"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&ss.stdout).contains(&format!("{ip}:623")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        IpmiSim {
            child: Some(child),
            dir,
            log,
        }
    }

    /// The chassis power line, as the simulator last set it.
    pub fn powered(&self) -> bool {
        fs::read_to_string(self.dir.join("chassis/power")).is_ok_and(|s| s.trim() == "1")
    }

    /// The boot device the simulator last set (`pxe`, `default`, ...).
    pub fn boot(&self) -> String {
        fs::read_to_string(self.dir.join("chassis/boot"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Every change the simulator made, in order (`power=1`, `boot=pxe`).
    pub fn history(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("chassis/history"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The machine it powered: its process group (setsid), by PID.
        if let Ok(pid) = fs::read_to_string(self.dir.join("chassis/machine.pid")) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", pid.trim())])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `rackcast serve --config CONFIG` in the lab's appliance namespace,
/// logging to `serve.log`; returns once its operator API answers.
pub fn start_serve(lab: &Lab, config: &Path) -> Child {
    let mut child = spawn_serve(&lab.ns("app"), config, &lab.file("serve.log"));
    let token = operator_token(config, "viewer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if operator_curl(&lab.ns("app"), config, Some(&token), "/api/images", &[]).0 == 200 {
            return child;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "appliance exited ({st}):\n{}",
                fs::read_to_string(lab.file("serve.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "appliance did not come up:\n{}",
        fs::read_to_string(lab.file("serve.log")).unwrap_or_default()
    );
}

/// `rackcast serve` with `config` in namespace `ns`, its log appended to
/// `log`; not waited for (a standby serves only once it has the pair's
/// address).
pub fn spawn_serve(ns: &str, config: &Path, log: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("rackcast"))
        .args(["serve", "--log", "info,rackcast=debug", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `rackcast ARGS --config CONFIG` as an operator runs it: in the lab's
/// appliance namespace (its API address is local), with an admin token.
pub fn operator_cli(lab: &Lab, config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns("app")])
        .arg(bin("rackcast"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RACKCAST_TOKEN", operator_token(config, "admin"));
    c
}

/// Where a CLI for `config` runs: in the namespace named by the file
/// `cli.netns` beside it (an appliance whose fleet record is a database
/// on the lab network), else here.
fn cli_command(config: &Path) -> Command {
    match fs::read_to_string(config.with_file_name("cli.netns")) {
        Ok(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.trim()]).arg(bin("rackcast"));
            c
        }
        Err(_) => Command::new(bin("rackcast")),
    }
}

/// `rackcast ARGS --config CONFIG`, its output.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    cli_command(config)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RACKCAST_TOKEN", operator_token(config, "admin"))
        .output()
        .unwrap()
}

/// A `role` token for the appliance of `config`, made once with the CLI
/// (`rackcast token create`) and kept beside the config for later calls.
pub fn operator_token(config: &Path, role: &str) -> String {
    let keep = config.with_extension(format!("{role}.token"));
    if let Ok(t) = fs::read_to_string(&keep) {
        return t;
    }
    let out = cli_command(config)
        .args(["token", "create", &format!("tests-{role}"), "--role", role])
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    fs::write(&keep, &t).unwrap();
    t
}

/// The appliance's operator certificate (what clients pin).
pub fn operator_cert(config: &Path) -> PathBuf {
    rackcast::config::Config::load(config)
        .unwrap()
        .operator_tls_paths()
        .0
}

/// curl against the operator API from namespace `ns`: HTTPS trusting only
/// the appliance's certificate, with `token` (if any) as bearer; extra
/// curl arguments after. Returns (HTTP status, body).
pub fn operator_curl(
    ns: &str,
    config: &Path,
    token: Option<&str>,
    path: &str,
    extra: &[&str],
) -> (u16, String) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "curl", "-s", "-m", "5", "--cacert"])
        .arg(operator_cert(config))
        .args(["-w", "\n%{http_code}"]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c
        .args(extra)
        .arg(format!("https://{}{path}", ApplianceConfig::OPERATOR))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Write `raw` as a qcow2 image at `qcow` with Debian's `qemu-img`.
pub fn qcow2_of(raw: &Path, qcow: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert");
}

/// A TCP connection made from inside namespace `ns` (a thread enters it,
/// connects and leaves; the socket stays in that namespace), for clients
/// written in the test itself: attacks no real peer makes.
pub fn tcp_in_netns(ns: &str, addr: &str) -> std::net::TcpStream {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on this thread only, with a descriptor we own.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {ns}");
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    })
    .join()
    .unwrap()
}

/// A raw frame client (4-byte length, body) over TLS, for attacks no
/// real peer makes: it speaks the device protocol or a wave's control
/// protocol. `pin`: the key the server must prove (`None`: any).
pub struct RawAgent(pub rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl RawAgent {
    pub fn connect(ns: &str) -> RawAgent {
        RawAgent::connect_to(ns, ApplianceConfig::CONTROL, None)
    }

    /// Connect to `addr` from namespace `ns`; panics if the server does
    /// not prove `pin`.
    pub fn connect_to(ns: &str, addr: &str, pin: Option<&str>) -> RawAgent {
        RawAgent::try_connect(ns, addr, pin).expect("TLS handshake")
    }

    /// The handshake's result: an error when the server does not prove
    /// `pin` (or is not TLS).
    pub fn try_connect(ns: &str, addr: &str, pin: Option<&str>) -> std::io::Result<RawAgent> {
        let tcp = tcp_in_netns(ns, addr);
        let cfg = rackcast_core::io::tls::client_config(pin).unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(rackcast_core::io::tls::SERVER_NAME).unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(RawAgent(s))
    }

    /// The Ed25519 key the server proved.
    pub fn peer_key(&self) -> [u8; 32] {
        let certs = self.0.conn.peer_certificates().unwrap();
        rackcast_core::io::tls::cert_ed25519_key(&certs[0]).unwrap()
    }

    pub fn send_bytes(&mut self, body: &[u8]) {
        use std::io::Write;
        self.0
            .write_all(&(body.len() as u32).to_be_bytes())
            .unwrap();
        self.0.write_all(body).unwrap();
        self.0.flush().unwrap();
    }

    pub fn send(&mut self, m: &rackcast_core::wire::device::AgentMsg) {
        self.send_bytes(&m.emit().unwrap());
    }

    /// Send `m`; false once the peer has closed the connection.
    pub fn try_send(&mut self, m: &rackcast_core::wire::device::AgentMsg) -> bool {
        use std::io::Write;
        let body = m.emit().unwrap();
        self.0
            .write_all(&(body.len() as u32).to_be_bytes())
            .and_then(|()| self.0.write_all(&body))
            .and_then(|()| self.0.flush())
            .is_ok()
    }

    /// The next frame's body, or `None` once the peer closed (or 10 s).
    pub fn recv_bytes(&mut self) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// The next message, or `None` once the appliance closed (or 10 s).
    pub fn recv(&mut self) -> Option<rackcast_core::wire::device::ApplianceMsg> {
        rackcast_core::wire::device::ApplianceMsg::parse(&self.recv_bytes()?).ok()
    }
}

/// The value of the Prometheus sample `series` (name with its labels, as
/// printed) in a `/metrics` text; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `curl` in namespace `ns` (plain HTTP): the status code it got.
pub fn http_status(ns: &str, args: &[&str], url: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
