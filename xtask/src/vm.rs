//! `cargo xtask vm-test`: nbt's kernel-feature tests in QEMU VMs booted from Debian's kernels
//! (bullseye's 5.10, bookworm's 6.1 and 6.12), as aya tests itself: pure cgroup v2 with its
//! controllers, and the qdiscs this host lacks (fq). Software emulation (KVM hangs here). The
//! 5.10 VM also installs the Debian package into a clean Debian 12 shared from the host (9p)
//! and runs the package's install checks there, on that kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

/// The tests the VMs run after the common setup (vm-setup.sh), one result line each.
const TESTS: &str = include_str!("vm-init.sh");

/// The package's install test, appended where a kernel runs it.
const INSTALL: &str = include_str!("vm-install.sh");

/// The end of every test VM's init: the line that says it got there.
const DONE: &str = "\necho NBT-VM-DONE\npoweroff -f\n";

/// The init of `cargo xtask bench vm`: the seed's tc htb + netem against nbt, figures per method.
const BENCH_INIT: &str = concat!(include_str!("vm-setup.sh"), include_str!("vm-bench.sh"));

/// The init of `cargo xtask bench vm-ingress`: TCP into a run limited on arrival, htb on ifb
/// against nbt's policer and nbt's queue.
const BENCH_INGRESS_INIT: &str = concat!(
    include_str!("vm-setup.sh"),
    include_str!("vm-bench-ingress.sh")
);

/// A kernel of the VM matrix.
pub struct Kernel {
    /// The name `--kernel` takes.
    pub name: &'static str,
    /// The pattern of its Debian package's name (the newest match is taken).
    package: &'static str,
    /// The apt sources it comes from where this machine's own (bookworm) lack it, used through a
    /// private apt state under the VM cache: the machine's apt configuration is never touched.
    archive: Option<&'static str>,
    /// Whether the package's install test runs in this VM too.
    install_test: bool,
    /// Whether `cargo xtask test` boots it: the oldest kernel, with the install test (CI's 30
    /// minutes hold one VM; `cargo xtask vm-test` boots every one).
    in_test: bool,
}

pub const KERNELS: [Kernel; 3] = [
    // Debian 11's kernel; Amazon Linux 2 and many production boxes run a 5.10 too.
    Kernel {
        name: "5.10",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
        archive: Some(
            "deb http://deb.debian.org/debian bullseye main\n\
             deb http://deb.debian.org/debian-security bullseye-security main\n",
        ),
        install_test: true,
        in_test: true,
    },
    Kernel {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        archive: None,
        install_test: false,
        in_test: false,
    },
    Kernel {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        archive: None,
        install_test: false,
        in_test: false,
    },
];

