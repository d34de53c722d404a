//! Helpers for nbt's integration tests: find the binaries, run nbt, read its JSON summary, and make
//! sure nothing a test started is left behind, also when the test fails.
//!
//! These tests use the real kernel (cgroups, BPF, sockets) and must run as root, one at a time
//! (`cargo xtask test` does both): they measure CPU time, which parallel tests would disturb.

pub mod docker;
pub mod rate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The directory holding the built binaries (target/debug), found from this test's own binary.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/memory-HASH -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The `nbt` binary under test: `NBT_BIN`, or the one built beside the tests.
pub fn nbt_bin() -> PathBuf {
    let path = std::env::var_os("NBT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("nbt"));
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build`), or run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The test workloads binary.
pub fn testbin() -> PathBuf {
    let path = bin_dir().join("nbt-testbin");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build`)",
        path.display()
    );
    path
}

pub fn require_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "nbt's integration tests make cgroups and load BPF programs: run them as root (`cargo xtask test`)"
    );
}

/// What one `nbt run --json` produced.
pub struct Run {
    pub output: Output,
    pub summary: Option<Value>,
}

impl Run {
    pub fn status(&self) -> i32 {
        self.output.status.code().expect("nbt exited by a signal")
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// A field of the summary by JSON pointer (`/cgroup/oom_kills`), as u64.
    pub fn u64(&self, pointer: &str) -> u64 {
        let summary = self
            .summary
            .as_ref()
            .unwrap_or_else(|| panic!("no JSON summary; stderr: {}", self.stderr()));
        summary
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{pointer} missing or not a number in {summary}"))
    }

    pub fn f64(&self, pointer: &str) -> f64 {
        let summary = self.summary.as_ref().expect("no JSON summary");
        summary
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{pointer} missing in {summary}"))
    }

    /// The number after the word `name` in the workload's stdout (a testbin report such as
    /// `sent 123 retransmitted 4`); the test fails naming it when there is none.
    pub fn report_u64(&self, name: &str) -> u64 {
        let report = self.stdout();
        let words: Vec<&str> = report.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name);
        at.and_then(|at| words.get(at + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no number after {name} in {report}"))
    }

    pub fn summary_str(&self, pointer: &str) -> String {
        let summary = self.summary.as_ref().expect("no JSON summary");
        summary
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{pointer} missing or not a string in {summary}"))
            .to_string()
    }
}

/// The `NBT_HOME` of the test that holds the [`NoLeftovers`] guard, if one does.
static GUARDED_HOME: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Where a test without a guard points nbt's home: under a file, so that nothing can be made
/// there, not even by root. Such tests (usage errors, say) must not write receipts or keys.
const NO_HOME: &str = "/dev/null/nbt-test-without-a-guard";

/// `nbt` as a command, in the environment of the current test: the guard's `NBT_HOME`, and no
/// `NBT_RECEIPTS` or `NBT_KEY` from the caller's shell. Given to each child rather than set in
/// this process's environment, which tests on other threads read at the same time.
pub fn nbt_command() -> Command {
    let home = GUARDED_HOME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .unwrap_or_else(|| PathBuf::from(NO_HOME));
    let mut command = Command::new(nbt_bin());
    command
        .env("NBT_HOME", home)
        // Workloads run as nobody, as under `sudo` for a user with no rights; a test that needs
        // another user passes --user or removes this.
        .env("NBT_USER", "nobody")
        .env_remove("NBT_RECEIPTS")
        .env_remove("NBT_KEY");
    command
}

/// Runs `nbt ARGS` to completion. The summary is parsed from the last line of stdout when it is JSON.
pub fn nbt(args: &[&str]) -> Run {
    nbt_with_env(args, &[])
}

/// [`nbt`], with `env` added to nbt's environment (and so to its workload's).
pub fn nbt_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    Run::from_output(
        nbt_command()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("running nbt"),
    )
}

impl Run {
    pub fn from_output(output: Output) -> Run {
        let summary = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .and_then(|line| serde_json::from_str(line).ok());
        Run { output, summary }
    }
}

/// The live runs, as `nbt ps --json` lists them (none when it fails), orphans left out.
pub fn live_runs() -> Vec<Value> {
    serde_json::from_str::<Value>(&nbt(&["ps", "--json"]).stdout())
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|run| run["orphan"] != true)
        .collect()
}

