//! `GET /metrics`: the agent's figures and the live runs' in Prometheus' text format (the
//! per-run series are `run_metrics`'). The list, with types, units and labels, is in
//! docs/running.md ("/metrics").

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use prometheus_client::registry::Registry;

use crate::telemetry::attribution::Attribution;
use crate::telemetry::counters::Counted;

use super::exposition::{labels, Family, FloatCounter, FloatGauge, Labels};
use super::{Agent, GpuTelemetry, Shared, Telemetry};

type IntCounter = prometheus_client::metrics::counter::Counter;

/// The version `nbt --version` prints and the commit it was built from: `NBT_GIT_COMMIT` in
/// the build's environment, else "unknown".
fn register_build_info(registry: &mut Registry) {
    let info: Family<FloatGauge> = Default::default();
    let commit = env!("NBT_GIT_COMMIT");
    info.get_or_create(&labels(&[
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", if commit.is_empty() { "unknown" } else { commit }),
    ]))
    .set(1.0);
    registry.register(
        "nbt_build_info",
        "The nbt serving these metrics (value 1): its version and the commit it was built from",
        info,
    );
}

/// The attribution's figures as Prometheus families, in the names Kepler users know.
fn register_attribution(registry: &mut Registry, agent: &Agent, source: &str) {
    let t = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
    let a = &t.attribution;
    let active: Family<FloatCounter> = Default::default();
    active
        .get_or_create(&labels(&[("source", source)]))
        .inc_by(a.active_joules);
    registry.register(
        "nbt_node_cpu_active_joules",
        "Energy of the node's CPUs above idle since the agent started: what is attributed",
        active,
    );
    // Counts only where counted: a process or run without a series was not counted, not idle.
    let (processes, runs) = (
        register_processes(registry, a, source, t.counted),
        run_families(&t, source, t.counted),
    );
    match t.counted {
        Some(Counted::Pmu) => {
            registry.register(
                "nbt_process_cpu_cycles",
                "CPU cycles of a live process since the agent started, sampled at 99 Hz per CPU",
                processes.counts,
            );
            registry.register(
                "nbt_run_cpu_cycles",
                "CPU cycles of a live run's processes, exited ones included, sampled at 99 Hz per CPU",
                runs.counts,
            );
            registry.register(
                "nbt_process_cpu_instructions",
                "Instructions of a live process since the agent started, sampled at 99 Hz per CPU",
                processes.instructions,
            );
        }
        // The software cpu-clock counts nanoseconds: in seconds, under a name of its own.
        Some(Counted::CpuClock) => {
            registry.register(
                "nbt_process_sampled_cpu_clock_seconds",
                "The software cpu-clock of a live process, sampled like cycles at 99 Hz per CPU (--attribute-by sampled-cpu-clock)",
                processes.clock,
            );
            registry.register(
                "nbt_run_sampled_cpu_clock_seconds",
                "The software cpu-clock of a live run's processes, exited ones included, sampled like cycles (--attribute-by sampled-cpu-clock)",
                runs.clock,
            );
        }
        None => {}
    }
    registry.register(
        "nbt_run_cpu_joules",
        "Active CPU energy attributed to a live run's processes, exited ones included",
        runs.joules,
    );
    registry.register(
        "nbt_run_cpu_seconds",
        "On-CPU time of a live run's processes, exited ones included, as the agent's tracker read it",
        runs.seconds,
    );
    register_gpus(registry, &t.gpu);
    let lost: Family<IntCounter> = Default::default();
    lost.get_or_create(&labels(&[("what", "exit_records")]))
        .inc_by(t.losses.lost_exits);
    lost.get_or_create(&labels(&[("what", "map_full")]))
        .inc_by(t.losses.map_full);
    lost.get_or_create(&labels(&[("what", "counter_periods")]))
        .inc_by(t.losses.counter_misses);
    registry.register(
        "nbt_agent_tracker_lost",
        "What the process tracker could not see: exit records dropped, charges refused by a full map, counter periods unread",
        lost,
    );
}

/// What the per-CPU counters counted, per process or per run: cycles (a PMU), or the
/// cpu-clock's nanoseconds in seconds; instructions (a PMU).
#[derive(Default)]
struct Counts {
    counts: Family<IntCounter>,
    clock: Family<FloatCounter>,
    instructions: Family<IntCounter>,
}

impl Counts {
    /// Adds one process's or run's counts, as `counted` counted them.
    fn add(&self, l: &Labels, counted: Counted, counts: Option<u64>, instructions: Option<u64>) {
        match (counted, counts) {
            (Counted::Pmu, Some(cycles)) => {
                self.counts.get_or_create(l).inc_by(cycles);
            }
            (Counted::CpuClock, Some(ns)) => {
                self.clock.get_or_create(l).inc_by(ns as f64 / 1e9);
            }
            (_, None) => {}
        }
        if let (Counted::Pmu, Some(instructions)) = (counted, instructions) {
            self.instructions.get_or_create(l).inc_by(instructions);
        }
    }
}

