//! `rackcast`: the appliance binary. For now: the data-plane sender and the
//! image manifest tool.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use rackcast::dataplane::send::{run_send, SendOptions, SendReport};
use rackcast::dataplane::sender::SenderConfig;
use rackcast::manifest::{Manifest, DEFAULT_BLOCK_SIZE};
use rackcast::wire::packet::symbol_size_for_mtu;

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
    /// Build an image's manifest (block hashes, zero blocks) ahead of time.
    Manifest(ManifestArgs),
}

#[derive(clap::Args)]
struct SendArgs {
    /// Image file (raw).
    image: PathBuf,
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
    #[arg(long, value_parser = rackcast::parse_rate)]
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
    /// Path MTU; sets the symbol size.
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    /// Block size in bytes (one RaptorQ source block each).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Prebuilt manifest (`rackcast manifest`); built on the fly if absent.
    #[arg(long)]
    manifest: Option<PathBuf>,
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
    /// Receiver feedback interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    feedback_ms: u32,
    /// Datagrams per UDP GSO send; 1 disables GSO (plain sendmmsg).
    #[arg(long, default_value_t = 16)]
    gso_segments: usize,
    /// Multicast TTL.
    #[arg(long, default_value_t = 1)]
    ttl: u32,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
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
    rackcast::tune_allocator();
    rackcast::init_logs(&cli.log);
    match cli.cmd {
        Cmd::Manifest(a) => {
            let t = Instant::now();
            let m = Manifest::build(&a.image, a.block_size, symbol_size(a.mtu)?)
                .with_context(|| format!("building manifest of {}", a.image.display()))?;
            let out = a
                .out
                .unwrap_or_else(|| PathBuf::from(format!("{}.rcmanifest", a.image.display())));
            m.save(&a.image, &out)?;
            println!(
                "{}: {} bytes, {} blocks ({} zero), blake3 {} -> {} ({:.2} s)",
                a.image.display(),
                m.image_size,
                m.block_count(),
                m.blocks.iter().filter(|b| b.zero).count(),
                m.image_hash_hex(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Send(a) => send(a),
    }
}

fn send(a: SendArgs) -> Result<()> {
    if !rackcast::is_lab_or_admin_group(*a.group.ip()) {
        bail!(
            "group {} is not in 239.0.0.0/8 (administratively scoped)",
            a.group
        );
    }
    if a.receivers == 0 {
        bail!("--receivers must be at least 1");
    }
    if !(0.0..1.0).contains(&a.loss_threshold) {
        bail!("--loss-threshold must be in 0..1");
    }
    let ss = symbol_size(a.mtu)?;
    let manifest = match &a.manifest {
        Some(p) => Manifest::load_for(&a.image, p)?,
        None => Manifest::build(&a.image, a.block_size, ss)
            .with_context(|| format!("building manifest of {}", a.image.display()))?,
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
        }
        let cfg = SenderConfig {
            expected: a.receivers,
            start_timeout: Duration::from_secs(a.start_timeout),
            receiver_timeout: Duration::from_secs(a.receiver_timeout),
            rate_bps: a.rate,
            min_rate_bps: (a.rate / 10).max(1_000_000),
            loss_threshold: a.loss_threshold,
            interleave: a.interleave.max(1),
            source_resend_factor: a.source_resend_factor.max(0.0),
            ..Default::default()
        };
        eprintln!(
            "rackcast send: {} ({} bytes, {} blocks) to {} at {} bit/s, waiting for {} receiver(s) on {}",
            a.image.display(),
            manifest.image_size,
            manifest.block_count(),
            a.group,
            a.rate,
            a.receivers,
            a.control
        );
        let report = run_send(SendOptions {
            image: a.image.clone(),
            manifest,
            iface: a.iface.clone(),
            group: a.group,
            control: a.control,
            ttl: a.ttl,
            feedback_ms: a.feedback_ms,
            hello_timeout: Duration::from_secs(10),
            gso_segments: a.gso_segments.clamp(1, 64),
            cfg,
        })
        .await?;
        print_report(&report, a.json)?;
        if !report.ok {
            std::process::exit(1);
        }
        Ok(())
    })
}

fn print_report(r: &SendReport, json: bool) -> Result<()> {
    println!(
        "wave: {} bytes in {:.2} s (source phase {:.2} s), goodput {:.1} Mbit/s ({:.3} x rate), repair overhead {:.2} %, {} source + {} repair packets ({} of them resent source symbols)",
        r.image_bytes,
        r.seconds,
        r.source_seconds,
        r.goodput_bps / 1e6,
        r.goodput_bps / r.rate_bps as f64,
        r.repair_overhead_pct,
        r.source_packets,
        r.repair_packets,
        r.resent_source_packets
    );
    for rx in &r.receivers {
        println!(
            "  {:<32} {:<10} {:>8} resumed={} auth_failures={}",
            rx.name,
            if rx.ok { "VERIFIED" } else { "FAILED" },
            rx.seconds.map_or("-".into(), |s| format!("{s:.2}s")),
            rx.resumed_blocks,
            rx.auth_failures
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
