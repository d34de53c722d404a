//! Zones (`nbt zone`): limits that outlive nbt, commands started in them, processes moved in
//! and sent home, and everything removed with a receipt.

use std::time::Duration;

use nbt_integration_tests::{cgroup_parents, nbt, NoLeftovers};

use crate::attach::Target;
use crate::hwcaps::FakeSys;

const MIB: u64 = 1 << 20;

/// Removes the zone on drop when a test failed before it did.
struct ZoneGuard(&'static str);

impl Drop for ZoneGuard {
    fn drop(&mut self) {
        let _ = nbt(&["zone", "remove", self.0]);
    }
}

#[test]
fn a_zone_holds_without_nbt_and_remove_puts_everything_back() {
    let guard = NoLeftovers::new();
    let apply = nbt(&[
        "zone",
        "apply",
        "ztest",
        "--json",
        "--memory",
        "128M",
        "--swap",
        "0",
        "--pids",
        "40",
        "--egress-rate",
        "10mbit",
    ]);
    let _zone = ZoneGuard("ztest");
    assert_eq!(apply.status(), 0, "{}", apply.stderr());
    let applied: serde_json::Value = serde_json::from_str(apply.stdout().trim()).unwrap();
    let run = applied["run"].as_str().unwrap().to_string();
    let v2 = cgroup_parents()[0].join(&run);
    assert!(v2.is_dir());
    // No nbt holds it, nbt cleanup leaves it alone, nbt ps lists it as a zone.
    let cleanup = nbt(&["cleanup"]);
    assert!(
        cleanup.stderr().contains("zone ztest is in force"),
        "{}",
        cleanup.stderr()
    );
    assert!(v2.is_dir(), "nbt cleanup removed a live zone");
    let ps: serde_json::Value = serde_json::from_str(&nbt(&["ps", "--json"]).stdout()).unwrap();
    let listed = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == run.as_str())
        .unwrap();
    assert_eq!(listed["kind"], "zone");
    assert_eq!(listed["orphan"], false);

    // A command started in it is under its memory cap: OOM-killed.
    let exec = nbt(&[
        "zone",
        "exec",
        "ztest",
        "--user",
        "nobody",
        "--",
        nbt_integration_tests::testbin().to_str().unwrap(),
        "alloc",
        "512",
    ]);
    assert_eq!(exec.status(), 137, "{}", exec.stderr());
    // A process moved in is under it too, and goes back home at the end, alive.
    let mut target = Target::start(None, &["sleep", "60"]);
    let home = std::fs::read_to_string(format!("/proc/{}/cgroup", target.pid())).unwrap();
    let pid = target.pid().to_string();
    let moved = nbt(&["zone", "attach", "ztest", "--pid", &pid]);
    assert_eq!(moved.status(), 0, "{}", moved.stderr());
    let inside = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(inside.contains(&run), "{inside}");
    // nbt set changes it by its name.
    let set = nbt(&["set", "ztest", "--pids", "30"]);
    assert_eq!(set.status(), 0, "{}", set.stderr());
    let pids_dir = cgroup_parents()
        .into_iter()
        .map(|p| p.join(&run))
        .find(|d| d.join("pids.max").exists())
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "30"
    );

    let remove = nbt(&["zone", "remove", "ztest", "--json"]);
    assert_eq!(remove.status(), 0, "{}", remove.stderr());
    let summary = remove.summary.as_ref().unwrap();
    assert_eq!(summary["zone"]["moved_back"], 1);
    assert!(
        summary["cgroup"]["oom_kills"].as_u64() >= Some(1),
        "{summary}"
    );
    assert!(summary["receipt"]["receipt_hash"].is_string(), "{summary}");
    assert_eq!(summary["limits"]["memory_bytes"], 128 * MIB);
    // The limits at the end: `nbt set` changed the pids limit from 40 to 30.
    assert_eq!(summary["limits"]["pids"], 30, "{summary}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap(),
        home,
        "the moved-in process did not go home"
    );
    assert!(
        target.alive(),
        "zone remove killed a process it did not start"
    );
    assert!(!v2.exists(), "the zone's cgroup is still there");
    let verify = nbt(&["receipts", "verify"]);
    assert_eq!(verify.status(), 0, "{}", verify.stderr());
    let again = nbt(&["zone", "remove", "ztest"]);
    assert_eq!(again.status(), 2, "{}", again.stderr());
    guard.assert_clean();
}

#[test]
fn what_a_zone_cannot_do_without_nbt_is_refused() {
    let guard = NoLeftovers::new();
    for (args, says) in [
        (
            &["zone", "apply", "zx", "--price-hour", "1", "--balance", "5"][..],
            "--price-hour",
        ),
        (&["zone", "apply", "9bad", "--cpus", "1"][..], "NAME"),
        (&["zone", "apply", "zx", "--name", "other"][..], "--name"),
        (
            &["zone", "exec", "nosuchzone", "--", "true"][..],
            "no zone named",
        ),
    ] {
        let run = nbt(args);
        assert_eq!(run.status(), 2, "{args:?}: {}", run.stderr());
        assert!(run.stderr().contains(says), "{args:?}: {}", run.stderr());
    }
    guard.assert_clean();
}

/// A zone's hardware caps stay in force with no nbt running, `nbt cleanup` leaves them, and
/// `nbt zone remove` puts them back (against a stand-in for sysfs, as tests/it/hwcaps.rs).
#[test]
fn a_zones_hardware_caps_hold_until_it_is_removed() {
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let with_sys = |args: &[&str]| {
        nbt_integration_tests::Run::from_output(
            nbt_integration_tests::nbt_command()
                .env("NBT_SYSFS_ROOT", sys.root())
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let apply = with_sys(&[
        "zone",
        "apply",
        "zhw",
        "--cpu-max-freq",
        "2.0GHz",
        "--no-turbo",
    ]);
    let _zone = ZoneGuard("zhw");
    assert_eq!(apply.status(), 0, "{}", apply.stderr());
    assert_eq!(sys.max_freqs(), ["2000000", "2000000"]);
    assert_eq!(sys.no_turbo(), "1");
    let cleanup = with_sys(&["cleanup"]);
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert_eq!(
        sys.max_freqs(),
        ["2000000", "2000000"],
        "cleanup put a live zone's caps back"
    );
    // A run cannot take a cap the zone holds.
    let run = with_sys(&["run", "--cpu-max-freq", "1.5GHz", "--", "true"]);
    assert_ne!(run.status(), 0, "{}", run.stderr());
    assert!(run.stderr().contains("is held by"), "{}", run.stderr());
    let remove = with_sys(&["zone", "remove", "zhw", "--json"]);
    assert_eq!(remove.status(), 0, "{}", remove.stderr());
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    assert_eq!(sys.no_turbo(), "0");
    let summary = remove.summary.as_ref().unwrap();
    assert_eq!(summary["hardware"]["restored"], true, "{summary}");
    guard.assert_clean();
}
