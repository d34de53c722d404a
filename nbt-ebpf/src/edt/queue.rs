//! The ingress queue (`--ingress-queue`): packets arriving for the run's sockets wait for their
//! turn at the ingress rate instead of being dropped beyond it, as at a bottleneck link.
//!
//! tc ingress has no queue. `queue_redirect`, a classic (not direct-action) filter on each
//! interface's ingress, matches the run's arriving packets, and its action, act_mirred, redirects
//! them to the egress of an ifb device that nbt made for the run (`bpf_redirect` would do the
//! same only from Linux 6.4: before, it did not mark the packet redirected, and the ifb dropped
//! it). There `queue_ingress` gives each its departure time (`skb->tstamp`), the fq qdisc at the
//! ifb's root holds it until then, and the ifb puts it back into the receive path of the
//! interface it came by. The cgroup ingress program then sees it marked ([`QUEUED_MARK`]) and
//! counts it without charging the rate again.
//!
//! The departure times, per link, as Cilium's `edt.h` paces a flow: a clock that runs ahead by
//! each packet's cost (its IP bytes at the rate) from the later of now and the clock,
//!
//!   departure = max(now, clock);  clock = departure + bytes x 1e9 / rate,
//!
//! so the link sends at the rate without bursts above it, and a packet that would wait longer
//! than the queue's depth (the burst, in time at the rate, at most fq's 10 s horizon) is dropped
//! (tail drop, counted as a rate drop). Many CPUs: the clock moves by atomic adds of the costs;
//! only when the queue is idle (the clock behind now) is it set with a plain store, and a packet
//! another CPU queued at that same instant may lose its cost (one packet, at most one per CPU).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use nbt_common::{account::INGRESS, edt::QUEUED_MARK, shaper::ShaperConfig};

use crate::{
    atomic_add,
    shaper::{
        self,
        link::{self, Remote},
        NSEC_PER_SEC,
    },
};

/// fq drops a packet whose departure is further ahead than its horizon (10 s by default).
const FQ_HORIZON_NS: u64 = 10 * NSEC_PER_SEC;
/// The Ethernet header the redirect pushed back in front of the IP packet: nbt redirects only
/// from interfaces that have one (Ethernet and loopback).
const ETH_HLEN: u64 = 14;

/// A classic tc classifier on each interface's ingress, behind `receive_ingress`: matches (-1,
/// the filter's default class, and its mirred action redirects the packet to the run's queue) a
/// packet for one of the run's sockets whose link has an ingress rate, and nothing else (0: on to
/// the next filter).
#[classifier]
pub fn queue_redirect(ctx: TcContext) -> i32 {
    const MATCH: i32 = -1;
    const NO_MATCH: i32 = 0;
    let skb = ctx.skb.skb;
    if was_queued(skb) || super::queue_ifindex() == 0 {
        return NO_MATCH;
    }
    let link = link::of_packet(skb, Remote::Source);
    match shaper::direction(link, INGRESS) {
        Some((config, _)) if config.rate_bytes_per_sec != 0 && super::is_run_socket(&ctx) => MATCH,
        _ => NO_MATCH,
    }
}

/// Whether the packet came back from the run's queue.
#[inline(always)]
pub fn was_queued(skb: *mut aya_ebpf::bindings::__sk_buff) -> bool {
    // SAFETY: a field of the context, read at its own offset.
    unsafe { core::ptr::read_volatile(&(*skb).tc_index) == QUEUED_MARK }
}

/// On the egress of the run's ifb: each packet's departure time at its link's ingress rate.
#[classifier]
pub fn queue_ingress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let link = link::of_packet(skb, Remote::Source);
    // SAFETY: `tc_index` is a field of the context, writable at tc.
    unsafe { (*skb).tc_index = QUEUED_MARK };
    let Some((config, state)) = shaper::direction(link, INGRESS) else {
        return TC_ACT_OK as i32;
    };
    let rate = config.rate_bytes_per_sec;
    if rate == 0 {
        return TC_ACT_OK as i32;
    }
    let bytes = ip_bytes(&ctx);
    // As in the shaper's police: bytes x 1e9 fits in a u64 (one skb plus its segments' headers).
    let cost = bytes * NSEC_PER_SEC / rate;
    let depth = depth_ns(config);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `state` points into the map value for this program run; the field is an aligned
    // u64 in it, as `atomic_add` requires.
    unsafe {
        let clock = core::ptr::addr_of_mut!((*state).queue_free_ns);
        let free = core::ptr::read_volatile(clock);
        let departure = if free < now { now } else { free };
        if departure - now > depth {
            shaper::count_queue_drop(link, bytes);
            return TC_ACT_SHOT as i32;
        }
        if free < now {
            core::ptr::write_volatile(clock, now + cost);
        } else {
            atomic_add(clock, cost);
        }
        (*skb).tstamp = departure;
    }
    TC_ACT_OK as i32
}

/// How long a packet may wait in the queue: the burst, at most fq's horizon.
#[inline(always)]
pub fn depth_ns(config: &ShaperConfig) -> u64 {
    if config.burst_ns < FQ_HORIZON_NS {
        config.burst_ns
    } else {
        FQ_HORIZON_NS
    }
}

/// The packet's IP bytes as the link carried them (the shaper's measure): the ifb sees it with
/// its Ethernet header.
#[inline(always)]
fn ip_bytes(ctx: &TcContext) -> u64 {
    shaper::segments_bytes(ctx.skb.skb, u64::from(ctx.len()).saturating_sub(ETH_HLEN))
}
