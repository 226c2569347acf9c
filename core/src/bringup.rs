//! Bringing a rack up: power machines on through their BMCs at the rate
//! the rack's power distribution allows, and watch each one network-boot.
//!
//! Owns: the order and pace of power-ons (`per_second`, the inrush
//! limit: a retry's power-cycle waits its turn like a first power-on),
//! the boot deadline after each power-on, retries and the verdict per
//! machine. Must not: talk to a BMC or read the fleet record (its driver
//! executes [`Action`]s and reports [`Bringup::power_done`] and
//! [`Bringup::booted`]). Sans-IO: every call takes `now`.

use serde::Serialize;

use crate::workflow::Millis;

/// The pace and patience of a bringup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Power-ons (and retry cycles) started per second.
    pub per_second: f64,
    /// A machine that has not network-booted this long after its
    /// power-on is reported.
    pub boot_timeout_ms: Millis,
    /// Power-cycles after a missed boot before it is given up.
    pub retries: u32,
}

/// Where one machine stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for its turn to be powered on (`cycle`: again, after a
    /// missed boot).
    Queued {
        /// A retry: power-cycle rather than power on.
        cycle: bool,
    },
    /// Its BMC is being asked.
    Powering,
    /// Powered on at `since`; waiting for it to network-boot.
    AwaitingBoot {
        /// When its BMC said it was on.
        since: Millis,
    },
    /// It network-booted.
    Booted {
        /// When.
        at: Millis,
    },
    /// It did not boot within the deadline, retries used up.
    NotBooted,
    /// Its BMC did not power it on; the text says why.
    PowerFailed {
        /// What the BMC (or the network) said.
        why: String,
    },
}

impl Phase {
    /// Whether the machine's bringup is over.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Phase::Booted { .. } | Phase::NotBooted | Phase::PowerFailed { .. }
        )
    }
}

/// One machine of the bringup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// Device id.
    pub device: String,
    /// Where it stands.
    #[serde(flatten)]
    pub phase: Phase,
    /// Power-ons and cycles asked so far.
    pub attempts: u32,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Power the machine on (its first attempt).
    PowerOn(String),
    /// Power-cycle it: it was on and did not boot.
    PowerCycle(String),
    /// It missed its boot deadline: report (and log) it.
    NotBooted {
        /// Device id.
        device: String,
        /// Which attempt missed.
        attempt: u32,
        /// Whether it will be power-cycled again.
        will_retry: bool,
    },
}

/// One bringup of a set of machines.
#[derive(Debug, Clone)]
pub struct Bringup {
    cfg: Config,
    machines: Vec<Machine>,
    /// When the next power-on may start.
    next_start: Millis,
}

impl Bringup {
    /// Machines in the order they are to be powered on (rack slots).
    pub fn new(devices: Vec<String>, cfg: Config, now: Millis) -> Bringup {
        Bringup {
            cfg,
            machines: devices
                .into_iter()
                .map(|device| Machine {
                    device,
                    phase: Phase::Queued { cycle: false },
                    attempts: 0,
                })
                .collect(),
            next_start: now,
        }
    }

    /// Every machine and where it stands.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// Whether every machine's bringup is over.
    pub fn finished(&self) -> bool {
        self.machines.iter().all(|m| m.phase.is_final())
    }

    fn gap_ms(&self) -> Millis {
        ((1000.0 / self.cfg.per_second).ceil() as Millis).max(1)
    }

    /// Time passed: start the power-ons whose turn came, report missed
    /// boots (and queue their cycles).
    pub fn on_tick(&mut self, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        let (timeout, retries) = (self.cfg.boot_timeout_ms, self.cfg.retries);
        for m in &mut self.machines {
            if let Phase::AwaitingBoot { since } = m.phase {
                if now >= since + timeout {
                    let will_retry = m.attempts <= retries;
                    out.push(Action::NotBooted {
                        device: m.device.clone(),
                        attempt: m.attempts,
                        will_retry,
                    });
                    m.phase = if will_retry {
                        Phase::Queued { cycle: true }
                    } else {
                        Phase::NotBooted
                    };
                }
            }
        }
        // The inrush limit: one start per gap, never a burst to catch up
        // after a pause.
        let gap = self.gap_ms();
        while now >= self.next_start {
            let Some(m) = self
                .machines
                .iter_mut()
                .find(|m| matches!(m.phase, Phase::Queued { .. }))
            else {
                break;
            };
            let cycle = matches!(m.phase, Phase::Queued { cycle: true });
            m.phase = Phase::Powering;
            m.attempts += 1;
            out.push(if cycle {
                Action::PowerCycle(m.device.clone())
            } else {
                Action::PowerOn(m.device.clone())
            });
            self.next_start = self.next_start.max(now) + gap;
        }
        out
    }

