//! `nbt agent`: the joule agent (CryoFlux's JouleAgent) over HTTP, on the same state as the runs.
//!
//! - A sampler reads the node's power every `--interval` (1 s): RAPL where powercap has it, else
//!   the stated CPU model (`energy::CpuModel`) driven by the node's busy CPU time. The idle power
//!   is learned over the first 5 s and then frozen (RAPL; the model's idle is stated); what is
//!   above it (net, the active energy) fills the joule bucket and is attributed to processes by
//!   their CPU time as the scheduler counted it, read by the kernel-side sampler (`sched`, `attribution`).
//! - `GET /v1/sample`: the bucket, gross/idle/net power, the source and its label.
//! - `POST /v1/take {"joules": X}`: an atomic withdrawal; 409 with the balance when the bucket
//!   holds less, never negative.
//! - `POST /v1/report {"run": RUN, "task_name": ..., "base_loss": ..., "new_loss": ...}`: a
//!   learning update of a live run, handed to the run through its `$NBT_REPORT` file, so the run
//!   judges it and writes its receipt like any other.
//! - `GET /v1/attribution`: active energy, what each live process and each run (live or recent)
//!   was given, and what the tracker could not see.
//! - `GET /metrics`: Prometheus text: node joules by source, per-process and per-run joules, the
//!   bucket, and per live run its bytes, drops and balance (read from the runs' records and maps,
//!   as `nbt ps` reads them).
//!
//! Mutating endpoints need `Authorization: Bearer TOKEN`; the token is made at first start in a
//! 0600 file (`$NBT_HOME/agent.token`) or given with `--token-file`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::telemetry::counters::{AttributeBy, Counted};
use crate::telemetry::energy::{node_busy_seconds, rapl_counters, CpuModel};
use crate::learning::TaskReport;
use crate::telemetry::sched::ProcessTracker;

/// How often the agent drains the kernel's process-exit records between samples.
const EXIT_DRAIN_PERIOD: Duration = Duration::from_millis(100);
/// Runs remembered after they end, for `/v1/attribution` and `/metrics`.
const ENDED_RUNS_KEPT: usize = 256;
/// The window over which a metered source's idle power is learned, then frozen.
pub const IDLE_WINDOW: Duration = Duration::from_secs(5);

/// The bucket and what the sampler last saw.
#[derive(Debug, Default)]
pub struct Bucket {
    pub joules: f64,
    /// Everything ever deposited and taken, for audits: taken never exceeds deposited.
    pub deposited: f64,
    pub taken: f64,
    pub gross_w: f64,
    pub idle_w: f64,
    pub node_joules: f64,
    pub source: &'static str,
    pub label: &'static str,
    pub sampled_unix: f64,
}

impl Bucket {
    /// Withdraws `joules` if the bucket holds them: the balance after, or the balance that fell
    /// short.
    pub fn take(&mut self, joules: f64) -> Result<f64, f64> {
        if joules > self.joules {
            return Err(self.joules);
        }
        self.joules -= joules;
        self.taken += joules;
        Ok(self.joules)
    }
}

/// The options, checked.
pub struct AgentOptions {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub interval: Duration,
    pub model: CpuModel,
    pub attribute_by: AttributeBy,
}

/// A run the agent has seen, live or ended.
#[derive(Debug, Clone)]
struct SeenRun {
    cgroup_id: u64,
    live: bool,
    /// Order of first sighting, to forget the oldest ended runs first.
    order: u64,
}

/// What the sampler attributed, and what it could not see.
#[derive(Default)]
struct Telemetry {
    attribution: crate::telemetry::attribution::Attribution,
    runs: std::collections::BTreeMap<String, SeenRun>,
    tracker: Option<String>,
    /// What the samplers count besides CPU time, and so what energy is split by.
    counted: Option<Counted>,
    /// Why energy is split by CPU time (no PMU, or told so).
    counters_absent: Option<String>,
    /// Why a PMU's instructions are not counted while its cycles are.
    instructions_absent: Option<String>,
    losses: crate::telemetry::sched::TrackerLosses,
    intervals: u64,
    gpu: GpuTelemetry,
}

