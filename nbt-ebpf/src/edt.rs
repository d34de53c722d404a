//! `edt`: latency and jitter for the run's packets, by earliest departure time (tc egress).
//!
//! The fq qdisc holds each packet until its `skb->tstamp`; this program moves that time later by
//! the run's latency (plus a uniform jitter) for packets whose socket is in the run's cgroup, and
//! leaves every other packet alone. Like netem's delay, but without a queue per interface that
//! every process shares: fq keeps a queue per flow, so the run's delayed packets do not delay
//! anyone else's.
//!
//! The same program applies netem's other impairments to the run's outgoing packets
//! (`impair`): duplicate, corrupt and reorder, in netem's order. `receive_ingress` (tc ingress)
//! duplicates and corrupts the packets arriving for the run's sockets, and sends them through
//! the run's ingress queue (`queue`) when it has one.
//!
//! A delayed packet is held as a copy that belongs to no socket, as netem orphans the packets it
//! holds (see [`release`]): a packet held by fq while it still counted against its socket would
//! cap a TCP sender at what TCP Small Queues lets below it, about 1 ms of its pacing rate (10mbit
//! with 20 ms added reached 0.23 of the rate), and a UDP sender at its send buffer.

mod impair;
// The ingress queue: `queue_ingress` on the run's ifb.
pub mod queue;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN, TC_ACT_UNSPEC},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::{SkBuffContext, TcContext},
    EbpfContext,
};
use nbt_common::{
    account::{EGRESS, INGRESS},
    edt::{EdtConfig, EdtRun, EdtState, RunSocket, LOST_MARK},
    shaper::MAX_LINKS,
};

use crate::{
    random::{chance, correlated},
    shaper::{
        self,
        link::{self, Remote},
        Impaired,
    },
};
use impair::{Corrupted, OWN_COPY_MARK};

#[map(name = "EDT_RUN")]
static EDT_RUN: Array<EdtRun> = Array::with_max_entries(1, 0);

#[map(name = "EDT_CONFIG")]
static EDT_CONFIG: Array<EdtConfig> = Array::with_max_entries(MAX_LINKS, 0);

#[map(name = "EDT_STATE")]
static EDT_STATE: Array<EdtState> = Array::with_max_entries(MAX_LINKS, 0);

/// The run's sockets, for `impair_ingress` (see `nbt_common::edt::EDT_SOCKETS_MAP`). An entry
/// outlives its socket until the LRU evicts it.
#[map(name = "EDT_SOCKETS")]
static EDT_SOCKETS: LruHashMap<RunSocket, u8> = LruHashMap::with_max_entries(16384, 0);

