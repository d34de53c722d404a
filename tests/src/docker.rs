//! A real Docker engine of the test's own, for tests that attach nbt to running containers.
//!
//! [`DockerEngine::start`] runs Debian's `dockerd` (package docker.io) with everything of its
//! own in a temporary directory: API socket, data-root, exec-root, pidfile, daemon.json, trust
//! key, and a `containerd` started for it (never the machine's: dockerd would use a running
//! system containerd, and the tests must not disturb a system Docker engine). No bridge, no
//! iptables, no IP forwarding: the engine touches none of the machine's interfaces; containers
//! run with `--network none`, and [`ContainerNet`] gives one a network of the test's own.
//!
//! No registry is reachable, so the image [`IMAGE`] is made on the spot by `docker import` from
//! the machine's static busybox (package busybox-static), every applet linked in /bin.
//!
//! Dropping the engine removes its containers, stops dockerd and containerd, kills what is left
//! of theirs (shims, container processes), unmounts what is left under its directory, removes
//! the `docker` cgroups it made, and the directory: also when the test panicked. An engine whose
//! test process was killed outright is cleaned up by the next [`DockerEngine::start`].

use std::collections::BTreeSet;
use std::fs;
use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{ip, receive_all, require_root, NetnsPair, Received, ADDR_A, ADDR_B};

/// The image every container of these tests runs: busybox alone, imported by the engine.
pub const IMAGE: &str = "nbt-busybox:test";

/// The static busybox the image is made of (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// Applets the tests count on; busybox-static has them all (and some 270 more, all linked).
const APPLETS: &[&str] = &[
    "sh", "sleep", "dd", "nc", "cat", "yes", "head", "tail", "tr", "ip",
];

/// Engines' directories are `/tmp/nbt-docker-<pid of the test process>-XXXXXX`. Under /tmp, not
/// $TMPDIR: containerd's sockets must fit in the 108 bytes of a socket address.
const DIR_PREFIX: &str = "nbt-docker-";

/// How long the engine has to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one docker CLI command may take before the test gives up on it.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// The Docker client: Debian's beside Debian's dockerd (the same version), else `docker` on PATH.
fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("docker")
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A shell command (for `sh -c`) that allocates and touches `mib` MiB of anonymous memory at
/// once: dd's buffer of one block, filled from /dev/zero. It counts against the container's
/// memory cgroup: under `--memory 32m`, `memory_hog(64)` is OOM-killed (exit 137, `OOMKilled`)
/// and `memory_hog(16)` is not. (`head -c 200m /dev/zero | tail` does too, growing as it goes:
/// tail keeps the last 10 lines, and /dev/zero has no newline.)
pub fn memory_hog(mib: u64) -> String {
    format!("dd if=/dev/zero of=/dev/null bs={mib}M count=1")
}

/// Runs `command` to its end, its output collected, or kills it after `limit` (then `None`).
/// Its stdin is the caller's to set.
fn output_within(command: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    let readers: Vec<JoinHandle<Vec<u8>>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    })
    .collect();
    let status = wait_within(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut outputs = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let (stdout, stderr) = (outputs.next().unwrap(), outputs.next().unwrap());
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child` up to `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Sends SIGTERM to `child` and waits up to `limit`, then SIGKILL. Returns whether it took SIGKILL.
fn stop(child: &mut Child, limit: Duration) -> bool {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return false;
    }
    // SAFETY: kill(2) of our own child, not yet reaped (try_wait above), so its pid is still ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_within(child, limit).is_some() {
        return false;
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// The last `lines` lines of a log file, for panic messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One line of /proc/self/mountinfo: where, and what kind.
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    /// The superblock's options: a v1 hierarchy's controllers (`memory`, `name=systemd`) are there.
    options: Vec<String>,
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], code) {
            (b'\\', Some(code)) => {
                out.push(code);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("reading /proc/self/mountinfo")
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
                fstype: right.first()?.to_string(),
                options: right.get(2)?.split(',').map(String::from).collect(),
            })
        })
        .collect()
}

/// Everything mounted at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// The mount point of every cgroup hierarchy (v1 and v2) of this machine.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.point)
        .collect()
}

/// The `docker` directory of each cgroup hierarchy, where a cgroupfs-driven engine puts its
/// containers (`/docker/<id>`), whether or not it exists.
fn docker_cgroup_parents() -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|m| m.join("docker"))
        .collect()
}

