//! `cargo xtask bench paths`: how close nbt's rate limits come to their rate on three paths, four
//! kinds of traffic, both directions and four rates, with `tc htb` (the seed's method) beside it
//! wherever htb can run. Not a test: it prints a markdown table, one row per cell, and a summary.
//!
//! The matrix:
//! - paths: the loopback of namespace a (MTU 65536, sender and receiver both in a, on
//!   127.0.0.1), and the veth pair of `bench net` between namespaces a and b (192.0.2.1 and
//!   192.0.2.2) at MTU 1500 and at MTU 9000;
//! - traffic: TCP with cubic, reno or bbr (the sender sets it on its socket with TCP_CONGESTION),
//!   and UDP: datagrams of the path's MTU less 28 bytes (at most 8972, so 8972 on lo), offered at
//!   twice the limit (IP bytes), measured at the receiver;
//! - directions: egress (the run sends: `nbt run --egress-rate R -- nbt-testbin ...` in a, the
//!   receiver outside the run) and ingress (the run receives under `--ingress-rate R
//!   --ingress-queue=false`, the policer, as where the kernel has no fq, this host; the sender
//!   is outside the run, in b, or on loopback in a);
//! - rates: 512kbit, 10mbit, 100mbit, 1gbit.
//!
//! htb runs beside nbt in both directions, with the same sender and receiver outside any run:
//! `tc qdisc add dev DEV root handle 1: htb default 1` and one class `1:1 htb rate R`. On egress
//! DEV is the sending interface (the veth in a, or `lo` of namespace a). On ingress it is an ifb
//! device of the bench's own in namespace a, and the receiving interface's `ingress` qdisc
//! redirects everything that arrives to it (`u32 match u32 0 0 action mirred egress redirect`),
//! as `tc` users shape what arrives; the ifb hands each packet back to the receiving interface
//! once htb lets it go. htb then queues what arrives where nbt, at ingress, can only drop.
//!
//! How "achieved / limit" is measured. The receiver (nbt-testbin `tcp-sink` or `udp-sink`)
//! records every read and reports the payload rate over the steady window, from 2 s after the
//! first byte to 0.5 s before the sender stops (the least-squares slope over all reads, as
//! `bench net`), and the payload bytes it got in all. Each limiter counts other bytes than
//! payload: nbt counts IP packets, headers included, with a GSO super-packet counted as the
//! segments it leaves as; htb counts what the qdisc sees, the Ethernet frame (on `lo` too: its
//! packets carry a 14-byte Ethernet header, checked with `tc -s class show` against lo's IP
//! bytes in /proc/net/dev, 66 bytes per TCP packet besides payload, 42 per UDP datagram; and on
//! `lo` the receiver's ACKs go through the class too, so they count against htb's limit).
//! Segment sizes differ by path and rate (nbt caps the MSS of the run's new connections at a
//! 32nd of its bucket, at least 1460), so the overhead is not modelled but measured: the bytes the
//! limiter counted over the whole transfer (nbt: the JSON summary's
//! `/shaped/<direction>/passed_bytes`; htb: the class's `Sent ... bytes` in `tc -s class show`),
//! per payload byte, times the steady window's payload rate, over the limit, is the row's figure.
//! The transfer ends gracefully (the sender half-closes and its socket drains), so both totals
//! cover the same bytes. Each limiter is judged in its own units, as it is configured in them.
//!
//! Retransmissions count against a limit but are no goodput, and they are not spread evenly: a
//! sender into htb's queue on `lo` retransmitted 263 KB in its first 0.55 s and nothing after,
//! which put 2.3% more bytes per payload byte on the whole transfer than in the window (a row of
//! 1.028 where htb's own counter read 1.000). So on egress, where every packet the sender sends
//! goes through the limiter, the ratio is taken per payload byte *sent* (received plus
//! retransmitted, the sender's `tcpi_bytes_retrans`), and the window's rate is the payload rate
//! received plus the rate retransmitted within the window (the sender reads its counter at the
//! window's edges). On ingress the sender's retransmissions are dropped in part before nbt counts
//! them, so the ratio stays per payload byte received.
//!
//! As a cross-check the notes give each limiter's own counter over the same window, polled every
//! 50 to 150 ms (htb: `tc -s class show`; nbt: `nbt ps --json`), on the sender's clock: with 64 KiB
//! packets (loopback at 10mbit is 19 of them a second) either figure moves by about half a
//! percent with where the packets fall.
//!
//! Congestion control: cubic is available on this kernel but may be missing from
//! `net.ipv4.tcp_allowed_congestion_control`, and then only a process with CAP_NET_ADMIN may
//! set it. That list is global (a flag on each algorithm), read-only inside a namespace since
//! Linux 5.13, and a namespace cannot take a restricted algorithm as its default either; the bench
//! changes neither. A sender outside the run is root anyway; an egress cell whose algorithm is
//! not allowed runs its workload as root instead of nobody (`nbt run --user root`, said in the
//! row's notes): nbt's limits do not depend on the user.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::bench::{Netns, ADDR_A, ADDR_B};

/// The steady window starts this long after the receiver's first byte...
const SKIP_SECONDS: f64 = 2.0;
/// ...and ends this long before the sender stops.
const TAIL_SECONDS: f64 = 0.5;
/// UDP senders offer this many times the limit.
const UDP_OVERLOAD: f64 = 2.0;
/// The receivers' first port; each cell takes the next one.
const FIRST_PORT: u16 = 5400;

/// The options of `cargo xtask bench paths` (the other benchmarks refuse them).
#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// For `paths`: how long each cell's sender sends, in seconds; the rate is read from 2 s after
    /// the first byte to 0.5 s before the end [default: 8]
    #[arg(long, value_parser = clap::value_parser!(u64).range(4..=300))]
    pub seconds: Option<u64>,
    /// For `paths`: only these paths: lo, 1500, 9000 (comma-separated or repeated)
    #[arg(long = "path", value_delimiter = ',', value_parser = ["lo", "1500", "9000"])]
    pub paths: Vec<String>,
    /// For `paths`: only this traffic: cubic, reno, bbr (TCP), udp
    #[arg(long = "traffic", value_delimiter = ',', value_parser = ["cubic", "reno", "bbr", "udp"])]
    pub traffic: Vec<String>,
    /// For `paths`: only this direction: egress, ingress
    #[arg(long = "direction", value_delimiter = ',', value_parser = ["egress", "ingress"])]
    pub directions: Vec<String>,
    /// For `paths`: only these rates (512kbit, 10mbit, 100mbit, 1gbit, or any NUMBER kbit, mbit,
    /// gbit)
    #[arg(long = "rate", value_delimiter = ',')]
    pub rates: Vec<String>,
}

