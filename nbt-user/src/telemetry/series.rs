//! A run's time series: at every interval (1 s unless `--series-interval` says otherwise), what
//! the run held and used, what limited it, what it cost, and what the sensors read.
//!
//! Every figure is in base units (bytes, seconds, bits per second, joules, watts), and its column
//! says which. Counters are totals since the run started; gauges are the value at the sample.
//! A run keeps at most [`MAX_SAMPLES`]: when full, each pair of neighbours becomes one sample at
//! twice the interval (counters: the later total; gauges: the higher of the two, so a peak is
//! never lost), so a long run keeps its whole span at a coarser step.
//!
//! The series is stored beside the receipts, and the run's receipt holds its SHA-256
//! ([`Series::encode`] gives the exact bytes hashed), so it cannot be altered unseen.

use serde::{Deserialize, Serialize};

/// The most samples a run keeps (a one-hour run at 1 s fits whole).
pub const MAX_SAMPLES: usize = 3600;

/// The `format` of an encoded series.
pub const FORMAT: &str = "nbt.series/v1";

/// Whether a column is a total since the start or a value at the sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

use Kind::{Counter, Gauge};

/// The columns, in order: name (with its unit) and kind. [`Sample::values`] gives the values in
/// the same order.
pub const COLUMNS: [(&str, Kind); 41] = [
    ("t_seconds", Counter),
    ("memory_bytes", Gauge),
    ("memory_limit_bytes", Gauge),
    ("swap_bytes", Gauge),
    ("swap_limit_bytes", Gauge),
    ("cpu_seconds", Counter),
    ("cpu_limit_cores", Gauge),
    ("cpu_throttled_seconds", Counter),
    ("pids", Gauge),
    ("pids_limit", Gauge),
    ("oom_kills", Counter),
    ("psi_cpu_some_seconds", Counter),
    ("psi_memory_some_seconds", Counter),
    ("psi_memory_full_seconds", Counter),
    ("psi_io_some_seconds", Counter),
    ("egress_passed_packets", Counter),
    ("egress_passed_bytes", Counter),
    ("egress_rate_dropped_packets", Counter),
    ("egress_rate_dropped_bytes", Counter),
    ("egress_lost_packets", Counter),
    ("egress_lost_bytes", Counter),
    ("ingress_passed_packets", Counter),
    ("ingress_passed_bytes", Counter),
    ("ingress_rate_dropped_packets", Counter),
    ("ingress_rate_dropped_bytes", Counter),
    ("ingress_lost_packets", Counter),
    ("ingress_lost_bytes", Counter),
    ("egress_rate_limit_bits_per_second", Gauge),
    ("ingress_rate_limit_bits_per_second", Gauge),
    ("egress_loss_ratio", Gauge),
    ("ingress_loss_ratio", Gauge),
    ("latency_seconds", Gauge),
    ("balance", Gauge),
    ("calls_charged", Counter),
    ("calls_blocked", Counter),
    ("joules", Counter),
    ("cpu_temperature_celsius", Gauge),
    ("gpu_power_watts", Gauge),
    ("gpu_temperature_celsius", Gauge),
    ("gpu_graphics_clock_mhz", Gauge),
    ("gpu_utilization_ratio", Gauge),
];

