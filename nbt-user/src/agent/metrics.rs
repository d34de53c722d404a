//! `GET /metrics`: the agent's figures and the live runs' in Prometheus' text format.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use prometheus_client::registry::Registry;

use crate::telemetry::attribution::Attribution;
use crate::telemetry::counters::Counted;

use super::{Agent, GpuTelemetry, Shared, Telemetry};

type Labels = Vec<(String, String)>;
type FloatCounter = prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;
type IntCounter = prometheus_client::metrics::counter::Counter;
type FloatGauge = prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;
type Family<M> = prometheus_client::metrics::family::Family<Labels, M>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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
    let counter = t.counted.map(Counted::ratio);
    let (process_cycles, process_instructions) = register_processes(registry, a, source, counter);
    let (run_joules, run_seconds, run_cycles) = run_families(&t, source, counter);
    if let Some(counted) = t.counted {
        registry.register(
            "nbt_process_cpu_cycles",
            "CPU cycles of a live process since the agent started, sampled at 99 Hz per CPU",
            process_cycles,
        );
        registry.register(
            "nbt_run_cpu_cycles",
            "CPU cycles of a live run's processes, exited ones included, sampled at 99 Hz per CPU",
            run_cycles,
        );
        if counted == Counted::Pmu {
            registry.register(
                "nbt_process_cpu_instructions",
                "Instructions of a live process since the agent started, sampled at 99 Hz per CPU",
                process_instructions,
            );
        }
    }
    registry.register(
        "nbt_run_cpu_joules",
        "Active CPU energy attributed to a live run's processes, exited ones included",
        run_joules,
    );
    registry.register(
        "nbt_run_cpu_seconds",
        "On-CPU time of a live run's processes, exited ones included",
        run_seconds,
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

/// Joules and seconds per live process; their cycles and instructions, registered by the
/// caller only where counted.
fn register_processes(
    registry: &mut Registry,
    a: &Attribution,
    source: &str,
    counter: Option<&str>,
) -> (Family<IntCounter>, Family<IntCounter>) {
    let process_joules: Family<FloatCounter> = Default::default();
    let process_seconds: Family<FloatCounter> = Default::default();
    let process_cycles: Family<IntCounter> = Default::default();
    let process_instructions: Family<IntCounter> = Default::default();
    for p in a.processes.values() {
        let pid = p.pid.to_string();
        let l = labels(&[("pid", &pid), ("comm", &p.comm), ("source", source)]);
        process_joules.get_or_create(&l).inc_by(p.joules);
        process_seconds.get_or_create(&l).inc_by(p.cpu_seconds);
        if let Some(counter) = counter {
            let l = labels(&[("pid", &pid), ("comm", &p.comm), ("counter", counter)]);
            if let Some(cycles) = p.cycles {
                process_cycles.get_or_create(&l).inc_by(cycles);
            }
            if let Some(instructions) = p.instructions {
                process_instructions.get_or_create(&l).inc_by(instructions);
            }
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
    (process_cycles, process_instructions)
}

/// Joules, seconds and (where counted) cycles per live run, exited processes included.
fn run_families(
    t: &Telemetry,
    source: &str,
    counter: Option<&str>,
) -> (
    Family<FloatCounter>,
    Family<FloatCounter>,
    Family<IntCounter>,
) {
    let a = &t.attribution;
    let run_joules: Family<FloatCounter> = Default::default();
    let run_seconds: Family<FloatCounter> = Default::default();
    let run_cycles: Family<IntCounter> = Default::default();
    for (name, run) in t.runs.iter().filter(|(_, r)| r.live) {
        let energy = a.cgroups.get(&run.cgroup_id).copied().unwrap_or_default();
        let l = labels(&[("run", name), ("source", source)]);
        run_joules.get_or_create(&l).inc_by(energy.joules);
        run_seconds.get_or_create(&l).inc_by(energy.cpu_seconds);
        if let (Some(counter), Some(cycles)) = (counter, energy.cycles) {
            run_cycles
                .get_or_create(&labels(&[("run", name), ("counter", counter)]))
                .inc_by(cycles);
        }
    }
    (run_joules, run_seconds, run_cycles)
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
    node.get_or_create(&vec![("source".into(), source.to_string())])
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
    let bytes: Family<prometheus_client::metrics::counter::Counter> = Default::default();
    let drops: Family<prometheus_client::metrics::counter::Counter> = Default::default();
    let balance: Family<FloatGauge> = Default::default();
    for run in crate::state::live::live_runs() {
        if let Some(shaped) = run.shaped {
            for (direction, traffic) in [("egress", shaped.egress), ("ingress", shaped.ingress)] {
                let labels = |extra: Vec<(String, String)>| {
                    let mut l = vec![
                        ("run".to_string(), run.run.clone()),
                        ("direction".to_string(), direction.to_string()),
                    ];
                    l.extend(extra);
                    l
                };
                bytes
                    .get_or_create(&labels(vec![]))
                    .inc_by(traffic.passed_bytes);
                drops
                    .get_or_create(&labels(vec![("reason".into(), "rate".into())]))
                    .inc_by(traffic.rate_dropped_packets);
                drops
                    .get_or_create(&labels(vec![("reason".into(), "loss".into())]))
                    .inc_by(traffic.loss_dropped_packets);
            }
        }
        if let Some(micro) = run.balance_micro {
            balance
                .get_or_create(&vec![("run".into(), run.run.clone())])
                .set(micro as f64 / 1e6);
        }
    }
    registry.register(
        "nbt_run_passed_bytes",
        "Bytes a live run's shaper passed",
        bytes,
    );
    registry.register(
        "nbt_run_dropped_packets",
        "Packets a live run's shaper dropped, by reason",
        drops,
    );
    registry.register("nbt_run_balance", "A live run's balance", balance);
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
