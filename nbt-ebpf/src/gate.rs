//! `gate`: traffic to gated destinations is charged, and refused once the money is gone, on
//! every path out:
//!   connect4/connect6  a new connection needs a balance above zero, else connect() fails with
//!                      EPERM (return 0); it is charged the call price;
//!   sendmsg4/sendmsg6  the same for each unconnected datagram;
//!   cgroup_skb egress  packets (of connections opened before, connected UDP, raw sockets) pass
//!                      while the balance is not negative and are charged the egress price; once
//!                      it is negative they are dropped (EPERM to the sender).
//! So the call that spends the last of the balance still gets its packets out, the next call is
//! refused, and a connection kept open is cut off as soon as its traffic, or time, or other
//! calls, push the balance below zero.
//! An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it carries.
//!
//! Overdraft is bounded: each program reads the balance, and charges with an atomic add only
//! after it passed, so once the balance reaches zero at most one call or packet per CPU (those
//! that read it just before) still gets through.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie, PerfEventArray},
    programs::{SkBuffContext, SockAddrContext},
    EbpfContext,
};
use nbt_common::gate::{
    BlockedEvent, GateConfig, KernelLedger, V4Key, V6Key, BLOCKED_CONNECT, BLOCKED_EGRESS,
    BLOCKED_SENDMSG, CREDIT, TIME_DEBIT,
};

use crate::atomic_add;

