//! Small readers of the process table and the clock, shared by every layer above.

use std::fs;

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid it names one process, even after the pid is reused.
pub fn process_start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 22)
}

/// `PF_KTHREAD` (include/linux/sched.h) in a task's flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether `pid` is a kernel thread, from its flags (field 9 of /proc/PID/stat); None when there
/// is no such process. Not from an empty command line: a process in the middle of an exec, its
/// new memory not yet given its arguments, reads as one too.
pub fn is_kernel_thread(pid: i32) -> Option<bool> {
    stat_field(pid, 9).map(|flags| flags & PF_KTHREAD != 0)
}

/// Field `n` (numbered from 1, as in proc(5); a numeric one, 4 and on) of /proc/PID/stat.
fn stat_field(pid: i32, n: usize) -> Option<u64> {
    stat_word(pid, n)?.parse().ok()
}

/// Field `n` (3 and on: after the command name) of /proc/PID/stat, as written there.
fn stat_word(pid: i32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after
        .split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

/// Seconds since the Unix epoch, 0 when the clock is before it.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process with an empty command line is not a kernel thread: a zombie has none, as has a
    /// process in the middle of an exec (`nbt attach --pid` on a target started a moment before
    /// called it a kernel thread, once in a run of the integration tests with the other core
    /// busy).
    #[test]
    fn only_kernel_threads_read_as_kernel_threads() {
        assert_eq!(is_kernel_thread(std::process::id() as i32), Some(false));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it has exited.
        let zombie = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            stat_word(pid, 3).as_deref() == Some("Z")
        });
        assert!(zombie, "process {pid} did not become a zombie");
        assert_eq!(fs::read(format!("/proc/{pid}/cmdline")).unwrap(), b"");
        assert_eq!(is_kernel_thread(pid), Some(false));
        child.wait().unwrap();
        // kthreadd, where this pid namespace shows it.
        if fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert_eq!(is_kernel_thread(2), Some(true));
        }
        assert_eq!(is_kernel_thread(i32::MAX), None);
    }
}
