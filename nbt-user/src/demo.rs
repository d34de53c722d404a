//! `nbt demo`: the main job. nbt's own training workload (`nbt-train`, a real model trained by
//! gradient descent) runs under the `nbt` profile's caps that this version enforces; the settings
//! of the profile it cannot enforce yet are named, not silently left out.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cli::{execute_and_report, DemoArgs};
use crate::plan::Plan;
use crate::run::EXIT_NBT_FAILED;
use crate::units;

/// The training binary, installed beside `nbt`.
fn trainer() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("nbt-train");
    path.exists().then_some(path)
}

pub fn demo(args: DemoArgs, signals: &libc::sigset_t) -> i32 {
    let flags = args.limits.flags(Some("nbt".into()), Vec::new());
    let plan = match Plan::build(&flags) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("nbt demo: {err}");
            return 2;
        }
    };
    let mut command: Vec<OsString> = match trainer() {
        Some(path) => vec![path.into()],
        None => {
            eprintln!("nbt demo: the training workload nbt-train was not found beside the nbt binary (build it with `cargo build`)");
            return EXIT_NBT_FAILED;
        }
    };
    for (flag, value) in [("--samples", &args.samples), ("--epochs", &args.epochs)] {
        if let Some(value) = value {
            if let Err(err) = units::parse_count(flag, value) {
                eprintln!("nbt demo: {err}");
                return 2;
            }
            command.push(flag.into());
            command.push(value.trim().into());
        }
    }

    eprintln!("nbt demo: training a small model under the `nbt` profile");
    eprintln!(
        "  enforced:          {}",
        crate::summary::RunSummary::limits_text(&plan.limits)
    );
    for pending in &plan.pending {
        eprintln!("  not yet enforced:  {pending}");
    }
    execute_and_report(&plan, &command, signals, &[], args.json)
}
