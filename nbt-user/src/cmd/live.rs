//! The commands on live runs: `nbt ps`, `nbt set`, `nbt balance`, `nbt fault`.

use std::time::Duration;

use anyhow::Result;

use super::args::{FaultArgs, LimitArgs, NetArgs};
use super::{privileged, usage_or_failure};
use crate::enforce::edt::Latency;
use crate::enforce::ledger::{format_amount, parse_amount};
use crate::enforce::shaper::{self, Direction, Directions, NetLimits};
use crate::error::PlanError;
use crate::plan::{Flags, Plan};
use crate::state::live::{self, LiveRun, NetSetting};
use crate::units;

/// `nbt ps [--json]`.
pub fn ps(json: bool) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    let runs = live::runs(true);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).expect("runs serialize")
        );
    } else {
        print_ps(&runs);
    }
    0
}

fn print_ps(runs: &[LiveRun]) {
    if runs.is_empty() {
        eprintln!("nbt ps: no live runs");
        return;
    }
    for run in runs {
        let nbt = if run.kind == "zone" {
            "zone, held by its pinned programs (`nbt zone remove` ends it)".to_string()
        } else if run.orphan {
            format!(
                "ORPHAN (nbt pid {} died; `nbt cleanup` removes it)",
                run.nbt_pid
            )
        } else {
            format!("nbt pid {}", run.nbt_pid)
        };
        let name = run
            .name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let what = match &run.target {
            Some(target) => format!("attached to {target}"),
            None => run.command.join(" "),
        };
        println!("{}{name}  {nbt}  {:.0} s  {what}", run.run, run.seconds);
        if let Some(balance) = run.balance_micro {
            println!("  balance  {}", format_amount(balance));
        }
        if let Some(latest) = &run.latest {
            print_latest(latest);
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
                println!(
                    "           {}",
                    shaper::describe_traffic(&traffic, run.seconds)
                );
            }
        }
        for link in &run.links {
            println!("  link     {}", link.link);
            if let Some(shaped) = &link.shaped {
                for (name, traffic) in [("egress", &shaped.egress), ("ingress", &shaped.ingress)] {
                    println!(
                        "           {name} {}",
                        shaper::describe_traffic(traffic, run.seconds)
                    );
                }
            }
        }
    }
}

/// The last sample of a run's series: memory, CPU, pressure, energy.
fn print_latest(latest: &std::collections::BTreeMap<String, f64>) {
    let get = |name: &str| latest.get(name).copied();
    let size = |bytes: f64| units::format_size(bytes as u64);
    let mut parts = Vec::new();
    if let Some(memory) = get("memory_bytes") {
        parts.push(match get("memory_limit_bytes") {
            Some(cap) => format!("memory {} of {}", size(memory), size(cap)),
            None => format!("memory {}", size(memory)),
        });
    }
    if let Some(swap) = get("swap_bytes").filter(|s| *s > 0.0) {
        parts.push(format!("swap {}", size(swap)));
    }
    if let Some(cpu) = get("cpu_seconds") {
        parts.push(format!("cpu {cpu:.2} s"));
    }
    if let Some(throttled) = get("cpu_throttled_seconds").filter(|s| *s > 0.0) {
        parts.push(format!("throttled {throttled:.2} s"));
    }
    if let Some(cores) = get("cpu_limit_cores") {
        parts.push(format!("cpu limit {cores} cores"));
    }
    if let Some(pids) = get("pids") {
        parts.push(match get("pids_limit") {
            Some(limit) => format!("pids {pids} of {limit}"),
            None => format!("pids {pids}"),
        });
    }
    if !parts.is_empty() {
        println!("  usage    {}", parts.join(", "));
    }
    let stalls: Vec<String> = [
        ("cpu", "psi_cpu_some_seconds"),
        ("memory", "psi_memory_some_seconds"),
        ("io", "psi_io_some_seconds"),
    ]
    .into_iter()
    .filter_map(|(what, column)| Some(format!("{what} {:.2} s", get(column)?)))
    .collect();
    if !stalls.is_empty() {
        println!("  stalled  {} (PSI some)", stalls.join(", "));
    }
    if let Some(joules) = get("joules") {
        println!("  energy   {joules:.1} J");
    }
}

