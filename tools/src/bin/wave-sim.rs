//! wave-sim: the scaling curve of one wave, from the whole-wave
//! simulation (`rackcast_core::dataplane::sim`): the real sender and
//! receiver cores on a simulated clock, with independent per-receiver
//! loss, late joiners and killed-and-restarted members. No sockets, no
//! threads: repeatable for a seed.
//!
//!   wave-sim --receivers 8,100,300,1000 [--image-mib 5] [--rate 60M] [--json]
//!
//! For each size it prints the simulated wave time, where the work went
//! (the sender's control path, the sender's datagram path, the simulated
//! receivers), the control messages per simulated second each way and
//! the sender core's state, as a table and, with `--json`, one JSON
//! object per size. The simulation is single-threaded, so the real time
//! spent in a core's calls is that core's CPU time on this machine.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;

use rackcast_core::dataplane::sim::{run_scale, ScaleCase};

#[derive(Parser)]
#[command(
    about = "Scaling curve of one wave in the simulation: wave time, sender CPU, control messages"
)]
struct Args {
    /// Wave sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8,100,300,1000")]
    receivers: Vec<usize>,
    /// Image size, MiB.
    #[arg(long, default_value_t = 5)]
    image_mib: usize,
    /// Block size, KiB (512-byte symbols).
    #[arg(long, default_value_t = 64)]
    block_kib: usize,
    /// Wave rate, bit/s (k/M/G).
    #[arg(long, default_value = "60M")]
    rate: String,
    /// Each receiver's loss is drawn from MIN-MAX, percent.
    #[arg(long, default_value = "1-5")]
    loss: String,
    /// Every n-th receiver joins 100 ms late (0: none).
    #[arg(long, default_value_t = 10)]
    late_every: usize,
    /// Every n-th receiver is killed half way and restarted (0: none).
    #[arg(long, default_value_t = 25)]
    kill_every: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per size, after the table.
    #[arg(long)]
    json: bool,
}

fn rate(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        Some('G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("bad rate {s:?}"))?;
    if !v.is_finite() || v <= 0.0 {
        bail!("rate must be positive: {s:?}");
    }
    Ok((v * mult) as u64)
}

fn loss(s: &str) -> Result<(f64, f64)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (f64, f64) = (a.trim().parse()?, b.trim().parse()?);
    if !(0.0..=50.0).contains(&a) || !(a..=50.0).contains(&b) {
        bail!("loss MIN-MAX in percent, 0 <= MIN <= MAX <= 50: {s:?}");
    }
    Ok((a / 100.0, b / 100.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let a = Args::parse();
    let rate_bps = rate(&a.rate)?;
    let loss = loss(&a.loss)?;
    if a.receivers.is_empty() || a.receivers.contains(&0) {
        bail!("--receivers: sizes of at least 1");
    }
    println!(
        "{:>9} {:>9} {:>8} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10} {:>9} {:>8}",
        "receivers",
        "wave ms",
        "verified",
        "sender ms",
        "ctl us/rep",
        "send ns/dgr",
        "rx ms",
        "reports/s",
        "plans/s",
        "state KiB",
        "wall s"
    );
    let mut rows = Vec::new();
    for &n in &a.receivers {
        let case = ScaleCase {
            receivers: n,
            loss,
            late_every: a.late_every,
            late_by: Duration::from_millis(100),
            kill_every: a.kill_every,
            image_bytes: a.image_mib << 20,
            block_size: a.block_kib << 10,
            rate_bps,
            seed: a.seed,
        };
        let wall = Instant::now();
        let r = run_scale(&case).map_err(|e| anyhow::anyhow!("{n} receivers: {e}"))?;
        let wall = wall.elapsed();
        let c = &r.cost;
        let secs = r.wave.as_secs_f64().max(1e-9);
        let per_report_us = ms(c.sender_control) * 1e3 / (c.to_sender.max(1) as f64);
        let per_datagram_ns = ms(c.sender_send) * 1e6 / (c.datagrams.max(1) as f64);
        println!(
            "{:>9} {:>9.0} {:>8} {:>10.1} {:>10.2} {:>11.0} {:>10.0} {:>10.0} {:>10.0} {:>9.1} {:>8.1}",
            n,
            ms(r.wave),
            r.verified,
            ms(c.sender_control + c.sender_send),
            per_report_us,
            per_datagram_ns,
            ms(c.receivers),
            c.to_sender as f64 / secs,
            c.from_sender as f64 / secs,
            r.sender_state_bytes as f64 / 1024.0,
            wall.as_secs_f64()
        );
        rows.push(serde_json::json!({
            "receivers": n,
            "wave_ms": ms(r.wave),
            "verified": r.verified,
            "sender_control_ms": ms(c.sender_control),
            "sender_send_ms": ms(c.sender_send),
            "sender_cpu_ms_per_sim_s": ms(c.sender_control + c.sender_send) / secs,
            "sender_us_per_report": per_report_us,
            "sender_ns_per_datagram": per_datagram_ns,
            "datagrams": c.datagrams,
            "receivers_cpu_ms": ms(c.receivers),
            "reports_per_s": c.to_sender as f64 / secs,
            "plans_per_s": c.from_sender as f64 / secs,
            "sender_state_bytes": r.sender_state_bytes,
            "wall_s": wall.as_secs_f64(),
            "image_bytes": case.image_bytes,
            "block_bytes": case.block_size,
            "rate_bps": rate_bps,
            "loss": [loss.0, loss.1],
            "seed": a.seed,
        }));
    }
    if a.json {
        for r in rows {
            println!("{r}");
        }
    }
    Ok(())
}
