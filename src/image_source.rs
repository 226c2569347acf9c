//! Image sources for `rackcast images add`: a raw file is used where it
//! lies; a zstd, xz or gzip stream, or a qcow2 file, is turned into a raw
//! image in the appliance's image store, named by its content (BLAKE3).
//!
//! Owns: recognising a source by its magic bytes (never by its name),
//! decompressing it (qcow2 through Debian's `qemu-img`, under resource
//! limits), hashing while writing, and the store's rule that an image
//! file exists only once complete: it is written under a temporary name,
//! flushed, and renamed to `<blake3>.img`; any error removes the partial
//! file. Must not: build manifests or touch the store's database (the
//! controller's `images` does, once the raw image is in place).

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rackcast_core::image::manifest::{is_zero, read_full};
use thiserror::Error;

/// What a source file holds, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A raw disk image (anything not recognised below).
    Raw,
    /// A zstd stream (`28 b5 2f fd`).
    Zstd,
    /// An xz stream (`fd 37 7a 58 5a 00`).
    Xz,
    /// A gzip stream (`1f 8b`).
    Gzip,
    /// A qcow2 image (`QFI\xfb`).
    Qcow2,
}

impl SourceKind {
    /// The kind's name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Raw => "raw",
            SourceKind::Zstd => "zstd",
            SourceKind::Xz => "xz",
            SourceKind::Gzip => "gzip",
            SourceKind::Qcow2 => "qcow2",
        }
    }

    /// The kind of a file that starts with `head`.
    pub fn of_magic(head: &[u8]) -> SourceKind {
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            SourceKind::Zstd
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            SourceKind::Xz
        } else if head.starts_with(&[0x1f, 0x8b]) {
            SourceKind::Gzip
        } else if head.starts_with(b"QFI\xfb") {
            SourceKind::Qcow2
        } else {
            SourceKind::Raw
        }
    }

    /// The kind of the file at `path`.
    pub fn of_file(path: &Path) -> io::Result<SourceKind> {
        let mut head = [0u8; 8];
        let mut f = File::open(path)?;
        let n = read_full(&mut f, &mut head)?;
        Ok(SourceKind::of_magic(&head[..n]))
    }
}

/// Why a source could not be made into a raw image.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Reading the source or writing the store failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The compressed stream is corrupt or truncated.
    #[error("{kind} source {path} is corrupt or truncated: {detail}")]
    Corrupt {
        /// The source kind.
        kind: &'static str,
        /// The source file.
        path: String,
        /// What the decoder said.
        detail: String,
    },
    /// `qemu-img` refused the image or could not run.
    #[error("qemu-img: {0}")]
    QemuImg(String),
    /// A zstd stream without content checksums: corruption in it would
    /// decode to a wrong image that nothing could tell from the right one.
    #[error("zstd source {0} has no content checksum (made with --no-check?): recompress it with zstd, which checks by default")]
    Unverifiable(String),
    /// The decompressed image would exceed the limit.
    #[error("{path} expands past {limit} bytes")]
    TooLarge {
        /// The source file.
        path: String,
        /// The limit.
        limit: u64,
    },
}

/// A raw image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// `<store>/<blake3>.img`.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3, hex.
    pub hash: String,
    /// What it came from.
    pub kind: SourceKind,
}

/// Largest raw image a compressed source may expand to: a bound on a
/// decompression bomb's damage to the store's disk.
pub const MAX_IMAGE_BYTES: u64 = 16 << 40;

/// Make `source` (zstd, xz, gzip or qcow2) a raw image in `store`, calling
/// `progress` with the source bytes read so far. A raw source is not
/// copied: the caller uses it where it lies.
pub fn import(
    source: &Path,
    store: &Path,
    mut progress: impl FnMut(u64),
) -> Result<Imported, SourceError> {
    let io_err = |what: &str| {
        let what = format!("{what} {}", source.display());
        move |e: io::Error| SourceError::Io { what, source: e }
    };
    let kind = SourceKind::of_file(source).map_err(io_err("reading"))?;
    if kind == SourceKind::Zstd && !zstd_has_checksum(source).map_err(io_err("reading"))? {
        return Err(SourceError::Unverifiable(source.display().to_string()));
    }
    fs::create_dir_all(store).map_err(|e| SourceError::Io {
        what: format!("creating {}", store.display()),
        source: e,
    })?;
    remove_orphans(store);
    let part = Partial::new(store);
    let written = match kind {
        SourceKind::Raw => {
            return Err(SourceError::Io {
                what: format!("{} is a raw image", source.display()),
                source: io::Error::other("raw images are used where they lie"),
            })
        }
        SourceKind::Qcow2 => qemu_img_convert(source, &part.path).and_then(|()| {
            let f = File::open(&part.path).map_err(io_err("reading the converted image of"))?;
            let size = f.metadata().map_err(io_err("reading"))?.len();
            progress(size);
            let mut hasher = blake3::Hasher::new();
            hasher
                .update_reader(f)
                .map_err(io_err("hashing the converted image of"))?;
            Ok((size, hasher.finalize().to_hex().to_string()))
        })?,
        SourceKind::Zstd | SourceKind::Xz | SourceKind::Gzip => {
            let f = File::open(source).map_err(io_err("opening"))?;
            let counted = BufReader::new(Counting {
                inner: f,
                read: 0,
                progress: &mut progress,
            });
            let decoder: Box<dyn Read + '_> = match kind {
                SourceKind::Zstd => Box::new(
                    zstd::stream::read::Decoder::with_buffer(counted)
                        .map_err(io_err("decoding"))?,
                ),
                SourceKind::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(counted)),
                _ => Box::new(flate2::read::MultiGzDecoder::new(counted)),
            };
            copy_hashing(decoder, &part.path, MAX_IMAGE_BYTES).map_err(|e| match e {
                CopyError::TooLarge => SourceError::TooLarge {
                    path: source.display().to_string(),
                    limit: MAX_IMAGE_BYTES,
                },
                CopyError::Write(e) => SourceError::Io {
                    what: format!("writing {}", part.path.display()),
                    source: e,
                },
                CopyError::Read(e) => SourceError::Corrupt {
                    kind: kind.as_str(),
                    path: source.display().to_string(),
                    detail: e.to_string(),
                },
            })?
        }
    };
    let (size, hash) = written;
    let path = store.join(format!("{hash}.img"));
    part.keep_as(&path)?;
    Ok(Imported {
        path,
        size,
        hash,
        kind,
    })
}

