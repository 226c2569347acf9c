//! What is already on the output when a receiver starts.
//!
//! Owns: re-reading and digesting, on several threads, the blocks a
//! resume state lists (or, for delta re-imaging, every block), taking the
//! ones whose digest matches the manifest, and zeroing the zero blocks the
//! output does not already hold (`BLKZEROOUT` on block devices, punched
//! holes in files, written zeros where neither works). Must not: trust the
//! resume state or the manifest's zero marks: only digests of what is on
//! the output count.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::resume::ResumeState;
use super::writer::Output;
use crate::dataplane::receiver::ReceiverCore;
use crate::image::manifest::Manifest;

/// What is already on the output.
pub(super) struct Recheck {
    /// Digests of the blocks in place, from their bytes on the output.
    pub(super) digests: Vec<Option<[u8; 32]>>,
    /// Zero blocks zeroed now (or on a fresh file already), left to the
    /// writer to digest from zeros while it waits for work.
    pub(super) zero_blocks: Vec<u32>,
    /// Blocks found in place (data and zero).
    pub(super) resumed: u32,
    /// Of those, data blocks.
    pub(super) resumed_data: u32,
}

/// Digest the candidates on the output (`delta`: every block; else the
/// ones the resume state lists), take the matches, zero the zero blocks
/// not in place, and mark all of those done in the core. Zero blocks are
/// digested from zeros, never taken from the manifest, so a wrong "zero"
/// mark fails the whole-image hash.
pub(super) fn recheck(
    m: &Manifest,
    out: &Output,
    resume: &mut ResumeState,
    core: &mut ReceiverCore,
    delta: bool,
    threads: usize,
) -> io::Result<Recheck> {
    let n = m.block_count();
    let candidates: Vec<u32> = if out.fresh {
        Vec::new()
    } else {
        (0..n).filter(|b| delta || resume.has(*b)).collect()
    };
    let found = digest_on_output(m, out, &candidates, threads);
    let mut digests: Vec<Option<[u8; 32]>> = vec![None; n as usize];
    let (mut resumed, mut resumed_data) = (0, 0);
    for (b, digest) in candidates.iter().zip(found) {
        let info = m.blocks[*b as usize];
        if digest == Some(info.hash) {
            digests[*b as usize] = digest;
            core.mark_done(*b);
            resume.set(*b, true);
            resumed += 1;
            resumed_data += u32::from(!info.zero);
        } else {
            resume.set(*b, false);
        }
    }
    let zero_blocks: Vec<u32> = (0..n)
        .filter(|b| m.blocks[*b as usize].zero && digests[*b as usize].is_none())
        .collect();
    if !out.fresh {
        zero_runs(m, out, &zero_blocks)?;
    }
    for b in &zero_blocks {
        core.mark_done(*b);
    }
    Ok(Recheck {
        digests,
        zero_blocks,
        resumed,
        resumed_data,
    })
}

/// The digest of each block's bytes on the output (`None`: unreadable),
/// read and hashed on `threads` threads: at disk speed, not one core's.
fn digest_on_output(
    m: &Manifest,
    out: &Output,
    blocks: &[u32],
    threads: usize,
) -> Vec<Option<[u8; 32]>> {
    if blocks.is_empty() {
        return Vec::new();
    }
    let per = blocks.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = blocks
            .chunks(per)
            .map(|chunk| {
                let n = chunk.len();
                let h = s.spawn(move || {
                    let mut buf = vec![0u8; m.block_size as usize];
                    chunk
                        .iter()
                        .map(|b| {
                            let len = m.block_len(*b);
                            out.file
                                .read_exact_at(&mut buf[..len], m.block_offset(*b))
                                .ok()
                                .map(|()| m.digest_block(*b, &buf[..len]))
                        })
                        .collect::<Vec<_>>()
                });
                (n, h)
            })
            .collect();
        // A thread that died found nothing: its blocks count as absent,
        // and the others keep their places.
        handles
            .into_iter()
            .flat_map(|(n, h)| h.join().unwrap_or_else(|_| vec![None; n]))
            .collect()
    })
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
        zero_range(out, start, end - start)?;
        i = j;
    }
    Ok(())
}

fn zero_range(out: &Output, start: u64, len: u64) -> io::Result<()> {
    let fd = out.file.as_raw_fd();
    let fast = if out.block_device {
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
        out.file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
