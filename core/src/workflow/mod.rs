//! The per-device workflow: which step a device is on, what the appliance
//! asks its agent to do next, timeouts, failures and retries.
//!
//! Owns: the step order of DESIGN.md, the rules for skipped steps, command
//! ids (so a result that arrives twice, or late, is applied once), the
//! event-log rows each transition produces. Must not: touch sockets, the
//! store, clocks or threads. The controller calls [`on_event`] with the
//! device's record, an [`Event`] and `now` (unix milliseconds, so records
//! survive a restart), commits the changed record together with the
//! returned [`Action::Record`] rows in one store transaction, then carries
//! out the other actions.

use serde::{Deserialize, Serialize};

use crate::model::{
    AgentMode, Command, Inventory, OpRecord, Outcome, Plan, Step, StepData, WaveJoin, Work,
};

/// Unix time in milliseconds.
pub type Millis = i64;

/// The step in progress and the command that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The step.
    pub step: Step,
    /// The command sent for it: only a report with this id counts.
    pub cmd_id: u64,
    /// When it started (for its timeout and duration).
    pub started: Millis,
    /// Which attempt (1-based).
    pub attempt: u32,
    /// What the agent was asked to do.
    pub work: Work,
}

/// A failed step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step.
    pub step: Step,
    /// Why, for the log and the operator.
    pub reason: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Automatic retry due at (None: waits for an operator `retry`).
    pub retry_at: Option<Millis>,
}

/// The durable record of one device's installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// `rc-<mac hex>`.
    pub id: String,
    /// Boot interface MAC.
    pub mac: String,
    /// Last completed (or skipped) step.
    pub reached: Step,
    /// The step in progress.
    pub running: Option<Running>,
    /// The step that failed, while it waits for a retry.
    pub failed: Option<Failure>,
    /// Waiting for a wave (after the barrier).
    pub queued_for_image: bool,
    /// The image its plan names.
    pub image: Option<String>,
    /// Its bundle's address.
    pub bundle: Option<String>,
    /// Its plan.
    pub plan: Option<Plan>,
    /// The wave it is in (or was last in).
    pub wave: Option<i64>,
    /// The id of the next command.
    pub next_cmd: u64,
    /// Came in through an installed OS (claim 17) rather than a boot.
    pub via_os: bool,
    /// An agent of the device is connected now (not stored: after a
    /// restart every agent reconnects). Automatic retries wait for it: a
    /// powered-off device must not use up its attempts on waves it cannot
    /// join.
    #[serde(skip)]
    pub connected: bool,
    /// Attempt number of a step that waits for the appliance before it
    /// runs (bundle generation, a wave), so retries stay counted.
    #[serde(default)]
    pub deferred_attempt: u32,
    /// BLAKE3 of the credential of the device's current boot: every
    /// connection of this boot presents it (never stored in clear).
    #[serde(default)]
    pub credential: Option<[u8; 32]>,
    /// The device's boot number: counts the credentials issued; bundle
    /// signatures are bound to it.
    #[serde(default)]
    pub boot: u64,
    /// A new boot may claim the device (be issued a credential): true for
    /// a new device, after its agent announced a possible reboot, when it
    /// failed with its agent gone, and after an operator's retry,
    /// reinstall or approval; false once a credential was issued.
    #[serde(default = "yes")]
    pub claim_open: bool,
    /// May go past its inventory: known to the rack inventory, enrolled
    /// automatically, or approved by an operator (`rackcast approve`).
    /// An unapproved device stops after `inventoried`.
    #[serde(default = "yes")]
    pub approved: bool,
    /// Being installed again on an operator's reinstall: its disk may
    /// hold the previous OS, which the plan may overwrite (wipe).
    #[serde(default)]
    pub reinstall: bool,
    /// The appliance powered it on through its BMC before it ever
    /// network-booted: its record exists for the power rows, and its
    /// first boot is still the `discovered` step's `ok`.
    #[serde(default)]
    pub powered_before_boot: bool,
    /// When the record was made.
    pub created: Millis,
    /// When it last changed.
    pub updated: Millis,
}

fn yes() -> bool {
    true
}