/// The cgroup directories of process `pid`, one per hierarchy: (controllers, directory), the
/// controllers empty for v2.
pub fn cgroups_of(pid: u32) -> Vec<(Vec<String>, PathBuf)> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/cgroup: {e}"));
    let mounts = mounts();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let controllers: Vec<String> = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            let mount = mounts.iter().find(|m| {
                if controllers.is_empty() {
                    m.fstype == "cgroup2"
                } else {
                    m.fstype == "cgroup" && controllers.iter().all(|c| m.options.contains(c))
                }
            })?;
            let relative = path
                .strip_prefix(mount.root.trim_end_matches('/'))
                .unwrap_or(path)
                .trim_start_matches('/');
            Some((controllers, mount.point.join(relative)))
        })
        .collect()
}

/// The dockerd, containerd, containerd-shim and runc processes whose command line names `dir`
/// (those of the engine living there), as (pid, command line).
pub fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = format!("{}/", dir.display());
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let program = cmdline.split(|b| *b == 0).next()?;
            let program = Path::new(std::ffi::OsStr::from_bytes(program)).file_name()?;
            let ours = ["dockerd", "containerd", "runc", "docker-"]
                .iter()
                .any(|p| program.as_bytes().starts_with(p.as_bytes()));
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (ours && cmdline.contains(&needle)).then(|| (pid, cmdline.trim().to_string()))
        })
        .collect()
}

/// The sockets that process `pid` has bound in /run/containerd/s (a containerd-shim's), by the
/// inodes of its descriptors in /proc/net/unix.
fn shim_sockets(pid: i32) -> Vec<PathBuf> {
    let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            (inodes.contains(*inode) && path.starts_with("/run/containerd/s/"))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Whether process `pid` lives (or is a zombie not yet reaped).
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `path` is a statically linked ELF executable (64-bit, little-endian): no program
/// header asks for an interpreter (PT_INTERP).
fn statically_linked(path: &Path) -> bool {
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum as usize).all(|i| u32_at(phoff as usize + i * phentsize as usize) != Some(PT_INTERP))
}

/// Removes what is left of the engine in `dir` by force: kills its dockerd, containerd and shims
/// (whatever names `dir`), then the processes of its containers (by their `docker/<id>` cgroups,
/// which are removed), removes what it made outside `dir` if empty, unmounts whatever is
/// mounted under `dir`, and removes `dir`. Returns what it had to do, and what it could not.
fn force_clean(dir: &Path) -> (Vec<String>, Vec<String>) {
    let (mut forced, mut failed) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    // The sockets of the shims killed here: a shim removes its own only when it exits cleanly.
    let mut sockets = BTreeSet::new();
    loop {
        let left = processes_naming(dir);
        if left.is_empty() {
            break;
        }
        for (pid, _) in &left {
            sockets.extend(shim_sockets(*pid));
        }
        if Instant::now() > deadline {
            failed.push(format!("processes still running after SIGKILL: {left:?}"));
            break;
        }
        for (pid, cmdline) in left {
            // SAFETY: kill(2) of a process whose command line names the engine's own directory.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                forced.push(format!("killed {pid} {cmdline}"));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for socket in sockets {
        if fs::remove_file(&socket).is_ok() {
            forced.push(format!("removed {}", socket.display()));
        }
    }
    // The containers this engine ever made, by the directories of its data-root.
    let ids: Vec<String> = fs::read_dir(dir.join("data/containers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let cgroups: Vec<PathBuf> = docker_cgroup_parents()
        .iter()
        .flat_map(|parent| ids.iter().map(move |id| parent.join(id)))
        .filter(|d| d.exists())
        .collect();
    if !cgroups.is_empty() {
        forced.push(format!("removed container cgroups {cgroups:?}"));
        if let Err(err) = nbt::enforce::cgroup::kill_and_remove(&cgroups) {
            failed.push(format!("{err:#}"));
        }
    }
    for _ in 0..3 {
        let left = mounts_under(dir);
        if left.is_empty() {
            break;
        }
        for point in left {
            let c_point = std::ffi::CString::new(point.as_os_str().as_bytes()).unwrap();
            // SAFETY: umount2(2) with a NUL-terminated path we own; MNT_DETACH never blocks.
            if unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH) } == 0 {
                forced.push(format!("unmounted {}", point.display()));
            }
        }
    }
    // What it made outside, once empty: rmdir fails on a cgroup with children, or on a
    // directory another engine (the machine's, another test's) is using.
    if let Ok(made) = fs::read_to_string(dir.join(MADE_OUTSIDE)) {
        for outside in made.lines() {
            let _ = fs::remove_dir(outside);
        }
    }
    if let Some(point) = mounts_under(dir).first() {
        failed.push(format!("still mounted: {}", point.display()));
    } else if dir.exists() {
        if let Err(err) = fs::remove_dir_all(dir) {
            failed.push(format!("removing {}: {err}", dir.display()));
        }
    }
    (forced, failed)
}

/// Cleans up the engines of test processes that are gone (killed before their engine's drop).
fn sweep_dead_engines() {
    let own = std::process::id() as i32;
    for entry in fs::read_dir("/tmp").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == own || alive(pid) {
            continue;
        }
        let (forced, failed) = force_clean(&entry.path());
        eprintln!(
            "docker engine of dead test process {pid} cleaned up: {forced:?}{}",
            if failed.is_empty() {
                String::new()
            } else {
                format!("; could not: {failed:?}")
            }
        );
    }
}

