//! The receiver's resume state: which blocks are known to be on the
//! output, tied to one image hash, saved atomically (write and rename) so
//! a receiver killed at any moment resumes with only verified blocks.
//!
//! Owns: the state file's layout (magic, image hash, big-endian block
//! count, one bit per block) and its parsing. Must not: read or write the
//! output (the writer does).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::image::manifest::Manifest;

const RESUME_MAGIC: &[u8; 8] = b"RCRSUME1";

/// A resume state file's image hash, block count and bitmap, if it is one
/// (layout: magic, image hash, big-endian block count, one bit per block).
fn parse_resume(raw: &[u8]) -> Option<([u8; 32], u32, &[u8])> {
    let magic = raw.get(..8)?;
    let hash: [u8; 32] = raw.get(8..40)?.try_into().ok()?;
    let blocks = u32::from_be_bytes(raw.get(40..44)?.try_into().ok()?);
    let bits = &raw[44..];
    (magic == RESUME_MAGIC && bits.len() == (blocks as usize).div_ceil(8))
        .then_some((hash, blocks, bits))
}

/// Blocks a resume state file lists as on the output (for tests and
/// tools watching a receiver from outside); `None` if `path` holds no
/// resume state.
pub fn saved_blocks(path: &Path) -> Option<u32> {
    let raw = std::fs::read(path).ok()?;
    let (_, _, bits) = parse_resume(&raw)?;
    Some(bits.iter().map(|b| b.count_ones()).sum())
}

/// Blocks known to be on the output, tied to one image hash.
pub(super) struct ResumeState {
    path: PathBuf,
    image_hash: [u8; 32],
    blocks: u32,
    bits: Vec<u8>,
    dirty: bool,
}

impl ResumeState {
    pub(super) fn load(path: &Path, m: &Manifest) -> ResumeState {
        let n = m.block_count() as usize;
        let mut st = ResumeState {
            path: path.to_path_buf(),
            image_hash: m.image_hash,
            blocks: n as u32,
            bits: vec![0; n.div_ceil(8)],
            dirty: false,
        };
        if let Ok(raw) = std::fs::read(path) {
            match parse_resume(&raw) {
                Some((hash, blocks, bits)) if hash == m.image_hash && blocks == n as u32 => {
                    st.bits.copy_from_slice(bits);
                }
                _ => {
                    tracing::info!(path = %path.display(), "resume state is for another image; starting over");
                }
            }
        }
        st
    }

    pub(super) fn has(&self, b: u32) -> bool {
        self.bits[(b / 8) as usize] & (1 << (b % 8)) != 0
    }

    pub(super) fn set(&mut self, b: u32, on: bool) {
        let (i, bit) = ((b / 8) as usize, 1u8 << (b % 8));
        if on {
            self.bits[i] |= bit;
        } else {
            self.bits[i] &= !bit;
        }
        self.dirty = true;
    }

    pub(super) fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let tmp = self.path.with_extension("rcresume.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(RESUME_MAGIC)?;
            f.write_all(&self.image_hash)?;
            f.write_all(&self.blocks.to_be_bytes())?;
            f.write_all(&self.bits)?;
            std::fs::rename(&tmp, &self.path)
        };
        match write() {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!(error = %e, "cannot save resume state"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ResumeState::save` writes, `saved_blocks` and `load` read
    /// back; a truncated or foreign file is no resume state.
    #[test]
    fn resume_state_round_trips_and_rejects_other_files() {
        let dir = std::env::temp_dir().join(format!("rc-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.rcresume");
        let data = vec![7u8; 10 * 4096];
        let m = Manifest::of_bytes(&data, 4096, 1024).unwrap();
        let mut st = ResumeState::load(&path, &m);
        for b in [0, 3, 9] {
            st.set(b, true);
        }
        st.save();
        assert_eq!(saved_blocks(&path), Some(3));
        let again = ResumeState::load(&path, &m);
        assert!((0..10).all(|b| again.has(b) == [0, 3, 9].contains(&b)));

        let other = Manifest::of_bytes(&data[..5 * 4096], 4096, 1024).unwrap();
        assert!((0..5).all(|b| !ResumeState::load(&path, &other).has(b)));

        let raw = std::fs::read(&path).unwrap();
        for bad in [
            &raw[..raw.len() - 1],
            &raw[..40],
            b"RCRSUME2rest".as_slice(),
        ] {
            assert_eq!(parse_resume(bad), None);
        }
        assert_eq!(saved_blocks(&dir.join("missing")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
