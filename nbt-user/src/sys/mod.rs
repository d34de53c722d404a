//! What nbt needs from the operating system, with no knowledge of runs: loading the BPF object,
//! rtnetlink, starting and waiting for processes.

pub mod loader;
pub mod netlink;
pub mod proc;
pub mod supervise;
