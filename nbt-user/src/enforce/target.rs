//! The cgroups of a workload nbt did not start (`nbt attach`): where they are, the values of the
//! limit files nbt may write there, and how to put those values back.
//!
//! nbt changes nothing of a target's cgroups but its limit files; each is read before the first
//! write (`cgroup::snapshot`) and written back at the end ([`restore`]), so the target ends as it
//! was. Processes moved into nbt's own cgroups (`--pid`) go back where they came from
//! (`cgroup::move_back`). Finding the directories needs the cgroup layout: `enforce::cgroup`.

use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
