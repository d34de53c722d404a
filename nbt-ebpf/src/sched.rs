//! `sched`: on-CPU time per process, read from the scheduler's own account of each thread
//! (`task_struct.se.sum_exec_runtime`), not timed here.
//!
//! Nothing runs on a context switch. A perf event program on the software cpu-clock samples each
//! CPU (99 times a second, set by user space): it reads the interrupted thread's runtime and
//! charges its process (tgid) with what the thread ran since it was last charged. When a thread
//! exits, sched_process_exit charges its last stretch the same way, so a process that lived and
//! died between two samples is still counted in full. The figures are the kernel's nanoseconds;
//! sampling only decides *when* they are read: a thread's charge lags until it is next sampled
//! running, or exits.
//!
//! Where a PMU exists, user space puts a cycle and an instruction counter per CPU into
//! [`CPU_CYCLES`] and [`CPU_INSTRUCTIONS`], and each sample charges the interrupted process with
//! what its CPU counted since the previous sample there. That is `perf record`'s estimate: the
//! counts are exact per CPU, and the split among processes is right on average (a process
//! running a third of the time is interrupted by a third of the samples). The exit program does
//! not read the counters: it always runs in the exiting process, so it would charge that process
//! with what ran before it.
//!
//! Why not a sched_switch program: it runs twice per round of a pipe ping-pong, and on the
//! development VM a raw tracepoint that returns at once already slowed such a ping-pong by
//! 5.5% (a full one by 9.3%); these programs cost the same whatever the switch rate.
//!
//! `task_struct` offsets differ between kernels and builds; user space reads them from the
//! kernel's BTF and writes them into [`TASK_LAYOUT`] before attaching (the programs do nothing
//! until then). sched_process_exec refreshes a process's command name; sched_process_exit, on
//! the main thread, sends the process's figure to user space through a ring buffer and removes
//! its entry. What its other threads still run after that makes a new entry that user space
//! sweeps once the process is gone from /proc.
//!
//! A thread keeps running after its exit tracepoint: it unmaps its memory, closes its files and
//! switches out for the last time, about 0.2 ms for a small process on the development VM, 3.5%
//! of a 5 ms one. sched_process_exit notes each thread's runtime in [`EXITED_THREADS`]; when the
//! kernel frees the thread (sched_process_free, after the last switch, so the runtime is final)
//! the difference is added to the process if it still has an entry, else sent as a late record.

use aya_ebpf::{
    bindings::{bpf_perf_event_value, BPF_F_CURRENT_CPU, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_perf_event_read_value, bpf_probe_read_kernel,
    },
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerfEventArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext},
    EbpfContext as _,
};
use nbt_common::sched::{
    CounterReading, ExitedThread, ProcessCpu, ProcessExit, SchedStats, TaskLayout, COMM_LEN,
    COUNT_CYCLES, COUNT_INSTRUCTIONS, CYCLES, INSTRUCTIONS, MAX_PROCESSES, MAX_THREADS, PF_EXITING,
};

use crate::atomic_add;

const BPF_F_NO_PREALLOC: u32 = 1;

/// Not preallocated: every nbt run loads this object, and only the agent attaches these programs.
#[map(name = "PROCESS_CPU")]
static PROCESS_CPU: HashMap<u32, ProcessCpu> =
    HashMap::with_max_entries(MAX_PROCESSES, BPF_F_NO_PREALLOC);
/// Per thread (tid): its runtime as far as it has been charged.
#[map(name = "THREAD_CHARGED")]
static THREAD_CHARGED: HashMap<u32, u64> =
    HashMap::with_max_entries(MAX_THREADS, BPF_F_NO_PREALLOC);
/// Per thread (tid) past its exit tracepoint and not yet freed.
#[map(name = "EXITED_THREADS")]
static EXITED_THREADS: HashMap<u32, ExitedThread> =
    HashMap::with_max_entries(MAX_THREADS, BPF_F_NO_PREALLOC);
