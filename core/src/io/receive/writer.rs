//! The receiver's writer thread: decode, check each block's digest before
//! its positioned write, keep the digests, digest zero blocks from zeros
//! while idle, and merge the digests into the whole-image hash.
//!
//! Owns: the output file or block device and the resume state while the
//! wave runs. Must not: read packets (the receive thread does) or decide
//! what a packet means (the core does).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::resume::ResumeState;
use super::scan::InPlace;
use super::Progress;
use crate::dataplane::receiver::{decode_block_keeping, DecodeJob, DecodeOutcome};
use crate::io::send::BlockGate;

use crate::image::fec::BlockAssembly;
use crate::image::manifest::Manifest;

pub(super) struct Output {
    pub(super) file: File,
    /// Fresh sparse file: zero blocks need no write.
    pub(super) fresh: bool,
    /// A block device (zeroed with `BLKZEROOUT`, not hole punching).
    pub(super) block_device: bool,
}

/// Open the output; `keep`: its bytes may be reused (a resume state or
/// delta re-imaging), else a file starts empty and sparse.
pub(super) fn open_output(path: &Path, m: &Manifest, keep: bool, disk: bool) -> io::Result<Output> {
    let is_dev = super::is_block_device(path);
    if disk && !path.exists() {
        // A disk that is not there is an error, never a new file in its
        // place (a file in /dev would be "written" in RAM).
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the target disk does not exist (nothing was created in its place)",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_dev && !disk)
        .truncate(false)
        .open(path)?;
    if is_dev || disk {
        let size = std::io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        if size < m.image_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device holds {size} bytes, image needs {}", m.image_size),
            ));
        }
        return Ok(Output {
            file,
            fresh: false,
            block_device: is_dev,
        });
    }
    if !keep {
        file.set_len(0)?;
    }
    file.set_len(m.image_size)?;
    Ok(Output {
        file,
        fresh: !keep,
        block_device: false,
    })
}

/// A decode job's block, its outcome, and the written block's buffer for
/// reuse.
pub(super) type DecodeResult = (u32, Result<(), Option<BlockAssembly>>, Option<Vec<u8>>);

/// Bytes written but not yet known to be on the disk. Writeback of each
/// block starts as soon as it is written (`sync_file_range`); past this
/// window the writer waits for the oldest ranges, which bounds the page
/// cache a receiver dirties and leaves the final flush short.
const WRITEBACK_WINDOW: u64 = 64 << 20;

/// What a decoder (or the scan of the output) hands the writer.
pub(super) enum Decoded {
    /// A decoded block whose digest matched, to write.
    Good {
        block: u32,
        data: Vec<u8>,
        digest: [u8; 32],
        /// Its checked compressed frame, for a relay to keep.
        frame: Option<Vec<u8>>,
    },
    /// A block the scan found on the output (`found`), or a zero block it
    /// zeroed, with the digest of its bytes there.
    InPlace {
        block: u32,
        digest: [u8; 32],
        found: bool,
    },
    /// A block the scan read and found wrong: not in place.
    Stale(u32),
    /// The session cannot go on.
    Fatal(String),
}

/// The writer's end: the whole-image hash, or why not.
pub(super) struct Written {
    pub(super) hash: Result<[u8; 32], String>,
    /// The final flush (what writeback had not done yet).
    pub(super) flush: Duration,
    /// Blocks the scan found in place, before Ready and alongside.
    pub(super) in_place: InPlace,
}

/// Start `decoders` threads that decode (and decompress) blocks: the
/// receiver's CPU work, spread over cores. Good blocks go to the writer
/// through a short queue; blocks that need more symbols or failed their
/// digest go straight back to the receive loop.
fn spawn_decoders(
    m: &Arc<Manifest>,
    keep_frames: bool,
    decoders: usize,
    jobs: &crossbeam_channel::Receiver<DecodeJob>,
    queued: &Arc<AtomicU64>,
    done: &crossbeam_channel::Sender<DecodeResult>,
    good_tx: crossbeam_channel::Sender<Decoded>,
) {
    for _ in 0..decoders {
        let (m, jobs, done, good) = (m.clone(), jobs.clone(), done.clone(), good_tx.clone());
        let queued = queued.clone();
        std::thread::spawn(move || {
            for job in jobs {
                queued.fetch_sub(job.asm.bytes() as u64, Ordering::Relaxed);
                let b = job.block;
                let (outcome, frame) = decode_block_keeping(&m, job, keep_frames);
                let sent = match outcome {
                    DecodeOutcome::Good { data, digest } => good
                        .send(Decoded::Good {
                            block: b,
                            data,
                            digest,
                            frame,
                        })
                        .is_ok(),
                    DecodeOutcome::NeedMore(asm) => done.send((b, Err(Some(asm)), None)).is_ok(),
                    DecodeOutcome::HashMismatch => {
                        tracing::warn!(
                            block = b,
                            "decoded block fails its digest; asking for it again"
                        );
                        done.send((b, Err(None), None)).is_ok()
                    }
                    DecodeOutcome::Undecodable(why) => good.send(Decoded::Fatal(why)).is_ok(),
                };
                if !sent {
                    return;
                }
            }
        });
    }
}

