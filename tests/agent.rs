//! `nbt agent`: the joule bucket, learning updates of live runs, /metrics, over real HTTP on
//! loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbt_integration_tests::{nbt, nbt_bin, NoLeftovers};
use serde_json::Value;

/// The agent as a child process, killed on drop.
struct Agent {
    child: Child,
    addr: String,
    token: String,
}

impl Agent {
    fn start(guard: &NoLeftovers) -> Agent {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(nbt_bin())
            .args(["agent", "--listen", &addr])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let token_file = guard.home().join("agent.token");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&token_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(token_file)
            .unwrap()
            .trim()
            .to_string();
        Agent { child, addr, token }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn take_is_atomic_under_64_clients_and_refuses_what_it_must() {
    let guard = NoLeftovers::new();
    let agent = Agent::start(&guard);
    let (status, body) = http(&agent.addr, "GET", "/v1/sample", None, "");
    assert_eq!(status, 200, "{body}");
    let sample = json(&body);
    assert!(
        ["model", "rapl"].contains(&sample["source"].as_str().unwrap()),
        "{sample}"
    );

    // 401: no token, a wrong token. 400: not JSON, unknown field, a negative amount.
    let take = |token: Option<&str>, body: &str| http(&agent.addr, "POST", "/v1/take", token, body);
    assert_eq!(take(None, r#"{"joules": 1}"#).0, 401);
    assert_eq!(take(Some("not-it"), r#"{"joules": 1}"#).0, 401);
    let (status, body) = take(Some(&agent.token), "joules=1");
    assert_eq!(status, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (status, body) = take(Some(&agent.token), r#"{"jouls": 1}"#);
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `jouls`"), "{body}");
    let (status, body) = take(Some(&agent.token), r#"{"joules": -2}"#);
    assert_eq!(status, 400);
    assert!(body.contains("positive"), "{body}");
    // 409: more than the bucket holds, with the balance.
    let (status, body) = take(Some(&agent.token), r#"{"joules": 1e12}"#);
    assert_eq!(status, 409, "{body}");
    assert!(json(&body)["bucket_j"].as_f64().unwrap() >= 0.0);

    // 64 clients, 100,000 withdrawals of 5 mJ (500 J in all, more than the bucket gets meanwhile,
    // so many are refused): what is granted is exactly what the agent counts as taken, never
    // more than it took in, and the bucket never goes below zero.
    let granted_uj = Arc::new(AtomicU64::new(0));
    let granted_n = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let (addr, token) = (agent.addr.clone(), agent.token.clone());
            let (granted_uj, granted_n) = (granted_uj.clone(), granted_n.clone());
            std::thread::spawn(move || {
                let requests = 100_000 / 64 + usize::from(i < 100_000 % 64);
                for _ in 0..requests {
                    let (status, body) = http(
                        &addr,
                        "POST",
                        "/v1/take",
                        Some(&token),
                        r#"{"joules": 0.005}"#,
                    );
                    let left = json(&body)["bucket_j"].as_f64().unwrap();
                    assert!(left >= 0.0, "a negative bucket: {body}");
                    match status {
                        200 => {
                            granted_uj.fetch_add(5000, Ordering::Relaxed);
                            granted_n.fetch_add(1, Ordering::Relaxed);
                        }
                        409 => {}
                        other => panic!("{other}: {body}"),
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let sample = json(&http(&agent.addr, "GET", "/v1/sample", None, "").1);
    let taken = sample["taken_j"].as_f64().unwrap();
    let deposited = sample["deposited_j"].as_f64().unwrap();
    let granted = granted_uj.load(Ordering::Relaxed) as f64 / 1e6;
    eprintln!(
        "{} of 100000 granted: {granted} J; agent: taken {taken} J of {deposited} J deposited",
        granted_n.load(Ordering::Relaxed)
    );
    assert!(
        (taken - granted).abs() < 1e-6,
        "taken {taken} J, granted {granted} J"
    );
    assert!(
        taken <= deposited + 1e-9,
        "taken {taken} J of {deposited} J"
    );
    let n = granted_n.load(Ordering::Relaxed);
    assert!(
        n > 0 && n < 100_000,
        "{n} of 100000 granted: the test must see both outcomes"
    );

    // SIGTERM stops it, as it stops any server.
    let mut agent = agent;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let mut ended = None;
    for _ in 0..40 {
        ended = agent.child.try_wait().unwrap();
        if ended.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ended.is_some(), "nbt agent still runs 2 s after SIGTERM");
}

#[test]
fn a_report_through_the_agent_becomes_a_receipt_of_the_live_run() {
    let guard = NoLeftovers::new();
    let agent = Agent::start(&guard);
    let run = std::thread::spawn(|| nbt(&["run", "--json", "--", "sleep", "3"]));
    let mut name = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let runs: Value =
            serde_json::from_str(&nbt(&["ps", "--json"]).stdout()).unwrap_or(Value::Null);
        name = runs.as_array().and_then(|runs| {
            runs.iter()
                .find(|r| {
                    r["command"].to_string().contains("\"sleep\",\"3\"")
                        && r["seconds"].as_f64() > Some(0.0)
                })
                .and_then(|r| r["run"].as_str().map(String::from))
        });
        if name.is_some() {
            break;
        }
    }
    let name = name.expect("the run in nbt ps");
    let post = |body: String| http(&agent.addr, "POST", "/v1/report", Some(&agent.token), &body);
    let (status, body) = post(format!(
        r#"{{"run":"{name}","task_name":"via-agent","base_loss":0.9,"new_loss":0.7}}"#
    ));
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        post(r#"{"run":"nbt-0000000000000000","task_name":"x","base_loss":1,"new_loss":1}"#.into());
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(format!(
        r#"{{"run":"{name}","task_name":"x","base_loss":1}}"#
    ));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("new_loss"), "{body}");
    assert_eq!(http(&agent.addr, "POST", "/v1/report", None, "{}").0, 401);

    let run = run.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let tasks = run.summary.as_ref().unwrap()["tasks"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["task_name"], "via-agent");
    assert_eq!(tasks[0]["accepted"], true);

    // /metrics, in Prometheus' text format.
    let (status, text) = http(&agent.addr, "GET", "/metrics", None, "");
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE nbt_node_cpu_joules counter"),
        "{text}"
    );
    assert!(text.contains("nbt_node_cpu_joules_total{source="), "{text}");
    assert!(text.contains("nbt_agent_bucket_joules "), "{text}");
    guard.assert_clean();
}