impl Options {
    /// Whether any option was given (the other benchmarks refuse them).
    pub fn any(&self) -> bool {
        self.seconds.is_some()
            || !self.paths.is_empty()
            || !self.traffic.is_empty()
            || !self.directions.is_empty()
            || !self.rates.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NetPath {
    /// The loopback of namespace a.
    Lo,
    /// The veth pair between a and b, at this MTU.
    Veth(u32),
}

impl NetPath {
    fn label(self) -> String {
        match self {
            NetPath::Lo => "lo (MTU 65536)".into(),
            NetPath::Veth(mtu) => format!("veth MTU {mtu}"),
        }
    }

    fn mtu(self) -> u32 {
        match self {
            NetPath::Lo => 65536,
            NetPath::Veth(mtu) => mtu,
        }
    }

    /// The UDP payload per datagram: as much as one IP packet of the MTU carries, at most 8972.
    fn udp_size(self) -> u64 {
        (u64::from(self.mtu()) - 28).min(8972)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// TCP with this congestion control.
    Tcp(&'static str),
    Udp,
}

impl Traffic {
    fn label(self) -> &'static str {
        match self {
            Traffic::Tcp(cc) => cc,
            Traffic::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Htb,
    Nbt,
}

#[derive(Clone)]
struct Rate {
    /// As tc and nbt write it (10mbit).
    label: String,
    bits: f64,
}

/// `512kbit`, `10mbit`, `1gbit`, `2500bit`: bits per second.
fn parse_rate(text: &str) -> Result<Rate> {
    let lower = text.to_ascii_lowercase();
    let (number, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, scale)| lower.strip_suffix(unit).map(|n| (n.to_string(), *scale)))
        .ok_or_else(|| anyhow!("--rate {text}: write it as tc does: 512kbit, 10mbit, 1gbit"))?;
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| *v > 0.0 && v.is_finite())
        .ok_or_else(|| anyhow!("--rate {text}: not a positive number of bits"))?;
    Ok(Rate {
        label: lower,
        bits: value * scale,
    })
}

struct Cell {
    path: NetPath,
    traffic: Traffic,
    direction: Direction,
    rate: Rate,
}

/// One method's run of one cell.
struct Sample {
    /// Payload bits per second at the receiver over the steady window.
    goodput: f64,
    /// Payload bytes the receiver got over the whole transfer.
    payload: u64,
    /// Bytes the limiter counted over the whole transfer (nbt: passed IP bytes in the limited
    /// direction; htb: the class's bytes sent).
    counted: u64,
    /// Packets the limiter counted (nbt: passed skbs; htb: packets, GSO segments each).
    packets: u64,
    /// nbt: packets dropped for the rate; htb: packets its queue dropped.
    dropped: u64,
    /// UDP: the sender's offered rate, IP bits per second.
    offered: Option<f64>,
    /// TCP: the sender's segment size at the end of the transfer.
    mss: Option<u64>,
    /// TCP: payload bytes the sender sent again (they count against the limit, not as goodput).
    retransmitted: u64,
    /// TCP egress: the payload bits per second the sender sent again within the window. Only
    /// when the sender's every packet goes through the limiter (egress): an ingress sender's
    /// retransmissions are dropped there in part.
    retransmit_rate: Option<f64>,
    /// UDP: datagrams the receiving socket dropped (its buffer full).
    socket_drops: Option<u64>,
    /// The run's workload ran as root (its congestion control is not allowed for others).
    as_root: bool,
    /// The limiter's own counter over the window (polled; a cross-check), in bits per second.
    counter_rate: f64,
}

impl Sample {
    /// The limiter's bytes per payload byte it let through: per payload byte sent, with
    /// retransmissions, where the sender's retransmissions are known to go through it (egress);
    /// else per payload byte received.
    fn overhead(&self) -> f64 {
        let sent = match self.retransmit_rate {
            Some(_) => self.payload + self.retransmitted,
            None => self.payload,
        };
        self.counted as f64 / sent as f64
    }

    /// The limiter's bytes over the window, per second, over the limit.
    fn achieved(&self, limit: f64) -> f64 {
        (self.goodput + self.retransmit_rate.unwrap_or(0.0)) * self.overhead() / limit
    }

    /// Whether a UDP sender offered less than the limit (its CPU, not the limiter, set the rate).
    fn under_offered(&self, limit: f64) -> bool {
        self.offered.is_some_and(|o| o < limit)
    }
}

/// A process whose stdout is read line by line as it comes, stopped (SIGTERM, then SIGKILL) if
/// it is still running when dropped: nothing outlives a failed cell.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reaped: bool,
}

impl Proc {
    fn spawn(name: &str, mut command: Command) -> Result<Proc> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("{command:?}");
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(err).read_to_string(&mut text);
            text
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process prints the line `line`.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) => {
                    let found = got.trim() == line;
                    self.stdout.push(got);
                    if found {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{} did not print '{line}' within {timeout:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    self.reaped = true;
                    let tail = self.stderr_tail();
                    bail!("{} ended before printing '{line}': {tail}", self.name)
                }
            }
        }
    }

    /// The last lines of the process's stderr, once it has ended.
    fn stderr_tail(&mut self) -> String {
        let Some(handle) = self.stderr.take() else {
            return String::new();
        };
        // A grandchild may hold the pipe open: wait a little, not forever.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !handle.is_finished() {
            return String::new();
        }
        let text = handle.join().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(6)..].join(" / ")
    }

    /// Waits for the process to end, at most `timeout` (then it is stopped on drop); its stdout.
    fn finish(mut self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reaped = true;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stdout.push(line);
        }
        if !status.success() {
            let tail = self.stderr_tail();
            bail!("{} failed ({status}): {tail}", self.name);
        }
        Ok(std::mem::take(&mut self.stdout))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SIGTERM first: nbt forwards it to its workload and removes what the run made.
        // SAFETY: kill(2) on our own child, which has not been reaped (its pid is still ours).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An htb root qdisc on a device of namespace a, removed on drop.
