//! A lab rack for end-to-end tests: the appliance (`rackcast serve`) in
//! its namespace, `rackcast-agent run` in every device namespace with a
//! hardware description and disk files, a Redfish emulator per device,
//! and optionally an IPMI simulator per device whose chassis starts the
//! device's agent when it powers on (`machines_behind_ipmi`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

pub struct Rack {
    /// Each device's BMC (Redfish emulator); dropped before the lab.
    pub bmcs: Vec<Bmc>,
    pub lab: Lab,
    pub config: PathBuf,
    pub images: HashMap<String, PathBuf>,
    pub serve: Option<Child>,
    pub agents: Vec<Option<Child>>,
    /// Devices whose agent starts from an installed OS.
    pub with_os: Vec<usize>,
}

pub const MAC_PREFIX: &str = "02:aa:00:00:00:";

/// The SSH key every R650's identity seed authorizes.
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJhY2tjYXN0LWxhYi1rZXktZm9yLXRlc3Rz lab@rackcast";

pub fn mac(i: usize) -> String {
    format!("{MAC_PREFIX}{i:02x}")
}

pub fn device_id(i: usize) -> String {
    format!("rc-02aa000000{i:02x}")
}

impl Rack {
    /// `n` devices: odd ones are "Dell PowerEdge R650" (BIOS + programs +
    /// boot-to-disk, image debian), even ones generic (nothing to
    /// configure, image rocky); `rocky_override` odd devices get rocky by
    /// MAC. Device 1 also has a NIC with a PCI id that pulls a module.
    pub fn new(tag: &str, n: usize, rate: &str, mib: (u64, u64), extra_cfg: &str) -> Rack {
        Rack::build(tag, n, rate, mib, extra_cfg, true, 80)
    }

