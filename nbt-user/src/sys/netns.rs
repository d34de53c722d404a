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

use super::mountinfo;

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

    /// A file of this namespace, to enter it by, from every place one can be held open: a named
    /// namespace's (`ip netns add`), any other bind mount of a namespace file (a container
    /// runtime's, a test's, in any mount namespace a process lives in), a thread's that lives in
    /// it, a descriptor a process holds on it. None when none is found: the namespace is gone.
    fn find(self) -> Option<File> {
        named_namespaces()
            .chain(namespace_mounts())
            .chain(thread_namespaces())
            .chain(namespace_descriptors())
            .filter(|path| NetnsId::of(path).is_ok_and(|id| id == self))
            .find_map(|path| File::open(path).ok())
    }
}

fn entries(dir: impl AsRef<Path>) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
}

fn processes() -> impl Iterator<Item = PathBuf> {
    entries("/proc").filter(|path| {
        path.file_name()
            .is_some_and(|name| name.to_string_lossy().parse::<u32>().is_ok())
    })
}

fn named_namespaces() -> impl Iterator<Item = PathBuf> {
    entries("/run/netns")
}

/// nsfs files bind-mounted anywhere: in nbt's own mount namespace first, then in each other
/// mount namespace a process lives in (a service's private mounts, a container's), reached
/// through that process's root (`/proc/PID/root`).
fn namespace_mounts() -> impl Iterator<Item = PathBuf> {
    let mut seen = std::collections::HashSet::new();
    std::iter::once(PathBuf::from("/proc/self"))
        .chain(processes())
        .filter_map(move |process| {
            let mount_namespace = std::fs::metadata(process.join("ns/mnt")).ok()?;
            if !seen.insert((mount_namespace.dev(), mount_namespace.ino())) {
                return None;
            }
            let mountinfo = std::fs::read_to_string(process.join("mountinfo")).ok()?;
            let root = process.join("root");
            Some(
                mountinfo::parse(&mountinfo)
                    .into_iter()
                    .filter(|mount| mount.fstype == "nsfs")
                    .map(|mount| {
                        let point = &mount.mount_point;
                        root.join(point.strip_prefix("/").unwrap_or(point))
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
}

/// Every thread's, not only each process's main thread: a thread may have entered another
/// namespace with setns(2), as nbt's own cleanup does.
fn thread_namespaces() -> impl Iterator<Item = PathBuf> {
    processes().flat_map(|process| entries(process.join("task")).map(|task| task.join("ns/net")))
}

/// Descriptors open on a network namespace file (`readlink` reads `net:[INODE]`).
fn namespace_descriptors() -> impl Iterator<Item = PathBuf> {
    processes()
        .flat_map(|process| entries(process.join("fd")))
        .filter(|fd| {
            std::fs::read_link(fd).is_ok_and(|target| target.to_string_lossy().starts_with("net:["))
        })
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

    /// A namespace whose only hold is a descriptor of this process (the thread that made it has
    /// ended) is found, entered and left.
    #[test]
    fn a_namespace_held_only_by_a_descriptor_is_found() {
        let (id, held) = std::thread::spawn(|| {
            // SAFETY: unshare(2) moves only this short-lived thread into a new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((NetnsId::current()?, File::open("/proc/thread-self/ns/net")?))
        })
        .join()
        .unwrap()
        .expect("a new network namespace (run as root)");
        let own = NetnsId::current().unwrap();
        assert_ne!(id, own);
        assert!(matches!(
            within(id, NetnsId::current).unwrap(),
            Reached::Ran(Ok(inside)) if inside == id
        ));
        assert_eq!(NetnsId::current().unwrap(), own);
        drop(held);
    }
}
