//! `ledger`: the run's simulated money. Amounts are integers of micro-units at the edges (flags,
//! summary, receipts) and pico-units inside the kernel (see `nbt_common::gate`), so that a price
//! per byte is a whole number. No floats touch the balance.

use serde::Serialize;

use crate::error::UsageError;

pub const PICO_PER_MICRO: i64 = 1_000_000;
/// The largest balance or top-up: i64 pico-units hold 9.2 million units; keep a margin.
pub const MAX_AMOUNT_MICRO: i64 = 1_000_000 * 1_000_000;

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

/// Micro-units as text: `1.250000` → `1.25`.
pub fn format_amount(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    let text = format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The money side of a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Prices {
    pub balance_micro: i64,
    pub call_micro: i64,
    pub egress_pico_per_byte: u64,
    pub hour_micro: i64,
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
    pub calls: u64,
    pub egress_bytes: u64,
    pub blocked_calls: u64,
    pub blocked_packets: u64,
    /// Refused calls and packets per destination, "addr:port" → count.
    pub blocked_by_destination: std::collections::BTreeMap<String, u64>,
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
