//! What the node and its processes consumed: CPU time and counters per process, energy by source,
//! and the attribution of energy to processes.

pub mod attribution;
pub mod btf;
pub mod counters;
pub mod energy;
pub mod gpu;
pub mod sched;
