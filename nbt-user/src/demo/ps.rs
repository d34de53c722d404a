//! The swarm demo's training (`nbt demo --swarm`, docs/swarm.md): the demo's model trained by a
//! parameter server and workers over TCP, asynchronous SGD.
//!
//! Why a parameter server rather than gossip averaging: the model lives in one place, so "the
//! holdout loss of the model" is one number measured at one time, and the time to reach a target
//! loss is read off one clock; a worker lost (killed, cut off) only removes its gradients, and
//! the rest go on without any membership protocol. The server is the swarm's single point of
//! failure, and the demo's failures spare it; gossip would survive losing any node, at the cost
//! of a consensus on "the" model and its loss.
//!
//! The protocol, one request per connection (so a worker that was frozen, cut off or killed
//! leaves nothing half-open that matters), little-endian:
//! - `G`: the server answers a status byte (`o` go on, `d` done) and the parameters (u32 count,
//!   then f32s);
//! - `U`, u16 name length, the worker's name, u32 count, the gradient's f32s: the server takes
//!   one SGD step with it and answers a status byte.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::train::{Dataset, Model, TrainConfig};

/// The most numbers a message may carry (a model of the demo's size has about 1,100).
const MAX_PARAMS: usize = 1 << 20;
/// How long one request may take before the other side gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// What the parameter server saw.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    pub role: &'static str,
    /// The holdout loss of the starting model, and the target.
    pub base_loss: f64,
    pub target_loss: f64,
    /// Seconds from the server's start to the first evaluation at or below the target.
    pub time_to_target_s: Option<f64>,
    pub final_loss: f64,
    pub final_accuracy: f64,
    pub seconds: f64,
    pub updates: u64,
    pub updates_by_worker: BTreeMap<String, u64>,
    /// (seconds, holdout loss), one per evaluation.
    pub curve: Vec<(f64, f64)>,
    pub model_hash: String,
}

struct Shared {
    model: Model,
    learning_rate: f32,
    done: bool,
    updates: u64,
    by_worker: BTreeMap<String, u64>,
}

fn read_u32(stream: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_floats(stream: &mut impl Read) -> std::io::Result<Vec<f32>> {
    let n = read_u32(stream)? as usize;
    if n > MAX_PARAMS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{n} numbers: at most {MAX_PARAMS}"),
        ));
    }
    let mut bytes = vec![0u8; n * 4];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn floats_message(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + values.len() * 4);
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn status(done: bool) -> u8 {
    if done {
        b'd'
    } else {
        b'o'
    }
}

/// One request of a worker.
fn handle(mut stream: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut op = [0u8; 1];
    stream.read_exact(&mut op)?;
    match op[0] {
        b'G' => {
            let (done, params) = {
                let s = shared.lock().unwrap_or_else(|p| p.into_inner());
                (s.done, s.model.params())
            };
            let mut reply = vec![status(done)];
            reply.extend(floats_message(&params));
            stream.write_all(&reply)
        }
        b'U' => {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut name = vec![0u8; usize::from(u16::from_le_bytes(len)).min(64)];
            stream.read_exact(&mut name)?;
            let gradient = read_floats(&mut stream)?;
            let done = {
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                let lr = s.learning_rate;
                if !s.done && s.model.step(&gradient, lr) {
                    s.updates += 1;
                    *s.by_worker
                        .entry(String::from_utf8_lossy(&name).into_owned())
                        .or_default() += 1;
                }
                s.done
            };
            stream.write_all(&[status(done)])
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unknown request",
        )),
    }
}

