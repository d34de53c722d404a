//! Builds the kernel programs (`nbt-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, as aya-template does; the object is embedded into the `nbt` binary.
//! `cargo xtask setup` installs what this needs.

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let linker = std::process::Command::new("bpf-linker")
        .arg("--version")
        .output();
    if linker.is_err() {
        return Err(anyhow!(
            "bpf-linker is not installed; run `cargo xtask setup` (it installs bpf-linker 0.10.0 and the \
             nightly rust-src component needed to build nbt's eBPF programs)"
        ));
    }
    // aya-build watches nbt-ebpf; the ABI crate it shares with us changes the object too.
    println!("cargo:rerun-if-changed=../nbt-common/src");
    // The commit `/metrics`' nbt_build_info names, when the build is told it.
    println!("cargo:rerun-if-env-changed=NBT_GIT_COMMIT");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nbt-ebpf",
            root_dir: "../nbt-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (nbt-ebpf) failed")
}
