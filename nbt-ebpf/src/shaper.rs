//! `shaper`: bandwidth and loss limits of a run, per link and direction, at its cgroup
//! (cgroup_skb).
//!
//! Per packet: its link (`link`: the run's own, or a `--link` of its remote address), then the loss model decides whether the packet is lost (as netem, which drops at
//! enqueue before any rate limit sees the packet), then the token bucket whether it fits the rate.
//!
//! Egress verdicts use the cgroup_skb back-off codes, so TCP slows down instead of losing data:
//!   1 pass; 3 pass + congestion notification (the bucket is running low: TCP enters CWR);
//!   2 drop + congestion notification (no tokens, or lost: TCP keeps the segment and resends it,
//!   a UDP sender gets ENOBUFS). 0 would hand the sender EPERM, which a firewall means, so it is
//!   never returned here. Ingress has no back-off: 0 drops, silently, like a lossy link.

// Which link a packet or socket belongs to.
pub mod link;
// The sock_ops program that paces the run's TCP sockets to this bucket.
mod pacing;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::bpf_ktime_get_ns,
    macros::{cgroup_skb, map},
    maps::{Array, PerCpuArray},
    programs::SkBuffContext,
};
use nbt_common::{
    account::{EGRESS, INGRESS},
    edt::LOST_MARK,
    shaper::{
        entry, ShaperConfig, ShaperState, ShaperStats, LOSS_GILBERT_ELLIOTT, LOSS_UNIFORM,
        SHAPER_ENTRIES,
    },
};

use crate::{
    atomic_add,
    random::{chance, correlated},
};
use link::Remote;

#[map(name = "SHAPER_CONFIG")]
static SHAPER_CONFIG: Array<ShaperConfig> = Array::with_max_entries(SHAPER_ENTRIES, 0);

#[map(name = "SHAPER_STATE")]
static SHAPER_STATE: Array<ShaperState> = Array::with_max_entries(SHAPER_ENTRIES, 0);

#[map(name = "SHAPER_STATS")]
static SHAPER_STATS: PerCpuArray<ShaperStats> = PerCpuArray::with_max_entries(SHAPER_ENTRIES, 0);

pub(crate) const NSEC_PER_SEC: u64 = 1_000_000_000;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// Passed, but the bucket holds less than half its depth.
    PassLow,
    DropRate,
    DropLoss,
}

#[cgroup_skb(egress)]
pub fn shape_egress(ctx: SkBuffContext) -> i32 {
    let link = link::of_packet(ctx.skb.skb, Remote::Destination);
    match shape(link, EGRESS, &ctx) {
        Verdict::Pass => 1,
        Verdict::PassLow => 3,
        Verdict::DropLoss if lost_on_the_wire(&ctx) => 1,
        Verdict::DropRate | Verdict::DropLoss => 2,
    }
}

/// A TCP segment the loss model lost, marked for `delay_egress` to take where it will
/// (`edt::takes_lost_packet`): TCP then learns of the loss as of one on the wire (duplicate
/// ACKs, its timers) and retransmits. Dropped here, it would be handed back to TCP as not sent
/// and go again at once: a congestion signal, never a retransmission. Other protocols lose it
/// here either way (a datagram is gone at once for its sender too).
#[inline(always)]
fn lost_on_the_wire(ctx: &SkBuffContext) -> bool {
    if !matches!(transport(ctx.skb.skb), Some((_, IPPROTO_TCP)))
        || !crate::edt::takes_lost_packet(ctx)
    {
        return false;
    }
    // SAFETY: `mark` is a field of the context, writable at cgroup_skb.
    unsafe { (*ctx.skb.skb).mark = LOST_MARK };
    true
}

#[cgroup_skb(ingress)]
pub fn shape_ingress(ctx: SkBuffContext) -> i32 {
    let link = link::of_packet(ctx.skb.skb, Remote::Source);
    let verdict = match crate::edt::queue::was_queued(ctx.skb.skb) {
        // The run's ingress queue sent it at the rate: only the loss model is left.
        true => shape_queued(link, &ctx),
        false => shape(link, INGRESS, &ctx),
    };
    match verdict {
        Verdict::Pass | Verdict::PassLow => 1,
        Verdict::DropRate | Verdict::DropLoss => 0,
    }
}

