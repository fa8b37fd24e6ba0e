//! `handoff bench --proxy`: `handoff proxy` against HAProxy and nginx over the same backends,
//! one of them slower than the rest.
//!
//! Runs in the bench process. It starts the backends once (single-worker `handoff run` demo
//! servers on 127.0.0.1, the first `slow` times slower per request), then for each frontend
//! in turn ([`frontend`]) starts it in front of them, drives it with the built-in load
//! generator, reads its CPU time, and stops it. As with `--load`, closed-loop runs first
//! measure each frontend's capacity (the frontends taking turns), and the open-loop pass
//! offers the same fraction of the slowest median to all. Each request's answer names the
//! backend (its worker's pid), which gives the share per backend, and the generator keeps
//! when each request was in flight, which gives the connections in flight per backend at
//! every sample instant and how far each stood above the least ([`inflight`]).

pub mod frontend;
pub mod inflight;
mod table;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use table::table;

use super::contender::Running;
use super::load::{self, Arrivals, Connections, Errors, LoadSpec, Pace, Tally};
use super::stats::{shares, Capacity, Percentiles};
use super::{BenchConfig, BenchError, Machine, Offered, Progress};
use crate::procfs;
use frontend::Frontend;
use inflight::{Interval, Spread};

/// Microseconds each request blocks a (fast) backend without CPU, unless told otherwise.
/// With the CPU kept small, it is what makes a backend's time matter on a small shared
/// machine: 8 backends at 50 µs of CPU each are idle 95% of the time at half the frontends'
/// capacity (bounded there by the cost of a new connection through a proxy), so the slow
/// one is seldom busy when a connection arrives and every strategy sends it about 1/8 of
/// them. With 1 ms (10 ms on the slow one), round-robin's capacity is bounded by the slow
/// backend, and at half of it the slow one is busy half the time under round-robin.
pub const DEFAULT_WAIT_US: u64 = 1_000;

/// The generator's p99 lag behind its schedule (µs) above which a row is flagged: its
/// latencies and in-flight spans then hold the generator's own delay.
const LATE_GENERATOR_US: u64 = 2_000;

/// How often the connections in flight are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(1);

/// A proxy benchmark: the frontends, workers, rates and windows of [`BenchConfig`]
/// (`contenders` names frontends of [`frontend::ALL`]; the workload is `hello`, a new
/// connection per request), and the backends.
#[derive(Debug, Clone)]
pub struct ProxyBenchConfig {
    /// Frontends, workers (processes or threads per frontend), rate and windows.
    pub bench: BenchConfig,
    /// Backends behind every frontend.
    pub backends: usize,
    /// Microseconds each request blocks its backend without CPU (besides
    /// `bench.work_us` of CPU): what makes a backend slow without taking the shared cores.
    pub wait_us: u64,
    /// How many times slower per request the first backend is (its CPU and its wait).
    pub slow: u64,
}

/// One backend.
#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its worker's pid (what its answers name).
    pub pid: u32,
    /// CPU microseconds per request.
    pub work_us: u64,
    /// Microseconds each request blocks the backend without CPU.
    pub wait_us: u64,
}

/// One backend's part of a row.
#[derive(Debug, Clone, Serialize)]
pub struct BackendRow {
    /// Requests it answered.
    pub requests: u64,
    /// Its fraction of all answered requests.
    pub share: f64,
    /// Its connections in flight, sampled.
    pub in_flight: inflight::BackendInFlight,
}

/// One frontend at the offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyRow {
    /// The frontend's name.
    pub contender: String,
    /// Why it did not run, if it did not.
    pub unavailable: Option<String>,
    /// Its closed-loop throughput in the capacity runs (requests/s).
    pub capacity: Option<Capacity>,
    /// The open-loop rate offered (requests/s).
    pub offered_rps: Option<f64>,
    /// Successful requests per second in the measured window.
    pub achieved_rps: f64,
    /// Successful requests in the window.
    pub requests: u64,
    /// Failed requests by kind.
    pub errors: Errors,
    /// Failed requests in all.
    pub error_total: u64,
    /// Latency of the successful requests, from the scheduled send time, µs.
    pub latency_us: Percentiles,
    /// Per backend, in the order of [`ProxyReport::backends`].
    pub backends: Vec<BackendRow>,
    /// The connections in flight per backend over the samples.
    pub in_flight: Spread,
    /// CPU the frontend's processes used, in cores.
    pub frontend_cores: f64,
    /// CPU the load generator used, in cores.
    pub load_generator_cores: f64,
    /// The 99th percentile of how late the generator itself sent, µs.
    pub generator_lag_p99_us: Option<u64>,
    /// What a reader should know about this row.
    pub warnings: Vec<String>,
}

