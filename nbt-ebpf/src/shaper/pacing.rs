//! `pacing`: caps the pacing rate of the run's TCP sockets at the run's egress rate (sock_ops).
//!
//! A policer alone serves TCP badly: every packet it drops at cgroup egress stays in the socket's
//! queue until a timer fires (200 ms and more), so the flow stalls far below the limit. A TCP
//! socket whose `SO_MAX_PACING_RATE` is set paces itself (the kernel's internal pacing, no fq
//! qdisc needed), so its packets arrive at the bucket at the rate and are not dropped. The
//! bucket in `shaper` stays the limit for everything else: UDP, raw sockets, and several TCP
//! flows at once, whose sum the bucket holds to the rate.
//!
//! With the cap goes a clamp of the congestion window: twice the rate's bandwidth-delay product
//! plus a sixteenth of the bucket (at least 10 segments), which also bounds the size of TSO
//! packets (see `set_cap`).
//!
//! Each socket is paced to the bucket of its link (`link::of_socket`: its peer's address).
//!
//! The cap is set when a connection is established and again on every RTT sample, so a change
//! of the rate (`nbt set`) reaches open connections within one round trip. A connection
//! established while the run had no egress limit is left alone (no per-ACK callback: the
//! unlimited case costs nothing here); a limit set later reaches it through the bucket only.
//!
//! Before a connection's SYN or SYN-ACK, while a rate is set in either direction, its maximum
//! segment size is capped to a thirty-second of the smaller bucket (see [`cap_segment_size`]):
//! the MTU of loopback is 64 KiB, and so are its segments, which a 96 KiB bucket kept 60% full
//! cannot hold. The cap is advertised in the SYN, so the peer's segments are capped too.
//!
//! With the run's ingress queue (`--ingress-queue`), the receive window of each connection is
//! bounded to what the queue holds (see [`clamp_window_to_queue`]).

