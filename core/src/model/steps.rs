//! The installation's steps and what the appliance and an agent say about
//! them: commands, their work, results, and the operation records that
//! become event-log rows.
//!
//! Owns: these types, which travel inside the device protocol
//! (`wire::device`, whose golden-bytes tests pin their encoding). Must
//! not: decide transitions (the workflow core does).

use serde::{Deserialize, Serialize};

use super::Inventory;

/// The steps of an installation, in order. `Discovered` is the power-on
/// (first DHCP/boot request); a device that already runs an OS enters at
/// `LoaderBooted` when its agent connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The device asked to boot (DHCP/PXE): the power-on.
    Discovered,
    /// Its loader (or an agent started from an installed OS) connected.
    LoaderBooted,
    /// Its hardware report is stored.
    Inventoried,
    /// Its bundle was generated, downloaded and verified; the bundle's
    /// agent runs.
    AgentDelivered,
    /// BIOS settings applied and read back (or nothing to change).
    BiosConfigured,
    /// RAID array or volume in place.
    RaidConfigured,
    /// The plan's configuration programs ran.
    ProgramsRun,
    /// The barrier: the device waits for its image's wave.
    ReadyForImage,
    /// In a wave, receiving.
    Imaging,
    /// The written image hashes to the manifest's.
    ImageVerified,
    /// Post-install programs ran.
    PostInstall,
    /// The machine's identity (a cloud-init NoCloud seed) is written
    /// into its installed image.
    IdentityWritten,
    /// The device is set to boot its disk.
    BootToDisk,
    /// Installed.
    Done,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 14] = [
        Step::Discovered,
        Step::LoaderBooted,
        Step::Inventoried,
        Step::AgentDelivered,
        Step::BiosConfigured,
        Step::RaidConfigured,
        Step::ProgramsRun,
        Step::ReadyForImage,
        Step::Imaging,
        Step::ImageVerified,
        Step::PostInstall,
        Step::IdentityWritten,
        Step::BootToDisk,
        Step::Done,
    ];

    /// The step after this one (`None` after `Done`).
    pub fn next(self) -> Option<Step> {
        let i = Step::ALL.iter().position(|s| *s == self)?;
        Step::ALL.get(i + 1).copied()
    }

    /// Its name in logs, the store and the API (`loader_booted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Discovered => "discovered",
            Step::LoaderBooted => "loader_booted",
            Step::Inventoried => "inventoried",
            Step::AgentDelivered => "agent_delivered",
            Step::BiosConfigured => "bios_configured",
            Step::RaidConfigured => "raid_configured",
            Step::ProgramsRun => "programs_run",
            Step::ReadyForImage => "ready_for_image",
            Step::Imaging => "imaging",
            Step::ImageVerified => "image_verified",
            Step::PostInstall => "post_install",
            Step::IdentityWritten => "identity_written",
            Step::BootToDisk => "boot_to_disk",
            Step::Done => "done",
        }
    }

    /// The step of that name.
    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the agent that connected runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMode {
    /// The loader: network-booted, or started from an installed OS.
    Loader {
        /// An OS is installed on the device (claim 17: it came in
        /// through it rather than a network boot).
        os_present: bool,
    },
    /// The deployment agent from a bundle (hash), exec'd by the loader.
    Agent {
        /// The bundle's address (BLAKE3, hex).
        bundle: String,
    },
}

/// What the agent must do for the step in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// Report the hardware inventory.
    Inventory,
    /// Download bundle `hash`, verify it, start its agent.
    FetchBundle {
        /// The bundle's address (BLAKE3, hex).
        hash: String,
    },
    /// Run the bundle plan's programs for this step.
    RunPlan,
    /// Ask for the image: the barrier; the reply is the image request.
    RequestImage,
    /// Receive the image from the wave's data plane and verify it.
    JoinWave(WaveJoin),
}

/// Where and what a device receives in its wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveJoin {
    /// The wave's id in the appliance's record.
    pub wave_id: i64,
    /// The wave sender's TCP control address (manifest, key, feedback).
    pub control: std::net::SocketAddr,
    /// The image's name.
    pub image: String,
    /// The image's whole BLAKE3, hex: what the written image must hash to.
    pub image_hash: String,
    /// The image's size in bytes.
    pub image_size: u64,
}

/// A command to the device's agent. `cmd_id` makes results idempotent:
/// only a report carrying the id of the command in progress is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per device, increasing.
    pub cmd_id: u64,
    /// The step it belongs to.
    pub step: Step,
    /// What to do.
    pub work: Work,
}

/// One operation the agent performed for a step (a program run, a
/// download, a verification): one event-log row each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// What ran (`bios-read`, `mdadm-create`, a program's name).
    pub op: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// A program's exit code.
    pub exit_code: Option<i32>,
    /// How long it took.
    pub duration_ms: u64,
    /// Captured output or detail, bounded by the agent.
    pub detail: String,
}

impl OpRecord {
    /// An operation that is not a program (no exit code), timed from
    /// `started`.
    pub fn timed(op: &str, ok: bool, started: std::time::Instant, detail: String) -> OpRecord {
        OpRecord {
            op: op.to_string(),
            ok,
            exit_code: None,
            duration_ms: started.elapsed().as_millis() as u64,
            detail,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Ok {
        /// What was done, for the log.
        detail: String,
    },
    /// Not done.
    Failed {
        /// Why, for the log and the operator.
        reason: String,
    },
}

/// Data a step hands back besides its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepData {
    /// Nothing besides the outcome.
    None,
    /// The hardware report (`Work::Inventory`).
    Inventory(Box<Inventory>),
    /// The whole-image BLAKE3 of what was written, checked by the agent.
    ImageWritten {
        /// BLAKE3, hex.
        hash: String,
        /// Bytes written.
        bytes: u64,
    },
}