#[map(name = "TASK_LAYOUT")]
static TASK_LAYOUT: Array<TaskLayout> = Array::with_max_entries(1, 0);
/// 256 KiB: about 4,600 exit records, drained by the agent every 100 ms. Written without a
/// wakeup: a perf buffer woke its reader through an interrupt on every record, and on this VM an
/// exit with one cost 15 us.
#[map(name = "PROCESS_EXITS")]
static PROCESS_EXITS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);
/// Each CPU's cycle and instruction counters (index: CPU; sized to the CPUs by the loader),
/// filled by user space where a PMU exists.
#[map(name = "CPU_CYCLES")]
static CPU_CYCLES: PerfEventArray<u32> = PerfEventArray::new(0);
#[map(name = "CPU_INSTRUCTIONS")]
static CPU_INSTRUCTIONS: PerfEventArray<u32> = PerfEventArray::new(0);
#[map(name = "COUNTER_LAST")]
static COUNTER_LAST: PerCpuArray<CounterReading> = PerCpuArray::with_max_entries(2, 0);
#[map(name = "SCHED_STATS")]
static SCHED_STATS: PerCpuArray<SchedStats> = PerCpuArray::with_max_entries(1, 0);

#[perf_event]
pub fn sched_sample(_ctx: PerfEventContext) -> u32 {
    let Some(layout) = task_layout() else {
        return 0;
    };
    // Read even when the CPU is idle, so the next process sampled here is not charged with the
    // idle task's counts.
    let mut charge = Charge::default();
    if layout.counters & COUNT_CYCLES != 0 {
        charge.cycles = counted_since_last_sample(&CPU_CYCLES, CYCLES);
    }
    if layout.counters & COUNT_INSTRUCTIONS != 0 {
        charge.instructions = counted_since_last_sample(&CPU_INSTRUCTIONS, INSTRUCTIONS);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    charge.ns = runtime_since_last_charge(&layout, pid_tgid, false);
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != 0 && !charge.is_empty() {
        charge_process(tgid, &charge);
    }
    0
}

/// Where the programs find what they read, once user space has said so.
#[inline(always)]
fn task_layout() -> Option<TaskLayout> {
    TASK_LAYOUT
        .get(0)
        .copied()
        .filter(|layout| layout.sum_exec_runtime != 0)
}

/// What one sample or exit adds to a process.
#[derive(Default)]
struct Charge {
    ns: u64,
    cycles: u64,
    instructions: u64,
}

impl Charge {
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.ns == 0 && self.cycles == 0 && self.instructions == 0
    }
}

/// What this CPU's counter in `array` counted since the previous sample on this CPU, scaled up
/// when the PMU multiplexed it (ran it for only part of the period): count × enabled/running,
/// as perf does. The first reading on a CPU only sets the baseline.
#[inline(always)]
fn counted_since_last_sample(array: &PerfEventArray<u32>, slot: u32) -> u64 {
    let mut now = bpf_perf_event_value {
        counter: 0,
        enabled: 0,
        running: 0,
    };
    // SAFETY: the map pointer is the static's own (PerfEventArray is a transparent map
    // definition); the helper writes at most `size` bytes into `now`.
    let read = unsafe {
        bpf_perf_event_read_value(
            core::ptr::from_ref(array).cast_mut().cast(),
            BPF_F_CURRENT_CPU,
            &mut now,
            size_of::<bpf_perf_event_value>() as u32,
        )
    };
    let Some(last) = COUNTER_LAST.get_ptr_mut(slot) else {
        return 0;
    };
    if read != 0 {
        // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).counter_misses) });
        return 0;
    }
    let now = CounterReading {
        counter: now.counter,
        enabled: now.enabled,
        running: now.running,
    };
    // SAFETY: this CPU's slot; only this program writes it, and it does not nest on a CPU.
    let before = unsafe { core::ptr::replace(last, now) };
    if before.enabled == 0 || now.counter < before.counter {
        return 0;
    }
    let counted = now.counter - before.counter;
    let enabled = now.enabled.saturating_sub(before.enabled);
    let running = now.running.saturating_sub(before.running);
    if running == 0 {
        if counted > 0 || enabled > 0 {
            // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
            count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).counter_misses) });
        }
        return 0;
    }
    // Both under 2^32 (a period of under 4.3 s, a count under 4.3 billion), so the product fits
    // in 64 bits; the check is written so for want of 128-bit arithmetic here. Otherwise the
    // count is left unscaled.
    if running >= enabled || (counted | enabled) >> 32 != 0 {
        return counted;
    }
    counted * enabled / running
}

