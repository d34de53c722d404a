//! `nbt demo`: the built-in scenario (`demo`) run and reported like any run, then its receipts
//! listed and the store verified.

use super::args::DemoArgs;
use super::run::{execute_and_print, exit_status};
use super::EXIT_NBT_FAILED;
use crate::demo::{self, SetupError};

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
    let plan = &scenario.plan;
    let summary = match execute_and_print(plan, &scenario.command, signals, &[], args.json) {
        Ok(summary) => summary,
        Err(status) => return status,
    };
    // The proof: the run's receipts, and the whole store checked with the node's key.
    eprintln!("\nnbt demo: the receipts of {}:", summary.run);
    let shown = super::receipts::list(&plan.receipts, false, Some(&summary.run));
    eprintln!("nbt demo: nbt receipts verify:");
    let verified = super::receipts::verify(&plan.receipts, None);
    match (shown, verified) {
        (Ok(_), Ok(0)) => exit_status(&summary),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("nbt demo: {err:#}");
            EXIT_NBT_FAILED
        }
        (_, Ok(status)) => status,
    }
}
