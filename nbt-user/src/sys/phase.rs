//! Where a run's time goes: with `NBT_PHASES` set, each step of `nbt run` prints one line to
//! stderr (`nbt-phase NAME wall_ms W cpu_ms C vm_busy B`): the time since the first step, nbt's
//! own CPU time (all threads, the kernel's work for its system calls included, and what its
//! process did before `main`) and the whole machine's busy clock ticks (user, nice, system, irq,
//! softirq of /proc/stat: kernel work done outside nbt's threads, such as freeing maps, shows
//! there only). How docs/benchmarks.md measured nbt's fixed cost. Unset, a step costs one look
//! at a cached flag.

use std::sync::OnceLock;
use std::time::Instant;

/// When the first step was marked, if `NBT_PHASES` is set.
fn first_step() -> Option<Instant> {
    static FIRST: OnceLock<Option<Instant>> = OnceLock::new();
    *FIRST.get_or_init(|| std::env::var_os("NBT_PHASES").map(|_| Instant::now()))
}

/// The machine's busy time in clock ticks: user, nice, system, irq and softirq of /proc/stat.
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum()
}

/// Marks the end of the step `name` (see the module's documentation).
pub fn mark(name: &str) {
    let Some(first) = first_step() else { return };
    let mut cpu = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `cpu` is.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut cpu) };
    eprintln!(
        "nbt-phase {name} wall_ms {:.1} cpu_ms {:.1} vm_busy {}",
        first.elapsed().as_secs_f64() * 1e3,
        cpu.tv_sec as f64 * 1e3 + cpu.tv_nsec as f64 / 1e6,
        busy_ticks()
    );
}
