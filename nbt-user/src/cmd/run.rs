//! `nbt run`: the plan from the flags, the run, the summary printed, the exit status picked.

use std::io::IsTerminal as _;
use std::time::Duration;

use super::args::{RunArgs, RunOptions};
use super::{privileged, EXIT_NBT_FAILED};
use crate::error::PlanError;
use crate::plan::Plan;
use crate::run::sampling::MIN_INTERVAL;
use crate::run::summary::RunSummary;
use crate::run::{self, RunError, Workload};
use crate::sys::supervise;
use crate::sys::user::Identity;
use crate::units;

pub fn run_command(args: RunArgs, signals: &libc::sigset_t) -> i32 {
    let plan = match plan_of(&args.options, args.restart.clone()) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    let user = match Identity::choose(args.user.as_deref()) {
        Ok(user) => user,
        Err(err) => {
            eprintln!("nbt: {err}");
            return 2;
        }
    };
    let workload = Workload::Command(&args.command);
    match execute_and_print(&plan, &user, workload, signals, &[], out_of(&args.options)) {
        Ok(summary) => exit_status(&summary),
        Err(status) => status,
    }
}

/// The plan of the limits among `options` (and `--restart`), each checked and refused as a run
/// refuses it (a delay where the kernel has no fq): what `nbt run` and each node of `nbt swarm`
/// are held to.
pub fn limits_plan(options: &RunOptions, restart: Option<String>) -> Result<Plan, PlanError> {
    let mut flags = options
        .limits
        .flags(options.profile.clone(), options.not_yet.given());
    options.net.add_to(&mut flags);
    options.ledger.add_to(&mut flags);
    options.receipt.add_to(&mut flags);
    options.hw.add_to(&mut flags);
    flags.schedule = options.schedule.clone();
    flags.restart = restart;
    Plan::build(&flags).and_then(|plan| plan.refuse_pending().map(|()| plan))
}

/// The plan of `nbt run` or `nbt attach` from their shared flags, each checked; the status to
/// exit with (2, or 128+N for a signal that came meanwhile) when there is none.
pub fn plan_of(options: &RunOptions, restart: Option<String>) -> Result<Plan, i32> {
    let mut plan = match limits_plan(options, restart) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("nbt: {err}");
            return Err(2);
        }
    };
    if let Some(text) = &options.series_interval {
        match series_interval(text) {
            Ok(interval) => plan.series_interval = interval,
            Err(err) => {
                eprintln!("nbt: {err}");
                return Err(2);
            }
        }
    }
    plan.status_line = !options.quiet && std::io::stderr().is_terminal();
    if let Some(name) = &options.name {
        if let Err(why) = crate::state::valid_label(name) {
            eprintln!("nbt: invalid value for --name: {why}");
            return Err(2);
        }
        if let Ok(other) = crate::state::resolve_run(&crate::state::state_dir(), name) {
            eprintln!("nbt: --name {name}: the live run {other} already has that name");
            return Err(2);
        }
        plan.name = Some(name.clone());
    }
    if let Some(file) = &options.summary_file {
        if let Err(why) = check_summary_file(file) {
            eprintln!(
                "nbt: invalid value '{}' for --summary-file: {why}",
                file.display()
            );
            return Err(2);
        }
    }
    // Checking the flags (a long schedule, say) may have taken a while: a signal that came
    // meanwhile stops nbt here.
    if let Some(signal) = supervise::take_pending_stop() {
        eprintln!("nbt: stopped by {}", supervise::signal_name(signal));
        return Err(128 + signal);
    }
    crate::sys::phase::mark("planned");
    Ok(plan)
}

/// Where the summary of a run with these flags goes.
pub fn out_of(options: &RunOptions) -> SummaryOut<'_> {
    SummaryOut {
        json: options.json,
        file: options.summary_file.as_deref(),
    }
}

