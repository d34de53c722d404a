//! `hwcaps`: machine-wide hardware caps (the seed's nbt_gpu_limit.sh / nbt_cpu_limit.sh), always
//! put back.
//!
//! Unlike cgroup and BPF limits, these change state the whole machine shares, so:
//! - every value is read before anything is changed ([`changes`]), and recorded by the run
//!   (`state::hwcaps`, fsynced) before the first change;
//! - the run's guard restores them when it ends, whatever way (normal exit, error, signals
//!   forwarded to the workload, a panic unwinding); after SIGKILL or power loss `nbt cleanup`
//!   restores them from the record;
//! - a second run asking for a cap another live run holds is refused (checked under a lock).
//!
//! `cpu` works on files beneath a sysfs root (`NBT_SYSFS_ROOT`, default /sys), so tests use a
//! temporary directory standing in for it; `gpu` goes through NVML.

pub(crate) mod cpu;
pub(crate) mod gpu;
pub(crate) mod watch;

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// The sysfs tree hardware caps work on.
pub fn sysfs_root() -> PathBuf {
    std::env::var_os("NBT_SYSFS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys"))
}

/// A setting with the name it was asked by (`--cpu-max-freq`, or a profile key) and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked<T> {
    pub value: T,
    pub name: String,
    pub text: String,
}

impl<T> Asked<T> {
    /// "cannot enforce --flag VALUE: why".
    pub fn cannot(&self, why: impl std::fmt::Display) -> PlanError {
        PlanError(format!("cannot enforce {} {}: {why}", self.name, self.text))
    }

    /// "invalid value 'VALUE' for --flag: problem".
    pub fn invalid(&self, problem: impl std::fmt::Display) -> PlanError {
        PlanError(format!(
            "invalid value '{}' for {}: {problem}",
            self.text, self.name
        ))
    }
}

/// The hardware caps a run asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HwRequest {
    /// kHz, as cpufreq counts.
    pub cpu_max_freq: Option<Asked<u64>>,
    pub no_turbo: Option<Asked<bool>>,
    pub gpu: gpu::GpuRequest,
}

impl HwRequest {
    pub fn is_empty(&self) -> bool {
        self.cpu_max_freq.is_none()
            && !self.no_turbo.as_ref().is_some_and(|t| t.value)
            && self.gpu.is_empty()
    }

    /// Refuses, before anything is changed, what this machine cannot do or does not allow.
    pub fn check(&self) -> Result<(), PlanError> {
        match self.refusals().into_iter().next() {
            Some((_, refusal)) => Err(refusal),
            None => Ok(()),
        }
    }

    /// Takes out of the request each cap this machine cannot apply, with the reason `check`
    /// would refuse it for (the GPU caps go or stay together). For the demo, which shows the
    /// `nbt` profile on whatever machine it is run: it lists what it could not enforce instead
    /// of refusing to start. `nbt run` refuses instead.
    pub fn set_aside_unavailable(&mut self) -> Vec<PlanError> {
        let refusals = self.refusals();
        refusals
            .into_iter()
            .map(|(cap, refusal)| match cap {
                Cap::CpuMaxFreq => {
                    self.cpu_max_freq = None;
                    refusal
                }
                Cap::NoTurbo => {
                    self.no_turbo = None;
                    refusal
                }
                Cap::Gpu => {
                    let others: Vec<String> = (self.gpu.asked().iter().skip(1))
                        .map(|(name, text)| format!("{name} {text}"))
                        .collect();
                    self.gpu = gpu::GpuRequest::default();
                    if others.is_empty() {
                        refusal
                    } else {
                        PlanError(format!("{refusal}; so also {}", others.join(", ")))
                    }
                }
            })
            .collect()
    }

