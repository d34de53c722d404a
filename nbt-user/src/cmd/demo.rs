//! `nbt demo`: the built-in scenario (`demo`) run and reported like any run, then its receipts
//! listed, the store verified, and its report written (`RUN.html` in the current directory).

use super::args::DemoArgs;
use super::run::{execute_and_print, exit_status, SummaryOut};
use super::EXIT_NBT_FAILED;
use crate::demo::{self, SetupError};
use crate::sys::user::Identity;

/// `nbt demo --swarm`: the two swarms, their comparison; JSON with `--json`.
fn demo_swarm(args: &DemoArgs) -> i32 {
    if let Err(status) = super::privileged() {
        return status;
    }
    let Some(trainer) = demo::trainer() else {
        eprintln!(
            "nbt demo: the training workload nbt-train was not found beside the nbt binary \
             (build it with `cargo build`)"
        );
        return EXIT_NBT_FAILED;
    };
    let user = args
        .user
        .clone()
        .or_else(|| std::env::var("SUDO_USER").ok().filter(|u| u != "root"))
        .unwrap_or_else(|| "nobody".into());
    let report = match demo::mesh::run(&trainer, &user, args.receipt.receipts.clone()) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("nbt demo --swarm: {err:#}");
            return EXIT_NBT_FAILED;
        }
    };
    let show = |t: &demo::mesh::Trial| match t.time_to_target_s {
        Some(s) => format!("{s:.2} s"),
        None => "not reached".into(),
    };
    eprintln!(
        "\nnbt demo --swarm: time to a holdout loss of {}: {} as they are, {} losing w3 and \
         the link w2 <-> ps{}",
        report.target_loss,
        show(&report.without_failures),
        show(&report.with_failures),
        report
            .ratio
            .map(|r| format!(" (x{r:.2})"))
            .unwrap_or_default()
    );
    for trial in [&report.without_failures, &report.with_failures] {
        eprintln!(
            "  {}: updates by worker {}, final loss {}",
            trial.swarm.swarm,
            trial.updates_by_worker,
            trial
                .final_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serializes")
        );
    }
    let converged = report.without_failures.time_to_target_s.is_some()
        && report.with_failures.time_to_target_s.is_some();
    if converged {
        0
    } else {
        1
    }
}

pub fn demo(args: DemoArgs, signals: &libc::sigset_t) -> i32 {
    if args.swarm {
        return demo_swarm(&args);
    }
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