/// `nbt set RUN [limits]`.
pub fn set(run: &str, limits: &LimitArgs, net: &NetArgs, signals: &libc::sigset_t) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    let given = limits_given(limits);
    if given.is_empty() {
        return report("nbt set", set_network(run, net));
    }
    // The cgroup limits first: a bad value there is refused before the network changes.
    let status = report("nbt set", set_limits(run, &given, signals));
    if status != 0 || !net_given(net) {
        return status;
    }
    report("nbt set", set_network(run, net))
}

/// The cgroup limits `nbt set` was given, as (schedule key, value).
fn limits_given(limits: &LimitArgs) -> Vec<(&'static str, &str)> {
    [
        ("memory", &limits.memory),
        ("swap", &limits.swap),
        ("cpus", &limits.cpus),
        ("pids", &limits.pids),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some((key, value.as_deref()?)))
    .collect()
}

/// Changes a live run's memory, swap, cpus and pids limits: one schedule step applied from
/// outside (as `nbt fault` applies a fault), so the values are checked as a schedule's are and
/// the change goes into the run's event log, from "nbt set".
pub fn set_limits(run: &str, given: &[(&str, &str)], signals: &libc::sigset_t) -> Result<String> {
    let mut step = String::from("step = [{ at = \"0s\"");
    for (key, value) in given {
        // A TOML string: the value as given, its quotes and backslashes escaped.
        let value: String = toml::Value::String(value.to_string()).to_string();
        step.push_str(&format!(", {key} = {value}"));
    }
    step.push_str(" }]");
    let events = crate::schedule::fault::apply_from_outside(run, "nbt set", &step, signals)?;
    let failed: Vec<String> = events.iter().filter_map(|e| e.error.clone()).collect();
    if !failed.is_empty() {
        anyhow::bail!("{run}: {}", failed.join("; "));
    }
    let done: Vec<String> = events.into_iter().map(|e| e.what).collect();
    Ok(format!("{run}: {}", done.join(", ")))
}

/// Whether any network flag was given.
fn net_given(net: &NetArgs) -> bool {
    !net.link.is_empty()
        || net.impair_direction.is_some()
        || net.ingress_queue.is_some()
        || changeable_given(net)
}

/// Whether any flag `nbt set` can change on a live run's network was given.
fn changeable_given(net: &NetArgs) -> bool {
    [
        &net.egress_rate,
        &net.ingress_rate,
        &net.burst,
        &net.loss,
        &net.loss_model,
        &net.latency,
        &net.jitter,
        &net.jitter_correlation,
        &net.loss_correlation,
        &net.duplicate,
        &net.corrupt,
        &net.reorder,
        &net.reorder_correlation,
        &net.reorder_gap,
    ]
    .iter()
    .any(|v| v.is_some())
}

/// Prints what a command on a live run did, or why it failed; the exit status.
fn report(command: &str, done: Result<String>) -> i32 {
    match done {
        Ok(line) => {
            eprintln!("{command}: {line}");
            0
        }
        Err(err) => {
            eprintln!("{command}: {err:#}");
            usage_or_failure(&err)
        }
    }
}

/// What `nbt set` (and `nbt top`) does: changes the run's network setting as `net` asks;
/// returns a line saying what is in force now. Flags that cannot change on a live run, and no
/// flag at all, are usage errors ([`PlanError`]).
pub fn set_network(run: &str, net: &NetArgs) -> Result<String> {
    if let Some(text) = &net.impair_direction {
        anyhow::bail!(PlanError(format!(
            "invalid value '{text}' for --impair-direction: a run's impair direction is \
             fixed when it starts (its tc programs are put on then); accepted: none on nbt set, \
             whose --duplicate and --corrupt apply where the run started them"
        )));
    }
    if net.ingress_queue.is_some() {
        anyhow::bail!(PlanError(
            "--ingress-queue is fixed when a run starts (its queue device and programs are made \
             then); accepted: none on nbt set, whose --ingress-rate changes the rate the queue \
             sends at"
                .into()
        ));
    }
    let mut done = Vec::new();
    if !net.link.is_empty() {
        done.push(set_links(run, &net.link)?);
    }
    if changeable_given(net) {
        let setting = live::change_network(run, |setting| change(run, setting, net))?;
        done.push(format!(
            "{}egress {}; ingress {}",
            if net.link.is_empty() {
                ""
            } else {
                "the run's own: "
            },
            setting.net.egress.describe(Direction::Egress),
            setting.net.ingress.describe(Direction::Ingress)
        ));
    } else if net.link.is_empty() {
        anyhow::bail!(PlanError("nothing to change: give --memory, --swap, --cpus, --pids, --egress-rate, --ingress-rate, --burst, --loss, --loss-model, --loss-correlation, --latency, --jitter, --jitter-correlation, --duplicate, --corrupt, --reorder, --reorder-correlation or --reorder-gap, or --link".into()));
    }
    let line = done.join("; ");
    // In the run's event log, as the cgroup limits' changes are: a change nobody can see after
    // is a change the receipt does not tell.
    if let Err(err) = crate::schedule::fault::record_change(run, "nbt set", &line) {
        eprintln!("nbt set: the change is made, but not in the run's events: {err:#}");
    }
    Ok(format!("{run}: {line}"))
}

