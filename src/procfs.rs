//! Every read of `/proc`, in one place: a process's resident set (`VmRSS` of
//! `/proc/PID/status`, for `--max-rss`), this process's open fds (the master's fd budget),
//! and for `handoff bench` CPU time (utime + stime of `/proc/PID/stat`), parent pids (to
//! find a node primary's workers), liveness and the kernel release. Plain file reads, no
//! other syscalls; the parsers are pure and tested on sample text.

use std::io;
#[cfg(any(feature = "control", feature = "prometheus"))]
use std::time::Duration;

/// Process `pid`'s resident set size in bytes, from `/proc/PID/status`.
pub fn rss(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS line in /proc/{pid}/status"),
        )
    })
}

/// The resident set size in bytes from the text of `/proc/PID/status` (its `VmRSS:` line,
/// in KiB).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(kib * 1024),
        Some(_) => None,
    }
}

/// How many fds this process has open now (the entries of `/proc/self/fd`, less the one
/// the listing itself uses).
pub fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

#[cfg(any(feature = "control", feature = "prometheus"))]
/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and `)`).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

#[cfg(any(feature = "control", feature = "prometheus"))]
fn parse_stat(stat: &str) -> Option<Vec<String>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

#[cfg(any(feature = "control", feature = "prometheus"))]
/// User + system CPU time `pid` has used, or `None` if it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let fields = stat_fields(pid)?;
    ticks_to_time(&fields, crate::sys::process::clock_ticks_per_second())
}

#[cfg(any(feature = "control", feature = "prometheus"))]
fn ticks_to_time(fields: &[String], ticks_per_second: u64) -> Option<Duration> {
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    let per_second = ticks_per_second.max(1);
    Some(
        Duration::from_secs(ticks / per_second)
            + Duration::from_secs_f64((ticks % per_second) as f64 / per_second as f64),
    )
}

#[cfg(feature = "cli")]
/// Whether `pid` exists and has not exited (a zombie counts as gone).
pub fn is_running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| state != "Z" && state != "X"))
}

#[cfg(feature = "cli")]
/// The processes whose parent is `pid`, in pid order.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            stat_fields(*child)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|parent| parent == pid)
        })
        .collect();
    found.sort_unstable();
    found
}

#[cfg(feature = "cli")]
/// The running kernel (`/proc/sys/kernel/osrelease`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status_text() {
        let text = "Name:\thandoff\nVmPeak:\t  9999 kB\nVmRSS:\t    5120 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(text), Some(5120 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None, "kernel threads have none");
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn reads_this_process_s_rss_and_fds() {
        let rss = rss(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert!(open_fds().unwrap() >= 3, "stdin, stdout, stderr");
    }

    #[cfg(feature = "cli")]
    #[test]
    fn parses_stat_with_a_strange_command_name() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        let fields = parse_stat(stat).unwrap();
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "1");
        assert_eq!(ticks_to_time(&fields, 100), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat("no name here"), None);
    }

    #[cfg(feature = "cli")]
    #[test]
    fn this_process_is_running_and_uses_cpu() {
        let me = std::process::id();
        assert!(is_running(me));
        assert!(cpu_time(me).is_some());
        assert!(!kernel_release().is_empty());
    }
}
