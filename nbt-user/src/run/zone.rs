//! Zones (`nbt zone`): the seed's apply and remove scripts. A zone is a run's cgroups, programs,
//! maps and hardware caps with no process holding them: its links are pinned and its record
//! names no supervisor ([`state::ZONE_HOLDER`]), so it survives nbt, and `nbt cleanup` leaves it
//! alone. Commands started in it (`nbt zone exec`) and processes moved in (`nbt zone attach`)
//! live under its limits; `nbt zone remove` puts everything back and writes its receipt.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

use super::{describe_layout, first_record, Armed, Workload};
use crate::enforce::cgroup::{kill_and_remove, move_back_one, Layout, RunCgroup};
use crate::enforce::shaper;
use crate::enforce::target::TargetCgroups;
use crate::plan::Plan;
use crate::run::summary::{HardwareReport, RunSummary};
use crate::state::{self, hwcaps::HwcapsRecord, MovedIn, RecordGuard, RunFiles, RunRecord};
use crate::sys::netns::Reached;
use crate::sys::supervise::Exit;
use crate::sys::user::Identity;
use crate::telemetry::energy::{CpuModel, Energy, Joules};

/// What a zone cannot do without a process watching it, refused at `nbt zone apply`.
fn refuse_unheld(plan: &Plan) -> Result<()> {
    let refused = [
        (plan.schedule.is_some(), "--schedule: a schedule needs nbt running to apply its steps; use `nbt set NAME` to change a zone's limits"),
        (plan.prices.as_ref().is_some_and(|p| p.hour_micro > 0), "--price-hour: time is charged by a running nbt; a zone's balance drains with its calls and bytes only"),
        (plan.hwcaps.gpu.memory_bytes.is_some(), "--gpu-memory: it is an environment variable of a command nbt starts"),
        (plan.restart_max > 0, "--restart: a zone starts nothing"),
    ];
    match refused.iter().find(|(given, _)| *given) {
        Some((_, why)) => Err(crate::error::PlanError(format!("not for a zone: {why}")).into()),
        None => Ok(()),
    }
}

/// Makes the zone `label` under `plan` and leaves it in force. Returns its record.
pub fn apply(plan: &Plan, label: &str) -> Result<RunRecord> {
    refuse_unheld(plan)?;
    let layout = Layout::detect()?;
    let name = state::new_run_name()?;
    let command: [std::ffi::OsString; 4] =
        ["nbt".into(), "zone".into(), "apply".into(), label.into()];
    let mut record = first_record(plan, Workload::Command(&command), &layout, &name)?;
    record.supervisor_pid = state::ZONE_HOLDER;
    record.supervisor_start_time = 0;
    record.label = Some(label.to_string());
    record.zone = Some(state::Zone {
        receipts: plan.receipts.clone(),
        profile: plan.profile.clone(),
        limits: plan.limits.clone(),
        hardware: Vec::new(),
        moved: Vec::new(),
    });
    let state_dir = state::state_dir();
    // Refuses a name a live run or zone has, under the records' lock.
    let guard = RecordGuard::new(record.write(&state_dir)?, &record);
    // The key and the store are checked now: a zone that could not write its receipt at the
    // end is refused at the start.
    crate::receipt::Writer::open(&plan.receipts)?;
    let armed = Armed::attach(plan, &layout, &name, &record, Workload::Command(&[]))?;
    let mut record = armed.record(record)?;
    let hardware = state::hwcaps::hold_for_zone(&plan.hwcaps, &state_dir, &name)?;
    if let (Some(zone), Some(held)) = (record.zone.as_mut(), &hardware) {
        zone.hardware = held.set.clone();
    }
    record.write(&state_dir)?;
    // From here on the zone holds itself.
    let Armed {
        latency,
        cgroup,
        pins,
        ..
    } = armed;
    cgroup.keep();
    pins.keep();
    if let Some(latency) = latency {
        latency.keep();
    }
    if let Some(held) = hardware {
        held.keep();
    }
    guard.keep();
    Ok(record)
}

/// The record of the zone `given` (its name or its nbt-... name).
pub fn find(given: &str) -> Result<RunRecord> {
    let dir = state::state_dir();
    let found = RunRecord::read_all(&dir)
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .find(|r| r.zone.is_some() && (r.label.as_deref() == Some(given) || r.name == given));
    found.ok_or_else(|| anyhow!("no zone named '{given}' (`nbt zone ls` lists them)"))
}

/// Every zone's record.
pub fn all() -> Vec<RunRecord> {
    RunRecord::read_all(&state::state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|r| r.zone.is_some())
        .collect()
}

/// Moves process `pid` into the zone, recording where it came from.
pub fn attach(zone: &str, pid: i32) -> Result<()> {
    let dir = state::state_dir();
    let record = find(zone)?;
    let home = TargetCgroups::of_pid(pid)?;
    if record.cgroups.iter().any(|d| home.v2.starts_with(d)) {
        bail!("process {pid} is in zone {zone} already");
    }
    let start_time = crate::sys::proc::process_start_time(pid)
        .ok_or_else(|| anyhow!("--pid {pid}: no such process"))?;
    let _lock = state::RecordsLock::take(&dir)?;
    let mut record = find(zone)?;
    // Recorded before the move: a crash in between leaves a process nbt knows how to send back.
    if let Some(z) = record.zone.as_mut() {
        z.moved.push(MovedIn {
            pid,
            start_time,
            home,
        });
    }
    record.write_locked(&dir)?;
    let layout = Layout::detect()?;
    let cgroup = RunCgroup::existing(&layout, &record.name, None)?;
    for file in cgroup.procs_files() {
        std::fs::write(&file, pid.to_string())
            .with_context(|| format!("moving process {pid} into {}", file.display()))?;
    }
    Ok(())
}

