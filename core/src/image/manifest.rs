//! Image manifest: what a receiver must end up with, block by block.
//!
//! Owns: building a manifest by streaming an image file (never holding it in
//! RAM), validating a manifest received from the network before anything is
//! sized from it, and the RaptorQ parameters (OTI) of each block.
//! Must not: do I/O beyond reading the image it is asked to describe.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use raptorq::ObjectTransmissionInformation;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default block size: raptorq decodes 1 MiB blocks at ~0.5–0.7 GB/s per
/// core on this hardware class; 16 MiB blocks are twice as slow per byte.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// RaptorQ symbol alignment (RFC 6330 Al); symbol sizes are multiples of it.
pub const ALIGNMENT: u8 = 8;
/// RFC 6330 K'max: most source symbols one block may have.
pub const MAX_SOURCE_SYMBOLS: u64 = 56_403;
/// Upper bound on what a manifest may describe (16 TiB), so a hostile or
/// corrupt manifest cannot make a receiver allocate absurd bitmaps.
pub const MAX_IMAGE_SIZE: u64 = 16 << 40;

/// One block of the image as the manifest describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// [`block_digest`] of the block: its chaining value in the BLAKE3
    /// tree of the whole image, so block digests merge into the image
    /// hash ([`merge_block_digests`]) without hashing anything twice.
    pub hash: [u8; 32],
    /// All bytes are zero: not sent, the receiver writes zeros itself.
    pub zero: bool,
    /// How the block travels: its own bytes, or a zstd frame.
    pub wire: Wire,
}

/// A block's bytes on the wire: what RaptorQ codes and the sender reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// The block's own bytes (zero blocks, and blocks compression does
    /// not shrink).
    Raw,
    /// One zstd frame that decompresses to exactly the block. `digest`
    /// (plain BLAKE3 of the frame) lets a receiver reject a forged frame
    /// before decompressing it and the sender check its prepared blocks;
    /// the block's own `hash` is still checked after decompression.
    Zstd {
        /// Bytes of the frame (less than the block's length).
        len: u32,
        /// BLAKE3 of the frame.
        digest: [u8; 32],
    },
}

impl BlockInfo {
    /// The block of `data` at `offset` (`single`: the whole image is this
    /// one block).
    pub(crate) fn of(offset: u64, data: &[u8], single: bool) -> BlockInfo {
        BlockInfo {
            hash: block_digest(offset, data, single),
            zero: is_zero(data),
            wire: Wire::Raw,
        }
    }
}

/// What an image is: its size and hash, its blocks' digests and zero
/// blocks, and the symbol size of the waves that carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bytes.
    pub image_size: u64,
    /// BLAKE3 of the whole image (the merge of the block digests).
    pub image_hash: [u8; 32],
    /// Bytes per block (a power of two; the last block may be shorter).
    pub block_size: u32,
    /// RaptorQ symbol size T (bytes per packet payload).
    pub symbol_size: u16,
    /// Every block, in image order.
    pub blocks: Vec<BlockInfo>,
}

