//! Start the workload already inside its cgroups, forward signals to it, wait for it.
//!
//! The child joins the run's cgroups between fork and exec (it writes "0", meaning itself, to each
//! `cgroup.procs`), so no instruction of the workload runs unconstrained.
//!
//! Signals: nbt blocks the ones it forwards and SIGCHLD, and takes them from a signalfd(2) in its
//! main loop, so nothing is lost and no handler runs at an awkward time. A signal someone sent
//! to nbt (kill, systemd, a scheduler: `si_code` ≤ 0) is passed on to the child. One the kernel
//! generated from the terminal (Ctrl-C: `si_code` = SI_KERNEL) already reached the child, which
//! is in nbt's foreground process group, and is not sent a second time.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::user::Identity;

/// Signals nbt passes on to the workload.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks the forwarded signals and SIGCHLD in the calling thread (and every thread it starts
/// later). Call it first thing, before any thread exists. [`spawn`] gives the child an empty mask
/// again (a blocked mask survives fork and exec).
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Signals that stop nbt while it sets a run up (before the workload exists, nobody else would
/// take them): SIGINT, SIGTERM, SIGHUP, SIGQUIT.
const STOPPING: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// A stopping signal that arrived (and is still pending, being blocked) since nbt started: taken,
/// so it is not passed on to a workload started later. Call it between the steps of setting up.
pub fn take_pending_stop() -> Option<libc::c_int> {
    // SAFETY: sigpending(2), sigismember(3) and sigtimedwait(2) on local sets, with a zero
    // timeout: nothing blocks.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut pending) != 0 {
            return None;
        }
        let signal = STOPPING
            .into_iter()
            .find(|&s| libc::sigismember(&pending, s) == 1)?;
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, signal);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&only, std::ptr::null_mut(), &zero);
        Some(signal)
    }
}

/// Why a workload could not be started. The exit statuses follow env(1) and timeout(1).
#[derive(Debug)]
pub enum SpawnError {
    NotFound(String),
    NotExecutable(String, io::Error),
    Failed(String, io::Error),
}

impl SpawnError {
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) => 127,
            SpawnError::NotExecutable(..) => 126,
            SpawnError::Failed(..) => 125,
        }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::NotFound(cmd) => write!(f, "command not found: {cmd}"),
            SpawnError::NotExecutable(cmd, e) => write!(f, "cannot execute {cmd}: {e}"),
            SpawnError::Failed(cmd, e) => {
                write!(f, "starting {cmd} inside its cgroups failed: {e}")
            }
        }
    }
}

/// Looks `program` up as execvp(3) would, so that "not found" can be told apart from other errors.
pub fn resolve(program: &OsString) -> Option<PathBuf> {
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return path.exists().then(|| path.to_path_buf());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(path))
        .find(|candidate| candidate.is_file())
}

/// Starts `argv` with its environment plus `env`, inside the cgroups whose `cgroup.procs` files
/// are given, as `user`: with its groups, no capabilities (unless it is root) and no way to gain
/// privileges (no_new_privs: setuid binaries do not raise them). Returns the child's pid.
pub fn spawn(
    argv: &[OsString],
    cgroup_procs: &[PathBuf],
    env: &[(&str, String)],
    user: &Identity,
) -> Result<i32, SpawnError> {
    let shown = argv[0].to_string_lossy().into_owned();
    let program = resolve(&argv[0]).ok_or_else(|| SpawnError::NotFound(shown.clone()))?;
    let join: Vec<File> = cgroup_procs
        .iter()
        .map(|path| {
            File::options()
                .write(true)
                .open(path)
                .map_err(|e| SpawnError::Failed(format!("{shown} (opening {})", path.display()), e))
        })
        .collect::<Result<_, _>>()?;
    let fds: Vec<i32> = join.iter().map(|f| f.as_raw_fd()).collect();

    let mut command = Command::new(&program);
    command.arg0(&argv[0]).args(&argv[1..]);
    if !user.is_root() {
        command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs in the forked child and only calls async-signal-safe functions
    // (sigprocmask, write, prctl, setgroups, setgid, setuid); it allocates nothing (`groups` was
    // allocated before the fork). The files stay open in the parent until spawn returns.
    unsafe {
        command.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Joined while still root: cgroup.procs belongs to root.
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            drop_privileges(uid, gid, &groups)
        });
    }
    let child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(shown.clone(), e),
        io::ErrorKind::NotFound => SpawnError::NotFound(shown.clone()),
        _ => SpawnError::Failed(shown.clone(), e),
    })?;
    drop(join);
    Ok(child.id() as i32)
}

