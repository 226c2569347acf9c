//! The appliance's image catalogue: images registered from the config or
//! `rackcast images add`, their manifests and prepared (compressed) blocks
//! kept beside the store, and the
//! check at start that an image did not change since it was added.
//!
//! Manifests and prepared blocks are content-addressed: named by the
//! image's BLAKE3 (`manifests/<hash>.rcmanifest`,
//! `manifests/<hash>.zstd<level>.rcblocks`). Re-adding a name with new
//! content makes new files and never rewrites the ones a running wave
//! reads; two names for one image share them. Files no image refers to
//! any more are removed when the appliance starts.
//!
//! Owns: manifest files under the state dir and the image rows. Must not:
//! serve image bytes (waves do) or decide who gets which image (profiles).

use std::collections::HashMap;
use std::sync::Arc;

use rackcast_core::image::manifest::Manifest;
use rackcast_core::image::packed;

use super::builder::ImageEntry;
use crate::config::Config;
use crate::image_source::SourceKind;
use crate::store::{now_ms, ImageRecord, Store};

fn manifests_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.appliance.state_dir.join("manifests")
}

/// Where the appliance keeps the manifest of the image with BLAKE3 `hash`.
pub fn manifest_path(cfg: &Config, hash: &str) -> std::path::PathBuf {
    manifests_dir(cfg).join(format!("{hash}.rcmanifest"))
}

/// Where the appliance keeps the prepared (compressed) blocks of the image
/// with BLAKE3 `hash` at `level`: the level is in the name, so a changed
/// `dataplane.zstd_level` prepares the blocks again instead of serving the
/// old ones.
pub fn frames_path(cfg: &Config, hash: &str, level: i32) -> std::path::PathBuf {
    manifests_dir(cfg).join(format!("{hash}.zstd{level}.rcblocks"))
}

/// The blocks file a manifest built at the config's level goes with, if
/// the stored files agree with each other and with that level.
fn stored_frames(cfg: &Config, m: &Manifest) -> Option<Option<std::path::PathBuf>> {
    let level = cfg.dataplane.zstd_level;
    if level == 0 {
        return (m.compressed_blocks() == 0).then_some(None);
    }
    let p = frames_path(cfg, &m.image_hash_hex(), level);
    let len = std::fs::metadata(&p).ok()?.len();
    (len == packed::frames_len(m)).then_some(Some(p))
}