/// The settings of a link that `nbt set --link` changes on a live run: the shaper's, which its
/// programs read per packet. A link's destinations are in the kernel's trie and its delay and
/// impairments in its tc programs, put on when the run starts: those stay.
/// They are the first six of a link's keys.
pub const LIVE_LINK_KEYS: &[&str] = crate::plan::link::LINK_KEYS.split_at(6).0;

/// One `nbt set --link to=DEST[,to=DEST...],KEY=VALUE...`: the link's destinations (as the run
/// was given them) and the flags asked for.
fn live_link(text: &str) -> Result<(Vec<String>, NetArgs), PlanError> {
    let refuse = |problem: String| {
        PlanError(format!(
            "invalid value '{text}' for --link: {problem}; accepted on a live run: \
             to=DEST[,to=DEST...],KEY=VALUE[,...], the destinations exactly as the run was \
             given them, KEY one of {}",
            LIVE_LINK_KEYS.join(", ")
        ))
    };
    let mut to = Vec::new();
    let mut args = NetArgs::default();
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(refuse(format!("'{part}' is not KEY=VALUE")));
        };
        let (key, value) = (key.trim(), Some(value.trim().to_string()));
        let slot = match key {
            "to" => {
                to.push(value.unwrap_or_default());
                continue;
            }
            "egress-rate" => &mut args.egress_rate,
            "ingress-rate" => &mut args.ingress_rate,
            "burst" => &mut args.burst,
            "loss" => &mut args.loss,
            "loss-model" => &mut args.loss_model,
            "loss-direction" => &mut args.loss_direction,
            other => {
                return Err(refuse(format!(
                    "'{other}' cannot change while the run lives (a link's delay and \
                     impairments are fixed when it starts)"
                )))
            }
        };
        if slot.replace(value.unwrap_or_default()).is_some() {
            return Err(refuse(format!("'{key}' is given twice")));
        }
    }
    if to.is_empty() {
        return Err(refuse("no destination (to=...)".into()));
    }
    if args.loss_direction.is_some() && args.loss.is_none() && args.loss_model.is_none() {
        return Err(refuse("loss-direction needs loss or loss-model".into()));
    }
    Ok((to, args))
}

/// `nbt set RUN --link ...`: changes the limits of links the run started with, found by their
/// destinations; each key given replaces that link's setting, the others stay.
fn set_links(run: &str, links: &[String]) -> Result<String> {
    let asked = links
        .iter()
        .map(|text| live_link(text))
        .collect::<Result<Vec<_>, _>>()?;
    let describe = |setting: &crate::state::LinkSetting| {
        let mut parts = crate::plan::link::network_limits(&setting.net, setting.latency.as_ref());
        if parts.is_empty() {
            parts.push("unlimited".into());
        }
        format!("to {}: {}", setting.to.join(", "), parts.join(", "))
    };
    let mut changed = Vec::new();
    live::change_links(
        run,
        |settings| {
            for (to, args) in &asked {
                let Some(i) = settings.iter().position(|s| &s.to == to) else {
                    let known: Vec<String> = settings
                        .iter()
                        .map(|s| format!("to={}", s.to.join(",to=")))
                        .collect();
                    anyhow::bail!(PlanError(format!(
                        "run '{run}' has no link to {}: links are found by their destinations \
                         exactly as the run was given them; it has {}",
                        to.join(", "),
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join("; ")
                        }
                    )));
                };
                settings[i].net = changed_limits(&settings[i].net, Directions::Egress, args)?;
                changed.push(i);
            }
            Ok(())
        },
        describe,
    )
    .map(|settings| {
        let lines: Vec<String> = changed
            .iter()
            .map(|&i| format!("link {}", describe(&settings[i])))
            .collect();
        lines.join("; ")
    })
}

