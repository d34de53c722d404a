//! The joules a run spent, by source, each figure labelled `measured` or `model`: a figure says
//! where it came from (docs/running.md, "Attribution").
//!
//! - `rapl`: the package energy counters of powercap (`/sys/class/powercap/intel-rapl:N`), read
//!   at the start and at each report, with the counter's wrap handled; the run is charged its
//!   share of the node's busy CPU time (from /proc/stat) of the node's energy over the interval.
//! - `model`: where no meter exists (VMs, this development machine), a busy CPU is taken to draw
//!   (TDP − idle) / CPUs above idle: the run's CPU time times that is its active energy.
//!
//! A run is charged through its cgroup's own CPU time (the kernel's account of the same thing
//! the agent's sampler reads per process, `sched` and `attribution`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Joules from one source, and whether they were metered or estimated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Joules {
    /// `rapl`, `nvml`, `model`
    pub source: String,
    /// `measured` or `model`
    pub label: String,
    pub joules: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Energy {
    pub joules: Vec<Joules>,
    /// Why a figure is missing or how it was made, in words.
    pub note: Option<String>,
}

impl Energy {
    pub fn total(&self) -> Option<f64> {
        (!self.joules.is_empty()).then(|| self.joules.iter().map(|j| j.joules).sum())
    }
}

/// Default model TDP per logical CPU, and the share of it drawn when idle.
pub const MODEL_TDP_WATTS_PER_CPU: f64 = 10.0;
pub const MODEL_IDLE_SHARE: f64 = 0.3;

#[derive(Debug, Clone, PartialEq)]
pub struct CpuModel {
    pub tdp_watts: f64,
    pub idle_watts: f64,
    pub cpus: usize,
}

impl CpuModel {
    pub fn for_this_host() -> CpuModel {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let tdp_watts = MODEL_TDP_WATTS_PER_CPU * cpus as f64;
        CpuModel {
            tdp_watts,
            idle_watts: tdp_watts * MODEL_IDLE_SHARE,
            cpus,
        }
    }

    /// Watts one busy CPU draws above idle.
    pub fn active_watts_per_cpu(&self) -> f64 {
        (self.tdp_watts - self.idle_watts) / self.cpus.max(1) as f64
    }

    pub fn active_joules(&self, cpu_seconds: f64) -> f64 {
        cpu_seconds * self.active_watts_per_cpu()
    }

    pub fn describe(&self) -> String {
        format!(
            "model: {:.0} W TDP for {} CPUs ({MODEL_TDP_WATTS_PER_CPU} W each, a stated default), \
             idle {:.0} W; a busy CPU draws {:.2} W above idle; no meter on this machine",
            self.tdp_watts,
            self.cpus,
            self.idle_watts,
            self.active_watts_per_cpu()
        )
    }
}

/// One powercap RAPL zone's energy counter.
#[derive(Debug, Clone)]
struct RaplZone {
    energy: PathBuf,
    range_uj: u64,
}

/// The package zones under `root` (`/sys/class/powercap` on a real machine).
fn rapl_zones(root: &Path) -> Vec<RaplZone> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut zones: Vec<RaplZone> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            // Packages are intel-rapl:N; their sub-zones (intel-rapl:N:M) are parts of them.
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("intel-rapl:") && n.matches(':').count() == 1)
        })
        .filter_map(|dir| {
            let range_uj = read_u64(&dir.join("max_energy_range_uj"))?;
            read_u64(&dir.join("energy_uj"))?;
            Some(RaplZone {
                energy: dir.join("energy_uj"),
                range_uj,
            })
        })
        .collect();
    zones.sort_by(|a, b| a.energy.cmp(&b.energy));
    zones
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Microjoules between two readings of a counter that wraps at `range`.
pub fn counter_delta(before: u64, after: u64, range: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        range - before + after
    }
}

/// The package counters under `powercap` as (µJ now, wrap range), in zone order; `None` when the
/// machine has no RAPL there.
pub fn rapl_counters(powercap: &Path) -> Option<Vec<(u64, u64)>> {
    let zones = rapl_zones(powercap);
    let counters: Vec<(u64, u64)> = zones
        .iter()
        .map(|z| (read_u64(&z.energy).unwrap_or(0), z.range_uj))
        .collect();
    (!counters.is_empty()).then_some(counters)
}

/// Busy CPU time of the whole node so far, seconds (user, nice, system, irq, softirq, steal).
pub fn node_busy_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| ticks.get(*i))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy as f64 / hz)
}

/// A reading: the run's CPU time, the node's busy time, each RAPL counter.
#[derive(Debug, Clone)]
struct Reading {
    run_cpu_seconds: f64,
    node_busy_seconds: f64,
    rapl_uj: Vec<u64>,
}

/// Meters one run: its energy since the start, or since the last task report.
pub struct RunMeter {
    model: CpuModel,
    zones: Vec<RaplZone>,
    start: Reading,
    last: Reading,
}

impl RunMeter {
    /// `run_cpu_seconds`: the run's CPU time now (0 at its start).
    pub fn start(run_cpu_seconds: f64) -> RunMeter {
        Self::start_with(Path::new("/sys/class/powercap"), run_cpu_seconds)
    }

