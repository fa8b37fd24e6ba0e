//! `handoff run`: the master with the embedded demo worker, or with a COMMAND as worker.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use handoff::config::{parse_duration, Config, ListenAddr};
use handoff::demo::{self, Cost};
use handoff::{Server, Strategy};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address to listen on: HOST:PORT, [IPV6]:PORT or unix:/path (repeatable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    listen: Vec<ListenAddr>,
    /// Worker processes [default: available CPUs].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// How connections are spread over workers.
    #[arg(long, value_enum, default_value_t = Strategy::LeastLoaded)]
    strategy: Strategy,
    /// Kernel accept queue length per listener.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    backlog: i32,
    /// Connections handed to a worker and not yet acknowledged, at most; when every worker
    /// is at it, the master stops accepting and the kernel backlog holds the rest.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_pending: usize,
    /// How long workers get to finish in-flight connections on stop (e.g. 30s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Unix socket where the master answers `status` (see `handoff ctl`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Demo worker: CPU microseconds burned per request.
    #[arg(long, value_name = "N", default_value_t = 0)]
    work_us: u64,
    /// Demo worker: PCT percent of requests burn US microseconds instead (e.g. 2:2500).
    #[arg(long, value_name = "PCT:US", value_parser = demo::parse_heavy)]
    heavy: Option<(f64, Duration)>,
    /// The worker program and its arguments (after --); without it, the embedded demo.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.listen = args.listen;
    config.strategy = args.strategy;
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    config.backlog = args.backlog;
    config.max_pending = args.max_pending;
    config.shutdown_timeout = args.shutdown_timeout;
    config.control = args.control;
    let server = Server::from_config(config);
    if args.command.is_empty() {
        let cost = Cost {
            work: Duration::from_micros(args.work_us),
            heavy: args.heavy,
        };
        server
            .run(move |incoming| demo::serve(incoming, cost))
            .context("handoff run")
    } else {
        server.run_command(args.command).context("handoff run")
    }
}
