//! Live upgrade of the master: `handoff upgrade` (or SIGUSR2) starts the binary again, from
//! its path (a deploy has put a new one there) or from `--binary`, with the same arguments,
//! and hands it the listening sockets and the control socket: fds 4, 5, ... after a
//! handshake socket at fd 3, described by `HANDOFF_UPGRADE`. The new master takes them
//! instead of binding, takes the old master's shared map (see `handover`), starts its
//! workers and, once every one is ready, says READY on the handshake (the previous release
//! wrote the line `ready PID`; see `carry` for both). Only then does the old master stop
//! accepting (the new one accepts on the very same sockets, so no client is refused at any
//! moment) and drain its workers. If the new master exits or is not ready in time, it is
//! killed and the old master keeps serving, the map's writes its own again; the caller
//! gets the reason.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::carry::{self, Carried};
use super::ctx::{Ctx, Handshake};
use super::handover::{self, Link, LinkFrames, Waiter};
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

/// In the new master: what it keeps of the master it replaces.
#[derive(Debug)]
pub(crate) struct Predecessor {
    stream: Rc<Handshake>,
    reader: carry::Reader,
    /// The totals the old master sent at START.
    start: Carried,
    /// It reads frames and handed the map over (see `carry`, compatibility): where READY
    /// goes. `None`: the previous release's text line.
    link: Option<Link>,
}

/// In the new master, before its workers start: the handshake as a stream; the totals the
/// old master counted up to its start (see `carry`), added to this master's (none when
/// the old master sends none, an older binary, or they fail to arrive); and the old
/// master's shared map, restored into this master's, which holds the map's order of
/// writes from then on. A map that fails to arrive is an error: this master must not
/// serve a map the old one goes on changing.
pub(crate) async fn take_over(ctx: &Ctx, handshake: OwnedFd) -> io::Result<Predecessor> {
    let stream = UnixStream::from(handshake);
    stream.set_nonblocking(true)?;
    let stream = Rc::new(Handshake::from_std(stream)?);
    let mut reader = carry::Reader::default();
    let mut start = Carried::default();
    if std::env::var_os(carry::ENV_CARRY).is_some() {
        start = match tokio::time::timeout(carry::TIMEOUT, reader.totals(&stream)).await {
            Ok(Ok(Some(start))) => start,
            Ok(Ok(None)) => Carried::default(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upgrade: the totals of the master being replaced are unreadable; counting from 0");
                Carried::default()
            }
            Err(_) => {
                tracing::warn!(
                    "upgrade: no totals from the master being replaced; counting from 0"
                );
                Carried::default()
            }
        };
        start.add_growth_since(&Carried::default(), ctx);
    }
    let mut link = None;
    if std::env::var_os(carry::ENV_MAP).is_some() {
        let map = tokio::time::timeout(carry::TIMEOUT, take_map(ctx, &stream, &mut reader));
        let taken = map.await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the shared map of the master being replaced did not arrive",
            ))
        })?;
        ctx.state.serve_predecessor(taken.clone());
        link = Some(taken);
    }
    Ok(Predecessor {
        stream,
        reader,
        start,
        link,
    })
}

/// Says HELLO and restores the MAP frames that answer it; the link for what goes back.
async fn take_map(
    ctx: &Ctx,
    stream: &Rc<Handshake>,
    reader: &mut carry::Reader,
) -> io::Result<Link> {
    carry::send(stream, carry::tag::HELLO, &[], None, carry::TIMEOUT).await?;
    let (mut entries, mut refused) = (0, 0);
    loop {
        let frame = reader
            .next(stream)
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if frame.tag != carry::tag::MAP {
            let what = format!(
                "a frame of tag {:?} for the shared map",
                char::from(frame.tag)
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, what));
        }
        let (these, left_out, last) = ctx.state.restore_part(&frame.body)?;
        entries += these;
        refused += left_out;
        if last {
            break;
        }
    }
    tracing::info!(entries, refused, "upgrade: the shared map of the master being replaced is restored; this master applies its writes from now on");
    let (link, frames) = Link::new();
    tokio::task::spawn_local(handover::write_link(stream.clone(), frames));
    Ok(link)
}

