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
    pub detail: String,
}

pub fn device_rows(devs: &[Device], progress: &HashMap<String, (u32, u32)>) -> Vec<DeviceRow> {
    devs.iter()
        .map(|d| DeviceRow {
            progress: progress
                .get(&d.id)
                .filter(|_| d.wave.is_some() && d.reached < Step::ImageVerified)
                .map(|(a, b)| f64::from(*a) * 100.0 / f64::from((*b).max(1))),
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
        })
        .collect()
}
