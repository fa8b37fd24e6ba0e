//! `--metrics ADDR`: the master serves Prometheus text at `/metrics`, rendered by
//! metrics-exporter-prometheus: the master's own figures (connections accepted, dispatched
//! per worker, re-dispatched, pending, accept errors, replacements by reason, per-worker
//! RSS and CPU, its own CPU, messages, the shared map's writes and size) and the workers' `metrics` added up across the
//! cluster ([`super::cluster`]). A scrape reads memory and `/proc` only: a stopped worker
//! (SIGSTOP) cannot stall it; its figures are the last it wrote, and
//! `handoff_worker_stale` says it has not been heard from for two heartbeats.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics::{Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;
use tokio::task::spawn_local;

use super::ctx::Ctx;
use crate::procfs;

/// Scrapes served at once; more wait for the kernel's accept queue.
const MAX_SCRAPES: usize = 16;
/// How long a scraper may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Histogram buckets, in the unit the workers record (seconds, for latencies).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Distinct histogram keys the exporter keeps; samples of new keys past it are dropped and
/// counted (`handoff_metric_counts_dropped_total`), so workers that come back with new keys
/// each time cannot grow the exporter without end.
const MAX_HISTOGRAMS: usize = 4096;
/// Series not set for this long (those of workers gone) leave the output.
const IDLE: Duration = Duration::from_secs(120);

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// The exporter: its recorder, which holds every series, and the histograms samples go to.
pub(crate) struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    histograms: RefCell<HashMap<Vec<u8>, Histogram>>,
    /// Samples dropped for want of room for their histogram.
    dropped: std::cell::Cell<u64>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    pub fn new() -> Rc<Exporter> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the buckets are not empty")
            .idle_timeout(MetricKindMask::COUNTER | MetricKindMask::GAUGE, Some(IDLE))
            .build_recorder();
        let handle = recorder.handle();
        Rc::new(Exporter {
            recorder,
            handle,
            histograms: RefCell::new(HashMap::new()),
            dropped: std::cell::Cell::new(0),
        })
    }

    /// Records a histogram sample a worker sent, under the worker's key.
    pub fn record(&self, key: &[u8], value: f64) {
        let mut histograms = self.histograms.borrow_mut();
        if let Some(histogram) = histograms.get(key) {
            return histogram.record(value);
        }
        if histograms.len() >= MAX_HISTOGRAMS {
            return self.dropped.set(self.dropped.get() + 1);
        }
        let Some(parsed) = parse_key(key) else {
            return;
        };
        let histogram = self.recorder.register_histogram(&parsed, &META);
        histogram.record(value);
        histograms.insert(key.to_vec(), histogram);
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>, value: u64) {
        let key = Key::from_parts(name, labels);
        self.recorder.register_counter(&key, &META).absolute(value);
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>, value: f64) {
        let key = Key::from_parts(name, labels);
        self.recorder.register_gauge(&key, &META).set(value);
    }
}

/// A worker's key bytes (`name`, then `\0key\0value` per label) as a `metrics` key; `None`
/// for bytes that are not such a key.
pub(crate) fn parse_key(bytes: &[u8]) -> Option<Key> {
    let (name, labels) = super::cluster::split_key(bytes)?;
    let labels: Vec<Label> = labels
        .into_iter()
        .map(|(k, v)| Label::new(k.to_owned(), v.to_owned()))
        .collect();
    Some(Key::from_parts(name.to_owned(), labels))
}

