//! `nbt probe`: what this kernel and machine support, feature by feature, with the reason for each
//! missing one. Reads only: it changes nothing on the machine.

use std::io::Read as _;
use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_map_supported, is_program_supported};
use serde::Serialize;

use crate::enforce::cgroup::{Layout, Placement, CONTROLLERS};

#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub group: &'static str,
    pub name: String,
    pub available: bool,
    pub detail: String,
}

fn feature(
    group: &'static str,
    name: impl Into<String>,
    available: bool,
    detail: impl Into<String>,
) -> Feature {
    Feature {
        group,
        name: name.into(),
        available,
        detail: detail.into(),
    }
}

pub fn probe() -> Vec<Feature> {
    let mut features = Vec::new();
    cgroups(&mut features);
    bpf(&mut features);
    qdiscs(&mut features);
    hardware(&mut features);
    features
}

fn cgroups(out: &mut Vec<Feature>) {
    let layout = match Layout::detect() {
        Ok(layout) => layout,
        Err(err) => {
            out.push(feature(
                "cgroups",
                "cgroup filesystem",
                false,
                format!("{err:#}"),
            ));
            return;
        }
    };
    out.push(match &layout.v2_self {
        Some(dir) => feature(
            "cgroups",
            "cgroup v2",
            true,
            format!("{} (mode: {})", dir.display(), layout.mode()),
        ),
        None => feature(
            "cgroups",
            "cgroup v2",
            false,
            "cgroup2 is not mounted: nbt attaches its BPF programs there",
        ),
    });
    for controller in CONTROLLERS.into_iter().chain(["freezer"]) {
        let detail = match layout.placement(controller) {
            Some(Placement::V2) => "in cgroup v2".to_string(),
            Some(Placement::V1) => {
                format!("in cgroup v1 at {}", layout.v1_self[controller].display())
            }
            None => "mounted in neither cgroup v2 nor v1".to_string(),
        };
        out.push(feature(
            "cgroups",
            format!("{controller} controller"),
            layout.placement(controller).is_some(),
            detail,
        ));
    }
    let swap = match layout.placement("memory") {
        Some(Placement::V2) => feature("cgroups", "swap limits", true, "memory.swap.max"),
        Some(Placement::V1) if layout.v1_swap_accounting() => {
            feature("cgroups", "swap limits", true, "v1 memory.memsw.*")
        }
        Some(Placement::V1) => feature(
            "cgroups",
            "swap limits",
            false,
            "no memory.memsw.* files: boot with swapaccount=1",
        ),
        None => feature("cgroups", "swap limits", false, "no memory controller"),
    };
    out.push(swap);
    later_files(&layout, out);
    let psi = Path::new("/proc/pressure/cpu").exists();
    out.push(feature(
        "cgroups",
        "pressure stall information",
        psi,
        if psi {
            "/proc/pressure and cgroup v2 *.pressure files"
        } else {
            "/proc/pressure absent: kernel without CONFIG_PSI, or booted with psi=0"
        },
    ));
}

/// cgroup v2 files newer than cgroup v2 itself: where the kernel has none, what nbt does instead.
/// Looked for in an existing cgroup below nbt's own v2 cgroup's root that has the controller
/// (the root cgroup has none of these files), so that a kernel with backports is judged by
/// what it has.
fn later_files(layout: &Layout, out: &mut Vec<Feature>) {
    const FILES: [(&str, &str, &str); 3] = [
        (
            "memory",
            "memory.peak",
            "the memory peak is sampled every 100 ms instead (Linux 5.19 added memory.peak); \
             a spike shorter than that can be missed",
        ),
        (
            "pids",
            "pids.peak",
            "the process peak is sampled every 100 ms instead",
        ),
        (
            "",
            "cgroup.kill",
            "a run's processes are killed one by one until none is left (Linux 5.14 added cgroup.kill)",
        ),
    ];
    let Some(root) = layout.v2_self.as_deref().map(v2_mount_root) else {
        return;
    };
    for (controller, file, without) in FILES {
        if !controller.is_empty() && layout.placement(controller) != Some(Placement::V2) {
            continue;
        }
        // A cgroup to look in: one with the controller's files, or any for cgroup.kill.
        let witness = if controller.is_empty() {
            "cgroup.procs".to_string()
        } else {
            format!("{controller}.max")
        };
        let seen = cgroups_below(&root, 2)
            .into_iter()
            .find(|dir| dir.join(&witness).exists())
            .map(|dir| dir.join(file).exists());
        let (available, detail) = match seen {
            Some(true) => (true, file.to_string()),
            Some(false) => (false, format!("this kernel has no {file}: {without}")),
            None => (
                false,
                format!("unknown: no cgroup to look for {file} in yet (a run or zone makes one); without it {without}"),
            ),
        };
        out.push(feature("cgroups", file, available, detail));
    }
}

