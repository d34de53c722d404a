//! `edt`: latency and jitter by earliest departure time, as the tc egress program of
//! `nbt-ebpf/src/edt.rs` reads them.

/// Array of one [`EdtRun`].
pub const EDT_RUN_MAP: &str = "EDT_RUN";

/// Whose packets the program acts on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdtRun {
    /// The run's cgroup v2 id, and its depth below the root: packets of sockets in it or below.
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    /// Non-zero: the run's cgroup programs put its sockets in [`EDT_SOCKETS_MAP`], for
    /// `impair_ingress` (duplicate and corrupt of arriving packets).
    pub mark_sockets: u32,
    /// Non-zero: `delay_egress` is on every interface of the namespace but loopback and takes
    /// the TCP segments the egress loss model loses ([`LOST_MARK`]), so that their sender sees
    /// a loss on the wire; it records each of the run's sockets whose packets it sees
    /// ([`EDT_WIRE_SOCKETS_MAP`]).
    pub wire_loss: u32,
    /// Non-zero: the index of the run's ingress queue device (an ifb, `--ingress-queue`), to
    /// which `receive_ingress` redirects the packets arriving for the run's sockets; `queue_ingress`
    /// on its egress gives each its departure time at the ingress rate.
    pub queue_ifindex: u32,
    /// The largest `SO_RCVBUF` the kernel grants (`net.core.rmem_max`, as nbt read it), for the
    /// queue's bound on a receive window where the kernel's BPF lacks `TCP_WINDOW_CLAMP` (Linux
    /// 5.10; `nbt-ebpf/src/shaper/pacing.rs`).
    pub receive_buffer_max: u64,
}

/// `skb->tc_index` of a packet that went through the run's ingress queue, set by
/// `queue_ingress`: the cgroup ingress program then counts it as passed without charging the
/// rate again (the queue has spent it), and `receive_ingress` never queues it twice. "NQ".
pub const QUEUED_MARK: u32 = 0x4E51;

/// `skb->mark` of a TCP segment the egress loss model lost, set by the cgroup program for
/// `delay_egress` to take (`TC_ACT_STOLEN`: the sender's stack is told it left). "nbtL".
pub const LOST_MARK: u32 = 0x6e62_744c;

/// LRU hash from socket cookie to the interface index by which `delay_egress` last saw one of
/// that socket's packets leave. The cgroup program marks a lost segment only when its socket is
/// here with the segment's interface: a socket of the run in another network namespace (made
/// there by the workload) never passes nbt's tc programs, and a segment marked there would not
/// be lost at all.
pub const EDT_WIRE_SOCKETS_MAP: &str = "EDT_WIRE_SOCKETS";

/// LRU hash of the run's sockets ([`RunSocket`]), kept by the cgroup programs when
/// `EdtRun::mark_sockets` is set. A tc ingress program cannot tell a socket's cgroup
/// (`bpf_sk_ancestor_cgroup_id` is not offered to tc), so it looks the packet's socket up and
/// finds it here.
pub const EDT_SOCKETS_MAP: &str = "EDT_SOCKETS";

/// A socket as `struct bpf_sock` shows it: its family, protocol, local and remote address and
/// port (an IPv4 address in the first word; ports as the kernel gives them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunSocket {
    pub family: u32,
    pub protocol: u32,
    pub src_port: u32,
    pub dst_port: u32,
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
}

/// Array of one [`EdtConfig`] per link (`shaper::MAX_LINKS`; link 0 is the run's own).
pub const EDT_CONFIG_MAP: &str = "EDT_CONFIG";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdtConfig {
    pub latency_ns: u64,
    /// Each packet's delay is uniform in latency ± jitter (never below zero).
    pub jitter_ns: u64,
    /// netem's delay correlation, in units of 2^32: each draw is `(1 - c) x fresh + c x last`.
    pub jitter_correlation: u64,
}

/// Array of one [`EdtState`] per link, owned by the kernel program.
pub const EDT_STATE_MAP: &str = "EDT_STATE";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdtState {
    /// The last draw of the jitter (a u32 value), for the correlation.
    pub jitter_last: u64,
}

#[cfg(feature = "user")]
// SAFETY: EdtRun is #[repr(C)], made only of integers (u64, four u32s, u64), with no implicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for EdtRun {}
#[cfg(feature = "user")]
// SAFETY: EdtConfig is #[repr(C)], three u64s: every bit pattern is a valid value.
unsafe impl aya::Pod for EdtConfig {}
#[cfg(feature = "user")]
// SAFETY: EdtState is #[repr(C)], one u64: every bit pattern is a valid value.
unsafe impl aya::Pod for EdtState {}
