//! What operators read: one row per device for `rackcast devices` and
//! `GET /api/devices`.
//!
//! Owns: the view types and their derivation from device records. Must
//! not: change a record.

use std::collections::HashMap;

use rackcast_core::model::Step;
use rackcast_core::workflow::Device;

/// One line of `rackcast devices` / `GET /api/devices`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceRow {
    pub device: String,
    pub mac: String,
    pub state: String,
    pub step: String,
    pub wave: Option<i64>,
    pub image: Option<String>,
    pub bundle: Option<String>,
    /// Image progress in percent while the device is in a running wave.
    pub progress: Option<f64>,
    /// It fell behind its wave (a slow port, disk or lossy link) and is
    /// served what it lacks after the others.
    #[serde(default)]
    pub behind: bool,
    pub detail: String,
}

/// A device's place in its running wave.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemberProgress {
    /// Image blocks done.
    pub done: u32,
    /// Blocks in the image.
    pub total: u32,
    /// It fell behind the others (see `SlowMembers`).
    pub behind: bool,
}

pub fn device_rows(devs: &[Device], progress: &HashMap<String, MemberProgress>) -> Vec<DeviceRow> {
    devs.iter()
        .map(|d| {
            let live = progress
                .get(&d.id)
                .filter(|_| d.wave.is_some() && d.reached < Step::ImageVerified);
            DeviceRow {
                progress: live.map(|p| f64::from(p.done) * 100.0 / f64::from(p.total.max(1))),
                behind: live.is_some_and(|p| p.behind),
                device: d.id.clone(),
                mac: d.mac.clone(),
                state: d.state().to_string(),
                step: d.current_step().to_string(),
                wave: d.wave,
                image: d.image.clone(),
                bundle: d.bundle.clone(),
                detail: d
                    .failed
                    .as_ref()
                    .map(|f| f.reason.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}
