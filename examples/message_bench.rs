//! How fast handoff's messages are, measured between real processes: worker → master
//! request/reply round trips, master → every worker broadcast latency, and messages per
//! second through the master. `examples/node/ipc_bench.js` measures node's `process.send`
//! the same way, the anchor (docs/benchmarks.md).
//!
//! Run with: cargo run --release --example message_bench -- --workers 16 --seconds 2
//! It prints one line per figure and stops.

use std::time::{Duration, Instant};

use handoff::{Master, Messenger, Server};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Bench {
    /// worker → master, a request, answered at once.
    Ping(u64),
    /// worker → master: round trips, in nanoseconds.
    RoundTrips(Vec<u32>),
    /// master → every worker: sent at this CLOCK_MONOTONIC instant (ns).
    Tick(u64),
    /// master → every worker: the broadcasts are over; report, then flood.
    Flood,
    /// worker → master: broadcast latencies, in nanoseconds.
    Latencies(Vec<u32>),
    /// worker → master, fire and forget, as fast as the channel takes them.
    Fire,
    /// worker → master: done flooding.
    Fired(u64),
}

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank]) / 1000.0
}

fn summary(what: &str, mut samples: Vec<u32>) {
    samples.sort_unstable();
    println!(
        "{what}: n={} p50={:.1}µs p99={:.1}µs max={:.1}µs",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        percentile(&samples, 100.0)
    );
}

/// The master: collects the round trips, broadcasts ticks, counts the flood.
async fn master(mut master: Master<Bench>, workers: usize, seconds: u64) {
    let (mut trips, mut reported) = (Vec::new(), 0);
    while reported < workers {
        let Some(message) = master.recv().await else {
            return;
        };
        if message.is_request() {
            let _ = master.reply(&message, &0u64);
        }
        match message.body {
            Bench::RoundTrips(samples) if samples.is_empty() => reported += 1,
            Bench::RoundTrips(samples) => trips.extend(samples),
            _ => {}
        }
    }
    summary("request/reply round trip (worker → master → worker)", trips);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut every = tokio::time::interval(Duration::from_millis(1));
    while Instant::now() < end {
        every.tick().await;
        let _ = master.broadcast(&Bench::Tick(monotonic_ns()));
    }
    let _ = master.broadcast(&Bench::Flood);
    let (mut latencies, mut flooded, mut fired, mut started) = (Vec::new(), 0, 0u64, None);
    let mut sent = 0;
    while flooded < workers {
        let Some(message) = master.recv().await else {
            return;
        };
        if message.is_request() {
            let _ = master.reply(&message, &0u64);
        }
        match message.body {
            Bench::Latencies(samples) => latencies.extend(samples),
            Bench::Fire => {
                started.get_or_insert_with(Instant::now);
                fired += 1;
            }
            Bench::Fired(n) => {
                flooded += 1;
                sent += n;
            }
            _ => {}
        }
    }
    summary(
        &format!("broadcast latency to {workers} workers"),
        latencies,
    );
    let elapsed = started.map_or(1.0, |s| s.elapsed().as_secs_f64());
    println!(
        "messages through the master: {fired} in {elapsed:.2}s = {:.0}/s ({sent} sent, {} \
         dropped at the handler's full queue)",
        fired as f64 / elapsed,
        sent.saturating_sub(fired)
    );
    // Done: stop the master (and so the workers) as Ctrl-C would.
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
}

/// Sends `message` as a request until the master has it: while other workers flood it,
/// its queue is full and drops what comes (each dropped request is answered with an error).
async fn deliver(messenger: &Messenger<Bench>, message: Bench) {
    while messenger
        .request::<u64>(&message, Duration::from_secs(1))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends `samples` in messages under the payload limit.
async fn send_samples(
    messenger: &Messenger<Bench>,
    samples: Vec<u32>,
    wrap: fn(Vec<u32>) -> Bench,
) {
    for chunk in samples.chunks(8_000) {
        deliver(messenger, wrap(chunk.to_vec())).await;
    }
}

/// A worker: round trips for `seconds`, then broadcast latencies, then a flood.
async fn worker(messenger: Messenger<Bench>, mut inbox: handoff::Inbox<Bench>, seconds: u64) {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut trips = Vec::new();
    while Instant::now() < end {
        let start = Instant::now();
        if messenger
            .request::<u64>(&Bench::Ping(1), Duration::from_secs(1))
            .await
            .is_ok()
        {
            trips.push(start.elapsed().as_nanos() as u32);
        }
    }
    send_samples(&messenger, trips, Bench::RoundTrips).await;
    deliver(&messenger, Bench::RoundTrips(Vec::new())).await;
    let mut latencies = Vec::new();
    while let Some(message) = inbox.recv().await {
        match message.body {
            Bench::Tick(sent) => latencies.push(monotonic_ns().saturating_sub(sent) as u32),
            Bench::Flood => break,
            _ => {}
        }
    }
    send_samples(&messenger, latencies, Bench::Latencies).await;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut fired = 0;
    while Instant::now() < end {
        for _ in 0..64 {
            let _ = messenger.send(&Bench::Fire).await;
        }
        fired += 64;
    }
    deliver(&messenger, Bench::Fired(fired)).await;
}

fn main() -> Result<(), handoff::Error> {
    let (mut workers, mut seconds) = (16, 2);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" => workers = value.parse().expect("--workers N"),
            "--seconds" => seconds = value.parse().expect("--seconds N"),
            other => panic!("unknown flag {other}: use --workers N --seconds N"),
        }
    }
    Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .workers(workers)
        .master(move |m| master(m, workers, seconds))
        .build()
        .run(move |mut incoming| async move {
            let messenger = incoming.messenger::<Bench>();
            let inbox = incoming.inbox::<Bench>().expect("the first claim");
            tokio::spawn(worker(messenger, inbox, seconds));
            // Messages arrive while the worker accepts (none come: nobody connects).
            while incoming.accept().await.is_some() {}
            Ok(())
        })
}