/// What the appliance answers an agent's `Hello`, before anything else
/// happens ([`admission`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It presented the current boot's credential.
    Resume {
        /// The boot it belongs to.
        boot: u64,
    },
    /// The first contact of a new boot: it gets a new credential (apply
    /// [`Event::AgentConnected`] with its hash).
    Issue {
        /// The new boot's number.
        boot: u64,
    },
    /// Refused; the connection is closed and the refusal logged on the
    /// device.
    Refused(Refusal),
}

/// Why a claim of a device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A credential that is not the device's current one.
    WrongCredential,
    /// No credential, and the current boot already has one: another host
    /// claims this MAC (or the machine restarted when nothing said it
    /// would; an operator's retry re-arms it).
    AlreadyClaimed,
    /// A loader on an installed device: only an operator's reinstall
    /// starts it over.
    Installed,
}

impl Refusal {
    /// Counter label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::WrongCredential => "wrong_credential",
            Refusal::AlreadyClaimed => "already_claimed",
            Refusal::Installed => "installed",
        }
    }

    /// For the device's log and the refused agent.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::WrongCredential => {
                "another host claims this MAC: its credential is not this boot's"
            }
            Refusal::AlreadyClaimed => {
                "another host claims this MAC: this boot's credential was already issued \
                 (an operator's `rackcast retry` re-arms a device that restarted unexpectedly)"
            }
            Refusal::Installed => {
                "a loader on an installed device: only an operator's reinstall starts it over"
            }
        }
    }
}

/// Decide on an agent's `Hello` for `dev`: `presented` is the BLAKE3 of
/// the credential it presented. Pure: the caller applies
/// [`Event::AgentConnected`] (admitted) or [`Event::ClaimRefused`].
pub fn admission(dev: &Device, mode: &AgentMode, presented: Option<&[u8; 32]>) -> Admission {
    match presented {
        Some(h) => {
            if dev.credential.as_ref() == Some(h) {
                Admission::Resume { boot: dev.boot }
            } else {
                Admission::Refused(Refusal::WrongCredential)
            }
        }
        None if matches!(mode, AgentMode::Loader { .. }) && dev.reached == Step::Done => {
            Admission::Refused(Refusal::Installed)
        }
        None if !dev.claim_open => Admission::Refused(Refusal::AlreadyClaimed),
        None => Admission::Issue { boot: dev.boot + 1 },
    }
}

impl Device {
    /// A device just seen, at `Discovered`.
    pub fn new(id: &str, mac: &str, now: Millis) -> Device {
        Device {
            id: id.to_string(),
            mac: mac.to_string(),
            reached: Step::Discovered,
            running: None,
            failed: None,
            queued_for_image: false,
            image: None,
            bundle: None,
            plan: None,
            wave: None,
            next_cmd: 1,
            via_os: false,
            deferred_attempt: 0,
            connected: false,
            credential: None,
            boot: 0,
            claim_open: true,
            approved: true,
            reinstall: false,
            powered_before_boot: false,
            created: now,
            updated: now,
        }
    }

    /// Short state name for tables and metrics.
    pub fn state(&self) -> &'static str {
        if self.failed.is_some() {
            "failed"
        } else if !self.approved && self.running.is_none() && self.reached >= Step::Inventoried {
            "awaiting_approval"
        } else if self.reached == Step::Done {
            "done"
        } else if self.running.is_some() {
            "running"
        } else if self.queued_for_image {
            "waiting_for_wave"
        } else {
            "idle"
        }
    }

    /// The step the device is on (in progress, failed, or next).
    pub fn current_step(&self) -> Step {
        if let Some(r) = &self.running {
            r.step
        } else if let Some(f) = &self.failed {
            f.step
        } else {
            self.reached
        }
    }
}

/// Per-step limits.
#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    /// Timeout of any step but imaging.
    pub step_timeout_ms: Millis,
    /// Timeout of the imaging step (a wave may wait for its start).
    pub imaging_timeout_ms: Millis,
    /// Attempts per step before waiting for an operator.
    pub max_attempts: u32,
    /// Delay before an automatic retry (doubles per attempt).
    pub retry_backoff_ms: Millis,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        WorkflowConfig {
            step_timeout_ms: 10 * 60_000,
            imaging_timeout_ms: 60 * 60_000,
            max_attempts: 3,
            retry_backoff_ms: 5_000,
        }
    }
}

