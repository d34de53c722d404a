//! The summary of a run: one structure, printed for people (stderr) or as JSON (stdout).

use crate::sys::user::Identity;
use std::fmt::Write as _;

use serde::Serialize;

use crate::enforce::account::Traffic;
use crate::enforce::cgroup::{CgroupStats, Limits, CPU_PERIOD_US};
use crate::enforce::edt::Latency;
use crate::enforce::ledger::{format_amount, LedgerSummary};
use crate::enforce::shaper::{describe_traffic, Direction, NetLimits, ShapedTraffic};
use crate::learning::{RefusedReport, TaskOutcome};
use crate::plan::link::{network_limits, Link};
use crate::receipt::Written;
use crate::schedule::apply::Event;
use crate::sys::supervise::Exit;
use crate::telemetry::energy::Energy;
use crate::units::format_size;

/// A `--link` of the run and what its shaper did.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    #[serde(flatten)]
    pub link: Link,
    pub shaped: ShapedTraffic,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run: String,
    /// The name given with `--name`.
    pub name: Option<String>,
    pub command: Vec<String>,
    /// Who the workload ran as.
    pub user: Identity,
    pub profile: String,
    pub limits: Limits,
    /// "unified" or "hybrid"; where each controller lives.
    pub cgroup_mode: String,
    pub exit: Exit,
    pub wall_seconds: f64,
    pub cgroup: CgroupStats,
    /// IP packets of the run's sockets, counted by nbt's cgroup_skb programs: all the workload
    /// offered (egress) and all that arrived for it (ingress), before shaping.
    pub network: Option<Traffic>,
    /// The network limits in force at the end (`nbt set` may change them during the run).
    pub net_limits: NetLimits,
    /// What the shaper passed and dropped, per direction, in wire bytes (the run's own link:
    /// every destination that no `--link` names).
    pub shaped: Option<ShapedTraffic>,
    /// Each `--link`: its destinations, its limits, and what its shaper passed and dropped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkReport>,
    /// The balance and what was charged and refused, for runs with one.
    pub ledger: Option<LedgerSummary>,
    /// Added delay at the end (`nbt set` may change it), for runs started with --latency.
    pub latency: Option<Latency>,
    /// The joules the run spent, by source, each labelled `measured` or `model`.
    pub energy: Energy,
    /// What the schedule changed and injected, when, and what the kernel saw meanwhile.
    pub events: Vec<Event>,
    /// The run's time series: its rows, their interval and its SHA-256; the series itself is
    /// stored beside the receipts (`nbt receipts series RUN`).
    pub series: Option<crate::telemetry::series::SeriesRef>,
    /// The learning updates the workload reported through $NBT_REPORT, as judged.
    pub tasks: Vec<TaskOutcome>,
    /// Report lines nbt could not use, with why.
    pub refused_reports: Vec<RefusedReport>,
    /// The run's own receipt (`None` inside the receipt itself, which cannot name its own hash).
    pub receipt: Option<Written>,
    /// Why a receipt could not be written; nbt then exits 125.
    pub receipt_error: Option<String>,
    /// Machine-wide hardware caps: what was set, the values before, and whether they are back.
    pub hardware: Option<HardwareReport>,
    /// CPU and GPU sensors sampled during the run, and the `--gpu-memory` watch.
    pub sensors: crate::enforce::hwcaps::watch::SensorReport,
    /// For an attachment (`nbt attach`): its target, how it ended and what went back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachReport>,
    /// For a zone (`nbt zone remove`): what became of the processes in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<ZoneReport>,
}

/// A removed zone's processes.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneReport {
    /// Processes moved in with `nbt zone attach`, sent back to their own cgroups.
    pub moved_back: usize,
    /// Processes started in it (`nbt zone exec`), killed with it.
    pub killed: usize,
}

