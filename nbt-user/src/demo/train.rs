//! The demo's training workload: a small MLP learns a synthetic binary classification task.
//!
//! Everything is deterministic given the seed. The dataset is one contiguous `Vec<f32>`
//! whose every page is written during generation, so the memory the job needs grows with
//! `samples * features`: that is what makes a memory cap bite.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

/// Hidden units of the fixed random "teacher" network that labels the data.
const TEACHER_HIDDEN: usize = 16;
/// Scale of the teacher's first layer; above 1 its tanh units saturate, so the boundary is curved.
const TEACHER_GAIN: f32 = 2.0;
/// Fraction of labels flipped at random: the best possible holdout accuracy is 1 - this.
const LABEL_NOISE: f32 = 0.1;
/// Every fifth sample is held out (20%).
const HOLDOUT_DIVISOR: usize = 5;

/// What to generate and how to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub samples: usize,
    pub features: usize,
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            samples: 300_000,
            features: 32,
            hidden: 32,
            epochs: 5,
            batch: 32,
            learning_rate: 0.1,
            seed: 42,
        }
    }
}

impl TrainConfig {
    /// Rejects configurations that cannot run; the message names the flag, the value and what is accepted.
    pub fn validate(&self) -> Result<()> {
        let (n, d, h) = (self.samples, self.features, self.hidden);
        let minimums = [
            ("samples", n, HOLDOUT_DIVISOR), // so that the holdout set is not empty
            ("features", d, 1),
            ("hidden", h, 1),
            ("epochs", self.epochs, 1),
            ("batch", self.batch, 1),
        ];
        for (flag, value, min) in minimums {
            if value < min {
                bail!("invalid --{flag} {value}: must be at least {min}");
            }
        }
        let lr = self.learning_rate;
        if !(lr.is_finite() && lr > 0.0) {
            bail!("invalid --lr {lr}: must be a finite number greater than 0");
        }
        let largest = (n as u128 * (d as u128 + 1))
            .max(h as u128 * d as u128)
            .saturating_mul(4);
        if largest > isize::MAX as u128 {
            bail!("invalid --samples {n}, --features {d}, --hidden {h}: too large to address");
        }
        Ok(())
    }
}

/// Deterministic PRNG: splitmix64, with Box-Muller for normal deviates.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: keeps ln finite
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }
}

