//! `nbt-train`: the demo's training workload (see `nbt::train`).

use std::process::ExitCode;

use clap::Parser;
use nbt::demo::train::{train_with_fresh, Dataset, EpochProgress, TrainConfig, TrainReport};
use nbt::learning::{report_task, TaskReport, REPORT_ENV};

const MIB: f64 = 1024.0 * 1024.0;

/// nbt's demo training workload: trains a small neural network (an MLP, by minibatch SGD) on a
/// synthetic, seeded classification dataset held in memory, and reports the holdout loss and
/// accuracy before and after. Its memory use grows with --samples x --features, so `nbt demo`
/// can run it under a memory or CPU cap and measure what the scarcity cost.
#[derive(Parser, Debug)]
#[command(name = "nbt-train", version, about, long_about)]
struct Args {
    /// Samples to generate (20% are held out); memory is about samples x (features + 1) x 4 bytes
    #[arg(long, value_name = "N", default_value_t = TrainConfig::default().samples)]
    samples: usize,
    /// Features per sample
    #[arg(long, value_name = "D", default_value_t = TrainConfig::default().features)]
    features: usize,
    /// Hidden units of the network
    #[arg(long, value_name = "H", default_value_t = TrainConfig::default().hidden)]
    hidden: usize,
    /// Passes over the training set
    #[arg(long, value_name = "E", default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    /// Minibatch size
    #[arg(long, value_name = "B", default_value_t = TrainConfig::default().batch)]
    batch: usize,
    /// SGD learning rate
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = TrainConfig::default().learning_rate)]
    lr: f32,
    /// Seed of the dataset and the model's initial weights
    #[arg(long, value_name = "S", default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Fetch the dataset over TCP from this data server (host:port; `nbt demo` runs one) instead
    /// of generating it
    #[arg(long, value_name = "ADDR")]
    data_server: Option<String>,
    /// A paid API (host:port) asked before each epoch for fresh samples; when it refuses (a
    /// balance gate closed), training goes on with the data it has
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// Fresh samples asked of --api per epoch
    #[arg(long, value_name = "N", default_value_t = 2000)]
    api_batch: usize,
    /// Print the final report as one JSON object on stdout
    #[arg(long)]
    json: bool,
    /// Be the parameter server of a swarm's training (`nbt demo --swarm`): serve the model on
    /// this address (host:port) until its holdout loss reaches --target-loss
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["worker_of", "data_server", "api"])]
    ps_listen: Option<String>,
    /// Be a worker of the parameter server at ADDR (host:port; a host that is a name in
    /// $NBT_SWARM_PEERS is that peer's address)
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["data_server", "api"])]
    worker_of: Option<String>,
    /// Where a worker starts in the training rows: I/N of the way in (each worker walks all of
    /// them)
    #[arg(long, value_name = "I/N", default_value = "0/1")]
    shard: String,
    /// The parameter server's target holdout loss
    #[arg(long, value_name = "X", default_value_t = 0.45)]
    target_loss: f64,
    /// The parameter server and the workers stop after this many seconds at most
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    max_seconds: f64,
}

/// `HOST:PORT` with HOST looked up in $NBT_SWARM_PEERS (`name=addr,...`) when it is a peer's name.
fn swarm_address(addr: &str) -> String {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return addr.to_string();
    };
    let peers = std::env::var("NBT_SWARM_PEERS").unwrap_or_default();
    peers
        .split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(name, _)| *name == host)
        .map(|(_, ip)| format!("{ip}:{port}"))
        .unwrap_or_else(|| addr.to_string())
}