/// What happens to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The device asked to boot (DHCP/PXE): the power-on trigger. The
    /// text says how (firmware kind, iPXE).
    BootSeen(String),
    /// The boot service served the device a file (kernel, initrd).
    BootFileServed(String),
    /// Operations of the running command, ahead of its report.
    Progress {
        /// The running command.
        cmd_id: u64,
        /// Its operations so far.
        ops: Vec<OpRecord>,
    },
    /// An agent of the device connected (loader or bundle agent) and was
    /// admitted ([`admission`]); `issued`: the hash of the new credential
    /// it was given (a new boot).
    AgentConnected {
        /// Loader or bundle agent.
        mode: AgentMode,
        /// A new boot's credential hash.
        issued: Option<[u8; 32]>,
    },
    /// A claim of the device was refused ([`admission`]): logged against
    /// the device, nothing else changes.
    ClaimRefused {
        /// Why.
        refusal: Refusal,
        /// Who (the peer address).
        peer: String,
    },
    /// Its connection closed.
    AgentDisconnected,
    /// The agent's result for command `cmd_id`.
    Report {
        /// The command it answers.
        cmd_id: u64,
        /// Done or failed.
        outcome: Outcome,
        /// What the step hands back.
        data: StepData,
        /// Operations performed.
        ops: Vec<OpRecord>,
    },
    /// The controller generated the device's bundle.
    BundleBuilt {
        /// Its address.
        hash: String,
        /// Its plan.
        plan: Box<Plan>,
    },
    /// The bundle could not be generated; the text says why.
    BundleFailed(String),
    /// The wave scheduler put the device into a wave.
    WaveAssigned(WaveJoin),
    /// The device's wave (`Some`: only if it is still that one; `None`:
    /// whatever it waits for or runs in) ended or failed to start without
    /// the device verified.
    WaveLost {
        /// The wave, or any.
        wave: Option<i64>,
        /// What happened.
        why: String,
    },
    /// Time passed: timeouts and due retries.
    Tick,
    /// Operator: retry the failed step now.
    Retry,
    /// Operator: install this finished device again; its next network
    /// boot gets the loader instead of its disk.
    Reinstall,
    /// Operator: this device may be installed (`rackcast approve`).
    Approve,
    /// Stop this device after its inventory until an operator approves
    /// it; the text says why (a serial the rack inventory does not list).
    Hold(String),
    /// A call to the device's BMC (power, boot device) ended: one row
    /// saying what was asked, what the BMC answered and what was read
    /// back. Nothing else changes: the workflow follows the boots the
    /// call causes, not the call.
    Bmc {
        /// Whether the BMC did it (and it read back).
        ok: bool,
        /// Asked, answered, read back.
        detail: String,
        /// How long the call took (the row is written when it ended).
        duration_ms: u64,
    },
}

/// One event-log row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    /// When.
    pub at: Millis,
    /// The step it is about.
    pub step: Step,
    /// `started`, `ok`, `skipped`, `failed`, `op`, `info`, ...
    pub kind: String,
    /// The device's state before (`Device::state`).
    pub from_state: String,
    /// Its state after.
    pub to_state: String,
    /// How long the step or operation took.
    pub duration_ms: Option<u64>,
    /// What happened.
    pub detail: String,
}

/// What the controller must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Append to the device's event log (same transaction as the record).
    Record(LogRow),
    /// Send to the agent if it is connected.
    Send(Command),
    /// Store the hardware report (same transaction).
    StoreInventory(Box<Inventory>),
    /// Generate the device's bundle; answer with `BundleBuilt`/`BundleFailed`.
    BuildBundle,
    /// Put the device in the queue of its image's wave.
    RequestWave {
        /// The image.
        image: String,
    },
    /// Take the device out of any wave queue or wave.
    LeaveWave,
    /// A step finished: for the step-duration histogram.
    StepFinished {
        /// The step.
        step: Step,
        /// Succeeded or failed.
        ok: bool,
        /// How long it ran.
        duration_ms: u64,
    },
}

/// Apply `ev` to `dev` at `now`. The caller commits `dev` and the
/// `Record` actions atomically, then performs the rest.
pub fn on_event(dev: &mut Device, cfg: &WorkflowConfig, now: Millis, ev: Event) -> Vec<Action> {
    let before = dev.clone();
    let mut fx = Fx {
        dev,
        cfg,
        now,
        out: Vec::new(),
    };
    fx.handle(ev);
    // Only a real change is an update (ticks that change nothing must not
    // cost a store write per device).
    if *fx.dev != before {
        fx.dev.updated = now;
    }
    fx.out
}

