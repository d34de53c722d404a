//! Loads nbt's kernel programs (one BPF object, built by build.rs and embedded in the binary).
//!
//! Each capability module takes the programs and maps it owns out of the loaded object. A run's
//! links are pinned ([`Pins`]): they outlive nbt until unpinned.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program};
use aya::{Ebpf, EbpfLoader};
use nbt_common::edt::{EDT_SOCKETS_MAP, EDT_WIRE_SOCKETS_MAP};
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

/// The map of the run's sockets that `receive_ingress` looks arriving packets up in, used only
/// by runs that duplicate, corrupt or queue arriving packets: an LRU hash is always allocated in
/// full, and its 16,384 entries cost more to create than any other map a run makes.
pub const RUN_SOCKETS_MAPS: &[&str] = &[EDT_SOCKETS_MAP];

/// The map of the run's sockets seen leaving by an interface that `delay_egress` is on, used
/// only by runs that have the tc programs (`EdtRun::wire_loss`); an LRU hash, as above.
pub const WIRE_LOSS_MAPS: &[&str] = &[EDT_WIRE_SOCKETS_MAP];

/// Loads the object's maps into the kernel. Programs are loaded by the modules that attach them.
/// The maps named in `unused` (see [`SCHED_MAPS`], [`GATE_MAPS`], [`RUN_SOCKETS_MAPS`],
/// [`WIRE_LOSS_MAPS`]) are
/// created at their smallest: every map of the object must exist, but nothing will use these
/// ones (no program that uses them is loaded, or, for `EDT_SOCKETS`, the run's `EDT_RUN` tells
/// the programs that could write it not to).
///
/// Without the kernel's BTF: nbt's programs read no kernel structure (no CO-RE relocations), and
/// parsing /sys/kernel/btf/vmlinux costs about 20 MiB of memory and most of the loader's CPU
/// time at every start (see [`loader_without_kernel_btf`]).
pub fn load(unused: &[&[&str]]) -> Result<Ebpf> {
    load_sized(OBJECT, unused, &[]).context(
        "loading nbt's BPF object into the kernel failed (needs root or CAP_BPF + CAP_NET_ADMIN; \
         `nbt probe` lists what this kernel supports)",
    )
}

/// Loads `object` without the kernel's BTF, the maps in `unused` at their smallest and those in
/// `sized` with the entries given.
fn load_sized(
    object: &[u8],
    unused: &[&[&str]],
    sized: &[(&str, u32)],
) -> Result<Ebpf, aya::EbpfError> {
    let mut loader = loader_without_kernel_btf();
    loader.btf(None);
    for name in unused.iter().flat_map(|names| names.iter()) {
        loader.map_max_entries(name, smallest_entries(name));
    }
    for (name, entries) in sized {
        loader.map_max_entries(name, *entries);
    }
    loader.load(object)
}

/// Whether a perf_event program may use only preallocated hash maps here. Before Linux 6.1 (BPF's
/// own memory allocator) the verifier refuses a perf_event program that uses a hash map made with
/// `BPF_F_NO_PREALLOC` ("perf_event programs can only use preallocated hash map"): it runs in NMI
/// context, where the kernel could not allocate an element safely.
pub fn perf_event_needs_preallocated_maps() -> bool {
    kernel_version().is_some_and(|version| version < (6, 1))
}

