//! Memory caps: the seed's quick test, scaled down.

use nbt_integration_tests::{run_testbin, NoLeftovers};

const MIB: u64 = 1 << 20;

#[test]
fn allocating_past_the_cap_is_oom_killed_and_reported() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&["--memory", "128M", "--swap", "0"], &["alloc", "512"]);
    // SIGKILL from the OOM killer: 128 + 9.
    assert_eq!(run.status(), 137, "stderr: {}", run.stderr());
    assert!(run.u64("/cgroup/oom_kills") >= 1, "{}", run.stderr());
    assert_eq!(run.summary.as_ref().unwrap()["exit"]["signal"], "SIGKILL");
    let peak = run.u64("/cgroup/memory_peak_bytes");
    assert!(peak <= 128 * MIB, "peak {peak} above the 128 MiB cap");
    assert!(
        peak >= 100 * MIB,
        "peak {peak}: the workload never came near the cap"
    );
    assert_eq!(
        run.u64("/cgroup/swap_peak_bytes"),
        0,
        "--swap 0 but swap was used"
    );
    assert!(
        run.stderr().contains("(the OOM killer)"),
        "{}",
        run.stderr()
    );
    assert!(
        !run.stdout().contains("allocated"),
        "the workload finished despite the cap"
    );
    guard.assert_clean();
}

#[test]
fn allocating_under_the_cap_succeeds_and_the_peak_is_measured() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&["--memory", "256M", "--swap", "0"], &["alloc", "96"]);
    assert_eq!(run.status(), 0, "stderr: {}", run.stderr());
    assert!(run.stdout().contains("allocated 96 MiB"));
    assert_eq!(run.u64("/cgroup/oom_kills"), 0);
    let peak = run.u64("/cgroup/memory_peak_bytes");
    assert!(
        (96 * MIB..160 * MIB).contains(&peak),
        "peak {peak} for a 96 MiB workload"
    );
    assert_eq!(run.u64("/limits/memory_bytes"), 256 * MIB);
    guard.assert_clean();
}
