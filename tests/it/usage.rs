//! Usage errors and environment errors: one clear line, naming the flag or the cause.

use std::io::Read as _;
use std::os::unix::process::CommandExt;

use nbt_integration_tests::{nbt, nbt_command, NoLeftovers};

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[test]
fn bad_values_exit_2_naming_flag_value_and_forms() {
    let guard = NoLeftovers::new();
    for (args, expected) in [
        (vec!["--memory", "6X"], "invalid value '6X' for --memory"),
        (vec!["--memory", "512Mb"], "lower-case b means bits"),
        (vec!["--swap", "lots"], "invalid value 'lots' for --swap"),
        (
            vec!["--cpus", "0"],
            "invalid value '0' for --cpus: must be greater than 0",
        ),
        (vec!["--pids=-1"], "invalid value '-1' for --pids"),
        (vec!["--egress-rate", "512kbps"], "'kbps' is ambiguous"),
        (
            vec!["--egress-rate", "8kbit"],
            "below one 1500-byte packet per second",
        ),
        (vec!["--loss", "101%"], "above 100%"),
        (vec!["--loss-model", "bursty"], "unknown loss model"),
        (vec!["--gate", "all"], "--gate needs --balance"),
        (vec!["--balance", "-1"], "negative amounts are not accepted"),
        (
            vec!["--balance", "1", "--price-call", "-0.1"],
            "for --price-call: negative",
        ),
        (
            vec!["--balance", "1", "--price-egress", "0.09"],
            "the unit is required",
        ),
        (
            vec!["--balance", "1", "--gate", "10.0.0.0/33"],
            "prefix length '33'",
        ),
        (
            vec!["--balance", "1", "--gate", "127.0.0.1:99999"],
            "port '99999'",
        ),
        (
            vec!["--balance", "1", "--gate", "no-such-host.invalid"],
            "cannot resolve 'no-such-host.invalid'",
        ),
        (
            vec!["--price-kwh", "0.3"],
            "--price-kwh 0.3 (flag; needs energy telemetry",
        ),
        (
            vec!["--profile", "nbtt"],
            "'nbtt' is neither a built-in profile",
        ),
        (
            vec!["--egress-rate", "10mbit", "--ingress-queue"],
            "--ingress-queue queues arriving packets at the ingress rate: it needs --ingress-rate",
        ),
        (
            vec!["--profile", "nbt"],
            // Refused here either way: for the missing qdisc where the kernel lacks it, else
            // for the hardware caps this machine lacks (cpufreq, turbo control, a GPU).
            if nbt::plan::probe::fq_missing().is_some() {
                "latency 100ms (built-in profile nbt) needs the fq qdisc"
            } else {
                "cannot enforce "
            },
        ),
    ] {
        let mut all = vec!["run"];
        all.extend(args.iter().copied());
        all.extend(["--", "true"]);
        let run = nbt(&all);
        assert_eq!(run.status(), 2, "{all:?}: {}", run.stderr());
        assert!(run.stderr().contains(expected), "{all:?}: {}", run.stderr());
        assert_eq!(
            run.stderr().lines().count(),
            1,
            "{all:?}: not one line: {}",
            run.stderr()
        );
    }
    // The ingress queue needs fq, as a latency does: refused where the kernel lacks it (this
    // host), naming the qdisc. The VM tests run it where fq is (ingress_queue_bbr).
    if nbt::plan::probe::fq_missing().is_some() {
        let run = nbt(&[
            "run",
            "--ingress-rate",
            "10mbit",
            "--ingress-queue",
            "--",
            "true",
        ]);
        assert_eq!(run.status(), 2, "{}", run.stderr());
        assert!(
            run.stderr().contains(
                "refusing to run: --ingress-queue true (flag) needs the fq qdisc (sch_fq)"
            ),
            "{}",
            run.stderr()
        );
    }
    guard.assert_clean();
}

#[test]
fn bad_agent_options_exit_2_naming_the_flag() {
    for (args, expected) in [
        (
            vec!["--interval", "5"],
            "invalid value '5' for --interval: a unit is required",
        ),
        (
            vec!["--interval", "10ms"],
            "invalid value '10ms' for --interval: out of range",
        ),
        (
            vec!["--listen", "8787"],
            "invalid value '8787' for --listen",
        ),
        (vec!["--cpu-tdp", "0"], "invalid value '0' for --cpu-tdp"),
        (
            vec!["--cpu-tdp", "100", "--cpu-idle", "120"],
            "invalid value '120' for --cpu-idle: not below the TDP (100 W)",
        ),
    ] {
        let mut all = vec!["agent"];
        all.extend(args.iter().copied());
        let run = nbt(&all);
        assert_eq!(run.status(), 2, "{all:?}: {}", run.stderr());
        assert!(run.stderr().contains(expected), "{all:?}: {}", run.stderr());
        assert_eq!(run.stderr().lines().count(), 1, "{all:?}: {}", run.stderr());
    }
}