/// The image's manifest and prepared blocks file: with `known` (the
/// image's BLAKE3 as recorded), the stored ones if they still describe
/// the file (size and mtime checked by `load_for`) at the configured
/// level; else built now (compressing on every core) and stored under the
/// hash they have. `progress` gets the image bytes read while building.
pub fn image_manifest(
    cfg: &Config,
    name: &str,
    path: &std::path::Path,
    known: Option<&str>,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<(Manifest, Option<std::path::PathBuf>)> {
    if let Some(hash) = known {
        if let Ok(m) = Manifest::load_for(path, &manifest_path(cfg, hash)) {
            if m.image_hash_hex() == hash {
                if let Some(frames) = stored_frames(cfg, &m) {
                    return Ok((m, frames));
                }
            }
        }
    }
    let level = cfg.dataplane.zstd_level;
    tracing::info!(image = name, path = %path.display(), zstd_level = level, "preparing image blocks");
    let ss =
        rackcast_core::wire::packet::symbol_size_for_mtu(cfg.dataplane.mtu).ok_or_else(|| {
            anyhow::anyhow!(
                "dataplane.mtu {} leaves no room for a symbol",
                cfg.dataplane.mtu
            )
        })?;
    let dir = manifests_dir(cfg);
    std::fs::create_dir_all(&dir)?;
    // Frames go to a temporary file renamed into place once the manifest
    // is good: a failed or killed build leaves no blocks file behind that
    // a later start could take for this image's.
    crate::image_source::remove_orphans(&dir);
    let tmp = crate::image_source::Partial::new(&dir);
    let mut tmp_file = std::fs::File::create(tmp.path())?;
    let m = {
        let mut w = std::io::BufWriter::new(&mut tmp_file);
        let m = packed::pack_file(
            path,
            rackcast_core::image::manifest::DEFAULT_BLOCK_SIZE,
            ss,
            (level > 0).then_some(level),
            &mut w,
            progress,
        )
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
        std::io::Write::flush(&mut w)?;
        m
    };
    drop(tmp_file);
    let hash = m.image_hash_hex();
    let frames = if level > 0 {
        let p = frames_path(cfg, &hash, level);
        tmp.keep_as(&p)?;
        Some(p)
    } else {
        None
    };
    m.save(path, &manifest_path(cfg, &hash))
        .map_err(|e| anyhow::anyhow!("image {name}: {e}"))?;
    tracing::info!(
        image = name,
        bytes = m.image_size,
        nonzero_bytes = m.nonzero_bytes(),
        wire_bytes = m.data_bytes(),
        compressed_blocks = m.compressed_blocks(),
        "image blocks prepared"
    );
    Ok((m, frames))
}

/// Register a new image (config or `rackcast images add`).
pub fn add_image(
    cfg: &Config,
    store: &mut dyn Store,
    name: &str,
    path: &std::path::Path,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<ImageRecord> {
    let path = std::fs::canonicalize(path)
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
    // The same file added again (every start, for config images): its
    // recorded hash finds the stored manifest, which is used if the file's
    // size and mtime did not change.
    let known = store
        .images()?
        .into_iter()
        .find(|r| r.name == name && std::path::Path::new(&r.path) == path)
        .map(|r| r.hash);
    let (m, _) = image_manifest(cfg, name, &path, known.as_deref(), progress)?;
    let rec = ImageRecord {
        name: name.to_string(),
        path: path.display().to_string(),
        size: m.image_size,
        hash: m.image_hash_hex(),
        block_size: m.block_size,
        added_at: now_ms(),
    };
    store.put_image(&rec)?;
    Ok(rec)
}

type ImageMaps = (HashMap<String, ImageEntry>, HashMap<String, Arc<Manifest>>);

/// Register the config's images, then load every image of the store.
pub(super) fn load_images(cfg: &Config, store: &mut dyn Store) -> anyhow::Result<ImageMaps> {
    for im in &cfg.images {
        // A compressed image in the config would be served as its
        // compressed bytes: it must go through `images add` (once), which
        // makes the raw image in the store.
        let kind = SourceKind::of_file(&im.path)
            .map_err(|e| anyhow::anyhow!("image {}: {}: {e}", im.name, im.path.display()))?;
        if kind != SourceKind::Raw {
            anyhow::bail!(
                "image {}: {} is a {} source; add it with `rackcast images add {} {}` (the config takes raw images)",
                im.name,
                im.path.display(),
                kind.as_str(),
                im.name,
                im.path.display()
            );
        }
        add_image(cfg, store, &im.name, &im.path, &mut |_| {})?;
    }
    let mut images = HashMap::new();
    let mut manifests = HashMap::new();
    let records = store.images()?;
    prune_manifests(cfg, &records);
    for rec in records {
        let path = std::path::PathBuf::from(&rec.path);
        match image_manifest(cfg, &rec.name, &path, Some(&rec.hash), &mut |_| {}) {
            Ok((m, frames)) if m.image_hash_hex() == rec.hash => {
                manifests.insert(rec.name.clone(), Arc::new(m));
                images.insert(
                    rec.name.clone(),
                    ImageEntry {
                        name: rec.name.clone(),
                        path,
                        hash: rec.hash.clone(),
                        size: rec.size,
                        frames,
                    },
                );
            }
            Ok(_) => {
                tracing::error!(image = %rec.name, "image changed since it was added; not served")
            }
            Err(e) => {
                tracing::error!(image = %rec.name, error = %e, "image not usable; not served")
            }
        }
    }
    Ok((images, manifests))
}

/// Remove manifests and prepared blocks that no image refers to: images
/// re-added with new content, blocks prepared at another zstd level, and
/// files named the pre-content-addressed way (by image name).
fn prune_manifests(cfg: &Config, records: &[ImageRecord]) {
    let Ok(dir) = std::fs::read_dir(manifests_dir(cfg)) else {
        return;
    };
    let level = cfg.dataplane.zstd_level;
    let keep: std::collections::HashSet<String> = records
        .iter()
        .flat_map(|r| {
            [
                format!("{}.rcmanifest", r.hash),
                format!("{}.zstd{level}.rcblocks", r.hash),
            ]
        })
        .collect();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".rcmanifest") || name.ends_with(".rcblocks");
        if ours && !keep.contains(&name) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(file = %name, "removed prepared image file no image uses"),
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "cannot remove unused prepared image file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(state: &std::path::Path) -> Config {
        let text = crate::config::tests::parse_tests::MINIMAL
            .replace("/tmp/rc", &state.display().to_string());
        Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
    }

    fn record(name: &str, hash: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            path: "/x".into(),
            size: 0,
            hash: hash.into(),
            block_size: 0,
            added_at: 0,
        }
    }

    /// Prepared files are named by the image's hash, found again by it
    /// without rebuilding, and removed once no image refers to them (with
    /// files of another level and the old name-keyed ones).
    #[test]
    fn prepared_files_are_content_addressed_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("state"));
        let img = dir.path().join("a.img");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096 % 7) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let (m, frames) = image_manifest(&cfg, "a", &img, None, &mut |_| {}).unwrap();
        let hash = m.image_hash_hex();
        assert_eq!(hash, blake3::hash(&data).to_hex().as_str());
        assert_eq!(frames, Some(frames_path(&cfg, &hash, 6)));
        assert!(manifest_path(&cfg, &hash).exists());

        // Known by its hash: the stored files, nothing read again.
        let mut read = 0;
        let (again, _) = image_manifest(&cfg, "b", &img, Some(&hash), &mut |n| read = n).unwrap();
        assert_eq!((again.image_hash, read), (m.image_hash, 0));

        let mdir = manifests_dir(&cfg);
        for stale in [
            "a.rcmanifest",
            "a.zstd6.rcblocks",
            &format!("{hash}.zstd3.rcblocks"),
        ] {
            std::fs::write(mdir.join(stale), b"x").unwrap();
        }
        std::fs::write(mdir.join("unrelated.txt"), b"x").unwrap();
        prune_manifests(&cfg, &[record("b", &hash)]);
        let mut left: Vec<String> = std::fs::read_dir(&mdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("{hash}.rcmanifest"),
                format!("{hash}.zstd6.rcblocks"),
                "unrelated.txt".to_string()
            ]
        );
        prune_manifests(&cfg, &[record("b", &"0".repeat(64))]);
        assert!(!manifest_path(&cfg, &hash).exists());
        assert!(!frames_path(&cfg, &hash, 6).exists());
    }
}
