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
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLedger {
    pub call_debit_pico: u64,
    pub egress_debit_pico: u64,
    /// Connections and datagrams to gated destinations that passed (and were charged).
    pub calls: u64,
    /// Bytes (IP packets) sent to gated destinations while the gate was open.
    pub egress_bytes: u64,
    /// connect() and sendmsg() refused with EPERM.
    pub blocked_calls: u64,
    /// Packets of open connections dropped at egress.
    pub blocked_packets: u64,
}

pub const BLOCKED_CONNECT: u32 = 1;
pub const BLOCKED_SENDMSG: u32 = 2;
pub const BLOCKED_EGRESS: u32 = 3;

/// One refused call or dropped packet, for nbt's log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedEvent {
    pub balance_pico: i64,
    pub pid: u32,
    /// `BLOCKED_CONNECT`, `BLOCKED_SENDMSG` or `BLOCKED_EGRESS`.
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
    // SAFETY: GateConfig is #[repr(C)], two u32s then two u64s, with no padding: every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for GateConfig {}
    // SAFETY: KernelLedger is #[repr(C)], six u64s, with no padding: every bit pattern is a valid
    // value.
    unsafe impl aya::Pod for KernelLedger {}
    // SAFETY: BlockedEvent is #[repr(C)], made only of integers (an i64, four u32s, two 16-byte
    // arrays: 56 bytes, a multiple of its alignment 8), with no padding: every bit pattern is a
    // valid value.
    unsafe impl aya::Pod for BlockedEvent {}
}
