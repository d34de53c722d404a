//! `sched`: CPU time per process from the kernel (`nbt-ebpf/src/sched.rs`), as deltas per
//! interval for attribution.
//!
//! The programs (a perf event program sampling every CPU's cpu-clock 99 times a second, and the
//! exec and exit raw tracepoints) are attached node-wide for as long as the [`ProcessTracker`]
//! lives (dropping it detaches them). Each [`ProcessTracker::take`] returns, per process, the CPU
//! time it spent (and, with counters, the cycles and instructions sampled) since the previous call: processes that exited in between come from the ring
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
    ProcessCpu, ProcessExit, SchedStats, TaskLayout, COUNT_CYCLES, COUNT_INSTRUCTIONS,
    CPU_CYCLES_MAP, CPU_INSTRUCTIONS_MAP, EXITED_THREADS_MAP, PROCESS_CPU_MAP, PROCESS_EXITS_MAP,
    SAMPLE_PERIOD_NS, SAMPLE_PROGRAM, SCHED_STATS_MAP, TASK_LAYOUT_MAP,
};

use crate::telemetry::counters::{AttributeBy, Counted, CpuCounters};

use crate::sys::loader;
use crate::telemetry::btf::Btf;

/// One process's CPU time over an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuDelta {
    pub tgid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub ns: u64,
    /// Sampled counts, where the tracker has counters (`None`: not counted).
    pub cycles: Option<u64>,
    pub instructions: Option<u64>,
    pub end: End,
}

/// A process's figures as the kernel keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    ns: u64,
    cycles: u64,
    instructions: u64,
}

impl Totals {
    fn of(cpu: &ProcessCpu) -> Totals {
        Totals {
            ns: cpu.cpu_ns,
            cycles: cpu.cycles,
            instructions: cpu.instructions,
        }
    }

    /// What was added since `before`. Less than before: the tgid was reused by a new process
    /// since the last read, and all of it is new.
    fn since(self, before: Totals) -> Totals {
        if self.ns < before.ns || self.cycles < before.cycles {
            return self;
        }
        Totals {
            ns: self.ns - before.ns,
            cycles: self.cycles - before.cycles,
            instructions: self.instructions.saturating_sub(before.instructions),
        }
    }
}

/// Whether a delta is a process's last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Running,
    /// Its main thread exited: the kernel's exit record.
    Exited,
    /// Its entry outlived it (threads that ran after the main thread's exit) and was swept.
    Swept,
    /// What one of its threads ran after its exit tracepoint, read when the kernel freed it
    /// (the process's entry was gone by then).
    Late,
}

/// Counts of what the tracker could not see, for the agent's honesty metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerLosses {
    /// Exit records the ring buffer had no room for.
    pub lost_exits: u64,
    /// Charges the kernel dropped because the process map was full.
    pub map_full: u64,
    /// Counter readings that failed, or sample periods in which a counter never ran.
    pub counter_misses: u64,
}

/// The sched hash maps' sizes where they must be preallocated (kernels before 6.1, see
/// [`loader::perf_event_needs_preallocated_maps`]): about 6 MiB of kernel memory from the agent's
/// start, against 65,536 processes and 262,144 threads allocated as used on newer kernels. A
/// process or thread past them is counted in `map_full` and not attributed.
pub const PREALLOCATED: [(&str, u32); 3] = [
    (PROCESS_CPU_MAP, 16_384),
    ("THREAD_CHARGED", 32_768),
    (EXITED_THREADS_MAP, 32_768),
];

pub struct ProcessTracker {
    ebpf: Ebpf,
    exits: RingBuf<MapData>,
    pending_exits: Vec<ProcessExit>,
    /// The figures each live process had at the last read.
    seen: HashMap<u32, Totals>,
    /// The per-CPU counters the samplers read, if any (kept open while attached).
    counters: Option<CpuCounters>,
    /// Why attribution uses CPU time, when it does.
    counters_absent: Option<String>,
    /// Processes whose exit record came while the map still holds an entry for them (the tail of
    /// their exit); swept once idle and gone from /proc.
    exited: HashSet<u32>,
}