/// Serves the model on `listen` until its holdout loss reaches `target_loss` (then for one more
/// second, so that the workers hear it is done) or `max_seconds` pass; evaluates it every
/// `eval_every`.
pub fn serve(
    cfg: &TrainConfig,
    listen: &str,
    target_loss: f64,
    max_seconds: f64,
    eval_every: Duration,
) -> Result<ServerReport> {
    let data = Dataset::generate(cfg);
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    listener.set_nonblocking(true)?;
    let model = Model::new(cfg);
    let (base_loss, _) = model.evaluate(&data);
    let shared = Arc::new(Mutex::new(Shared {
        model,
        learning_rate: cfg.learning_rate,
        done: false,
        updates: 0,
        by_worker: BTreeMap::new(),
    }));
    let start = Instant::now();
    let mut eval = Model::new(cfg);
    let mut next_eval = start;
    let mut curve = Vec::new();
    let mut time_to_target = None;
    let mut ends_at: Option<Instant> = None;
    let (mut loss, mut accuracy) = (base_loss, 0.0);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = handle(stream, &shared);
                });
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => bail!("accepting a worker: {e}"),
        }
        let now = Instant::now();
        if now >= next_eval {
            next_eval = now + eval_every;
            let params = shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .model
                .params();
            eval.set_params(&params);
            (loss, accuracy) = eval.evaluate(&data);
            let t = start.elapsed().as_secs_f64();
            curve.push((t, loss));
            let updates = shared.lock().unwrap_or_else(|p| p.into_inner()).updates;
            eprintln!(
                "ps: {t:.2} s: holdout loss {loss:.4}, accuracy {:.1}%, {updates} updates",
                accuracy * 100.0
            );
            if loss <= target_loss && time_to_target.is_none() {
                time_to_target = Some(t);
            }
            if ends_at.is_none() && (time_to_target.is_some() || t >= max_seconds) {
                shared.lock().unwrap_or_else(|p| p.into_inner()).done = true;
                ends_at = Some(now + Duration::from_secs(1));
            }
        }
        if ends_at.is_some_and(|end| now >= end) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = shared.lock().unwrap_or_else(|p| p.into_inner());
    Ok(ServerReport {
        role: "ps",
        base_loss,
        target_loss,
        time_to_target_s: time_to_target,
        final_loss: loss,
        final_accuracy: accuracy,
        seconds: start.elapsed().as_secs_f64(),
        updates: s.updates,
        updates_by_worker: s.by_worker.clone(),
        curve,
        model_hash: s.model.hash(),
    })
}

/// What a worker did.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub role: &'static str,
    pub name: String,
    pub steps: u64,
    /// Requests that failed (the server unreachable, a timeout): the worker retried.
    pub failed_requests: u64,
    /// Whether the server said it was done (else the worker's time ran out).
    pub told_done: bool,
}

fn connect(addr: &SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Trains against the server at `server`: asks for the parameters, computes the gradient of the
/// next minibatch of the training rows (starting `shard` of `shards` of the way in), sends it;
/// until the server says it is done or `max_seconds` pass.
pub fn work(
    cfg: &TrainConfig,
    server: &str,
    name: &str,
    (shard, shards): (usize, usize),
    max_seconds: f64,
) -> Result<WorkerReport> {
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("the server's address {server}"))?
        .next()
        .with_context(|| format!("no address for {server}"))?;
    let data = Dataset::generate(cfg);
    // Every worker holds the whole training set and walks it from its own place (`shard` of
    // `shards` of the way in): a worker lost costs the server gradients, not data. (Disjoint
    // shards were tried: the one worker left overfit its third of the data, and the holdout
    // loss rose.)
    let rows: Vec<usize> = (0..data.train_len()).collect();
    if rows.is_empty() {
        bail!("no training rows");
    }
    let mut model = Model::new(cfg);
    let mut report = WorkerReport {
        role: "worker",
        name: name.to_string(),
        steps: 0,
        failed_requests: 0,
        told_done: false,
    };
    let mut next = shard * rows.len() / shards.max(1);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < max_seconds {
        let step = || -> std::io::Result<bool> {
            let mut s = connect(&addr)?;
            s.write_all(b"G")?;
            let mut st = [0u8; 1];
            s.read_exact(&mut st)?;
            if st[0] == b'd' {
                return Ok(true);
            }
            let params = read_floats(&mut s)?;
            if !model.set_params(&params) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the server's model is not this worker's",
                ));
            }
            Ok(false)
        }();
        match step {
            Ok(true) => {
                report.told_done = true;
                break;
            }
            Ok(false) => {}
            Err(_) => {
                report.failed_requests += 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let batch: Vec<usize> = (0..cfg.batch)
            .map(|k| rows[(next + k) % rows.len()])
            .collect();
        next = (next + cfg.batch) % rows.len();
        let gradient = model.gradient(&data, &batch);
        let sent = || -> std::io::Result<bool> {
            let mut s = connect(&addr)?;
            let mut msg = vec![b'U'];
            msg.extend_from_slice(&(name.len() as u16).to_le_bytes());
            msg.extend_from_slice(name.as_bytes());
            msg.extend(floats_message(&gradient));
            s.write_all(&msg)?;
            let mut st = [0u8; 1];
            s.read_exact(&mut st)?;
            Ok(st[0] == b'd')
        }();
        match sent {
            Ok(done) => {
                report.steps += 1;
                if done {
                    report.told_done = true;
                    break;
                }
            }
            Err(_) => {
                report.failed_requests += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(report)
}
