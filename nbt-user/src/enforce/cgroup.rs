//! Cgroups: find the hierarchies, make a run's cgroups beneath nbt's own, set the limits, read the
//! accounting, and remove everything at the end.
//!
//! Two layouts are handled (docs/running.md, "Cgroup layouts"):
//! - unified: cgroup v2 with its controllers; one directory per run holds limits and BPF programs.
//! - hybrid: a v2 tree without controllers (BPF attaches there) plus v1 hierarchies that carry the
//!   memory, cpu and pids controllers. A run gets one directory in each, and the child joins all.
//!
//! Run cgroups are always created beneath the cgroup nbt itself is in, in each hierarchy.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use super::target::{self, Original, Restored, TargetCgroups};
use crate::sys::kept::KeptFiles;
use crate::sys::mountinfo::{self, Mount};

/// The controllers nbt sets limits with or reads accounting from.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// How peaks the kernel does not keep are measured (the run loop samples at this interval).
pub const SAMPLED: &str = "sampled every 100 ms";

/// The scheduler period nbt uses for CPU quotas: 100 ms, the kernel's default.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where a controller lives on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    V2,
    V1,
}

/// The cgroup hierarchies of this machine, seen from nbt's own process.
#[derive(Debug, Clone)]
pub struct Layout {
    /// nbt's own cgroup in the v2 hierarchy (a directory), if cgroup2 is mounted.
    pub v2_self: Option<PathBuf>,
    /// Controllers the v2 cgroup of nbt can hand to its children (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// nbt's own cgroup in each v1 hierarchy, by controller name.
    pub v1_self: BTreeMap<String, PathBuf>,
}

/// Parses /proc/self/cgroup into (controllers, path) pairs; v2 is the entry with no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` (as /proc/self/cgroup names it) under a mount of that hierarchy.
fn cgroup_dir(mount: &Mount, path: &str) -> PathBuf {
    let relative = path
        .strip_prefix(mount.root.trim_end_matches('/'))
        .unwrap_or(path);
    match relative.trim_start_matches('/') {
        "" => mount.mount_point.clone(),
        relative => mount.mount_point.join(relative),
    }
}

impl Layout {
    pub fn detect() -> Result<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .context("reading /proc/self/cgroup (is /proc mounted, with cgroup support?)")?;
        Ok(Self::from_texts(&mountinfo, &own))
    }

    /// The cgroups of another process, from its /proc/PID/cgroup `text`: `v2_self` and `v1_self`
    /// are that process's directories.
    pub fn of_process_text(text: &str) -> Result<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
        Ok(Self::from_texts(&mountinfo, text))
    }

    /// The cgroup `path` in every hierarchy: a path as /proc/PID/cgroup names one
    /// (`/docker/3f2a...`), or a directory under a cgroup mount (`/sys/fs/cgroup/docker/...`).
    pub fn of_cgroup_path(path: &str) -> Result<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
        let mut mounts: Vec<Mount> = mountinfo::parse(&mountinfo)
            .into_iter()
            .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
            .collect();
        // The longest first: /sys/fs/cgroup/unified before /sys/fs/cgroup.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
        let relative = mounts
            .iter()
            .find_map(|m| {
                let below = Path::new(path).strip_prefix(&m.mount_point).ok()?;
                let root = m.root.trim_end_matches('/');
                Some(format!("{root}/{}", below.display()))
            })
            .unwrap_or_else(|| path.to_string());
        let relative = relative.trim_end_matches('/');
        let relative = if relative.is_empty() { "/" } else { relative };
        let as_proc = format!("0::{relative}\n1:{}:{relative}\n", CONTROLLERS.join(","));
        Ok(Self::from_texts(&mountinfo, &as_proc))
    }

    fn from_texts(mountinfo: &str, own_cgroups: &str) -> Layout {
        let mounts = mountinfo::parse(mountinfo);
        let own = parse_proc_cgroup(own_cgroups);
        let mut layout = Layout {
            v2_self: None,
            v2_controllers: Vec::new(),
            v1_self: BTreeMap::new(),
        };
        for (controllers, path) in &own {
            if controllers.is_empty() {
                if let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") {
                    let dir = cgroup_dir(mount, path);
                    layout.v2_controllers = fs::read_to_string(dir.join("cgroup.controllers"))
                        .map(|s| s.split_whitespace().map(str::to_string).collect())
                        .unwrap_or_default();
                    layout.v2_self = Some(dir);
                }
                continue;
            }
            for controller in controllers {
                let mount = mounts.iter().find(|m| {
                    m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller)
                });
                if let Some(mount) = mount {
                    layout
                        .v1_self
                        .insert(controller.clone(), cgroup_dir(mount, path));
                }
            }
        }
        layout
    }

    /// Where `controller` is used for a run: v2 where the v2 tree has it, else v1, else nowhere.
    pub fn placement(&self, controller: &str) -> Option<Placement> {
        if self.v2_self.is_some() && self.v2_controllers.iter().any(|c| c == controller) {
            Some(Placement::V2)
        } else if self.v1_self.contains_key(controller) {
            Some(Placement::V1)
        } else {
            None
        }
    }

    /// "unified", "hybrid" or "legacy", as systemd names the three.
    pub fn mode(&self) -> &'static str {
        match (
            &self.v2_self,
            CONTROLLERS
                .iter()
                .any(|c| self.placement(c) == Some(Placement::V1)),
        ) {
            (Some(_), false) => "unified",
            (Some(_), true) => "hybrid",
            (None, _) => "legacy",
        }
    }

    /// The v2 directory nbt's runs go beneath; BPF programs need it.
    pub fn require_v2(&self) -> Result<&Path> {
        self.v2_self.as_deref().ok_or_else(|| {
            anyhow!(
                "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo); nbt attaches its \
                 BPF programs to a cgroup v2 directory: mount it with \
                 `mount -t cgroup2 none /sys/fs/cgroup/unified`"
            )
        })
    }

    /// The directories a run named `name` gets, in the order they are made: v2 first, then one
    /// per v1 hierarchy that carries a controller nbt uses.
    pub fn run_dirs(&self, name: &str) -> Result<Vec<PathBuf>> {
        let mut dirs = vec![self.require_v2()?.join(name)];
        for controller in CONTROLLERS {
            if self.placement(controller) == Some(Placement::V1) {
                let dir = self.v1_self[controller].join(name);
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        Ok(dirs)
    }

    /// Whether v1 memory cgroups account swap (`swapaccount=1`): needed for `--swap` on v1.
    pub fn v1_swap_accounting(&self) -> bool {
        self.v1_self
            .get("memory")
            .is_some_and(|dir| dir.join("memory.memsw.limit_in_bytes").exists())
    }
}

/// The limits a run's cgroups enforce. `None` leaves the kernel's default (no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub cpu_millicores: Option<u64>,
    pub pids: Option<u64>,
}

