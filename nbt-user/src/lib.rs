//! nbt: run a workload under deliberately imposed scarcity, enforced in the kernel, and measure
//! what that cost. The modules are layered; imports run only downward (docs/layout.md).

pub(crate) mod agent;
pub mod cmd;
pub mod demo;
pub mod enforce;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod learning;
pub mod plan;
pub(crate) mod receipt;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod schedule;
pub mod state;
pub(crate) mod swarm;
pub mod sys;
pub mod telemetry;
pub(crate) mod units;
