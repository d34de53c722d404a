//! Records of live runs, so that `nbt cleanup` can remove what a crashed nbt left behind, and only
//! that. A record is written before a run makes anything and removed after it removed everything.
//!
//! The state directory is private: 0700, its files 0600, each record read without following a
//! link and only when nbt's own user owns it (`sys::private`). A record is rewritten whole under a
//! fresh name and renamed into place, under `runs/records.lock`, so that two writers (`nbt set`
//! and a schedule's step) neither tear it nor lose each other's change.

pub(crate) mod cleanup;
pub(crate) mod hwcaps;
pub(crate) mod live;

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::sys::private::{self, WideMode};

/// Where records live; `NBT_STATE_DIR` overrides it.
pub fn state_dir() -> PathBuf {
    std::env::var_os("NBT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/nbt"))
}

/// Makes the state directory `dir` and its `runs/` (0700), or checks them: one nbt made wider
/// before is tightened (said once), one of another user's refused.
pub(crate) fn private_state_dir(dir: &Path) -> Result<()> {
    private::private_dir(dir, "the state directory")?;
    private::private_dir(&dir.join("runs"), "the state directory")?;
    Ok(())
}

/// Checks a run's name from outside (argv, the agent's `run` field) before any path is made of
/// it: exactly what [`new_run_name`] makes, `nbt-` and 16 lowercase hex digits. The only names
/// runs have (no flag names a run), and none of them can climb out of `runs/`.
pub fn valid_run_name(name: &str) -> Result<(), String> {
    let valid = name.len() == 20
        && name.starts_with("nbt-")
        && name[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    Err(format!(
        "{shown:?} is not a run name: a run is named `nbt-` and 16 lowercase hex digits \
         (nbt-0123456789abcdef), as `nbt ps` lists it"
    ))
}

/// The longest `--name`.
pub const MAX_LABEL: usize = 64;

/// Checks a name a user gives a run (`--name`): a letter, then letters, digits, `.`, `_` or
/// `-`, at most [`MAX_LABEL`] characters, and not of the form nbt gives its own names.
pub fn valid_label(label: &str) -> Result<(), String> {
    let shown: String = label.chars().take(80).collect();
    let valid = label.len() <= MAX_LABEL
        && label.starts_with(|c: char| c.is_ascii_alphabetic())
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(format!(
            "{shown:?}: a run's name starts with a letter and holds letters, digits, '.', '_' \
             or '-', at most {MAX_LABEL} characters (e.g. train-1)"
        ));
    }
    if valid_run_name(label).is_ok() {
        return Err(format!(
            "{shown:?} has the form of the names nbt gives runs (nbt- and 16 hex digits)"
        ));
    }
    Ok(())
}

/// The run name (`nbt-...`) of the live run `given` names: its own name, or the name it was
/// given with `--name`. A usage error for a name of neither form.
pub fn resolve_run(dir: &Path, given: &str) -> Result<String> {
    if valid_run_name(given).is_ok() {
        return Ok(given.to_string());
    }
    if valid_label(given).is_err() {
        let why = valid_run_name(given).unwrap_err();
        return Err(
            crate::error::PlanError(format!("RUN: {why}, or the name given with --name")).into(),
        );
    }
    RunRecord::read_all(dir)
        .into_iter()
        .filter_map(|(_, record)| record.ok())
        .find(|record| record.label.as_deref() == Some(given) && record.supervisor_alive())
        .map(|record| record.name)
        .ok_or_else(|| {
            anyhow::anyhow!("no live run named '{given}' (see `nbt ps` for the live runs)")
        })
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
    /// The last minutes of its time series, rewritten at each sample, for `nbt ps`, `nbt top`
    /// and the agent (`live::LiveSeries`).
    pub series: PathBuf,
    /// Its own events so far (schedule, restarts), appended as they happen, for `nbt top`
    /// (`live::LiveEvents`).
    pub live_events: PathBuf,
}

impl RunFiles {
    pub fn of(dir: &Path, run: &str) -> RunFiles {
        let runs = dir.join("runs");
        RunFiles {
            record: runs.join(format!("{run}.json")),
            reports: runs.join(format!("{run}.reports")),
            events: runs.join(format!("{run}.events")),
            hwcaps: dir.join(format!("{run}.hwcaps")),
            series: runs.join(format!("{run}.series")),
            live_events: runs.join(format!("{run}.live-events")),
        }
    }
}