/// One sample. `None`: not measured on this machine (no such controller, no sensor, no balance)
/// or, for a limit, none in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub t_seconds: f64,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub swap_limit_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub cpu_limit_cores: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    pub oom_kills: Option<u64>,
    pub psi_cpu_some_seconds: Option<f64>,
    pub psi_memory_some_seconds: Option<f64>,
    pub psi_memory_full_seconds: Option<f64>,
    pub psi_io_some_seconds: Option<f64>,
    pub egress: Option<Packets>,
    pub ingress: Option<Packets>,
    pub egress_rate_limit_bits_per_second: Option<u64>,
    pub ingress_rate_limit_bits_per_second: Option<u64>,
    pub egress_loss_ratio: Option<f64>,
    pub ingress_loss_ratio: Option<f64>,
    pub latency_seconds: Option<f64>,
    /// In the ledger's currency (not micro-units).
    pub balance: Option<f64>,
    pub calls_charged: Option<u64>,
    pub calls_blocked: Option<u64>,
    pub joules: Option<f64>,
    pub cpu_temperature_celsius: Option<f64>,
    /// Summed over the run's GPUs.
    pub gpu_power_watts: Option<f64>,
    /// The hottest of the run's GPUs.
    pub gpu_temperature_celsius: Option<f64>,
    /// The slowest of the run's GPUs.
    pub gpu_graphics_clock_mhz: Option<f64>,
    /// The mean over the run's GPUs, 0 to 1.
    pub gpu_utilization_ratio: Option<f64>,
}

/// One direction's packets through the shaper: passed, dropped by the rate, lost (`--loss`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Packets {
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub rate_dropped_packets: u64,
    pub rate_dropped_bytes: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
}

impl Packets {
    fn values(packets: Option<Packets>) -> [Option<f64>; 6] {
        let p = packets.map(|p| {
            [
                p.passed_packets,
                p.passed_bytes,
                p.rate_dropped_packets,
                p.rate_dropped_bytes,
                p.lost_packets,
                p.lost_bytes,
            ]
        });
        std::array::from_fn(|i| p.map(|p| p[i] as f64))
    }
}

impl Sample {
    /// The values in [`COLUMNS`]' order, fractions rounded to millionths (a microsecond, a
    /// microjoule): the kernel counts no finer.
    pub fn values(&self) -> [Option<f64>; COLUMNS.len()] {
        self.exact_values().map(|v| {
            v.map(|v| {
                if v.fract() == 0.0 {
                    v
                } else {
                    (v * 1e6).round() / 1e6
                }
            })
        })
    }

    fn exact_values(&self) -> [Option<f64>; COLUMNS.len()] {
        let u = |x: Option<u64>| x.map(|x| x as f64);
        let [ep, eb, erp, erb, elp, elb] = Packets::values(self.egress);
        let [ip, ib, irp, irb, ilp, ilb] = Packets::values(self.ingress);
        [
            Some(self.t_seconds),
            u(self.memory_bytes),
            u(self.memory_limit_bytes),
            u(self.swap_bytes),
            u(self.swap_limit_bytes),
            self.cpu_seconds,
            self.cpu_limit_cores,
            self.cpu_throttled_seconds,
            u(self.pids),
            u(self.pids_limit),
            u(self.oom_kills),
            self.psi_cpu_some_seconds,
            self.psi_memory_some_seconds,
            self.psi_memory_full_seconds,
            self.psi_io_some_seconds,
            ep,
            eb,
            erp,
            erb,
            elp,
            elb,
            ip,
            ib,
            irp,
            irb,
            ilp,
            ilb,
            u(self.egress_rate_limit_bits_per_second),
            u(self.ingress_rate_limit_bits_per_second),
            self.egress_loss_ratio,
            self.ingress_loss_ratio,
            self.latency_seconds,
            self.balance,
            u(self.calls_charged),
            u(self.calls_blocked),
            self.joules,
            self.cpu_temperature_celsius,
            self.gpu_power_watts,
            self.gpu_temperature_celsius,
            self.gpu_graphics_clock_mhz,
            self.gpu_utilization_ratio,
        ]
    }
}

/// One row: the values in [`COLUMNS`]' order.
pub type Row = Vec<Option<f64>>;

/// A run's samples, bounded (see the module's notes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub format: String,
    pub run: String,
    /// The interval the run sampled at.
    pub sampled_every_seconds: f64,
    /// The time between two rows now: the sampling interval, doubled at each halving.
    pub interval_seconds: f64,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// The row being gathered while a row spans several samples, and how many it holds.
    #[serde(skip)]
    pending: Option<(Row, u32)>,
}

