//! Writes a test image: random (or, with `--compressible`, text-like) data
//! with optional all-zero stretches, from a seed, so every lab run can
//! regenerate the same image.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
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
    /// Data MiBs are lines of words from a small seeded vocabulary (zstd
    /// shrinks them about 3x), not random bytes.
    #[arg(long)]
    compressible: bool,
    /// Give the image a GPT (with util-linux's sfdisk) whose one
    /// partition, `root`, holds the data from 1 MiB to the backup
    /// table: an installed disk has one, and the identity step needs it.
    #[arg(long)]
    gpt: bool,
}

/// Fill `buf` with lines of words drawn from `words`.
fn text(rng: &mut impl RngCore, words: &[Vec<u8>], buf: &mut [u8]) {
    let mut at = 0;
    while at < buf.len() {
        let r = rng.next_u32() as usize;
        let w = &words[r % words.len()];
        let sep = if r >> 28 == 0 { b'\n' } else { b' ' };
        for &c in w.iter().chain(std::iter::once(&sep)) {
            if at == buf.len() {
                break;
            }
            buf[at] = c;
            at += 1;
        }
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut w = BufWriter::new(File::create(&a.out)?);
    let mut buf = vec![0u8; 1 << 20];
    // Drawn only for compressible images: random images stay the same
    // bytes for a seed as they always were.
    let words: Vec<Vec<u8>> = (0..if a.compressible { 512 } else { 0 })
        .map(|_| {
            let len = 2 + rng.next_u32() as usize % 10;
            (0..len)
                .map(|_| b'a' + (rng.next_u32() % 26) as u8)
                .collect()
        })
        .collect();
    for i in 0..a.mib {
        if a.zero_every > 0 && i % a.zero_every == a.zero_every - 1 {
            buf.fill(0);
        } else if a.compressible {
            text(&mut rng, &words, &mut buf);
        } else {
            rng.fill_bytes(&mut buf);
        }
        w.write_all(&buf)?;
    }
    let mut tail = vec![0u8; a.tail as usize];
    rng.fill_bytes(&mut tail);
    w.write_all(&tail)?;
    w.flush()?;
    drop(w);
    if a.gpt {
        let mut c = std::process::Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&a.out)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("sfdisk (Debian package fdisk)")?;
        if let Some(mut stdin) = c.stdin.take() {
            stdin.write_all(
                b"label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n",
            )?;
        }
        if !c.wait()?.success() {
            anyhow::bail!("sfdisk could not write a GPT on {}", a.out.display());
        }
    }
    Ok(())
}
