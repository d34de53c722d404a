//! A run's receipt, made from its summary: the limits in force, what the kernel saw the workload
//! go through, and where each joule came from (the body's fields are `receipt::body`'s).

use serde_json::Value;

use super::summary::RunSummary;
use crate::enforce::cgroup::Limits;
use crate::enforce::edt::Latency;
use crate::enforce::shaper::NetLimits;
use crate::receipt::body::{Kind, Receipt, Scarcity};
use crate::telemetry::energy::Energy;

/// The limits in force, as one object: at the start for a run's task receipts, at the end for
/// the run's own.
pub fn constraints(
    profile: &str,
    limits: &Limits,
    net: &NetLimits,
    latency: Option<&Latency>,
) -> Value {
    serde_json::json!({
        "profile": profile,
        "limits": limits,
        "network": net,
        "latency": latency,
    })
}

/// The receipt of a finished run.
pub fn of_run(summary: &RunSummary, energy: Energy, key_id: String) -> Receipt {
    Receipt {
        run: Some(summary.run.clone()),
        command: summary.command.clone(),
        exit_status: Some(summary.exit.status),
        constraints: constraints(
            &summary.profile,
            &summary.limits,
            &summary.net_limits,
            summary.latency.as_ref(),
        ),
        scarcity: Some(scarcity(summary)),
        joules_spent: energy.total(),
        energy,
        summary: serde_json::to_value(summary).ok(),
        ..Receipt::new(Kind::Run, key_id)
    }
}

fn scarcity(summary: &RunSummary) -> Scarcity {
    let c = &summary.cgroup;
    let p = c.pressure.clone().unwrap_or_default();
    let shaped = summary.shaped.unwrap_or_default();
    Scarcity {
        oom_kills: c.oom_kills,
        cpu_throttled_usec: c.cpu_throttled_usec,
        cpu_throttled_periods: c.cpu_throttled_periods,
        forks_refused: c.forks_refused,
        psi_cpu_some_usec: p.cpu_some_usec,
        psi_memory_some_usec: p.memory_some_usec,
        psi_memory_full_usec: p.memory_full_usec,
        psi_io_some_usec: p.io_some_usec,
        psi_io_full_usec: p.io_full_usec,
        egress_rate_dropped_packets: shaped.egress.rate_dropped_packets,
        egress_loss_dropped_packets: shaped.egress.loss_dropped_packets,
        ingress_rate_dropped_packets: shaped.ingress.rate_dropped_packets,
        ingress_loss_dropped_packets: shaped.ingress.loss_dropped_packets,
        egress_rate_dropped_bytes: shaped.egress.rate_dropped_bytes,
        egress_loss_dropped_bytes: shaped.egress.loss_dropped_bytes,
        ingress_rate_dropped_bytes: shaped.ingress.rate_dropped_bytes,
        ingress_loss_dropped_bytes: shaped.ingress.loss_dropped_bytes,
        blocked_calls: summary.ledger.as_ref().map(|l| l.blocked_calls),
        blocked_packets: summary.ledger.as_ref().map(|l| l.blocked_packets),
        balance_start_micro: summary.ledger.as_ref().map(|l| l.balance_start_micro),
        balance_end_micro: summary.ledger.as_ref().map(|l| l.balance_end_micro),
    }
}
