//! `cargo xtask bench net`: nbt's shaping against the seed's own method (`tc htb`), side by side
//! in one run, on one veth pair between two namespaces of the bench's own (TEST-NET-1 addresses,
//! reachable nowhere else). Not a test: it prints a table, and docs/benchmarks.md keeps it.

#[path = "../../tests/src/rate.rs"]
pub(crate) mod rate;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

pub(crate) const ADDR_A: &str = "192.0.2.1";
pub(crate) const ADDR_B: &str = "192.0.2.2";
/// Payload per full TCP segment (timestamps on) and its IP and Ethernet sizes.
const MSS: f64 = 1448.0;
const IP_PACKET: f64 = 1500.0;
const ETHERNET_FRAME: f64 = 1514.0;
/// The ports of the bulk flow and of the request/response flow, on the receiving side.
const BULK_PORT: u16 = 5301;
const ECHO_PORT: u16 = 5302;

/// Two namespaces of the bench's own, `a` and `b`, joined by a veth pair (`veth_a` in a, `veth_b`
/// in b); removed on drop. `cargo xtask bench paths` uses them too.
pub(crate) struct Netns {
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) veth_a: String,
    pub(crate) veth_b: String,
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip (iproute2)")?;
    if !status.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

impl Netns {
    pub(crate) fn new() -> Result<Netns> {
        let id = std::process::id();
        let netns = Netns {
            a: format!("nbt-bench-{id}-a"),
            b: format!("nbt-bench-{id}-b"),
            veth_a: format!("nbtb{}a", id % 100_000),
            veth_b: format!("nbtb{}b", id % 100_000),
        };
        let veth_b = netns.veth_b.clone();
        ip(&["netns", "add", &netns.a])?;
        ip(&["netns", "add", &netns.b])?;
        ip(&[
            "-n",
            &netns.a,
            "link",
            "add",
            &netns.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
            "netns",
            &netns.b,
        ])?;
        ip(&[
            "-n",
            &netns.a,
            "addr",
            "add",
            &format!("{ADDR_A}/24"),
            "dev",
            &netns.veth_a,
        ])?;
        ip(&[
            "-n",
            &netns.b,
            "addr",
            "add",
            &format!("{ADDR_B}/24"),
            "dev",
            &veth_b,
        ])?;
        for (ns, dev) in [(&netns.a, &netns.veth_a), (&netns.b, &veth_b)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(netns)
    }

    /// Sets the MTU of both ends of the veth pair.
    pub(crate) fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "mtu", &mtu])?;
        ip(&["-n", &self.b, "link", "set", &self.veth_b, "mtu", &mtu])
    }

    /// Runs `f` on a thread inside namespace `name`: sockets it makes stay there.
    fn spawn_in<T: Send + 'static>(
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with a namespace file we hold open.
            let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns");
            f()
        }))
    }

    /// `tc ARGS` in namespace a.
    pub(crate) fn tc(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.a];
        all.extend_from_slice(args);
        let status = Command::new("tc")
            .args(&all)
            .status()
            .context("running tc")?;
        if !status.success() {
            bail!("tc {} failed", all.join(" "));
        }
        Ok(())
    }

    /// Limits the veth's egress in namespace a to `rate` with one htb class, as the seed did.
    fn add_htb(&self, rate: &str) -> Result<()> {
        self.tc(&[
            "qdisc",
            "add",
            "dev",
            &self.veth_a,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            "12",
        ])?;
        self.tc(&[
            "class",
            "add",
            "dev",
            &self.veth_a,
            "parent",
            "1:",
            "classid",
            "1:12",
            "htb",
            "rate",
            rate,
            "ceil",
            rate,
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Bare,
    Htb,
    Nbt,
    /// nbt with egress loss and no rate: its tc program on the interface (to take the lost TCP
    /// segments), which a run with a rate alone does without.
    NbtLoss,
}

impl Method {
    /// As the progress lines name it.
    fn label(self) -> &'static str {
        match self {
            Method::Bare => "bare",
            Method::Htb => "tc htb",
            Method::Nbt => "nbt",
            Method::NbtLoss => "nbt, 0.01% loss",
        }
    }
}

struct Row {
    method: &'static str,
    rate: &'static str,
    /// Payload bits per second at the receiver over the steady window.
    goodput: f64,
    fraction: Option<f64>,
    p50: f64,
    p99: f64,
    cpu_seconds_per_gb: f64,
}

/// Busy CPU time of the whole machine, in seconds (user, nice, system, irq, softirq).
fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum::<f64>()
        / hz
}

