//! The receiver's writer thread: decode, check each block's digest before
//! its positioned write, keep the digests, digest zero blocks from zeros
//! while idle, and merge the digests into the whole-image hash.
//!
//! Owns: the output file or block device and the resume state while the
//! wave runs. Must not: read packets (the receive thread does) or decide
//! what a packet means (the core does).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::resume::ResumeState;
use super::Progress;
use crate::dataplane::receiver::{decode_block, DecodeJob, DecodeOutcome};
use crate::image::fec::BlockAssembly;
use crate::image::manifest::Manifest;

pub(super) struct Output {
    pub(super) file: File,
    /// Fresh sparse file: zero blocks need no write.
    pub(super) fresh: bool,
}

pub(super) fn open_output(path: &Path, m: &Manifest, resume_valid: bool) -> io::Result<Output> {
    let meta = std::fs::metadata(path).ok();
    let is_dev = meta
        .as_ref()
        .is_some_and(|md| md.file_type().is_block_device());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_dev)
        .truncate(false)
        .open(path)?;
    if is_dev {
        let size = std::io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        if size < m.image_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device holds {size} bytes, image needs {}", m.image_size),
            ));
        }
        return Ok(Output { file, fresh: false });
    }
    if resume_valid {
        file.set_len(m.image_size)?;
        Ok(Output { file, fresh: false })
    } else {
        file.set_len(0)?;
        file.set_len(m.image_size)?;
        Ok(Output { file, fresh: true })
    }
}

/// A decode job's block, its outcome, and the written block's buffer for
/// reuse.
pub(super) type DecodeResult = (u32, Result<(), Option<BlockAssembly>>, Option<Vec<u8>>);

/// Decode, check, write. Each block's digest (computed once, from the
/// bytes written) is kept; once every block is in, the digests merge into
/// the whole-image hash, which is returned.
#[allow(clippy::too_many_arguments)]
pub(super) fn writer_loop(
    m: Arc<Manifest>,
    out: Output,
    mut resume: ResumeState,
    mut digests: Vec<Option<[u8; 32]>>,
    mut zero_blocks: Vec<u32>,
    jobs: crossbeam_channel::Receiver<DecodeJob>,
    done: crossbeam_channel::Sender<DecodeResult>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> Result<[u8; 32], String> {
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
        // No job right now (or none will come: the receive loop ended
        // because every block is in): digest a zero block meanwhile. A
        // receiver that resumed every data block has only zero blocks left.
        let next = match jobs.try_recv() {
            Ok(j) => Ok(j),
            Err(no_job) => match zero_blocks.pop() {
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
                None if no_job.is_empty() => jobs.recv_timeout(Duration::from_millis(100)),
                None => Err(crossbeam_channel::RecvTimeoutError::Disconnected),
            },
        };
        let job = match next {
            Ok(j) => j,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                resume.save();
                return Err("receive loop ended before the image was complete".into());
            }
        };
        let b = job.block;
        let mut spare = None;
        let result = match decode_block(&m, job) {
            DecodeOutcome::Good { data, digest } => {
                out.file
                    .write_all_at(&data, m.block_offset(b))
                    .map_err(|e| format!("writing block {b}: {e}"))?;
                if digests[b as usize].replace(digest).is_none() {
                    have += 1;
                    progress
                        .verified_blocks
                        .store(have as u32, Ordering::Relaxed);
                }
                resume.set(b, true);
                spare = Some(data);
                Ok(())
            }
            DecodeOutcome::NeedMore(asm) => Err(Some(asm)),
            DecodeOutcome::HashMismatch => {
                tracing::warn!(
                    block = b,
                    "decoded block fails its hash; asking for it again"
                );
                Err(None)
            }
        };
        let _ = done.send((b, result, spare));
        if last_save.elapsed() > Duration::from_millis(500) {
            resume.save();
            last_save = Instant::now();
        }
    }
    out.file
        .sync_data()
        .map_err(|e| format!("flushing output: {e}"))?;
    resume.save();
    let all: Vec<[u8; 32]> = digests.into_iter().flatten().collect();
    Ok(crate::image::manifest::merge_block_digests(&all))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let out = open_output(&path, &m, true).unwrap();
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
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        drop(job_tx);
        let (done_tx, _done_rx) = crossbeam_channel::unbounded();
        let got = writer_loop(
            m.clone(),
            out,
            resume,
            digests,
            zero_blocks,
            job_rx,
            done_tx,
            Arc::new(Progress::default()),
            Arc::new(AtomicBool::new(false)),
        );
        assert_eq!(got, Ok(m.image_hash));
    }

    /// With data blocks still missing, the end of the jobs is an error.
    #[test]
    fn missing_data_blocks_and_no_more_jobs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 2 * 4096];
        data[..4096].fill(3);
        let m = Arc::new(Manifest::of_bytes(&data, 4096, 1024).unwrap());
        let path = dir.path().join("out");
        let out = open_output(&path, &m, false).unwrap();
        let resume = ResumeState::load(&dir.path().join("out.rcresume"), &m);
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        drop(job_tx);
        let (done_tx, _done_rx) = crossbeam_channel::unbounded();
        let got = writer_loop(
            m,
            out,
            resume,
            vec![None; 2],
            vec![1],
            job_rx,
            done_tx,
            Arc::new(Progress::default()),
            Arc::new(AtomicBool::new(false)),
        );
        assert_eq!(
            got,
            Err("receive loop ended before the image was complete".to_string())
        );
    }

    fn fs_write(path: &Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
    }
}