/// Starts and bounds writeback of what the writer wrote.
struct Writeback {
    fd: std::os::fd::RawFd,
    pending: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Writeback {
    fn new(file: &File) -> Writeback {
        use std::os::fd::AsRawFd;
        Writeback {
            fd: file.as_raw_fd(),
            pending: Default::default(),
            bytes: 0,
        }
    }

    /// `[offset, offset+len)` was just written: start its writeback, and
    /// wait for the oldest ranges once the window is full.
    fn written(&mut self, offset: u64, len: u64) {
        // Errors here are not fatal: the final fsync reports real ones.
        sync_range(self.fd, offset, len, libc::SYNC_FILE_RANGE_WRITE);
        self.pending.push_back((offset, len));
        self.bytes += len;
        while self.bytes > WRITEBACK_WINDOW {
            let Some((o, l)) = self.pending.pop_front() else {
                break;
            };
            sync_range(
                self.fd,
                o,
                l,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            self.bytes -= l;
        }
    }
}

fn sync_range(fd: std::os::fd::RawFd, offset: u64, len: u64, flags: libc::c_uint) {
    // SAFETY: plain syscall on a descriptor the writer owns for its whole
    // life; no memory is passed.
    unsafe {
        libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, flags);
    }
}

/// What the writer starts from and works with.
pub(super) struct WriterSetup {
    pub(super) m: Arc<Manifest>,
    pub(super) out: Arc<Output>,
    pub(super) resume: ResumeState,
    /// Digests of the blocks already in place (the scan before Ready).
    pub(super) digests: Vec<Option<[u8; 32]>>,
    /// Zero blocks of a fresh output, to digest from zeros while idle.
    pub(super) zero_blocks: Vec<u32>,
    /// What the scan before Ready found.
    pub(super) in_place: InPlace,
    pub(super) jobs: crossbeam_channel::Receiver<DecodeJob>,
    pub(super) queued: Arc<AtomicU64>,
    pub(super) done: crossbeam_channel::Sender<DecodeResult>,
    /// The writer's queue, shared by the decoders and the scan running
    /// alongside the wave.
    pub(super) good: (
        crossbeam_channel::Sender<Decoded>,
        crossbeam_channel::Receiver<Decoded>,
    ),
    pub(super) decoders: usize,
    pub(super) progress: Arc<Progress>,
    pub(super) stop: Arc<AtomicBool>,
    /// A relay's receiver: what it keeps for its own wave.
    pub(super) keep: Option<Keep>,
}

/// What a relay's receiver keeps for the wave it sends on its own
/// segment: each compressed block's frame at its place in the blocks
/// file, and word of every block written (the gate its wave reads by).
pub(super) struct Keep {
    pub(super) frames: Option<File>,
    pub(super) offsets: Vec<u64>,
    pub(super) gate: Arc<BlockGate>,
}

impl Keep {
    /// Block `b` is written; write its frame too, then open the gate.
    fn written(&self, b: u32, frame: Option<&[u8]>) -> Result<(), String> {
        if let (Some(f), Some(frame)) = (&self.frames, frame) {
            let at = self.offsets.get(b as usize).copied().unwrap_or(0);
            f.write_all_at(frame, at)
                .map_err(|e| format!("writing block {b}'s frame for the relay: {e}"))?;
        }
        self.gate.mark_ready(b);
        Ok(())
    }
}

/// Decode (on `decoders` threads), check, write. Each block's digest
/// (computed once, from the bytes written, or by the scan from the bytes
/// in place) is kept; once every block is in, the output is flushed and
/// the digests merge into the whole-image hash, which is returned.
pub(super) fn writer_loop(w: WriterSetup) -> Written {
    let WriterSetup {
        m,
        out,
        mut resume,
        mut digests,
        mut zero_blocks,
        mut in_place,
        jobs,
        queued,
        done,
        good: (good_tx, good),
        decoders,
        progress,
        stop,
        keep,
    } = w;
    spawn_decoders(
        &m,
        keep.is_some(),
        decoders.max(1),
        &jobs,
        &queued,
        &done,
        good_tx,
    );
    drop(jobs);
    let mut wb = Writeback::new(&out.file);
    if let Err(e) = write_blocks(
        &m,
        &out,
        &mut resume,
        &mut digests,
        &mut zero_blocks,
        &mut in_place,
        &good,
        &done,
        &mut wb,
        &progress,
        &stop,
        keep.as_ref(),
    ) {
        return Written {
            hash: Err(e),
            flush: Duration::ZERO,
            in_place,
        };
    }
    let t = Instant::now();
    if let Err(e) = out.file.sync_data() {
        return Written {
            hash: Err(format!("flushing output: {e}")),
            flush: t.elapsed(),
            in_place,
        };
    }
    let flush = t.elapsed();
    resume.save();
    let all: Vec<[u8; 32]> = digests.into_iter().flatten().collect();
    Written {
        hash: Ok(crate::image::manifest::merge_block_digests(&all)),
        flush,
        in_place,
    }
}

#[allow(clippy::too_many_arguments)]
fn write_blocks(
    m: &Manifest,
    out: &Output,
    resume: &mut ResumeState,
    digests: &mut [Option<[u8; 32]>],
    zero_blocks: &mut Vec<u32>,
    in_place: &mut InPlace,
    good: &crossbeam_channel::Receiver<Decoded>,
    done: &crossbeam_channel::Sender<DecodeResult>,
    wb: &mut Writeback,
    progress: &Progress,
    stop: &AtomicBool,
    keep: Option<&Keep>,
) -> Result<(), String> {
    let mut have = digests.iter().filter(|d| d.is_some()).count();
    let mut last_save = Instant::now();
    let mut zeros = Vec::new();
    progress
        .verified_blocks
        .store(have as u32, Ordering::Relaxed);
    while have < digests.len() {
        if stop.load(Ordering::Relaxed) {
            resume.save();
            return Err("stopped".into());
        }
        // No block right now (or none will come: the receive loop ended
        // because every block is in): digest a zero block meanwhile. A
        // receiver that resumed every data block has only zero blocks left.
        let next = match good.try_recv() {
            Ok(j) => Ok(j),
            Err(none) => match zero_blocks.pop() {
                Some(b) => {
                    let len = m.block_len(b);
                    zeros.resize(len, 0);
                    if digests[b as usize]
                        .replace(m.digest_block(b, &zeros))
                        .is_none()
                    {
                        have += 1;
                        progress
                            .verified_blocks
                            .store(have as u32, Ordering::Relaxed);
                    }
                    continue;
                }
                None if none.is_empty() => good.recv_timeout(Duration::from_millis(100)),
                None => Err(crossbeam_channel::RecvTimeoutError::Disconnected),
            },
        };
        let (b, data, digest, frame) = match next {
            Ok(Decoded::Good {
                block,
                data,
                digest,
                frame,
            }) => (block, data, digest, frame),
            Ok(Decoded::Fatal(why)) => {
                resume.save();
                return Err(why);
            }
            Ok(scanned @ (Decoded::InPlace { .. } | Decoded::Stale(_))) => {
                if let Some(b) = in_place.take(m, &scanned, digests, resume) {
                    have += 1;
                    progress
                        .verified_blocks
                        .store(have as u32, Ordering::Relaxed);
                    // The core counts it done and stops asking for it.
                    let _ = done.send((b, Ok(()), None));
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                resume.save();
                return Err("receive loop ended before the image was complete".into());
            }
        };
        if digests[b as usize].is_some() {
            // The scan found it in place first: nothing to write.
            let _ = done.send((b, Ok(()), Some(data)));
            continue;
        }
        let offset = m.block_offset(b);
        out.file
            .write_all_at(&data, offset)
            .map_err(|e| format!("writing block {b}: {e}"))?;
        wb.written(offset, data.len() as u64);
        if let Some(k) = keep {
            k.written(b, frame.as_deref())?;
        }
        digests[b as usize] = Some(digest);
        have += 1;
        progress
            .verified_blocks
            .store(have as u32, Ordering::Relaxed);
        resume.set(b, true);
        let _ = done.send((b, Ok(()), Some(data)));
        if last_save.elapsed() > Duration::from_millis(500) {
            resume.save();
            last_save = Instant::now();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk target is never made, truncated or resized: missing, it is
    /// an error and nothing appears in its place; too small, an error;
    /// larger than the image, it keeps its size and what lies past the
    /// image.
    #[test]
    fn a_disk_target_is_never_created_or_resized() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::of_bytes(&vec![7u8; 4 * 4096], 4096, 1024).unwrap();
        let missing = dir.path().join("sdz");
        let e = open_output(&missing, &m, false, true).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(!missing.exists(), "something was created in its place");
        let small = dir.path().join("small");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        assert!(open_output(&small, &m, false, true).is_err());
        assert_eq!(std::fs::metadata(&small).unwrap().len(), 4096);
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0xAAu8; 8 * 4096]).unwrap();
        let out = open_output(&big, &m, false, true).unwrap();
        assert!(!out.fresh, "a disk's old bytes are never assumed zero");
        drop(out);
        let after = std::fs::read(&big).unwrap();
        assert_eq!(after.len(), 8 * 4096);
        assert!(after.iter().all(|b| *b == 0xAA));
    }

    /// A writer over `out` with nothing running but its decoders: the
    /// tests feed its queue themselves.
    fn setup(
        m: &Arc<Manifest>,
        out: Output,
        resume: ResumeState,
        digests: Vec<Option<[u8; 32]>>,
        zero_blocks: Vec<u32>,
    ) -> (
        WriterSetup,
        crossbeam_channel::Receiver<DecodeResult>,
        crossbeam_channel::Sender<Decoded>,
    ) {
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        drop(job_tx);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (good_tx, good_rx) = crossbeam_channel::bounded(64);
        let w = WriterSetup {
            m: m.clone(),
            out: Arc::new(out),
            resume,
            digests,
            zero_blocks,
            in_place: InPlace::default(),
            jobs: job_rx,
            queued: Arc::new(AtomicU64::new(0)),
            done: done_tx,
            good: (good_tx.clone(), good_rx),
            decoders: 2,
            progress: Arc::new(Progress::default()),
            stop: Arc::new(AtomicBool::new(false)),
            keep: None,
        };
        (w, done_rx, good_tx)
    }

    /// A receiver that resumed every data block has only zero blocks left
    /// and no job will ever come (its receive loop may already be gone):
    /// the writer digests the zero blocks and the image verifies.
    #[test]
    fn only_zero_blocks_left_and_no_more_jobs_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 6 * 4096];
        data[..4096].fill(3);
        data[3 * 4096..4 * 4096].fill(5);
        let m = Arc::new(Manifest::of_bytes(&data, 4096, 1024).unwrap());
        let path = dir.path().join("out");
        fs_write(&path, &data);
        let out = open_output(&path, &m, true, false).unwrap();
        let resume = ResumeState::load(&dir.path().join("out.rcresume"), &m);
        let mut digests = vec![None; 6];
        let mut zero_blocks = Vec::new();
        for b in 0..6u32 {
            let range = m.block_offset(b) as usize..m.block_offset(b) as usize + m.block_len(b);
            if m.blocks[b as usize].zero {
                zero_blocks.push(b);
            } else {
                digests[b as usize] = Some(m.digest_block(b, &data[range]));
            }
        }
        assert_eq!(zero_blocks.len(), 4);
        let (w, _done, good) = setup(&m, out, resume, digests, zero_blocks);
        drop(good);
        let got = writer_loop(w);
        assert_eq!(got.hash, Ok(m.image_hash));
    }

    /// With data blocks still missing, the end of the jobs is an error.
    #[test]
    fn missing_data_blocks_and_no_more_jobs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 2 * 4096];
        data[..4096].fill(3);
        let m = Arc::new(Manifest::of_bytes(&data, 4096, 1024).unwrap());
        let path = dir.path().join("out");
        let out = open_output(&path, &m, false, false).unwrap();
        let resume = ResumeState::load(&dir.path().join("out.rcresume"), &m);
        let (w, _done, good) = setup(&m, out, resume, vec![None; 2], vec![1]);
        drop(good);
        let got = writer_loop(w);
        assert_eq!(
            got.hash,
            Err("receive loop ended before the image was complete".to_string())
        );
    }

    /// Delta re-imaging with the scan alongside the wave, on an output
    /// holding an older version with garbage where the new one has zeros:
    /// the scan finds the unchanged blocks and zeroes the zero ones, the
    /// "wire" brings the changed ones, a block both found and received is
    /// written once (the wire's copy of a found block, forged here, is
    /// never written), the core is told of every block in place, and the
    /// image verifies.
    #[test]
    fn a_scan_alongside_the_wave_and_the_wire_make_one_verified_image() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096usize;
        let n = 40usize;
        let mut new = vec![0u8; n * bs];
        for b in 0..n {
            if b % 5 != 4 {
                new[b * bs..(b + 1) * bs].fill(b as u8 + 1);
            }
        }
        let m = Arc::new(Manifest::of_bytes(&new, bs as u32, 1024).unwrap());
        let mut old = new.clone();
        let changed = [3usize, 17, 31];
        for b in changed {
            old[b * bs + 7] ^= 0xFF;
        }
        // Old garbage in the new image's zero blocks 4 and 9.
        old[4 * bs..5 * bs].fill(0xEE);
        old[9 * bs + 100] = 1;
        let path = dir.path().join("out");
        fs_write(&path, &old);
        let out = open_output(&path, &m, true, false).unwrap();
        let resume = ResumeState::load(&dir.path().join("out.rcresume"), &m);
        let visits = super::super::scan::plan(&m, &out, &resume, true);
        assert_eq!(visits.len(), n, "delta looks at every block");
        let (w, done, good) = setup(&m, out, resume, vec![None; n], Vec::new());
        let out = w.out.clone();
        // The wire's blocks: the changed ones, and a forged copy of block
        // 0 with a good digest but other bytes (written only if the writer
        // took the wire's copy of a block the scan had found).
        for b in changed {
            let data = new[b * bs..(b + 1) * bs].to_vec();
            let digest = m.digest_block(b as u32, &data);
            good.send(Decoded::Good {
                block: b as u32,
                data,
                digest,
                frame: None,
            })
            .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::unbounded();
        super::super::scan::spawn_rest(m.clone(), out, visits, 3, stop, tx);
        let scanned: Vec<Decoded> = rx.iter().collect();
        let found_zero = scanned
            .iter()
            .filter(|d| matches!(d, Decoded::InPlace { block: 0, .. }))
            .count();
        assert_eq!(found_zero, 1);
        for d in scanned {
            good.send(d).unwrap();
        }
        good.send(Decoded::Good {
            block: 0,
            data: vec![0xAB; bs],
            digest: m.blocks[0].hash,
            frame: None,
        })
        .unwrap();
        drop(good);
        let got = writer_loop(w);
        assert_eq!(got.hash, Ok(m.image_hash));
        // 40 blocks: 8 zero (2 zeroed, 6 found zero), 32 data (3 changed).
        assert_eq!(got.in_place.found, 40 - 3 - 2);
        assert_eq!(got.in_place.found_data, 32 - 3);
        assert_eq!(std::fs::read(&path).unwrap(), new);
        let told: std::collections::BTreeSet<u32> = done.try_iter().map(|(b, _, _)| b).collect();
        assert_eq!(told.len(), n, "every block reported done to the core");
    }

    /// A resume state listing a block that is not what the manifest says
    /// (overwritten since) is not believed: the block counts as missing
    /// and the state forgets it.
    #[test]
    fn a_resume_state_is_checked_against_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096usize;
        let data: Vec<u8> = (0..4 * bs).map(|i| (i / bs) as u8 + 1).collect();
        let m = Manifest::of_bytes(&data, bs as u32, 1024).unwrap();
        let path = dir.path().join("out");
        let mut on_disk = data.clone();
        on_disk[2 * bs] ^= 1;
        fs_write(&path, &on_disk);
        let state = dir.path().join("out.rcresume");
        let mut resume = ResumeState::load(&state, &m);
        for b in 0..4 {
            resume.set(b, true);
        }
        let out = open_output(&path, &m, true, false).unwrap();
        let visits = super::super::scan::plan(&m, &out, &resume, false);
        let mut digests = vec![None; 4];
        let mut in_place = InPlace::default();
        let mut done = Vec::new();
        for d in super::super::scan::scan_now(&m, &out, &visits, 2) {
            done.extend(in_place.take(&m, &d, &mut digests, &mut resume));
        }
        done.sort();
        assert_eq!(done, vec![0, 1, 3]);
        assert!(!resume.has(2));
        assert_eq!(in_place.found_data, 3);
    }

    fn fs_write(path: &Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
    }
}