/// The supervisor "pid" of a zone's records (`nbt zone apply`): no process holds a zone, its
/// pinned programs and cgroups do, until `nbt zone remove`.
pub const ZONE_HOLDER: i32 = 0;

/// Whether the nbt with this pid and start time still runs (a pid alone may have been reused).
/// A zone's ([`ZONE_HOLDER`]) lives until it is removed.
pub fn supervisor_alive(pid: i32, start_time: u64) -> bool {
    pid == ZONE_HOLDER || crate::sys::proc::process_start_time(pid) == Some(start_time)
}

/// One `--link` of a live run: its destinations as given, its limits now, its delay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkSetting {
    pub to: Vec<String>,
    pub net: crate::enforce::shaper::NetLimits,
    pub latency: Option<crate::enforce::edt::Latency>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    /// The name given with `--name`, unique among live runs.
    #[serde(default)]
    pub label: Option<String>,
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
    /// Each `--link` of the run, described ("to 10.0.0.0/8: egress 100mbit ..."), in the order
    /// of its counters (link 1 and up).
    #[serde(default)]
    pub links: Vec<String>,
    /// Each `--link`'s destinations and limits as last set (at start, or by `nbt set --link`),
    /// in the order of `links`: what `nbt set --link` changes.
    #[serde(default)]
    pub link_settings: Vec<LinkSetting>,
    /// Where the run's BPF links are pinned: they hold while it runs, and after its nbt died.
    #[serde(default)]
    pub pins: Option<PathBuf>,
    /// The qdiscs the run put on interfaces (with --latency), for `nbt cleanup` to take off.
    #[serde(default)]
    pub qdiscs: Option<crate::enforce::edt::Qdiscs>,
    /// When the run's workload started, in seconds since the Unix epoch.
    #[serde(default)]
    pub started_unix: f64,
    /// Where the run's duplicate and corrupt apply (`--impair-direction`): `nbt set` and a
    /// schedule change them there.
    #[serde(default)]
    pub impair_direction: crate::enforce::shaper::Directions,
    /// An attachment's hold on a workload nbt did not start (`nbt attach`): what goes back at
    /// its end, also when `nbt cleanup` ends it.
    #[serde(default)]
    pub attached: Option<Attached>,
    /// A zone's (`nbt zone apply`): it has no supervisor ([`ZONE_HOLDER`]).
    #[serde(default)]
    pub zone: Option<Zone>,
}

/// What a zone keeps in its record beyond a run's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Zone {
    /// Where its receipt goes when it is removed.
    pub receipts: PathBuf,
    /// The profile it was applied with.
    pub profile: String,
    pub limits: crate::enforce::cgroup::Limits,
    /// The hardware caps it set, for people ("GPU 0 power limit 75 W").
    #[serde(default)]
    pub hardware: Vec<String>,
    /// Processes moved in (`nbt zone attach`): each goes back home when the zone is removed.
    #[serde(default)]
    pub moved: Vec<MovedIn>,
}

/// A process moved into a zone, and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedIn {
    pub pid: i32,
    /// Its start time, so that a reused pid is not moved.
    pub start_time: u64,
    pub home: crate::enforce::target::TargetCgroups,
}

/// What an attachment holds of its target, written before anything of it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    /// "pid", "cgroup", "container" or "unit".
    pub kind: String,
    /// The target as described to people ("container web (3f2a1b2c3d4e)").
    pub target: String,
    /// The target's cgroups; for `--pid`, those its process goes back to.
    pub cgroups: crate::enforce::target::TargetCgroups,
    /// The values of the target's limit files before nbt wrote them (none for `--pid`: nbt
    /// writes only in cgroups of its own then).
    pub originals: Vec<crate::enforce::target::Original>,
    /// The process was moved into the run's own cgroups (`--pid`).
    pub moved: bool,
}

impl RunRecord {
    pub fn path(dir: &Path, name: &str) -> PathBuf {
        RunFiles::of(dir, name).record
    }

