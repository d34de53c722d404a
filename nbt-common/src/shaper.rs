//! `shaper`: the run's bandwidth and loss limits, per direction, as the cgroup_skb programs of
//! `nbt-ebpf/src/shaper.rs` read them, and the counters they keep.
//!
//! All three maps are arrays of one entry per link and direction ([`entry`]). Link 0 holds the
//! run's own limits, for every destination that no per-destination link names; links 1 and up
//! are the run's `--link`s, each found from a packet's remote address through [`LINK_OF_MAP`].
//! User space writes [`ShaperConfig`] at start and whenever a limit changes (`nbt set`); the
//! programs read it per packet, so a change applies to the next packet without reattaching.

/// Array of [`ShaperConfig`], written by user space.
pub const SHAPER_CONFIG_MAP: &str = "SHAPER_CONFIG";
/// Array of [`ShaperState`], owned by the kernel programs.
pub const SHAPER_STATE_MAP: &str = "SHAPER_STATE";
/// Per-CPU array of [`ShaperStats`].
pub const SHAPER_STATS_MAP: &str = "SHAPER_STATS";

/// LPM trie from a remote address ([`LinkAddress`], with its prefix length) to its link (a u32,
/// 1 to `MAX_LINKS - 1`), written by user space at start.
pub const LINK_OF_MAP: &str = "LINK_OF";

/// Links of a run: its own (0) and up to 63 per-destination ones.
pub const MAX_LINKS: u32 = 64;
/// Entries of each shaper map.
pub const SHAPER_ENTRIES: u32 = MAX_LINKS * crate::account::DIRECTIONS;

/// An address as the link trie keys it: IPv6 as it is, IPv4 as `::ffff:a.b.c.d` (so a /24 of
/// IPv4 is a /120).
pub type LinkAddress = [u8; 16];

/// The bits an IPv4 prefix gains as an IPv4-mapped IPv6 one.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// `::ffff:a.b.c.d` for the four bytes of an IPv4 address, in network order.
#[inline(always)]
pub fn ipv4_mapped(v4: [u8; 4]) -> LinkAddress {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The entry of `link`'s `direction` in the shaper maps.
#[inline(always)]
pub fn entry(link: u32, direction: u32) -> u32 {
    link * crate::account::DIRECTIONS + direction
}

/// No loss.
pub const LOSS_NONE: u32 = 0;
/// Each packet is lost with probability `loss_good` (independently).
pub const LOSS_UNIFORM: u32 = 1;
/// Gilbert-Elliott: a good and a bad state, netem's `gemodel p r 1-h 1-k`.
pub const LOSS_GILBERT_ELLIOTT: u32 = 2;

/// A probability of 1 as the programs see it: `bpf_get_prandom_u32() < p` with `p` in
/// `0..=PROBABILITY_ONE` is true with probability `p / 2^32`.
pub const PROBABILITY_ONE: u64 = 1 << 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShaperConfig {
    /// Token rate in bytes (IP packets, headers included) per second; 0: no rate limit.
    pub rate_bytes_per_sec: u64,
    /// Bucket depth in nanoseconds of the rate (burst bytes = rate x burst_ns / 1e9).
    pub burst_ns: u64,
    /// `LOSS_NONE`, `LOSS_UNIFORM` or `LOSS_GILBERT_ELLIOTT`.
    pub loss_model: u32,
    pub _pad: u32,
    /// Uniform: the loss probability. Gilbert-Elliott: the loss probability in the good state (1-k).
    pub loss_good: u64,
    /// Gilbert-Elliott: the loss probability in the bad state (1-h).
    pub loss_bad: u64,
    /// Gilbert-Elliott: probability of moving from good to bad, per packet (p).
    pub good_to_bad: u64,
    /// Gilbert-Elliott: probability of moving from bad to good, per packet (r).
    pub bad_to_good: u64,
    /// Uniform loss: netem's correlation, in units of [`PROBABILITY_ONE`]: each draw is
    /// `(1 - c) x fresh + c x previous` (see `ShaperState::loss_last`).
    pub loss_correlation: u64,
    /// Probability that a packet is sent twice (tc programs; egress).
    pub duplicate: u64,
    /// Probability that a bit of a packet is flipped (tc programs; egress).
    pub corrupt: u64,
    /// Probability that a packet skips the added delay and overtakes those before it (needs a
    /// latency), with netem's correlation and gap: only every `reorder_gap`th packet may.
    pub reorder: u64,
    pub reorder_correlation: u64,
    pub reorder_gap: u64,
}

/// The shared state of one direction, touched by every CPU that sends or receives for the run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShaperState {
    /// The token bucket as a virtual clock (GCRA's "theoretical arrival time"), in ns of
    /// `bpf_ktime_get_ns`: the bucket holds `(now - tat) x rate` bytes, at most its depth.
    pub tat_ns: u64,
    /// Gilbert-Elliott state: 0 good, 1 bad.
    pub bad_state: u64,
    /// The cost (ns of the rate) of the last packet that passed: the bucket held this much more
    /// just before it. Read by `pacing`, which runs on the ACK that closely follows a send.
    pub last_cost_ns: u64,
    /// The last draws of the correlated loss and reorder decisions (u32 values).
    pub loss_last: u64,
    pub reorder_last: u64,
    /// Packets delayed since the last one reordered (netem's `counter`, for the gap).
    pub reorder_count: u64,
    /// The ingress queue's clock (`--ingress-queue`), in ns of `bpf_ktime_get_ns`: when the
    /// link will have sent everything queued so far, at its rate.
    pub queue_free_ns: u64,
}

