//! Wave lifecycle in the controller: starting a wave the scheduler asked
//! for (its group, control listener and sender options from the config),
//! progress and verdicts while it runs, and its end.
//!
//! Owns: [`RunningWave`] records and the calls into `io::send`. Must not:
//! decide when a wave starts or who is in it (`rackcast_core::waves`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use rackcast_core::dataplane::sender::SenderConfig;
use rackcast_core::io::send::{self, SendOptions, WaveCommand, WaveEvent, WaveLink};
use rackcast_core::model::{Step, WaveJoin};
use rackcast_core::waves::WaveAction;
use rackcast_core::workflow::Event;
use tokio::sync::mpsc;

use super::{Controller, Input, MemberProgress};
use crate::store::{now_ms, WaveRecord, WaveState};

pub(super) struct RunningWave {
    pub(super) image: String,
    /// Where members connect (the wave's TCP control listener).
    control: SocketAddr,
    commands: crossbeam_channel::Sender<WaveCommand>,
    pub(super) record: WaveRecord,
    /// Members behind the others now (shown in the record's detail).
    pub(super) behind: std::collections::BTreeSet<String>,
}

impl Controller {
    pub(super) fn expected_for(&self, image: &str) -> usize {
        self.devices
            .values()
            .filter(|d| d.image.as_deref() == Some(image))
            .filter(|d| d.reached < Step::ImageVerified)
            .filter(|d| d.failed.as_ref().is_none_or(|f| f.retry_at.is_some()))
            .count()
    }

    pub(super) fn wave_actions(&mut self, acts: Vec<WaveAction>) {
        for a in acts {
            match a {
                WaveAction::Start { image, members } => self.start_wave(&image, members),
                WaveAction::Join { wave, device } => {
                    if let Some(w) = self.waves.get(&wave) {
                        let _ = w.commands.send(WaveCommand::Expect(
                            device.clone(),
                            self.member_key(&device),
                        ));
                        let join = self.join_for(wave, &w.image);
                        if let Some(j) = join {
                            self.apply(&device, Event::WaveAssigned(j));
                        }
                    }
                }
                WaveAction::Rates(rates) => {
                    for (id, bps) in rates {
                        if let Some(w) = self.waves.get(&id) {
                            let _ = w.commands.send(WaveCommand::SetRate(bps));
                        }
                    }
                }
            }
        }
    }

    /// The hash of the credential a member must present to its wave. A
    /// device without one (cannot be in a wave: it was never admitted)
    /// gets a hash no credential has.
    fn member_key(&self, device: &str) -> send::CredentialHash {
        self.devices
            .get(device)
            .and_then(|d| d.credential)
            .unwrap_or([0; 32])
    }

    pub(super) fn join_for(&self, wave: i64, image: &str) -> Option<WaveJoin> {
        let w = self.waves.get(&wave)?;
        let img = self.images.get(image)?;
        Some(WaveJoin {
            wave_id: wave,
            control: w.control,
            image: image.to_string(),
            image_hash: img.hash.clone(),
            image_size: img.size,
        })
    }

