//! The run's time series while it runs: a sample at each interval (`telemetry::series`), kept
//! bounded in memory, its last minutes written for `nbt ps`, `nbt top` and the agent
//! (`state::live::LiveSeries`), with the run's events for `nbt top` (`state::live::LiveEvents`),
//! and the whole of it stored with the run's receipt.

use std::path::Path;
use std::time::{Duration, Instant};

use aya::Ebpf;

use crate::enforce::cgroup::RunCgroup;
use crate::enforce::edt::Latency;
use crate::enforce::gate::{self, LedgerIds};
use crate::enforce::hwcaps::watch::Latest;
use crate::enforce::ledger::PICO_PER_MICRO;
use crate::enforce::shaper::{self, NetLimits, ShapedTraffic};
use crate::receipt::store::sha256_hex;
use crate::schedule::apply::Event;
use crate::state::live::{LiveEvents, LiveSeries};
use crate::state::{RunFiles, RunRecord};
use crate::telemetry::energy::RunMeter;
use crate::telemetry::series::{Packets, Sample, Series, SeriesRef};
use crate::units::{format_rate, format_size};
use nbt_common::shaper::ShaperStats;

/// The shortest `--series-interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// What a sample reads: the run's parts, borrowed for the moment of the sample.
pub struct Sources<'a> {
    pub cgroup: &'a mut RunCgroup,
    pub ebpf: &'a Ebpf,
    pub ledger: Option<&'a LedgerIds>,
    pub meter: &'a RunMeter,
    pub sensors: Latest,
    pub elapsed: Duration,
    /// How many `--link`s the run has: their packets count with the run's own.
    pub links: u32,
}

pub struct Sampler {
    series: Series,
    /// The sample before the last, for the rates of the status line.
    previous: Option<Sample>,
    live: LiveSeries,
    /// The run's events so far, on disk for `nbt top`.
    events: LiveEvents,
    interval: Duration,
    next: Instant,
    state_dir: std::path::PathBuf,
    /// The network limits in force, as the run's record last said (`nbt set` and the schedule
    /// change them there), and when the record was written.
    net: NetLimits,
    latency: Option<Latency>,
    record_written: Option<std::time::SystemTime>,
}

impl Sampler {
    pub fn new(
        state_dir: &Path,
        run: &str,
        interval: Duration,
        net: NetLimits,
        latency: Option<Latency>,
    ) -> Sampler {
        let series = Series::new(run, interval.as_secs_f64());
        Sampler {
            live: LiveSeries::new(state_dir, &series),
            events: LiveEvents::new(state_dir, run),
            series,
            previous: None,
            interval,
            next: Instant::now(),
            state_dir: state_dir.to_path_buf(),
            net,
            latency,
            record_written: None,
        }
    }

    pub fn next_due(&self) -> Instant {
        self.next
    }

    /// Takes a sample when one is due; returns the status line of it (see [`status_line`]).
    /// `events`: the run's own events so far (its schedule's, its lifecycle's): those not on
    /// disk yet are appended for `nbt top`.
    pub fn tick(&mut self, sources: Sources, events: [&[Event]; 2]) -> Option<String> {
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        // The next one is due an interval after this one was; one missed (a long stop) is not
        // made up for.
        self.next = (self.next + self.interval).max(now);
        let sample = self.take(sources);
        self.series.push(&sample);
        if let Err(err) = self.live.push(&sample.values().to_vec()) {
            eprintln!("nbt: writing the run's live series: {err:#}");
        }
        if let Err(err) = self.events.append(events) {
            eprintln!("nbt: writing the run's live events: {err:#}");
        }
        let line = status_line(self.previous.as_ref(), &sample);
        self.previous = Some(sample);
        Some(line)
    }

    /// The last sample, at the run's end; the whole series, and what its receipt says of it.
    pub fn finish(mut self, sources: Sources) -> (Series, SeriesRef) {
        let last = self.take(sources);
        self.series.finish(&last);
        let reference = SeriesRef {
            rows: self.series.rows.len(),
            interval_seconds: self.series.interval_seconds,
            sha256: sha256_hex(self.series.encode().as_bytes()),
        };
        (self.series, reference)
    }

