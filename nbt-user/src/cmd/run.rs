//! `nbt run`: the plan from the flags, the run, the summary printed, the exit status picked.

use std::ffi::OsString;

use super::args::RunArgs;
use super::{privileged, EXIT_NBT_FAILED};
use crate::plan::Plan;
use crate::run::summary::RunSummary;
use crate::run::{self, RunError};
use crate::sys::supervise;
use crate::sys::user::Identity;

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
    // Checking the flags (a long schedule, say) may have taken a while: a signal that came
    // meanwhile stops nbt here.
    if let Some(signal) = supervise::take_pending_stop() {
        eprintln!("nbt: stopped by {}", supervise::signal_name(signal));
        return 128 + signal;
    }
    crate::sys::phase::mark("planned");
    let user = match Identity::choose(args.user.as_deref()) {
        Ok(user) => user,
        Err(err) => {
            eprintln!("nbt: {err}");
            return 2;
        }
    };
    execute_and_report(&plan, &user, &args.command, signals, &[], args.json)
}

/// Runs and prints the summary (human to stderr, JSON to stdout when asked); returns the status.
pub fn execute_and_report(
    plan: &Plan,
    user: &Identity,
    command: &[OsString],
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    json: bool,
) -> i32 {
    match execute_and_print(plan, user, command, signals, env, json) {
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
    user: &Identity,
    command: &[OsString],
    signals: &libc::sigset_t,
    env: &[(&str, String)],
    json: bool,
) -> Result<RunSummary, i32> {
    privileged()?;
    match run::execute(plan, user, command, signals, env) {
        Ok(summary) => {
            crate::sys::phase::mark("cleaned_up");
            eprint!("{}", summary.human());
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serializes")
                );
            }
            crate::sys::phase::mark("printed");
            Ok(summary)
        }
        Err(RunError::Spawn(err)) => {
            eprintln!("nbt: {err}");
            Err(err.exit_code())
        }
        Err(RunError::Stopped(signal)) => {
            eprintln!(
                "nbt: stopped by {} before the workload started; nothing was left behind",
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
