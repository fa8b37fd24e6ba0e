//! `handoff bench`: compares handoff's strategies with what a user would run instead, on the
//! same machine, in the same run (how and why: `docs/benchmarks.md`).
//!
//! Runs in the bench process. For each workload it starts each contender in turn (a child
//! `handoff run`, or node's cluster module), drives it with the built-in load generator
//! ([`load`]) over 127.0.0.1, reads the CPU time of its master and workers from `/proc`
//! ([`crate::procfs`]) before and after the measured window, stops it, and moves on. With a load
//! fraction, a closed-loop pass first measures every contender's capacity, several times with
//! the contenders taking turns, and the open-loop pass then offers that fraction of the slowest
//! median to all. The result is a [`Report`] with a one-line verdict per workload
//! ([`verdict`]), shown as a terminal table, JSON and an SVG picture ([`report`]).

pub mod contender;
mod format;
pub mod load;
mod measure;
pub mod proxy;
pub mod report;
pub mod stats;
mod svg;
pub mod verdict;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use contender::{ContenderError, Cost, Kind, Launcher, Running};
use load::{Arrivals, Connections, Errors, LoadSpec, Pace};
use measure::{measure, row, unavailable};
use stats::{Capacity, Percentiles};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Building the load generator's tokio runtime.
    #[error("starting the load generator's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A contender name that means nothing.
    #[error(transparent)]
    Contender(#[from] ContenderError),
    /// A workload name that means nothing.
    #[error("unknown workload {0:?} (known: hello, keepalive, heavy-tail, long-lived)")]
    UnknownWorkload(String),
    /// Nothing to compare.
    #[error("no contenders to run")]
    NoContenders,
    /// `--load` needs a capacity, and no contender answered in the capacity pass.
    #[error(
        "workload {0}: no contender answered in the capacity pass, so there is no rate to offer"
    )]
    NoCapacity(String),
}

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// One request per new connection (`connection: close`).
    Hello,
    /// The same over persistent connections.
    Keepalive,
    /// New connections; 2% of requests cost 50× the rest.
    HeavyTail,
    /// A few hundred persistent connections, a few busy and most quiet.
    LongLived,
}

impl Workload {
    /// Every workload, in the default order.
    pub const ALL: [Workload; 4] = [
        Workload::Hello,
        Workload::Keepalive,
        Workload::HeavyTail,
        Workload::LongLived,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Hello => "hello",
            Workload::Keepalive => "keepalive",
            Workload::HeavyTail => "heavy-tail",
            Workload::LongLived => "long-lived",
        }
    }

    /// The workload called `name`.
    pub fn parse(name: &str) -> Result<Workload, BenchError> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| BenchError::UnknownWorkload(name.to_owned()))
    }

    fn connections(self, config: &BenchConfig) -> Connections {
        match self {
            Workload::Hello | Workload::HeavyTail => Connections::PerRequest,
            Workload::Keepalive => Connections::KeepAlive {
                count: config.keepalive_connections,
            },
            Workload::LongLived => Connections::Skewed {
                count: config.long_lived_connections,
            },
        }
    }

    fn cost(self, config: &BenchConfig) -> Cost {
        Cost {
            work_us: config.work_us,
            heavy: (self == Workload::HeavyTail).then_some(config.heavy),
            wait_us: 0,
        }
    }

    fn describe(self, config: &BenchConfig) -> String {
        let work = config.work_us;
        match self {
            Workload::Hello => format!("new connection per request, {work} µs each"),
            Workload::Keepalive => format!(
                "{} persistent connections, {work} µs per request",
                config.keepalive_connections
            ),
            Workload::HeavyTail => format!(
                "new connection per request, {work} µs each, {}% at {} µs",
                config.heavy.0, config.heavy.1
            ),
            Workload::LongLived => format!(
                "{} persistent connections, activity ∝ 1/rank, {work} µs per request",
                config.long_lived_connections
            ),
        }
    }
}

/// The open-loop rate: fixed, or a fraction of the slowest contender's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offered {
    /// Requests per second.
    Rate(f64),
    /// A fraction of the slowest contender's closed-loop capacity (e.g. 0.5).
    Load(f64),
}