/// The name of the live run that `matches` picks (another nbt may be running too), once its
/// workload has started, when its programs are loaded; polled every 100 ms for up to 5 s.
pub fn wait_for_live_run(matches: impl Fn(&Value) -> bool) -> Option<String> {
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let found = live_runs()
            .into_iter()
            .find(|r| matches(r) && r["seconds"].as_f64() > Some(0.0));
        if let Some(run) = found {
            return run["run"].as_str().map(String::from);
        }
    }
    None
}

/// `nbt run --json LIMITS -- nbt-testbin MODE ARGS`.
pub fn run_testbin(limits: &[&str], workload: &[&str]) -> Run {
    run_testbin_with_env(limits, workload, &[])
}

/// [`run_testbin`], with `env` added to the environment of nbt and its workload.
pub fn run_testbin_with_env(limits: &[&str], workload: &[&str], env: &[(&str, &str)]) -> Run {
    let testbin = testbin();
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(limits);
    args.push("--");
    args.push(testbin.to_str().unwrap());
    args.extend_from_slice(workload);
    nbt_with_env(&args, env)
}

/// The directories beneath which nbt makes run cgroups on this machine (one per hierarchy).
pub fn cgroup_parents() -> Vec<PathBuf> {
    let layout = nbt::enforce::cgroup::Layout::detect().expect("cgroup layout");
    layout
        .run_dirs("x")
        .expect("cgroup v2")
        .into_iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect()
}

/// The files of a cgroup nbt may write when it holds another's (`nbt attach`): limits, the
/// squeeze, the freeze; v2's and v1's.
pub const LIMIT_FILES: [&str; 10] = [
    "memory.max",
    "memory.swap.max",
    "memory.high",
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "cpu.max",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "pids.max",
    "cgroup.freeze",
];

/// The content of every [`LIMIT_FILES`] file the cgroup directories `dirs` have, now.
pub fn limit_files<'a>(
    dirs: impl IntoIterator<Item = &'a Path>,
) -> std::collections::BTreeMap<PathBuf, String> {
    dirs.into_iter()
        .flat_map(|dir| LIMIT_FILES.iter().map(move |f| dir.join(f)))
        .filter_map(|file| Some((file.clone(), std::fs::read_to_string(file).ok()?)))
        .collect()
}

/// Every nbt run cgroup present now, in every hierarchy.
pub fn run_cgroups() -> BTreeSet<PathBuf> {
    cgroup_parents()
        .iter()
        .flat_map(|parent| std::fs::read_dir(parent).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nbt-"))
        })
        .collect()
}

/// Asserts at its end that the test left no run cgroup behind, and removes any it finds, with
/// their processes, so that a failing test cannot leak into the next one or onto the machine.
///
/// It also makes the tests of one binary run one at a time, whatever `--test-threads` says:
/// they measure CPU time and rates, and each would see the others' cgroups as leftovers.
pub struct NoLeftovers {
    before: BTreeSet<PathBuf>,
    pins_before: BTreeSet<PathBuf>,
    /// nbt's home for this test (`NBT_HOME`: receipts and node key), removed on drop, so tests
    /// never write into the machine's own receipt store.
    home: tempfile::TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl NoLeftovers {
    pub fn new() -> Self {
        require_root();
        // A test that failed while holding the lock poisons it; the next one may still run.
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let home = tempfile::Builder::new()
            .prefix("nbt-test-home-")
            .tempdir()
            .expect("making a temporary NBT_HOME");
        // Tests are serialized (above); every nbt they start through nbt_command gets it.
        *GUARDED_HOME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(home.path().to_path_buf());
        NoLeftovers {
            before: run_cgroups(),
            pins_before: run_pins(),
            home,
            _serial: serial,
        }
    }

    /// This test's `NBT_HOME`: `receipts.db` and `node.key` are made there.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// New run cgroups whose nbt is gone: a run of another nbt that is still alive (another
    /// user of the machine, say) is not a leftover of this test.
    fn leftovers(&self) -> Vec<PathBuf> {
        let state = nbt::state::state_dir();
        let cgroups = run_cgroups();
        let pins = run_pins();
        cgroups
            .difference(&self.before)
            .chain(pins.difference(&self.pins_before))
            .filter(|dir| {
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
                nbt::state::RunRecord::find_live(&state, name).is_err()
            })
            .cloned()
            .collect()
    }

    /// Checks now (the guard checks again on drop).
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        if !left.is_empty() {
            remove(&left);
            panic!("nbt left cgroups or pinned links behind: {left:?}");
        }
    }
}

