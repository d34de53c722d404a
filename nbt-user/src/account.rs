//! `account`: bytes and packets in and out of a run, counted in the kernel by the cgroup_skb
//! programs of `nbt-ebpf/src/account.rs`, attached to the run's cgroup v2 directory.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::PerCpuArray;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::Ebpf;
use nbt_common::account::{TrafficCounters, ACCOUNT_MAP, EGRESS, INGRESS};
use serde::Serialize;

/// Loads the two counting programs and attaches them to `cgroup_dir` (a cgroup v2 directory).
/// Other programs may be attached to the same cgroup beside them.
pub fn attach(ebpf: &mut Ebpf, cgroup_dir: &Path) -> Result<()> {
    let cgroup = File::open(cgroup_dir)
        .with_context(|| format!("opening cgroup {}", cgroup_dir.display()))?;
    for (name, attach_type) in [
        ("account_ingress", CgroupSkbAttachType::Ingress),
        ("account_egress", CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("BPF program {name} missing from nbt's object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel refused to load BPF program {name}"))?;
        program
            // Through a BPF link (Linux 5.7+) the attachment is always one of many, and the kernel
            // refuses any mode flag: "Single" is aya's way of passing none.
            .attach(&cgroup, attach_type, CgroupAttachMode::Single)
            .with_context(|| format!("attaching BPF program {name} to {}", cgroup_dir.display()))?;
    }
    Ok(())
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
        ingress: sum(INGRESS)?.into(),
        egress: sum(EGRESS)?.into(),
    })
}

/// Packets and bytes (IP packets, headers included) in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Self {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub ingress: Counters,
    pub egress: Counters,
}
