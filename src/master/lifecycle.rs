//! The lifecycle task, in the master beside the accept loops: it replaces workers without
//! losing a connection. A replacement is always started first, in the same slot, and takes
//! over on its READY; only then does the old process drain (see `Table::recycle` and
//! `Table::take_over`). This task decides when:
//!
//! - a worker reached one of its recycling limits (age or memory here; the connection limit
//!   is checked on the dispatch path);
//! - SIGHUP: a rolling restart, a batch of workers at a time;
//! - SIGTTIN / SIGTTOU: one worker slot more / less (never fewer than one);
//! - a worker sent nothing for the worker timeout, or held connections for the ack timeout
//!   without acknowledging or finishing any: it gets SIGABRT (a core dump to look at),
//!   SIGKILL after a short grace, its unacknowledged connections go to other workers and its
//!   slot gets a new process;
//! - a worker that refused connections for lack of fds gets connections again after a
//!   pause (or as soon as it reports one finished), and held connections whose client has
//!   gone are closed;
//! - a draining worker outlived the drain timeout: SIGKILL.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::MissedTickBehavior;

use super::ctx::Ctx;
use super::link::{self, flush};
use super::table::{Fate, Lost, Phase, Role, Table};
use super::workers::{after_failure, start_worker};
use crate::config::MAX_WORKERS;
use crate::supervise::Reason;
use crate::sys;