    /// Writes the record (0600, whole, renamed into place) under the records' lock; the state
    /// directory is made private first.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        private_state_dir(dir)?;
        let _lock = RecordsLock::take(dir)?;
        // Under the lock: of two runs given the same name at once, one gets it; of two
        // attachments to one target started at once, one gets it (the other would restore, at
        // its end, the values the first wrote).
        if self.label.is_some() || self.attached.is_some() {
            let others: Vec<RunRecord> = Self::read_all(dir)
                .into_iter()
                .filter_map(|(_, record)| record.ok())
                .filter(|r| r.name != self.name)
                .collect();
            if let Some(label) = &self.label {
                let taken = others
                    .iter()
                    .find(|r| r.label.as_deref() == Some(label) && r.supervisor_alive());
                if let Some(other) = taken {
                    return Err(crate::error::PlanError(format!(
                        "--name {label}: the live run {} already has that name",
                        other.name
                    ))
                    .into());
                }
            }
            if let Some(mine) = &self.attached {
                let holder = others.iter().find(|r| {
                    r.attached
                        .as_ref()
                        .is_some_and(|a| a.cgroups.v2 == mine.cgroups.v2)
                });
                if let Some(other) = holder {
                    anyhow::bail!(
                        "{} is already under nbt's attachment {} (`nbt detach {}` ends it)",
                        mine.target,
                        other.name,
                        other.name
                    );
                }
            }
        }
        self.write_locked(dir)
    }

    /// [`RunRecord::write`] by a caller that holds the [`RecordsLock`] of `dir`.
    pub(crate) fn write_locked(&self, dir: &Path) -> Result<PathBuf> {
        valid_run_name(&self.name).map_err(anyhow::Error::msg)?;
        let path = Self::path(dir, &self.name);
        private::replace_private(&path, &serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    /// Reads the record at `path`: not through a link, owned by nbt's user, 0600 (one an older
    /// nbt wrote 0644 is tightened).
    fn read(path: &Path) -> Result<RunRecord> {
        let bytes = private::read_private(path, "the run record", WideMode::Tighten)?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
    }

    /// The record of the live run `name`, or why there is none. `name` comes from outside (argv,
    /// the agent): it is checked before a path is made of it, a bad one is a usage error.
    pub fn find_live(dir: &Path, name: &str) -> Result<(PathBuf, RunRecord)> {
        valid_run_name(name).map_err(|why| crate::error::PlanError(format!("RUN: {why}")))?;
        let path = Self::path(dir, name);
        let record = match Self::read(&path) {
            Ok(record) => record,
            Err(err) if is_not_found(&err) => {
                anyhow::bail!("no run named '{name}' (see `nbt ps` for the live runs)")
            }
            Err(err) => return Err(err),
        };
        if !record.supervisor_alive() {
            anyhow::bail!("run '{name}' is not live: its nbt (pid {}) is gone; `nbt cleanup` removes what it left", record.supervisor_pid);
        }
        Ok((path, record))
    }

    /// Whether the nbt that wrote this record still runs.
    pub fn supervisor_alive(&self) -> bool {
        supervisor_alive(self.supervisor_pid, self.supervisor_start_time)
    }

    /// Every record in `dir`, each read as [`RunRecord::find_live`] reads one. A record removed
    /// between the listing and its reading (its run just ended) is left out, not an error.
    pub fn read_all(dir: &Path) -> Vec<(PathBuf, Result<RunRecord>)> {
        let Ok(entries) = fs::read_dir(dir.join("runs")) else {
            return Vec::new();
        };
        let mut records: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|path| {
                let record = Self::read(&path);
                (path, record)
            })
            .filter(|(_, record)| !record.as_ref().is_err_and(is_not_found))
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
    }
}

