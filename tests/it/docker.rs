//! The Docker engine the container tests use (tests/src/docker.rs): a real dockerd of the test's
//! own runs a busybox container, in cgroups of its own, on a network of the test's own; and when
//! the engine is dropped, nothing of it is left on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbt_integration_tests::docker::{
    cgroup_mounts, memory_hog, mounts_under, processes_naming, ContainerNet, DockerEngine,
};
use nbt_integration_tests::{nbt, NoLeftovers};

use crate::attach::{attach_with_env, finished};

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

/// Every limit file of the container's cgroups nbt may write, and its content now.
fn limit_files(
    container: &nbt_integration_tests::docker::Container<'_>,
) -> std::collections::BTreeMap<PathBuf, String> {
    let dirs: Vec<PathBuf> = container.cgroups().into_iter().map(|(_, d)| d).collect();
    nbt_integration_tests::limit_files(dirs.iter().map(PathBuf::as_path))
}

#[test]
fn attach_caps_a_running_containers_memory_and_puts_its_limits_back() {
    let guard = NoLeftovers::new();
    let engine = DockerEngine::start();
    let host = engine.host();
    // Docker's own limits, which nbt must put back as they were.
    let container = engine.run(
        "attach-mem",
        &["--pids-limit", "123", "--cpus", "1.5"],
        &["sleep", "1000"],
    );
    let before = limit_files(&container);
    assert!(before.len() >= 4, "{before:?}");
    let (held, name) = attach_with_env(
        &[
            "--container",
            container.name(),
            "--memory",
            "32M",
            "--swap",
            "0",
            "--pids",
            "50",
        ],
        &[("DOCKER_HOST", &host)],
    );
    // The container's own memory limit is nbt's now: a hog in it is OOM-killed.
    let hog = container.exec(&["sh", "-c", &memory_hog(64)]);
    assert_eq!(hog.status.code(), Some(137), "{hog:?}");
    let fits = container.exec(&["sh", "-c", &memory_hog(8)]);
    assert!(fits.status.success(), "{fits:?}");
    let detach = nbt(&["detach", &name]);
    assert_eq!(detach.status(), 0, "{}", detach.stderr());
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    let summary = run.summary.as_ref().unwrap();
    assert_eq!(summary["attached"]["kind"], "container");
    assert!(
        summary["attached"]["target"]
            .as_str()
            .unwrap()
            .contains(container.name()),
        "{summary}"
    );
    assert!(run.u64("/cgroup/oom_kills") >= 1, "{}", run.stderr());
    let peak = run.u64("/cgroup/memory_peak_bytes");
    assert!(peak <= 32 << 20, "peak {peak} above the 32 MiB cap");
    assert_eq!(limit_files(&container), before, "not every file went back");
    assert_eq!(container.inspect("{{.State.Running}}"), "true");
    // The engine's view agrees: its own limits, unchanged.
    assert_eq!(container.inspect("{{.HostConfig.PidsLimit}}"), "123");
    drop(container);
    drop(engine);
    guard.assert_clean();
}

#[test]
fn attach_shapes_a_running_containers_rate_and_closes_its_gate() {
    let guard = NoLeftovers::new();
    let engine = DockerEngine::start();
    let host = engine.host();
    let container = engine.run("attach-net", &[], &["sleep", "1000"]);
    let net = ContainerNet::connect(&container, "an");
    let before = limit_files(&container);

    // 10mbit on the container's own traffic, in its own network namespace.
    let (held, _) = attach_with_env(
        &["--container", container.name(), "--egress-rate", "10mbit"],
        &[("DOCKER_HOST", &host)],
    );
    let receiver = net.receive_tcp(5301);
    let send = format!(
        "dd if=/dev/zero bs=64k count=128 2>/dev/null | nc {} 5301",
        ContainerNet::RECEIVER_ADDR
    );
    let sent = container.exec(&["sh", "-c", &send]);
    assert!(sent.status.success(), "{sent:?}");
    let received = receiver.join().unwrap();
    // SAFETY: kill(2) of the nbt this test started: Ctrl-C.
    unsafe { libc::kill(held.id() as i32, libc::SIGINT) };
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    // 1448 payload bytes per 1500 on the wire (the segment nbt caps a 10mbit socket to).
    let ratio = received.rate_between(1.0, 5.0) * 1500.0 / 1448.0 / 10e6;
    eprintln!("attach --container, 10mbit: {ratio:.4} of the limit");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{ratio:.4} of 10mbit; dropped for rate: {}",
        run.u64("/shaped/egress/rate_dropped_packets")
    );

    // A spent balance closes the gate to the receiver: the container's connect is refused.
    let (held, _) = attach_with_env(
        &[
            "--container",
            container.name(),
            "--balance",
            "0",
            "--gate",
            ContainerNet::RECEIVER_ADDR,
        ],
        &[("DOCKER_HOST", &host)],
    );
    // No listener is needed: the gate refuses the connect before a SYN leaves.
    let refused = container.exec(&[
        "sh",
        "-c",
        &format!("echo x | nc {} 5302", ContainerNet::RECEIVER_ADDR),
    ]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not permitted"),
        "{refused:?}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(held.id() as i32, libc::SIGINT) };
    let run = finished(held);
    assert_eq!(run.status(), 0, "{}", run.stderr());
    assert!(run.u64("/ledger/blocked_calls") >= 1, "{}", run.stderr());
    // Detached, the gate is gone: the same connect passes.
    let receiver = net.receive_tcp(5303);
    let passes = container.exec(&[
        "sh",
        "-c",
        &format!("echo x | nc {} 5303", ContainerNet::RECEIVER_ADDR),
    ]);
    assert!(passes.status.success(), "{passes:?}");
    assert_eq!(receiver.join().unwrap().marks.last().map(|m| m.1), Some(2));
    assert_eq!(limit_files(&container), before);
    drop(net);
    drop(container);
    drop(engine);
    guard.assert_clean();
}

