//! `ledger`: the run's simulated money. Amounts are integers of micro-units at the edges (flags,
//! summary, receipts) and pico-units inside the kernel (see `nbt_common::gate`), so that a price
//! per byte is a whole number. No floats touch the balance.

use serde::Serialize;

use crate::error::UsageError;

pub const PICO_PER_MICRO: i64 = 1_000_000;
/// The largest balance or top-up: i64 pico-units hold 9.2 million units; keep a margin.
pub const MAX_AMOUNT_MICRO: i64 = 1_000_000 * 1_000_000;
/// The largest balance a run may hold, and the lowest a charge may take it to: 1,000,000 units
/// either way (10^18 pico-units, under the 9.2 x 10^18 an i64 holds). Without it, repeated
/// `nbt balance RUN add 1000000` wrapped the balance negative past 9.2 million and closed the gate.
pub const MAX_BALANCE_MICRO: i64 = MAX_AMOUNT_MICRO;

pub const AMOUNT_FORMS: &str =
    "a non-negative amount with at most 6 decimals: 5, 0.25, 1000000 (at most 1000000)";
pub const PRICE_PER_GB_FORMS: &str =
    "an amount per 10^9 bytes: 0.09/GB (or per 2^30 bytes: 0.09/GiB); at least 0.001/GB";

fn error(flag: &str, text: &str, problem: &str, accepted: &'static str) -> UsageError {
    UsageError {
        flag: flag.into(),
        value: text.into(),
        problem: problem.into(),
        accepted,
    }
}

/// `5`, `0.25`: micro-units. Signs, exponents and more than 6 decimals are refused.
pub fn parse_amount(flag: &str, text: &str) -> Result<i64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, AMOUNT_FORMS);
    let text_trimmed = text.trim();
    if text_trimmed.starts_with('-') {
        return Err(bad("negative amounts are not accepted"));
    }
    let (whole, fraction) = text_trimmed.split_once('.').unwrap_or((text_trimmed, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad("not an amount"));
    }
    if fraction.len() > 6 {
        return Err(bad("more than 6 decimals (amounts are whole micro-units)"));
    }
    let whole: i64 = whole.parse().map_err(|_| bad("too large"))?;
    let fraction: i64 = format!("{fraction:0<6}").parse().unwrap_or(0);
    let micro = whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| bad("too large"))?;
    if micro > MAX_AMOUNT_MICRO {
        return Err(bad("above 1000000"));
    }
    Ok(micro)
}

/// `0.09/GB` → pico-units per byte.
pub fn parse_price_per_gb(flag: &str, text: &str) -> Result<u64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, PRICE_PER_GB_FORMS);
    let (amount, bytes) = match text.trim().split_once('/') {
        Some((amount, "GB")) => (amount, 1_000_000_000u64),
        Some((amount, "GiB")) => (amount, 1u64 << 30),
        Some((_, unit)) => return Err(bad(&format!("unknown unit '{unit}'"))),
        None => return Err(bad("the unit is required")),
    };
    let micro = parse_amount(flag, amount).map_err(|e| UsageError {
        accepted: PRICE_PER_GB_FORMS,
        ..e
    })?;
    let pico_per_byte = micro as u64 * PICO_PER_MICRO as u64 / bytes;
    if micro > 0 && pico_per_byte == 0 {
        return Err(bad("below the smallest egress price, 0.001/GB"));
    }
    Ok(pico_per_byte)
}

/// The credit (pico-units) after adding `micro` (negative: a charge) to a run whose credit is
/// `credit` and whose balance is `balance` (both pico-units). Refused, with why, when the balance
/// would leave -[`MAX_BALANCE_MICRO`]..=[`MAX_BALANCE_MICRO`]; nothing wraps.
pub fn credit_after(credit: i64, balance: i64, micro: i64) -> Result<i64, String> {
    let max = MAX_BALANCE_MICRO * PICO_PER_MICRO;
    let added = micro.checked_mul(PICO_PER_MICRO);
    let next_balance = added.and_then(|a| balance.checked_add(a));
    let next_credit = added.and_then(|a| credit.checked_add(a));
    match (next_balance, next_credit) {
        (Some(b), Some(c)) if (-max..=max).contains(&b) => Ok(c),
        _ if micro >= 0 => Err(format!(
            "the balance {} plus {} is above {}, the largest balance a run holds",
            format_amount(balance / PICO_PER_MICRO),
            format_amount(micro),
            format_amount(MAX_BALANCE_MICRO)
        )),
        _ => Err(format!(
            "the balance {} less {} is below -{}, the lowest balance a run holds",
            format_amount(balance / PICO_PER_MICRO),
            format_amount(micro.saturating_neg()),
            format_amount(MAX_BALANCE_MICRO)
        )),
    }
}

