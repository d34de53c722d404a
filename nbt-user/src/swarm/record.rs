//! A live swarm on disk (`STATE_DIR/swarms/NAME.json`, beside the runs' records): who runs it and where its nodes are, for
//! `nbt swarm ps`, `nbt swarm set`, `nbt swarm fault` and `nbt cleanup`. Removed on drop.

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

impl SwarmRecord {
    /// Writes the record of `swarm`, run by this process; refused while a live one of that
    /// name exists.
    pub fn create(swarm: &Swarm) -> Result<SwarmRecord> {
        let dir = swarms_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
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

    /// Removes the record file (when the swarm ends, or a dead one's by `nbt cleanup`).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Removes the record and the directory of its nodes' summaries (`NAME.d`).
    fn remove_all(&self) {
        self.remove();
        let _ = std::fs::remove_dir_all(swarms_dir().join(format!("{}.d", self.name)));
    }
}

/// What dead swarms left: their namespaces and records, removed (or only listed, `dry_run`);
/// the lines saying what was done, and whether everything went.
pub fn cleanup(dry_run: bool) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
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
            record.remove_all();
            lines.push(format!("removed the record of dead swarm {}", record.name));
        }
    }
    (lines, ok)
}