#[map(name = "GATE_V4")]
static GATE_V4: LpmTrie<V4Key, u32> = LpmTrie::with_max_entries(1024, 1); // BPF_F_NO_PREALLOC
#[map(name = "GATE_V6")]
static GATE_V6: LpmTrie<V6Key, u32> = LpmTrie::with_max_entries(1024, 1);
#[map(name = "GATE_CONFIG")]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);
#[map(name = "KERNEL_LEDGER")]
static KERNEL_LEDGER: Array<KernelLedger> = Array::with_max_entries(1, 0);
#[map(name = "USER_LEDGER")]
static USER_LEDGER: Array<i64> = Array::with_max_entries(2, 0);
#[map(name = "GATE_EVENTS")]
static GATE_EVENTS: PerfEventArray<BlockedEvent> = PerfEventArray::new(0);

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A destination as the gate judges it: IPv4 (mapped ones included) or IPv6, port in network
/// order. A plain struct, every field always written: the verifier refuses code that reads a
/// register an enum's unused variant left unset.
struct Dest {
    v4: bool,
    /// IPv4 in the first 4 bytes.
    addr: [u8; 16],
    port: [u8; 2],
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

#[cgroup_sock_addr(connect4)]
pub fn gate_connect4(ctx: SockAddrContext) -> i32 {
    call(&ctx, v4_dest(&ctx), BLOCKED_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn gate_connect6(ctx: SockAddrContext) -> i32 {
    call(&ctx, v6_dest(&ctx), BLOCKED_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn gate_sendmsg4(ctx: SockAddrContext) -> i32 {
    call(&ctx, v4_dest(&ctx), BLOCKED_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn gate_sendmsg6(ctx: SockAddrContext) -> i32 {
    call(&ctx, v6_dest(&ctx), BLOCKED_SENDMSG)
}

#[cgroup_skb(egress)]
pub fn gate_egress(ctx: SkBuffContext) -> i32 {
    let Some(config) = GATE_CONFIG.get(0) else {
        return 1;
    };
    if config.enabled == 0 {
        return 1;
    }
    let Some(dest) = packet_dest(&ctx) else {
        return 1;
    };
    if !gated(config, &dest) {
        return 1;
    }
    let Some(ledger) = KERNEL_LEDGER.get_ptr_mut(0) else {
        return 1;
    };
    let balance = balance();
    // SAFETY: `ledger` points into the map value for this program run.
    unsafe {
        if balance < 0 {
            atomic_add(&mut (*ledger).blocked_packets, 1);
            report(&ctx, &dest, BLOCKED_EGRESS, balance, 0, [0; 16]);
            return 0;
        }
        let bytes = u64::from(ctx.len());
        atomic_add(&mut (*ledger).egress_bytes, bytes);
        atomic_add(
            &mut (*ledger).egress_debit_pico,
            bytes * config.price_egress_pico_per_byte,
        );
    }
    1
}

fn v4_dest(ctx: &SockAddrContext) -> Dest {
    // SAFETY: reading fields of the context the kernel handed us.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // Both are in network byte order; the port in the low 16 bits.
    Dest::v4(ip.to_ne_bytes(), (port as u16).to_ne_bytes())
}

fn v6_dest(ctx: &SockAddrContext) -> Dest {
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

/// Destination of an outgoing IP packet (cgroup_skb data starts at the network header).
fn packet_dest(ctx: &SkBuffContext) -> Option<Dest> {
    match u32::from(u16::from_be(ctx.skb.protocol() as u16)) {
        ETH_P_IP => {
            let ihl = usize::from(ctx.load::<u8>(0).ok()? & 0x0f) * 4;
            let protocol = ctx.load::<u8>(9).ok()?;
            let addr = ctx.load::<[u8; 4]>(16).ok()?;
            Some(Dest::v4(addr, transport_port(ctx, protocol, ihl)))
        }
        ETH_P_IPV6 => {
            let protocol = ctx.load::<u8>(6).ok()?;
            let addr = ctx.load::<[u8; 16]>(24).ok()?;
            Some(mapped_or_v6(addr, transport_port(ctx, protocol, 40)))
        }
        _ => None,
    }
}

/// The destination port of a TCP or UDP packet, in network order; 0 for other protocols.
fn transport_port(ctx: &SkBuffContext, protocol: u8, offset: usize) -> [u8; 2] {
    if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        ctx.load::<[u8; 2]>(offset + 2).unwrap_or([0; 2])
    } else {
        [0; 2]
    }
}

fn gated(config: &GateConfig, dest: &Dest) -> bool {
    let (addr, port) = (&dest.addr, dest.port);
    if dest.v4 {
        let ip = [addr[0], addr[1], addr[2], addr[3]];
        let listed = GATE_V4
            .get(Key::new(48, V4Key { port, addr: ip }))
            .is_some()
            || GATE_V4
                .get(Key::new(
                    48,
                    V4Key {
                        port: [0; 2],
                        addr: ip,
                    },
                ))
                .is_some();
        listed || (config.all != 0 && ip[0] != 127)
    } else {
        let listed = GATE_V6
            .get(Key::new(144, V6Key { port, addr: *addr }))
            .is_some()
            || GATE_V6
                .get(Key::new(
                    144,
                    V6Key {
                        port: [0; 2],
                        addr: *addr,
                    },
                ))
                .is_some();
        let loopback = addr[..15] == [0; 15] && addr[15] == 1;
        listed || (config.all != 0 && !loopback)
    }
}

fn balance() -> i64 {
    let credit = USER_LEDGER.get(CREDIT).copied().unwrap_or(0);
    let time_debit = USER_LEDGER.get(TIME_DEBIT).copied().unwrap_or(0);
    let (calls, egress) = match KERNEL_LEDGER.get_ptr(0) {
        // SAFETY: a map value pointer valid for this program run; plain reads of words that
        // other CPUs add to atomically.
        Some(l) => unsafe {
            (
                core::ptr::read_volatile(&(*l).call_debit_pico),
                core::ptr::read_volatile(&(*l).egress_debit_pico),
            )
        },
        None => (0, 0),
    };
    credit - time_debit - calls as i64 - egress as i64
}

/// connect() or sendmsg() to `dest`: 1 lets it through (charged), 0 refuses it with EPERM.
fn call(ctx: &SockAddrContext, dest: Dest, kind: u32) -> i32 {
    let Some(config) = GATE_CONFIG.get(0) else {
        return 1;
    };
    if config.enabled == 0 || !gated(config, &dest) {
        return 1;
    }
    let Some(ledger) = KERNEL_LEDGER.get_ptr_mut(0) else {
        return 1;
    };
    let balance = balance();
    // SAFETY: `ledger` points into the map value for this program run.
    unsafe {
        if balance <= 0 {
            atomic_add(&mut (*ledger).blocked_calls, 1);
            let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            let comm = bpf_get_current_comm().unwrap_or([0; 16]);
            report(ctx, &dest, kind, balance, pid, comm);
            return 0;
        }
        atomic_add(&mut (*ledger).calls, 1);
        atomic_add(&mut (*ledger).call_debit_pico, config.price_call_pico);
    }
    1
}

fn report<C: EbpfContext>(ctx: &C, dest: &Dest, kind: u32, balance: i64, pid: u32, comm: [u8; 16]) {
    let mut event = BlockedEvent {
        balance_pico: balance,
        pid,
        kind,
        comm,
        ..BlockedEvent::default()
    };
    event.family = if dest.v4 { 4 } else { 6 };
    event.addr = dest.addr;
    event.port = u32::from(u16::from_be_bytes(dest.port));
    GATE_EVENTS.output(ctx, event, 0);
}