/// See `nbt_common::edt::EDT_WIRE_SOCKETS_MAP`.
#[map(name = "EDT_WIRE_SOCKETS")]
static EDT_WIRE_SOCKETS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Whether `delay_egress` will take this packet of the run (a cgroup egress program's) when it
/// is marked lost: it is on the packet's interface (not loopback, which nbt leaves alone) and
/// has seen the packet's socket leave by it before.
#[inline(always)]
pub fn takes_lost_packet(ctx: &SkBuffContext) -> bool {
    if !EDT_RUN.get(0).is_some_and(|run| run.wire_loss != 0) {
        return false;
    }
    // SAFETY: a field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper reads the cookie of the packet's socket (0 without one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup whose value is copied at once.
    ifindex != LOOPBACK_IFINDEX
        && cookie != 0
        && unsafe { EDT_WIRE_SOCKETS.get(&cookie) }.is_some_and(|seen| *seen == ifindex)
}

/// Loopback's interface index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Records that a packet of the run's socket leaves by this interface (see
/// [`takes_lost_packet`]).
#[inline(always)]
fn record_wire_socket(ctx: &TcContext) {
    // SAFETY: a field of the context; the helper reads the cookie of the packet's socket.
    let (ifindex, cookie) =
        unsafe { ((*ctx.skb.skb).ifindex, bpf_get_socket_cookie(ctx.as_ptr())) };
    if cookie == 0 {
        return;
    }
    // SAFETY: a lookup whose value is copied at once.
    if unsafe { EDT_WIRE_SOCKETS.get(&cookie) }.is_some_and(|seen| *seen == ifindex) {
        return;
    }
    let _ = EDT_WIRE_SOCKETS.insert(&cookie, &ifindex, 0);
}

/// Puts the socket of one of the run's packets (a cgroup_skb program of the run's cgroup) in
/// `EDT_SOCKETS`, when the run duplicates or corrupts arriving packets.
#[inline(always)]
pub fn mark_run_socket(ctx: &SkBuffContext) {
    if !EDT_RUN.get(0).is_some_and(|run| run.mark_sockets != 0) {
        return;
    }
    let Some(socket) = impair::socket_of(ctx) else {
        return;
    };
    // SAFETY: a lookup whose value is not kept.
    if unsafe { EDT_SOCKETS.get(&socket) }.is_none() {
        let _ = EDT_SOCKETS.insert(&socket, &1, 0);
    }
}

#[classifier]
pub fn delay_egress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(run) = EDT_RUN.get(0) else {
        return TC_ACT_UNSPEC;
    };
    // Our own copy, back from the clone (a duplicate, or a packet to hold): delayed, nothing
    // more.
    // SAFETY: `tc_index` is a field of the context, writable at tc.
    let own_copy = unsafe { (*skb).tc_index } == OWN_COPY_MARK;
    // Every other packet of the interface goes on at once, before its link is looked up: this
    // runs for the whole machine's traffic on it. On to the next filter (`TC_ACT_UNSPEC`), which
    // may be another run's in the same namespace: each filter goes in front of those already
    // there, and a verdict here would end the list (a later run's program then let an earlier
    // run's lost segments leave).
    // SAFETY: helper on the context the kernel handed us; 0 for packets without a socket.
    if !own_copy
        && unsafe { bpf_skb_ancestor_cgroup_id(skb, run.cgroup_level as i32) } != run.cgroup_id
    {
        return TC_ACT_UNSPEC;
    }
    // A segment of the run that its egress loss model lost (`shaper`): taken here, so that its
    // sender's stack is told it left, as netem does with what it loses. Dropped at the cgroup
    // instead, it would be handed back to TCP as not sent and go again at once.
    // SAFETY: `mark` is a field of the context.
    if !own_copy && unsafe { (*skb).mark } == LOST_MARK {
        return TC_ACT_STOLEN as i32;
    }
    if !own_copy && run.wire_loss != 0 {
        record_wire_socket(&ctx);
    }
    let link = link::of_packet(skb, Remote::Destination);
    let Some(config) = EDT_CONFIG.get(link) else {
        return TC_ACT_OK;
    };
    if own_copy {
        // SAFETY: as above.
        unsafe { (*skb).tc_index = 0 };
        hold(&ctx, link, config);
        return TC_ACT_OK;
    }
    let Some((shaper, state)) = shaper::direction(link, EGRESS) else {
        return release(&ctx, link, config);
    };
    let packets = impair::wire_packets(&ctx);
    // netem's order: the copy leaves before the original is corrupted, and is intact.
    if shaper.duplicate != 0 && chance(shaper.duplicate) && impair::send_own_copy(&ctx, 0) {
        shaper::count_impaired(link, EGRESS, Impaired::Duplicated, packets);
    }
    if shaper.corrupt != 0 && chance(shaper.corrupt) {
        shaper::count_impaired(link, EGRESS, Impaired::Corrupted, packets);
        if let Corrupted::Discard = impair::corrupt(&ctx) {
            return TC_ACT_SHOT as i32;
        }
    }
    let delayed = config.latency_ns != 0 || config.jitter_ns != 0;
    // SAFETY: `state` points into the map value for this program run.
    if delayed && shaper.reorder != 0 && unsafe { impair::reorder(&ctx, shaper, state) } {
        shaper::count_impaired(link, EGRESS, Impaired::Reordered, packets);
        return TC_ACT_OK;
    }
    release(&ctx, link, config)
}