struct Htb<'a> {
    netns: &'a Netns,
    dev: String,
}

impl<'a> Htb<'a> {
    fn add(netns: &'a Netns, dev: &str, rate: &str) -> Result<Htb<'a>> {
        let htb = Htb {
            netns,
            dev: dev.to_string(),
        };
        add_htb_root(netns, dev, rate)?;
        Ok(htb)
    }

    /// The class's (bytes, packets, dropped).
    fn counters(&self) -> Result<(u64, u64, u64)> {
        htb_counters(&self.netns.a, &self.dev)
    }
}

/// htb on the root of `dev` in namespace a: one class, 1:1, at `rate`, that takes everything.
fn add_htb_root(netns: &Netns, dev: &str, rate: &str) -> Result<()> {
    tc_line(
        netns,
        &format!("qdisc add dev {dev} root handle 1: htb default 1"),
    )?;
    tc_line(
        netns,
        &format!("class add dev {dev} parent 1: classid 1:1 htb rate {rate}"),
    )
}

/// `tc` in namespace a with the words of `line` as its arguments.
fn tc_line(netns: &Netns, line: &str) -> Result<()> {
    netns.tc(&line.split_whitespace().collect::<Vec<_>>())
}

/// Class 1:1's (bytes, packets, dropped) on `dev` of namespace `ns`, from `tc -s class show`.
fn htb_counters(ns: &str, dev: &str) -> Result<(u64, u64, u64)> {
    let out = Command::new("tc")
        .args(["-s", "-n", ns, "class", "show", "dev", dev])
        .args(["classid", "1:1"])
        .output()
        .context("running tc")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // " Sent 123 bytes 4 pkt (dropped 0, overlimits 5 requeues 0)"
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let after = |word: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == word)?;
        words.get(at + 1)?.parse().ok()
    };
    let before = |word: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == word)?;
        words.get(at.checked_sub(1)?)?.parse().ok()
    };
    match (before("bytes"), before("pkt"), after("dropped")) {
        (Some(bytes), Some(packets), Some(dropped)) => Ok((bytes, packets, dropped)),
        _ => bail!("no counters in `tc -s class show dev {dev}`: {text}"),
    }
}

impl Drop for Htb<'_> {
    fn drop(&mut self) {
        let _ = self.netns.tc(&["qdisc", "del", "dev", &self.dev, "root"]);
    }
}

/// htb on what arrives at a device of namespace a: an ifb device of the bench's own with htb on
/// its root, and the device's `ingress` qdisc redirecting every packet to it. All removed on drop.
struct IngressHtb<'a> {
    netns: &'a Netns,
    dev: String,
    ifb: String,
}

impl<'a> IngressHtb<'a> {
    fn add(netns: &'a Netns, dev: &str, rate: &str) -> Result<IngressHtb<'a>> {
        let ifb = format!("nbtifb{}", std::process::id() % 100_000);
        crate::bench::ip(&["-n", &netns.a, "link", "add", &ifb, "type", "ifb"])?;
        // From here on, drop removes what was added, also when a step below fails.
        let shaper = IngressHtb {
            netns,
            dev: dev.to_string(),
            ifb,
        };
        crate::bench::ip(&["-n", &netns.a, "link", "set", &shaper.ifb, "up"])?;
        add_htb_root(netns, &shaper.ifb, rate)?;
        tc_line(netns, &format!("qdisc add dev {dev} handle ffff: ingress"))?;
        tc_line(
            netns,
            &format!(
                "filter add dev {dev} parent ffff: protocol all u32 match u32 0 0 \
                 action mirred egress redirect dev {}",
                shaper.ifb
            ),
        )?;
        Ok(shaper)
    }

    /// The class's (bytes, packets, dropped).
    fn counters(&self) -> Result<(u64, u64, u64)> {
        htb_counters(&self.netns.a, &self.ifb)
    }
}

impl Drop for IngressHtb<'_> {
    fn drop(&mut self) {
        let _ = self.netns.tc(&[
            "qdisc", "del", "dev", &self.dev, "handle", "ffff:", "ingress",
        ]);
        let _ = crate::bench::ip(&["-n", &self.netns.a, "link", "del", &self.ifb]);
    }
}

/// A file of the bench's own, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Polls a limiter's byte counter every 50 to 150 ms on a thread: (seconds since the start,
/// bytes). The interval varies so that it does not beat with the limiter's bursts (htb on lo at
/// 10mbit lets two 64 KiB packets go every 105 ms).
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, u64)>>>,
}

impl Sampler {
    /// Samples the bytes htb's class 1:1 on `dev` of namespace `ns` let through.
    fn htb(ns: &str, dev: &str) -> Sampler {
        let (ns, dev) = (ns.to_string(), dev.to_string());
        Sampler::start(move || htb_counters(&ns, &dev).ok().map(|c| c.0))
    }

    /// Samples the bytes the run of nbt process `pid` let through in `direction`.
    fn nbt(nbt: &Path, pid: u32, direction: &'static str) -> Sampler {
        let nbt = nbt.to_path_buf();
        Sampler::start(move || nbt_passed_bytes(&nbt, pid, direction))
    }

