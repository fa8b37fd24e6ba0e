//! The proxy benchmark's table for the terminal (and `table.txt`). Runs in the bench process
//! after the last frontend has stopped.

use std::fmt::Write as _;

use super::{Backend, ProxyReport, ProxyRow};
use crate::bench::format::{latency, pad, seconds, wrap};
use crate::bench::load::Arrivals;
use crate::bench::report::TABLE_WIDTH;

/// The columns: name and width; all but the first are right-aligned. The shares per backend
/// follow, unpadded.
const COLUMNS: [(&str, usize); 10] = [
    ("contender", 18),
    ("capacity/s", 11),
    ("errors", 6),
    ("p50", 6),
    ("p99", 6),
    ("p99.9", 6),
    ("max", 6),
    ("±1 of least", 11),
    ("most above", 10),
    ("cores", 5),
];

/// What every reader of the table should know, whatever the run.
const NOTES: [&str; 3] = [
    "±1 of least: the share of samples in which every backend had at most one connection in flight more than the \
     least loaded one; most above: the largest such gap seen. In flight is counted at the load generator (from \
     connect to answer, attributed to the backend that answered), so it includes the frontend's own accept and connect.",
    "haproxy-leastconn runs one process with one thread per worker (nbthread), mode tcp. nginx-least-conn runs \
     worker_processes = workers with least_conn and a shared zone, so the least is taken across all its workers; \
     without the zone nginx's least_conn counts only each worker's own connections. Debian's nginx has no stream \
     (TCP) module unless libnginx-mod-stream is installed, so nginx proxies HTTP (it parses each request; the \
     others relay bytes).",
    "cores: CPU the frontend's processes used during the window (1.0 = one core busy); the backends and the load \
     generator share the same cores.",
];

fn cells(row: &ProxyRow) -> Vec<String> {
    let l = &row.latency_us;
    let dash = || "-".to_owned();
    vec![
        row.contender.clone(),
        row.capacity
            .as_ref()
            .map_or_else(dash, |c| format!("{:.0}–{:.0}", c.min_rps, c.max_rps)),
        row.error_total.to_string(),
        latency(l.p50),
        latency(l.p99),
        latency(l.p999),
        latency(l.max),
        if row.in_flight.samples > 0 {
            format!("{:.1}%", row.in_flight.within_one * 100.0)
        } else {
            dash()
        },
        row.in_flight.max_above_least.to_string(),
        format!("{:.2}", row.frontend_cores),
    ]
}

/// What a request costs a backend, e.g. `50 µs CPU + 1.0 ms wait`.
fn cost(backend: &Backend) -> String {
    let work = format!("{} µs CPU", backend.work_us);
    if backend.wait_us == 0 {
        return work;
    }
    format!("{work} + {} wait", latency(backend.wait_us))
}

/// The report as text: a header, one line per frontend with its shares per backend, the
/// warnings, the verdict and the notes.
pub fn table(report: &ProxyReport) -> String {
    let mut out = String::new();
    let slow = report.backends.first();
    let fast = report.backends.get(1);
    let _ = writeln!(
        out,
        "handoff bench --proxy: {} backends, one request at a time each (b0: {}, the others {}), {} workers per frontend, a new connection per request",
        report.backends.len(),
        slow.map_or_else(String::new, cost),
        fast.map_or_else(String::new, cost),
        report.workers,
    );
    let _ = writeln!(
        out,
        "offered {:.0} req/s to each ({}), {}; {} measured per frontend; in flight sampled every {} ms",
        report.offered_rps,
        report.basis,
        match report.arrivals {
            Arrivals::Even => "arriving at an even pace",
            Arrivals::Poisson => "arriving independently (Poisson, the same seeded sequence for each)",
        },
        seconds(report.duration_s),
        report.sample_every_ms,
    );
    let m = &report.machine;
    let _ = writeln!(
        out,
        "machine: {} cores, Linux {}; the load generator shares the cores with the frontend and the backends\n",
        m.cores, m.kernel
    );
    let mut header = String::new();
    for (i, (name, width)) in COLUMNS.iter().enumerate() {
        header.push_str(&pad(name, *width, i > 0));
        header.push_str("  ");
    }
    header.push_str("shares % (b0 b1 …)");
    let _ = writeln!(out, "{header}");
    for row in &report.rows {
        if let Some(reason) = &row.unavailable {
            let line = wrap(
                &format!("{}  not run: ", pad(&row.contender, COLUMNS[0].1, false)),
                reason,
                TABLE_WIDTH,
                "    ",
            );
            let _ = writeln!(out, "{}", line.join("\n"));
            continue;
        }
        let mut line = String::new();
        for (i, (cell, (_, width))) in cells(row).iter().zip(COLUMNS).enumerate() {
            line.push_str(&pad(cell, width, i > 0));
            line.push_str("  ");
        }
        let shares: Vec<String> = row
            .backends
            .iter()
            .map(|b| format!("{:.0}", b.share * 100.0))
            .collect();
        line.push_str(&shares.join(" "));
        let _ = writeln!(out, "{}", line.trim_end());
        let means: Vec<String> = row
            .backends
            .iter()
            .map(|b| format!("{:.2}", b.in_flight.mean))
            .collect();
        if row.in_flight.samples > 0 {
            let _ = writeln!(out, "    mean in flight (b0 b1 …): {}", means.join(" "));
        }
        for warning in &row.warnings {
            let _ = writeln!(
                out,
                "{}",
                wrap("    ! ", warning, TABLE_WIDTH, "      ").join("\n")
            );
        }
    }
    out.push('\n');
    for line in &report.verdict {
        let _ = writeln!(out, "{}", wrap("", line, TABLE_WIDTH, "    ").join("\n"));
    }
    for note in NOTES {
        let _ = writeln!(
            out,
            "{}",
            wrap("note: ", note, TABLE_WIDTH, "      ").join("\n")
        );
    }
    out
}
