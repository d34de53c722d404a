//! netem's impairments besides rate, loss and delay (duplicate, corrupt) and its loss
//! correlation, on the veth pair of two namespaces of the test's own: the run sends numbered
//! datagrams from `a`, the peer in `b` counts what arrives; for arriving packets
//! (`--impair-direction ingress`), the run receives in `a` what this test sends from `b`.
//! Reorder and the jitter's correlation need the fq qdisc, which this host lacks: the VM tests
//! cover them.

use std::time::Duration;

use nbt_integration_tests::{
    nbt, nbt_command_in_netns, receive_all, receive_numbered as receive, receive_numbered_at,
    testbin, wait_for_live_run, Arrivals, NetnsPair, NoLeftovers, Run, ADDR_A, ADDR_B,
};

/// `nbt run --json LIMITS -- nbt-testbin udp-send` of `count` datagrams of 100 bytes to the
/// peer's `port`, and what arrived there.
fn send_numbered(
    tag: &str,
    port: u16,
    count: u64,
    limits: &[&str],
) -> (Arrivals, serde_json::Value, NetnsPair) {
    let net = NetnsPair::new(tag);
    let receiver = receive(&net.b, port, count, 1);
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(limits);
    let addr = format!("{ADDR_B}:{port}");
    let count_text = count.to_string();
    args.extend_from_slice(&[
        "--",
        testbin.to_str().unwrap(),
        "udp-send",
        &addr,
        &count_text,
        "100",
    ]);
    let run = net.nbt_in_a(&args);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary: serde_json::Value =
        serde_json::from_str(&run.stdout()[run.stdout().find('{').unwrap()..]).unwrap();
    (receiver.join().unwrap(), summary, net)
}

fn counter(summary: &serde_json::Value, name: &str) -> u64 {
    summary["shaped"]["egress"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no shaped/egress/{name} in {summary}"))
}

#[test]
fn duplicate_sends_the_asked_share_twice() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 20_000;
    let (arrivals, summary, _net) = send_numbered("dup", 5220, SENT, &["--duplicate", "10%"]);
    assert_eq!(arrivals.damaged, 0);
    let once = arrivals.times.iter().filter(|t| **t == 1).count() as u64;
    let twice = arrivals.times.iter().filter(|t| **t == 2).count() as u64;
    assert_eq!(once + twice, SENT, "every datagram arrived once or twice");
    // Binomial: 2,000 expected, one standard deviation 42.
    let share = twice as f64 / SENT as f64;
    assert!(
        (0.09..=0.11).contains(&share),
        "{share:.4} of datagrams arrived twice, not 0.10"
    );
    assert_eq!(twice, counter(&summary, "duplicated_packets"));
    guard.assert_clean();
}

/// The IP header checksum errors namespace `ns` counted (`IpExt InCsumErrors`).
fn ip_checksum_errors(ns: &str) -> u64 {
    netstat(ns, "/proc/net/netstat", "IpExt:", "InCsumErrors")
}

