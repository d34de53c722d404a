//! `nbt swarm FILE.toml` (docs/swarm.md): several nodes, each a real `nbt run` in a network
//! namespace of its own, joined by a bridge in a hub namespace; a timeline of failures applied
//! to them; one summary and one swarm receipt that chains the nodes' receipts.
//!
//! Each node is this very binary run as `nbt run --name SWARM.NODE ...` inside the node's
//! namespace (setns(2) between fork and exec: only the network namespace changes, so the node's
//! nbt sees the machine's cgroups). Its limits, gate and balance are its own; each peer is one
//! of its `--link`s, so a link's limits change live through `nbt set --link` (a degrade event).
//! Every live change goes through the commands a person would type (`nbt set`, `nbt fault`),
//! so it lands in the node's own event log and receipt as well as the swarm's.

pub(crate) mod file;
pub(crate) mod net;
pub(crate) mod record;

use std::io::{BufRead as _, BufReader};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use file::{Action, Swarm};
use net::SwarmNet;

/// nbt's exit status when the swarm's receipt could not be written (as `nbt run`'s).
pub const EXIT_RECEIPT_FAILED: i32 = 125;

/// How many of its last stdout lines a node run's summary keeps.
pub const OUTPUT_TAIL: usize = 20;

/// The last lines of a node's stdout, filled by its relay thread.
type Tail = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

/// How the swarm is run.
pub struct Options {
    /// The receipt store for every node and the swarm (default: nbt's own).
    pub receipts: Option<PathBuf>,
    /// Stop every node after this long.
    pub stop_after: Option<Duration>,
    /// The command line, for the swarm's receipt.
    pub argv: Vec<String>,
}

/// One timeline event as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmEvent {
    /// Seconds since the swarm started.
    pub t: f64,
    /// `kill`, `restart`, `freeze`, ..., or `exit` (a node's run ended), `start`, `stop`.
    pub action: String,
    pub node: Option<String>,
    pub what: String,
    pub error: Option<String>,
}

/// One `nbt run` of a node (a node restarted has several).
#[derive(Debug, Clone, Serialize)]
pub struct NodeRun {
    /// The run's name (nbt-...), from its summary.
    pub run: Option<String>,
    pub started_s: f64,
    pub ended_s: f64,
    pub exit_status: Option<i32>,
    /// `kill` or `stop` when the swarm ended it.
    pub ended_by: Option<String>,
    pub cpu_seconds: Option<f64>,
    pub memory_peak_bytes: Option<u64>,
    pub egress_bytes: Option<u64>,
    pub ingress_bytes: Option<u64>,
    /// Events in the run's own log (its schedule, `nbt set`, `nbt fault`).
    pub events: usize,
    /// Its balance at the end, in micro-units, for a node with one.
    pub balance_end_micro: Option<i64>,
    /// The last lines (at most [`OUTPUT_TAIL`]) the workload wrote on stdout.
    pub output_tail: Vec<String>,
    /// Where its receipt went: `{seq, receipt_hash, ...}`.
    pub receipt: Option<Value>,
    /// The run's whole summary (`nbt run --json`).
    #[serde(skip)]
    pub summary: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub addr: String,
    /// The name its runs were given (`SWARM.NODE`): `nbt set`, `nbt fault` take it.
    pub label: String,
    /// `exited` (its last run ended by itself), `killed` (by the timeline) or `stopped`.
    pub status: String,
    pub exit_status: Option<i32>,
    pub runs: Vec<NodeRun>,
}

