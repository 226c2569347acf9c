//! `rackcast-agent`: runs on the device. `run` is the workflow agent
//! (loader mode, then the bundle's agent); `receive` is the standalone
//! data-plane receiver that writes and verifies one image.

mod bios;
mod command;
mod disks;
mod image;
mod inventory;
mod loader;
mod plan;
mod raid;
mod redfish;
mod seed;
mod session;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use rackcast_core::io::receive::{run_receive, Progress, ReceiveOptions};

#[derive(Parser)]
#[command(name = "rackcast-agent", version, about = "rackcast device agent")]
struct Cli {
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Take part in the appliance's workflow: report hardware, fetch and
    /// run the generated bundle, receive the image, report every step.
    Run(RunArgs),
    /// Receive one image from a wave, write it and verify it.
    Receive(ReceiveArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The appliance's control plane (`appliance.control_listen`); a
    /// network-booted loader finds it on the kernel command line
    /// (`rackcast.server=ADDR:PORT`, put there by the iPXE script).
    #[arg(long)]
    server: Option<SocketAddr>,
    /// Hardware description (JSON inventory) instead of probing /sys.
    #[arg(long)]
    hardware: Option<PathBuf>,
    /// The device's disks are these (files or block devices; repeat the
    /// flag), instead of the probed or described ones: a lab device's
    /// loop files.
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Where bundles and resume state are kept.
    #[arg(long, default_value = "/run/rackcast")]
    work_dir: PathBuf,
    /// Device id (set by the loader when it starts the bundle's agent).
    #[arg(long)]
    device_id: Option<String>,
    /// Verified bundle to run (set by the loader).
    #[arg(long)]
    bundle_dir: Option<PathBuf>,
    /// Running from an installed OS (default: detected from the root fs).
    #[arg(long)]
    os_present: Option<bool>,
    /// Interface to receive the image on.
    #[arg(long)]
    iface: Option<String>,
    /// Exit when the appliance is unreachable this many seconds.
    #[arg(long, default_value_t = 600)]
    give_up: u64,
    /// Fingerprint (BLAKE3, 64 hex digits) of the appliance's
    /// bundle-signing key: `rackcast key` prints it. Default:
    /// `rackcast.key=` on the kernel command line, where the iPXE script
    /// puts it.
    #[arg(long)]
    trust_key: Option<String>,
}

#[derive(clap::Args)]
struct ReceiveArgs {
    /// Sender control address (`rackcast send --control`).
    #[arg(long)]
    server: SocketAddr,
    /// Output file or block device.
    #[arg(long)]
    out: PathBuf,
    /// Interface to join the group on (default: by route).
    #[arg(long)]
    iface: Option<String>,
    /// Name towards the sender (default: hostname@local-ip). A restarted
    /// receiver with the same name resumes its slot.
    #[arg(long)]
    name: Option<String>,
    /// Resume state file (default: `<out>.rcresume`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Keep retrying to reach the sender this many seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Fail when nothing arrived for this many seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Socket receive buffer in bytes (forced past rmem_max when root).
    /// Deep enough to ride out ~1 s at 500 Mbit/s when the host is busy
    /// (decoding, writing): an overflow is loss that costs a repair round.
    #[arg(long, default_value_t = 64 << 20)]
    rcvbuf: usize,
    /// Threads that decode and decompress blocks (default: up to 4 cores).
    #[arg(long)]
    decoders: Option<usize>,
    /// Digest every block already on the output and keep those that match
    /// (re-imaging over an earlier version); on by default for block
    /// devices.
    #[arg(long)]
    delta: bool,
    /// Fingerprint of the key the sender must prove (`rackcast send`
    /// prints it). Without it any sender key is accepted; the control
    /// connection is encrypted either way.
    #[arg(long)]
    trust_key: Option<String>,
    /// Print the report as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    rackcast_core::io::tune_allocator();
    rackcast_core::io::init_logs(&cli.log);
    match cli.cmd {
        Cmd::Receive(a) => receive(a),
        Cmd::Run(a) => {
            std::fs::create_dir_all(&a.work_dir)?;
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let boot_arg = |key: &str| {
                cmdline
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_string)
            };
            let server = match a.server {
                Some(s) => s,
                None => boot_arg("rackcast.server=")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "no --server and no rackcast.server= on the kernel command line"
                        )
                    })?,
            };
            let trust_key = a
                .trust_key
                .or_else(|| boot_arg("rackcast.key="))
                .map(|k| rackcast_core::signing::parse_fingerprint(&k))
                .transpose()?;
            let args = session::RunArgs {
                server,
                hardware: a.hardware,
                disks: a.disk,
                work_dir: a.work_dir,
                device_id: a.device_id,
                bundle_dir: a.bundle_dir,
                os_present: a.os_present.unwrap_or_else(inventory::os_present),
                iface: a.iface,
                give_up: Duration::from_secs(a.give_up),
                trust_key,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(session::run(args))
        }
    }
}

fn receive(a: ReceiveArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let progress = Arc::new(Progress::default());
    let opts = ReceiveOptions {
        server: a.server,
        out: a.out.clone(),
        iface: a.iface.clone(),
        name: a.name.clone(),
        state: a.state.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        idle_timeout: Duration::from_secs(a.idle_timeout),
        rcvbuf: a.rcvbuf,
        decoders: a
            .decoders
            .unwrap_or_else(rackcast_core::io::receive::default_decoders),
        delta: a.delta || rackcast_core::io::receive::is_block_device(&a.out),
        trust_key: a
            .trust_key
            .as_deref()
            .map(rackcast_core::signing::parse_fingerprint)
            .transpose()?,
        credential: None,
        expect_image: None,
        disk: false,
    };
    let p = progress.clone();
    let show = rt.spawn(show_progress(p));
    let report = rt.block_on(run_receive(opts, progress));
    show.abort();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            // Could not take part at all: still one clear verdict line (and
            // JSON), never a silent exit.
            println!("FAILED {}: {e}", a.out.display());
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "verified": false, "reason": e.to_string() })
                );
            }
            std::process::exit(1);
        }
    };
    if report.verified {
        println!(
            "VERIFIED {} ({} bytes, blake3 {}) in {:.2} s; resumed {} blocks; {} packets, {} auth failures, {} malformed",
            a.out.display(),
            report.image_bytes,
            report.image_hash,
            report.seconds,
            report.resumed_blocks,
            report.packets,
            report.auth_failures,
            report.malformed
        );
    } else {
        println!(
            "FAILED {}: {}",
            a.out.display(),
            report.reason.as_deref().unwrap_or("unknown")
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if !report.verified {
        std::process::exit(1);
    }
    Ok(())
}

/// A bar on a terminal, a plain line every 2 s otherwise.
async fn show_progress(p: Arc<Progress>) {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} blocks ({percent}%) {elapsed} eta {eta}",
        ) {
            b.set_style(style);
        }
        Some(b)
    } else {
        None
    };
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tick += 1;
        let total = p.total_blocks.load(Ordering::Relaxed) as u64;
        let done = p.done_blocks.load(Ordering::Relaxed) as u64;
        let verified = p.verified_blocks.load(Ordering::Relaxed) as u64;
        match &bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None if tick % 10 == 0 && total > 0 => {
                eprintln!("progress: {done}/{total} blocks written, {verified} verified");
            }
            None => {}
        }
    }
}