/// The counter `name` of the `prefix` lines of `file` (/proc/net/netstat, /proc/net/snmp) in
/// namespace `ns`.
fn netstat(ns: &str, file: &str, prefix: &str, name: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", file])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names.split_whitespace().position(|n| n == name).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// What `nbt-testbin udp-tally` printed: datagrams that arrived once, twice, more often, never,
/// and damaged ones.
#[derive(Debug)]
struct Tally {
    once: u64,
    twice: u64,
    more: u64,
    missing: u64,
    damaged: u64,
}

/// The run in `a` receives: `nbt run --json LIMITS -- nbt-testbin udp-tally` on port `port`,
/// while this test sends `count` numbered datagrams of 100 bytes from `b` to it and, beside it,
/// to a receiver of the test's own in `a`, outside the run, on `port + 1`: `per_second` of them
/// a second, or with `0` as fast as no receive buffer overflows; `during` runs while they go.
/// The run's tally, what the outsider got, the summary, and the namespaces.
fn receive_numbered_in_run(
    tag: &str,
    port: u16,
    (count, per_second): (u64, u64),
    limits: &[&str],
    during: impl FnOnce(),
) -> (Tally, Arrivals, serde_json::Value, NetnsPair) {
    let net = NetnsPair::new(tag);
    let outsider = receive_numbered_at(&net.a, ADDR_A, port + 1, count, 1);
    let testbin = testbin().to_str().unwrap().to_string();
    let ns = net.a.clone();
    // As root, so that the receiver can take a receive buffer large enough for a busy machine
    // (udp-tally's SO_RCVBUFFORCE): as nobody, its 208 KiB overflowed in 1 of 5 runs with a
    // CPU kept busy.
    let mut args: Vec<String> = ["run", "--json", "--user", "root"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(limits.iter().map(|a| a.to_string()));
    args.extend([
        "--".into(),
        testbin,
        "udp-tally".into(),
        format!("{ADDR_A}:{port}"),
        count.to_string(),
        "2".into(),
    ]);
    let run = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nbt_integration_tests::nbt_in_netns(&ns, &args)
    });
    // Until the run's socket is bound, then the datagrams, paced so that no receive buffer
    // overflows (checked after).
    wait_until_bound(&net.a, "-Hlun", port);
    let sender = NetnsPair::in_netns(&net.b, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut payload = [1u8; 100];
        let start = std::time::Instant::now();
        for i in 0..count {
            payload[..8].copy_from_slice(&i.to_le_bytes());
            for to in [port, port + 1] {
                socket.send_to(&payload, format!("{ADDR_A}:{to}")).unwrap();
            }
            if per_second > 0 {
                let due = start + Duration::from_secs_f64((i + 1) as f64 / per_second as f64);
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            } else if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    during();
    sender.join().unwrap();
    let run = run.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let stdout = run.stdout();
    let at = stdout.find('{').unwrap();
    let words: Vec<u64> = stdout[..at]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [once, twice, more, missing, damaged] = words[..] else {
        panic!("no tally in {stdout}");
    };
    let summary: serde_json::Value = serde_json::from_str(&stdout[at..]).unwrap();
    assert_eq!(
        netstat(&net.a, "/proc/net/snmp", "Udp:", "RcvbufErrors"),
        0,
        "a receive buffer overflowed: the arrivals are not nbt's alone"
    );
    let tally = Tally {
        once,
        twice,
        more,
        missing,
        damaged,
    };
    (tally, outsider.join().unwrap(), summary, net)
}

/// Waits until a socket of namespace `ns` listens on `port` (`ss OPTIONS`: `-Hlun` for UDP,
/// `-Hltn` for TCP).
fn wait_until_bound(ns: &str, options: &str, port: u16) {
    let bound = format!(":{port} ");
    let started = std::time::Instant::now();
    loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ss", options])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&bound) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing bound {port} in {ns}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `observed` of `n` draws of probability `p` is within 3 binomial standard deviations.
fn within_three_sigma(observed: u64, n: u64, p: f64) -> bool {
    let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
    (observed as f64 - mean).abs() <= 3.0 * sd
}

#[test]
fn ingress_duplicate_delivers_the_asked_share_twice_to_the_run_alone() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 20_000;
    let (tally, outsider, summary, _net) = receive_numbered_in_run(
        "idup",
        5226,
        (SENT, 0),
        &["--impair-direction", "ingress", "--duplicate", "10%"],
        || {},
    );
    assert_eq!(
        (tally.more, tally.missing, tally.damaged),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.once + tally.twice, SENT, "{tally:?}");
    eprintln!(
        "ingress duplicate 10%: {} of {SENT} twice; {tally:?}",
        tally.twice
    );
    // Binomial: 2,000 expected, one standard deviation 42.
    assert!(
        within_three_sigma(tally.twice, SENT, 0.10),
        "{} of {SENT} datagrams arrived twice, not 10% within 3 standard deviations",
        tally.twice
    );
    assert_eq!(
        tally.twice,
        summary["shaped"]["ingress"]["duplicated_packets"]
            .as_u64()
            .unwrap()
    );
    assert_eq!(summary["shaped"]["egress"]["duplicated_packets"], 0);
    // The process outside the run got each datagram once.
    assert_eq!(outsider.damaged, 0);
    assert!(
        outsider.times.iter().all(|t| *t == 1),
        "the outsider's traffic was touched"
    );
    guard.assert_clean();
}

#[test]
fn ingress_corrupt_drops_the_asked_share_at_the_runs_ip_checksum_alone() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 20_000;
    let (tally, outsider, summary, net) = receive_numbered_in_run(
        "icor",
        5228,
        (SENT, 0),
        &["--impair-direction", "ingress", "--corrupt", "5%"],
        || {},
    );
    assert_eq!(
        (tally.twice, tally.more, tally.damaged),
        (0, 0, 0),
        "{tally:?}"
    );
    let corrupted = summary["shaped"]["ingress"]["corrupted_packets"]
        .as_u64()
        .unwrap();
    assert_eq!(tally.missing, corrupted, "{tally:?}");
    eprintln!("ingress corrupt 5%: {corrupted} of {SENT} corrupted; {tally:?}");
    assert_eq!(ip_checksum_errors(&net.a), corrupted);
    // Binomial: 1,000 expected, one standard deviation 31.
    assert!(
        within_three_sigma(corrupted, SENT, 0.05),
        "{corrupted} of {SENT} datagrams corrupted, not 5% within 3 standard deviations"
    );
    assert_eq!(outsider.damaged, 0);
    assert!(
        outsider.times.iter().all(|t| *t == 1),
        "the outsider's traffic was touched"
    );
    guard.assert_clean();
}

#[test]
fn corrupted_datagrams_fail_the_receivers_checksum_and_none_arrives_damaged() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 20_000;
    let (arrivals, summary, net) = send_numbered("cor", 5221, SENT, &["--corrupt", "5%"]);
    // The flipped bit is never delivered: the receiver's UDP checksum catches every one.
    assert_eq!(
        arrivals.damaged, 0,
        "corrupted datagrams reached the socket"
    );
    let received = arrivals.times.iter().filter(|t| **t > 0).count() as u64;
    let corrupted = counter(&summary, "corrupted_packets");
    assert_eq!(received + corrupted, SENT);
    assert_eq!(ip_checksum_errors(&net.b), corrupted);
    // Binomial: 1,000 expected, one standard deviation 31.
    let share = corrupted as f64 / SENT as f64;
    assert!(
        (0.043..=0.057).contains(&share),
        "{share:.4} of datagrams corrupted, not 0.05"
    );
    guard.assert_clean();
}

