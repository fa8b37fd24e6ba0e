//! Live upgrade of the master: `handoff upgrade` (or SIGUSR2) starts the binary again, from
//! its path (a deploy has put a new one there) or from `--binary`, with the same arguments,
//! and hands it the listening sockets and the control socket: fds 4, 5, ... after a
//! handshake socket at fd 3, described by `HANDOFF_UPGRADE`. The new master takes them
//! instead of binding, starts its workers and, once every one is ready, writes `ready PID`
//! on the handshake. Only then does the old master stop accepting (the new one accepts on
//! the very same sockets, so no client is refused at any moment) and drain its workers.
//! If the new master exits or is not ready in time, it is killed and the old master keeps
//! serving; the caller gets the reason.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::carry::{self, Carried};
use super::ctx::{Ctx, Handshake};
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

/// In the new master: the handshake as a stream, and the totals the old master counted up
/// to its start (see `carry`), already added to this master's. `None` for the totals when
/// the old master sends none (an older binary) or they fail to arrive.
pub(crate) async fn take_over(
    ctx: &Ctx,
    handshake: OwnedFd,
) -> io::Result<(Handshake, carry::Reader, Carried)> {
    let stream = UnixStream::from(handshake);
    stream.set_nonblocking(true)?;
    let stream = Handshake::from_std(stream)?;
    let mut reader = carry::Reader::default();
    if std::env::var_os(carry::ENV_CARRY).is_none() {
        return Ok((stream, reader, Carried::default()));
    }
    let start = match tokio::time::timeout(carry::TIMEOUT, reader.totals(&stream)).await {
        Ok(Ok(Some(start))) => start,
        Ok(Ok(None)) => Carried::default(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upgrade: the totals of the master being replaced are unreadable; counting from 0");
            Carried::default()
        }
        Err(_) => {
            tracing::warn!("upgrade: no totals from the master being replaced; counting from 0");
            Carried::default()
        }
    };
    start.add_growth_since(&Carried::default(), ctx);
    Ok((stream, reader, start))
}

/// In the new master: once every worker is ready, tells the old one (`ready PID`); then
/// takes the connections it forwards and its FINAL totals, adding what it counted after
/// START.
pub(crate) async fn announce_ready(
    ctx: Rc<Ctx>,
    (mut stream, mut reader, start): (Handshake, carry::Reader, Carried),
) {
    loop {
        if ctx.table.borrow().all_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let word = format!("ready {}\n", std::process::id());
    match tokio::time::timeout(carry::TIMEOUT, stream.write_all(word.as_bytes())).await {
        Ok(Ok(())) => tracing::info!("every worker is ready: told the master being replaced"),
        Ok(Err(e)) => return tracing::warn!(error = %e, "telling the master being replaced failed"),
        Err(_) => return tracing::warn!("telling the master being replaced timed out"),
    }
    let mut last = None;
    loop {
        let frame = match reader.next(&stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the replaced master's hand-over failed");
                break;
            }
        };
        match (frame.tag, frame.fd) {
            (carry::tag::CONNECTION, Some(fd)) => super::link::inherit(&ctx, fd, &frame.body),
            (carry::tag::TOTALS, _) => match carry::decode_totals(&frame.body) {
                Ok(totals) => last = Some(totals),
                Err(e) => {
                    tracing::warn!(error = %e, "the replaced master's final totals are unreadable")
                }
            },
            (other, _) => {
                tracing::warn!(tag = other, "an unknown frame from the replaced master");
                break;
            }
        }
    }
    match last {
        Some(last) => {
            last.add_growth_since(&start, &ctx);
            tracing::info!(
                accepted = last.table.accepted,
                "the replaced master's final totals are in"
            );
        }
        None => tracing::warn!("the replaced master ended without its final totals"),
    }
}

/// What the old master sends the new one after the hand-over, in this order.
#[derive(Debug)]
pub(crate) enum Onward {
    /// A connection one of its draining workers handed back.
    Connection(super::table::Onward),
    /// Its final totals; the sender is told once they are written.
    Final(Carried, tokio::sync::oneshot::Sender<()>),
}