/// One direction of a link: what its sender's shaper passed and dropped, over all its runs.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub from: String,
    pub to: String,
    /// The link's limits at its sender's (last) start, as `nbt run` described them.
    pub limits: String,
    pub passed_bytes: u64,
    pub passed_packets: u64,
    pub rate_dropped_packets: u64,
    pub loss_dropped_packets: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwarmSummary {
    pub swarm: String,
    pub subnet: String,
    pub wall_seconds: f64,
    /// nbt's exit status: 0 when every node's last run exited 0 or was ended by the swarm.
    pub status: i32,
    /// The signal that stopped the swarm early, if one did.
    pub stopped_by: Option<String>,
    pub nodes: Vec<NodeReport>,
    pub links: Vec<LinkReport>,
    /// Every event, in time order.
    pub events: Vec<SwarmEvent>,
    /// The swarm's receipt (`None` inside the receipt itself).
    pub receipt: Option<crate::receipt::Written>,
    pub receipt_error: Option<String>,
}

/// A node while the swarm runs.
struct NodeState {
    child: Option<Child>,
    started: f64,
    summary_path: PathBuf,
    ended_by: Option<String>,
    runs: Vec<NodeRun>,
    restart_at: Option<f64>,
    /// The `nbt fault NODE brownout` that holds the node frozen.
    freezer: Option<Child>,
    /// The current run's stdout: its last lines, and the thread that relays it.
    tail: Tail,
    stdout_relay: Option<std::thread::JoinHandle<()>>,
}

/// A command of nbt's own applied to a node in the background (`nbt fault`), and the event
/// whose outcome it is.
struct Background {
    child: Child,
    event: usize,
}

struct Runner<'a> {
    swarm: &'a Swarm,
    net: &'a SwarmNet,
    options: &'a Options,
    dir: SummaryDir,
    start: Instant,
    nodes: Vec<NodeState>,
    events: Vec<SwarmEvent>,
    background: Vec<Background>,
    relays: Vec<std::thread::JoinHandle<()>>,
}

/// The stopping signals, as a set for sigtimedwait(2).
fn stopping_set() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn wait_stop(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait with a valid set and timeout; the info is not wanted.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (signal > 0).then_some(signal)
}

/// Removes the swarm's record when the swarm ends, also on an error.
struct RecordGuard(record::SwarmRecord);

