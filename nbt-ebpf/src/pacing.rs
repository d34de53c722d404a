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

use crate::shaper::egress_rate;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    },
    helpers::bpf_setsockopt,
    macros::sock_ops,
    programs::SockOpsContext,
};

const SOL_SOCKET: i32 = 1;
const SO_MAX_PACING_RATE: i32 = 47;
/// `SO_MAX_PACING_RATE` takes a u32 of bytes per second; all ones lifts the cap.
const UNLIMITED: u32 = u32::MAX;
/// IP (20) + TCP (20) + timestamps option (12): the headers of a usual segment.
const SEGMENT_HEADERS: u64 = 52;

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
            set_cap(&ctx);
            // The limit was lifted (`nbt set`): the cap is gone, so are the callbacks.
            if egress_rate() == 0 {
                let _ =
                    ctx.set_cb_flags(ctx.cb_flags() as i32 & !(BPF_SOCK_OPS_RTT_CB_FLAG as i32));
            }
        }
        _ => {}
    }
    1
}

/// TCP paces payload bytes; the bucket counts IP bytes. A segment of `mss` payload bytes costs
/// `mss + 52` on the wire, so the cap is the rate scaled by `mss / (mss + 52)`, and 1% below
/// that so that the bucket, not the pacer, is what never quite fills.
#[inline(always)]
fn set_cap(ctx: &SockOpsContext) {
    let rate = egress_rate();
    let mut cap = if rate == 0 {
        UNLIMITED
    } else {
        // SAFETY: reading a field of the context the kernel handed us.
        let mss = u64::from(unsafe { (*ctx.ops).mss_cache }).max(536);
        let paced = rate * mss / (mss + SEGMENT_HEADERS) * 99 / 100;
        if paced >= u64::from(UNLIMITED) {
            UNLIMITED - 1
        } else {
            paced.max(1) as u32
        }
    };
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
