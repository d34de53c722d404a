//! What nbt needs from the operating system, with no knowledge of runs: loading the BPF object,
//! rtnetlink, sock_diag, starting and waiting for processes, nbt's private files and directories.

pub(crate) mod docker;
pub(crate) mod kept;
pub(crate) mod loader;
pub(crate) mod mountinfo;
pub mod netlink;
pub(crate) mod netns;
pub(crate) mod phase;
pub(crate) mod pin;
pub(crate) mod private;
pub(crate) mod proc;
pub(crate) mod sock_diag;
pub(crate) mod supervise;
pub(crate) mod user;
