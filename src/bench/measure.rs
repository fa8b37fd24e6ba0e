//! One measurement: a load run against a started contender with the CPU counters of its
//! master and workers (and of the load generator) read from `/proc` at the edges of the
//! measured window, turned into a [`Row`]. Runs in the bench process.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::contender::Running;
use super::load::{self, Errors, LoadSpec, Tally};
use super::stats::{jain, max_over_min, shares, Percentiles};
use super::{MasterRow, Row, WorkerRow};
use crate::procfs;

/// CPU counters at one edge of the measured window.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    generator: Duration,
    master: Option<Duration>,
    workers: Vec<Option<Duration>>,
}

impl Snapshot {
    fn take(master: u32, workers: &[u32]) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            generator: crate::sys::process::self_cpu_time(),
            master: procfs::cpu_time(master),
            workers: workers.iter().map(|&pid| procfs::cpu_time(pid)).collect(),
        }
    }
}

/// A load run with the CPU counters around its window.
#[derive(Debug)]
pub(super) struct Measured {
    tally: Tally,
    window: Duration,
    master: u32,
    /// Known workers, then any other pid that answered.
    workers: Vec<u32>,
    /// How many of `workers` were known before the run.
    known: usize,
    before: Snapshot,
    after: Snapshot,
}

pub(super) fn measure(
    runtime: &tokio::runtime::Runtime,
    running: &Running,
    spec: LoadSpec,
) -> Measured {
    runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(5);
        let load = tokio::spawn(load::run(spec, start));
        let at = |edge: Instant| tokio::time::sleep_until(tokio::time::Instant::from_std(edge));
        at(start + spec.warmup).await;
        let before = Snapshot::take(running.master, &running.workers);
        at(start + spec.warmup + spec.duration).await;
        let mut after = Snapshot::take(running.master, &running.workers);
        let tally = load.await.unwrap_or_default();
        let known: BTreeSet<u32> = running.workers.iter().copied().collect();
        let mut workers = running.workers.clone();
        let mut extra: Vec<u32> = tally
            .by_pid
            .keys()
            .copied()
            .filter(|p| !known.contains(p))
            .collect();
        extra.sort_unstable();
        // A pid we did not know of answered (a restarted worker): its CPU from now on.
        let mut before = before;
        for pid in &extra {
            before.workers.push(Some(Duration::ZERO));
            after.workers.push(procfs::cpu_time(*pid));
        }
        workers.extend(extra);
        Measured {
            window: after.at.saturating_duration_since(before.at),
            tally,
            master: running.master,
            known: running.workers.len(),
            workers,
            before,
            after,
        }
    })
}

fn delta(before: Option<Duration>, after: Option<Duration>) -> Duration {
    match (before, after) {
        (Some(b), Some(a)) => a.saturating_sub(b),
        _ => Duration::ZERO,
    }
}

pub(super) fn unavailable(name: &str, reason: String) -> Row {
    Row {
        contender: name.to_owned(),
        unavailable: Some(reason),
        capacity: None,
        capacity_vs_reuseport: None,
        offered_rps: None,
        achieved_rps: 0.0,
        requests: 0,
        connections: 0,
        errors: Errors::default(),
        error_total: 0,
        latency_us: Percentiles::default(),
        workers: Vec::new(),
        request_jain: None,
        request_max_min: None,
        cpu_jain: None,
        cpu_max_min: None,
        master: None,
        load_generator_cores: 0.0,
        server_cores: 0.0,
        generator_lag_p99_us: None,
        warnings: Vec::new(),
    }
}

/// Requests and CPU milliseconds per worker, in the order of `m.workers`.
fn per_worker(m: &Measured) -> (Vec<f64>, Vec<f64>) {
    let requests = m
        .workers
        .iter()
        .map(|pid| m.tally.by_pid.get(pid).copied().unwrap_or(0) as f64)
        .collect();
    let cpu = (0..m.workers.len())
        .map(|i| {
            let before = m.before.workers.get(i).copied().flatten();
            let after = m.after.workers.get(i).copied().flatten();
            delta(before, after).as_secs_f64() * 1e3
        })
        .collect();
    (requests, cpu)
}

/// The CPU figures of a window that the warnings look at.
struct Load {
    achieved: f64,
    offered: Option<f64>,
    generator_cores: f64,
    server_cores: f64,
    cores: usize,
    generator_lag: Option<u64>,
}

/// What a reader should know about a run: errors, saturation, a busy or late generator,
/// answers from unknown pids.
fn warnings(m: &Measured, load: &Load) -> Vec<String> {
    let mut warnings = Vec::new();
    let errors = m.tally.errors;
    if errors.total() > 0 {
        warnings.push(errors.to_string());
    }
    let achieved = load.achieved;
    if let Some(offered) = load.offered {
        if achieved < 0.9 * offered {
            warnings.push(format!(
                "achieved {achieved:.0} of the {offered:.0} req/s offered: saturated"
            ));
        }
    }
    let (generator, server, cores) = (load.generator_cores, load.server_cores, load.cores);
    if generator >= 0.9 * cores as f64 || (generator > server && generator > 0.5) {
        warnings.push(format!(
            "the load generator used {generator:.2} cores (the server {server:.2} of {cores}): it may be the bottleneck"
        ));
    }
    if let Some(p99) = load.generator_lag.filter(|p99| *p99 > 2_000) {
        warnings.push(format!(
            "the load generator sent late (p99 {p99} µs behind its schedule: CPU contention or an overloaded generator); latencies include it"
        ));
    }
    if m.workers.len() > m.known {
        warnings.push(format!(
            "answers came from {} pids outside the worker list (restarted workers?)",
            m.workers.len() - m.known
        ));
    }
    warnings
}

