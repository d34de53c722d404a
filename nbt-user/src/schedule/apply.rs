//! Applying a schedule's changes to a live run, and the run's event log.
//!
//! Network changes go the way `nbt set` goes: into the shaper's maps and the run's record (so
//! `nbt ps` shows them and a later `nbt set` starts from them). Cgroup changes are written to the
//! run's own cgroup files.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{Action, Change, Origin};
use crate::enforce::cgroup::{CgroupStats, RunCgroup};
use crate::enforce::edt::Latency;
use crate::enforce::gate::LedgerIds;
use crate::enforce::shaper::ShapedTraffic;
use crate::state::live::change_network;

/// What a run can be changed through.
pub struct Controls {
    pub edt_map: Option<u32>,
    pub ledger: Option<LedgerIds>,
    pub run: String,
    /// The memory limit in force, for a v1 squeeze's end.
    pub memory: Option<u64>,
    /// The memory-leak balloon running in the run, if one is.
    pub balloon: Option<i32>,
    /// The gate's configuration map (prices), for runs with a balance.
    pub gate_config: Option<u32>,
}

impl Drop for Controls {
    /// A balloon never outlives what started it.
    fn drop(&mut self) {
        if let Some(pid) = self.balloon.take() {
            stop_balloon(pid);
        }
    }
}

fn stop_balloon(pid: i32) {
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Counters of the run at one moment, or their change over a fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub cpu_usec: u64,
    pub cpu_throttled_usec: u64,
    pub oom_kills: u64,
    pub psi_cpu_some_usec: u64,
    pub psi_memory_some_usec: u64,
    pub psi_memory_full_usec: u64,
    pub egress_dropped_packets: u64,
    pub ingress_dropped_packets: u64,
    /// Calls the balance gate refused (connect, sendmsg) and packets it dropped.
    #[serde(default)]
    pub blocked_calls: u64,
    #[serde(default)]
    pub blocked_packets: u64,
}

impl Counters {
    /// Adds the gate's counts, for runs with a balance.
    pub fn with_ledger(mut self, ledger: Option<&LedgerIds>) -> Counters {
        if let Some((_, _, kernel)) =
            ledger.and_then(|ids| crate::enforce::gate::read_ledger(ids).ok())
        {
            self.blocked_calls = kernel.blocked_calls;
            self.blocked_packets = kernel.blocked_packets;
        }
        self
    }

    pub fn of(stats: &CgroupStats, shaped: Option<&ShapedTraffic>) -> Counters {
        let p = stats.pressure.clone().unwrap_or_default();
        let dropped =
            |d: &nbt_common::shaper::ShaperStats| d.rate_dropped_packets + d.loss_dropped_packets;
        Counters {
            cpu_usec: stats.cpu_usage_usec.unwrap_or(0),
            cpu_throttled_usec: stats.cpu_throttled_usec.unwrap_or(0),
            oom_kills: stats.oom_kills.unwrap_or(0),
            psi_cpu_some_usec: p.cpu_some_usec.unwrap_or(0),
            psi_memory_some_usec: p.memory_some_usec.unwrap_or(0),
            psi_memory_full_usec: p.memory_full_usec.unwrap_or(0),
            egress_dropped_packets: shaped.map_or(0, |s| dropped(&s.egress)),
            ingress_dropped_packets: shaped.map_or(0, |s| dropped(&s.ingress)),
            blocked_calls: 0,
            blocked_packets: 0,
        }
    }

    /// `self − earlier`, field by field.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            cpu_usec: self.cpu_usec.saturating_sub(earlier.cpu_usec),
            cpu_throttled_usec: self
                .cpu_throttled_usec
                .saturating_sub(earlier.cpu_throttled_usec),
            oom_kills: self.oom_kills.saturating_sub(earlier.oom_kills),
            psi_cpu_some_usec: self
                .psi_cpu_some_usec
                .saturating_sub(earlier.psi_cpu_some_usec),
            psi_memory_some_usec: self
                .psi_memory_some_usec
                .saturating_sub(earlier.psi_memory_some_usec),
            psi_memory_full_usec: self
                .psi_memory_full_usec
                .saturating_sub(earlier.psi_memory_full_usec),
            egress_dropped_packets: self
                .egress_dropped_packets
                .saturating_sub(earlier.egress_dropped_packets),
            ingress_dropped_packets: self
                .ingress_dropped_packets
                .saturating_sub(earlier.ingress_dropped_packets),
            blocked_calls: self.blocked_calls.saturating_sub(earlier.blocked_calls),
            blocked_packets: self.blocked_packets.saturating_sub(earlier.blocked_packets),
        }
    }
}

