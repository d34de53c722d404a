//! `nbt demo`, what the README's `cargo xtask run` runs, end to end: the `nbt` profile's limits,
//! the training workload fetching its data through the shaped link, the paid API gated, the
//! receipts verified. Its hardware caps (2.0 GHz, no turbo, 75 W, 1200 MHz) meet a machine that
//! may have none of that hardware: the demo names each one it cannot enforce and goes on.

use nbt_integration_tests::{nbt_command, NoLeftovers};

#[test]
fn the_demo_runs_and_names_the_caps_this_machine_cannot_enforce() {
    let guard = NoLeftovers::new();
    // The report is written to the current directory.
    let cwd = tempfile::tempdir().unwrap();
    // An empty sysfs: no cpufreq and no turbo switch, whatever this machine has.
    let sysfs = tempfile::tempdir().unwrap();
    // No user named: the trainer runs as nobody, never as root.
    let out = nbt_command()
        .env_remove("NBT_USER")
        .env_remove("SUDO_UID")
        .env("NBT_SYSFS_ROOT", sysfs.path())
        .current_dir(cwd.path())
        .arg("demo")
        .output()
        .expect("running nbt demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for expected in [
        "not enforced here: cannot enforce cpu-max-freq (built-in profile nbt) 2.0GHz: this machine has no cpufreq",
        "not enforced here: cannot enforce no-turbo (built-in profile nbt) true: neither",
        "updates       5 reported",
        "user          nobody (65534:65534), no capabilities",
        "brownout #1 (line 2): thawed",
        "step (line 7): egress rate 256kbit, ingress rate 256kbit",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    // Set aside, so nothing was set: the summary has no `hardware` line.
    assert!(!stderr.contains("  hardware      set"), "{stderr}");
    assert!(stdout.contains("chain intact"), "{stdout}\n{stderr}");
    // The report: RUN.html in the current directory, its path the last line of stdout.
    let run = stderr
        .split_whitespace()
        .find(|w| w.starts_with("nbt-") && w.len() == 20)
        .unwrap_or_else(|| panic!("no run name in:\n{stderr}"));
    assert!(
        stderr.contains(&format!("nbt demo: nbt report {run}:")),
        "{stderr}"
    );
    let report = cwd.path().join(format!("{run}.html"));
    assert_eq!(stdout.lines().last(), report.to_str(), "{stdout}");
    let html = std::fs::read_to_string(&report).expect("the demo's report");
    assert!(html.contains(&format!("<h1>nbt report: {run}</h1>")));
    assert!(html.contains("PASS: "), "the report's verification");
    // Its learning updates (5) and events (the brownout, the step) are in it.
    assert_eq!(
        html.matches("<tr><td class=\"num\">").count(),
        5 + 3,
        "{html}"
    );
    assert!(html.contains("data-chart=\"updates-delta\""));
    assert!(html.contains("data-chart=\"Ingress rate\""));
    guard.assert_clean();
}
