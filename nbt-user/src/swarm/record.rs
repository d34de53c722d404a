//! A live swarm on disk (`STATE_DIR/swarms/NAME.json`, beside the runs' records): who runs it and where its nodes are, for
//! `nbt swarm ps`, `nbt swarm set`, `nbt swarm fault` and `nbt cleanup`. Removed on drop.
//!
//! Every writer holds `swarms/records.lock` (flock): two `nbt swarm up` of one name at once
//! cannot both find no live record and both write one (the second would have taken the first's
//! record, and `nbt cleanup` its namespaces), and `nbt cleanup` cannot remove a record, or a
//! namespace, that a swarm starting at the same moment has just made.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::file::Swarm;
use super::net;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub addr: String,
    /// Its runs' `--name` (`SWARM.NODE`).
    pub label: String,
    pub netns: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwarmRecord {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
    pub started_unix: f64,
    pub hub: String,
    pub nodes: Vec<NodeEntry>,
    #[serde(skip)]
    path: PathBuf,
}

/// Where swarm records live.
pub fn swarms_dir() -> PathBuf {
    crate::state::state_dir().join("swarms")
}

/// The swarm records' lock in `dir`, made with the directory when absent; held until dropped.
fn lock(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    Ok(crate::sys::private::lock(&dir.join("records.lock"))?)
}

impl SwarmRecord {
    /// Writes the record of `swarm`, run by this process; refused while a live one of that
    /// name exists.
    pub fn create(swarm: &Swarm) -> Result<SwarmRecord> {
        SwarmRecord::create_in(&swarms_dir(), swarm)
    }

    fn create_in(dir: &Path, swarm: &Swarm) -> Result<SwarmRecord> {
        let _lock = lock(dir)?;
        let path = dir.join(format!("{}.json", swarm.name));
        if let Ok(old) = SwarmRecord::read(&path) {
            if old.alive() {
                bail!(
                    "swarm '{}' is running already (nbt pid {})",
                    swarm.name,
                    old.pid
                );
            }
        }
        let pid = std::process::id() as i32;
        let record = SwarmRecord {
            name: swarm.name.clone(),
            pid,
            start_time: crate::sys::proc::process_start_time(pid).unwrap_or(0),
            started_unix: crate::sys::proc::now_unix(),
            hub: net::hub_name(&swarm.name),
            nodes: swarm
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.spec.name.clone(),
                    addr: n.addr.to_string(),
                    label: n.label.clone(),
                    netns: net::node_netns(&swarm.name, &n.spec.name),
                })
                .collect(),
            path: path.clone(),
        };
        let tmp = dir.join(format!(".{}.json.tmp", swarm.name));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(record)
    }

    pub fn read(path: &Path) -> Result<SwarmRecord> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut record: SwarmRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        record.path = path.to_path_buf();
        Ok(record)
    }

    /// Whether the nbt that runs it is still there.
    pub fn alive(&self) -> bool {
        crate::sys::proc::process_start_time(self.pid) == Some(self.start_time)
    }

    /// Every swarm record there is, live or not.
    pub fn all() -> Vec<SwarmRecord> {
        let mut found: Vec<SwarmRecord> = std::fs::read_dir(swarms_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| SwarmRecord::read(&e.path()).ok())
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found
    }

    /// The live swarm `name`.
    pub fn find(name: &str) -> Result<SwarmRecord> {
        let path = swarms_dir().join(format!("{name}.json"));
        match SwarmRecord::read(&path) {
            Ok(r) if r.alive() => Ok(r),
            _ => bail!(crate::error::PlanError(format!(
                "no live swarm '{name}' (`nbt swarm ps` lists them)"
            ))),
        }
    }

    /// Its node `node`.
    pub fn node(&self, node: &str) -> Result<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == node).ok_or_else(|| {
            anyhow::Error::new(crate::error::PlanError(format!(
                "invalid value '{node}' for NODE: swarm '{}' has no such node; accepted: {}",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        })
    }

    /// Removes the record file when its swarm ends.
    pub fn remove(&self) {
        let _lock = self.path.parent().map(lock);
        let _ = std::fs::remove_file(&self.path);
    }

    /// Removes a dead swarm's record and the directory of its nodes' summaries (`NAME.d`), the
    /// records' lock held by the caller.
    fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir_all(swarms_dir().join(format!("{}.d", self.name)));
    }
}

/// What dead swarms left: their namespaces and records, removed (or only listed, `dry_run`);
/// the lines saying what was done, and whether everything went.
pub fn cleanup(dry_run: bool) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    let dir = swarms_dir();
    // A dry run makes nothing: it takes the lock only where swarms have run.
    let _lock = if dry_run && !dir.exists() {
        None
    } else {
        match lock(&dir) {
            Ok(file) => Some(file),
            Err(err) => return (vec![format!("{err:#}")], false),
        }
    };
    let live: Vec<SwarmRecord> = SwarmRecord::all()
        .into_iter()
        .filter(|r| r.alive())
        .collect();
    let owned = |ns: &str| {
        live.iter()
            .any(|r| r.hub == ns || r.nodes.iter().any(|n| n.netns == ns))
    };
    for ns in net::swarm_namespaces() {
        if owned(&ns) {
            continue;
        }
        if dry_run {
            lines.push(format!("would remove network namespace {ns}"));
        } else {
            match net::ip(&["netns", "del", &ns]) {
                Ok(()) => lines.push(format!("removed network namespace {ns}")),
                Err(err) => {
                    ok = false;
                    lines.push(format!("{err:#}"));
                }
            }
        }
    }
    for record in SwarmRecord::all().into_iter().filter(|r| !r.alive()) {
        if dry_run {
            lines.push(format!(
                "would remove the record of dead swarm {}",
                record.name
            ));
        } else {
            record.remove_files();
            lines.push(format!("removed the record of dead swarm {}", record.name));
        }
    }
    (lines, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWARM: &str = r#"
        name = "race"
        [[node]]
        name = "a"
        command = ["true"]
    "#;

    /// Two `nbt swarm up` of one name at the same moment: one gets the record, every other is
    /// told the swarm runs already.
    #[test]
    fn swarms_of_one_name_started_at_once_get_one_record() {
        let swarm = super::super::file::parse(SWARM, "race").expect("swarm file");
        let dir = std::env::temp_dir().join(format!("nbt-swarm-race-{}", std::process::id()));
        for round in 0..50 {
            let _ = std::fs::remove_file(dir.join("race.json"));
            let barrier = std::sync::Barrier::new(8);
            let made: Vec<Result<SwarmRecord>> = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            SwarmRecord::create_in(&dir, &swarm)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let ok = made.iter().filter(|r| r.is_ok()).count();
            assert_eq!(ok, 1, "round {round}: {ok} of 8 made the record");
            for err in made.iter().filter_map(|r| r.as_ref().err()) {
                assert!(
                    format!("{err:#}").contains("swarm 'race' is running already"),
                    "{err:#}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
