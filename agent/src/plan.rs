//! The plan runner: one command of the appliance carried out on the
//! device (inventory, bundle fetch, the plan's BIOS/RAID/program steps,
//! the image), each operation recorded for the device's log.
//!
//! Owns: what a step needs (`Ctx`), the dispatch of a command to its
//! work, programs run under a timeout with their output kept. Must not:
//! talk to the appliance itself (requests go through the session).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use tokio::sync::{mpsc, oneshot};

use rackcast_core::model::{
    Command, Inventory, OpRecord, Outcome, Plan, Program, Step, StepData, Work,
};
use rackcast_core::signing::TrustedKey;
use rackcast_core::wire::device::{AgentMsg, ApplianceMsg};

use crate::image::receive_image;
use crate::loader::{fetch_bundle, load_bundle};
use crate::session::{Report, Request};

/// Output kept per program (the tail: where the error usually is).
const MAX_OUTPUT: usize = 8 << 10;

/// What a step needs: the device, its hardware, where to work, the way
/// to ask the appliance (through the session), the key to trust.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) device: String,
    pub(crate) inventory: Inventory,
    pub(crate) work_dir: PathBuf,
    pub(crate) bundle_dir: Option<PathBuf>,
    pub(crate) iface: Option<String>,
    pub(crate) requests: mpsc::UnboundedSender<Request>,
    /// The appliance's key: the one it proved in the TLS handshake (the
    /// pinned one, when this device was told which to trust).
    pub(crate) trusted: TrustedKey,
    /// This boot's number (bundle signatures are bound to it).
    pub(crate) boot: u64,
    /// This boot's credential (waves admit the device with it).
    pub(crate) credential: [u8; 32],
}

impl Ctx {
    /// Send without waiting for an answer (progress of a command).
    fn tell(&self, msg: AgentMsg) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.requests.send((msg, tx));
    }

    pub(crate) async fn ask(&self, msg: AgentMsg) -> Result<ApplianceMsg> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((msg, tx))
            .map_err(|_| anyhow!("agent stopping"))?;
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .map_err(|_| anyhow!("no answer from the appliance in 60 s"))?
            .map_err(|_| anyhow!("connection lost during download"))
    }
}

pub(crate) async fn execute(ctx: Ctx, cmd: Command) -> Report {
    let mut ops = Vec::new();
    let mut then_exec = None;
    let r: Result<(String, StepData)> = match &cmd.work {
        Work::Inventory => Ok((
            format!(
                "{} {} serial {}, {} CPUs, {} disks, {} NICs",
                ctx.inventory.dmi.vendor,
                ctx.inventory.dmi.model,
                ctx.inventory.dmi.serial,
                ctx.inventory.cpu.count,
                ctx.inventory.disks.len(),
                ctx.inventory.nics.len()
            ),
            StepData::Inventory(Box::new(ctx.inventory.clone())),
        )),
        Work::FetchBundle { hash } => fetch_bundle(&ctx, hash, &mut ops).await.map(|bin| {
            then_exec = Some(bin);
            (format!("bundle {hash} verified"), StepData::None)
        }),
        Work::RunPlan => run_plan(&ctx, cmd.cmd_id, cmd.step, &mut ops)
            .await
            .map(|d| (d, StepData::None)),
        Work::RequestImage => plan_of(&ctx).and_then(|p| {
            Ok((
                format!(
                    "requests image {} for {}",
                    p.image.name,
                    crate::disks::image_target(&ctx.inventory, &p.image)?
                ),
                StepData::None,
            ))
        }),
        Work::JoinWave(join) => receive_image(&ctx, join, &mut ops).await,
    };
    let (outcome, data) = match r {
        Ok((detail, data)) => (Outcome::Ok { detail }, data),
        Err(e) => {
            then_exec = None;
            (
                Outcome::Failed {
                    reason: format!("{e:#}"),
                },
                StepData::None,
            )
        }
    };
    Report {
        cmd_id: cmd.cmd_id,
        outcome,
        data,
        ops,
        then_exec,
    }
}

pub(crate) fn plan_of(ctx: &Ctx) -> Result<Plan> {
    let dir = ctx
        .bundle_dir
        .as_ref()
        .ok_or_else(|| anyhow!("no bundle: the loader cannot run plan steps"))?;
    Ok(load_bundle(dir)?.plan)
}

