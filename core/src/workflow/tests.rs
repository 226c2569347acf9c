//! Workflow core tests: no sockets, no sleeps, time is a number.

use super::*;
use crate::model::{BiosPlan, ImagePlan, Plan, Program, Seed};

const IMG_HASH: &str = "abc123";

fn plan(full: bool) -> Plan {
    let prog = |n: &str| Program {
        name: n.into(),
        argv: vec!["true".into()],
        timeout_s: 5,
        env: Default::default(),
    };
    Plan {
        profile: "p".into(),
        bios: full.then(|| BiosPlan {
            attributes: [("BootMode".to_string(), "Uefi".to_string())].into(),
            redfish: None,
            program: Some(prog("bios")),
        }),
        raid: None,
        programs: if full { vec![prog("cfg")] } else { vec![] },
        image: ImagePlan {
            name: "img".into(),
            hash: IMG_HASH.into(),
            size: 10,
            target: "/dev/sda".into(),
            target_disk: None,
            wipe: false,
        },
        post_install: vec![],
        boot_to_disk: full.then(|| prog("efiboot")),
        seed: full.then(|| Seed {
            meta_data: "instance-id: d-1\n".into(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        }),
    }
}

struct Sim {
    dev: Device,
    cfg: WorkflowConfig,
    now: Millis,
    rows: Vec<LogRow>,
    sent: Vec<Command>,
    other: Vec<Action>,
}

impl Sim {
    fn new() -> Sim {
        Sim {
            dev: Device::new("d-1", "02:00:00:00:00:01", 0),
            cfg: WorkflowConfig {
                step_timeout_ms: 10_000,
                imaging_timeout_ms: 100_000,
                max_attempts: 2,
                retry_backoff_ms: 1_000,
            },
            now: 0,
            rows: vec![],
            sent: vec![],
            other: vec![],
        }
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        let acts = on_event(&mut self.dev, &self.cfg, self.now, e);
        for a in &acts {
            match a {
                Action::Record(r) => self.rows.push(r.clone()),
                Action::Send(c) => self.sent.push(c.clone()),
                o => self.other.push(o.clone()),
            }
        }
        acts
    }

    fn last_cmd(&self) -> Command {
        self.sent.last().cloned().expect("a command was sent")
    }

    fn ok(&mut self, data: StepData) {
        let c = self.last_cmd();
        self.now += 100;
        self.ev(Event::Report {
            cmd_id: c.cmd_id,
            outcome: Outcome::Ok {
                detail: format!("{} done", c.step),
            },
            data,
            ops: vec![],
        });
    }

    fn fail(&mut self, why: &str) {
        let c = self.last_cmd();
        self.now += 100;
        self.ev(Event::Report {
            cmd_id: c.cmd_id,
            outcome: Outcome::Failed { reason: why.into() },
            data: StepData::None,
            ops: vec![],
        });
    }

    /// Loader connects, reports inventory, gets its bundle.
    fn reach_agent_delivered(&mut self, plan: Plan) {
        self.ev(Event::AgentConnected {
            mode: AgentMode::Loader { os_present: false },
            issued: None,
        });
        assert_eq!(self.last_cmd().work, Work::Inventory);
        self.ok(StepData::Inventory(Box::default()));
        assert!(self.other.contains(&Action::BuildBundle));
        self.ev(Event::BundleBuilt {
            hash: "b1".into(),
            plan: Box::new(plan),
        });
        assert_eq!(
            self.last_cmd().work,
            Work::FetchBundle { hash: "b1".into() }
        );
        self.ok(StepData::None);
        assert!(self.dev.reached >= Step::AgentDelivered);
        self.ev(Event::AgentConnected {
            mode: AgentMode::Agent {
                bundle: "b1".into(),
            },
            issued: None,
        });
    }

    fn join(&self) -> WaveJoin {
        WaveJoin {
            wave_id: 7,
            control: "198.18.0.1:40000".parse().unwrap(),
            image: "img".into(),
            image_hash: IMG_HASH.into(),
            image_size: 10,
        }
    }

    fn steps_logged(&self, kind: &str) -> Vec<Step> {
        self.rows
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.step)
            .collect()
    }
}