/// Samples (row-major, `samples x features`) and their 0/1 labels, stored as f32.
#[derive(Debug)]
pub struct Dataset {
    features: usize,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl Dataset {
    /// Generates `cfg.samples` samples of standard normal features, labelled by a random
    /// 2-layer tanh teacher with `LABEL_NOISE` of the labels flipped.
    pub fn generate(cfg: &TrainConfig) -> Dataset {
        let (n, d) = (cfg.samples, cfg.features);
        let mut rng = Rng(cfg.seed);
        let teacher = Mlp::random(d, TEACHER_HIDDEN, TEACHER_GAIN, 1.0, &mut rng);
        let mut hidden = vec![0.0; TEACHER_HIDDEN];
        let mut x = vec![0.0f32; n * d];
        let mut y = Vec::with_capacity(n);
        for row in x.chunks_exact_mut(d) {
            row.iter_mut().for_each(|v| *v = rng.normal());
            let positive = teacher.logit(row, &mut hidden) > 0.0;
            let flip = rng.uniform() < f64::from(LABEL_NOISE);
            y.push(if positive != flip { 1.0 } else { 0.0 });
        }
        Dataset { features: d, x, y }
    }

    pub fn samples(&self) -> usize {
        self.y.len()
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// Bytes held: features and labels, both f32, i.e. `samples * (features + 1) * 4`.
    pub fn bytes(&self) -> usize {
        (self.x.len() + self.y.len()) * size_of::<f32>()
    }

    /// The wire form of the dataset: samples and features as u64 LE, then every feature and
    /// then every label as f32 LE.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(&(self.samples() as u64).to_le_bytes())?;
        out.write_all(&(self.features as u64).to_le_bytes())?;
        let mut buffer = Vec::with_capacity(64 << 10);
        for value in self.x.iter().chain(&self.y) {
            buffer.extend_from_slice(&value.to_le_bytes());
            if buffer.len() >= 64 << 10 {
                out.write_all(&buffer)?;
                buffer.clear();
            }
        }
        out.write_all(&buffer)
    }

    /// Reads what [`Dataset::write_to`] wrote, checking the shape against `cfg`.
    pub fn read_from(input: &mut impl std::io::Read, cfg: &TrainConfig) -> Result<Dataset> {
        let mut word = [0u8; 8];
        input.read_exact(&mut word)?;
        let samples = u64::from_le_bytes(word) as usize;
        input.read_exact(&mut word)?;
        let features = u64::from_le_bytes(word) as usize;
        anyhow::ensure!(
            samples == cfg.samples && features == cfg.features,
            "the data server sent {samples} x {features}, not the {} x {} asked for",
            cfg.samples,
            cfg.features
        );
        let mut bytes = vec![0u8; samples * (features + 1) * 4];
        input.read_exact(&mut bytes)?;
        let mut values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let x: Vec<f32> = values.by_ref().take(samples * features).collect();
        let y: Vec<f32> = values.collect();
        Ok(Dataset { features, x, y })
    }

    /// The samples from `first` on, as a dataset of their own.
    pub fn rows_from(&self, first: usize) -> Dataset {
        Dataset {
            features: self.features,
            x: self.x[first * self.features..].to_vec(),
            y: self.y[first..].to_vec(),
        }
    }

    /// Asks the server at `addr` for `count` new samples of the dataset of `cfg`: the ones that
    /// follow its first `offset` (request line `samples features seed offset`).
    pub fn fetch_rows(
        addr: &str,
        cfg: &TrainConfig,
        offset: usize,
        count: usize,
    ) -> Result<Dataset> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(addr)
            .map_err(|e| anyhow::anyhow!("connecting to {addr}: {e}"))?;
        writeln!(
            stream,
            "{} {} {} {offset}",
            offset + count,
            cfg.features,
            cfg.seed
        )?;
        let shape = TrainConfig {
            samples: count,
            ..cfg.clone()
        };
        Self::read_from(&mut std::io::BufReader::new(stream), &shape)
    }

    /// Asks the data server at `addr` for the dataset of `cfg` (one request line:
    /// `samples features seed`) and reads it.
    pub fn fetch(addr: &str, cfg: &TrainConfig) -> Result<Dataset> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(addr)
            .map_err(|e| anyhow::anyhow!("connecting to the data server {addr}: {e}"))?;
        writeln!(stream, "{} {} {}", cfg.samples, cfg.features, cfg.seed)?;
        Self::read_from(&mut std::io::BufReader::new(stream), cfg)
    }

    /// Serves datasets on `listener` until it fails: one request line per connection, answered
    /// with the dataset it names (generated, so any size can be asked for).
    ///
    /// `pace_bytes_per_sec` caps the pacing rate of each connection (`SO_MAX_PACING_RATE`).
    pub fn serve(listener: std::net::TcpListener, pace_bytes_per_sec: Option<u64>) {
        for stream in listener.incoming().flatten() {
            if let Some(rate) = pace_bytes_per_sec {
                use std::os::fd::AsRawFd;
                let rate = rate.min(u64::from(u32::MAX - 1)) as u32;
                // SAFETY: setsockopt(2) on an open socket with a u32 it reads.
                unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_MAX_PACING_RATE,
                        (&rate as *const u32).cast(),
                        size_of::<u32>() as libc::socklen_t,
                    );
                }
            }
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                let mut reader = std::io::BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let fields: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect();
                let (samples, features, seed, offset) = match fields[..] {
                    [samples, features, seed] => (samples, features, seed, 0),
                    [samples, features, seed, offset] => (samples, features, seed, offset),
                    _ => return,
                };
                let cfg = TrainConfig {
                    samples: samples as usize,
                    features: features as usize,
                    seed,
                    ..TrainConfig::default()
                };
                if cfg.validate().is_ok() && (offset as usize) < cfg.samples {
                    let mut out = std::io::BufWriter::new(&stream);
                    let _ = Dataset::generate(&cfg)
                        .rows_from(offset as usize)
                        .write_to(&mut out);
                }
            });
        }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    /// The first 80% of the samples train; the rest are held out.
    pub fn train_len(&self) -> usize {
        self.samples() - self.samples() / HOLDOUT_DIVISOR
    }
}

