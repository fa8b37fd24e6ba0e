//! The shared map over HTTP, to try it by hand, to test it, and to measure it: every worker
//! serves the same routes on its own replica, and every answer carries `x-worker-pid`.
//!
//! - `GET /get/KEY`: the value (404 if absent); `x-stale: true` if the replica may be behind
//! - `PUT /set/KEY?ttl_ms=N` with the value as the body
//! - `POST /incr/KEY?by=N&times=T`: T increments of N, answers the last value
//! - `DELETE /del/KEY`: whether it was there
//! - `GET /missing/PREFIX?upto=N`: after a write of its own (so this replica has everything
//!   applied before it), how many of the keys PREFIX0 ..= PREFIXN it lacks
//!
//! The master's handler writes `master` = "here" at its start (`Master::state`).
//!
//! A refused write answers 413 (too large), 507 (the map is full), 409 (not an integer), 503
//! (unavailable) or 504 (no answer in time), with the reason as the body.
//!
//! Load it from inside, with environment variables:
//! - `SHARED_STATE_INCREMENTS=N`: each worker increments `hits` N times as soon as it
//!   serves (8 increments in flight at a time), then increments `done`;
//! - `SHARED_STATE_HANG_IF=PATH`: a worker started while PATH exists never gets ready (it
//!   exits after a minute): how the tests make an upgrade fail while writes go on;
//! - `SHARED_STATE_WRITER=1`: each worker writes `w:PID:0`, `w:PID:1`, ... one after the
//!   other for as long as it runs, and logs `acked w:PID:N` every 20th write the map
//!   acknowledged;
//! - `SHARED_STATE_BENCH=N`: slot 0 writes `bench` N times, 2 ms apart; every other worker
//!   notes when its replica shows each write, and the master logs the latency percentiles
//!   (one replica, and all of them).
//!
//! Run with: cargo run --release --example shared_state -- --listen 127.0.0.1:3000 --workers 4
//! Then:     curl -X PUT --data hello localhost:3000/set/greeting ; curl localhost:3000/get/greeting

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use bytes::Bytes;
use handoff::state::{SharedMap, StateError};
use handoff::{Master, Messenger, Server};
use serde::{Deserialize, Serialize};

fn answer(status: StatusCode, body: impl Into<String>, stale: bool) -> Response {
    let pid = std::process::id().to_string();
    let headers = [("x-worker-pid", pid), ("x-stale", stale.to_string())];
    (status, headers, body.into()).into_response()
}

fn refused(map: &SharedMap, error: StateError) -> Response {
    let status = match error {
        StateError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StateError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        StateError::NotAnInteger(_) => StatusCode::CONFLICT,
        StateError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    answer(status, format!("{error}\n"), map.is_stale())
}

async fn read(State(map): State<SharedMap>, Path(key): Path<String>) -> Response {
    match map.get(&key) {
        Some(value) => answer(
            StatusCode::OK,
            String::from_utf8_lossy(&value),
            map.is_stale(),
        ),
        None => answer(StatusCode::NOT_FOUND, "", map.is_stale()),
    }
}

async fn set(
    State(map): State<SharedMap>,
    Path(key): Path<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let written = match query(&uri).get("ttl_ms") {
        Some(ms) => map.set_for(&key, body, Duration::from_millis(*ms)).await,
        None => map.set(&key, body).await,
    };
    match written {
        Ok(()) => answer(StatusCode::NO_CONTENT, "", map.is_stale()),
        Err(e) => refused(&map, e),
    }
}

async fn increment(State(map): State<SharedMap>, Path(key): Path<String>, uri: Uri) -> Response {
    let query = query(&uri);
    let by = query.get("by").copied().unwrap_or(1) as i64;
    let mut last = 0;
    for _ in 0..query.get("times").copied().unwrap_or(1).max(1) {
        match map.increment(&key, by).await {
            Ok(value) => last = value,
            Err(e) => return refused(&map, e),
        }
    }
    answer(StatusCode::OK, last.to_string(), map.is_stale())
}

async fn remove(State(map): State<SharedMap>, Path(key): Path<String>) -> Response {
    match map.delete(&key).await {
        Ok(was) => answer(StatusCode::OK, was.to_string(), map.is_stale()),
        Err(e) => refused(&map, e),
    }
}

async fn missing(State(map): State<SharedMap>, Path(prefix): Path<String>, uri: Uri) -> Response {
    // A write of our own first: once it resolves, this replica has every change the master
    // applied before it.
    if let Err(e) = map.increment("barrier", 1).await {
        return refused(&map, e);
    }
    let upto = query(&uri).get("upto").copied().unwrap_or(0);
    let lacking = (0..=upto)
        .filter(|n| map.get(&format!("{prefix}{n}")).is_none())
        .count();
    answer(StatusCode::OK, lacking.to_string(), map.is_stale())
}

/// The numeric parameters of a query string (`by` may be negative: `by=-3`).
fn query(uri: &Uri) -> HashMap<String, u64> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(name, value)| {
            let value = match value.strip_prefix('-') {
                Some(negative) => negative.parse::<i64>().ok()?.wrapping_neg() as u64,
                None => value.parse().ok()?,
            };
            Some((name.to_owned(), value))
        })
        .collect()
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Increments in flight at once per worker under `SHARED_STATE_INCREMENTS`.
const IN_FLIGHT: u64 = 8;