fn sh(script: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .context("running sh")?;
    if !out.status.success() {
        bail!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// apt's options for a kernel's own archive: sources, lists and caches under `cache`.
fn apt_options(cache: &Path, kernel: &Kernel) -> Result<String> {
    let Some(sources) = kernel.archive else {
        return Ok(String::new());
    };
    let dir = cache.join(format!("apt-{}", kernel.name));
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("sources.list"), sources)?;
    let d = dir.display();
    Ok(format!(
        "-o Dir::Etc::sourcelist={d}/sources.list -o Dir::Etc::sourceparts=- \
         -o Dir::State::Lists={d}/lists -o Dir::Cache={d}/cache -o Dir::State::status=/dev/null \
         -o APT::Sandbox::User=root"
    ))
}

/// The newest package of `kernel`, unpacked under `cache` (downloaded once).
fn fetch_kernel(cache: &Path, kernel: &Kernel) -> Result<(PathBuf, String)> {
    let apt = apt_options(cache, kernel)?;
    let pattern = kernel.package;
    let find = format!(
        "apt-cache {apt} search --names-only '{pattern}' | cut -d' ' -f1 | sort -V | tail -n 1"
    );
    let mut package = sh(&find)?;
    if package.is_empty() {
        sh(&format!("apt-get {apt} update -q >/dev/null"))?;
        package = sh(&find)?;
    }
    if package.is_empty() {
        let from = kernel.archive.unwrap_or("this machine's apt sources");
        bail!("no Debian package matches {pattern} in {}", from.trim());
    }
    let dir = cache.join(&package);
    if !dir.join("boot").exists() {
        std::fs::create_dir_all(cache)?;
        eprintln!("xtask vm-test: downloading {package}");
        sh(&format!("cd '{}' && apt-get {apt} download -q {package} 2>/dev/null && dpkg -x {package}_*.deb '{}' && rm -f {package}_*.deb", cache.display(), dir.display()))?;
    }
    let release = sh(&format!("ls '{}/lib/modules' | head -n 1", dir.display()))?;
    Ok((dir, release))
}

/// Copies `binary` and the shared libraries `ldd` names into `root`.
fn copy_with_libraries(root: &Path, binary: &Path, to: &str) -> Result<()> {
    sh(&format!(
        "set -e; mkdir -p '{root}{to}'; cp '{bin}' '{root}{to}/'; for l in $(ldd '{bin}' | grep -o '/[^ ]*'); do mkdir -p \"{root}$(dirname $l)\"; cp -L \"$l\" \"{root}$l\"; done",
        root = root.display(),
        bin = binary.display(),
    ))
    .map(|_| ())
}

fn initramfs(
    workspace: &Path,
    kernel_dir: &Path,
    release: &str,
    out: &Path,
    init_script: &str,
) -> Result<()> {
    let root = out.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    for dir in [
        "bin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "cg",
        "etc",
        "usr/local/bin",
    ] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("busybox-static is not installed")?;
    let release_bin = workspace.join("target/release");
    for binary in [
        release_bin.join("nbt"),
        release_bin.join("nbt-testbin"),
        "/usr/sbin/ip".into(),
        "/usr/sbin/tc".into(),
    ] {
        copy_with_libraries(&root, &binary, "/usr/local/bin")?;
    }
    sh(&format!(
        "set -e; m='{k}/lib/modules/{r}'; d='{root}/lib/modules/{r}'; mkdir -p \"$d\"; cd \"$m\"; \
         cp --parents kernel/net/sched/*.ko* kernel/drivers/net/veth.ko* kernel/net/ipv4/inet_diag.ko* \
         kernel/net/ipv4/tcp_diag.ko* kernel/drivers/net/ifb.ko* kernel/net/ipv4/tcp_bbr.ko* \"$d/\"; \
         for m in kernel/fs/9p kernel/net/9p kernel/fs/fscache kernel/fs/netfs kernel/drivers/virtio; do \
           [ -d $m ] && cp -r --parents $m \"$d/\"; done; \
         cp modules.builtin* modules.order \"$d/\"; depmod -b '{root}' {r}",
        k = kernel_dir.display(),
        r = release,
        root = root.display()
    ))?;
    let init = root.join("init");
    std::fs::write(&init, init_script)?;
    std::fs::write(root.join("install-checks.sh"), crate::dist::INSTALL_CHECKS)?;
    sh(&format!("chmod +x '{}'", init.display()))?;
    sh(&format!(
        "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        root.display(),
        out.display()
    ))?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// How long a test VM may run (its 37 tests took about 4 minutes on 5.10).
const TEST_LIMIT_S: u64 = 600;
/// How long a bench VM may run (9 minutes on 6.12 before its loss figure took 10,000 datagrams
/// instead of 1,000, about 1.5 minutes more, and before four more rounds of the bulk send for the
/// steady CPU, about 4.5 minutes more).
const BENCH_LIMIT_S: u64 = 1260;

/// Boots `kernel` and returns its console output, written to `console` as it comes (`tail -f`
/// it to watch a VM); `share`, where given, is seen in the VM as the 9p file system tagged
/// `debian`. QEMU is stopped after `limit_s` seconds.
fn boot(
    kernel_dir: &Path,
    release: &str,
    initrd: &Path,
    share: Option<&Path>,
    console: &Path,
    limit_s: u64,
) -> Result<String> {
    let mut qemu = Command::new("timeout");
    qemu.arg(limit_s.to_string())
        .arg("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ]);
    if let Some(dir) = share {
        qemu.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=debian,security_model=passthrough,id=debian",
            dir.display()
        ));
    }
    let file = std::fs::File::create(console)
        .with_context(|| format!("creating {}", console.display()))?;
    qemu.stdout(file).stdin(std::process::Stdio::null());
    qemu.arg("-kernel")
        .arg(kernel_dir.join(format!("boot/vmlinuz-{release}")))
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // loglevel=5: warnings reach the console (a lockup's or an oops' trace), notices and
        // boot chatter do not. NBT_VM_KERNEL_ARGS: more of the kernel's command line, e.g.
        // `loglevel=7` to see everything.
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=5 {}",
            std::env::var("NBT_VM_KERNEL_ARGS").unwrap_or_default()
        ));
    let mut child = qemu.spawn().context("running qemu-system-x86_64")?;
    let read = || -> Result<String> {
        let bytes =
            std::fs::read(console).with_context(|| format!("reading {}", console.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    // A VM whose kernel locked up never finishes: it is stopped as soon as the kernel says so,
    // not at the time limit (see `boot_retrying`).
    loop {
        if child.try_wait()?.is_some() {
            return read();
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        if read()?.contains(LOCKUP) {
            std::thread::sleep(std::time::Duration::from_secs(2));
            // `timeout` passes the signal on to QEMU.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            child.wait()?;
            return read();
        }
    }
}

/// What the kernel prints when a CPU has been stuck in it for 20 s and more.
const LOCKUP: &str = "soft lockup - CPU#";

fn kernels(which: &str) -> Result<Vec<&'static Kernel>> {
    Ok(match which {
        "all" => KERNELS.iter().collect(),
        "test" => KERNELS.iter().filter(|k| k.in_test).collect(),
        name => vec![KERNELS
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| anyhow!("unknown kernel '{name}'; accepted: 5.10, 6.1, 6.12, all"))?],
    })
}
/// Boots like [`boot`], booting again (twice at most) when the emulated kernel failed in a way
/// that says nothing about nbt:
/// - it died before nbt's init ran: under software emulation, 6.12 now and then panics early in
///   boot (an int3 while patching its own code);
/// - a CPU locked up in the kernel: 5.10 under emulation, about one boot in four here, with a
///   vCPU spinning for good (never past 20 of its own seconds; a task waiting on it blocked),
///   at different tests each time (a connect under latency, the agent's start). Every test
///   runs again from the start on the next boot; the lockup's lines stay in
///   `console-RELEASE-attemptN.log`.
///
/// Such a retry is printed, never hidden.
fn boot_retrying(
    kernel_dir: &Path,
    release: &str,
    initrd: &Path,
    share: Option<&Path>,
    log: &Path,
    limit_s: u64,
) -> Result<String> {
    let mut console = boot(kernel_dir, release, initrd, share, log, limit_s)?;
    for attempt in 2..=3 {
        let why = if !console.contains("NBT-VM-KERNEL") {
            let last = console
                .lines()
                .rev()
                .find(|l| l.contains("panic") || l.contains("Oops"))
                .unwrap_or("no output");
            format!("the kernel died before nbt's init ran ({})", last.trim())
        } else if console.contains(LOCKUP) && !console.contains("NBT-VM-DONE") {
            let line = console
                .lines()
                .find(|l| l.contains(LOCKUP))
                .unwrap_or_default();
            let last_test = console
                .lines()
                .rev()
                .find(|l| l.starts_with("NBT-VM-TEST "))
                .map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "none".into());
            format!(
                "a CPU locked up in the kernel ({}; the last test to end: {last_test})",
                line.trim()
            )
        } else {
            break;
        };
        let kept = log.with_file_name(format!(
            "{}-attempt{}.log",
            log.file_stem().unwrap_or_default().to_string_lossy(),
            attempt - 1
        ));
        std::fs::copy(log, &kept)?;
        eprintln!(
            "xtask vm: on {release}, {why}; its console is kept in {}; booting again, attempt {attempt} of 3",
            kept.display()
        );
        console = boot(kernel_dir, release, initrd, share, log, limit_s)?;
    }
    Ok(console)
}