/// A private Docker engine (dockerd with its own containerd), and the image [`IMAGE`]. Stopped
/// and removed, with everything it made, on drop.
pub struct DockerEngine {
    dir: PathBuf,
    socket: PathBuf,
    cli: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
}

/// The file of an engine's directory listing the directories outside it that did not exist
/// before it started, and that it may make: removed with it when empty, the deepest first.
const MADE_OUTSIDE: &str = "made-outside";

/// What an engine may make outside its directory: the `docker` cgroup of each hierarchy (its
/// containers' parent), and /run/containerd/s (the shims' sockets: containerd 1.6 puts them
/// there whatever its configuration).
fn outside_dirs() -> Vec<PathBuf> {
    let mut dirs = docker_cgroup_parents();
    dirs.extend(["/run/containerd/s", "/run/containerd"].map(PathBuf::from));
    dirs
}

impl DockerEngine {
    /// Starts the engine and imports [`IMAGE`]; panics, with the tail of the engine's log, when
    /// it does not answer within 30 s.
    pub fn start() -> DockerEngine {
        require_root();
        for program in ["dockerd", "containerd", "runc", "containerd-shim-runc-v2"] {
            assert!(
                on_path(program),
                "{program} is missing: install Debian's docker.io (`cargo xtask setup`)"
            );
        }
        let cli = docker_cli();
        sweep_dead_engines();
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in("/tmp")
            .expect("making the engine's directory")
            .keep();
        // From here on, a panic drops the engine, which cleans up whatever was started.
        let made: Vec<String> = outside_dirs()
            .into_iter()
            .filter(|d| !d.exists())
            .map(|d| d.display().to_string())
            .collect();
        fs::write(dir.join(MADE_OUTSIDE), made.join("\n")).unwrap();
        let mut engine = DockerEngine {
            socket: dir.join("docker.sock"),
            dir,
            cli,
            containerd: None,
            dockerd: None,
        };
        engine.start_containerd();
        engine.start_dockerd();
        let up = began.elapsed();
        engine.import_image();
        eprintln!(
            "docker engine in {}: API up in {:.2} s, image imported in {:.2} s",
            engine.dir.display(),
            up.as_secs_f64(),
            (began.elapsed() - up).as_secs_f64()
        );
        engine
    }

