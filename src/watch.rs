//! `rackcast watch`: the live view in a terminal, and the server-sent
//! event framing it reads.
//!
//! Owns: parsing an SSE stream into events (bounded: a frame larger than
//! [`MAX_EVENT`] is an error, not a growing buffer) and drawing a
//! [`LiveView`] as lines that fit a terminal. Must not: fetch anything
//! (the CLI streams `GET /api/events`) or change state.

use crate::controller::views::{DeviceRow, LiveView, LiveWave};

/// The largest event accepted: a view of 10,000 devices is ~3 MiB.
pub const MAX_EVENT: usize = 16 << 20;

/// Server-sent events from a byte stream, one `(event, data)` per frame.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feed bytes; returns the frames completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let end = self
                .buf
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2));
            let Some((i, sep)) = end else { break };
            let frame = String::from_utf8_lossy(&self.buf[..i]).into_owned();
            self.buf.drain(..i + sep);
            let (mut event, mut data) = (String::from("message"), Vec::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
                // Comments (":") are keep-alives; ids and retries unused.
            }
            if !data.is_empty() {
                out.push((event, data.join("\n")));
            }
        }
        if self.buf.len() > MAX_EVENT {
            return Err(format!(
                "an event of more than {} MiB: not the appliance's",
                MAX_EVENT >> 20
            ));
        }
        Ok(out)
    }
}

fn bar(share: f64, width: usize) -> String {
    let n = ((share.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(n), ".".repeat(width - n))
}

fn rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gbit/s", bps / 1e9)
    } else {
        format!("{:.0} Mbit/s", bps / 1e6)
    }
}

fn eta(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 90.0 => format!("{s:.0}s"),
        Some(s) => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
    }
}

fn wave_line(w: &LiveWave) -> String {
    format!(
        " {:<5} {:<12} {:>3}/{:<3} {:>3}  {} {:>5.1}%  {:>12}  {:>7}{}",
        w.id,
        w.image,
        w.verified,
        w.members,
        w.failed,
        bar(w.progress, 24),
        w.progress * 100.0,
        rate(w.rate_bps),
        eta(w.eta_s),
        if w.behind.is_empty() {
            String::new()
        } else {
            format!("  behind: {}", w.behind.join(", "))
        }
    )
}

fn device_line(d: &DeviceRow) -> String {
    let progress = match d.progress {
        Some(p) => format!(
            "{} {:>3.0}%{}",
            bar(p / 100.0, 12),
            p,
            if d.behind { " behind" } else { "" }
        ),
        None => String::new(),
    };
    format!(
        " {:<18} {:<18} {:<17} {:<17} {:>5} {}",
        d.device,
        d.mac,
        d.state,
        d.step,
        d.wave.map(|w| w.to_string()).unwrap_or_default(),
        progress
    )
}

/// The view as at most `rows` lines of at most `cols` characters:
/// counts by state, waves with progress, rate and ETA, failures with
/// their reason, then the devices still in progress (done ones are
/// counted, not listed, when the screen is short).
pub fn render(v: &LiveView, title: &str, rows: usize, cols: usize) -> Vec<String> {
    let mut out = vec![title.to_string()];
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for d in &v.devices {
        *counts.entry(d.state.as_str()).or_default() += 1;
    }
    out.push(format!(
        "devices: {}   {}",
        v.devices.len(),
        counts
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join("  ")
    ));
    out.push(String::new());
    out.push(format!(
        "WAVES ({} running)   wave  image  verified/members  failed  progress  rate  ETA",
        v.waves.len()
    ));
    out.extend(v.waves.iter().map(wave_line));
    if let Some(b) = &v.bringup {
        let machines = b["machines"].as_array().cloned().unwrap_or_default();
        let phase = |p: &str| machines.iter().filter(|m| m["phase"] == p).count();
        out.push(String::new());
        out.push(format!(
            "BRINGUP{}: {} machines: {} booted, {} waiting for their boot, {} queued, {} not booted, {} power failed",
            if b["finished"] == true { " (finished)" } else { "" },
            machines.len(),
            phase("booted"),
            phase("awaiting_boot") + phase("powering"),
            phase("queued"),
            phase("not_booted"),
            phase("power_failed"),
        ));
    }
    let failed: Vec<&DeviceRow> = v.devices.iter().filter(|d| d.state == "failed").collect();
    if !failed.is_empty() {
        out.push(String::new());
        out.push(format!("FAILURES ({})", failed.len()));
        out.extend(
            failed
                .iter()
                .map(|d| format!(" {:<18} {}: {}", d.device, d.step, d.detail)),
        );
    }
    out.push(String::new());
    out.push(format!(
        " {:<18} {:<18} {:<17} {:<17} {:>5} progress",
        "DEVICE", "MAC", "STATE", "STEP", "WAVE"
    ));
    let room = rows.saturating_sub(out.len() + 1);
    let busy: Vec<&DeviceRow> = v.devices.iter().filter(|d| d.state != "done").collect();
    let shown: Vec<&DeviceRow> = if v.devices.len() <= room {
        v.devices.iter().collect()
    } else {
        busy.iter().copied().take(room).collect()
    };
    out.extend(shown.iter().map(|d| device_line(d)));
    if shown.len() < v.devices.len() {
        out.push(format!(
            " ... and {} more ({} done)",
            v.devices.len() - shown.len(),
            counts.get("done").copied().unwrap_or(0)
        ));
    }
    out.truncate(rows.max(1));
    out.into_iter()
        .map(|l| l.chars().take(cols.max(20)).collect())
        .collect()
}

