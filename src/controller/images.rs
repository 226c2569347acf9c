//! The appliance's image catalogue: images registered from the config or
//! `rackcast images add`, their manifests kept beside the store, and the
//! check at start that an image did not change since it was added.
//!
//! Owns: manifest files under the state dir and the image rows. Must not:
//! serve image bytes (waves do) or decide who gets which image (profiles).

use std::collections::HashMap;
use std::sync::Arc;

use rackcast_core::image::manifest::Manifest;

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

/// The image's manifest: the stored one if it still describes the file
/// (size and mtime checked by `load_for`), else built now and stored.
pub fn image_manifest(
    cfg: &Config,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<Manifest> {
    let mpath = manifest_path(cfg, name);
    if let Ok(m) = Manifest::load_for(path, &mpath) {
        return Ok(m);
    }
    tracing::info!(image = name, path = %path.display(), "building manifest");
    let ss =
        rackcast_core::wire::packet::symbol_size_for_mtu(cfg.dataplane.mtu).ok_or_else(|| {
            anyhow::anyhow!(
                "dataplane.mtu {} leaves no room for a symbol",
                cfg.dataplane.mtu
            )
        })?;
    let m = Manifest::build(path, rackcast_core::image::manifest::DEFAULT_BLOCK_SIZE, ss)
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
    if let Some(dir) = mpath.parent() {
        std::fs::create_dir_all(dir)?;
    }
    m.save(path, &mpath)
        .map_err(|e| anyhow::anyhow!("image {name}: {e}"))?;
    Ok(m)
}

/// Register a new image (config or `rackcast images add`).
pub fn add_image(
    cfg: &Config,
    store: &mut dyn Store,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<ImageRecord> {
    let path = std::fs::canonicalize(path)
        .map_err(|e| anyhow::anyhow!("image {name}: {}: {e}", path.display()))?;
    let m = image_manifest(cfg, name, &path)?;
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
        add_image(cfg, store, &im.name, &im.path)?;
    }
    let mut images = HashMap::new();
    let mut manifests = HashMap::new();
    for rec in store.images()? {
        let path = std::path::PathBuf::from(&rec.path);
        match image_manifest(cfg, &rec.name, &path) {
            Ok(m) if m.image_hash_hex() == rec.hash => {
                manifests.insert(rec.name.clone(), Arc::new(m));
                images.insert(
                    rec.name.clone(),
                    ImageEntry {
                        name: rec.name.clone(),
                        path,
                        hash: rec.hash.clone(),
                        size: rec.size,
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