/// In the new master, from its start: reads what the old master sends (its forwarded
/// writes, the connections its draining workers hand back, its FINAL totals, adding what
/// it counted after START), and tells it once every worker is ready.
pub(crate) async fn follow_predecessor(ctx: Rc<Ctx>, predecessor: Predecessor) {
    let Predecessor {
        stream,
        mut reader,
        start,
        link,
    } = predecessor;
    tokio::task::spawn_local(announce_ready(ctx.clone(), stream.clone(), link));
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
            (carry::tag::WRITE, _) => match handover::decode_write(&frame.body) {
                Ok((id, write)) => ctx.state.submit(write, Waiter::Predecessor { id }),
                Err(e) => {
                    tracing::error!(error = %e, "a forwarded write is malformed: dropping the link to the replaced master");
                    break;
                }
            },
            (other, _) => {
                tracing::warn!(tag = other, "an unknown frame from the replaced master");
                break;
            }
        }
    }
    // Nothing more goes to it (and the link's end tells it, if it is still there).
    ctx.state.drop_predecessor();
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

/// In the new master: once every worker is ready, tells the old one: READY on `link`, or
/// the previous release's text line `ready PID`.
async fn announce_ready(ctx: Rc<Ctx>, stream: Rc<Handshake>, link: Option<Link>) {
    loop {
        if ctx.table.borrow().all_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = std::process::id();
    if let Some(link) = link {
        match link.send(carry::tag::READY, &pid.to_le_bytes()) {
            true => tracing::info!("every worker is ready: told the master being replaced"),
            false => tracing::warn!("telling the master being replaced failed: its link is gone"),
        }
        return;
    }
    let word = format!("ready {pid}\n");
    match carry::send_raw(&stream, word.as_bytes(), None, carry::TIMEOUT).await {
        Ok(()) => tracing::info!("every worker is ready: told the master being replaced"),
        Err(e) => tracing::warn!(error = %e, "telling the master being replaced failed"),
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

/// How much longer than its own drain timeout a master that was upgraded waits for the
/// master it replaced to finish passing connections on.
pub(crate) const FOLLOW_GRACE: Duration = Duration::from_secs(5);

/// Connections handed back that may wait to go on to the new master, at most.
const ONWARD_QUEUE: usize = 1024;

/// In the old master, from the new master's HELLO: writes what goes on to it. The shared
/// map's frames (MAP, then forwarded writes) first, in order; after the hand-over, the
/// connections handed back, then the final totals.
async fn feed_successor(
    stream: Rc<Handshake>,
    mut map: LinkFrames,
    mut queue: tokio::sync::mpsc::Receiver<Onward>,
) {
    let mut map_open = true;
    loop {
        let onward = tokio::select! {
            biased;
            frame = map.recv(), if map_open => {
                match frame {
                    Some(bytes) => {
                        if let Err(e) = carry::send_raw(&stream, &bytes, None, carry::TIMEOUT).await {
                            tracing::warn!(error = %e, "writing the shared map's frames to the new master failed");
                            return;
                        }
                    }
                    None => map_open = false,
                }
                continue;
            }
            onward = queue.recv() => onward,
        };
        match onward {
            None => return,
            Some(Onward::Connection(conn)) => {
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
            Some(Onward::Final(last, written)) => {
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
        .env(carry::ENV_MAP, "1")
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
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = ours
        .set_nonblocking(true)
        .and_then(|()| Handshake::from_std(ours))
        .map(Rc::new);
    let (result, tasks) = match stream {
        Ok(stream) => wait_ready(ctx, stream, deadline).await,
        Err(e) => (Err(e), None),
    };
    let failure = match result {
        Ok(()) => {
            let (queue, _writer) = tasks.expect("the tasks of a ready upgrade");
            *ctx.successor.borrow_mut() = Some(queue);
            ctx.table.borrow_mut().onward = true;
            return Ok(pid);
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            format!("the new master was not ready within {timeout:?}")
        }
        // The handshake ends as the new master exits: give its exit status a moment to
        // be there, for the reason.
        Err(e) => match exit_status(&mut child).await {
            Some(status) => format!("the new master exited ({status}) before it was ready"),
            None if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the new master closed the handshake before it was ready".into()
            }
            None => format!("the new master broke the handshake before it was ready ({e})"),
        },
    };
    let _ = child.kill();
    if let Some((_, (mut follower, writer))) = tasks {
        // What the new master sent before it went is applied (it ends as the handshake
        // does); then this master holds the shared map's order again.
        let _ = tokio::time::timeout(carry::TIMEOUT, &mut follower).await;
        follower.abort();
        writer.abort();
    }
    ctx.state.take_back();
    tokio::task::spawn_blocking(move || child.wait());
    Err(failure)
}

/// The tasks of an upgrade under way in the old master: where connections go once it is
/// ready, and the task that follows the new master with the one that writes to it.
type Tasks = (
    tokio::sync::mpsc::Sender<Onward>,
    (JoinHandle<()>, JoinHandle<()>),
);

/// In the old master: sends START, then follows the new master until it is READY (`Ok`),
/// fails, or `deadline` passes (`TimedOut`).
async fn wait_ready(
    ctx: &Rc<Ctx>,
    stream: Rc<Handshake>,
    deadline: tokio::time::Instant,
) -> (io::Result<()>, Option<Tasks>) {
    let totals = Carried::collect(ctx);
    let start = carry::send_totals(&stream, &totals, carry::TIMEOUT);
    match tokio::time::timeout_at(deadline, start).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return (Err(e), None),
        Err(_) => return (Err(io::ErrorKind::TimedOut.into()), None),
    }
    let (link, map) = Link::new();
    let (queue, taken) = tokio::sync::mpsc::channel(ONWARD_QUEUE);
    let writer = tokio::task::spawn_local(feed_successor(stream.clone(), map, taken));
    let (ready, is_ready) = tokio::sync::oneshot::channel();
    let follower = tokio::task::spawn_local(follow_successor(ctx.clone(), stream, link, ready));
    let result = match tokio::time::timeout_at(deadline, is_ready).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    };
    (result, Some((queue, (follower, writer))))
}

/// In the old master: reads what the new master sends for as long as it runs. HELLO
/// hands it the shared map; ANSWER and CHANGES go into this master's copy; READY (or the
/// previous release's text line) is told on `ready`, and so is a failure before it.
async fn follow_successor(
    ctx: Rc<Ctx>,
    stream: Rc<Handshake>,
    link: Link,
    ready: tokio::sync::oneshot::Sender<io::Result<()>>,
) {
    let mut reader = carry::Reader::default();
    match reader.legacy_line(&stream).await {
        Ok(Some(line)) if line.starts_with("ready") => {
            tracing::info!(
                "the new master is of an earlier release: the shared map is not handed over"
            );
            let _ = ready.send(Ok(()));
            return;
        }
        Ok(Some(line)) => {
            let e = io::Error::new(io::ErrorKind::InvalidData, format!("it said {line:?}"));
            let _ = ready.send(Err(e));
            return;
        }
        Ok(None) => {}
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    }
    let (mut ready, mut link) = (Some(ready), Some(link));
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let end = loop {
        let frame = match reader.next(&stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break io::Error::new(io::ErrorKind::UnexpectedEof, "the handshake ended"),
            Err(e) => break e,
        };
        match frame.tag {
            carry::tag::HELLO => {
                let Some(link) = link.take() else {
                    break invalid("a second HELLO".into());
                };
                match ctx.state.hand_over(link) {
                    Ok(entries) => tracing::info!(entries, "upgrade: the shared map is handed over; this master forwards its writes to the new one"),
                    Err(why) => break invalid(why.into()),
                }
            }
            carry::tag::ANSWER | carry::tag::CHANGES => {
                if let Err(e) = ctx.state.on_successor_frame(frame.tag, &frame.body) {
                    break e.into();
                }
            }
            carry::tag::READY => {
                ctx.state.successor_ready();
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            other => break invalid(format!("a frame of tag {:?}", char::from(other))),
        }
    };
    match ready.take() {
        Some(ready) => {
            let _ = ready.send(Err(end));
        }
        None => {
            tracing::warn!(error = %end, "the new master's side of the handshake ended: writes forwarded from now on fail");
            ctx.state.successor_lost(&end.to_string());
        }
    }
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
