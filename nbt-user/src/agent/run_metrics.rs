//! `/metrics`' per-run series: what each live run holds, uses and is limited to, as of its last
//! sample (`telemetry::series`, written by its supervisor each `--series-interval`, 1 s by
//! default, and read here at scrape time through `state::live`).
//!
//! Names follow Prometheus' conventions (and Kepler's and cAdvisor's where they have the same
//! figure): base units (bytes, seconds, joules, ratios, bytes per second), counters with
//! `_total` (the encoder adds it), gauges without. Every series carries `run`; the command is on
//! `nbt_run_info` only, so a long command line is not repeated on every series. A figure a run
//! does not have (no such limit, no cgroup controller, no balance) is absent, not zero.
//!
//! The registry is made anew at each scrape from the runs alive then, so a run's series are gone
//! from the first scrape after it ends. Runs whose nbt died (orphans) are not reported: nothing
//! samples them, and their last sample would be served as if it were current. `nbt_runs` counts
//! both kinds.

use prometheus_client::registry::Registry;

use crate::state::live::LiveRun;

use super::exposition::{labels, Family, FloatCounter, FloatGauge};

#[derive(Clone, Copy)]
enum Type {
    Counter,
    Gauge,
}

/// One column of a run's series and where it goes: the family (without `_total`), its type, its
/// help, the extra labels of this column, and the factor that makes its unit a base unit.
struct Column {
    column: &'static str,
    family: &'static str,
    kind: Type,
    help: &'static str,
    labels: &'static [(&'static str, &'static str)],
    scale: f64,
}

const fn column(
    column: &'static str,
    family: &'static str,
    kind: Type,
    help: &'static str,
    labels: &'static [(&'static str, &'static str)],
) -> Column {
    Column {
        column,
        family,
        kind,
        help,
        labels,
        scale: 1.0,
    }
}

use Type::{Counter, Gauge};

const EGRESS: &[(&str, &str)] = &[("direction", "egress")];
const INGRESS: &[(&str, &str)] = &[("direction", "ingress")];

const PASSED_PACKETS: &str = "Packets the run's shaper passed, every link's, by direction";
const PASSED_BYTES: &str = "Bytes the run's shaper passed, every link's, by direction";
const DROPPED_PACKETS: &str =
    "Packets the run's shaper dropped, every link's, by direction and reason (rate: over the rate limit; loss: --loss)";
const DROPPED_BYTES: &str =
    "Bytes the run's shaper dropped, every link's, by direction and reason (rate: over the rate limit; loss: --loss)";
const RATE_LIMIT: &str = "The run's rate limit in force, by direction (absent: none)";
const LOSS: &str = "The run's mean loss ratio in force (--loss), by direction";
const WAITING: &str =
    "Time some of the run's tasks were stalled on a resource (PSI some), by resource";
const STALLED: &str =
    "Time all of the run's non-idle tasks were stalled on a resource at once (PSI full), by resource";
const CALLS: &str =
    "Calls (connections, requests, datagrams to gated destinations) the run's balance was charged for (outcome=charged) or refused (outcome=blocked)";

