//! Prepared blocks: an image's blocks as they travel, compressed once when
//! the image is added, read and checked by the sender, and unpacked by
//! receivers with output bounded to the block.
//!
//! Owns: the blocks file (the zstd frames of the compressed blocks, in
//! block order, nothing else: offsets follow from the manifest), compressing
//! on every core at add time, the sender's reader of a block's wire bytes
//! ([`WireSource`]), and [`unpack`], the receivers' bounded decompression.
//! Must not: know about waves or sockets, or trust a frame before its
//! digest is checked.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

use super::manifest::{check_params, read_full, BlockInfo, Manifest, ManifestError, Wire};

/// Highest zstd level accepted (zstd's own maximum without `--ultra`).
pub const MAX_LEVEL: i32 = 19;
/// Blocks handed to the compressing threads at once, per thread: enough to
/// keep them busy, few enough to bound memory (a block each, twice).
const BATCH_PER_THREAD: usize = 4;

/// How to prepare an image's blocks.
#[derive(Debug, Clone, Copy)]
pub struct PackOptions {
    /// zstd level; `None` sends every block raw.
    pub level: Option<i32>,
    /// Compressing threads (at least 1).
    pub threads: usize,
}

/// Describe the `image_size` bytes of `r` and write the compressed frames
/// of the blocks that shrink to `frames`. `progress` gets the image bytes
/// read so far. Reads the image once, never holding more than a few
/// blocks per thread.
pub fn pack(
    mut r: impl Read,
    image_size: u64,
    block_size: u32,
    symbol_size: u16,
    opts: PackOptions,
    frames: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ManifestError> {
    if let Some(l) = opts.level {
        if !(1..=MAX_LEVEL).contains(&l) {
            return Err(ManifestError::Invalid(format!(
                "zstd level {l} is not in 1..={MAX_LEVEL}"
            )));
        }
    }
    check_params(block_size, symbol_size)?;
    let threads = opts.threads.max(1);
    let single = image_size <= u64::from(block_size);
    let mut blocks = Vec::new();
    let mut read = 0u64;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut ended = false;
    while !ended {
        batch.clear();
        let first_offset = read;
        while batch.len() < threads * BATCH_PER_THREAD {
            let mut buf = vec![0u8; block_size as usize];
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                ended = true;
                break;
            }
            buf.truncate(n);
            read += n as u64;
            batch.push(buf);
            if n < block_size as usize || read > image_size {
                ended = true;
                break;
            }
        }
        let packed = pack_batch(
            &batch,
            first_offset,
            block_size,
            symbol_size,
            single,
            opts.level,
            threads,
        )?;
        for (info, frame) in packed {
            if let Some(f) = frame {
                frames.write_all(&f)?;
            }
            blocks.push(info);
        }
        progress(read);
    }
    if read != image_size {
        return Err(ManifestError::Io(io::Error::other(format!(
            "image changed size while being read ({image_size} -> {read} bytes or more)"
        ))));
    }
    Manifest::from_blocks(image_size, block_size, symbol_size, blocks)
}

