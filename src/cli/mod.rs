//! Command-line parsing: one file per subcommand.

mod bench;
mod ctl;
mod run;

use clap::{Parser, Subcommand};

/// A master-side load balancer for multi-process servers.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Supervise workers: the master accepts, each connection goes to one worker process.
    Run(run::RunArgs),
    /// Ask a running master (started with --control) for its status.
    Ctl(ctl::CtlArgs),
    /// Compare handoff's strategies with the kernel's and node's on this machine.
    Bench(bench::BenchArgs),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HANDOFF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
