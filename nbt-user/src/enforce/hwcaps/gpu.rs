//! GPU caps through NVML (nvml-wrapper; the library is loaded at run time): a power limit and
//! locked graphics and memory clocks, on the GPUs chosen by `--gpus`. Ranges come from NVML
//! (power limit constraints, supported clocks) and are checked before anything is changed.
//! `--gpu-memory` changes no GPU setting: see `watch`.

use anyhow::{Context as _, Result};
use nvml_wrapper::enums::device::GpuLockedClocksSetting;
use nvml_wrapper::Nvml;

use super::{Asked, Change, Original};
use crate::error::PlanError;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuRequest {
    pub power_limit_w: Option<Asked<f64>>,
    pub clock_mhz: Option<Asked<u32>>,
    pub mem_clock_mhz: Option<Asked<u32>>,
    /// Bytes per GPU the run's processes may hold (watched, not a GPU setting).
    pub memory_bytes: Option<Asked<u64>>,
    /// `None`: all GPUs.
    pub gpus: Option<Asked<Vec<u32>>>,
}

impl GpuRequest {
    /// True when no GPU setting is to change (`--gpu-memory` changes none).
    pub fn is_empty(&self) -> bool {
        self.power_limit_w.is_none() && self.clock_mhz.is_none() && self.mem_clock_mhz.is_none()
    }

