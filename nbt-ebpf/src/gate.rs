//! `gate`: traffic to gated destinations is charged per call, and a call the balance cannot pay
//! is refused, on every path out. A call is:
//!   - a new TCP connection (connect4/connect6: charged, or EPERM at once);
//!   - a new request on an open TCP connection: payload sent after the connection received
//!     payload, or after it was idle for `call_gap_ns` (`request.rs`); refused, the packet is
//!     dropped, nothing with payload leaves that connection again, and nbt tears it down;
//!   - a datagram, and any packet of a socket that is not TCP (UDP, raw): charged at egress,
//!     or dropped, which hands the sender EPERM at once.
//! The first request of a connection is the call its connect() paid for. TCP packets without
//! payload (SYN, ACK, FIN, RST) are never charged nor dropped: they carry no request, and an
//! ACK dropped would only stall a reply already paid for.
//!
//! sendmsg4/sendmsg6 and a UDP connect() only check that the balance could pay a call: they
//! refuse early, with the caller's pid, and the datagrams are charged at egress.
//!
//! With a price per byte, each packet with payload is charged its whole IP length, and refused
//! when the balance cannot pay it: the balance does not go below zero through calls or bytes
//! (but for payments racing on other CPUs, `ledger.rs`). Time charges, made by nbt, can.
//!
//! An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it carries.

mod ledger;
mod packet;
mod request;

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie, PerfEventArray},
    programs::{SkBuffContext, SockAddrContext},
    EbpfContext,
};
use nbt_common::gate::{
    BlockedEvent, Conn, GateConfig, V4Key, V6Key, BLOCKED_CONNECT, BLOCKED_EGRESS, BLOCKED_SENDMSG,
    CONN_PREPAID,
};

use self::ledger::Payment;
use self::packet::{Dest, Packet};

#[map(name = "GATE_V4")]
static GATE_V4: LpmTrie<V4Key, u32> = LpmTrie::with_max_entries(1024, 1); // BPF_F_NO_PREALLOC
#[map(name = "GATE_V6")]
static GATE_V6: LpmTrie<V6Key, u32> = LpmTrie::with_max_entries(1024, 1);
#[map(name = "GATE_CONFIG")]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);
#[map(name = "GATE_EVENTS")]
static GATE_EVENTS: PerfEventArray<BlockedEvent> = PerfEventArray::new(0);

const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn gate_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, packet::v4_dest(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn gate_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, packet::v6_dest(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn gate_sendmsg4(ctx: SockAddrContext) -> i32 {
    admit_datagram(&ctx, packet::v4_dest(&ctx), BLOCKED_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn gate_sendmsg6(ctx: SockAddrContext) -> i32 {
    admit_datagram(&ctx, packet::v6_dest(&ctx), BLOCKED_SENDMSG)
}

#[cgroup_skb(egress)]
pub fn gate_egress(ctx: SkBuffContext) -> i32 {
    let Some(packet) = packet::parse(&ctx) else {
        return 1;
    };
    let Some(config) = gate_for(&packet.dest) else {
        return 1;
    };
    if packet.tcp.is_tcp {
        if packet.tcp.payload == 0 {
            return 1;
        }
        if let Some(verdict) = request::egress(&ctx, config, &packet) {
            return verdict;
        }
    }
    datagram(&ctx, config, &packet)
}

/// The gate's configuration when the gate is on and `dest` is gated.
fn gate_for(dest: &Dest) -> Option<&'static GateConfig> {
    let config = GATE_CONFIG.get(0)?;
    (config.enabled != 0 && gated(config, dest)).then_some(config)
}

/// connect(): a TCP connection is a call, charged now; its first request is that call. A UDP
/// connect() sends nothing, so it only checks that a datagram could be paid.
fn connect(ctx: &SockAddrContext, dest: Dest) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type != SOCK_STREAM {
        return admit_datagram(ctx, dest, BLOCKED_CONNECT);
    }
    let Some(config) = gate_for(&dest) else {
        return 1;
    };
    match ledger::pay(config.price_call_pico, 0) {
        Payment::Paid => {
            ledger::count_call(&dest);
            // SAFETY: the helper reads the cookie of the socket in the context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let conn = Conn {
                flags: CONN_PREPAID,
                ..Conn::default()
            };
            // Full map: the first request is charged again, never let through unpaid.
            let _ = request::GATE_CONNS.insert(&cookie, &conn, 0);
            1
        }
        Payment::Refused(balance) => {
            ledger::count_refused_call(&dest);
            report_caller(ctx, &dest, BLOCKED_CONNECT, balance);
            0
        }
    }
}

/// sendmsg() of an unconnected datagram, or connect() of a UDP socket: refused with EPERM when
/// the balance could not pay a call; otherwise passed uncharged (egress charges the datagram).
fn admit_datagram(ctx: &SockAddrContext, dest: Dest, kind: u32) -> i32 {
    let Some(config) = gate_for(&dest) else {
        return 1;
    };
    match ledger::could_pay(config.price_call_pico) {
        Ok(()) => 1,
        Err(balance) => {
            ledger::count_refused_call(&dest);
            report_caller(ctx, &dest, kind, balance);
            0
        }
    }
}

/// A packet of a socket that is not TCP (UDP, raw, ICMP), or TCP payload from a raw socket:
/// each one is a call, charged with its bytes, or dropped (EPERM to the sender).
fn datagram(ctx: &SkBuffContext, config: &GateConfig, packet: &Packet) -> i32 {
    let bytes = u64::from(ctx.len());
    // No overflow: bytes < 2^32, and prices per byte are at most 10^9 pico-units (10^6 a GB).
    let byte_cost = bytes.wrapping_mul(config.price_egress_pico_per_byte);
    match ledger::pay(config.price_call_pico, byte_cost) {
        Payment::Paid => {
            ledger::count_call(&packet.dest);
            ledger::count_bytes(bytes);
            1
        }
        Payment::Refused(balance) => {
            ledger::count_refused_call(&packet.dest);
            report(ctx, &packet.dest, BLOCKED_EGRESS, balance, 0, [0; 16]);
            0
        }
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

/// A refusal in process context: with the caller's pid and command.
fn report_caller(ctx: &SockAddrContext, dest: &Dest, kind: u32, balance: i64) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    report(ctx, dest, kind, balance, pid, comm);
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
