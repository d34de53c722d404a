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
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::routing::{get, post};
use axum::Router;

use crate::telemetry::counters::{AttributeBy, Counted};
use crate::telemetry::energy::CpuModel;

mod api;
mod metrics;
mod sampler;

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
    std::thread::spawn(move || sampler::sampler(sampled, interval, model, attribute_by));
    let app = Router::new()
        .route("/v1/sample", get(api::sample))
        .route("/v1/take", post(api::take))
        .route("/v1/report", post(api::report))
        .route("/v1/attribution", get(api::attribution))
        .route("/metrics", get(metrics::metrics))
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