fn is_not_found(err: &anyhow::Error) -> bool {
    err.root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The lock every writer of a record holds (`runs/records.lock`, flock): a read-modify-write of
/// a record (`nbt set`, a schedule's step, `nbt balance`) is whole, and no change is lost to
/// another made at the same time. One lock for all runs: changes are rare and quick.
pub(crate) struct RecordsLock {
    _file: fs::File,
}

impl RecordsLock {
    pub(crate) fn take(dir: &Path) -> Result<RecordsLock> {
        let file = private::lock(&dir.join("runs").join("records.lock"))?;
        Ok(RecordsLock { _file: file })
    }
}

/// Removes the record file when dropped (after the run's cgroups and pins went), unless some of
/// them are still there: then the record stays, for `nbt cleanup` to find them. The removal
/// holds the records' lock: a change being made to the record now is finished first and does
/// not bring it back after.
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

impl RecordGuard {
    /// Leaves the record on disk, for a zone (`nbt zone remove` removes it).
    pub fn keep(self) {
        std::mem::forget(self);
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
            let lock = self
                .path
                .parent()
                .and_then(|runs| private::lock(&runs.join("records.lock")).ok());
            let _ = fs::remove_file(&self.path);
            drop(lock);
        } else {
            eprintln!(
                "nbt: could not remove {}; its record {} stays for `nbt cleanup`",
                left.join(", "),
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_are_only_those_nbt_makes() {
        valid_run_name(&new_run_name().unwrap()).unwrap();
        valid_run_name("nbt-0123456789abcdef").unwrap();
        for bad in [
            "",
            "../../x",
            "nbt-0123456789abcde",
            "nbt-0123456789abcdef0",
            "nbt-0123456789ABCDEF",
            "nbt-../../../../etc/x",
            "nbt-0123456789abcde/",
            "xbt-0123456789abcdef",
        ] {
            let err = valid_run_name(bad).unwrap_err();
            assert!(
                err.contains("not a run name") && err.contains("16 lowercase hex"),
                "{err}"
            );
        }
    }

    fn bare_record(name: &str) -> RunRecord {
        RunRecord {
            name: name.into(),
            label: None,
            supervisor_pid: 1,
            supervisor_start_time: 0,
            cgroups: Vec::new(),
            command: vec!["nbt".into()],
            net: Default::default(),
            maps: None,
            ledger: None,
            edt_map: None,
            latency: None,
            links: Vec::new(),
            pins: None,
            qdiscs: None,
            started_unix: 0.0,
            impair_direction: Default::default(),
            attached: None,
            zone: None,
            link_settings: Vec::new(),
        }
    }

    /// Two attachments to one target: the second record is refused when written, under the
    /// records' lock, whatever the checks before it saw.
    #[test]
    fn a_target_is_attached_once() {
        let dir = tempfile::tempdir().unwrap();
        let attached = |v2: &str| Attached {
            kind: "cgroup".into(),
            target: format!("cgroup {v2}"),
            cgroups: crate::enforce::target::TargetCgroups {
                v2: PathBuf::from(v2),
                v1: Default::default(),
            },
            originals: Vec::new(),
            moved: false,
        };
        let mut first = bare_record("nbt-00000000000000a1");
        first.attached = Some(attached("/sys/fs/cgroup/web"));
        first.write(dir.path()).unwrap();
        // Written again (as a run does once armed): its own record is no rival.
        first.write(dir.path()).unwrap();
        let mut second = bare_record("nbt-00000000000000a2");
        second.attached = Some(attached("/sys/fs/cgroup/web"));
        let err = second.write(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(
                "cgroup /sys/fs/cgroup/web is already under nbt's attachment nbt-00000000000000a1"
            ),
            "{err}"
        );
        assert!(!RunRecord::path(dir.path(), "nbt-00000000000000a2").exists());
        let mut other = bare_record("nbt-00000000000000a3");
        other.attached = Some(attached("/sys/fs/cgroup/db"));
        other.write(dir.path()).unwrap();
    }

    #[test]
    fn writers_at_once_never_tear_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let record = |i: usize| RunRecord {
            supervisor_pid: i as i32,
            cgroups: vec![PathBuf::from("/x"); i % 50],
            command: vec!["a".repeat(i * 7)],
            ..bare_record("nbt-00000000000000aa")
        };
        std::thread::scope(|scope| {
            for t in 0..8 {
                let (dir, record) = (dir.path(), &record);
                scope.spawn(move || {
                    for i in 0..50 {
                        record(t * 50 + i).write(dir).unwrap();
                    }
                });
            }
            // Read while they write: always a whole record.
            for _ in 0..200 {
                let path = RunRecord::path(dir.path(), "nbt-00000000000000aa");
                if path.exists() {
                    RunRecord::read(&path).unwrap();
                }
            }
        });
        let runs = dir.path().join("runs");
        let mut left: Vec<String> = fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["nbt-00000000000000aa.json", "records.lock"]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&runs), 0o700);
        assert_eq!(mode(&runs.join("nbt-00000000000000aa.json")), 0o600);
    }
}
