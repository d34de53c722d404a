//! Exit statuses, signal forwarding, and removal of everything a run made, also after a crash.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nbt_integration_tests::{nbt, nbt_command, run_cgroups, run_testbin, testbin, NoLeftovers};

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("nbt-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Starts `nbt run -- nbt-testbin await-signal FILE` and waits until the workload is ready.
fn start_awaiting(file: &PathBuf) -> Child {
    let child = nbt_command()
        .args(["run", "--json", "--"])
        .arg(testbin())
        .arg("await-signal")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the workload to start", || {
        std::fs::read_to_string(file).is_ok_and(|s| s.parse::<i32>().is_ok())
    });
    child
}

#[test]
fn exit_status_is_the_workloads() {
    let guard = NoLeftovers::new();
    for code in [0, 3, 255] {
        let run = nbt(&["run", "--json", "--", "sh", "-c", &format!("exit {code}")]);
        assert_eq!(run.status(), code, "stderr: {}", run.stderr());
        assert_eq!(run.u64("/exit/code"), code as u64);
    }
    guard.assert_clean();
}

#[test]
fn killed_by_a_signal_exits_128_plus_n() {
    let guard = NoLeftovers::new();
    let run = nbt(&["run", "--json", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(run.status(), 128 + 15, "stderr: {}", run.stderr());
    assert_eq!(run.summary.as_ref().unwrap()["exit"]["signal"], "SIGTERM");
    let run = nbt(&["run", "--json", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(run.status(), 128 + 9);
    guard.assert_clean();
}

#[test]
fn signals_sent_to_nbt_reach_the_workload() {
    let guard = NoLeftovers::new();
    for (signal, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let file = temp_file("signal");
        let child = start_awaiting(&file);
        // SAFETY: kill(2) of the nbt process this test started.
        unsafe { libc::kill(child.id() as i32, signal) };
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(42),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), name);
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            summary["exit"]["forwarded_signals"],
            serde_json::json!([name])
        );
        let _ = std::fs::remove_file(&file);
    }
    guard.assert_clean();
}

#[test]
fn a_workload_that_leaves_children_behind_is_cleaned_up() {
    let guard = NoLeftovers::new();
    let testbin = testbin();
    // The shell starts a long sleeper in the background and exits at once.
    let script = format!("setsid {} sleep 300 & exit 0", testbin.display());
    let run = nbt(&["run", "--json", "--", "sh", "-c", &script]);
    assert_eq!(run.status(), 0, "stderr: {}", run.stderr());
    guard.assert_clean();
}

#[test]
fn cleanup_removes_a_crashed_run_and_only_that() {
    let guard = NoLeftovers::new();
    let crashed_file = temp_file("crashed");
    let live_file = temp_file("live");
    let mut crashed = start_awaiting(&crashed_file);
    let mut live = start_awaiting(&live_file);
    let crashed_workload: i32 = std::fs::read_to_string(&crashed_file)
        .unwrap()
        .parse()
        .unwrap();
    let live_workload: i32 = std::fs::read_to_string(&live_file)
        .unwrap()
        .parse()
        .unwrap();
    let before = run_cgroups();

    // SAFETY: kill(2) of the nbt process this test started.
    unsafe { libc::kill(crashed.id() as i32, libc::SIGKILL) };
    crashed.wait().unwrap();
    // The workload outlives its supervisor, still inside its cgroups.
    assert!(std::path::Path::new(&format!("/proc/{crashed_workload}")).exists());
    assert_eq!(run_cgroups(), before, "cgroups vanished without cleanup");

    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(
        cleanup.stderr().contains("removed nbt-"),
        "{}",
        cleanup.stderr()
    );
    assert!(cleanup.stderr().contains("is live"), "{}", cleanup.stderr());
    wait_for("the crashed run's workload to die", || {
        !std::path::Path::new(&format!("/proc/{crashed_workload}")).exists()
            || std::fs::read_to_string(format!("/proc/{crashed_workload}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    // The live run is untouched: its workload still runs and its cgroups are there.
    assert!(std::path::Path::new(&format!("/proc/{live_workload}")).exists());
    let remaining = run_cgroups();
    assert!(
        !remaining.is_empty() && remaining.len() < before.len(),
        "{remaining:?} of {before:?}"
    );

    // SAFETY: kill(2) of the nbt process this test started.
    unsafe { libc::kill(live.id() as i32, libc::SIGTERM) };
    assert_eq!(live.wait().unwrap().code(), Some(42));
    let again = nbt(&["cleanup"]);
    assert!(
        again.stderr().contains("nothing left behind"),
        "{}",
        again.stderr()
    );
    let _ = std::fs::remove_file(&crashed_file);
    let _ = std::fs::remove_file(&live_file);
    guard.assert_clean();
}

#[test]
fn nbt_failing_before_the_workload_leaves_nothing() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&["--pids", "1"], &["sleep", "0"]);
    // pids.max = 1 lets the workload itself exist: it runs.
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let missing = nbt(&["run", "--", "/nonexistent/program"]);
    assert_eq!(missing.status(), 127, "{}", missing.stderr());
    assert!(missing
        .stderr()
        .contains("command not found: /nonexistent/program"));
    let file = temp_file("not-executable");
    std::fs::write(&file, "data, no program\n").unwrap();
    let not_executable = nbt(&["run", "--", file.to_str().unwrap()]);
    assert_eq!(not_executable.status(), 126, "{}", not_executable.stderr());
    assert!(
        not_executable.stderr().contains("cannot execute"),
        "{}",
        not_executable.stderr()
    );
    let _ = std::fs::remove_file(&file);
    guard.assert_clean();
}
