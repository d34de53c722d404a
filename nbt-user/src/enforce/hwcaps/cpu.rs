//! CPU caps through cpufreq: `scaling_max_freq` on every CPU, and turbo off through
//! intel_pstate's `no_turbo` or cpufreq's `boost`. CPU temperature from hwmon.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::{Asked, Change, Original};
use crate::error::PlanError;

/// `cpuN/cpufreq` directories beneath `root`, in CPU order.
fn cpufreq_dirs(root: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir(root.join("devices/system/cpu")) else {
        return Vec::new();
    };
    let mut dirs: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix("cpu")?.parse().ok()?;
            let dir = e.path().join("cpufreq");
            dir.join("scaling_max_freq").exists().then_some((n, dir))
        })
        .collect();
    dirs.sort();
    dirs
}

fn read_khz(path: &Path) -> Result<u64> {
    fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} is not a number of kHz", path.display()))
}

fn format_khz(khz: u64) -> String {
    if khz >= 1_000_000 {
        format!("{} GHz", khz as f64 / 1e6)
    } else {
        format!("{} MHz", khz as f64 / 1000.0)
    }
}

/// `--cpu-max-freq`: refused where there is no cpufreq, or outside any CPU's range.
pub fn check_max_freq(root: &Path, freq: &Asked<u64>) -> Result<(), PlanError> {
    let dirs = cpufreq_dirs(root);
    if dirs.is_empty() {
        return Err(freq.cannot(format!(
            "this machine has no cpufreq ({} absent: no frequency scaling driver, common in VMs)",
            root.join("devices/system/cpu/cpu0/cpufreq").display()
        )));
    }
    for (cpu, dir) in dirs {
        let (min, max) = match (
            read_khz(&dir.join("cpuinfo_min_freq")),
            read_khz(&dir.join("cpuinfo_max_freq")),
        ) {
            (Ok(min), Ok(max)) => (min, max),
            (Err(e), _) | (_, Err(e)) => return Err(freq.cannot(format!("{e:#}"))),
        };
        if freq.value < min || freq.value > max {
            return Err(freq.invalid(format!(
                "cpu{cpu} allows {} to {}",
                format_khz(min),
                format_khz(max)
            )));
        }
    }
    Ok(())
}

pub fn max_freq_changes(root: &Path, khz: u64) -> Result<Vec<Change>> {
    cpufreq_dirs(root)
        .into_iter()
        .map(|(cpu, dir)| {
            let path = dir.join("scaling_max_freq");
            let value = fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_string();
            let target = path.clone();
            Ok(Change {
                original: Original::File { path, value },
                apply: Box::new(move || {
                    fs::write(&target, khz.to_string())
                        .with_context(|| format!("writing {khz} to {}", target.display()))
                }),
                set: format!("cpu{cpu} scaling_max_freq {}", format_khz(khz)),
            })
        })
        .collect()
}

/// The file that turns turbo off and the value that does it.
pub fn turbo_switch(root: &Path) -> Result<(PathBuf, &'static str), String> {
    let no_turbo = root.join("devices/system/cpu/intel_pstate/no_turbo");
    let boost = root.join("devices/system/cpu/cpufreq/boost");
    if no_turbo.exists() {
        Ok((no_turbo, "1"))
    } else if boost.exists() {
        Ok((boost, "0"))
    } else {
        Err(format!(
            "neither {} nor {} exists (no turbo control on this machine)",
            no_turbo.display(),
            boost.display()
        ))
    }
}

pub fn no_turbo_change(root: &Path) -> Result<Change> {
    let (path, off) = turbo_switch(root).map_err(anyhow::Error::msg)?;
    let value = fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string();
    let target = path.clone();
    Ok(Change {
        set: format!("turbo off ({} = {off})", path.display()),
        original: Original::File { path, value },
        apply: Box::new(move || {
            fs::write(&target, off)
                .with_context(|| format!("writing {off} to {}", target.display()))
        }),
    })
}

/// The hottest CPU package or die temperature, °C, from hwmon (coretemp, k10temp, zenpower).
pub fn temperature_c(root: &Path) -> Option<f64> {
    let entries = fs::read_dir(root.join("class/hwmon")).ok()?;
    let mut hottest: Option<f64> = None;
    for dir in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = fs::read_to_string(dir.join("name")).unwrap_or_default();
        if !["coretemp", "k10temp", "zenpower"].contains(&name.trim()) {
            continue;
        }
        for file in fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
        {
            let is_input = file
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("temp") && n.ends_with("_input"));
            if let Some(milli) = is_input.then(|| read_khz(&file).ok()).flatten() {
                let c = milli as f64 / 1000.0;
                hottest = Some(hottest.map_or(c, |h| h.max(c)));
            }
        }
    }
    hottest
}
