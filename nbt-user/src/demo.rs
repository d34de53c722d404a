//! `nbt demo`: the main job. nbt's own training workload (`nbt-train`, a real model trained by
//! gradient descent) runs under the `nbt` profile's caps that this version enforces; the settings
//! of the profile it cannot enforce yet are named, not silently left out.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cli::{execute_and_report, DemoArgs};
use crate::net::Direction;
use crate::plan::Plan;
use crate::run::EXIT_NBT_FAILED;
use crate::train::Dataset;
use crate::units;

/// Samples the demo trains on: 12,000 x 33 f32 = 1.5 MiB, about 25 s at the profile's 512kbit.
const DEMO_SAMPLES: usize = 12_000;

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
    // The training data comes over the network from a server in this process, outside the run:
    // the run's ingress limit is what the download gets.
    let server = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("nbt demo: starting the data server on loopback: {err}");
            return EXIT_NBT_FAILED;
        }
    };
    let addr = server
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    std::thread::spawn(move || Dataset::serve(server));
    command.extend(["--data-server".into(), addr.clone().into()]);
    let samples = args
        .samples
        .clone()
        .unwrap_or_else(|| DEMO_SAMPLES.to_string());
    for (flag, value) in [("--samples", &Some(samples)), ("--epochs", &args.epochs)] {
        if let Some(value) = value {
            if let Err(err) = units::parse_count(flag, value) {
                eprintln!("nbt demo: {err}");
                return 2;
            }
            command.push(flag.into());
            command.push(value.trim().into());
        }
    }

    eprintln!(
        "nbt demo: training a small model under the `nbt` profile, its data fetched from {addr}"
    );
    eprintln!(
        "  enforced:          {}",
        crate::summary::RunSummary::limits_text(&plan.limits)
    );
    eprintln!(
        "                     egress {}; ingress {}",
        plan.net.egress.describe(Direction::Egress),
        plan.net.ingress.describe(Direction::Ingress)
    );
    for pending in &plan.pending {
        eprintln!("  not yet enforced:  {pending}");
    }
    execute_and_report(&plan, &command, signals, &[], args.json)
}