/// [`pack`] the image file at `path` on every core of this machine
/// (`level` `None`: every block raw, nothing written to `frames`).
pub fn pack_file(
    path: &Path,
    block_size: u32,
    symbol_size: u16,
    level: Option<i32>,
    frames: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ManifestError> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let opts = PackOptions {
        level,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    pack(
        io::BufReader::new(file),
        size,
        block_size,
        symbol_size,
        opts,
        frames,
        progress,
    )
}

type Packed = (BlockInfo, Option<Vec<u8>>);

/// Digest and compress one batch of consecutive blocks on `threads`
/// threads; results in block order.
fn pack_batch(
    batch: &[Vec<u8>],
    first_offset: u64,
    block_size: u32,
    symbol_size: u16,
    single: bool,
    level: Option<i32>,
    threads: usize,
) -> Result<Vec<Packed>, ManifestError> {
    let per = batch.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per)
            .enumerate()
            .map(|(i, chunk)| {
                s.spawn(move || -> io::Result<Vec<Packed>> {
                    let mut cx = match level {
                        Some(l) => Some(zstd::bulk::Compressor::new(l)?),
                        None => None,
                    };
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(j, data)| {
                            let offset =
                                first_offset + ((i * per + j) as u64) * u64::from(block_size);
                            pack_block(offset, data, symbol_size, single, cx.as_mut())
                        })
                        .collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for h in handles {
            let part = h
                .join()
                .map_err(|_| ManifestError::Invalid("a compressing thread panicked".into()))??;
            out.extend(part);
        }
        Ok(out)
    })
}

fn pack_block(
    offset: u64,
    data: &[u8],
    symbol_size: u16,
    single: bool,
    cx: Option<&mut zstd::bulk::Compressor<'_>>,
) -> io::Result<Packed> {
    let mut info = BlockInfo::of(offset, data, single);
    let Some(cx) = cx else {
        return Ok((info, None));
    };
    if info.zero {
        return Ok((info, None));
    }
    // Worth it only if it saves at least one symbol on the wire: a frame
    // that does not fit in that budget is not kept (zstd reports the
    // buffer too small, which is the answer, not an error).
    let budget = data.len().saturating_sub(usize::from(symbol_size));
    if budget == 0 {
        return Ok((info, None));
    }
    let mut frame = Vec::with_capacity(budget);
    if cx.compress_to_buffer(data, &mut frame).is_err() || frame.is_empty() {
        return Ok((info, None));
    }
    info.wire = Wire::Zstd {
        len: frame.len() as u32,
        digest: *blake3::hash(&frame).as_bytes(),
    };
    Ok((info, Some(frame)))
}

/// Bytes a blocks file of `m` holds: the frames of its compressed blocks.
pub fn frames_len(m: &Manifest) -> u64 {
    m.blocks
        .iter()
        .map(|b| match b.wire {
            Wire::Zstd { len, .. } => u64::from(len),
            Wire::Raw => 0,
        })
        .sum()
}

/// Where each block's frame starts in a blocks file of `m` (raw blocks:
/// where the next frame starts), and the file's length.
pub fn frame_offsets(m: &Manifest) -> (Vec<u64>, u64) {
    let mut offsets = Vec::with_capacity(m.blocks.len());
    let mut at = 0u64;
    for b in &m.blocks {
        offsets.push(at);
        if let Wire::Zstd { len, .. } = b.wire {
            at += u64::from(len);
        }
    }
    (offsets, at)
}

/// The sender's reader of wire bytes: raw blocks from the image, frames
/// from the blocks file, each checked against the manifest before it may
/// reach the wire.
pub struct WireSource {
    image: File,
    frames: Option<File>,
    /// Offset of each block's frame in the blocks file (raw blocks: 0).
    offsets: Vec<u64>,
}

impl WireSource {
    /// Open the image (and the blocks file when `m` has compressed blocks).
    pub fn open(image: &Path, frames: Option<&Path>, m: &Manifest) -> Result<WireSource, String> {
        let file = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
        let (offsets, at) = frame_offsets(m);
        let frames = if at == 0 {
            None
        } else {
            let p =
                frames.ok_or("the manifest has compressed blocks but no blocks file was given")?;
            let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let len = f
                .metadata()
                .map_err(|e| format!("{}: {e}", p.display()))?
                .len();
            if len != at {
                return Err(format!(
                    "{} holds {len} bytes, the manifest's frames {at}: not this image's blocks file",
                    p.display()
                ));
            }
            Some(f)
        };
        Ok(WireSource {
            image: file,
            frames,
            offsets,
        })
    }

    /// Block `b`'s wire bytes, checked: a raw block against its digest, a
    /// frame against its frame digest. A changed, truncated or corrupt
    /// source never reaches the wire.
    pub fn read(&self, m: &Manifest, b: u32) -> Result<Vec<u8>, String> {
        let info = m
            .blocks
            .get(b as usize)
            .ok_or_else(|| format!("block {b} is outside the image"))?;
        match (info.wire, &self.frames) {
            (Wire::Raw, _) => {
                let mut data = vec![0u8; m.block_len(b)];
                self.image
                    .read_exact_at(&mut data, m.block_offset(b))
                    .map_err(|e| format!("block {b}: {e} (image shorter than its manifest?)"))?;
                if m.digest_block(b, &data) != info.hash {
                    return Err(format!(
                        "block {b} does not match the manifest: the image changed or is corrupt"
                    ));
                }
                Ok(data)
            }
            (Wire::Zstd { len, digest }, Some(f)) => {
                let mut frame = vec![0u8; len as usize];
                f.read_exact_at(&mut frame, self.offsets[b as usize])
                    .map_err(|e| format!("block {b}'s frame: {e}"))?;
                if *blake3::hash(&frame).as_bytes() != digest {
                    return Err(format!(
                        "block {b}'s frame does not match the manifest: the blocks file is corrupt"
                    ));
                }
                Ok(frame)
            }
            (Wire::Zstd { .. }, None) => Err(format!(
                "block {b} is compressed but no blocks file is open"
            )),
        }
    }
}

/// Why a block's wire bytes did not give the block.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnpackError {
    /// The frame is not the one the manifest names: damaged or forged
    /// symbols. Asking for the block again can fix it.
    #[error("block {0}: frame does not match its digest")]
    FrameDigest(u32),
    /// The frame is the manifest's, yet it does not decompress to exactly
    /// the block (a zip bomb, a truncated or foreign frame): the manifest
    /// itself is wrong, and asking again cannot help.
    #[error("block {block}: compressed frame is bad: {why}")]
    BadFrame {
        /// The block.
        block: u32,
        /// What decompression said.
        why: String,
    },
}

