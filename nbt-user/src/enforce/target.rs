//! The cgroups of a workload nbt did not start (`nbt attach`): where they are, the values of the
//! limit files nbt may write there, and how to put those values back.
//!
//! nbt changes nothing of a target's cgroups but the files listed in [`LIMIT_FILES`]; each is
//! read before the first write ([`snapshot`]) and written back at the end ([`restore`]), so the
//! target ends as it was. Processes moved into nbt's own cgroups (`--pid`) go back where they
//! came from ([`move_back`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::cgroup::{Layout, Placement, CONTROLLERS};

/// The files nbt may write in a cgroup, by controller (`"v2"`: present without a controller),
/// for each placement. Limits, the squeeze (memory.high) and the freeze.
const LIMIT_FILES: &[(&str, Placement, &[&str])] = &[
    (
        "memory",
        Placement::V2,
        &["memory.max", "memory.swap.max", "memory.high"],
    ),
    (
        "memory",
        Placement::V1,
        &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
    ),
    ("cpu", Placement::V2, &["cpu.max"]),
    (
        "cpu",
        Placement::V1,
        &["cpu.cfs_period_us", "cpu.cfs_quota_us"],
    ),
    ("pids", Placement::V2, &["pids.max"]),
    ("pids", Placement::V1, &["pids.max"]),
];

/// A target's cgroups: its v2 directory (where nbt's programs attach) and, on hybrid hosts, its
/// directory in each v1 hierarchy that carries a controller nbt uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCgroups {
    pub v2: PathBuf,
    #[serde(default)]
    pub v1: std::collections::BTreeMap<String, PathBuf>,
}

/// A limit file's content before nbt wrote to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    pub file: PathBuf,
    pub value: String,
}

impl TargetCgroups {
    /// The cgroups process `pid` is in now.
    pub fn of_pid(pid: i32) -> Result<TargetCgroups> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .with_context(|| format!("reading /proc/{pid}/cgroup: is process {pid} running?"))?;
        Self::from_layout(Layout::of_process_text(&text)?)
    }

    /// The cgroup `path`, as /proc/PID/cgroup names one (`/docker/3f2a...`, the same path in every
    /// hierarchy) or as a directory under the cgroup2 mount (`/sys/fs/cgroup/unified/docker/...`).
    pub fn of_path(path: &str) -> Result<TargetCgroups> {
        if path.split('/').any(|part| part == "..") {
            bail!("'..' in a cgroup path");
        }
        Self::from_layout(Layout::of_cgroup_path(path)?)
    }

    fn from_layout(layout: Layout) -> Result<TargetCgroups> {
        let v2 = layout.require_v2()?.to_path_buf();
        let v1 = CONTROLLERS
            .into_iter()
            .filter(|c| layout.placement(c) == Some(Placement::V1))
            .map(|c| (c.to_string(), layout.v1_self[c].clone()))
            .collect();
        Ok(TargetCgroups { v2, v1 })
    }

    /// Every directory, v2 first.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.v2.as_path()];
        for dir in self.v1.values() {
            if !dirs.contains(&dir.as_path()) {
                dirs.push(dir);
            }
        }
        dirs
    }

    /// The directory that carries `controller` for a run laid out as `layout` says.
    pub fn controller_dir(
        &self,
        layout: &Layout,
        controller: &str,
    ) -> Option<(Placement, PathBuf)> {
        match layout.placement(controller)? {
            Placement::V2 => {
                let listed = fs::read_to_string(self.v2.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|c| c == controller);
                listed.then(|| (Placement::V2, self.v2.clone()))
            }
            Placement::V1 => self
                .v1
                .get(controller)
                .filter(|dir| dir.is_dir())
                .map(|dir| (Placement::V1, dir.clone())),
        }
    }

    /// Processes in the target now (its v2 directory and those below it).
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.v2.join("cgroup.events"))
            .map(|text| text.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }
}

/// The values of every limit file nbt may write in `target`, read now.
pub fn snapshot(layout: &Layout, target: &TargetCgroups) -> Vec<Original> {
    let mut originals = Vec::new();
    for (controller, placement, files) in LIMIT_FILES {
        let Some((found, dir)) = target.controller_dir(layout, controller) else {
            continue;
        };
        if found != *placement {
            continue;
        }
        for file in *files {
            let file = dir.join(file);
            if let Ok(value) = fs::read_to_string(&file) {
                originals.push(Original {
                    file,
                    value: value.trim().to_string(),
                });
            }
        }
    }
    let freeze = target.v2.join("cgroup.freeze");
    if let Ok(value) = fs::read_to_string(&freeze) {
        originals.push(Original {
            file: freeze,
            value: value.trim().to_string(),
        });
    }
    originals
}