#[test]
fn a_missing_command_is_a_usage_error() {
    let run = nbt(&["run", "--memory", "1G"]);
    assert_eq!(run.status(), 2);
    assert!(run.stderr().contains("COMMAND"), "{}", run.stderr());
}

#[test]
fn not_root_is_refused_in_one_line() {
    let output = nbt_command()
        .args(["run", "--", "true"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        first_line(&stderr).contains("nbt must run as root"),
        "{stderr}"
    );
}

#[test]
fn no_cgroup2_mounted_is_refused_naming_it() {
    let guard = NoLeftovers::new();
    let layout = nbt::enforce::cgroup::Layout::detect().unwrap();
    let mount_point = layout.v2_self.clone().unwrap();
    let mount_point = std::ffi::CString::new(mount_point.to_str().unwrap()).unwrap();
    let mut command = nbt_command();
    command.args(["run", "--", "true"]);
    // SAFETY: between fork and exec, only syscalls: a private mount namespace for nbt, without
    // the cgroup2 mount. The test's own namespace is untouched.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::umount2(mount_point.as_ptr(), libc::MNT_DETACH) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        first_line(&stderr).contains("cgroup v2 is not mounted"),
        "{stderr}"
    );
    guard.assert_clean();
}

/// `nbt run ARGS -- sh -c 'touch MARKER'`: refused, or the marker says the workload ran.
fn refused_before_the_workload(args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.extend(["--", "sh", "-c", &touch]);
    let run = nbt(&all);
    assert_eq!(run.status(), 2, "{all:?}: {}", run.stderr());
    assert!(run.stderr().contains(expected), "{all:?}: {}", run.stderr());
    assert_eq!(run.stderr().lines().count(), 1, "{all:?}: {}", run.stderr());
    assert!(!marker.exists(), "{all:?}: the workload ran");
}

#[test]
fn values_past_their_bounds_exit_2_before_the_workload_starts() {
    // SAFETY: sysconf takes a constant; nbt reads the CPUs online the same way.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    for (args, expected) in [
        (
            &["--memory", "16000000T"][..],
            "invalid value '16000000T' for --memory: too large: above 2^53 bytes (8192T)"
                .to_string(),
        ),
        (
            &["--cpus", "184467440737.11"],
            format!("invalid value '184467440737.11' for --cpus: above the {online} CPUs online"),
        ),
        (
            &[
                "--latency",
                "10000000000000000000s",
                "--jitter",
                "10000000000000000000s",
            ],
            "invalid value '10000000000000000000s' for --latency: too large: above 365 days".into(),
        ),
        (
            &["--latency", "1e19s", "--jitter", "1e19s"],
            "invalid value '1e19s' for --latency: unknown unit".into(),
        ),
        (
            &["--latency", "6s", "--jitter", "4001ms"],
            "invalid value '4001ms' for --jitter: latency plus jitter above 10 s".into(),
        ),
        (
            &["--egress-rate", "1tbit"],
            "invalid value '1tbit' for --egress-rate: above 100gbit".into(),
        ),
        (
            &["--egress-rate", "12kbit", "--burst", "1G"],
            "invalid value '1G' for --burst: a bucket of 1.0 GiB is more than an hour at 12kbit"
                .into(),
        ),
        (
            &["--pids", "4194305"],
            "invalid value '4194305' for --pids: above 4194304".into(),
        ),
        (
            &["--balance", "1000000.000001"],
            "invalid value '1000000.000001' for --balance: above 1000000".into(),
        ),
    ] {
        refused_before_the_workload(args, &expected);
    }
}

/// A schedule file named `name` holding `text`, in `dir`.
fn schedule_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_schedule_file_above_4_mib_is_refused_naming_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let big = schedule_file(&dir, "big.toml", &"#".repeat((4 << 20) + 1));
    refused_before_the_workload(
        &["--schedule", &big],
        &format!(
            "--schedule: '{big}' is 4194305 bytes, above the limit of 4194304 bytes (4.0 MiB)"
        ),
    );
}

#[test]
fn a_fault_count_of_a_trillion_is_refused_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = schedule_file(
        &dir,
        "count.toml",
        "\n[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"1ms\"\nrepeat = \"2ms\"\ncount = 1000000000000\n",
    );
    refused_before_the_workload(
        &["--schedule", &path],
        "line 2: count 1000000000000: a schedule expands to at most 100000 actions",
    );
}

