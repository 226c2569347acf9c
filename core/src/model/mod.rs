//! Plain data shared by the appliance and the agent: a device's inventory,
//! the plan and bundle generated for it, the BMC it names, and the
//! installation's steps and operation records.
//!
//! Owns: types only, with the small pure helpers that read them. Must
//! not: hold behaviour that needs I/O, or import from the cores (so the
//! wire formats, the workflow and the agent can all depend on it without
//! a cycle).

mod bmc;
mod bundle;
mod inventory;
mod plan;
mod steps;

pub use bmc::RedfishTarget;
pub use bundle::{BlobRef, Bundle, BundleError, ModuleRef, BUNDLE_VERSION};
pub use inventory::{Cpu, Disk, Dmi, Inventory, Nic, StorageController};
pub use plan::{
    check_raid_level, glob_match, BiosPlan, DiskId, DiskRule, ImagePlan, Plan, Program, RaidPlan,
    Seed,
};
pub use steps::{AgentMode, Command, OpRecord, Outcome, Step, StepData, WaveJoin, Work};
