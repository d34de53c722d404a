//! `nbt demo`: the main job. nbt's own training workload (`nbt-train`, a real model trained by
//! gradient descent) runs under the `nbt` profile's caps that this version enforces; the settings
//! of the profile it cannot enforce yet are named, not silently left out.
//!
//! Two servers in this process, outside the run, on loopback:
//! - a data server the trainer downloads its dataset from, so the run's ingress limit is what the
//!   download gets;
//! - a "paid API" it asks for fresh samples before each epoch, behind the balance gate: the
//!   balance pays for a few calls, then the gate closes and training goes on with cached data.

pub mod train;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use crate::cmd::{execute_and_print, exit_status, DemoArgs};
use crate::enforce::gate::Rule;
use crate::enforce::ledger::{format_amount, Prices};
use crate::enforce::shaper::Direction;
use crate::plan::Plan;
use crate::run::EXIT_NBT_FAILED;
use crate::run::summary::RunSummary;
use crate::demo::train::Dataset;
use crate::units;

/// The demo's timeline: a brownout while the data downloads, then the bandwidth steps down while
/// it trains; the balance runs out on its own (it pays for DEMO_PAID_CALLS calls).
pub const DEMO_SCHEDULE: &str = r#"
[[fault]]
kind = "brownout"
start = "15s"
duration = "2s"

[[step]]
at = "28s"
ingress-rate = "256kbit"
egress-rate = "256kbit"
"#;

/// Samples the demo trains on: 12,000 x 33 f32 = 1.5 MiB, about 25 s at the profile's 512kbit.
const DEMO_SAMPLES: usize = 12_000;
/// The demo's balance pays for this many calls of the paid API, at this price each.
const DEMO_PAID_CALLS: i64 = 3;
const DEMO_CALL_PRICE_MICRO: i64 = 10_000;

/// The training binary, installed beside `nbt`.
fn trainer() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("nbt-train");
    path.exists().then_some(path)
}

/// A dataset server on loopback, its sends paced at `pace_bytes_per_sec` when given.
fn start_server(what: &str, pace_bytes_per_sec: Option<u64>) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("starting the {what} on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("the {what}'s address: {e}"))?;
    std::thread::spawn(move || Dataset::serve(listener, pace_bytes_per_sec));
    Ok(addr)
}

pub fn demo(args: DemoArgs, signals: &libc::sigset_t) -> i32 {
    let mut flags = args.limits.flags(Some("nbt".into()), Vec::new());
    args.receipt.add_to(&mut flags);
    let mut plan = match Plan::build(&flags) {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("nbt demo: {err}");
            return 2;
        }
    };
    let Some(trainer) = trainer() else {
        eprintln!("nbt demo: the training workload nbt-train was not found beside the nbt binary (build it with `cargo build`)");
        return EXIT_NBT_FAILED;
    };
    // The data server paces itself at the run's ingress rate, as a server that knows its
    // client's link would: on loopback TCP sends 64 KiB segments, and a policer that drops one
    // loses 64 KiB at once, which sends TCP into timeouts (see docs/running.md).
    let pace = plan
        .net
        .ingress
        .rate_bits_per_sec
        .map(|bits| bits / 8 * 98 / 100);
    let (data, api) = match (
        start_server("data server", pace),
        start_server("paid API", None),
    ) {
        (Ok(data), Ok(api)) => (data, api),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("nbt demo: {err}");
            return EXIT_NBT_FAILED;
        }
    };
    plan.prices = Some(Prices {
        balance_micro: DEMO_PAID_CALLS * DEMO_CALL_PRICE_MICRO,
        call_micro: DEMO_CALL_PRICE_MICRO,
        ..Prices::default()
    });
    plan.gate = vec![Rule::Net {
        addr: api.ip(),
        prefix: 32,
        port: Some(api.port()),
    }];
    plan.schedule = match crate::schedule::parse(
        "(built-in demo schedule)",
        DEMO_SCHEDULE,
        &plan.schedule_start(),
    ) {
        Ok(schedule) => Some(schedule),
        Err(err) => {
            eprintln!("nbt demo: {err}");
            return EXIT_NBT_FAILED;
        }
    };

    let samples = args
        .samples
        .clone()
        .unwrap_or_else(|| DEMO_SAMPLES.to_string());
    let mut command: Vec<OsString> = vec![
        trainer.into(),
        "--data-server".into(),
        data.to_string().into(),
        "--api".into(),
        api.to_string().into(),
    ];
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

    eprintln!("nbt demo: training a small model under the `nbt` profile; data from {data}, fresh samples from the paid API {api}");
    eprintln!(
        "  enforced:          {}",
        RunSummary::limits_text(&plan.limits)
    );
    eprintln!(
        "                     egress {}; ingress {}",
        plan.net.egress.describe(Direction::Egress),
        plan.net.ingress.describe(Direction::Ingress)
    );
    eprintln!(
        "                     balance {}, {} per call of the paid API",
        format_amount(DEMO_PAID_CALLS * DEMO_CALL_PRICE_MICRO),
        format_amount(DEMO_CALL_PRICE_MICRO)
    );
    eprintln!(
        "  schedule:          a 2 s brownout (frozen) at 15 s; both rates down to 256kbit at 28 s"
    );
    for pending in &plan.pending {
        eprintln!("  not enforced:      {pending}");
    }
    for refused in plan.hwcaps.set_aside_unavailable() {
        eprintln!("  not enforced here: {refused}");
    }
    let summary = match execute_and_print(&plan, &command, signals, &[], args.json) {
        Ok(summary) => summary,
        Err(status) => return status,
    };
    // The proof: the run's receipts, and the whole store checked with the node's key.
    eprintln!("\nnbt demo: the receipts of {}:", summary.run);
    let shown = crate::cmd::receipts::list(&plan.receipts, false, Some(&summary.run));
    eprintln!("nbt demo: nbt receipts verify:");
    let verified = crate::cmd::receipts::verify(&plan.receipts, None);
    match (shown, verified) {
        (Ok(_), Ok(0)) => exit_status(&summary),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("nbt demo: {err:#}");
            EXIT_NBT_FAILED
        }
        (_, Ok(status)) => status,
    }
}
