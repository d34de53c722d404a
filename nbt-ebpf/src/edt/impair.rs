//! netem's duplicate, corrupt and reorder for the run's outgoing packets (tc egress), and its
//! duplicate and corrupt for the packets arriving for the run's sockets (tc ingress). The
//! probabilities are the shaper's of each direction (`SHAPER_CONFIG`), so `nbt set` changes them
//! as it changes the loss.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::{SkBuffContext, TcContext},
};
use nbt_common::{
    edt::RunSocket,
    shaper::{ShaperConfig, ShaperState},
};

use crate::{
    random::{correlated, fresh},
    shaper::link::load,
};

/// `tc_index` of our own copy (a duplicate, or a packet to hold without its socket) while it
/// passes through this program again: a value that no qdisc of this kernel sets (dsmark, its
/// last user, is gone since Linux 6.3). The clone keeps `tc_index`, and the original gets its
/// own back at once.
pub const OWN_COPY_MARK: u32 = 0x4E42;
/// fq sends packets of this priority first, ahead of every delayed packet (its internal flow).
const TC_PRIO_CONTROL: u32 = 7;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// The sizes of `bpf_sock_tuple`'s IPv4 and IPv6 forms, as the lookup helpers take them.
const TUPLE_V4: u32 = 12;
const TUPLE_V6: u32 = 36;

/// The number of packets on the wire: a GSO packet leaves as `gso_segs` packets.
#[inline(always)]
pub fn wire_packets(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the context the kernel handed us.
    u64::from(unsafe { (*ctx.skb.skb).gso_segs }).max(1)
}

/// Sends a copy of the packet out of the same interface, now (`flags` 0), or into its receive
/// path (`BPF_F_INGRESS`). The copy comes back through the tc program, which only delays it
/// (egress) or passes it (ingress) (see [`OWN_COPY_MARK`]). True when it was sent.
#[inline(always)]
pub fn send_own_copy(ctx: &TcContext, flags: u64) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: `tc_index` and `ifindex` are fields of the context, tc_index writable at tc.
    unsafe {
        let saved = core::ptr::read_volatile(&(*skb).tc_index);
        let ifindex = core::ptr::read_volatile(&(*skb).ifindex);
        (*skb).tc_index = OWN_COPY_MARK;
        let sent = ctx.clone_redirect(ifindex, flags).is_ok();
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
    let start = load::<8>(ctx.skb.skb, 0)?;
    if ctx.load::<[u8; 8]>(ETH_HLEN).ok() == Some(start) {
        Some(ETH_HLEN)
    } else if ctx.load::<[u8; 8]>(0).ok() == Some(start) {
        Some(0)
    } else {
        None
    }
}

const AF_INET: u32 = 2;

/// What `struct bpf_sock` says of a full socket: its identity in `EDT_SOCKETS`.
///
/// # Safety
/// `sock` must be a full socket the verifier knows as one (a lookup's, or `bpf_sk_fullsock`'s).
#[inline(always)]
unsafe fn identity(sock: *mut bpf_sock) -> RunSocket {
    // The verifier takes socket fields only as loads at their own offsets: each read once.
    // SAFETY: the caller guarantees `sock`.
    unsafe {
        let family = core::ptr::read_volatile(&(*sock).family);
        let protocol = core::ptr::read_volatile(&(*sock).protocol);
        let src_port = core::ptr::read_volatile(&(*sock).src_port);
        let dst_port = u32::from(core::ptr::read_volatile(&(*sock).dst_port));
        let src4 = core::ptr::read_volatile(&(*sock).src_ip4);
        let dst4 = core::ptr::read_volatile(&(*sock).dst_ip4);
        let mut socket = RunSocket {
            family,
            protocol,
            src_port,
            dst_port,
            src_ip: [src4, 0, 0, 0],
            dst_ip: [dst4, 0, 0, 0],
        };
        if family != AF_INET {
            socket.src_ip = [
                core::ptr::read_volatile(&(*sock).src_ip6[0]),
                core::ptr::read_volatile(&(*sock).src_ip6[1]),
                core::ptr::read_volatile(&(*sock).src_ip6[2]),
                core::ptr::read_volatile(&(*sock).src_ip6[3]),
            ];
            socket.dst_ip = [
                core::ptr::read_volatile(&(*sock).dst_ip6[0]),
                core::ptr::read_volatile(&(*sock).dst_ip6[1]),
                core::ptr::read_volatile(&(*sock).dst_ip6[2]),
                core::ptr::read_volatile(&(*sock).dst_ip6[3]),
            ];
        }
        socket
    }
}

/// The socket of a packet of the run (cgroup_skb: the packet has its socket), when a full one.
#[inline(always)]
pub fn socket_of(ctx: &SkBuffContext) -> Option<RunSocket> {
    // SAFETY: a field of the context, read at its own offset; `bpf_sk_fullsock` takes a socket
    // or null and gives a full socket or null.
    unsafe {
        let sk = core::ptr::read_volatile(&(*ctx.skb.skb).__bindgen_anon_2.sk);
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return None;
        }
        Some(identity(full))
    }
}

/// The socket an arriving packet is for: its TCP or UDP socket, looked up by the packet's
/// addresses and ports in this network namespace (`bpf_sk_lookup_*`, released at once). IPv4
/// and IPv6 without extension headers; a fragment after the first (no ports), another protocol,
/// or a packet with no socket here has none.
#[inline(always)]
pub fn socket_for(ctx: &TcContext) -> Option<RunSocket> {
    // SAFETY: a field of the context, read at its own offset.
    let protocol =
        u32::from(u16::from_be(
            unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).protocol) } as u16,
        ));
    // SAFETY: all-zero bytes are a valid `bpf_sock_tuple` (integers only).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (transport, size) = if protocol == ETH_P_IP {
        let header = load::<20>(ctx.skb.skb, 0)?;
        // A fragment after the first carries no ports.
        if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
            return None;
        }
        let ports = load::<4>(ctx.skb.skb, u32::from(header[0] & 0x0f) * 4)?;
        // SAFETY: writing the IPv4 form of a local union; the bytes stay in network order.
        unsafe {
            let v4 = &mut tuple.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]);
            v4.daddr = u32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
            v4.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            v4.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        }
        (header[9], TUPLE_V4)
    } else if protocol == ETH_P_IPV6 {
        let header = load::<40>(ctx.skb.skb, 0)?;
        let ports = load::<4>(ctx.skb.skb, 40)?;
        // SAFETY: writing the IPv6 form of a local union; the bytes stay in network order.
        unsafe {
            let v6 = &mut tuple.__bindgen_anon_1.ipv6;
            let mut i = 0;
            while i < 4 {
                let s = 8 + 4 * i;
                let d = 24 + 4 * i;
                v6.saddr[i] =
                    u32::from_ne_bytes([header[s], header[s + 1], header[s + 2], header[s + 3]]);
                v6.daddr[i] =
                    u32::from_ne_bytes([header[d], header[d + 1], header[d + 2], header[d + 3]]);
                i += 1;
            }
            v6.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            v6.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        }
        (header[6], TUPLE_V6)
    } else {
        return None;
    };
    let context = ctx.skb.skb.cast();
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: the tuple is a local of the size given; the socket the lookup returns (a
    // reference) is released below on every path.
    unsafe {
        let sock = match transport {
            IPPROTO_TCP => bpf_sk_lookup_tcp(context, &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(context, &mut tuple, size, netns, 0),
            _ => return None,
        };
        if sock.is_null() {
            return None;
        }
        let socket = identity(sock);
        bpf_sk_release(sock.cast());
        Some(socket)
    }
}
