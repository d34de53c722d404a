//! `nbt swarm FILE.toml`, `nbt swarm ps`, `nbt swarm set`, `nbt swarm fault` (docs/swarm.md).

use std::process::Command;

use clap::Parser as _;

use super::args::{Cli, Command as NbtCommand, SwarmAction, SwarmArgs};
use super::run::limits_plan;
use super::{clap_line, privileged, usage_or_failure, EXIT_NBT_FAILED};
use crate::swarm::record::SwarmRecord;
use crate::swarm::{self, SwarmSummary};
use crate::units;

pub fn command(args: SwarmArgs) -> i32 {
    match args.action {
        Some(SwarmAction::Ps { json }) => ps(json),
        Some(SwarmAction::Set { swarm, node, flags }) => live(&swarm, &node, "set", &flags),
        Some(SwarmAction::Fault { swarm, node, args }) => live(&swarm, &node, "fault", &args),
        None => match &args.file {
            Some(_) => run(&args),
            None => {
                eprintln!(
                    "nbt swarm: give a swarm file (nbt swarm FILE.toml) or one of ps, set, \
                     fault; `nbt swarm --help` describes the file"
                );
                2
            }
        },
    }
}

fn run(args: &SwarmArgs) -> i32 {
    let path = args.file.as_ref().expect("checked by the caller");
    let stop_after = match args
        .stop_after
        .as_deref()
        .map(|t| units::parse_duration("--stop-after", t))
        .transpose()
    {
        Ok(d) => d,
        Err(err) => {
            eprintln!("nbt swarm: {err}");
            return 2;
        }
    };
    let swarm = match swarm::load(path) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("nbt swarm: {err:#}");
            return usage_or_failure(&err);
        }
    };
    for node in &swarm.nodes {
        if let Err(why) = check_node(&node.run_args) {
            eprintln!("nbt swarm: node '{}': {why}", node.spec.name);
            return 2;
        }
    }
    if let Err(status) = privileged() {
        return status;
    }
    let options = swarm::Options {
        receipts: args.receipts.clone(),
        stop_after,
        argv: std::env::args().collect(),
    };
    eprintln!(
        "nbt swarm: {} with {} node(s) on {}/{}: {}",
        swarm.name,
        swarm.nodes.len(),
        swarm.subnet.0,
        swarm.subnet.1,
        swarm
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.spec.name, n.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match swarm::run(&swarm, &options) {
        Ok(summary) => {
            print_summary(&summary);
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("the summary serializes")
                );
            }
            summary.status
        }
        Err(err) => {
            eprintln!("nbt swarm: {err:#}");
            EXIT_NBT_FAILED
        }
    }
}

