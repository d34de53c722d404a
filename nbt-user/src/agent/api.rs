//! The `/v1` endpoints: the joule bucket (`sample`, `take`), learning updates of live runs
//! (`report`) and the attribution. All of them sit behind the token (`require_token`).

use std::io::Write as _;

use anyhow::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::learning::TaskReport;
use crate::telemetry::counters::Counted;

use super::Shared;

fn error(status: StatusCode, message: String, extra: Value) -> Response {
    let mut body = json!({ "error": message });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    (status, Json(body)).into_response()
}

/// The JSON object of a request body, or a 400 naming what is wrong.
fn object(body: &str) -> Result<serde_json::Map<String, Value>, Box<Response>> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object, not {other}"),
            Value::Null,
        ))),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
            Value::Null,
        ))),
    }
}

pub(super) async fn sample(State(agent): State<Shared>) -> Response {
    let b = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
    Json(json!({
        "bucket_j": b.joules,
        "gross_w": b.gross_w,
        "idle_w": b.idle_w,
        "net_w": (b.gross_w - b.idle_w).max(0.0),
        "source": b.source,
        "label": b.label,
        "deposited_j": b.deposited,
        "taken_j": b.taken,
        "sampled_unix": b.sampled_unix,
    }))
    .into_response()
}

pub(super) async fn take(State(agent): State<Shared>, body: String) -> Response {
    let fields = match object(&body) {
        Ok(fields) => fields,
        Err(bad) => return *bad,
    };
    if let Some(key) = fields.keys().find(|k| *k != "joules") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown field `{key}`: the body is {{\"joules\": X}}"),
            Value::Null,
        );
    }
    let joules = match fields.get("joules").and_then(Value::as_f64) {
        Some(j) if j.is_finite() && j > 0.0 => j,
        Some(j) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("joules must be a positive number, not {j}"),
                Value::Null,
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body needs `joules`, a positive number".into(),
                Value::Null,
            )
        }
    };
    let mut bucket = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
    match bucket.take(joules) {
        Ok(left) => Json(json!({ "granted_j": joules, "bucket_j": left })).into_response(),
        Err(held) => error(
            StatusCode::CONFLICT,
            format!("the bucket holds {held:.3} J, less than the {joules} J asked for"),
            json!({ "bucket_j": held }),
        ),
    }
}

pub(super) async fn report(body: String) -> Response {
    let mut fields = match object(&body) {
        Ok(fields) => fields,
        Err(bad) => return *bad,
    };
    let Some(Value::String(run)) = fields.remove("run") else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body needs `run`, the live run's name (nbt-...), beside the task's fields".into(),
            Value::Null,
        );
    };
    // Before any path is made of it: `run` names a file in the state directory.
    if let Err(why) = crate::state::valid_run_name(&run) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`run`: {why}"),
            Value::Null,
        );
    }
    let task = Value::Object(fields).to_string();
    if let Err(why) = TaskReport::parse(&task) {
        return error(StatusCode::BAD_REQUEST, why, Value::Null);
    }
    let dir = crate::state::state_dir();
    if let Err(err) = crate::state::RunRecord::find_live(&dir, &run) {
        return error(StatusCode::NOT_FOUND, format!("{err:#}"), Value::Null);
    }
    // The run made its report file: appended to, never made here (O_APPEND|O_NOFOLLOW, no
    // O_CREAT), and only when it is a regular file of nbt's user.
    let path = crate::state::RunFiles::of(&dir, &run).reports;
    let appended = crate::sys::private::open_append(&path, "the run's report file")
        .and_then(|mut f| f.write_all(format!("{task}\n").as_bytes()));
    match appended {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "run": run, "queued": true })),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("handing the report to {run}: {e}"),
            Value::Null,
        ),
    }
}

pub(super) async fn attribution(State(agent): State<Shared>) -> Response {
    let (source, label) = {
        let b = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
        (b.source, b.label)
    };
    let t = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
    let a = &t.attribution;
    let runs: Vec<Value> = t
        .runs
        .iter()
        .map(|(name, run)| {
            let energy = a.cgroups.get(&run.cgroup_id).copied().unwrap_or_default();
            json!({
                "run": name,
                "live": run.live,
                "cgroup_id": run.cgroup_id,
                "cpu_seconds": energy.cpu_seconds,
                "cycles": energy.cycles,
                "instructions": energy.instructions,
                "joules": energy.joules,
                "exited_processes": energy.exited_processes,
            })
        })
        .collect();
    let cgroups: Vec<Value> = a
        .cgroups
        .iter()
        .map(|(id, c)| {
            json!({
                "cgroup_id": id,
                "cpu_seconds": c.cpu_seconds,
                "cycles": c.cycles,
                "instructions": c.instructions,
                "joules": c.joules,
                "exited_processes": c.exited_processes,
            })
        })
        .collect();
    Json(json!({
        "source": source,
        "label": label,
        "ratio": if t.tracker.is_some() { None } else { Some(t.counted.map_or("cpu_time", Counted::ratio)) },
        "method": match t.counted {
            None => "active energy split by on-CPU time per process (the scheduler's runtime, read at 99 Hz samples and at exit)",
            Some(Counted::Pmu) => "active energy split by cycles per process (each CPU's cycle counter, charged at 99 Hz samples to the process each sample interrupts)",
            Some(Counted::CpuClock) => "active energy split by sampled cpu-clock per process (the software cpu-clock in place of cycles, charged at 99 Hz samples to the process each sample interrupts): a check of the counter path, equal to sampled CPU time",
        },
        "counters_absent": t.counters_absent,
        "instructions_absent": t.instructions_absent,
        "intervals_by_cpu_time": t.counted.map(|_| a.intervals_by_cpu_time),
        "lost_counter_periods": t.counted.map(|_| t.losses.counter_misses),
        "tracker": t.tracker.clone().unwrap_or_else(|| "attached".into()),
        "intervals": t.intervals,
        "active_j": a.active_joules,
        "attributed_j": a.attributed_joules(),
        "unattributed_j": a.unattributed_joules,
        "lost_exit_records": t.losses.lost_exits,
        "lost_map_full": t.losses.map_full,
        "processes": a.processes.values().collect::<Vec<_>>(),
        "gpu": {
            "source": "nvml",
            "absent": t.gpu.absent,
            "method": "each GPU's energy split by the processes' SM utilisation",
            "gpus": t.gpu.gpus.iter().map(|(index, (joules, watts, how))| json!({
                "gpu": index, "joules": joules, "watts": watts, "measured_by": how,
            })).collect::<Vec<_>>(),
            "processes": t.gpu.processes.iter().map(|((pid, gpu), joules)| json!({
                "pid": pid, "gpu": gpu, "joules": joules,
            })).collect::<Vec<_>>(),
            "unattributed_j": t.gpu.unattributed_joules,
        },
        "runs": runs,
        "cgroups": cgroups,
    }))
    .into_response()
}
