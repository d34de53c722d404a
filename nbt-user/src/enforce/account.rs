//! `account`: bytes and packets in and out of a run, counted in the kernel by the cgroup_skb
//! programs of `nbt-ebpf/src/account.rs`, attached to the run's cgroup v2 directory.

use std::path::Path;

use anyhow::{anyhow, Result};
use aya::maps::PerCpuArray;
use aya::Ebpf;
use nbt_common::account::{TrafficCounters, ACCOUNT_MAP, EGRESS, INGRESS};
use serde::Serialize;

use crate::sys::loader;
use crate::sys::pin::Pins;

/// Loads the two counting programs and attaches them to `cgroup_dir` (a cgroup v2 directory).
/// Other programs may be attached to the same cgroup beside them.
pub fn attach(ebpf: &mut Ebpf, cgroup_dir: &Path, pins: &mut Pins) -> Result<()> {
    let cgroup = loader::open_cgroup(cgroup_dir)?;
    loader::attach_cgroup_skb(
        ebpf,
        &cgroup,
        cgroup_dir,
        "account_ingress",
        "account_egress",
        pins,
    )
}

/// What the counters hold now, summed over CPUs.
pub fn read(ebpf: &Ebpf) -> Result<Traffic> {
    let map = ebpf
        .map(ACCOUNT_MAP)
        .ok_or_else(|| anyhow!("BPF map {ACCOUNT_MAP} missing from nbt's object"))?;
    let counters = PerCpuArray::<_, TrafficCounters>::try_from(map)?;
    let sum = |index: u32| -> Result<TrafficCounters> {
        let mut total = TrafficCounters::default();
        for per_cpu in counters.get(&index, 0)?.iter() {
            total.add(per_cpu);
        }
        Ok(total)
    };
    Ok(Traffic {
        ingress: sum(INGRESS)?,
        egress: sum(EGRESS)?,
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Packets and bytes (IP packets, headers included) in each direction.
    pub ingress: TrafficCounters,
    pub egress: TrafficCounters,
}
