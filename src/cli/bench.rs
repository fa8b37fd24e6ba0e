//! `handoff bench`: runs the comparison of `handoff::bench`, prints its table, and writes the
//! table, the JSON and the SVG picture into a folder: `target/bench/<UTC time>/` unless
//! `--out` names one.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Args;

use super::parse::parse_duration;
use crate::bench::load::Arrivals;
use crate::bench::proxy::{self as proxy_bench, frontend, ProxyBenchConfig};
use crate::bench::{self, contender, report, BenchConfig, Offered, Workload};
use crate::demo;

/// Where a run's folder goes without `--out`, relative to the current directory.
const DEFAULT_OUT: &str = "target/bench";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// About a minute on two cores: 4 workers, hello and heavy-tail, three 750 ms capacity runs
    /// and 1.5 s at the offered rate per contender.
    #[arg(long)]
    quick: bool,
    /// Worker processes per contender [default: 4].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Contenders, comma-separated [default: kernel-shared, kernel-reuseport, handoff-rr,
    /// handoff-least, handoff-p2c, handoff-kernel-least where bpf(2) is allowed (CAP_BPF),
    /// and node-rr, node-none, handoff-node when node is on PATH; handoff-kernel-p2c when
    /// named].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    contenders: Vec<String>,
    /// Workloads, comma-separated: hello, keepalive, heavy-tail, long-lived [default: all;
    /// with --quick: hello, heavy-tail].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Offer this many requests per second to every contender (open loop).
    #[arg(long, value_name = "R", conflicts_with = "load")]
    rate: Option<f64>,
    /// Offer this fraction of the slowest contender's closed-loop capacity [default: 0.5].
    #[arg(long, value_name = "FRACTION")]
    load: Option<f64>,
    /// Measured time per contender and workload [default: 10s; with --quick: 1.5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured traffic before each measurement [default: 1s; with --quick: 250ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Measured time of each capacity (closed-loop) run [default: 3s; with --quick: 750ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    capacity_duration: Option<Duration>,
    /// Capacity runs per contender and workload, the contenders taking turns; the table shows
    /// their lowest–highest, the ratios use the median [default: 3].
    #[arg(long, value_name = "N")]
    capacity_runs: Option<usize>,
    /// Closed-loop clients for the new-connection workloads [default: 32].
    #[arg(long, value_name = "N")]
    clients: Option<usize>,
    /// CPU microseconds each request costs [default: 50].
    #[arg(long, value_name = "N")]
    work_us: Option<u64>,
    /// The heavy-tail workload: PCT percent of requests cost US microseconds [default: 2:2500].
    #[arg(long, value_name = "PCT:US", value_parser = demo::parse_heavy)]
    heavy: Option<(f64, Duration)>,
    /// Compare proxies instead: `handoff proxy` (least-conn and round-robin), HAProxy
    /// (leastconn) and nginx (least_conn) when installed, in front of the same --backends,
    /// the first of them --slow times slower; a new connection per request, at the --load
    /// fraction of the slowest capacity. --workers defaults to 2 here, --contenders names
    /// frontends, --workloads does not apply.
    #[arg(long, conflicts_with = "workloads")]
    proxy: bool,
    /// With --proxy: backends behind every frontend [default: 8].
    #[arg(long, value_name = "N", requires = "proxy")]
    backends: Option<usize>,
    /// With --proxy: how many times slower per request the first backend is, its CPU and its
    /// wait [default: 10].
    #[arg(long, value_name = "FACTOR", requires = "proxy")]
    slow: Option<u64>,
    /// With --proxy: microseconds each request blocks its backend without CPU, besides
    /// --work-us of CPU; each backend serves one request at a time, so the slow one queues
    /// under round-robin at a medium load [default: 1000].
    #[arg(long, value_name = "N", requires = "proxy")]
    wait_us: Option<u64>,
    /// How open-loop requests on new connections arrive: at an even pace, or independently
    /// (Poisson, from a fixed seed) [default: even; with --proxy: poisson].
    #[arg(long, value_enum, value_name = "HOW")]
    arrivals: Option<Arrivals>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write report.svg, report.json and table.txt into this folder [default: a new
    /// target/bench/<UTC time>/ under the current directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Frontend workers with --proxy unless --workers says otherwise.
const PROXY_WORKERS: usize = 2;

/// Every proxy frontend whose program is installed; a line on stderr for each left out.
fn proxy_frontends() -> Vec<String> {
    let mut names = Vec::new();
    for name in frontend::ALL {
        match frontend::Frontend::parse(name)
            .ok()
            .and_then(|f| f.missing())
        {
            Some(program) => {
                eprintln!("handoff bench: {program} is not installed; leaving out {name}")
            }
            None => names.push(name.to_owned()),
        }
    }
    names
}

fn proxy_config(args: &BenchArgs, bench: BenchConfig) -> anyhow::Result<ProxyBenchConfig> {
    let backends = args.backends.unwrap_or(8);
    anyhow::ensure!(
        (1..=64).contains(&backends),
        "--backends must be between 1 and 64"
    );
    let slow = args.slow.unwrap_or(10);
    anyhow::ensure!(slow >= 1, "--slow must be at least 1");
    Ok(ProxyBenchConfig {
        bench,
        backends,
        wait_us: args.wait_us.unwrap_or(proxy_bench::DEFAULT_WAIT_US),
        slow,
    })
}

fn config(args: &BenchArgs) -> anyhow::Result<BenchConfig> {
    let program = std::env::current_exe().context("finding the handoff binary")?;
    let mut config = if args.quick {
        BenchConfig::quick(program)
    } else {
        BenchConfig::standard(program)
    };
    if let Some(workers) = args.workers {
        anyhow::ensure!(workers > 0, "--workers must be at least 1");
        config.workers = workers;
    }
    config.arrivals = args.arrivals.unwrap_or(if args.proxy {
        Arrivals::Poisson
    } else {
        Arrivals::Even
    });
    if args.proxy {
        config.workers = args.workers.unwrap_or(PROXY_WORKERS);
        config.contenders = if args.contenders.is_empty() {
            proxy_frontends()
        } else {
            args.contenders
                .iter()
                .map(|c| c.trim().to_owned())
                .collect()
        };
    } else if args.contenders.is_empty() {
        if contender::find_on_path("node").is_none() {
            eprintln!(
                "handoff bench: node is not on PATH; leaving out node-rr, node-none and handoff-node"
            );
            config
                .contenders
                .retain(|c| !c.starts_with("node-") && c != "handoff-node");
        }
        if !crate::bpf::available() {
            eprintln!(
                "handoff bench: bpf(2) is not allowed here (CAP_BPF); leaving out handoff-kernel-least"
            );
            config.contenders.retain(|c| c != "handoff-kernel-least");
        }
    } else {
        config.contenders = args
            .contenders
            .iter()
            .map(|c| c.trim().to_owned())
            .collect();
    }
    if !args.workloads.is_empty() {
        config.workloads = args
            .workloads
            .iter()
            .map(|w| Workload::parse(w.trim()))
            .collect::<Result<_, _>>()?;
    }
    match (args.rate, args.load) {
        (Some(rate), _) => {
            anyhow::ensure!(rate.is_finite() && rate > 0.0, "--rate must be positive");
            config.offered = Offered::Rate(rate);
        }
        (None, Some(load)) => {
            anyhow::ensure!(load.is_finite() && load > 0.0, "--load must be positive");
            config.offered = Offered::Load(load);
        }
        (None, None) => {}
    }
    if let Some(duration) = args.duration {
        anyhow::ensure!(!duration.is_zero(), "--duration must be positive");
        config.duration = duration;
    }
    if let Some(warmup) = args.warmup {
        config.warmup = warmup;
    }
    if let Some(capacity) = args.capacity_duration {
        anyhow::ensure!(!capacity.is_zero(), "--capacity-duration must be positive");
        config.capacity_duration = capacity;
    }
    if let Some(runs) = args.capacity_runs {
        anyhow::ensure!(runs > 0, "--capacity-runs must be at least 1");
        config.capacity_runs = runs;
    }
    if let Some(clients) = args.clients {
        config.clients = clients.max(1);
    }
    if let Some(work_us) = args.work_us {
        config.work_us = work_us;
        config.heavy.1 = 50 * work_us;
    }
    if let Some((pct, us)) = args.heavy {
        config.heavy = (pct, us.as_micros() as u64);
    }
    Ok(config)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let progress = move |p: &bench::Progress| {
        let line = format!(
            "[{}/{} {:>3.0}s] {}",
            p.step,
            p.steps,
            started.elapsed().as_secs_f64(),
            p.what
        );
        let mut stderr = std::io::stderr().lock();
        if terminal {
            let _ = write!(stderr, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(stderr, "{line}");
        }
        let _ = stderr.flush();
    };
    if args.proxy {
        return run_proxy(&args, proxy_config(&args, config)?, started, progress);
    }
    let mut progress = progress;
    let result = bench::run(&config, &mut progress);
    if terminal {
        eprint!("\r\x1b[K");
    }
    let report = result.context("handoff bench")?;
    eprintln!(
        "handoff bench: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    std::io::stdout()
        .write_all(report::table(&report).as_bytes())
        .context("writing the table")?;
    if let Some(path) = &args.json {
        report::write_json(&report, path)?;
        eprintln!("handoff bench: wrote {}", path.display());
    }
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => report::new_run_dir(Path::new(DEFAULT_OUT), SystemTime::now())
            .context("creating the output folder (--out names another)")?,
    };
    report::write_dir(&report, &dir)?;
    eprintln!(
        "handoff bench: wrote {} in {}",
        report::FILES.join(", "),
        dir.display()
    );
    Ok(())
}

/// `--proxy`: runs the proxy comparison and writes its table and JSON (no picture yet).
fn run_proxy(
    args: &BenchArgs,
    config: ProxyBenchConfig,
    started: Instant,
    mut progress: impl FnMut(&bench::Progress),
) -> anyhow::Result<()> {
    let result = proxy_bench::run(&config, &mut progress);
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
    let report = result.context("handoff bench --proxy")?;
    eprintln!(
        "handoff bench: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let table = proxy_bench::table(&report);
    std::io::stdout()
        .write_all(table.as_bytes())
        .context("writing the table")?;
    let json = serde_json::to_string_pretty(&report).context("encoding the report")? + "\n";
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("handoff bench: wrote {}", path.display());
    }
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => report::new_run_dir(Path::new(DEFAULT_OUT), SystemTime::now())
            .context("creating the output folder (--out names another)")?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [("report.json", &json), ("table.txt", &table)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "handoff bench: wrote report.json, table.txt in {}",
        dir.display()
    );
    Ok(())
}
