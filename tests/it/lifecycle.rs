//! Exit statuses, signal forwarding, and removal of everything a run made, also after a crash.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nbt_integration_tests::{
    live_runs, nbt, nbt_command, nbt_with_env, run_cgroups, run_testbin, testbin,
    wait_for_live_run, NoLeftovers,
};

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

/// An nbt a test started: stopped with SIGTERM (which it passes to its workload) when the test
/// ends without waiting for it, a failing test included, so that no live run is left behind.
struct Started(Option<Child>);

impl Started {
    /// The child, for a test that waits for it itself.
    fn take(mut self) -> Child {
        self.0.take().expect("taken once")
    }

    /// Ends the `await-signal` workload whose pid is in `file` (SIGUSR1: it exits 0) and waits
    /// for nbt's summary.
    fn end_workload(self, file: &PathBuf) -> nbt_integration_tests::Run {
        let pid: i32 = std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the workload this test started.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        nbt_integration_tests::Run::from_output(self.take().wait_with_output().unwrap())
    }
}

impl std::ops::Deref for Started {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not taken")
    }
}

impl std::ops::DerefMut for Started {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not taken")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) of the nbt process this test started and has not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
        }
    }
}

/// Starts `nbt run -- nbt-testbin await-signal FILE` and waits until the workload is ready.
fn start_awaiting(file: &PathBuf) -> Started {
    start_awaiting_with(&[], file)
}

