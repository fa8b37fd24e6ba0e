//! Showing a [`Report`]: a table for the terminal, JSON for tools, and an SVG picture (see
//! `svg`) for people. Runs in the bench process after the last contender has stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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

/// Writes `report.svg` (and `report.json`) into `dir`, creating it; returns the SVG's path.
pub fn write_dir(report: &Report, dir: &Path) -> Result<PathBuf, ReportError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| ReportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(failed(dir))?;
    let svg = dir.join("report.svg");
    std::fs::write(&svg, super::svg::render(report)).map_err(failed(&svg))?;
    write_json(report, &dir.join("report.json"))?;
    Ok(svg)
}

/// A latency in µs, short: `870µs`, `2.4ms`, `1.20s`.
pub fn latency(us: u64) -> String {
    match us {
        0 => "-".to_owned(),
        1..=999 => format!("{us}µs"),
        1_000..=99_999 => format!("{:.1}ms", us as f64 / 1e3),
        100_000..=999_999 => format!("{:.0}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "∞".to_owned(), |v| format!("{v:.2}"))
}

fn index(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

/// `text` padded with spaces to `width` characters (not bytes: `µ` and `∞` are one each).
fn pad(text: &str, width: usize, right: bool) -> String {
    let len = text.chars().count();
    let fill = " ".repeat(width.saturating_sub(len));
    if right {
        format!("{fill}{text}")
    } else {
        format!("{text}{fill}")
    }
}

const COLUMNS: [(&str, usize); 16] = [
    ("contender", 20),
    ("capacity/s", 10),
    ("×rport", 6),
    ("rate/s", 8),
    ("errors", 6),
    ("p50", 7),
    ("p90", 7),
    ("p99", 7),
    ("p99.9", 7),
    ("max", 7),
    ("req J", 6),
    ("req max/min", 11),
    ("cpu J", 6),
    ("cpu max/min", 11),
    ("master/conn", 11),
    ("gen cpu", 7),
];

fn cells(row: &Row) -> Vec<String> {
    let l = &row.latency_us;
    vec![
        row.contender.clone(),
        row.capacity_rps
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
        row.capacity_vs_reuseport
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
        format!("{:.0}", row.achieved_rps),
        row.error_total.to_string(),
        latency(l.p50),
        latency(l.p90),
        latency(l.p99),
        latency(l.p999),
        latency(l.max),
        index(row.request_jain),
        ratio(row.request_max_min),
        index(row.cpu_jain),
        ratio(row.cpu_max_min),
        row.master
            .as_ref()
            .and_then(|m| m.us_per_connection)
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}µs")),
        format!("{:.2}", row.load_generator_cores),
    ]
}

fn workload_table(out: &mut String, w: &WorkloadReport, report: &Report) {
    let _ = writeln!(out, "{} — {}", w.workload.name(), w.description);
    if let Some(rate) = w.offered_rps {
        let _ = writeln!(
            out,
            "open loop at {rate:.0} req/s: {}; {} workers, {:.1} s per contender",
            w.basis, report.workers, report.duration_s
        );
    }
    let header: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (name, width))| pad(name, *width, i > 0))
        .collect();
    let _ = writeln!(out, "{}  req share %", header.join(" "));
    for row in &w.rows {
        if let Some(reason) = &row.unavailable {
            let _ = writeln!(
                out,
                "{} unavailable: {reason}",
                pad(&row.contender, COLUMNS[0].1, false)
            );
            continue;
        }
        let line: Vec<String> = cells(row)
            .iter()
            .zip(COLUMNS)
            .enumerate()
            .map(|(i, (cell, (_, width)))| pad(cell, width, i > 0))
            .collect();
        let spread: Vec<String> = row
            .workers
            .iter()
            .map(|w| format!("{:.0}", w.request_share * 100.0))
            .collect();
        let _ = writeln!(out, "{}  {}", line.join(" "), spread.join("/"));
    }
    for row in &w.rows {
        for warning in &row.warnings {
            let _ = writeln!(out, "  ! {}: {warning}", row.contender);
        }
    }
}

/// The report as a terminal table, one block per workload.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    for (i, w) in report.workloads.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        workload_table(&mut out, w, report);
    }
    let m = &report.machine;
    let _ = writeln!(
        out,
        "\nmachine: {} cores, Linux {}; load generator ({} threads) and servers share the cores. \
         Latency of open-loop runs counts from each request's scheduled send time. \
         ×rport = capacity over kernel-reuseport's; J = Jain's index (1 = even); master/conn = master CPU per connection; gen cpu = \
         load generator CPU in cores.",
        m.cores, m.kernel, m.load_generator_threads
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_read_short() {
        assert_eq!(latency(0), "-");
        assert_eq!(latency(870), "870µs");
        assert_eq!(latency(2_400), "2.4ms");
        assert_eq!(latency(250_000), "250ms");
        assert_eq!(latency(1_200_000), "1.20s");
    }

    #[test]
    fn pads_by_characters() {
        assert_eq!(pad("1µs", 5, true), "  1µs");
        assert_eq!(pad("∞", 3, false), "∞  ");
        assert_eq!(pad("toolong", 3, true), "toolong");
    }
}
