//! `handoff ctl`: one command to a running master's control socket, its answer on stdout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The master's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The command: `status` (the default), `reload` (a rolling restart; returns when every
    /// worker was replaced), `scale N` (returns when N workers are ready) or `stop` (returns
    /// when the master is gone). An answer with an error exits non-zero.
    #[arg(default_value = "status", num_args = 1..)]
    command: Vec<String>,
}

/// `handoff upgrade`: a live upgrade of the master.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The master's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The new binary [default: the master's own path, where a deploy put the new one].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
}

/// Asks the master to start the new binary and hand it its sockets; returns once the new
/// master is ready, or fails (non-zero) with the reason while the old one serves on.
pub fn upgrade(args: UpgradeArgs) -> anyhow::Result<()> {
    let mut command = vec!["upgrade".to_owned()];
    if let Some(binary) = &args.binary {
        let binary = std::path::absolute(binary).context("the --binary path")?;
        anyhow::ensure!(
            !binary.to_string_lossy().contains(char::is_whitespace),
            "--binary: a path with white space cannot go through the control socket"
        );
        command.push(binary.to_string_lossy().into_owned());
    }
    run(CtlArgs {
        control: args.control,
        command,
    })
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let command = args.command.join(" ");
    let reply = ask(&args.control, &command)?;
    std::io::stdout()
        .write_all(reply.as_bytes())
        .context("writing the reply")?;
    let answer: serde_json::Value = serde_json::from_str(&reply)
        .with_context(|| format!("the master's answer is not JSON: {reply:?}"))?;
    if let Some(error) = answer.get("error") {
        anyhow::bail!("{command}: {}", error.as_str().unwrap_or_default());
    }
    if command == "stop" {
        wait_gone(&args.control)?;
    }
    Ok(())
}

/// How long `ctl stop` waits for the master to finish stopping.
const STOP_PATIENCE: Duration = Duration::from_secs(120);

/// Waits until nothing answers at `control` any more: the master removed its socket.
fn wait_gone(control: &Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + STOP_PATIENCE;
    while UnixStream::connect(control).is_ok() {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("the master at {control:?} is still there after {STOP_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sends `command` to the master at `control` and returns its answer. A master serving
/// many control connections closes idle ones to make room, and may close ours before
/// reading it: this tries again a few times before giving up.
pub fn ask(control: &Path, command: &str) -> anyhow::Result<String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match ask_once(control, command) {
            Ok(reply) if !reply.is_empty() => return Ok(reply),
            Ok(_) if attempt < ATTEMPTS => {}
            Ok(_) => anyhow::bail!(
                "the master at {control:?} closed the control connection without answering \
                 {ATTEMPTS} times (it is serving too many control connections); try again"
            ),
            Err(e) if attempt < ATTEMPTS && is_reset(&e) => {}
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(100 * attempt));
    }
}

/// How many times `ctl` asks before it gives up.
const ATTEMPTS: u64 = 4;

fn ask_once(control: &Path, command: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(control)
        .with_context(|| format!("connecting to the control socket {control:?}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{command}").context("sending the command")?;
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