/// A link's configuration and shared state in one direction (for `pacing` and the tc
/// programs' impairments).
#[inline(always)]
pub fn direction(link: u32, direction: u32) -> Option<(&'static ShaperConfig, *mut ShaperState)> {
    let entry = entry(link, direction);
    Some((SHAPER_CONFIG.get(entry)?, SHAPER_STATE.get_ptr_mut(entry)?))
}

/// Counts `packets` wire packets that an impairment acted on (for the tc programs).
#[inline(always)]
pub fn count_impaired(link: u32, direction: u32, field: Impaired, packets: u64) {
    let Some(stats) = SHAPER_STATS.get_ptr_mut(entry(link, direction)) else {
        return;
    };
    // SAFETY: the pointer comes from the map lookup and stays valid for this program run.
    unsafe {
        let counter = match field {
            Impaired::Duplicated => &mut (*stats).duplicated_packets,
            Impaired::Corrupted => &mut (*stats).corrupted_packets,
            Impaired::Reordered => &mut (*stats).reordered_packets,
        };
        atomic_add(counter, packets);
    }
}

#[derive(Clone, Copy)]
pub enum Impaired {
    Duplicated,
    Corrupted,
    Reordered,
}

/// A link's egress bucket, when it has a rate (for `pacing`).
#[inline(always)]
pub fn egress_bucket(link: u32) -> Option<(&'static ShaperConfig, *mut ShaperState)> {
    direction(link, EGRESS).filter(|(config, _)| config.rate_bytes_per_sec != 0)
}

/// A link's bucket depth in bytes, when the direction has a rate (for `pacing`). The product
/// fits in a u64: user space keeps rate x burst_ns within burst x 1e9 < 2^34 x 1e9.
#[inline(always)]
pub fn bucket_bytes(link: u32, direction: u32) -> Option<u64> {
    let config = SHAPER_CONFIG.get(entry(link, direction))?;
    if config.rate_bytes_per_sec == 0 {
        return None;
    }
    Some(config.rate_bytes_per_sec * config.burst_ns / NSEC_PER_SEC)
}

pub const PPM: u64 = 1_000_000;

#[inline(always)]
fn shape(link: u32, direction: u32, ctx: &SkBuffContext) -> Verdict {
    let Some((config, state)) = self::direction(link, direction) else {
        return Verdict::Pass;
    };
    let bytes = wire_bytes(ctx);
    // SAFETY: `state` points into the map value for this program run.
    let verdict = unsafe {
        if lost(config, state) {
            Verdict::DropLoss
        } else {
            police(config, state, bytes)
        }
    };
    count(entry(link, direction), verdict, bytes);
    verdict
}

/// A packet back from the run's ingress queue (`edt::queue`), which spent the rate on it: lost or
/// passed, and counted.
#[inline(always)]
fn shape_queued(link: u32, ctx: &SkBuffContext) -> Verdict {
    let Some((config, state)) = direction(link, INGRESS) else {
        return Verdict::Pass;
    };
    // SAFETY: `state` points into the map value for this program run.
    let verdict = match unsafe { lost(config, state) } {
        true => Verdict::DropLoss,
        false => Verdict::Pass,
    };
    count(entry(link, INGRESS), verdict, wire_bytes(ctx));
    verdict
}

/// Counts a packet the ingress queue dropped, full (for `edt::queue`), as one the rate dropped.
#[inline(always)]
pub fn count_queue_drop(link: u32, bytes: u64) {
    count(entry(link, INGRESS), Verdict::DropRate, bytes);
}

/// Counts time the ingress queue stood empty (for `edt::queue`).
#[inline(always)]
pub fn count_queue_idle(link: u32, ns: u64) {
    if let Some(stats) = SHAPER_STATS.get_ptr_mut(entry(link, INGRESS)) {
        // SAFETY: as in `count`.
        unsafe { atomic_add(&mut (*stats).queue_idle_ns, ns) };
    }
}

