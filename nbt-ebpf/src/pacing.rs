//! `pacing`: caps the pacing rate of the run's TCP sockets at the run's egress rate (sock_ops).
//!
//! A policer alone serves TCP badly: every packet it drops at cgroup egress stays in the socket's
//! queue until a timer fires (200 ms and more), so the flow stalls far below the limit. A TCP
//! socket whose `SO_MAX_PACING_RATE` is set paces itself (the kernel's internal pacing, no fq
//! qdisc needed), so its packets arrive at the bucket at the rate and are not dropped. The
//! bucket in `shaper` stays the limit for everything else: UDP, raw sockets, and several TCP
//! flows at once, whose sum the bucket holds to the rate.
//!
//! The cap is set when a connection is established and again on every RTT sample, so a change
//! of the rate (`nbt set`) reaches open connections within one round trip. A connection
//! established while the run had no egress limit is left alone (no per-ACK callback: the
//! unlimited case costs nothing here); a limit set later reaches it through the bucket only.

use crate::shaper::{egress_bucket, egress_rate, PPM};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    },
    helpers::{bpf_ktime_get_ns, bpf_setsockopt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use nbt_common::shaper::{ShaperConfig, ShaperState};

const SOL_SOCKET: i32 = 1;
const SO_MAX_PACING_RATE: i32 = 47;
/// `SO_MAX_PACING_RATE` takes a u32 of bytes per second; all ones lifts the cap.
const UNLIMITED: u32 = u32::MAX;
/// IP (20) + TCP (20) + timestamps option (12): the headers of a usual segment.
const SEGMENT_HEADERS: u64 = 52;

/// The bucket level the pacing aims for, and how hard it steers toward it below and above that
/// level (all in millionths).
const TARGET_FILL_PPM: u64 = 900_000;
const GAIN_PPM: u64 = 500_000;
const GAIN_ABOVE_PPM: u64 = 2_500_000;

/// The pacing factor, in millionths of the rate: a proportional controller on the bucket's
/// level, `1 + GAIN x (level - TARGET)`: 0.55 with an empty bucket, 1 at the target, 1.25 with a
/// full one (the steeper gain above).
///
/// A fixed cap serves the rate badly either way: at the rate, any other traffic of the run (a
/// second flow, DNS, a heartbeat) drains the bucket until it drops TCP segments; a margin under
/// it loses that margin. Here the pacing settles where the flow and everything else together
/// send exactly the rate, with the level at `TARGET - others / GAIN` (0.88 when the others send
/// 1% of the rate). The loop acts on every ACK; the pacer applies the cap to the next segment.
///
/// Why the target is high: with an RTT under 512 us TCP builds 64 KiB TSO packets, two thirds of
/// the 96 KiB default bucket, and a packet passes only when the bucket holds its cost; a target
/// of 0.6 dropped 52 of them in 20 s at 10mbit and the flow reached 0.55 to 0.67 of the rate.
/// Why it is steep above: tokens beyond a full bucket are lost, so when the sender falls behind
/// (a late pacing timer, the thread not scheduled) it must catch up before the bucket fills.
///
/// The level is read as it was before the last packet passed (`last_cost_ns` added back): the
/// ACK that runs this follows its segment within microseconds on a short path, and after a
/// 64 KiB packet the level would read a third while the sender is at the rate.
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
        PPM - GAIN_PPM * (TARGET_FILL_PPM - level) / PPM
    }
}

#[sock_ops]
pub fn pace(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        // Unlimited at the start: nothing to do, and no callback on every ACK after.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if egress_rate() != 0 {
                let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_RTT_CB_FLAG as i32);
                set_cap(&ctx);
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
    let Some((config, state)) = egress_bucket() else {
        set_pacing_rate(ctx, UNLIMITED);
        return 0;
    };
    let rate = config.rate_bytes_per_sec;
    // SAFETY: reading a field of the context the kernel handed us.
    let mss = u64::from(unsafe { (*ctx.ops).mss_cache }).max(536);
    let paced = rate * mss / (mss + SEGMENT_HEADERS) * pacing_factor_ppm(config, state) / PPM;
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

/// `SO_MAX_PACING_RATE`, bytes per second; `UNLIMITED` lifts the cap.
#[inline(always)]
fn set_pacing_rate(ctx: &SockOpsContext, mut cap: u32) {
    // SAFETY: the helper reads `size_of::<u32>()` bytes from `cap`, a local.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_MAX_PACING_RATE,
            (&mut cap as *mut u32).cast(),
            core::mem::size_of::<u32>() as i32,
        );
    }
}
