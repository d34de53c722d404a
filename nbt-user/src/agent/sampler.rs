//! The agent's sampler thread: every interval, the node's power (RAPL, else the CPU model), the
//! joule bucket, and the attribution of the active energy to processes and runs.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::telemetry::counters::AttributeBy;
use crate::telemetry::energy::{counter_delta, node_busy_seconds, rapl_counters, CpuModel};
use crate::telemetry::gpu::GpuMeter;
use crate::telemetry::sched::ProcessTracker;

use super::{SeenRun, Shared, ENDED_RUNS_KEPT, EXIT_DRAIN_PERIOD, IDLE_WINDOW};

/// Sleeps until `deadline`, draining exit records meanwhile.
fn wait_draining(deadline: Instant, tracker: &mut Option<ProcessTracker>) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(EXIT_DRAIN_PERIOD));
        if let Some(tracker) = tracker {
            tracker.drain_exits();
        }
    }
}

/// Every live run's name and the cgroup v2 id its processes are charged to.
fn live_run_cgroups() -> Vec<(String, u64)> {
    crate::state::RunRecord::read_all(&crate::state::state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|record| record.supervisor_alive())
        .filter_map(|record| {
            let id = record
                .cgroups
                .iter()
                .find_map(|dir| crate::telemetry::sched::cgroup_id(dir))?;
            Some((record.name, id))
        })
        .collect()
}

fn note_runs(runs: &mut std::collections::BTreeMap<String, SeenRun>, live: Vec<(String, u64)>) {
    let next = runs.values().map(|r| r.order + 1).max().unwrap_or(0);
    for run in runs.values_mut() {
        run.live = false;
    }
    for (i, (name, cgroup_id)) in live.into_iter().enumerate() {
        runs.entry(name)
            .and_modify(|r| r.live = true)
            .or_insert(SeenRun {
                cgroup_id,
                live: true,
                order: next + i as u64,
            });
    }
    while runs.len() > ENDED_RUNS_KEPT {
        let Some(oldest) = runs
            .iter()
            .filter(|(_, r)| !r.live)
            .min_by_key(|(_, r)| r.order)
            .map(|(name, _)| name.clone())
        else {
            break;
        };
        runs.remove(&oldest);
    }
}

pub(super) fn sampler(
    agent: Shared,
    interval: Duration,
    model: CpuModel,
    attribute_by: AttributeBy,
) {
    let mut tracker = attach_tracker(&agent, attribute_by);
    let mut gpu_meter = open_gpu_meter(&agent);
    let mut power = NodePower::new(model);
    let mut last = Instant::now();
    loop {
        wait_draining(last + interval, &mut tracker);
        let dt = last.elapsed().as_secs_f64().max(1e-3);
        last = Instant::now();
        let (gross_w, source, label) = power.sample(dt);
        let deltas = match tracker.as_mut().map(ProcessTracker::take) {
            Some(Ok(deltas)) => deltas,
            Some(Err(err)) => {
                eprintln!("nbt agent: reading the process map: {err:#}");
                Vec::new()
            }
            None => Vec::new(),
        };
        let live_runs = live_run_cgroups();
        let gpu_intervals = gpu_meter.as_mut().map(|m| m.sample()).unwrap_or_default();
        let net = {
            let mut bucket = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let idle_w = power.idle_watts(source, gross_w, bucket.idle_w);
            let net = (gross_w - idle_w).max(0.0) * dt;
            bucket.joules += net;
            bucket.deposited += net;
            bucket.node_joules += gross_w * dt;
            bucket.gross_w = gross_w;
            bucket.idle_w = idle_w;
            bucket.source = source;
            bucket.label = label;
            bucket.sampled_unix = crate::sys::proc::now_unix();
            net
        };
        let mut telemetry = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
        if tracker.is_some() {
            let by_counts = telemetry.counted.is_some();
            telemetry.attribution.interval(net, &deltas, by_counts);
        }
        if let Some(tracker) = &tracker {
            telemetry.losses = tracker.losses();
        }
        note_runs(&mut telemetry.runs, live_runs);
        telemetry.gpu.add(gpu_intervals);
        telemetry.intervals += 1;
    }
}

