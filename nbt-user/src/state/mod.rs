//! Records of live runs, so that `nbt cleanup` can remove what a crashed nbt left behind, and only
//! that. A record is written before a run makes anything and removed after it removed everything.

pub(crate) mod cleanup;
pub(crate) mod hwcaps;
pub(crate) mod live;

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// Where records live; `NBT_STATE_DIR` overrides it.
pub fn state_dir() -> PathBuf {
    std::env::var_os("NBT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/nbt"))
}

/// A fresh run name: `nbt-` and 16 random hex digits.
pub fn new_run_name() -> Result<String> {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(format!(
        "nbt-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Every file nbt keeps for one run, named here and nowhere else. The record and the files
/// beside it live in `runs/`; the hardware caps' record at the top, where the lock is.
pub struct RunFiles {
    /// The run's record (`RunRecord`), from before it makes anything to after it removed all.
    pub record: PathBuf,
    /// The learning updates its workload reports (`$NBT_REPORT`).
    pub reports: PathBuf,
    /// Events of faults injected from outside (`nbt fault`), merged into its log at the end.
    pub events: PathBuf,
    /// The hardware caps it holds, with the values to put back (`hwcaps`).
    pub hwcaps: PathBuf,
}

impl RunFiles {
    pub fn of(dir: &Path, run: &str) -> RunFiles {
        let runs = dir.join("runs");
        RunFiles {
            record: runs.join(format!("{run}.json")),
            reports: runs.join(format!("{run}.reports")),
            events: runs.join(format!("{run}.events")),
            hwcaps: dir.join(format!("{run}.hwcaps")),
        }
    }
}

/// Whether the nbt with this pid and start time still runs (a pid alone may have been reused).
pub fn supervisor_alive(pid: i32, start_time: u64) -> bool {
    crate::sys::proc::process_start_time(pid) == Some(start_time)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub supervisor_pid: i32,
    pub supervisor_start_time: u64,
    /// Every cgroup directory the run makes, in creation order.
    pub cgroups: Vec<PathBuf>,
    pub command: Vec<String>,
    /// The run's network limits as last set (at start, or by `nbt set`).
    #[serde(default)]
    pub net: crate::enforce::shaper::NetLimits,
    /// Kernel ids of the run's BPF maps, once loaded: `nbt set` and `nbt ps` open them by id.
    #[serde(default)]
    pub maps: Option<crate::enforce::shaper::MapIds>,
    /// Kernel ids of the ledger maps, for runs with a balance: `nbt balance` tops them up.
    #[serde(default)]
    pub ledger: Option<crate::enforce::gate::LedgerIds>,
    /// Kernel id of the EDT map, for runs started with --latency: `nbt set` changes the delay.
    #[serde(default)]
    pub edt_map: Option<u32>,
    #[serde(default)]
    pub latency: Option<crate::enforce::edt::Latency>,
    /// Where the run's BPF links are pinned: they hold while it runs, and after its nbt died.
    #[serde(default)]
    pub pins: Option<PathBuf>,
    /// The qdiscs the run put on interfaces (with --latency), for `nbt cleanup` to take off.
    #[serde(default)]
    pub qdiscs: Option<crate::enforce::edt::Qdiscs>,
    /// When the run's workload started, in seconds since the Unix epoch.
    #[serde(default)]
    pub started_unix: f64,
}

impl RunRecord {
    pub fn path(dir: &Path, name: &str) -> PathBuf {
        RunFiles::of(dir, name).record
    }

    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = Self::path(dir, &self.name);
        fs::create_dir_all(path.parent().unwrap())
            .with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The record of the live run `name`, or why there is none.
    pub fn find_live(dir: &Path, name: &str) -> Result<(PathBuf, RunRecord)> {
        let path = Self::path(dir, name);
        let bytes = fs::read(&path).map_err(|_| {
            anyhow::anyhow!("no run named '{name}' (see `nbt ps` for the live runs)")
        })?;
        let record: RunRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        if !record.supervisor_alive() {
            anyhow::bail!("run '{name}' is not live: its nbt (pid {}) is gone; `nbt cleanup` removes what it left", record.supervisor_pid);
        }
        Ok((path, record))
    }

    /// Whether the nbt that wrote this record still runs.
    pub fn supervisor_alive(&self) -> bool {
        supervisor_alive(self.supervisor_pid, self.supervisor_start_time)
    }

    pub fn read_all(dir: &Path) -> Vec<(PathBuf, Result<RunRecord>)> {
        let Ok(entries) = fs::read_dir(dir.join("runs")) else {
            return Vec::new();
        };
        let mut records: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|path| {
                let record = fs::read(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))
                    .with_context(|| format!("reading {}", path.display()));
                (path, record)
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
    }
}

/// Removes the record file when dropped (after the run's cgroups and pins went), unless some of
/// them are still there: then the record stays, for `nbt cleanup` to find them.
pub struct RecordGuard {
    path: PathBuf,
    made: Vec<PathBuf>,
}

impl RecordGuard {
    pub fn new(path: PathBuf, record: &RunRecord) -> RecordGuard {
        let mut made = record.cgroups.clone();
        made.push(crate::sys::pin::run_dir(&record.name));
        RecordGuard { path, made }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let left: Vec<String> = self
            .made
            .iter()
            .filter(|dir| dir.exists())
            .map(|dir| dir.display().to_string())
            .collect();
        if left.is_empty() {
            let _ = fs::remove_file(&self.path);
        } else {
            eprintln!(
                "nbt: could not remove {}; its record {} stays for `nbt cleanup`",
                left.join(", "),
                self.path.display()
            );
        }
    }
}