    /// Reads the run's record again when it was written since the last read.
    fn limits_in_force(&mut self) -> (NetLimits, Option<Latency>) {
        let path = RunFiles::of(&self.state_dir, &self.series.run).record;
        let written = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if written.is_none() || written != self.record_written {
            if let Ok((_, record)) = RunRecord::find_live(&self.state_dir, &self.series.run) {
                (self.net, self.latency) = (record.net, record.latency);
                self.record_written = written;
            }
        }
        (self.net, self.latency)
    }

    fn take(&mut self, s: Sources) -> Sample {
        let (net, latency) = self.limits_in_force();
        let now = s.cgroup.now();
        let stats = &now.stats;
        let pressure = stats.pressure.clone().unwrap_or_default();
        let usec = |x: Option<u64>| x.map(|u| u as f64 / 1e6);
        // Every link's packets: the run's own (0) and each `--link`'s.
        let shaped = (0..=s.links)
            .map(|link| shaper::read_link(s.ebpf, link))
            .try_fold(ShapedTraffic::default(), |mut all, link| {
                let link = link?;
                all.egress.add(&link.egress);
                all.ingress.add(&link.ingress);
                anyhow::Ok(all)
            })
            .ok();
        let ledger = s.ledger.and_then(|ids| gate::read_ledger(ids).ok());
        let cpu_seconds = usec(stats.cpu_usage_usec);
        Sample {
            t_seconds: s.elapsed.as_secs_f64(),
            memory_bytes: now.memory_bytes,
            memory_limit_bytes: now.memory_limit_bytes,
            swap_bytes: now.swap_bytes,
            swap_limit_bytes: now.swap_limit_bytes,
            cpu_seconds,
            cpu_limit_cores: now.cpu_limit_millicores.map(|m| m as f64 / 1000.0),
            cpu_throttled_seconds: usec(stats.cpu_throttled_usec),
            pids: now.pids,
            pids_limit: now.pids_limit,
            oom_kills: stats.oom_kills,
            psi_cpu_some_seconds: usec(pressure.cpu_some_usec),
            psi_memory_some_seconds: usec(pressure.memory_some_usec),
            psi_memory_full_seconds: usec(pressure.memory_full_usec),
            psi_io_some_seconds: usec(pressure.io_some_usec),
            egress: shaped.map(|t| packets(&t.egress)),
            ingress: shaped.map(|t| packets(&t.ingress)),
            egress_rate_limit_bits_per_second: net.egress.rate_bits_per_sec,
            ingress_rate_limit_bits_per_second: net.ingress.rate_bits_per_sec,
            egress_loss_ratio: Some(net.egress.loss.mean()),
            ingress_loss_ratio: Some(net.ingress.loss.mean()),
            latency_seconds: latency.map(|l| l.latency_ns as f64 / 1e9),
            balance: ledger.as_ref().map(|(credit, time, kernel)| {
                (gate::balance_pico(*credit, *time, kernel) / PICO_PER_MICRO) as f64 / 1e6
            }),
            calls_charged: ledger.as_ref().map(|(_, _, k)| k.calls),
            calls_blocked: ledger.as_ref().map(|(_, _, k)| k.blocked_calls),
            joules: s.meter.total(cpu_seconds.unwrap_or(0.0)).total(),
            cpu_temperature_celsius: s.sensors.cpu_temperature_c,
            gpu_power_watts: s.sensors.gpu_power_w,
            gpu_temperature_celsius: s.sensors.gpu_temperature_c,
            gpu_graphics_clock_mhz: s.sensors.gpu_graphics_clock_mhz,
            gpu_utilization_ratio: s.sensors.gpu_utilization_pct.map(|p| p / 100.0),
        }
    }
}