/// The directories of pinned links under /sys/fs/bpf/nbt, one per run.
pub fn run_pins() -> BTreeSet<PathBuf> {
    std::fs::read_dir("/sys/fs/bpf/nbt")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Removes leftover cgroups (killing their processes) and pin directories.
fn remove(left: &[PathBuf]) {
    let (pins, cgroups): (Vec<PathBuf>, Vec<PathBuf>) = left
        .iter()
        .cloned()
        .partition(|dir| dir.starts_with("/sys/fs/bpf"));
    let _ = nbt::enforce::cgroup::kill_and_remove(&cgroups);
    for dir in pins {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

impl Default for NoLeftovers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        *GUARDED_HOME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        let left = self.leftovers();
        if left.is_empty() {
            return;
        }
        remove(&left);
        if !std::thread::panicking() {
            panic!("nbt left cgroups or pinned links behind: {left:?}");
        }
    }
}

/// Two network namespaces of the test's own joined by a veth pair: `a` (192.0.2.1, where the run
/// lives) and `b` (192.0.2.2, its peer). 192.0.2.0/24 is TEST-NET-1: never routed anywhere, and
/// reachable here only between these two namespaces. Removed on drop, also when a test fails.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
}

pub const ADDR_A: &str = "192.0.2.1";
pub const ADDR_B: &str = "192.0.2.2";

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(status.success(), "ip {args:?} failed");
}

/// The name of the (one) veth interface in namespace `ns`.
fn veth_in(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "type", "veth"])
        .output()
        .expect("running ip (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(": ")
        .nth(1)
        .and_then(|d| d.split('@').next())
        .expect("the veth in the namespace")
        .to_string()
}

impl NetnsPair {
    pub fn new(tag: &str) -> NetnsPair {
        require_root();
        let id = std::process::id();
        let pair = NetnsPair {
            a: format!("nbt-test-{id}-{tag}-a"),
            b: format!("nbt-test-{id}-{tag}-b"),
        };
        // Names of at most 15 bytes for the interfaces.
        let (veth_a, veth_b) = (
            format!("nbt{}a", id % 100_000),
            format!("nbt{}b", id % 100_000),
        );
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "-n", &pair.a, "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
            "netns", &pair.b,
        ]);
        ip(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{ADDR_A}/24"),
            "dev",
            &veth_a,
        ]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{ADDR_B}/24"),
            "dev",
            &veth_b,
        ]);
        for (ns, dev) in [(&pair.a, &veth_a), (&pair.b, &veth_b)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Gives `b`'s end of the veth pair one more address (in the same /24).
    pub fn add_address_b(&self, addr: &str) {
        let dev = veth_in(&self.b);
        ip(&[
            "-n",
            &self.b,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &dev,
        ]);
    }

    /// Sets the MTU of both ends of the veth pair.
    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        for ns in [&self.a, &self.b] {
            let dev = veth_in(ns);
            ip(&["-n", ns, "link", "set", &dev, "mtu", &mtu]);
        }
    }

    /// What `tc qdisc show` lists in namespace `name`.
    pub fn qdiscs(name: &str) -> String {
        let out = Command::new("tc")
            .args(["-n", name, "qdisc", "show"])
            .output()
            .expect("running tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn open(name: &str) -> std::fs::File {
        std::fs::File::open(format!("/run/netns/{name}")).expect("netns file")
    }

    /// Runs `f` on a thread that lives in namespace `name`: sockets it makes stay there.
    pub fn in_netns<T: Send + 'static>(
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = Self::open(name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            assert_eq!(
                // SAFETY: setns(2) on this thread only, with a namespace file we opened.
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            f()
        })
    }

    /// `nbt ARGS` with nbt (and so the workload) in namespace `a`.
    pub fn nbt_in_a(&self, args: &[&str]) -> Run {
        nbt_in_netns(&self.a, args)
    }
}

