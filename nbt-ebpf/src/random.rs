//! Random draws for the impairments.
//!
//! A draw is a u32; "true with probability p" is `draw < p` with p in units of 2^32.
//!
//! Correlation c (also in units of 2^32): with probability c a draw repeats the last one, else
//! it is fresh. Each draw is still uniform, so a 20% loss loses 20% of packets whatever the
//! correlation, and a packet shares the last one's fate with probability c + (1 - c) x (its
//! own chance): losses come in runs of 1 / ((1 - p)(1 - c)) on average, 5 packets for p = 20%,
//! c = 75%. netem's formula (`get_crandom`: `(1 - c) x fresh + c x last`) is not used: it
//! narrows the draws around one half, so its `loss 20% 75%` loses about 0.1% of packets.

use aya_ebpf::helpers::bpf_get_prandom_u32;

/// A fresh uniform u32.
#[inline(always)]
pub fn fresh() -> u64 {
    // SAFETY: helper without arguments.
    u64::from(unsafe { bpf_get_prandom_u32() })
}

/// True with probability `p / 2^32`.
#[inline(always)]
pub fn chance(p: u64) -> bool {
    fresh() < p
}

/// A draw that repeats the last one kept at `last` with probability `correlation / 2^32`, else
/// a fresh one, which replaces it. Several CPUs may read and write `last` at once; a lost update
/// only makes one draw fresh where it would have repeated, or the reverse.
///
/// # Safety
/// `last` must point to an aligned u64 valid for this program run (a map value).
#[inline(always)]
pub unsafe fn correlated(last: *mut u64, correlation: u64) -> u64 {
    if correlation != 0 && chance(correlation) {
        // SAFETY: the caller guarantees `last` is valid and aligned.
        return unsafe { core::ptr::read_volatile(last) } & 0xFFFF_FFFF;
    }
    let value = fresh();
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(last, value) };
    value
}