#[test]
fn every_step_in_order_to_done() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    // bios -> (raid skipped) -> programs -> ready_for_image
    assert_eq!(s.last_cmd().step, Step::BiosConfigured);
    s.ok(StepData::None);
    assert_eq!(s.last_cmd().step, Step::ProgramsRun);
    s.ok(StepData::None);
    assert_eq!(s.last_cmd().work, Work::RequestImage);
    s.ok(StepData::None);
    assert!(s.dev.queued_for_image);
    assert!(s.other.contains(&Action::RequestWave {
        image: "img".into()
    }));
    s.ev(Event::WaveAssigned(s.join()));
    assert_eq!(s.last_cmd().work, Work::JoinWave(s.join()));
    assert_eq!(s.dev.wave, Some(7));
    s.ok(StepData::ImageWritten {
        hash: IMG_HASH.into(),
        bytes: 10,
    });
    assert_eq!(s.dev.reached, Step::PostInstall);
    // post_install skipped; the identity seed is written, then
    // boot_to_disk runs
    assert_eq!(s.last_cmd().step, Step::IdentityWritten);
    s.ok(StepData::None);
    assert_eq!(s.last_cmd().step, Step::BootToDisk);
    s.ok(StepData::None);
    assert_eq!(s.dev.reached, Step::Done);
    assert_eq!(s.dev.state(), "done");
    assert_eq!(
        s.steps_logged("ok"),
        vec![
            Step::LoaderBooted,
            Step::Inventoried,
            Step::AgentDelivered,
            Step::BiosConfigured,
            Step::ProgramsRun,
            Step::ReadyForImage,
            Step::Imaging,
            Step::ImageVerified,
            Step::IdentityWritten,
            Step::BootToDisk,
            Step::Done
        ]
    );
    assert_eq!(
        s.steps_logged("skipped"),
        vec![Step::RaidConfigured, Step::PostInstall]
    );
    // Every finished step has a duration.
    assert!(s
        .rows
        .iter()
        .filter(|r| r.kind == "ok" && r.step != Step::LoaderBooted && r.step != Step::Done)
        .all(|r| r.duration_ms.is_some()));
}

#[test]
fn operator_reinstall_starts_a_finished_device_over() {
    let mut s = Sim::new();
    // Not finished: nothing happens.
    s.reach_agent_delivered(plan(false));
    let rows = s.rows.len();
    s.ev(Event::Reinstall);
    assert_eq!(s.rows.len(), rows);
    // Drive to done, then reinstall.
    finish(&mut s);
    let cmd = s.dev.next_cmd;
    assert!(!s.dev.reinstall);
    s.ev(Event::Reinstall);
    assert_eq!(s.dev.reached, Step::Discovered);
    assert!(s.dev.reinstall, "its next plan may overwrite the old OS");
    assert!(s.dev.next_cmd >= cmd, "command ids keep counting");
    let last = s.rows.last().unwrap();
    assert!(last.detail.contains("reinstall requested by the operator"));
    assert_eq!(last.from_state, "done:done");
    // Its loader comes back: the steps run again.
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    assert_eq!(s.last_cmd().work, Work::Inventory);
}

/// Drive a device that has its bundle to `done`.
fn finish(s: &mut Sim) {
    for _ in 0..20 {
        if s.dev.reached == Step::Done {
            break;
        }
        match s.last_cmd().work {
            Work::JoinWave(_) => s.ok(StepData::ImageWritten {
                hash: IMG_HASH.into(),
                bytes: 10,
            }),
            _ if s.dev.queued_for_image => {
                let j = s.join();
                s.ev(Event::WaveAssigned(j));
            }
            _ => s.ok(StepData::None),
        }
    }
    assert_eq!(s.dev.reached, Step::Done);
}