/// The cgroup2 mount point that holds `dir`.
fn v2_mount_root(dir: &Path) -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let point = words.nth(1)?;
            (words.next()? == "cgroup2").then(|| std::path::PathBuf::from(point))
        })
        .filter(|point| dir.starts_with(point))
        .max_by_key(|point| point.as_os_str().len())
        .unwrap_or_else(|| dir.to_path_buf())
}

/// The cgroups below `root`, `depth` levels at most, breadth first.
fn cgroups_below(root: &Path, depth: usize) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for _ in 0..depth {
        let next: Vec<_> = level
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        found.extend(next.iter().cloned());
        level = next;
    }
    found
}

fn bpf(out: &mut Vec<Feature>) {
    let programs = [
        (
            ProgramType::CgroupSkb,
            "cgroup_skb",
            "byte accounting and shaping",
        ),
        (
            ProgramType::CgroupSockAddr,
            "cgroup_sock_addr",
            "the balance gate (connect, sendmsg)",
        ),
        (
            ProgramType::SockOps,
            "sock_ops",
            "TCP pacing of the run's sockets",
        ),
        (
            ProgramType::SchedClassifier,
            "sched_cls",
            "EDT latency on tc egress",
        ),
        (
            ProgramType::RawTracePoint,
            "raw_tracepoint",
            "exec/exit CPU-time telemetry",
        ),
        (
            ProgramType::PerfEvent,
            "perf_event",
            "sampling CPU time (cpu-clock)",
        ),
    ];
    for (program_type, name, used_for) in programs {
        let (available, detail) = match is_program_supported(program_type) {
            Ok(true)
                if program_type == ProgramType::PerfEvent
                    && crate::sys::loader::perf_event_needs_preallocated_maps() =>
            {
                (
                    true,
                    format!(
                        "for {used_for}; before Linux 6.1 its hash maps must be preallocated: \
                         the agent's tables are smaller (16,384 processes, 32,768 threads)"
                    ),
                )
            }
            Ok(true) => (true, format!("for {used_for}")),
            Ok(false) => (
                false,
                format!("the kernel refuses this program type; needed for {used_for}"),
            ),
            Err(err) => (false, format!("probe failed: {err} (run as root)")),
        };
        out.push(feature(
            "bpf",
            format!("{name} programs"),
            available,
            detail,
        ));
    }
    let maps = [
        (MapType::PerCpuArray, "percpu_array"),
        (MapType::Hash, "hash"),
        (MapType::LruHash, "lru_hash"),
        (MapType::LpmTrie, "lpm_trie"),
        (MapType::PerfEventArray, "perf_event_array"),
        (MapType::RingBuf, "ringbuf"),
    ];
    for (map_type, name) in maps {
        let (available, detail) = match is_map_supported(map_type) {
            Ok(true) => (true, String::new()),
            Ok(false) => (false, "the kernel refuses this map type".to_string()),
            Err(err) => (false, format!("probe failed: {err} (run as root)")),
        };
        out.push(feature("bpf", format!("{name} maps"), available, detail));
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(feature(
        "bpf",
        "BTF",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux"
        } else {
            "/sys/kernel/btf/vmlinux absent (CONFIG_DEBUG_INFO_BTF off): the agent cannot track CPU time per process"
        },
    ));
    let (available, detail) = match crate::enforce::gate::teardown_path() {
        Ok(path) => (
            true,
            format!("{path}: a request the balance cannot pay aborts its connection (ECONNABORTED)"),
        ),
        Err(why) => (
            false,
            format!("{why}: a refused request's connection sends nothing more, and its client waits for TCP's timeout"),
        ),
    };
    out.push(feature("bpf", "gate teardown", available, detail));
}

