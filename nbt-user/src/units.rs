//! Parsing of the units nbt accepts on the command line and in profiles.
//!
//! Every parser names what it accepts, so a bad value can be reported as: the flag, the value, and
//! the accepted forms (docs/running.md, "`nbt run`"). Every parser also bounds what it returns
//! (docs/running.md, "Limits on input"), so that the products later made of these values fit.

use std::time::Duration;

use crate::error::UsageError;

pub const SIZE_FORMS: &str = "a byte count with a unit: 512K, 512M, 6G, 1T (powers of 1024; also \
     KiB/MiB/GiB/TiB), 500MB, 6GB (powers of 1000), or 0; at most 2^53 bytes (8192T)";
pub const RATE_FORMS: &str =
    "bits per second as tc writes them: 512kbit, 10mbit, 1gbit (powers of \
     1000), or bytes per second: 64KB/s, 10MB/s (powers of 1000), 64KiB/s (powers of 1024)";
pub const PERCENT_FORMS: &str =
    "a percentage from 0% to 100% (5%, 0.5%) or a fraction from 0 to 1 (0.05)";
pub const DURATION_FORMS: &str =
    "a number with a unit: 500us, 100ms, 2s, 1.5s, 5m, 1h; at most 365 days (8760h)";
pub const CPUS_FORMS: &str = "a number of cores greater than 0 and at most the CPUs online, \
     up to 3 decimals: 0.5, 1, 2.25";
pub const COUNT_FORMS: &str = "a whole number greater than 0";

/// The largest size nbt takes: 2^53 bytes (8 PiB), far above any machine's memory. Sizes are
/// written into receipts as JSON numbers, which hold integers exactly only up to 2^53: a larger
/// one ran the workload and then failed to write its receipt.
pub const MAX_SIZE: u64 = 1 << 53;

/// The longest duration nbt takes: a year. Anything longer is a typo, and the bound keeps every
/// duration in nanoseconds (and a schedule's times, a year times its 100,000 actions, in
/// milliseconds) far inside a u64.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn error(
    flag: &str,
    value: &str,
    problem: impl Into<String>,
    accepted: &'static str,
) -> UsageError {
    UsageError {
        flag: flag.to_string(),
        value: value.to_string(),
        problem: problem.into(),
        accepted,
    }
}

/// Splits "12.5ms" into (12.5, "ms"). The number must be plain decimal: no sign, no exponent, so
/// never negative or NaN; `Err("too large")` for one of so many digits that it is infinite.
fn split_number(text: &str) -> Option<Result<(f64, &str), &'static str>> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    if number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    Some(if value.is_finite() {
        Ok((value, unit.trim()))
    } else {
        Err("too large")
    })
}

/// [`split_number`] with its refusals as `bad` makes them: `what` names the kind of value.
fn number_and_unit<'a>(
    text: &'a str,
    what: &str,
    bad: impl Fn(&str) -> UsageError,
) -> Result<(f64, &'a str), UsageError> {
    match split_number(text.trim()) {
        None => Err(bad(&format!("not a {what}"))),
        Some(Err(problem)) => Err(bad(problem)),
        Some(Ok(split)) => Ok(split),
    }
}

fn to_u64(value: f64) -> Option<u64> {
    (value.is_finite() && value >= 0.0 && value < u64::MAX as f64).then_some(value as u64)
}

/// Sizes in bytes. `K`/`M`/`G`/`T` and `KiB`.. are powers of 1024, `KB`/`MB`.. powers of 1000.
pub fn parse_size(flag: &str, text: &str) -> Result<u64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, SIZE_FORMS);
    let (number, unit) = number_and_unit(text, "size", bad)?;
    let multiplier: u64 = match unit {
        "" if number == 0.0 => 1,
        "" => return Err(bad("a unit is required (bytes are written 4096B)")),
        "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        "G" | "g" | "GiB" => 1 << 30,
        "T" | "t" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u if u.ends_with('b') || u.to_ascii_lowercase().ends_with("bit") => {
            return Err(bad(
                "a lower-case b means bits; sizes are bytes (write M or MB)",
            ))
        }
        _ => return Err(bad("unknown unit")),
    };
    match to_u64(number * multiplier as f64) {
        Some(bytes) if bytes <= MAX_SIZE => Ok(bytes),
        _ => Err(bad(
            "too large: above 2^53 bytes (8192T), the largest size nbt takes",
        )),
    }
}

