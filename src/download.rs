//! Image sources over HTTP(S): streamed into a partial file in the image
//! store, resumed with a `Range` request after a dropped connection or a
//! killed run, and hashed while downloading (a prefix left by a killed
//! run is hashed once, read back from the disk, before new bytes arrive).
//!
//! Owns: the partial download (`.download-<key>.part`, `<key>` from the
//! URL) and its validator sidecar (`.download-<key>.json`: the URL and the
//! server's ETag / Last-Modified, so a changed file is never resumed), and
//! the HTTP requests. Must not: decide what the bytes are (the importer
//! does), or keep a download whose hash differs from the one it was told.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Attempts at one download (each resumes where the last one stopped).
const ATTEMPTS: u32 = 5;

/// A finished download: the partial file, now complete.
pub struct Downloaded {
    /// The file in the store (still a `.part`: the importer names it).
    pub path: PathBuf,
    /// Its validator sidecar (removed with the file).
    pub meta: PathBuf,
    /// Bytes.
    pub size: u64,
    /// BLAKE3 of the downloaded bytes, hex.
    pub blake3: String,
    /// Bytes that were already there from an earlier, interrupted run.
    pub resumed_from: u64,
}

impl Downloaded {
    /// Remove the partial file and its sidecar.
    pub fn discard(&self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(&self.meta);
    }
}

/// Why a download failed.
#[derive(Debug, Error)]
pub enum DownloadError {
    /// Not an http(s) URL.
    #[error("{0}: only http:// and https:// URLs are image sources")]
    Scheme(String),
    /// The server refused (4xx) or failed (5xx past the attempts).
    #[error("{url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// Writing the partial file failed.
    #[error("{url}: {what}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The bytes are not the ones the operator named.
    #[error(
        "{url}: downloaded bytes hash to blake3 {got}, expected {want}; the download was removed"
    )]
    Digest {
        /// The URL.
        url: String,
        /// What arrived.
        got: String,
        /// What was expected.
        want: String,
    },
    /// Every attempt failed.
    #[error(
        "{url}: gave up after {ATTEMPTS} attempts, {have} bytes kept for the next run: {last}"
    )]
    GaveUp {
        /// The URL.
        url: String,
        /// Bytes downloaded so far (resumable).
        have: u64,
        /// The last attempt's error.
        last: String,
    },
}

/// What a server said about the file, to resume only the same file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Validator {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
    total: Option<u64>,
}

impl Validator {
    /// The `If-Range` value, if the server gave one (without it a resumed
    /// range could splice two versions of the file).
    fn if_range(&self) -> Option<&str> {
        self.etag.as_deref().or(self.last_modified.as_deref())
    }
}

/// `url` without a user name or password, for logs and errors.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable URL>".into(),
    }
}

/// Whether `source` names a URL rather than a file.
pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Where the download of `url` lives in `store`.
pub fn partial_paths(store: &Path, url: &str) -> (PathBuf, PathBuf) {
    let key = blake3::hash(url.as_bytes()).to_hex();
    let key = &key.as_str()[..16];
    (
        store.join(format!(".download-{key}.part")),
        store.join(format!(".download-{key}.json")),
    )
}

