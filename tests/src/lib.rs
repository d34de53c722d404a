//! Helpers for nbt's integration tests: find the binaries, run nbt, read its JSON summary, and make
//! sure nothing a test started is left behind, also when the test fails.
//!
//! These tests use the real kernel (cgroups, BPF, sockets) and must run as root, one at a time
//! (`cargo xtask test` does both): they measure CPU time, which parallel tests would disturb.

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
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
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
}

/// Runs `nbt ARGS` to completion. The summary is parsed from the last line of stdout when it is JSON.
pub fn nbt(args: &[&str]) -> Run {
    let output = Command::new(nbt_bin())
        .args(args)
        .output()
        .expect("running nbt");
    let summary = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok());
    Run { output, summary }
}

/// `nbt run --json LIMITS -- nbt-testbin MODE ARGS`.
pub fn run_testbin(limits: &[&str], workload: &[&str]) -> Run {
    let testbin = testbin();
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(limits);
    args.push("--");
    args.push(testbin.to_str().unwrap());
    args.extend_from_slice(workload);
    nbt(&args)
}

/// The directories beneath which nbt makes run cgroups on this machine (one per hierarchy).
pub fn cgroup_parents() -> Vec<PathBuf> {
    let layout = nbt::cgroup::Layout::detect().expect("cgroup layout");
    layout
        .run_dirs("x")
        .expect("cgroup v2")
        .into_iter()
        .map(|d| d.parent().unwrap().to_path_buf())
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
pub struct NoLeftovers {
    before: BTreeSet<PathBuf>,
}

impl NoLeftovers {
    pub fn new() -> Self {
        require_root();
        NoLeftovers {
            before: run_cgroups(),
        }
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        run_cgroups().difference(&self.before).cloned().collect()
    }

    /// Checks now (the guard checks again on drop).
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        if !left.is_empty() {
            let _ = nbt::cgroup::kill_and_remove(&left);
            panic!("nbt left cgroups behind: {left:?}");
        }
    }
}

impl Default for NoLeftovers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        let left = self.leftovers();
        if left.is_empty() {
            return;
        }
        let _ = nbt::cgroup::kill_and_remove(&left);
        if !std::thread::panicking() {
            panic!("nbt left cgroups behind: {left:?}");
        }
    }
}