/// Checks a node's `nbt run` flags as `nbt run` itself would (its parser, its plan, what it
/// refuses on this kernel), so that a bad value stops the swarm before any node starts rather
/// than one node failing while the others run.
fn check_node(run_args: &[String]) -> Result<(), String> {
    let argv = ["nbt", "run"]
        .into_iter()
        .map(String::from)
        .chain(run_args.iter().cloned())
        .chain(["--".into(), "true".into()]);
    let cli = Cli::try_parse_from(argv).map_err(|e| clap_line(&e))?;
    let NbtCommand::Run(args) = cli.command else {
        unreachable!("parsed as `nbt run`")
    };
    limits_plan(&args.options, args.restart.clone())
        .map(|_| ())
        .map_err(|e| e.0)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn print_summary(s: &SwarmSummary) {
    eprintln!(
        "nbt swarm: {} ended after {:.2} s{}",
        s.swarm,
        s.wall_seconds,
        s.stopped_by
            .as_ref()
            .map(|sig| format!(", stopped by {sig}"))
            .unwrap_or_default()
    );
    eprintln!(
        "  {:<12} {:<15} {:<8} {:>5} {:>5} {:>9} {:>10} {:>12} {:>12} {:>6}",
        "node",
        "addr",
        "status",
        "exit",
        "runs",
        "cpu s",
        "mem peak",
        "egress B",
        "ingress B",
        "events"
    );
    for n in &s.nodes {
        let sum_u = |f: fn(&swarm::NodeRun) -> Option<u64>| -> Option<u64> {
            n.runs.iter().map(f).try_fold(0u64, |a, b| Some(a + b?))
        };
        let cpu: Option<f64> = n
            .runs
            .iter()
            .map(|r| r.cpu_seconds)
            .try_fold(0.0, |a, b| Some(a + b?));
        let peak = n.runs.iter().filter_map(|r| r.memory_peak_bytes).max();
        eprintln!(
            "  {:<12} {:<15} {:<8} {:>5} {:>5} {:>9} {:>10} {:>12} {:>12} {:>6}",
            n.name,
            n.addr,
            n.status,
            opt(n.exit_status),
            n.runs.len(),
            opt(cpu.map(|c| format!("{c:.2}"))),
            opt(peak.map(units::format_size)),
            opt(sum_u(|r| r.egress_bytes)),
            opt(sum_u(|r| r.ingress_bytes)),
            n.runs.iter().map(|r| r.events).sum::<usize>(),
        );
    }
    eprintln!(
        "  {:<20} {:>12} {:>9} {:>10} {:>10}  limits",
        "link", "passed B", "packets", "rate drop", "loss drop"
    );
    for l in &s.links {
        eprintln!(
            "  {:<20} {:>12} {:>9} {:>10} {:>10}  {}",
            format!("{} -> {}", l.from, l.to),
            l.passed_bytes,
            l.passed_packets,
            l.rate_dropped_packets,
            l.loss_dropped_packets,
            l.limits
        );
    }
    eprintln!("  events:");
    for e in &s.events {
        eprintln!(
            "  {:>8.2} s  {:<9} {:<10} {}{}",
            e.t,
            e.action,
            e.node.as_deref().unwrap_or(""),
            e.what,
            e.error
                .as_ref()
                .map(|err| format!(" FAILED: {err}"))
                .unwrap_or_default()
        );
    }
    match (&s.receipt, &s.receipt_error) {
        (Some(r), _) => eprintln!(
            "  swarm receipt #{} {} in {}",
            r.seq,
            r.receipt_hash,
            r.store.display()
        ),
        (None, Some(err)) => eprintln!("  swarm receipt NOT written: {err}"),
        (None, None) => {}
    }
}

/// `nbt swarm ps [--json]`.
fn ps(json: bool) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    let runs = crate::state::live::live_runs();
    let swarms: Vec<serde_json::Value> = SwarmRecord::all()
        .into_iter()
        .filter(SwarmRecord::alive)
        .map(|r| {
            let nodes: Vec<serde_json::Value> = r
                .nodes
                .iter()
                .map(|n| {
                    let run = runs.iter().find(|l| l.name.as_deref() == Some(&n.label));
                    serde_json::json!({
                        "name": n.name,
                        "addr": n.addr,
                        "label": n.label,
                        "netns": n.netns,
                        "run": run.map(|l| l.run.clone()),
                        "seconds": run.map(|l| l.seconds),
                        "balance_micro": run.and_then(|l| l.balance_micro),
                        "links": run.map(|l| l.links.iter().map(|k| k.link.clone()).collect::<Vec<_>>()),
                    })
                })
                .collect();
            serde_json::json!({
                "swarm": r.name,
                "nbt_pid": r.pid,
                "seconds": crate::sys::proc::now_unix() - r.started_unix,
                "hub": r.hub,
                "nodes": nodes,
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&swarms).expect("serializes")
        );
        return 0;
    }
    if swarms.is_empty() {
        eprintln!("nbt swarm ps: no live swarms");
    }
    for s in &swarms {
        println!(
            "{}  nbt pid {}  {:.0} s",
            s["swarm"].as_str().unwrap_or(""),
            s["nbt_pid"],
            s["seconds"].as_f64().unwrap_or(0.0)
        );
        for n in s["nodes"].as_array().into_iter().flatten() {
            println!(
                "  {:<12} {:<15} {}",
                n["name"].as_str().unwrap_or(""),
                n["addr"].as_str().unwrap_or(""),
                n["run"].as_str().unwrap_or("(not running)")
            );
        }
    }
    0
}

/// `nbt swarm set|fault SWARM NODE ...`: `nbt set|fault SWARM.NODE ...`, with node names in
/// `--link to=NAME` turned into the node's address.
fn live(swarm: &str, node: &str, verb: &str, args: &[String]) -> i32 {
    if let Err(status) = privileged() {
        return status;
    }
    let record = match SwarmRecord::find(swarm) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("nbt swarm {verb}: {err:#}");
            return usage_or_failure(&err);
        }
    };
    let entry = match record.node(node) {
        Ok(e) => e.clone(),
        Err(err) => {
            eprintln!("nbt swarm {verb}: {err:#}");
            return usage_or_failure(&err);
        }
    };
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.split(',')
                .map(|part| match part.strip_prefix("to=") {
                    Some(peer) => match record.nodes.iter().find(|n| n.name == peer) {
                        Some(n) => format!("to={}", n.addr),
                        None => part.to_string(),
                    },
                    None => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(err) => {
            eprintln!("nbt swarm {verb}: finding nbt's own binary: {err}");
            return EXIT_NBT_FAILED;
        }
    };
    match Command::new(exe)
        .arg(verb)
        .arg(&entry.label)
        .args(&args)
        .status()
    {
        Ok(status) => status.code().unwrap_or(1),
        Err(err) => {
            eprintln!("nbt swarm {verb}: running nbt {verb}: {err}");
            EXIT_NBT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Result<(), String> {
        check_node(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn a_nodes_flags_are_checked_as_nbt_run_checks_them() {
        check(&["--memory", "64M", "--link", "to=10.1.0.2,egress-rate=1mbit"]).unwrap();
        let e = check(&["--memory", "lots"]).unwrap_err();
        assert!(e.contains("--memory") && e.contains("lots"), "{e}");
        // What the swarm's own reading of the flags did not look at: a link's keys, a schedule.
        let e = check(&["--link", "to=10.1.0.2,duplicate=150%"]).unwrap_err();
        assert!(e.contains("duplicate") && e.contains("150%"), "{e}");
        let e = check(&["--schedule", "/nonexistent/schedule.toml"]).unwrap_err();
        assert!(e.contains("/nonexistent/schedule.toml"), "{e}");
        let e = check(&["--colour", "red"]).unwrap_err();
        assert!(e.contains("--colour"), "{e}");
    }
}