/// The terminal's size (rows, columns), or 40 x 160 when it has none.
pub fn terminal_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 {
            return (ws.ws_row as usize, ws.ws_col as usize);
        }
    }
    (40, 160)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(i: u32, state: &str, progress: Option<f64>) -> DeviceRow {
        DeviceRow {
            device: format!("rc-{i:012x}"),
            mac: format!("02:aa:00:00:00:{i:02x}"),
            state: state.into(),
            step: if state == "failed" {
                "raid_configured"
            } else {
                "imaging"
            }
            .into(),
            wave: progress.map(|_| 3),
            image: Some("debian".into()),
            bundle: None,
            progress,
            behind: false,
            detail: if state == "failed" {
                "mdadm: no such disk".into()
            } else {
                String::new()
            },
        }
    }

    #[test]
    fn sse_frames_split_anywhere_are_put_together() {
        let mut p = SseParser::default();
        let text =
            b"event: view\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: view\ndata: {\"a\":2}\n\n";
        let mut got = Vec::new();
        for chunk in text.chunks(5) {
            got.extend(p.feed(chunk).unwrap());
        }
        assert_eq!(
            got,
            [
                ("view".to_string(), "{\"a\":1}".to_string()),
                ("view".to_string(), "{\"a\":2}".to_string())
            ]
        );
    }

    #[test]
    fn an_endless_frame_is_refused() {
        let mut p = SseParser::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut r = Ok(vec![]);
        for _ in 0..17 {
            r = p.feed(&chunk);
            if r.is_err() {
                break;
            }
        }
        assert!(r.is_err());
    }

    #[test]
    fn the_screen_shows_waves_failures_and_the_busy_devices_first() {
        let mut devices: Vec<DeviceRow> = (1..=50).map(|i| dev(i, "done", None)).collect();
        devices.push(dev(51, "running", Some(42.0)));
        devices.push(dev(52, "failed", None));
        let v = LiveView {
            devices,
            waves: vec![LiveWave {
                id: 3,
                image: "debian".into(),
                members: 2,
                verified: 0,
                failed: 0,
                progress: 0.42,
                rate_bps: 412e6,
                eta_s: Some(7.2),
                behind: vec![],
            }],
            bringup: None,
        };
        let lines = render(&v, "rackcast watch", 20, 120);
        let text = lines.join("\n");
        assert!(lines.len() <= 20);
        assert!(
            text.contains("done 50") && text.contains("failed 1") && text.contains("running 1"),
            "{text}"
        );
        assert!(
            text.contains("42.0%") && text.contains("412 Mbit/s") && text.contains("7s"),
            "{text}"
        );
        assert!(
            text.contains("raid_configured: mdadm: no such disk"),
            "{text}"
        );
        assert!(
            text.contains("rc-000000000033"),
            "the running device is listed: {text}"
        );
        assert!(text.contains("... and 50 more (50 done)"), "{text}");
    }
}
