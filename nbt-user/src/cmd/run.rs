//! `nbt run`: the plan from the flags, the run, the summary printed, the exit status picked.

use std::ffi::OsString;

use super::args::RunArgs;
use super::{privileged, EXIT_NBT_FAILED};
use crate::plan::Plan;
use crate::run::summary::RunSummary;
use crate::run::{self, RunError};

pub fn run_command(args: RunArgs, signals: &libc::sigset_t) -> i32 {
    let mut flags = args
        .limits
        .flags(args.profile.clone(), args.not_yet.given());
    args.net.add_to(&mut flags);
    args.ledger.add_to(&mut flags);
    args.receipt.add_to(&mut flags);
    args.hw.add_to(&mut flags);
    flags.schedule = args.schedule.clone();
    flags.restart = args.restart.clone();
    let plan = match Plan::build(&flags).and_then(|plan| plan.refuse_pending().map(|()| plan)) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("nbt: {err}");
            return 2;
        }
    };
    execute_and_report(&plan, &args.command, signals, &[], args.json)
}

/// Runs and prints the summary (human to stderr, JSON to stdout when asked); returns the status.
pub fn execute_and_report(
    plan: &Plan,
    command: &[OsString],
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    json: bool,
) -> i32 {
    match execute_and_print(plan, command, signals, env, json) {
        Ok(summary) => exit_status(&summary),
        Err(status) => status,
    }
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
    command: &[OsString],
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    json: bool,
) -> Result<RunSummary, i32> {
    privileged()?;
    match run::execute(plan, command, signals, env) {
        Ok(summary) => {
            eprint!("{}", summary.human());
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serializes")
                );
            }
            Ok(summary)
        }
        Err(RunError::Spawn(err)) => {
            eprintln!("nbt: {err}");
            Err(err.exit_code())
        }
        Err(RunError::Nbt(err)) => {
            eprintln!("nbt: {err:#}");
            Err(EXIT_NBT_FAILED)
        }
    }
}
