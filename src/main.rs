//! `rackcast`: the appliance binary: `serve` (the appliance), the fleet
//! CLI (`devices`, `log`, `waves`, `images`, `retry`), and the standalone
//! data-plane sender and manifest tool.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use rackcast_core::dataplane::sender::SenderConfig;
use rackcast_core::image::manifest::{Manifest, DEFAULT_BLOCK_SIZE};
use rackcast_core::io::send::{run_send, SendOptions, SendReport};
use rackcast_core::wire::packet::symbol_size_for_mtu;

#[derive(Parser)]
#[command(
    name = "rackcast",
    version,
    about = "Bare-metal rack imaging appliance"
)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `rackcast=debug`.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one image to a wave of receivers over multicast.
    Send(SendArgs),
    /// Relay a wave onto this segment: join an upstream wave (`rackcast
    /// send` or an appliance's) as one receiver, taking it by unicast,
    /// and re-multicast each block on this segment as soon as it is
    /// written and checked, answering the local receivers' feedback
    /// with this relay's own repair.
    Relay(RelayArgs),
    /// Build an image's manifest (block hashes, zero blocks) ahead of time.
    Manifest(ManifestArgs),
    /// Run the appliance: control plane, workflow, waves, REST API.
    Serve(ConfigArg),
    /// Table of devices: MAC, state, step, wave, progress.
    Devices(ListArgs),
    /// Every operation on one device, with time and duration.
    Log(LogArgs),
    /// The hardware a device reported: DMI, CPU, memory, NICs, disks.
    Inventory(LogArgs),
    /// Waves: image, members, verified, state.
    Waves(ListArgs),
    /// The image store.
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Retry a failed device from its failed step; on a device that has
    /// not failed but whose agent is gone (it restarted unannounced),
    /// let its next boot claim it again (asks the running appliance
    /// through its API).
    Retry(LogArgs),
    /// Install a finished device again: its next network boot loads the
    /// loader instead of its disk; a machine with a BMC in the rack
    /// inventory is set to boot from the network once and reset (asks
    /// the running appliance).
    Reinstall(LogArgs),
    /// Power control through each machine's BMC (Redfish, or IPMI via
    /// ipmitool): every call is logged on the device with what the BMC
    /// answered and what was read back (asks the running appliance).
    Power(PowerArgs),
    /// The BMCs of the rack inventory.
    #[command(subcommand)]
    Bmc(BmcCmd),
    /// The bring-up live: devices by state, waves with progress, rate
    /// and ETA, failures with their reason; redrawn as the appliance
    /// pushes changes (server-sent events). Ctrl-C ends it.
    Watch(ConfigArg),
    /// Power a rack on through its BMCs, `[bmc] power_on_per_second` at
    /// a time, and show machines arriving: each must network-boot within
    /// `[bmc] boot_timeout` (else it is reported and, with `retries`,
    /// power-cycled again). Machines already up are left alone.
    Bringup(BringupArgs),
    /// Install a device held after its inventory: unknown to the rack
    /// inventory under `[enroll] policy = "approve"`, or reporting another
    /// serial than the inventory lists (asks the running appliance).
    Approve(LogArgs),
    /// Fingerprint of the appliance's bundle-signing key (made on first
    /// use): what `rackcast-agent run --trust-key` and `rackcast.key=` on a
    /// loader's kernel command line take.
    Key(ConfigArg),
    /// Operator API tokens (stored as hashes; shown once, at creation).
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum BmcCmd {
    /// Reach every BMC and read its power state, changing nothing: which
    /// answer and which do not (exit status 1 if any does not).
    Check(ListArgs),
}

#[derive(clap::Args)]
struct BringupArgs {
    /// The rack (the inventory's `rack` column).
    #[arg(long)]
    rack: Option<String>,
    /// Every machine that has a BMC.
    #[arg(long)]
    all: bool,
    /// Or these devices (ids or MACs).
    devices: Vec<String>,
    #[command(flatten)]
    cfg: ConfigArg,
}

