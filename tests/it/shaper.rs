//! Network shaping on a veth pair between two namespaces of the test's own: the run in `a`,
//! its peer in `b`. Rates are measured where iperf3 measures them: at the receiver.

use std::net::TcpListener;
use std::time::Duration;

use nbt_integration_tests::{
    nbt, nbt_in_netns, receive_all, receive_numbered, testbin, wait_for_live_run, NetnsPair,
    NoLeftovers, Run, ADDR_A, ADDR_B,
};

/// A full TCP segment on this veth: 1448 bytes of payload in 1500 bytes of IP packet (20 IP, 20
/// TCP, 12 timestamp option). The limit counts IP bytes; the receiver sees payload.
const PAYLOAD_PER_WIRE: f64 = 1448.0 / 1500.0;

/// Where a bulk TCP flow from the run goes.
#[derive(Clone, Copy)]
enum Path {
    /// To the peer namespace over the veth pair, with this MTU.
    Veth(u32),
    /// To a receiver in the run's own namespace over its loopback (MTU 65536).
    Loopback,
}

/// Payload bytes per IP byte of a full segment on `path` at `bits_per_sec`, as nbt shapes it:
/// the segment size is the path's (MTU - 40, 12 of it the timestamp option), capped at a
/// thirty-second of the default egress bucket (40 ms of the rate, at least 96 KiB), never
/// under the 1460 of a 1500-byte MTU. The limit counts IP bytes; the receiver sees payload.
fn payload_per_wire(path: Path, bits_per_sec: f64) -> f64 {
    let mtu = match path {
        Path::Veth(mtu) => f64::from(mtu),
        Path::Loopback => 65536.0,
    };
    let bucket = (bits_per_sec / 8.0 / 25.0).max(96.0 * 1024.0);
    let cap = (bucket / 32.0).floor().max(1460.0);
    let payload = (mtu - 40.0).min(if cap < 32767.0 { cap } else { f64::MAX }) - 12.0;
    payload / (payload + 52.0)
}

