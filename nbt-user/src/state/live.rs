//! `nbt ps` and `nbt set`: look at and change live runs from another process. A run's record
//! (`state`) names its BPF maps by kernel id; `set` writes the shaper's configuration map, which
//! the programs read per packet, so a change applies at once and nothing is reattached.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cmd::NetArgs;
use crate::enforce::shaper::{self, Direction, NetLimits, ShapedTraffic};
use crate::error::PlanError;
use crate::plan::{Flags, Plan};
use crate::state::{state_dir, RunRecord};
use crate::units;

#[derive(Debug, Serialize)]
pub struct LiveRun {
    pub run: String,
    pub nbt_pid: i32,
    pub command: Vec<String>,
    pub seconds: f64,
    pub net_limits: NetLimits,
    pub shaped: Option<ShapedTraffic>,
    /// The balance now, in micro-units, for runs with one.
    pub balance_micro: Option<i64>,
}


/// Every live run, with its current limits and counters.
pub fn live_runs() -> Vec<LiveRun> {
    RunRecord::read_all(&state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|record| record.supervisor_alive())
        .map(|record| LiveRun {
            balance_micro: record.ledger.as_ref().and_then(|ids| {
                let (credit, time, kernel) = crate::enforce::gate::read_ledger(ids).ok()?;
                Some(
                    crate::enforce::gate::balance_pico(credit, time, &kernel)
                        / crate::enforce::ledger::PICO_PER_MICRO,
                )
            }),
            shaped: record
                .maps
                .as_ref()
                .and_then(|ids| shaper::read_by_id(ids).ok()),
            seconds: if record.started_unix > 0.0 {
                crate::sys::proc::now_unix() - record.started_unix
            } else {
                0.0
            },
            run: record.name,
            nbt_pid: record.supervisor_pid,
            command: record.command,
            net_limits: record.net,
        })
        .collect()
}

pub fn print_ps(runs: &[LiveRun]) {
    if runs.is_empty() {
        eprintln!("nbt ps: no live runs");
        return;
    }
    for run in runs {
        println!(
            "{}  nbt pid {}  {:.0} s  {}",
            run.run,
            run.nbt_pid,
            run.seconds,
            run.command.join(" ")
        );
        if let Some(balance) = run.balance_micro {
            println!("  balance  {}", crate::enforce::ledger::format_amount(balance));
        }
        for (name, limits, traffic, direction) in [
            (
                "egress",
                &run.net_limits.egress,
                run.shaped.map(|s| s.egress),
                Direction::Egress,
            ),
            (
                "ingress",
                &run.net_limits.ingress,
                run.shaped.map(|s| s.ingress),
                Direction::Ingress,
            ),
        ] {
            println!("  {name:<8} limit {}", limits.describe(direction));
            if let Some(traffic) = traffic {
                println!("           {}", traffic.describe(run.seconds));
            }
        }
    }
}

/// The network limits `args` asks for, each flag given replacing the run's current setting
/// (`--loss 0` removes loss). A burst set before stays with a new rate; else the new rate gets
/// its default burst.
pub fn changed_limits(current: &NetLimits, args: &NetArgs) -> Result<NetLimits, PlanError> {
    // --burst is checked here: the plan would want a rate beside it, and the run has its own.
    let mut flags = Flags::default();
    args.add_to(&mut flags);
    (flags.burst, flags.latency, flags.jitter) = (None, None, None);
    let asked = Plan::build(&flags)?.net;
    let mut next = *current;
    if args.egress_rate.is_some() {
        next.egress.rate_bits_per_sec = asked.egress.rate_bits_per_sec;
    }
    if args.ingress_rate.is_some() {
        next.ingress.rate_bits_per_sec = asked.ingress.rate_bits_per_sec;
    }
    if let Some(text) = &args.burst {
        let bytes = units::parse_size("--burst", text)?;
        shaper::check_burst("--burst", text, bytes)?;
        next.egress.burst_bytes = Some(bytes);
        next.ingress.burst_bytes = Some(bytes);
    }
    if args.loss.is_some() || args.loss_model.is_some() {
        let direction = args.loss_direction.as_deref().unwrap_or("egress");
        if direction == "egress" || direction == "both" {
            next.egress.loss = asked.egress.loss;
        }
        if direction == "ingress" || direction == "both" {
            next.ingress.loss = asked.ingress.loss;
        }
    }
    Ok(next)
}

/// `nbt set RUN ...`: writes the new limits into the live run's maps and its record.
pub fn set(run: &str, args: &NetArgs) -> Result<NetLimits> {
    let dir = state_dir();
    let (_, record) = RunRecord::find_live(&dir, run)?;
    let Some(ids) = record.maps else {
        bail!("run '{run}' has not loaded its BPF programs yet; try again in a moment");
    };
    let latency = match (&args.latency, &args.jitter) {
        (None, None) => record.latency,
        (latency, jitter) => {
            let (Some(map), Some(current)) = (record.edt_map, record.latency) else {
                bail!(
                    "run '{run}' was started without --latency, so fq is not on its interfaces; \
                     start it with --latency (0ms will do) to change the delay while it runs"
                );
            };
            let duration =
                |flag: &str, text: &Option<String>, now: u64| -> Result<u64, PlanError> {
                    match text {
                        Some(text) => Ok(units::parse_duration(flag, text)?.as_nanos() as u64),
                        None => Ok(now),
                    }
                };
            let next = crate::enforce::edt::Latency {
                latency_ns: duration("--latency", latency, current.latency_ns)?,
                jitter_ns: duration("--jitter", jitter, current.jitter_ns)?,
            };
            if next.latency_ns + next.jitter_ns > crate::enforce::edt::MAX_DELAY.as_nanos() as u64 {
                bail!(PlanError(
                    "--latency plus --jitter above 10 s, the fq qdisc's horizon".into()
                ));
            }
            crate::enforce::edt::set_by_id(map, &next)?;
            Some(next)
        }
    };
    let next = changed_limits(&record.net, args)?;
    shaper::write_limits_by_id(&ids, &next)?;
    RunRecord {
        net: next,
        latency,
        ..record
    }
    .write(&dir)?;
    Ok(next)
}

/// `nbt balance RUN add AMOUNT`: returns the balance after the top-up, in micro-units.
pub fn top_up(run: &str, micro: i64) -> Result<i64> {
    let (_, record) = RunRecord::find_live(&state_dir(), run)?;
    let Some(ids) = record.ledger else {
        bail!("run '{run}' has no balance (it was started without --balance)");
    };
    crate::enforce::gate::top_up(&ids, micro)
}
