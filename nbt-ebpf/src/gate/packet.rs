//! Where a packet or a call goes, as the gate judges it.
//!
//! Structs here are plain, every field always written: the verifier refuses code that reads a
//! register an enum's unused variant left unset, so there is no `Option` inside them.

use aya_ebpf::programs::{SkBuffContext, SockAddrContext};

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
// IPv6 extension headers that may sit between the fixed header and TCP or UDP.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up (the transport is then unknown, its port 0).
const IPV6_MAX_EXTENSIONS: usize = 4;

/// IPv4 (mapped ones included) or IPv6, port in network order.
pub struct Dest {
    pub v4: bool,
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub port: [u8; 2],
}

impl Dest {
    fn v4(addr: [u8; 4], port: [u8; 2]) -> Dest {
        let mut full = [0u8; 16];
        full[..4].copy_from_slice(&addr);
        Dest {
            v4: true,
            addr: full,
            port,
        }
    }
}

/// What the TCP header says; `payload` 0 and `is_tcp` false for other packets.
pub struct Tcp {
    pub is_tcp: bool,
    pub seq: u32,
    /// Bytes after the TCP header.
    pub payload: u64,
}

/// An outgoing IP packet: where from, where to, and its TCP header if it has one.
pub struct Packet {
    pub dest: Dest,
    /// The local address (IPv4 in the first 4 bytes) and port.
    pub src: [u8; 16],
    pub src_port: [u8; 2],
    pub tcp: Tcp,
}

pub fn v4_dest(ctx: &SockAddrContext) -> Dest {
    // SAFETY: reading fields of the context the kernel handed us.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // Both are in network byte order; the port in the low 16 bits.
    Dest::v4(ip.to_ne_bytes(), (port as u16).to_ne_bytes())
}

pub fn v6_dest(ctx: &SockAddrContext) -> Dest {
    // SAFETY: reading fields of the context the kernel handed us.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip6, (*ctx.sock_addr).user_port) };
    let port = (port as u16).to_ne_bytes();
    let mut addr = [0u8; 16];
    for (i, word) in ip.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    mapped_or_v6(addr, port)
}

/// ::ffff:a.b.c.d is the IPv4 address a.b.c.d.
fn mapped_or_v6(addr: [u8; 16], port: [u8; 2]) -> Dest {
    if addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff {
        Dest::v4([addr[12], addr[13], addr[14], addr[15]], port)
    } else {
        Dest {
            v4: false,
            addr,
            port,
        }
    }
}

/// An outgoing IP packet (cgroup_skb data starts at the network header); `None` for other
/// protocols (ARP never reaches a cgroup hook).
pub fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    match u32::from(u16::from_be(ctx.skb.protocol() as u16)) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => None,
    }
}

fn parse_v4(ctx: &SkBuffContext) -> Option<Packet> {
    let ihl = usize::from(ctx.load::<u8>(0).ok()? & 0x0f) * 4;
    let fragment = u16::from_be_bytes(ctx.load::<[u8; 2]>(6).ok()?);
    let protocol = ctx.load::<u8>(9).ok()?;
    let src4 = ctx.load::<[u8; 4]>(12).ok()?;
    let dst4 = ctx.load::<[u8; 4]>(16).ok()?;
    // A fragment other than the first carries no transport header: its port is unknown (0),
    // and its datagram cannot be put together without the first, which is judged by its port.
    let transport = if fragment & 0x1fff == 0 { protocol } else { 0 };
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&src4);
    Some(with_transport(
        ctx,
        Dest::v4(dst4, [0; 2]),
        src,
        transport,
        ihl,
    ))
}

fn parse_v6(ctx: &SkBuffContext) -> Option<Packet> {
    let mut next = ctx.load::<u8>(6).ok()?;
    let src = ctx.load::<[u8; 16]>(8).ok()?;
    let dst = ctx.load::<[u8; 16]>(24).ok()?;
    let mut offset = 40usize;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let header = ctx.load::<[u8; 2]>(offset).ok()?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let header = ctx.load::<[u8; 4]>(offset).ok()?;
                let fragment_offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
                next = if fragment_offset == 0 { header[0] } else { 0 };
                offset += 8;
            }
            _ => break,
        }
    }
    let dest = mapped_or_v6(dst, [0; 2]);
    let src = if dest.v4 {
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&src[12..16]);
        s
    } else {
        src
    };
    Some(with_transport(ctx, dest, src, next, offset))
}

/// Fills in the ports and the TCP header of the transport at `offset`.
fn with_transport(
    ctx: &SkBuffContext,
    dest: Dest,
    src: [u8; 16],
    protocol: u8,
    offset: usize,
) -> Packet {
    let mut packet = Packet {
        dest,
        src,
        src_port: [0; 2],
        tcp: Tcp {
            is_tcp: false,
            seq: 0,
            payload: 0,
        },
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return packet;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(offset) else {
        return packet;
    };
    packet.src_port = [ports[0], ports[1]];
    packet.dest.port = [ports[2], ports[3]];
    if protocol == IPPROTO_TCP {
        let seq = ctx.load::<[u8; 4]>(offset + 4).map(u32::from_be_bytes);
        let data_offset = ctx.load::<u8>(offset + 12).map(|b| usize::from(b >> 4) * 4);
        if let (Ok(seq), Ok(header)) = (seq, data_offset) {
            let len = ctx.len() as usize;
            packet.tcp = Tcp {
                is_tcp: true,
                seq,
                payload: len.saturating_sub(offset + header) as u64,
            };
        }
    }
    packet
}
