//! nbt: run a workload under deliberately imposed scarcity, enforced in the kernel, and measure
//! what that cost. The modules are layered; imports run only downward (docs/layout.md).

pub mod agent;
pub mod cmd;
pub mod demo;
pub mod enforce;
pub mod error;
pub mod learning;
pub mod plan;
pub mod receipt;
pub mod run;
pub mod schedule;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod units;