/// What an attachment held and gave back.
#[derive(Debug, Clone, Serialize)]
pub struct AttachReport {
    /// "pid", "cgroup", "container" or "unit".
    pub kind: String,
    pub target: String,
    /// The target's v2 cgroup (for `--pid`: the one its process went back to).
    pub cgroup: std::path::PathBuf,
    /// "detached by SIGINT", "the target ended".
    pub ended: String,
    /// `--pid`: the process (and what it started) went back to its own cgroups.
    pub moved_back: bool,
    /// The target's limit files written back; `None` for `--pid` (nbt wrote none of them).
    pub restored: Option<crate::enforce::target::Restored>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HardwareReport {
    pub set: Vec<String>,
    pub original: Vec<String>,
    pub restored: bool,
    pub restore_errors: Vec<String>,
}

impl RunSummary {
    fn write_sensors(&self, out: &mut String) {
        use crate::enforce::hwcaps::watch::Series;
        let show = |label: &str, unit: &str, s: &Option<Series>| {
            s.map(|s| format!("{label} {:.0}/{:.0}/{:.0} {unit}", s.min, s.avg, s.max))
        };
        let sensors = &self.sensors;
        let cpu = match (&sensors.cpu_temperature_c, &sensors.cpu_temperature_absent) {
            (Some(_), _) => show("temperature", "°C", &sensors.cpu_temperature_c)
                .map(|t| format!("{t} (min/avg/max)")),
            (None, Some(why)) => Some(format!("temperature not measured: {why}")),
            (None, None) => None,
        };
        if let Some(cpu) = cpu {
            let _ = writeln!(out, "  cpu sensors   {cpu}");
        }
        if let Some(why) = &sensors.gpu_absent {
            let _ = writeln!(out, "  gpu sensors   not measured: {why}");
        }
        for gpu in &sensors.gpus {
            let figures: Vec<String> = [
                show("temperature", "°C", &gpu.temperature_c),
                show("power", "W", &gpu.power_w),
                show("clock", "MHz", &gpu.graphics_clock_mhz),
                show("memory clock", "MHz", &gpu.memory_clock_mhz),
                show("utilisation", "%", &gpu.utilization_pct),
            ]
            .into_iter()
            .flatten()
            .collect();
            let _ = writeln!(
                out,
                "  gpu {:<9} {} (min/avg/max); run's memory peak {}",
                gpu.index,
                figures.join(", "),
                format_size(gpu.run_memory_peak_bytes)
            );
        }
        if let Some(memory) = &sensors.gpu_memory {
            let _ = writeln!(
                out,
                "  gpu memory    cap {} per GPU, watched; {}",
                format_size(memory.cap_bytes),
                memory
                    .exceeded
                    .as_ref()
                    .map(|why| format!("EXCEEDED: {why}; nbt stopped the workload"))
                    .unwrap_or_else(|| "never exceeded".into())
            );
        }
    }
}

fn seconds(usec: u64) -> String {
    format!("{:.2} s", usec as f64 / 1e6)
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map(show).unwrap_or_else(|| "n/a".into())
}

impl RunSummary {
    /// The cgroup limits, or "none (accounting only)".
    pub fn limits_text(limits: &Limits) -> String {
        let parts = Self::cgroup_limits(limits);
        if parts.is_empty() {
            "none (accounting only)".into()
        } else {
            parts.join(", ")
        }
    }

    fn cgroup_limits(limits: &Limits) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(b) = limits.memory_bytes {
            parts.push(format!("memory {}", format_size(b)));
        }
        if let Some(b) = limits.swap_bytes {
            parts.push(format!("swap {}", format_size(b)));
        }
        if let Some(m) = limits.cpu_millicores {
            parts.push(format!(
                "cpus {} ({} µs per {} µs)",
                m as f64 / 1000.0,
                m * CPU_PERIOD_US / 1000,
                CPU_PERIOD_US
            ));
        }
        if let Some(p) = limits.pids {
            parts.push(format!("pids {p}"));
        }
        parts
    }

    /// Every limit in force at the end of the run: cgroups, network, latency, the balance gate
    /// and hardware caps; "none (accounting only)" when there is none.
    pub fn limits_line(&self) -> String {
        let mut parts = Self::cgroup_limits(&self.limits);
        parts.extend(network_limits(&self.net_limits, self.latency.as_ref()));
        for l in &self.links {
            parts.push(format!("link {}", l.link.describe()));
        }
        if let Some(l) = &self.ledger {
            parts.push(format!(
                "balance {} (gate closes at 0)",
                format_amount(l.balance_start_micro)
            ));
        }
        if let Some(hw) = &self.hardware {
            parts.extend(hw.set.iter().cloned());
        }
        if parts.is_empty() {
            "none (accounting only)".into()
        } else {
            parts.join(", ")
        }
    }

    /// The human summary, several lines, for stderr.
    pub fn human(&self) -> String {
        let mut out = String::new();
        self.write_outcome(&mut out);
        self.write_cpu(&mut out);
        self.write_memory(&mut out);
        self.write_processes(&mut out);
        self.write_stalls(&mut out);
        self.write_network(&mut out);
        self.write_shaping(&mut out);
        self.write_latency(&mut out);
        self.write_links(&mut out);
        self.write_ledger(&mut out);
        self.write_events(&mut out);
        self.write_hardware(&mut out);
        self.write_sensors(&mut out);
        self.write_energy(&mut out);
        self.write_updates(&mut out);
        self.write_receipt(&mut out);
        self.write_signals(&mut out);
        out
    }