/// The kernel's build configuration, from /proc/config.gz when the kernel exposes it. Read and
/// decompressed once per process: a plan asks for fq and ifb, `nbt probe` for every qdisc.
fn kernel_config() -> Option<&'static str> {
    static CONFIG: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let file = std::fs::File::open("/proc/config.gz").ok()?;
            let mut text = String::new();
            flate2::read::GzDecoder::new(file)
                .read_to_string(&mut text)
                .ok()?;
            Some(text)
        })
        .as_deref()
}

/// How the kernel's configuration gives `CONFIG_{option}`, whose module is `module`.
enum Built {
    In,
    Module,
    ModuleNotInstalled,
    Not,
}

fn built(config: &str, option: &str, module: &str) -> Built {
    match config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("CONFIG_{option}=")))
    {
        Some("y") => Built::In,
        Some("m") if module_present(module) => Built::Module,
        Some("m") => Built::ModuleNotInstalled,
        _ => Built::Not,
    }
}

fn module_present(module: &str) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    let listing = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    listing.lines().any(|l| {
        l.split(':').next().is_some_and(|p| {
            p.ends_with(&format!("/{module}.ko")) || p.contains(&format!("/{module}.ko."))
        })
    })
}

/// Why the kernel cannot give `CONFIG_{option}` (built in, or module `module` installed), or
/// `None` when it can (or cannot be told: no /proc/config.gz).
fn config_missing(option: &str, module: &str) -> Option<String> {
    match built(kernel_config()?, option, module) {
        Built::In | Built::Module => None,
        Built::ModuleNotInstalled => Some(format!(
            "this kernel built {module} as a module that is not installed under /lib/modules"
        )),
        Built::Not => Some(format!(
            "this kernel does not have it (CONFIG_{option} is not set)"
        )),
    }
}

/// Why the fq qdisc cannot be used on this kernel, or `None` when it can (or cannot be told).
pub fn fq_missing() -> Option<String> {
    config_missing("NET_SCH_FQ", "sch_fq")
}

/// What the ingress queue needs that this kernel lacks ("the fq qdisc, and this kernel ..."), or
/// `None`.
pub fn ingress_queue_missing() -> Option<String> {
    fq_missing()
        .map(|why| format!("the fq qdisc, and {why}"))
        .or_else(|| ifb_missing().map(|why| format!("the ifb device, and {why}")))
}

/// Why the ifb device (the ingress queue's) cannot be made on this kernel, or `None` when it can
/// (or cannot be told).
pub fn ifb_missing() -> Option<String> {
    config_missing("IFB", "ifb")
}

fn qdiscs(out: &mut Vec<Feature>) {
    let config = kernel_config();
    let qdiscs = [
        (
            "fq",
            "NET_SCH_FQ",
            "sch_fq",
            "EDT pacing for --latency/--jitter",
        ),
        (
            "netem",
            "NET_SCH_NETEM",
            "sch_netem",
            "the seed's reference method (benchmarks)",
        ),
        (
            "htb",
            "NET_SCH_HTB",
            "sch_htb",
            "the seed's reference method (benchmarks)",
        ),
        (
            "clsact",
            "NET_SCH_INGRESS",
            "sch_ingress",
            "tc BPF programs",
        ),
    ];
    for (name, option, module, used_for) in qdiscs {
        let (available, detail) = match config.map(|c| built(c, option, module)) {
            None => (
                false,
                "unknown: /proc/config.gz is absent, so the kernel's build options cannot be read"
                    .to_string(),
            ),
            Some(Built::In) => (true, format!("built in; for {used_for}")),
            Some(Built::Module) => (true, format!("module {module}; for {used_for}")),
            Some(Built::ModuleNotInstalled) => (
                false,
                format!("built as module {module}, but it is not installed under /lib/modules"),
            ),
            Some(Built::Not) => (
                false,
                format!("not built (CONFIG_{option} is not set); needed for {used_for}"),
            ),
        };
        out.push(feature("qdiscs", name, available, detail));
    }
    let missing = ingress_queue_missing();
    out.push(feature(
        "qdiscs",
        "ingress queue",
        missing.is_none(),
        match (&missing, &config) {
            (Some(why), _) => {
                format!("--ingress-rate polices (drops beyond the rate): the queue needs {why}")
            }
            (None, Some(_)) => {
                "ifb device + fq: arriving packets beyond --ingress-rate wait at the rate".into()
            }
            (None, None) => "unknown (no /proc/config.gz): nbt tries the ifb device and fq \
                             when a run has an ingress rate"
                .into(),
        },
    ));
}

