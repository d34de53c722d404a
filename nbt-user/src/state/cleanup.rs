//! `nbt cleanup`: remove what crashed runs left behind. A run is left alone while the nbt that
//! started it lives; a dead one's processes are killed, its cgroups removed and its hardware caps
//! put back.

use std::fs;

use anyhow::Result;

use crate::enforce::cgroup::kill_and_remove;
use crate::state::{state_dir, RunRecord};

/// Cleans up after dead runs; returns how many runs were removed and what failed.
pub fn cleanup(dry_run: bool) -> Result<i32> {
    let dir = state_dir();
    let mut removed = 0;
    let mut failed = 0;
    let mut live = 0;
    for (path, record) in RunRecord::read_all(&dir) {
        let record = match record {
            Ok(r) => r,
            Err(err) => {
                eprintln!("nbt cleanup: skipping unreadable record: {err:#}");
                failed += 1;
                continue;
            }
        };
        if record.supervisor_alive() {
            eprintln!(
                "nbt cleanup: {} is live (nbt pid {}): left alone",
                record.name, record.supervisor_pid
            );
            live += 1;
            continue;
        }
        if dry_run {
            eprintln!(
                "nbt cleanup: would remove {} ({} cgroups)",
                record.name,
                record.cgroups.len()
            );
            continue;
        }
        match remove_run(&record) {
            Ok(killed) => {
                eprintln!(
                    "nbt cleanup: removed {} (nbt pid {} is gone): {} cgroups, {killed} processes killed",
                    record.name,
                    record.supervisor_pid,
                    record.cgroups.len()
                );
                let _ = fs::remove_file(&path);
                // The learning updates its workload reported after nbt died (no receipt holds them).
                let _ = fs::remove_file(path.with_extension("reports"));
                let _ = fs::remove_file(path.with_extension("events"));
                removed += 1;
            }
            Err(err) => {
                eprintln!("nbt cleanup: {}: {err:#}", record.name);
                failed += 1;
            }
        }
    }
    // Hardware caps of dead runs go back to the values recorded before they were changed.
    let (restored, hw_failed) = crate::enforce::hwcaps::cleanup(&dir, dry_run);
    removed += restored;
    failed += hw_failed;
    if removed == 0 && failed == 0 && live == 0 && !dry_run {
        eprintln!("nbt cleanup: nothing left behind");
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn remove_run(record: &RunRecord) -> Result<usize> {
    kill_and_remove(&record.cgroups)
}
