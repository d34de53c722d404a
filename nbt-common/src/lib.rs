//! The ABI shared by nbt's kernel programs and its user space: map keys and values, limits and
//! constants, `#[repr(C)]` plain data only. Each module is one capability, seen from both sides.
#![no_std]

pub mod account;
pub mod edt;
pub mod gate;
pub mod sched;
pub mod shaper;