/// Download `url` into `store` (resuming a partial download of the same
/// file), then hash what is on the disk; with `expect_blake3`, a download that
/// hashes otherwise is removed and refused. `progress` gets bytes so far
/// and the total when known.
pub async fn download(
    url: &str,
    store: &Path,
    expect_blake3: Option<&str>,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Downloaded, DownloadError> {
    // Credentials in the URL never reach a log line or an error.
    let shown = redact(url);
    if !is_url(url) {
        return Err(DownloadError::Scheme(shown));
    }
    let io_err = |what: &str, source: io::Error| DownloadError::Io {
        url: shown.clone(),
        what: what.to_string(),
        source,
    };
    fs::create_dir_all(store).map_err(|e| io_err("creating the image store", e))?;
    let (part, meta) = partial_paths(store, url);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| DownloadError::GaveUp {
            url: shown.clone(),
            have: 0,
            last: e.to_string(),
        })?;
    let resumed_from = resumable_len(&part, &meta, url);
    let mut last = String::new();
    let mut have = 0;
    let mut hash = StreamHash::default();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
        }
        match attempt_once(&client, url, &part, &meta, &mut hash, progress).await {
            Ok(n) => {
                have = n;
                last.clear();
                break;
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why, n)) => {
                tracing::warn!(url = %shown, attempt, bytes = n, error = %why, "download interrupted; resuming");
                have = n;
                last = why;
            }
        }
    }
    if !last.is_empty() {
        return Err(DownloadError::GaveUp {
            url: shown,
            have,
            last,
        });
    }
    hash.catch_up(&part, have)
        .map_err(|e| io_err("hashing the download", e))?;
    let got = hash.h.finalize().to_hex().to_string();
    let done = Downloaded {
        path: part,
        meta,
        size: have,
        blake3: got.clone(),
        resumed_from,
    };
    if let Some(want) = expect_blake3 {
        if !want.eq_ignore_ascii_case(&got) {
            done.discard();
            return Err(DownloadError::Digest {
                url: shown,
                got,
                want: want.to_string(),
            });
        }
    }
    Ok(done)
}

/// Bytes of a partial download of `url` that may be resumed.
fn resumable_len(part: &Path, meta: &Path, url: &str) -> u64 {
    let v: Option<Validator> = fs::read(meta)
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok());
    match v {
        Some(v) if v.url == redact(url) && v.if_range().is_some() => {
            fs::metadata(part).map_or(0, |m| m.len())
        }
        _ => 0,
    }
}

/// The BLAKE3 of the partial file's first `n` bytes, kept as they are
/// written.
#[derive(Default)]
struct StreamHash {
    h: blake3::Hasher,
    n: u64,
}

impl StreamHash {
    /// Make it the hash of the file's first `upto` bytes: bytes already on
    /// the disk that it has not seen (an earlier run's prefix) are read
    /// back; a download that starts over starts the hash over.
    fn catch_up(&mut self, part: &Path, upto: u64) -> io::Result<()> {
        if upto < self.n {
            *self = StreamHash::default();
        }
        if upto > self.n {
            use std::io::{Read, Seek};
            let mut f = File::open(part)?;
            f.seek(io::SeekFrom::Start(self.n))?;
            let want = upto - self.n;
            let got = io::copy(&mut f.take(want), &mut self.h)?;
            if got != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "partial download holds {} bytes, expected {upto}",
                        self.n + got
                    ),
                ));
            }
            self.n = upto;
        }
        Ok(())
    }

    fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
        self.n += bytes.len() as u64;
    }
}

enum Attempt {
    /// Try again (resuming); bytes on the disk so far.
    Retry(String, u64),
    Fatal(DownloadError),
}

