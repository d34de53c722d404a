//! The hardware caps a run holds, recorded before the first is changed (`<run>.hwcaps`, beside
//! the run's record, fsynced), so that they can always be put back: by the run's [`Held`] guard
//! when it ends, or by `nbt cleanup` after its nbt died. The record is also how a second run is
//! refused a cap that a live run holds: checked under `hwcaps.lock`.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{supervisor_alive, RunFiles};
use crate::enforce::hwcaps::{self, HwRequest, Original};

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
                let record = fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))
                    .and_then(|text| {
                        serde_json::from_str(&text)
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
        fs::create_dir_all(state_dir)?;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join("hwcaps.lock"))
            .context("opening the hardware caps lock")?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking hwcaps.lock");
        }
        Ok(Lock { _file: file })
    }
}

/// Reads the originals, records them, then applies the caps. A cap another live run holds is
/// refused before anything changes. If one change fails, those made are put back.
pub fn hold(request: &HwRequest, state_dir: &Path, run: &str) -> Result<Option<Held>> {
    if request.is_empty() {
        return Ok(None);
    }
    let changes = hwcaps::changes(request)?;
    let lock = Lock::take(state_dir)?;
    refuse_held(state_dir, &changes)?;
    let pid = std::process::id() as i32;
    let record = HwcapsRecord {
        run: run.to_string(),
        supervisor_pid: pid,
        supervisor_start_time: crate::sys::proc::process_start_time(pid)
            .context("reading nbt's own start time from /proc")?,
        originals: changes.iter().map(|c| c.original.clone()).collect(),
    };
    let path = RunFiles::of(state_dir, run).hwcaps;
    let mut file =
        fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(serde_json::to_string_pretty(&record)?.as_bytes())?;
    file.sync_all()?;
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
