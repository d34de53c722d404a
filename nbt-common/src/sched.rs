//! CPU time per process (tgid), kept by the `sched` programs.
//!
//! The kernel side charges what each thread ran (the scheduler's own runtime, read at samples and
//! at exit) to the thread's process, in [`PROCESS_CPU_MAP`] (a hash keyed by tgid). When a
//! process's main thread exits, its figure goes out through [`PROCESS_EXITS_MAP`] (a ring buffer)
//! and its entry is removed, so short-lived processes are reported even when they live and die
//! between two reads. A thread still runs after its exit tracepoint (unmapping its memory,
//! closing its files: about 0.2 ms for a small process); that last stretch is read when the
//! kernel frees the thread, and goes out as a late record ([`ProcessExit::late`]).
//!
//! Where user space found a hardware PMU, each sample also reads its CPU's cycle and instruction
//! counters and charges what they counted since that CPU's previous sample to the process it
//! interrupted: the same statistical split as `perf record`, with the counts exact per CPU.

/// Name of the hash map tgid (u32) → [`ProcessCpu`].
pub const PROCESS_CPU_MAP: &str = "PROCESS_CPU";
/// Name of the ring buffer carrying [`ProcessExit`] records.
pub const PROCESS_EXITS_MAP: &str = "PROCESS_EXITS";
/// Name of the hash map tid (u32) → [`ExitedThread`]: threads past their exit tracepoint, not
/// yet freed.
pub const EXITED_THREADS_MAP: &str = "EXITED_THREADS";
/// Name of the per-CPU array of [`SchedStats`] (one slot).
pub const SCHED_STATS_MAP: &str = "SCHED_STATS";
/// Name of the one-slot array holding the [`TaskLayout`] user space found in the kernel's BTF.
pub const TASK_LAYOUT_MAP: &str = "TASK_LAYOUT";
/// Names of the perf event arrays holding each CPU's hardware counters (index: CPU), opened by
/// user space where a PMU exists.
pub const CPU_CYCLES_MAP: &str = "CPU_CYCLES";
pub const CPU_INSTRUCTIONS_MAP: &str = "CPU_INSTRUCTIONS";
/// Name of the per-CPU array of [`CounterReading`]s: each counter's value at the last sample
/// on that CPU (slot [`CYCLES`], slot [`INSTRUCTIONS`]).
pub const COUNTER_LAST_MAP: &str = "COUNTER_LAST";
pub const CYCLES: u32 = 0;
pub const INSTRUCTIONS: u32 = 1;
/// [`TaskLayout::counters`] bits: the samplers read the CPU's cycle counter, its instruction
/// counter.
pub const COUNT_CYCLES: u64 = 1;
pub const COUNT_INSTRUCTIONS: u64 = 2;
/// The name of the perf event program that samples each CPU.
pub const SAMPLE_PROGRAM: &str = "sched_sample";
/// How often each CPU is sampled (cpu-clock period, ns): 99 times a second, as `perf record`
/// does by default, not 100. A 10 ms period divides the scheduler's 100 ms CPU-quota period and
/// the ticks, so samples lock onto the same phase of a throttled process's run every period:
/// on the development VM a process under a 0.3 CPU quota was charged 18% more cpu-clock counts
/// than it ran. At 99 Hz the phase goes round every second.
pub const SAMPLE_PERIOD_NS: u64 = 10_101_010;

/// Most processes tracked at once; a process that finds the map full is counted in
/// [`SchedStats::map_full`] and its time is lost (user space reports the count).
pub const MAX_PROCESSES: u32 = 65_536;

/// Most threads whose charged runtime is kept at once; a thread that finds the map full is
/// counted in [`SchedStats::map_full`] and its time is not charged.
pub const MAX_THREADS: u32 = 262_144;

pub const COMM_LEN: usize = 16;

