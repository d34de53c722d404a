//! `cargo xtask bench telemetry`: what nbt's process tracking costs.
//!
//! 1. A pipe ping-pong between two processes (two context switches per round) with and without
//!    the agent's sched programs attached (the 99 Hz sampler and the exec/exit tracepoints),
//!    alternating, nine runs each (medians); pinned to one CPU (every round is two switches on
//!    that CPU) and unpinned (wake-ups cross CPUs). Tracking CPU time only, and with the
//!    per-CPU counters read at every sample (cycles where a PMU exists, else the cpu-clock that
//!    stands in for them).
//! 2. The agent's own CPU time and memory while it tracks 1,000 processes at a 1 s interval.
//!
//! Not a test: it prints tables, and docs/benchmarks.md keeps them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Rounds per ping-pong: about 1 s pinned (5 µs a round here), 2 s unpinned (cross-CPU wake-ups
/// cost 40 µs a round in this VM).
const ROUNDS_PINNED: &str = "200000";
const ROUNDS_UNPINNED: &str = "50000";
const REPEATS: usize = 9;
const TRACKED: usize = 1000;
const FOOTPRINT_WINDOW: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    addr: String,
    /// The agent's token file: every endpoint but /metrics and /healthz needs the token.
    token_file: std::path::PathBuf,
}

impl Agent {
    fn start(nbt: &Path, home: &Path, attribute_by: &str) -> Result<Agent> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(nbt)
            .args(["agent", "--listen", &addr, "--interval", "1s"])
            .args(["--attribute-by", attribute_by])
            .env("NBT_HOME", home)
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbt agent")?;
        let agent = Agent {
            child,
            addr,
            token_file: home.join("agent.token"),
        };
        // Attached once the sampler has finished an interval with the tracker on.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if let Some(body) = agent.get("/v1/attribution") {
                if body.contains("\"tracker\":\"attached\"") && !body.contains("\"intervals\":0") {
                    return Ok(agent);
                }
            }
        }
        bail!("nbt agent did not attach its tracker within 20 s")
    }

    fn get(&self, path: &str) -> Option<String> {
        let token = std::fs::read_to_string(&self.token_file).ok()?;
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
            self.addr,
            token.trim()
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// CPU seconds (user + system) the agent has used.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .context("/proc stat")?
            .1
            .split(' ')
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf has no preconditions.
        Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
    }

    /// A line of /proc/PID/status in MiB (VmRSS, VmHWM).
    fn memory_mib(&self, field: &str) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("{field} in /proc status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib / 1024.0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pingpong(testbin: &Path, pinned: bool) -> Result<f64> {
    let mut command = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(testbin);
        c
    } else {
        Command::new(testbin)
    };
    let rounds = if pinned {
        ROUNDS_PINNED
    } else {
        ROUNDS_UNPINNED
    };
    let output = command.args(["pingpong", rounds]).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "ns_per_round")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pingpong printed: {text}"))
}

/// The median (the upper one of an even count); `values` must not be empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn bench(workspace: &Path) -> Result<()> {
    let bin = workspace.join("target/release");
    let (nbt, testbin) = (bin.join("nbt"), bin.join("nbt-testbin"));
    // The agent's token file goes here, not into the machine's /var/lib/nbt.
    let home = workspace.join("target/bench-telemetry-home");
    std::fs::create_dir_all(&home)?;

    let pmu = Command::new(&nbt)
        .arg("probe")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim_start().starts_with("yes") && l.contains("hardware PMU (cycles"))
        })
        .unwrap_or(false);
    let counters = if pmu { "cycles" } else { "sampled-cpu-clock" };
    println!("| ping-pong (2 switches per round) | without tracking (µs/round) | CPU time (µs/round) | slowdown | with counters: {counters} (µs/round) | slowdown |");
    println!("|---|---|---|---|---|---|");
    for pinned in [true, false] {
        let (mut off, mut on, mut counted) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            off.push(pingpong(&testbin, pinned)?);
            let agent = Agent::start(&nbt, &home, "cpu-time")?;
            on.push(pingpong(&testbin, pinned)?);
            drop(agent);
            let agent = Agent::start(&nbt, &home, counters)?;
            counted.push(pingpong(&testbin, pinned)?);
            drop(agent);
        }
        let (off, on, counted) = (median(off), median(on), median(counted));
        println!(
            "| {} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:+.1}% |",
            if pinned { "both on CPU 0" } else { "unpinned" },
            off / 1000.0,
            on / 1000.0,
            (on / off - 1.0) * 100.0,
            counted / 1000.0,
            (counted / off - 1.0) * 100.0
        );
    }

    // The agent first: a process enters its map when a sample finds it running, so each sleeper
    // spins 40 ms (four sampling periods: one that is never sampled is e^-4 = 2% likely) at
    // its start, then wakes for microseconds a second.
    let agent = Agent::start(&nbt, &home, "auto")?;
    let mut sleepers = Command::new(&testbin)
        .args([
            "sleepers",
            &TRACKED.to_string(),
            &(FOOTPRINT_WINDOW.as_secs() + 30).to_string(),
            "40",
        ])
        .stdout(Stdio::null())
        .spawn()?;
    // 1,000 x 40 ms of CPU on this machine's 2 CPUs, then an interval to read them.
    std::thread::sleep(Duration::from_secs(25));
    let (cpu_before, started) = (agent.cpu_seconds()?, Instant::now());
    std::thread::sleep(FOOTPRINT_WINDOW);
    let cpu = agent.cpu_seconds()? - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    let body = agent.get("/v1/attribution").unwrap_or_default();
    let tracked = body.matches("\"pid\":").count();
    let (rss, hwm) = (agent.memory_mib("VmRSS")?, agent.memory_mib("VmHWM")?);
    drop(agent);
    let _ = sleepers.kill();
    let _ = sleepers.wait();
    println!();
    println!("| agent, 1 s interval | processes tracked | CPU (% of one core) | RSS (MiB) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.0} s window | {tracked} | {:.2}% | {rss:.1} | {hwm:.1} |",
        elapsed,
        cpu / elapsed * 100.0
    );
    Ok(())
}
