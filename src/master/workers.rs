//! Starting and reaping worker processes, in the master: `start_worker` spawns a process
//! into a slot (as its process, or as the successor of one being replaced), two tasks carry
//! its channel (frames in, outbox out), and `watch_exit` reaps it. An exit the master did not
//! ask for is a failure: it goes through the slot's [`Backoff`](crate::supervise::Backoff),
//! is reported loudly once the slot is crash-looping, and the slot is refilled after the
//! delay. The exit of a draining or aborted process is expected and changes nothing.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::task::spawn_local;

use super::table::{Fate, Flush, Heard, Live, Lost, Process};
use super::{flush, give_up, Ctx};
use crate::ipc::channel::frame_buffer;
use crate::ipc::{Channel, ChannelError};
use crate::supervise;
use crate::sys;

/// Starts a process for slot `index` if it wants one (see `Table::wants_start`): its
/// process, or the successor of a process being replaced.
pub(crate) fn start_worker(ctx: &Rc<Ctx>, index: usize) {
    let mut guard = ctx.table.borrow_mut();
    if !guard.wants_start(index) {
        return;
    }
    let table = &mut *guard;
    let config = table.config.clone();
    let slot = &mut table.slots[index];
    slot.respawn_at = None;
    let spawn_count = slot.spawns;
    slot.spawns += 1;
    let replacing = slot.process.as_ref().map(|p| p.pid);
    // The worker's own drain limit: whichever of the master's two is longer (the master
    // kills it at its own deadline anyway).
    let drain = config.drain_timeout.max(config.shutdown_timeout);
    let heartbeat = config.worker_heartbeat();
    match supervise::spawn(&ctx.launcher, index, spawn_count, heartbeat, drain) {
        Ok(spawned) => {
            let pid = spawned.pid;
            match replacing {
                Some(old) => tracing::info!(worker = index, pid, replacing = old, "worker spawned"),
                None => tracing::info!(worker = index, pid, "worker spawned"),
            }
            table.counters.spawned += 1;
            table.live.insert(
                pid,
                Live {
                    slot: index,
                    fate: Fate::Serving,
                    kill_at: None,
                },
            );
            let mut process = Process::new(pid, spawned.channel);
            process.limits = config
                .limits
                .jittered(config.jitter_percent, fastrand::f64());
            if let Err(e) = ctx.handout.send_to(&process.channel) {
                tracing::error!(worker = index, pid, error = %e, "sending listeners to the worker failed");
                let _ = sys::process::signal(pid, libc::SIGKILL);
            }
            let reader = spawn_local(read_channel(
                ctx.clone(),
                index,
                pid,
                process.channel.clone(),
            ));
            let writer = spawn_local(write_channel(
                ctx.clone(),
                index,
                pid,
                process.channel.clone(),
                process.writer.clone(),
            ));
            process.tasks = vec![reader.abort_handle(), writer.abort_handle()];
            let started = process.started;
            if replacing.is_some() {
                slot.successor = Some(process);
            } else {
                slot.process = Some(process);
            }
            spawn_local(watch_exit(ctx.clone(), index, pid, started, spawned.child));
        }
        Err(e) => {
            tracing::error!(worker = index, error = %e, source = ?std::error::Error::source(&e), "spawning worker failed");
            drop(guard);
            after_failure(ctx, index, Duration::ZERO);
        }
    }
}

/// Records a failure of slot `index`'s worker after `uptime` (an exit nobody asked for, a
/// hung worker, a failed spawn): the backoff grows, a crash loop is reported loudly, and the
/// slot gets a new process after the delay if it lacks one.
pub(crate) fn after_failure(ctx: &Rc<Ctx>, index: usize, uptime: Duration) {
    let delay = {
        let mut guard = ctx.table.borrow_mut();
        let table = &mut *guard;
        if table.stopping || index >= table.slots.len() {
            return;
        }
        let backoff = &mut table.slots[index].backoff;
        let was_looping = backoff.crash_looping();
        let delay = backoff.on_exit(uptime);
        let (failures, looping) = (backoff.failures(), backoff.crash_looping());
        if looping && !was_looping {
            table.counters.crash_loops += 1;
        }
        let wanted = table.wants_start(index);
        let next_start_ms = delay.as_millis() as u64;
        if looping {
            tracing::error!(
                worker = index,
                failures,
                next_start_ms,
                serving = table.slots[..table.workers]
                    .iter()
                    .filter(|s| s.process.is_some())
                    .count(),
                "worker keeps failing soon after start: crash loop; serving with the workers that run"
            );
        } else if wanted && !delay.is_zero() {
            tracing::info!(
                worker = index,
                failures,
                next_start_ms,
                "restarting worker after backoff"
            );
        }
        if !wanted {
            return;
        }
        delay
    };
    schedule_respawn(ctx, index, delay);
}

