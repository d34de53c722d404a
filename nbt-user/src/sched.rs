//! `sched`: CPU time per process from the kernel (`nbt-ebpf/src/sched.rs`), as deltas per
//! interval for attribution.
//!
//! The programs (a perf event program sampling every CPU's cpu-clock 100 times a second, and the
//! exec and exit raw tracepoints) are attached node-wide for as long as the [`ProcessTracker`]
//! lives (dropping it detaches them). Each [`ProcessTracker::take`] returns, per process, the CPU
//! time it spent since the previous call: processes that exited in between come from the ring
//! buffer (their final figure), the others from the hash map.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::Array;
use aya::maps::RingBuf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{PerfEvent, RawTracePoint};
use aya::Ebpf;
use nbt_common::sched::{
    ProcessCpu, ProcessExit, SchedStats, TaskLayout, PROCESS_CPU_MAP, PROCESS_EXITS_MAP,
    SAMPLE_PERIOD_NS, SAMPLE_PROGRAM, SCHED_STATS_MAP, TASK_LAYOUT_MAP,
};

use crate::btf::Btf;
use crate::loader;

/// One process's CPU time over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuDelta {
    pub tgid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub ns: u64,
    pub end: End,
}

/// Whether a delta is a process's last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Running,
    /// Its main thread exited: the kernel's exit record.
    Exited,
    /// Its entry outlived it (threads that ran after the main thread's exit) and was swept.
    Swept,
}

/// Counts of what the tracker could not see, for the agent's honesty metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerLosses {
    /// Exit records the ring buffer had no room for.
    pub lost_exits: u64,
    /// Charges the kernel dropped because the process map was full.
    pub map_full: u64,
}

pub struct ProcessTracker {
    ebpf: Ebpf,
    exits: RingBuf<MapData>,
    pending_exits: Vec<ProcessExit>,
    /// The figure each live process had at the last read.
    seen: HashMap<u32, u64>,
    /// Processes whose exit record came while the map still holds an entry for them (the tail of
    /// their exit); swept once idle and gone from /proc.
    exited: HashSet<u32>,
}