/// Rates, returned in bits per second.
pub fn parse_rate(flag: &str, text: &str) -> Result<u64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, RATE_FORMS);
    let (number, unit) = number_and_unit(text, "rate", bad)?;
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "bps" | "kbps" | "mbps" | "gbps" | "tbps") {
        return Err(bad(&format!(
            "'{unit}' is ambiguous: tc reads it as bytes per second, most people mean bits; \
             write {n}{p}bit for bits per second or {n}{P}B/s for bytes per second",
            n = text.trim().trim_end_matches(unit),
            p = &lower[..lower.len() - 3],
            P = lower[..lower.len() - 3].to_ascii_uppercase(),
        )));
    }
    let bits_per_second: f64 = match unit {
        "" => return Err(bad("a unit is required")),
        "B/s" => 8.0,
        "KB/s" | "kB/s" => 8e3,
        "MB/s" => 8e6,
        "GB/s" => 8e9,
        "KiB/s" => 8.0 * 1024.0,
        "MiB/s" => 8.0 * 1024.0 * 1024.0,
        "GiB/s" => 8.0 * 1024.0 * 1024.0 * 1024.0,
        _ => match lower.trim_end_matches("/s") {
            "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            _ => return Err(bad("unknown unit")),
        },
    };
    to_u64(number * bits_per_second).ok_or_else(|| bad("too large"))
}

/// Percentages, returned as a fraction in 0..=1.
pub fn parse_percent(flag: &str, text: &str) -> Result<f64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, PERCENT_FORMS);
    let (number, unit) = number_and_unit(text, "percentage", bad)?;
    let fraction = match unit {
        "%" => number / 100.0,
        "" if number <= 1.0 => number,
        "" => {
            return Err(bad(
                "a bare number above 1 is ambiguous: write it with % (5%)",
            ))
        }
        _ => return Err(bad("unknown unit")),
    };
    if fraction > 1.0 {
        return Err(bad("above 100%"));
    }
    Ok(fraction)
}

/// Durations. A bare number is refused: 100 could be ms or s.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, DURATION_FORMS);
    let (number, unit) = number_and_unit(text, "duration", bad)?;
    let seconds = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "" => return Err(bad("a unit is required")),
        _ => return Err(bad("unknown unit")),
    };
    match Duration::try_from_secs_f64(number * seconds) {
        Ok(duration) if duration <= MAX_DURATION => Ok(duration),
        _ => Err(bad(
            "too large: above 365 days, the longest duration nbt takes",
        )),
    }
}

/// The CPUs online (`sysconf(_SC_NPROCESSORS_ONLN)`, which glibc reads from
/// /sys/devices/system/cpu/online); 1 if it cannot be read.
pub fn online_cpus() -> u64 {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(online).unwrap_or(0).max(1)
}

/// CPU cores as a decimal, returned in thousandths of a core; at most the CPUs online (a quota
/// above them limits nothing, and one far above them overflowed the kernel's quota).
pub fn parse_cpus(flag: &str, text: &str) -> Result<u64, UsageError> {
    parse_cpus_up_to(flag, text, online_cpus())
}

/// [`parse_cpus`] on a machine with `online` CPUs.
pub fn parse_cpus_up_to(flag: &str, text: &str, online: u64) -> Result<u64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, CPUS_FORMS);
    let (number, unit) = number_and_unit(text, "number of cores", bad)?;
    if !unit.is_empty() {
        return Err(bad("no unit is taken"));
    }
    if number > online as f64 {
        return Err(bad(&format!(
            "above the {online} CPUs online (/sys/devices/system/cpu/online)"
        )));
    }
    let millicores = number * 1000.0;
    if millicores.fract() > 1e-6 {
        return Err(bad("more than 3 decimals"));
    }
    match to_u64(millicores.round()) {
        Some(0) => Err(bad("must be greater than 0")),
        Some(m) => Ok(m),
        None => Err(bad("too large")),
    }
}