/// Counters of one direction on one CPU. Bytes are IP bytes as they go on the wire: a GSO
/// super-packet counts every segment's headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ShaperStats {
    pub passed_packets: u64,
    pub passed_bytes: u64,
    /// Passed with a congestion notification to TCP (egress, bucket running low).
    pub marked_packets: u64,
    pub rate_dropped_packets: u64,
    pub rate_dropped_bytes: u64,
    pub loss_dropped_packets: u64,
    pub loss_dropped_bytes: u64,
    /// Packets on the wire (a GSO packet counts its segments) sent twice, corrupted, and sent
    /// ahead of the delay.
    pub duplicated_packets: u64,
    pub corrupted_packets: u64,
    pub reordered_packets: u64,
    /// Ingress with `--ingress-queue`: how long the queue stood empty between packets beyond its
    /// catch-up credit (5 ms), in ns, from its first packet to its last. The link sent at its
    /// rate the rest of the time: what a run fell short of the rate beyond this, the senders
    /// left unused.
    pub queue_idle_ns: u64,
}

impl ShaperStats {
    pub fn add(&mut self, o: &ShaperStats) {
        self.passed_packets += o.passed_packets;
        self.passed_bytes += o.passed_bytes;
        self.marked_packets += o.marked_packets;
        self.rate_dropped_packets += o.rate_dropped_packets;
        self.rate_dropped_bytes += o.rate_dropped_bytes;
        self.loss_dropped_packets += o.loss_dropped_packets;
        self.loss_dropped_bytes += o.loss_dropped_bytes;
        self.duplicated_packets += o.duplicated_packets;
        self.corrupted_packets += o.corrupted_packets;
        self.reordered_packets += o.reordered_packets;
        self.queue_idle_ns += o.queue_idle_ns;
    }
}

#[cfg(feature = "user")]
// SAFETY: ShaperConfig is #[repr(C)], made only of integers (two u64s, a u32, the explicit u32
// `_pad`, ten u64s), with no implicit padding: every bit pattern is a valid value.
unsafe impl aya::Pod for ShaperConfig {}
#[cfg(feature = "user")]
// SAFETY: ShaperState is #[repr(C)], seven u64s, with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for ShaperState {}
#[cfg(feature = "user")]
// SAFETY: ShaperStats is #[repr(C)], eleven u64s, with no padding: every bit pattern is a valid
// value.
unsafe impl aya::Pod for ShaperStats {}