#[derive(clap::Args)]
struct PowerArgs {
    /// What to do.
    #[arg(value_parser = ["on", "off", "cycle", "status", "pxe-once"])]
    action: String,
    /// Device ids (`rc-<mac hex>`) or MACs.
    devices: Vec<String>,
    /// Every machine of this rack (the inventory's `rack` column).
    #[arg(long)]
    rack: Option<String>,
    /// Every machine that has a BMC.
    #[arg(long)]
    all: bool,
    /// Needed to power off or cycle a whole rack or every machine.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    cfg: ConfigArg,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token and print it (once). `viewer` reads; `admin` also
    /// acts (retry, reinstall). The CLI and scripts pass it in
    /// RACKCAST_TOKEN or a file named by RACKCAST_TOKEN_FILE.
    Create {
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        #[command(flatten)]
        cfg: ConfigArg,
    },
    /// Token names and roles (never the tokens).
    List(ListArgs),
    /// Remove a token: requests carrying it are refused from now on.
    Revoke {
        name: String,
        #[command(flatten)]
        cfg: ConfigArg,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Appliance configuration (see rackcast.example.toml).
    #[arg(long, short, default_value = "/etc/rackcast/rackcast.toml")]
    config: PathBuf,
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    cfg: ConfigArg,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LogArgs {
    /// Device id (`rc-<mac hex>`) or MAC.
    device: String,
    #[command(flatten)]
    cfg: ConfigArg,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Add (or replace) an image from a file or an http(s) URL (raw, .zst,
    /// .xz, .gz or qcow2): stores the raw image, its manifest and its
    /// compressed blocks.
    Add {
        name: String,
        /// A file, or an http:// / https:// URL (downloads resume).
        source: String,
        /// BLAKE3 (hex) the source must hash to; a download that does not is
        /// removed.
        #[arg(long)]
        blake3: Option<String>,
        #[command(flatten)]
        cfg: ConfigArg,
    },
    List(ListArgs),
}

/// A wave's sending side, shared by `send` and `relay` (whose local wave
/// is a wave like any other).
#[derive(clap::Args)]
struct WaveArgs {
    /// Interface to send on (its IPv4 address picks the multicast route).
    #[arg(long)]
    iface: Option<String>,
    /// Multicast group and port, e.g. 239.255.1.1:9000 (239.0.0.0/8 only).
    #[arg(long)]
    group: SocketAddrV4,
    /// TCP address receivers connect to (manifest, key, feedback).
    #[arg(long)]
    control: SocketAddr,
    /// Rate ceiling in bit/s on the wire, counted in Ethernet frames (k/M/G).
    #[arg(long, value_parser = rackcast_core::parse_rate)]
    rate: u64,
    /// Receivers to wait for before sending.
    #[arg(long)]
    receivers: usize,
    /// Start with those present after this many seconds; receivers that
    /// never came count as failed.
    #[arg(long, default_value_t = 60)]
    start_timeout: u64,
    /// Drop a receiver silent for this many seconds.
    #[arg(long, default_value_t = 15)]
    receiver_timeout: u64,
    /// Blocks interleaved in the source phase.
    #[arg(long, default_value_t = 8)]
    interleave: usize,
    /// Resend exactly the source symbols receivers miss while their union
    /// is at most this many times the largest shortfall (receivers then
    /// never decode); beyond it, fountain repair. 0 = always fountain.
    #[arg(long, default_value_t = 4.0)]
    source_resend_factor: f64,
    /// Worst receiver loss above which the rate is cut (0..1).
    #[arg(long, default_value_t = 0.25)]
    loss_threshold: f64,
    /// A receiver that cannot keep up with the others: catch_up (the wave
    /// goes on; it gets what it lacks after them), wait (the wave slows to
    /// it) or drop (it fails).
    #[arg(long, default_value = "catch_up")]
    slow_members: rackcast_core::dataplane::sender::SlowMembers,
    /// Receiver feedback interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    feedback_ms: u32,
    /// Datagrams per UDP GSO send; 1 disables GSO (plain sendmmsg).
    #[arg(long, default_value_t = 16)]
    gso_segments: usize,
    /// Multicast TTL.
    #[arg(long, default_value_t = 1)]
    ttl: u32,
}

impl WaveArgs {
    /// The sender core's settings, after checking what a core cannot.
    fn sender_config(&self) -> Result<SenderConfig> {
        if !rackcast_core::is_lab_or_admin_group(*self.group.ip()) {
            bail!(
                "group {} is not in 239.0.0.0/8 (administratively scoped)",
                self.group
            );
        }
        if self.receivers == 0 {
            bail!("--receivers must be at least 1");
        }
        if !(0.0..1.0).contains(&self.loss_threshold) {
            bail!("--loss-threshold must be in 0..1");
        }
        Ok(SenderConfig {
            expected: self.receivers,
            start_timeout: Duration::from_secs(self.start_timeout),
            receiver_timeout: Duration::from_secs(self.receiver_timeout),
            rate_bps: self.rate,
            min_rate_bps: (self.rate / 10).max(1_000_000),
            loss_threshold: self.loss_threshold,
            interleave: self.interleave.max(1),
            source_resend_factor: self.source_resend_factor.max(0.0),
            slow_members: self.slow_members,
            ..Default::default()
        })
    }

    /// The wave's options around its image.
    fn options(
        &self,
        cfg: SenderConfig,
        image: PathBuf,
        manifest: Manifest,
        frames: Option<PathBuf>,
        tls: std::sync::Arc<rustls::ServerConfig>,
        label: &str,
    ) -> SendOptions {
        SendOptions {
            image,
            manifest,
            frames,
            iface: self.iface.clone(),
            group: self.group,
            control: self.control,
            ttl: self.ttl,
            feedback_ms: self.feedback_ms,
            hello_timeout: Duration::from_secs(10),
            gso_segments: self.gso_segments.clamp(1, 64),
            cfg,
            wave_label: label.into(),
            tls,
            gate: None,
        }
    }
}

#[derive(clap::Args)]
struct SendArgs {
    /// Image file (raw).
    image: PathBuf,
    #[command(flatten)]
    wave: WaveArgs,
    /// Path MTU; sets the symbol size.
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    /// Block size in bytes (one RaptorQ source block each).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Prebuilt manifest (`rackcast manifest`); built on the fly if absent.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The prepared blocks file that goes with `--manifest` when it was
    /// built with `--zstd`.
    #[arg(long, requires = "manifest")]
    frames: Option<PathBuf>,
    /// Without `--manifest`: compress blocks at this zstd level before the
    /// wave (into a temporary blocks file beside the image).
    #[arg(long, conflicts_with = "manifest")]
    zstd: Option<i32>,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// `rackcast relay`: the upstream session, then the local wave (`--iface`,
/// `--group`, `--control`, `--rate`, `--receivers`... are the local
/// wave's, as `rackcast send` takes them).
#[derive(clap::Args)]
struct RelayArgs {
    /// The upstream wave's control address (`rackcast send --control`).
    #[arg(long)]
    upstream: SocketAddr,
    /// Fingerprint of the key the upstream must prove.
    #[arg(long)]
    trust_key: Option<String>,
    /// This relay's name towards the upstream.
    #[arg(long)]
    name: Option<String>,
    /// UDP port the upstream copies its wave to (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory for the relay's copy of the image and its compressed
    /// blocks (rewritten for each wave).
    #[arg(long)]
    cache: PathBuf,
    /// Give up on the upstream when it sent nothing this many seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    #[command(flatten)]
    wave: WaveArgs,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ManifestArgs {
    image: PathBuf,
    /// Output file (default: `<image>.rcmanifest`).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Compress the blocks that shrink at this zstd level (1..=19) and
    /// write their frames to `--frames`.
    #[arg(long, requires = "frames")]
    zstd: Option<i32>,
    /// Prepared blocks file to write with `--zstd`.
    #[arg(long)]
    frames: Option<PathBuf>,
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: u32,
}

fn symbol_size(mtu: usize) -> Result<u16> {
    symbol_size_for_mtu(mtu).with_context(|| format!("MTU {mtu} leaves no room for a symbol"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    rackcast_core::io::tune_allocator();
    rackcast_core::io::init_logs(&cli.log);
    match cli.cmd {
        Cmd::Serve(a) => {
            let cfg = rackcast::config::Config::load(&a.config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(rackcast::controller::serve(cfg, a.config.clone()))
        }
        Cmd::Devices(a) => fleet::devices(&a.cfg.config, a.json),
        Cmd::Log(a) => fleet::log(&a.cfg.config, &a.device, a.json),
        Cmd::Inventory(a) => fleet::inventory(&a.cfg.config, &a.device, a.json),
        Cmd::Waves(a) => fleet::waves(&a.cfg.config, a.json),
        Cmd::Images(ImagesCmd::Add {
            name,
            source,
            blake3,
            cfg,
        }) => fleet::images_add(&cfg.config, &name, &source, blake3.as_deref()),
        Cmd::Images(ImagesCmd::List(a)) => fleet::images_list(&a.cfg.config, a.json),
        Cmd::Retry(a) => fleet::ask(
            &a.cfg.config,
            &a.device,
            "retry",
            "retrying its failed step",
        ),
        Cmd::Reinstall(a) => fleet::reinstall(&a.cfg.config, &a.device),
        Cmd::Power(a) => fleet::power(&a),
        Cmd::Bmc(BmcCmd::Check(a)) => fleet::bmc_check(&a.cfg.config, a.json),
        Cmd::Bringup(a) => fleet::bringup(&a),
        Cmd::Watch(a) => fleet::watch(&a.config),
        Cmd::Approve(a) => fleet::ask(&a.cfg.config, &a.device, "approve", "approved: installing"),
        Cmd::Token(TokenCmd::Create { name, role, cfg }) => {
            fleet::token_create(&cfg.config, &name, &role)
        }
        Cmd::Token(TokenCmd::List(a)) => fleet::token_list(&a.cfg.config, a.json),
        Cmd::Token(TokenCmd::Revoke { name, cfg }) => fleet::token_revoke(&cfg.config, &name),
        Cmd::Key(a) => {
            let cfg = rackcast::config::Config::load(&a.config)?;
            let signer =
                rackcast_core::signing::BundleSigner::load_or_create(&cfg.signing_key_path())?;
            println!("{}", signer.fingerprint());
            Ok(())
        }
        Cmd::Manifest(a) => {
            let t = Instant::now();
            let (m, _) = pack_image(
                &a.image,
                a.block_size,
                symbol_size(a.mtu)?,
                a.zstd,
                a.frames.as_deref(),
            )?;
            let out = a
                .out
                .unwrap_or_else(|| PathBuf::from(format!("{}.rcmanifest", a.image.display())));
            m.save(&a.image, &out)?;
            println!(
                "{}: {} bytes, {} blocks ({} zero, {} compressed), {} bytes on the wire, blake3 {} -> {} ({:.2} s)",
                a.image.display(),
                m.image_size,
                m.block_count(),
                m.blocks.iter().filter(|b| b.zero).count(),
                m.compressed_blocks(),
                m.data_bytes(),
                m.image_hash_hex(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Send(a) => send(a),
        Cmd::Relay(a) => relay(a),
    }
}

/// Describe `image` and, with a zstd level, write the frames of the
/// blocks that shrink to `frames`.
fn pack_image(
    image: &std::path::Path,
    block_size: u32,
    ss: u16,
    level: Option<i32>,
    frames: Option<&std::path::Path>,
) -> Result<(Manifest, Option<PathBuf>)> {
    use rackcast_core::image::packed;
    let Some(level) = level else {
        let m = Manifest::build(image, block_size, ss)
            .with_context(|| format!("building manifest of {}", image.display()))?;
        return Ok((m, None));
    };
    let frames = frames.context("--zstd needs a blocks file")?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(frames).with_context(|| format!("{}", frames.display()))?,
    );
    let m = packed::pack_file(image, block_size, ss, Some(level), &mut out, &mut |_| {})
        .with_context(|| format!("preparing blocks of {}", image.display()))?;
    std::io::Write::flush(&mut out)?;
    Ok((m, Some(frames.to_path_buf())))
}

/// A lab wave has no appliance key: a key for this run only. Its
/// fingerprint is printed so receivers can pin it (`--trust-key`).
fn lab_tls() -> Result<(String, std::sync::Arc<rustls::ServerConfig>)> {
    let signer = rackcast_core::signing::BundleSigner::from_seed(rand::random());
    let tls = rackcast::controller::tls::control_config(&signer)?;
    Ok((signer.fingerprint(), tls))
}

fn send(a: SendArgs) -> Result<()> {
    let cfg = a.wave.sender_config()?;
    let ss = symbol_size(a.mtu)?;
    // A blocks file made here is removed when the wave ends.
    let mut temp_frames = None;
    let (manifest, frames) = match (&a.manifest, a.zstd) {
        (Some(p), _) => (Manifest::load_for(&a.image, p)?, a.frames.clone()),
        (None, None) => (
            Manifest::build(&a.image, a.block_size, ss)
                .with_context(|| format!("building manifest of {}", a.image.display()))?,
            None,
        ),
        (None, Some(level)) => {
            let dir = a.image.parent().unwrap_or(std::path::Path::new("."));
            let tmp = tempfile::Builder::new()
                .prefix(".rackcast-frames-")
                .tempfile_in(dir)
                .with_context(|| format!("temporary blocks file in {}", dir.display()))?;
            let (m, _) = pack_image(&a.image, a.block_size, ss, Some(level), Some(tmp.path()))?;
            let p = tmp.path().to_path_buf();
            temp_frames = Some(tmp);
            (m, Some(p))
        }
    };
    if manifest.symbol_size != ss {
        bail!(
            "manifest symbol size {} does not match MTU {} (symbol size {ss})",
            manifest.symbol_size,
            a.mtu
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if let Some(addr) = a.metrics {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("metrics listener on {addr}"))?;
            rackcast_core::io::metrics::register();
        }
        let (key, tls) = lab_tls()?;
        let w = &a.wave;
        eprintln!(
            "rackcast send: {} ({} bytes, {} blocks) to {} at {} bit/s, waiting for {} receiver(s) on {} (TLS key {key})",
            a.image.display(),
            manifest.image_size,
            manifest.block_count(),
            w.group,
            w.rate,
            w.receivers,
            w.control,
        );
        let opts = w.options(cfg, a.image.clone(), manifest, frames, tls, "send");
        let report = run_send(opts).await?;
        drop(temp_frames);
        print_report(&report, a.json)?;
        if !report.ok {
            std::process::exit(1);
        }
        Ok(())
    })
}

fn relay(a: RelayArgs) -> Result<()> {
    use rackcast_core::io::receive::{default_decoders, ReceiveOptions};
    use rackcast_core::io::relay::{run_relay, LocalImage, RelayOptions};
    let cfg = a.wave.sender_config()?;
    std::fs::create_dir_all(&a.cache)
        .with_context(|| format!("relay cache {}", a.cache.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (key, tls) = lab_tls()?;
        let listener = rackcast_core::io::send::bind_control(a.wave.control).await?;
        eprintln!(
            "rackcast relay: from {} to {} at {} bit/s, waiting for {} receiver(s) on {} (TLS key {key})",
            a.upstream, a.wave.group, a.wave.rate, a.wave.receivers, a.wave.control,
        );
        let upstream = ReceiveOptions {
            server: a.upstream,
            out: a.cache.join("image"),
            iface: None,
            name: a.name.clone(),
            state: Some(a.cache.join("image.rcresume")),
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(a.idle_timeout),
            rcvbuf: 64 << 20,
            decoders: default_decoders(),
            delta: false,
            trust_key: a.trust_key.clone(),
            credential: None,
            expect_image: None,
            disk: false,
        };
        let wave = a.wave;
        let local = Box::new(move |img: LocalImage| SendOptions {
            gate: Some(img.gate),
            ..wave.options(cfg, img.image, img.manifest, img.frames, tls, "relay")
        });
        let report = run_relay(RelayOptions {
            upstream,
            port: a.port,
            frames: a.cache.join("image.rcblocks"),
            local,
            listener,
            link: None,
        })
        .await?;
        if let Some(u) = &report.upstream {
            println!(
                "upstream: {} in {:.2} s, {}",
                u.image_hash,
                u.seconds,
                if u.verified { "VERIFIED" } else { "FAILED" }
            );
        }
        if let Some(l) = &report.local {
            print_report(l, false)?;
        }
        if let Some(t) = report.tail_seconds {
            println!("local wave ended {t:.2} s after the relay's copy verified");
        }
        if let Some(e) = &report.error {
            println!("error: {e}");
        }
        println!("relay: {}", if report.ok { "OK" } else { "FAILED" });
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        if !report.ok {
            std::process::exit(1);
        }
        Ok(())
    })
}

fn print_report(r: &SendReport, json: bool) -> Result<()> {
    println!(
        "wave: {} bytes in {:.2} s (source phase {:.2} s), goodput {:.1} Mbit/s ({:.3} x rate), repair overhead {:.2} %, {} source + {} repair packets ({} of them resent source symbols, {} coded)",
        r.image_bytes,
        r.seconds,
        r.source_seconds,
        r.goodput_bps / 1e6,
        r.goodput_bps / r.rate_bps as f64,
        r.repair_overhead_pct,
        r.source_packets,
        r.repair_packets,
        r.resent_source_packets,
        r.coded_packets
    );
    for rx in &r.receivers {
        println!(
            "  {:<32} {:<10} {:>8} resumed={} auth_failures={}{}",
            rx.name,
            if rx.ok { "VERIFIED" } else { "FAILED" },
            rx.seconds.map_or("-".into(), |s| format!("{s:.2}s")),
            rx.resumed_blocks,
            rx.auth_failures,
            if rx.fell_behind {
                " fell behind (caught up after the others)"
            } else {
                ""
            }
        );
        if !rx.ok {
            println!("    {}", rx.verdict);
        }
    }
    let missing = r.expected_receivers.saturating_sub(r.receivers.len());
    if missing > 0 {
        println!("  {missing} expected receiver(s) never connected");
    }
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
    println!("result: {}", if r.ok { "OK" } else { "FAILED" });
    if json {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

/// The fleet CLI: reads the appliance's store (read-only; safe while it
/// runs) and prints tables or JSON.
mod fleet {
    use std::path::Path;

    use anyhow::{Context, Result};
    use rackcast::config::Config;
    use rackcast::store::{self, Store};

    fn open(config: &Path) -> Result<(Config, Box<dyn Store>)> {
        let cfg = Config::load(config)?;
        let loc = cfg.store_location();
        let st = store::open_readonly(&loc)
            .with_context(|| format!("opening the fleet record {loc}"))?;
        Ok((cfg, st))
    }

    /// The fleet record to write (tokens, images): made if it is new.
    fn open_rw(cfg: &Config) -> Result<Box<dyn Store>> {
        cfg.ensure_state_dir()?;
        let loc = cfg.store_location();
        store::open(&loc).with_context(|| format!("opening the fleet record {loc}"))
    }

    fn ms_to_time(ms: i64) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
        humantime::format_rfc3339_millis(t).to_string()
    }

    /// One HTTP/1.1 request to the appliance's API (it listens on the
    /// provisioning network, plain HTTP): status and body.
    /// A request to the running appliance's operator API: HTTPS trusting
    /// only the appliance's own certificate (pinned: the file in its state
    /// dir, or `appliance.operator_cert`), with the token from
    /// RACKCAST_TOKEN or the file RACKCAST_TOKEN_FILE names. A POST carries
    /// a JSON body.
    /// The operator API's address, the caller's token, and a client that
    /// trusts only the appliance's own certificate.
    fn operator_client(
        cfg: &Config,
        timeout: Option<std::time::Duration>,
    ) -> Result<(std::net::SocketAddr, String, reqwest::Client)> {
        let addr = cfg.appliance.operator_listen.context(
            "appliance.operator_listen is not set: the appliance has no operator API to ask",
        )?;
        let token = match std::env::var("RACKCAST_TOKEN") {
            Ok(t) => t,
            Err(_) => match std::env::var("RACKCAST_TOKEN_FILE") {
                Ok(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading RACKCAST_TOKEN_FILE {f}"))?
                    .trim()
                    .to_string(),
                Err(_) => anyhow::bail!(
                    "no operator token: set RACKCAST_TOKEN or RACKCAST_TOKEN_FILE (make one with `rackcast token create`)"
                ),
            },
        };
        let (cert, _) = cfg.operator_tls_paths();
        let pem = std::fs::read(&cert)
            .with_context(|| format!("reading the operator certificate {}", cert.display()))?;
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        let client = b.build()?;
        Ok((addr, token, client))
    }

    fn operator(cfg: &Config, method: &str, path: &str) -> Result<(u16, String)> {
        operator_with(cfg, method, path, "{}", std::time::Duration::from_secs(10))
    }

    /// A request with a JSON `body` (POST) and its own time limit: BMC
    /// calls wait for power changes to read back.
    fn operator_with(
        cfg: &Config,
        method: &str,
        path: &str,
        body: &str,
        timeout: std::time::Duration,
    ) -> Result<(u16, String)> {
        let (addr, token, client) = operator_client(cfg, Some(timeout))?;
        let url = format!("https://{addr}{path}");
        let req = match method {
            "POST" => client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            _ => client.get(&url),
        }
        .bearer_auth(token);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let resp = req.send().await?;
            let code = resp.status().as_u16();
            Ok((code, resp.text().await?))
        })
    }

    pub fn token_create(config: &Path, name: &str, role: &str) -> Result<()> {
        use rackcast::controller::auth;
        let cfg = Config::load(config)?;
        let mut st = open_rw(&cfg)?;
        let token = auth::new_token();
        st.put_token(name, role, &auth::token_hash(&token))
            .with_context(|| format!("token {name} (names are unique)"))?;
        eprintln!("{role} token {name} (shown once; only its hash is kept):");
        println!("{token}");
        Ok(())
    }

    pub fn token_list(config: &Path, json: bool) -> Result<()> {
        let (_, mut st) = open(config)?;
        let tokens = st.tokens()?;
        if json {
            println!("{}", serde_json::to_string(&tokens)?);
            return Ok(());
        }
        println!("{:<24} {:<8} CREATED", "NAME", "ROLE");
        for t in tokens {
            println!("{:<24} {:<8} {}", t.name, t.role, ms_to_time(t.created_at));
        }
        Ok(())
    }

    pub fn token_revoke(config: &Path, name: &str) -> Result<()> {
        let cfg = Config::load(config)?;
        let mut st = open_rw(&cfg)?;
        if !st.revoke_token(name)? {
            anyhow::bail!("no token named {name}");
        }
        println!("token {name} revoked");
        Ok(())
    }

    /// POST an operator action (`retry`, `reinstall`) for one device to
    /// the running appliance.
    pub fn ask(config: &Path, device: &str, action: &str, done: &str) -> Result<()> {
        let cfg = Config::load(config)?;
        let id = device_arg(device);
        let (code, body) = operator(&cfg, "POST", &format!("/api/devices/{id}/{action}"))
            .context("asking the appliance")?;
        if code != 200 {
            anyhow::bail!("{action} {id}: HTTP {code}: {body}");
        }
        println!("{id}: {done}");
        Ok(())
    }

    /// How long a CLI waits for BMC calls: each machine's calls are
    /// bounded by the appliance; this bounds the whole batch.
    const BMC_WAIT: std::time::Duration = std::time::Duration::from_secs(900);

    fn print_bmc_results(results: &[rackcast::bmc::CallResult]) {
        for r in results {
            let state = match (r.ok, r.powered) {
                (false, _) if r.retryable => "FAILED (retryable)".to_string(),
                (false, _) => "FAILED".to_string(),
                (true, Some(true)) => "on".to_string(),
                (true, Some(false)) => "off".to_string(),
                (true, None) => "ok".to_string(),
            };
            println!(
                "{:<18} {:<28} {:<9} {:<18} {}",
                r.device,
                r.bmc,
                r.action.as_str(),
                state,
                r.detail
            );
        }
    }

    pub fn power(a: &super::PowerArgs) -> Result<()> {
        // Turning a rack off is one typo away from an outage: ask for it
        // in words.
        if (a.all || a.rack.is_some()) && (a.action == "off" || a.action == "cycle") && !a.yes {
            anyhow::bail!(
                "power {} of {} stops running machines: add --yes if that is what you mean",
                a.action,
                if a.all {
                    "every machine".to_string()
                } else {
                    format!("rack {}", a.rack.as_deref().unwrap_or(""))
                }
            );
        }
        let cfg = Config::load(&a.cfg.config)?;
        let body = serde_json::json!({
            "action": a.action.replace('-', "_"),
            "devices": a.devices,
            "rack": a.rack,
            "all": a.all,
        });
        let (code, text) = operator_with(&cfg, "POST", "/api/power", &body.to_string(), BMC_WAIT)
            .context("asking the appliance")?;
        if code != 200 {
            anyhow::bail!("power {}: HTTP {code}: {text}", a.action);
        }
        let results: Vec<rackcast::bmc::CallResult> = serde_json::from_str(&text)?;
        if a.json {
            println!("{text}");
        } else {
            print_bmc_results(&results);
        }
        let failed = results.iter().filter(|r| !r.ok).count();
        if failed > 0 {
            anyhow::bail!("{failed} of {} BMC call(s) failed", results.len());
        }
        Ok(())
    }

    /// Stream `GET /api/events` and redraw the screen on each view;
    /// reconnect (backing off to 5 s) when the appliance goes away.
    pub fn watch(config: &Path) -> Result<()> {
        use std::io::Write;
        let cfg = Config::load(config)?;
        let (addr, token, client) = operator_client(&cfg, None)?;
        let url = format!("https://{addr}/api/events");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut wait = std::time::Duration::from_millis(200);
            loop {
                let res: Result<()> = async {
                    let resp = client.get(&url).bearer_auth(&token).send().await?;
                    let code = resp.status();
                    if code == reqwest::StatusCode::UNAUTHORIZED
                        || code == reqwest::StatusCode::FORBIDDEN
                    {
                        // Not worth retrying: the token is wrong.
                        eprintln!("rackcast watch: HTTP {code}: check RACKCAST_TOKEN");
                        std::process::exit(1);
                    }
                    let mut resp = resp.error_for_status()?;
                    wait = std::time::Duration::from_millis(200);
                    let mut parser = rackcast::watch::SseParser::default();
                    while let Some(chunk) = resp.chunk().await? {
                        for (event, data) in parser.feed(&chunk).map_err(anyhow::Error::msg)? {
                            if event != "view" {
                                continue;
                            }
                            let view: rackcast::controller::views::LiveView =
                                serde_json::from_str(&data)?;
                            let (rows, cols) = rackcast::watch::terminal_size();
                            let title = format!(
                                "rackcast watch  {addr}  {}   (Ctrl-C to quit)",
                                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                            );
                            let lines = rackcast::watch::render(&view, &title, rows, cols);
                            let mut out = std::io::stdout().lock();
                            write!(out, "\x1b[H\x1b[2J{}", lines.join("\r\n"))?;
                            out.flush()?;
                        }
                    }
                    Ok(())
                }
                .await;
                let why = match res {
                    Ok(()) => "the appliance closed the stream".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                eprintln!("\r\nrackcast watch: {why}; reconnecting in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
        })
    }

    pub fn bringup(a: &super::BringupArgs) -> Result<()> {
        use std::collections::BTreeMap;
        let cfg = Config::load(&a.cfg.config)?;
        let body = serde_json::json!({ "devices": a.devices, "rack": a.rack, "all": a.all });
        let (code, text) = operator_with(
            &cfg,
            "POST",
            "/api/bringup",
            &body.to_string(),
            std::time::Duration::from_secs(30),
        )
        .context("asking the appliance")?;
        if code != 202 {
            anyhow::bail!("bringup: HTTP {code}: {text}");
        }
        let st: serde_json::Value = serde_json::from_str(&text)?;
        for s in st["skipped"].as_array().into_iter().flatten() {
            println!(
                "{:<18} left alone: already up ({})",
                s[0].as_str().unwrap_or(""),
                s[1].as_str().unwrap_or("")
            );
        }
        let total = st["machines"].as_array().map_or(0, Vec::len);
        println!(
            "bringup of {total} machine(s), {} per second, each to network-boot within {}",
            cfg.bmc.power_on_per_second,
            humantime::format_duration(cfg.bmc.boot_timeout)
        );
        // Each machine's phase as it changes, until all are over.
        let mut shown: BTreeMap<String, String> = BTreeMap::new();
        let t0 = std::time::Instant::now();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let (code, text) = operator(&cfg, "GET", "/api/bringup")?;
            if code != 200 {
                anyhow::bail!("bringup status: HTTP {code}: {text}");
            }
            let st: serde_json::Value = serde_json::from_str(&text)?;
            for m in st["machines"].as_array().into_iter().flatten() {
                let dev = m["device"].as_str().unwrap_or("").to_string();
                let phase = match m["phase"].as_str().unwrap_or("") {
                    "power_failed" => {
                        format!("power-on FAILED: {}", m["why"].as_str().unwrap_or(""))
                    }
                    "not_booted" => format!("did NOT network-boot ({} attempt(s))", m["attempts"]),
                    "awaiting_boot" => format!(
                        "powered on, waiting for its network boot (attempt {})",
                        m["attempts"]
                    ),
                    "booted" => "network-booted".to_string(),
                    p => p.replace('_', " "),
                };
                if shown.get(&dev) != Some(&phase) {
                    println!("{:>6.1}s  {dev:<18} {phase}", t0.elapsed().as_secs_f64());
                    shown.insert(dev, phase);
                }
            }
            if st["finished"] == true {
                let machines = st["machines"].as_array().cloned().unwrap_or_default();
                let booted = machines.iter().filter(|m| m["phase"] == "booted").count();
                println!("{booted} of {} machine(s) network-booted", machines.len());
                if booted < machines.len() {
                    std::process::exit(1);
                }
                return Ok(());
            }
        }
    }

    pub fn bmc_check(config: &Path, json: bool) -> Result<()> {
        let cfg = Config::load(config)?;
        let (code, text) = operator_with(&cfg, "POST", "/api/bmc/check", "{}", BMC_WAIT)
            .context("asking the appliance")?;
        if code != 200 {
            anyhow::bail!("bmc check: HTTP {code}: {text}");
        }
        let results: Vec<rackcast::bmc::CallResult> = serde_json::from_str(&text)?;
        let silent = results.iter().filter(|r| !r.ok).count();
        if json {
            println!("{text}");
        } else {
            print_bmc_results(&results);
            println!(
                "{} BMC(s): {} answered, {silent} did not",
                results.len(),
                results.len() - silent
            );
        }
        if silent > 0 {
            std::process::exit(1);
        }
        Ok(())
    }

    pub fn reinstall(config: &Path, device: &str) -> Result<()> {
        let cfg = Config::load(config)?;
        let id = device_arg(device);
        let (code, text) = operator_with(
            &cfg,
            "POST",
            &format!("/api/devices/{id}/reinstall"),
            "{}",
            BMC_WAIT,
        )
        .context("asking the appliance")?;
        if code != 200 {
            anyhow::bail!("reinstall {id}: HTTP {code}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let results: Vec<rackcast::bmc::CallResult> =
            serde_json::from_value(v["bmc"].clone()).unwrap_or_default();
        if results.is_empty() {
            println!("{id}: will be installed again at its next network boot (it has no BMC in the rack inventory: boot it from the network)");
            return Ok(());
        }
        print_bmc_results(&results);
        if v["ok"] != true {
            anyhow::bail!(
                "{id}: will be installed again at its next network boot, but its BMC did not boot it (see above; retry with `rackcast power pxe-once {id}` and `rackcast power cycle {id}`)"
            );
        }
        println!("{id}: set to boot from the network once and reset: installing again");
        Ok(())
    }

    fn device_arg(device: &str) -> String {
        if device.contains(':') {
            rackcast::controller::device_id_for(device)
        } else {
            device.to_string()
        }
    }

    pub fn devices(config: &Path, json: bool) -> Result<()> {
        let (cfg, mut st) = open(config)?;
        // Live progress comes from the running appliance; without it the
        // table is the store's (no progress column values).
        let live: Option<Vec<rackcast::controller::DeviceRow>> =
            operator(&cfg, "GET", "/api/devices")
                .ok()
                .filter(|(code, _)| *code == 200)
                .and_then(|(_, body)| serde_json::from_str(&body).ok());
        let rows = match live {
            Some(r) => r,
            None => rackcast::controller::device_rows(&st.load_devices()?, &Default::default()),
        };
        if json {
            println!("{}", serde_json::to_string(&rows)?);
            return Ok(());
        }
        println!(
            "{:<16} {:<17} {:<16} {:<16} {:>5} {:<10} {:>11} DETAIL",
            "DEVICE", "MAC", "STATE", "STEP", "WAVE", "IMAGE", "PROGRESS"
        );
        for r in rows {
            println!(
                "{:<16} {:<17} {:<16} {:<16} {:>5} {:<10} {:>11} {}",
                r.device,
                r.mac,
                r.state,
                r.step,
                r.wave.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
                r.image.unwrap_or_else(|| "-".into()),
                r.progress
                    .map(|p| format!("{p:.0}%{}", if r.behind { " behind" } else { "" }))
                    .unwrap_or_else(|| "-".into()),
                r.detail
            );
        }
        Ok(())
    }

    pub fn log(config: &Path, device: &str, json: bool) -> Result<()> {
        let (_, mut st) = open(config)?;
        let id = device_arg(device);
        let ev = st.events(&id)?;
        if ev.is_empty() {
            anyhow::bail!("no events for device {id}");
        }
        if json {
            println!("{}", serde_json::to_string(&ev)?);
            return Ok(());
        }
        for e in ev {
            let r = e.row;
            println!(
                "{}  {:<16} {:<8} {:>9}  {}",
                ms_to_time(r.at),
                r.step.as_str(),
                r.kind,
                r.duration_ms
                    .map(|d| format!("{:.3}s", d as f64 / 1000.0))
                    .unwrap_or_default(),
                r.detail
            );
        }
        Ok(())
    }

    pub fn inventory(config: &Path, device: &str, json: bool) -> Result<()> {
        let (_, mut st) = open(config)?;
        let id = device_arg(device);
        let inv = st
            .inventory(&id)?
            .with_context(|| format!("device {id} has reported no inventory"))?;
        if json {
            println!("{}", serde_json::to_string(&inv)?);
            return Ok(());
        }
        let d = &inv.dmi;
        println!(
            "{id}: {} {} serial {} uuid {}",
            d.vendor, d.model, d.serial, d.uuid
        );
        println!(
            "cpu: {} x {} ({}), memory {:.1} GiB",
            inv.cpu.count,
            inv.cpu.model,
            inv.cpu.arch,
            inv.memory_bytes as f64 / (1u64 << 30) as f64
        );
        for n in &inv.nics {
            println!(
                "nic:  {:<10} {:<17} pci {}",
                n.name,
                n.mac,
                n.pci_id.as_deref().unwrap_or("-")
            );
        }
        for k in &inv.disks {
            println!(
                "disk: {:<10} {:>10.1} GiB {} {} model {:?} serial {:?}",
                k.name,
                k.size_bytes as f64 / (1u64 << 30) as f64,
                if k.rotational { "hdd" } else { "ssd" },
                k.path,
                k.model,
                k.serial
            );
        }
        for c in &inv.storage_controllers {
            println!("storage: {} pci {}", c.name, c.pci_id);
        }
        Ok(())
    }

    pub fn waves(config: &Path, json: bool) -> Result<()> {
        let (_, mut st) = open(config)?;
        let w = st.waves()?;
        if json {
            println!("{}", serde_json::to_string(&w)?);
            return Ok(());
        }
        println!(
            "{:>5} {:<12} {:<9} {:<20} {:>7} {:>8} {:>6}  {:<24}  DETAIL",
            "WAVE", "IMAGE", "STATE", "GROUP", "MEMBERS", "VERIFIED", "FAILED", "STARTED"
        );
        for w in w {
            println!(
                "{:>5} {:<12} {:<9} {:<20} {:>7} {:>8} {:>6}  {:<24}  {}",
                w.id,
                w.image,
                w.state,
                w.group,
                w.members,
                w.verified,
                w.failed,
                ms_to_time(w.created_at),
                w.detail
            );
        }
        Ok(())
    }

    fn bar(total: u64, msg: String) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(msg);
        bar
    }

    pub fn images_add(config: &Path, name: &str, source: &str, blake3: Option<&str>) -> Result<()> {
        use rackcast::download;
        let cfg = Config::load(config)?;
        if !download::is_url(source) {
            if let Some(want) = blake3 {
                let mut h = ::blake3::Hasher::new();
                h.update_reader(
                    std::fs::File::open(source).with_context(|| format!("reading {source}"))?,
                )?;
                let got = h.finalize().to_hex().to_string();
                if !want.eq_ignore_ascii_case(&got) {
                    anyhow::bail!("{source} hashes to blake3 {got}, expected {want}");
                }
            }
            return images_add_file(&cfg, name, Path::new(source), None);
        }
        let store = cfg.appliance.state_dir.join("images");
        let dl_bar = bar(0, format!("{name}: downloading"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let got = rt.block_on(download::download(
            source,
            &store,
            blake3,
            &mut |n, total| {
                if let Some(t) = total {
                    dl_bar.set_length(t);
                }
                dl_bar.set_position(n);
            },
        ));
        dl_bar.finish_and_clear();
        let got = got?;
        if got.resumed_from > 0 {
            eprintln!("{name}: resumed the download at {} bytes", got.resumed_from);
        }
        eprintln!(
            "{name}: downloaded {} bytes, blake3 {}",
            got.size, got.blake3
        );
        let r = images_add_file(&cfg, name, &got.path, Some(&got.blake3));
        // Imported (a copy in the store) or refused: the download is done
        // with either way, except a raw one, which was moved into place.
        got.discard();
        r
    }

    /// `downloaded`: the BLAKE3 of a download at `path` (a raw one moves
    /// into the store under it, without hashing it again).
    fn images_add_file(
        cfg: &Config,
        name: &str,
        path: &Path,
        downloaded: Option<&str>,
    ) -> Result<()> {
        use rackcast::image_source::{self, SourceKind};
        let mut st = open_rw(cfg)?;
        // A compressed or qcow2 source becomes a raw image in the store
        // first (complete, or not at all); a raw file is used where it is.
        let kind =
            SourceKind::of_file(path).with_context(|| format!("reading {}", path.display()))?;
        let store = cfg.appliance.state_dir.join("images");
        let raw = if let (SourceKind::Raw, Some(hash)) = (kind, downloaded) {
            // A downloaded raw image moves into the store under its hash.
            let to = store.join(format!("{hash}.img"));
            std::fs::rename(path, &to)?;
            to
        } else if kind == SourceKind::Raw {
            path.to_path_buf()
        } else {
            let total = std::fs::metadata(path)?.len();
            let bar = bar(total, format!("{name}: reading {}", kind.as_str()));
            let got = image_source::import(path, &store, |n| bar.set_position(n));
            bar.finish_and_clear();
            let got = got?;
            eprintln!(
                "{name}: {} source -> {} bytes raw, blake3 {}",
                kind.as_str(),
                got.size,
                got.hash
            );
            got.path
        };
        let size = std::fs::metadata(&raw)?.len();
        let bar = indicatif::ProgressBar::new(size).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!(
            "{name}: preparing blocks (zstd level {})",
            cfg.dataplane.zstd_level
        ));
        let rec = rackcast::controller::add_image(cfg, st.as_mut(), name, &raw, &mut |n| {
            bar.set_position(n)
        });
        bar.finish_and_clear();
        let rec = rec?;
        println!(
            "{} {} {} bytes blake3 {}",
            rec.name, rec.path, rec.size, rec.hash
        );
        Ok(())
    }

    pub fn images_list(config: &Path, json: bool) -> Result<()> {
        let (_, mut st) = open(config)?;
        let im = st.images()?;
        if json {
            println!("{}", serde_json::to_string(&im)?);
            return Ok(());
        }
        println!("{:<16} {:>14}  {:<64}  PATH", "IMAGE", "BYTES", "BLAKE3");
        for i in im {
            println!("{:<16} {:>14}  {:<64}  {}", i.name, i.size, i.hash, i.path);
        }
        Ok(())
    }
}