/// Runs the VM tests on each kernel; returns whether all passed. Where a kernel runs the
/// package's install test too, `deb` is installed in its VM.
pub fn run(workspace: &Path, which: &str, deb: &Path) -> Result<bool> {
    let cache = workspace.join("target/vm-cache");
    let mut all_passed = true;
    for kernel in kernels(which)? {
        let name = kernel.name;
        let (dir, release) = fetch_kernel(&cache, kernel)?;
        let initrd = cache.join(format!("initrd-{release}.gz"));
        // A developer's own tests in place of vm-init.sh, to try one thing without the rest.
        let tests = match std::env::var_os("NBT_VM_TESTS") {
            Some(file) => std::fs::read_to_string(&file)
                .with_context(|| format!("reading NBT_VM_TESTS={}", file.to_string_lossy()))?,
            None => TESTS.to_string(),
        };
        let install = kernel.install_test;
        let init = format!(
            "{}{tests}\n{}{DONE}",
            include_str!("vm-setup.sh"),
            if install { INSTALL } else { "" }
        );
        initramfs(workspace, &dir, &release, &initrd, &init)?;
        let share = match install {
            true => Some(crate::dist::CleanRoot::new(workspace, deb)?),
            false => None,
        };
        eprintln!("xtask vm-test: booting {release}");
        let started = std::time::Instant::now();
        // The whole console, for what the result lines do not say.
        let log = cache.join(format!("console-{release}.log"));
        let console = boot_retrying(
            &dir,
            &release,
            &initrd,
            share.as_ref().map(|s| s.path()),
            &log,
            TEST_LIMIT_S,
        )?;
        let seconds = started.elapsed().as_secs();
        drop(share);
        let results: Vec<&str> = console
            .lines()
            .filter_map(|l| {
                l.strip_prefix("NBT-VM-TEST ").or_else(|| {
                    l.strip_prefix("NBT-DIST-TEST ")
                        .map(|_| l.trim_start_matches("NBT-"))
                })
            })
            .collect();
        for line in &results {
            println!("{name}: {line}");
        }
        let failed = results.iter().filter(|l| l.contains(" FAIL")).count();
        let done = console.contains("NBT-VM-DONE");
        if !done {
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            eprintln!(
                "xtask vm-test: the {release} VM did not finish; its console ({}) ended with:",
                log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        let installed = results
            .iter()
            .filter(|l| l.starts_with("DIST-TEST "))
            .count();
        if install && installed < crate::dist::INSTALL_CHECK_COUNT {
            eprintln!(
                "xtask vm-test: the {release} VM ran {installed} of the package's {} install checks",
                crate::dist::INSTALL_CHECK_COUNT
            );
        }
        println!(
            "vm-test {name} ({release}): {} passed, {failed} failed in {seconds} s",
            results.len() - failed
        );
        all_passed &= done
            && failed == 0
            && !results.is_empty()
            && (!install || installed >= crate::dist::INSTALL_CHECK_COUNT);
    }
    Ok(all_passed)
}

/// One method's figures from the bench VM.
struct BenchRow {
    method: String,
    figures: Vec<(String, String)>,
}

impl BenchRow {
    /// `METHOD KEY VALUE KEY VALUE...`, as the bench VM prints its figures.
    fn parse(line: &str) -> BenchRow {
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("?").to_string();
        let rest: Vec<&str> = words.collect();
        BenchRow {
            method,
            figures: rest
                .chunks(2)
                .map(|p| (p[0].to_string(), p.get(1).unwrap_or(&"?").to_string()))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> &str {
        self.figures
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("?")
    }
}

/// `cargo xtask bench vm`: the seed's tc htb + netem against nbt inside each kernel's VM; prints a
/// Markdown table for docs/benchmarks.md.
pub fn bench(workspace: &Path, which: &str) -> Result<()> {
    let cache = workspace.join("target/vm-cache");
    for kernel in kernels(which)? {
        let name = kernel.name;
        let (dir, release) = fetch_kernel(&cache, kernel)?;
        let initrd = cache.join(format!("initrd-bench-{release}.gz"));
        initramfs(workspace, &dir, &release, &initrd, BENCH_INIT)?;
        eprintln!("xtask bench vm: booting {release} (about 3 minutes under emulation)");
        let log = cache.join(format!("console-bench-{release}.log"));
        let console = boot_retrying(&dir, &release, &initrd, None, &log, BENCH_LIMIT_S)?;
        if !console.contains("NBT-VM-DONE") {
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            bail!("the {release} bench VM did not finish");
        }
        let rows: Vec<BenchRow> = console
            .lines()
            .filter_map(|l| l.strip_prefix("NBT-VM-BENCH "))
            .map(BenchRow::parse)
            .collect();
        let base = rows
            .iter()
            .find(|r| r.method == "base")
            .map(|r| r.get("connect_ms"))
            .unwrap_or("?");
        let mut table = format!(
            "Kernel {release} (Debian, QEMU TCG, 2 vCPUs), veth pair; target 512kbit, 5% loss, \
             100 ms; unshaped connect {base} ms\n\n\
             | method | achieved rate / 512kbit | measured loss | added latency | sender's TCP retransmissions, 30 s | VM CPU per MiB, steady (s 6 to 26) | VM CPU per MiB, whole send |\n\
             |---|---|---|---|---|---|---|\n"
        );
        let seed = rows.iter().find(|r| r.method == "tc-htb-netem");
        // A method's CPU per MiB under `key`, with its ratio to the seed's.
        let cpu_cell = |row: &BenchRow, key: &str| {
            let cpu = row.get(key);
            let relative = match (
                cpu.parse::<f64>().ok(),
                seed.and_then(|s| s.get(key).parse::<f64>().ok()),
            ) {
                (Some(c), Some(s)) if s > 0.0 => format!(" ({:.2} x the seed's)", c / s),
                _ => String::new(),
            };
            format!("{cpu} s{relative}")
        };
        for row in rows.iter().filter(|r| r.method != "base") {
            table.push_str(&format!(
                "| {} | {} | {}% | {} ms | {} | {} | {} |\n",
                row.method,
                row.get("rate_ratio"),
                row.get("loss_pct"),
                row.get("added_ms"),
                row.get("retransmitted"),
                cpu_cell(row, "steady_cpu_s_per_mib"),
                cpu_cell(row, "cpu_s_per_mib"),
            ));
        }
        if let Some(cost) = console.lines().find_map(|l| l.strip_prefix("NBT-VM-COST ")) {
            let cost = BenchRow::parse(&format!("cost {cost}"));
            table.push_str(&format!(
                "\nnbt's own cost, no traffic (busy CPU of the whole VM): `nbt run ... -- true` {} s, \
                 `nbt run ... -- sleep 30` {} s; the seed's qdiscs put on and taken off with `tc`: {} s\n",
                cost.get("true_s"),
                cost.get("sleep30_s"),
                cost.get("seed_setup_s")
            ));
        }
        let first_round = match (seed, rows.iter().find(|r| r.method == "nbt")) {
            (Some(seed), Some(nbt)) => Some((
                seed.get("steady_cpu_s_per_mib").parse().unwrap_or(f64::NAN),
                nbt.get("steady_cpu_s_per_mib").parse().unwrap_or(f64::NAN),
            )),
            _ => None,
        };
        println!("{name}:\n{table}");
        println!("{}", steady_table(&console, first_round));
        println!("{}", impairment_table(&console));
        println!("{}", upload_table(&console));
    }
    Ok(())
}

/// The console's lines tagged `<tag> <key> <method> <figure>...`, split into words after the tag.
struct Tagged<'a>(Vec<Vec<&'a str>>);

impl<'a> Tagged<'a> {
    fn of(console: &'a str, tag: &str) -> Tagged<'a> {
        Tagged(
            console
                .lines()
                .filter_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
                .map(|l| l.split_whitespace().collect())
                .collect(),
        )
    }

    /// The keys (first words), each once, in the order they came.
    fn keys(&self) -> Vec<&'a str> {
        let mut keys = Vec::new();
        for key in self.0.iter().filter_map(|w| w.first().copied()) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// `key`'s line for `method`.
    fn line(&self, key: &str, method: &str) -> Option<&[&'a str]> {
        self.0
            .iter()
            .find(|w| w.first() == Some(&key) && w.get(1) == Some(&method))
            .map(|w| w.as_slice())
    }

    /// Figure `n` (0: the first after the method) of `key`'s line for `method`.
    fn figure(&self, key: &str, method: &str, n: usize) -> Option<&'a str> {
        self.line(key, method)?.get(2 + n).copied()
    }

    /// As [`Tagged::figure`], as a number (NaN when absent or not one).
    fn number(&self, key: &str, method: &str, n: usize) -> f64 {
        self.figure(key, method, n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// The steady CPU per MiB of the seed and of nbt's full profile, round by round: round 1 from
/// the main table (`first`: the seed's, nbt's), the others from the `NBT-VM-STEADY <round>
/// <method> <s per MiB> <goodput ratio>` lines; then the median of the rounds' ratios.
/// `cargo xtask bench vm-ingress`: one table per kernel, each cell's goodput against the limit
/// as each method counts it, and the sender's retransmissions.
pub fn bench_ingress(workspace: &Path, which: &str) -> Result<()> {
    let cache = workspace.join("target/vm-cache");
    for kernel in kernels(which)? {
        let (dir, release) = fetch_kernel(&cache, kernel)?;
        let initrd = cache.join(format!("initrd-bench-ingress-{release}.gz"));
        initramfs(workspace, &dir, &release, &initrd, BENCH_INGRESS_INIT)?;
        eprintln!("xtask bench vm-ingress: booting {release} (about 14 minutes under emulation)");
        let log = cache.join(format!("console-bench-ingress-{release}.log"));
        let console = boot_retrying(&dir, &release, &initrd, None, &log, BENCH_LIMIT_S)?;
        if !console.contains("NBT-VM-DONE") {
            bail!(
                "the {release} ingress bench VM did not finish (console: {})",
                log.display()
            );
        }
        println!("{}", ingress_table(&release, &console));
    }
    Ok(())
}

/// The table of `bench vm-ingress` from its console lines. Each method's goodput against the
/// limit in the bytes it counts, from the sender's segment size (`mss`, payload without
/// options): nbt counts IP packets, `mss` + 52 bytes (IP, TCP and its timestamps); htb on the
/// ifb Ethernet frames, 14 more.
fn ingress_table(release: &str, console: &str) -> String {
    let mut table = format!(
        "Kernel {release} (Debian, QEMU TCG, 2 vCPUs), TCP into a run in namespace a, 20 s, \
         goodput from second 3 to 19; achieved / limit (sender's retransmitted segments)\n\n\
         | path | traffic | rate | htb on ifb | nbt, policer (--ingress-queue=false) | nbt, queue (--ingress-queue) |\n\
         |---|---|---|---|---|---|\n"
    );
    let rows: Vec<Vec<&str>> = console
        .lines()
        .filter_map(|l| l.strip_prefix("NBT-VM-INGRESS "))
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() >= 7)
        .collect();
    let mut cells: Vec<(&str, &str, &str)> = Vec::new();
    for row in &rows {
        if !cells.contains(&(row[1], row[2], row[3])) {
            cells.push((row[1], row[2], row[3]));
        }
    }
    for (path, cc, rate) in cells {
        let figure = |method: &str, headers: f64| {
            rows.iter()
                .find(|r| r[0] == method && r[1] == path && r[2] == cc && r[3] == rate)
                .map_or("-".to_string(), |r| {
                    let goodput: f64 = r[4].parse().unwrap_or(f64::NAN);
                    let limit: f64 = rate.parse().unwrap_or(f64::NAN);
                    let mss: f64 = r[6].parse().unwrap_or(f64::NAN);
                    format!("{:.4} ({})", goodput / limit * (mss + headers) / mss, r[5])
                })
        };
        table.push_str(&format!(
            "| {path} | {cc} | {rate} | {} | {} | {} |\n",
            figure("htb-ifb", 66.0),
            figure("nbt", 52.0),
            figure("nbt-queue", 52.0)
        ));
    }
    table
}

fn steady_table(console: &str, first: Option<(f64, f64)>) -> String {
    let lines = Tagged::of(console, "NBT-VM-STEADY");
    let mut rounds: Vec<(&str, f64, f64)> = Vec::new();
    if let Some((seed, nbt)) = first {
        rounds.push(("1", seed, nbt));
    }
    for round in lines.keys() {
        let of = |method| lines.number(round, method, 0);
        rounds.push((round, of("tc-htb-netem"), of("nbt")));
    }
    let mut table = String::from(
        "| round | seed: steady CPU per MiB | nbt: steady CPU per MiB | nbt / seed |\n|---|---|---|---|\n",
    );
    let mut ratios = Vec::new();
    for (round, seed, nbt) in &rounds {
        let ratio = nbt / seed;
        if ratio.is_finite() {
            ratios.push(ratio);
        }
        table.push_str(&format!(
            "| {round} | {seed:.3} s | {nbt:.3} s | {ratio:.2} x |\n"
        ));
    }
    if !ratios.is_empty() {
        let (low, high) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
        table.push_str(&format!(
            "\nMedian of {} rounds: {:.2} x (from {low:.2} to {high:.2} x)\n",
            ratios.len(),
            crate::telemetry::median(ratios.clone())
        ));
    }
    table
}

/// The `NBT-VM-IMPAIR <impairment> <method> <received> <overtaking>` lines as a table, netem
/// and nbt side by side: per 1000 datagrams sent, the share that arrived twice (received over
/// 1000), that did not arrive, and that overtook an earlier one.
fn impairment_table(console: &str) -> String {
    let lines = Tagged::of(console, "NBT-VM-IMPAIR");
    let mut table = String::from(
        "| impairment | netem: arrived / sent | nbt: arrived / sent | netem: overtook | nbt: overtook |\n\
         |---|---|---|---|---|\n",
    );
    let figures = |what: &str, method: &str| -> (String, String) {
        if lines.line(what, method).is_none() {
            return ("?".into(), "?".into());
        }
        (
            format!("{:.3}", lines.number(what, method, 0) / 1000.0),
            format!("{:.1}%", lines.number(what, method, 1) / 10.0),
        )
    };
    for what in lines.keys() {
        let ((netem, netem_over), (nbt, nbt_over)) = (figures(what, "netem"), figures(what, "nbt"));
        table.push_str(&format!(
            "| {what} | {netem} | {nbt} | {netem_over} | {nbt_over} |\n"
        ));
    }
    table
}

/// The `NBT-VM-UPLOAD <setting> <method> <ratio>` lines as a table: an uploading TCP sender's
/// goodput over the rate, htb + netem and nbt side by side.
fn upload_table(console: &str) -> String {
    let lines = Tagged::of(console, "NBT-VM-UPLOAD");
    let mut table = String::from(
        "| rate + delay | htb + netem: goodput / rate | nbt: goodput / rate |\n|---|---|---|\n",
    );
    let ratio = |what: &str, method: &str| lines.figure(what, method, 0).unwrap_or("?");
    for what in lines.keys() {
        table.push_str(&format!(
            "| {what} | {} | {} |\n",
            ratio(what, "netem"),
            ratio(what, "nbt")
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_line_gives_each_figure_by_its_key() {
        let row = BenchRow::parse("cost true_s 0.81 sleep30_s 0.80 seed_setup_s 0.39");
        assert_eq!(row.method, "cost");
        assert_eq!(row.get("sleep30_s"), "0.80");
        assert_eq!(row.get("seed_setup_s"), "0.39");
        assert_eq!(row.get("absent"), "?");
    }

    #[test]
    fn the_ingress_table_counts_each_method_in_its_own_bytes() {
        let console = "NBT-VM-INGRESS htb-ifb veth1500 bbr 10000000 9563906 0 1448\n\
            NBT-VM-INGRESS nbt veth1500 bbr 10000000 9013000 412 1448\n\
            noise\n\
            NBT-VM-INGRESS nbt-queue veth1500 bbr 10000000 9653333 0 1448\n\
            NBT-VM-INGRESS nbt-queue lo bbr 512000 503412 0 3048\n\
            NBT-VM-INGRESS htb-ifb veth1500 cubic 512000 489000 3 1448\n";
        let table = ingress_table("6.12", console);
        // htb counts Ethernet frames (1514 bytes per 1448 of payload), nbt IP packets (1500).
        assert!(
            table
                .contains("| veth1500 | bbr | 10000000 | 1.0000 (0) | 0.9337 (412) | 1.0000 (0) |"),
            "{table}"
        );
        // Loopback's larger segments: 3100 bytes of IP packet per 3048.
        assert!(
            table.contains("| lo | bbr | 512000 | - | - | 1.0000 (0) |"),
            "{table}"
        );
        // A cell a method did not run reads '-'.
        assert!(
            table.contains("| veth1500 | cubic | 512000 | 0.9986 (3) | - | - |"),
            "{table}"
        );
    }

    #[test]
    fn the_tables_read_their_tagged_console_lines() {
        // Lines of the 6.12 bench run of 2026-12-04, with what `bench vm` printed for them.
        let console = "NBT-VM-IMPAIR duplicate-10% netem 1107 0\n\
            NBT-VM-IMPAIR duplicate-10% nbt 1114 0\n\
            NBT-VM-IMPAIR reorder-25%,delay-20ms netem 1000 278\n\
            noise NBT-VM-IMPAIR x netem 1 1\n\
            NBT-VM-UPLOAD 10mbit+20ms netem 0.989\n\
            NBT-VM-UPLOAD 10mbit+20ms nbt 1.000\n\
            NBT-VM-STEADY 2 tc-htb-netem 0.193 0.950\n\
            NBT-VM-STEADY 2 nbt 0.167 1.015\n\
            NBT-VM-STEADY 3 tc-htb-netem 0.161 0.938\n\
            NBT-VM-STEADY 3 nbt 0.170 1.001\n";
        let impair = impairment_table(console);
        assert!(
            impair.contains("| duplicate-10% | 1.107 | 1.114 | 0.0% | 0.0% |"),
            "{impair}"
        );
        assert!(
            impair.contains("| reorder-25%,delay-20ms | 1.000 | ? | 27.8% | ? |"),
            "{impair}"
        );
        assert_eq!(impair.lines().count(), 4, "{impair}");
        let upload = upload_table(console);
        assert!(
            upload.contains("| 10mbit+20ms | 0.989 | 1.000 |"),
            "{upload}"
        );
        let steady = steady_table(console, Some((0.138, 0.179)));
        assert!(
            steady.contains("| 1 | 0.138 s | 0.179 s | 1.30 x |"),
            "{steady}"
        );
        assert!(
            steady.contains("| 2 | 0.193 s | 0.167 s | 0.87 x |"),
            "{steady}"
        );
        assert!(
            steady.contains("| 3 | 0.161 s | 0.170 s | 1.06 x |"),
            "{steady}"
        );
        assert!(
            steady.contains("Median of 3 rounds: 1.06 x (from 0.87 to 1.30 x)"),
            "{steady}"
        );
    }

    #[test]
    fn cargo_xtask_test_boots_the_oldest_kernel_and_vm_test_every_one() {
        let names =
            |which: &str| -> Vec<&str> { kernels(which).unwrap().iter().map(|k| k.name).collect() };
        assert_eq!(names("test"), ["5.10"]);
        assert_eq!(names("all"), ["5.10", "6.1", "6.12"]);
        assert!(KERNELS.iter().all(|k| k.install_test == (k.name == "5.10")));
        let err = kernels("4.19").err().unwrap().to_string();
        assert!(err.contains("accepted: 5.10, 6.1, 6.12, all"), "{err}");
    }
}