/// A whole proxy run.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyReport {
    /// Where it ran.
    pub machine: Machine,
    /// Worker processes (nginx, handoff) or threads (HAProxy) per frontend.
    pub workers: usize,
    /// The backends; the first is the slow one.
    pub backends: Vec<Backend>,
    /// Measured window of each open-loop run, seconds.
    pub duration_s: f64,
    /// Capacity runs per frontend (0: the rate was fixed).
    pub capacity_runs: usize,
    /// Measured window of each capacity run, seconds.
    pub capacity_duration_s: f64,
    /// The open-loop rate offered to every frontend.
    pub offered_rps: f64,
    /// Where that rate came from.
    pub basis: String,
    /// How the requests arrived.
    pub arrivals: Arrivals,
    /// How often the connections in flight were sampled, ms.
    pub sample_every_ms: f64,
    /// The figures the acceptance asks for, in words.
    pub verdict: Vec<String>,
    /// One row per frontend.
    pub rows: Vec<ProxyRow>,
}

/// Runs the proxy benchmark, telling `progress` as each frontend starts.
pub fn run(
    config: &ProxyBenchConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ProxyReport, BenchError> {
    let bench = &config.bench;
    for name in &bench.contenders {
        Frontend::parse(name)?;
    }
    if bench.contenders.is_empty() || config.backends == 0 {
        return Err(BenchError::NoContenders);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
        .map_err(BenchError::Runtime)?;
    let runs = match bench.offered {
        Offered::Rate(_) => 0,
        Offered::Load(_) => bench.capacity_runs.max(1),
    };
    let steps = (1 + runs) * bench.contenders.len();
    let mut step = 0;
    let mut tell = |what: String| {
        step += 1;
        progress(&Progress { step, steps, what });
    };
    let running = frontend::start_backends(
        &bench.program,
        config.backends,
        bench.work_us,
        config.wait_us,
        config.slow,
    )?;
    let backends: Vec<Backend> = running
        .iter()
        .enumerate()
        .map(|(i, b)| Backend {
            addr: b.addr,
            pid: b.workers.first().copied().unwrap_or(b.master),
            work_us: bench.work_us * if i == 0 { config.slow } else { 1 },
            wait_us: config.wait_us * if i == 0 { config.slow } else { 1 },
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut session = Session {
        config,
        runtime,
        backends: &backends,
    };
    let capacity = session.capacity(runs, &mut tell);
    let capacities: Vec<Option<Capacity>> = bench
        .contenders
        .iter()
        .map(|name| match capacity.get(name) {
            Some(Ok(runs)) => Capacity::of(runs.clone()),
            _ => None,
        })
        .collect();
    let (rate, basis) = offered_rate(bench, &capacities)?;
    let mut rows = Vec::new();
    for (name, capacity_of) in bench.contenders.iter().zip(&capacities) {
        tell(format!("proxy: {name}: {rate:.0} req/s (open loop)"));
        let mut row = match capacity.get(name) {
            Some(Err(reason)) => unavailable(name, reason.clone()),
            _ => session
                .one(name, Pace::Open { rate }, bench.duration)
                .unwrap_or_else(|reason| unavailable(name, reason)),
        };
        row.capacity = capacity_of.clone();
        rows.push(row);
    }
    drop(running);
    Ok(ProxyReport {
        machine: Machine {
            cores,
            kernel: procfs::kernel_release(),
            load_generator_threads: cores,
            shared_cores: true,
        },
        workers: bench.workers,
        duration_s: bench.duration.as_secs_f64(),
        capacity_runs: runs,
        capacity_duration_s: bench.capacity_duration.as_secs_f64(),
        offered_rps: rate,
        basis,
        arrivals: bench.arrivals,
        sample_every_ms: SAMPLE_EVERY.as_secs_f64() * 1e3,
        verdict: verdict(&rows, &backends),
        backends,
        rows,
    })
}

/// The open-loop rate: fixed, or the fraction of the slowest median capacity.
fn offered_rate(
    bench: &BenchConfig,
    capacities: &[Option<Capacity>],
) -> Result<(f64, String), BenchError> {
    match bench.offered {
        Offered::Rate(rate) => Ok((rate, "fixed by --rate".to_owned())),
        Offered::Load(fraction) => {
            let (name, slowest) = bench
                .contenders
                .iter()
                .zip(capacities)
                .filter_map(|(name, c)| Some((name, c.as_ref()?.median_rps)))
                .filter(|(_, rps)| *rps > 0.0)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .ok_or_else(|| BenchError::NoCapacity("proxy".to_owned()))?;
            let basis = format!(
                "{:.0}% of the slowest median capacity ({name} at {slowest:.0} req/s)",
                fraction * 100.0
            );
            Ok((fraction * slowest, basis))
        }
    }
}

/// A run in progress.
struct Session<'a> {
    config: &'a ProxyBenchConfig,
    runtime: tokio::runtime::Runtime,
    backends: &'a [Backend],
}

impl Session<'_> {
    /// The closed-loop runs of every frontend, the frontends taking turns so that a slow
    /// spell touches them all: requests/s per run by name, or why it did not start.
    fn capacity(
        &mut self,
        runs: usize,
        tell: &mut dyn FnMut(String),
    ) -> HashMap<String, Result<Vec<f64>, String>> {
        let bench = &self.config.bench;
        let mut capacity: HashMap<String, Result<Vec<f64>, String>> = HashMap::new();
        for run in 1..=runs {
            for name in &bench.contenders {
                tell(format!(
                    "proxy: {name}: capacity run {run} of {runs} (closed loop)"
                ));
                let entry = capacity
                    .entry(name.clone())
                    .or_insert_with(|| Ok(Vec::new()));
                let Ok(so_far) = entry else { continue };
                let pace = Pace::Closed {
                    clients: bench.clients,
                };
                match self.one(name, pace, bench.capacity_duration) {
                    Ok(row) => so_far.push(row.achieved_rps),
                    Err(reason) => *entry = Err(reason),
                }
            }
        }
        capacity
    }

    /// Starts frontend `name`, runs one load through it, stops it.
    fn one(&mut self, name: &str, pace: Pace, duration: Duration) -> Result<ProxyRow, String> {
        let bench = &self.config.bench;
        let addrs: Vec<SocketAddr> = self.backends.iter().map(|b| b.addr).collect();
        let running = frontend::start(&bench.program, name, bench.workers, &addrs)
            .map_err(|e| e.to_string())?;
        let open = matches!(pace, Pace::Open { .. });
        let spec = LoadSpec {
            addr: running.addr,
            pace,
            connections: Connections::PerRequest,
            warmup: bench.warmup,
            duration,
            timeout: bench.timeout,
            max_in_flight: 512,
            arrivals: bench.arrivals,
            spans: open,
        };
        let measured = measure(&self.runtime, &running, spec);
        running.stop();
        let offered = match pace {
            Pace::Open { rate } => Some(rate),
            Pace::Closed { .. } => None,
        };
        Ok(row(name, &measured, self.backends, offered))
    }
}

/// A load run with the CPU counters around its window.
struct Measured {
    tally: Tally,
    /// The window as scheduled: what the requests counted were due in.
    from: Instant,
    to: Instant,
    /// The window as the CPU counters were read (a little late on a busy machine).
    cpu_window: Duration,
    frontend: Duration,
    generator: Duration,
}

fn measure(runtime: &tokio::runtime::Runtime, running: &Running, spec: LoadSpec) -> Measured {
    let pids: Vec<u32> = std::iter::once(running.master)
        .chain(running.workers.iter().copied())
        .collect();
    let cpu = || -> Duration { pids.iter().filter_map(|&p| procfs::cpu_time(p)).sum() };
    runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(5);
        let load = tokio::spawn(load::run(spec, start));
        let at = |edge: Instant| tokio::time::sleep_until(tokio::time::Instant::from_std(edge));
        let (from, to) = (start + spec.warmup, start + spec.warmup + spec.duration);
        at(from).await;
        let (read_from, cpu_from) = (Instant::now(), cpu());
        let generator_from = crate::sys::process::self_cpu_time();
        at(to).await;
        let (read_to, cpu_to) = (Instant::now(), cpu());
        let generator = crate::sys::process::self_cpu_time().saturating_sub(generator_from);
        let tally = load.await.unwrap_or_default();
        Measured {
            tally,
            from,
            to,
            cpu_window: read_to.saturating_duration_since(read_from),
            frontend: cpu_to.saturating_sub(cpu_from),
            generator,
        }
    })
}

