//! fleet-sim: control-plane benchmark. Starts a real `rackcast serve` in a
//! network namespace of its own (loopback only), then N simulated devices
//! (tokio tasks) walk every workflow step against it over TCP: hello,
//! inventory (fake hardware), bundle fetch and hash check, reconnect as
//! the bundle's agent, plan steps, image request, the wave's data-plane
//! session, post-install, done. The image step is short-circuited through
//! the real wave protocol: each simulated receiver joins its wave and
//! reports the manifest's hash as verified without taking the multicast
//! (the data plane has its own benchmark). Prints devices/s and the
//! appliance's peak RSS, as a table and one JSON line.
//!
//!   fleet-sim --devices 1000 [--rackcast target/release/rackcast]
//!       [--netns NS --store postgres://rackcast@127.0.0.1:PORT/rackcast
//!        --store-password-file FILE]
//!
//! `--store` puts the fleet record in that PostgreSQL database instead of
//! the appliance's SQLite file; the server must be reachable from the
//! namespace, so with it `--netns` names a namespace the caller made (and
//! started the server in, `netlab/bench-fleet.sh`), which fleet-sim uses
//! and leaves in place.
//!
//! Run as root. Namespace `rcfs-<pid>`, loopback and 239.255.40.0/24
//! only; the appliance is stopped by PID and the namespace removed at the
//! end, also on failure.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};

use rackcast_core::backoff::Backoff;
use rackcast_core::io::conn::{Conn, Frame};
use rackcast_core::model::{AgentMode, Bundle, Command as Cmd, OpRecord, Outcome, StepData, Work};
use rackcast_core::wire::control::{self, Msg, Verdict};
use rackcast_core::wire::device::{AgentMsg, ApplianceMsg, DEVICE_PROTOCOL, MAX_FRAME};

