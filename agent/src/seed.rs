//! The machine's identity written into its installed image: a
//! cloud-init NoCloud seed (`meta-data`, `user-data`, `network-config`)
//! on a FAT filesystem labelled `CIDATA`, which cloud-init finds at the
//! installed OS's first boot.
//!
//! Owns: finding the image's `CIDATA` partition by its GPT name, or
//! adding one (8 MiB, after moving the backup GPT to the end of the
//! disk the image was written to), the filesystem and the files, each
//! read back, and the seed's digest. Done with Debian's image tools,
//! `sfdisk` (util-linux's fdisk package) and `mtools`, on the target as
//! it is (a disk, an array or, in the lab, a file): no mount, so no
//! loop device, no filesystem driver in the loader's kernel and nothing
//! left mounted if the step is interrupted, and the same code on a file
//! as on a block device. Must not: touch any partition but `CIDATA`, or
//! write anything on a disk without a GPT (a raw image has no place for
//! a seed: the step fails and says so).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use rackcast_core::model::{OpRecord, Seed};

/// The seed partition made when the image has none.
const CIDATA_SIZE: &str = "8MiB";
/// GPT type "Microsoft basic data": what a FAT filesystem is given.
const BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
/// Each tool run's time limit.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a file's content a log row shows.
const SHOWN: usize = 4096;

/// Run `prog args` (stdin `input`), bounded in time; its stdout, or why
/// it failed. One op row either way.
async fn tool(
    ops: &mut Vec<OpRecord>,
    op: &str,
    prog: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let t = Instant::now();
    let mut c = tokio::process::Command::new(prog);
    c.args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = c.spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(TOOL_TIMEOUT, run).await;
    let ms = t.elapsed().as_millis() as u64;
    let (ok, code, detail, stdout) = match out {
        Err(_) => (
            false,
            None,
            format!("timed out after {TOOL_TIMEOUT:?}"),
            String::new(),
        ),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => (
            false,
            None,
            format!("{prog} is not installed (Debian: fdisk for sfdisk, mtools for m*)"),
            String::new(),
        ),
        Ok(Err(e)) => (false, None, e.to_string(), String::new()),
        Ok(Ok(o)) => {
            let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&o.stderr);
            (
                o.status.success(),
                o.status.code(),
                stderr.trim().chars().take(500).collect(),
                stdout,
            )
        }
    };
    ops.push(OpRecord {
        op: op.to_string(),
        ok,
        exit_code: code,
        duration_ms: ms,
        detail: format!(
            "{prog} {}{}",
            args.join(" "),
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        ),
    });
    if !ok {
        bail!("{op} failed: {prog} {}: {detail}", args.join(" "));
    }
    Ok(stdout)
}

