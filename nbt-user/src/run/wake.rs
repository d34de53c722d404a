//! When nbt's supervisor wakes while the workload runs: only when one of its duties is due.
//!
//! Each duty says when it is next due: a peak only sampling finds (every [`SAMPLE_INTERVAL`]),
//! the next schedule step (at its time), the sensors (every `WATCH_INTERVAL`, where there are
//! any), the gate (its refusal log and the time charge, every [`SAMPLE_INTERVAL`]), a restarted
//! workload's recovery (10 s after the restart). The workload's reports wake it through inotify
//! as they are written. A run with none of these sleeps until its workload ends or a signal
//! comes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often nbt samples what the kernel keeps no peak of (see
/// [`crate::enforce::cgroup::SAMPLED`]) and drains the gate's log.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The report files, watched for writes (inotify).
pub struct ReportWatch {
    fd: OwnedFd,
}

impl ReportWatch {
    /// Watches `paths` for writes; `None` when inotify cannot (no instances or watches left):
    /// the reports are then read every [`SAMPLE_INTERVAL`].
    pub fn new(paths: &[&Path]) -> Option<ReportWatch> {
        // SAFETY: inotify_init1(2) with flags only; a non-negative result is ours.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for path in paths {
            let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
            // SAFETY: inotify_add_watch(2) on our descriptor and a NUL-terminated path that
            // outlives the call.
            let watch =
                unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
            if watch < 0 {
                return None;
            }
        }
        Some(ReportWatch { fd })
    }

    /// The descriptor that is readable once a report file was written to.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Takes the events that arrived (their content does not matter: the files are read).
    pub fn drain(&self) {
        let mut buffer = [0u8; 4096];
        loop {
            // SAFETY: read(2) into a buffer that outlives the call.
            let read = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast::<libc::c_void>(),
                    buffer.len(),
                )
            };
            if read <= 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

/// The earliest of the times given (`None`: none was).
#[derive(Default)]
pub struct Earliest(Option<Instant>);

impl Earliest {
    pub fn at(&mut self, when: Option<Instant>) {
        if let Some(when) = when {
            self.0 = Some(self.0.map_or(when, |t| t.min(when)));
        }
    }

    pub fn get(self) -> Option<Instant> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_time_wins_and_none_is_no_time() {
        let now = Instant::now();
        let mut next = Earliest::default();
        next.at(None);
        assert_eq!(next.0, None);
        next.at(Some(now + Duration::from_secs(2)));
        next.at(Some(now + Duration::from_secs(1)));
        next.at(None);
        next.at(Some(now + Duration::from_secs(3)));
        assert_eq!(next.get(), Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_write_to_a_watched_file_makes_the_watch_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reports");
        std::fs::write(&path, "").unwrap();
        let watch = ReportWatch::new(&[&path]).unwrap();
        let readable = |watch: &ReportWatch| {
            let mut pollfd = libc::pollfd {
                fd: watch.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd that outlives the call, without waiting.
            unsafe { libc::poll(&mut pollfd, 1, 0) > 0 }
        };
        assert!(!readable(&watch));
        std::fs::write(&path, "{}\n").unwrap();
        assert!(readable(&watch));
        watch.drain();
        assert!(!readable(&watch));
    }
}