fn unavailable(name: &str, reason: String) -> ProxyRow {
    ProxyRow {
        contender: name.to_owned(),
        unavailable: Some(reason),
        capacity: None,
        offered_rps: None,
        achieved_rps: 0.0,
        requests: 0,
        errors: Errors::default(),
        error_total: 0,
        latency_us: Percentiles::default(),
        backends: Vec::new(),
        in_flight: Spread::default(),
        frontend_cores: 0.0,
        load_generator_cores: 0.0,
        generator_lag_p99_us: None,
        warnings: Vec::new(),
    }
}

fn row(name: &str, m: &Measured, backends: &[Backend], offered: Option<f64>) -> ProxyRow {
    let seconds =
        m.to.saturating_duration_since(m.from)
            .as_secs_f64()
            .max(1e-9);
    let cpu_seconds = m.cpu_window.as_secs_f64().max(1e-9);
    let index: HashMap<u32, usize> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (b.pid, i))
        .collect();
    let requests: Vec<f64> = backends
        .iter()
        .map(|b| m.tally.by_pid.get(&b.pid).copied().unwrap_or(0) as f64)
        .collect();
    let intervals: Vec<Interval> = m
        .tally
        .spans
        .iter()
        .filter_map(|s| {
            Some(Interval {
                backend: *index.get(&s.pid)?,
                from: s.from,
                to: s.to,
            })
        })
        .collect();
    let in_flight = if offered.is_some() {
        inflight::sample(&intervals, backends.len(), m.from, m.to, SAMPLE_EVERY)
    } else {
        Spread::default()
    };
    let lag = &m.tally.dispatch_lag;
    let errors = m.tally.errors;
    let achieved = m.tally.ok as f64 / seconds;
    let mut warnings = Vec::new();
    if errors.total() > 0 {
        warnings.push(errors.to_string());
    }
    if offered.is_some_and(|o| achieved < 0.9 * o) {
        warnings.push(format!(
            "achieved {achieved:.0} of the {:.0} req/s offered: saturated",
            offered.unwrap_or(0.0)
        ));
    }
    let generator_lag = (!lag.is_empty()).then(|| lag.value_at_quantile(0.99));
    if let Some(p99) = generator_lag.filter(|p99| *p99 > LATE_GENERATOR_US) {
        warnings.push(format!(
            "the load generator sent late (p99 {p99} µs behind its schedule); latencies include it, and so do the in-flight spans (an answer read late stays in flight)"
        ));
    }
    let strangers = m
        .tally
        .by_pid
        .keys()
        .filter(|p| !index.contains_key(p))
        .count();
    if strangers > 0 {
        warnings.push(format!(
            "answers came from {strangers} pids that are no backend's"
        ));
    }
    let share = shares(&requests);
    ProxyRow {
        contender: name.to_owned(),
        unavailable: None,
        capacity: None,
        offered_rps: offered,
        achieved_rps: achieved,
        requests: m.tally.ok,
        errors,
        error_total: errors.total(),
        latency_us: Percentiles::of(&m.tally.histogram),
        backends: (0..backends.len())
            .map(|i| BackendRow {
                requests: requests[i] as u64,
                share: share[i],
                in_flight: in_flight.backends.get(i).cloned().unwrap_or_default(),
            })
            .collect(),
        in_flight,
        frontend_cores: m.frontend.as_secs_f64() / cpu_seconds,
        load_generator_cores: m.generator.as_secs_f64() / cpu_seconds,
        generator_lag_p99_us: generator_lag,
        warnings,
    }
}

