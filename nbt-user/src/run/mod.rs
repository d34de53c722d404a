//! `nbt run`: plan → cgroups → BPF → child → wait → summary → remove everything.

pub(crate) mod run_receipt;
pub(crate) mod summary;

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};

use crate::enforce::cgroup::{Layout, Placement, RunCgroup, CONTROLLERS};
use crate::enforce::hwcaps::watch::{gpu_memory_env, GpuMemoryReport, Watch};
use crate::plan::Plan;
use crate::state::{self, RecordGuard, RunRecord};
use crate::run::summary::RunSummary;
use crate::sys::supervise::{self, SpawnError};
use crate::enforce::{account, edt, gate, shaper};
use crate::sys::loader;
use crate::telemetry::energy;
use crate::{learning, receipt, schedule};

/// How often nbt samples what the kernel keeps no peak of (see [`crate::enforce::cgroup::SAMPLED`]).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// How often the gate's host names are resolved again while a run lives.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

/// A restarted workload counts as recovered when it reports progress, or stays up this long.
pub const RECOVERED_AFTER: Duration = Duration::from_secs(10);

fn lifecycle_event(
    started: Instant,
    kind: schedule::Origin,
    what: String,
    error: Option<String>,
) -> schedule::apply::Event {
    schedule::apply::Event {
        t: started.elapsed().as_secs_f64(),
        kind,
        source: "workload".into(),
        what,
        error,
        counters: schedule::apply::Counters::default(),
        during: None,
    }
}

fn describe_exit(exit: &supervise::Exit) -> String {
    match (&exit.code, &exit.signal) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by {signal}"),
        (None, None) => format!("status {}", exit.status),
    }
}

/// Where each controller lives, for the summary: "hybrid (memory, cpu, pids in v1)".
fn describe_layout(layout: &Layout) -> String {
    let v1: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| layout.placement(c) == Some(Placement::V1))
        .collect();
    if v1.is_empty() {
        layout.mode().to_string()
    } else {
        format!("{} ({} in v1)", layout.mode(), v1.join(", "))
    }
}

/// An outcome of `nbt run` that is not the workload's own exit.
pub enum RunError {
    Spawn(SpawnError),
    Nbt(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Nbt(e)
    }
}

