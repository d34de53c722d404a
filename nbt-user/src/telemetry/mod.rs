//! What the node and its processes consumed: CPU time and counters per process, energy by source,
//! and the attribution of energy to processes.

pub(crate) mod attribution;
pub(crate) mod btf;
pub mod counters;
pub(crate) mod energy;
pub(crate) mod gpu;
pub(crate) mod sched;
pub(crate) mod series;
