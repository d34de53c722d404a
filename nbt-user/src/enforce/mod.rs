//! The enforcers: each applies one kind of limit to a run and reads back what it did.

pub mod account;
pub mod cgroup;
pub mod edt;
pub mod gate;
pub mod hwcaps;
pub mod ledger;
pub mod shaper;
