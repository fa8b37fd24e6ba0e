//! The control socket: a Unix socket where the master answers one-line commands. `status`
//! returns the worker table and counters as one line of JSON (what `handoff ctl status`
//! prints): per slot its process, a starting successor, crash-loop state; the processes
//! draining; the counters. Runs in the master; never on the accept path.
//!
//! Only the master's own user (or root) is answered: the socket file is made 0600 and each
//! peer's `SO_PEERCRED` uid is checked. At most [`MAX_CONNECTIONS`] are served at once, so
//! no number of clients can spend the master's fds; a peer gets [`COMMAND_TIMEOUT`] to send
//! its line, and while others wait in the kernel's queue the one that has waited longest
//! for its line is closed, so idle connections cannot keep `status` out for long.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::cluster::display_key;
use super::ctx::Ctx;
use super::table::{Phase, Process, Table};
use crate::procfs;
use crate::supervise::Reason;
use crate::sys;

/// The longest command line read.
const MAX_COMMAND: u64 = 256;
/// Control connections served at once, at most; more wait in the kernel's queue.
const MAX_CONNECTIONS: usize = 16;
/// The kernel's queue of control connections not yet accepted.
const BACKLOG: i32 = 1024;
/// How long a peer has to send its command line.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection told to make room may still take to deliver a line it has begun.
const EVICTED_GRACE: Duration = Duration::from_millis(200);
/// How long writing an answer may take (a peer that does not read it is dropped).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one log line about refused peers per this long.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Binds the control socket at `path` (see `sys::socket::unix_listener`: a live socket there
/// is an error, a stale one is replaced) and makes it 0600 whatever the umask. Until the
/// chmod the mode is the umask's, which is safe because every peer's uid is checked.
pub(crate) fn bind(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = sys::socket::unix_listener(path, BACKLOG)?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    sys::async_fd(fd)
}

pub(crate) async fn serve(ctx: Rc<Ctx>, listener: Rc<AsyncFd<OwnedFd>>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = Rc::new(Waiting::default());
    let master_uid = sys::socket::effective_uid();
    let mut refusals = Refusals::default();
    loop {
        let Some(permit) = free_permit(&permits, &listener, &waiting).await else {
            return;
        };
        let stream = match accept(&listener).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = stream.peer_cred();
        if !peer.as_ref().is_ok_and(|p| allowed(p.uid(), master_uid)) {
            if let Some(refused) = refusals.refuse(Instant::now()) {
                match peer {
                    Ok(peer) => tracing::warn!(
                        uid = peer.uid(),
                        pid = peer.pid(),
                        refused,
                        "control connection refused: the peer runs as another user"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        refused,
                        "control connection refused: its credentials cannot be read"
                    ),
                }
            }
            continue;
        }
        // In line from the accept on, before its task first runs: a burst of accepts can
        // then make room by closing the oldest of them.
        let turn = Waiting::enter(&waiting);
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let _ = answer(&ctx, stream, turn).await;
        });
    }
}

/// Whether a peer running as `peer_uid` may use the control socket of a master running as
/// `master_uid`: the same user, or root.
fn allowed(peer_uid: u32, master_uid: u32) -> bool {
    peer_uid == master_uid || peer_uid == 0
}

/// A permit to serve one more connection. While all are taken and another connection waits
/// in the kernel's queue, the connection that has waited longest for its command line is
/// closed to make room. `None` only if the semaphore were closed (it never is).
async fn free_permit(
    permits: &Arc<Semaphore>,
    listener: &AsyncFd<OwnedFd>,
    waiting: &Waiting,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        permit = permits.clone().acquire_owned() => permit.ok(),
        () = queued(listener) => {
            waiting.evict_oldest();
            permits.clone().acquire_owned().await.ok()
        }
    }
}

/// Returns once a connection waits in the listener's queue (tokio's readiness may be stale:
/// `poll(2)` confirms it).
async fn queued(listener: &AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut guard) = listener.readable().await else {
            // The accept that follows reports it.
            return std::future::pending().await;
        };
        if sys::socket::wait_readable(listener.get_ref(), 0).unwrap_or(true) {
            return;
        }
        guard.clear_ready();
    }
}

async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<UnixStream> {
    loop {
        let mut guard = listener.readable().await?;
        if let Ok(accepted) = guard.try_io(|fd| sys::socket::accept(fd.get_ref())) {
            let (fd, _) = accepted?;
            return UnixStream::from_std(std::os::unix::net::UnixStream::from(fd));
        }
    }
}