fn comm(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl ProcessTracker {
    /// Loads and attaches the sched programs node-wide: the counters and the layout first, then
    /// the free, exit and exec tracepoints, then the samplers (a thread sampled before the exit program
    /// is attached could leave its entry behind). `Cycles` where no PMU exists is an error;
    /// `Auto` then falls back to CPU time and [`ProcessTracker::counters_absent`] says why.
    pub fn attach(attribute_by: AttributeBy) -> Result<ProcessTracker> {
        let mut layout = task_layout(&Btf::kernel()?)?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("reading {path}: {err}"))?;
        let (counters, counters_absent) = match attribute_by {
            AttributeBy::CpuTime => (None, Some("--attribute-by cpu-time".to_string())),
            AttributeBy::SampledCpuClock => {
                (Some(CpuCounters::open(Counted::CpuClock, &cpus)?), None)
            }
            AttributeBy::Cycles => (
                Some(
                    CpuCounters::open(Counted::Pmu, &cpus)
                        .context("--attribute-by cycles needs a hardware PMU")?,
                ),
                None,
            ),
            AttributeBy::Auto => match CpuCounters::open(Counted::Pmu, &cpus) {
                Ok(counters) => (Some(counters), None),
                Err(err) => (None, Some(format!("{err:#}"))),
            },
        };
        let unused = [
            loader::GATE_MAPS,
            loader::RUN_SOCKETS_MAPS,
            loader::WIRE_LOSS_MAPS,
        ];
        let mut ebpf = if loader::perf_event_needs_preallocated_maps() {
            // The sampler is a perf_event program: before 6.1 its hash maps must be
            // preallocated, so they are made smaller to bound the memory they hold from the start.
            loader::load_preallocated(&unused, &PREALLOCATED)?
        } else {
            loader::load(&unused)?
        };
        if let Some(counters) = &counters {
            let map = |name: &str| {
                ebpf.map(name)
                    .ok_or_else(|| anyhow!("BPF map {name} missing from nbt's object"))
            };
            counters.install(map(CPU_CYCLES_MAP)?, map(CPU_INSTRUCTIONS_MAP)?)?;
            layout.counters = COUNT_CYCLES;
            if counters.counts_instructions() {
                layout.counters |= COUNT_INSTRUCTIONS;
            }
        }
        let map = ebpf
            .map_mut(TASK_LAYOUT_MAP)
            .ok_or_else(|| anyhow!("BPF map {TASK_LAYOUT_MAP} missing from nbt's object"))?;
        Array::<_, TaskLayout>::try_from(map)?.set(0, layout, 0)?;
        // The free program first: a thread the exit program notes is always seen when freed.
        for (name, tracepoint) in [
            ("sched_process_free", "sched_process_free"),
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
            counters,
            counters_absent,
            exited: HashSet::new(),
        })
    }

    /// What the samplers count besides CPU time, if anything.
    pub fn counted(&self) -> Option<Counted> {
        self.counters.as_ref().map(|c| c.counted)
    }

    /// Why a PMU's instructions are not counted while its cycles are.
    pub fn instructions_absent(&self) -> Option<&str> {
        self.counters
            .as_ref()
            .and_then(|c| c.instructions_absent.as_deref())
    }

    /// Why the samplers count nothing but CPU time (no PMU, or told so).
    pub fn counters_absent(&self) -> Option<&str> {
        self.counters_absent.as_deref()
    }

    fn delta(&self, tgid: u32, cgroup_id: u64, comm: &[u8], t: Totals, end: End) -> CpuDelta {
        let counters = self.counters.as_ref();
        CpuDelta {
            tgid,
            cgroup_id,
            comm: self::comm(comm),
            ns: t.ns,
            cycles: counters.map(|_| t.cycles),
            instructions: counters
                .filter(|c| c.counts_instructions())
                .map(|_| t.instructions),
            end,
        }
    }

    /// Moves exit records out of the ring buffer; call often (every 100 ms) so bursts of short
    /// processes do not fill it. The kernel writes them without waking anyone: this is the reader.
    pub fn drain_exits(&mut self) {
        while let Some(record) = self.exits.next() {
            if record.len() >= size_of::<ProcessExit>() {
                // SAFETY: the kernel wrote a ProcessExit, a plain #[repr(C)] value.
                self.pending_exits.push(unsafe {
                    std::ptr::read_unaligned(record.as_ptr().cast::<ProcessExit>())
                });
            }
        }
    }

    /// Every process's CPU time since the previous call, and its sampled counts where the
    /// samplers read counters.
    pub fn take(&mut self) -> Result<Vec<CpuDelta>> {
        self.drain_exits();
        let mut deltas = Vec::new();
        for exit in std::mem::take(&mut self.pending_exits) {
            if exit.late != 0 {
                let late = Totals {
                    ns: exit.cpu_ns,
                    ..Totals::default()
                };
                deltas.push(self.delta(exit.tgid, exit.cgroup_id, &exit.comm, late, End::Late));
                continue;
            }
            let before = self.seen.remove(&exit.tgid).unwrap_or_default();
            self.exited.insert(exit.tgid);
            let totals = Totals {
                ns: exit.cpu_ns,
                cycles: exit.cycles,
                instructions: exit.instructions,
            };
            deltas.push(self.delta(
                exit.tgid,
                exit.cgroup_id,
                &exit.comm,
                totals.since(before),
                End::Exited,
            ));
        }
        let map = self
            .ebpf
            .map_mut(PROCESS_CPU_MAP)
            .ok_or_else(|| anyhow!("BPF map {PROCESS_CPU_MAP} missing from nbt's object"))?;
        let mut processes = BpfHashMap::<_, u32, ProcessCpu>::try_from(map)?;
        let entries: Vec<(u32, ProcessCpu)> = processes.iter().filter_map(|e| e.ok()).collect();
        let mut present = HashSet::with_capacity(entries.len());
        let mut found = Vec::new();
        for (tgid, cpu) in entries {
            present.insert(tgid);
            let before = self.seen.get(&tgid).copied().unwrap_or_default();
            let added = Totals::of(&cpu).since(before);
            let ns = added.ns;
            // An entry whose process is gone: the tail of an exit (threads that ran after the
            // main thread's exit), or a process whose main thread left before its other threads.
            let gone = ns == 0
                && self.exited.contains(&tgid)
                && !Path::new(&format!("/proc/{tgid}")).exists();
            if gone {
                let _ = processes.remove(&tgid);
                self.seen.remove(&tgid);
            } else {
                self.seen.insert(tgid, Totals::of(&cpu));
            }
            if added != Totals::default() || gone {
                let end = if gone { End::Swept } else { End::Running };
                found.push((tgid, cpu.cgroup_id, cpu.comm, added, end));
            }
        }
        // An entry missing from the map was removed by its exit program, which wrote the exit
        // record first: drained now, the record is pending for every such process, so its
        // `seen` figure stays until the next call subtracts it. (Dropped here, a process that
        // exited and was reaped during the walk would be charged its whole runtime again.)
        self.drain_exits();
        let exiting: HashSet<u32> = self
            .pending_exits
            .iter()
            .filter(|exit| exit.late == 0)
            .map(|exit| exit.tgid)
            .collect();
        self.seen.retain(|tgid, _| {
            present.contains(tgid)
                || exiting.contains(tgid)
                || Path::new(&format!("/proc/{tgid}")).exists()
        });
        self.exited.retain(|tgid| present.contains(tgid));
        for (tgid, cgroup_id, comm, added, end) in found {
            deltas.push(self.delta(tgid, cgroup_id, &comm, added, end));
        }
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
            counter_misses: per_cpu.iter().map(|s| s.counter_misses).sum(),
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
    let flags = btf.offset_of("task_struct", &["flags"]).context(context)?;
    let pid = btf.offset_of("task_struct", &["pid"]).context(context)?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Ok(TaskLayout {
        sum_exec_runtime,
        start_time,
        flags,
        pid,
        tracking_since_ns: now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64,
        counters: 0,
    })
}

/// The cgroup v2 id of a directory: on cgroup2 the directory's inode number is the id that
/// `bpf_get_current_cgroup_id()` returns.
pub fn cgroup_id(dir: &Path) -> Option<u64> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain C data, for which all-zero bytes are a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; the path is NUL-terminated and outlives the
    // call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0
        || fs.f_type as i64 != CGROUP2_SUPER_MAGIC
    {
        return None;
    }
    std::fs::metadata(dir).ok().map(|m| m.ino())
}
