//! CPU caps, measured from the run cgroup's own CPU accounting (cpu.stat usage_usec).

use nbt_integration_tests::{run_testbin, NoLeftovers};

#[test]
fn half_a_core_gives_a_busy_loop_half_a_core() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&["--cpus", "0.5"], &["spin", "6"]);
    assert_eq!(run.status(), 0, "stderr: {}", run.stderr());
    let cpu_seconds = run.u64("/cgroup/cpu_usage_usec") as f64 / 1e6;
    let wall = run.f64("/wall_seconds");
    let cores = cpu_seconds / wall;
    // ±10% of the target.
    assert!(
        (0.45..=0.55).contains(&cores),
        "{cores:.3} cores ({cpu_seconds:.2} s CPU in {wall:.2} s)"
    );
    // The quota did the limiting: most 100 ms periods ended throttled.
    let periods = run.u64("/cgroup/cpu_periods");
    let throttled = run.u64("/cgroup/cpu_throttled_periods");
    assert!(periods >= 50, "{periods} periods in 6 s");
    assert!(
        throttled * 10 >= periods * 8,
        "{throttled} of {periods} periods throttled"
    );
    guard.assert_clean();
}

#[test]
fn without_a_cap_a_busy_loop_gets_a_whole_core() {
    let guard = NoLeftovers::new();
    let run = run_testbin(&[], &["spin", "2"]);
    assert_eq!(run.status(), 0, "stderr: {}", run.stderr());
    let cores = run.u64("/cgroup/cpu_usage_usec") as f64 / 1e6 / run.f64("/wall_seconds");
    assert!(cores > 0.8, "{cores:.3} cores with no cap");
    guard.assert_clean();
}