/// One request: resume from what is on the disk when the server can
/// prove it is the same file, else start over. The file's length when it
/// is complete.
async fn attempt_once(
    client: &reqwest::Client,
    url: &str,
    part: &Path,
    meta: &Path,
    hash: &mut StreamHash,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<u64, Attempt> {
    let saved: Option<Validator> = fs::read(meta)
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .filter(|v: &Validator| v.url == redact(url));
    let mut have = resumable_len(part, meta, url);
    let mut req = client.get(url);
    if have > 0 {
        if let Some(v) = saved.as_ref().and_then(|v| v.if_range()) {
            req = req
                .header(reqwest::header::RANGE, format!("bytes={have}-"))
                .header(reqwest::header::IF_RANGE, v);
        }
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| Attempt::Retry(e.to_string(), have))?;
    let status = resp.status().as_u16();
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (etag, last_modified) = (
        header(reqwest::header::ETAG),
        header(reqwest::header::LAST_MODIFIED),
    );
    let total = match status {
        206 => {
            // "bytes START-END/TOTAL": it must start where we stopped.
            let range = header(reqwest::header::CONTENT_RANGE).unwrap_or_default();
            let start = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if start != Some(have) {
                // Not the range asked for: start over next time.
                let _ = fs::remove_file(part);
                return Err(Attempt::Retry(
                    format!("server resumed at {range:?}, not at byte {have}"),
                    0,
                ));
            }
            range.rsplit('/').next().and_then(|t| t.parse().ok())
        }
        200 => {
            if have > 0 {
                tracing::info!(url = %redact(url), "the server sent the whole file: starting over");
            }
            have = 0;
            resp.content_length()
        }
        416 if have > 0 && saved.as_ref().and_then(|v| v.total) == Some(have) => {
            // Asked past the end of a file we already have whole.
            return Ok(have);
        }
        s if (500..600).contains(&s) => {
            return Err(Attempt::Retry(format!("server answered {s}"), have));
        }
        s => {
            return Err(Attempt::Fatal(DownloadError::Status {
                url: redact(url),
                status: s,
            }))
        }
    };
    let v = Validator {
        // The sidecar is a file: no credentials in it.
        url: redact(url),
        etag,
        last_modified,
        total,
    };
    let fatal_io = |what: &str, e: io::Error| {
        Attempt::Fatal(DownloadError::Io {
            url: redact(url),
            what: what.into(),
            source: e,
        })
    };
    let json = serde_json::to_vec(&v).unwrap_or_default();
    fs::write(meta, json).map_err(|e| fatal_io("writing the download's sidecar", e))?;
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(have == 0)
        .append(have > 0)
        .open(part)
        .map_err(|e| fatal_io("opening the partial download", e))?;
    hash.catch_up(part, have)
        .map_err(|e| fatal_io("hashing the partial download", e))?;
    progress(have, total);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                file.write_all(&c)
                    .map_err(|e| fatal_io("writing the download", e))?;
                hash.update(&c);
                have += c.len() as u64;
                progress(have, total);
            }
            Ok(None) => break,
            Err(e) => {
                let _ = file.flush();
                return Err(Attempt::Retry(e.to_string(), have));
            }
        }
    }
    file.sync_all()
        .map_err(|e| fatal_io("flushing the download", e))?;
    match total {
        Some(t) if t != have => Err(Attempt::Retry(
            format!("connection ended at {have} of {t} bytes"),
            have,
        )),
        _ => Ok(have),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed hash is the file's: a prefix from an earlier run is
    /// read back once, streamed bytes are not read again, and a download
    /// that starts over starts the hash over.
    #[test]
    fn streamed_hash_is_the_hash_of_the_bytes_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("x.part");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&part, &data[..100_000]).unwrap();
        let mut h = StreamHash::default();
        h.catch_up(&part, 100_000).unwrap();
        h.update(&data[100_000..]);
        h.catch_up(&part, 300_000).unwrap();
        assert_eq!(h.h.finalize(), blake3::hash(&data));
        // Starting over: the old state is dropped, the new prefix read.
        let other = vec![7u8; 5000];
        fs::write(&part, &other).unwrap();
        h.catch_up(&part, 0).unwrap();
        h.update(&other);
        assert_eq!(h.h.finalize(), blake3::hash(&other));
        // A file shorter than claimed is an error, not a wrong hash.
        let mut short = StreamHash::default();
        assert!(short.catch_up(&part, 6000).is_err());
    }

    #[test]
    fn credentials_never_leave_the_url_in_logs_or_files() {
        assert_eq!(
            redact("https://ops:s3cret@images.example/os.zst"),
            "https://images.example/os.zst"
        );
        assert_eq!(
            redact("http://198.18.0.1:8089/a.zst"),
            "http://198.18.0.1:8089/a.zst"
        );
        assert!(!redact("http://user:pw@h/x").contains("pw"));
        assert!(!is_url("/srv/images/os.zst"));
        assert!(is_url("https://h/x"));
    }
}