/// A run's cgroups: one v2 directory and, on hybrid hosts, one directory per v1 controller.
/// Dropping it kills whatever still runs inside and removes the directories.
#[derive(Debug)]
pub struct RunCgroup {
    pub name: String,
    pub v2: PathBuf,
    /// The controller directories of the run: memory, cpu, pids (v2 ones point at `v2`).
    controllers: BTreeMap<&'static str, (Placement, PathBuf)>,
    /// Every directory made, in creation order; removed in reverse.
    created: Vec<PathBuf>,
    peaks: SampledPeaks,
    /// The files sampled while the run lives, kept open.
    kept: KeptFiles,
    ownership: Ownership,
}

/// Whose cgroups a [`RunCgroup`] holds, which says what its end does.
#[derive(Debug)]
enum Ownership {
    /// nbt made them for a workload it started: what is left is killed, the directories removed.
    Made,
    /// nbt made them and moved a process in (`nbt attach --pid`): what is left goes back home,
    /// then the directories are removed. Nothing is killed.
    Moved { home: TargetCgroups, layout: Layout },
    /// Another's cgroups (`nbt attach --cgroup`): the limit files nbt may have written go back to
    /// these values. Nothing is killed or removed.
    Adopted { originals: Vec<Original> },
    /// Those of a live run another nbt holds (`nbt set`, `nbt fault`): changed, never removed.
    Borrowed,
}

#[derive(Debug, Default)]
struct SampledPeaks {
    memory_bytes: u64,
    swap_bytes: u64,
    pids: u64,
}

/// The largest pids limit: the kernel's PID_MAX_LIMIT on 64-bit machines (pids.max refuses
/// more).
pub const MAX_PIDS: u64 = 4 << 20;

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing '{value}' to {}", path.display()))
}

