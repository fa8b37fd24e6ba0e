//! Backends handoff starts itself (`handoff proxy --spawn N -- COMMAND`), in the master:
//! each runs COMMAND with its own port in `PORT` (and in place of `{port}` in its
//! arguments), in a process group of its own, dying with the master. A backend is marked
//! up once its port accepts, down when it exits; it is started again after a delay that
//! doubles from 100 ms up to 10 s while it keeps exiting early. On the master's exit each
//! gets SIGTERM.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::board::Board;
use super::health::{accepts, mark};
use crate::sys::shm::Mapping;

/// How long a started backend may take to accept connections before it is left to the
/// health checks.
const STARTUP: Duration = Duration::from_secs(30);
/// How often a starting backend's port is tried.
const STARTUP_POLL: Duration = Duration::from_millis(50);
/// Restart delays.
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// A free port on 127.0.0.1, as the kernel gives one for port 0 (free now; the backend
/// binds it moments later).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `command` with `{port}` replaced in each argument.
pub fn with_port(command: &[OsString], port: u16) -> Vec<OsString> {
    command
        .iter()
        .map(|arg| match arg.to_str() {
            Some(text) if text.contains("{port}") => {
                text.replace("{port}", &port.to_string()).into()
            }
            _ => arg.clone(),
        })
        .collect()
}

/// Sends SIGTERM to the process on drop (the master's runtime ending).
struct Terminate(u32);

impl Drop for Terminate {
    fn drop(&mut self) {
        let _ = crate::sys::process::signal(self.0, libc::SIGTERM);
    }
}

/// Keeps backend `index` (at `addr`, `port`) running `command`, on the current `LocalSet`.
pub fn supervise(
    board: Arc<Mapping<Board>>,
    index: usize,
    addr: SocketAddr,
    port: u16,
    command: Vec<OsString>,
    connect_timeout: Duration,
) {
    tokio::task::spawn_local(async move {
        let argv = with_port(&command, port);
        let mut delay = FIRST_DELAY;
        loop {
            let started = Instant::now();
            match start(&argv, port) {
                Ok((mut child, pid)) => {
                    let _terminate = Terminate(pid);
                    tracing::info!(backend = %addr, pid, "backend started");
                    let ready = async {
                        let deadline = tokio::time::Instant::now() + STARTUP;
                        while tokio::time::Instant::now() < deadline {
                            if accepts(addr, connect_timeout).await {
                                mark(board.region(), index, addr, true, "start");
                                return;
                            }
                            tokio::time::sleep(STARTUP_POLL).await;
                        }
                    };
                    let status = tokio::select! {
                        status = child.wait() => status,
                        () = ready => child.wait().await,
                    };
                    mark(board.region(), index, addr, false, "exit");
                    tracing::warn!(backend = %addr, pid, status = ?status, "backend exited");
                }
                Err(e) => {
                    tracing::error!(backend = %addr, error = %e, "starting the backend failed")
                }
            }
            if started.elapsed() > MAX_DELAY {
                delay = FIRST_DELAY;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_DELAY);
        }
    });
}

fn start(argv: &[OsString], port: u16) -> std::io::Result<(tokio::process::Child, u32)> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("the backend command is empty"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    crate::sys::process::prepare_helper(&mut cmd, libc::SIGTERM);
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    Ok((child, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_goes_where_the_command_asks() {
        let command: Vec<OsString> = ["python3", "-m", "http.server", "{port}", "--bind=127.0.0.1"]
            .map(OsString::from)
            .to_vec();
        let argv = with_port(&command, 8123);
        assert_eq!(argv[3], "8123");
        assert_eq!(argv[4], "--bind=127.0.0.1");
    }
}