/// The acceptance's figures in words: the in-flight spread of `handoff-proxy`, and its p99
/// against round-robin and HAProxy in the same run.
fn verdict(rows: &[ProxyRow], backends: &[Backend]) -> Vec<String> {
    let ran = |name: &str| {
        rows.iter()
            .find(|r| r.contender == name && r.unavailable.is_none() && r.requests > 0)
    };
    let Some(least) = ran("handoff-proxy") else {
        return Vec::new();
    };
    let mut lines = vec![format!(
        "handoff-proxy: every backend within ±1 of the least in flight in {:.1}% of {} samples (most above the least: {}, p99 {})",
        least.in_flight.within_one * 100.0,
        least.in_flight.samples,
        least.in_flight.max_above_least,
        least.in_flight.p99_above_least,
    )];
    if let (Some(slow), Some(work)) = (least.backends.first(), backends.first()) {
        let others = &least.backends[1..];
        let mean_other = others.iter().map(|b| b.share).sum::<f64>() / others.len().max(1) as f64;
        lines.push(format!(
            "handoff-proxy: the slow backend ({} µs per request) took {:.1}% of the requests, the others {:.1}% each on average",
            work.work_us + work.wait_us,
            slow.share * 100.0,
            mean_other * 100.0
        ));
    }
    let late: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let lag = r
                .generator_lag_p99_us
                .filter(|&p99| p99 > LATE_GENERATOR_US)?;
            Some(format!("{} {}", r.contender, super::format::latency(lag)))
        })
        .collect();
    if !late.is_empty() {
        lines.push(format!(
            "the load generator sent late (p99 behind its schedule: {}): those rows' p99 and in-flight spread measure the machine as much as the frontend; rerun on a quieter machine before reading them",
            late.join(", ")
        ));
    }
    for other in ["handoff-proxy-rr", "haproxy-leastconn"] {
        if let Some(o) = ran(other) {
            let (a, b) = (least.latency_us.p99, o.latency_us.p99);
            let word = match a.cmp(&b) {
                std::cmp::Ordering::Less => "lower",
                std::cmp::Ordering::Equal => "the same",
                std::cmp::Ordering::Greater => "higher",
            };
            lines.push(format!(
                "p99: handoff-proxy {} against {other} {}: {word} (one run; compare across runs before reading a small gap)",
                super::format::latency(a),
                super::format::latency(b),
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(name: &str, p99: u64, lag: Option<u64>) -> ProxyRow {
        let mut row = unavailable(name, String::new());
        row.unavailable = None;
        row.requests = 100;
        row.latency_us.p99 = p99;
        row.generator_lag_p99_us = lag;
        row
    }

    #[test]
    fn the_verdict_compares_p99_and_flags_rows_the_generator_sent_late() {
        let quiet = [
            ran("handoff-proxy", 11_000, Some(300)),
            ran("handoff-proxy-rr", 14_000, Some(400)),
        ];
        let lines = verdict(&quiet, &[]);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("handoff-proxy-rr") && l.contains("lower")),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("sent late")), "{lines:?}");
        let busy = [
            ran("handoff-proxy", 11_000, Some(300)),
            ran("haproxy-leastconn", 9_000, Some(50_000)),
        ];
        let lines = verdict(&busy, &[]);
        let late: Vec<&String> = lines.iter().filter(|l| l.contains("sent late")).collect();
        assert_eq!(late.len(), 1, "{lines:?}");
        assert!(late[0].contains("haproxy-leastconn 50"), "{lines:?}");
        assert!(!late[0].contains("handoff-proxy "), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("haproxy-leastconn") && l.contains("higher")),
            "{lines:?}"
        );
    }
}