    pub(super) fn start_wave(&mut self, image: &str, members: Vec<String>) {
        let (Some(img), Some(manifest)) = (self.images.get(image), self.manifests.get(image))
        else {
            for m in &members {
                self.apply(
                    m,
                    Event::WaveLost {
                        wave: None,
                        why: format!("image {image} is not served"),
                    },
                );
            }
            return;
        };
        let (img, manifest) = (img.clone(), manifest.clone());
        let now = now_ms();
        let group_port = self.cfg.dataplane.port;
        let id = match self.store.create_wave(image, "", &self.leases.me, now) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "cannot record wave");
                return;
            }
        };
        let base = u32::from(self.cfg.dataplane.group_base);
        let group = Ipv4Addr::from(base.wrapping_add(((id - 1).rem_euclid(256)) as u32));
        let bind = SocketAddr::new(self.cfg.dataplane.bind, 0);
        let listener = match self.rt.block_on(send::bind_control(bind)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "wave control listener");
                for m in &members {
                    self.apply(
                        m,
                        Event::WaveLost {
                            wave: None,
                            why: e.to_string(),
                        },
                    );
                }
                return;
            }
        };
        let control = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "wave control address");
                return;
            }
        };
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let opts = SendOptions {
            image: img.path.clone(),
            manifest: (*manifest).clone(),
            frames: img.frames.clone(),
            iface: self.cfg.dataplane.iface.clone(),
            group: SocketAddrV4::new(group, group_port),
            control,
            ttl: self.cfg.dataplane.ttl,
            feedback_ms: u32::try_from(self.cfg.dataplane.feedback.as_millis()).unwrap_or(20),
            hello_timeout: self.cfg.waves.hello_timeout,
            gso_segments: self.cfg.dataplane.gso_segments,
            wave_label: id.to_string(),
            tls: self.control_tls.clone(),
            gate: None,
            cfg: SenderConfig {
                expected: members.len(),
                start_timeout: self.cfg.waves.member_timeout,
                receiver_timeout: self.cfg.waves.member_timeout,
                rate_bps: self.cfg.dataplane.total_rate,
                slow_members: self.cfg.waves.slow_members,
                ..Default::default()
            },
        };
        let link = WaveLink {
            members: members
                .iter()
                .map(|m| (m.clone(), self.member_key(m)))
                .collect(),
            commands: cmd_rx,
            events: ev_tx,
            // No member of an appliance wave is a relay yet: none may ask
            // for a unicast copy.
            relays: Vec::new(),
        };
        let record = WaveRecord {
            id,
            image: image.to_string(),
            state: WaveState::Running,
            group: format!("{group}:{group_port}"),
            created_at: now,
            ended_at: None,
            members: members.len() as u32,
            verified: 0,
            failed: 0,
            detail: format!("members connect to {control}"),
        };
        if let Err(e) = self.store.update_wave(&record) {
            tracing::error!(error = %e, "cannot record wave");
        }
        tracing::info!(wave = id, image, members = members.len(), %group, %control, "wave starts");
        let inbox = self.inbox.clone();
        let inbox2 = self.inbox.clone();
        self.rt.spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                if inbox2.send(Input::Wave { wave: id, ev }).is_err() {
                    break;
                }
            }
        });
        self.rt.spawn(async move {
            let result = send::run_wave(opts, listener, Some(link))
                .await
                .map(Box::new)
                .map_err(|e| e.to_string());
            let _ = inbox.send(Input::WaveEnded { wave: id, result });
        });
        self.waves.insert(
            id,
            RunningWave {
                image: image.to_string(),
                control,
                commands: cmd_tx,
                record,
                behind: Default::default(),
            },
        );
        let acts = self.sched.started(id, image, &members);
        self.wave_actions(acts);
        for m in members {
            if let Some(j) = self.join_for(id, image) {
                self.apply(&m, Event::WaveAssigned(j));
            }
        }
    }

    pub(super) fn on_wave_event(&mut self, wave: i64, ev: WaveEvent) {
        match ev {
            WaveEvent::Progress {
                name,
                done,
                total,
                behind,
            } => {
                metrics::gauge!("rackcast_device_image_progress_ratio", "device" => name.clone())
                    .set(f64::from(done) / f64::from(total.max(1)));
                let (mut d, mut t) = (0u64, 0u64);
                if let Ok(mut p) = self.progress.lock() {
                    p.insert(
                        name.clone(),
                        MemberProgress {
                            done,
                            total,
                            behind,
                        },
                    );
                    for dev in self.devices.values().filter(|x| x.wave == Some(wave)) {
                        if let Some(m) = p.get(&dev.id) {
                            d += u64::from(m.done);
                            t += u64::from(m.total);
                        }
                    }
                }
                metrics::gauge!("rackcast_wave_progress_ratio", "wave" => wave.to_string())
                    .set(d as f64 / t.max(1) as f64);
                self.show_behind(wave, &name, behind);
            }
            WaveEvent::Verdict { name, ok, detail } => {
                if let Some(w) = self.waves.get_mut(&wave) {
                    if ok {
                        w.record.verified += 1;
                    } else {
                        w.record.failed += 1;
                    }
                    let _ = self.store.update_wave(&w.record);
                }
                tracing::info!(wave, device = %name, ok, %detail, "wave member verdict");
                // The agent's own report carries the verified hash; a
                // failed receiver ends the device's imaging step here.
                if !ok {
                    self.apply(
                        &name,
                        Event::WaveLost {
                            wave: Some(wave),
                            why: detail,
                        },
                    );
                }
            }
        }
    }

    /// Keep the running wave's record saying who is behind the others
    /// (`rackcast waves`), stored only when that changes.
    fn show_behind(&mut self, wave: i64, name: &str, behind: bool) {
        let Some(w) = self.waves.get_mut(&wave) else {
            return;
        };
        let changed = if behind {
            w.behind.insert(name.to_string())
        } else {
            w.behind.remove(name)
        };
        if !changed {
            return;
        }
        w.record.detail = format!("members connect to {}", w.control);
        if !w.behind.is_empty() {
            let names: Vec<&str> = w.behind.iter().map(String::as_str).collect();
            w.record.detail += &format!(
                "; behind the others, served after them: {}",
                names.join(" ")
            );
        }
        if let Err(e) = self.store.update_wave(&w.record) {
            tracing::error!(wave, error = %e, "cannot record wave");
        }
    }

    pub(super) fn on_wave_end(&mut self, wave: i64, result: Result<Box<send::SendReport>, String>) {
        let Some(mut w) = self.waves.remove(&wave) else {
            return;
        };
        let acts = self.sched.finished(wave);
        self.wave_actions(acts);
        w.record.ended_at = Some(now_ms());
        match &result {
            Ok(rep) => {
                w.record.state = WaveState::Finished;
                w.record.members = rep.receivers.len() as u32;
                w.record.verified = rep.receivers.iter().filter(|r| r.ok).count() as u32;
                w.record.failed = w.record.members - w.record.verified;
                metrics::gauge!("rackcast_wave_goodput_bps", "image" => w.image.clone())
                    .set(rep.goodput_bps);
                w.record.detail = format!(
                    "{:.2} s, goodput {:.1} Mbit/s, repair overhead {:.1} %{}",
                    rep.seconds,
                    rep.goodput_bps / 1e6,
                    rep.repair_overhead_pct,
                    if rep.fell_behind > 0 {
                        format!(
                            ", {} fell behind (caught up after the others)",
                            rep.fell_behind
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Err(e) => {
                w.record.state = WaveState::Aborted;
                w.record.detail = e.clone();
            }
        }
        let _ = self.store.update_wave(&w.record);
        tracing::info!(wave, state = %w.record.state, verified = w.record.verified, "wave ended");
        // Members still imaging in this wave lost it.
        let lost: Vec<String> = self
            .devices
            .values()
            .filter(|d| d.wave == Some(wave))
            .filter(|d| d.running.as_ref().is_some_and(|r| r.step == Step::Imaging))
            .map(|d| d.id.clone())
            .collect();
        for id in lost {
            // The agent may still report success just after the sender
            // ended (its Done was the last message): give it the imaging
            // timeout rather than failing it here, unless the wave failed.
            if result.is_err() {
                self.apply(
                    &id,
                    Event::WaveLost {
                        wave: Some(wave),
                        why: "wave aborted".into(),
                    },
                );
            }
        }
    }
}
