//! `edt`: latency and jitter for the run's packets, by earliest departure time (tc egress).
//!
//! The fq qdisc holds each packet until its `skb->tstamp`; this program moves that time later by
//! the run's latency (plus a uniform jitter) for packets whose socket is in the run's cgroup, and
//! leaves every other packet alone. Like netem's delay, but without a queue per interface that
//! every process shares: fq keeps a queue per flow, so the run's delayed packets do not delay
//! anyone else's.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id},
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use nbt_common::edt::EdtConfig;

#[map(name = "EDT_CONFIG")]
static EDT_CONFIG: Array<EdtConfig> = Array::with_max_entries(1, 0);

#[classifier]
pub fn delay_egress(ctx: TcContext) -> i32 {
    let Some(config) = EDT_CONFIG.get(0) else {
        return TC_ACT_OK;
    };
    if config.latency_ns == 0 && config.jitter_ns == 0 {
        return TC_ACT_OK;
    }
    let skb = ctx.skb.skb;
    // SAFETY: helper on the context the kernel handed us; 0 for packets without a socket.
    let cgroup = unsafe { bpf_skb_ancestor_cgroup_id(skb, config.cgroup_level as i32) };
    if cgroup != config.cgroup_id {
        return TC_ACT_OK;
    }
    // SAFETY: helpers without arguments; `skb` is the context, tstamp writable at tc egress.
    unsafe {
        let now = bpf_ktime_get_ns();
        let departure = core::cmp::max((*skb).tstamp, now) + delay(config);
        (*skb).tstamp = departure;
    }
    TC_ACT_OK
}

/// latency + a uniform draw in [-jitter, +jitter], floored at zero. The draw scales a 32-bit
/// random number to the spread: (r * spread) >> 32 is uniform in [0, spread).
///
/// User space keeps latency + jitter within 10 s (`edt::MAX_DELAY`, checked on every path that
/// writes the config), so spread < 2^35 and r * spread could pass 2^64 (it did above a jitter of
/// 2^31 ns, 2.1 s). BPF has no u128: the product is split at bit 32 of the spread, which is
/// exact, r * (hi << 32 + lo) >> 32 = r * hi + (r * lo) >> 32, and neither part overflows
/// (r * lo < 2^64, r * hi < 2^35).
#[inline(always)]
fn delay(config: &EdtConfig) -> u64 {
    if config.jitter_ns == 0 {
        return config.latency_ns;
    }
    let spread = 2 * config.jitter_ns + 1;
    // SAFETY: helper without arguments.
    let r = u64::from(unsafe { bpf_get_prandom_u32() });
    let draw = r * (spread >> 32) + ((r * (spread & 0xFFFF_FFFF)) >> 32);
    (config.latency_ns + draw).saturating_sub(config.jitter_ns)
}
