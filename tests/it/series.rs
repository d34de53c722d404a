//! The time series every run records: sampled while it runs, stored beside its receipt, covered
//! by the receipt's hash, printed by `nbt receipts series`; and the live status line.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Command;

use nbt_integration_tests::{nbt, nbt_command, receive_all, run_testbin, NoLeftovers, Run};

const MIB: f64 = (1 << 20) as f64;

/// The CSV of `nbt receipts series RUN`, by column.
fn series_csv(run: &Run) -> BTreeMap<String, Vec<Option<f64>>> {
    let name = run.summary_str("/run");
    let csv = nbt(&["receipts", "series", &name]);
    assert_eq!(csv.status(), 0, "{}", csv.stderr());
    let text = csv.stdout();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let mut columns: BTreeMap<String, Vec<Option<f64>>> =
        header.iter().map(|h| (h.clone(), Vec::new())).collect();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), header.len(), "{line}");
        for (name, field) in header.iter().zip(fields) {
            let value = (!field.is_empty()).then(|| field.parse::<f64>().unwrap());
            columns.get_mut(name).unwrap().push(value);
        }
    }
    columns
}

fn measured(columns: &BTreeMap<String, Vec<Option<f64>>>, name: &str) -> Vec<f64> {
    columns[name]
        .iter()
        .map(|v| v.unwrap_or_else(|| panic!("{name} not measured in {:?}", columns[name])))
        .collect()
}

#[test]
fn memory_and_cpu_are_sampled_against_their_cap_and_the_receipt_covers_the_series() {
    let guard = NoLeftovers::new();
    let run = run_testbin(
        &["--memory", "96M", "--series-interval", "200ms"],
        &["alloc-hold", "48", "2000"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let rows = run.u64("/series/rows");
    assert_eq!(run.f64("/series/interval_seconds"), 0.2);
    let columns = series_csv(&run);
    let t = measured(&columns, "t_seconds");
    assert_eq!(t.len() as u64, rows);
    // 2 s held at 200 ms: about 10 samples, however late the supervisor woke.
    assert!(rows >= 5, "{rows} samples of a 2 s run at 200 ms");
    assert!(t.windows(2).all(|w| w[1] > w[0]), "{t:?}");
    // The last sample is the run's end.
    let wall = run.f64("/wall_seconds");
    assert!(
        (t.last().unwrap() - wall).abs() < 0.5,
        "{t:?} against {wall} s"
    );
    assert!(measured(&columns, "memory_limit_bytes")
        .iter()
        .all(|cap| *cap == 96.0 * MIB));
    let memory = measured(&columns, "memory_bytes");
    let peak = memory.iter().cloned().fold(0.0, f64::max);
    assert!(
        (48.0 * MIB..=96.0 * MIB).contains(&peak),
        "the highest sample {peak} of a workload holding 48 MiB under a 96 MiB cap"
    );
    // Counters only grow, and the last is the summary's.
    let cpu = measured(&columns, "cpu_seconds");
    assert!(cpu.windows(2).all(|w| w[1] >= w[0]), "{cpu:?}");
    let summary_cpu = run.u64("/cgroup/cpu_usage_usec") as f64 / 1e6;
    assert!(
        (cpu.last().unwrap() - summary_cpu).abs() < 0.01,
        "last sample {cpu:?} against the summary's {summary_cpu} s"
    );
    assert!(measured(&columns, "joules").last().unwrap() > &0.0);

    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 0, "{}", verify.stdout());
    assert!(
        verify
            .stdout()
            .contains("1 time series match their receipts"),
        "{}",
        verify.stdout()
    );

    // Altering one figure of the stored series is caught, by verify and by the reader.
    let name = run.summary_str("/run");
    let db = rusqlite::Connection::open(guard.home().join("receipts.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE series SET body = replace(body, '\"rows\":[[', '\"rows\":[[9') WHERE run = ?1",
            [&name],
        )
        .unwrap();
    assert_eq!(changed, 1);
    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 1, "{}", verify.stdout());
    assert!(
        verify.stdout().contains("the series was altered"),
        "{}",
        verify.stdout()
    );
    let read = nbt(&["receipts", "series", &name]);
    assert_eq!(read.status(), 1);
    assert!(
        read.stderr().contains("it was altered"),
        "{}",
        read.stderr()
    );
    // Removed: verify names the run whose series is gone.
    db.execute("DELETE FROM series WHERE run = ?1", [&name])
        .unwrap();
    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 1);
    assert!(
        verify.stdout().contains("which is not stored"),
        "{}",
        verify.stdout()
    );
    guard.assert_clean();
}

