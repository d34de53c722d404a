//! What a receipt says. CryoFlux's fields (task_id … base_model_hash, timestamp) first, then nbt's:
//! what was imposed, what the kernel saw, where each joule came from, and the chain link.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::telemetry::energy::Energy;

/// The `format` of the receipts this version writes; verify reads only these.
pub const FORMAT: &str = "nbt.receipt/v1";

/// `prev_hash` of the first receipt of a store.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One `nbt run`, written when it ends.
    Run,
    /// One learning update the workload reported.
    Task,
    /// One `nbt swarm`, written when it ends, after its nodes' run receipts (it names their
    /// hashes).
    Swarm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Run => "run",
            Kind::Task => "task",
            Kind::Swarm => "swarm",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub hostname: String,
    pub kernel: String,
}

impl Host {
    pub fn this() -> Host {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        Host {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
        }
    }
}

/// What the kernel saw the workload go through.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Scarcity {
    pub oom_kills: Option<u64>,
    pub cpu_throttled_usec: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    pub forks_refused: Option<u64>,
    /// PSI "some"/"full" stall time of the run's cgroup, µs.
    pub psi_cpu_some_usec: Option<u64>,
    pub psi_memory_some_usec: Option<u64>,
    pub psi_memory_full_usec: Option<u64>,
    pub psi_io_some_usec: Option<u64>,
    pub psi_io_full_usec: Option<u64>,
    pub egress_rate_dropped_packets: u64,
    pub egress_loss_dropped_packets: u64,
    pub ingress_rate_dropped_packets: u64,
    pub ingress_loss_dropped_packets: u64,
    pub egress_rate_dropped_bytes: u64,
    pub egress_loss_dropped_bytes: u64,
    pub ingress_rate_dropped_bytes: u64,
    pub ingress_loss_dropped_bytes: u64,
    pub blocked_calls: Option<u64>,
    pub blocked_packets: Option<u64>,
    /// Amounts in millionths (the ledger's unit).
    pub balance_start_micro: Option<i64>,
    pub balance_end_micro: Option<i64>,
}

/// One receipt's body: the bytes hashed and signed are this, in the canonical encoding.
/// `seq` and `prev_hash` are set by the store when it appends the receipt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub format: String,
    pub seq: u64,
    pub prev_hash: String,
    pub kind: Kind,
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: String,
    // CryoFlux's fields.
    pub task_id: Option<String>,
    pub task_name: Option<String>,
    pub joules_spent: Option<f64>,
    pub base_loss: Option<f64>,
    pub new_loss: Option<f64>,
    /// base_loss − new_loss: positive when the update helped.
    pub delta: Option<f64>,
    pub accepted: Option<bool>,
    pub adapter_hash: Option<String>,
    pub base_model_hash: Option<String>,
    // nbt's.
    pub accept_min_delta: Option<f64>,
    /// delta per kilojoule spent on the update.
    pub delta_per_kilojoule: Option<f64>,
    pub run: Option<String>,
    pub command: Vec<String>,
    pub exit_status: Option<i32>,
    pub host: Host,
    /// The limits in force: memory, cpus, network, latency, prices.
    pub constraints: Value,
    pub scarcity: Option<Scarcity>,
    pub energy: Energy,
    /// The run's whole `--json` summary (run receipts).
    pub summary: Option<Value>,
    /// The key that signs this receipt (`ed25519:` + sha256 of the public key).
    pub key_id: String,
}

impl Receipt {
    /// A receipt with nbt's common fields and no task.
    pub fn new(kind: Kind, key_id: String) -> Receipt {
        Receipt {
            format: FORMAT.into(),
            seq: 0,
            prev_hash: String::new(),
            kind,
            timestamp: now_rfc3339(),
            task_id: None,
            task_name: None,
            joules_spent: None,
            base_loss: None,
            new_loss: None,
            delta: None,
            accepted: None,
            adapter_hash: None,
            base_model_hash: None,
            accept_min_delta: None,
            delta_per_kilojoule: None,
            run: None,
            command: Vec::new(),
            exit_status: None,
            host: Host::this(),
            constraints: Value::Null,
            scarcity: None,
            energy: Energy::default(),
            summary: None,
            key_id,
        }
    }
}

/// Now, as `2026-11-22T11:25:26.123Z`.
pub fn now_rfc3339() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_millis())
}

/// Unix seconds as an RFC 3339 UTC time (proleptic Gregorian; days to civil date by Howard
/// Hinnant's algorithm).
pub fn rfc3339(unix: i64, millis: u32) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_346_726, 123), "2026-11-22T11:25:26.123Z");
        assert_eq!(rfc3339(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }
}