    fn start(read: impl Fn() -> Option<u64> + Send + 'static) -> Sampler {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut marks = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let at = start.elapsed().as_secs_f64();
                if let Some(bytes) = read() {
                    // The read takes a few ms: its middle is when the count held.
                    let at = (at + start.elapsed().as_secs_f64()) / 2.0;
                    marks.push((at, bytes));
                }
                // The nanoseconds of the clock are random enough for a spread of intervals.
                let jitter = u64::from(start.elapsed().subsec_nanos() % 100);
                std::thread::sleep(Duration::from_millis(50 + jitter));
            }
            marks
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// The limiter's counted bits per second between `from` and `to` seconds after the start.
    fn rate(mut self, from: f64, to: f64) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let marks = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        crate::bench::rate::slope_bits_per_sec(&marks, from, to)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The passed bytes in `direction` of the live run whose nbt has pid `pid`, from `nbt ps --json`.
fn nbt_passed_bytes(nbt: &Path, pid: u32, direction: &str) -> Option<u64> {
    let out = Command::new(nbt).args(["ps", "--json"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut json = Json {
        text: text.as_bytes(),
        at: 0,
    };
    json.eat(b'[')?;
    loop {
        let start = json.at;
        json.skip_value()?;
        let run = std::str::from_utf8(&json.text[start..json.at]).ok()?;
        if json_number(run, &["nbt_pid"]) == Some(f64::from(pid)) {
            return json_number(run, &["shaped", direction, "passed_bytes"]).map(|b| b as u64);
        }
        json.eat(b',')?;
    }
}

/// A small reader of JSON, enough to find a number by its keys in nbt's summary.
struct Json<'a> {
    text: &'a [u8],
    at: usize,
}

impl Json<'_> {
    fn space(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.space();
        (self.text.get(self.at) == Some(&byte)).then(|| self.at += 1)
    }

    /// A string's raw text (escapes left as they are: the keys we look for have none).
    fn string(&mut self) -> Option<&[u8]> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            match self.text.get(self.at)? {
                b'\\' => self.at += 2,
                b'"' => break,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        Some(&self.text[start..self.at - 1])
    }

    fn skip_value(&mut self) -> Option<()> {
        self.space();
        match self.text.get(self.at)? {
            b'"' => self.string().map(|_| ()),
            open @ (b'{' | b'[') => {
                let object = *open == b'{';
                self.at += 1;
                if self.eat(if object { b'}' } else { b']' }).is_some() {
                    return Some(());
                }
                loop {
                    if object {
                        self.string()?;
                        self.eat(b':')?;
                    }
                    self.skip_value()?;
                    if self.eat(b',').is_none() {
                        return self.eat(if object { b'}' } else { b']' });
                    }
                }
            }
            _ => {
                while self
                    .text
                    .get(self.at)
                    .is_some_and(|b| !b",]} \t\r\n".contains(b))
                {
                    self.at += 1;
                }
                Some(())
            }
        }
    }

    /// In the object at the cursor, moves to the value of `key`.
    fn member(&mut self, key: &str) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return None;
        }
        loop {
            let found = self.string()? == key.as_bytes();
            self.eat(b':')?;
            if found {
                return Some(());
            }
            self.skip_value()?;
            self.eat(b',')?;
        }
    }
}

/// The number at `keys` in the JSON object `text`.
fn json_number(text: &str, keys: &[&str]) -> Option<f64> {
    let mut json = Json {
        text: text.as_bytes(),
        at: 0,
    };
    for key in keys {
        json.member(key)?;
    }
    json.space();
    let start = json.at;
    json.skip_value()?;
    std::str::from_utf8(&json.text[start..json.at])
        .ok()?
        .parse()
        .ok()
}

/// nbt's JSON summary among a run's stdout lines (the workload's lines come first).
fn summary(lines: &[String]) -> Result<&str> {
    lines
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .map(String::as_str)
        .ok_or_else(|| anyhow!("nbt printed no JSON summary"))
}

/// The number after the word `name` on the workload's lines (not the JSON summary).
fn field(lines: &[String], name: &str) -> Option<f64> {
    lines
        .iter()
        .filter(|l| !l.trim_start().starts_with('{'))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == name)?;
            words.get(at + 1)?.parse().ok()
        })
}

/// The word after `name` on the workload's lines.
fn word(lines: &[String], name: &str) -> Option<String> {
    lines.iter().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1).map(|w| w.to_string())
    })
}

fn need(lines: &[String], name: &str, whose: &str) -> Result<f64> {
    field(lines, name).ok_or_else(|| anyhow!("{whose} reported no {name}: {lines:?}"))
}

/// `program args` inside namespace `ns` (nsenter keeps the host's mounts, cgroup2 included,
/// which `ip netns exec` would hide from nbt).
fn nsenter(ns: &str, program: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{ns}")).arg(program);
    command
}

/// The congestion control algorithms a process without CAP_NET_ADMIN may choose.
fn allowed_congestion_control() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

struct Bench {
    netns: Netns,
    bin: PathBuf,
    receipts: TempFile,
    seconds: u64,
    next_port: u16,
    allowed: Vec<String>,
}