#[test]
fn each_boot_claims_the_device_once_and_only_its_credential_comes_back() {
    let mut s = Sim::new();
    let loader = AgentMode::Loader { os_present: false };
    let (c1, c2) = ([1u8; 32], [2u8; 32]);
    // First contact of the first boot: a credential is issued.
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Issue { boot: 1 }
    );
    s.ev(Event::AgentConnected {
        mode: loader.clone(),
        issued: Some(c1),
    });
    assert_eq!((s.dev.boot, s.dev.credential), (1, Some(c1)));
    assert_eq!(s.last_cmd().work, Work::Inventory);
    // Another host naming the MAC, without the credential or with
    // another, is refused; the holder comes back.
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Refused(Refusal::AlreadyClaimed)
    );
    assert_eq!(
        admission(&s.dev, &loader, Some(&c2)),
        Admission::Refused(Refusal::WrongCredential)
    );
    assert_eq!(
        admission(&s.dev, &loader, Some(&c1)),
        Admission::Resume { boot: 1 }
    );
    // The refusal is a row on the device and changes nothing else.
    let before = s.dev.clone();
    s.ev(Event::ClaimRefused {
        refusal: Refusal::AlreadyClaimed,
        peer: "198.18.0.66:40000".into(),
    });
    assert_eq!(s.dev, before);
    let row = s.rows.last().unwrap();
    assert_eq!(row.kind, "refused");
    assert!(
        row.detail.contains("another host claims this MAC"),
        "{}",
        row.detail
    );
    assert!(row.detail.contains("198.18.0.66"), "{}", row.detail);
    // Progress of a stale command opens nothing; the running one's
    // (sent before a reset of the machine) lets the next boot claim it,
    // and the old boot's credential is void from then on.
    s.ev(Event::Progress {
        cmd_id: 999,
        ops: vec![],
    });
    assert!(!s.dev.claim_open);
    let cmd = s.last_cmd().cmd_id;
    s.ev(Event::Progress {
        cmd_id: cmd,
        ops: vec![],
    });
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Issue { boot: 2 }
    );
    // If the agent reports after all (the reset did not restart it), the
    // window closes again.
    let mut survived = s.dev.clone();
    let _ = on_event(
        &mut survived,
        &s.cfg,
        s.now,
        Event::Report {
            cmd_id: cmd,
            outcome: Outcome::Ok {
                detail: String::new(),
            },
            data: StepData::Inventory(Box::default()),
            ops: vec![],
        },
    );
    assert!(!survived.claim_open);
    s.ev(Event::AgentConnected {
        mode: loader.clone(),
        issued: Some(c2),
    });
    assert_eq!(
        admission(&s.dev, &loader, Some(&c1)),
        Admission::Refused(Refusal::WrongCredential)
    );
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Refused(Refusal::AlreadyClaimed)
    );
    // An operator's retry re-arms a device that is not done.
    s.ev(Event::Retry);
    assert!(s.dev.claim_open);
    assert!(s.rows.last().unwrap().detail.contains("re-armed"));
    s.ev(Event::AgentConnected {
        mode: loader.clone(),
        issued: Some(c1),
    });
    // A step that fails while its agent is connected opens nothing; the
    // agent gone afterwards (or before the failure) does.
    s.fail("exit 3");
    assert!(s.dev.failed.is_some());
    assert!(!s.dev.claim_open, "the agent is still there");
    s.ev(Event::AgentDisconnected);
    assert!(
        s.dev.claim_open,
        "failed and gone: its next boot may claim it"
    );
}

#[test]
fn an_unapproved_device_stops_after_its_inventory_until_approved() {
    let mut s = Sim::new();
    s.dev.approved = false;
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    s.ok(StepData::Inventory(Box::default()));
    assert_eq!(s.dev.reached, Step::Inventoried);
    assert_eq!(s.dev.state(), "awaiting_approval");
    assert!(
        !s.other.contains(&Action::BuildBundle),
        "no plan before approval"
    );
    let held = s.rows.last().unwrap();
    assert_eq!(held.kind, "held");
    assert!(
        held.detail.contains("rackcast approve d-1"),
        "{}",
        held.detail
    );
    // Reconnects and ticks do not get it further.
    s.ev(Event::AgentDisconnected);
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    s.now += 60_000;
    s.ev(Event::Tick);
    assert!(!s.other.contains(&Action::BuildBundle));
    s.ev(Event::Approve);
    assert!(s.dev.approved);
    assert!(s.other.contains(&Action::BuildBundle));
    assert!(s
        .rows
        .iter()
        .any(|r| r.detail == "approved by the operator"));
    // A hold after the bundle changes nothing (it is being installed).
    s.ev(Event::BundleBuilt {
        hash: "b1".into(),
        plan: Box::new(plan(false)),
    });
    s.ev(Event::Hold("late".into()));
    assert!(s.dev.approved);
}

