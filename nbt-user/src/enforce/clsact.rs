//! The clsact qdisc that nbt's tc programs hang off, shared among runs: two runs in one network
//! namespace attach their programs to the same clsact qdisc of an interface, and the first to
//! end must not take it off under the other (its filters go with it, and with them the other
//! run's egress loss and ingress impairments). So a clsact qdisc nbt added is marked as nbt's
//! (a file under /run/nbt-tc), and whichever of nbt's runs ends last takes it off: when no
//! filter is left on it. One lock orders the adding and the taking off, so that no run takes a
//! clsact qdisc off between another's finding it and attaching to it. A clsact qdisc nbt did not
//! add is never taken off.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::tc;

use crate::sys::netlink;
use crate::sys::netns::NetnsId;

/// Held while a run adds or takes off its tc programs and clsact qdiscs.
pub struct Lock(#[allow(dead_code)] File);

pub fn lock() -> Result<Lock> {
    let dir = marks_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    Ok(Lock(crate::sys::private::lock(&dir.join("clsact.lock"))?))
}

/// The marks and their lock: on tmpfs, as qdiscs are gone after a reboot, and one place for the
/// whole machine (not under the state directory, which `NBT_STATE_DIR` moves), as the
/// interfaces are the machine's.
fn marks_dir() -> PathBuf {
    PathBuf::from("/run/nbt-tc")
}

/// The mark of a clsact qdisc of nbt's on interface `ifindex` of this thread's network
/// namespace (which `nbt cleanup` may have entered).
fn mark(ifindex: u32) -> io::Result<PathBuf> {
    Ok(mark_in(NetnsId::current()?, ifindex))
}

/// The mark of a clsact qdisc of nbt's on interface `ifindex` of namespace `netns`.
fn mark_in(netns: NetnsId, ifindex: u32) -> PathBuf {
    marks_dir().join(format!("clsact-{}-{ifindex}", netns.ino))
}

/// Whether interface `ifindex`, named `name`, has a clsact qdisc that nbt added.
fn marked(ifindex: u32, name: &str) -> bool {
    mark(ifindex).is_ok_and(|mark| marks(&mark, name))
}

/// Whether `mark` is the mark of interface `name`.
fn marks(mark: &Path, name: &str) -> bool {
    std::fs::read_to_string(mark).is_ok_and(|marked| marked == name)
}

/// Adds a clsact qdisc to the interface, or finds one there. True when it is nbt's (added now,
/// or by another run still using it): then the run's end takes it off if nothing else is left
/// on it. Call with the [`Lock`] held.
pub fn add(ifindex: u32, name: &str) -> Result<bool> {
    match tc::qdisc_add_clsact(name) {
        Ok(()) => {
            let mark = mark(ifindex)?;
            std::fs::write(&mark, name).with_context(|| format!("writing {}", mark.display()))?;
            Ok(true)
        }
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            Ok(marked(ifindex, name))
        }
        Err(err) => Err(anyhow!("adding the clsact qdisc to {name}: {err}")),
    }
}

/// Takes nbt's clsact qdisc off the interface when no filter is left on it (the run's own taken
/// off before); leaves it to the run that still has one there. Call with the [`Lock`] held.
pub fn remove_if_unused(ifindex: u32, name: &str) -> io::Result<()> {
    if !marked(ifindex, name) {
        // Taken off by another run of nbt's, which found it unused first.
        return Ok(());
    }
    if netlink::clsact_has_filters(ifindex)? {
        return Ok(());
    }
    remove(ifindex)
}

/// Takes the clsact qdisc off the interface, and its mark.
pub fn remove(ifindex: u32) -> io::Result<()> {
    match netlink::delete_clsact(ifindex) {
        // Gone already (with its interface, or taken off by someone).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
        other => other?,
    }
    unmark(ifindex);
    Ok(())
}

/// Removes the mark of the clsact qdisc of interface `ifindex`, named `name`: gone with its
/// interface (a mark of another name is another interface's, which took the index since).
pub fn forget(ifindex: u32, name: &str) {
    if let Ok(netns) = NetnsId::current() {
        forget_in(netns, ifindex, name);
    }
}

/// Removes the mark of interface `ifindex`, named `name`, of namespace `netns`, which is gone
/// (with its interfaces and their qdiscs).
pub fn forget_in(netns: NetnsId, ifindex: u32, name: &str) {
    let mark = mark_in(netns, ifindex);
    if marks(&mark, name) {
        let _ = std::fs::remove_file(mark);
    }
}

/// Removes the mark of interface `ifindex`, if there is one.
fn unmark(ifindex: u32) {
    if let Ok(mark) = mark(ifindex) {
        let _ = std::fs::remove_file(mark);
    }
}