impl Bench {
    fn port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port >= FIRST_PORT + 500 {
            FIRST_PORT
        } else {
            port + 1
        };
        port
    }

    fn testbin(&self) -> PathBuf {
        self.bin.join("nbt-testbin")
    }

    /// `nbt run` in namespace a with the cell's limit, running `workload` as `user`.
    fn nbt_run(&self, cell: &Cell, user: &str, workload: &[String]) -> Command {
        let mut command = nsenter(&self.netns.a, &self.bin.join("nbt"));
        let flag = match cell.direction {
            Direction::Egress => "--egress-rate",
            Direction::Ingress => "--ingress-rate",
        };
        command.args(["run", "--json", "--user", user, flag, &cell.rate.label]);
        // The policer, named: the default queues where the kernel has fq (`bench vm-ingress`).
        if cell.direction == Direction::Ingress {
            command.arg("--ingress-queue=false");
        }
        command
            .arg("--receipts")
            .arg(&self.receipts.0)
            .arg("--")
            .args(workload);
        command
    }

    /// The sender's arguments to nbt-testbin, sending to `to`.
    fn sender_args(&self, cell: &Cell, to: &str) -> Vec<String> {
        let seconds = self.seconds.to_string();
        match cell.traffic {
            Traffic::Tcp(cc) => vec![
                "tcp-stream".into(),
                to.into(),
                seconds,
                cc.into(),
                SKIP_SECONDS.to_string(),
                self.window_end().to_string(),
            ],
            Traffic::Udp => vec![
                "udp-blast".into(),
                to.into(),
                seconds,
                cell.path.udp_size().to_string(),
                format!("{:.0}", cell.rate.bits * UDP_OVERLOAD),
            ],
        }
    }

    /// The receiver's arguments to nbt-testbin, listening on `on`.
    fn sink_args(&self, cell: &Cell, on: &str) -> Vec<String> {
        let mode = match cell.traffic {
            Traffic::Tcp(_) => "tcp-sink",
            Traffic::Udp => "udp-sink",
        };
        vec![
            mode.into(),
            on.into(),
            SKIP_SECONDS.to_string(),
            self.window_end().to_string(),
        ]
    }

    /// nbt-testbin with `args` in namespace `ns`, outside any run (as root).
    fn testbin_in(&self, ns: &str, args: &[String]) -> Command {
        let mut command = nsenter(ns, &self.testbin());
        command.args(args);
        command
    }

    /// Where the steady window ends, in seconds after the sender's start (or first byte).
    fn window_end(&self) -> f64 {
        self.seconds as f64 - TAIL_SECONDS
    }

    /// The steady window's length in seconds.
    fn window(&self) -> f64 {
        self.window_end() - SKIP_SECONDS
    }

    /// How long a sender may take: its seconds, then its socket's drain at the limit.
    fn sender_timeout(&self) -> Duration {
        Duration::from_secs(self.seconds + 60)
    }

    fn run(&mut self, cell: &Cell, method: Method) -> Result<Sample> {
        match cell.direction {
            Direction::Egress => self.egress(cell, method),
            Direction::Ingress => self.ingress(cell, method),
        }
    }

    /// The run (or, for htb, the bare sender) sends from namespace a.
    fn egress(&mut self, cell: &Cell, method: Method) -> Result<Sample> {
        let port = self.port();
        let (receiver_ns, address, dev) = match cell.path {
            NetPath::Lo => (self.netns.a.clone(), "127.0.0.1", "lo".to_string()),
            NetPath::Veth(_) => (self.netns.b.clone(), ADDR_B, self.netns.veth_a.clone()),
        };
        let at = format!("{address}:{port}");
        let sink = self.testbin_in(&receiver_ns, &self.sink_args(cell, &at));
        let mut receiver = Proc::spawn("the receiver", sink)?;
        receiver.wait_for("listening", Duration::from_secs(10))?;
        let workload = self.sender_args(cell, &at);
        let as_root = match cell.traffic {
            Traffic::Tcp(cc) => method == Method::Nbt && !self.allowed.iter().any(|a| a == cc),
            Traffic::Udp => false,
        };
        let counter_rate;
        let (sender_out, limiter) = match method {
            Method::Htb => {
                let htb = Htb::add(&self.netns, &dev, &cell.rate.label)?;
                let command = self.testbin_in(&self.netns.a, &workload);
                let sender = Proc::spawn("the sender", command)?;
                let sampler = Sampler::htb(&self.netns.a, &dev);
                let out = sender.finish(self.sender_timeout())?;
                counter_rate = sampler.rate(SKIP_SECONDS, self.window_end());
                let (bytes, packets, dropped) = htb.counters()?;
                // The sender's own rate is no offered load here: the datagrams htb holds fill
                // its socket's send buffer, and then the sender waits.
                (out, Limiter::Htb(bytes, packets, dropped))
            }
            Method::Nbt => {
                let mut full = vec![self.testbin().display().to_string()];
                full.extend(workload);
                let user = if as_root { "root" } else { "nobody" };
                let command = self.nbt_run(cell, user, &full);
                let sender = Proc::spawn("nbt run (the sender)", command)?;
                let sampler = Sampler::nbt(&self.bin.join("nbt"), sender.pid(), "egress");
                let out = sender.finish(self.sender_timeout())?;
                counter_rate = sampler.rate(SKIP_SECONDS, self.window_end());
                let json = summary(&out)?.to_string();
                (out, Limiter::Nbt(json))
            }
        };
        let receiver_out = receiver.finish(Duration::from_secs(20))?;
        let mut sample = sample(cell, &sender_out, &receiver_out, &limiter, self.window())?;
        sample.as_root = as_root;
        sample.counter_rate = counter_rate;
        if method == Method::Htb {
            sample.offered = None;
        }
        Ok(sample)
    }

    /// The run (or, for htb, the bare receiver) receives in namespace a; the sender is outside
    /// it (in b, or on lo in a).
    fn ingress(&mut self, cell: &Cell, method: Method) -> Result<Sample> {
        let port = self.port();
        let (sender_ns, address, dev) = match cell.path {
            NetPath::Lo => (self.netns.a.clone(), "127.0.0.1", "lo".to_string()),
            NetPath::Veth(_) => (self.netns.b.clone(), ADDR_A, self.netns.veth_a.clone()),
        };
        let at = format!("{address}:{port}");
        let sink = self.sink_args(cell, &at);
        let (htb, mut receiver) = match method {
            Method::Htb => (
                Some(IngressHtb::add(&self.netns, &dev, &cell.rate.label)?),
                Proc::spawn("the receiver", self.testbin_in(&self.netns.a, &sink))?,
            ),
            Method::Nbt => {
                let mut full = vec![self.testbin().display().to_string()];
                full.extend(sink);
                let command = self.nbt_run(cell, "nobody", &full);
                (None, Proc::spawn("nbt run (the receiver)", command)?)
            }
        };
        receiver.wait_for("listening", Duration::from_secs(20))?;
        let command = self.testbin_in(&sender_ns, &self.sender_args(cell, &at));
        let sender = Proc::spawn("the sender", command)?;
        let sampler = match &htb {
            Some(htb) => Sampler::htb(&self.netns.a, &htb.ifb),
            None => Sampler::nbt(&self.bin.join("nbt"), receiver.pid(), "ingress"),
        };
        let sender_out = sender.finish(self.sender_timeout())?;
        let counter_rate = sampler.rate(SKIP_SECONDS, self.window_end());
        let receiver_out = receiver.finish(Duration::from_secs(30))?;
        let limiter = match &htb {
            Some(htb) => {
                let (bytes, packets, dropped) = htb.counters()?;
                Limiter::Htb(bytes, packets, dropped)
            }
            None => Limiter::Nbt(summary(&receiver_out)?.to_string()),
        };
        let mut sample = sample(cell, &sender_out, &receiver_out, &limiter, self.window())?;
        sample.counter_rate = counter_rate;
        Ok(sample)
    }
}