/// The running kernel's (major, minor) version, from its release ("5.10.0-46-amd64").
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Loads like [`load`], with the hash maps `preallocated` names made preallocated (all their
/// entries allocated when the map is made, map flags 0) and that many entries each: the object's
/// map definitions are edited in a copy before aya reads it (aya can change a map's size, not
/// its flags).
pub fn load_preallocated(unused: &[&[&str]], preallocated: &[(&str, u32)]) -> Result<Ebpf> {
    let object = with_preallocated_maps(OBJECT, preallocated.iter().map(|(name, _)| *name))?;
    load_sized(object.bytes(), unused, preallocated).context(
        "loading nbt's BPF object (its hash maps preallocated, as this kernel needs) failed",
    )
}

/// A copy of a BPF object, 8-byte aligned as aya's ELF reader needs.
struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Where a legacy map definition (aya-ebpf's `bpf_map_def` in the "maps" section: type, key
/// size, value size, max entries, flags, id, pinning; u32 each) keeps its flags.
const MAP_FLAGS_OFFSET: usize = 16;
const BPF_F_NO_PREALLOC: u32 = 1;

/// `object` with the flags of the maps `names` cleared: `BPF_F_NO_PREALLOC` off.
fn with_preallocated_maps<'a>(
    object: &[u8],
    names: impl Iterator<Item = &'a str>,
) -> Result<AlignedObject> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let mut copy = AlignedObject {
        words: vec![0; object.len().div_ceil(8)],
        len: object.len(),
    };
    copy.bytes_mut().copy_from_slice(object);
    let mut offsets = Vec::new();
    {
        let elf = object::File::parse(object).context("reading nbt's BPF object")?;
        for name in names {
            let symbol = elf
                .symbols()
                .find(|s| s.name() == Ok(name))
                .ok_or_else(|| anyhow!("map {name} missing from nbt's BPF object"))?;
            let section = symbol
                .section_index()
                .and_then(|index| elf.section_by_index(index).ok())
                .filter(|section| section.name() == Ok("maps"))
                .ok_or_else(|| anyhow!("map {name} is not a legacy map definition"))?;
            let (start, _) = section
                .file_range()
                .ok_or_else(|| anyhow!("the maps section has no data"))?;
            let at = (start + symbol.address() - section.address()) as usize + MAP_FLAGS_OFFSET;
            offsets.push((name, at));
        }
    }
    for (name, at) in offsets {
        let field = copy
            .bytes_mut()
            .get_mut(at..at + 4)
            .ok_or_else(|| anyhow!("map {name}'s definition lies outside the object"))?;
        let flags = u32::from_le_bytes(field.try_into().expect("a 4-byte range"));
        if flags != BPF_F_NO_PREALLOC {
            anyhow::bail!("map {name}'s flags are {flags:#x}, not BPF_F_NO_PREALLOC: the map definition's layout is not what nbt expects");
        }
        field.copy_from_slice(&0u32.to_le_bytes());
    }
    Ok(copy)
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
        GATE_CONNS_MAP | EDT_SOCKETS_MAP | EDT_WIRE_SOCKETS_MAP => 256,
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

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    /// The flags word of map `name` in `object`.
    fn flags_of(object: &[u8], name: &str) -> u32 {
        let elf = object::File::parse(object).unwrap();
        let symbol = elf.symbols().find(|s| s.name() == Ok(name)).unwrap();
        let section = elf
            .section_by_index(symbol.section_index().unwrap())
            .unwrap();
        let data = section.data().unwrap();
        let at = (symbol.address() - section.address()) as usize + MAP_FLAGS_OFFSET;
        u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn preallocating_clears_only_the_named_maps_flags() {
        let names = [PROCESS_CPU_MAP, "THREAD_CHARGED", EXITED_THREADS_MAP];
        for name in names {
            assert_eq!(flags_of(OBJECT, name), BPF_F_NO_PREALLOC, "{name} as built");
        }
        let copy = with_preallocated_maps(OBJECT, names.into_iter()).unwrap();
        for name in names {
            assert_eq!(flags_of(copy.bytes(), name), 0, "{name} in the copy");
        }
        assert_eq!(copy.bytes().len(), OBJECT.len());
        let changed = copy
            .bytes()
            .iter()
            .zip(OBJECT)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            changed,
            names.len(),
            "one byte per map (the flag's low byte)"
        );
    }

    /// Every atomic instruction of the programs is a plain add (BPF_XADD), which every kernel
    /// nbt runs on verifies; the other atomics (or, and, xor, xchg, cmpxchg, fetch forms) need
    /// Linux 5.12, and LLVM makes one out of an add of a constant 0 (see `atomic_add`).
    #[test]
    fn the_programs_use_only_atomic_adds() {
        const BPF_STX_ATOMIC_W: u8 = 0xc3;
        const BPF_STX_ATOMIC_DW: u8 = 0xdb;
        let elf = object::File::parse(OBJECT).unwrap();
        let mut adds = 0;
        for section in elf
            .sections()
            .filter(|s| s.kind() == object::SectionKind::Text)
        {
            let code = section.data().unwrap();
            // 8-byte instructions; the second half of a 16-byte ld_imm64 has opcode 0.
            for (i, insn) in code.chunks_exact(8).enumerate() {
                if insn[0] == BPF_STX_ATOMIC_W || insn[0] == BPF_STX_ATOMIC_DW {
                    let imm = i32::from_le_bytes(insn[4..8].try_into().unwrap());
                    assert_eq!(
                        imm,
                        0,
                        "{}: instruction {i} is atomic operation {imm:#x}, not a plain add",
                        section.name().unwrap_or("?")
                    );
                    adds += 1;
                }
            }
        }
        assert!(
            adds > 10,
            "only {adds} atomic adds found: is this nbt's object?"
        );
    }

    #[test]
    fn preallocating_a_map_that_is_not_there_is_an_error() {
        let err = with_preallocated_maps(OBJECT, ["NO_SUCH_MAP"].into_iter())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("NO_SUCH_MAP"), "{err:#}");
        // A map made preallocated already (flags 0) is refused: its layout is not the one
        // expected, or it needs no change.
        let err = with_preallocated_maps(OBJECT, ["TASK_LAYOUT"].into_iter())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("flags are 0x0"), "{err:#}");
    }
}