/// Everything a benchmark run needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The `handoff` binary started as the handoff contenders (normally the running one).
    pub program: PathBuf,
    /// Worker processes per contender.
    pub workers: usize,
    /// Contender names, in order (see [`contender::ALL`]).
    pub contenders: Vec<String>,
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// The open-loop rate.
    pub offered: Offered,
    /// The measured window of each open-loop run.
    pub duration: Duration,
    /// Traffic before each measured window, not recorded.
    pub warmup: Duration,
    /// The measured window of each capacity (closed-loop) run.
    pub capacity_duration: Duration,
    /// Capacity runs per contender and workload (the contenders take turns between runs).
    pub capacity_runs: usize,
    /// Closed-loop clients for new-connection workloads.
    pub clients: usize,
    /// Persistent connections of the keepalive workload.
    pub keepalive_connections: usize,
    /// Persistent connections of the long-lived workload.
    pub long_lived_connections: usize,
    /// CPU microseconds per request.
    pub work_us: u64,
    /// The heavy-tail workload's `(percent, microseconds)`.
    pub heavy: (f64, u64),
    /// The longest a request may take before it counts as a timeout.
    pub timeout: Duration,
    /// How open-loop requests on new connections arrive.
    pub arrivals: Arrivals,
}

impl BenchConfig {
    /// The full comparison: every contender and workload, three 3 s capacity runs, then 10 s
    /// each at half the slowest capacity.
    pub fn standard(program: PathBuf) -> BenchConfig {
        BenchConfig {
            program,
            workers: 4,
            contenders: contender::defaults().map(str::to_owned).collect(),
            workloads: Workload::ALL.to_vec(),
            offered: Offered::Load(0.5),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            capacity_duration: Duration::from_secs(3),
            capacity_runs: 3,
            clients: 32,
            keepalive_connections: 32,
            long_lived_connections: 300,
            work_us: 50,
            heavy: (2.0, 2500),
            timeout: Duration::from_secs(5),
            arrivals: Arrivals::Even,
        }
    }

    /// About a minute on two cores: hello and heavy-tail, three 750 ms capacity runs and 1.5 s
    /// at the offered rate per contender.
    pub fn quick(program: PathBuf) -> BenchConfig {
        BenchConfig {
            workloads: vec![Workload::Hello, Workload::HeavyTail],
            duration: Duration::from_millis(1500),
            warmup: Duration::from_millis(250),
            capacity_duration: Duration::from_millis(750),
            long_lived_connections: 100,
            timeout: Duration::from_secs(2),
            ..BenchConfig::standard(program)
        }
    }
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// The kernel release.
    pub kernel: String,
    /// Threads of the load generator.
    pub load_generator_threads: usize,
    /// Whether the load generator and the servers shared cores (no pinning: always).
    pub shared_cores: bool,
}

/// One contender under one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The contender's name.
    pub contender: String,
    /// Why it did not run, if it did not.
    pub unavailable: Option<String>,
    /// Its closed-loop throughput in the capacity runs (requests/s).
    pub capacity: Option<Capacity>,
    /// Its median capacity over `kernel-reuseport`'s in the same run.
    pub capacity_vs_reuseport: Option<f64>,
    /// The open-loop rate offered (requests/s).
    pub offered_rps: Option<f64>,
    /// Successful requests per second in the measured window.
    pub achieved_rps: f64,
    /// Successful requests in the window.
    pub requests: u64,
    /// Connections opened in the window.
    pub connections: u64,
    /// Failed requests by kind.
    pub errors: Errors,
    /// Failed requests in all.
    pub error_total: u64,
    /// Latency of the successful requests (open loop: from the scheduled send time), µs.
    pub latency_us: Percentiles,
    /// Per-worker shares.
    pub workers: Vec<WorkerRow>,
    /// Jain's index of the requests per worker.
    pub request_jain: Option<f64>,
    /// Most over fewest requests per worker (`null`: a worker had none).
    pub request_max_min: Option<f64>,
    /// Jain's index of the CPU time per worker.
    pub cpu_jain: Option<f64>,
    /// Most over least CPU time per worker (`null`: a worker had none).
    pub cpu_max_min: Option<f64>,
    /// The master's (or node primary's) CPU.
    pub master: Option<MasterRow>,
    /// CPU the load generator used, in cores (1.0 = one core busy).
    pub load_generator_cores: f64,
    /// CPU the contender's processes used, in cores.
    pub server_cores: f64,
    /// Open loop: the 99th percentile of how late the generator itself sent, µs.
    pub generator_lag_p99_us: Option<u64>,
    /// What a reader should know about this row (errors, saturation, a busy generator).
    pub warnings: Vec<String>,
}

