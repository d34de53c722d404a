//! Process caps: a fork bomb is contained, and the machine is fine afterwards.

use std::process::Command;

use nbt_integration_tests::{run_testbin, testbin, NoLeftovers};

fn processes_running(binary: &std::path::Path) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|exe| exe == binary))
        .count()
}

#[test]
fn a_fork_bomb_is_contained() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&["--pids", "32"], &["forkbomb", "3"]);
    assert_eq!(run.status(), 0, "stderr: {}", run.stderr());
    let refused = run.u64("/cgroup/forks_refused");
    let peak = run.u64("/cgroup/pids_peak");
    assert!(
        refused > 100,
        "only {refused} forks refused: the bomb was not held at the cap"
    );
    assert!(peak <= 32, "{peak} processes, above the cap of 32");
    assert!(
        peak >= 16,
        "{peak} processes: the bomb never reached the cap"
    );
    // Nothing of the bomb survives nbt, and the machine can still fork.
    assert_eq!(
        processes_running(&testbin()),
        0,
        "fork bomb processes left running"
    );
    assert!(Command::new("true").status().unwrap().success());
    guard.assert_clean();
}