#[test]
fn a_hold_before_the_inventory_report_stops_the_device_there() {
    let mut s = Sim::new();
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    s.ev(Event::Hold("serial mismatch".into()));
    assert!(s.rows.last().unwrap().detail.contains("serial mismatch"));
    s.ok(StepData::Inventory(Box::default()));
    assert_eq!(s.dev.state(), "awaiting_approval");
    assert!(!s.other.contains(&Action::BuildBundle));
}

#[test]
fn an_installed_device_is_started_over_only_by_the_operator() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    finish(&mut s);
    let loader = AgentMode::Loader { os_present: false };
    s.dev.claim_open = true;
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Refused(Refusal::Installed)
    );
    // Even a loader admitted some other way does not wipe it.
    s.sent.clear();
    s.ev(Event::AgentConnected {
        mode: loader.clone(),
        issued: None,
    });
    assert_eq!(s.dev.reached, Step::Done);
    assert!(
        s.sent.is_empty(),
        "no command to an installed device's loader"
    );
    // Retry does not re-arm an installed device; reinstall does.
    s.dev.claim_open = false;
    s.ev(Event::Retry);
    assert!(!s.dev.claim_open);
    s.ev(Event::Reinstall);
    assert_eq!(
        admission(&s.dev, &loader, None),
        Admission::Issue { boot: 1 }
    );
    assert_eq!(s.dev.credential, None, "the old boot's credential is void");
}

#[test]
fn progress_of_the_running_command_is_logged_at_once_and_stale_progress_not() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let c = s.last_cmd();
    assert_eq!(c.step, Step::BiosConfigured);
    let op = |name: &str| OpRecord {
        op: name.into(),
        ok: true,
        exit_code: None,
        duration_ms: 1,
        detail: "d".into(),
    };
    let rows = s.rows.len();
    s.ev(Event::Progress {
        cmd_id: c.cmd_id + 1,
        ops: vec![op("stale")],
    });
    assert_eq!(s.rows.len(), rows);
    s.ev(Event::Progress {
        cmd_id: c.cmd_id,
        ops: vec![op("bios-stage")],
    });
    let last = s.rows.last().unwrap();
    assert_eq!(
        (last.step, last.kind.as_str()),
        (Step::BiosConfigured, "op")
    );
    assert!(last.detail.starts_with("bios-stage ok"));
    // The step is still running until its report.
    assert!(s.dev.running.is_some());
}

#[test]
fn plan_without_programs_records_skips() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    assert_eq!(s.last_cmd().work, Work::RequestImage);
    assert_eq!(
        s.steps_logged("skipped"),
        vec![
            Step::BiosConfigured,
            Step::RaidConfigured,
            Step::ProgramsRun
        ]
    );
    assert!(s
        .rows
        .iter()
        .any(|r| r.kind == "skipped" && r.detail.contains("no BIOS")));
}

#[test]
fn failure_retries_automatically_then_waits_for_operator() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let first = s.last_cmd();
    s.fail("BMC refused BootMode");
    let f = s.dev.failed.clone().unwrap();
    assert_eq!((f.step, f.attempts), (Step::BiosConfigured, 1));
    assert_eq!(s.dev.state(), "failed");
    assert!(f.reason.contains("BootMode"));
    // Not before the backoff.
    s.now += 500;
    let n = s.sent.len();
    s.ev(Event::Tick);
    assert_eq!(s.sent.len(), n);
    s.now += 600;
    s.ev(Event::Tick);
    let again = s.last_cmd();
    assert_eq!(again.step, Step::BiosConfigured);
    assert_ne!(again.cmd_id, first.cmd_id);
    assert_eq!(s.dev.running.as_ref().unwrap().attempt, 2);
    // Second failure reaches max_attempts: no automatic retry.
    s.fail("still refused");
    assert_eq!(s.dev.failed.as_ref().unwrap().retry_at, None);
    s.now += 1_000_000;
    let n = s.sent.len();
    s.ev(Event::Tick);
    assert_eq!(s.sent.len(), n);
    // Operator retry restarts the failed step, and it can succeed.
    s.ev(Event::Retry);
    assert_eq!(s.last_cmd().step, Step::BiosConfigured);
    s.ok(StepData::None);
    assert_eq!(s.last_cmd().step, Step::ProgramsRun);
    assert_eq!(s.steps_logged("failed"), vec![Step::BiosConfigured; 2]);
}

