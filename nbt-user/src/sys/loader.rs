//! Loads nbt's kernel programs (one BPF object, built by build.rs and embedded in the binary).
//!
//! Each capability module takes the programs and maps it owns out of the loaded object. A run's
//! links are pinned ([`Pins`]): they outlive nbt until unpinned.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program};
use aya::Ebpf;

use crate::sys::pin::Pins;

/// The BPF object as built by aya-build from `nbt-ebpf` (its binary target is named `nbt`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nbt"));

/// Loads the object's maps into the kernel. Programs are loaded by the modules that attach them.
///
/// Without the kernel's BTF: nbt's programs read no kernel structure (no CO-RE relocations), and
/// parsing /sys/kernel/btf/vmlinux would cost about 20 MiB of memory at every start.
pub fn load() -> Result<Ebpf> {
    aya::EbpfLoader::new().btf(None).load(OBJECT).context(
        "loading nbt's BPF object into the kernel failed (needs root or CAP_BPF + CAP_NET_ADMIN; \
         `nbt probe` lists what this kernel supports)",
    )
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
