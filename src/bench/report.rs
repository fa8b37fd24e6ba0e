//! Showing a [`Report`]: a table for the terminal, JSON for tools, and an SVG picture (see
//! `svg`) for people, written together into one folder per run. Runs in the bench process
//! after the last contender has stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::format::{latency, pad, seconds, utc_stamp, wrap};
use super::{Report, Row, WorkloadReport};

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Turning the report into JSON.
    #[error("encoding the report as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// Writing a file.
    #[error("writing {path:?}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Writes the report as pretty JSON to `path`.
pub fn write_json(report: &Report, path: &Path) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(report).map_err(ReportError::Encode)?;
    std::fs::write(path, text + "\n").map_err(|source| ReportError::Write {
        path: path.to_owned(),
        source,
    })
}

/// What a run leaves in its folder.
pub const FILES: [&str; 3] = ["report.svg", "report.json", "table.txt"];

/// Writes the picture, the JSON and the table ([`FILES`]) into `dir`, creating it.
pub fn write_dir(report: &Report, dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(failed(dir))?;
    let svg = dir.join(FILES[0]);
    std::fs::write(&svg, super::svg::render(report)).map_err(failed(&svg))?;
    write_json(report, &dir.join(FILES[1]))?;
    let text = dir.join(FILES[2]);
    std::fs::write(&text, table(report)).map_err(failed(&text))
}

/// A new folder under `base` named after `now` in UTC (`20261204-063455Z`, then `-2`, `-3`…
/// if a run in the same second took it), created with its parents.
pub fn new_run_dir(base: &Path, now: SystemTime) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(base).map_err(failed(base))?;
    let stamp = utc_stamp(now);
    let mut n = 1;
    loop {
        let name = if n == 1 {
            stamp.clone()
        } else {
            format!("{stamp}-{n}")
        };
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(source) => return Err(ReportError::Write { path: dir, source }),
        }
    }
}