/// Accepts one connection and reads it; returns (seconds since first byte, bytes so far) marks.
fn receive(listener: TcpListener) -> Vec<(f64, u64)> {
    match listener.accept() {
        Ok((stream, _)) => rate::read_marks(stream).0,
        Err(_) => Vec::new(),
    }
}

fn echo(listener: TcpListener) {
    if let Ok((mut stream, _)) = listener.accept() {
        let _ = stream.set_nodelay(true);
        let mut buffer = [0u8; 64];
        while stream.read_exact(&mut buffer).is_ok() {
            if stream.write_all(&buffer).is_err() {
                break;
            }
        }
    }
}

/// One method at one rate (or none): the workload's bulk goodput, RTTs and CPU cost.
fn case(
    netns: &Netns,
    bin: &Path,
    method: Method,
    rate: Option<(&'static str, f64)>,
    seconds: u64,
) -> Result<Row> {
    let receiver = Netns::spawn_in(&netns.b, move || {
        receive(TcpListener::bind((ADDR_B, BULK_PORT)).expect("bind bulk"))
    })?;
    let echoer = Netns::spawn_in(&netns.b, move || {
        echo(TcpListener::bind((ADDR_B, ECHO_PORT)).expect("bind echo"))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    if let (Method::Htb, Some((r, _))) = (method, rate) {
        netns.add_htb(r)?;
    }
    let mut command = workload(netns, bin, method, rate, seconds);
    let cpu_before = busy_cpu_seconds();
    let output = command.output().context("running the workload")?;
    let cpu = busy_cpu_seconds() - cpu_before;
    if method == Method::Htb {
        let _ = netns.tc(&["qdisc", "del", "dev", &netns.veth_a, "root"]);
    }
    if !output.status.success() {
        bail!(
            "the workload failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let marks = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let _ = echoer.join();
    let report = String::from_utf8_lossy(&output.stdout);
    Ok(row(method, rate, seconds, &marks, &report, cpu))
}

/// The testbin's stream-and-ping in namespace a: under `nbt run` (with the rate, if any) for
/// nbt, bare otherwise.
fn workload(
    netns: &Netns,
    bin: &Path,
    method: Method,
    rate: Option<(&'static str, f64)>,
    seconds: u64,
) -> Command {
    let workload = [
        bin.join("nbt-testbin").display().to_string(),
        "stream-and-ping".into(),
        format!("{ADDR_B}:{BULK_PORT}"),
        format!("{ADDR_B}:{ECHO_PORT}"),
        seconds.to_string(),
    ];
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{}", netns.a));
    if matches!(method, Method::Nbt | Method::NbtLoss) {
        command
            .arg(bin.join("nbt"))
            .args(["run", "--user", "nobody"]);
        if let Some((r, _)) = rate {
            command.args(["--egress-rate", r]);
        }
        if method == Method::NbtLoss {
            command.args(["--loss", "0.01%"]);
        }
        command.arg("--");
    }
    command.args(&workload);
    command
}

/// The number after the word `name` in the workload's report (NaN when there is none).
fn report_field(report: &str, name: &str) -> f64 {
    let words: Vec<&str> = report.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == name)
        .and_then(|i| words.get(i + 1)?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A case's row: the receiver's `marks`, the workload's `report` and the `cpu` seconds spent.
fn row(
    method: Method,
    rate: Option<(&'static str, f64)>,
    seconds: u64,
    marks: &[(f64, u64)],
    report: &str,
    cpu: f64,
) -> Row {
    let field = |name: &str| report_field(report, name);
    let goodput = rate::slope_bits_per_sec(marks, 2.0, seconds as f64 - 1.0);
    let total_bytes = marks.last().map(|m| m.1).unwrap_or(0) as f64;
    // What each method counts against its limit: htb the Ethernet frame, nbt the IP packet.
    let unit = if method == Method::Htb {
        ETHERNET_FRAME
    } else {
        IP_PACKET
    };
    // The request/response flow shares the limit: its 64-byte requests and every segment it sent
    // (52 bytes of IP and TCP headers each, plus 14 of Ethernet for htb; pure ACKs included)
    // count too, over the time it ran (from 0.5 s to about 0.5 s before the end, which covers
    // the window; a fixed 1.5 s less than the run overstated it by 4% at 512kbit, where it is a
    // fifth of the limit). Under a deep queue few requests run.
    let ping_bits = (field("samples") * 64.0 + field("segments") * (52.0 + unit - IP_PACKET)) * 8.0
        / field("ping_seconds");
    Row {
        method: match method {
            Method::Bare => "bare veth",
            Method::Htb => "tc htb (seed)",
            Method::Nbt if rate.is_some() => "nbt",
            Method::Nbt => "nbt, no limit",
            Method::NbtLoss => "nbt, 0.01% egress loss, no rate",
        },
        rate: rate.map(|r| r.0).unwrap_or("-"),
        goodput,
        fraction: rate.map(|(_, bits)| (goodput * unit / MSS + ping_bits) / bits),
        p50: field("rtt_ms_p50"),
        p99: field("rtt_ms_p99"),
        cpu_seconds_per_gb: cpu / (total_bytes / 1e9),
    }
}

pub fn net(workspace: &Path, repeat: u32) -> Result<()> {
    let bin: PathBuf = workspace.join("target/release");
    for name in ["nbt", "nbt-testbin"] {
        if !bin.join(name).exists() {
            bail!("{} is missing", bin.join(name).display());
        }
    }
    let netns = Netns::new()?;
    let rates: [(&'static str, f64, u64); 4] = [
        ("512kbit", 512e3, 14),
        ("10mbit", 10e6, 20),
        ("100mbit", 100e6, 20),
        ("1gbit", 1e9, 10),
    ];
    let mut rows = Vec::new();
    for (name, bits, seconds) in rates {
        for pass in 1..=repeat {
            for method in [Method::Htb, Method::Nbt] {
                eprintln!(
                    "xtask bench net: {name} with {} ({pass} of {repeat})",
                    method.label()
                );
                rows.push(case(&netns, &bin, method, Some((name, bits)), seconds)?);
            }
        }
    }
    for method in [Method::Bare, Method::Nbt, Method::NbtLoss] {
        eprintln!("xtask bench net: no rate, {}", method.label());
        rows.push(case(&netns, &bin, method, None, 10)?);
    }
    println!("| method | limit | bulk goodput (Mbit/s) | achieved / limit | RTT p50 (ms) | RTT p99 (ms) | busy CPU s per GB |");
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.3} | {} | {:.2} | {:.2} | {:.1} |",
            row.method,
            row.rate,
            row.goodput / 1e6,
            row.fraction
                .map(|f| format!("{f:.5}"))
                .unwrap_or_else(|| "-".into()),
            row.p50,
            row.p99,
            row.cpu_seconds_per_gb
        );
    }
    println!("\n| limit | htb mean error | htb worst error | nbt mean error | nbt worst error | passes |");
    println!("|---|---|---|---|---|---|");
    for (name, _, _) in rates {
        let errors = |method: &str| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.rate == name && r.method == method)
                .filter_map(|r| r.fraction.map(|f| (f - 1.0).abs() * 100.0))
                .collect()
        };
        let (htb, nbt) = (errors("tc htb (seed)"), errors("nbt"));
        let mean = |e: &[f64]| e.iter().sum::<f64>() / e.len().max(1) as f64;
        let worst = |e: &[f64]| e.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {name} | {:.3}% | {:.3}% | {:.3}% | {:.3}% | {repeat} |",
            mean(&htb),
            worst(&htb),
            mean(&nbt),
            worst(&nbt)
        );
    }
    let [bare, unlimited, lossy] = &rows[rows.len() - 3..] else {
        unreachable!("three rows with no rate");
    };
    println!(
        "\nnbt with no limit: {:.3} of bare veth throughput",
        unlimited.goodput / bare.goodput
    );
    println!(
        "nbt with 0.01% egress loss (its tc program on the veth): {:.3} x the busy CPU per GB of \
         nbt with no limit",
        lossy.cpu_seconds_per_gb / unlimited.cpu_seconds_per_gb
    );
    Ok(())
}