/// Where, in this kernel's `struct task_struct`, the programs find what they read (byte offsets
/// from the kernel's BTF), and since when user space tracks. All zero: not set yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// `se.sum_exec_runtime`: the thread's on-CPU nanoseconds, kept by the scheduler.
    pub sum_exec_runtime: u64,
    /// `start_time`: when the thread was created (ns, CLOCK_MONOTONIC).
    pub start_time: u64,
    /// `flags` (an unsigned int): [`PF_EXITING`] is set there from the start of the thread's
    /// exit, before its exit tracepoint.
    pub flags: u64,
    /// `pid` (a pid_t): the thread's id, read from the task the free tracepoint hands over.
    pub pid: u64,
    /// CLOCK_MONOTONIC when tracking began: threads created before it are charged only for what
    /// they run after their first sample.
    pub tracking_since_ns: u64,
    /// [`COUNT_CYCLES`] and [`COUNT_INSTRUCTIONS`]: which of [`CPU_CYCLES_MAP`] and
    /// [`CPU_INSTRUCTIONS_MAP`] user space filled with a counter for every CPU; 0: CPU time only.
    pub counters: u64,
}

/// `task_struct.flags`: the thread is exiting (include/linux/sched.h, the same value since
/// Linux 2.6).
pub const PF_EXITING: u32 = 0x0000_0004;

/// A counter as `bpf_perf_event_read_value` gives it: the count, and how long the counter was
/// enabled and how long it actually ran (less when the PMU multiplexed it with other events).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterReading {
    pub counter: u64,
    pub enabled: u64,
    pub running: u64,
}

/// One process's CPU time so far.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    /// On-CPU nanoseconds of all its threads.
    pub cpu_ns: u64,
    /// CPU cycles and instructions, sampled: each sample charges the running process with what
    /// its CPU counted since the CPU's previous sample (0 without counters).
    pub cycles: u64,
    pub instructions: u64,
    /// The cgroup v2 id of the process at its first sighting or its last exec.
    pub cgroup_id: u64,
    /// The command name, from its first sighting or its last exec.
    pub comm: [u8; COMM_LEN],
}

/// The figure of a process whose main thread exited, or a late addition to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExit {
    pub tgid: u32,
    /// 0: the process's figure when its main thread exited. 1: what one of its threads ran
    /// between its exit tracepoint and the kernel freeing it, to add (`cpu_ns` only).
    pub late: u32,
    pub cpu_ns: u64,
    pub cycles: u64,
    pub instructions: u64,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// A thread past its exit tracepoint: what it had run by then, and whose it was, until the
/// kernel frees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitedThread {
    pub tgid: u32,
    pub _pad: u32,
    /// `start_time` of the thread: with its tid it names one thread, even after the tid is reused.
    pub start_time: u64,
    /// Its runtime at the exit tracepoint.
    pub runtime_ns: u64,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// Counters of the programs themselves, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Charges lost because [`PROCESS_CPU_MAP`] was full.
    pub map_full: u64,
    /// Exit records lost because [`PROCESS_EXITS_MAP`] was full.
    pub lost_exits: u64,
    /// Counter readings that failed, or periods in which a counter never ran (multiplexed out
    /// for the whole period): those periods' counts are not charged.
    pub counter_misses: u64,
}

#[cfg(feature = "user")]
// SAFETY: ProcessCpu is #[repr(C)], four u64s then a 16-byte array (48 bytes, a multiple of its
// alignment 8), with no padding: every bit pattern is a valid value.
unsafe impl aya::Pod for ProcessCpu {}
#[cfg(feature = "user")]
// SAFETY: ProcessExit is #[repr(C)], two u32s, four u64s and a 16-byte array (56 bytes, a
// multiple of its alignment 8), with no implicit padding: every bit pattern is a valid value.
unsafe impl aya::Pod for ProcessExit {}

#[cfg(feature = "user")]
// SAFETY: SchedStats is #[repr(C)], three u64s, with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for SchedStats {}
#[cfg(feature = "user")]
// SAFETY: TaskLayout is #[repr(C)], six u64s, with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for TaskLayout {}
#[cfg(feature = "user")]
// SAFETY: CounterReading is #[repr(C)], three u64s, with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for CounterReading {}