/// netem's duplicate and corrupt on the packets arriving for the run's sockets (tc ingress),
/// with the probabilities of their link's ingress entry. Nothing arriving has a socket yet at
/// tc: the packet's socket is looked up by its addresses and ports (`bpf_sk_lookup_tcp/udp`)
/// and found, or not, among the run's sockets in `EDT_SOCKETS`. tc programs cannot ask a
/// socket's cgroup (the kernel offers `bpf_sk_ancestor_cgroup_id` to cgroup_skb programs
/// only), so the run's cgroup programs record each socket that passes them a packet
/// ([`mark_run_socket`]): a socket's first packets in either direction come before its record
/// and pass unimpaired (a receiver's first datagram, an accepted connection's first segments
/// until it sends). Duplicate sends a copy into the same interface's receive path
/// (`bpf_clone_redirect` with `BPF_F_INGRESS`), which comes back here marked and passes; a
/// corrupted IPv4 packet fails `ip_rcv`'s header checksum, a GRO or IPv6 one is dropped here.
/// Both come before the run's ingress queue (`queue::queue_redirect`, the next filter) and the
/// cgroup's ingress shaper, as an impairment on the wire would: a duplicate is counted, queued
/// or policed, and maybe lost there as any packet.
///
/// Every packet it lets pass goes on to the interface's next filter (`TC_ACT_UNSPEC`): the
/// run's queue, and another run's programs in the same namespace.
#[classifier]
pub fn receive_ingress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // Back from the run's queue (should the ifb's re-injection pass the classifiers again):
    // impaired before it was queued.
    if queue::was_queued(skb) {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a field of the context, read at its own offset.
    if unsafe { core::ptr::read_volatile(&(*skb).tc_index) } == OWN_COPY_MARK {
        // SAFETY: as above; `tc_index` is writable at tc.
        unsafe { (*skb).tc_index = 0 };
        return TC_ACT_UNSPEC;
    }
    let link = link::of_packet(skb, Remote::Source);
    let Some((shaper, _)) = shaper::direction(link, INGRESS) else {
        return TC_ACT_UNSPEC;
    };
    let (duplicate, corrupt) = (shaper.duplicate, shaper.corrupt);
    if duplicate == 0 && corrupt == 0 {
        return TC_ACT_UNSPEC;
    }
    if !is_run_socket(&ctx) {
        return TC_ACT_UNSPEC;
    }
    let packets = impair::wire_packets(&ctx);
    if duplicate != 0 && chance(duplicate) && impair::send_own_copy(&ctx, BPF_F_INGRESS.into()) {
        shaper::count_impaired(link, INGRESS, Impaired::Duplicated, packets);
    }
    if corrupt != 0 && chance(corrupt) {
        shaper::count_impaired(link, INGRESS, Impaired::Corrupted, packets);
        if let Corrupted::Discard = impair::corrupt(&ctx) {
            return TC_ACT_SHOT as i32;
        }
    }
    TC_ACT_UNSPEC
}

/// Whether an arriving packet is for one of the run's sockets (see [`receive_ingress`]).
#[inline(always)]
pub fn is_run_socket(ctx: &TcContext) -> bool {
    // SAFETY: a lookup whose value is not kept.
    impair::socket_for(ctx).is_some_and(|s| unsafe { EDT_SOCKETS.get(&s) }.is_some())
}

/// The largest receive buffer the kernel grants (`EdtRun::receive_buffer_max`).
#[inline(always)]
pub fn receive_buffer_max() -> u64 {
    EDT_RUN.get(0).map_or(0, |run| run.receive_buffer_max)
}

/// The index of the run's ingress queue device, 0 when it has none.
#[inline(always)]
pub fn queue_ifindex() -> u32 {
    EDT_RUN.get(0).map_or(0, |run| run.queue_ifindex)
}

/// Lets the packet go at its time: when there is a delay, as a copy that belongs to no socket.
///
/// A clone has no socket (`skb_clone` leaves `sk` empty and no destructor), so the copy sent
/// out of the same interface, marked, comes back through this program, which only delays it
/// (`hold`), and fq holds it without it counting against anyone. The original ends here as
/// taken (`TC_ACT_STOLEN`: the stack reports a successful send and frees it, which returns its
/// bytes to its socket at once). netem does the same with `skb_orphan_partial`. Should the
/// clone fail (no memory), the original is held itself, as before: the delay holds, with TSQ's
/// cap on the sender.
#[inline(always)]
fn release(ctx: &TcContext, link: u32, config: &EdtConfig) -> i32 {
    if config.latency_ns == 0 && config.jitter_ns == 0 {
        return TC_ACT_OK;
    }
    if impair::send_own_copy(ctx, 0) {
        return TC_ACT_STOLEN as i32;
    }
    hold(ctx, link, config);
    TC_ACT_OK
}

/// Moves the packet's departure time later by the delay, when there is one.
#[inline(always)]
fn hold(ctx: &TcContext, link: u32, config: &EdtConfig) {
    if config.latency_ns == 0 && config.jitter_ns == 0 {
        return;
    }
    let skb = ctx.skb.skb;
    // SAFETY: helpers without arguments; `skb` is the context, tstamp writable at tc egress.
    unsafe {
        let now = bpf_ktime_get_ns();
        let departure = core::cmp::max((*skb).tstamp, now) + delay(link, config);
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
fn delay(link: u32, config: &EdtConfig) -> u64 {
    if config.jitter_ns == 0 {
        return config.latency_ns;
    }
    let spread = 2 * config.jitter_ns + 1;
    // A u32 draw, correlated with the last as netem's delay correlation.
    let r = match EDT_STATE.get_ptr_mut(link) {
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