/// The per-process tracker, attached node-wide; what it counts (or why not) goes into the
/// agent's telemetry. None when it cannot attach: the agent still meters the node.
fn attach_tracker(agent: &Shared, attribute_by: AttributeBy) -> Option<ProcessTracker> {
    let attached = ProcessTracker::attach(attribute_by);
    let mut telemetry = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
    match attached {
        Ok(tracker) => {
            match (tracker.counted(), tracker.counters_absent()) {
                (Some(counted), _) => {
                    eprintln!("nbt agent: attribution by {}", counted.ratio());
                    if let Some(why) = tracker.instructions_absent() {
                        eprintln!("nbt agent: instructions are not counted: {why}");
                        telemetry.instructions_absent = Some(why.to_string());
                    }
                    telemetry.counted = Some(counted);
                }
                (None, why) => {
                    let why = why.unwrap_or("no counters");
                    eprintln!("nbt agent: attribution by CPU time: {why}");
                    telemetry.counters_absent = Some(why.to_string());
                }
            }
            Some(tracker)
        }
        Err(err) => {
            eprintln!("nbt agent: per-process attribution is off: {err:#}");
            telemetry.tracker = Some(format!("{err:#}"));
            telemetry.counters_absent = Some(format!("{err:#}"));
            None
        }
    }
}

/// NVML's meter of every GPU, or None (and why, in the telemetry) without the driver.
fn open_gpu_meter(agent: &Shared) -> Option<GpuMeter> {
    match GpuMeter::open() {
        Ok(meter) => {
            eprintln!("nbt agent: nvml: {} GPU(s) metered", meter.gpus());
            Some(meter)
        }
        Err(why) => {
            eprintln!("nbt agent: nvml: {why}; GPU energy is not measured");
            agent
                .telemetry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .gpu
                .absent = Some(why);
            None
        }
    }
}

/// The node's CPU power between samples: RAPL's counters where powercap has them, else the
/// stated model driven by the node's busy CPU time; and its idle power.
struct NodePower {
    model: CpuModel,
    started: Instant,
    last_busy: f64,
    last_rapl: Option<Vec<(u64, u64)>>,
    idle_sum: f64,
    idle_n: u32,
}

impl NodePower {
    const POWERCAP: &'static str = "/sys/class/powercap";

    fn new(model: CpuModel) -> NodePower {
        NodePower {
            model,
            started: Instant::now(),
            last_busy: node_busy_seconds().unwrap_or(0.0),
            last_rapl: rapl_counters(Path::new(Self::POWERCAP)),
            idle_sum: 0.0,
            idle_n: 0,
        }
    }

    /// Watts over the last `dt` seconds, with their source and label.
    fn sample(&mut self, dt: f64) -> (f64, &'static str, &'static str) {
        let model = &self.model;
        let busy = node_busy_seconds().unwrap_or(self.last_busy);
        let utilisation = ((busy - self.last_busy) / dt / model.cpus as f64).clamp(0.0, 1.0);
        self.last_busy = busy;
        let rapl = rapl_counters(Path::new(Self::POWERCAP));
        let sampled = match (&self.last_rapl, &rapl) {
            (Some(before), Some(after)) if before.len() == after.len() => {
                let uj: u64 = before
                    .iter()
                    .zip(after)
                    .map(|((a, range), (b, _))| counter_delta(*a, *b, *range))
                    .sum();
                (uj as f64 / 1e6 / dt, "rapl", "measured")
            }
            _ => (
                model.idle_watts + (model.tdp_watts - model.idle_watts) * utilisation,
                "model",
                "model",
            ),
        };
        self.last_rapl = rapl;
        sampled
    }

    /// The idle power to subtract: the model's stated idle; a meter's average over the first
    /// `IDLE_WINDOW`, then frozen at `frozen`.
    fn idle_watts(&mut self, source: &str, gross_w: f64, frozen: f64) -> f64 {
        if source == "model" {
            self.model.idle_watts
        } else if self.started.elapsed() < IDLE_WINDOW {
            self.idle_sum += gross_w;
            self.idle_n += 1;
            self.idle_sum / f64::from(self.idle_n)
        } else {
            frozen
        }
    }
}
