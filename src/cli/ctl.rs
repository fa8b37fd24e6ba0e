//! `handoff ctl`: one command to a running master's control socket, its answer on stdout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The master's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The command: `status`.
    #[arg(default_value = "status")]
    command: String,
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(&args.control)
        .with_context(|| format!("connecting to the control socket {:?}", args.control))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{}", args.command).context("sending the command")?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .context("reading the reply")?;
    std::io::stdout()
        .write_all(reply.as_bytes())
        .context("writing the reply")?;
    Ok(())
}
