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
    // A master serving many control connections closes idle ones to make room, and may
    // close ours before reading it: try again a few times before giving up.
    let mut attempt = 0;
    let reply = loop {
        attempt += 1;
        match ask(&args) {
            Ok(reply) if !reply.is_empty() => break reply,
            Ok(_) if attempt < ATTEMPTS => {}
            Ok(_) => anyhow::bail!(
                "the master at {:?} closed the control connection without answering \
                 {ATTEMPTS} times (it is serving too many control connections); try again",
                args.control
            ),
            Err(e) if attempt < ATTEMPTS && is_reset(&e) => {}
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(100 * attempt));
    };
    std::io::stdout()
        .write_all(reply.as_bytes())
        .context("writing the reply")?;
    Ok(())
}

/// How many times `ctl` asks before it gives up.
const ATTEMPTS: u64 = 4;

fn ask(args: &CtlArgs) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(&args.control)
        .with_context(|| format!("connecting to the control socket {:?}", args.control))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{}", args.command).context("sending the command")?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .context("reading the reply")?;
    Ok(reply)
}

fn is_reset(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
}
