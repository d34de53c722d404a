//! Attribution: each interval, the node's active energy is split across processes by their share
//! of the CPU time the kernel saw (Kepler's method with CPU time as the ratio; the hardware-cycle
//! ratio needs a PMU, which nbt does not use yet). Cgroups (and so runs) get the sum of their
//! processes. Nothing is lost: an interval in which no process ran keeps its energy as
//! `unattributed`, so attributed + unattributed = active at every step.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::sched::{CpuDelta, End};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessEnergy {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cpu_seconds: f64,
    pub joules: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CgroupEnergy {
    pub cpu_seconds: f64,
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
    /// Live processes by pid (tgid).
    pub processes: BTreeMap<u32, ProcessEnergy>,
    /// Every cgroup seen, live and exited processes together.
    pub cgroups: HashMap<u64, CgroupEnergy>,
}

impl Attribution {
    /// Splits `active_joules` across the processes of `deltas` by CPU time.
    pub fn interval(&mut self, active_joules: f64, deltas: &[CpuDelta]) {
        let total_ns: u64 = deltas.iter().map(|d| d.ns).sum();
        self.active_joules += active_joules;
        if total_ns == 0 {
            self.unattributed_joules += active_joules;
        }
        for delta in deltas {
            let share = if total_ns > 0 {
                delta.ns as f64 / total_ns as f64
            } else {
                0.0
            };
            let joules = active_joules * share;
            let seconds = delta.ns as f64 / 1e9;
            let cgroup = self.cgroups.entry(delta.cgroup_id).or_default();
            cgroup.cpu_seconds += seconds;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(tgid: u32, cgroup_id: u64, ns: u64, end: End) -> CpuDelta {
        CpuDelta {
            tgid,
            cgroup_id,
            comm: format!("p{tgid}"),
            ns,
            end,
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
        );
        a.interval(
            3.0,
            &[
                delta(10, 1, 1_000_000, End::Exited),
                delta(12, 2, 2_000_000, End::Running),
            ],
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
        a.interval(2.0, &[]);
        a.interval(1.0, &[delta(5, 1, 10, End::Swept)]);
        assert_eq!(a.unattributed_joules, 2.0);
        assert_eq!(a.attributed_joules() + a.unattributed_joules, 3.0);
        // A swept tail is not an exit the kernel reported.
        assert_eq!(a.cgroups[&1].exited_processes, 0);
    }
}