    /// The BMC answered the power-on or cycle of `device`.
    pub fn power_done(&mut self, device: &str, result: Result<(), String>, now: Millis) {
        if let Some(m) = self.machines.iter_mut().find(|m| m.device == device) {
            if m.phase == Phase::Powering {
                m.phase = match result {
                    Ok(()) => Phase::AwaitingBoot { since: now },
                    Err(why) => Phase::PowerFailed { why },
                };
            }
        }
    }

    /// `device` network-booted (its boot request, or its loader).
    pub fn booted(&mut self, device: &str, now: Millis) {
        if let Some(m) = self.machines.iter_mut().find(|m| m.device == device) {
            if !m.phase.is_final() {
                m.phase = Phase::Booted { at: now };
            }
        }
    }

    /// When [`Self::on_tick`] next has something to do, if ever.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let mut at: Option<Millis> = None;
        let mut earliest = |t: Millis| at = Some(at.map_or(t, |a| a.min(t)));
        if self
            .machines
            .iter()
            .any(|m| matches!(m.phase, Phase::Queued { .. }))
        {
            earliest(self.next_start);
        }
        for m in &self.machines {
            if let Phase::AwaitingBoot { since } = m.phase {
                earliest(since + self.cfg.boot_timeout_ms);
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("d{i}")).collect()
    }

    const CFG: Config = Config {
        per_second: 2.0,
        boot_timeout_ms: 10_000,
        retries: 1,
    };

    #[test]
    fn power_ons_are_paced_by_the_inrush_limit() {
        let mut b = Bringup::new(devs(5), CFG, 0);
        let mut started = Vec::new();
        for t in (0..=3000).step_by(100) {
            for a in b.on_tick(t) {
                if let Action::PowerOn(d) = a {
                    started.push((t, d));
                }
            }
        }
        let times: Vec<Millis> = started.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, [0, 500, 1000, 1500, 2000], "{started:?}");
        assert_eq!(started[0].1, "d1", "in rack order");
    }

    #[test]
    fn a_pause_in_ticks_does_not_release_a_burst() {
        let mut b = Bringup::new(devs(4), CFG, 0);
        assert_eq!(b.on_tick(0).len(), 1);
        // The driver was late by 5 s: one start now, the next a gap later.
        assert_eq!(b.on_tick(5000).len(), 1);
        assert_eq!(b.on_tick(5100).len(), 0);
        assert_eq!(b.on_tick(5500).len(), 1);
    }

    #[test]
    fn a_machine_that_does_not_boot_is_cycled_then_given_up() {
        let mut b = Bringup::new(devs(1), CFG, 0);
        assert_eq!(b.on_tick(0), [Action::PowerOn("d1".into())]);
        b.power_done("d1", Ok(()), 200);
        assert!(b.on_tick(10_100).is_empty(), "not yet due");
        assert_eq!(b.next_wakeup(), Some(10_200));
        let a = b.on_tick(10_200);
        assert_eq!(
            a,
            [
                Action::NotBooted {
                    device: "d1".into(),
                    attempt: 1,
                    will_retry: true
                },
                Action::PowerCycle("d1".into())
            ]
        );
        b.power_done("d1", Ok(()), 10_300);
        let a = b.on_tick(20_300);
        assert_eq!(
            a,
            [Action::NotBooted {
                device: "d1".into(),
                attempt: 2,
                will_retry: false
            }]
        );
        assert!(b.finished());
        assert_eq!(b.machines()[0].phase, Phase::NotBooted);
        assert_eq!(b.next_wakeup(), None);
    }

    #[test]
    fn booted_machines_and_refused_power_ons_end_their_bringup() {
        let mut b = Bringup::new(devs(3), CFG, 0);
        b.on_tick(0);
        b.on_tick(500);
        b.power_done("d1", Ok(()), 600);
        b.power_done("d2", Err("BMC refused our credentials".into()), 700);
        b.booted("d1", 5_000);
        // d3 booted by itself (someone pressed its button) before its turn.
        b.booted("d3", 800);
        assert!(b.on_tick(1000).is_empty(), "nothing left to power on");
        assert!(b.finished());
        let phases: Vec<&Phase> = b.machines().iter().map(|m| &m.phase).collect();
        assert_eq!(phases[0], &Phase::Booted { at: 5_000 });
        assert!(matches!(phases[1], Phase::PowerFailed { .. }));
        assert_eq!(phases[2], &Phase::Booted { at: 800 });
        // A boot after the verdict does not change it back.
        b.booted("d2", 9_000);
        assert!(matches!(b.machines()[1].phase, Phase::PowerFailed { .. }));
    }

    #[test]
    fn a_late_boot_within_the_deadline_of_a_retry_counts() {
        let mut b = Bringup::new(devs(1), CFG, 0);
        b.on_tick(0);
        b.power_done("d1", Ok(()), 0);
        b.on_tick(10_000);
        b.on_tick(10_000);
        b.power_done("d1", Ok(()), 10_100);
        b.booted("d1", 12_000);
        assert!(b.finished());
        assert_eq!(b.machines()[0].attempts, 2);
    }
}