/// The balance in pico-units: credit less every debit, saturated (debits are u64 counters of
/// the kernel and grow with the run).
pub fn balance_pico(credit: i64, time_debit: i64, call_debit: u64, egress_debit: u64) -> i64 {
    let debit = |d: u64| i64::try_from(d).unwrap_or(i64::MAX);
    credit
        .saturating_sub(time_debit)
        .saturating_sub(debit(call_debit))
        .saturating_sub(debit(egress_debit))
}

/// The time debit in pico-units after `seconds` at `hour_micro` an hour, saturated.
pub fn time_debit_pico(hour_micro: i64, seconds: f64) -> i64 {
    // A float to int `as` saturates (and takes NaN to 0).
    let micro = (hour_micro as f64 * seconds / 3600.0) as i64;
    micro.saturating_mul(PICO_PER_MICRO)
}

/// Micro-units as text: `1.250000` → `1.25`.
pub fn format_amount(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    let text = format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The money side of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Prices {
    pub balance_micro: i64,
    pub call_micro: i64,
    /// `--call-gap`: payload on a TCP connection idle this long is a new call.
    #[serde(default = "default_call_gap")]
    pub call_gap_ns: u64,
    pub egress_pico_per_byte: u64,
    pub hour_micro: i64,
}

impl Default for Prices {
    fn default() -> Prices {
        Prices {
            balance_micro: 0,
            call_micro: 0,
            call_gap_ns: DEFAULT_CALL_GAP_NS,
            egress_pico_per_byte: 0,
            hour_micro: 0,
        }
    }
}

/// One second: longer than a client's pause between writes of one request, shorter than the
/// pause between two requests of a client that sends without waiting for replies.
pub const DEFAULT_CALL_GAP_NS: u64 = 1_000_000_000;
const MIN_CALL_GAP_NS: u64 = 1_000_000;
const MAX_CALL_GAP_NS: u64 = 3_600_000_000_000;
pub const CALL_GAP_FORMS: &str = "a duration from 1ms to 1h: 250ms, 1s, 30s";

fn default_call_gap() -> u64 {
    DEFAULT_CALL_GAP_NS
}

/// `--call-gap`: nanoseconds, 1 ms to 1 h.
pub fn parse_call_gap(flag: &str, text: &str) -> Result<u64, UsageError> {
    let duration = crate::units::parse_duration(flag, text)?;
    let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    if !(MIN_CALL_GAP_NS..=MAX_CALL_GAP_NS).contains(&ns) {
        return Err(error(flag, text, "out of range", CALL_GAP_FORMS));
    }
    Ok(ns)
}

/// What the run was charged, and what the gate refused.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LedgerSummary {
    pub balance_start_micro: i64,
    pub balance_end_micro: i64,
    pub topped_up_micro: i64,
    pub charged_calls_micro: i64,
    pub charged_egress_micro: i64,
    pub charged_time_micro: i64,
    /// Calls charged: new connections, requests on open connections, datagrams.
    pub calls: u64,
    /// Of `calls`, requests on connections already open.
    pub requests: u64,
    /// Bytes of packets with payload charged (whole IP packets).
    pub egress_bytes: u64,
    /// Calls refused because the balance could not pay them.
    pub blocked_calls: u64,
    /// Of `blocked_calls`, requests on open connections.
    pub refused_requests: u64,
    /// Connections nbt destroyed after a refused request (the client saw ECONNABORTED).
    pub connections_torn_down: u64,
    /// Packets with payload dropped: refused requests and what their connections sent after.
    pub blocked_packets: u64,
    /// `--call-gap` in milliseconds.
    pub call_gap_ms: f64,
    /// Per destination, "addr:port" (or "other destinations").
    pub destinations: std::collections::BTreeMap<String, DestinationCalls>,
}