fn egress_rate_holds(path: Path, rate: &str, bits_per_sec: f64, port: u16) {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("eg");
    let (receiver_ns, addr) = match path {
        Path::Veth(mtu) => {
            net.set_mtu(mtu);
            (&net.b, format!("{ADDR_B}:{port}"))
        }
        Path::Loopback => (&net.a, format!("127.0.0.1:{port}")),
    };
    let bound = addr.clone();
    let receiver = NetnsPair::in_netns(receiver_ns, move || {
        receive_all(TcpListener::bind(bound).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--egress-rate",
        rate,
        "--",
        testbin.to_str().unwrap(),
        "tcp-stream",
        &addr,
        "13",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    // The summary's limits line names the network limit.
    assert!(
        run.stderr()
            .contains(&format!("  limits        egress {rate} (burst ")),
        "{}",
        run.stderr()
    );
    let received = receiver.join().unwrap();
    // 10 s of the steady state: after the first 2 s, as iperf3 --omit would.
    let wire = received.rate_between(2.0, 12.0) / payload_per_wire(path, bits_per_sec);
    let ratio = wire / bits_per_sec;
    eprintln!("{rate}: {ratio:.5} of the limit");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{rate}: {:.0} bit/s on the wire, {ratio:.4} of the limit; dropped for rate: {} packets",
        wire,
        run.u64("/shaped/egress/rate_dropped_packets")
    );
    guard.assert_clean();
}

#[test]
fn egress_rate_512kbit() {
    egress_rate_holds(Path::Veth(1500), "512kbit", 512e3, 5201);
}

#[test]
fn egress_rate_10mbit() {
    egress_rate_holds(Path::Veth(1500), "10mbit", 10e6, 5201);
}

#[test]
fn egress_rate_200mbit() {
    egress_rate_holds(Path::Veth(1500), "200mbit", 200e6, 5201);
}

// Loopback's 64 KiB segments, which a 96 KiB bucket kept 60% full never held (0.25 of 10mbit
// before the segment size was capped), and a jumbo-frame veth.
#[test]
fn egress_rate_512kbit_over_loopback() {
    egress_rate_holds(Path::Loopback, "512kbit", 512e3, 5210);
}

#[test]
fn egress_rate_10mbit_over_loopback() {
    egress_rate_holds(Path::Loopback, "10mbit", 10e6, 5211);
}

#[test]
fn egress_rate_10mbit_over_a_9000_byte_mtu() {
    egress_rate_holds(Path::Veth(9000), "10mbit", 10e6, 5212);
}

#[test]
fn egress_rate_200mbit_over_a_9000_byte_mtu() {
    egress_rate_holds(Path::Veth(9000), "200mbit", 200e6, 5213);
}

#[test]
fn traffic_outside_the_run_is_untouched() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("out");
    // Inside the run: 10mbit. Outside it, at the same time and on the same veth: no limit.
    let inside = NetnsPair::in_netns(&net.b, || {
        receive_all(TcpListener::bind(format!("{ADDR_B}:5202")).unwrap())
    });
    let outside = NetnsPair::in_netns(&net.b, || {
        receive_all(TcpListener::bind(format!("{ADDR_B}:5203")).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let outside_sender = {
        let testbin = testbin.clone();
        let a = net.a.clone();
        std::thread::spawn(move || {
            let status = std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{a}"))
                .arg(&testbin)
                .args(["tcp-stream", &format!("{ADDR_B}:5203"), "4"])
                .status()
                .unwrap();
            assert!(status.success());
        })
    };
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--egress-rate",
        "10mbit",
        "--",
        testbin.to_str().unwrap(),
        "tcp-stream",
        &format!("{ADDR_B}:5202"),
        "4",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    outside_sender.join().unwrap();
    let inside = inside.join().unwrap().rate_between(1.0, 3.0) / PAYLOAD_PER_WIRE;
    let outside = outside.join().unwrap().rate_between(1.0, 3.0);
    assert!(inside < 10.5e6, "the run got {inside:.0} bit/s");
    assert!(
        outside > 10.0 * 10e6,
        "outside the run: {outside:.0} bit/s, not 10x the run's limit"
    );
    guard.assert_clean();
}

#[test]
fn uniform_loss_is_within_half_a_point() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("loss");
    const SENT: u64 = 20_000;
    let receiver = receive_numbered(&net.b, 5204, SENT, 1);
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--loss",
        "5%",
        "--",
        testbin.to_str().unwrap(),
        "udp-send",
        &format!("{ADDR_B}:5204"),
        &SENT.to_string(),
        "100",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(
        run.stderr().contains("  limits        egress 5% loss ["),
        "{}",
        run.stderr()
    );
    let received = receiver
        .join()
        .unwrap()
        .arrived()
        .iter()
        .filter(|got| **got)
        .count() as u64;
    let lost = run.u64("/shaped/egress/loss_dropped_packets");
    let measured = 1.0 - received as f64 / SENT as f64;
    assert!(
        (0.045..=0.055).contains(&measured),
        "{measured:.4} of packets lost at the receiver; nbt said: {} {}",
        run.stdout(),
        run.stderr()
    );
    // The receiver's count and the shaper's agree: nothing else lost packets.
    assert_eq!(
        received + lost,
        SENT,
        "received {received}, dropped by the shaper {lost}"
    );
    guard.assert_clean();
}

#[test]
fn gilbert_elliott_loss_comes_in_bursts_of_the_expected_length() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("ge");
    const SENT: u64 = 50_000;
    let receiver = receive_numbered(&net.b, 5205, SENT, 1);
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    // p = 1%, r = 25%: the bad state lasts 1/r = 4 packets on average, and loses all of them
    // (1-h = 100%); the good state loses none (1-k = 0%). Loss on average: p/(p+r) = 3.85%.
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--loss-model",
        "gemodel:1%,25%,100%,0%",
        "--",
        testbin.to_str().unwrap(),
        "udp-send",
        &format!("{ADDR_B}:5205"),
        &SENT.to_string(),
        "100",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let received = receiver.join().unwrap().arrived();
    let mut bursts = Vec::new();
    let mut current = 0u64;
    for got in &received {
        if *got {
            if current > 0 {
                bursts.push(current);
            }
            current = 0;
        } else {
            current += 1;
        }
    }
    if current > 0 {
        bursts.push(current);
    }
    let lost: u64 = bursts.iter().sum();
    let mean_burst = lost as f64 / bursts.len() as f64;
    assert!(
        (3.2..=4.8).contains(&mean_burst),
        "mean burst {mean_burst:.2} packets over {} bursts",
        bursts.len()
    );
    let loss = lost as f64 / SENT as f64;
    assert!(
        (0.030..=0.047).contains(&loss),
        "loss {loss:.4}, expected 0.0385"
    );
    assert_eq!(lost, run.u64("/shaped/egress/loss_dropped_packets"));
    guard.assert_clean();
}

#[test]
fn halving_the_rate_of_a_live_run_halves_what_arrives() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("set");
    let receiver = NetnsPair::in_netns(&net.b, || {
        receive_all(TcpListener::bind(format!("{ADDR_B}:5206")).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let args: Vec<String> = [
        "run",
        "--json",
        "--egress-rate",
        "20mbit",
        "--",
        testbin.to_str().unwrap(),
        "tcp-stream",
        &format!("{ADDR_B}:5206"),
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sender = {
        let ns = net.a.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nbt_in_netns(&ns, &args)
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    // This test's run: the one sending to port 5206 (another nbt may be running too).
    let name = wait_for_live_run(|r| r["command"].to_string().contains(":5206"))
        .expect("this test's live run");
    let set = nbt(&["set", &name, "--egress-rate", "10mbit"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    let run = sender.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(run.u64("/net_limits/egress/rate_bits_per_sec"), 10_000_000);
    let received = receiver.join().unwrap();
    // The set came about 4 s after the first byte (nbt starts its workload within a fraction of
    // a second): the first window is well before it, the second starts 2 s after it.
    let before = received.rate_between(1.5, 3.5) / PAYLOAD_PER_WIRE;
    let after = received.rate_between(6.0, 9.0) / PAYLOAD_PER_WIRE;
    assert!(
        (0.93..=1.05).contains(&(before / 20e6)),
        "before the change: {before:.0} bit/s"
    );
    assert!(
        (0.93..=1.05).contains(&(after / 10e6)),
        "2 s after halving: {after:.0} bit/s"
    );
    guard.assert_clean();
}

#[test]
fn ingress_rate_10mbit() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("in");
    let testbin = testbin();
    // The sender is outside the run, in the peer namespace; the receiver is the run.
    let sender = {
        let (b, testbin) = (net.b.clone(), testbin.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{b}"))
                .arg(&testbin)
                .args(["tcp-stream", &format!("{ADDR_A}:5207"), "14"])
                .output()
                .unwrap()
        })
    };
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--ingress-rate",
        "10mbit",
        "--",
        testbin.to_str().unwrap(),
        "tcp-recv",
        &format!("{ADDR_A}:5207"),
        "2",
        "12",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(sender.join().unwrap().status.success());
    let report = run.stdout();
    let payload: f64 = report
        .split_whitespace()
        .skip_while(|w| *w != "rate_bits_per_sec")
        .nth(1)
        .unwrap_or_else(|| panic!("no rate in {report}"))
        .parse()
        .unwrap();
    let ratio = payload / PAYLOAD_PER_WIRE / 10e6;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "ingress 10mbit: {ratio:.3} of the limit on the wire"
    );
    // No --ingress-queue: the default queues where the kernel has fq and ifb, and polices
    // elsewhere (this host), saying so on stderr with what the kernel lacks.
    match nbt::plan::probe::ingress_queue_missing() {
        Some(missing) => {
            assert_said(
                &run,
                &format!(
                    "nbt: the ingress rate is policed (arriving packets beyond it are dropped), \
                     not queued: the queue needs {missing}; see `nbt probe`"
                ),
            );
            assert_said(&run, POLICED_10MBIT);
            assert!(
                run.u64("/shaped/ingress/rate_dropped_packets") > 0,
                "the limit never bit"
            );
        }
        None => assert_said(
            &run,
            "  limits        ingress 10mbit (queued, at most 305.2 KiB) [",
        ),
    }
    guard.assert_clean();
}

/// The limits line of a run policed at 10mbit, with its default bucket (250 ms).
const POLICED_10MBIT: &str = "  limits        ingress 10mbit (policed, burst 305.2 KiB) [";

fn assert_said(run: &Run, text: &str) {
    assert!(
        run.stderr().contains(text),
        "no {text:?} in: {}",
        run.stderr()
    );
}

#[test]
fn ingress_queue_false_polices_without_a_note() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("iq");
    let run = net.nbt_in_a(&[
        "run",
        "--ingress-rate",
        "10mbit",
        "--ingress-queue=false",
        "--",
        "true",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_said(&run, POLICED_10MBIT);
    assert!(
        !run.stderr().contains("policed (arriving"),
        "{}",
        run.stderr()
    );
    guard.assert_clean();
}

#[test]
fn root_qdiscs_are_put_on_and_taken_off_over_netlink() {
    // What --latency does with fq, done with pfifo, which every kernel has (this one lacks fq):
    // the netlink requests, the refusal to replace someone's qdisc, the default put back.
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("qd");
    let shown = NetnsPair::qdiscs;
    let results = NetnsPair::in_netns(&net.a, || {
        let (ifindex, name) = nbt::sys::netlink::interfaces()
            .into_iter()
            .next()
            .expect("the veth");
        let added = nbt::sys::netlink::add_root(ifindex, "pfifo", &[]);
        let again = nbt::sys::netlink::add_root(ifindex, "pfifo", &[]);
        (ifindex, name, added, again)
    })
    .join()
    .unwrap();
    let (ifindex, name, added, again) = results;
    assert!(name.starts_with("nbt"), "{name}");
    added.expect("adding a root pfifo");
    assert!(shown(&net.a).contains("qdisc pfifo"), "{}", shown(&net.a));
    assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::EEXIST));
    NetnsPair::in_netns(&net.a, move || nbt::sys::netlink::delete_root(ifindex))
        .join()
        .unwrap()
        .expect("deleting the root qdisc");
    assert!(!shown(&net.a).contains("pfifo"), "{}", shown(&net.a));
    guard.assert_clean();
}