/// Writes a v1 memory limit (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`). The kernel
/// refuses (EBUSY) a limit below what the cgroup holds that it cannot reclaim down to, where v2
/// reclaims or OOM-kills: that refusal is said in those words, with what the cgroup holds.
fn write_v1_memory_limit(path: &Path, bytes: Option<u64>) -> Result<()> {
    let written = write_file(path, &limit_text(bytes, "-1"));
    let refused = written
        .as_ref()
        .err()
        .and_then(|err| err.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error)
        == Some(libc::EBUSY);
    let (Some(bytes), true) = (bytes, refused) else {
        return written;
    };
    let usage_file = path.with_file_name(
        path.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .replace("limit_in_bytes", "usage_in_bytes"),
    );
    let holds = read_trimmed(&usage_file)
        .and_then(|t| t.parse::<u64>().ok())
        .map_or_else(|| "more".to_string(), crate::units::format_size);
    bail!(
        "{}: the kernel could not reclaim the run's memory down to {} (it holds {holds}): \
         cgroup v1 refuses a limit it cannot reclaim to (v2 would OOM-kill)",
        path.display(),
        crate::units::format_size(bytes)
    )
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// A limit as a cgroup file takes it: the number, or the file's word for none.
fn limit_text(value: Option<u64>, none: &str) -> String {
    value.map_or_else(|| none.to_string(), |v| v.to_string())
}

/// Reads `key value` lines (memory.stat, cpu.stat, memory.events, pids.events) into a map.
#[cfg(test)]
fn read_keyed(path: &Path) -> BTreeMap<String, u64> {
    parse_keyed(&fs::read_to_string(path).unwrap_or_default())
}

/// `key value` lines into a map.
fn parse_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

impl RunCgroup {
    fn read_trimmed(&self, path: &Path) -> Option<String> {
        self.kept.read(path).map(|s| s.trim().to_string())
    }

    fn read_u64(&self, path: &Path) -> Option<u64> {
        self.read_trimmed(path)?.parse().ok()
    }

    fn read_keyed(&self, path: &Path) -> BTreeMap<String, u64> {
        parse_keyed(&self.kept.read(path).unwrap_or_default())
    }

    /// Makes the run's directories and applies `limits`. Fails, removing what it made, if a limit
    /// cannot be enforced on this machine.
    pub fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<RunCgroup> {
        let v2_parent = layout.require_v2()?.to_path_buf();
        let mut run = RunCgroup {
            name: name.to_string(),
            v2: v2_parent.join(name),
            controllers: BTreeMap::new(),
            created: Vec::new(),
            peaks: SampledPeaks::default(),
            kept: KeptFiles::default(),
            ownership: Ownership::Made,
        };
        let v2_wanted: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| layout.placement(c) == Some(Placement::V2))
            .collect();
        enable_v2_controllers(&v2_parent, &v2_wanted)?;
        run.make_dir(&run.v2.clone())?;
        for controller in CONTROLLERS {
            match layout.placement(controller) {
                Some(Placement::V2) => {
                    run.controllers
                        .insert(controller, (Placement::V2, run.v2.clone()));
                }
                Some(Placement::V1) => {
                    let dir = layout.v1_self[controller].join(name);
                    run.make_dir(&dir)?;
                    run.controllers.insert(controller, (Placement::V1, dir));
                }
                None => {}
            }
        }
        run.apply(layout, limits)?;
        Ok(run)
    }

    /// The cgroups of a live run another nbt made (for `nbt fault`): changed, never removed.
    /// `adopted`: the target's, for an attachment to another's cgroup.
    pub fn existing(
        layout: &Layout,
        name: &str,
        adopted: Option<&TargetCgroups>,
    ) -> Result<RunCgroup> {
        if let Some(target) = adopted {
            return Ok(Self::of_target(layout, name, target, Ownership::Borrowed));
        }
        let v2 = layout.require_v2()?.join(name);
        if !v2.is_dir() {
            bail!("run '{name}' has no cgroup {}", v2.display());
        }
        let mut controllers = BTreeMap::new();
        for controller in CONTROLLERS {
            match layout.placement(controller) {
                Some(Placement::V2) => {
                    controllers.insert(controller, (Placement::V2, v2.clone()));
                }
                Some(Placement::V1) => {
                    controllers.insert(
                        controller,
                        (Placement::V1, layout.v1_self[controller].join(name)),
                    );
                }
                None => {}
            }
        }
        Ok(RunCgroup {
            name: name.to_string(),
            v2,
            controllers,
            created: Vec::new(),
            peaks: SampledPeaks::default(),
            kept: KeptFiles::default(),
            ownership: Ownership::Borrowed,
        })
    }

    /// Another's cgroups `target` (`nbt attach --cgroup`, `--container`, `--unit`), with `limits`
    /// applied. `originals` ([`target::snapshot`], read before, and recorded where `nbt cleanup`
    /// finds them) go back when it is removed or dropped.
    pub fn adopt(
        layout: &Layout,
        name: &str,
        target: &TargetCgroups,
        originals: Vec<Original>,
        limits: &Limits,
    ) -> Result<RunCgroup> {
        let adopted = Self::of_target(layout, name, target, Ownership::Adopted { originals });
        for (wanted, controller, flag) in [
            (
                limits.memory_bytes.is_some() || limits.swap_bytes.is_some(),
                "memory",
                "--memory/--swap",
            ),
            (limits.cpu_millicores.is_some(), "cpu", "--cpus"),
            (limits.pids.is_some(), "pids", "--pids"),
        ] {
            if !wanted || adopted.controller(controller).is_some() {
                continue;
            }
            match layout.placement(controller) {
                Some(Placement::V2) => bail!(
                    "{flag} needs the '{controller}' controller in the target's cgroup {}, which it \
                     lacks (its parent does not hand it down: cgroup.subtree_control)",
                    target.v2.display()
                ),
                Some(Placement::V1) => bail!(
                    "{flag} needs the target's cgroup in the v1 '{controller}' hierarchy, and it has \
                     none there ({})",
                    target
                        .v1
                        .get(controller)
                        .map_or("none listed".to_string(), |d| format!("no {}", d.display()))
                ),
                None => {}
            }
        }
        adopted.apply(layout, limits)?;
        Ok(adopted)
    }

    fn of_target(
        layout: &Layout,
        name: &str,
        target: &TargetCgroups,
        ownership: Ownership,
    ) -> RunCgroup {
        let controllers = CONTROLLERS
            .into_iter()
            .filter_map(|c| Some((c, target.controller_dir(layout, c)?)))
            .collect();
        RunCgroup {
            name: name.to_string(),
            v2: target.v2.clone(),
            controllers,
            created: Vec::new(),
            peaks: SampledPeaks::default(),
            kept: KeptFiles::default(),
            ownership,
        }
    }

    /// Moves process `pid` (and so what it starts from now on) into the run's cgroups
    /// (`nbt attach --pid`); at the end what is left there goes back to `home`, where it was.
    pub fn take_in(&mut self, pid: i32, home: TargetCgroups, layout: &Layout) -> Result<()> {
        self.ownership = Ownership::Moved {
            home,
            layout: layout.clone(),
        };
        for file in self.procs_files() {
            write_file(&file, &pid.to_string())
                .with_context(|| format!("moving process {pid} into the run's cgroup"))?;
        }
        Ok(())
    }

    /// The memory limit in force (`None`: none).
    pub fn current_memory(&self) -> Option<u64> {
        let (placement, dir) = self.controller("memory")?;
        let text = match placement {
            Placement::V2 => self.read_trimmed(&dir.join("memory.max"))?,
            Placement::V1 => self.read_trimmed(&dir.join("memory.limit_in_bytes"))?,
        };
        // v1 writes "no limit" as a page-rounded i64::MAX.
        text.parse::<u64>().ok().filter(|b| *b < 1 << 62)
    }

    /// The CPU limit in force, in millicores (`None`: none).
    pub fn current_cpus(&self) -> Option<u64> {
        let (placement, dir) = self.controller("cpu")?;
        let (quota, period) = match placement {
            Placement::V2 => {
                let text = self.read_trimmed(&dir.join("cpu.max"))?;
                let mut parts = text.split_whitespace();
                (
                    parts.next()?.parse::<i64>().ok()?,
                    parts.next()?.parse::<i64>().ok()?,
                )
            }
            Placement::V1 => (
                self.read_trimmed(&dir.join("cpu.cfs_quota_us"))?
                    .parse()
                    .ok()?,
                self.read_trimmed(&dir.join("cpu.cfs_period_us"))?
                    .parse()
                    .ok()?,
            ),
        };
        (quota > 0 && period > 0).then(|| (quota * 1000 / period) as u64)
    }

    fn make_dir(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        self.created.push(dir.to_path_buf());
        Ok(())
    }

    fn controller(&self, name: &str) -> Option<&(Placement, PathBuf)> {
        self.controllers.get(name)
    }

    fn require(&self, controller: &str, flag: &str) -> Result<&(Placement, PathBuf)> {
        self.controller(controller).ok_or_else(|| {
            anyhow!(
                "{flag} needs the cgroup '{controller}' controller, which this machine has in neither \
                 cgroup v2 nor v1 (see `nbt probe`)"
            )
        })
    }

    fn apply(&self, layout: &Layout, limits: &Limits) -> Result<()> {
        if limits.memory_bytes.is_some() || limits.swap_bytes.is_some() {
            match self.require("memory", "--memory/--swap")? {
                (Placement::V2, dir) => {
                    if let Some(bytes) = limits.memory_bytes {
                        write_file(&dir.join("memory.max"), &bytes.to_string())?;
                    }
                    if let Some(bytes) = limits.swap_bytes {
                        let file = dir.join("memory.swap.max");
                        if !file.exists() {
                            bail!("--swap needs memory.swap.max, which this kernel lacks (CONFIG_SWAP or CONFIG_MEMCG_SWAP off)");
                        }
                        write_file(&file, &bytes.to_string())?;
                    }
                }
                (Placement::V1, dir) => {
                    // v1 limits memory and memory+swap ("memsw"); the second must not be below the first.
                    if let Some(bytes) = limits.memory_bytes {
                        write_file(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    }
                    if let Some(swap) = limits.swap_bytes {
                        let Some(memory) = limits.memory_bytes else {
                            bail!("--swap needs --memory on cgroup v1, which limits memory and memory+swap together");
                        };
                        if !layout.v1_swap_accounting() {
                            bail!("--swap needs swap accounting in the v1 memory cgroup (memory.memsw.* is missing: boot with swapaccount=1)");
                        }
                        let total = memory.saturating_add(swap);
                        write_file(&dir.join("memory.memsw.limit_in_bytes"), &total.to_string())?;
                    }
                }
            }
        }
        if let Some(millicores) = limits.cpu_millicores {
            let quota_us = millicores * CPU_PERIOD_US / 1000;
            match self.require("cpu", "--cpus")? {
                (Placement::V2, dir) => {
                    write_file(&dir.join("cpu.max"), &format!("{quota_us} {CPU_PERIOD_US}"))?
                }
                (Placement::V1, dir) => {
                    write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_file(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                }
            }
        }
        if let Some(pids) = limits.pids {
            let (_, dir) = self.require("pids", "--pids")?;
            write_file(&dir.join("pids.max"), &pids.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a child must join, one per directory of the run.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<&PathBuf> = vec![&self.v2];
        for (_, dir) in self.controllers.values() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs.into_iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Processes still in the run.
    pub fn pids(&self) -> Vec<i32> {
        procs_of(&self.v2)
    }

    /// Every directory made for the run, in creation order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.created
    }

    /// Records peaks the kernel does not keep on this layout (swap on v1, pids where there is no
    /// `pids.peak`). Call it often, where [`RunCgroup::needs_sampling`] says so.
    pub fn sample(&mut self) {
        if let Some(dir) = self.sampled_memory() {
            let current = self.read_u64(&dir.join("memory.current")).unwrap_or(0);
            self.peaks.memory_bytes = self.peaks.memory_bytes.max(current);
        }
        if let Some(dir) = self.sampled_swap() {
            let swap = self
                .read_keyed(&dir.join("memory.stat"))
                .get("swap")
                .copied();
            self.peaks.swap_bytes = self.peaks.swap_bytes.max(swap.unwrap_or(0));
        }
        if let Some(dir) = self.sampled_pids() {
            let current = self.read_u64(&dir.join("pids.current")).unwrap_or(0);
            self.peaks.pids = self.peaks.pids.max(current);
        }
    }

    /// Whether the summary reports a peak the kernel does not keep here, which only sampling
    /// finds. Elsewhere the kernel keeps every peak (memory.peak, memory.swap.peak, pids.peak)
    /// and nothing needs to be read until the run ends.
    pub fn needs_sampling(&self) -> bool {
        self.sampled_memory().is_some()
            || self.sampled_swap().is_some()
            || self.sampled_pids().is_some()
    }

    /// The v2 memory directory, where it has no `memory.peak` (before Linux 5.19).
    fn sampled_memory(&self) -> Option<&Path> {
        match self.controller("memory") {
            Some((Placement::V2, dir)) if !self.kept.exists(&dir.join("memory.peak")) => {
                Some(dir.as_path())
            }
            _ => None,
        }
    }

    /// The v1 memory directory, where the swap peak is reported (memory+swap accounting on).
    fn sampled_swap(&self) -> Option<&Path> {
        match self.controller("memory") {
            Some((Placement::V1, dir))
                if self.kept.exists(&dir.join("memory.memsw.usage_in_bytes")) =>
            {
                Some(dir.as_path())
            }
            _ => None,
        }
    }

    /// The pids directory, where it has no `pids.peak`.
    fn sampled_pids(&self) -> Option<&Path> {
        match self.controller("pids") {
            Some((_, dir)) if !self.kept.exists(&dir.join("pids.peak")) => Some(dir.as_path()),
            _ => None,
        }
    }

    /// Changes the memory limit of a live run (`None`: no limit).
    /// On v1 with a swap limit, memory+swap ("memsw") keeps the swap allowance it had, written
    /// before the memory limit when the limit rises (memsw may never be below it).
    pub fn set_memory(&self, bytes: Option<u64>) -> Result<()> {
        match self.require("memory", "memory")? {
            (Placement::V2, dir) => write_file(&dir.join("memory.max"), &limit_text(bytes, "max")),
            (Placement::V1, dir) => {
                let limit = |file: &str| {
                    self.read_trimmed(&dir.join(file))
                        .and_then(|t| t.parse::<u64>().ok())
                        .filter(|b| *b < 1 << 62)
                };
                let memory_file = dir.join("memory.limit_in_bytes");
                let swap_allowance = match (
                    limit("memory.memsw.limit_in_bytes"),
                    limit("memory.limit_in_bytes"),
                ) {
                    (Some(memsw), Some(memory)) => Some(memsw.saturating_sub(memory)),
                    _ => None,
                };
                let Some(allowance) = swap_allowance else {
                    return write_v1_memory_limit(&memory_file, bytes);
                };
                let memsw_file = dir.join("memory.memsw.limit_in_bytes");
                let memsw = bytes.map(|b| b.saturating_add(allowance));
                let rising = bytes.is_none_or(|b| Some(b) > limit("memory.limit_in_bytes"));
                if rising {
                    write_v1_memory_limit(&memsw_file, memsw)?;
                    write_v1_memory_limit(&memory_file, bytes)
                } else {
                    write_v1_memory_limit(&memory_file, bytes)?;
                    write_v1_memory_limit(&memsw_file, memsw)
                }
            }
        }
    }

    /// Changes how much swap a live run may use beyond its memory (`None`: no limit). On v1 this
    /// is memory+swap, so it needs a memory limit.
    pub fn set_swap(&self, bytes: Option<u64>) -> Result<()> {
        match self.require("memory", "swap")? {
            (Placement::V2, dir) => {
                write_file(&dir.join("memory.swap.max"), &limit_text(bytes, "max"))
            }
            (Placement::V1, dir) => {
                let file = dir.join("memory.memsw.limit_in_bytes");
                if !file.exists() {
                    bail!("swap needs swap accounting in the v1 memory cgroup (memory.memsw.* is missing: boot with swapaccount=1)");
                }
                let Some(memory) = self.current_memory() else {
                    bail!("swap on cgroup v1 is memory+swap: the run needs a memory limit");
                };
                write_file(
                    &file,
                    &limit_text(bytes.map(|b| memory.saturating_add(b)), "-1"),
                )
            }
        }
    }

    /// Changes the CPU quota of a live run (`None`: no limit).
    pub fn set_cpus(&self, millicores: Option<u64>) -> Result<()> {
        let quota = millicores.map(|m| m * CPU_PERIOD_US / 1000);
        match self.require("cpu", "cpus")? {
            (Placement::V2, dir) => write_file(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", limit_text(quota, "max")),
            ),
            (Placement::V1, dir) => {
                write_file(&dir.join("cpu.cfs_quota_us"), &limit_text(quota, "-1"))
            }
        }
    }

    /// pids.max; `None`: no limit.
    pub fn set_pids(&self, pids: Option<u64>) -> Result<()> {
        let (_, dir) = self.require("pids", "pids")?;
        write_file(&dir.join("pids.max"), &limit_text(pids, "max"))
    }

    /// Freezes (or thaws) every process of the run: v2's cgroup.freeze, present without any
    /// controller.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        write_file(
            &self.v2.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    /// Squeezes the run's memory so that it reclaims (`None`: back to no squeeze). v2: memory.high,
    /// which throttles and reclaims but never OOM-kills; v1 has no such knob, so there it is the
    /// limit itself (memory.limit_in_bytes; the kernel refuses a value it cannot reclaim down to).
    /// Returns which file was written.
    pub fn squeeze_memory(&self, bytes: Option<u64>, limit: Option<u64>) -> Result<&'static str> {
        match self.require("memory", "memory-squeeze")? {
            (Placement::V2, dir) => {
                write_file(&dir.join("memory.high"), &limit_text(bytes, "max"))?;
                Ok("memory.high")
            }
            (Placement::V1, dir) => {
                write_v1_memory_limit(&dir.join("memory.limit_in_bytes"), bytes.or(limit))?;
                Ok("memory.limit_in_bytes (v1)")
            }
        }
    }

    /// What the run holds and has used now, for its time series: the gauges (memory, swap,
    /// processes) and the limits in force as the kernel has them, beside the counters of
    /// [`RunCgroup::stats`].
    pub fn now(&mut self) -> CgroupNow {
        let stats = self.stats();
        let mut now = CgroupNow {
            memory_limit_bytes: self.current_memory(),
            cpu_limit_millicores: self.current_cpus(),
            stats,
            ..CgroupNow::default()
        };
        match self.controller("memory") {
            Some((Placement::V2, dir)) => {
                now.memory_bytes = self.read_u64(&dir.join("memory.current"));
                now.swap_bytes = self.read_u64(&dir.join("memory.swap.current"));
                now.swap_limit_bytes = self.read_u64(&dir.join("memory.swap.max"));
            }
            Some((Placement::V1, dir)) => {
                let memory = self.read_u64(&dir.join("memory.usage_in_bytes"));
                now.memory_bytes = memory;
                // v1 counts memory+swap together: swap is the difference.
                now.swap_bytes = self
                    .read_u64(&dir.join("memory.memsw.usage_in_bytes"))
                    .zip(memory)
                    .map(|(both, memory)| both.saturating_sub(memory));
                now.swap_limit_bytes = self
                    .read_u64(&dir.join("memory.memsw.limit_in_bytes"))
                    .filter(|b| *b < 1 << 62)
                    .zip(now.memory_limit_bytes)
                    .map(|(both, memory)| both.saturating_sub(memory));
            }
            None => {}
        }
        if let Some((_, dir)) = self.controller("pids") {
            now.pids = self.read_u64(&dir.join("pids.current"));
            now.pids_limit = self.read_u64(&dir.join("pids.max"));
        }
        now
    }

    /// The run's CPU time so far, in seconds (v2's cpu.stat, present without any controller).
    pub fn cpu_seconds(&self) -> f64 {
        self.read_keyed(&self.v2.join("cpu.stat"))
            .get("usage_usec")
            .map_or(0.0, |usec| *usec as f64 / 1e6)
    }

    /// The run's accounting, read from the kernel.
    pub fn stats(&mut self) -> CgroupStats {
        self.sample();
        let mut stats = CgroupStats::default();
        let cpu = self.read_keyed(&self.v2.join("cpu.stat"));
        stats.cpu_usage_usec = cpu.get("usage_usec").copied();
        stats.cpu_user_usec = cpu.get("user_usec").copied();
        stats.cpu_system_usec = cpu.get("system_usec").copied();

        match self.controller("memory") {
            Some((Placement::V2, dir)) => {
                (stats.memory_peak_bytes, stats.memory_peak_source) =
                    match self.read_u64(&dir.join("memory.peak")) {
                        Some(peak) => (Some(peak), Some("kernel")),
                        None => (Some(self.peaks.memory_bytes), Some(SAMPLED)),
                    };
                stats.oom_kills = self
                    .read_keyed(&dir.join("memory.events"))
                    .get("oom_kill")
                    .copied();
                if let Some(peak) = self.read_u64(&dir.join("memory.swap.peak")) {
                    stats.swap_peak_bytes = Some(peak);
                    stats.swap_peak_source = Some("kernel");
                }
            }
            Some((Placement::V1, dir)) => {
                stats.memory_peak_bytes = self.read_u64(&dir.join("memory.max_usage_in_bytes"));
                stats.memory_peak_source = stats.memory_peak_bytes.map(|_| "kernel");
                stats.oom_kills = self
                    .read_keyed(&dir.join("memory.oom_control"))
                    .get("oom_kill")
                    .copied();
                if self.kept.exists(&dir.join("memory.memsw.usage_in_bytes")) {
                    stats.swap_peak_bytes = Some(self.peaks.swap_bytes);
                    stats.swap_peak_source = Some(SAMPLED);
                }
            }
            None => {}
        }

        if let Some((placement, dir)) = self.controller("cpu") {
            let cpu = self.read_keyed(&dir.join("cpu.stat"));
            stats.cpu_periods = cpu.get("nr_periods").copied();
            stats.cpu_throttled_periods = cpu.get("nr_throttled").copied();
            stats.cpu_throttled_usec = match placement {
                Placement::V2 => cpu.get("throttled_usec").copied(),
                Placement::V1 => cpu.get("throttled_time").map(|ns| ns / 1000),
            };
        }

        if let Some((_, dir)) = self.controller("pids") {
            (stats.pids_peak, stats.pids_peak_source) = match self.read_u64(&dir.join("pids.peak"))
            {
                Some(peak) => (Some(peak), Some("kernel")),
                None => (Some(self.peaks.pids), Some(SAMPLED)),
            };
            stats.forks_refused = self
                .read_keyed(&dir.join("pids.events"))
                .get("max")
                .copied();
        }

        stats.pressure = Pressure::parse(|file| self.kept.read(&self.v2.join(file)));
        stats
    }

    /// Leaves the cgroups as they are, limits in force, for a zone (`nbt zone apply`) that
    /// outlives this process; `nbt zone remove` removes them.
    pub fn keep(mut self) {
        self.created.clear();
        self.ownership = Ownership::Borrowed;
    }

    /// Ends the run's hold on its cgroups. Idempotent. Its own: kills what is left and removes
    /// them; with a process taken in, moves what is left back home first and kills nothing;
    /// another's: writes its limit files back (what was written back is returned).
    pub fn remove(&mut self) -> Result<Option<Restored>> {
        // Closed first: nothing of ours holds a file of the directories removed.
        self.kept = KeptFiles::default();
        let dirs = std::mem::take(&mut self.created);
        match &mut self.ownership {
            Ownership::Made => kill_and_remove(&dirs).map(|_| None),
            Ownership::Moved { home, layout } => {
                if !dirs.is_empty() {
                    if let Err(err) = move_back(&dirs, home, layout) {
                        self.created = dirs;
                        return Err(err);
                    }
                }
                kill_and_remove(&dirs).map(|_| None)
            }
            Ownership::Adopted { originals } => {
                let originals = std::mem::take(originals);
                Ok((!originals.is_empty()).then(|| target::restore(&originals)))
            }
            Ownership::Borrowed => Ok(None),
        }
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        if let Err(err) = self.remove() {
            eprintln!("nbt: {err:#}");
        }
    }
}

pub(crate) fn procs_of(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in the cgroups `dirs`, waits until they are empty, and removes them, the
/// last made first. Returns how many processes were killed.
pub fn kill_and_remove(dirs: &[PathBuf]) -> Result<usize> {
    let mut killed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = dirs.iter().flat_map(|d| procs_of(d)).collect();
        if pids.is_empty() {
            break;
        }
        // cgroup.kill (v2, Linux 5.14+) also catches processes forking while we kill.
        if let Some(kill) = dirs
            .iter()
            .map(|d| d.join("cgroup.kill"))
            .find(|f| f.exists())
        {
            let _ = fs::write(kill, "1");
        }
        for pid in pids {
            // SAFETY: kill(2) of a process listed in one of the run's own cgroups.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed.insert(pid);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "processes in {} did not exit within 10 s of SIGKILL",
                dirs[0].display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut failures = Vec::new();
    for dir in dirs.iter().rev() {
        if let Err(err) = remove_dir_retrying(dir) {
            failures.push(format!("{}: {err}", dir.display()));
        }
    }
    if !failures.is_empty() {
        bail!("could not remove cgroups: {}", failures.join("; "));
    }
    Ok(killed.len())
}

/// rmdir(2) of a cgroup fails with EBUSY for a moment after its last task died; retry briefly.
pub fn remove_dir_retrying(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// On v2, a cgroup hands controllers to its children only once they are in its subtree_control.
fn enable_v2_controllers(parent: &Path, wanted: &[&str]) -> Result<()> {
    let file = parent.join("cgroup.subtree_control");
    let enabled = read_trimmed(&file).unwrap_or_default();
    for controller in wanted {
        if enabled.split_whitespace().any(|c| c == *controller) {
            continue;
        }
        if let Err(err) = fs::write(&file, format!("+{controller}")) {
            if err.raw_os_error() == Some(libc::EBUSY) {
                bail!(
                    "cannot enable the '{controller}' controller for nbt's runs: nbt's own cgroup {} holds \
                     processes, and cgroup v2 hands controllers only to cgroups whose parent has none \
                     (the no-internal-processes rule). Start nbt in a leaf cgroup of its own, e.g. \
                     `systemd-run --scope -p Delegate=yes nbt run ...`",
                    parent.display()
                );
            }
            return Err(err)
                .with_context(|| format!("writing '+{controller}' to {}", file.display()));
        }
    }
    Ok(())
}

/// Pressure stall totals of a run (PSI), in microseconds since the cgroup was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pressure {
    pub cpu_some_usec: Option<u64>,
    pub cpu_full_usec: Option<u64>,
    pub memory_some_usec: Option<u64>,
    pub memory_full_usec: Option<u64>,
    pub io_some_usec: Option<u64>,
    pub io_full_usec: Option<u64>,
}

impl Pressure {
    /// The totals of the pressure files `read` gives by name (`cpu.pressure`, ...).
    fn parse(read_file: impl Fn(&str) -> Option<String>) -> Option<Pressure> {
        let read = |file: &str| -> (Option<u64>, Option<u64>) {
            let text = read_file(file).unwrap_or_default();
            let total = |kind: &str| {
                text.lines()
                    .find(|l| l.starts_with(kind))?
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            };
            (total("some"), total("full"))
        };
        let (cpu_some_usec, cpu_full_usec) = read("cpu.pressure");
        let (memory_some_usec, memory_full_usec) = read("memory.pressure");
        let (io_some_usec, io_full_usec) = read("io.pressure");
        let pressure = Pressure {
            cpu_some_usec,
            cpu_full_usec,
            memory_some_usec,
            memory_full_usec,
            io_some_usec,
            io_full_usec,
        };
        (pressure != Pressure::default()).then_some(pressure)
    }
}

/// A run's gauges now, the limits in force, and its counters (see [`RunCgroup::now`]). `None`:
/// not available on this layout, or no limit.
#[derive(Debug, Clone, Default)]
pub struct CgroupNow {
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub swap_limit_bytes: Option<u64>,
    pub cpu_limit_millicores: Option<u64>,
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    pub stats: CgroupStats,
}

/// What the kernel accounted for a run. `None`: not available on this machine's layout.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CgroupStats {
    pub cpu_usage_usec: Option<u64>,
    pub cpu_user_usec: Option<u64>,
    pub cpu_system_usec: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    /// "kernel" (memory.peak, v1's max_usage_in_bytes) or how it was sampled (v2 before 5.19).
    pub memory_peak_source: Option<&'static str>,
    pub swap_peak_bytes: Option<u64>,
    /// "kernel" (memory.swap.peak) or how it was sampled, where the kernel keeps no swap peak.
    pub swap_peak_source: Option<&'static str>,
    pub oom_kills: Option<u64>,
    pub cpu_periods: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    pub cpu_throttled_usec: Option<u64>,
    pub pids_peak: Option<u64>,
    /// "kernel" (pids.peak) or how it was sampled.
    pub pids_peak_source: Option<&'static str>,
    /// fork()s and clone()s refused because the run hit its pids limit.
    pub forks_refused: Option<u64>,
    pub pressure: Option<Pressure>,
}

// Another's cgroups (`nbt attach`): finding them, their limit files, sending processes home.

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

/// Moves every process of nbt's cgroups `ours` back to the target's `home`, hierarchy by
/// hierarchy (`ours` in the order [`TargetCgroups::dirs`] gives `home`'s), until none is left:
/// a process forking meanwhile leaves a child behind, moved at the next round. Returns how many
/// were moved; an error names those that could not be.
pub fn move_back(ours: &[PathBuf], home: &TargetCgroups, layout: &Layout) -> Result<usize> {
    let mut moved = BTreeSet::new();
    for _round in 0..50 {
        let mut left = Vec::new();
        for dir in ours {
            let to = home_of(dir, home, layout);
            for pid in procs_of(dir) {
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
        std::thread::sleep(Duration::from_millis(20));
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

    const HYBRID_MOUNTINFO: &str = "\
30 24 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn hybrid_layout_uses_v1_for_limits_and_v2_for_bpf() {
        let layout = Layout::from_texts(HYBRID_MOUNTINFO, HYBRID_SELF);
        assert_eq!(
            layout.v2_self.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            layout.v1_self.get("memory").map(PathBuf::as_path),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(layout.v1_self["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(layout.placement("pids"), Some(Placement::V1));
        assert_eq!(layout.mode(), "hybrid");
    }

    #[test]
    fn comounted_v1_controllers_and_mount_roots() {
        let mountinfo = "\
40 30 0:40 /outer /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
41 30 0:41 / /sys/fs/cgroup/unified\\040tree rw - cgroup2 cgroup2 rw
";
        let own = "3:cpu,cpuacct:/outer/inner\n0::/a/b\n";
        let layout = Layout::from_texts(mountinfo, own);
        assert_eq!(
            layout.v1_self["cpu"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/inner")
        );
        assert_eq!(
            layout.v1_self["cpuacct"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/inner")
        );
        assert_eq!(
            layout.v2_self,
            Some(PathBuf::from("/sys/fs/cgroup/unified tree/a/b"))
        );
    }

    #[test]
    fn no_cgroup2_means_legacy_and_a_clear_error() {
        let layout = Layout::from_texts(
            "33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
            "4:memory:/\n",
        );
        assert_eq!(layout.mode(), "legacy");
        let err = layout.require_v2().unwrap_err().to_string();
        assert!(err.contains("cgroup v2 is not mounted"), "{err}");
    }

    #[test]
    fn keyed_files_and_pressure_parse() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 1200\nnr_throttled 3\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("memory.pressure"),
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        )
        .unwrap();
        let keyed = read_keyed(&dir.path().join("cpu.stat"));
        assert_eq!(keyed["usage_usec"], 1200);
        assert_eq!(keyed["nr_throttled"], 3);
        let pressure =
            Pressure::parse(|file| fs::read_to_string(dir.path().join(file)).ok()).unwrap();
        assert_eq!(pressure.memory_some_usec, Some(42));
        assert_eq!(pressure.memory_full_usec, Some(7));
        assert_eq!(pressure.cpu_some_usec, None);
    }
}
