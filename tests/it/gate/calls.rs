//! What a call is, counted at the server: requests over one keep-alive connection (Python's
//! http.client, curl), pipelined requests, payload after an idle gap, and datagrams of every
//! socket kind. The balance pays for exactly k calls; the (k+1)th fails at once, visibly to the
//! client, and nothing of it reaches the server.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbt_integration_tests::{nbt, run_testbin, NoLeftovers, Run};

/// Debian's python3 (`cargo xtask setup` installs it): a workload runs as `nobody`, who may not
/// reach a python3 earlier in root's PATH.
const PYTHON: &str = "/usr/bin/python3";

fn script(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    path.to_string_lossy().into_owned()
}

/// Python's own HTTP/1.1 server (keep-alive), outside the run, counting what it served.
struct HttpServer {
    child: Child,
    port: u16,
    served: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    fn start(address: &str) -> HttpServer {
        let mut child = Command::new(PYTHON)
            .arg(script("http_server.py"))
            .arg(address)
            .stdout(Stdio::piped())
            // Its tracebacks for the connections the gate tore down.
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (cargo xtask setup installs it)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the server said {first:?}"));
        let served = Arc::new(Mutex::new(Vec::new()));
        let sink = served.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        HttpServer {
            child,
            port,
            served,
        }
    }

    /// Requests served so far; waits a moment for the last lines to be read.
    fn served(&self) -> usize {
        std::thread::sleep(Duration::from_millis(200));
        self.served.lock().unwrap().len()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gate_of(host: &str, port: u16) -> String {
    match host {
        "::1" => format!("[::1]:{port}"),
        // A v4-mapped address is the IPv4 address it carries.
        "::ffff:127.0.0.1" => format!("127.0.0.1:{port}"),
        _ => format!("{host}:{port}"),
    }
}

fn client_run(balance: &str, gate: &str, user: &str, client: &[&str]) -> Run {
    let script = script("gate_client.py");
    let mut args = vec![
        "run",
        "--json",
        "--user",
        user,
        "--balance",
        balance,
        "--price-call",
        "0.001",
        "--gate",
        gate,
        "--",
        PYTHON,
        &script,
    ];
    args.extend_from_slice(client);
    nbt(&args)
}

/// Python's HTTP server on `listen`, and a run of the client `mode` against it at `host`, for
/// `count` requests, with `balance` at 0.001 a call; the run has ended with status 0.
fn http_run(
    listen: &str,
    host: &str,
    balance: &str,
    mode: &str,
    count: &str,
) -> (HttpServer, String, Run) {
    let server = HttpServer::start(listen);
    let port = server.port.to_string();
    let gate = gate_of(host, server.port);
    let run = client_run(balance, &gate, "nobody", &[mode, host, &port, count]);
    assert_eq!(run.status(), 0, "{mode} {host}: {}", run.stderr());
    (server, gate, run)
}

fn lines_of(run: &Run, mode: &str) -> Vec<String> {
    run.stdout()
        .lines()
        .filter(|l| l.starts_with(mode))
        .map(str::to_string)
        .collect()
}

fn destination<'a>(run: &'a Run, dest: &str) -> &'a serde_json::Value {
    &run.summary.as_ref().unwrap()["ledger"]["destinations"][dest]
}

#[test]
fn requests_over_one_keep_alive_connection_are_one_call_each() {
    let guard = NoLeftovers::new();
    let (server, gate, run) = http_run("127.0.0.1", "127.0.0.1", "1", "http", "10");
    assert_eq!(lines_of(&run, "http").len(), 10, "{}", run.stdout());
    assert!(lines_of(&run, "http").iter().all(|l| l.ends_with(" ok")));
    assert_eq!(server.served(), 10);
    // One connection: its connect() paid the first request, the other nine are charged as
    // requests on an open connection.
    assert_eq!(run.u64("/ledger/calls"), 10);
    assert_eq!(run.u64("/ledger/requests"), 9);
    assert_eq!(run.u64("/ledger/charged_calls_micro"), 10_000);
    assert_eq!(destination(&run, &gate)["charged"], 10);

    // curl fetching four URLs reuses its one connection.
    let urls: Vec<String> = (0..4).map(|i| format!("http://{gate}/curl{i}")).collect();
    let mut args = vec![
        "run",
        "--json",
        "--balance",
        "1",
        "--price-call",
        "0.001",
        "--gate",
        &gate,
        "--",
        "curl",
        "-sS",
    ];
    args.extend(urls.iter().map(String::as_str));
    let run = nbt(&args);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(server.served(), 14);
    assert_eq!(run.u64("/ledger/calls"), 4);
    assert_eq!(run.u64("/ledger/requests"), 3);
    guard.assert_clean();
}