#[test]
fn a_tcp_stream_through_corruption_arrives_intact() {
    use std::io::Read;
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("tcpcor");
    let receiver = NetnsPair::in_netns(&net.b, || {
        let listener = std::net::TcpListener::bind(format!("{ADDR_B}:5222")).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        let (mut total, mut wrong) = (0u64, 0u64);
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = stream.read(&mut buffer).unwrap();
            if n == 0 {
                return (total, wrong);
            }
            total += n as u64;
            // tcp-stream sends sevens.
            wrong += buffer[..n].iter().filter(|b| **b != 7).count() as u64;
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--egress-rate",
        "20mbit",
        "--corrupt",
        "1%",
        "--",
        testbin.to_str().unwrap(),
        "tcp-stream",
        &format!("{ADDR_B}:5222"),
        "5",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let (total, wrong) = receiver.join().unwrap();
    let corrupted = run.u64("/shaped/egress/corrupted_packets");
    assert!(total > 5_000_000, "only {total} bytes arrived");
    assert!(corrupted > 20, "only {corrupted} packets corrupted");
    assert_eq!(wrong, 0, "{wrong} corrupted bytes reached the application");
    guard.assert_clean();
}

/// `nbt run --egress-rate 10mbit --loss 5%` of a Reno TCP stream of `seconds` from namespace a
/// to a receiver on `port` in b; checks that the receiver got every byte sent and that 2 to 15%
/// of them were retransmitted (5% of the packets, most of one or two segments: about 5% of the
/// bytes come again; dropped at the cgroup, none did). The run's summary.
fn reno_stream_under_egress_loss(net: &NetnsPair, port: u16, seconds: &str) -> Run {
    let receiver = NetnsPair::in_netns(&net.b, move || {
        receive_all(std::net::TcpListener::bind(format!("{ADDR_B}:{port}")).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin();
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--egress-rate",
        "10mbit",
        "--loss",
        "5%",
        "--",
        testbin.to_str().unwrap(),
        "tcp-stream",
        &format!("{ADDR_B}:{port}"),
        seconds,
        // A congestion control an unprivileged workload may choose in a new namespace.
        "reno",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let (sent, retransmitted) = (run.report_u64("sent"), run.report_u64("retransmitted"));
    let lost = run.u64("/shaped/egress/loss_dropped_packets");
    assert_eq!(
        receiver.join().unwrap().bytes(),
        sent,
        "the receiver got a different count"
    );
    assert!(lost > 20, "only {lost} packets lost");
    let share = retransmitted as f64 / sent as f64;
    assert!(
        (0.02..=0.15).contains(&share),
        "{retransmitted} of {sent} bytes retransmitted ({share:.4}) with {lost} packets lost"
    );
    run
}

/// A TCP segment lost on egress is lost on the wire for its sender, as behind netem: TCP learns
/// of it from the peer and retransmits it. Dropped at the cgroup hook, as nbt did before, the
/// segment went back to TCP as not sent and went again as new: 0 bytes retransmitted.
#[test]
fn tcp_segments_lost_on_egress_are_retransmitted() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("wireloss");
    reno_stream_under_egress_loss(&net, 5223, "4");
    guard.assert_clean();
}

/// Two runs in one namespace share the clsact qdisc their tc programs hang off. The one that
/// added it ends first; the other's egress loss must stay a loss on the wire (before, the first
/// took the clsact qdisc off with the other's program on it, and the other's marked segments
/// passed: 0.29% of its bytes came again). Nothing is left after both.
#[test]
fn a_run_ending_leaves_the_tc_program_of_another_run_in_place() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("sharedtc");
    let ns = net.a.clone();
    let first = std::thread::spawn(move || {
        nbt_integration_tests::nbt_in_netns(&ns, &["run", "--loss", "5%", "--", "sleep", "1.5"])
    });
    // The first run adds the clsact qdisc, and holds it while the second starts.
    std::thread::sleep(Duration::from_millis(500));
    reno_stream_under_egress_loss(&net, 5224, "6");
    let first = first.join().unwrap();
    assert_eq!(first.status(), 0, "{}", first.stderr());
    let qdiscs = NetnsPair::qdiscs(&net.a);
    assert!(!qdiscs.contains("clsact"), "left behind: {qdiscs}");
    guard.assert_clean();
}

/// Two runs in one namespace, the later one's tc program in front of the earlier one's (tc puts
/// each new filter first): the earlier run's egress loss must stay a loss on the wire. Before,
/// the later run's program ended the filter list for every packet not its own (`TC_ACT_OK`),
/// and the earlier run's lost segments left as if nothing had happened.
#[test]
fn a_later_run_in_the_namespace_leaves_an_earlier_runs_packets_to_its_program() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("tcorder");
    let ns = net.a.clone();
    let later = std::thread::spawn(move || {
        // Once the earlier run's stream has started (nbt's start takes about 0.5 s).
        std::thread::sleep(Duration::from_millis(800));
        nbt_integration_tests::nbt_in_netns(&ns, &["run", "--loss", "5%", "--", "sleep", "6"])
    });
    // 6 s of reno under 5% loss: its retransmissions (2 to 15% of its bytes) need its lost
    // segments to be lost on the wire for all but the first second.
    reno_stream_under_egress_loss(&net, 5225, "6");
    let later = later.join().unwrap();
    assert_eq!(later.status(), 0, "{}", later.stderr());
    let qdiscs = NetnsPair::qdiscs(&net.a);
    assert!(!qdiscs.contains("clsact"), "left behind: {qdiscs}");
    guard.assert_clean();
}

/// The inode of network namespace `name`, as nbt names the marks of its clsact qdiscs there.
fn netns_ino(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{name}"))
        .unwrap()
        .ino()
}

/// nbt's marks of the clsact qdiscs it added in the namespace of inode `ino`
/// (`/run/nbt-tc/clsact-INO-IFINDEX`).
fn marks(ino: u64) -> Vec<String> {
    std::fs::read_dir("/run/nbt-tc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&format!("clsact-{ino}-")))
        .collect()
}

/// Starts `nbt run --loss 5% -- sleep 60` in namespace `ns` (its egress loss puts a clsact qdisc
/// on the veth, marked as nbt's), and kills nbt with SIGKILL once the workload runs. The run's
/// name and the namespace's inode.
fn killed_run_with_a_clsact_qdisc(ns: &str) -> (String, u64) {
    let mut run = nbt_command_in_netns(ns)
        .args(["run", "--loss", "5%", "--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting nbt");
    let name =
        wait_for_live_run(|r| r["nbt_pid"] == run.id()).expect("the run's workload did not start");
    let ino = netns_ino(ns);
    assert_eq!(marks(ino).len(), 1, "{:?}", marks(ino));
    // SAFETY: kill(2) of the nbt process this test started.
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    (name, ino)
}

/// nbt killed in a network namespace of the test's, and `nbt cleanup` run from the machine's:
/// the run's clsact qdisc (its egress loss's tc program) comes off the run's interface, in the
/// run's namespace, with its mark. Before, cleanup looked for the interface by index and name in
/// its own namespace, found none, and left the qdisc; an interface there of the same index and
/// name would have lost its qdiscs instead.
#[test]
fn cleanup_from_another_namespace_takes_the_qdiscs_off_in_the_runs() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("cleanns");
    let qdiscs = || NetnsPair::qdiscs(&net.a);
    let (name, ino) = killed_run_with_a_clsact_qdisc(&net.a);
    assert!(
        qdiscs().contains("clsact"),
        "gone before cleanup: {}",
        qdiscs()
    );

    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(
        cleanup.stderr().contains(&format!("removed {name}")),
        "{}",
        cleanup.stderr()
    );
    assert!(!qdiscs().contains("clsact"), "left behind: {}", qdiscs());
    assert!(marks(ino).is_empty(), "marks left: {:?}", marks(ino));
    guard.assert_clean();
}

/// As above, with the run's namespace deleted before `nbt cleanup`: its interfaces took their
/// qdiscs with them, cleanup says so, and touches nothing of its own namespace.
#[test]
fn cleanup_after_the_runs_namespace_is_gone_says_so() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("goness");
    let (name, ino) = killed_run_with_a_clsact_qdisc(&net.a);
    // The workload still lives in the namespace: cleanup kills it first, and the namespace
    // goes with it once `ip netns del` has taken its name.
    let deleted = std::process::Command::new("ip")
        .args(["netns", "del", &net.a])
        .status()
        .unwrap();
    assert!(deleted.success());

    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(
        cleanup.stderr().contains(&format!(
            "{name}: its network namespace is gone, and the qdiscs it put there with it"
        )) && cleanup.stderr().contains(&format!("removed {name}")),
        "{}",
        cleanup.stderr()
    );
    assert!(marks(ino).is_empty(), "marks left: {:?}", marks(ino));
    guard.assert_clean();
}

/// A bind mount of a namespace file outside `/run/netns`, taken off on drop: in the machine's
/// mount namespace, or in a private one of a process of its own (`unshare --mount`).
struct HeldNamespace {
    path: std::path::PathBuf,
    private: Option<std::process::Child>,
}

impl HeldNamespace {
    fn bind(ns: &str) -> HeldNamespace {
        let path = std::env::temp_dir().join(format!("nbt-held-{ns}"));
        std::fs::File::create(&path).unwrap();
        let held = HeldNamespace {
            path,
            private: None,
        };
        let bound = std::process::Command::new("mount")
            .args(["--bind", &format!("/run/netns/{ns}")])
            .arg(&held.path)
            .status()
            .unwrap();
        assert!(bound.success());
        held
    }

    /// Bound in a mount namespace of its own, which a sleeping process keeps: the machine's
    /// mount table does not list it.
    fn bind_privately(ns: &str) -> HeldNamespace {
        let path = std::env::temp_dir().join(format!("nbt-held-{ns}"));
        std::fs::File::create(&path).unwrap();
        let ready = path.with_extension("ready");
        let script = format!(
            "mount --bind /run/netns/{ns} {0} && touch {1} && exec sleep 60",
            path.display(),
            ready.display()
        );
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let held = HeldNamespace {
            path,
            private: Some(child),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no private bind mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&ready);
        held
    }

    fn qdiscs(&self) -> String {
        // The private mount is seen through its holder's root.
        let file = match &self.private {
            Some(child) => format!("/proc/{}/root{}", child.id(), self.path.display()),
            None => self.path.display().to_string(),
        };
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={file}"))
            .args(["tc", "qdisc", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for HeldNamespace {
    fn drop(&mut self) {
        match &mut self.private {
            // The mount goes with its mount namespace.
            Some(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {
                let _ = std::process::Command::new("umount")
                    .arg(&self.path)
                    .status();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// As above, with the namespace's name deleted but the namespace kept alive by a bind mount
/// elsewhere, as container runtimes keep theirs: in the machine's mount namespace, and in a
/// private one. Cleanup finds it among the mounts of every mount namespace and takes the qdisc
/// off there. Before, it looked in `/run/netns` and at processes only, called the namespace
/// gone and left the qdisc.
#[test]
fn cleanup_finds_a_namespace_held_by_a_bind_mount_elsewhere() {
    for private in [false, true] {
        let guard = NoLeftovers::new();
        let net = NetnsPair::new("heldns");
        let (name, ino) = killed_run_with_a_clsact_qdisc(&net.a);
        let held = match private {
            false => HeldNamespace::bind(&net.a),
            true => HeldNamespace::bind_privately(&net.a),
        };
        let deleted = std::process::Command::new("ip")
            .args(["netns", "del", &net.a])
            .status()
            .unwrap();
        assert!(deleted.success());
        assert!(held.qdiscs().contains("clsact"), "{}", held.qdiscs());

        let cleanup = nbt(&["cleanup"]);
        assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
        assert!(
            cleanup.stderr().contains(&format!("removed {name}"))
                && !cleanup.stderr().contains("namespace is gone"),
            "private mount namespace: {private}: {}",
            cleanup.stderr()
        );
        assert!(
            !held.qdiscs().contains("clsact"),
            "private mount namespace: {private}: left behind: {}",
            held.qdiscs()
        );
        assert!(marks(ino).is_empty(), "marks left: {:?}", marks(ino));
        drop(held);
        drop(net);
        guard.assert_clean();
    }
}

#[test]
fn a_tcp_stream_into_the_run_through_duplicate_and_corrupt_arrives_whole() {
    use std::io::Write;
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("itcp");
    const BYTES: usize = 64 << 20;
    let testbin = testbin().to_str().unwrap().to_string();
    let ns = net.a.clone();
    let run = std::thread::spawn(move || {
        nbt_integration_tests::nbt_in_netns(
            &ns,
            &[
                "run",
                "--json",
                "--impair-direction",
                "ingress",
                "--duplicate",
                "5%",
                "--corrupt",
                "5%",
                "--",
                &testbin,
                "tcp-recv",
                &format!("{ADDR_A}:5232"),
                "0",
                "0",
            ],
        )
    });
    wait_until_bound(&net.a, "-Hltn", 5232);
    NetnsPair::in_netns(&net.b, || {
        let mut stream = std::net::TcpStream::connect(format!("{ADDR_A}:5232")).unwrap();
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..BYTES / chunk.len() {
            stream.write_all(&chunk).unwrap();
        }
    })
    .join()
    .unwrap();
    let run = run.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(
        run.stdout().contains(&format!("received {BYTES} ")),
        "{}",
        run.stdout()
    );
    let duplicated = run.u64("/shaped/ingress/duplicated_packets");
    let corrupted = run.u64("/shaped/ingress/corrupted_packets");
    eprintln!("ingress TCP: {duplicated} duplicated, {corrupted} corrupted packets on the wire");
    assert!(duplicated > 0 && corrupted > 0, "{duplicated} {corrupted}");
    guard.assert_clean();
}

#[test]
fn a_schedule_duplicates_arriving_packets_of_a_run_started_with_ingress() {
    let guard = NoLeftovers::new();
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("dup.toml");
    std::fs::write(&schedule, "[[step]]\nat = \"1s\"\nduplicate = \"100%\"\n").unwrap();
    // 600 datagrams at 200 a second: the step comes a second or so in.
    let (tally, outsider, summary, _net) = receive_numbered_in_run(
        "isch",
        5234,
        (600, 200),
        &[
            "--impair-direction",
            "ingress",
            "--duplicate",
            "0%",
            "--schedule",
            schedule.to_str().unwrap(),
        ],
        || {},
    );
    duplicated_from_mid_run_on_arrival(&tally, &summary, &outsider, 100);
    guard.assert_clean();
}

#[test]
fn nbt_set_changes_duplicate_on_arriving_packets_of_a_run_started_with_ingress() {
    let guard = NoLeftovers::new();
    // 600 datagrams at 200 a second; the set comes about 1 s in.
    let (tally, outsider, summary, _net) = receive_numbered_in_run(
        "iset",
        5240,
        (600, 200),
        &["--impair-direction", "ingress", "--duplicate", "0%"],
        || {
            let name = wait_for_live_run(|r| r["command"].to_string().contains(":5240"))
                .expect("this test's live run");
            std::thread::sleep(Duration::from_millis(1000));
            // The direction is the run's: not changed live.
            let refused = nbt(&["set", &name, "--impair-direction", "both"]);
            assert_eq!(refused.status(), 2, "{}", refused.stderr());
            assert!(
                refused
                    .stderr()
                    .contains("invalid value 'both' for --impair-direction"),
                "{}",
                refused.stderr()
            );
            let refused = nbt(&["set", &name, "--ingress-queue"]);
            assert_eq!(refused.status(), 2, "{}", refused.stderr());
            assert!(
                refused
                    .stderr()
                    .contains("--ingress-queue is fixed when a run starts"),
                "{}",
                refused.stderr()
            );
            let set = nbt(&["set", &name, "--duplicate", "100%"]);
            assert_eq!(set.status(), 0, "{}", set.stderr());
            assert!(
                set.stderr().contains("ingress 100% duplicated"),
                "{}",
                set.stderr()
            );
            assert!(
                !set.stderr().contains("egress 100% duplicated"),
                "{}",
                set.stderr()
            );
        },
    );
    // Before the set (1 s or more of 3) once, after it twice.
    duplicated_from_mid_run_on_arrival(&tally, &summary, &outsider, 150);
    guard.assert_clean();
}

/// 600 datagrams into the run, duplicated from some point on, on arrival only: at least
/// `min_once` before it and 150 after, each counted by nbt, and none to the outsider twice.
fn duplicated_from_mid_run_on_arrival(
    tally: &Tally,
    summary: &serde_json::Value,
    outsider: &Arrivals,
    min_once: u64,
) {
    assert_eq!(
        (tally.more, tally.missing, tally.damaged),
        (0, 0, 0),
        "{tally:?}"
    );
    assert_eq!(tally.once + tally.twice, 600);
    assert!(tally.once >= min_once && tally.twice >= 150, "{tally:?}");
    assert_eq!(
        summary["shaped"]["ingress"]["duplicated_packets"],
        tally.twice
    );
    assert_eq!(summary["shaped"]["egress"]["duplicated_packets"], 0);
    assert!(outsider.times.iter().all(|t| *t == 1));
}

#[test]
fn correlated_loss_keeps_its_mean_and_comes_in_runs() {
    let guard = NoLeftovers::new();
    const SENT: u64 = 50_000;
    let (arrivals, summary, _net) = send_numbered(
        "lcor",
        5223,
        SENT,
        &["--loss", "20%", "--loss-correlation", "75%"],
    );
    assert_eq!(arrivals.damaged, 0);
    let got: Vec<bool> = arrivals.times.iter().map(|t| *t > 0).collect();
    let lost = got.iter().filter(|g| !**g).count() as u64;
    assert_eq!(lost, counter(&summary, "loss_dropped_packets"));
    let runs = got.windows(2).filter(|w| w[0] && !w[1]).count() as u64 + u64::from(!got[0]);
    let (share, mean_run) = (lost as f64 / SENT as f64, lost as f64 / runs as f64);
    // Each draw repeats the last with probability 0.75: the loss stays 20% (its standard
    // deviation over 50,000 correlated packets is 0.0047), and a loss is followed by another
    // with probability 0.75 + 0.25 x 0.2 = 0.8: runs of 1 / (0.8 x 0.25) = 5 (standard error
    // about 0.1 over 2,000 runs). Without correlation they would be 1.25.
    assert!((share - 0.20).abs() < 0.02, "lost {share:.4}, not 0.20");
    assert!(
        (mean_run / 5.0 - 1.0).abs() < 0.1,
        "losses in runs of {mean_run:.2}, not 5"
    );
    guard.assert_clean();
}

#[test]
fn a_schedule_starts_duplicating_mid_run() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("dsch");
    const SENT: u64 = 400;
    let receiver = receive(&net.b, 5224, SENT, 0);
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("dup.toml");
    std::fs::write(&schedule, "[[step]]\nat = \"1s\"\nduplicate = \"100%\"\n").unwrap();
    let testbin = testbin();
    // 400 datagrams at 200 a second: the step comes halfway.
    let run = net.nbt_in_a(&[
        "run",
        "--json",
        "--schedule",
        schedule.to_str().unwrap(),
        "--",
        testbin.to_str().unwrap(),
        "udp-paced",
        &format!("{ADDR_B}:5224"),
        &SENT.to_string(),
        "200",
    ]);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(run.stderr().contains("100% duplicated"), "{}", run.stderr());
    let arrivals = receiver.join().unwrap();
    assert_eq!(arrivals.damaged, 0);
    // The workload starts a fraction of a second after nbt's clock: leave 0.4 s either side.
    let (before, after) = (&arrivals.times[..120], &arrivals.times[280..]);
    assert!(before.iter().all(|t| *t == 1), "{before:?}");
    assert!(after.iter().all(|t| *t == 2), "{after:?}");
    guard.assert_clean();
}

#[test]
fn nbt_set_changes_duplicate_on_a_live_run_that_has_the_tc_program() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("dset");
    const SENT: u64 = 600;
    let receiver = receive(&net.b, 5225, SENT, 0);
    std::thread::sleep(Duration::from_millis(200));
    let testbin = testbin().to_str().unwrap().to_string();
    let ns = net.a.clone();
    // 600 datagrams at 200 a second; --duplicate 0% puts the tc program on, duplicating none.
    let sender = std::thread::spawn(move || {
        nbt_integration_tests::nbt_in_netns(
            &ns,
            &[
                "run",
                "--json",
                "--duplicate",
                "0%",
                "--",
                &testbin,
                "udp-paced",
                &format!("{ADDR_B}:5225"),
                "600",
                "200",
            ],
        )
    });
    let name = wait_for_live_run(|r| r["command"].to_string().contains(":5225"))
        .expect("this test's live run");
    std::thread::sleep(Duration::from_millis(1000));
    let set = nbt(&["set", &name, "--duplicate", "100%"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    assert!(set.stderr().contains("100% duplicated"), "{}", set.stderr());
    let run = sender.join().unwrap();
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let arrivals = receiver.join().unwrap();
    assert_eq!(arrivals.damaged, 0);
    // The set came 1 s or more into the 3 s of sending.
    assert!(arrivals.times[..100].iter().all(|t| *t == 1));
    assert!(arrivals.times[500..].iter().all(|t| *t == 2));

    // A run started without any of them has no tc program: refused, naming what to do.
    let testbin = nbt_integration_tests::testbin();
    let ns = net.a.clone();
    let plain = std::thread::spawn(move || {
        nbt_integration_tests::nbt_in_netns(
            &ns,
            &["run", "--", testbin.to_str().unwrap(), "sleep", "3"],
        )
    });
    let name = wait_for_live_run(|r| r["command"].to_string().contains("\"sleep\""))
        .expect("the plain run");
    let set = nbt(&["set", &name, "--duplicate", "1%"]);
    assert_ne!(set.status(), 0);
    assert!(
        set.stderr().contains("start it with --duplicate 0%"),
        "{}",
        set.stderr()
    );
    assert_eq!(plain.join().unwrap().status(), 0);
    guard.assert_clean();
}

#[test]
fn impairments_are_refused_without_what_they_need() {
    let testbin = testbin();
    for (args, says) in [
        (
            vec!["--reorder", "25%"],
            "--reorder sends some packets ahead of the added delay",
        ),
        (
            vec!["--loss-correlation", "25%"],
            "--loss-correlation correlates the uniform loss's draws: it needs --loss",
        ),
        (
            vec!["--jitter-correlation", "25%"],
            "--jitter-correlation correlates the jitter's draws: it needs --jitter",
        ),
        (
            vec!["--duplicate", "150%"],
            "invalid value '150%' for --duplicate",
        ),
        (
            vec!["--reorder", "5%", "--reorder-gap", "0", "--latency", "10ms"],
            "--reorder-gap",
        ),
        (
            vec!["--impair-direction", "sideways", "--duplicate", "1%"],
            "invalid value 'sideways' for --impair-direction: accepted: egress",
        ),
        (
            vec!["--impair-direction", "ingress"],
            "--impair-direction says where --duplicate and --corrupt apply: it needs one of them",
        ),
        (
            vec![
                "--impair-direction",
                "both",
                "--reorder",
                "5%",
                "--latency",
                "10ms",
            ],
            "invalid value 'both' for --impair-direction with --reorder",
        ),
    ] {
        let mut full = vec!["run"];
        full.extend(args.iter().copied());
        full.extend(["--", testbin.to_str().unwrap(), "sleep", "0"]);
        let run = nbt(&full);
        assert_eq!(run.status(), 2, "{args:?}: {}", run.stderr());
        assert!(run.stderr().contains(says), "{args:?}: {}", run.stderr());
    }
}
