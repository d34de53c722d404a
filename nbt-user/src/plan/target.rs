//! What `nbt attach` points at: a process, a cgroup, a Docker container or a systemd unit,
//! resolved to cgroup directories and checked before anything on the machine changes.

use std::fs;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::enforce::cgroup::Layout;
use crate::enforce::target::TargetCgroups;
use crate::error::PlanError;
use crate::state::{state_dir, RunRecord};
use crate::sys::docker;
use crate::sys::netns::NetnsId;

/// The four ways of naming a target, as the flags give them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Pid(String),
    Cgroup(String),
    Container(String),
    Unit(String),
}

/// A resolved target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// "pid", "cgroup", "container" or "unit".
    pub kind: &'static str,
    /// What the user gave.
    pub given: String,
    /// For people: "container web (3f2a1b2c3d4e)", "process 4242 (python3)".
    pub described: String,
    /// Its cgroups. For a process: those it is in now, and goes back to at the end.
    pub cgroups: TargetCgroups,
    /// `--pid`: the process nbt moves into a cgroup of the run's own.
    pub pid: Option<i32>,
    /// A process of the target now, whose network namespace is the target's.
    pub member: Option<i32>,
}

impl TargetSpec {
    /// Resolves the target, refusing one nbt cannot attach to with the reason.
    pub fn resolve(&self) -> Result<Target> {
        let target = match self {
            TargetSpec::Pid(given) => of_pid(given)?,
            TargetSpec::Cgroup(given) => {
                of_cgroup(given, "cgroup", format!("cgroup {given}"), given)?
            }
            TargetSpec::Container(given) => {
                let container = docker::inspect(given)?;
                let cgroups = TargetCgroups::of_pid(container.pid)?;
                let short = &container.id[..container.id.len().min(12)];
                Target {
                    kind: "container",
                    given: given.clone(),
                    described: format!("container {} ({short})", container.name),
                    cgroups,
                    pid: None,
                    member: Some(container.pid),
                }
            }
            TargetSpec::Unit(given) => {
                let path = unit_cgroup(given)?;
                of_cgroup(&path, "unit", format!("unit {given} ({path})"), given)?
            }
        };
        not_nbts_own(&target)?;
        not_attached_already(&target)?;
        Ok(target)
    }
}

fn of_pid(given: &str) -> Result<Target> {
    let pid: i32 = given.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        PlanError(format!(
            "invalid value '{given}' for --pid: a process id (a positive number)"
        ))
    })?;
    if pid == 1 {
        return Err(PlanError(
            "--pid 1: the init process cannot be moved to another cgroup; give its cgroup with \
             --cgroup, or a unit with --unit"
                .into(),
        )
        .into());
    }
    if pid == std::process::id() as i32 {
        return Err(PlanError("--pid: that is nbt itself".into()).into());
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|_| PlanError(format!("invalid value '{pid}' for --pid: no such process")))?;
    // Kernel threads cannot change cgroups.
    if crate::sys::proc::is_kernel_thread(pid) == Some(true) {
        bail!(
            "--pid {pid}: {} is a kernel thread, which stays in the root cgroup",
            comm.trim()
        );
    }
    let cgroups = TargetCgroups::of_pid(pid)?;
    Ok(Target {
        kind: "pid",
        given: given.to_string(),
        described: format!("process {pid} ({})", comm.trim()),
        cgroups,
        pid: Some(pid),
        member: Some(pid),
    })
}

fn of_cgroup(path: &str, kind: &'static str, described: String, given: &str) -> Result<Target> {
    let cgroups = TargetCgroups::of_path(path)
        .map_err(|e| PlanError(format!("invalid value '{given}' for --{kind}: {e:#}")))?;
    if !cgroups.v2.join("cgroup.procs").exists() {
        return Err(PlanError(format!(
            "invalid value '{given}' for --{kind}: no cgroup v2 directory {} (nbt's programs \
             attach there)",
            cgroups.v2.display()
        ))
        .into());
    }
    if !cgroups.populated() {
        bail!(
            "--{kind} {given}: the cgroup {} has no processes; to prepare a cgroup that processes \
             join later, use `nbt zone apply`",
            cgroups.v2.display()
        );
    }
    let member = crate::enforce::cgroup::procs_of(&cgroups.v2)
        .first()
        .copied();
    // Where its processes are in the v1 hierarchies, on a hybrid host: usually the same path,
    // but only a process can say.
    let cgroups = match member.map(TargetCgroups::of_pid) {
        Some(Ok(theirs)) if theirs.v2 == cgroups.v2 => theirs,
        _ => cgroups,
    };
    Ok(Target {
        kind,
        given: given.to_string(),
        described,
        cgroups,
        pid: None,
        member,
    })
}

/// The cgroup of a systemd unit, asked of systemd (which must be PID 1).
fn unit_cgroup(unit: &str) -> Result<String> {
    let init = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    if init.trim() != "systemd" {
        bail!(
            "--unit needs systemd as PID 1, and PID 1 here is '{}'; give the unit's cgroup with \
             --cgroup instead",
            init.trim()
        );
    }
    let out = std::process::Command::new("systemctl")
        .args(["show", "--property=ControlGroup", "--value", "--", unit])
        .output()
        .context("running systemctl")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!(
            "--unit {unit}: systemd knows no running unit of that name (systemctl status {unit})"
        );
    }
    Ok(path)
}

/// nbt must not limit itself: a target holding nbt's own cgroup (or the root) is refused.
fn not_nbts_own(target: &Target) -> Result<()> {
    let own = Layout::detect()?;
    let Some(own_v2) = own.v2_self.as_deref() else {
        return Ok(());
    };
    if target.pid.is_none() && own_v2.starts_with(&target.cgroups.v2) {
        bail!(
            "the {} cgroup {} holds nbt itself (or is the root): nbt attaches only below its own",
            target.kind,
            target.cgroups.v2.display()
        );
    }
    Ok(())
}

/// One attachment per target: a second would restore values the first wrote.
fn not_attached_already(target: &Target) -> Result<()> {
    let v2 = &target.cgroups.v2;
    for (_, record) in RunRecord::read_all(&state_dir()) {
        let Ok(record) = record else { continue };
        let theirs = record.attached.as_ref().map(|a| &a.cgroups.v2);
        let inside_run = record
            .cgroups
            .first()
            .is_some_and(|dir| v2.starts_with(dir));
        if theirs == Some(v2) || inside_run {
            bail!(
                "{} is already under nbt's {} {} (`nbt detach {}` ends it)",
                target.described,
                if record.attached.is_some() {
                    "attachment"
                } else {
                    "run"
                },
                record.name,
                record.name
            );
        }
    }
    Ok(())
}

impl Target {
    /// Whether the target lives in another network namespace than nbt (a container's own).
    pub fn other_netns(&self) -> bool {
        let Some(pid) = self.member else {
            return false;
        };
        let theirs = NetnsId::of_process(pid).ok();
        theirs.is_some() && theirs != NetnsId::current().ok()
    }
}