/// In the child, before exec: the user's groups and ids, then no_new_privs. Changing every uid
/// away from 0 empties the permitted, effective and ambient capability sets (capabilities(7));
/// the ambient set is cleared first all the same.
///
/// # Safety
/// Only async-signal-safe calls: it runs between fork and exec.
unsafe fn drop_privileges(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on values; `groups` outlives the call.
    unsafe {
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    }
}

/// How the workload ended.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    /// The status nbt exits with: the child's code, or 128 + N when signal N killed it.
    pub status: i32,
    pub code: Option<i32>,
    pub signal: Option<String>,
    pub core_dumped: bool,
    /// Signals sent to nbt and passed on to the workload, in order.
    pub forwarded_signals: Vec<String>,
}

pub fn signal_name(signal: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string.
    let description = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(signal)) };
    let abbrev = match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGXCPU => "SIGXCPU",
        _ => return format!("signal {signal} ({})", description.to_string_lossy()),
    };
    abbrev.to_string()
}

/// Waits for `pid` to end, forwarding signals (see the module comment).
///
/// `tick` runs at once, then again when the time it returned has come or when `wake` became
/// readable (its argument says whether it did; `tick` must then drain `wake`). It returns when it
/// must next run, or `None` when only `wake` calls for it. In between nbt sleeps: only a
/// signal, the workload's end, `wake` or that time wakes it, so that a run with nothing to watch
/// costs no CPU time while it waits.
pub fn wait(
    pid: i32,
    signals: &libc::sigset_t,
    wake: Option<BorrowedFd<'_>>,
    tick: impl FnMut(bool) -> Option<Instant>,
) -> Exit {
    let mut forwarded = Vec::new();
    let ended = |taken: Vec<(libc::c_int, libc::c_int)>| {
        for (signal, code) in taken {
            if signal != libc::SIGCHLD && code <= 0 {
                // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
                unsafe { libc::kill(pid, signal) };
                forwarded.push(signal_name(signal));
            }
        }
        try_wait(pid).map(|status| exit_from_status(status, std::mem::take(&mut forwarded)))
    };
    sleep_until(signals, wake, None, ended, tick)
}

/// How an attachment's wait ([`wait_detached`]) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT came (Ctrl-C, `nbt detach`).
    Signal(libc::c_int),
    /// The target's last process ended.
    Emptied,
}

/// Waits while the cgroup whose `cgroup.events` is `events` has processes, as [`wait`] waits for
/// a child: `tick` runs when it is due or `wake` is readable. A stopping signal ends the wait
/// (the target is not nbt's child: nothing is forwarded to it); other signals are ignored.
pub fn wait_detached(
    events: &Path,
    signals: &libc::sigset_t,
    wake: Option<BorrowedFd<'_>>,
    tick: impl FnMut(bool) -> Option<Instant>,
) -> Detached {
    let events_file = File::open(events).ok();
    let ended = |taken: Vec<(libc::c_int, libc::c_int)>| {
        if let Some((signal, _)) = taken.iter().find(|(s, _)| STOPPING.contains(s)) {
            return Some(Detached::Signal(*signal));
        }
        // Read through the descriptor that is polled: kernfs reports POLLPRI on an open file
        // until that file reads the changed content (and on one never read at all). Read by
        // path, the poll stayed ready and this loop spun a whole CPU for as long as the
        // attachment lasted (found in the 5.10 VM; so on every kernel).
        let text = match &events_file {
            Some(file) => {
                let mut buffer = [0u8; 512];
                std::os::unix::fs::FileExt::read_at(file, &mut buffer, 0)
                    .map(|read| String::from_utf8_lossy(&buffer[..read]).into_owned())
            }
            None => std::fs::read_to_string(events),
        };
        let populated = text.is_ok_and(|text| text.lines().any(|l| l == "populated 1"));
        (!populated).then_some(Detached::Emptied)
    };
    sleep_until(
        signals,
        wake,
        events_file.as_ref().map(|f| f.as_fd()),
        ended,
        tick,
    )
}

