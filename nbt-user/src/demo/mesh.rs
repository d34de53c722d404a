//! `nbt demo --swarm`: the demo's model trained by a swarm (docs/swarm.md): a parameter server
//! and three workers (`demo::ps`), each an `nbt run` with its own CPU, memory and bandwidth,
//! twice: once as they are, once losing a worker (killed) and a link (a worker's link to the
//! server losing every packet). The time each run takes to reach the target holdout loss, as
//! the server measures it, and their ratio, are the demo's result.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use crate::swarm::{self, SwarmSummary};

/// The holdout loss both runs train to (the model starts near ln 2 = 0.69; it levels out near
/// 0.425 on this data).
pub const TARGET_LOSS: f64 = 0.435;
/// The server and workers give up after this long.
pub const MAX_SECONDS: u64 = 60;
/// When the failures happen: a worker killed, then another's link lost.
pub const KILL_AT: &str = "1s";
pub const LINK_LOST_AT: &str = "1.5s";

/// The swarm file of the demo: `failures` adds the timeline.
pub fn swarm_file(name: &str, trainer: &Path, user: &str, failures: bool) -> String {
    let t = trainer.display();
    // A TOML string.
    let user = toml::Value::String(user.to_string());
    let common = format!(
        "\"--samples\", \"12000\", \"--batch\", \"128\", \"--lr\", \"0.1\", \"--max-seconds\", \"{MAX_SECONDS}\""
    );
    let mut text = format!(
        "name = \"{name}\"\nsubnet = \"198.51.100.0/24\"\nuntil = \"ps\"\n\n\
         [[node]]\nname = \"ps\"\nuser = {user}\ncpus = 0.5\nmemory = \"128M\"\n\
         command = [\"{t}\", {common}, \"--ps-listen\", \"0.0.0.0:7000\", \"--target-loss\", \"{TARGET_LOSS}\"]\n"
    );
    for i in 0..3 {
        text.push_str(&format!(
            "\n[[node]]\nname = \"w{}\"\nuser = {user}\ncpus = 0.25\nmemory = \"128M\"\negress-rate = \"4mbit\"\n\
             command = [\"{t}\", {common}, \"--worker-of\", \"ps:7000\", \"--shard\", \"{i}/3\"]\n",
            i + 1
        ));
    }
    if failures {
        text.push_str(&format!(
            "\n[[event]]\nat = \"{KILL_AT}\"\naction = \"kill\"\nnode = \"w3\"\n\
             \n[[event]]\nat = \"{LINK_LOST_AT}\"\naction = \"degrade\"\nfrom = \"w2\"\nto = \"ps\"\nloss = \"100%\"\n"
        ));
    }
    text
}

/// One of the demo's two swarms: its summary and what its server reported.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub failures: bool,
    pub time_to_target_s: Option<f64>,
    pub final_loss: Option<f64>,
    pub updates_by_worker: Value,
    pub swarm: SwarmSummary,
}

/// The demo's result.
#[derive(Debug, Clone, Serialize)]
pub struct MeshReport {
    pub target_loss: f64,
    pub without_failures: Trial,
    pub with_failures: Trial,
    /// Time to target with the failures over without them.
    pub ratio: Option<f64>,
}

/// The server's report: the last JSON line of its stdout.
fn server_report(summary: &SwarmSummary) -> Value {
    summary
        .nodes
        .iter()
        .find(|n| n.name == "ps")
        .and_then(|n| n.runs.last())
        .and_then(|r| {
            r.output_tail
                .iter()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
        })
        .unwrap_or(Value::Null)
}

/// Runs the two swarms, one after the other.
pub fn run(trainer: &Path, user: &str, receipts: Option<std::path::PathBuf>) -> Result<MeshReport> {
    let mut trials = Vec::new();
    for failures in [false, true] {
        let name = if failures { "demo-failures" } else { "demo" };
        let text = swarm_file(name, trainer, user, failures);
        let swarm = swarm::file::parse(&text, name)
            .map_err(|e| anyhow::anyhow!("the demo's swarm file: {}", e.0))?;
        eprintln!(
            "\nnbt demo --swarm: {} (a parameter server and 3 workers){}",
            name,
            if failures {
                format!(
                    "; w3 killed at {KILL_AT}, the link w2 <-> ps losing every packet from {LINK_LOST_AT}"
                )
            } else {
                String::new()
            }
        );
        let options = swarm::Options {
            receipts: receipts.clone(),
            stop_after: Some(std::time::Duration::from_secs(MAX_SECONDS + 30)),
            argv: vec!["nbt".into(), "demo".into(), "--swarm".into()],
        };
        let summary = swarm::run(&swarm, &options).context("running the demo's swarm")?;
        let report = server_report(&summary);
        trials.push(Trial {
            failures,
            time_to_target_s: report["time_to_target_s"].as_f64(),
            final_loss: report["final_loss"].as_f64(),
            updates_by_worker: report["updates_by_worker"].clone(),
            swarm: summary,
        });
    }
    let with_failures = trials.pop().expect("two trials");
    let without_failures = trials.pop().expect("two trials");
    let ratio = match (
        with_failures.time_to_target_s,
        without_failures.time_to_target_s,
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    Ok(MeshReport {
        target_loss: TARGET_LOSS,
        without_failures,
        with_failures,
        ratio,
    })
}
