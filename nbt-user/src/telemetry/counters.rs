//! CPU counters for attribution: a cycle and an instruction counter on every CPU (the hardware
//! PMU, through perf_event_open), handed to the `sched` sampler in perf event arrays. The sampler
//! charges each interrupted process with what its CPU counted since the previous sample there
//! (`nbt-ebpf/src/sched.rs`), and the agent then splits energy by cycles instead of CPU time:
//! a process that stalls on memory, or runs while the clock is low, burns fewer cycles per
//! second on a CPU than one that keeps the core busy.
//!
//! Where there is no PMU (most VMs), attribution stays with CPU time and says why.
//! `--attribute-by sampled-cpu-clock` puts the software cpu-clock (nanoseconds) in place of
//! cycles: it runs the whole counter path on such machines, and its figures must then come out
//! as the sampled CPU time, which is how the tests check that path here.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Map, MapData};
use perf_event::events::{Event, Hardware, Software};
use perf_event::{Builder, Counter};

/// What the agent divides active energy by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttributeBy {
    /// Cycles where a hardware PMU exists, CPU time where none does
    Auto,
    /// The scheduler's CPU time per process
    CpuTime,
    /// Hardware cycles per process (refused where there is no PMU)
    Cycles,
    /// The software cpu-clock, sampled like cycles: runs the counter path where no PMU exists,
    /// and so equals sampled CPU time (for checking nbt, not for measuring)
    SampledCpuClock,
}

/// What the per-CPU counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Hardware cycles and instructions.
    Pmu,
    /// The software cpu-clock, standing in for cycles; no instructions.
    CpuClock,
}

impl Counted {
    /// The ratio's name, as `/v1/attribution` reports it.
    pub fn ratio(self) -> &'static str {
        match self {
            Counted::Pmu => "cycles",
            Counted::CpuClock => "sampled_cpu_clock",
        }
    }
}

/// The counters of every online CPU, open and counting; closed when dropped.
pub struct CpuCounters {
    pub counted: Counted,
    cycles: Vec<(u32, Counter)>,
    instructions: Vec<(u32, Counter)>,
    /// Why a PMU's instructions are not counted (the cycles still are).
    pub instructions_absent: Option<String>,
}

/// A counter of `event` on `cpu`, all processes, counting.
fn open_on(cpu: u32, event: impl Event) -> std::io::Result<Counter> {
    // Kernel time too: a system call's cycles are its caller's energy.
    let mut counter = Builder::new(event)
        .one_cpu(cpu as usize)
        .any_pid()
        .exclude_kernel(false)
        .build()?;
    counter.enable()?;
    Ok(counter)
}

/// Why a PMU cycle counter cannot be opened here, or `None` when it can.
pub fn pmu_missing() -> Option<String> {
    open_on(0, Hardware::CPU_CYCLES)
        .err()
        .map(|err| describe("cycles", 0, &err))
}

fn describe(event: &str, cpu: u32, err: &std::io::Error) -> String {
    let hint = match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) => {
            " (no hardware PMU: a VM without PMU passthrough?)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (needs root or CAP_PERFMON, or kernel.perf_event_paranoid at most 0)"
        }
        _ => "",
    };
    format!("perf_event_open({event}, CPU {cpu}): {err}{hint}")
}

impl CpuCounters {
    /// Opens the counters on `cpus`: cycles (or the cpu-clock) on every one, or an error;
    /// a PMU's instructions on every one, or on none, with the reason kept.
    pub fn open(counted: Counted, cpus: &[u32]) -> Result<CpuCounters> {
        let mut counters = CpuCounters {
            counted,
            cycles: Vec::with_capacity(cpus.len()),
            instructions: Vec::new(),
            instructions_absent: None,
        };
        for &cpu in cpus {
            let cycles = match counted {
                Counted::Pmu => open_on(cpu, Hardware::CPU_CYCLES)
                    .map_err(|err| anyhow!(describe("cycles", cpu, &err))),
                Counted::CpuClock => open_on(cpu, Software::CPU_CLOCK)
                    .map_err(|err| anyhow!(describe("cpu-clock", cpu, &err))),
            };
            counters.cycles.push((cpu, cycles?));
            if counted == Counted::Pmu && counters.instructions_absent.is_none() {
                match open_on(cpu, Hardware::INSTRUCTIONS) {
                    Ok(instructions) => counters.instructions.push((cpu, instructions)),
                    Err(err) => {
                        counters.instructions.clear();
                        counters.instructions_absent = Some(describe("instructions", cpu, &err));
                    }
                }
            }
        }
        Ok(counters)
    }

    pub fn counts_instructions(&self) -> bool {
        !self.instructions.is_empty()
    }

    /// Puts each CPU's counters at the CPU's index of the two perf event arrays.
    pub fn install(&self, cycles: &Map, instructions: &Map) -> Result<()> {
        for (map, counters) in [(cycles, &self.cycles), (instructions, &self.instructions)] {
            let Map::PerfEventArray(data) = map else {
                return Err(anyhow!(
                    "a counter map of nbt's object is not a perf event array"
                ));
            };
            for (cpu, counter) in counters {
                put_fd(data, *cpu, counter.as_raw_fd())
                    .with_context(|| format!("installing CPU {cpu}'s counter"))?;
            }
        }
        Ok(())
    }
}

/// `bpf(BPF_MAP_UPDATE_ELEM)` of a perf event array: aya opens such arrays only as output
/// buffers, not to hold counters.
fn put_fd(map: &MapData, index: u32, fd: i32) -> std::io::Result<()> {
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    let value = fd as u32;
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&index) as u64,
        value: std::ptr::from_ref(&value) as u64,
        flags: 0,
    };
    // SAFETY: the attribute points at two u32s that live across the call; the size is its own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            std::ptr::from_ref(&attr),
            size_of::<MapElemAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
