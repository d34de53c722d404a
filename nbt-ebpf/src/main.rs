//! nbt's kernel programs. One module per hook family (docs/layout.md); each module owns its maps.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write in `core::sync::atomic`; the intrinsic lowers to
// the BPF atomic add instruction (BPF_ATOMIC | BPF_ADD), which the verifier accepts on map values.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod account;
mod edt;
mod gate;
mod random;
mod sched;
mod shaper;

/// `*target += value`, atomically with respect to other CPUs and nested program runs.
///
/// # Safety
/// `target` must point into a map value (or other memory valid for the program run), 8-byte aligned.
#[inline(always)]
pub unsafe fn atomic_add(target: *mut u64, value: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // An add of a constant 0 is folded by LLVM into an atomic OR or an atomic load, which the
    // verifier takes only from Linux 5.12 (BPF_ATOMIC); the plain add (BPF_XADD) is older than
    // any kernel nbt runs on. Adding nothing is doing nothing, so a 0 is never added.
    if value == 0 {
        return;
    }
    // SAFETY: the caller guarantees `target` is valid for reads and writes and 8-byte aligned,
    // which is all the atomic add needs.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, value) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