/// Every column that becomes a series, in the order of `telemetry::series::COLUMNS`.
#[rustfmt::skip]
const COLUMNS: &[Column] = &[
    column("memory_bytes", "nbt_run_memory_bytes", Gauge, "Memory the run's cgroup holds", &[]),
    column("memory_limit_bytes", "nbt_run_memory_limit_bytes", Gauge, "The run's memory limit in force (absent: none)", &[]),
    column("swap_bytes", "nbt_run_swap_bytes", Gauge, "Swap the run's cgroup holds", &[]),
    column("swap_limit_bytes", "nbt_run_swap_limit_bytes", Gauge, "The run's swap limit in force (absent: none)", &[]),
    column("cpu_seconds", "nbt_run_cpu_usage_seconds", Counter, "CPU time of the run's cgroup, from its own accounting (cAdvisor's container_cpu_usage_seconds_total)", &[]),
    column("cpu_limit_cores", "nbt_run_cpu_limit_cores", Gauge, "The run's CPU limit in force, in cores: CPU seconds per second (absent: none)", &[]),
    column("cpu_throttled_seconds", "nbt_run_cpu_throttled_seconds", Counter, "Time the run's cgroup was held back by its CPU limit", &[]),
    column("pids", "nbt_run_pids", Gauge, "Tasks in the run's cgroup", &[]),
    column("pids_limit", "nbt_run_pids_limit", Gauge, "The run's limit on tasks in force (absent: none)", &[]),
    column("oom_kills", "nbt_run_oom_kills", Counter, "Processes of the run killed for memory by the kernel", &[]),
    column("psi_cpu_some_seconds", "nbt_run_pressure_waiting_seconds", Counter, WAITING, &[("resource", "cpu")]),
    column("psi_memory_some_seconds", "nbt_run_pressure_waiting_seconds", Counter, WAITING, &[("resource", "memory")]),
    column("psi_memory_full_seconds", "nbt_run_pressure_stalled_seconds", Counter, STALLED, &[("resource", "memory")]),
    column("psi_io_some_seconds", "nbt_run_pressure_waiting_seconds", Counter, WAITING, &[("resource", "io")]),
    column("egress_passed_packets", "nbt_run_passed_packets", Counter, PASSED_PACKETS, EGRESS),
    column("egress_passed_bytes", "nbt_run_passed_bytes", Counter, PASSED_BYTES, EGRESS),
    column("egress_rate_dropped_packets", "nbt_run_dropped_packets", Counter, DROPPED_PACKETS, &[("direction", "egress"), ("reason", "rate")]),
    column("egress_rate_dropped_bytes", "nbt_run_dropped_bytes", Counter, DROPPED_BYTES, &[("direction", "egress"), ("reason", "rate")]),
    column("egress_lost_packets", "nbt_run_dropped_packets", Counter, DROPPED_PACKETS, &[("direction", "egress"), ("reason", "loss")]),
    column("egress_lost_bytes", "nbt_run_dropped_bytes", Counter, DROPPED_BYTES, &[("direction", "egress"), ("reason", "loss")]),
    column("ingress_passed_packets", "nbt_run_passed_packets", Counter, PASSED_PACKETS, INGRESS),
    column("ingress_passed_bytes", "nbt_run_passed_bytes", Counter, PASSED_BYTES, INGRESS),
    column("ingress_rate_dropped_packets", "nbt_run_dropped_packets", Counter, DROPPED_PACKETS, &[("direction", "ingress"), ("reason", "rate")]),
    column("ingress_rate_dropped_bytes", "nbt_run_dropped_bytes", Counter, DROPPED_BYTES, &[("direction", "ingress"), ("reason", "rate")]),
    column("ingress_lost_packets", "nbt_run_dropped_packets", Counter, DROPPED_PACKETS, &[("direction", "ingress"), ("reason", "loss")]),
    column("ingress_lost_bytes", "nbt_run_dropped_bytes", Counter, DROPPED_BYTES, &[("direction", "ingress"), ("reason", "loss")]),
    Column {
        scale: 1.0 / 8.0,
        ..column("egress_rate_limit_bits_per_second", "nbt_run_rate_limit_bytes_per_second", Gauge, RATE_LIMIT, EGRESS)
    },
    Column {
        scale: 1.0 / 8.0,
        ..column("ingress_rate_limit_bits_per_second", "nbt_run_rate_limit_bytes_per_second", Gauge, RATE_LIMIT, INGRESS)
    },
    column("egress_loss_ratio", "nbt_run_loss_ratio", Gauge, LOSS, EGRESS),
    column("ingress_loss_ratio", "nbt_run_loss_ratio", Gauge, LOSS, INGRESS),
    column("latency_seconds", "nbt_run_latency_seconds", Gauge, "The delay added to the run's outgoing packets (--latency; absent: none)", &[]),
    column("balance", "nbt_run_balance", Gauge, "The run's balance, in its ledger's currency (absent: no --balance)", &[]),
    column("calls_charged", "nbt_run_calls", Counter, CALLS, &[("outcome", "charged")]),
    column("calls_blocked", "nbt_run_calls", Counter, CALLS, &[("outcome", "blocked")]),
    column("joules", "nbt_run_joules", Counter, "Energy the run's own meter charged it with (its summary's energy: RAPL or the CPU model by its CPU time, GPUs by NVML)", &[]),
    column("cpu_temperature_celsius", "nbt_run_cpu_temperature_celsius", Gauge, "The CPU temperature at the run's last sample (hwmon)", &[]),
    column("gpu_power_watts", "nbt_run_gpu_power_watts", Gauge, "Power of the run's GPUs, summed (NVML)", &[]),
    column("gpu_temperature_celsius", "nbt_run_gpu_temperature_celsius", Gauge, "The hottest of the run's GPUs (NVML)", &[]),
    Column {
        scale: 1e6,
        ..column("gpu_graphics_clock_mhz", "nbt_run_gpu_graphics_clock_hertz", Gauge, "The graphics clock of the slowest of the run's GPUs (NVML)", &[])
    },
    column("gpu_utilization_ratio", "nbt_run_gpu_utilization_ratio", Gauge, "The mean utilisation of the run's GPUs, 0 to 1 (NVML)", &[]),
];