/// A generator every 1 ms until 1000 h, in 86 bytes: 3.6 billion actions. It used all memory
/// and aborted; now it is refused before a tick is made, under a 512 MiB address space.
#[test]
fn a_generator_of_billions_of_actions_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = schedule_file(
        &dir,
        "gen.toml",
        "[[generator]]\nlimit=\"cpus\"\nkind=\"random-walk\"\nevery=\"1ms\"\nuntil=\"1000h\"\nmin=0.1\nmax=1\n",
    );
    assert!(std::fs::metadata(&path).unwrap().len() <= 100);
    let mut command = nbt_command();
    command.args(["run", "--schedule", &path, "--", "true"]);
    // SAFETY: between fork and exec, one syscall on a value on the stack.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512 << 20,
                rlim_max: 512 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{:?}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains(
            "line 1: this generator adds 3600000001 actions to the 0 before it: more than 100000"
        ),
        "{stderr}"
    );
}

/// 200 MB without a newline in `$NBT_REPORT`: refused as one line too long, read a chunk at a
/// time and never held; nbt's peak memory stays under 100 MB (it reached 318 MB before).
#[test]
fn a_report_line_of_200_mb_keeps_nbt_memory_bounded() {
    let guard = NoLeftovers::new();
    let mut child = nbt_command()
        .args(["run", "--json", "--", "sh", "-c"])
        .arg("head -c 200000000 /dev/zero | tr '\\0' x >> \"$NBT_REPORT\"")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    // nbt's own peak: VmHWM of its memory, read every 20 ms until it exits (the last reading
    // holds the peak but for the last 20 ms; the figure only grows). Not wait4's ru_maxrss: that
    // counts the memory of the test binary that spawned it, as it stood before the exec (Linux
    // keeps the old memory's high-water mark at exec), 178 MB once after the earlier tests.
    let watcher = std::thread::spawn(move || {
        let mut peak_kb = 0u64;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            else {
                break; // a zombie: its memory is gone
            };
            peak_kb = peak_kb.max(kb);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak_kb
    });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let stdout = reader.join().unwrap();
    let peak_kb = watcher.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("$NBT_REPORT line 1 refused: longer than 65536 bytes"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["refused_reports"][0]["line"], 1, "{summary}");
    let max_rss_mb = peak_kb as f64 / 1024.0;
    eprintln!("nbt peaked at {max_rss_mb:.1} MB");
    assert!(max_rss_mb > 1.0, "no reading of nbt's memory");
    assert!(max_rss_mb < 100.0, "nbt peaked at {max_rss_mb:.1} MB");
    guard.assert_clean();
}

/// A million refused report lines: the first ten of a read are listed, the rest counted in one
/// entry, and at most a hundred listed in a run (8 million took nbt to 18 GB and 3 GB of stderr).
#[test]
fn a_million_refused_report_lines_are_counted_not_listed() {
    let guard = NoLeftovers::new();
    let run = nbt(&[
        "run",
        "--json",
        "--",
        "sh",
        "-c",
        "yes x | head -c 2000000 >> \"$NBT_REPORT\"",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let refused = run.summary.as_ref().unwrap()["refused_reports"]
        .as_array()
        .unwrap()
        .clone();
    assert!((11..=101).contains(&refused.len()), "{refused:?}");
    let counted: u64 = refused
        .iter()
        .filter_map(|r| {
            let why = r["why"].as_str().unwrap();
            why.split_once(" lines refused from this one on")
                .map(|(n, _)| n.parse::<u64>().unwrap())
        })
        .sum();
    assert!(counted > 900_000, "{refused:?}");
    assert!(run.stderr().lines().count() < 150, "{}", run.stderr().len());
    guard.assert_clean();
}

#[test]
fn the_summary_file_holds_the_json_summary_apart_from_the_workloads_stdout() {
    let guard = NoLeftovers::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("summary.json");
    let run = nbt(&[
        "run",
        "--memory",
        "64M",
        "--summary-file",
        file.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo from-the-workload",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    // stdout is the workload's alone.
    assert_eq!(run.stdout(), "from-the-workload\n");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let name = summary["run"].as_str().unwrap();
    assert!(run.stderr().contains(name), "{}", run.stderr());
    assert_eq!(summary["limits"]["memory_bytes"], 64 << 20);
    assert!(summary["receipt"]["receipt_hash"].is_string());
    // Nothing staged is left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // A file that could not be written at the end is refused before anything runs.
    for (bad, why) in [
        (
            dir.path().join("no-such-dir/summary.json"),
            "does not exist",
        ),
        (dir.path().to_path_buf(), "is a directory"),
    ] {
        let run = nbt(&["run", "--summary-file", bad.to_str().unwrap(), "--", "true"]);
        assert_eq!(run.status(), 2, "{}", run.stderr());
        assert!(run.stderr().contains("--summary-file"), "{}", run.stderr());
        assert!(run.stderr().contains(why), "{}", run.stderr());
    }
    guard.assert_clean();
}

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let version = nbt(&["--version"]);
    assert_eq!(version.status(), 0);
    let text = version.stdout();
    let commit = text
        .trim()
        .strip_prefix(&format!("nbt {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text:?}"));
    // Built in a git checkout (as CI and `cargo xtask dist` build it): 12 hex digits.
    assert!(
        commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text:?}"
    );
}
