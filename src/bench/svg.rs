//! The report as one hand-written SVG picture: per workload, its verdict, then three panels:
//! each contender's workers as bars of their request share and CPU share (like `top`, with the
//! even share dashed), each contender's capacity (median bar, min–max whisker, SO_REUSEPORT's
//! median dashed), and each contender's latency percentiles on a log scale. Pure string
//! building.

use std::fmt::Write as _;

use super::format::{latency, rate};
use super::stats::Capacity;
use super::{Report, Row, WorkloadReport};

const WIDTH: f64 = 1400.0;
const HEAD: f64 = 76.0;
const BLOCK: f64 = 300.0;
/// From a block's top to its panels' top.
const PANELS: f64 = 66.0;
const BARS_X: f64 = 20.0;
const BARS_W: f64 = 620.0;
const BARS_H: f64 = 170.0;
const CAP_X: f64 = 770.0;
const CAP_W: f64 = 230.0;
const LAT_X: f64 = 1130.0;
const LAT_W: f64 = 240.0;
const REQUEST_COLOUR: &str = "#4c78a8";
const CPU_COLOUR: &str = "#f58518";
const CAPACITY_COLOUR: &str = "#9ecae9";
const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];
const PERCENTILE_COLOURS: [&str; 5] = ["#54a24b", "#4c78a8", "#f58518", "#e45756", "#222222"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole report as an SVG document.
pub fn render(report: &Report) -> String {
    let height = HEAD + BLOCK * report.workloads.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let m = &report.machine;
    let _ = writeln!(
        out,
        r#"<text x="20" y="24" font-size="16" font-weight="bold">handoff bench: {} workers, {} cores, Linux {}</text>"#,
        report.workers,
        m.cores,
        escape(&m.kernel)
    );
    let runs = match report.capacity_runs {
        0 => "capacity not measured (--rate)".to_owned(),
        n => format!("capacity with clients sending as fast as they can: median bar, min–max of {n} runs, dashed: SO_REUSEPORT"),
    };
    let _ = writeln!(
        out,
        r##"<text x="20" y="44" fill="#555">Left: each worker's share of requests (blue) and of CPU (orange); dashed: the even share; J: Jain's index (1 = even).</text><text x="20" y="60" fill="#555">Middle: {}. Right: latency at the offered rate, from the scheduled send time.</text>"##,
        escape(&runs)
    );
    for (i, w) in report.workloads.iter().enumerate() {
        block(&mut out, w, HEAD + BLOCK * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

fn block(out: &mut String, w: &WorkloadReport, top: f64) {
    let offered = w
        .offered_rps
        .map_or_else(String::new, |r| format!(", {r:.0} req/s offered"));
    let _ = writeln!(
        out,
        r#"<text x="20" y="{}" font-size="14" font-weight="bold">{} — {}{}</text>"#,
        top + 20.0,
        escape(w.workload.name()),
        escape(&w.description),
        escape(&offered)
    );
    if let Some(verdict) = &w.verdict {
        let _ = writeln!(
            out,
            r##"<text x="20" y="{}" font-size="13" fill="#222">verdict: {}</text>"##,
            top + 40.0,
            escape(verdict)
        );
    }
    bars(out, &w.rows, top + PANELS);
    capacity(out, &w.rows, top + PANELS);
    latencies(out, &w.rows, top + PANELS);
}

/// The share at the top of the bars: the largest share drawn, at least twice the even share.
fn share_scale(rows: &[Row]) -> f64 {
    let mut top_share: f64 = 0.0;
    for row in rows {
        let even = 1.0 / row.workers.len().max(1) as f64;
        top_share = top_share.max(2.0 * even);
        for worker in &row.workers {
            top_share = top_share.max(worker.request_share).max(worker.cpu_share);
        }
    }
    top_share.clamp(0.05, 1.0)
}

fn bars(out: &mut String, rows: &[Row], top: f64) {
    let base = top + BARS_H;
    let _ = writeln!(
        out,
        r##"<line x1="{BARS_X}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##,
        BARS_X + BARS_W
    );
    let group_w = BARS_W / rows.len().max(1) as f64;
    let top_share = share_scale(rows);
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#555" font-size="10">{:.0}% of requests / CPU</text>"##,
        BARS_X,
        top - 6.0,
        top_share * 100.0
    );
    let y = |share: f64| base - BARS_H * (share / top_share).min(1.0);
    for (g, row) in rows.iter().enumerate() {
        let x0 = BARS_X + group_w * g as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
            x0 + group_w / 2.0,
            base + 16.0,
            escape(&row.contender)
        );
        if let Some(reason) = &row.unavailable {
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#999" font-size="10"><title>{}</title>unavailable</text>"##,
                x0 + group_w / 2.0,
                base - 10.0,
                escape(reason)
            );
            continue;
        }
        worker_bars(out, row, x0, group_w, &y);
        let jain = row
            .request_jain
            .map_or_else(|| "-".to_owned(), |j| format!("{j:.3}"));
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#555" font-size="10">J {jain}</text>"##,
            x0 + group_w / 2.0,
            base + 30.0
        );
    }
}