/// Whether the first zstd frame of `path` carries a content checksum
/// (Frame_Header_Descriptor bit 2, RFC 8878 3.1.1.1.1). xz (CRC64) and
/// gzip (CRC32) always do.
fn zstd_has_checksum(path: &Path) -> io::Result<bool> {
    let mut head = [0u8; 5];
    let n = read_full(&mut File::open(path)?, &mut head)?;
    Ok(n == 5 && head[4] & 0x04 != 0)
}

/// Remove partial files of imports whose process is gone (killed before
/// its own cleanup could run): `.import-<pid>-<random>.part`.
pub(crate) fn remove_orphans(store: &Path) {
    let Ok(dir) = fs::read_dir(store) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let pid = name
            .strip_prefix(".import-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// A file being written into the store: removed unless kept (and by
/// [`remove_orphans`] when its process was killed).
pub(crate) struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Partial {
    pub(crate) fn new(store: &Path) -> Partial {
        let path = store.join(format!(
            ".import-{}-{:016x}.part",
            std::process::id(),
            rand::random::<u64>()
        ));
        Partial { path, kept: false }
    }

    /// Where it is being written.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Flush and rename to `to` (an existing `to` has the same content:
    /// its name is its hash).
    pub(crate) fn keep_as(mut self, to: &Path) -> Result<(), SourceError> {
        let sync = File::open(&self.path).and_then(|f| f.sync_all());
        sync.and_then(|()| fs::rename(&self.path, to))
            .map_err(|e| SourceError::Io {
                what: format!("storing {}", to.display()),
                source: e,
            })?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A reader that reports how many bytes went through it.
struct Counting<'a, R, F: FnMut(u64)> {
    inner: R,
    read: u64,
    progress: &'a mut F,
}

impl<R: Read, F: FnMut(u64)> Read for Counting<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.progress)(self.read);
        Ok(n)
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    TooLarge,
}

/// Copy `r` into a new file at `to`, hashing on the way; at most `limit`
/// bytes. Runs of zeros become holes (images are mostly zeros).
fn copy_hashing(mut r: impl Read, to: &Path, limit: u64) -> Result<(u64, String), CopyError> {
    let mut out = File::create(to).map_err(CopyError::Write)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut r, &mut buf).map_err(CopyError::Read)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(CopyError::TooLarge);
        }
        hasher.update(&buf[..n]);
        if is_zero(&buf[..n]) {
            io::Seek::seek(&mut out, io::SeekFrom::Current(n as i64)).map_err(CopyError::Write)?;
        } else {
            out.write_all(&buf[..n]).map_err(CopyError::Write)?;
        }
    }
    out.set_len(total).map_err(CopyError::Write)?;
    Ok((total, hasher.finalize().to_hex().to_string()))
}