impl Drop for RecordGuard {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Where the nodes' runs write their summaries (`/run/nbt/swarms/NAME.d`), removed on drop.
struct SummaryDir(PathBuf);

impl SummaryDir {
    fn new(swarm: &str) -> Result<SummaryDir> {
        let dir = record::swarms_dir().join(format!("{swarm}.d"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
        Ok(SummaryDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SummaryDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This binary, to run the nodes and the live commands with.
fn nbt_exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding nbt's own binary (/proc/self/exe)")
}

/// Runs the swarm to its end; its summary. Errors before any node started are returned;
/// after, they become events.
pub fn run(swarm: &Swarm, options: &Options) -> Result<SwarmSummary> {
    let names: Vec<String> = swarm.nodes.iter().map(|n| n.spec.name.clone()).collect();
    let addrs: Vec<_> = swarm.nodes.iter().map(|n| n.addr).collect();
    let _record = RecordGuard(record::SwarmRecord::create(swarm)?);
    let net = SwarmNet::create(&swarm.name, &names, &addrs, swarm.subnet.1)?;
    let mut runner = Runner {
        swarm,
        net: &net,
        options,
        dir: SummaryDir::new(&swarm.name)?,
        start: Instant::now(),
        nodes: Vec::new(),
        events: Vec::new(),
        background: Vec::new(),
        relays: Vec::new(),
    };
    for i in 0..swarm.nodes.len() {
        runner.nodes.push(NodeState {
            child: None,
            started: 0.0,
            summary_path: PathBuf::new(),
            ended_by: None,
            runs: Vec::new(),
            restart_at: None,
            freezer: None,
            tail: Tail::default(),
            stdout_relay: None,
        });
        runner.start_node(i, "start");
    }
    let stopped_by = runner.wait();
    runner.stop_all();
    for relay in runner.relays.drain(..) {
        let _ = relay.join();
    }
    let summary = runner.summary(stopped_by);
    drop(runner);
    drop(net);
    Ok(summary)
}

impl Runner<'_> {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn event(&mut self, action: &str, node: Option<usize>, what: String, error: Option<String>) {
        let node = node.map(|i| self.swarm.nodes[i].spec.name.clone());
        let t = self.now();
        match &error {
            Some(err) => eprintln!(
                "nbt swarm: {t:.2} s: {action} {}: {what} FAILED: {err}",
                node.as_deref().unwrap_or("")
            ),
            None => eprintln!(
                "nbt swarm: {t:.2} s: {action} {}: {what}",
                node.as_deref().unwrap_or("")
            ),
        }
        self.events.push(SwarmEvent {
            t,
            action: action.into(),
            node,
            what,
            error,
        });
    }

    /// Starts node `i`'s `nbt run` in its namespace.
    fn start_node(&mut self, i: usize, why: &str) {
        let node = &self.swarm.nodes[i];
        let k = self.nodes[i].runs.len();
        let summary_path = self.dir.path().join(format!("{}-{k}.json", node.spec.name));
        let peers: Vec<String> = self
            .swarm
            .nodes
            .iter()
            .filter(|p| p.spec.name != node.spec.name)
            .map(|p| format!("{}={}", p.spec.name, p.addr))
            .collect();
        type Relayed = (Tail, std::thread::JoinHandle<()>);
        let result = (|| -> Result<(Child, Option<Relayed>)> {
            let ns = self.net.open(i)?;
            let mut command = Command::new(nbt_exe()?);
            command
                .args(["run", "--quiet", "--name", &node.label, "--summary-file"])
                .arg(&summary_path);
            if let Some(store) = &self.options.receipts {
                command.arg("--receipts").arg(store);
            }
            if let Some(user) = &node.spec.user {
                command.args(["--user", user]);
            }
            command
                .args(&node.run_args)
                .arg("--")
                .args(&node.spec.command)
                .envs(&node.spec.env)
                .env("NBT_SWARM", &self.swarm.name)
                .env("NBT_SWARM_NODE", &node.spec.name)
                .env("NBT_SWARM_ADDR", node.addr.to_string())
                .env("NBT_SWARM_PEERS", peers.join(","))
                .env("NBT_SWARM_INDEX", i.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let fd = ns.as_raw_fd();
            // SAFETY: between fork and exec, two async-signal-safe syscalls, one on a
            // descriptor this process holds open until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // If the swarm's nbt dies, the node's nbt gets SIGTERM: it stops its
                    // workload and writes its receipt as on Ctrl-C.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = command.spawn().context("starting the node's nbt run")?;
            drop(ns);
            let prefix = format!("[{}] ", node.spec.name);
            let stdout = child.stdout.take().map(|pipe| {
                let (prefix, tail) = (prefix.clone(), Tail::default());
                let kept = tail.clone();
                let relay = std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        eprintln!("{prefix}{line}");
                        let mut tail = kept.lock().unwrap_or_else(|p| p.into_inner());
                        if tail.len() == OUTPUT_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                });
                (tail, relay)
            });
            if let Some(pipe) = child.stderr.take() {
                self.relays.push(std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        eprintln!("{prefix}{line}");
                    }
                }));
            }
            Ok((child, stdout))
        })();
        let state = &mut self.nodes[i];
        state.summary_path = summary_path;
        state.ended_by = None;
        state.restart_at = None;
        match result {
            Ok((child, stdout)) => {
                if let Some((tail, relay)) = stdout {
                    state.tail = tail;
                    state.stdout_relay = Some(relay);
                }
                state.started = self.start.elapsed().as_secs_f64();
                let pid = child.id();
                state.child = Some(child);
                let what = format!("nbt run as {} at {} (pid {pid})", node.label, node.addr);
                self.event(why, Some(i), what, None);
            }
            Err(err) => {
                self.event(why, Some(i), "nbt run".into(), Some(format!("{err:#}")));
            }
        }
    }

    /// Reaps the nodes and background commands that ended.
    fn reap(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(child) = self.nodes[i].child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            self.nodes[i].child = None;
            let exit = status.code().or_else(|| {
                std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
            });
            let summary: Option<Value> = std::fs::read(&self.nodes[i].summary_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let ended_by = self.nodes[i].ended_by.take();
            let mut run = node_run(summary, self.nodes[i].started, self.now(), exit, ended_by);
            // The relay reads to the pipe's end: at most a second more (a process the workload
            // left behind may hold the pipe open).
            if let Some(relay) = self.nodes[i].stdout_relay.take() {
                let waited = Instant::now();
                while !relay.is_finished() && waited.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.relays.push(relay);
            }
            run.output_tail =
                std::mem::take(&mut *self.nodes[i].tail.lock().unwrap_or_else(|p| p.into_inner()))
                    .into();
            let what = format!(
                "{} ended with status {}{}",
                run.run.as_deref().unwrap_or("its run"),
                exit.map(|e| e.to_string()).unwrap_or_else(|| "?".into()),
                run.ended_by
                    .as_ref()
                    .map(|b| format!(" ({b})"))
                    .unwrap_or_default()
            );
            self.nodes[i].runs.push(run);
            self.event("exit", Some(i), what, None);
            if let Some(mut freezer) = self.nodes[i].freezer.take() {
                let _ = freezer.kill();
                let _ = freezer.wait();
            }
        }
        let mut k = 0;
        while k < self.background.len() {
            match self.background[k].child.try_wait() {
                Ok(Some(status)) => {
                    let mut done = self.background.remove(k);
                    if !status.success() {
                        // Its last line says why (it has exited: the pipe holds all it wrote).
                        let mut said = String::new();
                        if let Some(mut pipe) = done.child.stderr.take() {
                            let _ = std::io::Read::read_to_string(&mut pipe, &mut said);
                        }
                        let why = said.lines().last().unwrap_or("").trim().to_string();
                        let event = &mut self.events[done.event];
                        event.error = Some(match why.is_empty() {
                            true => format!("exited with {status}"),
                            false => format!("{why} ({status})"),
                        });
                        eprintln!(
                            "nbt swarm: {} {}: FAILED: {}",
                            event.action,
                            event.node.as_deref().unwrap_or(""),
                            event.error.as_deref().unwrap_or("")
                        );
                    }
                }
                _ => k += 1,
            }
        }
    }

    /// Waits for every node's end, applying the timeline; the stopping signal, if one came.
    fn wait(&mut self) -> Option<String> {
        let set = stopping_set();
        let mut next = 0;
        loop {
            if let Some(signal) = wait_stop(&set, Duration::from_millis(50)) {
                return Some(crate::sys::supervise::signal_name(signal));
            }
            self.reap();
            let now = self.now();
            if let Some(i) = self.swarm.until {
                let state = &self.nodes[i];
                if state.child.is_none() && state.restart_at.is_none() && !state.runs.is_empty() {
                    let what = format!(
                        "{} ended: the swarm ends with it (until)",
                        self.swarm.nodes[i].spec.name
                    );
                    self.event("stop", None, what, None);
                    return None;
                }
            }
            if self
                .options
                .stop_after
                .is_some_and(|d| now >= d.as_secs_f64())
            {
                let what = "the swarm's time (--stop-after) is up".to_string();
                self.event("stop", None, what, None);
                return None;
            }
            while next < self.swarm.events.len() && self.swarm.events[next].at.as_secs_f64() <= now
            {
                let action = self.swarm.events[next].action.clone();
                self.apply(&action);
                next += 1;
            }
            for i in 0..self.nodes.len() {
                let due = self.nodes[i].restart_at.is_some_and(|t| t <= now);
                if due && self.nodes[i].child.is_none() {
                    self.start_node(i, "restart");
                }
            }
            let live = self
                .nodes
                .iter()
                .any(|n| n.child.is_some() || n.restart_at.is_some());
            if !live {
                for event in &self.swarm.events[next..] {
                    let what = format!(
                        "{} at {:.2} s not applied: every node had ended",
                        action_name(&event.action),
                        event.at.as_secs_f64()
                    );
                    self.events.push(SwarmEvent {
                        t: self.start.elapsed().as_secs_f64(),
                        action: "skipped".into(),
                        node: None,
                        what,
                        error: None,
                    });
                }
                return None;
            }
        }
    }

    /// `nbt ARGS` run to its end; its stderr's last line when it fails.
    fn nbt(&self, args: &[String]) -> Result<String, String> {
        let mut command = Command::new(nbt_exe().map_err(|e| format!("{e:#}"))?);
        command.args(args).stdin(Stdio::null());
        let out = command.output().map_err(|e| format!("running nbt: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            Ok(stderr.lines().last().unwrap_or("").to_string())
        } else {
            Err(stderr.lines().last().unwrap_or("failed").to_string())
        }
    }

    /// `nbt ARGS` started in the background, its outcome noted on the last event when it ends.
    fn background(&mut self, args: &[String]) -> Result<Child, String> {
        let mut command = Command::new(nbt_exe().map_err(|e| format!("{e:#}"))?);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.spawn().map_err(|e| format!("running nbt: {e}"))
    }

    fn running(&self, i: usize) -> Result<(), String> {
        if self.nodes[i].child.is_some() {
            Ok(())
        } else {
            Err("the node is not running".into())
        }
    }

    fn apply(&mut self, action: &Action) {
        let name = action_name(action);
        let label = |i: usize| self.swarm.nodes[i].label.clone();
        match action {
            Action::Kill {
                node,
                restart_after,
            } => {
                let i = *node;
                let result = self.running(i).and_then(|()| {
                    self.thaw(i);
                    kill_node(&label(i))
                });
                if result.is_ok() {
                    self.nodes[i].ended_by = Some("kill".into());
                    self.nodes[i].restart_at = restart_after.map(|d| self.now() + d.as_secs_f64());
                }
                let what = match (&result, restart_after) {
                    (Ok(n), Some(d)) => format!(
                        "SIGKILL to its {n} process(es); restart in {:.2} s",
                        d.as_secs_f64()
                    ),
                    (Ok(n), None) => format!("SIGKILL to its {n} process(es)"),
                    (Err(_), _) => "SIGKILL".into(),
                };
                self.event(name, Some(i), what, result.err());
            }
            Action::Restart { node } => {
                let i = *node;
                if self.nodes[i].child.is_some() {
                    let what = "not restarted".into();
                    self.event(name, Some(i), what, Some("the node is running".into()));
                } else {
                    self.start_node(i, "restart");
                }
            }
            Action::Freeze { node, for_ } => {
                let i = *node;
                let duration = for_.clone().unwrap_or_else(|| "24h".into());
                let result = self.running(i).and_then(|()| {
                    if self.nodes[i].freezer.is_some() {
                        return Err("the node is frozen already".into());
                    }
                    let args = vec![
                        "fault".to_string(),
                        label(i),
                        "brownout".into(),
                        duration.clone(),
                    ];
                    self.background(&args)
                });
                let what = match for_ {
                    Some(d) => format!("nbt fault {} brownout {d} (cgroup freezer)", label(i)),
                    None => format!("nbt fault {} brownout until thawed", label(i)),
                };
                match result {
                    Ok(child) => {
                        self.nodes[i].freezer = Some(child);
                        self.event(name, Some(i), what, None);
                    }
                    Err(err) => self.event(name, Some(i), what, Some(err)),
                }
            }
            Action::Thaw { node } => {
                let i = *node;
                let result = match self.nodes[i].freezer.is_some() {
                    true => {
                        self.thaw(i);
                        Ok(())
                    }
                    false => Err("the node is not frozen".to_string()),
                };
                self.event(
                    name,
                    Some(i),
                    "the freezer's fault ended".into(),
                    result.err(),
                );
            }
            Action::Partition { nodes } => {
                let names: Vec<&str> = nodes
                    .iter()
                    .map(|&i| self.swarm.nodes[i].spec.name.as_str())
                    .collect();
                let what = format!("{} cut off from the rest", names.join(", "));
                let result = self.net.partition(nodes).map_err(|e| format!("{e:#}"));
                self.event(name, None, what, result.err());
            }
            Action::Heal => {
                let result = self.net.heal().map_err(|e| format!("{e:#}"));
                self.event(
                    name,
                    None,
                    "every node on one bridge again".into(),
                    result.err(),
                );
            }
            Action::Degrade {
                from,
                to,
                settings,
                oneway,
            } => {
                let mut directions = vec![(*from, *to)];
                if !oneway {
                    directions.push((*to, *from));
                }
                for (a, b) in directions {
                    let dest = self.swarm.nodes[a].link_to[b].clone().unwrap_or_default();
                    let flag = format!("to={dest},{}", settings.join(","));
                    let what = format!(
                        "link {} -> {}: {}",
                        self.swarm.nodes[a].spec.name,
                        self.swarm.nodes[b].spec.name,
                        settings.join(", ")
                    );
                    let result = self
                        .running(a)
                        .and_then(|()| self.nbt(&["set".into(), label(a), "--link".into(), flag]));
                    self.event(name, Some(a), what, result.err());
                }
            }
            Action::Spend { node, amount } => {
                let i = *node;
                let result = self.running(i).and_then(|()| {
                    self.nbt(&[
                        "fault".into(),
                        label(i),
                        "balance-shock".into(),
                        "--amount".into(),
                        amount.clone(),
                    ])
                });
                let what = format!("balance-shock of {amount}");
                self.event(name, Some(i), what, result.err());
            }
            Action::Fault { node, args } => {
                let i = *node;
                let mut all = vec!["fault".to_string(), label(i)];
                all.extend(args.iter().cloned());
                let what = format!("nbt {}", all.join(" "));
                match self.running(i).and_then(|()| self.background(&all)) {
                    Ok(child) => {
                        self.event(name, Some(i), what, None);
                        let event = self.events.len() - 1;
                        self.background.push(Background { child, event });
                    }
                    Err(err) => self.event(name, Some(i), what, Some(err)),
                }
            }
        }
    }

    /// Ends node `i`'s freeze, if it has one: the fault's nbt puts back what it changed.
    fn thaw(&mut self, i: usize) {
        if let Some(mut freezer) = self.nodes[i].freezer.take() {
            // SAFETY: kill(2) on our own child, still unreaped.
            unsafe { libc::kill(freezer.id() as i32, libc::SIGINT) };
            let _ = freezer.wait();
        }
    }

    /// Ends every node: thawed, then SIGTERM to its nbt (which passes it on to the workload and
    /// writes the receipt); SIGKILL to the workload if it is still there 10 s later.
    fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.thaw(i);
            self.nodes[i].restart_at = None;
        }
        for b in &mut self.background {
            // SAFETY: kill(2) on our own child, still unreaped.
            unsafe { libc::kill(b.child.id() as i32, libc::SIGINT) };
        }
        for i in 0..self.nodes.len() {
            if let Some(child) = &self.nodes[i].child {
                // SAFETY: kill(2) on our own child, still unreaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                self.nodes[i].ended_by = Some("stop".into());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut killed = false;
        loop {
            self.reap();
            if self.nodes.iter().all(|n| n.child.is_none()) && self.background.is_empty() {
                break;
            }
            if Instant::now() > deadline && !killed {
                killed = true;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].child.is_some() {
                        let _ = kill_node(&self.swarm.nodes[i].label);
                    }
                }
                for b in &mut self.background {
                    let _ = b.child.kill();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn summary(&mut self, stopped_by: Option<String>) -> SwarmSummary {
        let mut nodes = Vec::new();
        let mut links = Vec::new();
        let mut ok = true;
        for (i, node) in self.swarm.nodes.iter().enumerate() {
            let runs = std::mem::take(&mut self.nodes[i].runs);
            let last = runs.last();
            let status = match last.and_then(|r| r.ended_by.as_deref()) {
                Some("kill") => "killed",
                Some(_) => "stopped",
                None => "exited",
            };
            if status == "exited" && last.and_then(|r| r.exit_status) != Some(0) {
                ok = false;
            }
            // A row per link: the sender's counters, summed over its runs.
            for (j, peer) in self.swarm.nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                let dest = node.link_to[j].clone().unwrap_or_default();
                let mut row = LinkReport {
                    from: node.spec.name.clone(),
                    to: peer.spec.name.clone(),
                    limits: String::new(),
                    passed_bytes: 0,
                    passed_packets: 0,
                    rate_dropped_packets: 0,
                    loss_dropped_packets: 0,
                };
                for run in &runs {
                    let Some(found) = run.summary.as_ref().and_then(|s| {
                        s["links"].as_array()?.iter().find(|l| {
                            l["to"]
                                .as_array()
                                .is_some_and(|to| to.iter().any(|t| *t == *dest))
                        })
                    }) else {
                        continue;
                    };
                    let egress = &found["shaped"]["egress"];
                    let n = |k: &str| egress[k].as_u64().unwrap_or(0);
                    row.passed_bytes += n("passed_bytes");
                    row.passed_packets += n("passed_packets");
                    row.rate_dropped_packets += n("rate_dropped_packets");
                    row.loss_dropped_packets += n("loss_dropped_packets");
                    row.limits = describe_link(found);
                }
                if row.limits.is_empty() {
                    row.limits = "- (no run summary)".into();
                }
                links.push(row);
            }
            nodes.push(NodeReport {
                name: node.spec.name.clone(),
                addr: node.addr.to_string(),
                label: node.label.clone(),
                status: status.into(),
                exit_status: last.and_then(|r| r.exit_status),
                runs,
            });
        }
        let status = match (&stopped_by, ok) {
            (Some(_), _) => 130,
            (None, true) => 0,
            (None, false) => 1,
        };
        let mut events = std::mem::take(&mut self.events);
        events.sort_by(|a, b| a.t.total_cmp(&b.t));
        let mut summary = SwarmSummary {
            swarm: self.swarm.name.clone(),
            subnet: format!("{}/{}", self.swarm.subnet.0, self.swarm.subnet.1),
            wall_seconds: self.now(),
            status,
            stopped_by,
            nodes,
            links,
            events,
            receipt: None,
            receipt_error: None,
        };
        match write_receipt(self.swarm, self.options, &summary) {
            Ok(written) => summary.receipt = Some(written),
            Err(err) => {
                summary.receipt_error = Some(format!("{err:#}"));
                if summary.status == 0 {
                    summary.status = EXIT_RECEIPT_FAILED;
                }
            }
        }
        summary
    }
}

/// A link of a run's summary described as `nbt run` describes it: "egress 2mbit (burst 96.0
/// KiB), 5% loss".
fn describe_link(link: &Value) -> String {
    let net: Option<crate::enforce::shaper::NetLimits> =
        serde_json::from_value(link["net"].clone()).ok();
    let latency: Option<crate::enforce::edt::Latency> =
        serde_json::from_value(link["latency"].clone())
            .ok()
            .flatten();
    let Some(net) = net else {
        return "?".into();
    };
    let parts = crate::plan::link::network_limits(&net, latency.as_ref());
    if parts.is_empty() {
        "unlimited".into()
    } else {
        parts.join(", ")
    }
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Kill { .. } => "kill",
        Action::Restart { .. } => "restart",
        Action::Freeze { .. } => "freeze",
        Action::Thaw { .. } => "thaw",
        Action::Partition { .. } => "partition",
        Action::Heal => "heal",
        Action::Degrade { .. } => "degrade",
        Action::Spend { .. } => "spend",
        Action::Fault { .. } => "fault",
    }
}