/// A family being filled, of either type.
enum Filling {
    Counter(Family<FloatCounter>),
    Gauge(Family<FloatGauge>),
}

/// Registers every per-run family (empty ones too, so that their names are listed whatever runs
/// are alive) and fills them from the `live` runs; `orphans` are counted only.
pub(super) fn register(registry: &mut Registry, live: &[LiveRun], orphans: usize) {
    let count: Family<FloatGauge> = Default::default();
    for (state, n) in [("live", live.len()), ("orphan", orphans)] {
        count
            .get_or_create(&labels(&[("state", state)]))
            .set(n as f64);
    }
    registry.register(
        "nbt_runs",
        "Runs with a record on this node: live, or orphan (their nbt died; not reported per run until `nbt cleanup`)",
        count,
    );
    let info: Family<FloatGauge> = Default::default();
    let start: Family<FloatGauge> = Default::default();
    let now = crate::sys::proc::now_unix();
    for run in live {
        let command = command_label(&run.command);
        info.get_or_create(&labels(&[("run", &run.run), ("command", &command)]))
            .set(1.0);
        start
            .get_or_create(&labels(&[("run", &run.run)]))
            .set(now - run.seconds);
    }
    registry.register(
        "nbt_run_info",
        "A live run (value 1) and its command, at most 256 bytes of it",
        info,
    );
    registry.register(
        "nbt_run_start_time_seconds",
        "When a live run started, in Unix seconds",
        start,
    );
    let mut families: Vec<(&Column, Filling)> = Vec::new();
    for c in COLUMNS {
        let seen = families.iter().any(|(f, _)| f.family == c.family);
        if !seen {
            let family = match c.kind {
                Counter => Filling::Counter(Default::default()),
                Gauge => Filling::Gauge(Default::default()),
            };
            families.push((c, family));
        }
    }
    for run in live {
        let Some(latest) = &run.latest else { continue };
        for c in COLUMNS {
            let Some(value) = latest.get(c.column) else {
                continue;
            };
            let mut pairs = vec![("run", run.run.as_str())];
            pairs.extend_from_slice(c.labels);
            let l = labels(&pairs);
            let value = value * c.scale;
            match &families
                .iter()
                .find(|(f, _)| f.family == c.family)
                .unwrap()
                .1
            {
                Filling::Counter(f) => {
                    f.get_or_create(&l).inc_by(value.max(0.0));
                }
                Filling::Gauge(f) => {
                    f.get_or_create(&l).set(value);
                }
            }
        }
    }
    for (c, family) in families {
        match family {
            Filling::Counter(f) => registry.register(c.family, c.help, f),
            Filling::Gauge(f) => registry.register(c.family, c.help, f),
        }
    }
}