fn hardware(out: &mut Vec<Feature>) {
    let missing = crate::telemetry::counters::pmu_missing();
    out.push(feature(
        "hardware",
        "hardware PMU (cycles, instructions)",
        missing.is_none(),
        match missing {
            None => "a cycle counter opens on CPU 0: the agent splits energy by cycles".into(),
            Some(why) => format!("{why}: the agent splits energy by CPU time"),
        },
    ));
    let rapl_perf = Path::new("/sys/bus/event_source/devices/power").exists();
    let rapl_powercap = Path::new("/sys/class/powercap/intel-rapl:0").exists();
    out.push(feature(
        "hardware",
        "RAPL energy counters",
        rapl_perf || rapl_powercap,
        match (rapl_perf, rapl_powercap) {
            (true, _) => "perf 'power' PMU",
            (false, true) => "powercap intel-rapl",
            _ => "neither the perf 'power' PMU nor /sys/class/powercap/intel-rapl:0 exists: energy comes from the model",
        },
    ));
    let nvml = nvml_library();
    out.push(feature(
        "hardware",
        "NVML (NVIDIA GPUs)",
        nvml,
        if nvml {
            "libnvidia-ml.so.1 loads: --gpu-power-limit, --gpu-clock, --gpu-mem-clock, --gpu-memory and GPU sensors work"
        } else {
            "libnvidia-ml.so.1 not found: no NVIDIA driver on this machine; --gpu-power-limit, --gpu-clock, --gpu-mem-clock and --gpu-memory are refused, GPU sensors not sampled"
        },
    ));
    let sys = crate::enforce::hwcaps::sysfs_root();
    let cpufreq = sys
        .join("devices/system/cpu/cpu0/cpufreq/scaling_max_freq")
        .exists();
    out.push(feature(
        "hardware",
        "cpufreq",
        cpufreq,
        if cpufreq {
            "scaling_max_freq: --cpu-max-freq works".to_string()
        } else {
            format!(
                "{} absent: no frequency scaling driver (common in VMs); --cpu-max-freq is refused",
                sys.join("devices/system/cpu/cpu0/cpufreq").display()
            )
        },
    ));
    let temperature = crate::enforce::hwcaps::cpu::temperature_c(&sys);
    out.push(feature(
        "hardware",
        "CPU temperature",
        temperature.is_some(),
        match temperature {
            Some(c) => format!("hwmon reads {c:.0} °C now: sampled during runs"),
            None => format!(
                "no coretemp, k10temp or zenpower sensor under {}: not sampled",
                sys.join("class/hwmon").display()
            ),
        },
    ));
    let turbo = crate::enforce::hwcaps::cpu::turbo_switch(&sys);
    out.push(feature(
        "hardware",
        "turbo control",
        turbo.is_ok(),
        match &turbo {
            Ok((path, _)) => format!("{}: --no-turbo works", path.display()),
            Err(why) => format!("{why}; --no-turbo is refused"),
        },
    ));
}

fn nvml_library() -> bool {
    // SAFETY: dlopen with a constant C string; the handle is closed at once.
    unsafe {
        let handle = libc::dlopen(
            c"libnvidia-ml.so.1".as_ptr(),
            libc::RTLD_LAZY | libc::RTLD_LOCAL,
        );
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
        true
    }
}