/// The loop of [`wait`] and [`wait_detached`]: `ended` gets the signals taken since it last ran
/// (none the first time) and says whether the wait is over; `tick` runs when due or when `wake`
/// is readable; in between, a sleep that a signal, `wake`, a change of `changed` or the time
/// `tick` asked for ends.
fn sleep_until<T>(
    signals: &libc::sigset_t,
    wake: Option<BorrowedFd<'_>>,
    changed: Option<BorrowedFd<'_>>,
    mut ended: impl FnMut(Vec<(libc::c_int, libc::c_int)>) -> Option<T>,
    mut tick: impl FnMut(bool) -> Option<Instant>,
) -> T {
    let signal_fd = open_signalfd(signals);
    let mut next = Some(Instant::now());
    let mut woken = false;
    let mut taken = Vec::new();
    loop {
        if let Some(end) = ended(std::mem::take(&mut taken)) {
            return end;
        }
        if woken || next.is_some_and(|at| Instant::now() >= at) {
            next = tick(woken);
            woken = false;
            continue;
        }
        let timeout = next.map(|at| at.saturating_duration_since(Instant::now()));
        let readable_now;
        (taken, readable_now) = match &signal_fd {
            Some(fd) => poll(fd.as_fd(), wake, changed, timeout),
            // Without a signalfd (none left to open): wait for signals as nbt did before it
            // had one, looking at `wake` (and the end) at least every 100 ms.
            None => {
                let capped = timeout.map_or(FALLBACK_WAIT, |t| t.min(FALLBACK_WAIT));
                let taken = sigtimedwait(signals, capped);
                (
                    taken.into_iter().collect(),
                    wake.is_some_and(|fd| readable(fd)),
                )
            }
        };
        woken = readable_now;
    }
}

/// How long [`wait`] sleeps at most when it has no signalfd.
const FALLBACK_WAIT: Duration = Duration::from_millis(100);

/// A signalfd for the (blocked) `signals`: they stay queued until read from it.
fn open_signalfd(signals: &libc::sigset_t) -> Option<OwnedFd> {
    // SAFETY: signalfd(2) with a valid set; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::signalfd(-1, signals, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    // SAFETY: `fd` was just opened and nothing else owns it.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sleeps until a signal is queued on `signals`, `wake` is readable, the kernfs file `changed`
/// changed or `timeout` passed (`None`: no timeout). Returns the signals taken, with their
/// `si_code`, and whether `wake` is readable.
fn poll(
    signals: BorrowedFd<'_>,
    wake: Option<BorrowedFd<'_>>,
    changed: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> (Vec<(libc::c_int, libc::c_int)>, bool) {
    let mut fds = [
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.map_or(-1, |fd| fd.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
        // A cgroup's cgroup.events signals a change with POLLPRI (kernfs_notify).
        libc::pollfd {
            fd: changed.map_or(-1, |fd| fd.as_raw_fd()),
            events: libc::POLLPRI,
            revents: 0,
        },
    ];
    let timeout = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    // SAFETY: ppoll(2) on three pollfds that live through the call (a negative fd is ignored), a
    // timeout that does too (or none), and no signal mask change.
    let ready = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_ref().map_or(std::ptr::null(), |t| t),
            std::ptr::null(),
        )
    };
    if ready <= 0 {
        return (Vec::new(), false);
    }
    let mut taken = Vec::new();
    if fds[0].revents & libc::POLLIN != 0 {
        loop {
            // SAFETY: signalfd_siginfo is plain C data, for which all-zero bytes are valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = size_of::<libc::signalfd_siginfo>();
            // SAFETY: read(2) into a buffer of `size` bytes that outlives the call.
            let read = unsafe {
                libc::read(
                    signals.as_raw_fd(),
                    (&raw mut info).cast::<libc::c_void>(),
                    size,
                )
            };
            if read != size as isize {
                break;
            }
            taken.push((info.ssi_signo as libc::c_int, info.ssi_code));
        }
    }
    (taken, fds[1].revents != 0)
}

/// Waits up to `timeout` for one of `signals`; the signal and its `si_code`.
fn sigtimedwait(signals: &libc::sigset_t, timeout: Duration) -> Option<(libc::c_int, libc::c_int)> {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: siginfo_t is plain C data, for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigtimedwait with a valid set, an out-parameter and a timeout, all of which
    // outlive the call.
    let signal = unsafe { libc::sigtimedwait(signals, &mut info, &timeout) };
    (signal > 0).then_some((signal, info.si_code))
}

/// Whether `fd` is readable now.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that outlives the call, without waiting.
    unsafe { libc::poll(&mut pollfd, 1, 0) > 0 }
}

fn try_wait(pid: i32) -> Option<libc::c_int> {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (reaped == pid).then_some(status)
}

fn exit_from_status(status: libc::c_int, forwarded_signals: Vec<String>) -> Exit {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        Exit {
            status: 128 + signal,
            code: None,
            signal: Some(signal_name(signal)),
            core_dumped: libc::WCOREDUMP(status),
            forwarded_signals,
        }
    } else {
        let code = libc::WEXITSTATUS(status);
        Exit {
            status: code,
            code: Some(code),
            signal: None,
            core_dumped: false,
            forwarded_signals,
        }
    }
}