async fn answer(ctx: &Rc<Ctx>, stream: UnixStream, turn: Turn) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    {
        let mut reader = BufReader::new(AsyncReadExt::take(read, MAX_COMMAND));
        let read_line = reader.read_line(&mut line);
        tokio::pin!(read_line);
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(COMMAND_TIMEOUT, &mut read_line) => Some(read),
            () = turn.evicted.notified() => None,
        };
        let read = match read {
            Some(read) => read,
            // Told to make room: a line already in the socket (which the reactor may not
            // have reported yet) is still answered; an idle connection is closed.
            None if sys::socket::wait_readable(write.as_ref(), 0).unwrap_or(false) => {
                tokio::time::timeout(EVICTED_GRACE, &mut read_line).await
            }
            None => return Ok(()),
        };
        match read {
            Ok(read) => read?,
            Err(_) => return Ok(()),
        };
        drop(turn);
    }
    // An operation answers when it is done, bounded by its own patience; a status at once.
    let reply = match super::operate::operate(ctx, line.trim()).await {
        Some(done) => done.to_string(),
        None => respond(ctx, line.trim()),
    };
    let written = async {
        write.write_all(reply.as_bytes()).await?;
        write.write_all(b"\n").await?;
        write.shutdown().await
    };
    // A peer that does not read its answer does not hold the connection.
    tokio::time::timeout(ANSWER_TIMEOUT, written)
        .await
        .unwrap_or(Ok(()))
}

/// Accepted connections still waiting for their command line, oldest first.
#[derive(Debug, Default)]
struct Waiting {
    queue: RefCell<VecDeque<(u64, Rc<Notify>)>>,
    next: Cell<u64>,
}

/// One connection's place in [`Waiting`]; leaves it when dropped.
struct Turn {
    waiting: Rc<Waiting>,
    id: u64,
    /// Notified when the connection is to be closed to make room.
    evicted: Rc<Notify>,
}

impl Waiting {
    fn enter(waiting: &Rc<Waiting>) -> Turn {
        let id = waiting.next.get();
        waiting.next.set(id + 1);
        let evicted = Rc::new(Notify::new());
        waiting.queue.borrow_mut().push_back((id, evicted.clone()));
        Turn {
            waiting: waiting.clone(),
            id,
            evicted,
        }
    }

    /// Tells the connection that has waited longest to close; returns its id.
    fn evict_oldest(&self) -> Option<u64> {
        let (id, evicted) = self.queue.borrow_mut().pop_front()?;
        evicted.notify_one();
        tracing::debug!("control connection idle while others wait: closed");
        Some(id)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.waiting
            .queue
            .borrow_mut()
            .retain(|(id, _)| *id != self.id);
    }
}