async fn run_plan(ctx: &Ctx, cmd_id: u64, step: Step, ops: &mut Vec<OpRecord>) -> Result<String> {
    let plan = plan_of(ctx)?;
    let mut env = HashMap::new();
    env.insert(
        "RC_IMAGE_TARGET".to_string(),
        crate::disks::image_target(&ctx.inventory, &plan.image)?,
    );
    let programs: Vec<Program> = match step {
        Step::BiosConfigured => {
            let b = plan
                .bios
                .as_ref()
                .ok_or_else(|| anyhow!("plan has no BIOS part"))?;
            if let Some(target) = &b.redfish {
                let settle = crate::bios::Settle {
                    timeout: Duration::from_secs(target.settle_timeout_s),
                    interval: Duration::from_secs(2),
                };
                let mut bmc = crate::redfish::RedfishBios::new(target.clone())?;
                // The reset may restart this very machine: what was done
                // before it goes to the appliance first.
                let mut flush =
                    |done: Vec<OpRecord>| ctx.tell(AgentMsg::Progress { cmd_id, ops: done });
                return Ok(crate::bios::configure(
                    &mut bmc,
                    &b.attributes,
                    settle,
                    ops,
                    &mut flush,
                )
                .await?);
            }
            for (k, v) in &b.attributes {
                env.insert(format!("RC_BIOS_{k}"), v.clone());
            }
            env.insert(
                "RC_BIOS_ATTRIBUTES".into(),
                b.attributes.keys().cloned().collect::<Vec<_>>().join(" "),
            );
            b.program.iter().cloned().collect()
        }
        Step::RaidConfigured => {
            let r = plan
                .raid
                .as_ref()
                .ok_or_else(|| anyhow!("plan has no RAID part"))?;
            if let Some(target) = &r.redfish {
                return crate::raid::configure_volume(r, target, plan.image.size, ops).await;
            }
            if r.program.is_none() {
                return crate::raid::configure(r, &ctx.inventory, plan.image.size, ops).await;
            }
            env.insert("RC_RAID_ARRAY".into(), r.array.clone());
            env.insert("RC_RAID_LEVEL".into(), r.level.clone());
            let members: Vec<String> = r
                .members
                .iter()
                .map(|m| ctx.inventory.resolve_disk(m))
                .collect();
            env.insert("RC_RAID_MEMBERS".into(), members.join(" "));
            r.program.iter().cloned().collect()
        }
        Step::ProgramsRun => plan.programs.clone(),
        Step::PostInstall => plan.post_install.clone(),
        Step::IdentityWritten => {
            let seed = plan
                .seed
                .as_ref()
                .ok_or_else(|| anyhow!("plan has no identity seed"))?;
            let target = &env["RC_IMAGE_TARGET"];
            return crate::seed::write(target, seed, &ctx.work_dir.join("seed"), ops).await;
        }
        Step::BootToDisk => plan.boot_to_disk.iter().cloned().collect(),
        other => bail!("step {other} has no programs"),
    };
    let mut names = Vec::new();
    for p in &programs {
        let op = run_program(ctx, p, &env).await;
        let ok = op.ok;
        let detail = op.detail.clone();
        ops.push(op);
        if !ok {
            bail!(
                "program {} failed: {}",
                p.name,
                detail.lines().last().unwrap_or("")
            );
        }
        names.push(p.name.clone());
    }
    Ok(format!("ran {}", names.join(", ")))
}

/// Run one program with its timeout; output (tail, bounded) and exit
/// code go to the event log.
pub(crate) async fn run_program(ctx: &Ctx, p: &Program, env: &HashMap<String, String>) -> OpRecord {
    let t = Instant::now();
    let Some((bin, rest)) = p.argv.split_first() else {
        return OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: 0,
            detail: "empty argv".into(),
        };
    };
    let mut c = tokio::process::Command::new(bin);
    c.args(rest)
        .envs(env)
        .envs(&p.env)
        .env("RC_DEVICE", &ctx.device)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let res = tokio::time::timeout(Duration::from_secs(p.timeout_s), c.output()).await;
    let ms = t.elapsed().as_millis() as u64;
    match res {
        Err(_) => OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: ms,
            detail: format!("timed out after {} s (killed)", p.timeout_s),
        },
        Ok(Err(e)) => OpRecord {
            op: p.name.clone(),
            ok: false,
            exit_code: None,
            duration_ms: ms,
            detail: format!("cannot start {bin}: {e}"),
        },
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if text.len() > MAX_OUTPUT {
                let mut cut = text.len() - MAX_OUTPUT;
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                text = format!("[...{cut} bytes cut...]{}", &text[cut..]);
            }
            OpRecord {
                op: p.name.clone(),
                ok: out.status.success(),
                exit_code: out.status.code(),
                duration_ms: ms,
                detail: text.trim_end().to_string(),
            }
        }
    }
}