/// The `nvml` source: energy per GPU, split across processes by SM utilisation.
#[derive(Default)]
struct GpuTelemetry {
    /// Why there is no GPU figure (no driver, no GPU); `None` while NVML works.
    absent: Option<String>,
    /// Per GPU: joules since start, the last power, how the joules were measured.
    gpus: std::collections::BTreeMap<u32, (f64, f64, &'static str)>,
    /// (pid, GPU) → joules.
    processes: std::collections::BTreeMap<(u32, u32), f64>,
    /// GPU energy of intervals in which no process used the GPU.
    unattributed_joules: f64,
}

impl GpuTelemetry {
    fn add(&mut self, intervals: Vec<crate::telemetry::gpu::GpuInterval>) {
        for gpu in intervals {
            let entry = self.gpus.entry(gpu.index).or_insert((0.0, 0.0, gpu.method));
            entry.0 += gpu.joules;
            entry.1 = gpu.watts;
            entry.2 = gpu.method;
            let total: u32 = gpu.processes.iter().map(|(_, util)| util).sum();
            if total == 0 {
                self.unattributed_joules += gpu.joules;
                continue;
            }
            for (pid, util) in gpu.processes {
                *self.processes.entry((pid, gpu.index)).or_default() +=
                    gpu.joules * f64::from(util) / f64::from(total);
            }
        }
    }
}

struct Agent {
    bucket: Mutex<Bucket>,
    telemetry: Mutex<Telemetry>,
    token: String,
}

type Shared = Arc<Agent>;


/// Sleeps until `deadline`, draining exit records meanwhile.
fn wait_draining(deadline: Instant, tracker: &mut Option<ProcessTracker>) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(EXIT_DRAIN_PERIOD));
        if let Some(tracker) = tracker {
            tracker.drain_exits();
        }
    }
}

/// Every live run's name and the cgroup v2 id its processes are charged to.
fn live_run_cgroups() -> Vec<(String, u64)> {
    crate::state::RunRecord::read_all(&crate::state::state_dir())
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .filter(|record| record.supervisor_alive())
        .filter_map(|record| {
            let id = record
                .cgroups
                .iter()
                .find_map(|dir| crate::telemetry::sched::cgroup_id(dir))?;
            Some((record.name, id))
        })
        .collect()
}

fn note_runs(runs: &mut std::collections::BTreeMap<String, SeenRun>, live: Vec<(String, u64)>) {
    let next = runs.values().map(|r| r.order + 1).max().unwrap_or(0);
    for run in runs.values_mut() {
        run.live = false;
    }
    for (i, (name, cgroup_id)) in live.into_iter().enumerate() {
        runs.entry(name)
            .and_modify(|r| r.live = true)
            .or_insert(SeenRun {
                cgroup_id,
                live: true,
                order: next + i as u64,
            });
    }
    while runs.len() > ENDED_RUNS_KEPT {
        let Some(oldest) = runs
            .iter()
            .filter(|(_, r)| !r.live)
            .min_by_key(|(_, r)| r.order)
            .map(|(name, _)| name.clone())
        else {
            break;
        };
        runs.remove(&oldest);
    }
}