/// deploy/docker/Dockerfile builds the agent's image from the nbt binary, on a base made here by
/// `docker import` (busybox and the libraries the binary links), with no registry; the agent
/// runs in it as the Kubernetes DaemonSet runs it, and serves /metrics on the container's own
/// network.
#[test]
fn the_agents_image_builds_and_serves_metrics() {
    use std::io::{Read as _, Write as _};
    let guard = NoLeftovers::new();
    let engine = DockerEngine::start();
    let nbt = nbt_integration_tests::nbt_bin();
    let base = tempfile::tempdir().unwrap();
    let script = format!(
        "set -e; mkdir -p {root}/bin {root}/tmp; cp /bin/busybox {root}/bin/; ln -s busybox {root}/bin/sh; \
         for l in $(ldd '{bin}' | grep -o '/[^ ]*'); do mkdir -p \"{root}$(dirname $l)\"; cp -L \"$l\" \"{root}$l\"; done; \
         tar -C {root} -c . | DOCKER_HOST={host} DOCKER_CONFIG={config} {cli} import - nbt-test-base:agent",
        root = base.path().display(),
        bin = nbt.display(),
        host = engine.host(),
        config = engine.dir().join("cli").display(),
        cli = if Path::new("/usr/bin/docker").exists() { "/usr/bin/docker" } else { "docker" },
    );
    let imported = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let context = tempfile::tempdir().unwrap();
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker/Dockerfile");
    std::fs::copy(&dockerfile, context.path().join("Dockerfile")).unwrap();
    std::fs::copy(&nbt, context.path().join("nbt")).unwrap();
    let built = engine
        .command()
        .env("DOCKER_BUILDKIT", "0")
        .args([
            "build",
            "--build-arg",
            "BASE=nbt-test-base:agent",
            "-t",
            "nbt-agent:test",
        ])
        .arg(context.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let agent = engine.run_image(
        "agent",
        // The capabilities the agent uses, named: --privileged (as the DaemonSet has it) asks
        // for every one, and this machine's bounding set lacks CAP_SYS_RESOURCE. Docker 20.10
        // knows no CAP_BPF or CAP_PERFMON: CAP_SYS_ADMIN covers both.
        &[
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "DAC_READ_SEARCH",
            "--security-opt",
            "seccomp=unconfined",
            "--pid",
            "host",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "-v",
            "/sys/fs/bpf:/sys/fs/bpf",
        ],
        "nbt-agent:test",
        &[],
    );
    let net = ContainerNet::connect(&agent, "ag");
    let address = format!("{}:8787", ContainerNet::CONTAINER_ADDR);
    let metrics = nbt_integration_tests::NetnsPair::in_netns(&net.receiver_ns, move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(&address) {
                stream
                    .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
                    .unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                return answer;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    })
    .join()
    .unwrap();
    assert!(
        metrics.starts_with("HTTP/1.1 200") || metrics.starts_with("HTTP/1.0 200"),
        "{metrics}"
    );
    assert!(metrics.contains("nbt_build_info{"), "{metrics}");
    assert_eq!(agent.inspect("{{.State.Running}}"), "true");
    drop(net);
    drop(agent);
    drop(engine);
    guard.assert_clean();
}
