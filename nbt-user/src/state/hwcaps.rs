//! The hardware caps a run holds, recorded before the first is changed (`<run>.hwcaps`, beside
//! the run's record, fsynced), so that they can always be put back: by the run's [`Held`] guard
//! when it ends, or by `nbt cleanup` after its nbt died. The record is also how a second run is
//! refused a cap that a live run holds: checked under `hwcaps.lock`. The record is private like
//! the run's (0600, written whole under a fresh name and renamed, read without following a link
//! and only when nbt's user owns it): `nbt cleanup` writes back the values it names.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{supervisor_alive, RunFiles};
use crate::enforce::hwcaps::{self, HwRequest, Original};
use crate::sys::private::{self, WideMode};

/// What `<run>.hwcaps` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HwcapsRecord {
    pub run: String,
    pub supervisor_pid: i32,
    pub supervisor_start_time: u64,
    pub originals: Vec<Original>,
}

impl HwcapsRecord {
    /// Whether the nbt that holds these caps still runs.
    pub fn alive(&self) -> bool {
        supervisor_alive(self.supervisor_pid, self.supervisor_start_time)
    }

    /// Every record in `state_dir`.
    pub fn read_all(state_dir: &Path) -> Vec<(PathBuf, Result<HwcapsRecord>)> {
        let Ok(entries) = fs::read_dir(state_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "hwcaps"))
            .map(|p| {
                let record =
                    private::read_private(&p, "the hardware caps record", WideMode::Tighten)
                        .map_err(anyhow::Error::from)
                        .and_then(|bytes| {
                            serde_json::from_slice(&bytes)
                                .with_context(|| format!("parsing {}", p.display()))
                        });
                (p, record)
            })
            .collect()
    }

    /// Puts every value back, in reverse order; the errors, if any.
    pub fn restore(&self) -> Vec<String> {
        self.originals
            .iter()
            .rev()
            .filter_map(|o| o.restore().err().map(|e| format!("{e:#}")))
            .collect()
    }

    /// What putting them back does, one phrase per value.
    pub fn describe(&self) -> Vec<String> {
        self.originals.iter().map(Original::describe).collect()
    }
}

/// The caps in force; dropping it restores them and removes the record.
pub struct Held {
    path: PathBuf,
    record: HwcapsRecord,
    pub set: Vec<String>,
    restored: bool,
}

/// Holds `state_dir/hwcaps.lock` (flock) while alive.
struct Lock {
    _file: fs::File,
}

impl Lock {
    fn take(state_dir: &Path) -> Result<Lock> {
        super::private_state_dir(state_dir)?;
        let file = private::lock(&state_dir.join("hwcaps.lock"))
            .context("taking the hardware caps lock")?;
        Ok(Lock { _file: file })
    }
}

/// Reads the originals, records them, then applies the caps. A cap another live run holds is
/// refused before anything changes. If one change fails, those made are put back.
pub fn hold(request: &HwRequest, state_dir: &Path, run: &str) -> Result<Option<Held>> {
    let pid = std::process::id() as i32;
    let start = crate::sys::proc::process_start_time(pid)
        .context("reading nbt's own start time from /proc")?;
    hold_for(request, state_dir, run, (pid, start))
}

/// [`hold`] for a zone: the record names no process ([`super::ZONE_HOLDER`]), so `nbt cleanup`
/// leaves the caps alone; `nbt zone remove` puts them back.
pub fn hold_for_zone(request: &HwRequest, state_dir: &Path, run: &str) -> Result<Option<Held>> {
    hold_for(request, state_dir, run, (super::ZONE_HOLDER, 0))
}

fn hold_for(
    request: &HwRequest,
    state_dir: &Path,
    run: &str,
    (pid, start): (i32, u64),
) -> Result<Option<Held>> {
    if request.is_empty() {
        return Ok(None);
    }
    let changes = hwcaps::changes(request)?;
    let lock = Lock::take(state_dir)?;
    refuse_held(state_dir, &changes)?;
    let record = HwcapsRecord {
        run: run.to_string(),
        supervisor_pid: pid,
        supervisor_start_time: start,
        originals: changes.iter().map(|c| c.original.clone()).collect(),
    };
    let path = RunFiles::of(state_dir, run).hwcaps;
    // Whole and fsynced before any cap changes: renamed into place, the directory synced too.
    private::replace_private(&path, serde_json::to_string_pretty(&record)?.as_bytes())?;
    drop(lock);

    let mut held = Held {
        path,
        record: HwcapsRecord {
            originals: Vec::new(),
            ..record.clone()
        },
        set: Vec::new(),
        restored: false,
    };
    for change in changes {
        held.record.originals.push(change.original);
        (change.apply)().with_context(|| format!("setting {}", change.set))?;
        held.set.push(change.set);
    }
    held.record = record;
    Ok(Some(held))
}

/// Refuses caps that another live run holds, and any at all while a dead run's are not back.
fn refuse_held(state_dir: &Path, changes: &[hwcaps::Change]) -> Result<()> {
    for (path, record) in HwcapsRecord::read_all(state_dir) {
        let Ok(other) = record else { continue };
        if !other.alive() {
            anyhow::bail!(
                "{} holds the caps of {}, whose nbt (pid {}) is gone: run `nbt cleanup` to put them back first",
                path.display(),
                other.run,
                other.supervisor_pid
            );
        }
        for change in changes {
            if let Some(held) = other
                .originals
                .iter()
                .find(|o| o.resource() == change.original.resource())
            {
                anyhow::bail!(
                    "{} is held by {} (nbt pid {}): machine-wide caps cannot be shared; wait for it to end",
                    held.resource(),
                    other.run,
                    other.supervisor_pid
                );
            }
        }
    }
    Ok(())
}

impl Held {
    /// Puts everything back now; what could not be, as messages.
    pub fn restore(&mut self) -> Vec<String> {
        if self.restored {
            return Vec::new();
        }
        self.restored = true;
        let errors = self.record.restore();
        if errors.is_empty() {
            let _ = fs::remove_file(&self.path);
        }
        errors
    }

    /// Leaves the caps in force and their record on disk, for a zone (`nbt zone remove` puts
    /// them back).
    pub fn keep(mut self) {
        self.restored = true;
    }

    pub fn originals(&self) -> Vec<String> {
        self.record.describe()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for error in self.restore() {
            eprintln!(
                "nbt: restoring a hardware cap failed: {error}; the original values stay in {}, `nbt cleanup` retries",
                self.path.display()
            );
        }
    }
}
