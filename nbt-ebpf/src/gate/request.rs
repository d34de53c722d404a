//! Requests on open TCP connections: each new one is a call.
//!
//! A connection sends a new request when it sends new payload (not a retransmission: the
//! segment starts at `snd_nxt`) and either
//!   - it received payload since it last sent new payload (the reply to the last request came,
//!     or began to), or
//!   - everything it sent was acknowledged and it sent nothing for the call gap.
//! `bytes_received` is TCP's own count of payload received in order, read through
//! `bpf_tcp_sock`; the connection's last mark of it is kept here by socket cookie.
//!
//! A request the balance cannot pay is dropped, and so is every later packet with payload of
//! its connection; the connection goes on the teardown ring for nbt, which destroys the socket
//! (the client sees ECONNABORTED). Dropping alone would leave it retransmitting for minutes.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_tcp_sock},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_tcp_sock},
    macros::map,
    maps::{LruHashMap, RingBuf},
    programs::SkBuffContext,
    EbpfContext,
};
use nbt_common::gate::{Conn, GateConfig, Teardown, BLOCKED_REQUEST, CONN_PREPAID, CONN_REFUSED};

use super::ledger::{self, Payment};
use super::packet::{Packet, IPPROTO_TCP};
use super::SOCK_STREAM;

/// Connections in flight at once, more than a run's workload keeps to gated destinations; when
/// full, the oldest are forgotten and their next request is charged again (never passed free).
#[map(name = "GATE_CONNS")]
pub static GATE_CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(16384, 0);
#[map(name = "GATE_TEARDOWN")]
static GATE_TEARDOWN: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

/// The TCP socket of the packet; `None` for other sockets, a raw one's TCP packets included.
fn tcp_sock(ctx: &SkBuffContext) -> Option<*mut bpf_tcp_sock> {
    // SAFETY: reading the packet's socket pointer from the context; the helpers check it.
    unsafe {
        let sk: *mut bpf_sock = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null()
            || (*full).type_ != SOCK_STREAM
            || (*full).protocol != u32::from(IPPROTO_TCP)
        {
            return None;
        }
        let tcp = bpf_tcp_sock(full);
        (!tcp.is_null()).then_some(tcp)
    }
}

/// A packet with payload to a gated destination: its verdict, or `None` when its socket is not
/// TCP (the caller judges it as a datagram).
pub fn egress(ctx: &SkBuffContext, config: &GateConfig, packet: &Packet) -> Option<i32> {
    let sock = tcp_sock(ctx)?;
    // SAFETY: the helper reads the cookie of the packet's socket; `sock` was checked above.
    let (cookie, snd_nxt, snd_una, received, now) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            (*sock).snd_nxt,
            (*sock).snd_una,
            (*sock).bytes_received,
            bpf_ktime_get_ns(),
        )
    };
    let entry = GATE_CONNS.get_ptr_mut(&cookie);
    // SAFETY: a map value pointer valid for this program run.
    let conn = entry.map(|c| unsafe { *c }).unwrap_or_default();
    if conn.flags & CONN_REFUSED != 0 {
        return Some(drop_and_tear_down(packet, cookie));
    }
    let new_data = packet.tcp.seq == snd_nxt;
    let starts_call = new_data
        && match entry {
            // Opened before the gate knew it (e.g. its address was gated later).
            None => true,
            Some(_) => {
                let replied = received != conn.received_mark;
                let idle =
                    snd_una == snd_nxt && now.wrapping_sub(conn.last_send_ns) >= config.call_gap_ns;
                conn.flags & CONN_PREPAID == 0 && (replied || idle)
            }
        };
    let bytes = u64::from(ctx.len());
    // No overflow: bytes < 2^32, and prices per byte are at most 10^9 pico-units (10^6 a GB).
    let byte_cost = bytes.wrapping_mul(config.price_egress_pico_per_byte);
    let payment = match (starts_call, byte_cost) {
        (true, _) => ledger::pay(config.price_call_pico, byte_cost),
        (false, 0) => Payment::Paid,
        (false, _) => ledger::pay(0, byte_cost),
    };
    match payment {
        Payment::Paid => {
            if starts_call {
                ledger::count_call(&packet.dest);
                ledger::count_request();
            }
            ledger::count_bytes(bytes);
            if new_data {
                let next = Conn {
                    received_mark: received,
                    last_send_ns: now,
                    flags: conn.flags & !CONN_PREPAID,
                    _pad: 0,
                };
                remember(entry, cookie, next);
            }
            Some(1)
        }
        Payment::Refused(balance) => {
            if starts_call {
                ledger::count_refused_call(&packet.dest);
                ledger::count_refused_request();
            }
            let refused = Conn {
                flags: conn.flags | CONN_REFUSED,
                ..conn
            };
            remember(entry, cookie, refused);
            super::report(ctx, &packet.dest, BLOCKED_REQUEST, balance, 0, [0; 16]);
            Some(drop_and_tear_down(packet, cookie))
        }
    }
}

fn remember(entry: Option<*mut Conn>, cookie: u64, conn: Conn) {
    match entry {
        // SAFETY: a map value pointer valid for this program run; the socket's packets are
        // sent one at a time (under its lock), so no other program writes this entry meanwhile.
        Some(slot) => unsafe { *slot = conn },
        None => {
            let _ = GATE_CONNS.insert(&cookie, &conn, 0);
        }
    }
}

/// Drops a packet of a refused connection and asks nbt to tear the connection down (again, if
/// it is still there: nbt ignores a socket already gone).
fn drop_and_tear_down(packet: &Packet, cookie: u64) -> i32 {
    ledger::count_dropped_packet();
    let teardown = Teardown {
        cookie,
        family: if packet.dest.v4 { 4 } else { 6 },
        ports: [packet.src_port, packet.dest.port],
        src: packet.src,
        dst: packet.dest.addr,
    };
    let _ = GATE_TEARDOWN.output::<Teardown>(&teardown, 0);
    0
}