/// One line of a run's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds after the workload started.
    pub t: f64,
    pub kind: Origin,
    pub source: String,
    pub what: String,
    /// Why the change could not be made, when it could not.
    pub error: Option<String>,
    /// The run's counters at this moment.
    pub counters: Counters,
    /// For a fault's end: what changed while it lasted.
    pub during: Option<Counters>,
}

/// Makes one change. Returns a note on how, where it matters.
pub fn apply(
    controls: &mut Controls,
    cgroup: &RunCgroup,
    change: &Change,
) -> Result<Option<String>> {
    match change {
        Change::PriceCall { micro } => {
            let Some(id) = controls.gate_config else {
                bail!("the run has no balance");
            };
            crate::enforce::gate::set_prices_by_id(id, Some(*micro), None).map(|()| None)
        }
        Change::PriceEgress { pico_per_byte } => {
            let Some(id) = controls.gate_config else {
                bail!("the run has no balance");
            };
            crate::enforce::gate::set_prices_by_id(id, None, Some(*pico_per_byte)).map(|()| None)
        }
        Change::Leak { bytes_per_sec } => {
            if let Some(pid) = controls.balloon.take() {
                stop_balloon(pid);
            }
            if let Some(rate) = bytes_per_sec {
                let exe = std::env::current_exe()?;
                let argv = [
                    exe.into_os_string(),
                    "balloon".into(),
                    rate.to_string().into(),
                ];
                let nbt = crate::sys::user::Identity::nbt_itself();
                let pid = crate::sys::supervise::spawn(&argv, &cgroup.procs_files(), &[], &nbt)
                    .map_err(|e| anyhow::anyhow!("starting the balloon: {e}"))?;
                controls.balloon = Some(pid);
                return Ok(Some(format!("pid {pid}")));
            }
            Ok(None)
        }
        Change::Memory { bytes } => cgroup.set_memory(*bytes).map(|()| None),
        Change::Swap { bytes } => cgroup.set_swap(*bytes).map(|()| None),
        Change::Cpus { millicores } => cgroup.set_cpus(*millicores).map(|()| None),
        Change::Pids { count } => cgroup.set_pids(*count).map(|()| None),
        Change::Freeze { frozen } => cgroup.freeze(*frozen).map(|()| None),
        Change::MemoryHigh { bytes } => {
            let file = cgroup.squeeze_memory(*bytes, controls.memory)?;
            Ok(Some(format!("through {file}")))
        }
        Change::Balance { micro } => {
            if controls.ledger.is_none() {
                bail!("the run has no balance");
            }
            // Under the records' lock, as `nbt balance` tops up: neither loses the other's.
            let balance = crate::state::live::top_up(&controls.run, *micro)?;
            Ok(Some(format!(
                "balance now {}",
                crate::enforce::ledger::format_amount(balance)
            )))
        }
        Change::Latency { .. }
        | Change::Duplicate { .. }
        | Change::Corrupt { .. }
        | Change::Reorder { .. }
        | Change::EgressRate { .. }
        | Change::IngressRate { .. }
        | Change::EgressLoss { .. }
        | Change::IngressLoss { .. } => apply_network(controls, change).map(|()| None),
    }
}

