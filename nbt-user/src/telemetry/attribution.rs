//! Attribution: each interval, the node's active energy is split across processes by their share
//! of the cycles their CPUs counted (where the samplers read a PMU, `counters`), else of the CPU
//! time the kernel saw: Kepler's method. Cgroups (and so runs) get the sum of their processes.
//! Nothing is lost: an interval in which no process ran keeps its energy as `unattributed`, so
//! attributed + unattributed = active at every step.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::telemetry::sched::{CpuDelta, End};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessEnergy {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cpu_seconds: f64,
    /// Sampled counts, where counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycles: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instructions: Option<u64>,
    pub joules: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CgroupEnergy {
    pub cpu_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycles: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instructions: Option<u64>,
    pub joules: f64,
    /// Processes of this cgroup whose exit the kernel reported.
    pub exited_processes: u64,
}

#[derive(Debug, Default)]
pub struct Attribution {
    /// The node's energy above idle, summed over every interval.
    pub active_joules: f64,
    /// Active energy of intervals in which no process was seen on a CPU.
    pub unattributed_joules: f64,
    /// Intervals that were to be split by cycles but in which no sample found a process with
    /// any: split by CPU time instead.
    pub intervals_by_cpu_time: u64,
    /// Live processes by pid (tgid).
    pub processes: BTreeMap<u32, ProcessEnergy>,
    /// Every cgroup seen, live and exited processes together.
    pub cgroups: HashMap<u64, CgroupEnergy>,
}

impl Attribution {
    /// Splits `active_joules` across the processes of `deltas` by cycles when `by_cycles`,
    /// else by CPU time.
    pub fn interval(&mut self, active_joules: f64, deltas: &[CpuDelta], by_cycles: bool) {
        let total_ns: u64 = deltas.iter().map(|d| d.ns).sum();
        let total_cycles: u64 = deltas.iter().filter_map(|d| d.cycles).sum();
        let by_cycles = by_cycles && total_cycles > 0;
        if !by_cycles && total_ns > 0 && deltas.iter().any(|d| d.cycles.is_some()) {
            self.intervals_by_cpu_time += 1;
        }
        self.active_joules += active_joules;
        if total_ns == 0 && !by_cycles {
            self.unattributed_joules += active_joules;
        }
        for delta in deltas {
            let share = if by_cycles {
                delta.cycles.unwrap_or(0) as f64 / total_cycles as f64
            } else if total_ns > 0 {
                delta.ns as f64 / total_ns as f64
            } else {
                0.0
            };
            let joules = active_joules * share;
            let seconds = delta.ns as f64 / 1e9;
            let cgroup = self.cgroups.entry(delta.cgroup_id).or_default();
            cgroup.cpu_seconds += seconds;
            add(&mut cgroup.cycles, delta.cycles);
            add(&mut cgroup.instructions, delta.instructions);
            cgroup.joules += joules;
            if delta.end == End::Exited {
                cgroup.exited_processes += 1;
            }
            if delta.end == End::Running {
                let process = self.processes.entry(delta.tgid).or_default();
                process.pid = delta.tgid;
                process.comm.clone_from(&delta.comm);
                process.cgroup_id = delta.cgroup_id;
                process.cpu_seconds += seconds;
                add(&mut process.cycles, delta.cycles);
                add(&mut process.instructions, delta.instructions);
                process.joules += joules;
            } else {
                self.processes.remove(&delta.tgid);
            }
        }
    }

    /// What processes were given, over all time.
    pub fn attributed_joules(&self) -> f64 {
        self.cgroups.values().map(|c| c.joules).sum()
    }
}

/// Adds a counted figure to a total, which exists from the first counted figure on.
fn add(total: &mut Option<u64>, counted: Option<u64>) {
    if let Some(counted) = counted {
        *total.get_or_insert(0) += counted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(tgid: u32, cgroup_id: u64, ns: u64, end: End) -> CpuDelta {
        CpuDelta {
            tgid,
            cgroup_id,
            comm: format!("p{tgid}"),
            ns,
            cycles: None,
            instructions: None,
            end,
        }
    }

    fn counted(tgid: u32, cgroup_id: u64, ns: u64, cycles: u64) -> CpuDelta {
        CpuDelta {
            cycles: Some(cycles),
            instructions: Some(cycles / 2),
            ..delta(tgid, cgroup_id, ns, End::Running)
        }
    }

    #[test]
    fn energy_follows_cpu_time_and_is_conserved() {
        let mut a = Attribution::default();
        a.interval(
            9.0,
            &[
                delta(10, 1, 2_000_000, End::Running),
                delta(11, 2, 1_000_000, End::Running),
            ],
            false,
        );
        a.interval(
            3.0,
            &[
                delta(10, 1, 1_000_000, End::Exited),
                delta(12, 2, 2_000_000, End::Running),
            ],
            false,
        );
        assert_eq!(a.cgroups[&1].joules, 7.0);
        assert_eq!(a.cgroups[&2].joules, 5.0);
        assert_eq!(a.cgroups[&1].exited_processes, 1);
        assert!(!a.processes.contains_key(&10));
        assert_eq!(a.processes[&11].joules, 3.0);
        assert_eq!(a.processes[&12].joules, 2.0);
        assert_eq!(a.attributed_joules(), a.active_joules);
    }

    #[test]
    fn an_interval_without_cpu_time_is_kept_as_unattributed() {
        let mut a = Attribution::default();
        a.interval(2.0, &[], false);
        a.interval(1.0, &[delta(5, 1, 10, End::Swept)], false);
        assert_eq!(a.unattributed_joules, 2.0);
        assert_eq!(a.attributed_joules() + a.unattributed_joules, 3.0);
        // A swept tail is not an exit the kernel reported.
        assert_eq!(a.cgroups[&1].exited_processes, 0);
    }

    #[test]
    fn energy_follows_cycles_where_counted() {
        let mut a = Attribution::default();
        // Equal CPU time, but one process's CPU counted three times the cycles.
        a.interval(
            8.0,
            &[
                counted(1, 1, 1_000_000, 3_000),
                counted(2, 2, 1_000_000, 1_000),
            ],
            true,
        );
        assert_eq!(a.processes[&1].joules, 6.0);
        assert_eq!(a.processes[&2].joules, 2.0);
        assert_eq!(a.cgroups[&1].cycles, Some(3_000));
        assert_eq!(a.cgroups[&1].instructions, Some(1_500));
        assert_eq!(a.intervals_by_cpu_time, 0);
        // No sample found a process: CPU time decides, and the interval is counted as such.
        a.interval(
            2.0,
            &[counted(1, 1, 3_000_000, 0), counted(2, 2, 1_000_000, 0)],
            true,
        );
        assert_eq!(a.processes[&1].joules, 7.5);
        assert_eq!(a.intervals_by_cpu_time, 1);
        assert_eq!(a.attributed_joules(), 10.0);
        // Not counted: no cycle figure at all, not a zero.
        a.interval(1.0, &[delta(3, 3, 1, End::Running)], false);
        assert_eq!(a.processes[&3].cycles, None);
    }
}