/// Puts everything of the zone back: processes moved in go home, those started in it are
/// killed, the cgroups, programs, qdiscs and hardware caps go. Returns the zone's summary with
/// its receipt written.
pub fn remove(record: RunRecord) -> Result<RunSummary> {
    let zone = record
        .zone
        .clone()
        .ok_or_else(|| anyhow!("{} is not a zone", record.name))?;
    let state_dir = state::state_dir();
    let layout = Layout::detect()?;
    let mut cgroup = RunCgroup::existing(&layout, &record.name, None)?;
    let now = cgroup.now();
    // The limits in force at the end, as the kernel has them: `nbt set` may have changed those
    // the zone was applied with.
    let limits = crate::enforce::cgroup::Limits {
        memory_bytes: now.memory_limit_bytes,
        swap_bytes: now.swap_limit_bytes,
        cpu_millicores: now.cpu_limit_millicores,
        pids: now.pids_limit,
    };
    let stats = now.stats;
    let cpu = cgroup.cpu_seconds();
    drop(cgroup);
    let shaped = record
        .maps
        .as_ref()
        .and_then(|ids| shaper::read_by_id(ids).ok());
    let wall_seconds = crate::sys::proc::now_unix() - record.started_unix;

    let mut moved_back = 0;
    for moved in &zone.moved {
        if crate::sys::proc::process_start_time(moved.pid) == Some(moved.start_time) {
            moved_back += move_back_one(moved.pid, &record.cgroups, &moved.home, &layout);
        }
    }
    let killed = kill_and_remove(&record.cgroups)?;
    let pins = record
        .pins
        .clone()
        .unwrap_or_else(|| crate::sys::pin::run_dir(&record.name));
    crate::sys::pin::remove_run_dir(&pins)?;
    if let Some(qdiscs) = &record.qdiscs {
        // What the zone's processes sent last leaves before fq goes (those moved back home
        // keep sending, no longer delayed).
        let longest = crate::enforce::edt::longest(
            record.latency.iter().chain(
                record
                    .link_settings
                    .iter()
                    .filter_map(|l| l.latency.as_ref()),
            ),
        );
        if let Reached::Ran(errors) =
            qdiscs.remove_in_their_netns(|qdiscs| qdiscs.remove_when_sent(longest))?
        {
            if !errors.is_empty() {
                bail!("{}", errors.join("; "));
            }
        }
    }
    let files = RunFiles::of(&state_dir, &record.name);
    let hardware = restore_caps(&files.hwcaps, &zone.hardware);

    let model = CpuModel::for_this_host();
    let energy = Energy {
        joules: vec![Joules {
            source: "model".into(),
            label: "model".into(),
            joules: model.active_joules(cpu),
        }],
        note: Some(format!(
            "{}; the zone's CPU time only ({cpu:.3} CPU s), nothing metered while no nbt ran",
            model.describe()
        )),
    };
    let mut summary = RunSummary {
        run: record.name.clone(),
        name: record.label.clone(),
        command: record.command.clone(),
        user: Identity::parse("0").map_err(|e| anyhow!("{e}"))?,
        profile: zone.profile.clone(),
        limits,
        cgroup_mode: describe_layout(&layout),
        exit: Exit {
            status: 0,
            code: None,
            signal: None,
            core_dumped: false,
            forwarded_signals: Vec::new(),
        },
        wall_seconds,
        cgroup: stats,
        network: None,
        net_limits: record.net,
        shaped,
        links: Vec::new(),
        ledger: None,
        latency: record.latency,
        energy,
        events: Vec::new(),
        series: None,
        tasks: Vec::new(),
        refused_reports: Vec::new(),
        receipt: None,
        receipt_error: None,
        hardware,
        sensors: Default::default(),
        attached: None,
        zone: Some(super::summary::ZoneReport { moved_back, killed }),
    };
    let mut writer = crate::receipt::Writer::open(&zone.receipts)?;
    let mut receipt = super::run_receipt::of_run(&summary, summary.energy.clone(), String::new());
    match writer.write_with_series(&mut receipt, None) {
        Ok(written) => summary.receipt = Some(written),
        Err(err) => summary.receipt_error = Some(format!("{err:#}")),
    }
    for file in [
        &files.record,
        &files.reports,
        &files.events,
        &files.series,
        &files.live_events,
    ] {
        let _ = std::fs::remove_file(file);
    }
    Ok(summary)
}

/// Puts the zone's hardware caps back from their record; what the summary says of them.
fn restore_caps(path: &Path, set: &[String]) -> Option<HardwareReport> {
    let (_, record) = HwcapsRecord::read_all(path.parent()?)
        .into_iter()
        .find(|(p, _)| p == path)?;
    let record = record.ok()?;
    let errors = record.restore();
    if errors.is_empty() {
        let _ = std::fs::remove_file(path);
    }
    Some(HardwareReport {
        set: set.to_vec(),
        original: record.describe(),
        restored: errors.is_empty(),
        restore_errors: errors,
    })
}
