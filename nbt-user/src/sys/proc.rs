//! Small readers of the process table and the clock, shared by every layer above.

use std::fs;

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid it names one process, even after the pid is reused.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Seconds since the Unix epoch, 0 when the clock is before it.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