/// The parameter server or a worker (`--ps-listen`, `--worker-of`): one JSON report on stdout.
fn swarm_role(args: &Args, cfg: &TrainConfig) -> ExitCode {
    use nbt::demo::ps;
    let result = if let Some(listen) = &args.ps_listen {
        ps::serve(
            cfg,
            listen,
            args.target_loss,
            args.max_seconds,
            std::time::Duration::from_millis(250),
        )
        .map(|r| serde_json::to_string(&r))
    } else {
        let shard = args
            .shard
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))
            .filter(|(i, n): &(usize, usize)| *n > 0 && i < n);
        let Some(shard) = shard else {
            eprintln!(
                "nbt-train: invalid --shard {}: accepted: I/N with 0 <= I < N",
                args.shard
            );
            return ExitCode::from(2);
        };
        let name = std::env::var("NBT_SWARM_NODE").unwrap_or_else(|_| "worker".into());
        let server = swarm_address(args.worker_of.as_deref().unwrap_or_default());
        ps::work(cfg, &server, &name, shard, args.max_seconds).map(|r| serde_json::to_string(&r))
    };
    match result {
        Ok(Ok(json)) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("nbt-train: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nbt-train: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Args {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            samples: self.samples,
            features: self.features,
            hidden: self.hidden,
            epochs: self.epochs,
            batch: self.batch,
            learning_rate: self.lr,
            seed: self.seed,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = args.config();
    if let Err(e) = cfg.validate() {
        eprintln!("nbt-train: {e}");
        return ExitCode::from(2);
    }
    if args.ps_listen.is_some() || args.worker_of.is_some() {
        return swarm_role(&args, &cfg);
    }
    let data = match &args.data_server {
        None => Dataset::generate(&cfg),
        Some(addr) => {
            let started = std::time::Instant::now();
            match Dataset::fetch(addr, &cfg) {
                Ok(data) => {
                    let seconds = started.elapsed().as_secs_f64();
                    eprintln!(
                        "nbt-train: fetched {:.2} MiB from {addr} in {seconds:.1} s ({:.0} kbit/s)",
                        data.bytes() as f64 / MIB,
                        data.bytes() as f64 * 8.0 / seconds / 1e3
                    );
                    data
                }
                Err(e) => {
                    eprintln!("nbt-train: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    eprintln!(
        "nbt-train: {} samples x {} features ({:.1} MiB), {} epochs",
        cfg.samples,
        cfg.features,
        data.bytes() as f64 / MIB,
        cfg.epochs
    );
    let api = args.api.clone();
    let fresh = |epoch: usize| -> Option<Dataset> {
        let addr = api.as_deref()?;
        let offset = cfg.samples + (epoch - 1) * args.api_batch;
        match Dataset::fetch_rows(addr, &cfg, offset, args.api_batch) {
            Ok(rows) => {
                eprintln!(
                    "epoch {epoch}: +{} fresh samples from the paid API",
                    rows.samples()
                );
                Some(rows)
            }
            Err(e) => {
                eprintln!(
                    "epoch {epoch}: the paid API refused ({e:#}); training on the cached data"
                );
                None
            }
        }
    };
    let report = match train_with_fresh(&data, &cfg, print_progress, fresh) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("nbt-train: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !(report.new_loss.is_finite() && report.base_loss.is_finite()) {
        eprintln!(
            "nbt-train: training diverged (the loss is {}); try a smaller --lr",
            report.new_loss
        );
        return ExitCode::FAILURE;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report always serializes")
        );
    } else {
        print_summary(&report);
    }
    ExitCode::SUCCESS
}

/// Prints an epoch's progress and, under `nbt run`, reports it as a learning update ($NBT_REPORT).
fn print_progress(p: EpochProgress) {
    let update = TaskReport {
        task_name: format!("epoch-{}", p.epoch),
        task_id: None,
        base_loss: p.base_loss,
        new_loss: p.holdout_loss,
        adapter_hash: Some(p.model_hash.clone()),
        base_model_hash: Some(p.base_model_hash.clone()),
    };
    if let Err(e) = report_task(&update) {
        eprintln!(
            "nbt-train: reporting epoch {} to ${REPORT_ENV}: {e}",
            p.epoch
        );
    }
    eprintln!(
        "epoch {}/{}: holdout loss {:.4}, accuracy {:.1}%",
        p.epoch,
        p.epochs,
        p.holdout_loss,
        p.holdout_accuracy * 100.0
    );
}

fn print_summary(r: &TrainReport) {
    eprintln!(
        "holdout loss {:.4} -> {:.4}, accuracy {:.1}% -> {:.1}%",
        r.base_loss,
        r.new_loss,
        r.base_accuracy * 100.0,
        r.new_accuracy * 100.0
    );
    eprintln!(
        "{} samples x {} features ({:.1} MiB), {} epochs in {:.2} s",
        r.samples,
        r.features,
        r.dataset_bytes as f64 / MIB,
        r.epochs,
        r.train_seconds
    );
}
