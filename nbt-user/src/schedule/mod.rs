//! `--schedule FILE`: limits that change during a run, and injected faults, on a timeline.
//!
//! A schedule (TOML) is read and checked before the run starts, then expanded into a list of
//! timed [`Change`]s: steps as they are, generators into one step per interval (seeded, so the
//! same file gives the same timeline), faults into a start and an end that puts back what was in
//! force before. `run` applies each change when its time comes ([`apply`]); every change lands in
//! the run's event log.
//!
//! ```toml
//! seed = 7
//! [[step]]
//! at = "30s"
//! egress-rate = "256kbit"
//! [[generator]]
//! limit = "egress-rate"          # egress-rate, ingress-rate, cpus, loss
//! kind = "random-walk"           # or "periodic" (a sine of `period`)
//! every = "5s"
//! from = "0s"
//! until = "60s"
//! min = "128kbit"
//! max = "1mbit"
//! [[fault]]
//! kind = "brownout"              # brownout, network-drop, loss-burst, memory-squeeze,
//!                                # memory-leak, balance-shock
//! start = "10s"
//! duration = "2s"
//! repeat = "20s"                 # optional: every 20 s, `count` times (default 1)
//! count = 3
//! ```

pub(crate) mod apply;
pub(crate) mod fault;
pub(crate) mod parse;

use serde::Serialize;

use crate::enforce::shaper::Loss;

pub use parse::{parse, parse_flags};

/// One thing a schedule changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "set", rename_all = "kebab-case")]
pub enum Change {
    /// memory.max (v2) or memory.limit_in_bytes (v1); `None`: no limit.
    Memory {
        bytes: Option<u64>,
    },
    /// memory.swap.max (v2) or memory+swap − memory (v1); `None`: no limit.
    Swap {
        bytes: Option<u64>,
    },
    /// CFS quota; `None`: no limit.
    Cpus {
        millicores: Option<u64>,
    },
    /// pids.max; `None`: no limit.
    Pids {
        count: Option<u64>,
    },
    EgressRate {
        bits_per_sec: Option<u64>,
    },
    IngressRate {
        bits_per_sec: Option<u64>,
    },
    EgressLoss {
        loss: Loss,
    },
    IngressLoss {
        loss: Loss,
    },
    Latency {
        ns: u64,
    },
    /// netem's duplicate, corrupt and reorder of outgoing packets (fractions).
    Duplicate {
        fraction: f64,
    },
    Corrupt {
        fraction: f64,
    },
    Reorder {
        fraction: f64,
    },
    /// Added to the balance (negative: a charge).
    Balance {
        micro: i64,
    },
    /// cgroup.freeze.
    Freeze {
        frozen: bool,
    },
    /// Reclaim pressure: memory.high (v2) or memory.limit_in_bytes (v1); `None`: lifted.
    MemoryHigh {
        bytes: Option<u64>,
    },
    /// A balloon process inside the run that allocates this much a second; `None`: it is killed.
    Leak {
        bytes_per_sec: Option<u64>,
    },
    /// The price of a new connection or datagram to a gated destination, millionths.
    PriceCall {
        micro: i64,
    },
    /// The price per byte sent to gated destinations, in 10^-12 units.
    PriceEgress {
        pico_per_byte: u64,
    },
}