/// The disk's GPT: (sector size, partitions as (start, size, name)).
async fn read_gpt(target: &str, ops: &mut Vec<OpRecord>) -> Result<(u64, Vec<(u64, u64, String)>)> {
    let json = tool(ops, "seed-read-table", "sfdisk", &["--json", target], None)
        .await
        .map_err(|e| anyhow!("{target} has no partition table: a raw image has no place for a NoCloud seed ({e})"))?;
    let v: Value = serde_json::from_str(&json).context("sfdisk --json")?;
    let t = &v["partitiontable"];
    if t["label"] != "gpt" {
        bail!(
            "{target} has a {} partition table, not GPT: no CIDATA partition is added to it",
            t["label"].as_str().unwrap_or("unknown")
        );
    }
    let sector = t["sectorsize"].as_u64().unwrap_or(512);
    let parts = t["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["start"].as_u64()?,
                        p["size"].as_u64()?,
                        p["name"].as_str().unwrap_or("").to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((sector, parts))
}

/// The seed's digest: BLAKE3 over its files, each named and
/// length-prefixed (so no two seeds share one).
pub fn digest(seed: &Seed) -> String {
    let mut h = blake3::Hasher::new();
    for (name, text) in files(seed) {
        h.update(name.as_bytes());
        h.update(&(text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

fn files(seed: &Seed) -> Vec<(&'static str, &str)> {
    let mut f = vec![
        ("meta-data", seed.meta_data.as_str()),
        ("user-data", seed.user_data.as_str()),
    ];
    if let Some(n) = &seed.network_config {
        f.push(("network-config", n.as_str()));
    }
    f
}

/// Write `seed` onto the image on `target`; `work`: a folder for the
/// files on their way in.
pub async fn write(
    target: &str,
    seed: &Seed,
    work: &Path,
    ops: &mut Vec<OpRecord>,
) -> Result<String> {
    let (sector, mut parts) = read_gpt(target, ops).await?;
    let mut made = false;
    if !parts
        .iter()
        .any(|(_, _, n)| n.eq_ignore_ascii_case("CIDATA"))
    {
        // The image's backup GPT sits where the image ended; the disk
        // goes on. Move it to the disk's end, then add the seed
        // partition in the free space.
        tool(
            ops,
            "seed-relocate-gpt",
            "sfdisk",
            &["--relocate", "gpt-bak-std", target],
            None,
        )
        .await?;
        let line = format!("size={CIDATA_SIZE}, type={BASIC_DATA}, name=\"CIDATA\"\n");
        tool(
            ops,
            "seed-add-partition",
            "sfdisk",
            &["--append", "--no-reread", "--no-tell-kernel", "-q", target],
            Some(&line),
        )
        .await?;
        parts = read_gpt(target, ops).await?.1;
        made = true;
    }
    let (index, (start, size, _)) = parts
        .iter()
        .enumerate()
        .find(|(_, (_, _, n))| n.eq_ignore_ascii_case("CIDATA"))
        .ok_or_else(|| anyhow!("no CIDATA partition on {target} after adding one"))?;
    let at = format!("{target}@@{}", start * sector);
    tool(
        ops,
        "seed-mkfs",
        "mformat",
        &["-i", &at, "-T", &size.to_string(), "-v", "CIDATA", "::"],
        None,
    )
    .await?;
    std::fs::create_dir_all(work).with_context(|| format!("{}", work.display()))?;
    let mut written = Vec::new();
    for (name, text) in files(seed) {
        let local = work.join(name);
        std::fs::write(&local, text).with_context(|| format!("{}", local.display()))?;
        let local = local.to_string_lossy().into_owned();
        tool(
            ops,
            "seed-copy",
            "mcopy",
            &["-o", "-i", &at, &local, &format!("::{name}")],
            None,
        )
        .await?;
        let back = tool(
            ops,
            "seed-read-back",
            "mtype",
            &["-i", &at, &format!("::{name}")],
            None,
        )
        .await?;
        if back != text {
            bail!("{name} reads back different from what was written on {target}");
        }
        // What was written, in the log (bounded).
        let shown: String = text.chars().take(SHOWN).collect();
        ops.push(OpRecord {
            op: format!("seed-{name}"),
            ok: true,
            exit_code: None,
            duration_ms: 0,
            detail: format!(
                "{name} ({} bytes, blake3 {}):\n{shown}{}",
                text.len(),
                blake3::hash(text.as_bytes()).to_hex(),
                if shown.len() < text.len() {
                    "\n[...]"
                } else {
                    ""
                }
            ),
        });
        written.push(name);
    }
    let _ = std::fs::remove_dir_all(work);
    Ok(format!(
        "NoCloud seed ({}) on {target} partition {} (CIDATA, {}{} sectors of {sector} bytes at {start}); seed blake3 {}",
        written.join(", "),
        index + 1,
        if made { "added, " } else { "" },
        size,
        digest(seed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_every_file_and_its_name() {
        let s = Seed {
            meta_data: "instance-id: a\n".into(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        };
        let mut t = s.clone();
        t.network_config = Some(String::new());
        assert_ne!(
            digest(&s),
            digest(&t),
            "an empty network-config is still a file"
        );
        let mut u = s.clone();
        u.user_data.push(' ');
        assert_ne!(digest(&s), digest(&u));
        assert_eq!(digest(&s), digest(&s.clone()));
    }
}
