//! Writes a test image: random data with optional all-zero stretches, from
//! a seed, so every lab run can regenerate the same image.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use rand::{RngCore, SeedableRng};

#[derive(Parser)]
#[command(about = "Generate a seeded random test image")]
struct Args {
    out: PathBuf,
    /// Size in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Every Nth MiB is all zeros (0 = none).
    #[arg(long, default_value_t = 0)]
    zero_every: u64,
    /// Extra bytes after the last MiB (to test a short last block).
    #[arg(long, default_value_t = 0)]
    tail: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut w = BufWriter::new(File::create(&a.out)?);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..a.mib {
        if a.zero_every > 0 && i % a.zero_every == a.zero_every - 1 {
            buf.fill(0);
        } else {
            rng.fill_bytes(&mut buf);
        }
        w.write_all(&buf)?;
    }
    let mut tail = vec![0u8; a.tail as usize];
    rng.fill_bytes(&mut tail);
    w.write_all(&tail)?;
    w.flush()?;
    Ok(())
}
