//! nbt's integration tests, one binary, one module per capability (as aya's own `test/` does).
//! They use the real kernel: BPF programs loaded into it, cgroups, network namespaces with veth
//! pairs, loopback servers. Run as root, one test at a time (`cargo xtask test`): the CPU tests
//! measure CPU time, which parallel tests would disturb.

mod account;
mod agent;
mod attach;
mod cpu;
mod demo;
mod deploy;
mod docker;
mod gate;
mod hwcaps;
mod impair;
mod lifecycle;
mod link;
mod memory;
mod pids;
mod receipt;
mod report;
mod schedule;
mod series;
mod shaper;
mod swarm;
mod top;
mod usage;
mod user;
mod zone;