/// Binds `addr` for scrapes.
pub(crate) fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves scrapes until the master stops.
pub(crate) async fn serve(ctx: Rc<Ctx>, exporter: Rc<Exporter>, listener: std::net::TcpListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => return tracing::error!(error = %e, "the metrics listener cannot be used"),
    };
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a scrape failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (ctx, exporter) = (ctx.clone(), exporter.clone());
        spawn_local(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&ctx, &exporter, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn respond<B>(ctx: &Ctx, exporter: &Exporter, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/metrics" => {
            update(ctx, exporter);
            (StatusCode::OK, exporter.handle.render())
        }
        _ => (StatusCode::NOT_FOUND, "try /metrics\n".to_owned()),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Sets every series to its value now.
fn update(ctx: &Ctx, exporter: &Exporter) {
    super::link::sync(ctx);
    master_figures(ctx, exporter);
    worker_figures(ctx, exporter);
    let figures = ctx.cluster.figures();
    for (key, total) in &figures.counters {
        if let Some(key) = parse_key(key) {
            exporter
                .recorder
                .register_counter(&key, &META)
                .absolute(*total);
        }
    }
    for (key, value) in &figures.gauges {
        if let Some(key) = parse_key(key) {
            exporter.recorder.register_gauge(&key, &META).set(*value);
        }
    }
}

fn master_figures(ctx: &Ctx, exporter: &Exporter) {
    let table = ctx.table.borrow();
    let c = table.counters;
    exporter.counter("handoff_connections_accepted_total", vec![], c.accepted);
    exporter.counter(
        "handoff_connections_redispatched_total",
        vec![],
        c.redispatched,
    );
    exporter.counter("handoff_connections_dropped_total", vec![], c.dropped);
    exporter.counter("handoff_connections_refused_total", vec![], c.refused);
    exporter.counter(
        "handoff_connections_handed_back_total",
        vec![],
        c.handed_back,
    );
    exporter.counter(
        "handoff_handbacks_refused_total",
        vec![],
        c.handbacks_refused,
    );
    exporter.counter("handoff_accept_errors_total", vec![], c.accept_errors);
    exporter.counter("handoff_workers_spawned_total", vec![], c.spawned);
    for (reason, count) in [
        ("recycled", c.recycled),
        ("unresponsive", c.unresponsive),
        ("unacknowledged", c.unacknowledged),
        ("protocol_error", c.protocol_errors),
        ("drain_timeout", c.drain_kills),
    ] {
        let labels = vec![Label::new("reason", reason)];
        exporter.counter("handoff_workers_replaced_total", labels, count);
    }
    exporter.counter("handoff_crash_loops_total", vec![], c.crash_loops);
    exporter.gauge("handoff_connections_held", vec![], table.held() as f64);
    exporter.gauge(
        "handoff_connections_awaiting_redispatch",
        vec![],
        table.retry_len() as f64,
    );
    exporter.counter(
        "handoff_metric_counts_dropped_total",
        vec![],
        ctx.cluster.dropped() + exporter.dropped.get(),
    );
    let post = ctx.post.counters();
    exporter.counter("handoff_messages_received_total", vec![], post.received);
    exporter.counter("handoff_messages_delivered_total", vec![], post.delivered);
    exporter.counter("handoff_messages_dropped_total", vec![], post.dropped);
    if let Some(cpu) = procfs::cpu_time(std::process::id()) {
        exporter.gauge("handoff_master_cpu_seconds", vec![], cpu.as_secs_f64());
    }
    state_figures(ctx, exporter);
}

/// The shared map the master holds (all zero when the workers keep theirs on Redis).
fn state_figures(ctx: &Ctx, exporter: &Exporter) {
    let state = ctx.state.counters();
    exporter.counter("handoff_state_writes_total", vec![], state.writes);
    exporter.counter("handoff_state_writes_refused_total", vec![], state.refused);
    exporter.counter("handoff_state_frames_dropped_total", vec![], state.dropped);
    exporter.counter("handoff_state_snapshots_total", vec![], state.snapshots);
    exporter.counter("handoff_state_resyncs_total", vec![], state.resyncs);
    let (entries, bytes) = ctx.state.size();
    exporter.gauge("handoff_state_entries", vec![], entries as f64);
    exporter.gauge("handoff_state_bytes", vec![], bytes as f64);
}

fn worker_figures(ctx: &Ctx, exporter: &Exporter) {
    let table = ctx.table.borrow();
    let stale_after = table.config.worker_heartbeat() * 2;
    for (slot, process) in table
        .slots
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.processes().map(move |p| (i, p)))
    {
        let labels = || {
            vec![
                Label::new("worker", slot.to_string()),
                Label::new("pid", process.pid.to_string()),
            ]
        };
        exporter.counter(
            "handoff_worker_dispatched_total",
            labels(),
            process.assigned(),
        );
        exporter.counter(
            "handoff_worker_finished_total",
            labels(),
            process.finished(),
        );
        exporter.gauge("handoff_worker_active", labels(), process.active() as f64);
        exporter.gauge("handoff_worker_pending", labels(), process.pending() as f64);
        let stale = process.last_heard.elapsed() > stale_after;
        exporter.gauge("handoff_worker_stale", labels(), f64::from(u8::from(stale)));
        if let Ok(rss) = procfs::rss(process.pid) {
            exporter.gauge("handoff_worker_rss_bytes", labels(), rss as f64);
        }
        if let Some(cpu) = procfs::cpu_time(process.pid) {
            exporter.gauge("handoff_worker_cpu_seconds", labels(), cpu.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_keys_parse_into_names_and_labels() {
        let key = parse_key(b"requests_total\0method\0GET\0code\x00200").unwrap();
        assert_eq!(key.name(), "requests_total");
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels, [("method", "GET"), ("code", "200")]);
        assert_eq!(parse_key(b"plain").unwrap().labels().count(), 0);
        assert!(parse_key(b"").is_none());
        assert!(
            parse_key(b"name\0odd").is_none(),
            "a label without its value"
        );
        assert!(parse_key(&[0xff, 0xfe]).is_none(), "not UTF-8");
    }

    #[test]
    fn histogram_samples_render_as_buckets() {
        let exporter = Exporter::new();
        exporter.record(b"latency_seconds\0route\0/", 0.003);
        exporter.record(b"latency_seconds\0route\0/", 0.2);
        exporter.record(b"\xff", 1.0);
        let text = exporter.handle.render();
        assert!(
            text.contains("latency_seconds_count{route=\"/\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("latency_seconds_bucket{route=\"/\",le=\"0.005\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn histograms_past_the_cap_are_dropped_and_counted_known_ones_still_record() {
        let exporter = Exporter::new();
        for i in 0..MAX_HISTOGRAMS + 10 {
            exporter.record(format!("h_seconds\0id\0{i}").as_bytes(), 0.1);
        }
        assert_eq!(exporter.histograms.borrow().len(), MAX_HISTOGRAMS);
        assert_eq!(exporter.dropped.get(), 10);
        exporter.record(b"h_seconds\0id\x000", 0.1);
        let text = exporter.handle.render();
        assert!(text.contains("h_seconds_count{id=\"0\"} 2"), "{text}");
    }
}
