//! Swarms (`nbt swarm FILE.toml`): nodes in namespaces of nbt's own, joined by a bridge in a hub
//! namespace, each a real `nbt run`. What the nodes see is measured by the nodes themselves
//! (connections made, datagrams counted, bytes received per second), and nothing the swarm made
//! may be left: namespaces, cgroups, pinned programs, its record.

use std::path::Path;
use std::time::{Duration, Instant};

use nbt_integration_tests::{nbt, nbt_command, testbin, NoLeftovers, Run};
use serde_json::Value;

/// A full TCP segment on a veth: 1448 bytes of payload in 1500 bytes of IP packet.
const PAYLOAD_PER_WIRE: f64 = 1448.0 / 1500.0;

/// Writes `text` as `NAME.toml` in a new directory; the directory (kept while the test runs).
fn swarm_file(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

/// The namespaces of swarms, and the swarms' records: none may be left after a swarm.
fn assert_no_swarm_left(guard: &NoLeftovers) {
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nbt-swarm-t") || n.starts_with("nbt-swarm-demo"))
        .collect();
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    let records: Vec<String> = std::fs::read_dir(nbt::state::state_dir().join("swarms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("t") || n.starts_with("demo"))
        .collect();
    assert!(records.is_empty(), "swarm records left: {records:?}");
    guard.assert_clean();
}

/// The lines node `node` wrote (relayed to nbt's stderr as `[node] ...`).
fn node_lines(run: &Run, node: &str) -> Vec<String> {
    let prefix = format!("[{node}] ");
    run.stderr()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(String::from))
        .collect()
}

fn events<'a>(summary: &'a Value, action: &str) -> Vec<&'a Value> {
    summary["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .collect()
}

#[test]
fn every_node_reaches_its_peers_by_the_addresses_in_its_environment() {
    let guard = NoLeftovers::new();
    let t = testbin();
    let t = t.to_str().unwrap();
    // Each node listens on its own address and connects to each peer, named by NBT_SWARM_PEERS.
    let node = |name: &str| {
        format!(
            "[[node]]\nname = \"{name}\"\nmemory = \"64M\"\ncommand = [\"sh\", \"-c\", \
             \"{t} listen $NBT_SWARM_ADDR:5400 3 & sleep 1; for p in $(echo $NBT_SWARM_PEERS | tr , ' '); \
             do echo peer $p; {t} connect ${{p#*=}}:5400; done; wait\"]\n"
        )
    };
    let (_dir, path) = swarm_file(
        "tmesh",
        &format!(
            "subnet = \"10.231.0.0/24\"\n{}{}{}",
            node("a"),
            node("b"),
            node("c")
        ),
    );
    let run = nbt(&["swarm", &path, "--json"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    for (name, peers) in [
        ("a", ["b=10.231.0.2", "c=10.231.0.3"]),
        ("b", ["a=10.231.0.1", "c=10.231.0.3"]),
        ("c", ["a=10.231.0.1", "b=10.231.0.2"]),
    ] {
        let lines = node_lines(&run, name);
        for peer in peers {
            assert!(lines.contains(&format!("peer {peer}")), "{name}: {lines:?}");
        }
        let ok = lines.iter().filter(|l| *l == "connect ok").count();
        assert_eq!(ok, 2, "{name} reached both peers: {lines:?}");
    }
    let summary = run.summary.as_ref().expect("the JSON summary");
    assert_eq!(summary["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(summary["links"].as_array().unwrap().len(), 6);
    for node in summary["nodes"].as_array().unwrap() {
        assert_eq!(node["status"], "exited", "{node}");
        assert_eq!(node["exit_status"], 0, "{node}");
        assert!(
            node["runs"][0]["receipt"]["receipt_hash"].is_string(),
            "{node}"
        );
        assert!(
            node["runs"][0]["memory_peak_bytes"].as_u64() > Some(0),
            "{node}"
        );
    }
    // The swarm's receipt follows the nodes' in the same store, and the chain verifies.
    assert!(summary["receipt"]["seq"].as_u64() == Some(4), "{summary}");
    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 0, "{}", verify.stderr());
    let said = format!("{}{}", verify.stdout(), verify.stderr());
    assert!(said.contains("verified: 4 receipts"), "{said}");
    assert_no_swarm_left(&guard);
}

#[test]
fn each_link_holds_its_own_rate_at_the_receiver() {
    let guard = NoLeftovers::new();
    let t = testbin();
    let t = t.to_str().unwrap();
    let sink = |name: &str| {
        format!(
            "[[node]]\nname = \"{name}\"\ncommand = [\"{t}\", \"tcp-sink\", \"0.0.0.0:5300\", \
             \"1\", \"6\"]\n"
        )
    };
    let text = format!(
        "subnet = \"10.232.0.0/24\"\n\
         [[node]]\nname = \"a\"\ncommand = [\"sh\", \"-c\", \"sleep 0.5; \
         {t} tcp-stream 10.232.0.2:5300 7 & {t} tcp-stream 10.232.0.3:5300 7; wait\"]\n\
         {}{}\
         [[link]]\nfrom = \"a\"\nto = \"b\"\nrate = \"4mbit\"\n\
         [[link]]\nfrom = \"a\"\nto = \"c\"\nrate = \"12mbit\"\n",
        sink("b"),
        sink("c")
    );
    let (_dir, path) = swarm_file("trate", &text);
    let run = nbt(&["swarm", &path, "--json"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    for (name, limit) in [("b", 4e6), ("c", 12e6)] {
        let lines = node_lines(&run, name);
        let line = lines
            .iter()
            .find(|l| l.starts_with("received "))
            .unwrap_or_else(|| panic!("{name}: {lines:?}"));
        let rate: f64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        let ratio = rate / PAYLOAD_PER_WIRE / limit;
        eprintln!("a -> {name}: {rate:.0} bit/s of payload, {ratio:.4} of {limit}");
        assert!(
            (0.92..=1.08).contains(&ratio),
            "a -> {name}: {rate:.0} bit/s, {ratio:.4} of the link's {limit}"
        );
    }
    let summary = run.summary.as_ref().unwrap();
    let link = |from: &str, to: &str| {
        summary["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["from"] == from && l["to"] == to)
            .unwrap()
            .clone()
    };
    assert!(link("a", "b")["limits"]
        .as_str()
        .unwrap()
        .contains("egress 4mbit"));
    let (ab, ac) = (
        link("a", "b")["passed_bytes"].as_f64().unwrap(),
        link("a", "c")["passed_bytes"].as_f64().unwrap(),
    );
    assert!((2.5..=3.5).contains(&(ac / ab)), "a->b {ab} B, a->c {ac} B");
    assert_no_swarm_left(&guard);
}

#[test]
fn a_timeline_kills_partitions_and_degrades_and_the_traffic_shows_it() {
    let guard = NoLeftovers::new();
    let t = testbin();
    let t = t.to_str().unwrap();
    // a sends 50 datagrams a second for 6 s to b and to c, which count them. c is cut off from
    // 1 s to 3 s; the link from a to b loses everything from 4 s; k is killed at 1 s and
    // restarted 1 s later. c counts until 4 quiet seconds: 2 (the partition's length) ended its
    // count at the heal about one run in two.
    let text = format!(
        r#"subnet = "10.233.0.0/24"
[[node]]
name = "a"
command = ["sh", "-c", "sleep 0.3; {t} udp-paced 10.233.0.2:5500 300 50 & {t} udp-paced 10.233.0.3:5500 300 50; wait"]
[[node]]
name = "b"
command = ["{t}", "udp-count", "0.0.0.0:5500", "2"]
[[node]]
name = "c"
command = ["{t}", "udp-count", "0.0.0.0:5500", "4"]
[[node]]
name = "k"
command = ["sleep", "3"]
[[event]]
at = "1.3s"
action = "partition"
nodes = ["c"]
[[event]]
at = "3.3s"
action = "heal"
[[event]]
at = "4.3s"
action = "degrade"
from = "a"
to = "b"
loss = "100%"
oneway = true
[[event]]
at = "1s"
action = "kill"
node = "k"
restart-after = "1s"
[[node]]
name = "f"
balance = "5"
command = ["sh", "-c", "for i in $(seq 25); do date +%s.%N; sleep 0.1; done"]
[[event]]
at = "0.8s"
action = "freeze"
node = "f"
[[event]]
at = "2s"
action = "thaw"
node = "f"
[[event]]
at = "2.2s"
action = "spend"
node = "f"
amount = "2"
"#
    );
    let (_dir, path) = swarm_file("ttime", &text);
    let run = nbt(&["swarm", &path, "--json"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary = run.summary.as_ref().unwrap();
    let received = |node: &str| -> f64 {
        let lines = node_lines(&run, node);
        let line = lines
            .iter()
            .find(|l| l.starts_with("received "))
            .unwrap_or_else(|| panic!("{node}: {lines:?}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // 2 s of 6 cut off: about 200 of 300 reach c; 4 s of 6 reach b.
    let (b, c) = (received("b"), received("c"));
    eprintln!("received: b {b} of 300, c {c} of 300");
    assert!((170.0..=230.0).contains(&c), "c received {c} of 300");
    assert!((170.0..=230.0).contains(&b), "b received {b} of 300");
    // The degraded link's loss is counted by a's shaper; the partition's by nobody (the
    // packets die at the hub's bridge).
    let ab = summary["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["from"] == "a" && l["to"] == "b")
        .unwrap();
    let lost = ab["loss_dropped_packets"].as_u64().unwrap();
    assert!((70..=130).contains(&lost), "a -> b lost {lost}: {ab}");
    // Every event is in the summary, in time order, none failed.
    for action in [
        "partition",
        "heal",
        "degrade",
        "kill",
        "restart",
        "freeze",
        "thaw",
        "spend",
    ] {
        let found = events(summary, action);
        assert_eq!(found.len(), 1, "{action}: {}", summary["events"]);
        assert!(found[0]["error"].is_null(), "{}", found[0]);
    }
    let times: Vec<f64> = summary["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["t"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // k: killed (SIGKILL, status 137), then its second run ended by itself.
    let k = &summary["nodes"][3];
    assert_eq!(k["runs"].as_array().unwrap().len(), 2, "{k}");
    assert_eq!(k["runs"][0]["exit_status"], 137, "{k}");
    assert_eq!(k["runs"][0]["ended_by"], "kill", "{k}");
    assert_eq!(k["runs"][1]["exit_status"], 0, "{k}");
    assert_eq!(k["status"], "exited", "{k}");
    // f: frozen from 0.8 s to 2 s, so one gap of about 1.2 s between the times it wrote; then
    // 2 spent of its 5. Its own run logged the freezer's fault and the shock.
    let stamps: Vec<f64> = node_lines(&run, "f")
        .iter()
        .filter_map(|l| l.parse().ok())
        .collect();
    let gap = stamps.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    eprintln!("f: longest gap {gap:.2} s between {} stamps", stamps.len());
    assert!(
        (0.9..=1.7).contains(&gap),
        "f's longest gap {gap:.2} s: {stamps:?}"
    );
    let f = &summary["nodes"][4];
    assert_eq!(f["runs"][0]["balance_end_micro"], 3_000_000, "{f}");
    assert!(f["runs"][0]["events"].as_u64() >= Some(3), "{f}");
    assert_no_swarm_left(&guard);
}

/// An `nbt swarm` started by a test: SIGTERM to it when the test ends, also when it fails, so
/// that a failed test leaves no swarm running.
struct Stopped(Option<std::process::Child>);

impl Stopped {
    /// SIGTERM, then everything it wrote.
    fn stop(mut self) -> std::process::Output {
        let child = self.0.take().unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

#[test]
fn sigterm_stops_every_node_and_removes_the_swarm() {
    let guard = NoLeftovers::new();
    let (_dir, path) = swarm_file(
        "tstop",
        "subnet = \"10.234.0.0/24\"\n\
         [[node]]\nname = \"a\"\ncommand = [\"sleep\", \"60\"]\n\
         [[node]]\nname = \"b\"\ncommand = [\"sleep\", \"60\"]\nbalance = \"5\"\n",
    );
    let child = Stopped(Some(
        nbt_command()
            .args(["swarm", &path, "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // Live: `nbt swarm ps` lists it with its nodes' runs; `nbt swarm set` changes a link by
    // the peer's name.
    let begin = Instant::now();
    let mut listed = Value::Null;
    while begin.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        let ps = nbt(&["swarm", "ps", "--json"]);
        let swarms: Value = serde_json::from_str(&ps.stdout()).unwrap_or(Value::Null);
        if let Some(s) = swarms
            .as_array()
            .and_then(|a| a.iter().find(|s| s["swarm"] == "tstop"))
        {
            // Every node's run live, and b's ledger loaded.
            if s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["run"].is_string())
                && s["nodes"][1]["balance_micro"].is_i64()
            {
                listed = s.clone();
                break;
            }
        }
    }
    assert_eq!(listed["nodes"][1]["addr"], "10.234.0.2", "{listed}");
    assert_eq!(listed["nodes"][1]["balance_micro"], 5_000_000, "{listed}");
    let set = nbt(&[
        "swarm",
        "set",
        "tstop",
        "a",
        "--link",
        "to=b,egress-rate=1mbit",
    ]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    assert!(
        set.stderr().contains("link to 10.234.0.2: egress 1mbit"),
        "{}",
        set.stderr()
    );
    let bad = nbt(&["swarm", "set", "tstop", "zz", "--cpus", "1"]);
    assert_eq!(bad.status(), 2, "{}", bad.stderr());
    assert!(bad.stderr().contains("'zz' for NODE"), "{}", bad.stderr());
    let output = child.stop();
    let run = Run::from_output(output);
    assert_eq!(run.status(), 130, "{}", run.stderr());
    let summary = run.summary.as_ref().expect("a summary after SIGTERM");
    assert_eq!(summary["stopped_by"], "SIGTERM");
    for node in summary["nodes"].as_array().unwrap() {
        assert_eq!(node["status"], "stopped", "{node}");
        assert!(node["runs"][0]["receipt"].is_object(), "{node}");
    }
    assert_no_swarm_left(&guard);
    assert!(!Path::new("/run/netns/nbt-swarm-tstop-hub").exists());
}

#[test]
fn a_killed_swarm_stops_its_nodes_and_cleanup_removes_its_namespaces() {
    let guard = NoLeftovers::new();
    let (_dir, path) = swarm_file(
        "tdead",
        "subnet = \"10.235.0.0/24\"\n\
         [[node]]\nname = \"a\"\ncommand = [\"sleep\", \"60\"]\n",
    );
    let mut child = Stopped(Some(
        nbt_command()
            .args(["swarm", &path])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let hub = Path::new("/run/netns/nbt-swarm-tdead-hub");
    let begin = Instant::now();
    while nbt_integration_tests::live_runs()
        .iter()
        .all(|r| r["name"] != "tdead.a")
    {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the node never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut killed = child.0.take().unwrap();
    killed.kill().unwrap();
    killed.wait().unwrap();
    // The node's nbt got SIGTERM when its parent died (PR_SET_PDEATHSIG): it ends its run.
    let begin = Instant::now();
    while nbt_integration_tests::live_runs()
        .iter()
        .any(|r| r["name"] == "tdead.a")
    {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the node outlived its swarm"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        hub.exists(),
        "a SIGKILLed swarm cannot remove its own namespaces"
    );
    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(
        cleanup
            .stderr()
            .contains("removed network namespace nbt-swarm-tdead-hub"),
        "{}",
        cleanup.stderr()
    );
    assert_no_swarm_left(&guard);
}

#[test]
fn bad_files_are_refused_naming_the_field() {
    let (_dir, path) = swarm_file(
        "tbad",
        "[[node]]\nname = \"a\"\ncommand = [\"true\"]\nmemroy = \"1G\"\n",
    );
    let run = nbt(&["swarm", &path]);
    assert_eq!(run.status(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("unknown field `memroy`"),
        "{}",
        run.stderr()
    );
    let (_dir, path) = swarm_file(
        "tbad",
        "[[node]]\nname = \"a\"\ncommand = [\"true\"]\ncpus = \"lots\"\n",
    );
    let run = nbt(&["swarm", &path]);
    assert_eq!(run.status(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("node 'a'") && run.stderr().contains("--cpus"),
        "{}",
        run.stderr()
    );
    // A link's delay where the kernel has no fq (this host): refused before any node starts,
    // as `nbt run` refuses it, naming the node.
    if nbt::plan::probe::fq_missing().is_some() {
        let (_dir, path) = swarm_file(
            "tbad",
            "[[node]]\nname = \"a\"\ncommand = [\"true\"]\n[[node]]\nname = \"b\"\n\
             command = [\"true\"]\n[[link]]\nfrom = \"a\"\nto = \"b\"\nlatency = \"20ms\"\n",
        );
        let run = nbt(&["swarm", &path]);
        assert_eq!(run.status(), 2, "{}", run.stderr());
        assert!(
            run.stderr().contains("node 'a'") && run.stderr().contains("needs the fq qdisc"),
            "{}",
            run.stderr()
        );
        assert!(
            !run.stderr().contains("[a]"),
            "a node ran: {}",
            run.stderr()
        );
    }
}

#[test]
fn the_demo_swarm_converges_losing_a_worker_and_a_link() {
    let guard = NoLeftovers::new();
    let run = nbt(&["demo", "--swarm", "--json"]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let report = run.summary.as_ref().expect("the demo's JSON report");
    let (without, with) = (
        report["without_failures"]["time_to_target_s"].as_f64(),
        report["with_failures"]["time_to_target_s"].as_f64(),
    );
    eprintln!(
        "time to a holdout loss of {}: {without:?} s as they are, {with:?} s with the failures, \
         ratio {}",
        report["target_loss"], report["ratio"]
    );
    let (Some(without), Some(with)) = (without, with) else {
        panic!("the model did not converge: {}", run.stderr());
    };
    assert!(
        with > without,
        "{with} s with the failures, {without} s without"
    );
    // Every failure shows in the swarm's events, applied without error.
    let swarm = &report["with_failures"]["swarm"];
    let kill = events(swarm, "kill");
    assert_eq!(kill.len(), 1, "{}", swarm["events"]);
    assert_eq!(kill[0]["node"], "w3");
    assert!(kill[0]["error"].is_null(), "{}", kill[0]);
    let degrade = events(swarm, "degrade");
    assert_eq!(degrade.len(), 2, "both ways: {}", swarm["events"]);
    assert!(degrade.iter().all(|e| e["error"].is_null()), "{degrade:?}");
    let w3 = &swarm["nodes"][3];
    assert_eq!(w3["status"], "killed", "{w3}");
    // The lost link's sender lost what it sent to the server.
    let lost = swarm["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["from"] == "w2" && l["to"] == "ps")
        .unwrap();
    assert!(lost["loss_dropped_packets"].as_u64() > Some(0), "{lost}");
    // Every node's runs and both swarms have receipts, and the store verifies.
    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 0, "{}", verify.stderr());
    assert_no_swarm_left(&guard);
}