    /// The engine's directory (everything of it lives there; gone after drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine's API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `DOCKER_HOST` for this engine: `unix://<socket>`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The docker CLI, talking to this engine only: `DOCKER_HOST` its socket, a client
    /// configuration of its own (`DOCKER_CONFIG`), no context or TLS settings from the caller;
    /// stdin /dev/null (set another for `docker import -`, say).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.cli);
        command
            .stdin(Stdio::null())
            .env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH");
        command
    }

    /// `docker ARGS` against this engine, to its end (panics after two minutes).
    pub fn docker(&self, args: &[&str]) -> Output {
        output_within(self.command().args(args), CLI_TIMEOUT)
            .unwrap_or_else(|| panic!("docker {args:?} did not finish within {CLI_TIMEOUT:?}"))
    }

    /// `docker ARGS`, which must succeed: its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let output = self.docker(args);
        assert!(
            output.status.success(),
            "docker {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// `docker run -d --name nbt-test-<suffix>-<pid> ARGS nbt-busybox:test CMD`, with
    /// `--network none` unless ARGS name a network. Removed (`docker rm -f`) on drop.
    pub fn run(&self, suffix: &str, args: &[&str], cmd: &[&str]) -> Container<'_> {
        self.run_image(suffix, args, IMAGE, cmd)
    }

    /// [`DockerEngine::run`] of another image (one the test built).
    pub fn run_image(
        &self,
        suffix: &str,
        args: &[&str],
        image: &str,
        cmd: &[&str],
    ) -> Container<'_> {
        let name = format!("nbt-test-{suffix}-{}", std::process::id());
        let mut all = vec!["run", "-d", "--name", name.as_str()];
        if !args.iter().any(|a| a.starts_with("--net")) {
            all.extend(["--network", "none"]);
        }
        all.extend(args);
        all.push(image);
        all.extend(cmd);
        let id = self.docker_ok(&all);
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "docker run printed {id:?}, not a container id"
        );
        Container {
            engine: self,
            id,
            name,
        }
    }

    fn log(&self, name: &str) -> fs::File {
        fs::File::create(self.dir.join(name)).expect("making a log file")
    }

    /// What a failed start shows: the tails of both logs.
    fn logs(&self) -> String {
        format!(
            "dockerd.log:\n{}\ncontainerd.log:\n{}",
            tail(&self.dir.join("dockerd.log"), 30),
            tail(&self.dir.join("containerd.log"), 10)
        )
    }

    /// containerd for this engine alone: its own root, state, sockets; no CRI plugin, no debug
    /// or metrics listener.
    fn start_containerd(&mut self) {
        let dir = self.dir.join("containerd");
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let config = format!(
            "version = 2\n\
             root = \"{d}/root\"\n\
             state = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let log = self.log("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        self.containerd = Some(child);
        let socket = dir.join("containerd.sock");
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = self.containerd.as_mut().unwrap().try_wait() {
                panic!("containerd exited ({status}) at start:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not listen on {} within {START_TIMEOUT:?}:\n{}",
                    socket.display(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_dockerd(&mut self) {
        let dir = &self.dir;
        // An empty configuration of its own, not /etc/docker/daemon.json; the trust key in our
        // directory, not /etc/docker/key.json (a key only daemon.json can move).
        let key = dir.join("key.json");
        fs::write(
            dir.join("daemon.json"),
            serde_json::json!({ "deprecated-key-path": key }).to_string(),
        )
        .unwrap();
        let log = self.log("dockerd.log");
        let path = |name: &str| dir.join(name).into_os_string();
        let mut command = Command::new("dockerd");
        command
            .arg("--config-file")
            .arg(path("daemon.json"))
            .arg("--containerd")
            .arg(dir.join("containerd/containerd.sock"))
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(path("data"))
            .arg("--exec-root")
            .arg(path("exec"))
            .arg("--pidfile")
            .arg(path("docker.pid"))
            // No docker0, no iptables rules, no ip_forward: nothing of the machine's network.
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-forward=false", "--ip-masq=false"])
            // Containers at /docker/<id> in every hierarchy, also where systemd runs: this
            // engine makes no systemd scopes.
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for var in [
            "DOCKER_HOST",
            "DOCKER_CERT_PATH",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CONFIG",
        ] {
            command.env_remove(var);
        }
        self.dockerd = Some(command.spawn().expect("starting dockerd"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let answered = output_within(
                self.command()
                    .args(["version", "--format", "{{.Server.Version}}"]),
                Duration::from_secs(10),
            )
            .is_some_and(|o| o.status.success());
            if answered {
                return;
            }
            if let Ok(Some(status)) = self.dockerd.as_mut().unwrap().try_wait() {
                panic!("dockerd exited ({status}) at start:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                panic!(
                    "dockerd did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.socket().display(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`IMAGE`]: a root of /bin/busybox and its applets, /tmp, and an /etc/passwd with root and
    /// nobody, imported from a tar stream.
    fn import_image(&self) {
        let busybox = Path::new(BUSYBOX);
        assert!(
            statically_linked(busybox),
            "{BUSYBOX} is missing or not statically linked: the image is that one binary; install \
             Debian's busybox-static (`cargo xtask setup`)"
        );
        let list = Command::new(busybox)
            .arg("--list")
            .output()
            .expect("busybox --list");
        let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            // `busybox` itself is in the list: a link of that name would replace the binary.
            .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
            .map(String::from)
            .collect();
        for needed in APPLETS {
            assert!(
                applets.iter().any(|a| a == needed),
                "{BUSYBOX} has no {needed} applet: install Debian's busybox-static"
            );
        }
        let root = self.dir.join("rootfs");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for applet in &applets {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running tar");
        let stdout = tar.stdout.take().unwrap();
        let import = output_within(
            self.command()
                .args(["import", "--change", "ENV PATH=/bin", "-", IMAGE])
                .stdin(stdout),
            CLI_TIMEOUT,
        );
        let tar_status = tar.wait().expect("waiting for tar");
        let import = import.expect("docker import did not finish");
        assert!(
            tar_status.success() && import.status.success(),
            "importing {IMAGE}: tar {tar_status}, docker import {}: {}",
            import.status,
            String::from_utf8_lossy(&import.stderr)
        );
        fs::remove_dir_all(&root).unwrap();
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        let began = Instant::now();
        // Its containers first, while the engine runs: docker removes their cgroups and mounts.
        let running = self
            .dockerd
            .as_mut()
            .is_some_and(|d| matches!(d.try_wait(), Ok(None)));
        if running {
            let ids = output_within(self.command().args(["ps", "-aq"]), CLI_TIMEOUT)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = output_within(
                    self.command().args(["rm", "-f", "-v"]).args(&ids),
                    CLI_TIMEOUT,
                );
            }
        }
        let mut forced = Vec::new();
        if let Some(mut dockerd) = self.dockerd.take() {
            if stop(&mut dockerd, Duration::from_secs(20)) {
                forced.push("dockerd did not stop within 20 s of SIGTERM: killed".to_string());
            }
        }
        if let Some(mut containerd) = self.containerd.take() {
            if stop(&mut containerd, Duration::from_secs(10)) {
                forced.push("containerd did not stop within 10 s of SIGTERM: killed".to_string());
            }
        }
        let (more, failed) = force_clean(&self.dir);
        forced.extend(more);
        eprintln!(
            "docker engine in {} stopped and removed in {:.2} s",
            self.dir.display(),
            began.elapsed().as_secs_f64()
        );
        if !forced.is_empty() {
            eprintln!("docker engine: cleaned up by force: {forced:?}");
        }
        if !failed.is_empty() {
            let message = format!("the docker engine left things behind: {failed:?}");
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// A container of a [`DockerEngine`], removed (`docker rm -f`) on drop.
pub struct Container<'a> {
    engine: &'a DockerEngine,
    id: String,
    name: String,
}

impl Container<'_> {
    /// The full (64 hex digits) id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker inspect -f FORMAT` of this container.
    pub fn inspect(&self, format: &str) -> String {
        self.engine
            .docker_ok(&["inspect", "--format", format, &self.id])
    }

    /// The pid of its first process on this machine (`State.Pid`); panics when it is not running.
    pub fn pid(&self) -> u32 {
        let pid: u32 = self
            .inspect("{{.State.Pid}}")
            .parse()
            .expect("State.Pid is a number");
        assert!(pid > 0, "container {} is not running", self.name);
        pid
    }

    /// Waits until it exits (`docker wait`): its exit status.
    pub fn wait(&self) -> i64 {
        self.engine
            .docker_ok(&["wait", &self.id])
            .parse()
            .expect("docker wait prints the exit status")
    }

    /// `docker exec CONTAINER CMD`, to its end.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.id.as_str()];
        args.extend(cmd);
        self.engine.docker(&args)
    }

    /// Its cgroup directories, one per hierarchy, as (controllers, directory); the controllers
    /// are empty for v2.
    pub fn cgroups(&self) -> Vec<(Vec<String>, PathBuf)> {
        cgroups_of(self.pid())
    }

    /// Its cgroup v2 directory (the `0::` line of /proc/PID/cgroup under the cgroup2 mount):
    /// /sys/fs/cgroup/unified/docker/<id> on a hybrid machine.
    pub fn cgroup_v2(&self) -> PathBuf {
        self.cgroups()
            .into_iter()
            .find(|(controllers, _)| controllers.is_empty())
            .map(|(_, dir)| dir)
            .expect("cgroup v2 is not mounted")
    }

    /// Its cgroup directory in the v1 hierarchy of `controller`, if there is one.
    pub fn cgroup_v1(&self, controller: &str) -> Option<PathBuf> {
        self.cgroups()
            .into_iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == controller))
            .map(|(_, dir)| dir)
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = output_within(
            self.engine
                .command()
                .args(["rm", "-f", "-v", self.id.as_str()]),
            CLI_TIMEOUT,
        );
    }
}

/// A network of the test's own for a `--network none` container: a veth pair, `eth0` inside the
/// container ([`ContainerNet::CONTAINER_ADDR`]) and its peer in a network namespace the test
/// made, the receiver's ([`ContainerNet::RECEIVER_ADDR`]): what the container sends there, a
/// receiver in that namespace measures (see [`ContainerNet::receive_tcp`]). 192.0.2.0/24 is
/// TEST-NET-1, as for [`NetnsPair`]. Removed on drop (deleting the namespace deletes the pair).
pub struct ContainerNet {
    /// The receiver's network namespace (a name for `ip netns exec`, [`NetnsPair::in_netns`]).
    pub receiver_ns: String,
}

impl ContainerNet {
    /// The container's address (as `a` of [`NetnsPair`]: where the workload lives).
    pub const CONTAINER_ADDR: &'static str = ADDR_A;
    /// The receiver's address, in [`ContainerNet::receiver_ns`].
    pub const RECEIVER_ADDR: &'static str = ADDR_B;
    /// The receiver's end of the pair.
    pub const RECEIVER_DEV: &'static str = "nbt-rx";
    /// The container's end of the pair.
    pub const CONTAINER_DEV: &'static str = "eth0";

    /// Connects `container` (run with `--network none`) to a new namespace of the test's own;
    /// `tag` names it, as NetnsPair's.
    pub fn connect(container: &Container<'_>, tag: &str) -> ContainerNet {
        require_root();
        let pid = container.pid().to_string();
        let net = ContainerNet {
            receiver_ns: format!("nbt-test-{}-{tag}-rx", std::process::id()),
        };
        let ns = net.receiver_ns.as_str();
        ip(&["netns", "add", ns]);
        // Made in the receiver's namespace, the peer straight into the container's: neither end
        // is ever in the machine's own namespace.
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            Self::RECEIVER_DEV,
            "type",
            "veth",
            "peer",
            "name",
            Self::CONTAINER_DEV,
            "netns",
            &pid,
        ]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", Self::RECEIVER_ADDR),
            "dev",
            Self::RECEIVER_DEV,
        ]);
        ip(&["-n", ns, "link", "set", Self::RECEIVER_DEV, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        let container_addr = format!("{}/24", Self::CONTAINER_ADDR);
        for args in [
            vec![
                "addr",
                "add",
                container_addr.as_str(),
                "dev",
                Self::CONTAINER_DEV,
            ],
            vec!["link", "set", Self::CONTAINER_DEV, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            // Only the network namespace: the machine's `ip`, in the container's network.
            let status = Command::new("nsenter")
                .args(["-t", &pid, "-n", "ip"])
                .args(&args)
                .status()
                .expect("running nsenter (util-linux)");
            assert!(status.success(), "ip {args:?} in container {pid} failed");
        }
        net
    }

    /// A TCP listener on [`ContainerNet::RECEIVER_ADDR`]:`port` in the receiver's namespace,
    /// bound before this returns, that accepts one connection and reads it to its end: the
    /// bytes and their times (for [`Received::rate_between`]).
    pub fn receive_tcp(&self, port: u16) -> JoinHandle<Received> {
        let address = format!("{}:{port}", Self::RECEIVER_ADDR);
        let listener = NetnsPair::in_netns(&self.receiver_ns, move || TcpListener::bind(address))
            .join()
            .expect("binding in the receiver's namespace")
            .expect("binding the receiver");
        std::thread::spawn(move || receive_all(listener))
    }
}

impl Drop for ContainerNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.receiver_ns])
            .status();
    }
}