/// The current thread's runtime since its last charge. An exiting thread seen for the first
/// time gets no entry: its exit would only remove it again.
#[inline(always)]
fn runtime_since_last_charge(layout: &TaskLayout, pid_tgid: u64, exiting: bool) -> u64 {
    let tid = pid_tgid as u32;
    if pid_tgid >> 32 == 0 {
        return 0; // the idle task
    }
    // SAFETY: a helper without arguments; the pointer is only read through probe_read.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(runtime) = read_u64(task, layout.sum_exec_runtime) else {
        return 0;
    };
    let charged = match THREAD_CHARGED.get_ptr_mut(tid) {
        // SAFETY: a pointer into the map value, valid for this program run. Only programs running
        // in this thread's context write its entry; a sample interrupting its exit program could
        // store a stale figure, which the exit then removes.
        Some(entry) => unsafe { core::ptr::replace(entry, runtime) },
        None if !exiting && is_exiting(task, layout) => {
            // Past its exit tracepoint (which charged it and removed its entry) or about to
            // reach it (which will charge it): an entry made now would charge its whole
            // runtime a second time, and outlive it.
            return 0;
        }
        None => {
            // First sight. A thread started before tracking began has run for others before:
            // only what it runs from now on is charged.
            let started = read_u64(task, layout.start_time).unwrap_or(0);
            if !exiting && THREAD_CHARGED.insert(tid, runtime, 0).is_err() {
                // Charging it without an entry would charge its whole runtime at every sample.
                // SAFETY: `count` passes a pointer to its map slot; this only takes a field's
                // address.
                count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).map_full) });
                runtime
            } else if started < layout.tracking_since_ns {
                runtime
            } else {
                0
            }
        }
    };
    runtime.saturating_sub(charged)
}

#[inline(always)]
fn is_exiting(task: *const u8, layout: &TaskLayout) -> bool {
    // SAFETY: bpf_probe_read_kernel checks the address; the offset comes from this kernel's BTF.
    unsafe { bpf_probe_read_kernel(task.add(layout.flags as usize).cast::<u32>()) }
        .is_ok_and(|flags| flags & PF_EXITING != 0)
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    // sched_process_exec(p, old_pid, bprm): a thread other than the main one that calls exec
    // takes the process's pid; its charged figure moves with it.
    // SAFETY: this raw tracepoint's context is its arguments, an array of u64s, and `old_pid` is
    // the second; the kernel checks at load and attach that reads stay within the arguments.
    let old_tid = unsafe { *(ctx.as_ptr() as *const u64).add(1) } as u32;
    if old_tid != tid {
        // SAFETY: a u64 copied out of the map.
        if let Some(charged) = unsafe { THREAD_CHARGED.get(old_tid) }.copied() {
            let _ = THREAD_CHARGED.insert(tid, charged, 0);
            let _ = THREAD_CHARGED.remove(old_tid);
        }
    }
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
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    // The thread's last stretch, from its last sample (or its start) to now. The counters are
    // left to the samplers: charging an exiting process with all its CPU counted since the last
    // sample would give it what the processes before it ran.
    if let Some(layout) = task_layout() {
        let ns = runtime_since_last_charge(&layout, pid_tgid, true);
        if ns > 0 {
            charge_process(
                tgid,
                &Charge {
                    ns,
                    ..Charge::default()
                },
            );
        }
        note_exited(&layout, tid, tgid);
    }
    let _ = THREAD_CHARGED.remove(tid);
    if tgid != tid {
        return 0; // a thread other than the main one: its time stays with the process
    }
    // SAFETY: the lookup's value is a plain #[repr(C)] struct, copied out.
    let Some(cpu) = (unsafe { PROCESS_CPU.get(tgid) }).copied() else {
        return 0;
    };
    let exit = ProcessExit {
        tgid,
        late: 0,
        cpu_ns: cpu.cpu_ns,
        cycles: cpu.cycles,
        instructions: cpu.instructions,
        cgroup_id: cpu.cgroup_id,
        comm: cpu.comm,
    };
    if PROCESS_EXITS
        .output::<ProcessExit>(&exit, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).lost_exits) });
    }
    let _ = PROCESS_CPU.remove(tgid);
    0
}

/// What the exiting thread has run so far, for its free to charge the rest.
#[inline(always)]
fn note_exited(layout: &TaskLayout, tid: u32, tgid: u32) {
    // SAFETY: a helper without arguments; the pointer is only read through probe_read.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let (Some(start_time), Some(runtime_ns)) = (
        read_u64(task, layout.start_time),
        read_u64(task, layout.sum_exec_runtime),
    ) else {
        return;
    };
    let exited = ExitedThread {
        tgid,
        _pad: 0,
        start_time,
        runtime_ns,
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if EXITED_THREADS.insert(tid, exited, 0).is_err() {
        // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).map_full) });
    }
}

