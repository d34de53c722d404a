//! `nbt attach`: limits, shaping and the gate put on processes and cgroups nbt did not start,
//! and everything put back exactly at the end (Ctrl-C, `nbt detach`, the target's end, and
//! `nbt cleanup` after nbt was killed). The Docker engine's containers: `docker.rs`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbt_integration_tests::{
    accepting, cgroup_parents, live_runs, nbt, nbt_command, receive_all, testbin, NetnsPair,
    NoLeftovers, Run, ADDR_B,
};

const MIB: u64 = 1 << 20;

/// A process started outside nbt, waiting for its go (a file) before it does its work.
pub struct Target {
    pub child: Child,
    go: PathBuf,
    _dir: tempfile::TempDir,
}

impl Target {
    /// `nbt-testbin WORKLOAD`, in network namespace `netns` when given.
    pub fn start(netns: Option<&str>, workload: &[&str]) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(testbin());
                c
            }
            None => Command::new(testbin()),
        };
        let child = command
            .args(workload)
            .env("NBT_TESTBIN_WAIT_FILE", &go)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nbt-testbin");
        Target {
            child,
            go,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn go(&self) {
        std::fs::write(&self.go, b"").unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Its exit status, waiting up to `within`.
    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the target did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbt attach --json ARGS`, started; returns once `nbt ps` lists the attachment with its
/// programs attached, and its name.
pub fn attach(args: &[&str]) -> (Child, String) {
    attach_with_env(args, &[])
}

/// [`attach`] with `env` added to nbt's environment (`DOCKER_HOST`).
pub fn attach_with_env(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = nbt_command()
        .arg("attach")
        .arg("--json")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting nbt attach");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = live_runs().into_iter().find(|r| {
            r["kind"] == "attachment"
                && r["nbt_pid"] == child.id()
                && r["seconds"].as_f64() > Some(0.0)
        });
        if let Some(run) = found {
            return (child, run["run"].as_str().unwrap().to_string());
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("nbt attach ended ({status}) before it attached: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "nbt attach did not attach in 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `nbt attach` to end and reads its summary.
pub fn finished(child: Child) -> Run {
    Run::from_output(child.wait_with_output().unwrap())
}

/// The CPU time process `pid` has used, in seconds (utime + stime of /proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3) here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf(3) has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The cgroups of process `pid`, as /proc/PID/cgroup lists them.
fn cgroups_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

/// A cgroup of the test's own beside nbt's runs, in every hierarchy nbt uses, with its
/// controllers; removed (its processes killed) on drop.
pub struct TestCgroup {
    pub dirs: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        let name = format!("attach-test-{tag}-{}", std::process::id());
        let parents = cgroup_parents();
        let v2_parent = &parents[0];
        let offered = std::fs::read_to_string(v2_parent.join("cgroup.controllers")).unwrap();
        for controller in ["memory", "cpu", "pids"] {
            if offered.split_whitespace().any(|c| c == controller) {
                let _ = std::fs::write(
                    v2_parent.join("cgroup.subtree_control"),
                    format!("+{controller}"),
                );
            }
        }
        let dirs: Vec<PathBuf> = parents.iter().map(|p| p.join(&name)).collect();
        for dir in &dirs {
            std::fs::create_dir(dir).unwrap();
        }
        TestCgroup { dirs }
    }

    /// The path `nbt attach --cgroup` takes: the v2 directory.
    pub fn v2(&self) -> &Path {
        &self.dirs[0]
    }

    pub fn add(&self, pid: i32) {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    /// Every limit file nbt may write, and its content now.
    pub fn limit_files(&self) -> BTreeMap<PathBuf, String> {
        nbt_integration_tests::limit_files(self.dirs.iter().map(PathBuf::as_path))
    }

    /// Writes `value` to the first of `files` this cgroup has.
    pub fn set(&self, files: &[&str], value: &str) {
        let file = self
            .dirs
            .iter()
            .flat_map(|dir| files.iter().map(move |f| dir.join(f)))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("none of {files:?} in {:?}", self.dirs));
        std::fs::write(&file, value).unwrap();
    }

    /// The first of `files` this cgroup has, read.
    pub fn read(&self, files: &[&str]) -> String {
        self.dirs
            .iter()
            .flat_map(|dir| files.iter().map(move |f| dir.join(f)))
            .find_map(|f| std::fs::read_to_string(f).ok())
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = nbt::enforce::cgroup::kill_and_remove(&self.dirs);
    }
}

#[test]
fn a_process_past_its_memory_cap_is_oom_killed_and_reported() {
    let guard = NoLeftovers::new();
    let mut target = Target::start(None, &["alloc", "512"]);
    let pid = target.pid().to_string();
    let (held, name) = attach(&["--pid", &pid, "--memory", "128M", "--swap", "0"]);
    assert!(
        cgroups_of(target.pid()).contains(&name),
        "the target is not in the attachment's cgroup: {}",
        cgroups_of(target.pid())
    );
    target.go();
    let status = target.wait(Duration::from_secs(30));
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary = run.summary.as_ref().unwrap();
    assert_eq!(summary["attached"]["ended"], "the target ended");
    assert_eq!(summary["attached"]["kind"], "pid");
    assert!(run.u64("/cgroup/oom_kills") >= 1, "{}", run.stderr());
    let peak = run.u64("/cgroup/memory_peak_bytes");
    assert!(
        (100 * MIB..=128 * MIB).contains(&peak),
        "peak {peak} for a 128 MiB cap"
    );
    guard.assert_clean();
}

#[test]
fn a_detached_process_goes_back_to_its_cgroups_alive_with_its_children() {
    let guard = NoLeftovers::new();
    // Two children forked after the attach: they are the process's "what it starts later".
    let mut target = Target::start(None, &["sleepers", "2", "30", "0"]);
    let before = cgroups_of(target.pid());
    let pid = target.pid().to_string();
    let (held, name) = attach(&["--pid", &pid, "--cpus", "0.5", "--pids", "50"]);
    target.go();
    let during = cgroups_of(target.pid());
    assert_ne!(before, during);
    assert!(during.contains(&name), "{during}");
    // Its children are born in the attachment's cgroup.
    let parent = target.pid();
    let children = || -> Vec<i32> {
        let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        text.split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while children().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the target's children did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for child in children() {
        assert!(cgroups_of(child).contains(&name), "{}", cgroups_of(child));
    }
    let detach = nbt(&["detach", &name]);
    assert_eq!(detach.status(), 0, "{}", detach.stderr());
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(
        run.summary.as_ref().unwrap()["attached"]["ended"],
        "detached by SIGTERM"
    );
    assert_eq!(cgroups_of(target.pid()), before, "not back home");
    for child in children() {
        assert_eq!(cgroups_of(child), before, "a child not back home");
    }
    assert!(target.alive(), "nbt killed its target");
    guard.assert_clean();
}

#[test]
fn a_cgroup_gets_every_limit_file_back_exactly_after_ctrl_c() {
    let guard = NoLeftovers::new();
    let cgroup = TestCgroup::new("restore");
    // Values of the cgroup's own, which nbt must put back as they were.
    cgroup.set(&["memory.max", "memory.limit_in_bytes"], "314572800");
    cgroup.set(&["pids.max"], "77");
    let mut target = Target::start(None, &["sleep", "60"]);
    cgroup.add(target.pid());
    let before = cgroup.limit_files();
    assert!(before.len() >= 4, "{before:?}");
    let path = cgroup.v2().to_str().unwrap().to_string();
    let (held, name) = attach(&[
        "--cgroup", &path, "--memory", "64M", "--cpus", "0.25", "--pids", "20",
    ]);
    assert_eq!(
        cgroup.read(&["memory.max", "memory.limit_in_bytes"]),
        (64 * MIB).to_string()
    );
    assert_eq!(cgroup.read(&["pids.max"]), "20");
    // nbt set changes the target's own files, and the end still puts the originals back.
    let set = nbt(&["set", &name, "--memory", "96M", "--pids", "30"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    assert_eq!(
        cgroup.read(&["memory.max", "memory.limit_in_bytes"]),
        (96 * MIB).to_string()
    );
    // While attached nbt sleeps between its duties: its own CPU time stays far below the wall
    // time (a wait loop whose poll never blocked once spent a whole CPU here).
    let before_cpu = cpu_seconds(held.id());
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_seconds(held.id()) - before_cpu;
    assert!(
        spent < 1.0,
        "nbt attach used {spent:.2} CPU s in 3 s of waiting"
    );
    // SAFETY: kill(2) of the nbt this test started: Ctrl-C.
    unsafe { libc::kill(held.id() as i32, libc::SIGINT) };
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary = run.summary.as_ref().unwrap();
    assert_eq!(summary["attached"]["ended"], "detached by SIGINT");
    assert!(
        summary["attached"]["restored"]["errors"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{summary}"
    );
    assert_eq!(cgroup.limit_files(), before, "not every file went back");
    assert!(target.alive(), "nbt killed its target");
    assert!(run.stderr().contains("put back"), "{}", run.stderr());
    // The attachment's receipt is in the store.
    assert!(summary["receipt"]["receipt_hash"].is_string(), "{summary}");
    guard.assert_clean();
}

#[test]
fn a_killed_attach_holds_until_cleanup_puts_everything_back() {
    let guard = NoLeftovers::new();
    let cgroup = TestCgroup::new("orphan");
    let mut target = Target::start(None, &["sleep", "60"]);
    cgroup.add(target.pid());
    let before = cgroup.limit_files();
    let path = cgroup.v2().to_str().unwrap().to_string();
    let (mut nbt_child, name) = attach(&["--cgroup", &path, "--memory", "64M"]);
    nbt_child.kill().unwrap();
    nbt_child.wait().unwrap();
    // Fail closed: the limit stays in force with nobody watching, and nbt ps says so.
    assert_eq!(
        cgroup.read(&["memory.max", "memory.limit_in_bytes"]),
        (64 * MIB).to_string()
    );
    let ps = nbt(&["ps", "--json"]).stdout();
    let listed: serde_json::Value = serde_json::from_str(&ps).unwrap();
    let orphan = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == name.as_str());
    assert_eq!(
        orphan.map(|r| r["orphan"].clone()),
        Some(true.into()),
        "{ps}"
    );
    let cleanup = nbt(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(cleanup.stderr().contains(&name), "{}", cleanup.stderr());
    assert_eq!(cgroup.limit_files(), before, "cleanup did not put it back");
    assert!(target.alive(), "cleanup killed the target");
    guard.assert_clean();
}

#[test]
fn a_rate_limit_holds_on_a_running_sender_in_another_namespace() {
    let guard = NoLeftovers::new();
    let net = NetnsPair::new("at");
    let addr = format!("{ADDR_B}:5301");
    let bound = addr.clone();
    let receiver = NetnsPair::in_netns(&net.b, move || {
        receive_all(TcpListener::bind(bound).unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut target = Target::start(Some(&net.a), &["tcp-stream", &addr, "8"]);
    let pid = target.pid().to_string();
    let (held, _) = attach(&["--pid", &pid, "--egress-rate", "10mbit"]);
    target.go();
    assert!(target.wait(Duration::from_secs(30)).success());
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let received = receiver.join().unwrap();
    // 1448 payload bytes per 1500 on the wire (the segment nbt caps a 10mbit socket to, less
    // its timestamp option).
    let wire = received.rate_between(2.0, 7.0) * 1500.0 / 1448.0;
    let ratio = wire / 10e6;
    eprintln!("attach --pid, 10mbit: {ratio:.4} of the limit");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{ratio:.4} of 10mbit; dropped for rate: {}",
        run.u64("/shaped/egress/rate_dropped_packets")
    );
    guard.assert_clean();
}

#[test]
fn the_gate_closes_on_a_running_process_when_its_balance_is_spent() {
    let guard = NoLeftovers::new();
    let server = accepting("127.0.0.1:0");
    let mut target = Target::start(None, &["connect-loop", &server, "6", "0"]);
    let pid = target.pid().to_string();
    let (held, _) = attach(&[
        "--pid",
        &pid,
        "--balance",
        "0.03",
        "--price-call",
        "0.01",
        "--gate",
        &server,
    ]);
    target.go();
    assert!(target.wait(Duration::from_secs(30)).success());
    let mut out = String::new();
    target
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let outcomes: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("connect "))
        .collect();
    assert_eq!(outcomes, ["ok", "ok", "ok", "EPERM", "EPERM", "EPERM"]);
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert_eq!(run.u64("/ledger/calls"), 3);
    assert_eq!(run.u64("/ledger/blocked_calls"), 3);
    guard.assert_clean();
}

#[test]
fn what_attach_cannot_hold_is_refused_with_the_reason() {
    let guard = NoLeftovers::new();
    let refused = |args: &[&str], status: i32, says: &str| {
        let run = nbt(args);
        assert_eq!(run.status(), status, "{args:?}: {}", run.stderr());
        assert!(run.stderr().contains(says), "{args:?}: {}", run.stderr());
    };
    refused(
        &["attach", "--pid", "1", "--memory", "64M"],
        2,
        "init process",
    );
    refused(&["attach", "--pid", "x1", "--memory", "64M"], 2, "--pid");
    refused(
        &["attach", "--pid", "4194304", "--cpus", "1"],
        2,
        "no such process",
    );
    refused(
        &["attach", "--cgroup", "/no-such-cgroup-here", "--cpus", "1"],
        2,
        "no cgroup v2 directory",
    );
    refused(&["attach", "--cgroup", "/a/../b", "--cpus", "1"], 2, "'..'");
    refused(&["attach", "--memory", "64M"], 2, "required");
    refused(
        &["attach", "--pid", "2", "--cgroup", "/x", "--memory", "64M"],
        2,
        "cannot be used with",
    );
    refused(
        &["attach", "--pid", "2", "--restart", "on-failure"],
        2,
        "--restart",
    );
    // A kernel thread, where this pid namespace shows one.
    if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
        refused(
            &["attach", "--pid", "2", "--cpus", "1"],
            1,
            "kthreadd is a kernel thread",
        );
    }
    // An empty cgroup: nothing to hold; a zone is what prepares one.
    let empty = TestCgroup::new("empty");
    refused(
        &[
            "attach",
            "--cgroup",
            empty.v2().to_str().unwrap(),
            "--cpus",
            "1",
        ],
        1,
        "nbt zone apply",
    );
    // No Docker engine at that socket: the socket is named.
    let run = nbt_integration_tests::nbt_with_env(
        &["attach", "--container", "web", "--cpus", "1"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    assert_eq!(run.status(), 1, "{}", run.stderr());
    assert!(
        run.stderr().contains("/nonexistent/docker.sock"),
        "{}",
        run.stderr()
    );
    let init = std::fs::read_to_string("/proc/1/comm").unwrap();
    if init.trim() != "systemd" {
        refused(
            &["attach", "--unit", "ssh.service", "--cpus", "1"],
            1,
            "needs systemd as PID 1",
        );
    }
    // nbt detach ends attachments, not runs.
    let mut run_child = nbt_command()
        .args(["run", "--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let name = nbt_integration_tests::wait_for_live_run(|r| r["kind"] == "run").unwrap();
    refused(&["detach", &name], 2, "not an attachment");
    // Nor can a process of a run be attached to.
    let pid = live_runs()
        .into_iter()
        .find(|r| r["run"] == name.as_str())
        .map(|_| {
            let cgroup = cgroup_parents()[0].join(&name).join("cgroup.procs");
            std::fs::read_to_string(cgroup).unwrap().trim().to_string()
        })
        .unwrap();
    refused(
        &["attach", "--pid", &pid, "--cpus", "1"],
        1,
        "already under nbt's run",
    );
    // SAFETY: kill(2) of the nbt this test started.
    unsafe { libc::kill(run_child.id() as i32, libc::SIGTERM) };
    run_child.wait().unwrap();
    guard.assert_clean();
}

#[test]
fn a_schedule_and_a_fault_change_an_attached_cgroup_and_everything_goes_back() {
    let guard = NoLeftovers::new();
    let cgroup = TestCgroup::new("schedule");
    let mut target = Target::start(None, &["sleep", "60"]);
    cgroup.add(target.pid());
    let before = cgroup.limit_files();
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("steps.toml");
    std::fs::write(&schedule, "[[step]]\nat = \"300ms\"\npids = 25\n").unwrap();
    let path = cgroup.v2().to_str().unwrap().to_string();
    let (held, name) = attach(&[
        "--cgroup",
        &path,
        "--pids",
        "50",
        "--schedule",
        schedule.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroup.read(&["pids.max"]) != "25" {
        assert!(Instant::now() < deadline, "the schedule's step never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fault = nbt(&["fault", &name, "brownout", "300ms", "--cpus", "0.1"]);
    assert_eq!(fault.status(), 0, "{}", fault.stderr());
    // SAFETY: kill(2) of the nbt this test started.
    unsafe { libc::kill(held.id() as i32, libc::SIGINT) };
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let events = run.summary.as_ref().unwrap()["events"].to_string();
    assert!(events.contains("pids 25"), "{events}");
    assert!(events.contains("brownout"), "{events}");
    assert_eq!(cgroup.limit_files(), before, "not every file went back");
    assert!(target.alive());
    guard.assert_clean();
}