/// The setting `args` asks for: the delay first (a bad duration is refused before any limit).
fn change(run: &str, setting: &mut NetSetting, args: &NetArgs) -> Result<()> {
    if args.latency.is_some() || args.jitter.is_some() {
        let Some(current) = setting.latency else {
            anyhow::bail!(
                "run '{run}' was started without --latency, so fq is not on its interfaces; \
                 start it with --latency (0ms will do) to change the delay while it runs"
            );
        };
        let duration = |flag: &str, text: &Option<String>, now: u64| match text {
            Some(text) => units::parse_duration(flag, text),
            None => Ok(Duration::from_nanos(now)),
        };
        let latency = duration("--latency", &args.latency, current.latency_ns)?;
        let jitter = duration("--jitter", &args.jitter, current.jitter_ns)?;
        let given = [
            args.latency.as_deref().map(|text| ("--latency", text)),
            args.jitter.as_deref().map(|text| ("--jitter", text)),
        ];
        setting.latency = Some(Latency {
            correlation: current.correlation,
            ..Latency::checked(latency, jitter, given)?
        });
    }
    if let Some(text) = &args.jitter_correlation {
        let p = units::parse_percent("--jitter-correlation", text)?;
        match setting.latency.as_mut() {
            Some(latency) if latency.jitter_ns > 0 => latency.correlation = p,
            _ => anyhow::bail!(PlanError(
                "--jitter-correlation correlates the jitter's draws: the run has no --jitter"
                    .into()
            )),
        }
    }
    setting.net = changed_limits(&setting.net, setting.impair_direction, args)?;
    Ok(())
}

/// --loss-correlation and the reorder flags, read against the run's own loss: the plan would
/// want a --loss or a --latency beside them.
fn changed_impairments(next: &mut NetLimits, args: &NetArgs) -> Result<(), PlanError> {
    let percent = |flag: &str, text: &Option<String>| {
        text.as_deref()
            .map(|t| units::parse_percent(flag, t))
            .transpose()
    };
    if let Some(p) = percent("--loss-correlation", &args.loss_correlation)? {
        if !next.correlate_loss(p) {
            return Err(PlanError(
                "--loss-correlation correlates the uniform loss's draws: the run has no --loss"
                    .into(),
            ));
        }
    }
    let impair = &mut next.egress.impair;
    if let Some(p) = percent("--reorder", &args.reorder)? {
        impair.reorder = p;
    }
    if let Some(p) = percent("--reorder-correlation", &args.reorder_correlation)? {
        impair.reorder_correlation = p;
    }
    if let Some(text) = &args.reorder_gap {
        impair.reorder_gap = shaper::parse_reorder_gap("--reorder-gap", text)?;
    }
    Ok(())
}

/// The network limits `args` asks for, each flag given replacing the run's current setting
/// (`--loss 0` removes loss). A burst set before stays with a new rate; else the new rate gets
/// its default burst.
/// --duplicate and --corrupt go where the run started them (`impair`).
fn changed_limits(
    current: &NetLimits,
    impair: Directions,
    args: &NetArgs,
) -> Result<NetLimits, PlanError> {
    // --burst is checked here: the plan would want a rate beside it, and the run has its own.
    let mut flags = Flags::default();
    args.add_to(&mut flags);
    (flags.burst, flags.latency, flags.jitter) = (None, None, None);
    flags.jitter_correlation = None;
    flags.loss_correlation = None;
    (flags.reorder, flags.reorder_correlation, flags.reorder_gap) = (None, None, None);
    let asked = Plan::build(&flags)?.net;
    let mut next = *current;
    for changed in next.impair_mut(impair) {
        if args.duplicate.is_some() {
            changed.duplicate = asked.egress.impair.duplicate;
        }
        if args.corrupt.is_some() {
            changed.corrupt = asked.egress.impair.corrupt;
        }
    }
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
    // A burst given now, or set before under a new rate: at most an hour of the rate.
    match (&args.burst, &args.egress_rate, &args.ingress_rate) {
        (Some(text), _, _) => shaper::check_buckets("--burst", text, &next)?,
        (None, Some(text), _) => shaper::check_buckets("--egress-rate", text, &next)?,
        (None, None, Some(text)) => shaper::check_buckets("--ingress-rate", text, &next)?,
        (None, None, None) => {}
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
    changed_impairments(&mut next, args)?;
    Ok(next)
}

/// `nbt balance RUN add AMOUNT`.
pub fn top_up(run: &str, amount: &str) -> i32 {
    let micro = match parse_amount("AMOUNT", amount) {
        Ok(micro) => micro,
        Err(err) => {
            eprintln!("nbt balance: {err}");
            return 2;
        }
    };
    if let Err(status) = privileged() {
        return status;
    }
    report("nbt balance", add_balance(run, micro))
}

/// What `nbt balance RUN add` (and `nbt top`) does: adds `micro` micro-units to the run's
/// balance; returns a line saying what the balance is now.
pub fn add_balance(run: &str, micro: i64) -> Result<String> {
    let balance = live::top_up(run, micro)?;
    Ok(format!(
        "{run}: added {}, balance now {}",
        format_amount(micro),
        format_amount(balance)
    ))
}

/// `nbt fault RUN KIND [DURATION]`.
pub fn fault(run: &str, fault: &FaultArgs, signals: &libc::sigset_t) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    match inject_fault(run, fault, signals) {
        Ok((lines, failed)) => {
            for line in lines {
                eprintln!("nbt fault: {line}");
            }
            i32::from(failed)
        }
        Err(err) => {
            eprintln!("nbt fault: {err:#}");
            usage_or_failure(&err)
        }
    }
}

