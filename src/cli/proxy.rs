//! `handoff proxy`: the master with proxy workers in front of unmodified backends.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::parse::{parse_duration, parse_size};
use crate::config::ListenAddr;
use crate::proxy::board::Balance;
use crate::proxy::relay::Relay;
use crate::proxy::{self, MasterSide, ProxyConfig};
use crate::Server;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to listen on: HOST:PORT, [IPV6]:PORT or unix:/path (repeatable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    listen: Vec<ListenAddr>,
    /// A backend to balance over, HOST:PORT (repeatable; a host name stands for its first
    /// address, resolved once by the master at start).
    #[arg(long, value_name = "HOST:PORT")]
    backend: Vec<String>,
    /// Start N backends running COMMAND (after --), each with its own port in PORT and in
    /// place of `{port}` in its arguments; restarted when they exit.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "command")]
    spawn: usize,
    /// Proxy worker processes [default: available CPUs].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// How a backend is chosen: the fewest connections in flight across all workers, or
    /// each in turn.
    #[arg(long, value_enum, default_value_t = Balance::LeastConn)]
    balance: Balance,
    /// Connections in flight to one backend, at most (all workers together); the rest wait
    /// in the queue.
    #[arg(long, value_name = "N")]
    max_conns_per_backend: Option<u32>,
    /// Connections waiting for a backend under --max-conns-per-backend, at most; one more is
    /// closed at once (and counted).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue: u32,
    /// How long a connection may wait in the queue before it is closed (and counted).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    queue_timeout: Duration,
    /// How long connecting to the backends may take per client, retries on other backends
    /// included; also each health check's limit.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// How often each backend gets a TCP health check (a connect).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    health_interval: Duration,
    /// Close both sides of a relayed connection when neither sends a byte for this long
    /// (half-closed ones too); 0 never closes an idle one. Like HAProxy's `timeout client`
    /// and `timeout server`, nginx's `proxy_timeout`.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Send a PROXY protocol header (v2) to the backend before the client's bytes.
    #[arg(long, value_name = "VERSION", value_parser = ["v2"])]
    proxy_protocol: Option<String>,
    /// How bytes are relayed: splice(2) through a pipe (zero copy), or read/write.
    #[arg(long, value_enum, default_value_t = Relay::Splice)]
    relay: Relay,
    /// Bytes of each splice pipe (e.g. 256K; 0 keeps the kernel's 64 KiB).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pipe_size: u64,
    /// Kernel accept queue length per listener.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    backlog: i32,
    /// How long workers get to finish in-flight connections on stop (e.g. 30s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Unix socket where the master answers `status` (see `handoff ctl`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus text at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// The command each --spawn backend runs, and its arguments (after --).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn parse_backend(text: &str) -> Result<SocketAddr, String> {
    std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("backend {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("backend {text:?} resolves to no address"))
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let mut config = ProxyConfig {
        // The master resolves them; a worker takes the master's list from its environment.
        backends: Vec::new(),
        balance: args.balance,
        max_conns_per_backend: args.max_conns_per_backend,
        queue: args.queue,
        queue_timeout: args.queue_timeout,
        connect_timeout: args.connect_timeout,
        health_interval: args.health_interval,
        proxy_protocol: args.proxy_protocol.is_some(),
        idle_timeout: Some(args.idle_timeout).filter(|t| !t.is_zero()),
        relay: args.relay,
        pipe_size: usize::try_from(args.pipe_size).unwrap_or(usize::MAX),
    };
    let mut builder = Server::builder()
        .backlog(args.backlog)
        .shutdown_timeout(args.shutdown_timeout);
    for addr in args.listen {
        builder = builder.listen(addr);
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    if let Some(control) = args.control {
        builder = builder.control(control);
    }
    if let Some(metrics) = args.metrics {
        builder = builder.metrics(metrics);
    }
    if !crate::worker::is_worker() {
        if args.spawn == 0 && !args.command.is_empty() {
            anyhow::bail!("a COMMAND after -- needs --spawn N");
        }
        config.backends = args
            .backend
            .iter()
            .map(|text| parse_backend(text))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let master = MasterSide::prepare(config.clone(), args.spawn, args.command)?;
        tracing::info!(backends = ?master.backends(), "proxying");
        builder = builder.master(move |_: crate::Master<()>| master.run());
    }
    builder
        .build()
        .run(move |incoming| async move {
            let (config, board) = proxy::worker_side(config)?;
            proxy::worker::serve(incoming, Arc::new(config), board).await
        })
        .context("handoff proxy")
}
