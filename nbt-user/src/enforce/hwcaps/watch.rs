//! What the hardware did during a run: CPU temperature (hwmon), and per GPU its temperature,
//! power, clocks and utilisation (NVML), sampled every [`WATCH_INTERVAL`] and summarised as
//! min/avg/max; and the run's GPU memory, watched against `--gpu-memory`.
//!
//! NVML cannot cap a process's VRAM. `--gpu-memory` therefore does three honest things: it sets
//! the limits the CUDA stack honours for itself ([`gpu_memory_env`]), it watches the memory the
//! run's processes hold on each GPU (NVML's per-process figures), and it stops the run when
//! they hold more than the cap, saying so. A sensor that is absent is named in one line, never
//! guessed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::Serialize;

use super::cpu;

pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Min, average and max of one sampled figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Series {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub samples: u64,
}

impl Series {
    fn add(&mut self, x: f64) {
        if self.samples == 0 {
            (self.min, self.max, self.avg) = (x, x, x);
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
            self.avg += (x - self.avg) / (self.samples + 1) as f64;
        }
        self.samples += 1;
    }

    fn add_some(series: &mut Option<Series>, x: Option<f64>) {
        if let Some(x) = x {
            series.get_or_insert_with(Series::default).add(x);
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSeries {
    pub index: u32,
    pub temperature_c: Option<Series>,
    pub power_w: Option<Series>,
    pub graphics_clock_mhz: Option<Series>,
    pub memory_clock_mhz: Option<Series>,
    pub utilization_pct: Option<Series>,
    /// The most GPU memory the run's processes held on this GPU at one sample.
    pub run_memory_peak_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuMemoryReport {
    pub cap_bytes: u64,
    /// The variables set for the workload, `NAME=value`.
    pub env: Vec<String>,
    /// Set when the run's processes held more than the cap and nbt stopped them (the first time).
    pub exceeded: Option<String>,
}

/// The run's sensor figures, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SensorReport {
    pub cpu_temperature_c: Option<Series>,
    /// Why there is no CPU temperature.
    pub cpu_temperature_absent: Option<String>,
    pub gpus: Vec<GpuSeries>,
    /// Why there are no GPU figures.
    pub gpu_absent: Option<String>,
    pub gpu_memory: Option<GpuMemoryReport>,
}

pub struct Watch {
    root: PathBuf,
    nvml: Option<Nvml>,
    next: Instant,
    /// The run's GPU memory was over the cap at the last sample.
    over: bool,
    report: SensorReport,
    latest: Latest,
}

/// The last reading of each sensor, for the run's time series. `None`: no such sensor, or no
/// reading yet. The GPU figures are over the GPUs the run watches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latest {
    pub cpu_temperature_c: Option<f64>,
    /// Summed.
    pub gpu_power_w: Option<f64>,
    /// The hottest.
    pub gpu_temperature_c: Option<f64>,
    /// The slowest.
    pub gpu_graphics_clock_mhz: Option<f64>,
    /// The mean, in percent.
    pub gpu_utilization_pct: Option<f64>,
}

/// Folds `x` into `into` with `f` (the first reading is taken as it is).
fn fold(into: &mut Option<f64>, x: Option<f64>, f: fn(f64, f64) -> f64) {
    if let Some(x) = x {
        *into = Some(into.map_or(x, |y| f(y, x)));
    }
}

impl Watch {
    /// Opens what there is to watch. `gpus`: the GPUs the run's caps name (`None`: all).
    pub fn start(root: &Path, gpus: Option<&[u32]>, memory: Option<GpuMemoryReport>) -> Watch {
        let mut report = SensorReport {
            gpu_memory: memory,
            ..SensorReport::default()
        };
        if cpu::temperature_c(root).is_none() {
            report.cpu_temperature_absent = Some(format!(
                "no coretemp, k10temp or zenpower sensor under {}",
                root.join("class/hwmon").display()
            ));
        }
        let nvml = match super::gpu::init() {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                report.gpus = (0..count)
                    .filter(|i| gpus.is_none_or(|chosen| chosen.contains(i)))
                    .map(|index| GpuSeries {
                        index,
                        ..GpuSeries::default()
                    })
                    .collect();
                if report.gpus.is_empty() {
                    report.gpu_absent = Some("NVML sees no GPU".into());
                }
                Some(nvml)
            }
            Err(why) => {
                report.gpu_absent = Some(why);
                None
            }
        };
        Watch {
            root: root.to_path_buf(),
            nvml,
            next: Instant::now(),
            over: false,
            report,
            latest: Latest::default(),
        }
    }

    /// Samples when the interval is due. `pids`: the run's processes now. Returns why the run
    /// must stop when its GPU memory is over the cap (once).
    /// When [`Watch::tick`] next has a sensor to read; `None` when there is none to watch.
    pub fn next_due(&self) -> Option<Instant> {
        (self.report.cpu_temperature_absent.is_none() || self.nvml.is_some()).then_some(self.next)
    }

    pub fn tick(&mut self, pids: impl FnOnce() -> Vec<u32>) -> Option<String> {
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + WATCH_INTERVAL;
        if self.report.cpu_temperature_absent.is_none() {
            let celsius = cpu::temperature_c(&self.root);
            Series::add_some(&mut self.report.cpu_temperature_c, celsius);
            self.latest.cpu_temperature_c = celsius;
        }
        let nvml = self.nvml.as_ref()?;
        let pids = pids();
        let cap = self.report.gpu_memory.as_ref().map(|m| m.cap_bytes);
        let mut over = None;
        let mut latest = Latest {
            cpu_temperature_c: self.latest.cpu_temperature_c,
            ..Latest::default()
        };
        let mut utilization = Vec::new();
        for gpu in &mut self.report.gpus {
            let Ok(device) = nvml.device_by_index(gpu.index) else {
                continue;
            };
            let number = |x: Result<u32, _>| x.ok().map(f64::from);
            let celsius = number(device.temperature(TemperatureSensor::Gpu));
            let watts = number(device.power_usage()).map(|mw| mw / 1000.0);
            let clock = number(device.clock_info(Clock::Graphics));
            let busy = device.utilization_rates().ok().map(|u| f64::from(u.gpu));
            Series::add_some(&mut gpu.temperature_c, celsius);
            Series::add_some(&mut gpu.power_w, watts);
            Series::add_some(&mut gpu.graphics_clock_mhz, clock);
            Series::add_some(
                &mut gpu.memory_clock_mhz,
                number(device.clock_info(Clock::Memory)),
            );
            Series::add_some(&mut gpu.utilization_pct, busy);
            fold(&mut latest.gpu_temperature_c, celsius, f64::max);
            fold(&mut latest.gpu_power_w, watts, |a, b| a + b);
            fold(&mut latest.gpu_graphics_clock_mhz, clock, f64::min);
            utilization.extend(busy);
            let mut processes = device.running_compute_processes().unwrap_or_default();
            processes.extend(device.running_graphics_processes().unwrap_or_default());
            // A process that computes and draws appears in both lists: count it once.
            processes.sort_by_key(|p| p.pid);
            processes.dedup_by_key(|p| p.pid);
            let held: u64 = processes
                .iter()
                .filter(|p| pids.contains(&p.pid))
                .map(|p| match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes,
                    UsedGpuMemory::Unavailable => 0,
                })
                .sum();
            gpu.run_memory_peak_bytes = gpu.run_memory_peak_bytes.max(held);
            if let Some(cap) = cap.filter(|cap| held > *cap) {
                over.get_or_insert(format!(
                    "the run's processes held {} on GPU {}, over --gpu-memory {}",
                    crate::units::format_size(held),
                    gpu.index,
                    crate::units::format_size(cap)
                ));
            }
        }
        if !utilization.is_empty() {
            latest.gpu_utilization_pct =
                Some(utilization.iter().sum::<f64>() / utilization.len() as f64);
        }
        self.latest = latest;
        let memory = self.report.gpu_memory.as_mut()?;
        // Once per crossing: the processes it kills hold their memory until they are reaped.
        let rising = over.is_some() && !self.over;
        self.over = over.is_some();
        if !rising {
            return None;
        }
        memory
            .exceeded
            .get_or_insert_with(|| over.clone().unwrap_or_default());
        over
    }

