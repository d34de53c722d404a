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
//!   bucket, the build, and per live run its series (memory, CPU, pressure, traffic, the limits
//!   in force, balance, calls, energy) as of its last sample, read at scrape time through
//!   `state::live` as `nbt ps` reads them (`run_metrics`).
//! - `GET /healthz`: `ok`, nothing else.
//!
//! Every endpoint but `/healthz` and `/metrics` needs `Authorization: Bearer TOKEN` (the
//! attribution lists every process of the node with its command); `--private-metrics` asks it of
//! `/metrics` too. The token is made at first start in a 0600 file (`$NBT_HOME/agent.token`) or
//! given with `--token-file` (0600, nbt's user's, not a link), and compared in constant time.
//!
//! Limits: a request's head must arrive within 10 s (an idle keep-alive connection is closed
//! after it too), a request is answered within 30 s (else 408, the body's reading included; both
//! can be shortened by hidden flags, for tests), a body is at most 64 KiB (else 413), and at most `--max-connections` (256)
//! connections are open: one beyond is closed at once, unanswered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest as _, Sha256};

use crate::telemetry::counters::{AttributeBy, Counted};
use crate::telemetry::energy::CpuModel;

mod api;
mod exposition;
mod metrics;
mod run_metrics;
mod sampler;

/// How often the agent drains the kernel's process-exit records between samples.
const EXIT_DRAIN_PERIOD: Duration = Duration::from_millis(100);
/// Runs remembered after they end, for `/v1/attribution` and `/metrics`.
const ENDED_RUNS_KEPT: usize = 256;
/// The window over which a metered source's idle power is learned, then frozen.
pub const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// The largest request body: a report or a withdrawal is a few hundred bytes.
const MAX_BODY: usize = 64 << 10;

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
    /// `/metrics` needs the token too.
    pub private_metrics: bool,
    /// Connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// How long a request's head may take to arrive (and an idle connection may stay).
    pub header_timeout: Duration,
    /// How long a request may take once its head is read, its body's reading included.
    pub request_timeout: Duration,
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
    /// The sha256 of the token: a guess is hashed and the digests compared in constant time, so
    /// neither the token's bytes nor its length show in how long a refusal takes.
    token_digest: [u8; 32],
}

impl Agent {
    fn token_matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given.ct_eq(&self.token_digest).into()
    }
}

type Shared = Arc<Agent>;

/// The bearer token: read from `path`, or made there (0600) when nothing is there. An existing
/// file is read only when it is a regular file (not a link) of nbt's user that group and others
/// cannot read; otherwise the agent refuses to start, naming the file, its mode and owner.
pub fn token(path: &Path) -> Result<String> {
    use crate::sys::private::{self, WideMode};
    let read = |path: &Path| -> Result<Option<String>> {
        match private::read_private(path, "the agent's token file", WideMode::Refuse) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| {
                    anyhow::anyhow!("the agent's token file {} is not text", path.display())
                })?;
                let token = text.trim().to_string();
                anyhow::ensure!(
                    !token.is_empty(),
                    "the agent's token file {} is empty",
                    path.display()
                );
                Ok(Some(token))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    if let Some(token) = read(path)? {
        return Ok(token);
    }
    crate::receipt::key::make_parent(path)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading randomness: {e}"))?;
    let token = crate::receipt::key::hex(&bytes);
    // Written whole and linked into place: an agent starting at the same time reads either
    // nothing or the whole token, and the one that lost reads the winner's.
    private::create_private(path, format!("{token}\n").as_bytes())
        .with_context(|| format!("making the token file {}", path.display()))?;
    read(path)?.with_context(|| format!("the token file {} went away", path.display()))
}

/// Lets a request through when it carries the agent's token; 401 otherwise.
async fn require_token(State(agent): State<Shared>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
        });
    let problem = match given {
        Some(token) if agent.token_matches(token) => return next.run(request).await,
        Some(_) => "the bearer token is not this agent's",
        None => "this endpoint needs Authorization: Bearer TOKEN (the token is in the agent's token file)",
    };
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Bearer")],
        axum::Json(serde_json::json!({ "error": problem })),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// The routes: `/healthz` open, `/metrics` open unless `private_metrics`, the rest behind the
/// token; bodies limited to [`MAX_BODY`].
fn router(agent: Shared, private_metrics: bool) -> Router {
    let mut protected = Router::new()
        .route("/v1/sample", get(api::sample))
        .route("/v1/take", post(api::take))
        .route("/v1/report", post(api::report))
        .route("/v1/attribution", get(api::attribution));
    let mut open = Router::new().route("/healthz", get(healthz));
    if private_metrics {
        protected = protected.route("/metrics", get(metrics::metrics));
    } else {
        open = open.route("/metrics", get(metrics::metrics));
    }
    let protected =
        protected.route_layer(middleware::from_fn_with_state(agent.clone(), require_token));
    open.merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

/// Serves `app` on `listener`: HTTP/1.1 by hyper with a header read timeout, each request under
/// `request_timeout`, at most `max_connections` connections (one more is closed at once).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    max_connections: usize,
    header_timeout: Duration,
    request_timeout: Duration,
) -> Result<()> {
    use tower::ServiceExt as _;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut said_full = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, a connection reset before it was accepted: not fatal.
                eprintln!("nbt agent: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if !said_full {
                eprintln!(
                    "nbt agent: {max_connections} connections open (--max-connections): \
                     further ones are closed at once until one ends (said once)"
                );
                said_full = true;
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let request = request.map(axum::body::Body::new);
                        match tokio::time::timeout(request_timeout, app.oneshot(request)).await {
                            Ok(response) => response,
                            Err(_) => Ok((
                                StatusCode::REQUEST_TIMEOUT,
                                [("connection", "close")],
                                axum::Json(serde_json::json!({
                                    "error": format!("the request took over {:?}", request_timeout)
                                })),
                            )
                                .into_response()),
                        }
                    }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A client gone or too slow ends its connection, not the agent.
            let _ = connection.await;
            drop(permit);
        });
    }
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
        private_metrics,
        max_connections,
        header_timeout,
        request_timeout,
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
        token_digest: Sha256::digest(token.as_bytes()).into(),
    });
    let sampled = agent.clone();
    std::thread::spawn(move || sampler::sampler(sampled, interval, model, attribute_by));
    let app = router(agent, private_metrics);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}: cannot listen there"))?;
        eprintln!(
            "nbt agent: listening on http://{listen} (token in {}; /metrics {})",
            token_file.display(),
            if private_metrics {
                "needs it too"
            } else {
                "and /healthz open"
            }
        );
        accept_loop(
            listener,
            app,
            max_connections,
            header_timeout,
            request_timeout,
        )
        .await
    })
}
