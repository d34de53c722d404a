//! Builds the kernel programs (`nbt-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, as aya-template does; the object is embedded into the `nbt` binary.
//! `cargo xtask setup` installs what this needs.

use anyhow::{anyhow, Context as _};

/// The checkout's commit (12 hex digits), and a rerun of this script when it moves.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/logs/HEAD");
    }
    Some(commit)
}

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
    // The commit `nbt --version` and `/metrics`' nbt_build_info name: NBT_GIT_COMMIT when the
    // build is given it (a package built outside git), else git's own, else "unknown".
    println!("cargo:rerun-if-env-changed=NBT_GIT_COMMIT");
    let commit = std::env::var("NBT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NBT_GIT_COMMIT={commit}");
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
