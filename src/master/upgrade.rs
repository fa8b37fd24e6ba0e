//! Live upgrade of the master: `handoff upgrade` (or SIGUSR2) starts the binary again, from
//! its path (a deploy has put a new one there) or from `--binary`, with the same arguments,
//! and hands it the listening sockets and the control socket: fds 4, 5, ... after a
//! handshake socket at fd 3, described by `HANDOFF_UPGRADE`. The new master takes them
//! instead of binding, starts its workers and, once every one is ready, writes `ready PID`
//! on the handshake. Only then does the old master stop accepting (the new one accepts on
//! the very same sockets, so no client is refused at any moment) and drain its workers.
//! If the new master exits or is not ready in time, it is killed and the old master keeps
//! serving; the caller gets the reason.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use super::ctx::Ctx;
use super::systemd::{describe, Activated};
use crate::sys;

/// Environment variable of a master started by an upgrade: `LISTENERS:CONTROL:METRICS`, how
/// many listening sockets follow the handshake (fds 4, ...), then whether the control socket
/// (1 or 0) and the metrics listener (1 or 0) come after them, in that order.
pub(crate) const ENV_UPGRADE: &str = "HANDOFF_UPGRADE";
/// Where the new master finds the handshake socket.
const HANDSHAKE_FD: i32 = 3;

/// What a master started by an upgrade inherited from the one it replaces.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub handshake: OwnedFd,
    pub listeners: Vec<Activated>,
    pub control: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
}

/// The sockets this master inherited from the one it replaces; `None` unless it was started
/// by an upgrade.
pub(crate) fn inherited() -> io::Result<Option<Inherited>> {
    let Some(spec) = std::env::var_os(ENV_UPGRADE) else {
        return Ok(None);
    };
    let spec = spec.to_string_lossy();
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ENV_UPGRADE}={spec:?}"),
        )
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let flag = |part: &str| match part {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(invalid()),
    };
    let [listeners, control, metrics] = parts[..] else {
        return Err(invalid());
    };
    let listeners: i32 = listeners.parse().map_err(|_| invalid())?;
    let (control, metrics) = (flag(control)?, flag(metrics)?);
    let handshake = sys::process::inherited_socket(HANDSHAKE_FD)?;
    let mut next = HANDSHAKE_FD + 1;
    let mut take = || {
        next += 1;
        sys::process::activated_listener(next - 1)
    };
    let listeners = (0..listeners)
        .map(|_| describe(take()?))
        .collect::<io::Result<Vec<_>>>()?;
    let control = control.then(&mut take).transpose()?;
    let metrics = metrics.then(&mut take).transpose()?;
    Ok(Some(Inherited {
        handshake,
        listeners,
        control,
        metrics,
    }))
}

/// In the new master: once every worker is ready, tells the old one (`ready PID`).
pub(crate) async fn announce_ready(ctx: Rc<Ctx>, handshake: OwnedFd) {
    loop {
        if ctx.table.borrow().all_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stream = UnixStream::from(handshake);
    let _ = stream.set_nonblocking(false);
    match writeln!(stream, "ready {}", std::process::id()) {
        Ok(()) => tracing::info!("every worker is ready: told the master being replaced"),
        Err(e) => tracing::warn!(error = %e, "telling the master being replaced failed"),
    }
}

/// In the old master: starts the new master and waits for its word; `Ok(pid)` once it is
/// ready (and this master must stop), `Err(reason)` if it failed (this master serves on).
pub(crate) async fn upgrade(ctx: &Rc<Ctx>, binary: Option<PathBuf>) -> Result<u32, String> {
    if ctx.upgrading.replace(true) {
        return Err("an upgrade is already under way".into());
    }
    let result = start_and_wait(ctx, binary).await;
    ctx.upgrading.set(false);
    match &result {
        Ok(pid) => {
            tracing::info!(pid, "upgrade: the new master is ready; this one stops");
            ctx.handed_over.set(true);
            ctx.systemd.handed_over(*pid);
            ctx.stop.notify_one();
        }
        Err(reason) => tracing::error!(reason = %reason, "upgrade failed; this master serves on"),
    }
    result
}

async fn start_and_wait(ctx: &Rc<Ctx>, binary: Option<PathBuf>) -> Result<u32, String> {
    let binary = binary
        .or_else(|| ctx.exe.clone())
        .ok_or("the master's own path is unknown: give --binary")?;
    if ctx.handout.workers_accept() {
        return Err("the kernel baseline modes cannot be upgraded live".into());
    }
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("a handshake socket: {e}"))?;
    let listeners = ctx.listeners.borrow().clone();
    let control = ctx.control_fd.borrow().clone();
    let metrics = ctx.metrics_fd.borrow().as_ref().map(OwnedFd::try_clone);
    let metrics = metrics
        .transpose()
        .map_err(|e| format!("the metrics socket: {e}"))?;
    let mut fds: Vec<BorrowedFd<'_>> = vec![theirs.as_fd()];
    fds.extend(listeners.iter().map(|l| l.get_ref().as_fd()));
    fds.extend(control.iter().map(|c| c.get_ref().as_fd()));
    fds.extend(metrics.iter().map(|m| m.as_fd()));
    let spec = format!(
        "{}:{}:{}",
        listeners.len(),
        u8::from(control.is_some()),
        u8::from(metrics.is_some())
    );
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(std::env::args_os().skip(1))
        .env(ENV_UPGRADE, spec)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    let copies = sys::process::prepare_successor(&mut cmd, &fds)
        .map_err(|e| format!("passing the sockets: {e}"))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    drop((copies, theirs, metrics));
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "upgrade: new master started");
    let timeout = ctx.table.borrow().config.worker_timeout + Duration::from_secs(5);
    let word = tokio::task::spawn_blocking(move || read_word(ours, timeout));
    let failure = match word.await {
        Ok(Ok(word)) if word.starts_with("ready") => return Ok(pid),
        Ok(Ok(_)) => match child.try_wait() {
            Ok(Some(status)) => format!("the new master exited ({status}) before it was ready"),
            _ => "the new master closed the handshake before it was ready".into(),
        },
        Ok(Err(e)) => format!("the new master was not ready within {timeout:?} ({e})"),
        Err(e) => format!("waiting for the new master: {e}"),
    };
    let _ = child.kill();
    tokio::task::spawn_blocking(move || child.wait());
    Err(failure)
}

/// Reads the new master's one line, at most `timeout`; empty at end of stream.
fn read_word(mut stream: UnixStream, timeout: Duration) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut word = String::new();
    let mut byte = [0u8; 1];
    while word.len() < 64 {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => word.push(char::from(byte[0])),
        }
    }
    Ok(word)
}