    /// Every setting asked for, as (name, text), in the order refusals name them.
    pub fn asked(&self) -> Vec<(String, String)> {
        let named = |name: &String, text: &String| (name.clone(), text.clone());
        [
            self.power_limit_w.as_ref().map(|a| named(&a.name, &a.text)),
            self.clock_mhz.as_ref().map(|a| named(&a.name, &a.text)),
            self.mem_clock_mhz.as_ref().map(|a| named(&a.name, &a.text)),
            self.memory_bytes.as_ref().map(|a| named(&a.name, &a.text)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The first setting asked for, to name in a refusal.
    fn first(&self) -> Option<(String, String)> {
        self.asked().into_iter().next()
    }

    pub fn check(&self) -> Result<(), PlanError> {
        let Some((name, text)) = self.first() else {
            if let Some(gpus) = &self.gpus {
                return Err(PlanError(format!(
                    "{} {} chooses the GPUs of --gpu-power-limit, --gpu-clock, --gpu-mem-clock or --gpu-memory; none was given",
                    gpus.name, gpus.text
                )));
            }
            return Ok(());
        };
        let cannot = |why: String| PlanError(format!("cannot enforce {name} {text}: {why}"));
        let nvml = init().map_err(cannot)?;
        for index in self.indices(&nvml).map_err(cannot)? {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| cannot(format!("GPU {index}: {e}")))?;
            if let Some(power) = &self.power_limit_w {
                let range = device
                    .power_management_limit_constraints()
                    .map_err(|e| power.cannot(format!("GPU {index}: {e}")))?;
                let mw = (power.value * 1000.0).round() as u32;
                if mw < range.min_limit || mw > range.max_limit {
                    return Err(power.invalid(format!(
                        "GPU {index} allows {} W to {} W",
                        range.min_limit / 1000,
                        range.max_limit / 1000
                    )));
                }
            }
            let memory_clocks = device.supported_memory_clocks().unwrap_or_default();
            if let Some(clock) = &self.clock_mhz {
                let top_memory = memory_clocks.iter().copied().max().unwrap_or(0);
                let graphics = device
                    .supported_graphics_clocks(top_memory)
                    .map_err(|e| clock.cannot(format!("GPU {index}: {e}")))?;
                in_range(clock, index, &graphics)?;
            }
            if let Some(clock) = &self.mem_clock_mhz {
                in_range(clock, index, &memory_clocks)?;
            }
        }
        self.memory_totals()?;
        Ok(())
    }

    /// Each chosen GPU's total memory, when `--gpu-memory` is asked for; refuses a cap of
    /// nothing or of more than a GPU has.
    pub fn memory_totals(&self) -> Result<Vec<(u32, u64)>, PlanError> {
        let Some(memory) = &self.memory_bytes else {
            return Ok(Vec::new());
        };
        let nvml = init().map_err(|why| memory.cannot(why))?;
        let mut totals = Vec::new();
        for index in self.indices(&nvml).map_err(|why| memory.cannot(why))? {
            let total = nvml
                .device_by_index(index)
                .and_then(|d| d.memory_info())
                .map_err(|e| memory.cannot(format!("GPU {index}: {e}")))?
                .total;
            if memory.value == 0 || memory.value > total {
                return Err(memory.invalid(format!(
                    "GPU {index} has {}; accepted: more than 0, at most that",
                    crate::units::format_size(total)
                )));
            }
            totals.push((index, total));
        }
        Ok(totals)
    }

    /// The GPUs chosen by `--gpus`, as asked (`None`: all).
    pub fn chosen(&self) -> Option<&[u32]> {
        self.gpus.as_ref().map(|g| &g.value[..])
    }

    fn indices(&self, nvml: &Nvml) -> Result<Vec<u32>, String> {
        let count = nvml.device_count().map_err(|e| e.to_string())?;
        if count == 0 {
            return Err("NVML sees no GPU".into());
        }
        match &self.gpus {
            None => Ok((0..count).collect()),
            Some(gpus) => {
                if let Some(bad) = gpus.value.iter().find(|i| **i >= count) {
                    return Err(format!("there is no GPU {bad} (this machine has {count})"));
                }
                Ok(gpus.value.clone())
            }
        }
    }
}

fn in_range(clock: &Asked<u32>, index: u32, supported: &[u32]) -> Result<(), PlanError> {
    let (Some(min), Some(max)) = (supported.iter().min(), supported.iter().max()) else {
        return Err(clock.cannot(format!("GPU {index} reports no supported clocks")));
    };
    if clock.value < *min || clock.value > *max {
        return Err(clock.invalid(format!("GPU {index} allows {min} MHz to {max} MHz")));
    }
    Ok(())
}

/// NVML, or one line saying why not.
pub fn init() -> Result<Nvml, String> {
    Nvml::init()
        .or_else(|_| {
            Nvml::builder()
                .lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1"))
                .init()
        })
        .map_err(|e| {
            format!("no NVIDIA driver on this machine (libnvidia-ml.so.1 cannot be loaded: {e})")
        })
}

/// The changes for the request: the originals read now, the caps applied later.
pub fn changes(request: &GpuRequest) -> Result<Vec<Change>> {
    if request.is_empty() {
        return Ok(Vec::new());
    }
    let nvml = init().map_err(anyhow::Error::msg)?;
    let mut changes = Vec::new();
    for index in request.indices(&nvml).map_err(anyhow::Error::msg)? {
        let device = nvml.device_by_index(index)?;
        if let Some(power) = &request.power_limit_w {
            let milliwatts = device
                .power_management_limit()
                .with_context(|| format!("reading GPU {index}'s power limit"))?;
            let mw = (power.value * 1000.0).round() as u32;
            changes.push(Change {
                original: Original::GpuPowerLimit { index, milliwatts },
                apply: Box::new(move || with_device(index, |d| d.set_power_management_limit(mw))),
                set: format!("GPU {index} power limit {} W", power.value),
            });
        }
        if let Some(clock) = &request.clock_mhz {
            let mhz = clock.value;
            changes.push(Change {
                original: Original::GpuLockedClocks { index },
                apply: Box::new(move || {
                    with_device(index, |d| {
                        d.set_gpu_locked_clocks(GpuLockedClocksSetting::Numeric {
                            min_clock_mhz: mhz,
                            max_clock_mhz: mhz,
                        })
                    })
                }),
                set: format!("GPU {index} graphics clock locked at {mhz} MHz"),
            });
        }
        if let Some(clock) = &request.mem_clock_mhz {
            let mhz = clock.value;
            changes.push(Change {
                original: Original::GpuMemLockedClocks { index },
                apply: Box::new(move || with_device(index, |d| d.set_mem_locked_clocks(mhz, mhz))),
                set: format!("GPU {index} memory clock locked at {mhz} MHz"),
            });
        }
    }
    Ok(changes)
}

fn with_device(
    index: u32,
    f: impl FnOnce(&mut nvml_wrapper::Device) -> Result<(), nvml_wrapper::error::NvmlError>,
) -> Result<()> {
    let nvml = init().map_err(anyhow::Error::msg)?;
    let mut device = nvml.device_by_index(index)?;
    f(&mut device).with_context(|| format!("GPU {index}"))
}

pub fn restore(original: &Original) -> Result<()> {
    match *original {
        Original::GpuPowerLimit { index, milliwatts } => {
            with_device(index, |d| d.set_power_management_limit(milliwatts))
        }
        Original::GpuLockedClocks { index } => with_device(index, |d| d.reset_gpu_locked_clocks()),
        Original::GpuMemLockedClocks { index } => {
            with_device(index, |d| d.reset_mem_locked_clocks())
        }
        Original::File { .. } => Ok(()),
    }
}
