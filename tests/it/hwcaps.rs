//! Hardware caps against a temporary directory standing in for sysfs (`NBT_SYSFS_ROOT`): applied
//! during the run, put back after it however it ends, by `nbt cleanup` after SIGKILL, refused
//! when out of range, missing, or held by another run. The machine's own /sys is never written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nbt_integration_tests::{nbt_command, NoLeftovers, Run};

const CPUS: usize = 2;

pub struct FakeSys {
    dir: tempfile::TempDir,
}

impl FakeSys {
    pub fn new() -> FakeSys {
        let dir = tempfile::tempdir().unwrap();
        for cpu in 0..CPUS {
            let freq = dir
                .path()
                .join(format!("devices/system/cpu/cpu{cpu}/cpufreq"));
            std::fs::create_dir_all(&freq).unwrap();
            std::fs::write(freq.join("scaling_max_freq"), "3500000\n").unwrap();
            std::fs::write(freq.join("cpuinfo_min_freq"), "800000\n").unwrap();
            std::fs::write(freq.join("cpuinfo_max_freq"), "3500000\n").unwrap();
        }
        let pstate = dir.path().join("devices/system/cpu/intel_pstate");
        std::fs::create_dir_all(&pstate).unwrap();
        std::fs::write(pstate.join("no_turbo"), "0\n").unwrap();
        FakeSys { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn max_freqs(&self) -> Vec<String> {
        (0..CPUS)
            .map(|cpu| {
                let path = self.root().join(format!(
                    "devices/system/cpu/cpu{cpu}/cpufreq/scaling_max_freq"
                ));
                std::fs::read_to_string(path).unwrap().trim().to_string()
            })
            .collect()
    }

    pub fn no_turbo(&self) -> String {
        std::fs::read_to_string(self.root().join("devices/system/cpu/intel_pstate/no_turbo"))
            .unwrap()
            .trim()
            .to_string()
    }
}

fn nbt_with(root: &Path, args: &[&str]) -> Command {
    let mut command = nbt_command();
    command.env("NBT_SYSFS_ROOT", root).args(args);
    command
}

fn output(mut command: Command) -> Run {
    let output: Output = command.output().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    Run { output, summary }
}

fn state_files() -> Vec<PathBuf> {
    std::fs::read_dir(nbt::state::state_dir())
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "hwcaps"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the caps are in force (the workload has started).
fn wait_for_cap(sys: &FakeSys, khz: &str) {
    for _ in 0..100 {
        if sys.max_freqs().iter().all(|f| f == khz) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the cap {khz} was never applied: {:?}", sys.max_freqs());
}

fn spawn_holding(sys: &FakeSys, freq: &str, seconds: &str) -> Child {
    nbt_with(
        sys.root(),
        &["run", "--cpu-max-freq", freq, "--", "sleep", seconds],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

#[test]
fn caps_hold_during_the_run_and_are_restored_after() {
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let root = sys.root().display().to_string();
    let script = format!(
        "for f in {root}/devices/system/cpu/cpu*/cpufreq/scaling_max_freq {root}/devices/system/cpu/intel_pstate/no_turbo; do read v < $f; echo $v; done"
    );
    let run = output(nbt_with(
        sys.root(),
        &[
            "run",
            "--json",
            "--cpu-max-freq",
            "2.0GHz",
            "--no-turbo",
            "--",
            "sh",
            "-c",
            &script,
        ],
    ));
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let stdout = run.stdout();
    let seen: Vec<&str> = stdout.lines().take(CPUS + 1).collect();
    assert_eq!(seen, ["2000000", "2000000", "1"], "what the workload saw");
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    assert_eq!(sys.no_turbo(), "0");
    let hardware = &run.summary.as_ref().unwrap()["hardware"];
    assert_eq!(hardware["restored"], true, "{hardware}");
    assert_eq!(hardware["set"].as_array().unwrap().len(), CPUS + 1);
    assert!(
        run.stderr()
            .contains("hardware      set cpu0 scaling_max_freq 2 GHz"),
        "{}",
        run.stderr()
    );
    assert!(state_files().is_empty(), "{:?}", state_files());
    guard.assert_clean();
}

#[test]
fn sigterm_ends_the_run_and_the_caps_come_back() {
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let child = spawn_holding(&sys, "1200MHz", "30");
    wait_for_cap(&sys, "1200000");
    // SAFETY: kill(2) of our own child, which we have not waited for yet: the pid is still its.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    assert!(state_files().is_empty());
    guard.assert_clean();
}

#[test]
fn after_sigkill_nbt_cleanup_restores_from_the_state_file() {
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let mut child = spawn_holding(&sys, "2.0GHz", "30");
    wait_for_cap(&sys, "2000000");
    child.kill().unwrap();
    child.wait().unwrap();
    // nbt died: the caps are still in force, the originals on disk.
    assert_eq!(sys.max_freqs(), ["2000000", "2000000"]);
    let files = state_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let state = std::fs::read_to_string(&files[0]).unwrap();
    assert!(state.contains("\"value\": \"3500000\""), "{state}");
    // A new run asking for the same cap is told to clean up first.
    let refused = output(nbt_with(
        sys.root(),
        &["run", "--cpu-max-freq", "1GHz", "--", "true"],
    ));
    assert_ne!(refused.status(), 0);
    assert!(
        refused.stderr().contains("run `nbt cleanup`"),
        "{}",
        refused.stderr()
    );

    let cleanup = output(nbt_with(sys.root(), &["cleanup"]));
    assert_eq!(cleanup.status(), 0, "{}", cleanup.stderr());
    assert!(
        cleanup
            .stderr()
            .contains("restored the hardware caps of nbt-"),
        "{}",
        cleanup.stderr()
    );
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    assert!(state_files().is_empty());
    guard.assert_clean();
}

#[test]
fn a_cap_another_live_run_holds_is_refused() {
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let holder = spawn_holding(&sys, "2.0GHz", "3");
    wait_for_cap(&sys, "2000000");
    let second = output(nbt_with(
        sys.root(),
        &["run", "--cpu-max-freq", "1.5GHz", "--", "true"],
    ));
    assert_ne!(second.status(), 0);
    assert!(
        second.stderr().contains("cpu frequency is held by nbt-")
            && second.stderr().contains("cannot be shared"),
        "{}",
        second.stderr()
    );
    // The holder's cap was not disturbed, and comes back when it ends.
    assert_eq!(sys.max_freqs(), ["2000000", "2000000"]);
    let out = holder.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    guard.assert_clean();
}

#[test]
fn out_of_range_or_missing_hardware_is_refused_in_one_line() {
    let sys = FakeSys::new();
    let empty = tempfile::tempdir().unwrap();
    let gpu_absent = !Path::new("/dev/nvidia0").exists();
    let mut cases = vec![
        (
            sys.root(),
            vec!["--cpu-max-freq", "5GHz"],
            "invalid value '5GHz' for --cpu-max-freq: cpu0 allows 800 MHz to 3.5 GHz".to_string(),
        ),
        (
            sys.root(),
            vec!["--cpu-max-freq", "2000"],
            "invalid value '2000' for --cpu-max-freq: a unit is required".into(),
        ),
        (
            empty.path(),
            vec!["--cpu-max-freq", "2.0GHz"],
            format!(
                "cannot enforce --cpu-max-freq 2.0GHz: this machine has no cpufreq ({}/devices/system/cpu/cpu0/cpufreq absent",
                empty.path().display()
            ),
        ),
        (
            empty.path(),
            vec!["--no-turbo"],
            "cannot enforce --no-turbo true: neither".into(),
        ),
        (
            sys.root(),
            vec!["--gpu-clock", "fast"],
            "invalid value 'fast' for --gpu-clock".into(),
        ),
    ];
    cases.push((
        sys.root(),
        vec!["--gpu-memory", "8Mb"],
        "invalid value '8Mb' for --gpu-memory: a lower-case b means bits".into(),
    ));
    if gpu_absent {
        cases.push((
            sys.root(),
            vec!["--gpu-power-limit", "75"],
            "cannot enforce --gpu-power-limit 75: no NVIDIA driver on this machine".into(),
        ));
        cases.push((
            sys.root(),
            vec!["--gpu-memory", "8G"],
            "cannot enforce --gpu-memory 8G: no NVIDIA driver on this machine".into(),
        ));
    }
    for (root, args, expected) in cases {
        let mut all = vec!["run"];
        all.extend(args.iter().copied());
        all.extend(["--", "true"]);
        let run = output(nbt_with(root, &all));
        assert_eq!(run.status(), 2, "{all:?}: {}", run.stderr());
        assert!(
            run.stderr().contains(&expected),
            "{all:?}: {}",
            run.stderr()
        );
        assert_eq!(run.stderr().lines().count(), 1, "{all:?}: {}", run.stderr());
    }
    // Nothing was changed by the refusals.
    assert_eq!(sys.max_freqs(), ["3500000", "3500000"]);
    // nbt probe says the same.
    let probe = output(nbt_with(empty.path(), &["probe"]));
    let text = probe.stdout() + &probe.stderr();
    assert!(text.contains("--cpu-max-freq is refused"), "{text}");
    assert!(text.contains("--no-turbo is refused"), "{text}");
    assert!(text.contains("CPU temperature"), "{text}");
    assert!(text.contains("zenpower sensor under"), "{text}");
    if gpu_absent {
        assert!(text.contains("--gpu-memory are refused"), "{text}");
    }
    let probe = output(nbt_with(sys.root(), &["probe"]));
    let text = probe.stdout() + &probe.stderr();
    assert!(text.contains("--cpu-max-freq works"), "{text}");
}

/// The hottest CPU sensor is sampled through the run and summarised; a GPU that is not there
/// is named as such, not reported as zero.
#[test]
fn cpu_temperature_is_sampled_during_the_run() {
    // A run writes its receipt: into this test's own home.
    let guard = NoLeftovers::new();
    let sys = FakeSys::new();
    let hwmon = sys.root().join("class/hwmon/hwmon3");
    std::fs::create_dir_all(&hwmon).unwrap();
    std::fs::write(hwmon.join("name"), "coretemp\n").unwrap();
    std::fs::write(hwmon.join("temp1_input"), "50000\n").unwrap();
    std::fs::write(hwmon.join("temp2_input"), "45000\n").unwrap();
    // Another driver's sensor (a disk, say) is not the CPU's.
    let other = sys.root().join("class/hwmon/hwmon4");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("name"), "nvme\n").unwrap();
    std::fs::write(other.join("temp1_input"), "90000\n").unwrap();
    let script = format!(
        "sleep 1.5; echo 70000 > {}; sleep 1.5",
        hwmon.join("temp1_input").display()
    );
    let run = output(nbt_with(
        sys.root(),
        // Root: the workload plays the sensor's driver, writing the test's own sysfs tree.
        &["run", "--json", "--user", "root", "--", "sh", "-c", &script],
    ));
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let t = |field: &str| run.f64(&format!("/sensors/cpu_temperature_c/{field}"));
    assert_eq!((t("min"), t("max")), (50.0, 70.0), "{}", run.stderr());
    // Sampled every 0.5 s over 3 s: about half the samples at each level. How many fall on
    // each side moves with the machine's load (a busy host delays the shell's start: an average
    // of 55 or less was seen with a VM running beside), so the average is only required to lie
    // strictly between the two levels, from both sides' samples.
    assert!(t("samples") >= 5.0, "{}", t("samples"));
    assert!(t("avg") > 50.0 && t("avg") < 70.0, "avg {}", t("avg"));
    assert!(
        run.stderr().contains("cpu sensors   temperature 50/"),
        "{}",
        run.stderr()
    );
    if !Path::new("/dev/nvidia0").exists() {
        let absent = run.summary_str("/sensors/gpu_absent");
        assert!(
            absent.starts_with("no NVIDIA driver on this machine"),
            "{absent}"
        );
    }
    guard.assert_clean();
}