/// One contender's bars (request share, CPU share per worker) and its dashed even share;
/// `y` maps a share to its height.
fn worker_bars(out: &mut String, row: &Row, x0: f64, group_w: f64, y: &dyn Fn(f64) -> f64) {
    let base = y(0.0);
    let n = row.workers.len().max(1) as f64;
    let slot = (group_w - 12.0) / n;
    let bar = (slot / 2.0 - 1.0).clamp(1.0, 14.0);
    for (k, worker) in row.workers.iter().enumerate() {
        let x = x0 + 6.0 + slot * k as f64;
        let pairs = [
            (worker.request_share, REQUEST_COLOUR, "requests"),
            (worker.cpu_share, CPU_COLOUR, "CPU"),
        ];
        for (j, (share, colour, what)) in pairs.into_iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"><title>pid {}: {:.1}% of {what}</title></rect>"#,
                x + j as f64 * (bar + 1.0),
                y(share),
                base - y(share),
                worker.pid,
                share * 100.0
            );
        }
    }
    let even = y(1.0 / n);
    let _ = writeln!(
        out,
        r##"<line x1="{:.1}" y1="{even:.1}" x2="{:.1}" y2="{even:.1}" stroke="#333" stroke-dasharray="3,3"/>"##,
        x0 + 4.0,
        x0 + group_w - 4.0
    );
}

/// The contender names down the left of a panel whose plot starts at `x`.
fn row_labels(out: &mut String, rows: &[Row], x: f64, top: f64, row_h: f64) {
    for (i, row) in rows.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
            x - 6.0,
            top + row_h * (i as f64 + 0.5) + 4.0,
            escape(&row.contender)
        );
    }
}

fn capacity(out: &mut String, rows: &[Row], top: f64) {
    let row_h = (BARS_H / rows.len().max(1) as f64).min(28.0);
    let bottom = top + row_h * rows.len() as f64;
    row_labels(out, rows, CAP_X, top, row_h);
    let largest = rows
        .iter()
        .filter_map(|r| r.capacity.as_ref().map(|c| c.max_rps))
        .fold(0.0, f64::max);
    if largest <= 0.0 {
        let _ = writeln!(
            out,
            r##"<text x="{CAP_X}" y="{}" fill="#999" font-size="11">capacity not measured</text>"##,
            top + 14.0
        );
        return;
    }
    let scale = nice_ceiling(largest * 1.1);
    let x = |rps: f64| CAP_X + CAP_W * rps / scale;
    let _ = writeln!(
        out,
        r##"<line x1="{CAP_X}" y1="{top}" x2="{CAP_X}" y2="{bottom}" stroke="#999"/>"##
    );
    for tick in [0.0, scale / 2.0, scale] {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#555" font-size="10">{}</text>"##,
            x(tick),
            bottom + 14.0,
            rate(tick)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#555" font-size="10">requests/s, closed loop</text>"##,
        CAP_X,
        top - 6.0
    );
    let reuseport = rows
        .iter()
        .find(|r| r.contender == "kernel-reuseport")
        .and_then(|r| r.capacity.as_ref());
    if let Some(c) = reuseport {
        let rx = x(c.median_rps);
        let _ = writeln!(
            out,
            r##"<line x1="{rx:.1}" y1="{top}" x2="{rx:.1}" y2="{bottom}" stroke="#333" stroke-dasharray="3,3"/>"##
        );
    }
    for (i, row) in rows.iter().enumerate() {
        if let Some(c) = &row.capacity {
            let cy = top + row_h * (i as f64 + 0.5);
            whisker(out, &row.contender, c, cy, (row_h * 0.55).min(14.0), &x);
        }
    }
}