/// Positive whole numbers (process counts and the like).
pub fn parse_count(flag: &str, text: &str) -> Result<u64, UsageError> {
    let bad = |problem: &str| error(flag, text, problem, COUNT_FORMS);
    match text.trim().parse::<u64>() {
        Ok(0) => Err(bad("must be greater than 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(bad("not a whole number")),
    }
}

/// Human-readable size, powers of 1024, for summaries.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Human-readable rate in bits per second, as tc writes it.
pub fn format_rate(bits_per_second: u64) -> String {
    match bits_per_second {
        r if r >= 1_000_000_000 && r % 1_000_000_000 == 0 => format!("{}gbit", r / 1_000_000_000),
        r if r >= 1_000_000 && r % 1_000_000 == 0 => format!("{}mbit", r / 1_000_000),
        r if r >= 1_000 && r % 1_000 == 0 => format!("{}kbit", r / 1_000),
        r => format!("{r}bit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_form() {
        let cases = [
            ("0", 0),
            ("4096B", 4096),
            ("512K", 512 << 10),
            ("512k", 512 << 10),
            ("512M", 512 << 20),
            ("6G", 6 << 30),
            ("6g", 6 << 30),
            ("1T", 1 << 40),
            ("512MiB", 512 << 20),
            ("6GiB", 6 << 30),
            ("500MB", 500_000_000),
            ("6GB", 6_000_000_000),
            ("10KB", 10_000),
            ("1.5G", 3 << 29),
            (" 128M ", 128 << 20),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size("--memory", text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn sizes_rejected_with_reason() {
        for (text, problem) in [
            ("", "not a size"),
            ("M", "not a size"),
            ("-1G", "not a size"),
            ("1e9", "unknown unit"),
            ("512", "a unit is required"),
            ("512Mb", "lower-case b means bits"),
            ("512mbit", "lower-case b means bits"),
            ("6X", "unknown unit"),
            ("1.2.3G", "not a size"),
            ("99999999999T", "too large"),
        ] {
            let err = parse_size("--memory", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
            assert_eq!(err.flag, "--memory");
            assert!(err.to_string().contains("--memory") && err.to_string().contains("512M"));
        }
    }

    #[test]
    fn rates_in_every_form() {
        let cases = [
            ("512kbit", 512_000),
            ("512Kbit", 512_000),
            ("10mbit", 10_000_000),
            ("10Mbit/s", 10_000_000),
            ("1gbit", 1_000_000_000),
            ("1tbit", 1_000_000_000_000),
            ("800bit", 800),
            ("64KB/s", 512_000),
            ("1MB/s", 8_000_000),
            ("1GB/s", 8_000_000_000),
            ("100B/s", 800),
            ("64KiB/s", 524_288),
            ("1MiB/s", 8_388_608),
            ("1GiB/s", 8_589_934_592),
            ("1.5mbit", 1_500_000),
        ];
        for (text, bps) in cases {
            assert_eq!(parse_rate("--egress-rate", text), Ok(bps), "{text}");
        }
    }

    #[test]
    fn rates_rejected_with_reason() {
        let err = parse_rate("--egress-rate", "512kbps").unwrap_err();
        assert!(err.problem.contains("ambiguous"), "{err}");
        assert!(
            err.problem.contains("512kbit") && err.problem.contains("512KB/s"),
            "{err}"
        );
        let err = parse_rate("--egress-rate", "10Mbps").unwrap_err();
        assert!(
            err.problem.contains("10mbit") && err.problem.contains("10MB/s"),
            "{err}"
        );
        for (text, problem) in [
            ("512", "a unit is required"),
            ("fast", "not a rate"),
            ("10mb", "unknown unit"),
            ("5 furlongs", "unknown unit"),
        ] {
            let err = parse_rate("--egress-rate", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("--loss", "5%"), Ok(0.05));
        assert_eq!(parse_percent("--loss", "0.05"), Ok(0.05));
        assert_eq!(parse_percent("--loss", "100%"), Ok(1.0));
        assert_eq!(parse_percent("--loss", "0"), Ok(0.0));
        assert_eq!(parse_percent("--loss", "1"), Ok(1.0));
        assert!((parse_percent("--loss", "0.5%").unwrap() - 0.005).abs() < 1e-12);
        for (text, problem) in [
            ("101%", "above 100%"),
            ("5", "ambiguous"),
            ("-5%", "not a percentage"),
            ("5 pct", "unknown unit"),
        ] {
            let err = parse_percent("--loss", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("--latency", "100ms"),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            parse_duration("--latency", "2s"),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            parse_duration("--latency", "1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("--latency", "500us"),
            Ok(Duration::from_micros(500))
        );
        assert_eq!(
            parse_duration("--latency", "250µs"),
            Ok(Duration::from_micros(250))
        );
        assert_eq!(
            parse_duration("--latency", "10ns"),
            Ok(Duration::from_nanos(10))
        );
        assert_eq!(
            parse_duration("--latency", "5m"),
            Ok(Duration::from_secs(300))
        );
        assert_eq!(
            parse_duration("--latency", "1h"),
            Ok(Duration::from_secs(3600))
        );
        for (text, problem) in [
            ("100", "a unit is required"),
            ("100 parsecs", "unknown unit"),
            ("-1s", "not a duration"),
        ] {
            let err = parse_duration("--latency", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("--cpus", "0.5"), Ok(500));
        assert_eq!(parse_cpus("--cpus", "2"), Ok(2000));
        assert_eq!(parse_cpus("--cpus", "1.25"), Ok(1250));
        assert_eq!(parse_cpus("--cpus", "0.001"), Ok(1));
        for (text, problem) in [
            ("0", "greater than 0"),
            ("0.0001", "more than 3 decimals"),
            ("-1", "not a number"),
            ("2cores", "no unit"),
        ] {
            let err = parse_cpus("--cpus", text).unwrap_err();
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("--pids", "32"), Ok(32));
        assert!(parse_count("--pids", "0")
            .unwrap_err()
            .problem
            .contains("greater than 0"));
        assert!(parse_count("--pids", "3.5")
            .unwrap_err()
            .problem
            .contains("whole number"));
        assert!(parse_count("--pids", "-3")
            .unwrap_err()
            .problem
            .contains("whole number"));
    }

    #[test]
    fn sizes_up_to_2_to_the_53() {
        assert_eq!(parse_size("--memory", "8192T"), Ok(MAX_SIZE));
        assert_eq!(parse_size("--memory", "9007199254740992B"), Ok(MAX_SIZE));
        for text in ["9007199254740994B", "8193T", "16000000T", &"9".repeat(400)] {
            let err = parse_size("--memory", text).unwrap_err();
            assert!(err.problem.contains("too large"), "{text}: {err}");
        }
    }

    #[test]
    fn durations_up_to_a_year() {
        assert_eq!(parse_duration("--latency", "8760h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("--latency", "525600m"), Ok(MAX_DURATION));
        for text in [
            "8760.001h",
            "31536000.000001s",
            "10000000000000000000s",
            "1000000000000000000000000000000h",
            &format!("{}s", "9".repeat(400)),
        ] {
            let err = parse_duration("--latency", text).unwrap_err();
            assert!(err.problem.contains("too large"), "{text}: {err}");
        }
        // No sign, no exponent, no NaN or infinity: none is a plain decimal number.
        for text in ["-1s", "1e19s", "NaNs", "infs", "inf"] {
            assert!(parse_duration("--latency", text).is_err(), "{text}");
        }
    }

    #[test]
    fn cpus_up_to_the_cpus_online() {
        assert_eq!(parse_cpus_up_to("--cpus", "2", 2), Ok(2000));
        let err = parse_cpus_up_to("--cpus", "2.001", 2).unwrap_err();
        assert!(err.problem.contains("above the 2 CPUs online"), "{err}");
        let err = parse_cpus_up_to("--cpus", "184467440737.11", 2).unwrap_err();
        assert!(err.problem.contains("above the 2 CPUs online"), "{err}");
        assert!(online_cpus() >= 1);
        let online = online_cpus().to_string();
        assert_eq!(parse_cpus("--cpus", &online), Ok(online_cpus() * 1000));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(6 << 30), "6.0 GiB");
        assert_eq!(format_rate(512_000), "512kbit");
        assert_eq!(format_rate(10_000_000), "10mbit");
        assert_eq!(format_rate(1_500), "1500bit");
    }
}
