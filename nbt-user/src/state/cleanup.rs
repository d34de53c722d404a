//! `nbt cleanup`: remove what crashed runs left behind. A run is left alone while the nbt that
//! started it lives; a dead one's processes are killed, its cgroups removed, its hardware caps
//! put back and its files deleted. One pass over the runs, whichever records each left.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::hwcaps::HwcapsRecord;
use super::{state_dir, RunFiles, RunRecord};
use crate::enforce::cgroup::kill_and_remove;
use crate::enforce::edt::Qdiscs;
use crate::sys::netns::Reached;

/// What one run left: its record, the record of the hardware caps it held, or both.
#[derive(Default)]
struct Leftovers {
    record: Option<RunRecord>,
    hwcaps: Option<(PathBuf, HwcapsRecord)>,
}

#[derive(Default)]
struct Tally {
    removed: usize,
    failed: usize,
    live: usize,
}

/// Cleans up after dead runs; whether everything they left could be removed.
pub fn cleanup(dry_run: bool) -> Result<bool> {
    let dir = state_dir();
    let mut tally = Tally::default();
    let mut runs: BTreeMap<String, Leftovers> = BTreeMap::new();
    for (_, record) in RunRecord::read_all(&dir) {
        match record {
            Ok(r) => {
                let name = r.name.clone();
                runs.entry(name).or_default().record = Some(r);
            }
            Err(err) => {
                eprintln!("nbt cleanup: skipping unreadable record: {err:#}");
                tally.failed += 1;
            }
        }
    }
    for (path, record) in HwcapsRecord::read_all(&dir) {
        match record {
            Ok(r) => {
                let name = r.run.clone();
                runs.entry(name).or_default().hwcaps = Some((path, r));
            }
            Err(err) => {
                eprintln!("nbt cleanup: {err:#}");
                tally.failed += 1;
            }
        }
    }
    for (name, left) in runs {
        if let Some(record) = left.record {
            remove_run(&RunFiles::of(&dir, &name), &record, dry_run, &mut tally);
        }
        // Hardware caps of dead runs go back to the values recorded before they were changed.
        if let Some((path, hwcaps)) = left.hwcaps {
            restore_caps(&path, &hwcaps, dry_run, &mut tally);
        }
    }
    remove_stale_temporaries(&dir, dry_run, &mut tally);
    if tally.removed == 0 && tally.failed == 0 && tally.live == 0 && !dry_run {
        eprintln!("nbt cleanup: nothing left behind");
    }
    Ok(tally.failed == 0)
}

/// Temporary files (`.NAME.RANDOM.tmp`) an nbt killed mid-write left: any older than a minute
/// (a live writer renames its own within milliseconds).
fn remove_stale_temporaries(dir: &Path, dry_run: bool, tally: &mut Tally) {
    for dir in [dir.to_path_buf(), dir.join("runs")] {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
            if !(name.starts_with('.') && name.ends_with(".tmp") && stale) {
                continue;
            }
            if dry_run {
                eprintln!("nbt cleanup: would remove {}", entry.path().display());
            } else if fs::remove_file(entry.path()).is_ok() {
                eprintln!("nbt cleanup: removed {}", entry.path().display());
                tally.removed += 1;
            }
        }
    }
}

fn remove_run(files: &RunFiles, record: &RunRecord, dry_run: bool, tally: &mut Tally) {
    if let (Some(_), Some(label)) = (&record.zone, &record.label) {
        eprintln!("nbt cleanup: zone {label} is in force: left alone (`nbt zone remove {label}` removes it)");
        tally.live += 1;
        return;
    }
    if record.supervisor_alive() {
        eprintln!(
            "nbt cleanup: {} is live (nbt pid {}): left alone",
            record.name, record.supervisor_pid
        );
        tally.live += 1;
        return;
    }
    if dry_run {
        eprintln!(
            "nbt cleanup: would remove {} ({} cgroups)",
            record.name,
            record.cgroups.len()
        );
        return;
    }
    match remove_orphan(record) {
        Ok(killed) => {
            eprintln!(
                "nbt cleanup: removed {} (nbt pid {} is gone): {} cgroups, {killed} processes killed{}",
                record.name,
                record.supervisor_pid,
                record.cgroups.len(),
                if record.qdiscs.is_some() { ", its qdiscs taken off" } else { "" }
            );
            let _ = fs::remove_file(&files.record);
            // The learning updates its workload reported after nbt died (no receipt holds them).
            let _ = fs::remove_file(&files.reports);
            let _ = fs::remove_file(&files.events);
            let _ = fs::remove_file(&files.series);
            let _ = fs::remove_file(&files.live_events);
            tally.removed += 1;
        }
        Err(err) => {
            eprintln!("nbt cleanup: {}: {err:#}", record.name);
            tally.failed += 1;
        }
    }
}

/// Kills the run's processes and removes its cgroups, then its pinned links (so that no process
/// of it runs without its programs), then the qdiscs it added. The number of processes killed.
fn remove_orphan(record: &RunRecord) -> Result<usize> {
    let killed = match &record.attached {
        None => kill_and_remove(&record.cgroups)?,
        // An attachment's target is not nbt's to kill: it goes back as it was.
        Some(held) => {
            if held.moved {
                let layout = crate::enforce::cgroup::Layout::detect()?;
                crate::enforce::cgroup::move_back(&record.cgroups, &held.cgroups, &layout)?;
            }
            let restored = crate::enforce::target::restore(&held.originals);
            if !restored.errors.is_empty() {
                anyhow::bail!("{}", restored.errors.join("; "));
            }
            kill_and_remove(&record.cgroups)?
        }
    };
    let pins = record
        .pins
        .clone()
        .unwrap_or_else(|| crate::sys::pin::run_dir(&record.name));
    crate::sys::pin::remove_run_dir(&pins)?;
    // The workload's report directory (remove_dir_all removes a link in its place, not what
    // the link points to).
    let reports = crate::learning::workload_dir(&record.name);
    if fs::symlink_metadata(&reports).is_ok() {
        fs::remove_dir_all(&reports)
            .or_else(|_| fs::remove_file(&reports))
            .with_context(|| format!("removing {}", reports.display()))?;
    }
    if let Some(qdiscs) = &record.qdiscs {
        match qdiscs.remove_in_their_netns(Qdiscs::remove)? {
            Reached::Ran(errors) if !errors.is_empty() => anyhow::bail!("{}", errors.join("; ")),
            Reached::Ran(_) => {}
            Reached::Gone => eprintln!(
                "nbt cleanup: {}: its network namespace is gone, and the qdiscs it put there \
                 with it",
                record.name
            ),
        }
    }
    Ok(killed)
}

fn restore_caps(path: &Path, hwcaps: &HwcapsRecord, dry_run: bool, tally: &mut Tally) {
    if hwcaps.alive() {
        return;
    }
    let what = hwcaps.describe().join(", ");
    if dry_run {
        eprintln!(
            "nbt cleanup: would restore the hardware caps of {}: {what}",
            hwcaps.run
        );
        return;
    }
    let errors = hwcaps.restore();
    if errors.is_empty() {
        let _ = fs::remove_file(path);
        eprintln!(
            "nbt cleanup: restored the hardware caps of {}: {what}",
            hwcaps.run
        );
        tally.removed += 1;
    } else {
        eprintln!(
            "nbt cleanup: {}: {}; {} kept",
            hwcaps.run,
            errors.join("; "),
            path.display()
        );
        tally.failed += 1;
    }
}
