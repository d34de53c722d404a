//! A run's time series turned into charts: which columns go together, against which limit,
//! counters turned into rates, figures scaled to a readable unit.

use crate::telemetry::series::Series;

use super::chart::{Line, TimeChart};

/// How a column becomes a line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Derive {
    /// As stored.
    Value,
    /// Per second: the change since the row before over the time between (a counter's rate).
    Rate,
    /// As `Rate`, times 8 (bytes to bits).
    RateBits,
}

/// What a chart's y axis counts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    Bytes,
    BitsPerSecond,
    Plain(&'static str),
    /// Shown ×1000 (seconds as milliseconds).
    Milli(&'static str),
    /// Shown ×100 (ratios as percentages).
    Percent,
}

struct LineSpec {
    name: &'static str,
    column: &'static str,
    derive: Derive,
    limit: bool,
}

const fn line(name: &'static str, column: &'static str, derive: Derive) -> LineSpec {
    LineSpec {
        name,
        column,
        derive,
        limit: false,
    }
}

const fn limit(name: &'static str, column: &'static str) -> LineSpec {
    LineSpec {
        name,
        column,
        derive: Value,
        limit: true,
    }
}

struct ChartSpec {
    title: &'static str,
    unit: Unit,
    lines: &'static [LineSpec],
}

use Derive::{Rate, RateBits, Value};

/// Every chart a report can have, in the order shown.
const CHARTS: &[ChartSpec] = &[
    ChartSpec {
        title: "Memory",
        unit: Unit::Bytes,
        lines: &[
            line("memory used", "memory_bytes", Value),
            limit("memory limit", "memory_limit_bytes"),
        ],
    },
    ChartSpec {
        title: "Swap",
        unit: Unit::Bytes,
        lines: &[
            line("swap used", "swap_bytes", Value),
            limit("swap limit", "swap_limit_bytes"),
        ],
    },
    ChartSpec {
        title: "CPU",
        unit: Unit::Plain("cores (CPU seconds per second)"),
        lines: &[
            line("CPU used", "cpu_seconds", Rate),
            line("throttled", "cpu_throttled_seconds", Rate),
            limit("CPU limit", "cpu_limit_cores"),
        ],
    },
    ChartSpec {
        title: "Egress rate",
        unit: Unit::BitsPerSecond,
        lines: &[
            line("passed", "egress_passed_bytes", RateBits),
            line("dropped by the rate", "egress_rate_dropped_bytes", RateBits),
            line("lost (--loss)", "egress_lost_bytes", RateBits),
            limit("egress rate limit", "egress_rate_limit_bits_per_second"),
        ],
    },
    ChartSpec {
        title: "Ingress rate",
        unit: Unit::BitsPerSecond,
        lines: &[
            line("passed", "ingress_passed_bytes", RateBits),
            line(
                "dropped by the rate",
                "ingress_rate_dropped_bytes",
                RateBits,
            ),
            line("lost (--loss)", "ingress_lost_bytes", RateBits),
            limit("ingress rate limit", "ingress_rate_limit_bits_per_second"),
        ],
    },
    ChartSpec {
        title: "Packets dropped and lost",
        unit: Unit::Plain("packets per second"),
        lines: &[
            line(
                "egress dropped by the rate",
                "egress_rate_dropped_packets",
                Rate,
            ),
            line("egress lost", "egress_lost_packets", Rate),
            line(
                "ingress dropped by the rate",
                "ingress_rate_dropped_packets",
                Rate,
            ),
            line("ingress lost", "ingress_lost_packets", Rate),
        ],
    },
    ChartSpec {
        title: "Loss in force",
        unit: Unit::Percent,
        lines: &[
            line("egress loss", "egress_loss_ratio", Value),
            line("ingress loss", "ingress_loss_ratio", Value),
        ],
    },
    ChartSpec {
        title: "Added latency in force",
        unit: Unit::Milli("ms"),
        lines: &[line("latency", "latency_seconds", Value)],
    },
    ChartSpec {
        title: "Pressure stalls (PSI)",
        unit: Unit::Percent,
        lines: &[
            line("CPU some", "psi_cpu_some_seconds", Rate),
            line("memory some", "psi_memory_some_seconds", Rate),
            line("memory full", "psi_memory_full_seconds", Rate),
            line("IO some", "psi_io_some_seconds", Rate),
        ],
    },
    ChartSpec {
        title: "Processes and threads",
        unit: Unit::Plain("pids"),
        lines: &[
            line("pids", "pids", Value),
            limit("pids limit", "pids_limit"),
        ],
    },
    ChartSpec {
        title: "OOM kills",
        unit: Unit::Plain("kills since the start"),
        lines: &[line("OOM kills", "oom_kills", Value)],
    },
    ChartSpec {
        title: "Balance",
        unit: Unit::Plain("the ledger's currency"),
        lines: &[line("balance", "balance", Value)],
    },
    ChartSpec {
        title: "Calls to gated destinations",
        unit: Unit::Plain("calls since the start"),
        lines: &[
            line("charged", "calls_charged", Value),
            line("blocked", "calls_blocked", Value),
        ],
    },
    ChartSpec {
        title: "Power",
        unit: Unit::Plain("watts"),
        lines: &[
            line("run (joules per second)", "joules", Rate),
            line("GPU", "gpu_power_watts", Value),
        ],
    },
    ChartSpec {
        title: "Energy",
        unit: Unit::Plain("joules since the start"),
        lines: &[line("energy", "joules", Value)],
    },
    ChartSpec {
        title: "Temperatures",
        unit: Unit::Plain("°C"),
        lines: &[
            line("CPU", "cpu_temperature_celsius", Value),
            line("GPU", "gpu_temperature_celsius", Value),
        ],
    },
    ChartSpec {
        title: "GPU graphics clock",
        unit: Unit::Plain("MHz"),
        lines: &[line("slowest GPU", "gpu_graphics_clock_mhz", Value)],
    },
    ChartSpec {
        title: "GPU utilization",
        unit: Unit::Percent,
        lines: &[line("mean over GPUs", "gpu_utilization_ratio", Value)],
    },
];

/// The columns that say what was in force rather than what was measured: no value means no
/// limit (or no impairment) was set.
pub const SETTINGS: &[&str] = &[
    "memory_limit_bytes",
    "swap_limit_bytes",
    "cpu_limit_cores",
    "pids_limit",
    "egress_rate_limit_bits_per_second",
    "ingress_rate_limit_bits_per_second",
    "egress_loss_ratio",
    "ingress_loss_ratio",
    "latency_seconds",
];

/// What the series holds, as charts and as the lists of what was left out.
#[derive(Debug, Default)]
pub struct Charts {
    pub charts: Vec<TimeChart>,
    /// Columns with no value in any row (not measured here), settings left out.
    pub not_measured: Vec<String>,
    /// Settings never in force.
    pub not_set: Vec<String>,
    /// Charts whose measured lines were zero in every row.
    pub zero_throughout: Vec<String>,
}

/// A column's line: runs of (t, value) where both exist.
fn derive(t: &[Option<f64>], values: &[Option<f64>], how: Derive) -> Vec<Vec<(f64, f64)>> {
    let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    // Counters start at zero when the workload does.
    let mut before: Option<(f64, f64)> = Some((0.0, 0.0));
    for (t, v) in t.iter().zip(values) {
        let point = match (t, v, how) {
            (Some(t), Some(v), Value) => Some((*t, *v)),
            (Some(t), Some(v), Rate | RateBits) => {
                let rate = before
                    .filter(|(t0, _)| t - t0 > 1e-9)
                    .map(|(t0, v0)| ((v - v0) / (t - t0)).max(0.0));
                before = Some((*t, *v));
                rate.map(|r| (*t, if how == RateBits { r * 8.0 } else { r }))
            }
            _ => {
                before = None;
                None
            }
        };
        match point {
            Some(p) => segments.last_mut().expect("one segment").push(p),
            None if !segments.last().expect("one segment").is_empty() => segments.push(Vec::new()),
            None => {}
        }
    }
    segments.retain(|s| !s.is_empty());
    segments
}

/// A readable unit for the largest value: its name and what to divide by.
fn scale(unit: Unit, largest: f64) -> (String, f64) {
    let pick = |steps: &[(&str, f64)]| {
        let (name, by) = steps
            .iter()
            .rev()
            .find(|(_, by)| largest >= *by)
            .unwrap_or(&steps[0]);
        (name.to_string(), *by)
    };
    match unit {
        Unit::Bytes => pick(&[
            ("bytes", 1.0),
            ("KiB", 1024.0),
            ("MiB", 1024.0 * 1024.0),
            ("GiB", 1024.0 * 1024.0 * 1024.0),
        ]),
        Unit::BitsPerSecond => pick(&[
            ("bit/s", 1.0),
            ("kbit/s", 1e3),
            ("Mbit/s", 1e6),
            ("Gbit/s", 1e9),
        ]),
        Unit::Plain(name) => (name.to_string(), 1.0),
        Unit::Milli(name) => (name.to_string(), 1e-3),
        Unit::Percent => ("% (of the time, or of packets)".to_string(), 0.01),
    }
}

/// Every chart the series has data for; the run's events as markers on each.
pub fn charts(series: &Series, events: &[(f64, usize)]) -> Charts {
    let mut out = Charts::default();
    let t = series.column("t_seconds").unwrap_or_default();
    let seconds = t
        .iter()
        .flatten()
        .copied()
        .chain(events.iter().map(|(t, _)| *t))
        .fold(0.0f64, f64::max);
    for name in &series.columns {
        let Some(values) = series.column(name) else {
            continue;
        };
        if name == "t_seconds" || values.iter().any(Option::is_some) {
            continue;
        }
        if SETTINGS.contains(&name.as_str()) {
            out.not_set.push(name.clone());
        } else {
            out.not_measured.push(name.clone());
        }
    }
    for spec in CHARTS {
        let mut lines = Vec::new();
        for l in spec.lines {
            let Some(values) = series.column(l.column) else {
                continue;
            };
            let segments = derive(&t, &values, l.derive);
            if !segments.is_empty() {
                lines.push(Line {
                    name: l.name.to_string(),
                    segments,
                    limit: l.limit,
                });
            }
        }
        let measured: Vec<&Line> = lines.iter().filter(|l| !l.limit).collect();
        if measured.is_empty() {
            continue;
        }
        if measured.iter().all(|l| l.points().all(|(_, y)| *y == 0.0)) {
            out.zero_throughout.push(spec.title.to_string());
            continue;
        }
        let peak = |line: &Line| line.points().map(|(_, y)| y.abs()).fold(0.0f64, f64::max);
        let measured_peak = measured.iter().map(|l| peak(l)).fold(0.0f64, f64::max);
        // A limit far above what was used would flatten the measured lines to the axis: it
        // is named in the legend instead of drawn.
        let mut off_chart = Vec::new();
        lines.retain(|line| {
            let far = line.limit && peak(line) > OFF_CHART * measured_peak;
            if far {
                let (low, high) = line.points().fold((f64::MAX, 0.0f64), |(lo, hi), (_, y)| {
                    (lo.min(*y), hi.max(*y))
                });
                let (unit, by) = scale(spec.unit, high);
                let range = if low < high {
                    format!("{} to {}", figure(low / by), figure(high / by))
                } else {
                    figure(high / by)
                };
                off_chart.push(Line {
                    name: format!("{}: {range} {unit}, far above (not drawn)", line.name),
                    segments: Vec::new(),
                    limit: true,
                });
            }
            !far
        });
        let largest = lines.iter().map(peak).fold(0.0f64, f64::max);
        let (unit, by) = scale(spec.unit, largest);
        for line in &mut lines {
            for segment in &mut line.segments {
                for point in segment.iter_mut() {
                    point.1 /= by;
                }
            }
            // A limit holds until the next sample: drawn as steps.
            if line.limit {
                for segment in &mut line.segments {
                    *segment = steps(segment);
                }
            }
        }
        lines.extend(off_chart);
        out.charts.push(TimeChart {
            title: spec.title.to_string(),
            y_label: unit,
            lines,
            seconds,
            events: events.to_vec(),
        });
    }
    out
}

/// How many times the measured peak a limit may be and still be drawn.
const OFF_CHART: f64 = 4.0;

/// A figure for a legend: up to 3 decimals, no trailing zeros.
fn figure(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A gauge drawn as steps: each value held until the next one.
fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for pair in points.windows(2) {
        out.push(pair[0]);
        if pair[1].1 != pair[0].1 {
            out.push((pair[1].0, pair[0].1));
        }
    }
    out.extend(points.last());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::series::{Packets, Sample};

    #[test]
    fn counters_become_rates_from_the_start_and_gaps_split_lines() {
        let t = [Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(5.0)];
        let v = [Some(10.0), Some(30.0), None, Some(50.0), Some(60.0)];
        assert_eq!(
            derive(&t, &v, Rate),
            vec![vec![(1.0, 10.0), (2.0, 20.0)], vec![(5.0, 10.0)]]
        );
        assert_eq!(derive(&t, &v, RateBits)[0][0], (1.0, 80.0));
        assert_eq!(derive(&t, &v, Value)[1], vec![(4.0, 50.0), (5.0, 60.0)]);
        assert!(derive(&t, &[None; 5], Value).is_empty());
    }

    #[test]
    fn a_series_gives_charts_for_what_it_measured_and_names_the_rest() {
        let mut series = Series::new("nbt-x", 1.0);
        for i in 1..=5u64 {
            series.push(&Sample {
                t_seconds: i as f64,
                memory_bytes: Some((i * 10) << 20),
                memory_limit_bytes: Some(64 << 20),
                cpu_seconds: Some(i as f64 * 0.5),
                egress: Some(Packets {
                    passed_bytes: i * 125_000,
                    ..Packets::default()
                }),
                egress_rate_limit_bits_per_second: Some(if i < 3 { 1_000_000 } else { 2_000_000 }),
                ..Sample::default()
            });
        }
        let charts = charts(&series, &[(2.5, 1)]);
        let titles: Vec<&str> = charts.charts.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(titles, ["Memory", "CPU", "Egress rate"]);
        let memory = &charts.charts[0];
        assert_eq!(memory.y_label, "MiB");
        assert_eq!(memory.lines[0].segments[0][4], (5.0, 50.0));
        assert!(memory.lines[1].limit);
        let egress = &charts.charts[2];
        assert_eq!(egress.y_label, "Mbit/s");
        assert_eq!(egress.lines[0].segments[0][1], (2.0, 1.0));
        // The limit as steps: 1 Mbit/s until the sample that says 2.
        let limit = egress.lines.iter().find(|l| l.limit).unwrap();
        assert!(limit.segments[0].contains(&(3.0, 1.0)), "{limit:?}");
        assert!(limit.segments[0].contains(&(3.0, 2.0)), "{limit:?}");
        assert!(charts.not_measured.contains(&"swap_bytes".to_string()));
        assert!(charts.not_measured.contains(&"joules".to_string()));
        assert!(charts.not_set.contains(&"pids_limit".to_string()));
        // Egress packets were counted (zero dropped, zero lost): measured, all zero.
        assert!(charts
            .zero_throughout
            .contains(&"Packets dropped and lost".to_string()));
        assert_eq!(memory.events, [(2.5, 1)]);
        assert_eq!(memory.seconds, 5.0);
        // A limit far above the peak is named, not drawn.
        let mut far = Series::new("nbt-x", 1.0);
        for i in 1..=3u64 {
            far.push(&Sample {
                t_seconds: i as f64,
                memory_bytes: Some(10 << 20),
                memory_limit_bytes: Some(6 << 30),
                ..Sample::default()
            });
        }
        let memory = &super::charts(&far, &[]).charts[0];
        assert_eq!(memory.y_label, "MiB");
        assert_eq!(
            memory.lines[1].name,
            "memory limit: 6 GiB, far above (not drawn)"
        );
        assert!(memory.lines[1].segments.is_empty());
    }
}