/// `nbt ARGS`, run inside network namespace `name` (only the network namespace: nbt must still
/// see the machine's cgroup mounts, which `ip netns exec` would hide).
pub fn nbt_in_netns(name: &str, args: &[&str]) -> Run {
    let output = nbt_command_in_netns(name)
        .args(args)
        .output()
        .expect("running nbt");
    Run::from_output(output)
}

/// [`nbt_command`], for an nbt that starts in network namespace `name`.
pub fn nbt_command_in_netns(name: &str) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = NetnsPair::open(name);
    let mut command = nbt_command();
    // SAFETY: between fork and exec, one syscall on a descriptor the command holds open.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        for ns in [&self.a, &self.b] {
            // (Quietly: a test may have deleted one already.)
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// What a receiver saw of `count` numbered datagrams.
pub struct Arrivals {
    /// How many times each sequence number arrived.
    pub times: Vec<u32>,
    /// Datagrams whose bytes were not what the sender wrote (sequence out of range included).
    pub damaged: u64,
}

/// Receives numbered datagrams in namespace `ns` until 2 s pass without one: `nbt-testbin
/// udp-send`'s, whose bytes after the number are ones (`fill`), or `udp-paced`'s (zeros).
pub fn receive_numbered(
    ns: &str,
    port: u16,
    count: u64,
    fill: u8,
) -> std::thread::JoinHandle<Arrivals> {
    receive_numbered_at(ns, ADDR_B, port, count, fill)
}

/// As [`receive_numbered`], on address `addr` of namespace `ns`.
pub fn receive_numbered_at(
    ns: &str,
    addr: &str,
    port: u16,
    count: u64,
    fill: u8,
) -> std::thread::JoinHandle<Arrivals> {
    let addr = addr.to_string();
    NetnsPair::in_netns(ns, move || {
        use std::os::fd::AsRawFd;
        let socket = std::net::UdpSocket::bind(format!("{addr}:{port}")).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        // 64 MiB of receive buffer (SO_RCVBUFFORCE, as root): a receiver descheduled on a busy
        // machine must not lose datagrams, or what is measured is not nbt's.
        let bytes: libc::c_int = 64 << 20;
        // SAFETY: setsockopt with a pointer to a local int and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&bytes as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE");
        let mut arrivals = Arrivals {
            times: vec![0; count as usize],
            damaged: 0,
        };
        let mut buffer = [0u8; 2048];
        while let Ok(n) = socket.recv(&mut buffer) {
            let seq = u64::from_le_bytes(buffer[..8].try_into().unwrap());
            if n < 8 || seq >= count || buffer[8..n].iter().any(|b| *b != fill) {
                arrivals.damaged += 1;
            } else {
                arrivals.times[seq as usize] += 1;
            }
        }
        arrivals
    })
}

impl Arrivals {
    /// Which of the numbered datagrams arrived at least once.
    pub fn arrived(&self) -> Vec<bool> {
        self.times.iter().map(|t| *t > 0).collect()
    }
}

/// Bytes a receiver took in, with the time of each read since the first byte.
pub struct Received {
    pub marks: Vec<(f64, u64)>,
}

impl Received {
    /// All the bytes taken in.
    pub fn bytes(&self) -> u64 {
        self.marks.last().map_or(0, |m| m.1)
    }

    /// Payload bits per second between `from` and `to` seconds after the first byte (see
    /// [`rate::slope_bits_per_sec`]).
    pub fn rate_between(&self, from: f64, to: f64) -> f64 {
        let last = self.marks.last().map_or(0.0, |m| m.0);
        assert!(
            last >= to,
            "the transfer ended at {last:.1} s, before {to} s"
        );
        rate::slope_bits_per_sec(&self.marks, from, to)
    }
}

/// A TCP listener on `addr` that accepts and closes connections until the test ends; its
/// address.
pub fn accepting(addr: &str) -> String {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    local
}

/// Accepts one TCP connection on `listener` and reads it to the end.
pub fn receive_all(listener: std::net::TcpListener) -> Received {
    let (stream, _) = listener.accept().expect("accept");
    let (marks, end) = rate::read_marks(stream);
    end.expect("read");
    Received { marks }
}
