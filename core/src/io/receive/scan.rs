//! What is already on the output when a receiver starts.
//!
//! Owns: re-reading and digesting, on several threads, the blocks a
//! resume state lists (or, for delta re-imaging, every block), taking the
//! ones whose digest matches the manifest, and zeroing the zero blocks the
//! output does not already hold (`BLKZEROOUT` on block devices, punched
//! holes in files, written zeros where neither works). Must not: trust the
//! resume state or the manifest's zero marks: only digests of what is on
//! the output count.
//!
//! The scan runs alongside the wave, not before it: the receiver scans
//! the image's first [`READY_AFTER`] bytes, reports what it found and says
//! Ready; the rest is scanned in image order (the sender's order) while
//! blocks arrive, each find handed to the writer like a decoded block.
//! Reading runs at disk speed, far ahead of the wire, so the sender learns
//! of a block in place before its turn comes; one it sends anyway is
//! written once (whichever of the scan and the wire is first counts).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::resume::ResumeState;
use super::writer::{Decoded, Output};
use crate::image::manifest::Manifest;

/// Image bytes scanned before Ready: the sender decides whether to send a
/// block's source symbols when its group (8 blocks by default, the next
/// one prefetched) comes up, so the first groups are decided on our first
/// report, and later ones on reports the scan has long been ahead of.
pub(super) const READY_AFTER: u64 = 64 << 20;

/// Blocks a scan thread takes at a time, in image order: a run of zero
/// blocks in them is zeroed in one call.
const CLAIM: usize = 8;

/// One block to look at: whether to read and digest it (a resume state
/// lists it, or delta re-imaging), else it is a zero block to zero.
#[derive(Clone, Copy)]
pub(super) struct Visit {
    block: u32,
    read: bool,
}

/// The blocks to look at on this output, in image order: none on a fresh
/// sparse file (its zero blocks already read as zeros, and nothing else
/// is on it); else every candidate, and every zero block (checked if a
/// candidate, zeroed if not in place).
pub(super) fn plan(m: &Manifest, out: &Output, resume: &ResumeState, delta: bool) -> Vec<Visit> {
    if out.fresh {
        return Vec::new();
    }
    (0..m.block_count())
        .filter_map(|b| {
            let read = delta || resume.has(b);
            (read || m.blocks[b as usize].zero).then_some(Visit { block: b, read })
        })
        .collect()
}

/// How many of `visits` lie in the image's first [`READY_AFTER`] bytes.
pub(super) fn ready_split(m: &Manifest, visits: &[Visit]) -> usize {
    visits.partition_point(|v| m.block_offset(v.block) < READY_AFTER)
}

/// Blocks found in place (or zeroed), counted as the scan's results are
/// taken.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct InPlace {
    /// Blocks found on the output with the manifest's digest.
    pub(super) found: u32,
    /// Of those, data (non-zero) blocks.
    pub(super) found_data: u32,
}

impl InPlace {
    /// Take one scan result (`Decoded::InPlace` or `Decoded::Stale`) into
    /// the digests and the resume state. Returns the block if it is newly
    /// in place (the core must count it done); a block the wire already
    /// brought keeps its written digest.
    pub(super) fn take(
        &mut self,
        m: &Manifest,
        msg: &Decoded,
        digests: &mut [Option<[u8; 32]>],
        resume: &mut ResumeState,
    ) -> Option<u32> {
        match *msg {
            Decoded::InPlace {
                block,
                digest,
                found,
            } => {
                let slot = digests.get_mut(block as usize)?;
                if slot.is_some() {
                    return None;
                }
                *slot = Some(digest);
                resume.set(block, true);
                if found {
                    self.found += 1;
                    self.found_data += u32::from(!m.blocks[block as usize].zero);
                }
                Some(block)
            }
            Decoded::Stale(block) => {
                if digests.get(block as usize).is_some_and(|d| d.is_none()) {
                    resume.set(block, false);
                }
                None
            }
            _ => None,
        }
    }
}

