//! The appliance's image catalogue: images registered from the config or
//! `rackcast images add`, their manifests and prepared (compressed) blocks
//! kept beside the store, and the
//! check at start that an image did not change since it was added.
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

/// Where the appliance keeps an image's manifest.
pub fn manifest_path(cfg: &Config, name: &str) -> std::path::PathBuf {
    cfg.appliance
        .state_dir
        .join("manifests")
        .join(format!("{name}.rcmanifest"))
}

/// Where the appliance keeps an image's prepared (compressed) blocks at
/// `level`: the level is in the name, so a changed `dataplane.zstd_level`
/// prepares the blocks again instead of serving the old ones.
pub fn frames_path(cfg: &Config, name: &str, level: i32) -> std::path::PathBuf {
    cfg.appliance
        .state_dir
        .join("manifests")
        .join(format!("{name}.zstd{level}.rcblocks"))
}

/// The blocks file a manifest built at the config's level goes with, if
/// the stored files agree with each other and with that level.
fn stored_frames(cfg: &Config, name: &str, m: &Manifest) -> Option<Option<std::path::PathBuf>> {
    let level = cfg.dataplane.zstd_level;
    if level == 0 {
        return (m.compressed_blocks() == 0).then_some(None);
    }
    let p = frames_path(cfg, name, level);
    let len = std::fs::metadata(&p).ok()?.len();
    (len == packed::frames_len(m)).then_some(Some(p))
}

/// The image's manifest and prepared blocks file: the stored ones if they
/// still describe the file (size and mtime checked by `load_for`) at the
/// configured level, else built now (compressing on every core) and
/// stored. `progress` gets the image bytes read while building.
pub fn image_manifest(
    cfg: &Config,
    name: &str,
    path: &std::path::Path,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<(Manifest, Option<std::path::PathBuf>)> {
    let mpath = manifest_path(cfg, name);
    if let Ok(m) = Manifest::load_for(path, &mpath) {
        if let Some(frames) = stored_frames(cfg, name, &m) {
            return Ok((m, frames));
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
    let dir = mpath
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no manifests directory"))?;
    std::fs::create_dir_all(dir)?;
    // Frames go to a temporary file renamed into place once the manifest
    // is good: a failed or killed build leaves no blocks file behind that
    // a later start could take for this image's.
    crate::image_source::remove_orphans(dir);
    let tmp = crate::image_source::Partial::new(dir);
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
    let frames = if level > 0 {
        let p = frames_path(cfg, name, level);
        tmp.keep_as(&p)?;
        Some(p)
    } else {
        None
    };
    m.save(path, &mpath)
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
    let (m, _) = image_manifest(cfg, name, &path, progress)?;
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
    for rec in store.images()? {
        let path = std::path::PathBuf::from(&rec.path);
        match image_manifest(cfg, &rec.name, &path, &mut |_| {}) {
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
