//! The report as one hand-written SVG picture: per workload, each contender's workers as
//! bars of their request share and CPU share (like `top`, with the even share dashed), and
//! each contender's latency percentiles on a log scale. Pure string building.

use std::fmt::Write as _;

use super::report::latency;
use super::{Report, Row, WorkloadReport};

const WIDTH: f64 = 1200.0;
const BLOCK: f64 = 280.0;
const BARS_X: f64 = 20.0;
const BARS_W: f64 = 640.0;
const BARS_H: f64 = 170.0;
const LAT_X: f64 = 740.0;
const LAT_W: f64 = 420.0;
const REQUEST_COLOUR: &str = "#4c78a8";
const CPU_COLOUR: &str = "#f58518";
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
    let height = 60.0 + BLOCK * report.workloads.len().max(1) as f64;
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
    let _ = writeln!(
        out,
        r##"<text x="20" y="44" fill="#555">bars: each worker's share of requests (blue) and of CPU (orange); dashed: the even share. Right: latency from the scheduled send time.</text>"##
    );
    for (i, w) in report.workloads.iter().enumerate() {
        block(&mut out, w, 60.0 + BLOCK * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

fn block(out: &mut String, w: &WorkloadReport, top: f64) {
    let rate = w
        .offered_rps
        .map_or_else(String::new, |r| format!(", {r:.0} req/s offered"));
    let _ = writeln!(
        out,
        r#"<text x="20" y="{}" font-size="14" font-weight="bold">{} — {}{}</text>"#,
        top + 20.0,
        escape(w.workload.name()),
        escape(&w.description),
        escape(&rate)
    );
    bars(out, &w.rows, top + 40.0);
    latencies(out, &w.rows, top + 40.0);
}

fn bars(out: &mut String, rows: &[Row], top: f64) {
    let base = top + BARS_H;
    let _ = writeln!(
        out,
        r##"<line x1="{BARS_X}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##,
        BARS_X + BARS_W
    );
    let groups = rows.len().max(1) as f64;
    let group_w = BARS_W / groups;
    // The scale: the largest share drawn, at least twice the even share.
    let mut top_share: f64 = 0.0;
    for row in rows {
        let even = 1.0 / row.workers.len().max(1) as f64;
        top_share = top_share.max(2.0 * even);
        for worker in &row.workers {
            top_share = top_share.max(worker.request_share).max(worker.cpu_share);
        }
    }
    let top_share = top_share.clamp(0.05, 1.0);
    let y = |share: f64| base - BARS_H * (share / top_share).min(1.0);
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#555" font-size="10">{:.0}%</text>"##,
        BARS_X,
        top - 4.0,
        top_share * 100.0
    );
    for (g, row) in rows.iter().enumerate() {
        let x0 = BARS_X + group_w * g as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="11">{}</text>"#,
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
        let n = row.workers.len().max(1) as f64;
        let slot = (group_w - 12.0) / n;
        let bar = (slot / 2.0 - 1.0).clamp(1.0, 14.0);
        for (k, worker) in row.workers.iter().enumerate() {
            let x = x0 + 6.0 + slot * k as f64;
            for (j, (share, colour)) in [
                (worker.request_share, REQUEST_COLOUR),
                (worker.cpu_share, CPU_COLOUR),
            ]
            .into_iter()
            .enumerate()
            {
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"><title>pid {}: {:.1}%</title></rect>"#,
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
    for (i, (row, v)) in rows.iter().zip(&values).enumerate() {
        let cy = top + row_h * (i as f64 + 0.5);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
            LAT_X - 6.0,
            cy + 4.0,
            escape(&row.contender)
        );
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
    for (k, name) in PERCENTILES.iter().enumerate() {
        let lx = LAT_X + 70.0 * k as f64;
        let _ = writeln!(
            out,
            r#"<circle cx="{lx}" cy="{}" r="4" fill="{}"/><text x="{}" y="{}" font-size="10">{name}</text>"#,
            bottom + 30.0,
            PERCENTILE_COLOURS[k],
            lx + 8.0,
            bottom + 34.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