/// The balance pays for five calls exactly; the sixth request on the open connection is
/// dropped and its connection torn down (ECONNABORTED), and a new connection gets EPERM. Over
/// IPv4, IPv6 and v4-mapped IPv6.
#[test]
fn at_zero_the_next_request_aborts_its_connection_and_a_new_one_gets_eperm() {
    let guard = NoLeftovers::new();
    for (host, listen) in [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
    ] {
        let (server, gate, run) = http_run(listen, host, "0.005", "http", "8");
        let lines = lines_of(&run, "http");
        assert_eq!(lines.len(), 6, "{host}: {lines:?}");
        assert!(lines[..5].iter().all(|l| l.ends_with(" ok")), "{lines:?}");
        // An abort from sock_diag's destroy, not a timeout: the client's timeout is 10 s.
        assert!(
            lines[5].starts_with("http 5 ECONNABORTED"),
            "{host}: {lines:?}"
        );
        eprintln!("{host}: the refused request failed with {}", lines[5]);
        let connect = lines_of(&run, "connect");
        assert_eq!(connect.len(), 1, "{host}: {}", run.stdout());
        assert!(connect[0].starts_with("connect EPERM"), "{connect:?}");
        // Counted at the server: the five paid requests, nothing of the sixth.
        assert_eq!(server.served(), 5, "{host}");
        assert_eq!(run.u64("/ledger/calls"), 5, "{host}");
        assert_eq!(run.u64("/ledger/blocked_calls"), 2, "{host}");
        assert_eq!(run.u64("/ledger/refused_requests"), 1, "{host}");
        assert_eq!(run.u64("/ledger/connections_torn_down"), 1, "{host}");
        assert_eq!(run.u64("/ledger/balance_end_micro"), 0, "{host}");
        let counts = destination(&run, &gate);
        assert_eq!(counts["charged"], 5, "{host}: {counts}");
        assert_eq!(counts["refused"], 2, "{host}: {counts}");
        assert_eq!(counts["torn_down"], 1, "{host}: {counts}");
        assert!(
            run.stderr().contains(&format!(
                "refused request (its connection is torn down) to {gate}"
            )),
            "{}",
            run.stderr()
        );
        // The run's receipt holds the same counts, signed.
        let export = nbt(&["receipts", "export", "--format", "jsonl"]);
        let last_run: serde_json::Value = export
            .stdout()
            .lines()
            .rfind(|l| l.contains(r#""kind":"run""#))
            .map(|l| serde_json::from_str(l).unwrap())
            .expect("a run receipt");
        assert_eq!(
            &last_run["receipt"]["summary"]["ledger"]["destinations"][&gate], counts,
            "{host}"
        );
    }
    guard.assert_clean();
}

/// A call priced above what is left is refused at once: 0.0025 pays two calls of 0.001. The
/// third request aborts its connection, a new connection gets EPERM (its SYN never leaves), and
/// the balance keeps its 0.0005.
#[test]
fn a_call_priced_above_the_balance_left_is_refused_at_once() {
    let guard = NoLeftovers::new();
    let (server, _, run) = http_run("127.0.0.1", "127.0.0.1", "0.0025", "http", "3");
    let lines = lines_of(&run, "http");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].starts_with("http 2 ECONNABORTED"), "{lines:?}");
    let connect = lines_of(&run, "connect");
    assert!(connect[0].starts_with("connect EPERM"), "{connect:?}");
    assert_eq!(server.served(), 2);
    assert_eq!(run.u64("/ledger/calls"), 2);
    assert_eq!(run.u64("/ledger/blocked_calls"), 2);
    assert_eq!(run.u64("/ledger/balance_end_micro"), 500);
    guard.assert_clean();
}