#[test]
fn steps_time_out() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let timed_out = s.last_cmd();
    assert_eq!(timed_out.step, Step::BiosConfigured);
    s.now += 9_999;
    s.ev(Event::Tick);
    assert!(s.dev.running.is_some());
    s.now += 1;
    s.ev(Event::Tick);
    let f = s.dev.failed.clone().unwrap();
    assert!(f.reason.contains("timed out"), "{}", f.reason);
    assert_eq!(f.step, timed_out.step);
    // A report for the command that timed out, arriving late, changes
    // nothing.
    let rows = s.rows.len();
    s.ev(Event::Report {
        cmd_id: timed_out.cmd_id,
        outcome: Outcome::Ok {
            detail: "late".into(),
        },
        data: StepData::None,
        ops: vec![],
    });
    assert_eq!(s.rows.len(), rows);
    assert!(s.dev.failed.is_some());
}

#[test]
fn duplicate_and_stale_reports_apply_once() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let c = s.last_cmd();
    let report = Event::Report {
        cmd_id: c.cmd_id,
        outcome: Outcome::Ok { detail: "x".into() },
        data: StepData::None,
        ops: vec![OpRecord {
            op: "bios".into(),
            ok: true,
            exit_code: Some(0),
            duration_ms: 5,
            detail: "out".into(),
        }],
    };
    s.ev(report.clone());
    let rows = s.rows.len();
    let reached = s.dev.reached;
    s.ev(report);
    assert_eq!(s.rows.len(), rows);
    assert_eq!(s.dev.reached, reached);
    assert_eq!(
        s.rows.iter().filter(|r| r.kind == "op").count(),
        1,
        "op rows logged once"
    );
}

#[test]
fn reconnect_resends_the_running_command_with_its_id() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let c = s.last_cmd();
    s.ev(Event::AgentDisconnected);
    s.ev(Event::AgentConnected {
        mode: AgentMode::Agent {
            bundle: "b1".into(),
        },
        issued: None,
    });
    assert_eq!(s.last_cmd(), c);
    // A loader (device rebooted by the BIOS step) gets its bundle again,
    // without a new step.
    s.ok(StepData::None);
    let reached = s.dev.reached;
    s.ev(Event::AgentDisconnected);
    let running = s.dev.running.clone().expect("next step running");
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    let fetch = s.last_cmd();
    assert!(matches!(fetch.work, Work::FetchBundle { .. }));
    assert_eq!(s.dev.reached, reached);
    // Its report is not a step result; the step in progress is untouched
    // and repeated to the bundle's agent when it connects.
    let rows = s.rows.len();
    s.ev(Event::Report {
        cmd_id: fetch.cmd_id,
        outcome: Outcome::Ok {
            detail: "again".into(),
        },
        data: StepData::None,
        ops: vec![],
    });
    assert_eq!(s.rows.len(), rows);
    s.ev(Event::AgentConnected {
        mode: AgentMode::Agent {
            bundle: "b1".into(),
        },
        issued: None,
    });
    assert_eq!(s.last_cmd().cmd_id, running.cmd_id);
}

#[test]
fn wrong_image_hash_is_never_verified() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    s.ok(StepData::None);
    s.ev(Event::WaveAssigned(s.join()));
    s.ok(StepData::ImageWritten {
        hash: "not-it".into(),
        bytes: 10,
    });
    assert_eq!(s.dev.reached, Step::ReadyForImage);
    let f = s.dev.failed.clone().unwrap();
    assert_eq!(f.step, Step::Imaging);
    assert!(f.reason.contains("manifest"));
    assert!(!s.steps_logged("ok").contains(&Step::ImageVerified));
    // Retry re-queues the device for a wave.
    s.now += 10_000;
    s.ev(Event::Tick);
    assert!(s.dev.queued_for_image);
}

#[test]
fn wave_lost_fails_imaging_and_requeues_later() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    s.ok(StepData::None);
    s.ev(Event::WaveAssigned(s.join()));
    // A verdict from an older wave does not touch the current one.
    s.ev(Event::WaveLost {
        wave: Some(3),
        why: "old wave".into(),
    });
    assert!(s.dev.running.is_some());
    s.ev(Event::WaveLost {
        wave: Some(7),
        why: "member timed out".into(),
    });
    assert_eq!(s.dev.failed.as_ref().unwrap().step, Step::Imaging);
    assert_eq!(s.dev.wave, None);
}

