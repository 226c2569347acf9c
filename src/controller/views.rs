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

/// A running wave as the live view shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveWave {
    pub id: i64,
    pub image: String,
    pub members: u32,
    pub verified: u32,
    pub failed: u32,
    /// Share of the image its members have, 0..=1.
    pub progress: f64,
    /// Image bits per second each member gained, over the last seconds.
    pub rate_bps: f64,
    /// Seconds left at that rate.
    pub eta_s: Option<f64>,
    /// Members behind the others.
    pub behind: Vec<String>,
}

/// Everything `rackcast watch` and the web page show, pushed to them by
/// server-sent events whenever it changes (at most twice a second).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LiveView {
    /// Devices by id.
    pub devices: Vec<DeviceRow>,
    pub waves: Vec<LiveWave>,
    /// The running or last bringup.
    pub bringup: Option<serde_json::Value>,
}

/// A wave's progress a while ago, for its rate: (when, image bytes).
#[derive(Debug, Clone, Default)]
pub struct RateWindow {
    samples: std::collections::VecDeque<(i64, f64)>,
}

impl RateWindow {
    /// Image bytes done at `now`; the rate over the last ~5 s, bytes/s.
    pub fn push(&mut self, now: i64, bytes: f64) -> f64 {
        self.samples.push_back((now, bytes));
        while self.samples.len() > 2 && now - self.samples[0].0 > 5_000 {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        if now > t0 {
            ((bytes - b0) * 1000.0 / (now - t0) as f64).max(0.0)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[test]
    fn the_rate_is_over_the_last_seconds() {
        let mut w = RateWindow::default();
        assert_eq!(w.push(0, 0.0), 0.0);
        assert_eq!(w.push(1_000, 1e6), 1e6);
        for t in 2..=10 {
            w.push(t * 1_000, 1e6 + (t - 1) as f64 * 2e6);
        }
        // The first (slower) second has left the window.
        assert!((w.push(11_000, 1e6 + 10.0 * 2e6) - 2e6).abs() < 1.0);
    }
}
