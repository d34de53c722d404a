//! The balance gate: calls pass and are charged while the balance lasts, then every way out to a
//! gated destination is refused, in the kernel; a top-up reopens it. Servers are loopback
//! listeners of the test itself, outside the run. `calls.rs`: what a call is, counted at real
//! servers with real clients.

mod calls;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::Stdio;
use std::time::Duration;

use nbt_integration_tests::{
    accepting, live_runs, nbt, nbt_command, run_testbin, run_testbin_with_env, testbin,
    wait_for_live_run, NoLeftovers,
};

fn outcomes(stdout: &str, mode: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(mode).map(|r| r.trim().to_string()))
        .collect()
}

#[test]
fn calls_pass_while_the_balance_lasts_then_fail_with_eperm() {
    let guard = NoLeftovers::new();
    let server = accepting("127.0.0.1:0");
    let run = run_testbin(
        &[
            "--balance",
            "0.05",
            "--price-call",
            "0.01",
            "--gate",
            &server,
        ],
        &["connect-loop", &server, "8", "0"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(
        outcomes(&run.stdout(), "connect"),
        ["ok", "ok", "ok", "ok", "ok", "EPERM", "EPERM", "EPERM"]
    );
    assert_eq!(run.u64("/ledger/calls"), 5);
    assert_eq!(run.u64("/ledger/blocked_calls"), 3);
    assert_eq!(
        run.summary.as_ref().unwrap()["ledger"]["balance_end_micro"],
        0
    );
    assert_eq!(run.u64("/ledger/charged_calls_micro"), 50_000);
    // Logged once for the destination, counted three times.
    assert_eq!(
        run.stderr().matches("refused connect to").count(),
        1,
        "{}",
        run.stderr()
    );
    let destination = &run.summary.as_ref().unwrap()["ledger"]["destinations"][&server];
    assert_eq!(destination["charged"], 5, "{destination}");
    assert_eq!(destination["refused"], 3, "{destination}");
    guard.assert_clean();
}

/// The largest balance is 1,000,000: a top-up past it is refused (exit 2) and changes nothing,
/// where the tenth `add 1000000` wrapped the balance negative and closed the gate.
#[test]
fn a_top_up_past_the_largest_balance_is_refused_and_the_balance_unchanged() {
    let guard = NoLeftovers::new();
    let testbin = testbin();
    let child = nbt_command()
        .args(["run", "--json", "--balance", "999999.5", "--"])
        .arg(&testbin)
        .args(["sleep", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = wait_for_live_run(|r| r["balance_micro"] == 999_999_500_000_i64)
        .expect("this test's live run");
    let balance = || {
        live_runs()
            .into_iter()
            .find(|r| r["run"] == name.as_str())
            .map(|r| r["balance_micro"].clone())
    };
    let top_up = nbt(&["balance", &name, "add", "0.5"]);
    assert_eq!(top_up.status(), 0, "{}", top_up.stderr());
    assert!(
        top_up.stderr().contains("balance now 1000000"),
        "{}",
        top_up.stderr()
    );
    for amount in ["0.000001", "1000000"] {
        let refused = nbt(&["balance", &name, "add", amount]);
        assert_eq!(refused.status(), 2, "{amount}: {}", refused.stderr());
        assert!(
            refused
                .stderr()
                .contains("is above 1000000, the largest balance a run holds"),
            "{}",
            refused.stderr()
        );
        assert_eq!(refused.stderr().lines().count(), 1, "{}", refused.stderr());
        assert_eq!(balance(), Some(1_000_000_000_000_i64.into()));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["ledger"]["balance_end_micro"],
        1_000_000_000_000_i64
    );
    assert_eq!(summary["ledger"]["topped_up_micro"], 500_000);
    guard.assert_clean();
}

#[test]
fn a_top_up_reopens_the_gate() {
    let guard = NoLeftovers::new();
    let server = accepting("127.0.0.1:0");
    let testbin = testbin();
    let child = nbt_command()
        .args([
            "run",
            "--json",
            "--balance",
            "0.02",
            "--price-call",
            "0.01",
            "--gate",
            &server,
            "--",
        ])
        .arg(&testbin)
        .args(["connect-loop", &server, "40", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let runs = live_runs();
    let run = runs
        .iter()
        .find(|r| r["command"].to_string().contains("connect-loop"))
        .expect("this test's live run");
    let name = run["run"].as_str().unwrap().to_string();
    assert_eq!(run["balance_micro"], 0, "{runs:?}");
    let top_up = nbt(&["balance", &name, "add", "0.03"]);
    assert_eq!(top_up.status(), 0, "{}", top_up.stderr());
    assert!(
        top_up.stderr().contains("balance now 0.03"),
        "{}",
        top_up.stderr()
    );
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let connects = outcomes(&stdout, "connect");
    // 2 paid calls, refusals until the top-up, then 3 more paid calls, then refusals again.
    let ok = connects.iter().filter(|c| *c == "ok").count();
    assert_eq!(ok, 5, "{connects:?}");
    let first_refusal = connects.iter().position(|c| c == "EPERM").unwrap();
    assert_eq!(first_refusal, 2, "{connects:?}");
    assert!(
        connects[first_refusal..].iter().any(|c| c == "ok"),
        "no call passed after the top-up: {connects:?}"
    );
    guard.assert_clean();
}

/// A run whose balance is negative from its first 100 ms on: nothing to start with, and time
/// costs a million an hour (nbt charges time every 100 ms); the workload waits 400 ms first.
const NEGATIVE: [&str; 4] = ["--balance", "0", "--price-hour", "1000000"];

fn run_negative(gate: &str, workload: &[&str], extra: &[&str]) -> nbt_integration_tests::Run {
    let mut limits = NEGATIVE.to_vec();
    limits.extend(["--gate", gate]);
    limits.extend(extra);
    let run = run_testbin_with_env(&limits, workload, &[("NBT_TESTBIN_DELAY_MS", "400")]);
    let end = run.summary.as_ref().unwrap()["ledger"]["balance_end_micro"]
        .as_i64()
        .unwrap();
    assert!(end < 0, "the balance never went negative: {end}");
    run
}

#[test]
fn every_way_out_is_blocked_when_the_balance_is_negative() {
    let guard = NoLeftovers::new();
    let v4 = accepting("127.0.0.1:0");
    let v6 = accepting("[::1]:0");
    let v4_port = v4.rsplit(':').next().unwrap().to_string();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap().to_string();
    let gate = format!("{v4},{v6},{udp_addr}");
    let mapped = format!("[::ffff:127.0.0.1]:{v4_port}");
    for (mode, addr, expected) in [
        ("connect", v4.as_str(), "EPERM"),
        ("connect", v6.as_str(), "EPERM"),
        ("connect", mapped.as_str(), "EPERM"),
        ("udp-sendto", udp_addr.as_str(), "EPERM"),
        ("udp-sendmsg", udp_addr.as_str(), "EPERM"),
        ("thread-connect", v4.as_str(), "EPERM"),
        ("child-connect", v4.as_str(), "EPERM"),
    ] {
        let run = run_negative(&gate, &[mode, addr], &[]);
        assert_eq!(run.status(), 0, "{mode} {addr}: {}", run.stderr());
        assert_eq!(outcomes(&run.stdout(), mode), [expected], "{mode} {addr}");
        assert!(run.u64("/ledger/blocked_calls") >= 1, "{mode} {addr}");
    }
    // An exec'd different binary: bash's /dev/tcp.
    let port = v4_port.clone();
    let run = nbt(&[
        "run",
        "--json",
        "--balance",
        "0",
        "--gate",
        &gate,
        "--",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo bash ok || echo bash refused"),
    ]);
    assert!(run.stdout().contains("bash refused"), "{}", run.stdout());
    // A raw socket goes round connect and sendmsg: cgroup egress drops its packet. Opening one
    // needs CAP_NET_RAW, which only a root workload has.
    let run = run_negative("127.0.0.1", &["raw-send", "127.0.0.1"], &["--user", "root"]);
    assert_eq!(
        outcomes(&run.stdout(), "raw-send"),
        ["EPERM"],
        "{}",
        run.stderr()
    );
    assert_eq!(run.u64("/ledger/blocked_calls"), 1);
    // Nothing sent reached the UDP server.
    udp.set_nonblocking(true).unwrap();
    assert!(udp.recv(&mut [0u8; 64]).is_err(), "a datagram got through");
    guard.assert_clean();
}

#[test]
fn other_destinations_and_other_processes_are_untouched() {
    let guard = NoLeftovers::new();
    let gated = accepting("127.0.0.1:0");
    let free = accepting("127.0.0.1:0");
    let run = run_testbin(&["--balance", "0", "--gate", &gated], &["connect", &free]);
    assert_eq!(
        outcomes(&run.stdout(), "connect"),
        ["ok"],
        "{}",
        run.stderr()
    );
    // While a run is blocked from `gated`, this process (outside it) still reaches it.
    let testbin = testbin();
    let mut blocked = nbt_command()
        .args(["run", "--balance", "0", "--gate", &gated, "--"])
        .arg(&testbin)
        .args(["connect-loop", &gated, "10", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::net::TcpStream::connect(&gated).is_ok());
    blocked.wait().unwrap();
    guard.assert_clean();
}

#[test]
fn an_open_connection_is_cut_off_when_the_balance_runs_out() {
    let guard = NoLeftovers::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap().to_string();
    // Counted while the run lives: what a closed socket still held when the run ended (and the
    // gate went with it) may be sent after, and is no part of this test.
    let received = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let until = std::time::Instant::now() + Duration::from_millis(2500);
        let mut total = 0usize;
        let mut buffer = vec![0u8; 65536];
        while std::time::Instant::now() < until {
            stream
                .set_read_timeout(Some(
                    until
                        .saturating_duration_since(std::time::Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .unwrap();
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    });
    // 1 micro-unit per byte: 0.01 pays for 10,000 bytes of IP packets. The first 2,000 bytes
    // fit; the next 200,000 do not. (Both are one call: the connection is idle 1.5 s between
    // them, past the default call gap, but calls are free here.)
    let run = run_testbin(
        &[
            "--balance",
            "0.01",
            "--price-egress",
            "1000/GB",
            "--gate",
            &server,
        ],
        &["keepalive", &server, "2000", "200000", "1500"],
    );
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let received = received.join().unwrap();
    assert!(
        received >= 2000,
        "the paid part did not arrive: {received} bytes"
    );
    // A packet passes only when the balance pays for it, so what arrived was paid for. Only
    // payments racing on other CPUs could overdraw, by a packet each (on loopback a GSO packet
    // holds up to 64 KiB); this connection sends one packet at a time.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        received <= 10_000 + (cpus - 1) * 66_000,
        "{received} bytes got through a balance that paid for 10,000"
    );
    assert!(run.u64("/ledger/blocked_packets") >= 1);
    assert_eq!(run.u64("/ledger/connections_torn_down"), 1);
    let end = run.summary.as_ref().unwrap()["ledger"]["balance_end_micro"]
        .as_i64()
        .unwrap();
    eprintln!("balance at the end: {end} micro-units; {received} bytes arrived");
    assert!(
        end >= -((cpus as i64 - 1) * 66_000),
        "balance {end} micro-units"
    );
    guard.assert_clean();
}

/// More networks than the gate's tries hold (1024 each): the run is refused with the reason,
/// rather than started with some of them ungated.
#[test]
fn more_networks_than_the_gate_holds_refuse_the_run() {
    let guard = NoLeftovers::new();
    let fits: Vec<String> = (0..1024)
        .map(|i| format!("10.{}.{}.1", i / 256, i % 256))
        .collect();
    let run = nbt(&[
        "run",
        "--balance",
        "1",
        "--gate",
        &fits.join(","),
        "--",
        "true",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let too_many: Vec<String> = (0..1025)
        .map(|i| format!("10.{}.{}.1", i / 256, i % 256))
        .collect();
    let run = nbt(&[
        "run",
        "--balance",
        "1",
        "--gate",
        &too_many.join(","),
        "--",
        "true",
    ]);
    assert_ne!(run.status(), 0, "{}", run.stderr());
    assert!(
        run.stderr().contains("1025 more IPv4 networks to gate")
            && run.stderr().contains("more than the gate holds (1024)"),
        "{}",
        run.stderr()
    );
    guard.assert_clean();
}