fn packets(stats: &ShaperStats) -> Packets {
    Packets {
        passed_packets: stats.passed_packets,
        passed_bytes: stats.passed_bytes,
        rate_dropped_packets: stats.rate_dropped_packets,
        rate_dropped_bytes: stats.rate_dropped_bytes,
        lost_packets: stats.loss_dropped_packets,
        lost_bytes: stats.loss_dropped_bytes,
    }
}

/// One line of what the run does now: elapsed time, memory (against its cap), CPU, the rates
/// since the sample before (against their limits), balance and energy.
pub fn status_line(previous: Option<&Sample>, now: &Sample) -> String {
    let mut parts = vec![format!("nbt {:>5.0} s", now.t_seconds)];
    if let Some(memory) = now.memory_bytes {
        parts.push(match now.memory_limit_bytes {
            Some(cap) => format!("mem {} / {}", format_size(memory), format_size(cap)),
            None => format!("mem {}", format_size(memory)),
        });
    }
    let span = previous
        .map(|p| now.t_seconds - p.t_seconds)
        .filter(|s| *s > 0.0);
    if let (Some(p), Some(span)) = (previous, span) {
        if let (Some(a), Some(b)) = (p.cpu_seconds, now.cpu_seconds) {
            parts.push(format!("cpu {:.2}", (b - a).max(0.0) / span));
        }
        for (name, before, after, limit) in [
            (
                "out",
                p.egress,
                now.egress,
                now.egress_rate_limit_bits_per_second,
            ),
            (
                "in",
                p.ingress,
                now.ingress,
                now.ingress_rate_limit_bits_per_second,
            ),
        ] {
            let (Some(a), Some(b)) = (before, after) else {
                continue;
            };
            // A direction with no limit and no traffic yet says nothing.
            if limit.is_none() && b.passed_bytes == 0 {
                continue;
            }
            let bits = b.passed_bytes.saturating_sub(a.passed_bytes) as f64 * 8.0 / span;
            parts.push(match limit {
                Some(limit) => format!("{name} {} / {}", measured_rate(bits), format_rate(limit)),
                None => format!("{name} {}", measured_rate(bits)),
            });
        }
    }
    if let Some(balance) = now.balance {
        parts.push(format!("balance {balance:.2}"));
    }
    if let Some(joules) = now.joules {
        parts.push(format!("{joules:.1} J"));
    }
    parts.join("  ")
}

/// A measured rate, to three figures or so.
pub fn measured_rate(bits_per_second: f64) -> String {
    match bits_per_second {
        r if r >= 1e9 => format!("{:.2}gbit", r / 1e9),
        r if r >= 1e6 => format!("{:.1}mbit", r / 1e6),
        r if r >= 1e3 => format!("{:.0}kbit", r / 1e3),
        r => format!("{r:.0}bit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_gives_rates_over_the_last_interval() {
        let before = Sample {
            t_seconds: 1.0,
            cpu_seconds: Some(0.5),
            egress: Some(Packets {
                passed_bytes: 1000,
                ..Packets::default()
            }),
            ..Sample::default()
        };
        let now = Sample {
            t_seconds: 3.0,
            memory_bytes: Some(64 << 20),
            memory_limit_bytes: Some(128 << 20),
            cpu_seconds: Some(1.5),
            egress: Some(Packets {
                passed_bytes: 1000 + 250_000,
                ..Packets::default()
            }),
            egress_rate_limit_bits_per_second: Some(1_000_000),
            balance: Some(4.5),
            joules: Some(12.25),
            ..Sample::default()
        };
        let line = status_line(Some(&before), &now);
        assert!(line.contains("mem 64.0 MiB / 128.0 MiB"), "{line}");
        assert!(line.contains("cpu 0.50"), "{line}");
        assert!(line.contains("out 1.0mbit / 1mbit"), "{line}");
        assert!(line.contains("balance 4.50"), "{line}");
        assert!(line.contains("12.2 J") || line.contains("12.3 J"), "{line}");
        // The first sample has no rates yet.
        assert!(!status_line(None, &now).contains("out"));
    }
}