use super::{bucket_bytes, egress_bucket, link, NSEC_PER_SEC, PPM};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{bpf_ktime_get_ns, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use nbt_common::{
    account::{EGRESS, INGRESS},
    shaper::{ShaperConfig, ShaperState},
};

const SOL_SOCKET: i32 = 1;
const SO_RCVBUF: i32 = 8;
const SO_MAX_PACING_RATE: i32 = 47;
const SOL_TCP: i32 = 6;
const TCP_MAXSEG: i32 = 2;
const TCP_WINDOW_CLAMP: i32 = 10;
const TCP_BPF_SNDCWND_CLAMP: i32 = 1002;
const AF_INET6: u32 = 10;
/// The largest `TCP_MAXSEG` the kernel takes (`MAX_TCP_WINDOW`).
const MAX_SEGMENT_CAP: u64 = 32_767;
/// The segment sizes of a 1500-byte MTU (without options), the floor of the cap.
const MSS_1500_V4: u64 = 1460;
const MSS_1500_V6: u64 = 1440;
const MIN_CWND: u64 = 10;
/// The largest clamp the helper takes; it also sets ssthresh to it, which is then "infinite"
/// (`TCP_INFINITE_SSTHRESH`), as on a new socket.
const UNCLAMPED: i32 = i32::MAX;
/// `SO_MAX_PACING_RATE` takes a u32 of bytes per second; all ones lifts the cap.
const UNLIMITED: u32 = u32::MAX;
/// IP (20) + TCP (20) + timestamps option (12): the headers of a usual segment.
const SEGMENT_HEADERS: u64 = 52;

/// The bucket level the pacing aims for, and how hard it steers toward it below and above that
/// level (all in millionths).
const TARGET_FILL_PPM: u64 = 600_000;
const GAIN_PPM: u64 = 500_000;
const GAIN_ABOVE_PPM: u64 = 2_500_000;
/// Below the target, the gain is at least `depth / SETTLE_NS`: the time constant of the level
/// is at most 200 ms.
const SETTLE_NS: u64 = 200_000_000;
/// The pacing never drops under a quarter of the rate.
const MIN_FACTOR_PPM: u64 = 250_000;

/// The pacing factor, in millionths of the rate: a proportional controller on the bucket's
/// level, `1 + GAIN x (level - TARGET)`: 1 at the target, 2 with a full bucket, and with an empty
/// one 0.7 at most (less for a bucket deeper than 100 ms, whose gain below is stronger; never
/// under 0.25).
///
/// A fixed cap serves the rate badly either way: at the rate, any other traffic of the run (a
/// second flow, DNS, a heartbeat) drains the bucket until it drops TCP segments; a margin under
/// it loses that margin. Here the pacing settles where the flow and everything else together
/// send exactly the rate, with the level at `TARGET - others / GAIN` (0.58 when the others send
/// 1% of the rate and the gain is 0.5). The loop acts on every ACK; the pacer applies the cap to
/// the next segment.
///
/// Why 0.6: tokens beyond a full bucket are lost for good, so the part above the target is how
/// long the sender may fall behind (a late pacing timer, the thread not scheduled) without
/// losing any of the rate: 16 ms of the default 40 ms bucket. Below it, the bucket must still
/// hold the next packet, which the congestion window clamp (`clamp_cwnd`) keeps to a sixteenth
/// of the bucket (at least 10 segments) plus two round trips' worth (without it, TCP builds
/// 64 KiB TSO packets on a path under 512 us: a target of 0.6 then dropped 52 of them in 20 s
/// at 10mbit). Why it is steep above: after a stall the sender must catch up before the bucket
/// fills.
///
/// The level is read as it was before the last packet passed (`last_cost_ns` added back): the
/// ACK that runs this follows its segment within microseconds on a short path.
#[inline(always)]
fn pacing_factor_ppm(config: &ShaperConfig, state: *mut ShaperState) -> u64 {
    let depth = config.burst_ns;
    if depth == 0 {
        return PPM;
    }
    // SAFETY: helper without arguments; `state` points into the map value for this program run.
    let (now, clock, last) = unsafe {
        (
            bpf_ktime_get_ns(),
            core::ptr::read_volatile(&(*state).tat_ns),
            core::ptr::read_volatile(&(*state).last_cost_ns),
        )
    };
    let level = (now + last).saturating_sub(clock).min(depth) * PPM / depth;
    // Unsigned both ways: BPF's generic ISA has no signed division.
    if level >= TARGET_FILL_PPM {
        PPM + GAIN_ABOVE_PPM * (level - TARGET_FILL_PPM) / PPM
    } else {
        // A deep bucket (seconds at a low rate) gets a stronger gain, so that the level settles
        // within SETTLE_NS whatever the depth.
        let gain = (depth * PPM / SETTLE_NS).max(GAIN_PPM);
        PPM.saturating_sub(gain * (TARGET_FILL_PPM - level) / PPM)
            .max(MIN_FACTOR_PPM)
    }
}

// The RTT arm's `if` stays an `if`: `set_cap` sets the socket's options, an action that a match
// guard would read as a mere test.
#[allow(clippy::collapsible_match)]
#[sock_ops]
pub fn pace(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        // Before the SYN of a connect, or on listen(): what the handshake will advertise.
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_TCP_LISTEN_CB => cap_segment_size(&ctx),
        // Unlimited at the start: nothing to do, and no callback on every ACK after.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if clamp_window_to_queue(&ctx, true) {
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
            if egress_bucket(link::of_socket(&ctx)).is_some() {
                let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_RTT_CB_FLAG as i32);
                set_cap(&ctx);
            }
        }
        // Before each segment the socket sends (see `clamp_window_to_queue`). The queue's rate
        // lifted: the window is the kernel's again, and the callback ends.
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            if !clamp_window_to_queue(&ctx, false) {
                set_option(&ctx, SOL_TCP, TCP_WINDOW_CLAMP, UNCLAMPED as u32);
                let flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        BPF_SOCK_OPS_RTT_CB => {
            // The limit was lifted (`nbt set`): the cap is gone, so are the callbacks.
            if set_cap(&ctx) == 0 {
                let _ =
                    ctx.set_cb_flags(ctx.cb_flags() as i32 & !(BPF_SOCK_OPS_RTT_CB_FLAG as i32));
            }
        }
        _ => {}
    }
    1
}