/// Where the JSON summary goes: stdout (`--json`), a file of its own (`--summary-file`), both
/// or neither. The human summary always goes to stderr.
#[derive(Debug, Clone, Copy, Default)]
pub struct SummaryOut<'a> {
    pub json: bool,
    pub file: Option<&'a std::path::Path>,
}

/// Refuses, before anything runs, a summary file that could not be written at the end: its
/// directory missing, or a directory in its place.
fn check_summary_file(file: &std::path::Path) -> Result<(), String> {
    if file.is_dir() {
        return Err("it is a directory; give a file name".into());
    }
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("its directory {} does not exist", dir.display()));
    }
    Ok(())
}

/// Writes the summary file whole (a reader never sees half of it): beside it, then renamed.
fn write_summary_file(file: &std::path::Path, json: &str) -> std::io::Result<()> {
    let mut staged = file.as_os_str().to_owned();
    staged.push(format!(".{}.tmp", std::process::id()));
    let staged = std::path::PathBuf::from(staged);
    std::fs::write(&staged, format!("{json}\n"))
        .and_then(|()| std::fs::rename(&staged, file))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&staged);
        })
}

/// `--series-interval`: a duration from [`MIN_INTERVAL`] to an hour.
fn series_interval(text: &str) -> Result<Duration, crate::error::UsageError> {
    let flag = "--series-interval";
    let interval = units::parse_duration(flag, text)?;
    if interval < MIN_INTERVAL || interval > Duration::from_secs(3600) {
        return Err(crate::error::UsageError {
            flag: flag.into(),
            value: text.into(),
            problem: "out of range".into(),
            accepted: "a duration from 100ms to 1h, e.g. 1s, 500ms, 10s",
        });
    }
    Ok(interval)
}

/// The status nbt exits with after a run: the workload's, or 125 when its receipt was not written.
pub fn exit_status(summary: &RunSummary) -> i32 {
    match &summary.receipt_error {
        Some(err) => {
            eprintln!("nbt: the run's receipts were not all written: {err}");
            EXIT_NBT_FAILED
        }
        None => summary.exit.status,
    }
}

/// Runs and prints the summary; the summary, or the status to exit with when there is none.
pub fn execute_and_print(
    plan: &Plan,
    user: &Identity,
    workload: Workload,
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    out: SummaryOut,
) -> Result<RunSummary, i32> {
    privileged()?;
    if let Some(why) = &plan.ingress_policed_because {
        eprintln!(
            "nbt: the ingress rate is policed (arriving packets beyond it are dropped), not \
             queued: {why}; see `nbt probe` (--ingress-queue=false polices without this note)"
        );
    }
    match run::execute(plan, user, workload, signals, env) {
        Ok(summary) => {
            crate::sys::phase::mark("cleaned_up");
            eprint!("{}", summary.human());
            let json = serde_json::to_string(&summary).expect("summary serializes");
            if out.json {
                println!("{json}");
            }
            if let Some(file) = out.file {
                if let Err(err) = write_summary_file(file, &json) {
                    // Not lost: the summary goes to stdout instead.
                    eprintln!(
                        "nbt: --summary-file {}: {err}; the JSON summary follows on stdout",
                        file.display()
                    );
                    if !out.json {
                        println!("{json}");
                    }
                    return Err(EXIT_NBT_FAILED);
                }
            }
            crate::sys::phase::mark("printed");
            Ok(summary)
        }
        Err(RunError::Spawn(err)) => {
            eprintln!("nbt: {err}");
            Err(err.exit_code())
        }
        Err(RunError::Stopped(signal)) => {
            let before = match workload {
                Workload::Command(_) => "the workload started",
                Workload::Attach(_) => "it attached",
            };
            eprintln!(
                "nbt: stopped by {} before {before}; nothing was left behind",
                supervise::signal_name(signal)
            );
            Err(128 + signal)
        }
        Err(RunError::Nbt(err)) => {
            eprintln!("nbt: {err:#}");
            Err(EXIT_NBT_FAILED)
        }
    }
}
