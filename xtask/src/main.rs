//! `cargo xtask`: what a newcomer or CI needs, nothing the product needs at run time.
//!
//!   cargo xtask setup          install what this machine lacks (idempotent, fast when done)
//!   cargo xtask run [-- ARGS]  set up, build, run `nbt ARGS` as root (default: `nbt demo`)
//!   cargo xtask test           set up, build, run every test as root
//!   cargo xtask fuzz           run each fuzz target of fuzz/ for a minute (docs/fuzzing.md)

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, Context as _, Result};

mod bench;
mod bench_paths;
mod dist;
mod fuzz;
mod layers;
mod telemetry;
mod vm;
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.0";
const NIGHTLY: &str = "nightly";
/// The kubernetes-validate release the manifests' test uses (PyPI).
const KUBERNETES_VALIDATE: &str = "1.37.0";

/// Where `setup` installs kubernetes-validate (tests/it/deploy.rs runs it from there).
fn kubernetes_validate() -> PathBuf {
    workspace_root().join("target/tools/kubernetes-validate/bin/kubernetes-validate")
}

/// Debian packages the tests and benchmarks use, with why.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip: network namespaces and veth pairs for the network tests",
    ),
    ("qemu-system-x86", "the VMs of `cargo xtask vm-test`"),
    (
        "busybox-static",
        "the shell and tools inside those VMs, and the one binary of the Docker tests' image",
    ),
    ("cpio", "packing the VMs' initramfs"),
    ("kmod", "depmod for the VMs' kernel modules"),
    (
        "util-linux",
        "nsenter: a workload in a test's network namespace, outside the run",
    ),
    (
        "python3",
        "a third party checking receipts without nbt (sqlite3, hashlib, json); Python's HTTP \
         server and clients of every socket kind for the gate's tests",
    ),
    (
        "curl",
        "a real HTTP client reusing one connection for several URLs (the gate's tests)",
    ),
    (
        "openssl",
        "the same third party checking the receipts' ed25519 signatures",
    ),
    (
        "tmux",
        "a terminal of fixed size for `nbt top`'s tests: keys sent, the screen read back",
    ),
    (
        "prometheus",
        "a real Prometheus server scraping the agent's /metrics in a test",
    ),
    // dockerd, containerd and runc. The tests start an engine of their own (own socket,
    // data-root, containerd; no bridge, no iptables) and never use the machine's: the package
    // enables a docker.service, which starts on machines booted with systemd and not elsewhere.
    (
        "docker.io",
        "a real Docker engine whose containers nbt attaches to (tests/src/docker.rs)",
    ),
    (
        "python3-venv",
        "a virtual environment for kubernetes-validate (the Kubernetes manifests' offline check)",
    ),
    (
        "debootstrap",
        "a clean Debian 12 without Rust that `cargo xtask dist`'s package is installed into",
    ),
    (
        "binutils",
        "objdump (the glibc the binary needs, for the package's Depends) and strip",
    ),
    (
        "chromium",
        "headless Chromium rendering `nbt report`'s HTML in a test (its DOM, a screenshot)",
    ),
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run and test nbt")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: rust-src for nightly, bpf-linker, Debian packages
    Setup,
    /// Set up if needed, build (release), and run `nbt ARGS` as root; without ARGS, `nbt demo`
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, build, and run every test (unit, integration, and the VM tests) as root
    Test,
    /// Build the Debian package (target/dist/nbt_VERSION_amd64.deb): the release binary, a man
    /// page per subcommand, bash/zsh/fish completions, the licences, the agent's systemd unit and
    /// /etc/nbt/agent.env; `--test` installs it into a clean Debian 12 (debootstrap) and checks it
    Dist {
        #[arg(long)]
        test: bool,
    },
    /// Check that nbt-user's modules import only from lower layers and in no circle
    /// (docs/layout.md); `--graph` prints every module's imports
    Layers {
        #[arg(long)]
        graph: bool,
    },
    /// Kernel-feature tests in QEMU VMs booted from Debian's 5.10, 6.1 and 6.12 kernels, and the
    /// package's install test in the 5.10 one (NBT_VM_TESTS=FILE: that script in place of
    /// xtask/src/vm-init.sh, to try one thing)
    VmTest {
        /// 5.10, 6.1, 6.12 or all
        #[arg(long, default_value = "all")]
        kernel: String,
    },
    /// Benchmarks (not tests), side by side against a reference; results in docs/benchmarks.md
    Bench {
        /// `net`: nbt's shaping against the seed's `tc htb` on a veth pair; `vm`: against the
        /// seed's `tc htb` + `netem` inside the Debian kernels' VMs; `telemetry`: the cost of
        /// the CPU-time tracking and the agent's footprint with 1,000 processes; `paths`: nbt's
        /// rate accuracy (and htb's beside it) on loopback and veth at MTU 1500 and 9000, for TCP
        /// cubic, reno, bbr and UDP, egress and ingress, 512kbit to 1gbit; `vm-ingress`: TCP
        /// into a run limited on arrival, htb on ifb against nbt's policer and its queue
        /// (--ingress-queue), in the 6.12 VM (fq)
        #[arg(value_parser = ["net", "vm", "vm-ingress", "telemetry", "paths"])]
        kind: String,
        /// For `vm` and `vm-ingress`: 5.10, 6.1, 6.12 or all (default 6.12)
        #[arg(long)]
        kernel: Option<String>,
        /// For `net` and `paths`: how many times each limited case runs (htb and nbt alternate),
        /// so that the accuracy comparison does not rest on one sample of each
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        repeat: u32,
        #[command(flatten)]
        paths: bench_paths::Options,
    },
    /// Run the cargo-fuzz targets of fuzz/ under libFuzzer (installs cargo-fuzz when missing)
    /// and print each one's executions, coverage and crashes; fails when any target crashed
    Fuzz {
        /// How long each target runs (libFuzzer would read 0 as no limit: refused)
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Only this target (a file name of fuzz/fuzz_targets without .rs)
        #[arg(long)]
        target: Option<String>,
        /// Go on past crashes, timeouts and OOMs (libFuzzer's fork mode), counting each, so
        /// that a target with a known crash still runs its whole time
        #[arg(long)]
        keep_going: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Run { args } => run(args),
        Task::Test => test(),
        Task::Bench {
            kind,
            kernel,
            repeat,
            paths,
        } => bench(&kind, kernel.as_deref(), repeat, &paths),
        Task::VmTest { kernel } => vm_test(&kernel),
        Task::Layers { graph } => Ok(check_layers(graph)),
        Task::Dist { test } => dist_task(test),
        Task::Fuzz {
            seconds,
            target,
            keep_going,
        } => fuzz_targets(seconds, target.as_deref(), keep_going),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program args`, through sudo (keeping the toolchain's environment) when we are not root.
fn as_root(program: &str, args: &[&str]) -> Command {
    if is_root() {
        let mut command = Command::new(program);
        command.args(args);
        command
    } else {
        let mut command = Command::new("sudo");
        command
            .arg("--preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME,CARGO_TARGET_DIR")
            .arg(program)
            .args(args);
        command
    }
}

fn status(command: &mut Command) -> Result<bool> {
    let shown = format!("{command:?}");
    Ok(command
        .status()
        .with_context(|| format!("running {shown}"))?
        .success())
}

fn check(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    if !status(command)? {
        bail!("{shown} failed");
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<ExitCode> {
    let mut installed = Vec::new();

    let components = output(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    );
    if components.is_none() {
        bail!(
            "the {NIGHTLY} toolchain is not installed (rustup toolchain list); nbt's eBPF programs are \
             built with it: `rustup toolchain install {NIGHTLY} --profile minimal`"
        );
    }
    if !components
        .unwrap()
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("xtask setup: installing rust-src for the {NIGHTLY} toolchain (eBPF builds need core's source)");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
        installed.push("rust-src (nightly)".to_string());
    }

    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF programs; about a minute)"
        );
        check(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
        installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            !output("dpkg-query", &["-W", "-f=${Status}", name])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        for (name, why) in DEBIAN_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
            eprintln!("xtask setup: installing Debian package {name}: {why}");
        }
        check(as_root("apt-get", &["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        check(as_root("apt-get", &args).env("DEBIAN_FRONTEND", "noninteractive"))?;
        installed.extend(missing.iter().map(|m| m.to_string()));
    }

    // kubernetes-validate (PyPI; the Kubernetes API's schemas bundled, so it checks offline) in
    // a virtual environment of the target directory: never the machine's own Python packages.
    let validate = kubernetes_validate();
    if !validate.exists() {
        let venv = validate.parent().unwrap().parent().unwrap().to_path_buf();
        eprintln!(
            "xtask setup: installing kubernetes-validate {KUBERNETES_VALIDATE} in {} (checks the \
             manifests of deploy/kubernetes offline)",
            venv.display()
        );
        check(
            Command::new("/usr/bin/python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv),
        )?;
        check(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q"])
                .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")),
        )?;
        installed.push(format!("kubernetes-validate {KUBERNETES_VALIDATE}"));
    }

    if installed.is_empty() {
        eprintln!("xtask setup: nothing to install");
    } else {
        eprintln!("xtask setup: installed {}", installed.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(args).current_dir(workspace_root());
    command
}

fn run(args: Vec<String>) -> Result<ExitCode> {
    setup()?;
    check(&mut cargo(&[
        "build",
        "--release",
        "--package",
        "nbt-user",
        "--bins",
    ]))?;
    let nbt = workspace_root().join("target/release/nbt");
    let args: Vec<String> = if args.is_empty() {
        vec!["demo".into()]
    } else {
        args
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = as_root(nbt.to_str().unwrap(), &args)
        .status()
        .with_context(|| format!("running {}", nbt.display()))?
        .code()
        .unwrap_or(1);
    Ok(ExitCode::from(code as u8))
}

fn test() -> Result<ExitCode> {
    setup()?;
    // The clean Debian 12 of the package's install test is downloaded while the build runs
    // (network and disk against the compiler's CPU), not later in the tests' own time.
    let rootfs = std::thread::spawn(|| dist::bookworm_rootfs(&workspace_root()));
    // One build, in the release profile: the integration tests run the very binaries the
    // package and the VMs ship, and the workspace is compiled once (a debug build beside the
    // release one cost CI 3.3 minutes).
    build_release_binaries()?;
    rootfs
        .join()
        .map_err(|_| anyhow!("the debootstrap thread panicked"))??;
    // One test at a time: the CPU tests measure CPU time, which parallel tests would disturb.
    let args = [
        "test",
        "--release",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ];
    let mut command = cargo(&args);
    if !is_root() {
        let cargo_path = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        command = as_root(&cargo_path, &args);
        command.current_dir(workspace_root());
    }
    let passed = status(&mut command)?;
    // The package, installed where it will be: a clean Debian 12 with no Rust, in the 5.10 VM
    // (`cargo xtask dist --test` installs it in a chroot on this host too). The kernel-feature
    // tests: pure cgroup v2 and fq, on Debian's 5.10 kernel, the oldest (`cargo xtask vm-test`
    // adds 6.1 and 6.12; CI's 30 minutes hold one VM).
    let deb = dist::build(&workspace_root())?;
    let vm_passed = vm::run(&workspace_root(), "test", &deb)?;
    if !passed || !vm_passed {
        eprintln!("xtask test: some tests failed (see above)");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("xtask test: all tests passed");
    Ok(ExitCode::SUCCESS)
}

fn bench(
    kind: &str,
    kernel: Option<&str>,
    repeat: u32,
    paths: &bench_paths::Options,
) -> Result<ExitCode> {
    if !kind.starts_with("vm") && kernel.is_some() {
        eprintln!(
            "xtask bench: --kernel chooses the VM of `bench vm`; `bench {kind}` runs on this host"
        );
        return Ok(ExitCode::from(2));
    }
    if kind != "net" && kind != "paths" && repeat != 1 {
        eprintln!("xtask bench: --repeat applies to `bench net` and `bench paths` only");
        return Ok(ExitCode::from(2));
    }
    if kind != "paths" && paths.any() {
        eprintln!(
            "xtask bench: --seconds, --path, --traffic, --direction and --rate apply to `bench paths` only"
        );
        return Ok(ExitCode::from(2));
    }
    setup()?;
    build_release_binaries()?;
    if !is_root() {
        bail!("the benchmarks make network namespaces and load BPF programs: run them as root");
    }
    match kind {
        "net" => bench::net(&workspace_root(), repeat)?,
        "vm" => vm::bench(&workspace_root(), kernel.unwrap_or("6.12"))?,
        "vm-ingress" => vm::bench_ingress(&workspace_root(), kernel.unwrap_or("6.12"))?,
        "telemetry" => telemetry::bench(&workspace_root())?,
        "paths" => bench_paths::run(&workspace_root(), repeat, paths)?,
        other => bail!("unknown benchmark '{other}'; accepted: net, vm, telemetry, paths"),
    }
    Ok(ExitCode::SUCCESS)
}

fn build_release_binaries() -> Result<()> {
    check(&mut cargo(&[
        "build",
        "--release",
        "--package",
        "nbt-user",
        "--package",
        "nbt-integration-tests",
        "--bins",
    ]))
}

fn vm_test(kernel: &str) -> Result<ExitCode> {
    setup()?;
    build_release_binaries()?;
    // The 5.10 VM installs the package too.
    let deb = dist::build(&workspace_root())?;
    if vm::run(&workspace_root(), kernel, &deb)? {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask vm-test: some VM tests failed (see above)");
        Ok(ExitCode::FAILURE)
    }
}

fn dist_task(test: bool) -> Result<ExitCode> {
    setup()?;
    build_release_binaries()?;
    let deb = dist::build(&workspace_root())?;
    if test {
        if !is_root() {
            bail!("the install test chroots into a clean Debian 12: run it as root");
        }
        if !dist::install_test(&workspace_root(), &deb)? {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn fuzz_targets(seconds: u64, target: Option<&str>, keep_going: bool) -> Result<ExitCode> {
    // nbt-user's build script builds the eBPF programs: bpf-linker and nightly's rust-src.
    setup()?;
    fuzz::fuzz(&workspace_root(), seconds, target, keep_going)
}

fn check_layers(graph: bool) -> ExitCode {
    let src = workspace_root().join("nbt-user/src");
    if graph {
        for (module, deps) in layers::imports(&src) {
            let deps: Vec<String> = deps.into_iter().collect();
            println!("{module} -> {}", deps.join(", "));
        }
    }
    let found = layers::violations(&src);
    for violation in &found {
        eprintln!("xtask layers: {violation}");
    }
    if found.is_empty() {
        eprintln!(
            "xtask layers: every import goes to a lower layer or within its folder; no circle"
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