/// TCP paces payload bytes; the bucket counts IP bytes. A segment of `mss` payload bytes costs
/// `mss + 52` on the wire, so the cap is the rate scaled by `mss / (mss + 52)`, then by a factor
/// that follows the bucket's level (see [`pacing_factor_ppm`]). Returns the egress rate it
/// capped to, 0 when unlimited.
#[inline(always)]
fn set_cap(ctx: &SockOpsContext) -> u64 {
    let Some((config, state)) = egress_bucket(link::of_socket(ctx)) else {
        set_pacing_rate(ctx, UNLIMITED);
        clamp_cwnd(ctx, UNCLAMPED);
        return 0;
    };
    // No u128 in BPF: the products below fit in a u64 because user space bounds what it writes
    // (nbt-user/src/enforce/shaper.rs): rate <= 1.25e10 bytes/s (100gbit), burst_ns <= 3.6e12
    // (an hour) and rate x burst_ns <= burst x 1e9 <= 2^34 x 1e9 < 1.72e19. With mss < 2^16 and
    // srtt_us < 2^29 (a u32 of eighths): rate x mss < 2^50, rate x srtt_us < 6.8e18, and in
    // `pacing_factor_ppm` depth x PPM <= 3.6e18.
    let rate = config.rate_bytes_per_sec;
    // SAFETY: reading a field of the context the kernel handed us. Not `clamp`: its assertion
    // (min <= max) leaves a panic path in the object, which the verifier refuses.
    let mss = u64::from(unsafe { (*ctx.ops).mss_cache })
        .max(536)
        .min(0xFFFF);
    let paced = rate * mss / (mss + SEGMENT_HEADERS) * pacing_factor_ppm(config, state) / PPM;
    // SAFETY: as above; srtt_us is tp->srtt_us, eight times the smoothed RTT in us.
    let srtt_us = u64::from(unsafe { (*ctx.ops).srtt_us }) >> 3;
    // The window TCP needs at the rate is one round trip's worth; twice that, plus a floor,
    // leaves room for the RTT to grow between two ACKs. Without a clamp, BBR's window followed
    // its bandwidth estimate (Gbit/s on a veth, from TSO bursts), its TSO packets grew and shrank
    // with it (9 to 64 KiB), the bucket's level at the controller's target moved with them, and
    // the first 12 s of a 10mbit flow ran 0.13% under the rate while the bucket refilled. The
    // floor keeps a TSO packet under a sixteenth of the bucket, but not under 10 segments: at
    // 1gbit (a 5 MB bucket) packets stay at 64 KiB, and so does the CPU cost per byte.
    let bdp = rate * srtt_us / 1_000_000 / mss;
    let floor = (rate * config.burst_ns / 1_000_000_000 / 16 / mss).max(MIN_CWND);
    clamp_cwnd(ctx, (2 * bdp + floor).min(UNCLAMPED as u64) as i32);
    set_pacing_rate(
        ctx,
        if paced >= u64::from(UNLIMITED) {
            UNLIMITED - 1
        } else {
            paced.max(1) as u32
        },
    );
    rate
}

/// Caps the segment size at a thirty-second of the smaller bucket of the directions that have a
/// rate, never under a 1500-byte MTU's segment: two segments, the smallest TSO packet TCP
/// builds, then take a sixteenth of the bucket, as on a 1500-byte link at the same rate. No cap
/// when there is no rate, or when the bucket is so deep that the kernel's largest (32767) is
/// no cap at all (1gbit and above, by default).
#[inline(always)]
fn cap_segment_size(ctx: &SockOpsContext) {
    let link = link::of_socket(ctx);
    let egress = bucket_bytes(link, EGRESS).unwrap_or(u64::MAX);
    let ingress = bucket_bytes(link, INGRESS).unwrap_or(u64::MAX);
    let bucket = if egress < ingress { egress } else { ingress };
    if bucket == u64::MAX {
        return;
    }
    let floor = if ctx.family() == AF_INET6 {
        MSS_1500_V6
    } else {
        MSS_1500_V4
    };
    let cap = (bucket / 32).max(floor);
    if cap < MAX_SEGMENT_CAP {
        set_option(ctx, SOL_TCP, TCP_MAXSEG, cap as u32);
    }
}

