//! Network namespaces by identity: the device and inode of a namespace file (`/proc/PID/ns/net`,
//! a bind mount under `/run/netns`), the same for every file of one namespace while it lives.
//! What a run put on interfaces is recorded with its namespace's identity, so that `nbt cleanup`
//! or `nbt zone remove` run from another namespace takes it off there, not off interfaces of
//! the same index and name in its own.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    fn of(path: &Path) -> io::Result<NetnsId> {
        let meta = std::fs::metadata(path)?;
        Ok(NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The namespace of this thread (the one its netlink sockets talk to).
    pub fn current() -> io::Result<NetnsId> {
        NetnsId::of(Path::new("/proc/thread-self/ns/net"))
    }

    /// The namespace of process `pid`.
    pub fn of_process(pid: i32) -> io::Result<NetnsId> {
        NetnsId::of(&PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// A file of this namespace, to enter it by: a named namespace's (`ip netns add`), or a
    /// process's that lives in it. None when neither is found: the namespace is gone (or held
    /// only by a descriptor or a bind mount elsewhere).
    fn find(self) -> Option<File> {
        let named = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path());
        let processes = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
            .map(|entry| entry.path().join("ns/net"));
        named
            .chain(processes)
            .filter(|path| NetnsId::of(path).is_ok_and(|id| id == self))
            .find_map(|path| File::open(path).ok())
    }
}

/// Where a call in a recorded namespace ran.
pub enum Reached<T> {
    /// In the namespace (this thread's own, or entered and left again).
    Ran(T),
    /// The namespace is not to be found: gone, with its interfaces and what was on them.
    Gone,
}

/// Runs `f` with this thread in namespace `id`, and back in its own after.
pub fn within<T>(id: NetnsId, f: impl FnOnce() -> T) -> io::Result<Reached<T>> {
    if NetnsId::current()? == id {
        return Ok(Reached::Ran(f()));
    }
    let Some(theirs) = id.find() else {
        return Ok(Reached::Gone);
    };
    let own = File::open("/proc/thread-self/ns/net")?;
    enter(&theirs)?;
    let result = f();
    enter(&own).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("returning to nbt's own network namespace: {err}"),
        )
    })?;
    Ok(Reached::Ran(result))
}

fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns(2) on a descriptor held open for the call; it changes only this thread's
    // network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_in_this_namespace_runs_in_place_and_one_in_no_namespace_finds_it_gone() {
        let own = NetnsId::current().unwrap();
        assert_eq!(NetnsId::of_process(std::process::id() as i32).unwrap(), own);
        assert!(matches!(within(own, || 7).unwrap(), Reached::Ran(7)));
        let nowhere = NetnsId {
            dev: own.dev,
            ino: u64::MAX,
        };
        assert!(matches!(
            within(nowhere, || unreachable!()).unwrap(),
            Reached::Gone
        ));
        assert_eq!(NetnsId::current().unwrap(), own);
    }
}