/// One worker's part of a row.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    /// Its pid.
    pub pid: u32,
    /// Requests it answered.
    pub requests: u64,
    /// Its fraction of all answered requests.
    pub request_share: f64,
    /// CPU time it used in the window, ms.
    pub cpu_ms: f64,
    /// Its fraction of the workers' CPU time.
    pub cpu_share: f64,
}

/// The master's part of a row.
#[derive(Debug, Clone, Serialize)]
pub struct MasterRow {
    /// Its pid.
    pub pid: u32,
    /// CPU time it used in the window, ms.
    pub cpu_ms: f64,
    /// That per connection opened in the window, µs.
    pub us_per_connection: Option<f64>,
}

/// One workload across the contenders.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// The workload.
    pub workload: Workload,
    /// What it does.
    pub description: String,
    /// The open-loop rate offered to every contender.
    pub offered_rps: Option<f64>,
    /// Where that rate came from.
    pub basis: String,
    /// handoff against the kernel in one line (see [`verdict`]), when the figures allow one.
    pub verdict: Option<String>,
    /// One row per contender.
    pub rows: Vec<Row>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Worker processes per contender.
    pub workers: usize,
    /// Measured window of each open-loop run, seconds.
    pub duration_s: f64,
    /// Capacity runs per contender and workload (0: the rate was fixed, no capacity measured).
    pub capacity_runs: usize,
    /// Measured window of each capacity run, seconds.
    pub capacity_duration_s: f64,
    /// Per workload.
    pub workloads: Vec<WorkloadReport>,
}

/// Where a run is, for a progress line.
#[derive(Debug, Clone)]
pub struct Progress {
    /// This step, from 1.
    pub step: usize,
    /// Steps in all.
    pub steps: usize,
    /// What it does.
    pub what: String,
}