/// `SHARED_STATE_INCREMENTS`: N increments of `hits` (by [`IN_FLIGHT`] tasks), then one of
/// `done`.
async fn increments(map: SharedMap, times: u64) {
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|task| {
            let map = map.clone();
            // The first tasks take the remainder.
            let share = times / IN_FLIGHT + u64::from(task < times % IN_FLIGHT);
            tokio::spawn(async move {
                for _ in 0..share {
                    map.increment("hits", 1).await?;
                }
                Ok::<_, StateError>(())
            })
        })
        .collect();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return tracing::error!(error = %e, "increment failed"),
            Err(e) => return tracing::error!(error = %e, "increment task failed"),
        }
    }
    match map.increment("done", 1).await {
        Ok(done) => tracing::info!(done, "increments done"),
        Err(e) => tracing::error!(error = %e, "increment failed"),
    }
}

/// `SHARED_STATE_WRITER`: writes one key after the other for as long as the worker runs.
async fn writer(map: SharedMap) {
    let pid = std::process::id();
    for n in 0.. {
        let key = format!("w:{pid}:{n}");
        match map.set(&key, n.to_string()).await {
            Ok(()) if n % 20 == 0 => tracing::info!("acked {key}"),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, key, "write not acknowledged");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// What the bench's observers tell the master: (write number, nanoseconds until seen).
#[derive(Debug, Serialize, Deserialize)]
enum Bench {
    Seen(Vec<(u64, u64)>),
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `SHARED_STATE_BENCH` in slot 0: N writes of `bench` = "N:SENT_NANOS", 2 ms apart.
async fn bench_writer(map: SharedMap, writes: u64) {
    // Give the other workers time to start listening.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..writes {
        let value = format!("{n}:{}", now_nanos());
        if let Err(e) = map.set("bench", value).await {
            tracing::error!(error = %e, "bench write failed");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `SHARED_STATE_BENCH` elsewhere: when each write shows in this replica.
async fn bench_observer(map: SharedMap, messenger: Messenger<Bench>, writes: u64) {
    let mut seen = Vec::new();
    let mut last = None;
    while last.is_none_or(|n| n + 1 < writes) {
        let changed = map.changed();
        if tokio::time::timeout(Duration::from_secs(5), changed)
            .await
            .is_err()
        {
            break;
        }
        let at = now_nanos();
        let Some(value) = map.get("bench") else {
            continue;
        };
        let text = String::from_utf8_lossy(&value).into_owned();
        let Some((n, sent)) = text.split_once(':') else {
            continue;
        };
        let (Ok(n), Ok(sent)) = (n.parse::<u64>(), sent.parse::<u64>()) else {
            continue;
        };
        if last != Some(n) {
            seen.push((n, at.saturating_sub(sent)));
            last = Some(n);
        }
    }
    for chunk in seen.chunks(2000) {
        let _ = messenger.send(&Bench::Seen(chunk.to_vec())).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at] as f64 / 1000.0
}

/// The master's side: it writes `master` = "here" to the map, then adds up the bench's
/// reports: every replica's latencies, and per write the slowest.
async fn bench_master(mut master: Master<Bench>) {
    // The master writes too: every worker reads `master` = "here".
    if let Err(e) = master.state().set("master", "here").await {
        tracing::error!(error = %e, "the master's write failed");
    }
    let mut all: Vec<u64> = Vec::new();
    let mut slowest: HashMap<u64, u64> = HashMap::new();
    while let Some(message) = master.recv().await {
        let Bench::Seen(seen) = message.body;
        for (n, nanos) in seen {
            all.push(nanos);
            let max = slowest.entry(n).or_default();
            *max = (*max).max(nanos);
        }
        all.sort_unstable();
        let mut everywhere: Vec<u64> = slowest.values().copied().collect();
        everywhere.sort_unstable();
        tracing::info!(
            observations = all.len(),
            one_p50_us = percentile(&all, 0.5),
            one_p99_us = percentile(&all, 0.99),
            one_max_us = percentile(&all, 1.0),
            writes = everywhere.len(),
            every_p50_us = percentile(&everywhere, 0.5),
            every_p99_us = percentile(&everywhere, 0.99),
            every_max_us = percentile(&everywhere, 1.0),
            "bench: a write in slot 0 visible in one replica / in every replica"
        );
    }
}

fn main() -> Result<(), handoff::Error> {
    if let Some(path) = std::env::var_os("SHARED_STATE_HANG_IF") {
        let worker = std::env::var_os("HANDOFF_WORKER").is_some();
        if worker && std::path::Path::new(&path).exists() {
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(1);
        }
    }
    let flags = common::setup();
    Server::builder()
        .listen(flags.listen)
        .workers(flags.workers)
        .worker_threads(flags.threads)
        .state_limits(flags.state_limits)
        .master(bench_master)
        .build()
        .run(|incoming| async move {
            let map = incoming.state();
            if let Some(times) = env_number("SHARED_STATE_INCREMENTS") {
                tokio::spawn(increments(map.clone(), times));
            }
            if env_number("SHARED_STATE_WRITER").is_some() {
                tokio::spawn(writer(map.clone()));
            }
            if let Some(writes) = env_number("SHARED_STATE_BENCH") {
                if std::env::var("HANDOFF_WORKER").as_deref() == Ok("0") {
                    tokio::spawn(bench_writer(map.clone(), writes));
                } else {
                    let messenger = incoming.messenger::<Bench>();
                    tokio::spawn(bench_observer(map.clone(), messenger, writes));
                }
            }
            let app = Router::new()
                .route("/get/{key}", get(read))
                .route("/set/{key}", put(set))
                .route("/incr/{key}", post(increment))
                .route("/del/{key}", delete(remove))
                .route("/missing/{prefix}", get(missing))
                .with_state(map);
            let shutdown = incoming.shutdown_signal();
            axum::serve(incoming, app)
                .with_graceful_shutdown(shutdown)
                .await?;
            Ok(())
        })
}