fn comm(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl ProcessTracker {
    /// Loads and attaches the sched programs node-wide: the layout first, then the exit and
    /// exec tracepoints, then the samplers (a thread sampled before the exit program is attached
    /// could leave its entry behind).
    pub fn attach() -> Result<ProcessTracker> {
        let layout = task_layout(&Btf::kernel()?)?;
        let mut ebpf = loader::load()?;
        let map = ebpf
            .map_mut(TASK_LAYOUT_MAP)
            .ok_or_else(|| anyhow!("BPF map {TASK_LAYOUT_MAP} missing from nbt's object"))?;
        Array::<_, TaskLayout>::try_from(map)?.set(0, layout, 0)?;
        for (name, tracepoint) in [
            ("sched_process_exit", "sched_process_exit"),
            ("sched_process_exec", "sched_process_exec"),
        ] {
            let program: &mut RawTracePoint = loader::program(&mut ebpf, name)?;
            program
                .load()
                .with_context(|| format!("the kernel refused to load BPF program {name}"))?;
            program
                .attach(tracepoint)
                .with_context(|| format!("attaching {name} to raw tracepoint {tracepoint}"))?;
        }
        let sampler: &mut PerfEvent = loader::program(&mut ebpf, SAMPLE_PROGRAM)?;
        sampler
            .load()
            .with_context(|| format!("the kernel refused to load BPF program {SAMPLE_PROGRAM}"))?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("reading {path}: {err}"))?;
        for cpu in cpus {
            sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(SAMPLE_PERIOD_NS),
                    false,
                )
                .with_context(|| format!("sampling CPU {cpu} (perf_event_open cpu-clock)"))?;
        }
        let map = ebpf
            .take_map(PROCESS_EXITS_MAP)
            .ok_or_else(|| anyhow!("BPF map {PROCESS_EXITS_MAP} missing from nbt's object"))?;
        let exits = RingBuf::try_from(map)?;
        Ok(ProcessTracker {
            ebpf,
            exits,
            pending_exits: Vec::new(),
            seen: HashMap::new(),
            exited: HashSet::new(),
        })
    }

    /// Moves exit records out of the ring buffer; call often (every 100 ms) so bursts of short
    /// processes do not fill it. The kernel writes them without waking anyone: this is the reader.
    pub fn drain_exits(&mut self) {
        while let Some(record) = self.exits.next() {
            if record.len() >= std::mem::size_of::<ProcessExit>() {
                // SAFETY: the kernel wrote a ProcessExit, a plain #[repr(C)] value.
                self.pending_exits.push(unsafe {
                    std::ptr::read_unaligned(record.as_ptr().cast::<ProcessExit>())
                });
            }
        }
    }

    /// Every process's CPU time since the previous call.
    pub fn take(&mut self) -> Result<Vec<CpuDelta>> {
        self.drain_exits();
        let mut deltas = Vec::new();
        for exit in std::mem::take(&mut self.pending_exits) {
            let before = self.seen.remove(&exit.tgid).unwrap_or(0);
            self.exited.insert(exit.tgid);
            deltas.push(CpuDelta {
                tgid: exit.tgid,
                cgroup_id: exit.cgroup_id,
                comm: comm(&exit.comm),
                ns: exit.cpu_ns.saturating_sub(before),
                end: End::Exited,
            });
        }
        let map = self
            .ebpf
            .map_mut(PROCESS_CPU_MAP)
            .ok_or_else(|| anyhow!("BPF map {PROCESS_CPU_MAP} missing from nbt's object"))?;
        let mut processes = BpfHashMap::<_, u32, ProcessCpu>::try_from(map)?;
        let entries: Vec<(u32, ProcessCpu)> = processes.iter().filter_map(|e| e.ok()).collect();
        let mut present = HashSet::with_capacity(entries.len());
        for (tgid, cpu) in entries {
            present.insert(tgid);
            let before = self.seen.get(&tgid).copied().unwrap_or(0);
            // Less than before: the tgid was reused by a new process since the last read.
            let ns = if cpu.cpu_ns >= before {
                cpu.cpu_ns - before
            } else {
                cpu.cpu_ns
            };
            // An entry whose process is gone: the tail of an exit (threads that ran after the
            // main thread's exit), or a process whose main thread left before its other threads.
            let gone = ns == 0
                && self.exited.contains(&tgid)
                && !Path::new(&format!("/proc/{tgid}")).exists();
            if gone {
                let _ = processes.remove(&tgid);
                self.seen.remove(&tgid);
            } else {
                self.seen.insert(tgid, cpu.cpu_ns);
            }
            if ns > 0 || gone {
                deltas.push(CpuDelta {
                    tgid,
                    cgroup_id: cpu.cgroup_id,
                    comm: comm(&cpu.comm),
                    ns,
                    end: if gone { End::Swept } else { End::Running },
                });
            }
        }
        // Entries the kernel removed whose exit record has not been read yet stay in `seen`
        // until it arrives.
        self.seen.retain(|tgid, _| {
            present.contains(tgid) || Path::new(&format!("/proc/{tgid}")).exists()
        });
        self.exited.retain(|tgid| present.contains(tgid));
        Ok(deltas)
    }

    pub fn losses(&self) -> TrackerLosses {
        let per_cpu: Vec<SchedStats> = self
            .ebpf
            .map(SCHED_STATS_MAP)
            .and_then(|m| PerCpuArray::<_, SchedStats>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .map_or_else(Vec::new, |values| values.iter().copied().collect());
        TrackerLosses {
            lost_exits: per_cpu.iter().map(|s| s.lost_exits).sum(),
            map_full: per_cpu.iter().map(|s| s.map_full).sum(),
        }
    }
}

/// Where this kernel keeps a thread's runtime and start time, and now (CLOCK_MONOTONIC, the
/// clock of both `start_time` and `bpf_ktime_get_ns`).
fn task_layout(btf: &Btf) -> Result<TaskLayout> {
    let context = "the CPU-time tracker reads the scheduler's runtime of each thread";
    let sum_exec_runtime = btf
        .offset_of("task_struct", &["se", "sum_exec_runtime"])
        .context(context)?;
    let start_time = btf
        .offset_of("task_struct", &["start_time"])
        .context(context)?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Ok(TaskLayout {
        sum_exec_runtime,
        start_time,
        tracking_since_ns: now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64,
    })
}

/// The cgroup v2 id of a directory: on cgroup2 the directory's inode number is the id that
/// `bpf_get_current_cgroup_id()` returns.
pub fn cgroup_id(dir: &Path) -> Option<u64> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0
        || fs.f_type as i64 != CGROUP2_SUPER_MAGIC
    {
        return None;
    }
    std::fs::metadata(dir).ok().map(|m| m.ino())
}
