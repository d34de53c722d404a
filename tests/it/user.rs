//! Who the workload runs as: the user who invoked sudo, or `--user`; root only when named. A
//! workload that is not root cannot leave its cgroups, read the node's key, write nbt's state or
//! reach nbt's BPF programs and maps.

use nbt_integration_tests::{nbt, nbt_command, testbin, NoLeftovers, Run};

/// `nbt run --json [args] -- COMMAND` with the environment `env` (NBT_USER removed).
fn run_as(args: &[&str], env: &[(&str, &str)], command: &[&str]) -> Run {
    let mut all = vec!["run", "--json"];
    all.extend(args);
    all.push("--");
    all.extend(command);
    let output = nbt_command()
        .env_remove("NBT_USER")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .envs(env.iter().copied())
        .args(&all)
        .output()
        .expect("running nbt");
    Run::from_output(output)
}

#[test]
fn the_workload_runs_as_the_sudo_user_without_capabilities() {
    let guard = NoLeftovers::new();
    let status = "grep -E '^(Uid|Gid|CapEff|CapPrm|CapAmb|NoNewPrivs):' /proc/self/status";
    let run = run_as(
        &[],
        &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")],
        &["sh", "-c", status],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let out = run.stdout();
    for expected in [
        "Uid:\t65534\t65534\t65534\t65534",
        "Gid:\t65534\t65534\t65534\t65534",
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(out.contains(expected), "no '{expected}' in {out}");
    }
    assert_eq!(run.u64("/user/uid"), 65534);
    assert!(run
        .stderr()
        .contains("user          nobody (65534:65534), no capabilities"));
    guard.assert_clean();
}

#[test]
fn root_only_when_named() {
    let guard = NoLeftovers::new();
    let refused = run_as(&[], &[], &["true"]);
    assert_eq!(refused.status(), 2, "{}", refused.stderr());
    assert!(
        refused.stderr().contains("would run as root") && refused.stderr().contains("--user"),
        "{}",
        refused.stderr()
    );
    let root = run_as(&["--user", "root"], &[], &["id", "-u"]);
    assert_eq!(root.status(), 0, "{}", root.stderr());
    assert!(root.stdout().starts_with("0\n"), "{}", root.stdout());
    assert_eq!(root.u64("/user/uid"), 0);
    assert!(root.stderr().contains("not confined"), "{}", root.stderr());
    let unknown = run_as(&["--user", "no-such-user-here"], &[], &["true"]);
    assert_eq!(unknown.status(), 2, "{}", unknown.stderr());
    assert!(unknown
        .stderr()
        .contains("no user named 'no-such-user-here'"));
    let group = run_as(&["--user", "nobody:root"], &[], &["id", "-g"]);
    assert_eq!(
        group.stdout().lines().next(),
        Some("0"),
        "{}",
        group.stderr()
    );
    guard.assert_clean();
}

#[test]
fn a_workload_cannot_leave_its_cgroups_read_the_key_or_touch_nbt() {
    let guard = NoLeftovers::new();
    // A first run makes the node key.
    assert_eq!(nbt(&["run", "--", "true"]).status(), 0);
    let key = guard.home().join("node.key");
    assert!(key.exists(), "{}", key.display());
    let state = nbt::state::state_dir().join("runs");
    let run = run_as(
        &[],
        &[
            ("NBT_USER", "nobody"),
            ("NBT_TEST_SECRET", key.to_str().unwrap()),
            ("NBT_TEST_PRIVATE_DIR", state.to_str().unwrap()),
        ],
        &[testbin().to_str().unwrap(), "escape"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let stdout = run.stdout();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('{')).collect();
    assert!(lines.iter().filter(|l| l.starts_with("cgroup ")).count() >= 1);
    for line in &lines {
        assert!(
            line.ends_with(" EACCES") || line.ends_with(" EPERM"),
            "a way out is open: '{line}' in {lines:?}"
        );
    }
    assert!(!state.join("planted").exists());
    guard.assert_clean();
}
