//! nbt: run a workload under deliberately imposed scarcity, enforced in the kernel, and measure
//! what that cost. One module per capability (DESIGN.md); data flows one way:
//! `cli` → `plan` → enforcers (`cgroup`, `account`) → `supervise` → `summary`.

pub mod account;
pub mod agent;
pub mod attribution;
pub mod btf;
pub mod cgroup;
pub mod cleanup;
pub mod cli;
pub mod counters;
pub mod demo;
pub mod energy;
pub mod gate;
pub mod gpu_energy;
pub mod hwcaps;
pub mod latency;
pub mod learning;
pub mod ledger;
pub mod live;
pub mod loader;
pub mod net;
pub mod plan;
pub mod probe;
pub mod qdisc;
pub mod receipt;
pub mod run;
pub mod sched;
pub mod schedule;
pub mod state;
pub mod summary;
pub mod supervise;
pub mod train;
pub mod units;