    pub fn start_with(powercap: &Path, run_cpu_seconds: f64) -> RunMeter {
        let zones = rapl_zones(powercap);
        let reading = Self::read(&zones, run_cpu_seconds);
        RunMeter {
            model: CpuModel::for_this_host(),
            zones,
            start: reading.clone(),
            last: reading,
        }
    }

    fn read(zones: &[RaplZone], run_cpu_seconds: f64) -> Reading {
        Reading {
            run_cpu_seconds,
            node_busy_seconds: node_busy_seconds().unwrap_or(0.0),
            rapl_uj: zones
                .iter()
                .map(|z| read_u64(&z.energy).unwrap_or(0))
                .collect(),
        }
    }

    fn between(&self, from: &Reading, to: &Reading) -> Energy {
        let run_cpu = (to.run_cpu_seconds - from.run_cpu_seconds).max(0.0);
        if !self.zones.is_empty() {
            let node_uj: u64 = self
                .zones
                .iter()
                .zip(from.rapl_uj.iter().zip(&to.rapl_uj))
                .map(|(z, (a, b))| counter_delta(*a, *b, z.range_uj))
                .sum();
            // /proc/stat counts in ticks (10 ms at HZ=100), the run's cgroup in microseconds: over
            // a short interval the node can seem less busy than the run, which it cannot be.
            let node_busy = (to.node_busy_seconds - from.node_busy_seconds).max(run_cpu);
            let share = if node_busy > 0.0 {
                (run_cpu / node_busy).min(1.0)
            } else {
                0.0
            };
            return Energy {
                joules: vec![Joules {
                    source: "rapl".into(),
                    label: "measured".into(),
                    joules: node_uj as f64 / 1e6 * share,
                }],
                note: Some(format!(
                    "rapl: {:.1} J for {} package(s) over the interval, charged by the run's share of busy CPU time ({:.1}%)",
                    node_uj as f64 / 1e6,
                    self.zones.len(),
                    share * 100.0
                )),
            };
        }
        Energy {
            joules: vec![Joules {
                source: "model".into(),
                label: "model".into(),
                joules: self.model.active_joules(run_cpu),
            }],
            note: Some(format!(
                "{} (no RAPL under /sys/class/powercap); {run_cpu:.3} CPU s",
                self.model.describe()
            )),
        }
    }

    /// What was spent since the previous call (or the start).
    pub fn since_last(&mut self, run_cpu_seconds: f64) -> Energy {
        let now = Self::read(&self.zones, run_cpu_seconds);
        let energy = self.between(&self.last, &now);
        self.last = now;
        energy
    }

    /// What was spent since the start.
    pub fn total(&self, run_cpu_seconds: f64) -> Energy {
        let now = Self::read(&self.zones, run_cpu_seconds);
        self.between(&self.start, &now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_wrap() {
        assert_eq!(counter_delta(100, 250, 1000), 150);
        assert_eq!(counter_delta(900, 50, 1000), 150);
    }

    #[test]
    fn the_model_charges_cpu_time_at_the_stated_power() {
        let model = CpuModel {
            tdp_watts: 20.0,
            idle_watts: 6.0,
            cpus: 2,
        };
        assert_eq!(model.active_watts_per_cpu(), 7.0);
        assert_eq!(model.active_joules(3.0), 21.0);
        assert!(model.describe().contains("7.00 W above idle"));
    }

    #[test]
    fn rapl_read_from_a_powercap_tree_with_its_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let zone = dir.path().join("intel-rapl:0");
        fs::create_dir_all(zone.join("intel-rapl:0:0")).unwrap();
        fs::write(zone.join("max_energy_range_uj"), "1000000000\n").unwrap();
        fs::write(zone.join("energy_uj"), "999000000\n").unwrap();
        // A sub-zone is part of its package: not counted twice.
        let sub = dir.path().join("intel-rapl:0:0");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join("max_energy_range_uj"), "1000000000\n").unwrap();
        fs::write(sub.join("energy_uj"), "5\n").unwrap();
        let meter = RunMeter::start_with(dir.path(), 0.0);
        assert_eq!(meter.zones.len(), 1);
        fs::write(zone.join("energy_uj"), "4000000\n").unwrap();
        let energy = meter.total(0.0);
        assert_eq!(energy.joules[0].source, "rapl");
        assert_eq!(energy.joules[0].label, "measured");
        let note = energy.note.unwrap();
        // 1 J to the wrap, 4 J after it.
        assert!(note.starts_with("rapl: 5.0 J for 1 package(s)"), "{note}");
    }

    #[test]
    fn without_rapl_the_model_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut meter = RunMeter::start_with(dir.path(), 1.0);
        let energy = meter.since_last(3.0);
        assert_eq!(energy.joules[0].source, "model");
        assert_eq!(energy.joules[0].label, "model");
        let expected = CpuModel::for_this_host().active_joules(2.0);
        assert!((energy.joules[0].joules - expected).abs() < 1e-9);
        assert!(energy.note.unwrap().contains("no RAPL"));
        // The next interval starts where this one ended.
        assert_eq!(meter.since_last(3.0).joules[0].joules, 0.0);
    }
}