/// Refused peers, logged at most once per [`REFUSAL_LOG_EVERY`]: each line counts the
/// refusals since the one before (a flood of refused peers writes no flood of lines).
#[derive(Debug, Default)]
struct Refusals {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    /// Counts one refusal at `now`; returns how many refusals a line written now reports
    /// (this one included), or `None` while the last line is too recent.
    fn refuse(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last_line
            .is_some_and(|last| now.saturating_duration_since(last) < REFUSAL_LOG_EVERY)
        {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

fn respond(ctx: &Ctx, command: &str) -> String {
    match command {
        "status" => {
            // What the workers counted in memory up to now, not at the last accept.
            super::link::sync(ctx);
            super::link::flush(ctx);
            let table = ctx.table.borrow();
            serde_json::json!({
                "pid": std::process::id(),
                "strategy": table.config.strategy,
                "listening": ctx.listening,
                "accepting": table.can_accept(),
                "stopping": table.stopping,
                "max_pending": table.config.max_pending,
                "awaiting_redispatch": table.retry_len(),
                "held": table.held(),
                "max_held": table.max_held(),
                "counters": table.counters,
                "crash_looping": table.slots[..table.workers]
                    .iter()
                    .filter(|s| s.backoff.crash_looping())
                    .count(),
                "restarting": table.restarting,
                "workers": slots(&table),
                "draining": draining(&table),
                "messages": ctx.post.counters(),
                "state": ctx.state.counters(),
                "metrics": worker_metrics(ctx),
                "kernel_least": ctx.handout.steered(table.workers),
            })
            .to_string()
        }
        other => serde_json::json!({ "error": format!(
                "unknown command {other:?}; try status, reload, scale N or stop"
            ) })
        .to_string(),
    }
}

/// The workers' `metrics`, added up across the cluster, by key as Prometheus writes it.
fn worker_metrics(ctx: &Ctx) -> serde_json::Value {
    let figures = ctx.cluster.figures();
    let counters = figures
        .counters
        .iter()
        .filter_map(|(key, total)| Some((display_key(key)?, serde_json::json!(total))));
    let gauges = figures
        .gauges
        .iter()
        .filter_map(|(key, value)| Some((display_key(key)?, serde_json::json!(value))));
    serde_json::Value::Object(counters.chain(gauges).collect())
}

/// The control socket's view of one slot in use.
#[derive(Debug, serde::Serialize)]
struct SlotReport {
    worker: usize,
    pid: Option<u32>,
    phase: Option<Phase>,
    active: u64,
    pending: usize,
    assigned: u64,
    finished: u64,
    spawns: u64,
    failures: u32,
    /// Failing again and again soon after start (see `supervise::CRASH_LOOP_FAILURES`).
    crash_loop: bool,
    uptime_ms: u64,
    /// Why its process is being replaced, while the replacement starts.
    recycling: Option<Reason>,
    /// The replacement's pid, while it starts.
    successor: Option<u32>,
    /// Resident set of its process in KiB.
    rss_kib: Option<u64>,
    /// CPU time its process has used (user + system), in milliseconds.
    cpu_ms: Option<u64>,
    /// How its process reports its totals: `memory` (shared counters) or `frames`.
    reports: Option<&'static str>,
}

/// A replaced process finishing its connections.
#[derive(Debug, serde::Serialize)]
struct DrainingReport {
    worker: usize,
    pid: u32,
    reason: Option<Reason>,
    active: u64,
    pending: usize,
    /// Idle keep-alive connections it handed back for other workers.
    handed_back: u64,
}

fn slots(table: &Table) -> Vec<SlotReport> {
    table.slots[..table.workers]
        .iter()
        .enumerate()
        .map(|(worker, slot)| {
            let p = slot.process.as_ref();
            SlotReport {
                worker,
                pid: p.map(|p| p.pid),
                phase: p.map(|p| p.phase),
                active: p.map_or(0, Process::active),
                pending: p.map_or(0, Process::pending),
                assigned: p.map_or(0, Process::assigned),
                finished: p.map_or(0, Process::finished),
                spawns: slot.spawns,
                failures: slot.backoff.failures(),
                crash_loop: slot.backoff.crash_looping(),
                uptime_ms: p.map_or(0, |p| p.started.elapsed().as_millis() as u64),
                recycling: p.and_then(|p| p.retire),
                successor: slot.successor.as_ref().map(|s| s.pid),
                rss_kib: p
                    .and_then(|p| p.rss.or_else(|| procfs::rss(p.pid).ok()))
                    .map(|b| b / 1024),
                cpu_ms: p
                    .and_then(|p| procfs::cpu_time(p.pid))
                    .map(|t| t.as_millis() as u64),
                reports: p.map(|p| match p.shares_counters() {
                    true => "memory",
                    false => "frames",
                }),
            }
        })
        .collect()
}

fn draining(table: &Table) -> Vec<DrainingReport> {
    table
        .slots
        .iter()
        .enumerate()
        .flat_map(|(worker, slot)| {
            slot.retiring.iter().map(move |p| DrainingReport {
                worker,
                pid: p.pid,
                reason: p.retire,
                active: p.active(),
                pending: p.pending(),
                handed_back: p.handed_back(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_or_root_is_allowed() {
        assert!(allowed(1000, 1000));
        assert!(allowed(0, 1000));
        assert!(allowed(0, 0));
        assert!(!allowed(65534, 1000));
        assert!(!allowed(1000, 0));
    }

    #[test]
    fn refusals_log_one_line_a_second_counting_the_silent_ones() {
        let mut refusals = Refusals::default();
        let start = Instant::now();
        assert_eq!(refusals.refuse(start), Some(1));
        for ms in [1, 200, 999] {
            assert_eq!(refusals.refuse(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            refusals.refuse(start + Duration::from_millis(1000)),
            Some(4)
        );
        assert_eq!(
            refusals.refuse(start + Duration::from_millis(5000)),
            Some(1)
        );
    }

    #[test]
    fn eviction_takes_the_oldest_connection_still_waiting() {
        let waiting = Rc::new(Waiting::default());
        let first = Waiting::enter(&waiting);
        let second = Waiting::enter(&waiting);
        let third = Waiting::enter(&waiting);
        drop(first);
        assert_eq!(waiting.evict_oldest(), Some(second.id));
        drop(second);
        assert_eq!(waiting.evict_oldest(), Some(third.id));
        assert_eq!(waiting.evict_oldest(), None);
    }
}
