//! `gate`: the simulated balance and the destinations it gates, as the kernel programs of
//! `nbt-ebpf/src/gate.rs` see them.
//!
//! Money is counted in pico-units (10^-12 of the currency) as i64/u64: the smallest egress price,
//! 0.001 per GB, is 1 pico-unit per byte; the largest balance is about 9.2 million units.
//! The balance is never one word that two sides write: user space owns the credits (the starting
//! balance plus top-ups, and the time charges), the kernel owns the debits, which it adds
//! atomically. balance = credit - time_debit - call_debit - egress_debit.

/// LPM trie of [`V4Key`] → 1: gated IPv4 destinations.
pub const GATE_V4_MAP: &str = "GATE_V4";
/// LPM trie of [`V6Key`] → 1: gated IPv6 destinations.
pub const GATE_V6_MAP: &str = "GATE_V6";
/// Array of one [`GateConfig`].
pub const GATE_CONFIG_MAP: &str = "GATE_CONFIG";
/// Array of one [`KernelLedger`]: the kernel's debits and counts.
pub const KERNEL_LEDGER_MAP: &str = "KERNEL_LEDGER";
/// Array of two i64 written by user space: [`CREDIT`] and [`TIME_DEBIT`].
pub const USER_LEDGER_MAP: &str = "USER_LEDGER";
/// Perf event array of [`BlockedEvent`].
pub const GATE_EVENTS_MAP: &str = "GATE_EVENTS";
/// LRU hash of socket cookie → [`Conn`]: where each TCP connection to a gated destination is
/// in its exchange of requests and replies.
pub const GATE_CONNS_MAP: &str = "GATE_CONNS";
/// Hash of [`DestKey`] → [`DestCounts`]: calls charged and refused per destination.
pub const GATE_BY_DEST_MAP: &str = "GATE_BY_DEST";
/// Ring buffer of [`Teardown`]: connections whose request the balance could not pay, for nbt
/// to tear down.
pub const GATE_TEARDOWN_MAP: &str = "GATE_TEARDOWN";

pub const CREDIT: u32 = 0;
pub const TIME_DEBIT: u32 = 1;

pub const PICO_PER_UNIT: i64 = 1_000_000_000_000;

/// Trie keys put the port first, so that one trie holds both "any port" rules (stored with port
/// 0) and "this port" rules: a lookup tries the packet's port, then port 0. A rule for CIDR
/// `a/n` with a port has prefix length 16 + n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Key {
    /// Network byte order.
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Key {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// 1: the gate is on (a balance was given).
    pub enabled: u32,
    /// 1: every destination but loopback is gated (`--gate all`).
    pub all: u32,
    pub price_call_pico: u64,
    pub price_egress_pico_per_byte: u64,
    /// Payload sent on a TCP connection after it was idle this long (everything sent was
    /// acknowledged, nothing was received) starts a new call (`--call-gap`).
    pub call_gap_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLedger {
    pub call_debit_pico: u64,
    pub egress_debit_pico: u64,
    /// Calls charged: new connections, requests on open connections, datagrams.
    pub calls: u64,
    /// Bytes (whole IP packets that carry payload) charged to gated destinations.
    pub egress_bytes: u64,
    /// Calls refused: connect() and sendmsg() with EPERM, datagrams dropped, and requests on
    /// open connections that the balance could not pay.
    pub blocked_calls: u64,
    /// Packets with payload dropped: a refused request and whatever its connection sent after.
    pub blocked_packets: u64,
    /// Of `calls`, the requests charged on connections that were already open.
    pub requests: u64,
    /// Of `blocked_calls`, requests refused on open connections (each one's connection is then
    /// torn down).
    pub refused_requests: u64,
}

/// A TCP connection's state, kept by socket cookie. Its first request is paid by connect().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// The connection's `bytes_received` when it last sent new payload.
    pub received_mark: u64,
    /// When it last sent new payload (bpf_ktime_get_ns).
    pub last_send_ns: u64,
    /// [`CONN_PREPAID`], [`CONN_REFUSED`].
    pub flags: u32,
    pub _pad: u32,
}

/// connect() charged the call; the first payload it sends is that call.
pub const CONN_PREPAID: u32 = 1;
/// A request the balance could not pay: nothing with payload leaves any more; nbt tears the
/// connection down.
pub const CONN_REFUSED: u32 = 2;

/// A destination as counted per destination. IPv4 (mapped ones included) in the first 4 bytes
/// of `addr`. `family` 0 is the bucket for destinations past the map's capacity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    /// 4, 6, or 0 for "other destinations".
    pub family: u32,
    /// Host byte order; 0 for protocols without ports.
    pub port: u32,
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestCounts {
    pub calls: u64,
    pub refused: u64,
}

/// Destinations counted one by one; the rest share the [`DestKey`] with family 0.
pub const MAX_DESTINATIONS: u32 = 4096;

/// A connection to tear down: the TCP 4-tuple as the packet carried it, and the socket's cookie
/// (sock_diag checks it, so a new connection that reused the tuple is never hit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    pub cookie: u64,
    /// 4 or 6.
    pub family: u32,
    /// Network byte order, the local port then the remote one.
    pub ports: [[u8; 2]; 2],
    /// Local address; IPv4 in the first 4 bytes.
    pub src: [u8; 16],
    /// Remote address; IPv4 in the first 4 bytes.
    pub dst: [u8; 16],
}

pub const BLOCKED_CONNECT: u32 = 1;
pub const BLOCKED_SENDMSG: u32 = 2;
pub const BLOCKED_EGRESS: u32 = 3;
/// A request on an open TCP connection that the balance could not pay.
pub const BLOCKED_REQUEST: u32 = 4;

/// One refused call or dropped packet, for nbt's log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedEvent {
    pub balance_pico: i64,
    pub pid: u32,
    /// `BLOCKED_CONNECT`, `BLOCKED_SENDMSG`, `BLOCKED_EGRESS` or `BLOCKED_REQUEST`.
    pub kind: u32,
    /// 4 or 6.
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: V4Key is #[repr(C)], two byte arrays (alignment 1), with no padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for V4Key {}
    // SAFETY: V6Key is #[repr(C)], two byte arrays (alignment 1), with no padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for V6Key {}
    // SAFETY: GateConfig is #[repr(C)], two u32s then three u64s, with no padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for GateConfig {}
    // SAFETY: KernelLedger is #[repr(C)], eight u64s, with no padding: every bit pattern is a
    // valid value.
    unsafe impl aya::Pod for KernelLedger {}
    // SAFETY: Conn is #[repr(C)], two u64s and two u32s, with no padding.
    unsafe impl aya::Pod for Conn {}
    // SAFETY: DestKey is #[repr(C)], two u32s and a 16-byte array, with no padding.
    unsafe impl aya::Pod for DestKey {}
    // SAFETY: DestCounts is #[repr(C)], two u64s.
    unsafe impl aya::Pod for DestCounts {}
    // SAFETY: Teardown is #[repr(C)]: a u64, a u32, 4 bytes of ports, two 16-byte arrays (48
    // bytes, a multiple of 8), with no padding.
    unsafe impl aya::Pod for Teardown {}
    // SAFETY: BlockedEvent is #[repr(C)], made only of integers (an i64, four u32s, two 16-byte
    // arrays: 56 bytes, a multiple of its alignment 8), with no padding: every bit pattern is a
    // valid value.
    unsafe impl aya::Pod for BlockedEvent {}
}
