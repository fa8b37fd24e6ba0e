//! Command-line parsing: one file per subcommand.

mod bench;
mod ctl;
mod parse;
mod proxy;
mod run;
mod top;

use clap::{Parser, Subcommand};

/// A master-side load balancer for multi-process servers.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, about)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line). What is logged is chosen with
    /// HANDOFF_LOG (default `info`; e.g. `debug`, `handoff=debug,warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Supervise workers: the master accepts, each connection goes to one worker process.
    Run(run::RunArgs),
    /// Balance TCP connections over unmodified backends: the master accepts, proxy workers
    /// relay each client to the backend with the fewest connections in flight.
    Proxy(proxy::ProxyArgs),
    /// Ask a running master (started with --control) for its status.
    Ctl(ctl::CtlArgs),
    /// Replace a running master (started with --control) by its binary started again, with no
    /// connection refused: returns once the new master is ready, non-zero if it failed.
    Upgrade(ctl::UpgradeArgs),
    /// A live view of a running master's workers (started with --control), like `top`.
    Top(top::TopArgs),
    /// Compare handoff's strategies with the kernel's and node's on this machine.
    Bench(bench::BenchArgs),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Top(args) => top::run(args),
        Command::Upgrade(args) => ctl::upgrade(args),
        Command::Bench(args) => bench::run(args),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HANDOFF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
