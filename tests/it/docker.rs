//! The Docker engine the container tests use (tests/src/docker.rs): a real dockerd of the test's
//! own runs a busybox container, in cgroups of its own, on a network of the test's own; and when
//! the engine is dropped, nothing of it is left on the machine.

use std::path::PathBuf;
use std::process::Command;

use nbt_integration_tests::docker::{
    cgroup_mounts, memory_hog, mounts_under, processes_naming, ContainerNet, DockerEngine,
};
use nbt_integration_tests::NoLeftovers;

/// The machine's own interfaces (the test's namespace is the machine's).
fn machine_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("running ip (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn engine_runs_a_container_and_leaves_nothing() {
    let guard = NoLeftovers::new();
    let ip_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let engine = DockerEngine::start();
    let dir = engine.dir().to_path_buf();
    // Its dockerd and its own containerd.
    let programs: Vec<String> = processes_naming(&dir)
        .into_iter()
        .filter_map(|(_, cmdline)| cmdline.split(' ').next().map(String::from))
        .collect();
    assert!(
        programs.iter().any(|p| p == "dockerd") && programs.iter().any(|p| p == "containerd"),
        "{programs:?}"
    );
    let container = engine.run("smoke", &[], &["sleep", "1000"]);
    let id = container.id().to_string();
    let pid = container.pid();
    // A shim serves it: one more process of the engine's.
    assert!(
        processes_naming(&dir)
            .iter()
            .any(|(_, cmdline)| cmdline.contains("containerd-shim") && cmdline.contains(&id)),
        "{:?}",
        processes_naming(&dir)
    );

    // Its cgroups: /docker/<id> in v2, and in v1's memory hierarchy where there is one.
    let v2 = container.cgroup_v2();
    assert!(v2.ends_with(format!("docker/{id}")), "{}", v2.display());
    let procs = std::fs::read_to_string(v2.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "{pid} not in {}",
        v2.display()
    );
    let memory_v1 = container.cgroup_v1("memory");
    if let Some(memory) = &memory_v1 {
        assert!(
            memory.ends_with(format!("docker/{id}")),
            "{}",
            memory.display()
        );
        assert!(memory.join("memory.limit_in_bytes").exists());
    }
    let cgroups: Vec<PathBuf> = container.cgroups().into_iter().map(|(_, d)| d).collect();
    assert!(cgroups.iter().all(|d| d.is_dir()), "{cgroups:?}");

    // Nothing of the machine's network: no docker0, ip_forward as it was.
    assert!(!machine_links().contains("docker0"), "{}", machine_links());

    // Its network: 10 MiB from busybox's nc in the container to a receiver in the test's
    // namespace.
    let net = ContainerNet::connect(&container, "smoke");
    let receiver = net.receive_tcp(5301);
    let send = format!(
        "dd if=/dev/zero bs=64k count=160 2>/dev/null | nc {} 5301",
        ContainerNet::RECEIVER_ADDR
    );
    let sent = container.exec(&["sh", "-c", &send]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let received = receiver.join().expect("the receiver");
    assert_eq!(
        received.marks.last().map(|m| m.1),
        Some(10 << 20),
        "bytes received"
    );
    let ns = net.receiver_ns.clone();
    drop(net);
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains(&ns));

    drop(container);
    let left: Vec<&PathBuf> = cgroups.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "docker rm left cgroups {left:?}");

    drop(engine);
    assert_eq!(processes_naming(&dir), vec![], "processes of the engine");
    assert_eq!(
        mounts_under(&dir),
        Vec::<PathBuf>::new(),
        "mounts of the engine"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    for mount in cgroup_mounts() {
        let cgroup = mount.join("docker").join(&id);
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        ip_forward
    );
    guard.assert_clean();
}

/// The memory hog the container tests use allocates memory that its container's cgroup is
/// charged for: OOM-killed under a 32 MiB cap at 64 MiB, not at 16.
#[test]
fn a_memory_hog_is_oom_killed_under_the_containers_cap() {
    let guard = NoLeftovers::new();
    let engine = DockerEngine::start();
    let cap = ["--memory", "32m", "--memory-swap", "32m"];

    let hog = engine.run("hog", &cap, &["sh", "-c", &memory_hog(64)]);
    assert_eq!(hog.wait(), 137, "SIGKILL");
    assert_eq!(hog.inspect("{{.State.OOMKilled}}"), "true");

    let fits = engine.run("fits", &cap, &["sh", "-c", &memory_hog(16)]);
    assert_eq!(fits.wait(), 0);
    assert_eq!(fits.inspect("{{.State.OOMKilled}}"), "false");

    // In a container that lives on: the kill and the peak, in the container's own cgroup.
    let script = format!("{}; sleep 1000", memory_hog(64));
    let lives = engine.run("lives", &cap, &["sh", "-c", &script]);
    let events = match lives.cgroup_v1("memory") {
        Some(dir) => dir.join("memory.oom_control"),
        None => lives.cgroup_v2().join("memory.events"),
    };
    let oom_kills = || -> u64 {
        std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while oom_kills() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(oom_kills(), 1, "{}", events.display());
    if let Some(dir) = lives.cgroup_v1("memory") {
        let peak: u64 = std::fs::read_to_string(dir.join("memory.max_usage_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            (24 << 20..=32 << 20).contains(&peak),
            "peak {peak}: the hog did not fill the 32 MiB cap"
        );
    }
    drop((hog, fits, lives));
    drop(engine);
    guard.assert_clean();
}