/// Connections handed back that may wait to go on to the new master, at most.
const ONWARD_QUEUE: usize = 1024;

/// In the old master, after the hand-over: writes what goes on to the new master, in order.
async fn feed_successor(stream: Handshake, mut queue: tokio::sync::mpsc::Receiver<Onward>) {
    while let Some(onward) = queue.recv().await {
        match onward {
            Onward::Connection(conn) => {
                let mut body = conn.listener.to_le_bytes().to_vec();
                body.extend_from_slice(&conn.prefix);
                let sent = carry::send(
                    &stream,
                    carry::tag::CONNECTION,
                    &body,
                    Some(conn.fd.as_fd()),
                    carry::TIMEOUT,
                );
                if let Err(e) = sent.await {
                    tracing::warn!(error = %e, "passing a handed-back connection to the new master failed");
                }
            }
            Onward::Final(last, written) => {
                match carry::send_totals(&stream, &last, carry::TIMEOUT).await {
                    Ok(()) => {
                        tracing::info!(accepted = last.table.accepted, "final totals handed over")
                    }
                    Err(e) => tracing::warn!(error = %e, "handing over the final totals failed"),
                }
                let _ = written.send(());
                return;
            }
        }
    }
}

/// In the old master, after the hand-over: queues a connection a worker handed back for
/// the new master; `Err` (and the connection is closed) when the queue is full or gone.
pub(crate) fn pass_on(ctx: &Ctx, conn: super::table::Onward) -> Result<(), &'static str> {
    let successor = ctx.successor.borrow();
    let queue = successor.as_ref().ok_or("no new master to pass it to")?;
    queue
        .try_send(Onward::Connection(conn))
        .map_err(|_| "the queue to the new master is full")
}

/// In the old master, once its last worker is reaped: its FINAL totals to the master that
/// replaced it, after every connection passed on.
pub(crate) async fn hand_final_totals(ctx: &Ctx) {
    let Some(queue) = ctx.successor.borrow_mut().take() else {
        return;
    };
    let (written, done) = tokio::sync::oneshot::channel();
    if queue
        .send(Onward::Final(Carried::collect(ctx), written))
        .await
        .is_ok()
    {
        let _ = tokio::time::timeout(carry::TIMEOUT * 2, done).await;
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
        .env(carry::ENV_CARRY, "1")
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
    let word = async {
        ours.set_nonblocking(true)?;
        let mut ours = Handshake::from_std(ours)?;
        carry::send_totals(&ours, &Carried::collect(ctx), timeout).await?;
        let word = read_word(&mut ours).await?;
        io::Result::Ok((ours, word))
    };
    let failure = match tokio::time::timeout(timeout, word).await {
        Ok(Ok((ours, word))) if word.starts_with("ready") => {
            let (queue, taken) = tokio::sync::mpsc::channel(ONWARD_QUEUE);
            *ctx.successor.borrow_mut() = Some(queue);
            ctx.table.borrow_mut().onward = true;
            tokio::task::spawn_local(feed_successor(ours, taken));
            return Ok(pid);
        }
        // The handshake ends as the new master exits: give its exit status a moment to
        // be there, for the reason.
        Ok(result) => match (exit_status(&mut child).await, result) {
            (Some(status), _) => format!("the new master exited ({status}) before it was ready"),
            (None, Ok(_)) => "the new master closed the handshake before it was ready".into(),
            (None, Err(e)) => {
                format!("the new master broke the handshake before it was ready ({e})")
            }
        },
        Err(_) => format!("the new master was not ready within {timeout:?}"),
    };
    let _ = child.kill();
    tokio::task::spawn_blocking(move || child.wait());
    Err(failure)
}

/// The child's exit status, if it exits within half a second.
async fn exit_status(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    for _ in 0..50 {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Reads the new master's one line; empty at end of stream.
async fn read_word(stream: &mut Handshake) -> io::Result<String> {
    let mut word = String::new();
    let mut byte = [0u8; 1];
    while word.len() < 64 {
        match stream.read(&mut byte).await? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => word.push(char::from(byte[0])),
        }
    }
    Ok(word)
}
