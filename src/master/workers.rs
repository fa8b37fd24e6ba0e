//! Starting and reaping worker processes, in the master: `start_worker` spawns a process
//! into a slot (as its process, or as the successor of one being replaced), two tasks carry
//! its channel (frames in, outbox out), and `watch_exit` reaps it. An exit the master did not
//! ask for is a failure: it goes through the slot's [`Backoff`](crate::supervise::Backoff),
//! is reported loudly once the slot is crash-looping, and the slot is refilled after the
//! delay. The exit of a draining or aborted process is expected and changes nothing.

use std::os::unix::process::ExitStatusExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::task::spawn_local;

use super::ctx::Ctx;
use super::link::{self, flush, give_up};
use super::table::{Fate, Live, Lost, Process};
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
            let mut process = Process::new(pid);
            process.limits = config
                .limits
                .jittered(config.jitter_percent, fastrand::f64());
            if let Err(e) = ctx.handout.send_to(index, &spawned.channel) {
                tracing::error!(worker = index, pid, error = %e, "sending listeners to the worker failed");
                let _ = sys::process::signal(pid, libc::SIGKILL);
            }
            link::open(ctx, index, pid, spawned.channel);
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
    // It can count no more: its metrics' final values join the totals of workers gone.
    ctx.cluster.retire(pid);
    // Its last frames first: a DRAINING among them makes this exit an expected one (and its
    // slot is then refilled by the handover, not by this exit).
    link::read_last_frames(&ctx, index, pid);
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