    /// Every cap asked for that this machine cannot apply, with its refusal, in the order
    /// `check` names them.
    fn refusals(&self) -> Vec<(Cap, PlanError)> {
        let root = sysfs_root();
        let mut refusals = Vec::new();
        if let Some(freq) = &self.cpu_max_freq {
            if let Err(refusal) = cpu::check_max_freq(&root, freq) {
                refusals.push((Cap::CpuMaxFreq, refusal));
            }
        }
        if let Some(turbo) = self.no_turbo.as_ref().filter(|t| t.value) {
            if let Err(why) = cpu::turbo_switch(&root) {
                refusals.push((Cap::NoTurbo, turbo.cannot(why)));
            }
        }
        if let Err(refusal) = self.gpu.check() {
            refusals.push((Cap::Gpu, refusal));
        }
        refusals
    }
}

/// The parts of a [`HwRequest`] that are refused, or set aside, one at a time.
#[derive(Debug, Clone, Copy)]
enum Cap {
    CpuMaxFreq,
    NoTurbo,
    Gpu,
}

/// One value as it was before nbt changed it, and how to put it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Original {
    /// A sysfs file and its text.
    File {
        path: PathBuf,
        value: String,
    },
    /// A GPU's power limit, milliwatts.
    GpuPowerLimit {
        index: u32,
        milliwatts: u32,
    },
    /// A GPU's locked graphics clocks: NVML cannot read whether clocks were locked, so they are
    /// reset (unlocked), the driver's default.
    GpuLockedClocks {
        index: u32,
    },
    GpuMemLockedClocks {
        index: u32,
    },
}