/// Starts slot `index`'s process after `delay`.
fn schedule_respawn(ctx: &Rc<Ctx>, index: usize, delay: Duration) {
    if let Some(slot) = ctx.table.borrow_mut().slots.get_mut(index) {
        slot.respawn_at = Some(Instant::now() + delay);
    }
    let ctx = ctx.clone();
    spawn_local(async move {
        tokio::time::sleep(delay).await;
        if let Some(slot) = ctx.table.borrow_mut().slots.get_mut(index) {
            slot.respawn_at = None;
        }
        start_worker(&ctx, index);
    });
}

async fn watch_exit(
    ctx: Rc<Ctx>,
    index: usize,
    pid: u32,
    started: Instant,
    mut child: tokio::process::Child,
) {
    let status = child.wait().await;
    let uptime = started.elapsed();
    // Its last frames first: a DRAINING among them makes this exit an expected one (and its
    // slot is then refilled by the handover, not by this exit).
    read_last_frames(&ctx, index, pid);
    let fate = ctx
        .table
        .borrow()
        .live
        .get(&pid)
        .map_or(Fate::Serving, |l| l.fate);
    let expected = fate != Fate::Serving;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => {
                tracing::info!(worker = index, pid, code, expected, "worker exited")
            }
            (None, Some(signal)) if expected => {
                tracing::info!(
                    worker = index,
                    pid,
                    signal,
                    expected,
                    "worker killed by signal"
                )
            }
            (None, Some(signal)) => {
                tracing::warn!(
                    worker = index,
                    pid,
                    signal,
                    expected,
                    "worker killed by signal"
                )
            }
            _ => tracing::warn!(worker = index, pid, expected, "worker ended"),
        },
        Err(e) => tracing::error!(worker = index, pid, error = %e, "waiting for worker failed"),
    }
    give_up(&ctx, index, pid, Lost::Exited);
    flush(&ctx);
    let (stopping, none_left) = {
        let mut table = ctx.table.borrow_mut();
        table.live.remove(&pid);
        table.wake.notify_one();
        (table.stopping, table.live.is_empty())
    };
    if stopping {
        if none_left {
            ctx.table.borrow().all_exited.notify_waiters();
        }
    } else if !expected {
        after_failure(&ctx, index, uptime);
    }
}

