//! `--schedule`: limits that change during a run and injected faults, applied to real runs.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use nbt_integration_tests::{
    accepting, nbt_in_netns, receive_all, run_testbin, testbin, NetnsPair, NoLeftovers, Run, ADDR_B,
};
use serde_json::Value;

const PAYLOAD_PER_WIRE: f64 = 1448.0 / 1500.0;

fn write_schedule(guard: &NoLeftovers, name: &str, text: &str) -> String {
    let path = guard.home().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn events(run: &Run) -> Vec<Value> {
    run.summary.as_ref().expect("a JSON summary")["events"]
        .as_array()
        .expect("events")
        .clone()
}

fn event<'a>(events: &'a [Value], source_prefix: &str, what: &str) -> &'a Value {
    events
        .iter()
        .find(|e| {
            e["source"].as_str().unwrap().starts_with(source_prefix)
                && e["what"].as_str().unwrap().starts_with(what)
        })
        .unwrap_or_else(|| panic!("no event {source_prefix} {what} in {events:#?}"))
}

#[test]
fn a_scheduled_halving_of_the_egress_rate_shows_at_the_receiver_within_2_s() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(
        &guard,
        "halve.toml",
        "[[step]]\nat = \"5s\"\negress-rate = \"10mbit\"\n",
    );
    let net = NetnsPair::new("sch");
    let receiver = NetnsPair::in_netns(&net.b, || {
        receive_all(TcpListener::bind(format!("{ADDR_B}:5211")).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let run = nbt_in_netns(
        &net.a,
        &[
            "run",
            "--json",
            "--egress-rate",
            "20mbit",
            "--schedule",
            &schedule,
            "--",
            testbin.to_str().unwrap(),
            "tcp-stream",
            &format!("{ADDR_B}:5211"),
            "11",
        ],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let step = event(&log, "step (line 1)", "egress rate 10mbit");
    let t = step["t"].as_f64().unwrap();
    assert!((5.0..5.3).contains(&t), "the step came at {t} s");
    assert_eq!(run.u64("/net_limits/egress/rate_bits_per_sec"), 10_000_000);
    let received = receiver.join().unwrap();
    let before = received.rate_between(1.5, 4.5) / PAYLOAD_PER_WIRE;
    let after = received.rate_between(t + 2.0, 10.5) / PAYLOAD_PER_WIRE;
    assert!(
        (0.93..=1.05).contains(&(before / 20e6)),
        "before the step: {before:.0} bit/s"
    );
    assert!(
        (0.93..=1.05).contains(&(after / 10e6)),
        "from 2 s after the step: {after:.0} bit/s"
    );
    guard.assert_clean();
}

#[test]
fn a_2_s_brownout_is_2_s_without_cpu_time() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(
        &guard,
        "brownout.toml",
        "[[fault]]\nkind = \"brownout\"\nstart = \"2s\"\nduration = \"2s\"\n",
    );
    // One busy thread for 6 s of wall time: frozen for 2 of them.
    let run = run_testbin(&["--schedule", &schedule], &["spin", "6"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let start = event(&log, "brownout #1", "frozen");
    let end = event(&log, "brownout #1", "thawed");
    let frozen_for = end["t"].as_f64().unwrap() - start["t"].as_f64().unwrap();
    assert!(
        (1.9..2.3).contains(&frozen_for),
        "frozen for {frozen_for} s"
    );
    let cpu_meanwhile = end["during"]["cpu_usec"].as_u64().unwrap();
    assert!(
        cpu_meanwhile < 50_000,
        "{cpu_meanwhile} µs of CPU while frozen"
    );
    let cpu = run.u64("/cgroup/cpu_usage_usec") as f64 / 1e6;
    assert!(
        (3.4..=4.6).contains(&cpu),
        "{cpu} s of CPU in 6 s with 2 s frozen"
    );
    guard.assert_clean();
}

#[test]
fn a_memory_squeeze_shows_as_memory_pressure() {
    let guard = NoLeftovers::new();
    // A workload that writes a 64 MiB file (its page cache is charged to the run), then rereads
    // it: squeezed to 16 MiB, every read must reclaim the page cache the last one filled.
    let file = Path::new("/var/tmp").join(format!("nbt-squeeze-{}", std::process::id()));
    let schedule = write_schedule(
        &guard,
        "squeeze.toml",
        "[[fault]]\nkind = \"memory-squeeze\"\nstart = \"2s\"\nduration = \"3s\"\nmemory = \"16M\"\n",
    );
    let script = format!(
        "dd if=/dev/zero of={f} bs=1M count=64 2>/dev/null; end=$(($(date +%s) + 6)); \
         while [ $(date +%s) -lt $end ]; do cat {f} > /dev/null; done",
        f = file.display()
    );
    let run = nbt_integration_tests::nbt(&[
        "run",
        "--json",
        "--memory",
        "256M",
        "--schedule",
        &schedule,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let before = event(&log, "memory-squeeze #1", "memory squeezed to 16.0 MiB");
    let end = event(&log, "memory-squeeze #1", "memory squeezed to 256.0 MiB");
    assert!(end["error"].is_null(), "{end}");
    // Before the squeeze the file sits in the run's page cache: next to no stall.
    let stalled_before = before["counters"]["psi_memory_some_usec"].as_u64().unwrap();
    let stalled = end["during"]["psi_memory_some_usec"].as_u64().unwrap();
    assert!(
        stalled > 10_000 && stalled > 10 * stalled_before,
        "{stalled} µs of memory stall in the 3 s squeezed, {stalled_before} µs in the 2 s before: {end}"
    );
    guard.assert_clean();
}

#[test]
fn a_balance_shock_charges_the_balance_at_once() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(
        &guard,
        "shock.toml",
        "[[fault]]\nkind = \"balance-shock\"\nstart = \"1s\"\namount = \"0.4\"\n",
    );
    let run = run_testbin(
        &["--balance", "1", "--schedule", &schedule],
        &["sleep", "2"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let shock = event(&log, "balance-shock #1", "balance -0.4");
    assert!(
        shock["what"].as_str().unwrap().contains("balance now 0.6"),
        "{shock}"
    );
    assert_eq!(
        run.summary.as_ref().unwrap()["ledger"]["balance_end_micro"],
        600_000
    );
    guard.assert_clean();
}

#[test]
fn the_same_seed_gives_the_same_timeline_twice() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(
        &guard,
        "walk.toml",
        "seed = 11\n[[generator]]\nlimit = \"cpus\"\nkind = \"random-walk\"\nevery = \"300ms\"\nuntil = \"2s\"\nmin = 0.2\nmax = 1.0\n",
    );
    let timeline = || {
        let run = run_testbin(&["--schedule", &schedule], &["sleep", "3"]);
        assert_eq!(run.status(), 0, "{}", run.stderr());
        events(&run)
            .iter()
            .map(|e| e["what"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (first, second) = (timeline(), timeline());
    assert_eq!(first.len(), 7, "{first:?}");
    assert_eq!(first, second);
    assert!(
        first
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 2,
        "{first:?}"
    );
    guard.assert_clean();
}

#[test]
fn a_bad_schedule_is_refused_before_the_run_with_its_line() {
    let guard = NoLeftovers::new();
    let marker = guard.home().join("ran");
    for (text, wanted) in [
        ("[[step]]\nat = \"1s\"\nmemroy = \"1G\"\n", "line 3"),
        (
            "[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"-2s\"\n",
            "line 1",
        ),
        (
            "[[step]]\nat = \"1s\"\ncpus = 1\n\n[[step]]\nat = \"1s\"\ncpus = 0.5\n",
            "step (line 1) and step (line 5) both set cpus",
        ),
    ] {
        let schedule = write_schedule(&guard, "bad.toml", text);
        let run = nbt_integration_tests::nbt(&[
            "run",
            "--schedule",
            &schedule,
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]);
        assert_eq!(run.status(), 2, "{text}: {}", run.stderr());
        assert!(
            run.stderr().contains(wanted) && run.stderr().contains("--schedule"),
            "{text}: {}",
            run.stderr()
        );
        assert!(!marker.exists(), "the workload ran under a bad schedule");
    }
}

/// `n` steps of the CPU quota, 1 ms apart, an hour in: none is due before `true` exits.
fn steps_an_hour_in(n: usize) -> String {
    (1..=n)
        .map(|i| format!("[[step]]\nat = \"{}ms\"\ncpus = 1\n", 3_600_000 + i))
        .collect()
}

/// A schedule of 100,000 steps, the most a schedule expands to, is accepted, and one of 100,001
/// is refused naming the line of the step past the cap. Their lines are looked up in linear
/// time (a binary search among line starts): the quadratic count took 4 minutes of CPU for
/// 100,000 steps, now a few seconds for the debug build, most of it in the TOML parser. Timing
/// is not asserted: the machines that run these tests differ too much.
#[test]
fn a_schedule_of_100000_steps_is_accepted_and_one_more_refused() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(&guard, "steps.toml", &steps_an_hour_in(100_000));
    let run = nbt_integration_tests::nbt(&["run", "--json", "--schedule", &schedule, "--", "true"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let text = steps_an_hour_in(100_001);
    assert!(text.len() < nbt::plan::MAX_SCHEDULE_BYTES as usize);
    let schedule = write_schedule(&guard, "steps.toml", &text);
    let marker = guard.home().join("ran");
    let run = nbt_integration_tests::nbt(&[
        "run",
        "--schedule",
        &schedule,
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(run.status(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains(
            "line 300001: this step adds 1 actions to the 100000 before it: more than 100000"
        ),
        "{}",
        run.stderr()
    );
    assert!(
        !marker.exists(),
        "the workload ran under a refused schedule"
    );
    guard.assert_clean();
}

#[test]
fn nbt_fault_freezes_a_live_run_from_outside_and_the_run_logs_it() {
    let guard = NoLeftovers::new();
    let testbin = testbin();
    let sender = {
        let testbin = testbin.clone();
        std::thread::spawn(move || {
            nbt_integration_tests::nbt(&[
                "run",
                "--json",
                "--",
                testbin.to_str().unwrap(),
                "spin",
                "5",
            ])
        })
    };
    let name =
        nbt_integration_tests::wait_for_live_run(|r| r["command"].to_string().contains("spin"))
            .expect("the spinning run in nbt ps");
    let bad = nbt_integration_tests::nbt(&["fault", &name, "brownout"]);
    assert_eq!(bad.status(), 2, "{}", bad.stderr());
    assert!(
        bad.stderr().contains("a brownout fault needs DURATION"),
        "{}",
        bad.stderr()
    );
    // Its errors name its own arguments and flags, not a schedule file's keys.
    for (args, said) in [
        (
            &["brownout", "abc"][..],
            "invalid value 'abc' for DURATION: not a duration",
        ),
        (&["loss-burst", "1s"], "a loss-burst fault needs --loss"),
        (
            &["brownout", "1s", "--rate", "1M"],
            "--rate does not apply to a brownout fault",
        ),
        (
            &["network-drop", "1s", "--direction", "up"],
            "invalid value 'up' for --direction: accepted: egress, ingress, both",
        ),
    ] {
        let bad = nbt_integration_tests::nbt(&[&["fault", name.as_str()][..], args].concat());
        assert_eq!(bad.status(), 2, "{args:?}: {}", bad.stderr());
        assert!(
            bad.stderr().starts_with(&format!("nbt fault: {said}")),
            "{args:?}: {}",
            bad.stderr()
        );
    }
    let fault = nbt_integration_tests::nbt(&["fault", &name, "brownout", "1500ms"]);
    assert_eq!(fault.status(), 0, "{}", fault.stderr());
    let run = sender.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let end = event(&log, "nbt fault brownout", "thawed");
    assert!(
        end["during"]["cpu_usec"].as_u64().unwrap() < 50_000,
        "{end}"
    );
    event(&log, "nbt fault brownout", "frozen");
    let cpu = run.u64("/cgroup/cpu_usage_usec") as f64 / 1e6;
    assert!(
        (3.0..=4.0).contains(&cpu),
        "{cpu} s of CPU in 5 s with 1.5 s frozen"
    );
    guard.assert_clean();
}

#[test]
fn a_failing_workload_is_restarted_and_its_recovery_timed() {
    let guard = NoLeftovers::new();
    // Where the workload (nobody) may write.
    let flag = std::env::temp_dir().join(format!("nbt-test-{}-failed-once", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    // Fails the first time; the second time reports progress and ends well.
    let script = format!(
        "if [ -e {f} ]; then sleep 0.3; echo '{{\"task_name\":\"after\",\"base_loss\":1,\"new_loss\":0.5}}' >> \"$NBT_REPORT\"; sleep 0.5; exit 0; \
         else touch {f}; exit 3; fi",
        f = flag.display()
    );
    let run = nbt_integration_tests::nbt(&[
        "run",
        "--json",
        "--restart",
        "on-failure:2",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let kinds: Vec<&str> = log.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["exit", "restart", "recovered", "exit"], "{log:#?}");
    assert!(log[0]["what"].as_str().unwrap().contains("exit status 3"));
    let recovered = log[2]["what"].as_str().unwrap();
    assert!(recovered.contains("it reported progress"), "{recovered}");
    let after = log[2]["t"].as_f64().unwrap() - log[1]["t"].as_f64().unwrap();
    assert!(
        (0.25..2.0).contains(&after),
        "recovered {after} s after the restart"
    );
    let _ = std::fs::remove_file(&flag);

    // Always failing: two restarts, then its own status.
    let run = nbt_integration_tests::nbt(&[
        "run",
        "--json",
        "--restart",
        "on-failure:2",
        "--",
        "sh",
        "-c",
        "exit 5",
    ]);
    assert_eq!(run.status(), 5, "{}", run.stderr());
    let restarts = events(&run)
        .iter()
        .filter(|e| e["kind"] == "restart")
        .count();
    assert_eq!(restarts, 2);

    let bad = nbt_integration_tests::nbt(&["run", "--restart", "always", "--", "true"]);
    assert_eq!(bad.status(), 2);
    assert!(bad.stderr().contains("--restart"), "{}", bad.stderr());
    guard.assert_clean();
}

#[test]
fn a_memory_leak_fault_grows_a_balloon_inside_the_run_and_removes_it() {
    let guard = NoLeftovers::new();
    let schedule = write_schedule(
        &guard,
        "leak.toml",
        "[[fault]]\nkind = \"memory-leak\"\nstart = \"500ms\"\nduration = \"1500ms\"\nrate = \"40M/s\"\n",
    );
    let run = run_testbin(
        &["--memory", "512M", "--schedule", &schedule],
        &["sleep", "3"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let log = events(&run);
    let start = event(&log, "memory-leak #1", "a balloon leaking 40.0 MiB/s");
    assert!(start["error"].is_null(), "{start}");
    event(&log, "memory-leak #1", "the balloon killed");
    // 1.5 s at 40 MiB/s: about 60 MiB charged to the run, which alone holds a few hundred KiB.
    let peak = run.u64("/cgroup/memory_peak_bytes") as f64 / (1 << 20) as f64;
    assert!((40.0..=80.0).contains(&peak), "memory peak {peak:.1} MiB");
    let bad = write_schedule(
        &guard,
        "bad-leak.toml",
        "[[fault]]\nkind = \"brownout\"\nstart = \"1s\"\nduration = \"1s\"\nrate = \"1M\"\n",
    );
    let refused = run_testbin(&["--schedule", &bad], &["sleep", "1"]);
    assert_eq!(refused.status(), 2);
    assert!(
        refused
            .stderr()
            .contains("rate does not apply to a brownout fault"),
        "{}",
        refused.stderr()
    );
    guard.assert_clean();
}

#[test]
fn a_price_step_changes_what_the_next_call_costs() {
    let guard = NoLeftovers::new();
    let server = accepting("127.0.0.1:0");
    let schedule = write_schedule(
        &guard,
        "price.toml",
        "[[step]]\nat = \"1s\"\nprice-call = \"0.05\"\n",
    );
    // 4 connects 600 ms apart: at 0, 0.6 s at 0.01; at 1.2, 1.8 s at 0.05.
    let run = run_testbin(
        &[
            "--balance",
            "1",
            "--price-call",
            "0.01",
            "--gate",
            &server,
            "--schedule",
            &schedule,
        ],
        &["connect-loop", &server, "4", "600"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    event(&events(&run), "step (line 1)", "price per call 0.05");
    assert_eq!(run.u64("/ledger/calls"), 4);
    assert_eq!(run.u64("/ledger/charged_calls_micro"), 120_000);
    guard.assert_clean();
}