fn sampler(agent: Shared, interval: Duration, model: CpuModel, attribute_by: AttributeBy) {
    let mut tracker = match ProcessTracker::attach(attribute_by) {
        Ok(tracker) => {
            let mut telemetry = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
            match (tracker.counted(), tracker.counters_absent()) {
                (Some(counted), _) => {
                    eprintln!("nbt agent: attribution by {}", counted.ratio());
                    if let Some(why) = tracker.instructions_absent() {
                        eprintln!("nbt agent: instructions are not counted: {why}");
                        telemetry.instructions_absent = Some(why.to_string());
                    }
                    telemetry.counted = Some(counted);
                }
                (None, why) => {
                    let why = why.unwrap_or("no counters");
                    eprintln!("nbt agent: attribution by CPU time: {why}");
                    telemetry.counters_absent = Some(why.to_string());
                }
            }
            Some(tracker)
        }
        Err(err) => {
            eprintln!("nbt agent: per-process attribution is off: {err:#}");
            let mut telemetry = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
            telemetry.tracker = Some(format!("{err:#}"));
            telemetry.counters_absent = Some(format!("{err:#}"));
            None
        }
    };
    let mut gpu_meter = match crate::telemetry::gpu::GpuMeter::open() {
        Ok(meter) => {
            eprintln!("nbt agent: nvml: {} GPU(s) metered", meter.gpus());
            Some(meter)
        }
        Err(why) => {
            eprintln!("nbt agent: nvml: {why}; GPU energy is not measured");
            agent
                .telemetry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .gpu
                .absent = Some(why);
            None
        }
    };
    let powercap = Path::new("/sys/class/powercap");
    let started = Instant::now();
    let mut last = Instant::now();
    let mut last_busy = node_busy_seconds().unwrap_or(0.0);
    let mut last_rapl = rapl_counters(powercap);
    let (mut idle_sum, mut idle_n) = (0.0, 0u32);
    loop {
        wait_draining(last + interval, &mut tracker);
        let dt = last.elapsed().as_secs_f64().max(1e-3);
        last = Instant::now();
        let busy = node_busy_seconds().unwrap_or(last_busy);
        let utilisation = ((busy - last_busy) / dt / model.cpus as f64).clamp(0.0, 1.0);
        last_busy = busy;
        let rapl = rapl_counters(powercap);
        let (gross_w, source, label) = match (&last_rapl, &rapl) {
            (Some(before), Some(after)) if before.len() == after.len() => {
                let uj: u64 = before
                    .iter()
                    .zip(after)
                    .map(|((a, range), (b, _))| crate::telemetry::energy::counter_delta(*a, *b, *range))
                    .sum();
                (uj as f64 / 1e6 / dt, "rapl", "measured")
            }
            _ => (
                model.idle_watts + (model.tdp_watts - model.idle_watts) * utilisation,
                "model",
                "model",
            ),
        };
        last_rapl = rapl;
        let deltas = match tracker.as_mut().map(ProcessTracker::take) {
            Some(Ok(deltas)) => deltas,
            Some(Err(err)) => {
                eprintln!("nbt agent: reading the process map: {err:#}");
                Vec::new()
            }
            None => Vec::new(),
        };
        let live_runs = live_run_cgroups();
        let gpu_intervals = gpu_meter.as_mut().map(|m| m.sample()).unwrap_or_default();
        let net = {
            let mut bucket = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let idle_w = if source == "model" {
                model.idle_watts
            } else if started.elapsed() < IDLE_WINDOW {
                idle_sum += gross_w;
                idle_n += 1;
                idle_sum / f64::from(idle_n)
            } else {
                bucket.idle_w
            };
            let net = (gross_w - idle_w).max(0.0) * dt;
            bucket.joules += net;
            bucket.deposited += net;
            bucket.node_joules += gross_w * dt;
            bucket.gross_w = gross_w;
            bucket.idle_w = idle_w;
            bucket.source = source;
            bucket.label = label;
            bucket.sampled_unix = crate::sys::proc::now_unix();
            net
        };
        let mut telemetry = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
        if tracker.is_some() {
            let by_counts = telemetry.counted.is_some();
            telemetry.attribution.interval(net, &deltas, by_counts);
        }
        if let Some(tracker) = &tracker {
            telemetry.losses = tracker.losses();
        }
        note_runs(&mut telemetry.runs, live_runs);
        telemetry.gpu.add(gpu_intervals);
        telemetry.intervals += 1;
    }
}

/// The bearer token: read from `path`, or made there (0600) when it does not exist.
pub fn token(path: &Path) -> Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_string();
        anyhow::ensure!(
            !token.is_empty(),
            "the token file {} is empty",
            path.display()
        );
        return Ok(token);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading randomness: {e}"))?;
    let token = crate::receipt::key::hex(&bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("making the token file {}", path.display()))?;
    writeln!(file, "{token}")?;
    Ok(token)
}

pub fn default_token_path() -> PathBuf {
    crate::receipt::key::home().join("agent.token")
}

fn error(status: StatusCode, message: String, extra: Value) -> Response {
    let mut body = json!({ "error": message });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    (status, Json(body)).into_response()
}

fn authorized(agent: &Agent, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if token == agent.token => Ok(()),
        Some(_) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not this agent's".into(),
            Value::Null,
        ))),
        None => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer TOKEN (the token is in the agent's token file)"
                .into(),
            Value::Null,
        ))),
    }
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