/// Why a manifest could not be built or loaded.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// Reading the image or the manifest file failed.
    #[error("reading image: {0}")]
    Io(#[from] io::Error),
    /// The parameters or the file do not describe a usable image.
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

impl Manifest {
    /// Stream the file at `path` once and describe it.
    pub fn build(
        path: &Path,
        block_size: u32,
        symbol_size: u16,
    ) -> Result<Manifest, ManifestError> {
        let file = File::open(path)?;
        let image_size = file.metadata()?.len();
        Manifest::from_reader(file, image_size, block_size, symbol_size).map_err(|e| match e {
            ManifestError::Io(io) => ManifestError::Io(io::Error::new(
                io.kind(),
                format!("{}: {io}", path.display()),
            )),
            other => other,
        })
    }

    /// Describe the `image_size` bytes `r` yields, reading them once. A
    /// source that ends early or runs on is an error (a file that changed
    /// while being read).
    pub fn from_reader(
        r: impl Read,
        image_size: u64,
        block_size: u32,
        symbol_size: u16,
    ) -> Result<Manifest, ManifestError> {
        let raw = crate::image::packed::PackOptions {
            level: None,
            threads: 1,
        };
        crate::image::packed::pack(
            r,
            image_size,
            block_size,
            symbol_size,
            raw,
            &mut io::sink(),
            &mut |_| {},
        )
    }

    /// Describe an image held in memory (same result as [`Self::build`]
    /// on a file with these bytes).
    pub fn of_bytes(
        data: &[u8],
        block_size: u32,
        symbol_size: u16,
    ) -> Result<Manifest, ManifestError> {
        Manifest::from_reader(data, data.len() as u64, block_size, symbol_size)
    }

    pub(crate) fn from_blocks(
        image_size: u64,
        block_size: u32,
        symbol_size: u16,
        blocks: Vec<BlockInfo>,
    ) -> Result<Manifest, ManifestError> {
        let digests: Vec<[u8; 32]> = blocks.iter().map(|b| b.hash).collect();
        let m = Manifest {
            image_size,
            image_hash: merge_block_digests(&digests),
            block_size,
            symbol_size,
            blocks,
        };
        m.validate()?;
        Ok(m)
    }

    /// Everything a receiver sizes buffers from is checked here first.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_params(self.block_size, self.symbol_size)?;
        if self.image_size > MAX_IMAGE_SIZE {
            return Err(ManifestError::Invalid(format!(
                "image size {} exceeds {}",
                self.image_size, MAX_IMAGE_SIZE
            )));
        }
        let expect = self.image_size.div_ceil(self.block_size as u64);
        if self.blocks.len() as u64 != expect {
            return Err(ManifestError::Invalid(format!(
                "{} block entries for {} bytes in {}-byte blocks (expected {expect})",
                self.blocks.len(),
                self.image_size,
                self.block_size
            )));
        }
        for (b, info) in self.blocks.iter().enumerate() {
            if let Wire::Zstd { len, .. } = info.wire {
                // Kept compressed only where that saves space: a frame as
                // long as the block would only make receivers work more.
                if info.zero || len == 0 || len as usize >= self.block_len(b as u32) {
                    return Err(ManifestError::Invalid(format!(
                        "block {b}: compressed length {len} for a block of {} bytes{}",
                        self.block_len(b as u32),
                        if info.zero { " of zeros" } else { "" }
                    )));
                }
            }
        }
        if !self.blocks.is_empty() {
            let digests: Vec<[u8; 32]> = self.blocks.iter().map(|b| b.hash).collect();
            if merge_block_digests(&digests) != self.image_hash {
                return Err(ManifestError::Invalid(
                    "block digests do not add up to the image hash".into(),
                ));
            }
        }
        Ok(())
    }

    /// [`block_digest`] of `data` as block `b` of this image.
    pub fn digest_block(&self, b: u32, data: &[u8]) -> [u8; 32] {
        block_digest(self.block_offset(b), data, self.blocks.len() == 1)
    }

    /// Blocks in the image.
    pub fn block_count(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Where `block` starts in the image.
    pub fn block_offset(&self, block: u32) -> u64 {
        block as u64 * self.block_size as u64
    }

    /// Bytes in `block` (the last one may be short).
    pub fn block_len(&self, block: u32) -> usize {
        let start = self.block_offset(block);
        (self.image_size.saturating_sub(start)).min(self.block_size as u64) as usize
    }

    /// Bytes of `block` on the wire: what RaptorQ codes.
    pub fn wire_len(&self, block: u32) -> usize {
        match self.blocks[block as usize].wire {
            Wire::Raw => self.block_len(block),
            Wire::Zstd { len, .. } => len as usize,
        }
    }

    /// Source symbols K of `block` (of its wire bytes).
    pub fn source_symbols(&self, block: u32) -> u32 {
        (self.wire_len(block) as u64).div_ceil(self.symbol_size as u64) as u32
    }

    /// RaptorQ OTI of one block's wire bytes: each block is its own
    /// single-source-block object, so one encoder never spans the image.
    pub fn block_oti(&self, block: u32) -> ObjectTransmissionInformation {
        ObjectTransmissionInformation::new(
            self.wire_len(block) as u64,
            self.symbol_size,
            1,
            1,
            ALIGNMENT,
        )
    }

    /// Blocks that go on the wire (zero blocks do not).
    pub fn data_blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.zero)
            .map(|(i, _)| i as u32)
    }

    /// Zero blocks (never on the wire).
    pub fn zero_blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.zero)
            .map(|(i, _)| i as u32)
    }

    /// Bytes that go on the wire as source symbols.
    pub fn data_bytes(&self) -> u64 {
        self.data_blocks().map(|b| self.wire_len(b) as u64).sum()
    }

    /// Image bytes of the blocks that are not zero.
    pub fn nonzero_bytes(&self) -> u64 {
        self.data_blocks().map(|b| self.block_len(b) as u64).sum()
    }

    /// Blocks that travel compressed.
    pub fn compressed_blocks(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| matches!(b.wire, Wire::Zstd { .. }))
            .count()
    }

    /// The image hash, hex.
    pub fn image_hash_hex(&self) -> String {
        blake3::Hash::from_bytes(self.image_hash)
            .to_hex()
            .to_string()
    }
}

