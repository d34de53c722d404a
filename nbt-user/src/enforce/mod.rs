//! The enforcers: each applies one kind of limit to a run and reads back what it did.

pub(crate) mod account;
pub mod cgroup;
pub(crate) mod clsact;
pub(crate) mod edt;
pub(crate) mod gate;
pub(crate) mod hwcaps;
pub(crate) mod ledger;
pub(crate) mod shaper;
pub(crate) mod target;