/// Holdout loss and accuracy after one epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochProgress {
    pub epoch: usize,
    pub epochs: usize,
    /// The holdout loss before this epoch's update.
    pub base_loss: f64,
    pub holdout_loss: f64,
    pub holdout_accuracy: f64,
    /// sha256 of the model's parameters before and after this epoch (`sha256:HEX`).
    pub base_model_hash: String,
    pub model_hash: String,
}

/// The outcome of a run. Losses are mean binary cross-entropy on the holdout set,
/// accuracies fractions in [0, 1]; `base_*` is before training, `new_*` after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    pub base_loss: f64,
    pub new_loss: f64,
    pub base_accuracy: f64,
    pub new_accuracy: f64,
    pub epochs: usize,
    pub samples: usize,
    pub features: usize,
    pub dataset_bytes: u64,
    /// Wall time of the epochs (SGD plus per-epoch evaluation), not of data generation.
    pub train_seconds: f64,
}

/// Generates the dataset and trains on it; see [`train_on`].
pub fn train(cfg: &TrainConfig, progress: impl FnMut(EpochProgress)) -> Result<TrainReport> {
    cfg.validate()?;
    train_on(&Dataset::generate(cfg), cfg, progress)
}

/// Trains a fresh `features -> hidden (tanh) -> 1` MLP on `data` by minibatch SGD and
/// evaluates it on the holdout set before training and after each epoch.
pub fn train_on(
    data: &Dataset,
    cfg: &TrainConfig,
    progress: impl FnMut(EpochProgress),
) -> Result<TrainReport> {
    train_with_fresh(data, cfg, progress, |_| None)
}