struct Fx<'a> {
    dev: &'a mut Device,
    cfg: &'a WorkflowConfig,
    now: Millis,
    out: Vec<Action>,
}

impl Fx<'_> {
    fn state_label(&self) -> String {
        format!("{}:{}", self.dev.state(), self.dev.current_step())
    }

    fn log(&mut self, step: Step, kind: &str, duration_ms: Option<u64>, detail: String) {
        self.log_transition(step, kind, self.state_label(), duration_ms, detail);
    }

    fn log_transition(
        &mut self,
        step: Step,
        kind: &str,
        from: String,
        duration_ms: Option<u64>,
        detail: String,
    ) {
        let to = self.state_label();
        self.out.push(Action::Record(LogRow {
            at: self.now,
            step,
            kind: kind.to_string(),
            from_state: from,
            to_state: to,
            duration_ms,
            detail,
        }));
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::BootSeen(how) => self.on_boot(how),
            Event::Bmc {
                ok,
                detail,
                duration_ms,
            } => {
                if self.dev.reached == Step::Discovered && self.dev.created == self.now {
                    self.dev.powered_before_boot = true;
                }
                let step = self.dev.current_step();
                self.log(
                    step,
                    if ok { "bmc" } else { "bmc_failed" },
                    Some(duration_ms),
                    detail,
                );
            }
            Event::Progress { cmd_id, ops } => {
                if let Some(run) = self.dev.running.clone() {
                    if run.cmd_id == cmd_id {
                        self.log_ops(run.step, &ops);
                        // Sent before something that may restart the
                        // machine: its next boot may claim the device.
                        self.dev.claim_open = true;
                    }
                }
            }
            Event::ClaimRefused { refusal, peer } => {
                let step = self.dev.current_step();
                self.log(
                    step,
                    "refused",
                    None,
                    format!("{} (from {peer})", refusal.reason()),
                );
            }
            Event::BootFileServed(what) => {
                let step = self.dev.current_step();
                self.log(step, "info", None, what);
            }
            Event::AgentConnected { mode, issued } => {
                if let Some(h) = issued {
                    self.dev.credential = Some(h);
                    self.dev.boot += 1;
                    self.dev.claim_open = false;
                    let step = self.dev.current_step();
                    let boot = self.dev.boot;
                    self.log(
                        step,
                        "info",
                        None,
                        format!("boot {boot}: credential issued"),
                    );
                }
                self.dev.connected = true;
                self.on_connected(mode);
                // A retry that came due while the device was away.
                self.on_tick();
            }
            Event::AgentDisconnected => {
                // Running steps keep running on the device; their timeout
                // covers a device that never comes back.
                self.dev.connected = false;
                if self.dev.failed.is_some() {
                    self.dev.claim_open = true;
                }
            }
            Event::Report {
                cmd_id,
                outcome,
                data,
                ops,
            } => self.on_report(cmd_id, outcome, data, ops),
            Event::BundleBuilt { hash, plan } => self.on_bundle(hash, *plan),
            Event::BundleFailed(why) => {
                if self.dev.reached == Step::Inventoried
                    && self.dev.running.is_none()
                    && self.dev.failed.is_none()
                {
                    let from = self.state_label();
                    let attempts = self.dev.deferred_attempt.max(1);
                    self.fail_with(
                        from,
                        Step::AgentDelivered,
                        format!("bundle generation: {why}"),
                        attempts,
                        None,
                    );
                }
            }
            Event::WaveAssigned(join) => self.on_wave(join),
            Event::WaveLost { wave, why } => {
                let same = wave.is_none() || wave == self.dev.wave;
                let imaging = self
                    .dev
                    .running
                    .as_ref()
                    .is_some_and(|r| r.step == Step::Imaging);
                if imaging && same {
                    self.dev.wave = None;
                    self.out.push(Action::LeaveWave);
                    self.fail_running(format!("wave lost: {why}"));
                } else if self.dev.queued_for_image && wave.is_none() {
                    let from = self.state_label();
                    self.dev.queued_for_image = false;
                    self.out.push(Action::LeaveWave);
                    let attempts = self.dev.deferred_attempt.max(1);
                    self.fail_with(
                        from,
                        Step::Imaging,
                        format!("wave lost: {why}"),
                        attempts,
                        None,
                    );
                }
            }
            Event::Tick => self.on_tick(),
            Event::Retry => {
                if let Some(f) = self.dev.failed.clone() {
                    // The operator vouches for the machine's next boot.
                    self.dev.claim_open = true;
                    let why = format!("operator retry after: {}", f.reason);
                    self.retry(f, why);
                } else if self.dev.reached != Step::Done && !self.dev.claim_open {
                    self.dev.claim_open = true;
                    let step = self.dev.current_step();
                    self.log(
                        step,
                        "info",
                        None,
                        "operator re-armed the device: its next boot may claim it".into(),
                    );
                }
            }
            Event::Approve => {
                if !self.dev.approved {
                    let from = self.state_label();
                    self.dev.approved = true;
                    let step = self.dev.current_step();
                    self.log_transition(
                        step,
                        "info",
                        from,
                        None,
                        "approved by the operator".into(),
                    );
                    if self.dev.reached == Step::Inventoried
                        && self.dev.running.is_none()
                        && self.dev.failed.is_none()
                    {
                        self.advance();
                    }
                }
            }
            Event::Hold(why) => {
                if self.dev.approved && self.dev.bundle.is_none() {
                    let from = self.state_label();
                    self.dev.approved = false;
                    let step = self.dev.current_step();
                    self.log_transition(
                        step,
                        "info",
                        from,
                        None,
                        format!("held for approval: {why}"),
                    );
                }
            }
            Event::Reinstall => {
                if self.dev.reached == Step::Done {
                    self.start_over(
                        "reinstall requested by the operator: the next network boot loads the loader",
                    );
                }
            }
        }
    }

    /// A finished device begins again from `discovered` (same id, its
    /// command ids keep counting so old results cannot match).
    fn start_over(&mut self, why: &str) {
        let from = self.state_label();
        *self.dev = Device {
            created: self.dev.created,
            next_cmd: self.dev.next_cmd,
            connected: self.dev.connected,
            boot: self.dev.boot,
            approved: self.dev.approved,
            reinstall: true,
            ..Device::new(&self.dev.id, &self.dev.mac, self.now)
        };
        self.log_transition(Step::Discovered, "info", from, None, why.into());
    }

    fn on_boot(&mut self, how: String) {
        if self.dev.reached == Step::Discovered && self.dev.running.is_none() {
            let first = self.dev.created == self.now || self.dev.powered_before_boot;
            self.dev.powered_before_boot = false;
            self.log(
                Step::Discovered,
                if first { "ok" } else { "info" },
                None,
                format!("power-on: {how}"),
            );
        } else {
            let step = self.dev.current_step();
            self.log(step, "info", None, format!("network boot: {how}"));
        }
    }

    fn on_connected(&mut self, mode: AgentMode) {
        match mode {
            AgentMode::Loader { os_present } => {
                if self.dev.reached == Step::Done {
                    // Admission refuses a loader on an installed device;
                    // one that held the credential of its last boot is
                    // still no reason to wipe it. Only an operator's
                    // reinstall starts it over.
                    return;
                }
                if self.dev.reached < Step::LoaderBooted {
                    let from = self.state_label();
                    self.dev.via_os = os_present;
                    self.dev.reached = Step::LoaderBooted;
                    let how = if os_present {
                        "loader started from the installed OS"
                    } else {
                        "loader network-booted"
                    };
                    self.log_transition(Step::LoaderBooted, "ok", from, None, how.into());
                    self.advance();
                    return;
                }
                // A loader while the device is past the bundle: it rebooted
                // (a BIOS reset does that). Hand it its bundle again; the
                // workflow continues where it stands.
                if self.dev.reached >= Step::AgentDelivered {
                    if let Some(hash) = self.dev.bundle.clone() {
                        let cmd = Command {
                            cmd_id: self.take_cmd(),
                            step: Step::AgentDelivered,
                            work: Work::FetchBundle { hash },
                        };
                        self.log(
                            Step::AgentDelivered,
                            "info",
                            None,
                            "loader rebooted: bundle delivered again".into(),
                        );
                        self.out.push(Action::Send(cmd));
                        return;
                    }
                }
                self.resend_or_advance();
            }
            AgentMode::Agent { bundle } => {
                if self.dev.bundle.as_deref() != Some(bundle.as_str())
                    && self.dev.reached >= Step::AgentDelivered
                {
                    let cmd = Command {
                        cmd_id: self.take_cmd(),
                        step: Step::AgentDelivered,
                        work: Work::FetchBundle {
                            hash: self.dev.bundle.clone().unwrap_or_default(),
                        },
                    };
                    self.log(
                        Step::AgentDelivered,
                        "info",
                        None,
                        format!("agent runs bundle {bundle}, not the device's: delivered again"),
                    );
                    self.out.push(Action::Send(cmd));
                    return;
                }
                self.resend_or_advance();
            }
        }
    }

    /// On (re)connection: repeat the command in progress (same id, so a
    /// result the agent already has is applied once), or go on.
    fn resend_or_advance(&mut self) {
        if let Some(r) = &self.dev.running {
            self.out.push(Action::Send(Command {
                cmd_id: r.cmd_id,
                step: r.step,
                work: r.work.clone(),
            }));
        } else if self.dev.failed.is_none() && !self.dev.queued_for_image {
            self.advance();
        }
    }

    fn take_cmd(&mut self) -> u64 {
        let id = self.dev.next_cmd;
        self.dev.next_cmd += 1;
        id
    }

    /// Start whatever comes after `reached`, skipping steps the plan does
    /// not need (recorded as skipped).
    fn advance(&mut self) {
        while let Some(step) = self.dev.reached.next() {
            if let Some(why) = self.skip_reason(step) {
                let from = self.state_label();
                self.dev.reached = step;
                self.log_transition(step, "skipped", from, None, why);
                continue;
            }
            if step == Step::AgentDelivered && !self.dev.approved {
                // Commissioned, not deployed: nothing of a plan (no
                // bundle, no BMC credentials, no image) before an operator
                // approves the machine.
                let from = self.state_label();
                let id = self.dev.id.clone();
                self.log_transition(
                    Step::Inventoried,
                    "held",
                    from,
                    None,
                    format!("awaiting approval: `rackcast approve {id}` installs it"),
                );
                return;
            }
            if step == Step::Done {
                let from = self.state_label();
                self.dev.reached = Step::Done;
                self.dev.reinstall = false;
                self.log_transition(step, "ok", from, None, "installation complete".into());
                return;
            }
            self.start_step(step, 1);
            return;
        }
    }

    fn skip_reason(&self, step: Step) -> Option<String> {
        let plan = self.dev.plan.as_ref()?;
        match step {
            Step::BiosConfigured if plan.bios.is_none() => {
                Some("profile sets no BIOS parameters".into())
            }
            Step::RaidConfigured if plan.raid.is_none() => Some("profile declares no RAID".into()),
            Step::ProgramsRun if plan.programs.is_empty() => {
                Some("profile has no configuration programs".into())
            }
            Step::PostInstall if plan.post_install.is_empty() => {
                Some("profile has no post-install programs".into())
            }
            Step::IdentityWritten if plan.seed.is_none() => {
                Some("profile has no identity templates".into())
            }
            Step::BootToDisk if plan.boot_to_disk.is_none() => {
                Some("profile has no boot-to-disk program".into())
            }
            _ => None,
        }
    }

    fn start_step(&mut self, step: Step, attempt: u32) {
        let work = match step {
            Step::Discovered | Step::LoaderBooted => {
                // Only the loader itself can do these: wait for it.
                return;
            }
            Step::Inventoried => Work::Inventory,
            Step::AgentDelivered => match self.dev.bundle.clone() {
                Some(hash) if self.dev.plan.is_some() => Work::FetchBundle { hash },
                _ => {
                    // The bundle is built first; BundleBuilt resumes here.
                    self.dev.deferred_attempt = attempt;
                    self.out.push(Action::BuildBundle);
                    return;
                }
            },
            Step::BiosConfigured
            | Step::RaidConfigured
            | Step::ProgramsRun
            | Step::PostInstall
            | Step::IdentityWritten
            | Step::BootToDisk => Work::RunPlan,
            Step::ReadyForImage => Work::RequestImage,
            Step::Imaging => {
                // Joins happen when the scheduler assigns a wave.
                if let Some(image) = self.dev.image.clone() {
                    let from = self.state_label();
                    self.dev.queued_for_image = true;
                    self.dev.deferred_attempt = attempt;
                    self.log_transition(
                        Step::Imaging,
                        "queued",
                        from,
                        None,
                        format!("waiting for a wave of image {image}"),
                    );
                    self.out.push(Action::RequestWave { image });
                }
                return;
            }
            Step::ImageVerified | Step::Done => {
                // Decided here, not on the device.
                return;
            }
        };
        let cmd_id = self.take_cmd();
        let from = self.state_label();
        self.dev.running = Some(Running {
            step,
            cmd_id,
            started: self.now,
            attempt,
            work: work.clone(),
        });
        self.log_transition(
            step,
            "started",
            from,
            None,
            if attempt > 1 {
                format!("attempt {attempt}")
            } else {
                String::new()
            },
        );
        self.out.push(Action::Send(Command { cmd_id, step, work }));
    }

    fn on_bundle(&mut self, hash: String, plan: Plan) {
        if self.dev.reached != Step::Inventoried || self.dev.running.is_some() {
            return;
        }
        if !self.dev.approved {
            return; // held meanwhile: approval builds it again
        }
        if self.dev.failed.is_some() {
            return; // a retry builds it again
        }
        let from = self.state_label();
        let attempt = self.dev.deferred_attempt.max(1);
        self.dev.image = Some(plan.image.name.clone());
        self.dev.bundle = Some(hash.clone());
        self.dev.plan = Some(plan);
        self.log_transition(
            Step::AgentDelivered,
            "info",
            from,
            None,
            format!("bundle {hash} generated for this hardware"),
        );
        self.start_step(Step::AgentDelivered, attempt);
    }

    fn on_wave(&mut self, join: WaveJoin) {
        if !self.dev.queued_for_image || self.dev.running.is_some() {
            return;
        }
        let from = self.state_label();
        self.dev.queued_for_image = false;
        self.dev.wave = Some(join.wave_id);
        let attempt = self.dev.deferred_attempt.max(1);
        let cmd_id = self.take_cmd();
        let work = Work::JoinWave(join.clone());
        self.dev.running = Some(Running {
            step: Step::Imaging,
            cmd_id,
            started: self.now,
            attempt,
            work: work.clone(),
        });
        self.log_transition(
            Step::Imaging,
            "started",
            from,
            None,
            format!("wave {} (image {})", join.wave_id, join.image),
        );
        self.out.push(Action::Send(Command {
            cmd_id,
            step: Step::Imaging,
            work,
        }));
    }

    /// One event-log row per operation the agent ran.
    fn log_ops(&mut self, step: Step, ops: &[OpRecord]) {
        for op in ops {
            self.log(
                step,
                "op",
                Some(op.duration_ms),
                format!(
                    "{} {}{}{}",
                    op.op,
                    if op.ok { "ok" } else { "FAILED" },
                    op.exit_code
                        .map(|c| format!(" (exit {c})"))
                        .unwrap_or_default(),
                    if op.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", op.detail)
                    }
                ),
            );
        }
    }

    fn on_report(&mut self, cmd_id: u64, outcome: Outcome, data: StepData, ops: Vec<OpRecord>) {
        let Some(run) = self.dev.running.clone() else {
            return; // late or duplicate: already applied
        };
        if run.cmd_id != cmd_id {
            return;
        }
        // The agent that announced a possible restart is still there and
        // answering: nothing restarted, so no new boot may claim it.
        self.dev.claim_open = false;
        self.log_ops(run.step, &ops);
        let took = u64::try_from(self.now - run.started).unwrap_or(0);
        match outcome {
            Outcome::Failed { reason } => {
                self.out.push(Action::StepFinished {
                    step: run.step,
                    ok: false,
                    duration_ms: took,
                });
                if run.step == Step::Imaging {
                    self.out.push(Action::LeaveWave);
                    self.dev.wave = None;
                }
                self.fail_running(reason);
            }
            Outcome::Ok { detail } => {
                if let Err(why) = self.check_data(run.step, &data) {
                    self.out.push(Action::StepFinished {
                        step: run.step,
                        ok: false,
                        duration_ms: took,
                    });
                    self.fail_running(why);
                    return;
                }
                let hash = match data {
                    StepData::Inventory(inv) => {
                        self.out.push(Action::StoreInventory(inv));
                        String::new()
                    }
                    StepData::ImageWritten { hash, .. } => hash,
                    StepData::None => String::new(),
                };
                let from = self.state_label();
                self.dev.running = None;
                self.dev.reached = run.step;
                self.out.push(Action::StepFinished {
                    step: run.step,
                    ok: true,
                    duration_ms: took,
                });
                self.log_transition(run.step, "ok", from, Some(took), detail);
                if run.step == Step::Imaging {
                    self.out.push(Action::LeaveWave);
                    let from = self.state_label();
                    self.dev.reached = Step::ImageVerified;
                    self.log_transition(
                        Step::ImageVerified,
                        "ok",
                        from,
                        Some(0),
                        format!("whole-image BLAKE3 {hash} matches the image manifest"),
                    );
                }
                self.advance();
            }
        }
    }

    /// Checks of what a step returned that the appliance can do itself.
    fn check_data(&self, step: Step, data: &StepData) -> Result<(), String> {
        match (step, data) {
            (Step::Inventoried, StepData::Inventory(_)) => Ok(()),
            (Step::Inventoried, _) => Err("inventory step returned no inventory".into()),
            (Step::Imaging, StepData::ImageWritten { hash, .. }) => {
                let want = self
                    .dev
                    .running
                    .as_ref()
                    .and_then(|r| match &r.work {
                        Work::JoinWave(j) => Some(j.image_hash.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                if *hash == want && !want.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "agent reports image hash {hash}, the manifest says {want}"
                    ))
                }
            }
            (Step::Imaging, _) => Err("imaging step returned no image hash".into()),
            _ => Ok(()),
        }
    }

    fn fail_running(&mut self, reason: String) {
        let from = self.state_label();
        let Some(run) = self.dev.running.take() else {
            return;
        };
        self.fail_with(from, run.step, reason, run.attempt, Some(run.started));
    }

    fn fail_with(
        &mut self,
        from: String,
        step: Step,
        reason: String,
        attempts: u32,
        started: Option<Millis>,
    ) {
        let retry_at = (attempts < self.cfg.max_attempts).then(|| {
            let factor = 1i64 << (attempts.saturating_sub(1)).min(6);
            self.now + self.cfg.retry_backoff_ms * factor
        });
        self.dev.failed = Some(Failure {
            step,
            reason: reason.clone(),
            attempts,
            retry_at,
        });
        if !self.dev.connected {
            // Failed with its agent gone (power loss, a crash): its next
            // boot may claim it, as Ironic wipes an agent token when a
            // deploy fails.
            self.dev.claim_open = true;
        }
        let took = started.map(|s| u64::try_from(self.now - s).unwrap_or(0));
        let detail = match retry_at {
            Some(at) => format!(
                "{reason} (attempt {attempts} of {}; retry in {} s)",
                self.cfg.max_attempts,
                (at - self.now) / 1000
            ),
            None => format!("{reason} (attempt {attempts}; waiting for `rackcast retry`)"),
        };
        self.log_transition(step, "failed", from, took, detail);
    }

    /// Start the failed step again (its next attempt).
    fn retry(&mut self, f: Failure, why: String) {
        let from = self.state_label();
        self.dev.failed = None;
        self.log_transition(f.step, "retry", from, None, why);
        self.start_step(f.step, f.attempts + 1);
    }

    fn on_tick(&mut self) {
        if let Some(run) = &self.dev.running {
            let limit = if run.step == Step::Imaging {
                self.cfg.imaging_timeout_ms
            } else {
                self.cfg.step_timeout_ms
            };
            if self.now - run.started >= limit {
                let step = run.step;
                if step == Step::Imaging {
                    self.out.push(Action::LeaveWave);
                    self.dev.wave = None;
                }
                self.fail_running(format!("{step} timed out after {} s", limit / 1000));
            }
            return;
        }
        if let Some(f) = self.dev.failed.clone() {
            if self.dev.connected && f.retry_at.is_some_and(|at| self.now >= at) {
                let why = format!("automatic retry {} after: {}", f.attempts + 1, f.reason);
                self.retry(f, why);
            }
        }
    }
}

#[cfg(test)]
mod tests;