#[test]
fn device_with_an_os_enters_at_the_loader_step() {
    let mut s = Sim::new();
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: true },
        issued: None,
    });
    assert!(s.dev.via_os);
    assert_eq!(s.dev.reached, Step::LoaderBooted);
    assert!(s.rows.iter().any(|r| r.detail.contains("installed OS")));
}

#[test]
fn bundle_failure_is_a_step_failure_and_retries_the_build() {
    let mut s = Sim::new();
    s.ev(Event::AgentConnected {
        mode: AgentMode::Loader { os_present: false },
        issued: None,
    });
    s.ok(StepData::Inventory(Box::default()));
    s.ev(Event::BundleFailed("no profile".into()));
    assert_eq!(s.dev.failed.as_ref().unwrap().step, Step::AgentDelivered);
    s.other.clear();
    s.now += 2_000;
    s.ev(Event::Tick);
    assert!(s.other.contains(&Action::BuildBundle));
    s.ev(Event::BundleBuilt {
        hash: "b1".into(),
        plan: Box::new(plan(false)),
    });
    assert_eq!(s.dev.running.as_ref().unwrap().attempt, 2);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Loader,
        Agent,
        Disconnect,
        ReportCurrent(bool),
        ReportStale,
        Bundle,
        BundleFail,
        Wave,
        WaveLost,
        Tick(u16),
        Retry,
        Reinstall,
        Approve,
        Hold,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Loader),
            Just(Op::Agent),
            Just(Op::Disconnect),
            any::<bool>().prop_map(Op::ReportCurrent),
            Just(Op::ReportStale),
            Just(Op::Bundle),
            Just(Op::BundleFail),
            Just(Op::Wave),
            Just(Op::WaveLost),
            (0u16..20_000).prop_map(Op::Tick),
            Just(Op::Retry),
            Just(Op::Reinstall),
            Just(Op::Approve),
            Just(Op::Hold),
        ]
    }

    proptest! {
        /// Whatever arrives in whatever order: no panic, every log row
        /// starts where the previous one ended (the log can be replayed),
        /// a device is never failed and running at once, and only a
        /// report of the command in progress completes a step.
        #[test]
        fn log_rows_always_chain(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = Sim::new();
            for o in ops {
                let before = s.dev.clone();
                match o {
                    Op::Loader => { s.ev(Event::AgentConnected { mode: AgentMode::Loader { os_present: false }, issued: None }); }
                    Op::Agent => { s.ev(Event::AgentConnected { mode: AgentMode::Agent { bundle: "b1".into() }, issued: None }); }
                    Op::Disconnect => { s.ev(Event::AgentDisconnected); }
                    Op::ReportCurrent(ok) => {
                        if let Some(r) = s.dev.running.clone() {
                            let data = match r.step {
                                Step::Inventoried => StepData::Inventory(Box::default()),
                                Step::Imaging => StepData::ImageWritten { hash: IMG_HASH.into(), bytes: 10 },
                                _ => StepData::None,
                            };
                            let outcome = if ok { Outcome::Ok { detail: "ok".into() } } else { Outcome::Failed { reason: "no".into() } };
                            s.ev(Event::Report { cmd_id: r.cmd_id, outcome, data, ops: vec![] });
                        }
                    }
                    Op::ReportStale => {
                        let rows = s.rows.len();
                        let stale = s.dev.next_cmd + 7;
                        s.ev(Event::Report { cmd_id: stale, outcome: Outcome::Ok { detail: "x".into() }, data: StepData::None, ops: vec![] });
                        prop_assert_eq!(s.rows.len(), rows);
                        prop_assert_eq!(&s.dev.reached, &before.reached);
                    }
                    Op::Bundle => { s.ev(Event::BundleBuilt { hash: "b1".into(), plan: Box::new(plan(true)) }); }
                    Op::BundleFail => { s.ev(Event::BundleFailed("x".into())); }
                    Op::Wave => { let j = s.join(); s.ev(Event::WaveAssigned(j)); }
                    Op::WaveLost => { s.ev(Event::WaveLost { wave: None, why: "x".into() }); }
                    Op::Tick(ms) => { s.now += i64::from(ms); s.ev(Event::Tick); }
                    Op::Retry => { s.ev(Event::Retry); }
                    Op::Reinstall => { s.ev(Event::Reinstall); }
                    Op::Approve => { s.ev(Event::Approve); }
                    Op::Hold => { s.ev(Event::Hold("held".into())); }
                }
                prop_assert!(!(s.dev.running.is_some() && s.dev.failed.is_some()), "{:?}", s.dev);
            }
            for w in s.rows.windows(2) {
                prop_assert_eq!(&w[0].to_state, &w[1].from_state, "{:?} then {:?}", w[0], w[1]);
            }
        }
    }
}

