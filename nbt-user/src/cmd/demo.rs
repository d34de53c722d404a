//! `nbt demo`: the built-in scenario (`demo`) run and reported like any run, then its receipts
//! listed, the store verified, and its report written (`RUN.html` in the current directory).

use super::args::DemoArgs;
use super::run::{execute_and_print, exit_status, SummaryOut};
use super::EXIT_NBT_FAILED;
use crate::demo::{self, SetupError};
use crate::sys::user::Identity;

pub fn demo(args: DemoArgs, signals: &libc::sigset_t) -> i32 {
    let mut flags = args.limits.flags(Some("nbt".into()), Vec::new());
    args.receipt.add_to(&mut flags);
    let scenario = match demo::prepare(&flags, args.samples.as_deref(), args.epochs.as_deref()) {
        Ok(scenario) => scenario,
        Err(SetupError::Usage(err)) => {
            eprintln!("nbt demo: {err}");
            return 2;
        }
        Err(SetupError::Failed(err)) => {
            eprintln!("nbt demo: {err}");
            return EXIT_NBT_FAILED;
        }
    };
    for line in demo::describe(&scenario) {
        eprintln!("{line}");
    }
    // The trainer never runs as root unless asked to: as the user who ran sudo, else nobody.
    let user = match args.user.as_deref() {
        Some(user) => Identity::parse(user),
        None => Identity::choose(None).or_else(|_| Identity::parse("nobody")),
    };
    let user = match user {
        Ok(user) => user,
        Err(err) => {
            eprintln!("nbt demo: {err}");
            return 2;
        }
    };
    let plan = &scenario.plan;
    let summary = match execute_and_print(
        plan,
        &user,
        crate::run::Workload::Command(&scenario.command),
        signals,
        &[],
        SummaryOut {
            json: args.json,
            file: None,
        },
    ) {
        Ok(summary) => summary,
        Err(status) => return status,
    };
    // The proof: the run's receipts, and the whole store checked with the node's key.
    eprintln!("\nnbt demo: the receipts of {}:", summary.run);
    let shown = super::receipts::list(&plan.receipts, false, Some(&summary.run));
    eprintln!("nbt demo: nbt receipts verify:");
    let verified = super::receipts::verify(&plan.receipts, None);
    // The report: the run's charts, events, updates and receipt in one HTML file.
    eprintln!("nbt demo: nbt report {}:", summary.run);
    let report = super::report::write(&plan.receipts, &summary.run, None, None);
    if let Ok(path) = &report {
        println!("{}", path.display());
    }
    match (shown, verified, report) {
        (Ok(_), Ok(0), Ok(_)) => exit_status(&summary),
        (_, _, Err(err)) => {
            eprintln!("nbt demo: the report: {err:#}");
            EXIT_NBT_FAILED
        }
        (Err(err), _, _) | (_, Err(err), _) => {
            eprintln!("nbt demo: {err:#}");
            EXIT_NBT_FAILED
        }
        (_, Ok(status), _) => status,
    }
}
