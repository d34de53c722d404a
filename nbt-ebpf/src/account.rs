//! `account`: count the bytes and packets of a run, in and out, at its cgroup (cgroup_skb).
//!
//! Like systemd's IPAccounting: the programs attach to the run's cgroup v2 directory and see every
//! IP packet of every socket owned by a process in it, whatever the interface. They never drop:
//! they return 1 (pass) always, so attaching them cannot change what the workload sees.

use crate::atomic_add;
use aya_ebpf::{
    macros::{cgroup_skb, map},
    maps::PerCpuArray,
    programs::SkBuffContext,
};
use nbt_common::account::{TrafficCounters, DIRECTIONS, EGRESS, INGRESS};

const PASS: i32 = 1;

#[map(name = "ACCOUNT")]
static ACCOUNT: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(DIRECTIONS, 0);

#[cgroup_skb(ingress)]
pub fn account_ingress(ctx: SkBuffContext) -> i32 {
    count(INGRESS, &ctx);
    crate::edt::mark_run_socket(&ctx);
    PASS
}

#[cgroup_skb(egress)]
pub fn account_egress(ctx: SkBuffContext) -> i32 {
    count(EGRESS, &ctx);
    crate::edt::mark_run_socket(&ctx);
    PASS
}

/// The slot is per CPU, but the adds are still atomic: an egress program running in a process's
/// send path can be interrupted on the same CPU by a softirq that transmits too (a TCP ACK, a
/// retransmission) and runs this program on the same slot.
#[inline(always)]
fn count(direction: u32, ctx: &SkBuffContext) {
    if let Some(slot) = ACCOUNT.get_ptr_mut(direction) {
        // SAFETY: the pointer comes from the map lookup, is 8-byte aligned (map values are), and
        // stays valid for this program run.
        unsafe {
            atomic_add(core::ptr::addr_of_mut!((*slot).packets), 1);
            atomic_add(core::ptr::addr_of_mut!((*slot).bytes), u64::from(ctx.len()));
        }
    }
}