/// With the run's ingress queue, bounds the socket's receive window (`TCP_WINDOW_CLAMP`) to what
/// the queue holds at its link's rate plus the connection's base round trip at the rate
/// (`rtt_min`, from the handshake for a receiver), less an eighth: the queue counts IP bytes and
/// the window payload (headers are up to 3.5% of a 1500-byte packet), and a retransmission can
/// join its original in the queue. A sender then never has more in flight than the queue takes,
/// and one flow does not overflow it. Without the bound, BBR on loopback (TSO
/// packets of 58 KiB, as `tcp_tso_autosize` builds them on a path under 512 us) overfilled the
/// 96 KiB queue of 512kbit: each tail drop lost 19 segments at once.
///
/// The kernel's receive buffer autotuning raises the clamp with the buffer (once a round trip, as
/// the reader reads), so the bound is set again before each segment the socket sends, its ACKs
/// included (`BPF_SOCK_OPS_HDR_OPT_LEN_CB`, which asks for no option space): the window of every
/// ACK follows the bound, and a rate or burst changed by `nbt set` reaches open connections at
/// their next ACK. Returns whether that callback is needed.
///
/// Where the BPF helper refuses `TCP_WINDOW_CLAMP` (Linux 5.10 does), the bound is the receive
/// buffer (`SO_RCVBUF` of the window: Linux 5.10 offers half a buffer as window), which also stops
/// the autotuning, so it is set once, at the start; where the bound is over the largest buffer
/// the kernel grants (`net.core.rmem_max`), the buffer would cap the window below it, and the
/// window is left to the kernel.
#[inline(always)]
fn clamp_window_to_queue(ctx: &SockOpsContext, established: bool) -> bool {
    if crate::edt::queue_ifindex() == 0 {
        return false;
    }
    let Some((config, _)) = super::direction(link::of_socket(ctx), INGRESS) else {
        return false;
    };
    let rate = config.rate_bytes_per_sec;
    if rate == 0 {
        return false;
    }
    // SAFETY: reading a field of the context the kernel handed us (the windowed minimum RTT, us).
    // Both products fit in a u64, as in `set_cap`.
    let rtt_min_us = u64::from(unsafe { (*ctx.ops).rtt_min });
    let bytes =
        rate * crate::edt::queue::depth_ns(config) / NSEC_PER_SEC + rate * rtt_min_us / 1_000_000;
    let window = (bytes - bytes / 8).min(UNCLAMPED as u64) as u32;
    if set_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, window) == 0 {
        return true;
    }
    if established && u64::from(window) <= crate::edt::receive_buffer_max() {
        set_option(ctx, SOL_SOCKET, SO_RCVBUF, window);
    }
    false
}

/// `snd_cwnd_clamp` (and `snd_ssthresh`, which the helper sets with it), in segments.
#[inline(always)]
fn clamp_cwnd(ctx: &SockOpsContext, clamp: i32) {
    set_option(ctx, SOL_TCP, TCP_BPF_SNDCWND_CLAMP, clamp as u32);
}

/// `SO_MAX_PACING_RATE`, bytes per second; `UNLIMITED` lifts the cap.
#[inline(always)]
fn set_pacing_rate(ctx: &SockOpsContext, cap: u32) {
    set_option(ctx, SOL_SOCKET, SO_MAX_PACING_RATE, cap);
}

/// A socket option of four bytes (every option here takes an int's bits); the helper's result,
/// 0 when set.
#[inline(always)]
fn set_option(ctx: &SockOpsContext, level: i32, name: i32, mut value: u32) -> i64 {
    // SAFETY: the helper reads `size_of::<u32>()` bytes from `value`, a local.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            level,
            name,
            (&mut value as *mut u32).cast(),
            size_of::<u32>() as i32,
        )
    }
}
