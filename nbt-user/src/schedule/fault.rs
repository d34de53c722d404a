//! `nbt fault RUN KIND [DURATION]`: one fault injected into a live run from outside, through the
//! same parser and the same changes as a schedule's. This process applies the fault, waits, and
//! puts back what was in force; a signal (Ctrl-C) ends the wait early and still puts it back. The
//! events are appended to `<run>.events` beside the run's record, and the run merges them into
//! its own log when it ends.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::apply::{Controls, Counters, Event, Runner};
use super::parse::Initial;
use crate::enforce::cgroup::{Layout, RunCgroup};
use crate::error::PlanError;
use crate::state::{state_dir, RunRecord};

/// The options of `nbt fault`, as text (the schedule parser checks them).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct FaultArgs {
    /// brownout, network-drop, loss-burst, memory-squeeze, memory-leak, balance-shock
    pub kind: String,
    /// How long it lasts (not for balance-shock)
    pub duration: Option<String>,
    /// brownout: drop the CPU quota to this many cores instead of freezing the run
    #[arg(long, value_name = "CORES")]
    pub cpus: Option<String>,
    /// network-drop, loss-burst: egress, ingress or both
    #[arg(long, value_name = "DIR")]
    pub direction: Option<String>,
    /// loss-burst: the loss while it lasts (30%)
    #[arg(long, value_name = "PCT")]
    pub loss: Option<String>,
    /// memory-squeeze: the memory the run is squeezed to (64M)
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// balance-shock: the charge
    #[arg(long, value_name = "AMOUNT")]
    pub amount: Option<String>,
    /// memory-leak: how fast the balloon grows (10M, a size per second)
    #[arg(long, value_name = "SIZE/s")]
    pub rate: Option<String>,
}

impl FaultArgs {
    /// The fault as one `[[fault]]` of a schedule, starting at once.
    fn as_schedule(&self) -> String {
        let mut text = format!("[[fault]]\nkind = {:?}\nstart = \"0s\"\n", self.kind);
        for (key, value) in [
            ("duration", &self.duration),
            ("cpus", &self.cpus),
            ("direction", &self.direction),
            ("loss", &self.loss),
            ("memory", &self.memory),
            ("amount", &self.amount),
            ("rate", &self.rate),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("{key} = {value:?}\n"));
            }
        }
        text
    }
}

/// The file a run's outside events are appended to.
pub fn events_path(dir: &Path, run: &str) -> PathBuf {
    RunRecord::path(dir, run).with_extension("events")
}

/// The events `nbt fault` appended for `run`, removing the file.
pub fn take_outside_events(dir: &Path, run: &str) -> Vec<Event> {
    let path = events_path(dir, run);
    let events = fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = fs::remove_file(&path);
    events
}


/// Injects the fault; returns its events. A bad fault is a [`PlanError`] (a usage error).
pub fn inject(run: &str, args: &FaultArgs, signals: &libc::sigset_t) -> Result<Vec<Event>> {
    let dir = state_dir();
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let Some(net_ids) = record.maps else {
        bail!("run '{run}' has not loaded its BPF programs yet; try again in a moment");
    };
    let layout = Layout::detect()?;
    let mut cgroup = RunCgroup::existing(&layout, run)?;
    let initial = Initial {
        memory: cgroup.current_memory(),
        cpus: cgroup.current_cpus(),
        egress_rate: record.net.egress.rate_bits_per_sec,
        ingress_rate: record.net.ingress.rate_bits_per_sec,
        egress_loss: record.net.egress.loss,
        ingress_loss: record.net.ingress.loss,
        latency_ns: record.latency.map(|l| l.latency_ns),
        has_balance: record.ledger.is_some(),
    };
    let schedule = super::parse("(nbt fault)", &args.as_schedule(), &initial).map_err(|e| {
        PlanError(
            e.0.replace("--schedule (nbt fault), line 1: ", "")
                .replace("--schedule (nbt fault): ", ""),
        )
    })?;
    let mut controls = Controls {
        net: net_ids,
        edt_map: record.edt_map,
        ledger: record.ledger,
        state_dir: dir.clone(),
        run: run.to_string(),
        memory: initial.memory,
        balloon: None,
        gate_config: None,
    };
    let offset = crate::sys::proc::now_unix() - record.started_unix;
    let mut runner = Runner::new(&schedule.actions);
    let started = Instant::now();
    let end_ms = schedule.span_ms();
    loop {
        let elapsed = started.elapsed().as_millis() as u64;
        if runner.due(elapsed) {
            let shaped = crate::enforce::shaper::read_by_id(&net_ids).ok();
            let counters =
                Counters::of(&cgroup.stats(), shaped.as_ref()).with_ledger(record.ledger.as_ref());
            runner.run_due(elapsed, &mut controls, &cgroup, counters);
        }
        if runner.not_reached() == 0 {
            break;
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
            let shaped = crate::enforce::shaper::read_by_id(&net_ids).ok();
            let counters =
                Counters::of(&cgroup.stats(), shaped.as_ref()).with_ledger(record.ledger.as_ref());
            runner.finish_now(
                started.elapsed().as_millis() as u64,
                &mut controls,
                &cgroup,
                counters,
            );
            break;
        }
    }
    let mut events = runner.events;
    for event in &mut events {
        event.t += offset;
        event.source = format!("nbt fault {}", args.kind);
    }
    let path = events_path(&dir, run);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("recording the fault in {}", path.display()))?;
    for event in &events {
        writeln!(file, "{}", serde_json::to_string(event)?)?;
    }
    Ok(events)
}

/// The balloon of a memory-leak fault: grows by `bytes_per_sec` every second, each page written
/// so that it is really charged to the run, until it is killed (or the OOM killer takes it).
pub fn balloon(bytes_per_sec: u64) -> i32 {
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
