//! Usage errors and environment errors: one clear line, naming the flag or the cause.

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
