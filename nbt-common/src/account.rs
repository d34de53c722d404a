//! Byte and packet counters of a run's cgroup, kept by the `account` cgroup_skb programs.
//!
//! The map is a per-CPU array indexed by [`Direction`]; user space sums the CPUs' slots.
//! Lengths are those the cgroup_skb hook sees: the IP packet (network header onwards), no L2 header.

/// Index of the ingress slot in [`ACCOUNT_MAP`].
pub const INGRESS: u32 = 0;
/// Index of the egress slot in [`ACCOUNT_MAP`].
pub const EGRESS: u32 = 1;
/// Number of slots in [`ACCOUNT_MAP`].
pub const DIRECTIONS: u32 = 2;

/// Name of the per-CPU array map, as the loader looks it up.
pub const ACCOUNT_MAP: &str = "ACCOUNT";

/// Packets and bytes seen in one direction on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

impl TrafficCounters {
    pub fn add(&mut self, other: &TrafficCounters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

#[cfg(feature = "user")]
// SAFETY: TrafficCounters is #[repr(C)], two u64s with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for TrafficCounters {}
