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
//! The departure times, per link, as a link of that rate serializes packets: a clock that runs
//! ahead by each packet's cost (its IP bytes at the rate), and each packet leaves when its last
//! byte would have. After an idle spell the clock may lag now by a small credit (5 ms at the
//! rate, at least one 1514-byte frame: a token bucket that deep), so
//!
//!   start = max(clock, now - credit);  clock = start + bytes x 1e9 / rate;
//!   departure = max(clock, now),
//!
//! the link sends at the rate without bursts above it but the credit, and a packet that would
//! wait longer than the queue's depth before its turn (the burst, in time at the rate; the
//! departure at most fq's 10 s horizon ahead) is dropped (tail drop, counted as a rate drop).
//! Many CPUs: the clock moves by atomic adds of the costs; only when the queue is idle (the
//! clock behind now less the credit) is it set with a plain store, and a packet another CPU
//! queued at that same instant may lose its cost (one packet, at most one per CPU).
//!
//! Why the end and the credit, measured with BBR in the 6.12 VM (docs/benchmarks.md). Sent at
//! its start, as Cilium's `edt.h` paces (where packets are small against the rate), a packet
//! arrives one packet's time early: a 34 KiB TSO packet 0.53 s at 512kbit, and the spacing of
//! deliveries follows the previous packet's size, not its own (how that costs BBR is a reading,
//! not traced). BBR into the queue at 512kbit on a 9000-byte veth read 0.976 to 0.996 of the
//! rate in seven runs of twelve. Sent at its end with no credit, 512kbit read 0.9999 in five of five, but BBR at 10mbit left the queue
//! empty 0.7 to 1.9% of the time and read 0.980 to 0.994 in four runs (start: 0.99995 to
//! 1.0004). With the credit, both: 0.9999 (three runs) and 0.9995 to 1.0000 (three runs).
//!
//! The time the queue stands empty beyond the credit is counted (`queue_idle_ns`; the summary's
//! "queue empty"): the link carried its rate the rest of the time, so what a run falls short of
//! the rate beyond that, its senders left unused.

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
/// The queue's catch-up after idle (see the module's text), and the frame it takes at least.
const CREDIT_NS: u64 = 5_000_000;
const FRAME_BYTES: u64 = 1514;

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
        let floor = now.saturating_sub(credit_ns(rate));
        let start = free.max(floor);
        let end = start + cost;
        let departure = end.max(now);
        if start > now + depth || departure - now > FQ_HORIZON_NS {
            shaper::count_queue_drop(link, bytes);
            return TC_ACT_SHOT as i32;
        }
        if free < floor {
            // Idle since the clock ran out (not before the first packet).
            if free != 0 {
                shaper::count_queue_idle(link, floor - free);
            }
            core::ptr::write_volatile(clock, end);
        } else {
            atomic_add(clock, cost);
        }
        (*skb).tstamp = departure;
    }
    TC_ACT_OK as i32
}

/// How far the queue's clock may lag now: the link's catch-up after a short idle, as a token
/// bucket of this depth (`CREDIT_NS` at the rate, at least one full Ethernet frame).
#[inline(always)]
fn credit_ns(rate: u64) -> u64 {
    (FRAME_BYTES * NSEC_PER_SEC / rate).max(CREDIT_NS)
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