/// Joules and seconds per live process, registered; their counts, for the caller to register
/// as counted.
fn register_processes(
    registry: &mut Registry,
    a: &Attribution,
    source: &str,
    counted: Option<Counted>,
) -> Counts {
    let process_joules: Family<FloatCounter> = Default::default();
    let process_seconds: Family<FloatCounter> = Default::default();
    let counts = Counts::default();
    for p in a.processes.values() {
        let pid = p.pid.to_string();
        let l = labels(&[("pid", &pid), ("comm", &p.comm), ("source", source)]);
        process_joules.get_or_create(&l).inc_by(p.joules);
        process_seconds.get_or_create(&l).inc_by(p.cpu_seconds);
        if let Some(counted) = counted {
            let l = labels(&[("pid", &pid), ("comm", &p.comm)]);
            counts.add(&l, counted, p.cycles, p.instructions);
        }
    }
    registry.register(
        "nbt_process_cpu_joules",
        "Active CPU energy attributed to a live process by its on-CPU time",
        process_joules,
    );
    registry.register(
        "nbt_process_cpu_seconds",
        "On-CPU time of a live process since the agent started, from the scheduler's runtime",
        process_seconds,
    );
    counts
}

/// Per live run, exited processes included: joules, seconds, and where counted its counts.
struct RunFamilies {
    joules: Family<FloatCounter>,
    seconds: Family<FloatCounter>,
    counts: Family<IntCounter>,
    clock: Family<FloatCounter>,
}

fn run_families(t: &Telemetry, source: &str, counted: Option<Counted>) -> RunFamilies {
    let a = &t.attribution;
    let counts = Counts::default();
    let (joules, seconds): (Family<FloatCounter>, Family<FloatCounter>) = Default::default();
    for (name, run) in t.runs.iter().filter(|(_, r)| r.live) {
        let energy = a.cgroups.get(&run.cgroup_id).copied().unwrap_or_default();
        let l = labels(&[("run", name), ("source", source)]);
        joules.get_or_create(&l).inc_by(energy.joules);
        seconds.get_or_create(&l).inc_by(energy.cpu_seconds);
        if let Some(counted) = counted {
            counts.add(&labels(&[("run", name)]), counted, energy.cycles, None);
        }
    }
    RunFamilies {
        joules,
        seconds,
        counts: counts.counts,
        clock: counts.clock,
    }
}

/// Energy per GPU, and per process on each GPU.
fn register_gpus(registry: &mut Registry, gpu: &GpuTelemetry) {
    let gpu_joules: Family<FloatCounter> = Default::default();
    for (index, (joules, _, _)) in &gpu.gpus {
        gpu_joules
            .get_or_create(&labels(&[("gpu", &index.to_string()), ("source", "nvml")]))
            .inc_by(*joules);
    }
    registry.register(
        "nbt_node_gpu_joules",
        "Energy of each GPU since the agent started (NVML energy counter, else integrated power)",
        gpu_joules,
    );
    let gpu_process: Family<FloatCounter> = Default::default();
    for ((pid, gpu), joules) in &gpu.processes {
        gpu_process
            .get_or_create(&labels(&[
                ("pid", &pid.to_string()),
                ("gpu", &gpu.to_string()),
                ("source", "nvml"),
            ]))
            .inc_by(*joules);
    }
    registry.register(
        "nbt_process_gpu_joules",
        "GPU energy attributed to a process by its SM utilisation share",
        gpu_process,
    );
}

pub(super) async fn metrics(State(agent): State<Shared>) -> Response {
    let (node_joules, source, bucket) = {
        let b = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
        (b.node_joules, b.source, b.joules)
    };
    let mut registry = Registry::default();
    let node: Family<FloatCounter> = Default::default();
    node.get_or_create(&labels(&[("source", source)]))
        .inc_by(node_joules);
    registry.register(
        "nbt_node_cpu_joules",
        "Energy of the node's CPUs since the agent started, by source (rapl: measured; model: estimated)",
        node.clone(),
    );
    register_attribution(&mut registry, &agent, source);
    let gauge: FloatGauge = Default::default();
    gauge.set(bucket);
    registry.register(
        "nbt_agent_bucket_joules",
        "Joules in the agent's bucket",
        gauge,
    );
    super::run_metrics::register(
        &mut registry,
        &crate::state::live::live_runs(),
        crate::state::live::orphan_names().len(),
    );
    register_build_info(&mut registry);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::super::exposition::escape;
    use super::*;

    #[test]
    fn label_values_are_escaped_and_build_info_is_one() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("two\nlines"), r"two\nlines");
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("nbt_build_info{{version=\"{version}\",commit=\"")),
            "{text}"
        );
        assert!(text.contains("# TYPE nbt_build_info gauge"), "{text}");
    }
}
