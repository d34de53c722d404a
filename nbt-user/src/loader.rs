//! Loads nbt's kernel programs (one BPF object, built by build.rs and embedded in the binary).
//!
//! Each capability module takes the programs and maps it owns out of the loaded object. Everything
//! attached is owned by file descriptors inside the returned [`aya::Ebpf`]: dropping it detaches.

use anyhow::{Context as _, Result};
use aya::Ebpf;

/// The BPF object as built by aya-build from `nbt-ebpf` (its binary target is named `nbt`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nbt"));

/// Loads the object's maps into the kernel. Programs are loaded by the modules that attach them.
pub fn load() -> Result<Ebpf> {
    Ebpf::load(OBJECT).context(
        "loading nbt's BPF object into the kernel failed (needs root or CAP_BPF + CAP_NET_ADMIN; \
         `nbt probe` lists what this kernel supports)",
    )
}