/// Runs the benchmark, telling `progress` as each contender starts.
pub fn run(
    config: &BenchConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, BenchError> {
    for name in &config.contenders {
        Kind::parse(name)?;
    }
    if config.contenders.is_empty() || config.workloads.is_empty() {
        return Err(BenchError::NoContenders);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
        .map_err(BenchError::Runtime)?;
    let capacity_runs = capacity_runs(config);
    let passes = 1 + capacity_runs;
    let mut session = Session {
        config,
        runtime,
        launcher: Launcher {
            program: config.program.clone(),
            workers: config.workers,
        },
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        progress,
        step: 0,
        steps: passes * config.contenders.len() * config.workloads.len(),
    };
    let mut workloads = Vec::new();
    for &workload in &config.workloads {
        workloads.push(session.workload(workload)?);
    }
    Ok(Report {
        machine: Machine {
            cores: session.cores,
            kernel: crate::procfs::kernel_release(),
            load_generator_threads: session.cores,
            shared_cores: true,
        },
        workers: config.workers,
        duration_s: config.duration.as_secs_f64(),
        capacity_runs,
        capacity_duration_s: config.capacity_duration.as_secs_f64(),
        workloads,
    })
}

/// A run in progress: what every measurement needs.
struct Session<'a> {
    config: &'a BenchConfig,
    runtime: tokio::runtime::Runtime,
    launcher: Launcher,
    cores: usize,
    progress: &'a mut dyn FnMut(&Progress),
    step: usize,
    steps: usize,
}

impl Session<'_> {
    fn tell(&mut self, what: String) {
        self.step += 1;
        (self.progress)(&Progress {
            step: self.step,
            steps: self.steps,
            what,
        });
    }

    /// Every contender under `workload`: the capacity runs if the rate depends on them, then
    /// the open-loop pass.
    fn workload(&mut self, workload: Workload) -> Result<WorkloadReport, BenchError> {
        let config = self.config;
        let capacity = self.capacity(workload);
        let (rate, basis) = match config.offered {
            Offered::Rate(rate) => (rate, "fixed by --rate".to_owned()),
            Offered::Load(fraction) => {
                let (name, slowest) = config
                    .contenders
                    .iter()
                    .zip(&capacity)
                    .filter_map(|(name, c)| {
                        let rps = c.as_ref().ok()?.capacity.as_ref()?.median_rps;
                        (rps > 0.0).then_some((name, rps))
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .ok_or_else(|| BenchError::NoCapacity(workload.name().to_owned()))?;
                let basis = format!(
                    "{:.0}% of the slowest median capacity ({name} at {slowest:.0} req/s)",
                    fraction * 100.0
                );
                (fraction * slowest, basis)
            }
        };
        let reuseport = config
            .contenders
            .iter()
            .zip(&capacity)
            .find(|(name, _)| *name == "kernel-reuseport")
            .and_then(|(_, c)| c.as_ref().ok()?.capacity.as_ref().map(|c| c.median_rps))
            .filter(|rps| *rps > 0.0);
        let mut rows = Vec::new();
        for (i, name) in config.contenders.iter().enumerate() {
            self.tell(format!(
                "{}: {name}: {rate:.0} req/s (open loop)",
                workload.name()
            ));
            let mut row = match capacity.get(i) {
                // It did not start for a capacity run: no second try.
                Some(Err(reason)) => unavailable(name, reason.clone()),
                _ => self
                    .one(name, workload, Pace::Open { rate }, config.duration)
                    .unwrap_or_else(|reason| unavailable(name, reason)),
            };
            if let Some(Ok(pass)) = capacity.get(i) {
                row.capacity_vs_reuseport = pass
                    .capacity
                    .as_ref()
                    .zip(reuseport)
                    .map(|(c, r)| c.median_rps / r);
                row.capacity = pass.capacity.clone();
                row.warnings.extend(pass.warnings.iter().cloned());
            }
            rows.push(row);
        }
        Ok(WorkloadReport {
            workload,
            description: workload.describe(config),
            offered_rps: Some(rate),
            basis,
            verdict: verdict::for_workload(&rows),
            rows,
        })
    }

    /// The closed-loop runs of every contender under `workload`, the contenders taking turns
    /// so that a slow spell of the machine touches them all; one entry per contender, an error
    /// for one that did not start (it is not tried again). Empty when the rate is fixed.
    fn capacity(&mut self, workload: Workload) -> Vec<Result<CapacityPass, String>> {
        let config = self.config;
        let runs = capacity_runs(config);
        let clients = match workload.connections(config) {
            Connections::PerRequest => config.clients,
            Connections::KeepAlive { count } | Connections::Skewed { count } => count,
        };
        let pace = Pace::Closed { clients };
        let mut passes: Vec<Result<CapacityPass, String>> = (0..config.contenders.len())
            .map(|_| Ok(CapacityPass::default()))
            .collect();
        for run in 1..=runs {
            for (name, pass) in config.contenders.iter().zip(&mut passes) {
                self.tell(format!(
                    "{}: {name}: capacity run {run} of {runs} (closed loop)",
                    workload.name()
                ));
                let Ok(so_far) = pass else { continue };
                match self.one(name, workload, pace, config.capacity_duration) {
                    Ok(row) => so_far.add(run, row),
                    Err(reason) => *pass = Err(reason),
                }
            }
        }
        passes
    }

    /// Starts contender `name`, runs one load against it, stops it.
    fn one(
        &mut self,
        name: &str,
        workload: Workload,
        pace: Pace,
        duration: Duration,
    ) -> Result<Row, String> {
        let config = self.config;
        let running = self
            .launcher
            .start(name, workload.cost(config))
            .map_err(|e| e.to_string())?;
        let spec = spec(
            config,
            &running,
            pace,
            workload.connections(config),
            duration,
        );
        let measured = measure(&self.runtime, &running, spec);
        running.stop();
        let offered = match pace {
            Pace::Open { rate } => Some(rate),
            Pace::Closed { .. } => None,
        };
        Ok(row(name, &measured, offered, self.cores))
    }
}

/// One contender's capacity runs so far.
#[derive(Debug, Default)]
struct CapacityPass {
    runs: Vec<f64>,
    capacity: Option<Capacity>,
    warnings: Vec<String>,
}

impl CapacityPass {
    fn add(&mut self, run: usize, row: Row) {
        self.runs.push(row.achieved_rps);
        self.capacity = Capacity::of(self.runs.clone());
        let notes = row.warnings.into_iter();
        self.warnings
            .extend(notes.map(|w| format!("capacity run {run}: {w}")));
    }
}

/// How many capacity runs `config` makes per contender and workload.
fn capacity_runs(config: &BenchConfig) -> usize {
    match config.offered {
        Offered::Rate(_) => 0,
        Offered::Load(_) => config.capacity_runs.max(1),
    }
}

fn spec(
    config: &BenchConfig,
    running: &Running,
    pace: Pace,
    connections: Connections,
    duration: Duration,
) -> LoadSpec {
    LoadSpec {
        addr: running.addr,
        pace,
        connections,
        warmup: config.warmup,
        duration,
        timeout: config.timeout,
        max_in_flight: 512,
        arrivals: config.arrivals,
        spans: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::parse(w.name()).unwrap(), w);
        }
        assert!(Workload::parse("tsunami").is_err());
    }
}