async fn sample(State(agent): State<Shared>) -> Response {
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

async fn take(State(agent): State<Shared>, headers: HeaderMap, body: String) -> Response {
    if let Err(denied) = authorized(&agent, &headers) {
        return *denied;
    }
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

async fn report(headers: HeaderMap, State(agent): State<Shared>, body: String) -> Response {
    if let Err(denied) = authorized(&agent, &headers) {
        return *denied;
    }
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
    let task = Value::Object(fields).to_string();
    if let Err(why) = TaskReport::parse(&task) {
        return error(StatusCode::BAD_REQUEST, why, Value::Null);
    }
    let dir = crate::state::state_dir();
    if let Err(err) = crate::state::RunRecord::find_live(&dir, &run) {
        return error(StatusCode::NOT_FOUND, format!("{err:#}"), Value::Null);
    }
    let path = crate::state::RunFiles::of(&dir, &run).reports;
    let appended = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
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

async fn attribution(State(agent): State<Shared>) -> Response {
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

type Labels = Vec<(String, String)>;
type FloatCounter = prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;
type IntCounter = prometheus_client::metrics::counter::Counter;
type FloatGauge = prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;
type Family<M> = prometheus_client::metrics::family::Family<Labels, M>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The attribution's figures as Prometheus families, in the names Kepler users know.
fn register_attribution(
    registry: &mut prometheus_client::registry::Registry,
    agent: &Agent,
    source: &str,
) {
    let t = agent.telemetry.lock().unwrap_or_else(|p| p.into_inner());
    let a = &t.attribution;
    let active: Family<FloatCounter> = Default::default();
    active
        .get_or_create(&labels(&[("source", source)]))
        .inc_by(a.active_joules);
    registry.register(
        "nbt_node_cpu_active_joules",
        "Energy of the node's CPUs above idle since the agent started: what is attributed",
        active,
    );
    // Counts only where counted: a process or run without a series was not counted, not idle.
    let counter = t.counted.map(Counted::ratio);
    let process_joules: Family<FloatCounter> = Default::default();
    let process_seconds: Family<FloatCounter> = Default::default();
    let process_cycles: Family<IntCounter> = Default::default();
    let process_instructions: Family<IntCounter> = Default::default();
    for p in a.processes.values() {
        let pid = p.pid.to_string();
        let l = labels(&[("pid", &pid), ("comm", &p.comm), ("source", source)]);
        process_joules.get_or_create(&l).inc_by(p.joules);
        process_seconds.get_or_create(&l).inc_by(p.cpu_seconds);
        if let Some(counter) = counter {
            let l = labels(&[("pid", &pid), ("comm", &p.comm), ("counter", counter)]);
            if let Some(cycles) = p.cycles {
                process_cycles.get_or_create(&l).inc_by(cycles);
            }
            if let Some(instructions) = p.instructions {
                process_instructions.get_or_create(&l).inc_by(instructions);
            }
        }
    }
    registry.register(
        "nbt_process_cpu_joules",
        "Active CPU energy attributed to a live process by its on-CPU time",
        process_joules,
    );
    registry.register(
        "nbt_process_cpu_seconds",
        "On-CPU time of a live process since the agent started, from the scheduler's runtime",
        process_seconds,
    );
    let run_joules: Family<FloatCounter> = Default::default();
    let run_seconds: Family<FloatCounter> = Default::default();
    let run_cycles: Family<IntCounter> = Default::default();
    for (name, run) in t.runs.iter().filter(|(_, r)| r.live) {
        let energy = a.cgroups.get(&run.cgroup_id).copied().unwrap_or_default();
        let l = labels(&[("run", name), ("source", source)]);
        run_joules.get_or_create(&l).inc_by(energy.joules);
        run_seconds.get_or_create(&l).inc_by(energy.cpu_seconds);
        if let (Some(counter), Some(cycles)) = (counter, energy.cycles) {
            run_cycles
                .get_or_create(&labels(&[("run", name), ("counter", counter)]))
                .inc_by(cycles);
        }
    }
    if let Some(counted) = t.counted {
        registry.register(
            "nbt_process_cpu_cycles",
            "CPU cycles of a live process since the agent started, sampled at 99 Hz per CPU",
            process_cycles,
        );
        registry.register(
            "nbt_run_cpu_cycles",
            "CPU cycles of a live run's processes, exited ones included, sampled at 99 Hz per CPU",
            run_cycles,
        );
        if counted == Counted::Pmu {
            registry.register(
                "nbt_process_cpu_instructions",
                "Instructions of a live process since the agent started, sampled at 99 Hz per CPU",
                process_instructions,
            );
        }
    }
    registry.register(
        "nbt_run_cpu_joules",
        "Active CPU energy attributed to a live run's processes, exited ones included",
        run_joules,
    );
    registry.register(
        "nbt_run_cpu_seconds",
        "On-CPU time of a live run's processes, exited ones included",
        run_seconds,
    );
    let gpu_joules: Family<FloatCounter> = Default::default();
    for (index, (joules, _, _)) in &t.gpu.gpus {
        gpu_joules
            .get_or_create(&labels(&[("gpu", &index.to_string()), ("source", "nvml")]))
            .inc_by(*joules);
    }
    registry.register(
        "nbt_node_gpu_joules",
        "Energy of each GPU since the agent started (NVML energy counter, else integrated power)",
        gpu_joules,
    );
    let gpu_process: Family<FloatCounter> = Default::default();
    for ((pid, gpu), joules) in &t.gpu.processes {
        gpu_process
            .get_or_create(&labels(&[
                ("pid", &pid.to_string()),
                ("gpu", &gpu.to_string()),
                ("source", "nvml"),
            ]))
            .inc_by(*joules);
    }
    registry.register(
        "nbt_process_gpu_joules",
        "GPU energy attributed to a process by its SM utilisation share",
        gpu_process,
    );
    let lost: Family<IntCounter> = Default::default();
    lost.get_or_create(&labels(&[("what", "exit_records")]))
        .inc_by(t.losses.lost_exits);
    lost.get_or_create(&labels(&[("what", "map_full")]))
        .inc_by(t.losses.map_full);
    lost.get_or_create(&labels(&[("what", "counter_periods")]))
        .inc_by(t.losses.counter_misses);
    registry.register(
        "nbt_agent_tracker_lost",
        "What the process tracker could not see: exit records dropped, charges refused by a full map, counter periods unread",
        lost,
    );
}

async fn metrics(State(agent): State<Shared>) -> Response {
    let (node_joules, source, bucket) = {
        let b = agent.bucket.lock().unwrap_or_else(|p| p.into_inner());
        (b.node_joules, b.source, b.joules)
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let node: Family<FloatCounter> = Default::default();
    node.get_or_create(&vec![("source".into(), source.to_string())])
        .inc_by(node_joules);
    registry.register(
        "nbt_node_cpu_joules",
        "Energy of the node's CPUs since the agent started, by source (rapl: measured; model: estimated)",
        node.clone(),
    );
    register_attribution(&mut registry, &agent, source);
    let gauge: FloatGauge = Default::default();
    gauge.set(bucket);
    registry.register(
        "nbt_agent_bucket_joules",
        "Joules in the agent's bucket",
        gauge,
    );
    let bytes: Family<prometheus_client::metrics::counter::Counter> = Default::default();
    let drops: Family<prometheus_client::metrics::counter::Counter> = Default::default();
    let balance: Family<FloatGauge> = Default::default();
    for run in crate::state::live::live_runs() {
        if let Some(shaped) = run.shaped {
            for (direction, traffic) in [("egress", shaped.egress), ("ingress", shaped.ingress)] {
                let labels = |extra: Vec<(String, String)>| {
                    let mut l = vec![
                        ("run".to_string(), run.run.clone()),
                        ("direction".to_string(), direction.to_string()),
                    ];
                    l.extend(extra);
                    l
                };
                bytes
                    .get_or_create(&labels(vec![]))
                    .inc_by(traffic.passed_bytes);
                drops
                    .get_or_create(&labels(vec![("reason".into(), "rate".into())]))
                    .inc_by(traffic.rate_dropped_packets);
                drops
                    .get_or_create(&labels(vec![("reason".into(), "loss".into())]))
                    .inc_by(traffic.loss_dropped_packets);
            }
        }
        if let Some(micro) = run.balance_micro {
            balance
                .get_or_create(&vec![("run".into(), run.run.clone())])
                .set(micro as f64 / 1e6);
        }
    }
    registry.register(
        "nbt_run_passed_bytes",
        "Bytes a live run's shaper passed",
        bytes,
    );
    registry.register(
        "nbt_run_dropped_packets",
        "Packets a live run's shaper dropped, by reason",
        drops,
    );
    registry.register("nbt_run_balance", "A live run's balance", balance);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Runs the agent until killed.
pub fn serve(options: AgentOptions) -> Result<()> {
    // A long-running process: blocks over 256 KiB are mapped and unmapped, not kept in malloc's
    // arenas. Without this, glibc's adaptive threshold put the 5.5 MB of kernel BTF the tracker
    // reads at start into an arena that kept 11.7 MiB of RSS for good (20.9 against 9.3 MiB).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a tunable of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    let AgentOptions {
        listen,
        token_file,
        interval,
        model,
        attribute_by,
    } = options;
    let token_file = token_file.as_path();
    let token = token(token_file)?;
    let agent = Arc::new(Agent {
        bucket: Mutex::new(Bucket {
            source: "model",
            label: "model",
            ..Bucket::default()
        }),
        telemetry: Mutex::new(Telemetry::default()),
        token,
    });
    let sampled = agent.clone();
    std::thread::spawn(move || sampler(sampled, interval, model, attribute_by));
    let app = Router::new()
        .route("/v1/sample", get(sample))
        .route("/v1/take", post(take))
        .route("/v1/report", post(report))
        .route("/v1/attribution", get(attribution))
        .route("/metrics", get(metrics))
        .with_state(agent);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}: cannot listen there"))?;
        eprintln!(
            "nbt agent: listening on http://{listen} (token in {})",
            token_file.display()
        );
        axum::serve(listener, app).await.context("serving")
    })
}