/// The smallest 1, 2, 2.5 or 5 times a power of ten at or above `x` (> 0): an axis end
/// whose half is round too.
fn nice_ceiling(x: f64) -> f64 {
    let decade = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * decade)
}

/// One contender's capacity at height `cy`: a bar to the median, a whisker from the slowest
/// run to the fastest, the median in words; `x` maps requests/s to the panel.
fn whisker(out: &mut String, name: &str, c: &Capacity, cy: f64, h: f64, x: &dyn Fn(f64) -> f64) {
    let runs: Vec<String> = c.runs_rps.iter().map(|r| format!("{r:.0}")).collect();
    let _ = writeln!(
        out,
        r##"<rect x="{CAP_X}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{CAPACITY_COLOUR}"><title>{}: median {:.0}, runs {}</title></rect>"##,
        cy - h / 2.0,
        x(c.median_rps) - CAP_X,
        escape(name),
        c.median_rps,
        runs.join(", ")
    );
    let (lo, hi, edge) = (x(c.min_rps), x(c.max_rps), cy - h / 2.0);
    let _ = writeln!(
        out,
        r##"<path d="M{lo:.1},{edge:.1}v{h:.1}M{lo:.1},{cy:.1}H{hi:.1}M{hi:.1},{edge:.1}v{h:.1}" stroke="#222" fill="none"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
        hi + 4.0,
        cy + 4.0,
        rate(c.median_rps)
    );
}

fn latencies(out: &mut String, rows: &[Row], top: f64) {
    let values: Vec<[u64; 5]> = rows
        .iter()
        .map(|r| {
            let l = &r.latency_us;
            [l.p50, l.p90, l.p99, l.p999, l.max]
        })
        .collect();
    let largest = values.iter().flatten().copied().max().unwrap_or(1).max(10);
    let smallest = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| *v > 0)
        .min()
        .unwrap_or(1);
    let (lo, hi) = (
        10f64.powf((smallest as f64).log10().floor()),
        10f64.powf((largest as f64).log10().ceil()),
    );
    let hi = if hi <= lo { lo * 10.0 } else { hi };
    let x = |us: u64| {
        LAT_X + LAT_W * ((us.max(1) as f64).log10() - lo.log10()) / (hi.log10() - lo.log10())
    };
    let row_h = (BARS_H / rows.len().max(1) as f64).min(28.0);
    let bottom = top + row_h * rows.len() as f64;
    // Decades.
    let mut decade = lo;
    while decade <= hi * 1.001 {
        let dx = x(decade as u64);
        let _ = writeln!(
            out,
            r##"<line x1="{dx:.1}" y1="{top}" x2="{dx:.1}" y2="{bottom}" stroke="#ddd"/><text x="{dx:.1}" y="{}" text-anchor="middle" fill="#555" font-size="10">{}</text>"##,
            bottom + 14.0,
            latency(decade as u64)
        );
        decade *= 10.0;
    }
    row_labels(out, rows, LAT_X, top, row_h);
    let _ = writeln!(
        out,
        r##"<text x="{LAT_X}" y="{}" fill="#555" font-size="10">latency at the offered rate (log scale)</text>"##,
        top - 6.0
    );
    for (i, (row, v)) in rows.iter().zip(&values).enumerate() {
        let cy = top + row_h * (i as f64 + 0.5);
        if row.unavailable.is_some() || v[0] == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="#999"/>"##,
            x(v[0]),
            x(v[4])
        );
        for (k, us) in v.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{cy:.1}" r="4" fill="{}"><title>{} {}</title></circle>"#,
                x(*us),
                PERCENTILE_COLOURS[k],
                PERCENTILES[k],
                latency(*us)
            );
        }
    }
    percentile_legend(out, bottom + 30.0);
}

/// Which colour is which percentile, centred on `cy`.
fn percentile_legend(out: &mut String, cy: f64) {
    for (k, name) in PERCENTILES.iter().enumerate() {
        let lx = LAT_X - 60.0 + 62.0 * k as f64;
        let _ = writeln!(
            out,
            r#"<circle cx="{lx}" cy="{cy}" r="4" fill="{}"/><text x="{}" y="{}" font-size="10">{name}</text>"#,
            PERCENTILE_COLOURS[k],
            lx + 8.0,
            cy + 4.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_at_round_numbers() {
        assert_eq!(nice_ceiling(18_400.0), 20_000.0);
        assert_eq!(nice_ceiling(2_100.0), 2_500.0);
        assert_eq!(nice_ceiling(5_000.0), 5_000.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
