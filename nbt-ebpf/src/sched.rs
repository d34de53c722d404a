//! `sched`: on-CPU time per process, from the scheduler's own tracepoints (raw tracepoints: this
//! kernel has no tp_btf).
//!
//! sched_switch fires in `__schedule()` before the switch, so the current task is still `prev`:
//! the time since the previous switch on this CPU is `prev`'s, and is charged to its process
//! (tgid) through the `bpf_get_current_*` helpers, without reading `task_struct` (no BTF or
//! CO-RE needed, one layout-free program for every kernel). The idle task (tgid 0) is not
//! charged. sched_process_exec refreshes a process's command name; sched_process_exit, on the
//! main thread, sends the process's final figure to user space through a ring buffer and removes
//! its entry. What its other threads still run after that (microseconds while they die) makes a
//! new entry that user space sweeps once the process is gone from /proc.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use nbt_common::sched::{ProcessCpu, ProcessExit, SchedStats, COMM_LEN, MAX_PROCESSES};

use crate::atomic_add;

const BPF_F_NO_PREALLOC: u32 = 1;

/// Not preallocated: every nbt run loads this object, and only the agent attaches these programs.
#[map(name = "PROCESS_CPU")]
static PROCESS_CPU: HashMap<u32, ProcessCpu> =
    HashMap::with_max_entries(MAX_PROCESSES, BPF_F_NO_PREALLOC);
/// When the running task on this CPU was switched in (ns, CLOCK_MONOTONIC); 0 until the first
/// switch seen.
#[map(name = "SWITCHED_IN")]
static SWITCHED_IN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// 256 KiB: about 4,600 exit records, drained by the agent every 100 ms. Written without a
/// wakeup: a perf buffer woke its reader through an interrupt on every record, and on this VM an
/// exit with one cost 15 us.
#[map(name = "PROCESS_EXITS")]
static PROCESS_EXITS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);
#[map(name = "SCHED_STATS")]
static SCHED_STATS: PerCpuArray<SchedStats> = PerCpuArray::with_max_entries(1, 0);

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(_ctx: RawTracePointContext) -> i32 {
    charge_current();
    0
}

/// Charges the current task's process for the time since it was switched in (or since the last
/// charge), and restarts the clock.
#[inline(always)]
fn charge_current() {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(since) = SWITCHED_IN.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot; these programs run with preemption off and do not nest on a CPU.
    let start = unsafe { core::ptr::replace(since, now) };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if start == 0 || tgid == 0 {
        return;
    }
    charge(tgid, now.saturating_sub(start));
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let (Some(entry), Ok(comm)) = (PROCESS_CPU.get_ptr_mut(tgid), bpf_get_current_comm()) {
        // SAFETY: a pointer into the map value, valid for this program run; plain stores that a
        // concurrent reader may see half-done, which only garbles a name for one read.
        unsafe {
            (*entry).comm = comm;
            (*entry).cgroup_id = bpf_get_current_cgroup_id();
        }
    }
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    // A process can live and die without ever being switched out (a short child on an idle
    // CPU): charge it up to now, so its exit record holds its whole time.
    charge_current();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != pid_tgid as u32 {
        return 0; // a thread other than the main one: its time stays with the process
    }
    // SAFETY: the lookup's value is a plain #[repr(C)] struct, copied out.
    let Some(cpu) = (unsafe { PROCESS_CPU.get(tgid) }).copied() else {
        return 0;
    };
    let exit = ProcessExit {
        tgid,
        _pad: 0,
        cpu_ns: cpu.cpu_ns,
        cgroup_id: cpu.cgroup_id,
        comm: cpu.comm,
    };
    if PROCESS_EXITS
        .output::<ProcessExit>(&exit, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).lost_exits) });
    }
    let _ = PROCESS_CPU.remove(tgid);
    0
}

/// Adds `ns` to the process's entry, making it at first sight. Two CPUs may both find no entry
/// for a new multi-threaded process: the loser of the insert (EEXIST) adds to the winner's.
/// The cgroup is read at first sight and at exec, not at every switch (three dependent loads
/// that are cold after a switch): `nbt run` moves its child before exec, so runs are charged
/// right; a process moved by another tool without exec stays charged to its first cgroup.
#[inline(always)]
fn charge(tgid: u32, ns: u64) {
    if add_to_existing(tgid, ns) {
        return;
    }
    let entry = ProcessCpu {
        cpu_ns: ns,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if PROCESS_CPU
        .insert(tgid, entry, u64::from(BPF_NOEXIST))
        .is_err()
        && !add_to_existing(tgid, ns)
    {
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).map_full) });
    }
}

#[inline(always)]
fn add_to_existing(tgid: u32, ns: u64) -> bool {
    let Some(entry) = PROCESS_CPU.get_ptr_mut(tgid) else {
        return false;
    };
    // SAFETY: a pointer into the map value, 8-byte aligned, valid for this program run.
    unsafe { atomic_add(core::ptr::addr_of_mut!((*entry).cpu_ns), ns) };
    true
}

#[inline(always)]
fn count(field: impl Fn(*mut SchedStats) -> *mut u64) {
    if let Some(stats) = SCHED_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; sched programs do not nest on one CPU.
        unsafe { *field(stats) += 1 };
    }
}