#[derive(Parser)]
#[command(about = "Simulated fleet against a real appliance: devices/s and appliance RSS")]
struct Args {
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// The appliance binary (default: beside this one).
    #[arg(long)]
    rackcast: Option<PathBuf>,
    /// The agent binary the bundles carry (default: beside this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Download every blob for every device (default: once per blob, as
    /// devices with a cache or the same bundle on a local mirror would).
    #[arg(long)]
    fetch_all_blobs: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Run in this existing namespace (needs loopback up and a route for
    /// 239.255.40.0/24 on lo); it is left in place.
    #[arg(long)]
    netns: Option<String>,
    /// The appliance's `store` (a postgres:// URL; default: SQLite).
    #[arg(long, requires = "netns")]
    store: Option<String>,
    /// The appliance's `store_password_file`.
    #[arg(long, requires = "store")]
    store_password_file: Option<PathBuf>,
}

struct Lab {
    ns: String,
    /// The namespace is ours to remove.
    own_ns: bool,
    dir: PathBuf,
    serve: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.own_ns {
            let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

fn beside(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.parent().context("exe dir")?.join(name))
}

/// Enter the namespace: every socket this process opens from now on
/// lives there.
fn enter_netns(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd, before any runtime threads.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fleet-sim needs root (it creates a network namespace)");
    }
    rackcast_core::io::raise_fd_limit();
    let rackcast_bin = args
        .rackcast
        .clone()
        .map_or_else(|| beside("rackcast"), Ok)?;
    let agent_bin = args
        .agent
        .clone()
        .map_or_else(|| beside("rackcast-agent"), Ok)?;
    let own_ns = args.netns.is_none();
    let ns = args
        .netns
        .clone()
        .unwrap_or_else(|| format!("rcfs-{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("rcfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut lab = Lab {
        ns: ns.clone(),
        own_ns,
        dir: dir.clone(),
        serve: None,
    };
    if own_ns {
        sh(&["ip", "netns", "add", &ns])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "multicast", "on"])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "239.255.40.0/24",
            "dev",
            "lo",
        ])?;
    }
    let store = match (&args.store, &args.store_password_file) {
        (Some(url), Some(pw)) => format!(
            "store = \"{url}\"\nstore_password_file = \"{}\"\n",
            pw.display()
        ),
        (Some(url), None) => format!("store = \"{url}\"\n"),
        _ => String::new(),
    };
    let image = dir.join("tiny.img");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &data)?;
    // The simulated rack is declared in a rack inventory, as a real one is
    // (the default enrollment policy holds unknown machines).
    let inventory = dir.join("rack.csv");
    let mut csv = String::from("mac,serial\n");
    for i in 0..args.devices {
        csv += &format!("{},SIM{i:05}\n", mac(i));
    }
    std::fs::write(&inventory, csv)?;
    let config = dir.join("rackcast.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[appliance]
control_listen = "127.0.0.1:7100"
api_listen = "127.0.0.1:7180"
state_dir = "{state}"
max_inflight_bundles = 16
{store}
[dataplane]
iface = "lo"
bind = "127.0.0.1"
total_rate = "20M"
group_base = "239.255.40.1"

[enroll]
inventory = "{inventory}"

[waves]
min_members = 1
start_after = "2s"
member_timeout = "60s"

[workflow]
step_timeout = "120s"

[agents]
x86_64 = "{agent}"

[[images]]
name = "tiny"
path = "{image}"

[[profiles]]
name = "sim"
image = "tiny"
target = {{ order = "largest", count = 1 }}
bios = {{ attributes = {{ BootMode = "Uefi" }}, program = {{ name = "bios", argv = ["true"] }} }}
programs = [ {{ name = "configure", argv = ["true"] }} ]
post_install = [ {{ name = "post", argv = ["true"] }} ]
boot_to_disk = {{ name = "efiboot", argv = ["true"] }}
"#,
            state = dir.join("state").display(),
            store = store,
            inventory = inventory.display(),
            agent = agent_bin.display(),
            image = image.display(),
        ),
    )?;
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&rackcast_bin)
        .args(["serve", "--log", "warn", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let pid = child.id();
    lab.serve = Some(child);
    enter_netns(&ns)?;
    let rt = tokio::runtime::Runtime::new()?;
    let res = rt.block_on(run_fleet(
        args.devices,
        args.fetch_all_blobs,
        Duration::from_secs(args.timeout),
        pid,
    ));
    let rss = peak_rss_kib(pid);
    match res {
        Ok((secs, max_rss)) => {
            let rss = rss.max(max_rss);
            let done = devices_done(&rackcast_bin, &ns, &config)?;
            let per_s = args.devices as f64 / secs;
            println!(
                "fleet-sim  devices={}  seconds={secs:.2}  devices/s={per_s:.1}  appliance peak RSS={:.1} MiB",
                args.devices,
                rss as f64 / 1024.0
            );
            let (p50, last, waves) = barrier_summary();
            println!("  told to join a wave: median {p50:.2} s, last {last:.2} s; waves {waves}");
            println!(
                "{}",
                serde_json::json!({
                    "devices": args.devices,
                    "devices_done": done,
                    "seconds": secs,
                    "devices_per_s": per_s,
                    "appliance_peak_rss_mib": rss as f64 / 1024.0,
                    "join_wave_median_s": p50,
                    "join_wave_last_s": last,
                    "waves": waves,
                })
            );
            Ok(())
        }
        Err(e) => {
            let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("appliance log tail:");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            Err(e)
        }
    }
}

/// Devices the appliance's store records as done (`rackcast devices
/// --json`), not what the simulator believes it did.
fn devices_done(rackcast: &std::path::Path, ns: &str, config: &std::path::Path) -> Result<usize> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(rackcast)
        .args(["devices", "--json", "--config"])
        .arg(config)
        .output()?;
    if !out.status.success() {
        bail!(
            "rackcast devices: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("rackcast devices --json")?;
    Ok(rows.iter().filter(|r| r["state"] == "done").count())
}

async fn run_fleet(n: usize, all_blobs: bool, timeout: Duration, pid: u32) -> Result<(f64, u64)> {
    let server: SocketAddr = "127.0.0.1:7100".parse()?;
    // Wait for the appliance to listen.
    let up = Instant::now();
    while tokio::net::TcpStream::connect(server).await.is_err() {
        if up.elapsed() > Duration::from_secs(30) {
            bail!("appliance did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetched: Arc<Mutex<HashSet<String>>> = Arc::default();
    let t0 = Instant::now();
    let _ = T0.set(t0);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let f = fetched.clone();
        tasks.push(tokio::spawn(async move {
            sim_device(i, server, f, all_blobs).await
        }));
    }
    let sampler = tokio::spawn(async move {
        let mut max = 0;
        loop {
            max = max.max(peak_rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
            if max == u64::MAX {
                return max;
            }
        }
    });
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| anyhow!("fleet did not finish within {timeout:?}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("device failed: {e:#}");
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("device task crashed: {e}");
            }
        }
    }
    sampler.abort();
    if failed > 0 {
        bail!("{failed} of {n} simulated devices did not finish");
    }
    Ok((secs, peak_rss_kib(pid)))
}

/// When the fleet started, and when each device was told to join its
/// wave (seconds since, wave id): the control plane's part of the time,
/// apart from the wave scheduler's waits and the waves themselves.
static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static BARRIER: Mutex<Vec<(f64, i64)>> = Mutex::new(Vec::new());

/// The median and last time devices were told to join a wave, and how
/// many waves there were.
fn barrier_summary() -> (f64, f64, usize) {
    let Ok(b) = BARRIER.lock() else {
        return (0.0, 0.0, 0);
    };
    let mut t: Vec<f64> = b.iter().map(|x| x.0).collect();
    t.sort_by(f64::total_cmp);
    let waves: HashSet<i64> = b.iter().map(|x| x.1).collect();
    let at = |q: f64| {
        t.get(((t.len() as f64 * q) as usize).min(t.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.5), t.last().copied().unwrap_or(0.0), waves.len())
}

/// One device's agent connection: send `hello`, then answer commands.
struct Session {
    sink: rackcast_core::io::conn::FrameSink,
    frames: rackcast_core::io::conn::FrameStream,
    device: String,
    boot: u64,
    /// This boot's credential (issued at the loader's first contact).
    credential: [u8; 32],
    /// The key the appliance proved in the TLS handshake; bundles are
    /// checked against it like a real loader does (the simulator trusts
    /// the key it meets first).
    signer: rackcast_core::signing::TrustedKey,
}

/// Device `i`'s own source address on loopback: real devices each have
/// one, and the appliance caps connections per source.
fn source_addr(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 1, (i >> 8) as u8, (i & 0xff) as u8).into()
}

/// A TCP connection from device `i`'s address.
async fn dial(i: usize, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source_addr(i), 0))?;
    sock.connect(to).await
}

impl Session {
    async fn open(i: usize, server: SocketAddr, hello: AgentMsg) -> Result<Session> {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(5), 200);
        let stream = loop {
            match dial(i, server).await {
                Ok(s) => break s,
                Err(_) if backoff.current() < Duration::from_secs(5) => {
                    tokio::time::sleep(backoff.failed(std::time::Instant::now())).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let held = match &hello {
            AgentMsg::Hello { credential, .. } => *credential,
            _ => None,
        };
        let stream = rackcast_core::io::tls::connect(&tls_config()?, stream).await?;
        let key = rackcast_core::io::tls::peer_key(&stream)
            .ok_or_else(|| anyhow!("appliance certificate without an Ed25519 key"))?;
        let signer = rackcast_core::signing::TrustedKey::check(
            &key,
            &rackcast_core::signing::fingerprint(&key),
        )?;
        let mut conn = Conn::new(stream, MAX_FRAME);
        conn.send(&hello).await?;
        let (device, boot, credential) =
            match conn.recv::<ApplianceMsg>(Duration::from_secs(60)).await? {
                ApplianceMsg::Welcome {
                    device_id,
                    boot,
                    credential,
                    ..
                } => (device_id, boot, credential.or(held)),
                ApplianceMsg::Error { message } => bail!("appliance refused: {message}"),
                other => bail!("expected Welcome, got {other:?}"),
            };
        let credential = credential.ok_or_else(|| anyhow!("no credential issued or held"))?;
        let (sink, frames) = conn.split();
        Ok(Session {
            sink,
            frames,
            device,
            boot,
            credential,
            signer,
        })
    }

    async fn send(&mut self, m: &AgentMsg) -> Result<()> {
        self.sink.send(bytes::Bytes::from(m.encode()?)).await?;
        Ok(())
    }

    async fn next(&mut self) -> Result<ApplianceMsg> {
        loop {
            let f = tokio::time::timeout(Duration::from_secs(120), self.frames.next())
                .await
                .map_err(|_| anyhow!("no message in 120 s"))?
                .ok_or_else(|| anyhow!("appliance closed the connection"))??;
            let m = ApplianceMsg::decode(&f)?;
            if !matches!(m, ApplianceMsg::Pong) {
                return Ok(m);
            }
        }
    }

    async fn report(&mut self, cmd: &Cmd, detail: &str, data: StepData) -> Result<()> {
        self.send(&AgentMsg::Report {
            cmd_id: cmd.cmd_id,
            outcome: Outcome::Ok {
                detail: detail.into(),
            },
            data,
            ops: vec![OpRecord {
                op: format!("sim-{}", cmd.step),
                ok: true,
                exit_code: Some(0),
                duration_ms: 0,
                detail: String::new(),
            }],
        })
        .await?;
        match self.next().await? {
            ApplianceMsg::Ack { cmd_id } if cmd_id == cmd.cmd_id => Ok(()),
            ApplianceMsg::Finished { .. } => match self.next().await? {
                ApplianceMsg::Ack { .. } => Err(anyhow!("finished")),
                other => bail!("expected Ack, got {other:?}"),
            },
            other => bail!("expected Ack for {}, got {other:?}", cmd.cmd_id),
        }
    }
}

/// One client TLS configuration for every simulated device.
fn tls_config() -> Result<Arc<rackcast_core::io::tls::ClientConfig>> {
    static CFG: std::sync::OnceLock<Arc<rackcast_core::io::tls::ClientConfig>> =
        std::sync::OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let c = rackcast_core::io::tls::client_config(None)?;
    Ok(CFG.get_or_init(|| c).clone())
}

fn inventory(i: usize) -> rackcast_core::model::Inventory {
    serde_json::from_value(serde_json::json!({
        "dmi": {"vendor": "Sim", "model": "S1", "serial": format!("SIM{i:05}")},
        "cpu": {"arch": "x86_64", "count": 64},
        "memory_bytes": 274_877_906_944u64,
        "nics": [{"name": "eth0", "mac": mac(i), "pci_id": "8086:1521"}],
        "disks": [{"name": "sda", "path": "/dev/sda", "size_bytes": 960_197_124_096u64, "model": "SIM-SSD", "serial": format!("D{i}")}],
    }))
    .unwrap_or_default()
}

fn mac(i: usize) -> String {
    format!(
        "02:5a:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

async fn sim_device(
    i: usize,
    server: SocketAddr,
    fetched: Arc<Mutex<HashSet<String>>>,
    all_blobs: bool,
) -> Result<()> {
    // Loader: inventory and bundle.
    let mut s = Session::open(
        i,
        server,
        AgentMsg::Hello {
            protocol: DEVICE_PROTOCOL,
            mac: mac(i),
            device_id: None,
            mode: AgentMode::Loader { os_present: false },
            credential: None,
        },
    )
    .await?;
    let bundle_hash = loop {
        let ApplianceMsg::Run(cmd) = s.next().await? else {
            continue;
        };
        match &cmd.work {
            Work::Inventory => {
                s.report(
                    &cmd,
                    "sim inventory",
                    StepData::Inventory(Box::new(inventory(i))),
                )
                .await?;
            }
            Work::FetchBundle { hash } => {
                s.send(&AgentMsg::GetBundle { hash: hash.clone() }).await?;
                let bytes = match s.next().await? {
                    ApplianceMsg::Bundle {
                        bytes, signature, ..
                    } => {
                        s.signer
                            .verify_bundle(hash, &s.device, s.boot, &signature)?;
                        bytes
                    }
                    other => bail!("expected Bundle, got {other:?}"),
                };
                let bundle = Bundle::from_verified_bytes(&bytes, hash)?;
                let blobs = std::iter::once(bundle.agent.clone())
                    .chain(bundle.modules.iter().map(|m| m.blob.clone()));
                for b in blobs {
                    let first = fetched
                        .lock()
                        .map(|mut f| f.insert(b.hash.clone()))
                        .unwrap_or(true);
                    if all_blobs || first {
                        fetch_blob(&mut s, &b.hash, b.size).await?;
                    }
                }
                s.report(&cmd, "bundle verified", StepData::None).await?;
                break hash.clone();
            }
            _ => {} // plan steps go to the bundle's agent
        }
    };
    let device = s.device.clone();
    let credential = s.credential;
    drop(s);
    // The bundle's agent: same boot, so the loader's credential.
    let mut s = Session::open(
        i,
        server,
        AgentMsg::Hello {
            protocol: DEVICE_PROTOCOL,
            mac: mac(i),
            device_id: Some(device.clone()),
            mode: AgentMode::Agent {
                bundle: bundle_hash,
            },
            credential: Some(credential),
        },
    )
    .await?;
    loop {
        let cmd = match s.next().await? {
            ApplianceMsg::Run(cmd) => cmd,
            ApplianceMsg::Finished { .. } => return Ok(()),
            ApplianceMsg::Error { message } => bail!("appliance: {message}"),
            _ => continue,
        };
        let r = match &cmd.work {
            Work::JoinWave(join) => {
                if let (Some(t0), Ok(mut b)) = (T0.get(), BARRIER.lock()) {
                    b.push((t0.elapsed().as_secs_f64(), join.wave_id));
                }
                join_wave(i, join.control, &device, credential).await?;
                s.report(
                    &cmd,
                    "sim image verified",
                    StepData::ImageWritten {
                        hash: join.image_hash.clone(),
                        bytes: join.image_size,
                    },
                )
                .await
            }
            _ => s.report(&cmd, "sim step ok", StepData::None).await,
        };
        match r {
            Ok(()) => {}
            Err(e) if e.to_string() == "finished" => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

async fn fetch_blob(s: &mut Session, hash: &str, size: u64) -> Result<()> {
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    while off < size {
        s.send(&AgentMsg::GetBlob {
            hash: hash.to_string(),
            offset: off,
        })
        .await?;
        match s.next().await? {
            ApplianceMsg::BlobChunk { data, .. } if !data.is_empty() => {
                h.update(&data);
                off += data.len() as u64;
            }
            other => bail!("expected a blob chunk, got {other:?}"),
        }
    }
    if h.finalize().to_hex().as_str() != hash {
        bail!("blob {hash} does not match its hash");
    }
    Ok(())
}

/// The wave's session without the multicast: hello, ready, verified.
async fn join_wave(i: usize, control: SocketAddr, name: &str, credential: [u8; 32]) -> Result<()> {
    let stream = dial(i, control).await?;
    let stream = rackcast_core::io::tls::connect(&tls_config()?, stream).await?;
    let mut conn = Conn::new(stream, control::MAX_FRAME);
    conn.send(&Msg::Hello {
        protocol: control::PROTOCOL_VERSION,
        name: name.to_string(),
        credential: Some(credential),
        relay_port: None,
    })
    .await?;
    let session = match conn.recv::<Msg>(Duration::from_secs(60)).await? {
        Msg::Welcome { session, .. } => session,
        Msg::Error { message } => bail!("wave refused {name}: {message}"),
        other => bail!("expected Welcome, got {other:?}"),
    };
    conn.send(&Msg::Ready { resumed_blocks: 0 }).await?;
    conn.send(&Msg::Done(Verdict::Verified {
        image_hash: session.manifest.image_hash,
    }))
    .await?;
    // Like a real receiver, leave once the verdict is out.
    drop(conn);
    Ok(())
}