/// As [`train_on`], and before each epoch `fresh(epoch)` may hand over new samples (from the
/// same teacher), which get one SGD pass of their own in that epoch.
pub fn train_with_fresh(
    data: &Dataset,
    cfg: &TrainConfig,
    mut progress: impl FnMut(EpochProgress),
    mut fresh: impl FnMut(usize) -> Option<Dataset>,
) -> Result<TrainReport> {
    cfg.validate()?;
    if data.samples() != cfg.samples || data.features() != cfg.features {
        bail!("the dataset does not match the configuration's --samples and --features");
    }
    // A stream apart from the data's, so the seed picks the data and the model independently.
    let mut rng = Rng(cfg.seed ^ 0x5EED_0F7E_AC4E_5500);
    // A small output layer starts every prediction near 0.5, so the base loss is about ln 2.
    let mut model = Mlp::random(cfg.features, cfg.hidden, 1.0, 0.1, &mut rng);
    let (base_loss, base_accuracy) = model.evaluate(data);
    let start = Instant::now();
    let mut order: Vec<usize> = (0..data.train_len()).collect();
    let (mut new_loss, mut new_accuracy) = (base_loss, base_accuracy);
    for epoch in 1..=cfg.epochs {
        let (base_loss, base_model_hash) = (new_loss, model.hash());
        if let Some(extra) = fresh(epoch) {
            let mut extra_order: Vec<usize> = (0..extra.samples()).collect();
            shuffle(&mut extra_order, &mut rng);
            model.sgd_epoch(&extra, &extra_order, cfg);
        }
        shuffle(&mut order, &mut rng);
        model.sgd_epoch(data, &order, cfg);
        (new_loss, new_accuracy) = model.evaluate(data);
        progress(EpochProgress {
            epoch,
            epochs: cfg.epochs,
            base_loss,
            holdout_loss: new_loss,
            holdout_accuracy: new_accuracy,
            base_model_hash,
            model_hash: model.hash(),
        });
    }
    Ok(TrainReport {
        base_loss,
        new_loss,
        base_accuracy,
        new_accuracy,
        epochs: cfg.epochs,
        samples: cfg.samples,
        features: cfg.features,
        dataset_bytes: data.bytes() as u64,
        train_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The demo's model seen from outside, for training spread over several processes (the swarm
/// demo's parameter server and workers, `demo::ps`): its parameters as one flat vector (w1, b1,
/// w2, b2), a minibatch's mean gradient in the same layout, an SGD step, the holdout figures.
pub struct Model(Mlp);

impl Model {
    /// The model `train` starts from for `cfg`.
    pub fn new(cfg: &TrainConfig) -> Model {
        let mut rng = Rng(cfg.seed ^ 0x5EED_0F7E_AC4E_5500);
        Model(Mlp::random(cfg.features, cfg.hidden, 1.0, 0.1, &mut rng))
    }

    /// How many numbers the parameters are.
    pub fn len(&self) -> usize {
        self.0.w1.len() + self.0.b1.len() + self.0.w2.len() + 1
    }

    /// Never: a model has at least its output bias.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn params(&self) -> Vec<f32> {
        let m = &self.0;
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&m.w1);
        out.extend_from_slice(&m.b1);
        out.extend_from_slice(&m.w2);
        out.push(m.b2);
        out
    }

    /// Sets the parameters from `params` (as [`Model::params`] gives them); false (and nothing
    /// changed) when its length is not this model's.
    pub fn set_params(&mut self, params: &[f32]) -> bool {
        if params.len() != self.len() {
            return false;
        }
        let m = &mut self.0;
        let (w1, rest) = params.split_at(m.w1.len());
        let (b1, rest) = rest.split_at(m.b1.len());
        let (w2, rest) = rest.split_at(m.w2.len());
        m.w1.copy_from_slice(w1);
        m.b1.copy_from_slice(b1);
        m.w2.copy_from_slice(w2);
        m.b2 = rest[0];
        true
    }

    /// The mean gradient of the loss over the training rows `rows` of `data`.
    pub fn gradient(&self, data: &Dataset, rows: &[usize]) -> Vec<f32> {
        let mut grad = self.0.zeroed_like();
        let mut hidden = vec![0.0; self.0.b1.len()];
        for &i in rows {
            self.0
                .backprop(data.row(i), data.y[i], &mut hidden, &mut grad);
        }
        let scale = 1.0 / rows.len().max(1) as f32;
        let mut out = Model(grad).params();
        out.iter_mut().for_each(|g| *g *= scale);
        out
    }

    /// One SGD step: the parameters minus `learning_rate` times `gradient`; false (and nothing
    /// changed) when its length is not this model's or it is not finite.
    pub fn step(&mut self, gradient: &[f32], learning_rate: f32) -> bool {
        if gradient.len() != self.len() || !gradient.iter().all(|g| g.is_finite()) {
            return false;
        }
        let mut params = self.params();
        params
            .iter_mut()
            .zip(gradient)
            .for_each(|(p, g)| *p -= learning_rate * g);
        self.set_params(&params)
    }

    /// Holdout loss (mean BCE) and accuracy.
    pub fn evaluate(&self, data: &Dataset) -> (f64, f64) {
        self.0.evaluate(data)
    }

    pub fn hash(&self) -> String {
        self.0.hash()
    }
}

fn shuffle(order: &mut [usize], rng: &mut Rng) {
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
}

/// `logit = w2 . tanh(w1 x + b1) + b2`, with `w1` row-major `hidden x features`.
/// Also used, zeroed, to accumulate gradients.
struct Mlp {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: f32,
}

impl Mlp {
    /// sha256 of the parameters (little-endian f32: w1, b1, w2, b2), as `sha256:HEX`.
    fn hash(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        for x in self
            .w1
            .iter()
            .chain(&self.b1)
            .chain(&self.w2)
            .chain([&self.b2])
        {
            hasher.update(x.to_le_bytes());
        }
        format!("sha256:{}", crate::receipt::key::hex(&hasher.finalize()))
    }

    /// Weights normal with variance `gain^2 / fan_in` (`out_gain` for the output layer), biases zero.
    fn random(d: usize, h: usize, gain: f32, out_gain: f32, rng: &mut Rng) -> Mlp {
        let mut draw = |n: usize, fan_in: usize, gain: f32| -> Vec<f32> {
            let scale = gain / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.normal() * scale).collect()
        };
        let w1 = draw(h * d, d, gain);
        let w2 = draw(h, h, out_gain);
        Mlp {
            w1,
            b1: vec![0.0; h],
            w2,
            b2: 0.0,
        }
    }

    fn zeroed_like(&self) -> Mlp {
        Mlp {
            w1: vec![0.0; self.w1.len()],
            b1: vec![0.0; self.b1.len()],
            w2: vec![0.0; self.w2.len()],
            b2: 0.0,
        }
    }

    /// Forward pass; leaves the hidden activations in `hidden`.
    fn logit(&self, x: &[f32], hidden: &mut [f32]) -> f32 {
        let rows = self.w1.chunks_exact(x.len());
        for ((h, w), b) in hidden.iter_mut().zip(rows).zip(&self.b1) {
            *h = (b + dot(w, x)).tanh();
        }
        self.b2 + dot(&self.w2, hidden)
    }

    /// Adds the gradient of the BCE loss on one sample to `grad`.
    fn backprop(&self, x: &[f32], y: f32, hidden: &mut [f32], grad: &mut Mlp) {
        let dz = sigmoid(self.logit(x, hidden)) - y;
        grad.b2 += dz;
        let rows = grad.w1.chunks_exact_mut(x.len());
        let units = hidden
            .iter()
            .zip(&self.w2)
            .zip(&mut grad.w2)
            .zip(&mut grad.b1);
        for ((((&h, &w2), gw2), gb1), gw1) in units.zip(rows) {
            *gw2 += dz * h;
            let dh = dz * w2 * (1.0 - h * h);
            *gb1 += dh;
            for k in 0..x.len() {
                gw1[k] += dh * x[k];
            }
        }
    }

    fn sgd_epoch(&mut self, data: &Dataset, order: &[usize], cfg: &TrainConfig) {
        let mut hidden = vec![0.0; self.b1.len()];
        for batch in order.chunks(cfg.batch) {
            let mut grad = self.zeroed_like();
            for &i in batch {
                self.backprop(data.row(i), data.y[i], &mut hidden, &mut grad);
            }
            self.step(&grad, cfg.learning_rate / batch.len() as f32);
        }
    }

    fn step(&mut self, grad: &Mlp, scale: f32) {
        let axpy =
            |p: &mut [f32], g: &[f32]| p.iter_mut().zip(g).for_each(|(p, g)| *p -= scale * g);
        axpy(&mut self.w1, &grad.w1);
        axpy(&mut self.b1, &grad.b1);
        axpy(&mut self.w2, &grad.w2);
        self.b2 -= scale * grad.b2;
    }

    /// Mean BCE and accuracy on the holdout set.
    fn evaluate(&self, data: &Dataset) -> (f64, f64) {
        let mut hidden = vec![0.0; self.b1.len()];
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let holdout = data.train_len()..data.samples();
        let n = holdout.len();
        for i in holdout {
            let z = self.logit(data.row(i), &mut hidden);
            let y = data.y[i];
            loss += f64::from(bce(z, y));
            correct += usize::from((z > 0.0) == (y > 0.5));
        }
        (loss / n as f64, correct as f64 / n as f64)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0.0;
    for k in 0..a.len() {
        sum += a[k] * b[k];
    }
    sum
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Binary cross-entropy of a logit, in the form that neither overflows nor takes ln(0).
fn bce(z: f32, y: f32) -> f32 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fresh_rows_continue_the_same_dataset() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || Dataset::serve(listener, None));
        let cfg = TrainConfig {
            samples: 100,
            features: 5,
            seed: 3,
            ..TrainConfig::default()
        };
        let fresh = Dataset::fetch_rows(&addr, &cfg, 100, 20).unwrap();
        let longer = Dataset::generate(&TrainConfig {
            samples: 120,
            ..cfg.clone()
        });
        assert_eq!(fresh.x, longer.rows_from(100).x);
        assert_eq!(fresh.y, longer.rows_from(100).y);
    }

    #[test]
    fn a_dataset_fetched_from_the_server_is_the_generated_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || Dataset::serve(listener, None));
        let cfg = TrainConfig {
            samples: 300,
            features: 7,
            seed: 9,
            ..TrainConfig::default()
        };
        let fetched = Dataset::fetch(&addr, &cfg).unwrap();
        let generated = Dataset::generate(&cfg);
        assert_eq!(fetched.x, generated.x);
        assert_eq!(fetched.y, generated.y);
        let other = TrainConfig {
            samples: 301,
            ..cfg.clone()
        };
        let err = Dataset::read_from(
            &mut &{
                let mut bytes = Vec::new();
                generated.write_to(&mut bytes).unwrap();
                bytes
            }[..],
            &other,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not the 301 x 7 asked for"),
            "{err}"
        );
    }

    use super::*;

    fn small(seed: u64) -> TrainConfig {
        TrainConfig {
            samples: 4000,
            seed,
            ..TrainConfig::default()
        }
    }

    fn run(cfg: &TrainConfig) -> TrainReport {
        train(cfg, |_| {}).unwrap()
    }

    #[test]
    fn the_loss_drops_and_accuracy_rises() {
        let mut epochs = Vec::new();
        let report = train(&small(1), |p| epochs.push(p)).unwrap();
        assert!((report.base_loss - 0.69).abs() < 0.1, "{report:?}");
        assert!(report.new_loss < report.base_loss - 0.1, "{report:?}");
        assert!(report.new_accuracy > 0.7, "{report:?}");
        assert_eq!(epochs.len(), report.epochs);
        assert_eq!(epochs.last().unwrap().holdout_loss, report.new_loss);
    }

    #[test]
    fn the_same_seed_gives_the_same_report() {
        let (mut a, mut b) = (run(&small(7)), run(&small(7)));
        a.train_seconds = 0.0; // the one field that is wall time
        b.train_seconds = 0.0;
        assert_eq!(a, b);
        assert_eq!(a.new_loss.to_bits(), b.new_loss.to_bits());
    }

    #[test]
    fn different_seeds_give_different_data() {
        let (a, b) = (Dataset::generate(&small(1)), Dataset::generate(&small(2)));
        assert_ne!(a.x, b.x);
        assert_ne!(a.y, b.y);
    }

    #[test]
    fn labels_are_roughly_balanced() {
        let data = Dataset::generate(&small(3));
        let positive = data.y.iter().sum::<f32>() / data.samples() as f32;
        assert!((0.4..0.6).contains(&positive), "{positive}");
    }

    #[test]
    fn bytes_counts_features_and_labels() {
        let cfg = TrainConfig {
            samples: 1000,
            features: 8,
            ..small(1)
        };
        assert_eq!(Dataset::generate(&cfg).bytes(), 1000 * (8 + 1) * 4);
    }

    type Spoil = fn(&mut TrainConfig);

    #[test]
    fn validate_rejects_zeros_and_bad_rates() {
        assert!(TrainConfig::default().validate().is_ok());
        let cases: [(Spoil, &str); 9] = [
            (|c| c.samples = 0, "--samples 0"),
            (|c| c.samples = 4, "--samples 4: must be at least 5"),
            (|c| c.features = 0, "--features 0"),
            (|c| c.hidden = 0, "--hidden 0"),
            (|c| c.epochs = 0, "--epochs 0"),
            (|c| c.batch = 0, "--batch 0"),
            (|c| c.learning_rate = 0.0, "--lr 0"),
            (|c| c.learning_rate = f32::NAN, "--lr NaN"),
            (|c| c.features = usize::MAX, "too large"),
        ];
        for (spoil, needle) in cases {
            let mut cfg = small(1);
            spoil(&mut cfg);
            let message = cfg.validate().unwrap_err().to_string();
            assert!(message.contains(needle), "{message}");
        }
    }
}
