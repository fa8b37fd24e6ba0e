//! `handoff run`: the master with the embedded demo worker, or with a COMMAND as worker.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::parse::{parse_duration, parse_size};
use crate::config::{Config, ListenAddr};
use crate::demo::{self, Cost};
use crate::supervise::Limits;
use crate::{Server, Strategy};

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
    /// Serve Prometheus text at http://ADDR/metrics: the master's figures and the workers'
    /// `metrics`, added up across the cluster (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Replace a worker once it has run this long (e.g. 1h). Its replacement starts first;
    /// the old one drains once the new one is ready.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,
    /// Replace a worker once this many connections have been handed to it.
    #[arg(long, value_name = "N")]
    max_connections: Option<u64>,
    /// Replace a worker once its resident memory reaches SIZE (e.g. 200M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_rss: Option<u64>,
    /// How often worker memory is read for --max-rss.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    rss_interval: Duration,
    /// Lower each worker's limits by a random share of up to PCT percent, so workers do not
    /// recycle together.
    #[arg(long, value_name = "PCT", default_value_t = 10.0)]
    jitter: f64,
    /// How long a replaced worker may take to finish its connections before it is killed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Workers replaced at a time by a rolling restart (SIGHUP) [default: a quarter, at
    /// least 1].
    #[arg(long, value_name = "N")]
    restart_batch: Option<usize>,
    /// A worker silent this long (no status, no heartbeat) gets SIGABRT, then SIGKILL, and
    /// is replaced.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    worker_timeout: Duration,
    /// A worker that holds connections unacknowledged this long without acknowledging or
    /// finishing any is replaced like a silent one, and its connections go to other workers.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    ack_timeout: Duration,
    /// Where the workers' shared map lives: `master` (the default) or a Redis URL,
    /// redis://HOST:PORT[/DB] or redis+unix:///PATH, for clusters on several hosts.
    #[arg(long, value_name = "URL")]
    state: Option<String>,
    /// Demo worker: CPU microseconds burned per request.
    #[arg(long, value_name = "N", default_value_t = 0)]
    work_us: u64,
    /// Demo worker: microseconds each request blocks its worker thread without CPU (a
    /// synchronous call; requests queue behind it). For benchmarks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    wait_us: u64,
    /// Demo worker: PCT percent of requests burn US microseconds instead (e.g. 2:2500).
    #[arg(long, value_name = "PCT:US", value_parser = demo::parse_heavy)]
    heavy: Option<(f64, Duration)>,
    /// Demo worker, a test knob: leak N KiB of memory per request on purpose (to exercise
    /// --max-rss). Never use it in production.
    #[arg(long, value_name = "N", default_value_t = 0)]
    leak_kb_per_request: usize,
    /// The COMMAND is an unmodified node app (`-- node app.js`): the master speaks node's
    /// own IPC to it, and a preload script turns the app's `server.listen()` into taking
    /// the connections the master hands over.
    #[arg(long, requires = "command")]
    node: bool,
    /// The worker program and its arguments (after --); without it, the embedded demo.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cost = Cost {
        work: Duration::from_micros(args.work_us),
        heavy: args.heavy,
        wait: Duration::from_micros(args.wait_us),
        leak_per_request: args.leak_kb_per_request * 1024,
    };
    let command = args.command.clone();
    let node = args.node;
    let server = Server::from_config(config(args));
    if node {
        server.run_node(command).context("handoff run --node")
    } else if command.is_empty() {
        server
            .run(move |incoming| demo::serve(incoming, cost))
            .context("handoff run")
    } else {
        server.run_command(command).context("handoff run")
    }
}

/// The master's configuration: the flags over [`Config::default`], whose values the flags'
/// own defaults repeat for `--help` (a test keeps the two equal).
fn config(args: RunArgs) -> Config {
    let defaults = Config::default();
    Config {
        listen: args.listen,
        workers: args.workers.unwrap_or(defaults.workers),
        strategy: args.strategy,
        backlog: args.backlog,
        max_pending: args.max_pending,
        shutdown_timeout: args.shutdown_timeout,
        control: args.control,
        metrics: args.metrics,
        limits: Limits {
            max_age: args.max_age,
            max_connections: args.max_connections,
            max_rss: args.max_rss,
        },
        rss_interval: args.rss_interval,
        jitter_percent: args.jitter,
        drain_timeout: args.drain_timeout,
        restart_batch: args.restart_batch,
        worker_timeout: args.worker_timeout,
        ack_timeout: args.ack_timeout,
        state_url: args.state,
        ..defaults
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    /// The README's flag table states each default the flags have (demo knobs that default
    /// to nothing aside).
    #[test]
    fn the_readme_states_the_flag_defaults() {
        use clap::CommandFactory;
        let readme = include_str!("../../README.md");
        let command = Run::command();
        for arg in command.get_arguments() {
            let (Some(long), [default]) = (arg.get_long(), arg.get_default_values()) else {
                continue;
            };
            let default = default.to_str().unwrap();
            if default == "0" {
                continue;
            }
            let flag = format!("`--{long}");
            let row = readme
                .lines()
                .find(|line| line.starts_with('|') && line.contains(&flag))
                .unwrap_or_else(|| panic!("no README row for {flag}`"));
            let stated = [
                format!("({default})"),
                format!("`{default}`"),
                format!(", {default})"),
                format!("`{default}` (default)"),
            ];
            assert!(
                stated.iter().any(|s| row.contains(s.as_str())),
                "the README row of {flag}` does not state its default {default}: {row}"
            );
        }
    }

    #[test]
    fn flag_defaults_are_the_configs() {
        let args = Run::try_parse_from(["run"]).unwrap().args;
        let mut from_flags = config(args);
        let defaults = Config::default();
        assert_eq!(from_flags.listen, vec!["127.0.0.1:8000".parse().unwrap()]);
        from_flags.listen = defaults.listen.clone();
        assert_eq!(format!("{from_flags:?}"), format!("{defaults:?}"));
    }
}