pub(super) fn row(name: &str, m: &Measured, offered: Option<f64>, cores: usize) -> Row {
    let seconds = m.window.as_secs_f64().max(1e-9);
    let (requests, cpu) = per_worker(m);
    let request_shares = shares(&requests);
    let cpu_shares = shares(&cpu);
    let workers = m
        .workers
        .iter()
        .enumerate()
        .map(|(i, &pid)| WorkerRow {
            pid,
            requests: requests[i] as u64,
            request_share: request_shares[i],
            cpu_ms: cpu[i],
            cpu_share: cpu_shares[i],
        })
        .collect();
    let master_ms = delta(m.before.master, m.after.master).as_secs_f64() * 1e3;
    let generator = m.after.generator.saturating_sub(m.before.generator);
    let lag = &m.tally.dispatch_lag;
    let load = Load {
        achieved: m.tally.ok as f64 / seconds,
        offered,
        generator_cores: generator.as_secs_f64() / seconds,
        server_cores: (cpu.iter().sum::<f64>() + master_ms) / 1e3 / seconds,
        cores,
        generator_lag: (!lag.is_empty()).then(|| lag.value_at_quantile(0.99)),
    };
    let errors = m.tally.errors;
    Row {
        contender: name.to_owned(),
        unavailable: None,
        capacity: None,
        capacity_vs_reuseport: None,
        offered_rps: offered,
        achieved_rps: load.achieved,
        requests: m.tally.ok,
        connections: m.tally.connects,
        errors,
        error_total: errors.total(),
        latency_us: Percentiles::of(&m.tally.histogram),
        workers,
        request_jain: jain(&requests),
        request_max_min: max_over_min(&requests),
        cpu_jain: jain(&cpu),
        cpu_max_min: max_over_min(&cpu),
        master: m.before.master.map(|_| MasterRow {
            pid: m.master,
            cpu_ms: master_ms,
            us_per_connection: (m.tally.connects > 0)
                .then(|| master_ms * 1e3 / m.tally.connects as f64),
        }),
        load_generator_cores: load.generator_cores,
        server_cores: load.server_cores,
        generator_lag_p99_us: load.generator_lag,
        warnings: warnings(m, &load),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(at: Instant, master: u64, workers: &[u64]) -> Snapshot {
        Snapshot {
            at,
            generator: Duration::ZERO,
            master: Some(Duration::from_millis(master)),
            workers: workers
                .iter()
                .map(|ms| Some(Duration::from_millis(*ms)))
                .collect(),
        }
    }

    #[test]
    fn a_row_adds_up_shares_fairness_and_master_cost() {
        let t0 = Instant::now();
        let mut tally = Tally {
            ok: 400,
            connects: 400,
            ..Tally::default()
        };
        tally.by_pid.insert(10, 300);
        tally.by_pid.insert(11, 100);
        for _ in 0..400 {
            tally.histogram.record(100).unwrap();
        }
        let m = Measured {
            tally,
            window: Duration::from_secs(2),
            master: 1,
            workers: vec![10, 11, 12],
            known: 3,
            before: snapshot(t0, 100, &[0, 0, 0]),
            after: snapshot(t0 + Duration::from_secs(2), 120, &[30, 10, 0]),
        };
        let row = row("handoff-rr", &m, Some(200.0), 2);
        assert_eq!(row.achieved_rps, 200.0);
        assert_eq!(row.workers.iter().map(|w| w.requests).sum::<u64>(), 400);
        assert_eq!(row.workers[0].request_share, 0.75);
        // (300+100+0)² / (3·(300²+100²)) = 160000/300000
        assert!((row.request_jain.unwrap() - 160_000.0 / 300_000.0).abs() < 1e-9);
        assert_eq!(
            row.request_max_min, None,
            "an idle worker makes max/min unbounded"
        );
        assert_eq!(row.workers[1].cpu_ms, 10.0);
        let master = row.master.unwrap();
        assert_eq!(master.cpu_ms, 20.0);
        assert_eq!(master.us_per_connection, Some(50.0));
        assert!(row.warnings.is_empty(), "{:?}", row.warnings);
    }

    #[test]
    fn a_short_or_failing_run_is_flagged() {
        let t0 = Instant::now();
        let mut tally = Tally {
            ok: 10,
            ..Tally::default()
        };
        tally.by_pid.insert(10, 10);
        tally.by_pid.insert(99, 0);
        tally.errors.timeout = 3;
        let m = Measured {
            tally,
            window: Duration::from_secs(1),
            master: 1,
            workers: vec![10, 99],
            known: 1,
            before: snapshot(t0, 0, &[0, 0]),
            after: snapshot(t0 + Duration::from_secs(1), 0, &[5, 0]),
        };
        let row = row("kernel-shared", &m, Some(100.0), 2);
        let all = row.warnings.join("\n");
        assert!(all.contains("3 errors"), "{all}");
        assert!(all.contains("saturated"), "{all}");
        assert!(all.contains("outside the worker list"), "{all}");
        assert_eq!(row.error_total, 3);
    }
}