/// What `nbt fault` (and `nbt top`) does: injects the fault, waits for its end (or a signal of
/// `signals`, which ends it early), puts back what was in force. Returns a line per event, and
/// whether any of its changes failed.
pub fn inject_fault(
    run: &str,
    fault: &FaultArgs,
    signals: &libc::sigset_t,
) -> Result<(Vec<String>, bool)> {
    let events = crate::schedule::fault::inject(run, &fault.kind, &fault.as_schedule(), signals)?;
    let failed = events.iter().any(|e| e.error.is_some());
    let lines = events
        .into_iter()
        .map(|e| {
            format!(
                "{run} at {:.2} s: {}{}",
                e.t,
                e.what,
                e.error
                    .map(|err| format!(" FAILED: {err}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    Ok((lines, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct SetArgs {
        #[command(flatten)]
        net: NetArgs,
    }

    fn args(argv: &[&str]) -> NetArgs {
        SetArgs::parse_from(std::iter::once("nbt-set").chain(argv.iter().copied())).net
    }

    #[test]
    fn a_live_link_change_takes_the_shaper_keys_only() {
        let (to, args) = live_link("to=10.0.0.1,to=10.0.0.2,egress-rate=1mbit,loss=5%").unwrap();
        assert_eq!(to, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(args.egress_rate.as_deref(), Some("1mbit"));
        let next = changed_limits(&NetLimits::default(), Directions::Egress, &args).unwrap();
        assert_eq!(next.egress.rate_bits_per_sec, Some(1_000_000));
        assert_eq!(next.egress.loss.mean(), 0.05);
        for (text, says) in [
            ("to=10.0.0.1,latency=5ms", "'latency' cannot change"),
            ("egress-rate=1mbit", "no destination"),
            ("to=10.0.0.1,loss=1%,loss=2%", "'loss' is given twice"),
            ("to=10.0.0.1,loss-direction=ingress", "needs loss"),
            ("to=10.0.0.1,rate", "not KEY=VALUE"),
        ] {
            let err = live_link(text).unwrap_err().0;
            assert!(
                err.contains(says) && err.contains("accepted"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn nbt_set_changes_duplicate_and_corrupt_where_the_run_started_them() {
        let current = NetLimits::default();
        let asked = args(&["--duplicate", "5%", "--corrupt", "1%"]);
        for (directions, egress, ingress) in [
            (Directions::Egress, true, false),
            (Directions::Ingress, false, true),
            (Directions::Both, true, true),
        ] {
            let next = changed_limits(&current, directions, &asked).unwrap();
            let expected = |on: bool| if on { (0.05, 0.01) } else { (0.0, 0.0) };
            assert_eq!(
                (next.egress.impair.duplicate, next.egress.impair.corrupt),
                expected(egress)
            );
            assert_eq!(
                (next.ingress.impair.duplicate, next.ingress.impair.corrupt),
                expected(ingress)
            );
        }
        // Reorder stays on outgoing packets whatever the run's direction.
        let next =
            changed_limits(&current, Directions::Ingress, &args(&["--reorder", "5%"])).unwrap();
        assert_eq!(next.egress.impair.reorder, 0.05);
        assert_eq!(next.ingress.impair.reorder, 0.0);
    }
}