impl Original {
    /// The machine-wide resource it belongs to: two runs cannot both hold one.
    pub fn resource(&self) -> String {
        match self {
            Original::File { path, .. } => {
                if path.ends_with("no_turbo") || path.ends_with("boost") {
                    "turbo".into()
                } else {
                    "cpu frequency".into()
                }
            }
            Original::GpuPowerLimit { index, .. } => format!("GPU {index} power limit"),
            Original::GpuLockedClocks { index } => format!("GPU {index} clocks"),
            Original::GpuMemLockedClocks { index } => format!("GPU {index} memory clocks"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Original::File { path, value } => format!("{} = {value}", path.display()),
            Original::GpuPowerLimit { index, milliwatts } => {
                format!(
                    "GPU {index} power limit {} W",
                    f64::from(*milliwatts) / 1000.0
                )
            }
            Original::GpuLockedClocks { index } => format!("GPU {index} clocks unlocked"),
            Original::GpuMemLockedClocks { index } => format!("GPU {index} memory clocks unlocked"),
        }
    }

    pub fn restore(&self) -> Result<()> {
        match self {
            Original::File { path, value } => fs::write(path, value)
                .with_context(|| format!("writing {value} back to {}", path.display())),
            gpu_original => gpu::restore(gpu_original),
        }
    }
}

/// A change to make: the original to record, then how to apply it.
pub struct Change {
    pub original: Original,
    pub apply: Box<dyn FnOnce() -> Result<()>>,
    /// What was set, for the summary.
    pub set: String,
}

/// The changes `request` asks for, each with the value it replaces. Nothing is changed yet.
pub fn changes(request: &HwRequest) -> Result<Vec<Change>> {
    let root = sysfs_root();
    let mut changes = Vec::new();
    if let Some(freq) = &request.cpu_max_freq {
        changes.extend(cpu::max_freq_changes(&root, freq.value)?);
    }
    if request.no_turbo.as_ref().is_some_and(|t| t.value) {
        changes.push(cpu::no_turbo_change(&root)?);
    }
    changes.extend(gpu::changes(&request.gpu)?);
    Ok(changes)
}

/// The hardware settings as given, by flag or profile key, before parsing.
#[derive(Debug, Clone, Default)]
pub struct HwTexts {
    pub cpu_max_freq: Option<(String, String)>,
    pub no_turbo: Option<(String, String)>,
    pub gpu_power_limit: Option<(String, String)>,
    pub gpu_clock: Option<(String, String)>,
    pub gpu_mem_clock: Option<(String, String)>,
    pub gpu_memory: Option<(String, String)>,
    pub gpus: Option<(String, String)>,
}

const FREQ_FORMS: &str = "a frequency with a unit: 2.0GHz, 2000MHz, 2000000kHz";

impl HwTexts {
    /// Parses every setting given (text, name) into a request.
    pub fn parse(self) -> Result<HwRequest, PlanError> {
        fn asked<T>(
            given: Option<(String, String)>,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Option<Asked<T>>, PlanError> {
            given
                .map(|(text, name)| {
                    parse(text.trim())
                        .map(|value| Asked {
                            value,
                            name: name.clone(),
                            text: text.clone(),
                        })
                        .map_err(|why| {
                            PlanError(format!("invalid value '{text}' for {name}: {why}"))
                        })
                })
                .transpose()
        }
        Ok(HwRequest {
            cpu_max_freq: asked(self.cpu_max_freq, parse_khz)?,
            no_turbo: asked(self.no_turbo, |t| match t {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err("accepted: true or false".into()),
            })?,
            gpu: gpu::GpuRequest {
                power_limit_w: asked(self.gpu_power_limit, |t| {
                    let number = t.strip_suffix('W').unwrap_or(t).trim();
                    match number.parse::<f64>() {
                        Ok(w) if w.is_finite() && w > 0.0 => Ok(w),
                        _ => Err("accepted: watts above 0: 75, 75W".into()),
                    }
                })?,
                clock_mhz: asked(self.gpu_clock, parse_mhz)?,
                mem_clock_mhz: asked(self.gpu_mem_clock, parse_mhz)?,
                memory_bytes: asked(self.gpu_memory, |t| {
                    crate::units::parse_size("", t)
                        .map_err(|e| format!("{}; accepted: {}", e.problem, e.accepted))
                })?,
                gpus: asked(self.gpus, |t| {
                    if t == "all" {
                        return Ok(Vec::new());
                    }
                    t.split(',')
                        .map(|i| i.trim().parse::<u32>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|_| "accepted: all, or GPU indices: 0 or 0,1".into())
                })?
                .filter(|g| !g.value.is_empty()),
            },
        })
    }
}

fn parse_khz(text: &str) -> Result<u64, String> {
    let lower = text.to_ascii_lowercase();
    let end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(end);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("not a frequency; accepted: {FREQ_FORMS}"))?;
    let khz = match unit.trim() {
        "ghz" => number * 1e6,
        "mhz" => number * 1e3,
        "khz" => number,
        "" => return Err(format!("a unit is required; accepted: {FREQ_FORMS}")),
        _ => return Err(format!("unknown unit; accepted: {FREQ_FORMS}")),
    };
    if khz < 1.0 {
        return Err(format!("must be above 0; accepted: {FREQ_FORMS}"));
    }
    Ok(khz.round() as u64)
}

fn parse_mhz(text: &str) -> Result<u32, String> {
    let number = text
        .strip_suffix("MHz")
        .or_else(|| text.strip_suffix("mhz"))
        .unwrap_or(text)
        .trim();
    match number.parse::<u32>() {
        Ok(mhz) if mhz > 0 => Ok(mhz),
        _ => Err("accepted: whole MHz above 0: 1200, 1200MHz".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_and_gpu_settings_parse_or_name_the_problem() {
        assert_eq!(parse_khz("2.0GHz"), Ok(2_000_000));
        assert_eq!(parse_khz("1200MHz"), Ok(1_200_000));
        assert!(parse_khz("2000")
            .unwrap_err()
            .contains("a unit is required"));
        assert_eq!(parse_mhz("1200"), Ok(1200));
        assert!(parse_mhz("-5").is_err());
        let texts = HwTexts {
            gpu_power_limit: Some(("0".into(), "--gpu-power-limit".into())),
            ..HwTexts::default()
        };
        assert!(texts
            .parse()
            .unwrap_err()
            .0
            .starts_with("invalid value '0' for --gpu-power-limit"));
    }
}
