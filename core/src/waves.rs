//! The wave scheduler: which devices that passed the barrier go into which
//! wave, when a wave starts, and each running wave's share of the rate.
//!
//! Owns: per-image queues of ready devices, the start policy (every
//! expected device ready, or `min_members` ready and `start_after`
//! passed since the first), late joins into a running wave of the same
//! image, and the split of the total rate over running waves. Must not:
//! start senders or talk to devices; the controller carries out the
//! returned [`WaveAction`]s.

use std::collections::{BTreeMap, BTreeSet};

use crate::workflow::Millis;

/// What the controller must do for the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaveAction {
    /// Start a wave of `image` with these members; the controller answers
    /// with [`WaveScheduler::started`].
    Start {
        /// The image.
        image: String,
        /// Device ids.
        members: Vec<String>,
    },
    /// Add a late member to a running wave.
    Join {
        /// The running wave.
        wave: i64,
        /// The device id.
        device: String,
    },
    /// New rate per running wave (bits/s).
    Rates(Vec<(i64, u64)>),
}

/// When waves start and how fast they go.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Start once this many are ready and `start_after_ms` passed since
    /// the first.
    pub min_members: usize,
    /// See `min_members`.
    pub start_after_ms: Millis,
    /// Bits/s shared by all running waves.
    pub total_rate: u64,
}

#[derive(Debug)]
struct Running {
    image: String,
    members: BTreeSet<String>,
}

/// The scheduler: queues of ready devices per image and the running waves.
#[derive(Debug)]
pub struct WaveScheduler {
    policy: Policy,
    /// image -> (device -> ready since)
    queues: BTreeMap<String, BTreeMap<String, Millis>>,
    running: BTreeMap<i64, Running>,
}

impl WaveScheduler {
    /// A scheduler with nothing queued or running.
    pub fn new(policy: Policy) -> WaveScheduler {
        WaveScheduler {
            policy,
            queues: BTreeMap::new(),
            running: BTreeMap::new(),
        }
    }

    /// A new policy (a reloaded config): for waves started from now on;
    /// running waves keep what they started with.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// A device passed the barrier and asks for `image`.
    pub fn enqueue(&mut self, device: &str, image: &str, now: Millis) -> Vec<WaveAction> {
        self.remove(device);
        if let Some((id, w)) = self.running.iter_mut().find(|(_, w)| w.image == image) {
            w.members.insert(device.to_string());
            return vec![WaveAction::Join {
                wave: *id,
                device: device.to_string(),
            }];
        }
        self.queues
            .entry(image.to_string())
            .or_default()
            .insert(device.to_string(), now);
        Vec::new()
    }

    /// Take a device out of its queue or wave.
    pub fn remove(&mut self, device: &str) {
        for q in self.queues.values_mut() {
            q.remove(device);
        }
        for w in self.running.values_mut() {
            w.members.remove(device);
        }
    }

    /// Start waves whose policy is met. `expected(image)` is how many
    /// devices are meant to get the image and have not got it yet.
    pub fn on_tick(&mut self, now: Millis, expected: impl Fn(&str) -> usize) -> Vec<WaveAction> {
        let mut out = Vec::new();
        let images: Vec<String> = self.queues.keys().cloned().collect();
        for image in images {
            if self.running.values().any(|w| w.image == image) {
                continue;
            }
            let Some(q) = self.queues.get(&image) else {
                continue;
            };
            if q.is_empty() {
                continue;
            }
            let first = q.values().min().copied().unwrap_or(now);
            let all_ready = q.len() >= expected(&image);
            let enough =
                q.len() >= self.policy.min_members && now - first >= self.policy.start_after_ms;
            if all_ready || enough {
                let members: Vec<String> = q.keys().cloned().collect();
                self.queues.remove(&image);
                out.push(WaveAction::Start { image, members });
            }
        }
        out
    }

    /// The controller started a wave (store id `id`).
    pub fn started(&mut self, id: i64, image: &str, members: &[String]) -> Vec<WaveAction> {
        self.running.insert(
            id,
            Running {
                image: image.to_string(),
                members: members.iter().cloned().collect(),
            },
        );
        vec![self.rates()]
    }

    /// A wave ended; its devices that still need the image are re-queued
    /// by the workflow (their imaging step failed or retries).
    pub fn finished(&mut self, id: i64) -> Vec<WaveAction> {
        self.running.remove(&id);
        if self.running.is_empty() {
            return Vec::new();
        }
        vec![self.rates()]
    }

    fn rates(&self) -> WaveAction {
        let n = self.running.len().max(1) as u64;
        WaveAction::Rates(
            self.running
                .keys()
                .map(|id| (*id, self.policy.total_rate / n))
                .collect(),
        )
    }

    /// Waves running now.
    pub fn running_waves(&self) -> usize {
        self.running.len()
    }

    /// Devices waiting for a wave of `image`.
    pub fn queued(&self, image: &str) -> usize {
        self.queues.get(image).map_or(0, |q| q.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched() -> WaveScheduler {
        WaveScheduler::new(Policy {
            min_members: 2,
            start_after_ms: 10_000,
            total_rate: 900,
        })
    }

    #[test]
    fn starts_when_every_expected_device_is_ready() {
        let mut s = sched();
        assert!(s.enqueue("a", "deb", 0).is_empty());
        assert!(s.on_tick(1, |_| 2).is_empty());
        s.enqueue("b", "deb", 2);
        let acts = s.on_tick(3, |_| 2);
        assert_eq!(
            acts,
            vec![WaveAction::Start {
                image: "deb".into(),
                members: vec!["a".into(), "b".into()]
            }]
        );
    }

    #[test]
    fn min_members_after_start_after_and_late_joiners() {
        let mut s = sched();
        s.enqueue("a", "deb", 0);
        // Alone: min_members 2 not met even after start_after.
        assert!(s.on_tick(20_000, |_| 5).is_empty());
        s.enqueue("b", "deb", 15_000);
        assert!(s.on_tick(9_999, |_| 5).is_empty());
        let acts = s.on_tick(20_000, |_| 5);
        assert!(matches!(&acts[0], WaveAction::Start { members, .. } if members.len() == 2));
        assert_eq!(
            s.started(1, "deb", &["a".into(), "b".into()]),
            vec![WaveAction::Rates(vec![(1, 900)])]
        );
        // A late device joins the running wave.
        assert_eq!(
            s.enqueue("c", "deb", 21_000),
            vec![WaveAction::Join {
                wave: 1,
                device: "c".into()
            }]
        );
    }

    #[test]
    fn concurrent_waves_share_the_total_rate() {
        let mut s = sched();
        s.enqueue("a", "deb", 0);
        s.enqueue("b", "rocky", 0);
        let acts = s.on_tick(1, |_| 1);
        assert_eq!(acts.len(), 2, "one wave per image, at once");
        s.started(1, "deb", &["a".into()]);
        assert_eq!(
            s.started(2, "rocky", &["b".into()]),
            vec![WaveAction::Rates(vec![(1, 450), (2, 450)])]
        );
        assert_eq!(s.running_waves(), 2);
        assert_eq!(s.finished(1), vec![WaveAction::Rates(vec![(2, 900)])]);
        // A device removed from its queue is not started.
        s.enqueue("c", "alma", 0);
        s.remove("c");
        assert!(s.on_tick(100_000, |_| 1).is_empty());
        assert_eq!(s.queued("alma"), 0);
    }
}