/// Requests written back to back before any reply are one call: the approximation
/// docs/running.md states for pipelined HTTP/1.1.
#[test]
fn pipelined_requests_sent_before_any_reply_are_one_call() {
    let guard = NoLeftovers::new();
    let (server, _, run) = http_run("127.0.0.1", "127.0.0.1", "1", "pipelined", "3");
    assert_eq!(lines_of(&run, "pipelined").len(), 3, "{}", run.stdout());
    assert_eq!(server.served(), 3);
    assert_eq!(run.u64("/ledger/calls"), 1);
    guard.assert_clean();
}

/// Payload sent after the connection was idle for the call gap is a new call, even with no
/// reply in between: 2,000 bytes, 1.5 s of silence, 2,000 bytes.
#[test]
fn payload_after_an_idle_gap_is_a_new_call() {
    let guard = NoLeftovers::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
            });
        }
    });
    for (gap, calls) in [("1s", 2), ("5s", 1)] {
        let run = run_testbin(
            &[
                "--balance",
                "1",
                "--price-call",
                "0.001",
                "--call-gap",
                gap,
                "--gate",
                &server,
            ],
            &["keepalive", &server, "2000", "2000", "1500"],
        );
        assert_eq!(run.status(), 0, "{}", run.stderr());
        assert_eq!(run.u64("/ledger/calls"), calls, "--call-gap {gap}");
        assert_eq!(run.summary.as_ref().unwrap()["ledger"]["call_gap_ms"], {
            let ms: f64 = if gap == "1s" { 1000.0 } else { 5000.0 };
            ms
        });
    }
    guard.assert_clean();
}

/// Datagrams of every socket kind: connected and unconnected UDP, raw sockets with the kernel's
/// IP header and with their own (IP_HDRINCL, which needs a root workload), over IPv4, IPv6 and
/// v4-mapped IPv6. Each datagram is a call: three are paid, the fourth and fifth fail with
/// EPERM, and the server receives exactly three.
#[test]
fn no_datagram_of_any_socket_kind_passes_once_the_balance_cannot_pay() {
    let guard = NoLeftovers::new();
    let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let v6 = UdpSocket::bind("[::1]:0").unwrap();
    for socket in [&v4, &v6] {
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
    }
    let cases = [
        ("udp-connected", "127.0.0.1", "nobody"),
        ("udp-sendto", "127.0.0.1", "nobody"),
        ("raw-udp", "127.0.0.1", "root"),
        ("raw-hdrincl", "127.0.0.1", "root"),
        ("udp-connected", "::1", "nobody"),
        ("udp-sendto", "::1", "nobody"),
        ("raw-udp", "::1", "root"),
        ("raw-hdrincl", "::1", "root"),
        ("udp-connected", "::ffff:127.0.0.1", "nobody"),
        ("udp-sendto", "::ffff:127.0.0.1", "nobody"),
    ];
    for (mode, host, user) in cases {
        let server = if host == "::1" { &v6 } else { &v4 };
        let port = server.local_addr().unwrap().port();
        let gate = gate_of(host, port);
        let run = client_run("0.003", &gate, user, &[mode, host, &port.to_string(), "5"]);
        assert_eq!(run.status(), 0, "{mode} {host}: {}", run.stderr());
        let outcomes: Vec<String> = lines_of(&run, mode)
            .iter()
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
            .collect();
        assert_eq!(
            outcomes,
            ["ok", "ok", "ok", "EPERM", "EPERM"],
            "{mode} {host}: {}",
            run.stdout()
        );
        let mut received = 0;
        while server.recv(&mut [0u8; 2048]).is_ok() {
            received += 1;
        }
        assert_eq!(received, 3, "{mode} {host}: counted at the server");
        assert_eq!(run.u64("/ledger/calls"), 3, "{mode} {host}");
        assert_eq!(run.u64("/ledger/blocked_calls"), 2, "{mode} {host}");
        assert_eq!(run.u64("/ledger/balance_end_micro"), 0, "{mode} {host}");
    }
    guard.assert_clean();
}