/// Runs `command` under `plan`. `signals` comes from [`supervise::block_signals`], called before
/// any thread was started. Returns the summary; everything the run made is gone when it returns.
pub fn execute(
    plan: &Plan,
    command: &[OsString],
    signals: &libc::sigset_t,
    extra_env: &[(&str, String)],
) -> Result<RunSummary, RunError> {
    let layout = Layout::detect()?;
    let name = state::new_run_name()?;
    let record = RunRecord {
        name: name.clone(),
        supervisor_pid: std::process::id() as i32,
        supervisor_start_time: crate::sys::proc::process_start_time(std::process::id() as i32)
            .context("reading nbt's own start time from /proc")?,
        cgroups: layout.run_dirs(&name)?,
        command: command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        net: plan.net,
        maps: None,
        ledger: None,
        edt_map: None,
        latency: plan.latency,
        started_unix: 0.0,
    };
    let state_dir = state::state_dir();
    let _record = RecordGuard(record.write(&state_dir)?);

    // Opened first: a store or key that cannot be written stops the run before anything ran.
    let mut receipts = receipt::Writer::open(&plan.receipts)?;
    let reports = learning::ReportFile::create(state::RunFiles::of(&state_dir, &name).reports)?;
    let mut template = receipt::Receipt::new(receipt::Kind::Task, receipts.key_id().to_string());
    template.run = Some(name.clone());
    template.command = record.command.clone();
    template.constraints = run_receipt::constraints(
        &plan.profile,
        &plan.limits,
        &plan.net,
        plan.latency.as_ref(),
    );
    let mut judge = learning::Judge::new(plan.accept_min_delta, template);
    let mut reports = reports;

    // Dropped in reverse order: the BPF links go first, then the cgroups (processes killed first).
    let mut cgroup = RunCgroup::create(&layout, &name, &plan.limits)?;
    let mut ebpf = loader::load()?;
    account::attach(&mut ebpf, &cgroup.v2)?;
    // Always attached, unlimited when no limit is set, so that `nbt set` can add one later.
    shaper::attach(&mut ebpf, &cgroup.v2, &plan.net)?;
    // Dropped after the programs: fq goes back to the kernel's default on every interface.
    let _latency = match &plan.latency {
        Some(latency) => Some(edt::attach(&mut ebpf, &cgroup.v2, latency)?),
        None => None,
    };
    let ledger = match &plan.prices {
        Some(prices) => Some(gate::attach(&mut ebpf, &cgroup.v2, prices, &plan.gate)?),
        None => None,
    };
    let mut blocked = match ledger {
        Some(_) => Some(gate::BlockedLog::open(&mut ebpf)?),
        None => None,
    };
    let record = RunRecord {
        maps: Some(shaper::map_ids(&ebpf)?),
        edt_map: match plan.latency {
            Some(_) => Some(edt::map_id(&ebpf)?),
            None => None,
        },
        ledger,
        started_unix: crate::sys::proc::now_unix(),
        ..record
    };
    record.write(&state_dir)?;

    let mut env = vec![
        ("NBT_RUN", name.clone()),
        (
            learning::REPORT_ENV,
            reports.path().to_string_lossy().into_owned(),
        ),
    ];
    env.extend(extra_env.iter().cloned());
    // Last before the workload: the originals are on disk before anything changes, and the
    // guard puts them back however this function ends (errors and panics included).
    let mut hardware = state::hwcaps::hold(&plan.hwcaps, &state_dir, &name)?;
    let gpu_memory = match &plan.hwcaps.gpu.memory_bytes {
        Some(cap) => {
            let totals = plan.hwcaps.gpu.memory_totals().map_err(|e| anyhow!(e.0))?;
            let caller_set = std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_some();
            let set = gpu_memory_env(cap.value, &totals, caller_set);
            env.extend(set.iter().cloned());
            Some(GpuMemoryReport {
                cap_bytes: cap.value,
                env: set.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                exceeded: None,
            })
        }
        None => None,
    };
    let mut watch = Watch::start(
        &crate::enforce::hwcaps::sysfs_root(),
        plan.hwcaps.gpu.chosen(),
        gpu_memory,
    );
    // Read before the spawn: a short workload can be done before the next line runs, and a
    // meter started after it would see none of its CPU time.
    let mut meter = energy::RunMeter::start(cgroup.cpu_seconds());
    let started = Instant::now();
    let pid = supervise::spawn(command, &cgroup.procs_files(), &env).map_err(RunError::Spawn)?;
    let mut next_resolve = Instant::now() + RESOLVE_INTERVAL;
    let mut controls = schedule::apply::Controls {
        edt_map: record.edt_map,
        ledger: record.ledger,
        run: name.clone(),
        memory: plan.limits.memory_bytes,
        balloon: None,
        gate_config: match ledger {
            Some(_) => Some(gate::config_map_id(&ebpf)?),
            None => None,
        },
    };
    let mut timeline =
        schedule::apply::Runner::new(plan.schedule.as_ref().map_or(&[][..], |s| &s.actions[..]));
    let mut pid = pid;
    let mut restarts = 0u32;
    // Since when the restarted workload runs, and how many updates had come before.
    let mut recovering: Option<(Instant, usize)> = None;
    let mut lifecycle: Vec<schedule::apply::Event> = Vec::new();
    let exit = loop {
        let exit = supervise::wait(pid, signals, SAMPLE_INTERVAL, || {
            cgroup.sample();
            let run_pids = || cgroup.pids().into_iter().map(|p| p as u32).collect();
            if let Some(why) = watch.tick(run_pids) {
                for pid in cgroup.pids() {
                    // SAFETY: kill(2) with a pid of the run's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                lifecycle.push(lifecycle_event(
                    started,
                    schedule::Origin::Stop,
                    format!("nbt stopped the workload: {why}"),
                    None,
                ));
            }
            if let Some((since, tasks)) = recovering {
                let reported = judge.tasks.len() > tasks;
                if reported || since.elapsed() >= RECOVERED_AFTER {
                    lifecycle.push(lifecycle_event(
                        started,
                        schedule::Origin::Recovered,
                        format!(
                            "recovered {:.2} s after restart {restarts}: {}",
                            since.elapsed().as_secs_f64(),
                            if reported {
                                "it reported progress".to_string()
                            } else {
                                format!("it stayed up {} s", RECOVERED_AFTER.as_secs())
                            }
                        ),
                        None,
                    ));
                    recovering = None;
                }
            }
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if timeline.due(elapsed_ms) {
                let shaped = shaper::read(&ebpf).ok();
                let counters = schedule::apply::Counters::of(&cgroup.stats(), shaped.as_ref())
                    .with_ledger(ledger.as_ref());
                timeline.run_due(elapsed_ms, &mut controls, &cgroup, counters);
            }
            let batch = reports.read_new(false);
            if !batch.is_empty() {
                let cpu = cgroup.cpu_seconds();
                judge.take(batch, &mut receipts, || meter.since_last(cpu));
            }
            if let Some(log) = blocked.as_mut() {
                log.drain();
            }
            if let (Some(ids), Some(prices)) = (&ledger, &plan.prices) {
                if prices.hour_micro > 0 {
                    let _ =
                        gate::charge_time(ids, prices.hour_micro, started.elapsed().as_secs_f64());
                }
                // Host names may move: add the addresses they have now (never removing old ones).
                if Instant::now() >= next_resolve {
                    let _ = gate::install_rules(&mut ebpf, &plan.gate);
                    next_resolve = Instant::now() + RESOLVE_INTERVAL;
                }
            }
        });
        if plan.restart_max == 0 {
            break exit;
        }
        let counters =
            schedule::apply::Counters::of(&cgroup.stats(), shaper::read(&ebpf).ok().as_ref())
                .with_ledger(ledger.as_ref());
        let mut ended = lifecycle_event(
            started,
            schedule::Origin::Exit,
            format!("the workload ended: {}", describe_exit(&exit)),
            None,
        );
        ended.counters = counters;
        lifecycle.push(ended);
        // A stop the user asked for (a signal nbt passed on) is not a failure to repair.
        let failed = exit.status != 0 && exit.forwarded_signals.is_empty();
        if !failed || restarts >= plan.restart_max {
            break exit;
        }
        restarts += 1;
        match supervise::spawn(command, &cgroup.procs_files(), &env) {
            Ok(next) => {
                pid = next;
                lifecycle.push(lifecycle_event(
                    started,
                    schedule::Origin::Restart,
                    format!("restart {restarts} of at most {}", plan.restart_max),
                    None,
                ));
                recovering = Some((Instant::now(), judge.tasks.len()));
            }
            Err(err) => {
                lifecycle.push(lifecycle_event(
                    started,
                    schedule::Origin::Restart,
                    format!("restart {restarts}"),
                    Some(err.to_string()),
                ));
                break exit;
            }
        }
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    let cpu = cgroup.cpu_seconds();
    judge.take(reports.read_new(true), &mut receipts, || {
        meter.since_last(cpu)
    });
    let run_energy = meter.total(cpu);
    let ledger_summary = match (&ledger, &plan.prices) {
        (Some(ids), Some(prices)) => {
            if prices.hour_micro > 0 {
                gate::charge_time(ids, prices.hour_micro, wall_seconds)?;
            }
            let counts = blocked
                .take()
                .map(|log| log.into_counts())
                .unwrap_or_default();
            Some(gate::summarize(ids, prices, counts)?)
        }
        _ => None,
    };

    let stats = cgroup.stats();
    let mut events = std::mem::take(&mut timeline.events);
    events.extend(lifecycle);
    // Faults injected from outside (`nbt fault`), in time order with the schedule's.
    events.extend(schedule::fault::take_outside_events(&state_dir, &name));
    events.sort_by(|a, b| a.t.total_cmp(&b.t));
    if timeline.not_reached() > 0 {
        events.push(schedule::apply::Event {
            t: wall_seconds,
            kind: schedule::Origin::Step,
            source: "schedule".into(),
            what: format!(
                "{} scheduled changes not reached: the workload ended first",
                timeline.not_reached()
            ),
            error: None,
            counters: schedule::apply::Counters::of(&stats, None),
            during: None,
        });
    }
    let network = account::read(&ebpf).context("reading the byte counters")?;
    let shaped = shaper::read(&ebpf).context("reading the shaper's counters")?;
    // `nbt set` may have changed the limits during the run: report the last ones.
    let (final_net, final_latency) = RunRecord::find_live(&state_dir, &name)
        .map(|(_, r)| (r.net, r.latency))
        .unwrap_or((plan.net, plan.latency));
    drop(ebpf);
    cgroup.remove()?;
    let hardware = hardware.as_mut().map(|applied| {
        let restore_errors = applied.restore();
        crate::run::summary::HardwareReport {
            set: applied.set.clone(),
            original: applied.originals(),
            restored: restore_errors.is_empty(),
            restore_errors,
        }
    });

    let mut summary = RunSummary {
        run: name,
        command: record.command.clone(),
        profile: plan.profile.clone(),
        limits: plan.limits.clone(),
        cgroup_mode: describe_layout(&layout),
        exit,
        wall_seconds,
        cgroup: stats,
        network: Some(network),
        net_limits: final_net,
        shaped: Some(shaped),
        ledger: ledger_summary,
        latency: final_latency,
        energy: run_energy,
        events,
        tasks: std::mem::take(&mut judge.tasks),
        refused_reports: std::mem::take(&mut judge.refused),
        receipt: None,
        receipt_error: None,
        hardware,
        sensors: watch.finish(),
    };
    // Last of all, so that the receipt holds everything the run measured.
    let mut run_receipt = run_receipt::of_run(&summary, summary.energy.clone(), String::new());
    match receipts.write(&mut run_receipt) {
        Ok(written) => summary.receipt = Some(written),
        Err(err) => judge.errors.push(format!("the run's receipt: {err:#}")),
    }
    if !judge.errors.is_empty() {
        summary.receipt_error = Some(judge.errors.join("; "));
    }
    Ok(summary)
}