/// Manifest files: magic, then the postcard-encoded manifest, then the
/// image's size and mtime (ns) at build time, so a stale file is detected.
const FILE_MAGIC: &[u8; 8] = b"RCMANIF3";
/// Files of older rackcasts: block digests that were not tree chaining
/// values (1), blocks without a wire encoding (2).
const OLD_FILE_MAGICS: [&[u8; 8]; 2] = [b"RCMANIF1", b"RCMANIF2"];

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    manifest: Manifest,
    source_len: u64,
    source_mtime_ns: i128,
}

fn mtime_ns(path: &Path) -> Result<(u64, i128), ManifestError> {
    let md = std::fs::metadata(path)?;
    let ns = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    Ok((md.len(), ns))
}

impl Manifest {
    /// Save beside-the-image style: tied to the image's size and mtime.
    pub fn save(&self, image: &Path, to: &Path) -> Result<(), ManifestError> {
        let (source_len, source_mtime_ns) = mtime_ns(image)?;
        let body = postcard::to_stdvec(&ManifestFile {
            manifest: self.clone(),
            source_len,
            source_mtime_ns,
        })
        .map_err(|e| ManifestError::Invalid(e.to_string()))?;
        let mut out = FILE_MAGIC.to_vec();
        out.extend_from_slice(&body);
        // Written aside and renamed: a reader never sees half a manifest.
        let mut tmp = to.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, out)
            .and_then(|()| std::fs::rename(&tmp, to))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
        Ok(())
    }

    /// Load a manifest file and check it still describes `image` (same
    /// size and mtime). A stale or foreign file is an error, not a guess.
    pub fn load_for(image: &Path, from: &Path) -> Result<Manifest, ManifestError> {
        let raw = std::fs::read(from)?;
        if raw.len() >= 8 && OLD_FILE_MAGICS.iter().any(|m| &raw[..8] == *m) {
            return Err(ManifestError::Invalid(format!(
                "{} was written by an older rackcast: run `rackcast manifest {}` again",
                from.display(),
                image.display()
            )));
        }
        if raw.len() < 8 || &raw[..8] != FILE_MAGIC {
            return Err(ManifestError::Invalid(format!(
                "{} is not a rackcast manifest file",
                from.display()
            )));
        }
        let f: ManifestFile = postcard::from_bytes(&raw[8..])
            .map_err(|e| ManifestError::Invalid(format!("{}: {e}", from.display())))?;
        let (len, ns) = mtime_ns(image)?;
        if len != f.source_len || ns != f.source_mtime_ns {
            return Err(ManifestError::Invalid(format!(
                "{} was built for another version of {} (size or mtime changed)",
                from.display(),
                image.display()
            )));
        }
        f.manifest.validate()?;
        Ok(f.manifest)
    }
}

/// Digest of the block at `offset` (a multiple of the block size): its
/// BLAKE3 chaining value as a subtree of the image's hash tree. Blocks are
/// power-of-two multiples of BLAKE3's 1 KiB chunk and aligned, so every
/// full block, and the short last one, is a subtree of that tree. An image
/// of one block is its own root: then the plain BLAKE3 hash.
pub fn block_digest(offset: u64, data: &[u8], single_block: bool) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    if single_block {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(data)
        .finalize_non_root()
}

/// The whole image's BLAKE3 hash from its block digests, in order: the
/// tree above the blocks, split as BLAKE3 splits (the left side holds the
/// largest power of two of blocks below the count).
pub fn merge_block_digests(digests: &[[u8; 32]]) -> [u8; 32] {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn subtree(d: &[[u8; 32]]) -> [u8; 32] {
        if d.len() == 1 {
            return d[0];
        }
        let (l, r) = d.split_at(crate::image::lanes::left_subtree_leaves(d.len()));
        merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
    }
    match digests.len() {
        0 => *blake3::hash(&[]).as_bytes(),
        1 => digests[0],
        n => {
            let (l, r) = digests.split_at(crate::image::lanes::left_subtree_leaves(n));
            *merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash).as_bytes()
        }
    }
}