fn failed(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError {
    let path = path.to_owned();
    move |source| ReportError::Write { path, source }
}

/// The widest a line of the table gets (the legend, warnings and notes are wrapped to it).
pub const TABLE_WIDTH: usize = 120;

/// The columns: name and width; all but the first are right-aligned. The per-worker shares
/// follow, unpadded.
const COLUMNS: [(&str, usize); 10] = [
    ("contender", 20),
    ("capacity/s", 13),
    ("vs reuseport", 12),
    ("errors", 6),
    ("p50", 6),
    ("p99", 6),
    ("p99.9", 6),
    ("max", 6),
    ("evenness", 8),
    ("master/conn", 11),
];

/// The legend printed above the tables: each column in words.
fn legend(report: &Report) -> Vec<(&'static str, String)> {
    let runs = match report.capacity_runs {
        0 => "not measured when --rate fixes the rate".to_owned(),
        1 => "one run".to_owned(),
        n => format!(
            "lowest–highest of {n} runs of {} each",
            seconds(report.capacity_duration_s)
        ),
    };
    vec![
        (
            "capacity/s",
            format!("requests per second with clients sending as fast as they can (closed loop): {runs}"),
        ),
        (
            "vs reuseport",
            "median capacity over kernel-reuseport's (every worker accepting on its own SO_REUSEPORT socket)".to_owned(),
        ),
        (
            "errors",
            "failed requests at the offered rate (open loop); p50, p99, p99.9 and max are the latencies of that run, \
             counted from each request's scheduled send time".to_owned(),
        ),
        (
            "evenness",
            "Jain's index of the requests per worker: 1.000 when every worker took the same share, 0.500 when half \
             of them did all the work".to_owned(),
        ),
        (
            "master/conn",
            "CPU time the master spent per connection it handed to a worker (the kernel contenders have no master \
             accepting)".to_owned(),
        ),
        ("shares %", "each worker's percentage of the requests".to_owned()),
    ]
}

fn cells(row: &Row) -> Vec<String> {
    let l = &row.latency_us;
    let dash = || "-".to_owned();
    vec![
        row.contender.clone(),
        row.capacity
            .as_ref()
            .map_or_else(dash, |c| format!("{:.0}–{:.0}", c.min_rps, c.max_rps)),
        row.capacity_vs_reuseport
            .map_or_else(dash, |r| format!("{r:.2}×")),
        row.error_total.to_string(),
        latency(l.p50),
        latency(l.p99),
        latency(l.p999),
        latency(l.max),
        row.request_jain.map_or_else(dash, |j| format!("{j:.3}")),
        row.master
            .as_ref()
            .and_then(|m| m.us_per_connection)
            .map_or_else(dash, |us| format!("{us:.1}µs")),
    ]
}

/// Each worker's share as `31/27/15/27`, or `9–21% of 8` when that would be long.
fn shares(row: &Row) -> String {
    let percent: Vec<f64> = row
        .workers
        .iter()
        .map(|w| w.request_share * 100.0)
        .collect();
    let each = percent
        .iter()
        .map(|p| format!("{p:.0}"))
        .collect::<Vec<_>>()
        .join("/");
    if each.chars().count() <= 18 {
        return each;
    }
    let lo = percent.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = percent.iter().copied().fold(0.0, f64::max);
    format!("{lo:.0}–{hi:.0}% of {}", percent.len())
}

/// `prefix` and `text`, wrapped to [`TABLE_WIDTH`], as lines of `out`.
fn line(out: &mut String, prefix: &str, text: &str, indent: &str) {
    for part in wrap(prefix, text, TABLE_WIDTH, indent) {
        let _ = writeln!(out, "{part}");
    }
}

/// The lines above a workload's rows: what it is, its verdict, the rate offered, the
/// generator's CPU.
fn workload_head(out: &mut String, w: &WorkloadReport, report: &Report) {
    let title = format!("{} — {}", w.workload.name(), w.description);
    line(out, "", &title, "  ");
    if let Some(verdict) = &w.verdict {
        line(out, "verdict: ", verdict, "  ");
    }
    let ran: Vec<&Row> = w.rows.iter().filter(|r| r.unavailable.is_none()).collect();
    let generator = ran.iter().map(|r| r.load_generator_cores);
    let lo = generator.clone().fold(f64::INFINITY, f64::min);
    let hi = generator.fold(0.0, f64::max);
    let rate = w.offered_rps.map_or_else(String::new, |r| {
        format!("open loop at {r:.0} req/s, {}; ", w.basis)
    });
    let generator = if ran.is_empty() {
        String::new()
    } else {
        format!("; the load generator used {lo:.2}–{hi:.2} cores")
    };
    let text = format!(
        "{rate}{} workers, {} per contender{generator}",
        report.workers,
        seconds(report.duration_s)
    );
    line(out, "", &text, "  ");
}

fn workload_table(out: &mut String, w: &WorkloadReport, report: &Report) {
    workload_head(out, w, report);
    let header: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (name, width))| pad(name, *width, i > 0))
        .collect();
    let _ = writeln!(out, "{}  shares %", header.join(" "));
    for row in &w.rows {
        if let Some(reason) = &row.unavailable {
            let name = pad(&row.contender, COLUMNS[0].1 + 1, false);
            line(out, &name, &format!("unavailable: {reason}"), "  ");
            continue;
        }
        let cells: Vec<String> = cells(row)
            .iter()
            .zip(COLUMNS)
            .enumerate()
            .map(|(i, (cell, (_, width)))| pad(cell, width, i > 0))
            .collect();
        let _ = writeln!(out, "{}  {}", cells.join(" "), shares(row));
    }
    for row in &w.rows {
        for warning in &row.warnings {
            line(
                out,
                "  ! ",
                &format!("{}: {warning}", row.contender),
                "    ",
            );
        }
    }
}

/// The report as a terminal table no wider than [`TABLE_WIDTH`]: a legend, then one block
/// per workload with its verdict, then the machine.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let intro = "How to read the tables: every contender runs the same workers on this machine, \
                 one after the other.";
    line(&mut out, "", intro, "");
    let indent = " ".repeat(16);
    for (name, meaning) in legend(report) {
        line(
            &mut out,
            &format!("  {} ", pad(name, 13, false)),
            &meaning,
            &indent,
        );
    }
    for w in &report.workloads {
        out.push('\n');
        workload_table(&mut out, w, report);
    }
    let m = &report.machine;
    out.push('\n');
    line(
        &mut out,
        "",
        &format!(
            "machine: {} cores, Linux {}; the load generator ({} threads) and the servers share the cores.",
            m.cores, m.kernel, m.load_generator_threads
        ),
        "  ",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn run_folders_are_named_by_utc_time_and_never_reused() {
        let base = tempfile::tempdir().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_796_366_095);
        let first = new_run_dir(&base.path().join("target/bench"), t).unwrap();
        assert!(first.ends_with("target/bench/20261204-063455Z") && first.is_dir());
        let second = new_run_dir(&base.path().join("target/bench"), t).unwrap();
        assert!(second.ends_with("20261204-063455Z-2"), "{second:?}");
    }
}