/// [`start_awaiting`] with `limits` given to `nbt run`.
fn start_awaiting_with(limits: &[&str], file: &PathBuf) -> Started {
    let child = nbt_command()
        .args(["run", "--json"])
        .args(limits)
        .arg("--")
        .arg(testbin())
        .arg("await-signal")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = Started(Some(child));
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
        let output = child.take().wait_with_output().unwrap();
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

/// nbt killed with SIGKILL while its run's balance is spent: the run's pinned programs keep the
/// gate closed (and its other limits in force) with no nbt left, `nbt ps` shows the run as an
/// orphan, other commands warn of it, and `nbt cleanup` removes it all.
#[test]
fn a_killed_nbt_leaves_its_gate_closed_until_cleanup() {
    use std::io::BufRead as _;
    let guard = NoLeftovers::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let mut nbt_run = nbt_command()
        .args([
            "run",
            "--balance",
            "0",
            "--price-hour",
            "1000000",
            "--gate",
            &addr,
            "--",
        ])
        .arg(testbin())
        .args(["connect-loop", &addr, "100000", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = nbt_run.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let next = || {
        lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a connect")
    };
    while next() != "connect EPERM" {}

    // SAFETY: kill(2) of the nbt process this test started.
    unsafe { libc::kill(nbt_run.id() as i32, libc::SIGKILL) };
    nbt_run.wait().unwrap();
    while lines.try_recv().is_ok() {}
    // The workload goes on, without its nbt, and every connect is still refused.
    let after: Vec<String> = (0..10).map(|_| next()).collect();
    assert!(after.iter().all(|c| c == "connect EPERM"), "{after:?}");

    let ps: serde_json::Value = serde_json::from_str(&nbt(&["ps", "--json"]).stdout()).unwrap();
    let orphan = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|run| run["orphan"] == true)
        .unwrap_or_else(|| panic!("no orphan in {ps}"));
    let name = orphan["run"].as_str().unwrap().to_string();
    let pins = PathBuf::from("/sys/fs/bpf/nbt").join(&name);
    assert!(pins.join("gate_connect4").exists(), "{}", pins.display());
    let warned = nbt(&["receipts", "list"]);
    assert!(
        warned.stderr().contains("whose nbt died") && warned.stderr().contains(&name),
        "{}",
        warned.stderr()
    );

    let reports = std::env::temp_dir().join(&name);
    assert!(reports.join("reports").exists(), "{}", reports.display());
    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(cleanup.stderr().contains(&name), "{}", cleanup.stderr());
    assert!(!pins.exists(), "{} left behind", pins.display());
    assert!(!reports.exists(), "{} left behind", reports.display());
    // The workload was killed with its cgroups: its output ends.
    wait_for("the orphan's workload to end", || {
        matches!(
            lines.recv_timeout(Duration::from_millis(100)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        )
    });
    let quiet = nbt(&["receipts", "list"]);
    assert!(
        !quiet.stderr().contains("whose nbt died"),
        "{}",
        quiet.stderr()
    );
    guard.assert_clean();
}

/// A SIGTERM or SIGINT that reaches nbt while it sets the run up stops it before the workload
/// starts: 128 + the signal, nothing left behind. The signal is made pending before nbt starts
/// (blocked, then raised, in the child before exec: pending signals survive exec), so it is
/// there from nbt's first instruction on.
#[test]
fn a_signal_during_setup_stops_nbt_before_the_workload() {
    use std::os::unix::process::CommandExt as _;
    let guard = NoLeftovers::new();
    for (signal, status, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let marker = temp_file(&format!("setup-{name}"));
        let mut command = nbt_command();
        command
            .args(["run", "--memory", "64M", "--", "touch"])
            .arg(&marker);
        // SAFETY: sigprocmask(2) and raise(3) in the child before exec; both async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                libc::raise(signal);
                Ok(())
            });
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{name}: {stderr}");
        assert!(stderr.contains(&format!("stopped by {name}")), "{stderr}");
        assert!(!marker.exists(), "{name}: the workload ran");
        guard.assert_clean();
    }
}

/// A run whose cgroup cannot be removed (someone made a cgroup inside it) keeps its record, so
/// that `nbt cleanup` finds it once the obstacle is gone.
#[test]
fn a_cgroup_that_cannot_be_removed_keeps_its_record() {
    let guard = NoLeftovers::new();
    let child = nbt_command()
        .args(["run", "--", "sleep", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = wait_for_live_run(|run| run["command"][0] == "sleep").expect("the run to start");
    let (_, record) = nbt::state::RunRecord::find_live(&nbt::state::state_dir(), &name).unwrap();
    let intruder = record.cgroups[0].join("intruder");
    std::fs::create_dir(&intruder).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stays for `nbt cleanup`"), "{stderr}");
    let record_file = nbt::state::RunRecord::path(&nbt::state::state_dir(), &name);
    assert!(record_file.exists(), "{} removed", record_file.display());
    std::fs::remove_dir(&intruder).unwrap();
    let cleanup = nbt(&["cleanup"]);
    assert!(
        cleanup.stderr().contains(&format!("removed {name}")),
        "{}",
        cleanup.stderr()
    );
    assert!(!record_file.exists());
    guard.assert_clean();
}

fn mode(path: &std::path::Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::symlink_metadata(path).unwrap().permissions())
        & 0o7777
}

#[test]
fn the_state_directory_and_records_are_private() {
    let guard = NoLeftovers::new();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let state_env = state.to_str().unwrap();
    // The workload reads the mode and owner of its own run's record while the run lives: as root
    // (`--user root`), since nobody else may look into the state directory.
    let script = r#"stat -c '%a %u %F' "$NBT_STATE_DIR" "$NBT_STATE_DIR"/runs "$NBT_STATE_DIR"/runs/nbt-*.json"#;
    let env = [("NBT_STATE_DIR", state_env), ("NBT_USER", "root")];
    let run = nbt_with_env(&["run", "--json", "--", "sh", "-c", script], &env);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let seen: Vec<String> = run.stdout().lines().take(3).map(String::from).collect();
    eprintln!("made: {seen:?}");
    assert_eq!(
        seen,
        ["700 0 directory", "700 0 directory", "600 0 regular file"],
        "{}",
        run.stderr()
    );
    assert!(
        !run.stderr().contains("the state directory"),
        "{}",
        run.stderr()
    );

    // A state directory an older nbt made 0755: tightened, said once.
    for dir in [&state, &state.join("runs")] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let run = nbt_with_env(&["run", "--json", "--", "sh", "-c", script], &env);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let stderr = run.stderr();
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("the state directory") && l.contains("made it 0700"))
        .collect();
    eprintln!("tightened: {said:?}");
    assert_eq!(said.len(), 2, "{}", run.stderr());
    assert!(said[0].contains("had mode 0755"), "{said:?}");
    assert_eq!((mode(&state), mode(&state.join("runs"))), (0o700, 0o700));

    // A state directory of another user's is refused before anything is made.
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let run = nbt_with_env(
        &["run", "--json", "--", "true"],
        &[("NBT_STATE_DIR", state_env)],
    );
    eprintln!("another user's: {}", run.stderr().trim());
    assert_ne!(run.status(), 0);
    assert!(
        run.stderr().contains("owned by uid 65534"),
        "{}",
        run.stderr()
    );
    guard.assert_clean();
}

#[test]
fn concurrent_changes_to_a_live_run_neither_tear_its_record_nor_lose_one() {
    let guard = NoLeftovers::new();
    let run = std::thread::spawn(|| nbt(&["run", "--json", "--", "sleep", "30"]));
    let name = wait_for_live_run(|r| r["command"].to_string().contains("\"sleep\",\"30\""))
        .expect("the run in nbt ps");
    let state = nbt::state::state_dir();
    let record = || nbt::state::RunRecord::find_live(&state, &name).unwrap().1;
    assert_eq!(mode(&nbt::state::RunRecord::path(&state, &name)), 0o600);
    // Rounds of four `nbt set` at once, each changing another field: every change of a round
    // is in the record after it (none lost to another writer), and the record always parses.
    const ROUNDS: u64 = 12;
    let started = Instant::now();
    for round in 1..=ROUNDS {
        let (egress, ingress, burst, loss) = (
            format!("{}kbit", 1000 + round),
            format!("{}kbit", 2000 + round),
            format!("{}B", 100_000 + round),
            format!("{round}%"),
        );
        let changes: Vec<Vec<String>> = vec![
            vec!["--egress-rate".into(), egress],
            vec!["--ingress-rate".into(), ingress],
            vec!["--burst".into(), burst],
            vec!["--loss".into(), loss],
        ];
        let setters: Vec<_> = changes
            .into_iter()
            .map(|change| {
                let name = name.clone();
                std::thread::spawn(move || {
                    let mut args = vec!["set".to_string(), name];
                    args.extend(change);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    nbt(&args)
                })
            })
            .collect();
        for setter in setters {
            let set = setter.join().unwrap();
            assert_eq!(set.status(), 0, "{}", set.stderr());
        }
        let net = serde_json::to_value(record().net).unwrap();
        // No `nbt set` here touches netem's other impairments: the record keeps them at zero.
        let untouched = serde_json::json!({
            "loss_correlation": 0.0, "duplicate": 0.0, "corrupt": 0.0,
            "reorder": 0.0, "reorder_correlation": 0.0, "reorder_gap": 0,
        });
        let expected = serde_json::json!({
            "egress": {
                "rate_bits_per_sec": (1000 + round) * 1000,
                "burst_bytes": 100_000 + round,
                "loss": { "model": "uniform", "probability": round as f64 / 100.0 },
                "impair": untouched,
            },
            "ingress": {
                "rate_bits_per_sec": (2000 + round) * 1000,
                "burst_bytes": 100_000 + round,
                "loss": { "model": "none" },
                "impair": untouched,
            },
        });
        assert_eq!(net, expected, "round {round}");
    }
    eprintln!(
        "{} `nbt set` in rounds of 4 at once: none lost, in {:?}",
        ROUNDS * 4,
        started.elapsed()
    );
    // Nothing staged is left beside the record.
    let strays: Vec<_> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&name) && n.ends_with(".tmp"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");

    // A name from argv that is no run name is refused before any path is made of it.
    let bad = nbt(&["set", "../../etc/passwd", "--egress-rate", "1mbit"]);
    assert_eq!(bad.status(), 2, "{}", bad.stderr());
    assert!(bad.stderr().contains("not a run name"), "{}", bad.stderr());
    // (`nbt balance` and `nbt fault` exit 1 for every error of theirs, a bad name included.)
    for args in [
        &["balance", "nbt-../x", "add", "1"][..],
        &["fault", "../../x", "brownout", "1s"][..],
    ] {
        let bad = nbt(args);
        assert_ne!(bad.status(), 0, "{}", bad.stderr());
        assert!(
            bad.stderr().contains("not a run name"),
            "{args:?}: {}",
            bad.stderr()
        );
    }

    // The run is stopped (nbt forwards SIGTERM to its workload).
    let pid = record().supervisor_pid;
    // SAFETY: kill(2) of the nbt this test started (its pid from its own record).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let run = run.join().unwrap();
    assert!(run.summary.is_some(), "{}", run.stderr());
    guard.assert_clean();
}

#[test]
fn a_run_given_a_name_is_found_by_it_live_and_in_its_receipts() {
    let guard = NoLeftovers::new();
    let file = temp_file("named");
    let name = format!("train-{}", std::process::id());
    let child = start_awaiting_with(&["--name", &name, "--balance", "2"], &file);
    let listed = live_runs()
        .into_iter()
        .find(|r| r["name"] == name.as_str())
        .expect("nbt ps --json lists the run by its name");
    let id = listed["run"].as_str().unwrap().to_string();
    // The name works wherever the run's own name does.
    let set = nbt(&["set", &name, "--egress-rate", "3mbit"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    let topped = nbt(&["balance", &name, "add", "1"]);
    assert_eq!(topped.status(), 0, "{}", topped.stderr());
    let now = live_runs()
        .into_iter()
        .find(|r| r["run"] == id.as_str())
        .unwrap();
    assert_eq!(now["net_limits"]["egress"]["rate_bits_per_sec"], 3_000_000);
    assert_eq!(now["balance_micro"], 3_000_000);
    // Unique among live runs.
    let twin = nbt(&["run", "--name", &name, "--", "true"]);
    assert_eq!(twin.status(), 2, "{}", twin.stderr());
    assert!(
        twin.stderr()
            .contains(&format!("the live run {id} already has that name")),
        "{}",
        twin.stderr()
    );
    for bad in ["1st", "a b", "nbt-0123456789abcdef", &"x".repeat(65)] {
        let run = nbt(&["run", "--name", bad, "--", "true"]);
        assert_eq!(run.status(), 2, "{bad}: {}", run.stderr());
        assert!(run.stderr().contains("--name"), "{}", run.stderr());
    }
    let run = child.end_workload(&file);
    assert_eq!(run.summary_str("/name"), name);
    // nbt set's network change is in the run's events, as its cgroup changes are.
    let events = run.summary.as_ref().unwrap()["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["source"] == "nbt set"
            && e["what"]
                .as_str()
                .is_some_and(|w| w.starts_with("egress 3mbit"))),
        "{events:?}"
    );
    assert!(
        run.stderr().contains(&format!("nbt: {id} ({name}) ended")),
        "{}",
        run.stderr()
    );
    // After the run: its receipts and its series, by name.
    let listed = nbt(&["receipts", "list", "--run", &name]);
    assert!(listed.stdout().contains(&id), "{}", listed.stdout());
    let series = nbt(&["receipts", "series", &name]);
    assert_eq!(series.status(), 0, "{}", series.stderr());
    assert!(series.stdout().starts_with("t_seconds,"));
    // Not live any more: a live command says so.
    let gone = nbt(&["set", &name, "--egress-rate", "1mbit"]);
    assert_ne!(gone.status(), 0);
    assert!(
        gone.stderr()
            .contains(&format!("no live run named '{name}'")),
        "{}",
        gone.stderr()
    );
    let _ = std::fs::remove_file(&file);
    guard.assert_clean();
}

#[test]
fn nbt_set_changes_memory_cpus_and_pids_of_a_live_run_and_logs_it() {
    let guard = NoLeftovers::new();
    let file = temp_file("set-limits");
    let child = start_awaiting_with(
        &[
            "--memory",
            "256M",
            "--cpus",
            "1",
            "--pids",
            "100",
            "--series-interval",
            "200ms",
        ],
        &file,
    );
    let run = wait_for_live_run(|_| true).expect("the run is listed");
    let set = nbt(&[
        "set", &run, "--memory", "128M", "--cpus", "0.5", "--pids", "50",
    ]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    // The kernel has the new limits: the run's next samples read them back from its cgroups.
    let mib = (1u64 << 20) as f64;
    wait_for("the new limits in the run's samples", || {
        live_runs()
            .into_iter()
            .find(|r| r["run"] == run.as_str())
            .is_some_and(|r| {
                r["latest"]["memory_limit_bytes"] == 128.0 * mib
                    && r["latest"]["cpu_limit_cores"] == 0.5
                    && r["latest"]["pids_limit"] == 50.0
            })
    });
    // A bad value is a usage error naming the flag, and changes nothing.
    let bad = nbt(&["set", &run, "--memory", "12X", "--cpus", "0.25"]);
    assert_eq!(bad.status(), 2, "{}", bad.stderr());
    assert!(bad.stderr().contains("for --memory"), "{}", bad.stderr());
    // A memory limit below what the run holds: where the memory controller is v1 and there is
    // no swap to reclaim the workload's own pages into, the kernel refuses it (EBUSY), and nbt
    // says so in those words. (v2 takes it and OOM-kills; not tried here.)
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let no_swap = std::fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() <= 1);
    let refused_below = v1 && no_swap;
    if refused_below {
        let below = nbt(&["set", &run, "--memory", "4K"]);
        assert_eq!(below.status(), 1, "{}", below.stderr());
        assert!(
            below
                .stderr()
                .contains("could not reclaim the run's memory down to 4.0 KiB (it holds ")
                && below.stderr().contains("cgroup v1 refuses a limit"),
            "{}",
            below.stderr()
        );
    }
    let run = child.end_workload(&file);
    let events = run.summary.as_ref().unwrap()["events"]
        .as_array()
        .unwrap()
        .clone();
    let set: Vec<_> = events.iter().filter(|e| e["source"] == "nbt set").collect();
    assert_eq!(set.len(), 1 + refused_below as usize, "{events:?}");
    assert_eq!(set[0]["what"], "memory 128.0 MiB, cpus 0.5, pids 50");
    if refused_below {
        // The refused change is in the run's log too, with its reason.
        assert_eq!(set[1]["what"], "memory 4.0 KiB");
        assert!(
            set[1]["error"]
                .as_str()
                .is_some_and(|e| e.contains("cgroup v1 refuses a limit")),
            "{:?}",
            set[1]
        );
    }
    let _ = std::fs::remove_file(&file);
    guard.assert_clean();
}
