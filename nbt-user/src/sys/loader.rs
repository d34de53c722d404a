//! Loads nbt's kernel programs (one BPF object, built by build.rs and embedded in the binary).
//!
//! Each capability module takes the programs and maps it owns out of the loaded object. A run's
//! links are pinned ([`Pins`]): they outlive nbt until unpinned.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program};
use aya::{Ebpf, EbpfLoader};
use nbt_common::edt::EDT_SOCKETS_MAP;
use nbt_common::gate::{
    GATE_BY_DEST_MAP, GATE_CONNS_MAP, GATE_TEARDOWN_MAP, GATE_V4_MAP, GATE_V6_MAP,
};
use nbt_common::sched::{EXITED_THREADS_MAP, PROCESS_CPU_MAP, PROCESS_EXITS_MAP};

use crate::sys::pin::Pins;

/// The BPF object as built by aya-build from `nbt-ebpf` (its binary target is named `nbt`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nbt"));

/// The maps of the `sched` programs (CPU time per process), which only the agent attaches: the
/// three tables are sized for a whole node (65,536 processes, 262,144 threads), and creating them
/// costs more than everything else a run loads (the kernel allocates their bucket arrays).
pub const SCHED_MAPS: &[&str] = &[
    PROCESS_CPU_MAP,
    "THREAD_CHARGED",
    EXITED_THREADS_MAP,
    PROCESS_EXITS_MAP,
];

/// The maps of the gate, used only by runs with a balance.
pub const GATE_MAPS: &[&str] = &[
    GATE_CONNS_MAP,
    GATE_BY_DEST_MAP,
    GATE_V4_MAP,
    GATE_V6_MAP,
    GATE_TEARDOWN_MAP,
];

/// The map of the run's sockets that `impair_ingress` looks arriving packets up in, used only by
/// runs that duplicate or corrupt arriving packets: an LRU hash is always allocated in full, and
/// its 16,384 entries cost more to create than any other map a run makes.
pub const INGRESS_IMPAIR_MAPS: &[&str] = &[EDT_SOCKETS_MAP];

/// Loads the object's maps into the kernel. Programs are loaded by the modules that attach them.
/// The maps named in `unused` (see [`SCHED_MAPS`], [`GATE_MAPS`], [`INGRESS_IMPAIR_MAPS`]) are
/// created at their smallest: every map of the object must exist, but nothing will use these
/// ones (no program that uses them is loaded, or, for `EDT_SOCKETS`, the run's `EDT_RUN` tells
/// the programs that could write it not to).
///
/// Without the kernel's BTF: nbt's programs read no kernel structure (no CO-RE relocations), and
/// parsing /sys/kernel/btf/vmlinux costs about 20 MiB of memory and most of the loader's CPU
/// time at every start (see [`loader_without_kernel_btf`]).
pub fn load(unused: &[&[&str]]) -> Result<Ebpf> {
    let mut loader = loader_without_kernel_btf();
    loader.btf(None);
    for name in unused.iter().flat_map(|names| names.iter()) {
        loader.map_max_entries(name, smallest_entries(name));
    }
    loader.load(OBJECT).context(
        "loading nbt's BPF object into the kernel failed (needs root or CAP_BPF + CAP_NET_ADMIN; \
         `nbt probe` lists what this kernel supports)",
    )
}

/// How many entries an unused map `name` is made with: a ring buffer is at least a page; an LRU
/// hash a few hundred (its per-CPU free lists take entries from the common one in batches of
/// 128); any other map one.
fn smallest_entries(name: &str) -> u32 {
    match name {
        // SAFETY: sysconf has no preconditions.
        PROCESS_EXITS_MAP | GATE_TEARDOWN_MAP => match unsafe { libc::sysconf(libc::_SC_PAGESIZE) }
        {
            size if size > 0 => size as u32,
            _ => 4096,
        },
        GATE_CONNS_MAP | EDT_SOCKETS_MAP => 256,
        _ => 1,
    }
}

/// An `EbpfLoader` that did not parse the kernel's BTF. aya's `EbpfLoader::new` always reads and
/// parses `/sys/kernel/btf/vmlinux` (5 to 6 MiB on Debian's kernels), even when `btf(None)`
/// discards it afterwards. So it is called on a thread of its own whose root is
/// `/sys/kernel/btf`, below which no such path exists: `unshare(CLONE_FS)` gives that thread
/// alone its root directory, and the thread ends once the loader is made. Where this cannot be
/// done (no CAP_SYS_CHROOT, no kernel BTF at all), the loader is made here as aya makes it.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    const KERNEL_BTF: &str = "/sys/kernel/btf";
    if !Path::new(KERNEL_BTF).join("vmlinux").exists() {
        return EbpfLoader::new();
    }
    let made = std::thread::Builder::new().spawn(|| {
        let root = std::ffi::CString::new(KERNEL_BTF).expect("no NUL in a constant path");
        // SAFETY: unshare(CLONE_FS) and chroot change only this thread's root (it shares its
        // filesystem attributes with no other thread once unshared); `root` outlives the call.
        let alone =
            unsafe { libc::unshare(libc::CLONE_FS) == 0 && libc::chroot(root.as_ptr()) == 0 };
        alone.then(EbpfLoader::new)
    });
    match made.map(std::thread::JoinHandle::join) {
        Ok(Ok(Some(loader))) => loader,
        _ => EbpfLoader::new(),
    }
}

/// The program `name` of the object, for a module to load and attach.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("BPF program {name} missing from nbt's object"))?;
    Ok(program.try_into()?)
}

/// The run's cgroup v2 directory, opened for attaching programs to it.
pub fn open_cgroup(cgroup_dir: &Path) -> Result<File> {
    File::open(cgroup_dir).with_context(|| format!("opening cgroup {}", cgroup_dir.display()))
}

/// Loads the cgroup_skb programs `ingress` and `egress` and attaches them to `cgroup`, beside any
/// other programs there: through a BPF link (Linux 5.7+) an attachment is always one of many,
/// and the kernel refuses any mode flag, so "Single" is aya's way of passing none.
pub fn attach_cgroup_skb(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cgroup_dir: &Path,
    ingress: &str,
    egress: &str,
    pins: &mut Pins,
) -> Result<()> {
    for (name, attach_type) in [
        (ingress, CgroupSkbAttachType::Ingress),
        (egress, CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = program(ebpf, name)?;
        program
            .load()
            .with_context(|| format!("the kernel refused to load BPF program {name}"))?;
        let link = program
            .attach(cgroup, attach_type, CgroupAttachMode::Single)
            .with_context(|| format!("attaching BPF program {name} to {}", cgroup_dir.display()))?;
        pins.add(name, program.take_link(link)?)?;
    }
    Ok(())
}