    /// The limits line: every limit in force, the profile, the cgroup layout.
    fn write_limits(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  limits        {} [profile {}, cgroups {}]",
            self.limits_line(),
            self.profile,
            self.cgroup_mode
        );
    }

    /// What an attachment held, how it ended and what it gave back.
    fn write_attachment(&self, attached: &AttachReport, out: &mut String) {
        let name = self
            .name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "nbt: {}{name} detached from {}: {}",
            self.run, attached.target, attached.ended
        );
        let _ = writeln!(out, "  cgroup        {}", attached.cgroup.display());
        let back = match (&attached.restored, attached.moved_back) {
            (_, true) => "its processes moved back to this cgroup".to_string(),
            (None, false) => "nothing to put back".to_string(),
            (Some(r), false) if !r.errors.is_empty() => {
                format!("NOT all put back: {}", r.errors.join("; "))
            }
            (Some(r), false) if r.gone => "the cgroup went with its target".to_string(),
            (Some(r), false) if r.written.is_empty() => "nothing had changed".to_string(),
            (Some(r), false) => format!("put back {}", r.written.join(", ")),
        };
        let _ = writeln!(out, "  restored      {back}");
        self.write_limits(out);
        let _ = writeln!(out, "  attached for  {:.2} s", self.wall_seconds);
    }

    /// How the workload ended, what it was, its limits and its wall time.
    fn write_outcome(&self, out: &mut String) {
        if let Some(attached) = &self.attached {
            self.write_attachment(attached, out);
            return;
        }
        if let Some(zone) = &self.zone {
            let name = self.name.as_deref().unwrap_or(&self.run);
            let _ = writeln!(
                out,
                "nbt: zone {name} ({}) removed after {:.2} s: {} moved-in processes sent back, {} \
                 started in it killed",
                self.run, self.wall_seconds, zone.moved_back, zone.killed
            );
            self.write_limits(out);
            return;
        }
        let c = &self.cgroup;
        let how = match (&self.exit.code, &self.exit.signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) if c.oom_kills.unwrap_or(0) > 0 && signal == "SIGKILL" => {
                format!(
                    "killed by {signal} (the OOM killer), status {}",
                    self.exit.status
                )
            }
            (None, Some(signal)) => format!("killed by {signal}, status {}", self.exit.status),
            (None, None) => format!("status {}", self.exit.status),
        };
        let name = self
            .name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let _ = writeln!(out, "nbt: {}{name} ended: {how}", self.run);
        let _ = writeln!(out, "  command       {}", self.command.join(" "));
        let _ = writeln!(
            out,
            "  user          {}{}",
            self.user.describe(),
            if self.user.is_root() {
                ", not confined: root can undo its own limits (--user root)"
            } else {
                ", no capabilities, no new privileges"
            }
        );
        self.write_limits(out);
        let _ = writeln!(out, "  wall time     {:.2} s", self.wall_seconds);
    }

    /// CPU time, and how much of it the CPU cap throttled.
    fn write_cpu(&self, out: &mut String) {
        let c = &self.cgroup;
        if let Some(usage) = c.cpu_usage_usec {
            let _ = writeln!(
                out,
                "  cpu time      {} (user {}, system {}), {:.2} cores on average",
                seconds(usage),
                opt(c.cpu_user_usec, seconds),
                opt(c.cpu_system_usec, seconds),
                usage as f64 / 1e6 / self.wall_seconds.max(1e-9)
            );
        }
        if self.limits.cpu_millicores.is_none() {
            let _ = writeln!(out, "  cpu throttled no CPU cap");
        } else if c.cpu_periods.is_some() {
            let _ = writeln!(
                out,
                "  cpu throttled {} of {} periods, {} in all",
                opt(c.cpu_throttled_periods, |n| n.to_string()),
                opt(c.cpu_periods, |n| n.to_string()),
                opt(c.cpu_throttled_usec, seconds)
            );
        }
    }

    /// Memory and swap peaks, and OOM kills.
    fn write_memory(&self, out: &mut String) {
        let c = &self.cgroup;
        let of_limit = |limit: Option<u64>| {
            limit
                .map(|l| format!(" of {}", format_size(l)))
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "  memory peak   {}{}{}; swap peak {}{}",
            opt(c.memory_peak_bytes, format_size),
            of_limit(self.limits.memory_bytes),
            c.memory_peak_source
                .filter(|s| *s != "kernel")
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            opt(c.swap_peak_bytes, format_size),
            c.swap_peak_source
                .filter(|s| *s != "kernel")
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  oom kills     {}",
            opt(c.oom_kills, |n| n.to_string())
        );
    }

    /// The processes' peak and the forks refused, where the kernel counts them.
    fn write_processes(&self, out: &mut String) {
        let c = &self.cgroup;
        if c.pids_peak.is_some() {
            let _ = writeln!(
                out,
                "  processes     peak {}{}{}, {} forks refused",
                opt(c.pids_peak, |n| n.to_string()),
                self.limits
                    .pids
                    .map(|p| format!(" of {p}"))
                    .unwrap_or_default(),
                c.pids_peak_source
                    .filter(|s| *s != "kernel")
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                opt(c.forks_refused, |n| n.to_string())
            );
        }
    }

    /// Pressure stall totals (PSI).
    fn write_stalls(&self, out: &mut String) {
        if let Some(p) = &self.cgroup.pressure {
            let _ = writeln!(
                out,
                "  stalls (PSI)  cpu some {} full {}; memory some {} full {}; io some {} full {}",
                opt(p.cpu_some_usec, seconds),
                opt(p.cpu_full_usec, seconds),
                opt(p.memory_some_usec, seconds),
                opt(p.memory_full_usec, seconds),
                opt(p.io_some_usec, seconds),
                opt(p.io_full_usec, seconds)
            );
        }
    }

    /// The IP packets counted in the kernel, both ways.
    fn write_network(&self, out: &mut String) {
        if let Some(n) = &self.network {
            let _ = writeln!(
                out,
                "  network       in {} packets, {}; out {} packets, {} (IP packets, counted in the kernel)",
                n.ingress.packets,
                format_size(n.ingress.bytes),
                n.egress.packets,
                format_size(n.egress.bytes)
            );
        }
    }

    /// Each direction's limits and what the shaper passed and dropped, for limited runs.
    fn write_shaping(&self, out: &mut String) {
        if let Some(shaped) = &self.shaped {
            if !self.net_limits.is_unlimited() {
                for (name, limits, traffic, direction) in [
                    (
                        "egress",
                        &self.net_limits.egress,
                        &shaped.egress,
                        Direction::Egress,
                    ),
                    (
                        "ingress",
                        &self.net_limits.ingress,
                        &shaped.ingress,
                        Direction::Ingress,
                    ),
                ] {
                    let _ = writeln!(out, "  {name:<13} limit {}", limits.describe(direction));
                    let _ = writeln!(
                        out,
                        "                {}",
                        describe_traffic(traffic, self.wall_seconds)
                    );
                }
            }
        }
    }

    /// Each `--link`: its limits and what its shaper passed and dropped.
    fn write_links(&self, out: &mut String) {
        for l in &self.links {
            let _ = writeln!(out, "  link          {}", l.link.describe());
            for (name, traffic) in [("egress", &l.shaped.egress), ("ingress", &l.shaped.ingress)] {
                let _ = writeln!(
                    out,
                    "                {name} {}",
                    describe_traffic(traffic, self.wall_seconds)
                );
            }
        }
    }

    /// The delay added to outgoing packets, for runs started with --latency.
    fn write_latency(&self, out: &mut String) {
        if let Some(l) = &self.latency {
            let _ = writeln!(
                out,
                "  latency       {} ms ± {} ms added to each outgoing packet (EDT, fq)",
                l.latency_ns as f64 / 1e6,
                l.jitter_ns as f64 / 1e6
            );
        }
    }

    /// The balance, what was charged, and what the gate blocked, for runs with a balance.
    fn write_ledger(&self, out: &mut String) {
        if let Some(l) = &self.ledger {
            let _ = writeln!(
                out,
                "  balance       {} -> {} (topped up {}); charged {} for {} calls, {} for {}, {} for time",
                format_amount(l.balance_start_micro),
                format_amount(l.balance_end_micro),
                format_amount(l.topped_up_micro),
                format_amount(l.charged_calls_micro),
                l.calls,
                format_amount(l.charged_egress_micro),
                format_size(l.egress_bytes),
                format_amount(l.charged_time_micro),
            );
            let _ = writeln!(
                out,
                "  gate          calls charged {} ({} requests on open connections), refused {} ({} on open connections), {} connections torn down, {} packets dropped; call gap {} ms",
                l.calls,
                l.requests,
                l.blocked_calls,
                l.refused_requests,
                l.connections_torn_down,
                l.blocked_packets,
                l.call_gap_ms,
            );
            for (destination, calls) in &l.destinations {
                let _ = writeln!(
                    out,
                    "                {destination}: charged {}, refused {}, torn down {}",
                    calls.charged, calls.refused, calls.torn_down
                );
            }
        }
    }

    /// The schedule's events, one a line, with what the kernel saw while a fault lasted.
    fn write_events(&self, out: &mut String) {
        for (i, e) in self.events.iter().enumerate() {
            let during = e
                .during
                .map(|d| {
                    format!(
                        " [meanwhile: cpu {:.2} s, throttled {:.2} s, memory stall {:.2} s, {} drops, {} oom kills, {} calls blocked]",
                        d.cpu_usec as f64 / 1e6,
                        d.cpu_throttled_usec as f64 / 1e6,
                        d.psi_memory_some_usec as f64 / 1e6,
                        d.egress_dropped_packets + d.ingress_dropped_packets,
                        d.oom_kills,
                        d.blocked_calls
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<13} {:>7.2} s {}: {}{}{}",
                if i == 0 { "events" } else { "" },
                e.t,
                e.source,
                e.what,
                e.error
                    .as_ref()
                    .map(|err| format!(" FAILED: {err}"))
                    .unwrap_or_default(),
                during
            );
        }
    }

    /// The machine-wide hardware caps, and whether they are back.
    fn write_hardware(&self, out: &mut String) {
        if let Some(hw) = &self.hardware {
            let _ = writeln!(
                out,
                "  hardware      set {}; {}",
                hw.set.join(", "),
                if hw.restored {
                    format!("restored: {}", hw.original.join(", "))
                } else {
                    format!(
                        "NOT restored ({}); `nbt cleanup` retries",
                        hw.restore_errors.join("; ")
                    )
                }
            );
        }
    }

    /// The joules, by source.
    fn write_energy(&self, out: &mut String) {
        for j in &self.energy.joules {
            let _ = writeln!(
                out,
                "  energy        {:.2} J ({}, {}){}",
                j.joules,
                j.source,
                j.label,
                self.energy
                    .note
                    .as_ref()
                    .map(|n| format!("\n                {n}"))
                    .unwrap_or_default()
            );
        }
    }

    /// The learning updates reported, as judged, and the report lines refused.
    fn write_updates(&self, out: &mut String) {
        if !self.tasks.is_empty() || !self.refused_reports.is_empty() {
            let accepted = self.tasks.iter().filter(|t| t.accepted).count();
            let joules: Option<f64> = self.tasks.iter().map(|t| t.joules).sum();
            let _ = writeln!(
                out,
                "  updates       {} reported: {accepted} accepted, {} rejected{}{}",
                self.tasks.len(),
                self.tasks.len() - accepted,
                joules
                    .map(|j| format!(", {j:.1} J"))
                    .unwrap_or_else(|| ", joules not measured".into()),
                if self.refused_reports.is_empty() {
                    String::new()
                } else {
                    format!("; {} report lines refused", self.refused_reports.len())
                }
            );
            for refused in &self.refused_reports {
                let _ = writeln!(
                    out,
                    "                line {}: {}",
                    refused.line, refused.why
                );
            }
        }
    }

    /// Where the run's receipt went, or why it could not be written.
    fn write_receipt(&self, out: &mut String) {
        if let Some(r) = &self.receipt {
            let _ = writeln!(
                out,
                "  receipt       {} in {} (sha256 {}), signed by {}",
                r.seq,
                r.store.display(),
                crate::receipt::export::short(&r.receipt_hash),
                crate::receipt::export::short(&r.key_id)
            );
            if let Some(series) = &self.series {
                let _ = writeln!(
                    out,
                    "  series        {} samples, {} s apart (`nbt receipts series {}`, `nbt report {}`)",
                    series.rows, series.interval_seconds, self.run, self.run
                );
            }
        }
        if let Some(err) = &self.receipt_error {
            let _ = writeln!(out, "  receipt       NOT WRITTEN: {err}");
        }
    }

    /// The signals passed on to the workload.
    fn write_signals(&self, out: &mut String) {
        // An attachment forwards nothing: its outcome line says which signal ended it.
        if !self.exit.forwarded_signals.is_empty() && self.attached.is_none() {
            let _ = writeln!(
                out,
                "  signals       forwarded {}",
                self.exit.forwarded_signals.join(", ")
            );
        }
    }
}