#[test]
fn packets_are_sampled_against_the_rate_limit_and_end_at_the_summary_s_counts() {
    let guard = NoLeftovers::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let receiver = std::thread::spawn(move || receive_all(listener));
    // 1 MiB at 4mbit: about 2 s.
    let run = run_testbin(
        &["--egress-rate", "4mbit", "--series-interval", "250ms"],
        &["tcp-send", &addr, "1048576"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    receiver.join().unwrap();
    let columns = series_csv(&run);
    assert!(measured(&columns, "egress_rate_limit_bits_per_second")
        .iter()
        .all(|r| *r == 4e6));
    assert!(columns["ingress_rate_limit_bits_per_second"]
        .iter()
        .all(Option::is_none));
    let passed = measured(&columns, "egress_passed_bytes");
    assert!(passed.windows(2).all(|w| w[1] >= w[0]), "{passed:?}");
    assert_eq!(
        *passed.last().unwrap() as u64,
        run.u64("/shaped/egress/passed_bytes")
    );
    // The bytes went out over the run, not all in its first or last sample.
    let halfway = passed.last().unwrap() / 2.0;
    let rising = passed
        .iter()
        .filter(|b| **b > 0.0 && **b < halfway * 1.5)
        .count();
    assert!(rising >= 2, "{passed:?}");

    let json = nbt(&[
        "receipts",
        "series",
        &run.summary_str("/run"),
        "--format",
        "json",
    ]);
    assert_eq!(json.status(), 0, "{}", json.stderr());
    let value: serde_json::Value = serde_json::from_str(&json.stdout()).unwrap();
    assert_eq!(value["series"]["format"], "nbt.series/v1");
    assert_eq!(
        value["receipt"]["receipt_hash"],
        run.summary.as_ref().unwrap()["receipt"]["receipt_hash"]
    );
    assert!(value["events"].is_array());
    guard.assert_clean();
}

/// `nbt run` under a terminal (script(1) gives it one), as a user types it.
fn run_on_a_terminal(nbt_args: &str) -> String {
    let nbt = nbt_command();
    let mut command = Command::new("script");
    command.args([
        "-qfec",
        &format!("{} {nbt_args}", nbt.get_program().to_str().unwrap()),
        "/dev/null",
    ]);
    for (key, value) in nbt.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let output = command.output().expect("running script(1)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_terminal_gets_one_live_status_line_and_quiet_or_a_pipe_none() {
    let guard = NoLeftovers::new();
    let seen = run_on_a_terminal("run --memory 64M --series-interval 200ms -- sleep 1.5");
    // Rewritten in place: carriage return and erase, then the line.
    let lines: Vec<&str> = seen.split("\r\x1b[2K").skip(1).collect();
    assert!(lines.len() >= 3, "{seen:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("nbt ") && l.contains("mem ") && l.contains("/ 64.0 MiB")),
        "{seen:?}"
    );
    // Erased before the summary.
    assert!(seen.contains("\r\x1b[2Knbt: nbt-"), "{seen:?}");

    let quiet = run_on_a_terminal("run --quiet --memory 64M --series-interval 200ms -- sleep 1");
    assert!(!quiet.contains("\x1b[2K"), "{quiet:?}");
    let piped = nbt(&[
        "run",
        "--memory",
        "64M",
        "--series-interval",
        "200ms",
        "--",
        "sleep",
        "1",
    ]);
    assert_eq!(piped.status(), 0);
    assert!(!piped.stderr().contains("\x1b[2K"), "{:?}", piped.stderr());
    guard.assert_clean();
}

#[test]
fn a_series_interval_out_of_range_is_a_usage_error() {
    for bad in ["50ms", "2h", "1", "fast"] {
        let run = nbt(&["run", "--series-interval", bad, "--", "true"]);
        assert_eq!(run.status(), 2, "{bad}: {}", run.stderr());
        assert!(
            run.stderr().contains("--series-interval"),
            "{}",
            run.stderr()
        );
        assert!(run.stderr().contains(bad), "{}", run.stderr());
    }
}