#[test]
fn imaging_retries_are_counted_and_end() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    s.ok(StepData::None); // ready_for_image
    for attempt in 1..=2 {
        assert!(s.dev.queued_for_image, "attempt {attempt} queued");
        s.ev(Event::WaveAssigned(s.join()));
        assert_eq!(s.dev.running.as_ref().unwrap().attempt, attempt);
        s.fail("disk write error");
        s.now += 100_000;
        s.ev(Event::Tick);
    }
    let f = s.dev.failed.clone().expect("gave up");
    assert_eq!((f.step, f.attempts, f.retry_at), (Step::Imaging, 2, None));
}

#[test]
fn a_tick_that_changes_nothing_leaves_the_record_alone() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    let before = s.dev.clone();
    s.now += 10;
    let acts = s.ev(Event::Tick);
    assert!(acts.is_empty());
    assert_eq!(s.dev, before, "no change, no store write");
}

#[test]
fn a_wave_that_cannot_start_fails_its_queued_devices() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(false));
    s.ok(StepData::None);
    assert!(s.dev.queued_for_image);
    s.ev(Event::WaveLost {
        wave: None,
        why: "image img is not served".into(),
    });
    assert!(!s.dev.queued_for_image);
    let f = s.dev.failed.clone().unwrap();
    assert_eq!(f.step, Step::Imaging);
    assert!(f.reason.contains("not served"));
    assert!(s.other.contains(&Action::LeaveWave));
}

#[test]
fn automatic_retries_wait_for_the_device_to_be_back() {
    let mut s = Sim::new();
    s.reach_agent_delivered(plan(true));
    s.fail("BMC unreachable");
    s.ev(Event::AgentDisconnected);
    s.now += 1_000_000;
    let n = s.sent.len();
    s.ev(Event::Tick);
    assert_eq!(s.sent.len(), n, "no retry while the device is away");
    assert_eq!(s.dev.failed.as_ref().unwrap().attempts, 1);
    s.ev(Event::AgentConnected {
        mode: AgentMode::Agent {
            bundle: "b1".into(),
        },
        issued: None,
    });
    assert_eq!(s.last_cmd().step, Step::BiosConfigured);
    assert_eq!(s.dev.running.as_ref().unwrap().attempt, 2);
}

#[test]
fn a_bmc_call_is_one_row_and_a_record_made_for_it_still_gets_its_first_boot() {
    // The record was made for the power-on (created at `now` = 0).
    let mut s = Sim::new();
    let acts = s.ev(Event::Bmc {
        ok: true,
        detail: "power on via ipmi://198.18.0.11: read back on".into(),
        duration_ms: 250,
    });
    assert_eq!(acts.len(), 1, "a row and nothing else: {acts:?}");
    assert_eq!(s.rows[0].kind, "bmc");
    assert_eq!(s.rows[0].duration_ms, Some(250));
    assert_eq!(s.dev.reached, Step::Discovered);
    assert!(s.sent.is_empty());
    // Its first network boot is the discovered step's `ok`, as for a
    // machine powered on by hand.
    s.now = 5_000;
    s.ev(Event::BootSeen("PXE".into()));
    let boot = s.rows.last().unwrap();
    assert_eq!((boot.step, boot.kind.as_str()), (Step::Discovered, "ok"));
    // A later boot is not a second `ok`.
    s.now = 9_000;
    s.ev(Event::BootSeen("PXE".into()));
    assert_eq!(s.rows.last().unwrap().kind, "info");
    // A failed call on a device with a history is a `bmc_failed` row.
    s.ev(Event::Bmc {
        ok: false,
        detail: "BMC unreachable".into(),
        duration_ms: 5_000,
    });
    assert_eq!(s.rows.last().unwrap().kind, "bmc_failed");
    assert!(!s.dev.powered_before_boot);
}