/// What the limiter counted: htb's class (bytes, packets, dropped), or nbt's JSON summary.
enum Limiter {
    Htb(u64, u64, u64),
    Nbt(String),
}

/// A run's sample from what its sender, receiver and limiter reported; `window` is the steady
/// window's length in seconds.
fn sample(
    cell: &Cell,
    sender: &[String],
    receiver: &[String],
    limiter: &Limiter,
    window: f64,
) -> Result<Sample> {
    let goodput = need(receiver, "rate_bits_per_sec", "the receiver")?;
    let payload = need(receiver, "received", "the receiver")? as u64;
    if payload == 0 || !goodput.is_finite() {
        bail!("the receiver got too little in the window: {receiver:?}");
    }
    let (counted, packets, dropped) = match limiter {
        Limiter::Htb(bytes, packets, dropped) => (*bytes, *packets, *dropped),
        Limiter::Nbt(json) => {
            let code = json_number(json, &["exit", "code"]);
            if code != Some(0.0) {
                bail!("the run's workload exited with {code:?}");
            }
            let direction = cell.direction.label();
            let get = |key: &str| {
                json_number(json, &["shaped", direction, key])
                    .map(|v| v as u64)
                    .ok_or_else(|| anyhow!("no /shaped/{direction}/{key} in nbt's summary"))
            };
            (
                get("passed_bytes")?,
                get("passed_packets")?,
                get("rate_dropped_packets")?,
            )
        }
    };
    let (mut offered, mut mss, mut socket_drops, mut retransmitted) = (None, None, None, 0);
    let mut retransmit_rate = None;
    match cell.traffic {
        Traffic::Tcp(cc) => {
            let used = word(sender, "cc").unwrap_or_default();
            if used != cc {
                bail!("the sender asked for {cc} and used '{used}'");
            }
            mss = field(sender, "mss").map(|m| m as u64);
            retransmitted = need(sender, "retransmitted", "the sender")? as u64;
            if cell.direction == Direction::Egress {
                let in_window = need(sender, "retransmitted_in_window", "the sender")?;
                retransmit_rate = Some(in_window * 8.0 / window);
            }
        }
        Traffic::Udp => {
            offered = Some(need(sender, "offered_bits_per_sec", "the sender")?);
            // The socket's drop count includes what a cgroup program dropped on its way in:
            // nbt's ingress drops; what is left, the socket's full buffer dropped.
            let shaped = match (limiter, cell.direction) {
                (Limiter::Nbt(_), Direction::Ingress) => dropped,
                _ => 0,
            };
            socket_drops =
                field(receiver, "socket_drops").map(|d| (d as u64).saturating_sub(shaped));
        }
    }
    Ok(Sample {
        goodput,
        payload,
        counted,
        packets,
        dropped,
        offered,
        mss,
        retransmitted,
        retransmit_rate,
        socket_drops,
        as_root: false,
        counter_rate: f64::NAN,
    })
}

/// One printed row's results, kept for the summaries.
struct Row {
    path: NetPath,
    traffic: Traffic,
    direction: Direction,
    rate: String,
    htb: Option<f64>,
    nbt: Option<f64>,
}

/// What issue 20 asks of each cell: within 1% of the limit.
const WITHIN: f64 = 1.0;

/// |achieved / limit - 1| in percent.
fn error_percent(achieved: f64) -> f64 {
    (achieved - 1.0).abs() * 100.0
}

/// Mean and worst of errors in percent, and how many are within [`WITHIN`]; "-" for none.
struct Errors(Vec<f64>);

impl Errors {
    fn of(rows: &[&Row], method: fn(&Row) -> Option<f64>) -> Errors {
        Errors(
            rows.iter()
                .filter_map(|r| method(r))
                .map(error_percent)
                .collect(),
        )
    }

    fn mean(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        format!("{:.2}%", self.0.iter().sum::<f64>() / self.0.len() as f64)
    }

    fn worst_percent(&self) -> Option<f64> {
        self.0.iter().cloned().reduce(f64::max)
    }

    fn worst(&self) -> String {
        match self.worst_percent() {
            Some(worst) => format!("{worst:.2}%"),
            None => "-".into(),
        }
    }

    /// "K of N": how many are within [`WITHIN`].
    fn count_within(&self) -> String {
        let within = self.0.iter().filter(|e| **e <= WITHIN).count();
        format!("{within} of {}", self.0.len())
    }

    fn within(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        self.count_within()
    }
}

/// "0.99871" (and a mark when the sender offered less than the limit).
fn fraction(sample: &Option<Sample>, failed: bool, limit: f64) -> String {
    match sample {
        Some(s) if s.under_offered(limit) => {
            format!("{:.5} (offered below the limit)", s.achieved(limit))
        }
        Some(s) => format!("{:.5}", s.achieved(limit)),
        None if failed => "failed".into(),
        None => "-".into(),
    }
}

fn notes(cell: &Cell, htb: &Option<Sample>, nbt: &Option<Sample>) -> String {
    let limit = cell.rate.bits;
    let mut notes = Vec::new();
    if let Some(s) = htb {
        // What each packet through the class carried besides its payload, retransmissions left
        // out: 66 bytes for TCP with timestamps (Ethernet 14, IP 20, TCP 32; pure ACKs too, which
        // go through the class on lo), 42 for UDP.
        let framing = (s.counted as f64 - s.payload as f64 - s.retransmitted as f64)
            / s.packets.max(1) as f64;
        let mut note = format!(
            "htb: {:.4} bytes per payload byte, {framing:.1} B per packet besides payload, \
             {:.5} by its counter",
            s.overhead(),
            s.counter_rate / limit
        );
        if let Some(mss) = s.mss {
            note += &format!(", MSS {mss}");
        }
        if s.retransmitted > 0 {
            note += &format!(", {} B retransmitted", s.retransmitted);
        }
        if s.dropped > 0 {
            note += &format!(", {} dropped by its queue", s.dropped);
        }
        notes.push(note);
    }
    if let Some(s) = nbt {
        let mut note = format!(
            "nbt: {:.4} IP bytes per payload byte, {:.5} by its counter",
            s.overhead(),
            s.counter_rate / limit
        );
        if let Some(mss) = s.mss {
            note += &format!(", MSS {mss}");
        }
        if s.retransmitted > 0 {
            note += &format!(", {} B retransmitted", s.retransmitted);
        }
        if let Some(offered) = s.offered {
            note += &format!(
                ", sender offered {:.1} Mbit/s ({:.2} of the limit)",
                offered / 1e6,
                offered / limit
            );
        }
        if let Some(drops) = s.socket_drops.filter(|d| *d > 0) {
            note += &format!(", receiving socket dropped {drops} datagrams");
        }
        if s.as_root {
            note += &format!(
                ", workload as root ({} is not in tcp_allowed_congestion_control)",
                cell.traffic.label()
            );
        }
        notes.push(note);
    }
    notes.join("; ")
}