impl Series {
    pub fn new(run: &str, interval_seconds: f64) -> Series {
        Series {
            format: FORMAT.into(),
            run: run.into(),
            sampled_every_seconds: interval_seconds,
            interval_seconds,
            columns: COLUMNS.iter().map(|(name, _)| name.to_string()).collect(),
            rows: Vec::new(),
            pending: None,
        }
    }

    /// Takes one sample (they come every `sampled_every_seconds`).
    pub fn push(&mut self, sample: &Sample) {
        let row: Row = sample.values().to_vec();
        let (row, samples) = match self.pending.take() {
            Some((earlier, n)) => (merge(&earlier, &row), n + 1),
            None => (row, 1),
        };
        if samples < self.stride() {
            self.pending = Some((row, samples));
            return;
        }
        self.rows.push(row);
        if self.rows.len() >= MAX_SAMPLES {
            self.halve();
        }
    }

    /// Takes the last sample, at the run's end, and keeps any row still being gathered.
    pub fn finish(&mut self, last: &Sample) {
        self.push(last);
        if let Some((row, _)) = self.pending.take() {
            self.rows.push(row);
        }
    }

    /// How many samples make one row now.
    fn stride(&self) -> u32 {
        (self.interval_seconds / self.sampled_every_seconds)
            .round()
            .max(1.0) as u32
    }

    /// Each pair of neighbouring rows becomes one, at twice the interval.
    fn halve(&mut self) {
        let stride = self.stride();
        let rows = std::mem::take(&mut self.rows);
        let mut pairs = rows.chunks_exact(2);
        self.rows = pairs.by_ref().map(|p| merge(&p[0], &p[1])).collect();
        // An odd row out waits for the samples of its partner.
        self.pending = pairs.remainder().first().map(|row| (row.clone(), stride));
        self.interval_seconds *= 2.0;
    }

    /// The rows as CSV: a header of the column names, an empty field where nothing was
    /// measured.
    pub fn to_csv(&self) -> String {
        let mut out = self.columns.join(",");
        out.push('\n');
        for row in &self.rows {
            let fields: Vec<String> = row
                .iter()
                .map(|v| v.map(format_value).unwrap_or_default())
                .collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }

    /// The exact text stored and hashed: this series as compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a series serializes")
    }

    pub fn decode(text: &str) -> serde_json::Result<Series> {
        serde_json::from_str(text)
    }

    /// The same series with its last `n` rows only.
    pub fn tail(&self, n: usize) -> Series {
        Series {
            format: self.format.clone(),
            run: self.run.clone(),
            sampled_every_seconds: self.sampled_every_seconds,
            interval_seconds: self.interval_seconds,
            columns: self.columns.clone(),
            rows: self.rows[self.rows.len().saturating_sub(n)..].to_vec(),
            pending: None,
        }
    }

    /// A column's values, by name (`None` for an unknown name).
    pub fn column(&self, name: &str) -> Option<Vec<Option<f64>>> {
        let i = self.columns.iter().position(|c| c == name)?;
        Some(
            self.rows
                .iter()
                .map(|r| r.get(i).copied().flatten())
                .collect(),
        )
    }
}

/// A figure as CSV shows it: integers without a decimal point.
fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// What a run's receipt says of its series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesRef {
    pub rows: usize,
    pub interval_seconds: f64,
    /// SHA-256 of [`Series::encode`], hex.
    pub sha256: String,
}