/// The image bytes of block `b` from its decoded wire bytes. Raw blocks
/// are returned as they are; frames are checked against their digest and
/// decompressed into at most the block's length, so a frame that would
/// expand further is an error, never an allocation. The caller still
/// checks the block's digest.
pub fn unpack(m: &Manifest, b: u32, wire: Vec<u8>) -> Result<Vec<u8>, UnpackError> {
    match m.blocks.get(b as usize).map(|i| i.wire) {
        None => Err(UnpackError::BadFrame {
            block: b,
            why: "block outside the image".into(),
        }),
        Some(Wire::Raw) => Ok(wire),
        Some(Wire::Zstd { digest, .. }) => {
            if *blake3::hash(&wire).as_bytes() != digest {
                return Err(UnpackError::FrameDigest(b));
            }
            let len = m.block_len(b);
            // A Vec as the buffer: zstd writes into its capacity and never
            // grows it, so the output cannot exceed the block.
            let mut out = Vec::with_capacity(len);
            let done = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&wire, &mut out));
            match done {
                Ok(n) if n == len => Ok(out),
                Ok(n) => Err(UnpackError::BadFrame {
                    block: b,
                    why: format!("{n} bytes, the block has {len}"),
                }),
                Err(e) => Err(UnpackError::BadFrame {
                    block: b,
                    why: format!("{e} (more than the block's {len} bytes, or not zstd)"),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of text-like (compressible), random and zero bytes.
    fn image() -> Vec<u8> {
        let bs = 4096;
        let mut data = Vec::new();
        for i in 0..bs * 3 {
            data.push(b"rackcast images "[i % 16]);
        }
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..bs * 2 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            data.push(x as u8);
        }
        data.extend(std::iter::repeat_n(0u8, bs * 2));
        data.extend_from_slice(b"a short tail, repeated: a short tail");
        data
    }

    fn packed(data: &[u8], level: Option<i32>) -> (Manifest, Vec<u8>) {
        let mut frames = Vec::new();
        let mut seen = 0;
        let m = pack(
            data,
            data.len() as u64,
            4096,
            1024,
            PackOptions { level, threads: 3 },
            &mut frames,
            &mut |n| seen = n,
        )
        .unwrap();
        assert_eq!(seen, data.len() as u64);
        (m, frames)
    }

    #[test]
    fn compressible_blocks_travel_compressed_and_unpack_to_the_image() {
        let data = image();
        let (m, frames) = packed(&data, Some(6));
        // Same image, same digests and hash as the raw manifest: the
        // encoding changes the wire, never what the image is.
        let raw = Manifest::of_bytes(&data, 4096, 1024).unwrap();
        assert_eq!(m.image_hash, raw.image_hash);
        assert_eq!(
            m.blocks
                .iter()
                .map(|b| (b.hash, b.zero))
                .collect::<Vec<_>>(),
            raw.blocks
                .iter()
                .map(|b| (b.hash, b.zero))
                .collect::<Vec<_>>()
        );
        let kinds: Vec<bool> = m
            .blocks
            .iter()
            .map(|b| matches!(b.wire, Wire::Zstd { .. }))
            .collect();
        // Text compresses; random bytes and zeros stay raw; the 36-byte
        // tail cannot save a 1024-byte symbol.
        assert_eq!(kinds, [true, true, true, false, false, false, false, false]);
        assert_eq!(frames.len() as u64, frames_len(&m));
        assert!(
            m.data_bytes() < m.nonzero_bytes() / 2,
            "{} of {}",
            m.data_bytes(),
            m.nonzero_bytes()
        );
        assert_eq!(
            m.source_symbols(0),
            1,
            "a compressed block is a one-symbol object"
        );

        let dir = tempfile::tempdir().unwrap();
        let (img, fr) = (dir.path().join("img"), dir.path().join("frames"));
        std::fs::write(&img, &data).unwrap();
        std::fs::write(&fr, &frames).unwrap();
        let src = WireSource::open(&img, Some(&fr), &m).unwrap();
        for b in m.data_blocks() {
            let wire = src.read(&m, b).unwrap();
            assert_eq!(wire.len(), m.wire_len(b));
            let block = unpack(&m, b, wire).unwrap();
            assert_eq!(m.digest_block(b, &block), m.blocks[b as usize].hash);
            assert_eq!(block, data[m.block_offset(b) as usize..][..m.block_len(b)]);
        }
        // Without a level nothing is compressed and no frames are written.
        let (plain, none) = packed(&data, None);
        assert_eq!(plain, raw);
        assert!(none.is_empty());
    }

    #[test]
    fn a_damaged_blocks_file_never_reaches_the_wire() {
        let data = image();
        let (m, mut frames) = packed(&data, Some(3));
        let dir = tempfile::tempdir().unwrap();
        let (img, fr) = (dir.path().join("img"), dir.path().join("frames"));
        std::fs::write(&img, &data).unwrap();
        frames[10] ^= 1;
        std::fs::write(&fr, &frames).unwrap();
        let src = WireSource::open(&img, Some(&fr), &m).unwrap();
        let e = src.read(&m, 0).unwrap_err();
        assert!(e.contains("blocks file is corrupt"), "{e}");
        std::fs::write(&fr, &frames[1..]).unwrap();
        let e = WireSource::open(&img, Some(&fr), &m).err().unwrap();
        assert!(e.contains("not this image's blocks file"), "{e}");
        assert!(WireSource::open(&img, None, &m).is_err());
    }

    /// A frame the manifest vouches for that expands past its block (a
    /// zip bomb) or to other bytes is a hard error; a forged frame is
    /// caught by its digest before any decompression.
    #[test]
    fn bombs_and_forged_frames_are_errors_not_allocations() {
        let data = image();
        let (mut m, _) = packed(&data, Some(3));
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        m.blocks[0].wire = Wire::Zstd {
            len: bomb.len() as u32,
            digest: *blake3::hash(&bomb).as_bytes(),
        };
        match unpack(&m, 0, bomb.clone()) {
            Err(UnpackError::BadFrame { block: 0, why }) => {
                assert!(why.contains("more than"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let short = zstd::bulk::compress(&data[..100], 3).unwrap();
        m.blocks[1].wire = Wire::Zstd {
            len: short.len() as u32,
            digest: *blake3::hash(&short).as_bytes(),
        };
        assert!(matches!(
            unpack(&m, 1, short),
            Err(UnpackError::BadFrame { block: 1, .. })
        ));
        let mut forged = bomb;
        forged[5] ^= 0xff;
        assert_eq!(unpack(&m, 0, forged), Err(UnpackError::FrameDigest(0)));
    }

    #[test]
    fn levels_out_of_range_are_refused() {
        let data = image();
        for level in [0, 20, -1] {
            let e = pack(
                &data[..],
                data.len() as u64,
                4096,
                1024,
                PackOptions {
                    level: Some(level),
                    threads: 1,
                },
                &mut Vec::new(),
                &mut |_| {},
            )
            .unwrap_err();
            assert!(e.to_string().contains("zstd level"), "{e}");
        }
    }
}