fn drops(nbt: &Option<Sample>) -> String {
    match nbt {
        Some(s) => format!(
            "{} ({:.2}%)",
            s.dropped,
            s.dropped as f64 * 100.0 / (s.dropped + s.packets).max(1) as f64
        ),
        None => "-".into(),
    }
}

/// Mean and worst |achieved / limit - 1| per path and direction, for htb and nbt, and how many
/// of the rows are within 1%.
fn print_summary(paths: &[NetPath], directions: &[Direction], rows: &[Row]) {
    println!("\n| path | direction | htb mean \\|error\\| | htb worst \\|error\\| | htb within 1% | nbt mean \\|error\\| | nbt worst \\|error\\| | nbt within 1% |");
    println!("|---|---|---|---|---|---|---|---|");
    for &path in paths {
        for &direction in directions {
            let rows: Vec<&Row> = rows
                .iter()
                .filter(|r| r.path == path && r.direction == direction)
                .collect();
            println!(
                "| {} | {} | {} |",
                path.label(),
                direction.label(),
                error_columns(&rows)
            );
        }
    }
}

/// htb's and nbt's mean, worst and within-1% columns over `rows`.
fn error_columns(rows: &[&Row]) -> String {
    [Errors::of(rows, |r| r.htb), Errors::of(rows, |r| r.nbt)]
        .iter()
        .map(|e| format!("{} | {} | {}", e.mean(), e.worst(), e.within()))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// With more than one pass: each cell's mean and worst error over its passes, for htb and nbt,
/// and in how many passes it was within 1%; a cell is within 1% only when its worst pass is.
fn print_cells(rows: &[Row]) {
    let mut cells: Vec<Vec<&Row>> = Vec::new();
    for row in rows {
        let key = |r: &Row| (r.path, r.traffic, r.direction, r.rate.clone());
        match cells.iter_mut().find(|c| key(c[0]) == key(row)) {
            Some(cell) => cell.push(row),
            None => cells.push(vec![row]),
        }
    }
    println!("\n| path | traffic | direction | rate | htb mean \\|error\\| | htb worst \\|error\\| | htb passes within 1% | nbt mean \\|error\\| | nbt worst \\|error\\| | nbt passes within 1% |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for cell in &cells {
        let row = cell[0];
        println!(
            "| {} | {} | {} | {} | {} |",
            row.path.label(),
            row.traffic.label(),
            row.direction.label(),
            row.rate,
            error_columns(cell)
        );
    }
    // A cell is within 1% in every pass when its worst pass is.
    let cells_within = |method: fn(&Row) -> Option<f64>| {
        Errors(
            cells
                .iter()
                .filter_map(|cell| Errors::of(cell, method).worst_percent())
                .collect(),
        )
        .count_within()
    };
    println!(
        "\ncells within 1% in every pass: htb {}, nbt {}",
        cells_within(|r| r.htb),
        cells_within(|r| r.nbt)
    );
}

pub fn run(workspace: &Path, repeat: u32, options: &Options) -> Result<()> {
    let bin: PathBuf = workspace.join("target/release");
    for name in ["nbt", "nbt-testbin"] {
        if !bin.join(name).exists() {
            bail!("{} is missing", bin.join(name).display());
        }
    }
    let chosen = |list: &[String], name: &str| list.is_empty() || list.iter().any(|l| l == name);
    let paths: Vec<NetPath> = [
        ("lo", NetPath::Lo),
        ("1500", NetPath::Veth(1500)),
        ("9000", NetPath::Veth(9000)),
    ]
    .into_iter()
    .filter(|(name, _)| chosen(&options.paths, name))
    .map(|(_, p)| p)
    .collect();
    let traffic: Vec<Traffic> = [
        Traffic::Tcp("cubic"),
        Traffic::Tcp("reno"),
        Traffic::Tcp("bbr"),
        Traffic::Udp,
    ]
    .into_iter()
    .filter(|t| chosen(&options.traffic, t.label()))
    .collect();
    let directions: Vec<Direction> = [Direction::Egress, Direction::Ingress]
        .into_iter()
        .filter(|d| chosen(&options.directions, d.label()))
        .collect();
    let rates: Vec<Rate> = if options.rates.is_empty() {
        ["512kbit", "10mbit", "100mbit", "1gbit"]
            .iter()
            .map(|r| parse_rate(r))
            .collect::<Result<_>>()?
    } else {
        options
            .rates
            .iter()
            .map(|r| parse_rate(r))
            .collect::<Result<_>>()?
    };
    let seconds = options.seconds.unwrap_or(8);
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    for t in &traffic {
        if let Traffic::Tcp(cc) = t {
            if !available.split_whitespace().any(|a| a == *cc) {
                eprintln!(
                    "xtask bench paths: {cc} is not in tcp_available_congestion_control ({}); \
                     its sender may load its module (tcp_{cc}) or fail",
                    available.trim()
                );
            }
        }
    }

    let cells = paths.len() * traffic.len() * rates.len();
    let runs = cells * repeat as usize * directions.len() * 2;
    // Each run takes its seconds and 2 to 3 more (start, drain, the receiver's end), 6 more
    // at 512kbit behind htb's queue.
    eprintln!(
        "xtask bench paths: {} cells, {runs} runs of {seconds} s: about {} minutes",
        cells * directions.len(),
        (runs as u64 * (2 * seconds + 5) / 2).div_ceil(60)
    );

    let mut bench = Bench {
        netns: Netns::new()?,
        receipts: TempFile(
            std::env::temp_dir().join(format!("nbt-bench-paths-{}.db", std::process::id())),
        ),
        bin,
        seconds,
        next_port: FIRST_PORT,
        allowed: allowed_congestion_control(),
    };
    // lo of a new namespace has MTU 65536 already; say so rather than trust it.
    crate::bench::ip(&["-n", &bench.netns.a, "link", "set", "lo", "mtu", "65536"])?;

    println!("| path | traffic | direction | rate | htb achieved / limit | nbt achieved / limit | nbt drops (rate) | notes |");
    println!("|---|---|---|---|---|---|---|---|");
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    for &path in &paths {
        if let NetPath::Veth(mtu) = path {
            bench.netns.set_mtu(mtu)?;
        }
        for &traffic in &traffic {
            for &direction in &directions {
                for rate in &rates {
                    let cell = Cell {
                        path,
                        traffic,
                        direction,
                        rate: rate.clone(),
                    };
                    for pass in 1..=repeat {
                        let methods = [Method::Htb, Method::Nbt];
                        let (mut htb, mut nbt, mut failed) = (None, None, Vec::new());
                        for method in methods {
                            let name = if method == Method::Htb {
                                "tc htb"
                            } else {
                                "nbt"
                            };
                            let what = format!(
                                "{} {} {} {} with {name} ({pass} of {repeat})",
                                path.label(),
                                traffic.label(),
                                direction.label(),
                                rate.label
                            );
                            eprintln!("xtask bench paths: {what}");
                            let began = Instant::now();
                            let result = bench.run(&cell, method);
                            eprintln!(
                                "xtask bench paths: {what}: {:.1} s",
                                began.elapsed().as_secs_f64()
                            );
                            match result {
                                Ok(sample) if method == Method::Htb => htb = Some(sample),
                                Ok(sample) => nbt = Some(sample),
                                Err(err) => {
                                    eprintln!("xtask bench paths: {what} failed: {err:#}");
                                    failures.push(what);
                                    failed.push(method);
                                }
                            }
                        }
                        let limit = rate.bits;
                        println!(
                            "| {} | {} | {} | {} | {} | {} | {} | {} |",
                            path.label(),
                            traffic.label(),
                            direction.label(),
                            rate.label,
                            fraction(&htb, failed.contains(&Method::Htb), limit),
                            fraction(&nbt, failed.contains(&Method::Nbt), limit),
                            drops(&nbt),
                            notes(&cell, &htb, &nbt)
                        );
                        // Cells whose sender offered less than the limit say nothing of the limiter.
                        let judged = |s: &Option<Sample>| {
                            s.as_ref()
                                .filter(|s| !s.under_offered(limit))
                                .map(|s| s.achieved(limit))
                        };
                        rows.push(Row {
                            path,
                            traffic,
                            direction,
                            rate: rate.label.clone(),
                            htb: judged(&htb),
                            nbt: judged(&nbt),
                        });
                    }
                }
            }
        }
    }

    print_summary(&paths, &directions, &rows);
    if repeat > 1 {
        print_cells(&rows);
    }
    println!(
        "\nachieved / limit: the payload rate from {SKIP_SECONDS} s after the receiver's first \
         byte to {TAIL_SECONDS} s before the sender stopped (received, plus retransmitted on \
         egress), times the bytes the limiter counted per payload byte over the whole transfer \
         (nbt: IP bytes; htb: Ethernet frames), over the limit; \"by its counter\": the limiter's \
         own count over the same window. UDP senders offer {UDP_OVERLOAD} times the limit; a row \
         whose sender offered less is left out of the summary, as are failed runs."
    );
    if !failures.is_empty() {
        bail!(
            "{} of the runs failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers_in_nbts_summary() {
        let json = r#"{"run":"x","command":["a","{\"b"],"exit":{"status":0,"code":0},
            "shaped":{"egress":{"passed_packets":3,"passed_bytes":4500},
            "ingress":{"passed_packets":7,"passed_bytes":9000,"rate_dropped_packets":2}}}"#;
        assert_eq!(json_number(json, &["exit", "code"]), Some(0.0));
        assert_eq!(
            json_number(json, &["shaped", "egress", "passed_bytes"]),
            Some(4500.0)
        );
        assert_eq!(
            json_number(json, &["shaped", "ingress", "passed_bytes"]),
            Some(9000.0)
        );
        assert_eq!(
            json_number(json, &["shaped", "ingress", "rate_dropped_packets"]),
            Some(2.0)
        );
        assert_eq!(
            json_number(json, &["shaped", "egress", "rate_dropped_packets"]),
            None
        );
    }

    #[test]
    fn errors_are_read_as_the_issue_counts_them() {
        let row = |nbt| Row {
            path: NetPath::Lo,
            traffic: Traffic::Udp,
            direction: Direction::Ingress,
            rate: "10mbit".into(),
            htb: None,
            nbt,
        };
        let rows = [row(Some(1.004)), row(Some(0.985)), row(None)];
        let rows: Vec<&Row> = rows.iter().collect();
        let nbt = Errors::of(&rows, |r| r.nbt);
        assert_eq!(nbt.mean(), "0.95%");
        assert_eq!(nbt.worst(), "1.50%");
        assert_eq!(nbt.within(), "1 of 2");
        let htb = Errors::of(&rows, |r| r.htb);
        assert_eq!(
            (htb.mean(), htb.worst(), htb.within()),
            ("-".into(), "-".into(), "-".into())
        );
    }

    #[test]
    fn reads_rates_as_tc_writes_them() {
        assert_eq!(parse_rate("512kbit").unwrap().bits, 512e3);
        assert_eq!(parse_rate("1gbit").unwrap().bits, 1e9);
        assert_eq!(parse_rate("2.5Mbit").unwrap().bits, 2.5e6);
        assert!(parse_rate("10mbps").is_err());
    }
}