/// The command as one label: its words joined by spaces, cut at 256 bytes (on a character's
/// boundary).
fn command_label(command: &[String]) -> String {
    let mut text = command.join(" ");
    if text.len() > 256 {
        let mut end = 256;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::series;

    #[test]
    fn every_column_is_one_of_the_series_and_the_units_are_base_units() {
        let names: Vec<&str> = series::COLUMNS.iter().map(|(n, _)| *n).collect();
        for c in COLUMNS {
            assert!(names.contains(&c.column), "{} is no column", c.column);
            let kind = series::COLUMNS
                .iter()
                .find(|(n, _)| *n == c.column)
                .unwrap()
                .1;
            // A counter of the series is a counter here, a gauge a gauge.
            assert_eq!(
                matches!(kind, series::Kind::Counter),
                matches!(c.kind, Counter),
                "{}",
                c.column
            );
            // No unit that is not a base one, and each family has one type.
            assert!(
                !c.family.contains("bits") && !c.family.contains("mhz"),
                "{}",
                c.family
            );
            for other in COLUMNS.iter().filter(|o| o.family == c.family) {
                assert!(matches!(
                    (other.kind, c.kind),
                    (Counter, Counter) | (Gauge, Gauge)
                ));
                assert_eq!(other.help, c.help, "{}", c.family);
            }
        }
        // Every column but the time is exported.
        for name in names.iter().filter(|n| **n != "t_seconds") {
            assert!(
                COLUMNS.iter().any(|c| c.column == *name),
                "{name} is not exported"
            );
        }
    }

    fn run(name: &str, orphan: bool, latest: &[(&str, f64)]) -> LiveRun {
        LiveRun {
            run: name.into(),
            name: None,
            orphan,
            nbt_pid: 1,
            kind: "run",
            target: None,
            cgroup: None,
            command: vec![
                "train".into(),
                "--say".into(),
                "a \"quoted\"\nline\\".into(),
            ],
            seconds: 3.0,
            net_limits: Default::default(),
            shaped: None,
            balance_micro: None,
            links: vec![],
            latest: Some(latest.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
        }
    }

    #[test]
    fn a_run_becomes_series_in_base_units_and_an_orphan_only_a_count() {
        let runs = [
            run(
                "nbt-00000000000000aa",
                false,
                &[
                    ("memory_bytes", 4096.0),
                    ("cpu_seconds", 1.5),
                    ("egress_rate_limit_bits_per_second", 8e6),
                    ("egress_lost_packets", 3.0),
                    ("gpu_graphics_clock_mhz", 1500.0),
                    ("balance", -2.5),
                    ("calls_blocked", 7.0),
                ],
            ),
            run("nbt-00000000000000bb", true, &[("memory_bytes", 1.0)]),
        ];
        let mut registry = Registry::default();
        register(&mut registry, &runs[..1], 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let has = |line: &str| {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        };
        has(r#"nbt_run_memory_bytes{run="nbt-00000000000000aa"} 4096.0"#);
        has(r#"nbt_run_cpu_usage_seconds_total{run="nbt-00000000000000aa"} 1.5"#);
        has(
            r#"nbt_run_rate_limit_bytes_per_second{run="nbt-00000000000000aa",direction="egress"} 1000000.0"#,
        );
        has(
            r#"nbt_run_dropped_packets_total{run="nbt-00000000000000aa",direction="egress",reason="loss"} 3.0"#,
        );
        has(r#"nbt_run_gpu_graphics_clock_hertz{run="nbt-00000000000000aa"} 1500000000.0"#);
        has(r#"nbt_run_balance{run="nbt-00000000000000aa"} -2.5"#);
        has(r#"nbt_run_calls_total{run="nbt-00000000000000aa",outcome="blocked"} 7.0"#);
        has(
            r#"nbt_run_info{run="nbt-00000000000000aa",command="train --say a \"quoted\"\nline\\"} 1.0"#,
        );
        has(r#"nbt_runs{state="orphan"} 1.0"#);
        has("# TYPE nbt_run_oom_kills counter");
        has("# TYPE nbt_run_swap_limit_bytes gauge");
        assert!(!text.contains("nbt-00000000000000bb"), "{text}");
        // What was not measured is absent, not zero.
        assert!(!text.contains("nbt_run_swap_bytes{"), "{text}");
    }

    #[test]
    fn a_long_command_is_cut_on_a_character() {
        let long = vec!["é".repeat(200)];
        let label = command_label(&long);
        assert!(label.len() <= 256 && label.len() >= 254, "{}", label.len());
        assert_eq!(command_label(&["a".into(), "b".into()]), "a b");
    }
}
