//! `edt`: latency and jitter for the run's packets, by earliest departure time (tc egress).
//!
//! The fq qdisc holds each packet until its `skb->tstamp`; this program moves that time later by
//! the run's latency (plus a uniform jitter) for packets whose socket is in the run's cgroup, and
//! leaves every other packet alone. Like netem's delay, but without a queue per interface that
//! every process shares: fq keeps a queue per flow, so the run's delayed packets do not delay
//! anyone else's.
//!
//! The same program applies netem's other impairments to the run's outgoing packets
//! (`impair`): duplicate, corrupt and reorder, in netem's order.

mod impair;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id},
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use nbt_common::{
    account::EGRESS,
    edt::{EdtConfig, EdtState},
};

use crate::{
    random::{chance, correlated},
    shaper::{self, Impaired},
};
use impair::{Corrupted, DUPLICATE_MARK};

#[map(name = "EDT_CONFIG")]
static EDT_CONFIG: Array<EdtConfig> = Array::with_max_entries(1, 0);

#[map(name = "EDT_STATE")]
static EDT_STATE: Array<EdtState> = Array::with_max_entries(1, 0);

#[classifier]
pub fn delay_egress(ctx: TcContext) -> i32 {
    let Some(config) = EDT_CONFIG.get(0) else {
        return TC_ACT_OK;
    };
    let skb = ctx.skb.skb;
    // Our own duplicate, back from the clone: delayed as its original was, nothing more.
    // SAFETY: `tc_index` is a field of the context, writable at tc.
    if unsafe { (*skb).tc_index } == DUPLICATE_MARK {
        // SAFETY: as above.
        unsafe { (*skb).tc_index = 0 };
        hold(&ctx, config);
        return TC_ACT_OK;
    }
    // SAFETY: helper on the context the kernel handed us; 0 for packets without a socket.
    let cgroup = unsafe { bpf_skb_ancestor_cgroup_id(skb, config.cgroup_level as i32) };
    if cgroup != config.cgroup_id {
        return TC_ACT_OK;
    }
    let Some((shaper, state)) = shaper::direction(EGRESS) else {
        hold(&ctx, config);
        return TC_ACT_OK;
    };
    let packets = impair::wire_packets(&ctx);
    // netem's order: the copy leaves before the original is corrupted, and is intact.
    if shaper.duplicate != 0 && chance(shaper.duplicate) && impair::duplicate(&ctx) {
        shaper::count_impaired(EGRESS, Impaired::Duplicated, packets);
    }
    if shaper.corrupt != 0 && chance(shaper.corrupt) {
        shaper::count_impaired(EGRESS, Impaired::Corrupted, packets);
        if let Corrupted::Discard = impair::corrupt(&ctx) {
            return TC_ACT_SHOT as i32;
        }
    }
    let delayed = config.latency_ns != 0 || config.jitter_ns != 0;
    // SAFETY: `state` points into the map value for this program run.
    if delayed && shaper.reorder != 0 && unsafe { impair::reorder(&ctx, shaper, state) } {
        shaper::count_impaired(EGRESS, Impaired::Reordered, packets);
        return TC_ACT_OK;
    }
    hold(&ctx, config);
    TC_ACT_OK
}

/// Moves the packet's departure time later by the delay, when there is one.
#[inline(always)]
fn hold(ctx: &TcContext, config: &EdtConfig) {
    if config.latency_ns == 0 && config.jitter_ns == 0 {
        return;
    }
    let skb = ctx.skb.skb;
    // SAFETY: helpers without arguments; `skb` is the context, tstamp writable at tc egress.
    unsafe {
        let now = bpf_ktime_get_ns();
        let departure = core::cmp::max((*skb).tstamp, now) + delay(config);
        (*skb).tstamp = departure;
    }
}

/// latency + a uniform draw in [-jitter, +jitter], floored at zero. The draw scales a 32-bit
/// random number (correlated with the last, as netem's) to the spread: (r * spread) >> 32 is uniform in [0, spread).
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
    // A u32 draw, correlated with the last as netem's delay correlation.
    let r = match EDT_STATE.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run.
        Some(state) => unsafe {
            correlated(
                core::ptr::addr_of_mut!((*state).jitter_last),
                config.jitter_correlation,
            )
        },
        None => crate::random::fresh(),
    };
    let draw = r * (spread >> 32) + ((r * (spread & 0xFFFF_FFFF)) >> 32);
    (config.latency_ns + draw).saturating_sub(config.jitter_ns)
}