/// What one node run went through, from its summary.
fn node_run(
    summary: Option<Value>,
    started: f64,
    ended: f64,
    exit: Option<i32>,
    ended_by: Option<String>,
) -> NodeRun {
    let s = summary.as_ref();
    let u = |p: &str| s.and_then(|s| s.pointer(p)).and_then(Value::as_u64);
    NodeRun {
        run: s.and_then(|s| s["run"].as_str()).map(String::from),
        started_s: started,
        ended_s: ended,
        exit_status: exit,
        ended_by,
        cpu_seconds: u("/cgroup/cpu_usage_usec").map(|us| us as f64 / 1e6),
        memory_peak_bytes: u("/cgroup/memory_peak_bytes"),
        egress_bytes: u("/network/egress/bytes"),
        ingress_bytes: u("/network/ingress/bytes"),
        events: s.and_then(|s| s["events"].as_array()).map_or(0, Vec::len),
        receipt: s.map(|s| s["receipt"].clone()).filter(|r| !r.is_null()),
        balance_end_micro: s
            .and_then(|s| s.pointer("/ledger/balance_end_micro"))
            .and_then(Value::as_i64),
        output_tail: Vec::new(),
        summary,
    }
}

/// SIGKILL to every process of the live run `label`; how many there were.
fn kill_node(label: &str) -> Result<usize, String> {
    let dir = crate::state::state_dir();
    let run = crate::state::resolve_run(&dir, label).map_err(|e| format!("{e:#}"))?;
    let (_, record) =
        crate::state::RunRecord::find_live(&dir, &run).map_err(|e| format!("{e:#}"))?;
    let mut pids = std::collections::BTreeSet::new();
    for cgroup in &record.cgroups {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if pids.is_empty() {
        return Err(format!("run {run} has no process left"));
    }
    for &pid in &pids {
        // SAFETY: kill(2); a pid that is gone meanwhile gets ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    Ok(pids.len())
}

/// The swarm's receipt: the file, every node's runs with their receipts' hashes (so the swarm's
/// receipt chains them: each node receipt is in the same store, before it), the events.
fn write_receipt(
    swarm: &Swarm,
    options: &Options,
    summary: &SwarmSummary,
) -> Result<crate::receipt::Written> {
    use crate::receipt::{Kind, Receipt, Writer};
    let store = options
        .receipts
        .clone()
        .unwrap_or_else(crate::receipt::store::default_path);
    let mut writer = Writer::open(&store)?;
    let mut receipt = Receipt {
        run: Some(swarm.name.clone()),
        command: options.argv.clone(),
        exit_status: Some(summary.status),
        constraints: swarm.file.clone(),
        summary: Some(serde_json::to_value(summary)?),
        ..Receipt::new(Kind::Swarm, writer.key_id().to_string())
    };
    writer.write(&mut receipt)
}

/// Reads a swarm file (at most [`file::MAX_FILE_BYTES`]) and checks it.
pub fn load(path: &Path) -> Result<Swarm> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening swarm file {}", path.display()))?
        .take(file::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading swarm file {}", path.display()))?;
    if text.len() as u64 > file::MAX_FILE_BYTES {
        anyhow::bail!(crate::error::PlanError(format!(
            "swarm file {}: larger than {} bytes",
            path.display(),
            file::MAX_FILE_BYTES
        )));
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("swarm")
        .to_string();
    file::parse(&text, &stem).map_err(|e| {
        anyhow::Error::new(crate::error::PlanError(format!(
            "{}: {}",
            path.display(),
            e.0
        )))
    })
}