    /// The last reading of each sensor.
    pub fn latest(&self) -> Latest {
        self.latest
    }

    pub fn finish(self) -> SensorReport {
        self.report
    }
}

/// The environment that makes the CUDA stack itself keep each process of the run under `cap`
/// bytes per GPU, as far as it can, given each chosen GPU's total memory:
/// - `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`: the driver enforces it for MPS clients (Volta and newer)
///   when an MPS control daemon runs; without MPS it has no effect;
/// - `PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F`: PyTorch's caching allocator refuses
///   allocations over F of the GPU (PyTorch releases that predate the key stop at their first
///   CUDA allocation with "Unrecognized CachingAllocator option"); left alone when the caller
///   set `PYTORCH_CUDA_ALLOC_CONF` (even empty);
/// - `XLA_PYTHON_CLIENT_MEM_FRACTION=F`: JAX preallocates and stays within F;
/// - `NBT_GPU_MEMORY_BYTES`, `NBT_GPU_MEMORY_FRACTION`: for the workload's own code (e.g.
///   `torch.cuda.set_per_process_memory_fraction`).
///
/// F is the cap over the smallest chosen GPU's memory, rounded down to 1/1000.
pub fn gpu_memory_env(
    cap: u64,
    totals: &[(u32, u64)],
    caller_has_torch_conf: bool,
) -> Vec<(&'static str, String)> {
    let smallest = totals.iter().map(|t| t.1).min().unwrap_or(cap).max(1);
    let fraction = ((cap as f64 / smallest as f64).min(1.0) * 1000.0).floor() / 1000.0;
    let megabytes = (cap >> 20).max(1);
    let mut env = vec![
        (
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
            totals
                .iter()
                .map(|(index, _)| format!("{index}={megabytes}M"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("XLA_PYTHON_CLIENT_MEM_FRACTION", format!("{fraction:.3}")),
        ("NBT_GPU_MEMORY_BYTES", cap.to_string()),
        ("NBT_GPU_MEMORY_FRACTION", format!("{fraction:.3}")),
    ];
    if !caller_has_torch_conf {
        env.push((
            "PYTORCH_CUDA_ALLOC_CONF",
            format!("per_process_memory_fraction:{fraction:.3}"),
        ));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keep_min_avg_max() {
        let mut s = Series::default();
        for x in [50.0, 70.0, 60.0] {
            s.add(x);
        }
        assert_eq!((s.min, s.max, s.samples), (50.0, 70.0, 3));
        assert!((s.avg - 60.0).abs() < 1e-9);
    }

    #[test]
    fn memory_env_uses_the_smallest_gpu_and_leaves_a_callers_torch_setting() {
        let env = gpu_memory_env(8 << 30, &[(0, 80 << 30), (1, 40 << 30)], false);
        let get = |k: &str| env.iter().find(|e| e.0 == k).map(|e| e.1.clone());
        assert_eq!(
            get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT").unwrap(),
            "0=8192M,1=8192M"
        );
        assert_eq!(get("NBT_GPU_MEMORY_FRACTION").unwrap(), "0.200");
        assert_eq!(
            get("PYTORCH_CUDA_ALLOC_CONF").unwrap(),
            "per_process_memory_fraction:0.200"
        );
        let env = gpu_memory_env(8 << 30, &[(0, 80 << 30)], true);
        assert!(!env.iter().any(|e| e.0 == "PYTORCH_CUDA_ALLOC_CONF"));
    }
}