/// The signals the lifecycle task answers.
#[derive(Debug)]
pub(crate) struct Signals {
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs the handlers (SIGTTOU would otherwise stop the master).
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// How often the health checks run: a quarter of the worker timeout, at most a second.
fn tick_period(worker_timeout: Duration) -> Duration {
    (worker_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// How long a worker that refused connections for lack of fds gets none, unless it reports
/// one finished first.
const FULL_PAUSE: Duration = Duration::from_secs(1);

/// How long an unresponsive worker has between SIGABRT and SIGKILL.
fn abort_grace(worker_timeout: Duration) -> Duration {
    (worker_timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

pub(crate) async fn run(ctx: Rc<Ctx>, mut signals: Signals) {
    let (tick_every, rss_every, watch_memory, wake) = {
        let table = ctx.table.borrow();
        let config = &table.config;
        (
            tick_period(config.worker_timeout.min(config.ack_timeout)),
            config.rss_interval,
            config.limits.max_rss.is_some(),
            table.wake.clone(),
        )
    };
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut memory = tokio::time::interval(rss_every);
    memory.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => check_health(&ctx).await,
            _ = memory.tick(), if watch_memory => check_memory(&ctx),
            _ = wake.notified() => {}
            Some(()) = signals.hup.recv() => rolling_restart(&ctx),
            Some(()) = signals.ttin.recv() => drop(scale_up(&ctx)),
            Some(()) = signals.ttou.recv() => drop(scale_down(&ctx)),
            Some(()) = signals.usr2.recv() => {
                tracing::info!("SIGUSR2: live upgrade");
                let ctx = ctx.clone();
                // Its result is logged; `handoff upgrade` reports it to the caller.
                tokio::task::spawn_local(async move { super::upgrade::upgrade(&ctx, None).await });
            }
        }
        reconcile(&ctx);
    }
}

/// Starts the replacements that are due and moves a rolling restart along.
fn reconcile(ctx: &Rc<Ctx>) {
    // Slots whose worker drained on its own: refilled at once after a stable life, through
    // the backoff (and the crash-loop report) after a short one.
    let handovers: Vec<(usize, Duration)> = {
        let mut table = ctx.table.borrow_mut();
        let workers = table.workers;
        table.slots[..workers]
            .iter_mut()
            .enumerate()
            .filter_map(|(i, slot)| slot.handover.take().map(|uptime| (i, uptime)))
            .collect()
    };
    for (index, uptime) in handovers {
        after_failure(ctx, index, uptime);
    }
    let starts: Vec<usize> = {
        let mut table = ctx.table.borrow_mut();
        if table.stopping {
            return;
        }
        advance_restart(&mut table);
        // Empty slots are refilled by the exit path (after its backoff), not here.
        (0..table.workers)
            .filter(|&i| {
                let slot = &table.slots[i];
                slot.respawn_at.is_none() && slot.process.is_some() && table.wants_start(i)
            })
            .collect()
    };
    for index in starts {
        start_worker(ctx, index);
    }
    flush(ctx);
}

/// Asks for the replacement of each process whose limits `now` says it reached.
fn check_limits(table: &mut Table, now: Instant) {
    for index in 0..table.workers {
        let reached = table.slots[index]
            .process
            .as_ref()
            .filter(|p| p.phase == Phase::Ready && p.retire.is_none())
            .and_then(|p| p.limits.reached(p.usage(now)));
        if let Some(reason) = reached {
            table.recycle(index, reason);
        }
    }
}

/// Reads the resident set of every serving process and recycles those at `--max-rss`.
fn check_memory(ctx: &Rc<Ctx>) {
    let mut table = ctx.table.borrow_mut();
    for slot in &mut table.slots {
        if let Some(p) = slot.process.as_mut() {
            p.rss = crate::procfs::rss(p.pid).ok();
        }
    }
    check_limits(&mut table, Instant::now());
}

/// The periodic checks: silent workers, drain deadlines, kill graces, age limits, and
/// clearing the failure count of slots whose worker has stayed up.
async fn check_health(ctx: &Rc<Ctx>) {
    // Progress the workers counted in memory since the master last looked (it looks when
    // it accepts; an idle master looks here).
    link::sync(ctx);
    flush(ctx);
    check_held(ctx);
    if silent_workers(ctx).is_empty() {
        return check_deadlines(ctx);
    }
    // Their frames may be waiting in a channel the master has not read yet (the master
    // itself was busy): let the channel tasks run before judging.
    for _ in 0..2 {
        tokio::task::yield_now().await;
    }
    for (index, pid, why) in silent_workers(ctx) {
        abort_unresponsive(ctx, index, pid, why);
    }
    check_deadlines(ctx);
}

/// The connections the master holds: those whose client left are closed, and workers that
/// refused connections for lack of fds get some again after [`FULL_PAUSE`].
fn check_held(ctx: &Rc<Ctx>) {
    let (abandoned, resumed) = {
        let mut table = ctx.table.borrow_mut();
        let abandoned = table.drop_abandoned(sys::socket::peer_gone);
        let resumed = match Instant::now().checked_sub(FULL_PAUSE) {
            Some(cutoff) => table.end_full_pauses(cutoff),
            None => false,
        };
        (abandoned, resumed)
    };
    if abandoned > 0 {
        tracing::info!(
            connections = abandoned,
            "closed held connections whose client had gone"
        );
    }
    if resumed || abandoned > 0 {
        flush(ctx);
    }
}

/// Processes to give up on: those that sent nothing for the worker timeout, started and did
/// not say READY within it, or kept reporting for the ack timeout while holding connections
/// and neither acknowledging nor finishing any.
fn silent_workers(ctx: &Ctx) -> Vec<(usize, u32, Lost)> {
    let table = ctx.table.borrow();
    let now = Instant::now();
    let (timeout, ack_timeout) = (table.config.worker_timeout, table.config.ack_timeout);
    let stopping = table.stopping;
    table
        .slots
        .iter()
        .enumerate()
        .flat_map(|(index, slot)| slot.processes().map(move |p| (index, p)))
        .filter_map(|(index, p)| {
            // A starting worker must also say READY in time: heartbeats alone (its runtime
            // is up, its init is stuck) do not count.
            let since = match p.phase {
                Phase::Starting => p.started,
                _ => p.last_heard,
            };
            let silent = now.saturating_duration_since(since);
            if silent >= timeout {
                return Some((index, p.pid, Lost::Unresponsive(silent.as_millis() as u64)));
            }
            // Stuck, not busy: it keeps talking (a heartbeat thread) while its receive loop
            // takes nothing and nothing finishes. A worker whose runtime is busy says nothing
            // at all until it catches up, and the worker timeout bounds that. While the
            // master stops, nobody could take its connections: the shutdown timeout rules.
            let since = p
                .ack_wait_since()
                .filter(|&since| !stopping && p.last_heard > since)?;
            let waiting = now.saturating_duration_since(since);
            (waiting >= ack_timeout).then_some((
                index,
                p.pid,
                Lost::Unacknowledged(waiting.as_millis() as u64),
            ))
        })
        .collect()
}

fn check_deadlines(ctx: &Rc<Ctx>) {
    let now = Instant::now();
    let mut overdue = Vec::new();
    let mut graceless = Vec::new();
    {
        let mut guard = ctx.table.borrow_mut();
        let table = &mut *guard;
        for (index, slot) in table.slots.iter_mut().enumerate() {
            for p in &mut slot.retiring {
                if p.drain_deadline.is_some_and(|d| now >= d) {
                    p.drain_deadline = None;
                    overdue.push((index, p.pid, p.active()));
                }
            }
            // A slot whose process has stayed up is no longer failing, unless it is waiting
            // for a replacement that keeps failing (that must not look stable).
            let settled = slot
                .process
                .as_ref()
                .filter(|p| p.phase == Phase::Ready && p.retire.is_none())
                .filter(|_| slot.successor.is_none());
            if let Some(p) = settled {
                slot.backoff
                    .note_uptime(now.saturating_duration_since(p.started));
            }
        }
        for (&pid, live) in &mut table.live {
            if live.kill_at.is_some_and(|at| now >= at) {
                live.kill_at = None;
                graceless.push((live.slot, pid, live.fate));
            }
        }
        table.counters.drain_kills += overdue.len() as u64;
        if !table.stopping {
            check_limits(table, now);
        }
    }
    for (index, pid, active) in overdue {
        tracing::warn!(
            worker = index,
            pid,
            active,
            "drain timeout: killing the draining worker"
        );
        let _ = sys::process::signal(pid, libc::SIGKILL);
    }
    for (index, pid, fate) in graceless {
        match fate {
            Fate::Aborted => tracing::warn!(
                worker = index,
                pid,
                "unresponsive worker still there after SIGABRT: SIGKILL"
            ),
            _ => tracing::warn!(
                worker = index,
                pid,
                "draining worker still there at its drain deadline: SIGKILL"
            ),
        }
        let _ = sys::process::signal(pid, libc::SIGKILL);
    }
}

/// Gives up on a worker that sent nothing for the worker timeout (or acknowledged nothing
/// for the ack timeout): its connections go to others, it gets SIGABRT now and SIGKILL
/// after a grace, and its slot gets a new process.
fn abort_unresponsive(ctx: &Rc<Ctx>, index: usize, pid: u32, why: Lost) {
    let now = Instant::now();
    let (role, uptime, grace) = {
        let mut table = ctx.table.borrow_mut();
        let uptime = table.slots[index]
            .processes()
            .find(|p| p.pid == pid)
            .map(|p| now.saturating_duration_since(p.started));
        let Some(role) = table.lose(index, pid, &why) else {
            return;
        };
        let grace = abort_grace(table.config.worker_timeout);
        if let Some(live) = table.live.get_mut(&pid) {
            live.fate = Fate::Aborted;
            live.kill_at = Some(now + grace);
        }
        table.counters.unresponsive += 1;
        if matches!(why, Lost::Unacknowledged(_)) {
            table.counters.unacknowledged += 1;
        }
        (role, uptime.unwrap_or_default(), grace)
    };
    link::close(ctx, pid);
    tracing::error!(
        worker = index,
        pid,
        reason = %why,
        grace_ms = grace.as_millis() as u64,
        "worker not responding: SIGABRT, SIGKILL after the grace"
    );
    let _ = sys::process::signal(pid, libc::SIGABRT);
    flush(ctx);
    if role != Role::Retiring {
        after_failure(ctx, index, uptime);
    }
}

/// SIGHUP: queues every serving worker for replacement, a batch at a time.
pub(crate) fn rolling_restart(ctx: &Rc<Ctx>) {
    let mut guard = ctx.table.borrow_mut();
    let table = &mut *guard;
    if table.stopping {
        return;
    }
    table.restart = (0..table.workers)
        .filter_map(|i| {
            let p = table.slots[i].process.as_ref()?;
            (p.phase != Phase::Draining).then_some((i, p.pid))
        })
        .collect();
    table.restart_batch = table.config.restart_batch_for(table.workers);
    table.restarting = true;
    tracing::info!(
        workers = table.restart.len(),
        batch = table.restart_batch,
        "SIGHUP: rolling restart"
    );
    ctx.systemd.reloading();
}

/// Asks for restart replacements while fewer than a batch are starting.
fn advance_restart(table: &mut Table) {
    if !table.restarting {
        return;
    }
    let restarting = |table: &Table| {
        table.slots[..table.workers]
            .iter()
            .filter(|s| {
                s.process
                    .as_ref()
                    .is_some_and(|p| p.retire == Some(Reason::Restart))
            })
            .count()
    };
    let mut in_flight = restarting(table);
    while in_flight < table.restart_batch {
        let Some((index, pid)) = table.restart.pop_front() else {
            break;
        };
        let still_there = index < table.workers
            && table.slots[index]
                .process
                .as_ref()
                .is_some_and(|p| p.pid == pid);
        // A process replaced meanwhile (crash, limit) needs no restart.
        if still_there && table.recycle(index, Reason::Restart) {
            in_flight += 1;
        }
    }
    if table.restart.is_empty() && in_flight == 0 {
        table.restarting = false;
        tracing::info!("rolling restart done");
    }
}

/// SIGTTIN: one worker slot more; false if there cannot be one.
pub(crate) fn scale_up(ctx: &Rc<Ctx>) -> bool {
    let index = {
        let mut table = ctx.table.borrow_mut();
        if table.stopping {
            return false;
        }
        let workers = table.workers + 1;
        let most = match table.config.strategy {
            strategy if strategy.is_steered() => crate::bpf::MAX_SLOTS,
            _ => MAX_WORKERS,
        };
        if workers > most {
            tracing::warn!(
                workers = table.workers,
                most,
                "SIGTTIN: already at the most workers; keeping them"
            );
            return false;
        }
        if table.max_held_with(workers) < workers {
            tracing::warn!(
                workers = table.workers,
                "SIGTTIN: the fd limit leaves no room for another worker; keeping them"
            );
            return false;
        }
        let index = table.add_slot();
        tracing::info!(
            worker = index,
            workers = table.workers,
            "SIGTTIN: adding a worker"
        );
        index
    };
    start_worker(ctx, index);
    true
}

/// SIGTTOU: one worker slot less (its processes drain), never below one; false if there
/// is only one.
pub(crate) fn scale_down(ctx: &Rc<Ctx>) -> bool {
    let removed = {
        let mut table = ctx.table.borrow_mut();
        if table.stopping {
            return false;
        }
        match table.remove_slot() {
            Some(index) => {
                tracing::info!(
                    worker = index,
                    workers = table.workers,
                    "SIGTTOU: removing a worker"
                );
                true
            }
            None => {
                tracing::warn!("SIGTTOU: only one worker left; keeping it");
                false
            }
        }
    };
    flush(ctx);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_run_four_times_per_timeout_at_most_once_a_second() {
        assert_eq!(
            tick_period(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(tick_period(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(
            tick_period(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn the_abort_grace_is_short_but_not_instant() {
        assert_eq!(
            abort_grace(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(abort_grace(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(
            abort_grace(Duration::from_secs(300)),
            Duration::from_secs(5)
        );
    }
}