/// The packet's bytes as the wire will carry them. A GSO super-packet is one skb here but
/// leaves as `gso_segs` packets, each with its own IP and TCP/UDP headers.
#[inline(always)]
fn wire_bytes(ctx: &SkBuffContext) -> u64 {
    segments_bytes(ctx.skb.skb, u64::from(ctx.len()))
}

/// A packet of `len` IP bytes as the link carries it: a GSO packet counts the headers of each of
/// its `gso_segs` segments (for the cgroup programs here and the ingress queue at tc).
#[inline(always)]
pub fn segments_bytes(skb: *mut __sk_buff, len: u64) -> u64 {
    // SAFETY: reading a field of the context the kernel handed us.
    let segs = u64::from(unsafe { (*skb).gso_segs });
    if segs <= 1 {
        return len;
    }
    len + (segs - 1) * header_bytes(skb)
}

/// IP + transport header length of the packet (0 if it cannot be read).
#[inline(always)]
fn header_bytes(skb: *mut __sk_buff) -> u64 {
    let Some((ip_len, protocol)) = transport(skb) else {
        return 0;
    };
    match protocol {
        // TCP data offset: the high nibble of byte 12, in 32-bit words.
        IPPROTO_TCP => match link::load::<1>(skb, ip_len as u32 + 12) {
            Some([offset]) => ip_len + u64::from(offset >> 4) * 4,
            None => ip_len,
        },
        IPPROTO_UDP => ip_len + 8,
        _ => ip_len,
    }
}

/// The IP header's length and the protocol after it (IPv6: the fixed header's next header;
/// extension headers are not walked), read from the network header.
#[inline(always)]
fn transport(skb: *mut __sk_buff) -> Option<(u64, u8)> {
    // SAFETY: a field of the context, read at its own offset.
    let protocol = unsafe { core::ptr::read_volatile(&(*skb).protocol) };
    match u32::from(u16::from_be(protocol as u16)) {
        ETH_P_IP => {
            let header = link::load::<10>(skb, 0)?;
            Some((u64::from(header[0] & 0x0f) * 4, header[9]))
        }
        ETH_P_IPV6 => Some((40, link::load::<7>(skb, 0)?[6])),
        _ => None,
    }
}

/// The loss model's verdict for this packet. Gilbert-Elliott follows netem: the current state
/// decides the loss, then the state moves for the next packet. The state is one word that every
/// CPU reads and writes plainly: two CPUs deciding a move at once both move it the same way or
/// one move is lost, which changes a burst's length by one packet at most.
///
/// # Safety
/// `state` must point into a map value valid for this program run.
#[inline(always)]
unsafe fn lost(config: &ShaperConfig, state: *mut ShaperState) -> bool {
    match config.loss_model {
        // SAFETY: the caller guarantees `state` points into a map value valid for this run.
        LOSS_UNIFORM => unsafe {
            correlated(
                core::ptr::addr_of_mut!((*state).loss_last),
                config.loss_correlation,
            ) < config.loss_good
        },
        LOSS_GILBERT_ELLIOTT => {
            // SAFETY: the caller guarantees `state` points into a map value valid for this
            // program run; `bad_state` is an aligned u64 in it.
            let bad = unsafe { core::ptr::read_volatile(&(*state).bad_state) } != 0;
            let lost = chance(if bad {
                config.loss_bad
            } else {
                config.loss_good
            });
            let moves = chance(if bad {
                config.bad_to_good
            } else {
                config.good_to_bad
            });
            if moves {
                // SAFETY: as for the read above.
                unsafe { core::ptr::write_volatile(&mut (*state).bad_state, u64::from(!bad)) };
            }
            lost
        }
        _ => false,
    }
}