/// What [`restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// Files written back, as "file: value".
    pub written: Vec<String>,
    /// The target's cgroup went away with it: nothing left to put back.
    pub gone: bool,
    pub errors: Vec<String>,
}

/// Writes back every file whose value is not its original. Two passes: on v1, memory+swap may
/// never be below memory, so one of the pair can only go back after the other.
pub fn restore(originals: &[Original]) -> Restored {
    let mut restored = Restored::default();
    let mut failed: Vec<(&Original, io::Error)> = Vec::new();
    for pass in 0..2 {
        let todo: Vec<&Original> = match pass {
            0 => originals.iter().collect(),
            _ => std::mem::take(&mut failed)
                .into_iter()
                .map(|(o, _)| o)
                .collect(),
        };
        for original in todo {
            let now = match fs::read_to_string(&original.file) {
                Ok(now) => now,
                Err(err) if gone(&err) => {
                    restored.gone = true;
                    continue;
                }
                Err(err) => {
                    failed.push((original, err));
                    continue;
                }
            };
            if now.trim() == original.value {
                continue;
            }
            match fs::write(&original.file, &original.value) {
                Ok(()) => restored.written.push(format!(
                    "{}: {}",
                    original.file.display(),
                    original.value
                )),
                Err(err) if gone(&err) => restored.gone = true,
                Err(err) => failed.push((original, err)),
            }
        }
    }
    restored.errors = failed
        .into_iter()
        .map(|(o, err)| format!("writing '{}' back to {}: {err}", o.value, o.file.display()))
        .collect();
    restored
}

/// A cgroup removed meanwhile: ENOENT, or ENODEV from a file of a directory being removed.
fn gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ENODEV)
}

/// Moves every process of nbt's cgroups `ours` back to the target's `home`, hierarchy by
/// hierarchy (`ours` in the order [`TargetCgroups::dirs`] gives `home`'s), until none is left:
/// a process forking meanwhile leaves a child behind, moved at the next round. Returns how many
/// were moved; an error names those that could not be.
pub fn move_back(ours: &[PathBuf], home: &TargetCgroups, layout: &Layout) -> Result<usize> {
    let mut moved = std::collections::BTreeSet::new();
    for _round in 0..50 {
        let mut left = Vec::new();
        for dir in ours {
            let to = home_of(dir, home, layout);
            for pid in super::cgroup::procs_of(dir) {
                if fs::write(to.join("cgroup.procs"), pid.to_string()).is_ok() {
                    moved.insert(pid);
                } else if Path::new(&format!("/proc/{pid}")).exists() {
                    left.push(pid);
                }
            }
        }
        if left.is_empty() {
            return Ok(moved.len());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!(
        "processes in {} could not be moved back to {}",
        ours[0].display(),
        home.v2.display()
    )
}

/// Moves the one process `pid` from nbt's cgroups `ours` back to `home`, in every hierarchy.
/// Returns 1 when it moved, 0 when it could not (it ended meanwhile, say).
pub fn move_back_one(pid: i32, ours: &[PathBuf], home: &TargetCgroups, layout: &Layout) -> usize {
    let mut moved = true;
    for dir in ours {
        let to = home_of(dir, home, layout);
        moved &= fs::write(to.join("cgroup.procs"), pid.to_string()).is_ok();
    }
    usize::from(moved)
}

/// The target's directory in the hierarchy nbt's cgroup `dir` is in.
fn home_of(dir: &Path, home: &TargetCgroups, layout: &Layout) -> PathBuf {
    for controller in CONTROLLERS {
        if layout.placement(controller) == Some(Placement::V1)
            && dir.starts_with(&layout.v1_self[controller])
        {
            if let Some(home) = home.v1.get(controller) {
                return home.clone();
            }
        }
    }
    home.v2.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_writes_back_only_what_changed_and_survives_a_removed_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let changed = dir.path().join("memory.max");
        let same = dir.path().join("pids.max");
        fs::write(&changed, "67108864\n").unwrap();
        fs::write(&same, "max\n").unwrap();
        let originals = vec![
            Original {
                file: changed.clone(),
                value: "max".into(),
            },
            Original {
                file: same.clone(),
                value: "max".into(),
            },
            Original {
                file: dir.path().join("gone/cpu.max"),
                value: "max 100000".into(),
            },
        ];
        let restored = restore(&originals);
        assert_eq!(fs::read_to_string(&changed).unwrap(), "max");
        assert_eq!(restored.written.len(), 1, "{restored:?}");
        assert!(restored.gone);
        assert!(restored.errors.is_empty(), "{restored:?}");
    }
}
