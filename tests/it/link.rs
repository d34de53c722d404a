//! Per-destination links (`--link`, `[[link]]`): on a veth pair between two namespaces of the
//! test's own, `b` holds two addresses; the run in `a` gives one of them a link of its own. Each
//! destination is measured at its receiver.

use std::net::TcpListener;
use std::time::Duration;

use nbt_integration_tests::{
    live_runs, nbt, nbt_in_netns, receive_all, receive_numbered_at, testbin, wait_for_live_run,
    NetnsPair, NoLeftovers, ADDR_B,
};

/// The second address of `b`: the destination with a link of its own.
const ADDR_LINKED: &str = "192.0.2.3";
/// A full TCP segment on this veth: 1448 bytes of payload in 1500 bytes of IP packet.
const PAYLOAD_PER_WIRE: f64 = 1448.0 / 1500.0;

#[test]
fn each_destination_holds_to_its_own_link_at_once() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("lk");
    net.add_address_b(ADDR_LINKED);
    let receivers: Vec<_> = [ADDR_B, ADDR_LINKED]
        .into_iter()
        .map(|addr| {
            let bound = format!("{addr}:5230");
            NetnsPair::in_netns(&net.b, move || {
                receive_all(TcpListener::bind(bound).unwrap())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let testbin = testbin.to_str().unwrap();
    // Two bulk flows at the same time: to the run's own link (2mbit) and to the linked
    // address (10mbit). Each bucket is its own: neither flow takes the other's rate.
    let both = format!(
        "{testbin} tcp-stream {ADDR_B}:5230 13 & {testbin} tcp-stream {ADDR_LINKED}:5230 13; wait"
    );
    let args: Vec<String> = [
        "run",
        "--json",
        "--egress-rate",
        "2mbit",
        "--link",
        &format!("to={ADDR_LINKED},egress-rate=10mbit"),
        "--",
        "sh",
        "-c",
        &both,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ns = net.a.clone();
    let sender = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nbt_in_netns(&ns, &args)
    });
    // While it runs: `nbt ps` shows the link and its counters; `nbt set` changes its limits.
    let name = wait_for_live_run(|r| r["command"].to_string().contains(":5230"))
        .expect("this test's live run");
    std::thread::sleep(Duration::from_secs(2));
    let live = live_runs()
        .into_iter()
        .find(|r| r["run"] == name.as_str())
        .expect("the run in nbt ps --json");
    assert!(
        live["links"][0]["link"]
            .as_str()
            .is_some_and(|l| l.starts_with(&format!("to {ADDR_LINKED}: egress 10mbit"))),
        "{live}"
    );
    assert!(
        live["links"][0]["shaped"]["egress"]["passed_bytes"].as_u64() > Some(0),
        "{live}"
    );
    // A link's shaper limits change live (the same value here, so the rates below hold); its
    // delay does not, and a destination it does not have is named.
    let set = nbt(&["set", &name, "--link", "to=192.0.2.3,egress-rate=10mbit"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    assert!(
        set.stderr().contains("link to 192.0.2.3: egress 10mbit"),
        "{}",
        set.stderr()
    );
    let set = nbt(&["set", &name, "--link", "to=192.0.2.3,latency=5ms"]);
    assert_eq!(set.status(), 2, "{}", set.stderr());
    assert!(
        set.stderr().contains("'latency' cannot change"),
        "{}",
        set.stderr()
    );
    let set = nbt(&["set", &name, "--link", "to=192.0.2.9,loss=1%"]);
    assert_eq!(set.status(), 2, "{}", set.stderr());
    assert!(
        set.stderr().contains("has no link to 192.0.2.9"),
        "{}",
        set.stderr()
    );
    let run = sender.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    // The live change is one of the run's events, from nbt set (the refused ones are not).
    let events = run.summary.as_ref().unwrap()["events"].as_array().unwrap();
    let changes: Vec<&str> = events
        .iter()
        .filter(|e| e["source"] == "nbt set")
        .filter_map(|e| e["what"].as_str())
        .collect();
    assert_eq!(changes.len(), 1, "{events:?}");
    assert!(
        changes[0].starts_with("link to 192.0.2.3: egress 10mbit"),
        "{changes:?}"
    );
    assert!(
        run.stderr().contains(&format!(
            "egress 2mbit (burst 96.0 KiB), link to {ADDR_LINKED}: egress 10mbit (burst "
        )),
        "the limits line names the link: {}",
        run.stderr()
    );
    let rates: Vec<f64> = receivers
        .into_iter()
        .map(|r| r.join().unwrap().rate_between(2.0, 12.0) / PAYLOAD_PER_WIRE)
        .collect();
    for (rate, limit, name) in [(rates[0], 2e6, "own"), (rates[1], 10e6, "link")] {
        let ratio = rate / limit;
        eprintln!("{name}: {ratio:.5} of {limit}");
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{name}: {rate:.0} bit/s, {ratio:.4} of {limit}"
        );
    }
    // Each link's counters are its own: the linked flow passed about five times the bytes.
    let own = run.u64("/shaped/egress/passed_bytes") as f64;
    let linked = run.u64("/links/0/shaped/egress/passed_bytes") as f64;
    assert!(
        (4.0..=6.0).contains(&(linked / own)),
        "passed: own link {own} bytes, the --link {linked} bytes"
    );
    guard.assert_clean();
}

#[test]
fn a_profile_link_loses_only_its_own_packets() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("lp");
    net.add_address_b(ADDR_LINKED);
    const SENT: u64 = 10_000;
    let plain = receive_numbered_at(&net.b, ADDR_B, 5231, SENT, 1);
    let linked = receive_numbered_at(&net.b, ADDR_LINKED, 5231, SENT, 1);
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("links.toml");
    std::fs::write(
        &profile,
        format!("[[link]]\nto = [\"{ADDR_LINKED}/32\"]\nloss = \"10%\"\n"),
    )
    .unwrap();
    let testbin = testbin();
    let testbin = testbin.to_str().unwrap();
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--profile",
        profile.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &format!(
            "{testbin} udp-send {ADDR_B}:5231 {SENT} 100 && {testbin} udp-send {ADDR_LINKED}:5231 {SENT} 100"
        ),
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let count = |r: std::thread::JoinHandle<nbt_integration_tests::Arrivals>| {
        r.join().unwrap().arrived().iter().filter(|a| **a).count() as u64
    };
    let (plain, linked) = (count(plain), count(linked));
    assert_eq!(plain, SENT, "the run's own link has no loss");
    // 10% of 10,000: binomial standard deviation 30; 4.5 of them either way.
    let lost = SENT - linked;
    assert!(
        (865..=1135).contains(&lost),
        "{lost} of {SENT} lost on the link"
    );
    assert_eq!(
        run.u64("/links/0/shaped/egress/loss_dropped_packets"),
        lost,
        "the link's counter and the receiver agree"
    );
    assert_eq!(run.u64("/shaped/egress/loss_dropped_packets"), 0);
    guard.assert_clean();
}

#[test]
fn a_bad_link_is_refused_naming_it() {
    let net = NetnsPair::new("lb");
    for (link, says) in [
        (
            "to=192.0.2.3:80,loss=1%",
            "a link is by address, without a port",
        ),
        (
            "to=192.0.2.3,egress-rate=fast",
            "egress-rate (--link to=192.0.2.3,egress-rate=fast)",
        ),
        ("to=192.0.2.3", "a link without a setting"),
    ] {
        let run = net.nbt_in_a(&["run", "--link", link, "--", "true"]);
        assert_eq!(run.status(), 2, "{link}: {}", run.stderr());
        assert!(run.stderr().contains(says), "{link}: {}", run.stderr());
    }
    let run = net.nbt_in_a(&[
        "run",
        "--link",
        "to=192.0.2.0/24,loss=1%",
        "--link",
        "to=192.0.2.9/24,loss=2%",
        "--",
        "true",
    ]);
    assert_eq!(run.status(), 2, "{}", run.stderr());
    assert!(
        run.stderr()
            .contains("192.0.2.0/24 is a destination of two links"),
        "{}",
        run.stderr()
    );
}
