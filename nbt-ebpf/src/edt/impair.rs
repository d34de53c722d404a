//! netem's duplicate, corrupt and reorder for the run's outgoing packets (tc egress). The
//! probabilities are the egress shaper's (`SHAPER_CONFIG`), so `nbt set` changes them as it
//! changes the loss.

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET, helpers::bpf_skb_load_bytes_relative,
    programs::TcContext,
};
use nbt_common::shaper::{ShaperConfig, ShaperState};

use crate::random::{correlated, fresh};

/// `tc_index` of our own copy (a duplicate, or a packet to hold without its socket) while it
/// passes through this program again: a value that no qdisc of this kernel sets (dsmark, its
/// last user, is gone since Linux 6.3). The clone keeps `tc_index`, and the original gets its
/// own back at once.
pub const OWN_COPY_MARK: u32 = 0x4E42;
/// fq sends packets of this priority first, ahead of every delayed packet (its internal flow).
const TC_PRIO_CONTROL: u32 = 7;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u32 = 0x0800;

/// The number of packets on the wire: a GSO packet leaves as `gso_segs` packets.
#[inline(always)]
pub fn wire_packets(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the context the kernel handed us.
    u64::from(unsafe { (*ctx.skb.skb).gso_segs }).max(1)
}

/// Sends a copy of the packet out of the same interface, now. The copy comes back through the
/// tc program, which only delays it (see [`OWN_COPY_MARK`]). True when it was sent.
#[inline(always)]
pub fn send_own_copy(ctx: &TcContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: `tc_index` and `ifindex` are fields of the context, tc_index writable at tc.
    unsafe {
        let saved = (*skb).tc_index;
        (*skb).tc_index = OWN_COPY_MARK;
        let sent = ctx.clone_redirect((*skb).ifindex, 0).is_ok();
        (*skb).tc_index = saved;
        sent
    }
}

/// netem's reorder, with its gap: once `reorder_gap - 1` packets have been delayed since the
/// last one that was not, the next skips the delay with probability `reorder` (correlated).
/// True when this packet is to leave now; it is then put in fq's priority flow.
///
/// # Safety
/// `state` must point into a map value valid for this program run.
#[inline(always)]
pub unsafe fn reorder(ctx: &TcContext, config: &ShaperConfig, state: *mut ShaperState) -> bool {
    // SAFETY: the caller guarantees `state`; the fields are aligned u64s in it.
    unsafe {
        let count = core::ptr::addr_of_mut!((*state).reorder_count);
        let delayed = core::ptr::read_volatile(count);
        let gap = if config.reorder_gap == 0 {
            1
        } else {
            config.reorder_gap
        };
        if delayed + 1 >= gap
            && correlated(
                core::ptr::addr_of_mut!((*state).reorder_last),
                config.reorder_correlation,
            ) < config.reorder
        {
            core::ptr::write_volatile(count, 0);
            (*ctx.skb.skb).priority = TC_PRIO_CONTROL;
            return true;
        }
        core::ptr::write_volatile(count, delayed + 1);
    }
    false
}

pub enum Corrupted {
    /// A bit of the IPv4 header was flipped; its receiver's header checksum will fail.
    Flipped,
    /// A GSO or IPv6 packet: dropped here, as its receiver would drop it.
    Discard,
}

/// netem's corrupt, as a checksum-protected receiver sees it: the packet is discarded on
/// arrival, and never reaches an application.
///
/// netem computes the packet's checksum, then flips a random bit. A BPF program cannot make
/// the kernel compute a deferred (partial) TCP or UDP checksum, and a veth's or loopback's
/// receiver trusts one: a bit flipped in the payload reached the application intact in our
/// test. So the bit flipped is one of the IPv4 header's identification field, which nothing
/// recomputes after this program and every receiver (and router) verifies in software: the
/// packet fails `ip_rcv` and is counted in its `IpExt InCsumErrors`. A GSO packet is split
/// after this program, and each segment's IPv4 header checksum computed again; IPv6 has no
/// header checksum: such packets are dropped here, as the receiver would drop them; the mean
/// stays one corruption per `1 / corrupt` packets on the wire (a GSO packet's in a burst).
#[inline(always)]
pub fn corrupt(ctx: &TcContext) -> Corrupted {
    if wire_packets(ctx) > 1 {
        return Corrupted::Discard;
    }
    match flip_an_ipv4_header_bit(ctx) {
        Some(()) => Corrupted::Flipped,
        None => Corrupted::Discard,
    }
}

#[inline(always)]
fn flip_an_ipv4_header_bit(ctx: &TcContext) -> Option<()> {
    if u32::from(u16::from_be(ctx.skb.protocol() as u16)) != ETH_P_IP {
        return None;
    }
    let identification = network_offset(ctx)? + 4;
    let old = ctx.load::<u16>(identification).ok()?;
    let new = old ^ (1u16 << (fresh() % 16));
    ctx.store(identification, &new, 0).ok()
}

/// Where the IP header starts in the packet as tc sees it: after an Ethernet header (a veth, a
/// NIC) or at once (a tunnel, WireGuard). Told by comparing the first 8 bytes of the network
/// header, read relative to it, with the bytes at each place.
#[inline(always)]
fn network_offset(ctx: &TcContext) -> Option<usize> {
    let mut start = [0u8; 8];
    // SAFETY: the helper writes at most 8 bytes into `start`, a local.
    let read = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast(),
            0,
            start.as_mut_ptr().cast(),
            8,
            BPF_HDR_START_NET,
        )
    };
    if read != 0 {
        return None;
    }
    if ctx.load::<[u8; 8]>(ETH_HLEN).ok() == Some(start) {
        Some(ETH_HLEN)
    } else if ctx.load::<[u8; 8]>(0).ok() == Some(start) {
        Some(0)
    } else {
        None
    }
}