/// sched_process_free(p): the kernel frees a thread's task, after its last switch. It runs in
/// whatever context frees it (an RCU callback), so everything is read from `p`, never from the
/// current task.
#[raw_tracepoint(tracepoint = "sched_process_free")]
pub fn sched_process_free(ctx: RawTracePointContext) -> i32 {
    let Some(layout) = task_layout() else {
        return 0;
    };
    // SAFETY: this raw tracepoint's context is its arguments, an array of u64s, and the task is
    // the first; the kernel checks at load and attach that reads stay within the arguments.
    let task = unsafe { *(ctx.as_ptr() as *const u64) } as *const u8;
    // SAFETY: bpf_probe_read_kernel checks the address; the offset comes from this kernel's BTF.
    let Ok(tid) = (unsafe { bpf_probe_read_kernel(task.add(layout.pid as usize).cast::<u32>()) })
    else {
        return 0;
    };
    // SAFETY: the lookup's value is a plain #[repr(C)] struct, copied out.
    let Some(exited) = (unsafe { EXITED_THREADS.get(tid) }).copied() else {
        return 0;
    };
    let (Some(start_time), Some(runtime_ns)) = (
        read_u64(task, layout.start_time),
        read_u64(task, layout.sum_exec_runtime),
    ) else {
        return 0;
    };
    if start_time != exited.start_time {
        return 0; // the tid was reused: the entry is another thread's, freed later
    }
    let _ = EXITED_THREADS.remove(tid);
    let ns = runtime_ns.saturating_sub(exited.runtime_ns);
    let charge = Charge {
        ns,
        ..Charge::default()
    };
    if ns == 0 || add_to_existing(exited.tgid, &charge) {
        return 0;
    }
    let late = ProcessExit {
        tgid: exited.tgid,
        late: 1,
        cpu_ns: ns,
        cycles: 0,
        instructions: 0,
        cgroup_id: exited.cgroup_id,
        comm: exited.comm,
    };
    if PROCESS_EXITS
        .output::<ProcessExit>(&late, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).lost_exits) });
    }
    0
}

/// A u64 at `offset` in `task`, when it can be read.
#[inline(always)]
fn read_u64(task: *const u8, offset: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel checks the address; the offsets come from this kernel's BTF.
    unsafe { bpf_probe_read_kernel(task.add(offset as usize).cast::<u64>()) }.ok()
}

/// Adds `charge` to the process's entry, making it at first sight. Two CPUs may both find no entry
/// for a new multi-threaded process: the loser of the insert (EEXIST) adds to the winner's.
/// The cgroup is read at first sight and at exec: `nbt run` moves its child before exec, so runs
/// are charged right; a process moved by another tool without exec stays charged to its first
/// cgroup.
#[inline(always)]
fn charge_process(tgid: u32, charge: &Charge) {
    if add_to_existing(tgid, charge) {
        return;
    }
    let entry = ProcessCpu {
        cpu_ns: charge.ns,
        cycles: charge.cycles,
        instructions: charge.instructions,
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if PROCESS_CPU
        .insert(tgid, entry, u64::from(BPF_NOEXIST))
        .is_err()
        && !add_to_existing(tgid, charge)
    {
        // SAFETY: `count` passes a pointer to its map slot; this only takes a field's address.
        count(|stats| unsafe { core::ptr::addr_of_mut!((*stats).map_full) });
    }
}

#[inline(always)]
fn add_to_existing(tgid: u32, charge: &Charge) -> bool {
    let Some(entry) = PROCESS_CPU.get_ptr_mut(tgid) else {
        return false;
    };
    // SAFETY: pointers into the map value, 8-byte aligned, valid for this program run.
    unsafe {
        atomic_add(core::ptr::addr_of_mut!((*entry).cpu_ns), charge.ns);
        if charge.cycles != 0 || charge.instructions != 0 {
            atomic_add(core::ptr::addr_of_mut!((*entry).cycles), charge.cycles);
            atomic_add(
                core::ptr::addr_of_mut!((*entry).instructions),
                charge.instructions,
            );
        }
    }
    true
}

#[inline(always)]
fn count(field: impl Fn(*mut SchedStats) -> *mut u64) {
    if let Some(stats) = SCHED_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot. A sample may interrupt an exit program on this CPU and lose
        // one increment of a loss counter; no figure depends on it.
        unsafe { *field(stats) += 1 };
    }
}