impl Change {
    /// The limit a change acts on: two changes of one limit at overlapping times conflict.
    pub fn limit(&self) -> &'static str {
        match self {
            Change::Memory { .. } => "memory",
            Change::Swap { .. } => "swap",
            Change::Cpus { .. } => "cpus",
            Change::Pids { .. } => "pids",
            Change::EgressRate { .. } => "egress-rate",
            Change::IngressRate { .. } => "ingress-rate",
            Change::EgressLoss { .. } => "egress loss",
            Change::IngressLoss { .. } => "ingress loss",
            Change::Latency { .. } => "latency",
            Change::Duplicate { .. } => "duplicate",
            Change::Corrupt { .. } => "corrupt",
            Change::Reorder { .. } => "reorder",
            Change::Balance { .. } => "balance",
            Change::Freeze { .. } => "freeze",
            Change::MemoryHigh { .. } => "memory",
            Change::Leak { .. } => "memory-leak",
            Change::PriceCall { .. } => "price-call",
            Change::PriceEgress { .. } => "price-egress",
        }
    }

    pub fn describe(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "no limit".into());
        match self {
            Change::Memory { bytes } => {
                format!("memory {}", opt(bytes.map(crate::units::format_size)))
            }
            Change::Swap { bytes } => {
                format!("swap {}", opt(bytes.map(crate::units::format_size)))
            }
            Change::Cpus { millicores } => format!(
                "cpus {}",
                opt(millicores.map(|m| format!("{}", m as f64 / 1000.0)))
            ),
            Change::Pids { count } => format!("pids {}", opt(count.map(|n| n.to_string()))),
            Change::EgressRate { bits_per_sec } => format!(
                "egress rate {}",
                opt(bits_per_sec.map(crate::units::format_rate))
            ),
            Change::IngressRate { bits_per_sec } => format!(
                "ingress rate {}",
                opt(bits_per_sec.map(crate::units::format_rate))
            ),
            Change::EgressLoss { loss } => format!("egress loss {:.1}%", loss.mean() * 100.0),
            Change::IngressLoss { loss } => format!("ingress loss {:.1}%", loss.mean() * 100.0),
            Change::Latency { ns } => format!("latency {} ms", *ns as f64 / 1e6),
            Change::Duplicate { fraction } => format!("{}% duplicated", fraction * 100.0),
            Change::Corrupt { fraction } => format!("{}% corrupted", fraction * 100.0),
            Change::Reorder { fraction } => format!("{}% reordered", fraction * 100.0),
            Change::Balance { micro } if *micro >= 0 => {
                format!("balance +{}", crate::enforce::ledger::format_amount(*micro))
            }
            Change::Balance { micro } => {
                format!("balance -{}", crate::enforce::ledger::format_amount(-micro))
            }
            Change::Freeze { frozen: true } => "frozen".into(),
            Change::Freeze { frozen: false } => "thawed".into(),
            Change::MemoryHigh { bytes } => format!(
                "memory squeezed to {}",
                opt(bytes.map(crate::units::format_size))
            ),
            Change::Leak {
                bytes_per_sec: Some(rate),
            } => format!(
                "a balloon leaking {}/s started in the run",
                crate::units::format_size(*rate)
            ),
            Change::Leak {
                bytes_per_sec: None,
            } => "the balloon killed, its memory freed".into(),
            Change::PriceCall { micro } => {
                format!(
                    "price per call {}",
                    crate::enforce::ledger::format_amount(*micro)
                )
            }
            Change::PriceEgress { pico_per_byte } => format!(
                "price per GB sent {}",
                crate::enforce::ledger::format_amount((*pico_per_byte * 1000) as i64)
            ),
        }
    }
}

/// Where a timed change came from.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Step,
    Generator,
    FaultStart,
    FaultEnd,
    /// A fault with no duration (balance-shock).
    Fault,
    /// The workload's process ended.
    Exit,
    /// nbt started the workload again (`--restart on-failure`).
    Restart,
    /// The restarted workload reported progress, or stayed up long enough.
    Recovered,
    /// nbt stopped the workload: it went over a limit nbt watches rather than enforces
    /// (`--gpu-memory`).
    Stop,
    /// nbt closed the gate to every destination: a gated host had more addresses than it holds.
    Gate,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Action {
    /// Milliseconds after the workload started.
    pub at_ms: u64,
    pub changes: Vec<Change>,
    pub origin: Origin,
    /// What the schedule called it: `step (line 4)`, `brownout #2 (line 9)`.
    pub source: String,
}

/// A checked schedule, expanded: its actions in time order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub seed: u64,
    pub actions: Vec<Action>,
}

impl Schedule {
    /// The latest time any action happens.
    pub fn span_ms(&self) -> u64 {
        self.actions.last().map_or(0, |a| a.at_ms)
    }
}