/// `qemu-img check`, then `qemu-img convert -O raw`, each under limits: a
/// crafted qcow2 file must not take the appliance's memory or CPU.
fn qemu_img_convert(source: &Path, to: &Path) -> Result<(), SourceError> {
    let run = |args: &[&std::ffi::OsStr]| -> Result<(), SourceError> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; the closure touches
        // nothing else of the parent.
        unsafe {
            cmd.pre_exec(|| {
                let limit = |res, v: libc::rlim_t| {
                    let r = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    if libc::setrlimit(res, &r) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                };
                // 2 GiB of address space, one CPU-hour.
                limit(libc::RLIMIT_AS, 2 << 30)?;
                limit(libc::RLIMIT_CPU, 3600)
            });
        }
        let out = cmd
            .output()
            .map_err(|e| SourceError::QemuImg(format!("cannot run qemu-img (qemu-utils): {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(SourceError::QemuImg(format!(
                "{}: {}",
                source.display(),
                err.trim().chars().take(500).collect::<String>()
            )))
        }
    };
    run(&[
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        source.as_os_str(),
    ])?;
    run(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        source.as_os_str(),
        to.as_os_str(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        // Mostly zeros with some data, like a real image.
        let mut v = vec![0u8; 3 << 20];
        for (i, b) in v[..200_000].iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        v[(2 << 20) + 5] = 9;
        v
    }

    fn store_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    fn compress(kind: SourceKind, data: &[u8]) -> Vec<u8> {
        match kind {
            SourceKind::Zstd => {
                // As the zstd CLI writes it: with content checksums.
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
                e.include_checksum(true).unwrap();
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            SourceKind::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 3);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            SourceKind::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn compressed_sources_become_the_same_raw_image_named_by_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let data = image();
        let want = blake3::hash(&data).to_hex().to_string();
        for kind in [SourceKind::Zstd, SourceKind::Xz, SourceKind::Gzip] {
            // The name says nothing: the magic decides.
            let src = dir.path().join(format!("source-{}", kind.as_str()));
            fs::write(&src, compress(kind, &data)).unwrap();
            assert_eq!(SourceKind::of_file(&src).unwrap(), kind);
            let mut seen = 0;
            let got = import(&src, &store, |n| seen = n).unwrap();
            assert_eq!(got.kind, kind);
            assert_eq!(
                (got.size, got.hash.as_str()),
                (data.len() as u64, want.as_str())
            );
            assert_eq!(got.path, store.join(format!("{want}.img")));
            assert_eq!(fs::read(&got.path).unwrap(), data);
            assert_eq!(
                seen,
                fs::metadata(&src).unwrap().len(),
                "progress reached the end"
            );
        }
        assert_eq!(store_files(&store), vec![format!("{want}.img")]);
        // A partial file of an import that was killed (its PID is gone)
        // is removed by the next import; a live one's is left alone.
        let orphan = store.join(".import-4194303-00000000000000aa.part");
        let live = store.join(format!(
            ".import-{}-00000000000000bb.part",
            std::process::id()
        ));
        fs::write(&orphan, b"half").unwrap();
        fs::write(&live, b"busy").unwrap();
        let src = dir.path().join("source-zstd");
        import(&src, &store, |_| {}).unwrap();
        assert!(!orphan.exists(), "orphan left");
        assert!(live.exists(), "a running import's file was removed");
    }

    #[test]
    fn corrupt_or_truncated_sources_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let data = image();
        for kind in [SourceKind::Zstd, SourceKind::Xz, SourceKind::Gzip] {
            let good = compress(kind, &data);
            let mut flipped = good.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x55;
            for (what, bytes) in [
                ("truncated", good[..good.len() * 2 / 3].to_vec()),
                ("corrupt", flipped),
            ] {
                let src = dir.path().join(format!("{what}-{}", kind.as_str()));
                fs::write(&src, &bytes).unwrap();
                let e = import(&src, &store, |_| {}).expect_err(what);
                assert!(
                    matches!(e, SourceError::Corrupt { .. }),
                    "{kind:?} {what}: {e}"
                );
                assert!(
                    store_files(&store).is_empty(),
                    "{kind:?} {what}: {:?} left in the store",
                    store_files(&store)
                );
            }
        }
    }

    #[test]
    fn a_zstd_stream_without_checksums_is_refused_as_unverifiable() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let src = dir.path().join("nocheck.zst");
        fs::write(&src, zstd::encode_all(&image()[..], 3).unwrap()).unwrap();
        let e = import(&src, &store, |_| {}).unwrap_err();
        assert!(matches!(e, SourceError::Unverifiable(_)), "{e}");
        assert!(e.to_string().contains("no content checksum"), "{e}");
    }

    #[test]
    fn qcow2_through_qemu_img_and_a_bad_one_is_refused() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            // qemu-utils is on every machine of this kind; CI installs it.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img missing in CI"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let data = image();
        let raw = dir.path().join("disk.raw");
        fs::write(&raw, &data).unwrap();
        let qcow = dir.path().join("disk.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(SourceKind::of_file(&qcow).unwrap(), SourceKind::Qcow2);
        let got = import(&qcow, &store, |_| {}).unwrap();
        assert_eq!(got.hash, blake3::hash(&data).to_hex().to_string());
        assert_eq!(fs::read(&got.path).unwrap(), data);
        // A qcow2 header over garbage: qemu-img refuses it, nothing stays.
        let bad = dir.path().join("bad.qcow2");
        let mut b = fs::read(&qcow).unwrap();
        b.truncate(600);
        b[100..600].fill(0xff);
        fs::write(&bad, &b).unwrap();
        let e = import(&bad, &store, |_| {}).unwrap_err();
        assert!(matches!(e, SourceError::QemuImg(_)), "{e}");
        assert_eq!(store_files(&store), vec![format!("{}.img", got.hash)]);
    }
}
