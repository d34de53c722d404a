//! The rate of a transfer from a receiver's reads, shared by the tests and `cargo xtask bench`
//! (which includes this file by path: xtask does not depend on the test crate).

/// Bits per second between `from` and `to` seconds: the least-squares slope of bytes received
/// against time over every read `(seconds, total bytes)` in the window; NaN with fewer than two.
///
/// Not the two reads at the window's edges: TCP on a short path delivers 64 KiB TSO bursts,
/// which at 512kbit come once a second, and a rate from the edges moves by a whole burst (9% of
/// 11 s at 512kbit) with where they fall. The slope over all reads does not.
pub fn slope_bits_per_sec(marks: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let window: Vec<(f64, f64)> = marks
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|&(t, b)| (t, b as f64))
        .collect();
    if window.len() < 2 {
        return f64::NAN;
    }
    let n = window.len() as f64;
    let (mean_t, mean_b) = window
        .iter()
        .fold((0.0, 0.0), |(st, sb), (t, b)| (st + t / n, sb + b / n));
    let (mut cov, mut var) = (0.0, 0.0);
    for (t, b) in &window {
        cov += (t - mean_t) * (b - mean_b);
        var += (t - mean_t) * (t - mean_t);
    }
    if var > 0.0 {
        cov / var * 8.0
    } else {
        f64::NAN
    }
}

/// Reads `stream` to its end, marking each read: (seconds since the first byte, bytes so far).
/// A read error ends the marks too; it is returned beside them.
pub fn read_marks(mut stream: impl std::io::Read) -> (Vec<(f64, u64)>, std::io::Result<()>) {
    let mut buffer = vec![0u8; 1 << 20];
    let (mut total, mut start, mut marks) = (0u64, None, Vec::new());
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (marks, Ok(())),
            Ok(n) => {
                let now = std::time::Instant::now();
                total += n as u64;
                marks.push((
                    now.duration_since(*start.get_or_insert(now)).as_secs_f64(),
                    total,
                ));
            }
            Err(err) => return (marks, Err(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_transfer_in_bursts_reads_at_its_rate() {
        // 64 KiB once a second (524,288 bit/s), the window's edges just after two bursts.
        let marks: Vec<(f64, u64)> = (0..15).map(|s| (s as f64, (s + 1) * 65536)).collect();
        let rate = slope_bits_per_sec(&marks, 1.9, 12.1);
        assert!((rate - 524_288.0).abs() < 1.0, "{rate}");
        assert!(slope_bits_per_sec(&marks, 3.5, 3.6).is_nan());
    }
}