/// The token bucket, as GCRA: the bucket is a clock `tat` that runs ahead by each packet's cost
/// (bytes / rate, in ns) and holds `now - tat` ns worth of tokens, at most `burst_ns`.
///
/// A packet passes when the bucket holds its cost or, for a packet larger than half the bucket,
/// when the bucket is at least half full; such a packet leaves the bucket in debt that the next
/// packets repay, so the long-run rate holds either way, and a burst is at most 1.5 buckets.
/// Why half: paced TCP keeps the bucket 60% full (`pacing`), so a packet between 0.6 and 1
/// bucket (a 64 KiB segment on loopback, whose MTU is 64 KiB, against the 96 KiB bucket of
/// 10mbit) would never find room, and each drop stalls the flow until a timer fires: loopback
/// at 10mbit delivered 0.25 of the rate. `pacing` caps the segment size of the run's new
/// connections so that this stays rare; connections made before a limit was set are not capped.
///
/// Many CPUs: the clock only ever moves by atomic adds of the costs of packets that passed, so
/// every byte let through is paid for. Two CPUs may both read the clock before either adds and
/// both pass; the bucket then briefly runs into debt by one packet, which the next packets repay.
///
/// # Safety
/// `state` must point into a map value valid for this program run.
#[inline(always)]
unsafe fn police(config: &ShaperConfig, state: *mut ShaperState, bytes: u64) -> Verdict {
    let rate = config.rate_bytes_per_sec;
    if rate == 0 {
        return Verdict::Pass;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // No u128 in BPF: bytes is one skb's length (a u32) plus at most 2^16 GSO segments' headers
    // (under 120 bytes each), so bytes x 1e9 < 4.4e18 fits in a u64. The rate and the depth are
    // bounded in user space (nbt-user/src/enforce/shaper.rs).
    let cost = bytes * NSEC_PER_SEC / rate;
    let burst = config.burst_ns;
    // SAFETY: the caller guarantees `state` points into a map value valid for this program run;
    // this only takes the address of a field in it.
    let tat = unsafe { core::ptr::addr_of_mut!((*state).tat_ns) };
    // SAFETY: `tat` points to an aligned u64 in that map value.
    let clock = unsafe { core::ptr::read_volatile(tat) };

    let full = now.saturating_sub(burst);
    if clock < full {
        // Idle time beyond the depth is forgotten. A plain store: an add another CPU made since
        // our read is overwritten, at most one packet per CPU, and only when the bucket was full.
        // SAFETY: `tat` and `last_cost_ns` are aligned u64s in the map value `state` points to.
        unsafe {
            core::ptr::write_volatile(tat, full + cost);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*state).last_cost_ns), cost);
        }
        return Verdict::Pass;
    }
    let need = if cost < burst / 2 { cost } else { burst / 2 };
    if clock + need > now {
        return Verdict::DropRate;
    }
    // SAFETY: `tat` and `last_cost_ns` are 8-byte aligned u64s in the map value `state` points
    // to, as `atomic_add` requires.
    unsafe {
        atomic_add(tat, cost);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*state).last_cost_ns), cost);
    }
    low_or_pass(clock, burst, now)
}

/// For a packet that passed, with the clock at `tat` before it: low when under a quarter of the
/// depth was left, well below where paced TCP keeps it (0.6). The level before the packet, not
/// after: judged after each large packet, a paced flow at 10mbit was told to slow down on a fifth
/// of its packets while sending under the rate; its congestion window shrank and the flow fell
/// short of the limit.
#[inline(always)]
fn low_or_pass(tat: u64, burst: u64, now: u64) -> Verdict {
    if tat + burst / 4 > now {
        Verdict::PassLow
    } else {
        Verdict::Pass
    }
}

#[inline(always)]
fn count(entry: u32, verdict: Verdict, bytes: u64) {
    let Some(stats) = SHAPER_STATS.get_ptr_mut(entry) else {
        return;
    };
    // SAFETY: the pointer comes from the map lookup and stays valid for this program run; the
    // adds are atomic for the same reason as in `account`.
    unsafe {
        let (packets, total) = match verdict {
            Verdict::Pass => (&mut (*stats).passed_packets, &mut (*stats).passed_bytes),
            Verdict::PassLow => {
                atomic_add(&mut (*stats).marked_packets, 1);
                (&mut (*stats).passed_packets, &mut (*stats).passed_bytes)
            }
            Verdict::DropRate => (
                &mut (*stats).rate_dropped_packets,
                &mut (*stats).rate_dropped_bytes,
            ),
            Verdict::DropLoss => (
                &mut (*stats).loss_dropped_packets,
                &mut (*stats).loss_dropped_bytes,
            ),
        };
        atomic_add(packets, 1);
        atomic_add(total, bytes);
    }
}