/// One row for two neighbours, the earlier first: counters the later total, gauges the higher.
fn merge(earlier: &Row, later: &Row) -> Row {
    COLUMNS
        .iter()
        .zip(earlier.iter().zip(later))
        .map(|((_, kind), (a, b))| match (kind, a, b) {
            (Counter, _, b) => *b,
            (Gauge, Some(a), Some(b)) => Some(a.max(*b)),
            (Gauge, a, b) => b.or(*a),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, memory: u64, cpu: f64) -> Sample {
        Sample {
            t_seconds: t,
            memory_bytes: Some(memory),
            cpu_seconds: Some(cpu),
            ..Sample::default()
        }
    }

    #[test]
    fn columns_and_values_line_up() {
        let s = Sample {
            joules: Some(7.0),
            gpu_utilization_ratio: Some(0.5),
            ..sample(1.0, 2, 3.0)
        };
        let values = s.values();
        let at = |name: &str| values[COLUMNS.iter().position(|(c, _)| *c == name).unwrap()];
        assert_eq!(at("t_seconds"), Some(1.0));
        assert_eq!(at("memory_bytes"), Some(2.0));
        assert_eq!(at("cpu_seconds"), Some(3.0));
        assert_eq!(at("joules"), Some(7.0));
        assert_eq!(at("gpu_utilization_ratio"), Some(0.5));
        assert_eq!(at("swap_bytes"), None);
    }

    #[test]
    fn a_full_series_halves_keeping_counters_at_their_end_and_gauges_at_their_peak() {
        let mut series = Series::new("r", 1.0);
        // A memory spike in one sample, then flat.
        for i in 0..MAX_SAMPLES as u64 {
            let memory = if i == 7 { 1000 } else { 10 };
            series.push(&sample(i as f64, memory, i as f64 * 0.5));
        }
        assert_eq!(series.rows.len(), MAX_SAMPLES / 2);
        assert_eq!(series.interval_seconds, 2.0);
        let t = series.column("t_seconds").unwrap();
        assert_eq!(t[0], Some(1.0));
        assert_eq!(t[3], Some(7.0));
        assert_eq!(series.column("memory_bytes").unwrap()[3], Some(1000.0));
        assert_eq!(series.column("cpu_seconds").unwrap()[3], Some(3.5));
        // From now on two samples make one row.
        series.push(&sample(3600.0, 10, 1800.0));
        assert_eq!(series.rows.len(), MAX_SAMPLES / 2);
        series.push(&sample(3601.0, 10, 1800.5));
        assert_eq!(series.rows.len(), MAX_SAMPLES / 2 + 1);
        assert_eq!(
            series.column("t_seconds").unwrap().last(),
            Some(&Some(3601.0))
        );
        // A run's end keeps its last sample, even half a row.
        series.finish(&sample(3602.0, 10, 1801.0));
        assert_eq!(
            series.column("t_seconds").unwrap().last(),
            Some(&Some(3602.0))
        );
    }

    #[test]
    fn a_long_run_stays_bounded_and_spans_the_whole_run() {
        let mut series = Series::new("r", 1.0);
        let n = 5 * MAX_SAMPLES as u64 + 3;
        for i in 1..=n {
            series.push(&sample(i as f64, 1, i as f64));
        }
        series.finish(&sample((n + 1) as f64, 1, (n + 1) as f64));
        assert!(series.rows.len() <= MAX_SAMPLES, "{}", series.rows.len());
        assert_eq!(series.interval_seconds, 8.0);
        let t: Vec<f64> = series
            .column("t_seconds")
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(t.last(), Some(&((n + 1) as f64)));
        // Evenly spaced at the interval, apart from the run's last (partial) row.
        for pair in t[..t.len() - 1].windows(2) {
            assert_eq!(pair[1] - pair[0], 8.0, "{pair:?}");
        }
    }

    #[test]
    fn csv_and_json_round_trip() {
        let mut series = Series::new("r", 1.0);
        series.push(&sample(1.0, 4096, 0.25));
        let csv = series.to_csv();
        let mut lines = csv.lines();
        assert!(lines
            .next()
            .unwrap()
            .starts_with("t_seconds,memory_bytes,memory_limit_bytes,"));
        assert!(lines.next().unwrap().starts_with("1,4096,,,,0.25,"));
        let back = Series::decode(&series.encode()).unwrap();
        assert_eq!(back.rows, series.rows);
        assert_eq!(back.columns.len(), COLUMNS.len());
    }
}