/// Scan `visits` on `threads` threads, handing every result to `sink`
/// (from those threads). A block is in place only if its bytes on the
/// output digest to the manifest's; a zero block that is not is zeroed
/// and digested from zeros, so a wrong "zero" mark fails the whole-image
/// hash. A thread that panicked or could not zero reports `Fatal`;
/// `stop` ends the scan between claims.
pub(super) fn scan(
    m: &Manifest,
    out: &Output,
    visits: &[Visit],
    threads: usize,
    stop: &AtomicBool,
    sink: &(dyn Fn(Decoded) + Sync),
) {
    if visits.is_empty() {
        return;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.clamp(1, visits.len().div_ceil(CLAIM)))
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; m.block_size as usize];
                    let zeros = vec![0u8; m.block_size as usize];
                    while !stop.load(Ordering::Relaxed) {
                        let at = next.fetch_add(CLAIM, Ordering::Relaxed);
                        let Some(claim) = visits.get(at..(at + CLAIM).min(visits.len())) else {
                            return;
                        };
                        if let Err(why) = visit(m, out, claim, &mut buf, &zeros, sink) {
                            sink(Decoded::Fatal(why));
                            return;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            if h.join().is_err() {
                sink(Decoded::Fatal("a scan thread of the output died".into()));
            }
        }
    });
}

/// One claim: digest what is to be read, zero the zero blocks not in
/// place (run by run), report each block.
fn visit(
    m: &Manifest,
    out: &Output,
    claim: &[Visit],
    buf: &mut [u8],
    zeros: &[u8],
    sink: &(dyn Fn(Decoded) + Sync),
) -> Result<(), String> {
    let mut to_zero = Vec::new();
    for v in claim {
        let info = m.blocks[v.block as usize];
        if v.read {
            let len = m.block_len(v.block);
            let digest = out
                .file
                .read_exact_at(&mut buf[..len], m.block_offset(v.block))
                .ok()
                .map(|()| m.digest_block(v.block, &buf[..len]));
            if digest == Some(info.hash) {
                sink(Decoded::InPlace {
                    block: v.block,
                    digest: info.hash,
                    found: true,
                });
                continue;
            }
        }
        if info.zero {
            to_zero.push(v.block);
        } else {
            sink(Decoded::Stale(v.block));
        }
    }
    zero_runs(m, out, &to_zero).map_err(|e| format!("zeroing zero blocks on the output: {e}"))?;
    for b in to_zero {
        sink(Decoded::InPlace {
            block: b,
            digest: m.digest_block(b, &zeros[..m.block_len(b)]),
            found: false,
        });
    }
    Ok(())
}

/// Scan the rest of the output on its own thread, results to the writer.
pub(super) fn spawn_rest(
    m: Arc<Manifest>,
    out: Arc<Output>,
    rest: Vec<Visit>,
    threads: usize,
    stop: Arc<AtomicBool>,
    to_writer: crossbeam_channel::Sender<Decoded>,
) {
    if rest.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let found = std::sync::atomic::AtomicU32::new(0);
        scan(&m, &out, &rest, threads, &stop, &|d| {
            if matches!(d, Decoded::InPlace { found: true, .. }) {
                found.fetch_add(1, Ordering::Relaxed);
            }
            // The writer gone means the session ended: nothing to do.
            let _ = to_writer.send(d);
        });
        tracing::debug!(
            blocks = rest.len(),
            found = found.into_inner(),
            ms = t.elapsed().as_millis() as u64,
            "output scanned alongside the wave"
        );
    });
}

/// Scan `visits` now, on `threads` threads, and return the results in
/// the order they came.
pub(super) fn scan_now(
    m: &Manifest,
    out: &Output,
    visits: &[Visit],
    threads: usize,
) -> Vec<Decoded> {
    let got = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    scan(m, out, visits, threads, &stop, &|d| {
        if let Ok(mut g) = got.lock() {
            g.push(d);
        }
    });
    got.into_inner().unwrap_or_default()
}

/// `_IO(0x12, 127)`: zero a byte range of a block device, letting the
/// device do it (write-zeroes or discard with zeroing) where it can.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Zero the blocks (ascending), run by run.
fn zero_runs(m: &Manifest, out: &Output, blocks: &[u32]) -> io::Result<()> {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        let start = m.block_offset(blocks[i]);
        let end = m.block_offset(blocks[j - 1]) + m.block_len(blocks[j - 1]) as u64;
        zero_range(&out.file, out.block_device, start, end - start)?;
        i = j;
    }
    Ok(())
}

fn zero_range(file: &File, block_device: bool, start: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let fast = if block_device {
        let range = [start, len];
        // SAFETY: BLKZEROOUT reads two u64s from the pointer we pass.
        unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) == 0 }
    } else {
        // SAFETY: plain syscall on our descriptor.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start as libc::off_t,
                len as libc::off_t,
            ) == 0
        }
    };
    if fast {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = start;
    while at < start + len {
        let n = zeros.len().min((start + len - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
