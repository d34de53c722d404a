//! `nbt demo`: the main job. nbt's own training workload (`nbt-train`, a real model trained by
//! gradient descent) runs under the `nbt` profile's caps that this version enforces; the settings
//! of the profile it cannot enforce yet are named, not silently left out.
//!
//! Two servers in this process, outside the run, on loopback:
//! - a data server the trainer downloads its dataset from, so the run's ingress limit is what the
//!   download gets;
//! - a "paid API" it asks for fresh samples before each epoch, behind the balance gate: the
//!   balance pays for a few calls, then the gate closes and training goes on with cached data.

pub mod mesh;
pub mod ps;
pub mod train;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use crate::enforce::gate::Rule;
use crate::enforce::ledger::{format_amount, Prices};
use crate::enforce::shaper::Direction;
use crate::plan::{Flags, Plan};
use crate::run::summary::RunSummary;
use crate::units;
use train::Dataset;

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
const DEMO_BALANCE_MICRO: i64 = DEMO_PAID_CALLS * DEMO_CALL_PRICE_MICRO;

/// The training binary, installed beside `nbt`.
pub fn trainer() -> Option<PathBuf> {
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

/// Why the scenario could not be set up: a bad value (exit status 2) or a failure of nbt's own.
pub enum SetupError {
    Usage(String),
    Failed(String),
}

/// The demo run, ready to start: its plan (the `nbt` profile, the demo's gate, prices and
/// schedule) and the trainer's command line, with the two servers already listening.
pub struct Scenario {
    pub plan: Plan,
    pub command: Vec<OsString>,
    pub data: SocketAddr,
    pub api: SocketAddr,
    /// The profile's caps this machine cannot apply (no cpufreq, no GPU...), taken out of the
    /// plan and named instead.
    pub set_aside: Vec<String>,
}

/// Builds the plan from `flags` (the `nbt` profile under them), starts the servers and makes
/// the trainer's command line; `samples` and `epochs` as given on the command line.
pub fn prepare(
    flags: &Flags,
    samples: Option<&str>,
    epochs: Option<&str>,
) -> Result<Scenario, SetupError> {
    let mut plan = Plan::build(flags).map_err(|err| SetupError::Usage(err.to_string()))?;
    let trainer = trainer().ok_or_else(|| SetupError::Failed("the training workload nbt-train was not found beside the nbt binary (build it with `cargo build`)".into()))?;
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
        (Err(err), _) | (_, Err(err)) => return Err(SetupError::Failed(err)),
    };
    plan.prices = Some(Prices {
        balance_micro: DEMO_BALANCE_MICRO,
        call_micro: DEMO_CALL_PRICE_MICRO,
        ..Prices::default()
    });
    plan.gate = vec![Rule::Net {
        addr: api.ip(),
        prefix: 32,
        port: Some(api.port()),
    }];
    let schedule = crate::schedule::parse(
        "(built-in demo schedule)",
        DEMO_SCHEDULE,
        &plan.schedule_start(),
    )
    .map_err(|err| SetupError::Failed(err.to_string()))?;
    plan.schedule = Some(schedule);
    let command = trainer_command(trainer, data, api, samples, epochs)?;
    let set_aside = plan
        .hwcaps
        .set_aside_unavailable()
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(Scenario {
        plan,
        command,
        data,
        api,
        set_aside,
    })
}

fn trainer_command(
    trainer: PathBuf,
    data: SocketAddr,
    api: SocketAddr,
    samples: Option<&str>,
    epochs: Option<&str>,
) -> Result<Vec<OsString>, SetupError> {
    let samples = samples.map_or_else(|| DEMO_SAMPLES.to_string(), str::to_string);
    let mut command: Vec<OsString> = vec![
        trainer.into(),
        "--data-server".into(),
        data.to_string().into(),
        "--api".into(),
        api.to_string().into(),
    ];
    for (flag, value) in [("--samples", Some(samples.as_str())), ("--epochs", epochs)] {
        if let Some(value) = value {
            units::parse_count(flag, value).map_err(|err| SetupError::Usage(err.to_string()))?;
            command.push(flag.into());
            command.push(value.trim().into());
        }
    }
    Ok(command)
}

/// What the demo imposes, for the lines printed before it starts.
pub fn describe(scenario: &Scenario) -> Vec<String> {
    let plan = &scenario.plan;
    let mut lines = vec![
        format!("nbt demo: training a small model under the `nbt` profile; data from {}, fresh samples from the paid API {}", scenario.data, scenario.api),
        format!("  enforced:          {}", RunSummary::limits_text(&plan.limits)),
        format!(
            "                     egress {}; ingress {}",
            plan.net.egress.describe(Direction::Egress),
            plan.net.ingress.describe(Direction::Ingress)
        ),
        format!(
            "                     balance {}, {} per call of the paid API",
            format_amount(DEMO_BALANCE_MICRO),
            format_amount(DEMO_CALL_PRICE_MICRO)
        ),
        "  schedule:          a 2 s brownout (frozen) at 15 s; both rates down to 256kbit at 28 s".to_string(),
    ];
    lines.extend(
        plan.pending
            .iter()
            .map(|p| format!("  not enforced:      {p}")),
    );
    lines.extend(
        scenario
            .set_aside
            .iter()
            .map(|r| format!("  not enforced here: {r}")),
    );
    lines
}
