//! `nbt fault RUN KIND [DURATION]`: one fault injected into a live run from outside, through the
//! same parser and the same changes as a schedule's. This process applies the fault, waits, and
//! puts back what was in force; a signal (Ctrl-C) ends the wait early and still puts it back. The
//! events are appended to `<run>.events` beside the run's record, and the run merges them into
//! its own log when it ends.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::apply::{Controls, Counters, Event, Runner};
use super::parse::Initial;
use crate::enforce::cgroup::{Layout, RunCgroup};
use crate::error::PlanError;
use crate::state::{state_dir, RunFiles, RunRecord};

/// The events `nbt fault` appended for `run`, removing the file.
pub fn take_outside_events(dir: &Path, run: &str) -> Vec<Event> {
    let path = RunFiles::of(dir, run).events;
    let events = fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = fs::remove_file(&path);
    events
}

/// Injects the fault; returns its events. A bad fault is a [`PlanError`] (a usage error).
pub fn inject(
    run: &str,
    kind: &str,
    as_schedule: &str,
    signals: &libc::sigset_t,
) -> Result<Vec<Event>> {
    apply_from_outside(run, &format!("nbt fault {kind}"), as_schedule, signals)
}

/// Applies `as_schedule` (a schedule's text: steps take effect and stay, faults are put back
/// when they end) to the live run `run` from this process, and logs its events in the run's
/// log with `source`; returns them. `nbt fault` and `nbt set` (memory, swap, cpus, pids) go
/// through here.
pub fn apply_from_outside(
    run: &str,
    source: &str,
    as_schedule: &str,
    signals: &libc::sigset_t,
) -> Result<Vec<Event>> {
    let dir = state_dir();
    let run = &crate::state::resolve_run(&dir, run)?;
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let Some(net_ids) = record.maps else {
        bail!("run '{run}' has not loaded its BPF programs yet; try again in a moment");
    };
    let mut cgroup = cgroup_of(run, &record)?;
    let initial = initial_of(&cgroup, &record);
    let schedule = super::parse_flags(source, as_schedule, &initial).map_err(|e| PlanError(e.0))?;
    let mut controls = Controls {
        edt_map: record.edt_map,
        ledger: record.ledger,
        run: run.to_string(),
        memory: initial.memory,
        balloon: None,
        gate_config: None,
    };
    let offset = crate::sys::proc::now_unix() - record.started_unix;
    let ledger = record.ledger;
    let mut runner = Runner::new(&schedule.actions);
    run_until_put_back(
        &mut runner,
        schedule.span_ms(),
        signals,
        |runner, elapsed, early| {
            let shaped = crate::enforce::shaper::read_by_id(&net_ids).ok();
            let counters =
                Counters::of(&cgroup.stats(), shaped.as_ref()).with_ledger(ledger.as_ref());
            if early {
                runner.finish_now(elapsed, &mut controls, &cgroup, counters);
            } else {
                runner.run_due(elapsed, &mut controls, &cgroup, counters);
            }
        },
    );
    let mut events = runner.events;
    for event in &mut events {
        event.t += offset;
        event.source = source.to_string();
    }
    append_events(&RunFiles::of(&dir, run).events, &events)?;
    Ok(events)
}

/// What was in force in the run when the fault starts, which its end puts back.
fn initial_of(cgroup: &RunCgroup, record: &RunRecord) -> Initial {
    Initial {
        memory: cgroup.current_memory(),
        cpus: cgroup.current_cpus(),
        egress_rate: record.net.egress.rate_bits_per_sec,
        ingress_rate: record.net.ingress.rate_bits_per_sec,
        egress_loss: record.net.egress.loss,
        ingress_loss: record.net.ingress.loss,
        latency_ns: record.latency.map(|l| l.latency_ns),
        jitter_ns: record.latency.map_or(0, |l| l.jitter_ns),
        duplicate: record.net.impair_of(record.impair_direction).duplicate,
        corrupt: record.net.impair_of(record.impair_direction).corrupt,
        reorder: record.net.egress.impair.reorder,
        has_balance: record.ledger.is_some(),
    }
}

/// Applies the fault's actions as they fall due, until its end or a signal (Ctrl-C): either
/// way what was in force is put back before this returns. `step(runner, elapsed_ms, early)`
/// applies what is due, or everything left when `early`.
fn run_until_put_back(
    runner: &mut Runner,
    end_ms: u64,
    signals: &libc::sigset_t,
    mut step: impl FnMut(&mut Runner, u64, bool),
) {
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed().as_millis() as u64;
        if runner.due(elapsed) {
            step(runner, elapsed, false);
        }
        if runner.not_reached() == 0 {
            return;
        }
        // Wait for the end, or for a signal: either way the fault is put back now.
        let left =
            Duration::from_millis(end_ms.saturating_sub(elapsed)).min(Duration::from_millis(100));
        let timeout = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: sigtimedwait with a valid set, a null info pointer and a timeout.
        let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        if signal > 0 && signal != libc::SIGCHLD {
            eprintln!(
                "nbt fault: {} received: ending the fault now",
                crate::sys::supervise::signal_name(signal)
            );
            step(runner, started.elapsed().as_millis() as u64, true);
            return;
        }
    }
}

/// Appends the fault's events to the run's events file; the run merges them into its log.
/// The live run's cgroups: its own, or an attached target's (the target's own files).
fn cgroup_of(run: &str, record: &RunRecord) -> Result<RunCgroup> {
    let adopted = record
        .attached
        .as_ref()
        .filter(|a| !a.moved)
        .map(|a| &a.cgroups);
    RunCgroup::existing(&Layout::detect()?, run, adopted)
}

/// Logs a change made to the live run `run` outside the schedule's parser (`nbt set`'s network
/// flags and links) as one event from `source`, with the run's counters now.
pub fn record_change(run: &str, source: &str, what: &str) -> Result<()> {
    let dir = state_dir();
    let run = &crate::state::resolve_run(&dir, run)?;
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let mut cgroup = cgroup_of(run, &record)?;
    let shaped = record
        .maps
        .as_ref()
        .and_then(|ids| crate::enforce::shaper::read_by_id(ids).ok());
    let event = Event {
        t: crate::sys::proc::now_unix() - record.started_unix,
        kind: super::Origin::Step,
        source: source.to_string(),
        what: what.to_string(),
        error: None,
        counters: Counters::of(&cgroup.stats(), shaped.as_ref())
            .with_ledger(record.ledger.as_ref()),
        during: None,
    };
    append_events(&RunFiles::of(&dir, run).events, &[event])
}

fn append_events(path: &Path, events: &[Event]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("recording the fault in {}", path.display()))?;
    for event in events {
        writeln!(file, "{}", serde_json::to_string(event)?)?;
    }
    Ok(())
}

/// The balloon of a memory-leak fault: grows by `bytes_per_sec` every second, each page written
/// so that it is really charged to the run, until it is killed (or the OOM killer takes it).
pub fn balloon(bytes_per_sec: u64) -> ! {
    const PAGE: usize = 4096;
    let step = (bytes_per_sec / 10).max(PAGE as u64) as usize;
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; step];
        for i in (0..step).step_by(PAGE) {
            chunk[i] = 1;
        }
        held.push(chunk);
        std::thread::sleep(Duration::from_millis(100));
    }
}