pub(crate) fn check_params(block_size: u32, symbol_size: u16) -> Result<(), ManifestError> {
    // Block digests are subtrees of the image's BLAKE3 tree only for
    // power-of-two blocks of whole chunks.
    if !block_size.is_power_of_two() || block_size < blake3::CHUNK_LEN as u32 {
        return Err(ManifestError::Invalid(format!(
            "block size {block_size} is not a power of two of at least {} bytes",
            blake3::CHUNK_LEN
        )));
    }
    if symbol_size < ALIGNMENT as u16 || symbol_size % ALIGNMENT as u16 != 0 {
        return Err(ManifestError::Invalid(format!(
            "symbol size {symbol_size} is not a positive multiple of {ALIGNMENT}"
        )));
    }
    if block_size < symbol_size as u32 {
        return Err(ManifestError::Invalid(format!(
            "block size {block_size} is smaller than symbol size {symbol_size}"
        )));
    }
    if (block_size as u64).div_ceil(symbol_size as u64) > MAX_SOURCE_SYMBOLS {
        return Err(ManifestError::Invalid(format!(
            "block size {block_size} needs more than {MAX_SOURCE_SYMBOLS} symbols of {symbol_size} bytes"
        )));
    }
    Ok(())
}

/// Read until `buf` is full or EOF; returns bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Eight bytes at a time keeps zero detection off the profile.
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    let folded = chunks.fold(0u64, |acc, c| {
        acc | u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
    });
    folded == 0 && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_source_shorter_or_longer_than_announced_is_refused() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = Manifest::from_reader(&data[..], 10_000, 4096, 1024).unwrap();
        assert_eq!(m, Manifest::of_bytes(&data, 4096, 1024).unwrap());
        for announced in [9_999u64, 10_001, 8192, 12_288] {
            let e = Manifest::from_reader(&data[..], announced, 4096, 1024).unwrap_err();
            assert!(
                matches!(&e, ManifestError::Io(io) if io.to_string().contains("changed size")),
                "{announced}: {e}"
            );
        }
    }

    #[test]
    fn build_marks_zero_blocks_and_short_tail() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 4096 * 3 + 100];
        for (i, b) in data[..4096].iter_mut().enumerate() {
            *b = i as u8 | 1;
        }
        data[4096 * 3 + 5] = 9;
        f.write_all(&data).unwrap();
        let m = Manifest::build(f.path(), 4096, 1024).unwrap();
        assert_eq!(m.block_count(), 4);
        assert_eq!(
            m.blocks.iter().map(|b| b.zero).collect::<Vec<_>>(),
            vec![false, true, true, false]
        );
        assert_eq!(m.block_len(3), 100);
        assert_eq!(m.source_symbols(3), 1);
        assert_eq!(m.source_symbols(0), 4);
        assert_eq!(m.image_hash, *blake3::hash(&data).as_bytes());
        assert_eq!(
            m.blocks[3].hash,
            block_digest(4096 * 3, &data[4096 * 3..], false)
        );
        assert_eq!(m.data_bytes(), 4096 + 100);
        // The same bytes in memory describe the same image.
        assert_eq!(Manifest::of_bytes(&data, 4096, 1024).unwrap(), m);
        assert_eq!(
            Manifest::of_bytes(&data[..100], 4096, 1024)
                .unwrap()
                .image_hash,
            *blake3::hash(&data[..100]).as_bytes()
        );
    }

    proptest::proptest! {
        /// Block digests merge to exactly `blake3::hash` of the image for
        /// any length and block size (full trees, short tails, one block).
        #[test]
        fn block_digests_merge_to_the_image_hash(len in 0usize..40_000, shift in 10u32..14, seed: u8) {
            let bs = 1usize << shift;
            let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add((i * 7 + i / 1000) as u8)).collect();
            let single = len <= bs;
            let digests: Vec<[u8; 32]> = data
                .chunks(bs)
                .enumerate()
                .map(|(i, c)| block_digest((i * bs) as u64, c, single))
                .collect();
            proptest::prop_assert_eq!(merge_block_digests(&digests), *blake3::hash(&data).as_bytes());
        }
    }

    #[test]
    fn validate_rejects_inconsistent() {
        let mut m = Manifest {
            image_size: 10_000,
            image_hash: merge_block_digests(&[[0; 32]; 3]),
            block_size: 4096,
            symbol_size: 1024,
            blocks: vec![
                BlockInfo {
                    hash: [0; 32],
                    zero: false,
                    wire: Wire::Raw,
                };
                3
            ],
        };
        assert!(m.validate().is_ok());
        m.blocks[1].hash[0] = 1;
        assert!(m.validate().is_err(), "digests not adding up");
        m.blocks[1].hash[0] = 0;
        m.block_size = 5000;
        assert!(m.validate().is_err(), "not a power of two");
        m.block_size = 4096;
        m.blocks.pop();
        assert!(m.validate().is_err());
        m.blocks.push(m.blocks[0]);
        m.symbol_size = 1001;
        assert!(m.validate().is_err());
        m.symbol_size = 8;
        m.block_size = 8 * 60_000;
        m.image_size = 1;
        m.blocks.truncate(1);
        assert!(m.validate().is_err());
    }
}