/// Calls to one gated destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DestinationCalls {
    pub charged: u64,
    pub refused: u64,
    pub torn_down: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(parse_amount("--balance", "5"), Ok(5_000_000));
        assert_eq!(parse_amount("--balance", "0.25"), Ok(250_000));
        assert_eq!(parse_amount("--balance", "0.000001"), Ok(1));
        assert_eq!(parse_amount("--balance", "1000000"), Ok(MAX_AMOUNT_MICRO));
        for (text, problem) in [
            ("-5", "negative"),
            ("5$", "not an amount"),
            ("0.0000001", "more than 6 decimals"),
            ("1000001", "above 1000000"),
            ("", "not an amount"),
            ("1e3", "not an amount"),
        ] {
            let err = parse_amount("--balance", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
        assert_eq!(format_amount(1_250_000), "1.25");
        assert_eq!(format_amount(-10), "-0.00001");
        assert_eq!(format_amount(0), "0");
    }

    #[test]
    fn balances_stay_within_a_million_either_way() {
        let max = MAX_BALANCE_MICRO * PICO_PER_MICRO;
        // A run started with 1 has credit 1 (pico 10^6 per micro), no debits.
        let one = PICO_PER_MICRO * 1_000_000;
        assert_eq!(
            credit_after(one, one, MAX_BALANCE_MICRO - 1_000_000),
            Ok(max)
        );
        let err = credit_after(one, one, MAX_BALANCE_MICRO - 999_999).unwrap_err();
        assert!(err.contains("above 1000000"), "{err}");
        // A credit already high (debits took the balance down) adds as long as the balance fits.
        assert_eq!(credit_after(2 * max, max - 1, 0), Ok(2 * max));
        assert!(credit_after(i64::MAX, 0, 1).is_err());
        assert!(credit_after(0, 0, i64::MAX).is_err());
        // Charges: down to minus the maximum, not below.
        assert_eq!(credit_after(0, 0, -MAX_BALANCE_MICRO), Ok(-max));
        let err = credit_after(0, 0, -MAX_BALANCE_MICRO - 1).unwrap_err();
        assert!(err.contains("below -1000000"), "{err}");
        assert!(credit_after(i64::MIN, 0, -1).is_err());
    }

    #[test]
    fn debits_saturate() {
        assert_eq!(balance_pico(10, 1, 2, 3), 4);
        assert_eq!(balance_pico(0, 0, u64::MAX, u64::MAX), i64::MIN);
        assert_eq!(balance_pico(i64::MIN, i64::MAX, 0, 0), i64::MIN);
        assert_eq!(
            time_debit_pico(3_600_000_000, 1.0),
            1_000_000 * PICO_PER_MICRO
        );
        // A price of 10^6 an hour for a year is 8.76 x 10^21 pico-units: saturated, not wrapped.
        assert_eq!(time_debit_pico(MAX_AMOUNT_MICRO, 365.0 * 86400.0), i64::MAX);
    }

    #[test]
    fn call_gaps() {
        assert_eq!(parse_call_gap("--call-gap", "250ms"), Ok(250_000_000));
        assert_eq!(parse_call_gap("--call-gap", "1h"), Ok(MAX_CALL_GAP_NS));
        for text in ["0s", "999us", "61m"] {
            let err = parse_call_gap("--call-gap", text).unwrap_err();
            assert_eq!(err.problem, "out of range", "{text}");
            assert_eq!(err.accepted, CALL_GAP_FORMS);
        }
        assert!(parse_call_gap("--call-gap", "5").is_err());
        assert_eq!(Prices::default().call_gap_ns, DEFAULT_CALL_GAP_NS);
    }

    #[test]
    fn prices_per_gb() {
        assert_eq!(parse_price_per_gb("--price-egress", "0.09/GB"), Ok(90));
        assert_eq!(parse_price_per_gb("--price-egress", "1/GB"), Ok(1000));
        assert_eq!(parse_price_per_gb("--price-egress", "0.001/GB"), Ok(1));
        assert_eq!(parse_price_per_gb("--price-egress", "0/GB"), Ok(0));
        for (text, problem) in [
            ("0.09", "the unit is required"),
            ("0.09/TB", "unknown unit"),
            ("0.0001/GB", "below the smallest"),
            ("-1/GB", "negative"),
        ] {
            let err = parse_price_per_gb("--price-egress", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }
}