/// Applies the frames an exited worker left in its channel that the reader task has not
/// read yet: its last acknowledgements and reports. Connections it acknowledged are its own
/// (lost with it, never handed to another worker, which could find the request already
/// read); those it had not are re-dispatched.
pub(super) fn read_last_frames(ctx: &Ctx, index: usize, pid: u32) {
    let Some(channel) = ctx
        .table
        .borrow()
        .find(index, pid)
        .map(|p| p.channel.clone())
    else {
        return;
    };
    let mut buf = frame_buffer();
    // A worker that exits with frames of ours unread leaves ECONNRESET on our end, and the
    // kernel reports it once, *before* the frames it had queued for us: read past it.
    let mut reset_seen = false;
    // A live peer could keep sending: read what a full queue holds, not forever.
    for _ in 0..MAX_LAST_FRAMES {
        match channel.try_recv_frame(&mut buf) {
            Ok(Some((frame, _no_fds))) => {
                if ctx.table.borrow_mut().on_frame(index, pid, frame).is_err() {
                    // Nothing after a broken frame is believed: discard the rest, so a
                    // later call cannot apply it either.
                    while let Ok(Some(_)) = channel.try_recv_frame(&mut buf) {}
                    return;
                }
            }
            Err(ChannelError::Io(e))
                if e.kind() == io::ErrorKind::ConnectionReset && !reset_seen =>
            {
                reset_seen = true;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

async fn read_channel(ctx: Rc<Ctx>, index: usize, pid: u32, channel: Rc<Channel>) {
    let mut buf = frame_buffer();
    let mut repeats = RepeatBudget::default();
    loop {
        // One recvmsg per frame; the one that finds the queue empty clears the readiness
        // (a raw read past it would cost a second empty recvmsg per wake-up).
        let verdict = match channel.recv_frame(&mut buf).await {
            Ok((frame, _no_fds)) => ctx.table.borrow_mut().on_frame(index, pid, frame),
            Err(e) => Err(Lost::channel(e)),
        };
        match verdict {
            Ok(Heard::News) => flush(&ctx),
            Ok(Heard::Repeat) => {
                flush(&ctx);
                if let Some(pause) = repeats.spend(Instant::now()) {
                    if repeats.warn() {
                        tracing::warn!(
                            worker = index,
                            pid,
                            budget = MAX_REPEATS,
                            "worker floods the channel with reports that say nothing new: \
                             reading it only once a second"
                        );
                    }
                    tokio::time::sleep(pause).await;
                }
            }
            Err(lost) => {
                give_up(&ctx, index, pid, lost);
                flush(&ctx);
                return;
            }
        }
    }
}

/// Frames that say nothing new (heartbeats, repeated reports) read from one worker per
/// [`REPEAT_WINDOW`]; a worker sends a few (one heartbeat a period). Past the budget the
/// master stops reading that channel until the window ends: the flooding worker's sends
/// block and the master's thread stays free for the others.
const MAX_REPEATS: u32 = 256;
const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// A worker's budget of frames with nothing new, per window.
#[derive(Debug, Default)]
struct RepeatBudget {
    window: Option<Instant>,
    spent: u32,
    warned: bool,
}

impl RepeatBudget {
    /// Counts one repeat at `now`; past the budget, how long to stop reading.
    fn spend(&mut self, now: Instant) -> Option<Duration> {
        let start = *self.window.get_or_insert(now);
        if now.saturating_duration_since(start) >= REPEAT_WINDOW {
            self.window = Some(now);
            self.spent = 0;
        }
        self.spent += 1;
        let end = self.window.expect("set above") + REPEAT_WINDOW;
        (self.spent > MAX_REPEATS).then(|| end.saturating_duration_since(now))
    }

    /// True the first time only: the flood is logged once per worker.
    fn warn(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }
}

/// The most frames read from a worker that is being given up on.
const MAX_LAST_FRAMES: usize = 1024;

/// How long the writer waits after a resource shortage before it sends again.
const SHORTAGE_PAUSE: Duration = Duration::from_millis(20);

async fn write_channel(
    ctx: Rc<Ctx>,
    index: usize,
    pid: u32,
    channel: Rc<Channel>,
    wake: Rc<tokio::sync::Notify>,
) {
    loop {
        wake.notified().await;
        // Warn once per shortage, not at every retry.
        let mut short = false;
        loop {
            let mut guard = match channel.writable().await {
                Ok(guard) => guard,
                Err(e) => return give_up(&ctx, index, pid, Lost::channel(e.into())),
            };
            let result = ctx.table.borrow_mut().flush(index, pid);
            match result {
                Flush::Done => break,
                Flush::Blocked => guard.clear_ready(),
                Flush::Short(e) => {
                    drop(guard);
                    if !short {
                        tracing::warn!(worker = index, pid, error = %e, "sending to the worker: the system is short of resources, retrying");
                    }
                    short = true;
                    tokio::time::sleep(SHORTAGE_PAUSE).await;
                }
                Flush::Broken(e) => {
                    give_up(&ctx, index, pid, Lost::channel(e.into()));
                    return flush(&ctx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_past_the_budget_pause_reading_until_the_window_ends() {
        let mut budget = RepeatBudget::default();
        let start = Instant::now();
        for _ in 0..MAX_REPEATS {
            assert_eq!(budget.spend(start), None);
        }
        let later = start + Duration::from_millis(300);
        assert_eq!(budget.spend(later), Some(Duration::from_millis(700)));
        assert!(budget.warn());
        assert!(!budget.warn(), "logged once");
        let next_window = start + REPEAT_WINDOW;
        assert_eq!(
            budget.spend(next_window),
            None,
            "a new window, a new budget"
        );
    }
}
