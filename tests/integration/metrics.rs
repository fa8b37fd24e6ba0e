//! `--metrics`: Prometheus text with the master's figures and the workers' `metrics` added
//! up across the cluster, exact across workers recycled and killed, never decreasing.

use std::net::SocketAddr;

use crate::util::{http_get_path, log_field, wait_until, Master, PATIENCE};

/// The address the master serves metrics on (`--metrics 127.0.0.1:0`), from its log.
pub(crate) fn metrics_addr(master: &Master) -> SocketAddr {
    metrics_addr_in(|| master.log())
}

/// [`metrics_addr`] of any process whose log `log` reads.
pub(crate) fn metrics_addr_in(log: impl Fn() -> String) -> SocketAddr {
    let mut addr = None;
    let found = wait_until(PATIENCE, || {
        addr = log()
            .lines()
            .find(|line| line.contains("serving metrics"))
            .and_then(|line| log_field(line, "address")?.parse().ok());
        addr.is_some()
    });
    assert!(found, "no metrics address logged:\n{}", log());
    addr.unwrap()
}

/// The value of the series `name` (exactly, labels included) in a scrape.
pub(crate) fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub(crate) fn scrape(addr: SocketAddr) -> String {
    let response = http_get_path(addr, "/metrics").expect("a scrape");
    assert_eq!(response.status, 200);
    response.body
}

#[test]
fn demo_requests_total_counts_every_answer_across_recycling_and_a_sigkill() {
    let master = Master::start(&[
        "--workers",
        "4",
        "--max-connections",
        "300",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = metrics_addr(&master);
    let (mut answered, mut last_total) = (0u64, 0.0);
    for i in 0..2000 {
        if i == 1000 {
            // Between two requests, so none is in flight on it: every 200 the client got
            // was counted by a worker, and this one's counts must survive its death.
            let victim = master.worker_pids().into_iter().flatten().next().unwrap();
            crate::util::send_signal(victim, "KILL");
        }
        if master.get().status == 200 {
            answered += 1;
        }
        if i % 100 == 99 {
            let total = series(&scrape(metrics), "demo_requests_total").unwrap_or(0.0);
            assert!(total >= last_total, "went down: {last_total} then {total}");
            last_total = total;
        }
    }
    assert_eq!(answered, 2000, "{}", master.log());
    let text = scrape(metrics);
    assert_eq!(
        series(&text, "demo_requests_total"),
        Some(answered as f64),
        "{text}\n{}",
        master.log()
    );
    let replaced = series(&text, "handoff_workers_replaced_total{reason=\"recycled\"}").unwrap();
    // ~500 each: every worker reached 300 once, but the one killed at ~250 (and its
    // replacement, which got ~250 more).
    assert!(
        replaced >= 3.0,
        "workers recycled at 300 connections: {replaced}\n{text}"
    );
    assert_eq!(
        series(&text, "handoff_connections_accepted_total"),
        Some(2000.0)
    );
    // Histogram samples travel once a second (a killed worker loses its last second's).
    let sampled = series(&text, "demo_request_duration_seconds_count").unwrap_or(0.0);
    assert!(sampled > 0.0 && sampled <= answered as f64, "{text}");
}

#[test]
fn a_stopped_worker_never_stalls_a_scrape_and_shows_stale() {
    let master = Master::start(&[
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
        "--worker-timeout",
        "20s",
    ]);
    let metrics = metrics_addr(&master);
    let pids = master.wait_all_ready();
    crate::util::send_signal(pids[0], "STOP");
    let stale = format!("handoff_worker_stale{{worker=\"0\",pid=\"{}\"}}", pids[0]);
    let fresh = format!("handoff_worker_stale{{worker=\"1\",pid=\"{}\"}}", pids[1]);
    let marked = wait_until(PATIENCE, || {
        let text = scrape(metrics);
        series(&text, &stale) == Some(1.0) && series(&text, &fresh) == Some(0.0)
    });
    crate::util::send_signal(pids[0], "CONT");
    assert!(marked, "{}\n{}", scrape(metrics), master.log());
}

#[test]
fn anything_but_metrics_is_not_found() {
    let master = Master::start(&["--workers", "1", "--metrics", "127.0.0.1:0"]);
    let response = http_get_path(metrics_addr(&master), "/other").unwrap();
    assert_eq!(response.status, 404);
}