/// A change of the run's network limits or delay, through the path `nbt set` takes.
fn apply_network(controls: &Controls, change: &Change) -> Result<()> {
    if let Change::Latency { ns } = change {
        if controls.edt_map.is_none() {
            bail!("the run was started without --latency");
        }
        change_network(&controls.run, |setting| {
            setting.latency = Some(Latency {
                latency_ns: *ns,
                jitter_ns: setting.latency.map_or(0, |l| l.jitter_ns),
                correlation: setting.latency.map_or(0.0, |l| l.correlation),
            });
            Ok(())
        })?;
        return Ok(());
    }
    // From the record: `nbt set` may have changed the other limits meanwhile.
    change_network(&controls.run, |setting| {
        let impair = setting.impair_direction;
        let net = &mut setting.net;
        match change {
            Change::EgressRate { bits_per_sec } => {
                net.egress.rate_bits_per_sec = *bits_per_sec;
            }
            Change::IngressRate { bits_per_sec } => {
                net.ingress.rate_bits_per_sec = *bits_per_sec;
            }
            Change::EgressLoss { loss } => net.egress.loss = *loss,
            Change::IngressLoss { loss } => net.ingress.loss = *loss,
            // Where the run started them (`--impair-direction`).
            Change::Duplicate { fraction } => {
                net.impair_mut(impair).for_each(|i| i.duplicate = *fraction)
            }
            Change::Corrupt { fraction } => {
                net.impair_mut(impair).for_each(|i| i.corrupt = *fraction)
            }
            Change::Reorder { fraction } => net.egress.impair.reorder = *fraction,
            _ => unreachable!("a network change"),
        }
        Ok(())
    })?;
    Ok(())
}

/// Applies the actions whose time has come, logging each.
pub struct Runner {
    pending: std::collections::VecDeque<Action>,
    pub events: Vec<Event>,
    /// Counters at each open fault's start, by source.
    open: Vec<(String, Counters)>,
}

impl Runner {
    pub fn new(actions: &[Action]) -> Runner {
        Runner {
            pending: actions.iter().cloned().collect(),
            events: Vec::new(),
            open: Vec::new(),
        }
    }

    /// Whether an action is due at `elapsed_ms`.
    pub fn due(&self, elapsed_ms: u64) -> bool {
        self.pending.front().is_some_and(|a| a.at_ms <= elapsed_ms)
    }

    /// When the next action is due, in milliseconds from the run's start (`None`: none is left).
    pub fn next_at_ms(&self) -> Option<u64> {
        self.pending.front().map(|a| a.at_ms)
    }

    /// Applies what is due; `counters` reads the run's counters now.
    pub fn run_due(
        &mut self,
        elapsed_ms: u64,
        controls: &mut Controls,
        cgroup: &RunCgroup,
        counters: Counters,
    ) {
        while self.pending.front().is_some_and(|a| a.at_ms <= elapsed_ms) {
            let action = self.pending.pop_front().expect("checked above");
            let mut notes = Vec::new();
            let mut errors = Vec::new();
            for change in &action.changes {
                match apply(controls, cgroup, change) {
                    Ok(note) => notes.extend(note),
                    Err(err) => errors.push(format!("{}: {err:#}", change.describe())),
                }
                if let Change::Memory { bytes } = change {
                    controls.memory = *bytes;
                }
            }
            let during = match action.origin {
                Origin::FaultStart => {
                    self.open.push((action.source.clone(), counters));
                    None
                }
                Origin::FaultEnd => self
                    .open
                    .iter()
                    .position(|(s, _)| *s == action.source)
                    .map(|i| counters.since(&self.open.remove(i).1)),
                _ => None,
            };
            let mut what: Vec<String> = action.changes.iter().map(Change::describe).collect();
            what.extend(notes);
            self.events.push(Event {
                t: elapsed_ms as f64 / 1000.0,
                kind: action.origin.clone(),
                source: action.source,
                what: what.join(", "),
                error: (!errors.is_empty()).then(|| errors.join("; ")),
                counters,
                during,
            });
        }
    }

    /// Applies everything still pending at once (a fault ended early).
    pub fn finish_now(
        &mut self,
        elapsed_ms: u64,
        controls: &mut Controls,
        cgroup: &RunCgroup,
        counters: Counters,
    ) {
        for action in &mut self.pending {
            action.at_ms = elapsed_ms;
        }
        self.run_due(elapsed_ms, controls, cgroup, counters);
    }

    /// The actions the run ended before.
    pub fn not_reached(&self) -> usize {
        self.pending.len()
    }
}
