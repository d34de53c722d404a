//! `link`: which of the run's links a packet or a socket belongs to, by its remote address.
//!
//! Link 0 is the run's own limits; `--link` gives destinations links of their own (1 and up),
//! which user space writes into the `LINK_OF` trie as prefixes. A packet's remote address is its
//! destination on the way out and its source on the way in; a socket's is its peer's.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_hdr_start_off::BPF_HDR_START_NET},
    helpers::bpf_skb_load_bytes_relative,
    macros::map,
    maps::{lpm_trie::Key, LpmTrie},
    programs::SockOpsContext,
};
use nbt_common::shaper::{ipv4_mapped, LinkAddress, MAX_LINKS};

#[map(name = "LINK_OF")]
static LINK_OF: LpmTrie<LinkAddress, u32> = LpmTrie::with_max_entries(4096, 1); // BPF_F_NO_PREALLOC

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Where the remote address is, as seen from the run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// An outgoing packet's.
    Destination,
    /// An arriving packet's.
    Source,
}

/// The link of an address; 0 (the run's own) for one that no link names.
#[inline(always)]
fn link_of(address: LinkAddress) -> u32 {
    match LINK_OF.get(Key::new(128, address)) {
        // A bounds check the verifier can see, for the map index that follows.
        Some(&link) if link < MAX_LINKS => link,
        _ => 0,
    }
}

/// The link of a packet (cgroup_skb or tc: both read from the network header on). 0 for a
/// packet that is neither IPv4 nor IPv6, or whose header cannot be read.
#[inline(always)]
pub fn of_packet(skb: *mut __sk_buff, remote: Remote) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let protocol = u32::from(u16::from_be(unsafe { (*skb).protocol } as u16));
    let address = match protocol {
        ETH_P_IP => {
            let offset = if remote == Remote::Destination {
                16
            } else {
                12
            };
            match load::<4>(skb, offset) {
                Some(v4) => ipv4_mapped(v4),
                None => return 0,
            }
        }
        ETH_P_IPV6 => {
            let offset = if remote == Remote::Destination { 24 } else { 8 };
            match load::<16>(skb, offset) {
                Some(v6) => v6,
                None => return 0,
            }
        }
        _ => return 0,
    };
    link_of(address)
}

/// The link of a TCP socket (sock_ops), by its peer's address.
#[inline(always)]
pub fn of_socket(ctx: &SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // The verifier takes context fields only as loads at their own offsets, never through a
    // pointer moved past the start: every field is read once, up front, before any branch (read
    // in the branches, the compiler shared one load between them through a moved pointer). The
    // addresses are kept in network order, so their bytes in memory are the address's.
    // SAFETY: reads of fields of the context the kernel handed us.
    let (family, v4, v6) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
        )
    };
    let address = match family {
        AF_INET => ipv4_mapped(v4.to_ne_bytes()),
        AF_INET6 => {
            let mut address = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let bytes = v6[i].to_ne_bytes();
                address[4 * i] = bytes[0];
                address[4 * i + 1] = bytes[1];
                address[4 * i + 2] = bytes[2];
                address[4 * i + 3] = bytes[3];
                i += 1;
            }
            address
        }
        _ => return 0,
    };
    link_of(address)
}

/// `N` bytes at `offset` from the network header, for the cgroup_skb and tc programs alike.
#[inline(always)]
pub fn load<const N: usize>(skb: *mut __sk_buff, offset: u32) -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    // SAFETY: the helper writes at most N bytes into `bytes`, a local.
    let read = unsafe {
        bpf_skb_load_bytes_relative(
            skb.cast(),
            offset,
            bytes.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    (read == 0).then_some(bytes)
}
