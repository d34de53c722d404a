//! The `nvml` energy source: per GPU, the total-energy counter (mJ, Volta and newer) where the
//! GPU has it, else its power integrated over the interval; and each process's SM utilisation
//! over the interval, by which the agent splits the GPU's energy. Where there is no NVIDIA driver
//! the meter does not open and says why in one line.

use std::time::Instant;

use nvml_wrapper::Nvml;

/// One GPU over one interval.
#[derive(Debug, Clone)]
pub struct GpuInterval {
    pub index: u32,
    pub joules: f64,
    pub watts: f64,
    /// "energy counter" or "integrated power".
    pub method: &'static str,
    /// (pid, SM utilisation %) of the processes that used the GPU in the interval.
    pub processes: Vec<(u32, u32)>,
}

pub struct GpuMeter {
    nvml: Nvml,
    /// Per GPU: the energy counter at the last sample (mJ), if it has one.
    counters: Vec<Option<u64>>,
    /// NVML's timestamp (µs) of the newest utilisation sample seen, per GPU.
    seen_until: Vec<u64>,
    last: Instant,
}

impl GpuMeter {
    pub fn open() -> Result<GpuMeter, String> {
        let nvml = crate::enforce::hwcaps::gpu::init()?;
        let count = nvml.device_count().map_err(|e| e.to_string())?;
        if count == 0 {
            return Err("NVML sees no GPU".into());
        }
        let counters = (0..count)
            .map(|i| {
                nvml.device_by_index(i)
                    .ok()
                    .and_then(|d| d.total_energy_consumption().ok())
            })
            .collect();
        Ok(GpuMeter {
            nvml,
            counters,
            seen_until: vec![0; count as usize],
            last: Instant::now(),
        })
    }

    pub fn gpus(&self) -> usize {
        self.counters.len()
    }

    /// What each GPU spent since the previous call.
    pub fn sample(&mut self) -> Vec<GpuInterval> {
        let dt = self.last.elapsed().as_secs_f64().max(1e-3);
        self.last = Instant::now();
        let mut out = Vec::new();
        for index in 0..self.counters.len() as u32 {
            let Ok(device) = self.nvml.device_by_index(index) else {
                continue;
            };
            let slot = index as usize;
            let watts = device
                .power_usage()
                .map_or(0.0, |mw| f64::from(mw) / 1000.0);
            let (joules, method) = match (self.counters[slot], device.total_energy_consumption()) {
                (Some(before), Ok(now)) => {
                    self.counters[slot] = Some(now);
                    (now.saturating_sub(before) as f64 / 1000.0, "energy counter")
                }
                _ => (watts * dt, "integrated power"),
            };
            let samples = device
                .process_utilization_stats(self.seen_until[slot])
                .unwrap_or_default();
            if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
                self.seen_until[slot] = newest;
            }
            let mut processes: Vec<(u32, u32)> = Vec::new();
            for s in samples {
                match processes.iter_mut().find(|(pid, _)| *pid == s.pid) {
                    Some((_, util)) => *util += s.sm_util,
                    None => processes.push((s.pid, s.sm_util)),
                }
            }
            out.push(GpuInterval {
                index,
                joules,
                watts,
                method,
                processes,
            });
        }
        out
    }
}