    pub fn build(
        tag: &str,
        n: usize,
        rate: &str,
        mib: (u64, u64),
        extra_cfg: &str,
        mixed: bool,
        rate_pct: u64,
    ) -> Rack {
        let lab = Lab::up(tag, n, rate, &[]);
        let dir = lab.dir.clone();
        let state = dir.join("state");
        fs::create_dir_all(&state).unwrap();
        // A stripped copy of the agent: bundles carry it to every device.
        let agent = dir.join("rackcast-agent");
        let st = Command::new("strip")
            .arg("-o")
            .arg(&agent)
            .arg(bin("rackcast-agent"))
            .status()
            .expect("strip (binutils)");
        assert!(st.success());
        let module = dir.join("mlx-fw-tool.sh");
        fs::write(&module, "#!/bin/sh\necho mlx firmware tool loaded\n").unwrap();
        let mut images = HashMap::new();
        for (name, size, seed) in [("debian", mib.0, 11u64), ("rocky", mib.1, 12)] {
            let p = dir.join(format!("{name}.img"));
            let st = Command::new(bin("rc-mkimage"))
                .arg(&p)
                .args([
                    "--mib",
                    &size.to_string(),
                    "--seed",
                    &seed.to_string(),
                    "--zero-every",
                    "5",
                    "--gpt",
                ])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            images.insert(name.to_string(), p);
        }
        let config = dir.join("rackcast.toml");
        // The R650s' identity: hostname from the rack inventory, a static
        // address from its `addr` column, an SSH key.
        let user_data = dir.join("user-data.j2");
        fs::write(
            &user_data,
            format!("#cloud-config\nhostname: {{{{ hostname | tojson }}}}\nssh_authorized_keys:\n  - {SSH_KEY}\n"),
        )
        .unwrap();
        let network = dir.join("network-config.j2");
        fs::write(
            &network,
            "version: 2\nethernets:\n  {{ inventory.nics[0].name }}:\n    match:\n      macaddress: {{ mac | tojson }}\n    addresses: [{{ labels.addr | tojson }}]\n",
        )
        .unwrap();
        // `rate_pct` of the link (80 by default): the control plane
        // (bundles, feedback) needs headroom beside a wave at full rate.
        let cfg_rate = rate.trim_end_matches("mbit").parse::<u64>().unwrap() * rate_pct / 100;
        let profiles = format!(
            r#"[[modules]]
name = "mlx-fw"
pci_ids = ["15b3:1017"]
file = "{module}"
load = {{ name = "load-mlx-fw", argv = ["sh", "{{file}}"], timeout = "10s" }}

[[profiles]]
name = "r650"
vendor = "Dell*"
model = "PowerEdge R650"
image = "debian"
target = {{ order = "largest", count = 1 }}
bios = {{ attributes = {{ BootMode = "Uefi", ProcTurboMode = "Disabled", EmbeddedSata = "Ahci" }}, redfish = {redfish} }}
programs = [ {{ name = "set-hostname", argv = ["sh", "-c", "echo host $RC_DEVICE target $RC_IMAGE_TARGET"], timeout = "10s" }} ]
post_install = [ {{ name = "check-image", argv = ["sh", "-c", "test -s $RC_IMAGE_TARGET && echo image present"] }} ]
boot_to_disk = {{ name = "efibootmgr", argv = ["true"] }}
identity = {{ user_data = "{user_data}", network_config = "{network}" }}

[[profiles]]
name = "generic"
image = "rocky"
target = {{ order = "smallest", count = 1 }}
[profiles.raid]
level = "raid1"
disks = {{ order = "smallest", count = 2 }}
redfish = {redfish}
"#,
            module = module.display(),
            redfish = redfish_cfg(),
            user_data = user_data.display(),
            network = network.display(),
        );
        let mut cfg = ApplianceConfig::new(&state, &agent, &format!("{cfg_rate}M"), "239.255.30.1")
            .image("debian", &images["debian"])
            .image("rocky", &images["rocky"])
            .section(profiles);
        cfg.read_timeout = Some("30s");
        cfg.iface = Some("srv0");
        cfg.workflow = Some(Workflow {
            step_timeout: "60s",
            imaging_timeout: "120s",
            retry_backoff: "1s",
            max_attempts: 4,
        });
        if mixed {
            cfg = cfg.section(format!(
                "[[devices]]\nmac = \"{}\"\nimage = \"rocky\"\n",
                mac(3)
            ));
        }
        // Every machine of the rack is in the rack inventory (with the
        // serial its DMI reports), as a datacenter team declares a rack.
        let known: Vec<(String, String)> = (1..=n).map(|i| (mac(i), format!("SN{i:04}"))).collect();
        let known: Vec<(&str, &str)> = known
            .iter()
            .map(|(m, s)| (m.as_str(), s.as_str()))
            .collect();
        // Each machine's BMC on the management side: its Redfish
        // emulator, reached at the device's lab address.
        let pw = dir.join("bmc-lab.pw");
        fs::write(&pw, BMC_PASSWORD).unwrap();
        fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        cfg.inventory_columns = vec![
            (
                "bmc".into(),
                (1..=n)
                    .map(|i| format!("redfish+http://198.18.0.{}:{BMC_PORT}", 10 + i))
                    .collect(),
            ),
            ("bmc_credential".into(), vec!["lab".to_string(); n]),
            (
                "addr".into(),
                (1..=n).map(|i| format!("198.18.7.{i}/24")).collect(),
            ),
        ];
        cfg = cfg.section(format!(
            "[bmc.credentials.lab]\nusername = \"{BMC_USER}\"\npassword_file = \"{}\"\n",
            pw.display()
        ));
        cfg.known(&known).section(extra_cfg).write(&config);
        for i in 1..=n {
            let (vendor, model) = if i % 2 == 1 {
                ("Dell Inc.", "PowerEdge R650")
            } else {
                ("Supermicro", "SYS-1029U")
            };
            let big = dir.join(format!("d{i}-disk-big.img"));
            let small = dir.join(format!("d{i}-disk-small.img"));
            // Sparse files standing in for disks, filled with old data
            // at the start so a wrong write cannot pass as the image.
            for (p, mb) in [(&big, 96u64), (&small, 64)] {
                fs::write(p, vec![0xAAu8; 1 << 20]).unwrap();
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(mb << 20).unwrap();
            }
            let pci = if i == 1 { "15b3:1017" } else { "8086:1521" };
            let hw = serde_json::json!({
                "dmi": {"vendor": vendor, "model": model, "serial": format!("SN{i:04}")},
                "cpu": {"arch": "x86_64", "count": 8},
                "memory_bytes": 68_719_476_736u64,
                "nics": [{"name": "d0", "mac": mac(i), "pci_id": pci}],
                // Listed small-first on odd devices, big-first on even
                // ones: the rules pick by size, not by order.
                "disks": if i % 2 == 1 {
                    serde_json::json!([
                        {"name": "sdb", "path": small, "size_bytes": 64u64 << 20, "model": "SSD-S", "serial": format!("S{i}")},
                        {"name": "sda", "path": big, "size_bytes": 96u64 << 20, "model": "SSD-B", "serial": format!("B{i}")}
                    ])
                } else {
                    serde_json::json!([
                        {"name": "sda", "path": big, "size_bytes": 96u64 << 20, "model": "SSD-B", "serial": format!("B{i}")},
                        {"name": "sdb", "path": small, "size_bytes": 64u64 << 20, "model": "SSD-S", "serial": format!("S{i}")}
                    ])
                },
            });
            fs::write(dir.join(format!("d{i}.json")), hw.to_string()).unwrap();
        }
        // Every device's BMC, started side by side.
        let bmcs = std::thread::scope(|sc| {
            let hs: Vec<_> = (1..=n)
                .map(|i| {
                    let lab = &lab;
                    sc.spawn(move || Bmc::start(lab, &format!("d{i}")))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut r = Rack {
            bmcs,
            lab,
            config,
            images,
            serve: None,
            agents: (0..n).map(|_| None).collect(),
            with_os: Vec::new(),
        };
        r.start_serve();
        r
    }

    pub fn start_serve(&mut self) {
        self.serve = Some(start_serve(&self.lab, &self.config));
    }

    /// The appliance's bundle-signing key fingerprint (`rackcast key`).
    pub fn key(&self) -> String {
        let out = Command::new(bin("rackcast"))
            .args(["key", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// What device `i`'s machine runs to reach the appliance: the loader's
    /// agent, or (`with_os`) the agent started from its installed OS.
    fn agent_argv(&self, i: usize) -> Vec<String> {
        let dir = &self.lab.dir;
        let p = |f: String| dir.join(f).display().to_string();
        let mut a: Vec<String> = vec![bin("rackcast-agent").display().to_string()];
        a.extend(
            [
                "run",
                "--server",
                "198.18.0.1:7100",
                "--iface",
                "d0",
                "--give-up",
                "60",
            ]
            .map(String::from),
        );
        a.extend(["--trust-key".into(), self.key()]);
        a.extend(["--hardware".into(), p(format!("d{i}.json"))]);
        if self.with_os.contains(&i) {
            // Already runs an OS: the agent is started from it (claim 17)
            // and names its disks itself.
            a.extend(["--os-present".into(), "true".into()]);
            a.extend(["--disk".into(), p(format!("d{i}-disk-big.img"))]);
            a.extend(["--disk".into(), p(format!("d{i}-disk-small.img"))]);
        } else {
            a.extend(["--os-present".into(), "false".into()]);
        }
        a.extend(["--work-dir".into(), p(format!("work{i}"))]);
        a
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.dir.join(format!("agent{i}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns(&format!("d{i}"))])
            .args(self.agent_argv(i))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents[i - 1] = Some(child);
    }

    /// Devices `ids` get an IPMI BMC (OpenIPMI's simulator at the
    /// device's address, port 623) whose chassis boots the machine when
    /// it powers on: its agent starts, and its exit status is kept
    /// (`machine_exit`). The rack inventory then names these BMCs, the
    /// appliance restarted to read it. The others keep their Redfish BMC
    /// (which powers nothing: the test plays their machine).
    pub fn machines_behind_ipmi(&mut self, ids: &[usize]) -> Vec<IpmiSim> {
        let inv = self.config.with_file_name("rack-inventory.csv");
        let mut csv = fs::read_to_string(&inv).unwrap();
        for &i in ids {
            let redfish = format!("redfish+http://198.18.0.{}:{BMC_PORT},lab", 10 + i);
            assert!(csv.contains(&redfish), "{csv}");
            csv = csv.replace(&redfish, &format!("ipmi://198.18.0.{},ipmi", 10 + i));
        }
        fs::write(&inv, csv).unwrap();
        let pw = self.lab.file("bmc-ipmi.pw");
        fs::write(&pw, IPMI_PASSWORD).unwrap();
        fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut cfg = fs::read_to_string(&self.config).unwrap();
        cfg += &format!(
            "\n[bmc.credentials.ipmi]\nusername = \"{IPMI_USER}\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        fs::write(&self.config, cfg).unwrap();
        self.kill_serve();
        self.start_serve();
        ids.iter()
            .map(|&i| {
                let script = self.lab.file(&format!("machine{i}.sh"));
                fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\n{} 2>>{}\necho $? > {}\n",
                        self.agent_argv(i).join(" "),
                        self.lab.file(&format!("agent{i}.log")).display(),
                        self.lab.file(&format!("machine{i}.exit")).display()
                    ),
                )
                .unwrap();
                fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
                IpmiSim::start(
                    &self.lab,
                    &format!("d{i}"),
                    &format!("198.18.0.{}", 10 + i),
                    Some(&script.display().to_string()),
                )
            })
            .collect()
    }

    /// The exit status of device `i`'s agent started by its IPMI chassis,
    /// once it has ended.
    pub fn machine_exit(&self, i: usize) -> Option<i32> {
        fs::read_to_string(self.lab.file(&format!("machine{i}.exit")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// GET on the appliance's API from inside its namespace (real curl).
    /// GET on the appliance's API from inside its namespace (real curl);
    /// empty when it does not answer.
    /// GET on the operator API (HTTPS, a viewer token); empty unless 200.
    pub fn http_get(&self, path: &str) -> String {
        let token = operator_token(&self.config, "viewer");
        match operator_curl(&self.lab.ns("app"), &self.config, Some(&token), path, &[]) {
            (200, body) => body,
            _ => String::new(),
        }
    }

    pub fn api(&self, path: &str) -> Option<Value> {
        serde_json::from_str(&self.http_get(path)).ok()
    }

    /// The fleet CLI with `--json`, run where an operator runs it: on the
    /// appliance (its namespace), so its API address is local.
    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        self.cli_cmd(args).arg("--json").output().unwrap()
    }

    /// The fleet CLI's text, as an operator reads it.
    pub fn cli_text(&self, args: &[&str]) -> String {
        let out = self.cli_cmd(args).output().unwrap();
        assert!(out.status.success(), "rackcast {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        operator_cli(&self.lab, &self.config, args)
    }

    /// Device `i`'s BMC calls, as its log shows them (kind `bmc`).
    pub fn bmc_rows(&self, i: usize) -> Vec<String> {
        self.cli(&["log", &device_id(i)])
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "bmc")
            .map(|e| e["detail"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn cli(&self, args: &[&str]) -> Value {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "rackcast {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Like `cli`, but `None` when the command fails (nothing logged yet).
    pub fn cli_opt(&self, args: &[&str]) -> Option<Value> {
        let out = self.cli_output(args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub fn devices(&self) -> Vec<Value> {
        self.cli(&["devices"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn serve_log(&self) -> String {
        fs::read_to_string(self.lab.file("serve.log")).unwrap_or_default()
    }

    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(self.lab.file(&format!("agent{i}.log"))).unwrap_or_default()
    }

    /// Wait until `pred(devices)` or the deadline; panics with logs.
    pub fn wait_for(&self, what: &str, within: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let d = self.devices();
            if pred(&d) {
                return;
            }
            if Instant::now() >= deadline {
                let log = self.serve_log();
                // The whole log outlives the lab for a look afterwards.
                let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
                    "{}-serve.log",
                    self.lab
                        .dir
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                ));
                let _ = fs::write(&keep, &log);
                let warnings: String = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out waiting for {what}\ndevices: {}\nserve warnings (last 30):\n{}\nserve log tail:\n{}\nagent1 log tail:\n{}\nwhole serve log: {}",
                    serde_json::to_string_pretty(&d).unwrap(),
                    tail(&warnings, 30),
                    tail(&log, 40),
                    tail(&self.agent_log(1), 20),
                    keep.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Move the appliance's fleet record to the PostgreSQL server `pg`
    /// (on the lab network): the appliance stops, its config gains the
    /// store, and it starts again on an empty shared record. Tokens are
    /// made anew there, by CLIs in the appliance's namespace.
    pub fn use_store(&mut self, pg: &super::pg::Pg) {
        self.kill_serve();
        let cfg = fs::read_to_string(&self.config).unwrap();
        let cfg = cfg.replacen(
            "[appliance]\n",
            &format!(
                "[appliance]\nstore = \"{}\"\nstore_password_file = \"{}\"\n",
                pg.url(),
                pg.password_file.display()
            ),
            1,
        );
        fs::write(&self.config, cfg).unwrap();
        fs::write(self.config.with_file_name("cli.netns"), self.lab.ns("app")).unwrap();
        for role in ["admin", "viewer"] {
            let _ = fs::remove_file(self.config.with_extension(format!("{role}.token")));
        }
        self.start_serve();
    }

    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            // `ip netns exec` execs the program: this is the appliance.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Rack {
    fn drop(&mut self) {
        for a in self.agents.iter_mut().flatten() {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.kill_serve();
    }
}

/// The lab BMC as a profile's `bios.redfish` (same address on every
/// device, like a Host Interface).
pub fn redfish_cfg() -> String {
    format!(
        "{{ url = \"http://{BMC_IP}:{BMC_PORT}\", username = \"{BMC_USER}\", password = \"{BMC_PASSWORD}\", settle_timeout = \"20s\" }}"
    )
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `n` devices, every one `done`.
pub fn all_done(n: usize) -> impl Fn(&[Value]) -> bool {
    move |d: &[Value]| d.len() == n && d.iter().all(|x| x["state"] == "done")
}

/// The first `len` bytes of `disk` are exactly `image`.
pub fn assert_image_on(disk: &Path, image: &Path) {
    let want = fs::read(image).unwrap();
    let got = fs::read(disk).unwrap();
    assert!(got.len() >= want.len(), "{} too short", disk.display());
    // A GPT image: its partitions' data must be there byte for byte; the
    // tables around them are the identity step's to change (it moves the
    // backup table to the disk's end and adds a CIDATA partition).
    let range = match gpt(image) {
        Some(parts) => {
            let (start, size, _) = parts[0].clone();
            (start as usize * 512)..((start + size) as usize * 512)
        }
        None => 0..want.len(),
    };
    assert!(
        got[range.clone()] == want[range],
        "{} does not hold {}",
        disk.display(),
        image.display()
    );
}

/// A disk's (or image's) GPT partitions, `(start, size, name)` in
/// sectors, read by util-linux's sfdisk; `None` without a GPT.
pub fn gpt(disk: &Path) -> Option<Vec<(u64, u64, String)>> {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let t = &v["partitiontable"];
    (t["label"] == "gpt").then(|| {
        t["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["start"].as_u64().unwrap(),
                    p["size"].as_u64().unwrap(),
                    p["name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    })
}

/// A file of the NoCloud seed on `disk`'s CIDATA partition, read on the
/// host with mtools (no mount).
pub fn seed_file(disk: &Path, name: &str) -> String {
    let parts = gpt(disk).unwrap_or_else(|| panic!("{}: no GPT", disk.display()));
    let (start, _, _) = parts
        .iter()
        .find(|p| p.2 == "CIDATA")
        .unwrap_or_else(|| panic!("{}: no CIDATA partition: {parts:?}", disk.display()))
        .clone();
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), start * 512))
        .arg(format!("::{name}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mtype {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every step a device completes (or skips), in order: its log's `ok`
/// and `skipped` rows name these once each.
pub const STEP_ORDER: [&str; 13] = [
    "loader_booted",
    "inventoried",
    "agent_delivered",
    "bios_configured",
    "raid_configured",
    "programs_run",
    "ready_for_image",
    "imaging",
    "image_verified",
    "post_install",
    "identity_written",
    "boot_to_disk",
    "done",
];
