//! The master's worker table and the dispatch path: which worker gets a connection,
//! acknowledgements and load reports, re-dispatch when a worker is lost, and the life of each
//! slot: a slot has the process that gets its connections, briefly a successor starting
//! beside it (recycling never lowers capacity), and retiring processes that drain. The
//! policies that decide when to replace a worker live in `supervise::recycle`; the tasks that
//! act on them in `master::lifecycle`. Single-threaded: it lives in the master's one thread
//! behind an `Rc<RefCell<..>>` and never holds a borrow across an `.await`.
//!
//! It does no I/O: it takes events (a connection accepted, a frame from a worker, a process
//! lost) and says what each worker's channel should carry next
//! ([`Table::outgoing`]); the master's `link` room sends and reads, so everything here
//! is tested with plain values.

mod handback;
pub(crate) use handback::Onward;
mod process;

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::balance::{Balance, Candidate};
use crate::config::Config;
use crate::ipc::frame::Frame;
use crate::ipc::ChannelError;
use crate::supervise::{Backoff, Reason};
use crate::sys::socket::Peer;
pub(crate) use process::{HeldCount, Outgoing, Pending, Phase, Process, ProtocolError};

/// Fds the master keeps per worker slot: the channel and pidfd of its process, of a
/// successor and of a retiring one, with room to spare.
pub(crate) const FDS_PER_SLOT: usize = 8;

/// One worker slot.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The process that gets this slot's connections (or will, once ready).
    pub process: Option<Process>,
    /// Its replacement while that starts; it takes over on its READY.
    pub successor: Option<Process>,
    /// Replaced processes finishing their connections.
    pub retiring: Vec<Process>,
    pub spawns: u64,
    pub backoff: Backoff,
    /// When a start waiting out the backoff is due.
    pub respawn_at: Option<Instant>,
    /// Its process drained on its own after this uptime: the slot wants a new one.
    pub handover: Option<std::time::Duration>,
}

impl Slot {
    fn new(backoff: Backoff) -> Self {
        Slot {
            process: None,
            successor: None,
            retiring: Vec::new(),
            spawns: 0,
            backoff,
            respawn_at: None,
            handover: None,
        }
    }

    /// Every process of the slot: current, successor, retiring.
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.process
            .iter()
            .chain(&self.successor)
            .chain(&self.retiring)
    }

    /// Every process of the slot, to change: current, successor, retiring.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.process
            .iter_mut()
            .chain(&mut self.successor)
            .chain(&mut self.retiring)
    }

    fn find_mut(&mut self, pid: u32) -> Option<&mut Process> {
        self.processes_mut().find(|p| p.pid == pid)
    }
}

/// Which of its slot's processes a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Current,
    Successor,
    Retiring,
}

/// What the master expects of a process it has not reaped yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Serving or starting: its exit is a failure and its slot needs a new process.
    Serving,
    /// Replaced and draining: its exit is the expected end.
    Draining,
    /// Given up on as unresponsive and already replaced: killed, expected to die.
    Aborted,
}

/// A worker process not yet reaped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    pub slot: usize,
    pub fate: Fate,
    /// When it gets SIGKILL if it is still there.
    pub kill_at: Option<Instant>,
}

/// Declares [`Counters`] and what is done to all its fields at once.
macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// Counters the control socket reports. Carried over a live upgrade: a new master
        /// counts on from the totals of the one it replaced.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub(crate) struct Counters {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl Counters {
            /// Adds what `earlier` grew by to become `later`.
            pub fn add_growth(&mut self, earlier: &Counters, later: &Counters) {
                $(self.$field += later.$field.saturating_sub(earlier.$field);)*
            }
        }
    };
}

counters! {
    accepted,
    redispatched,
    dropped,
    accept_errors,
    protocol_errors,
    spawned,
    /// Replacements asked for by a limit, a rolling restart or a scale-down.
    recycled,
    /// Draining workers killed at the drain timeout.
    drain_kills,
    /// Workers aborted for sending nothing for the worker timeout.
    unresponsive,
    /// Times a slot entered a crash loop.
    crash_loops,
    /// Connections lost workers had acknowledged and not reported finished (an upper bound
    /// on the connections that died with them: reports lag).
    lost_with_worker,
    /// Connections workers refused for lack of fds (each went to another worker).
    refused,
    /// Held connections closed because their client had gone before a worker got them.
    abandoned,
    /// Workers given up on for not acknowledging a connection within the ack timeout.
    unacknowledged,
    /// Connections draining workers handed back at a request boundary, for another worker.
    handed_back,
    /// Connections handed back that the master refused and closed (see `HandBackRefused`).
    handbacks_refused,
}

/// What a frame from a worker told the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Something changed: acknowledgements, finished connections, its phase.
    News,
    /// Nothing new: a heartbeat, or a report repeating the last one.
    Repeat,
}

/// Why a worker is being given up on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Lost {
    #[error("its channel closed")]
    ChannelClosed,
    #[error("its channel failed")]
    Channel(#[source] ChannelError),
    #[error("it broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("it sent nothing (or no READY) for {0} ms")]
    Unresponsive(u64),
    #[error("it acknowledged no connection for {0} ms while it had some to acknowledge")]
    Unacknowledged(u64),
    #[error("it exited")]
    Exited,
}

impl Lost {
    /// A channel error as a reason: the end of the channel (EOF, `EPIPE`, `ECONNRESET`) is
    /// the worker going away, not a fault of the protocol.
    pub fn channel(error: ChannelError) -> Lost {
        if error.is_closed() {
            Lost::ChannelClosed
        } else {
            Lost::Channel(error)
        }
    }
}

/// The master's state.
#[derive(Debug)]
pub(crate) struct Table {
    pub config: Rc<Config>,
    /// Slots `0..workers` are in use; any beyond were removed and only drain.
    pub slots: Vec<Slot>,
    pub workers: usize,
    pub counters: Counters,
    pub stopping: bool,
    /// This master handed over to a new one (a live upgrade): connections its draining
    /// workers hand back go on to the new master ([`handback::Onward`]).
    pub onward: bool,
    /// Every worker process not yet reaped, including lost ones.
    pub live: HashMap<u32, Live>,
    /// Notified when workers can take connections again.
    pub capacity: Rc<Notify>,
    /// Notified when the last live process has been reaped.
    pub all_exited: Rc<Notify>,
    /// Wakes the lifecycle task: a replacement is wanted or one became ready.
    pub wake: Rc<Notify>,
    /// Wakes the task that releases copies acknowledged in memory
    /// ([`Table::awaiting_shared_acks`]).
    pub release: Rc<Notify>,
    /// `release` was woken and has not found every copy released yet.
    pub release_armed: std::cell::Cell<bool>,
    /// A rolling restart's queue: (slot, pid) still to replace.
    pub restart: VecDeque<(usize, u32)>,
    pub restart_batch: usize,
    pub restarting: bool,
    /// Connections the master holds (accepted, not yet acknowledged by a worker).
    held: HeldCount,
    /// Fds the master may spend on its worker slots and held connections (its fd limit less
    /// what it needs for itself; see `master::fd_room`).
    fd_room: usize,
    /// The most connections it may hold: [`Table::fd_room`] less [`FDS_PER_SLOT`] for each
    /// slot. At it, the master stops accepting and the kernel backlog waits.
    max_held: usize,
    /// `None` in the kernel modes, where workers accept for themselves.
    balancer: Option<Box<dyn Balance>>,
    candidates: Vec<Candidate>,
    /// Connections of lost workers, handed out again before anything new is accepted.
    retry: VecDeque<Pending>,
    next_id: u64,
    /// Scratch for [`Table::sync`].
    changed: Vec<(usize, u32, crate::ipc::frame::Status)>,
}

impl Table {
    pub fn new(config: Rc<Config>) -> Self {
        let slots = (0..config.workers)
            .map(|_| Slot::new(config.backoff.clone()))
            .collect();
        Table {
            balancer: config.strategy.balancer(),
            candidates: vec![Candidate::default(); config.workers],
            slots,
            workers: config.workers,
            counters: Counters::default(),
            stopping: false,
            onward: false,
            live: HashMap::new(),
            capacity: Rc::new(Notify::new()),
            all_exited: Rc::new(Notify::new()),
            wake: Rc::new(Notify::new()),
            release: Rc::new(Notify::new()),
            release_armed: std::cell::Cell::new(false),
            restart: VecDeque::new(),
            restart_batch: 1,
            restarting: false,
            held: HeldCount::default(),
            fd_room: usize::MAX,
            max_held: usize::MAX,
            retry: VecDeque::new(),
            next_id: 0,
            changed: Vec::new(),
            config,
        }
    }

    /// The balancer's view of each slot. A worker that has left connections unacknowledged
    /// for [`Config::ack_stall`] is busy or stuck: it gets nothing new until it acknowledges,
    /// so a stuck one holds only what it got before the stall showed, not `--max-pending`.
    fn refresh_candidates(&mut self) {
        let max_pending = self.config.max_pending;
        let stalled_before = Instant::now().checked_sub(self.config.ack_stall());
        for (candidate, slot) in self.candidates.iter_mut().zip(&self.slots) {
            *candidate = match &slot.process {
                Some(p) => Candidate {
                    eligible: p.eligible(max_pending) && !p.stalled(stalled_before),
                    load: p.active(),
                },
                None => Candidate::default(),
            };
        }
    }

    /// Whether a new connection may be accepted now: running, nothing waiting for
    /// re-dispatch, room under the fd budget, and some worker that can take it.
    pub fn can_accept(&self) -> bool {
        !self.stopping
            && self.balancer.is_some()
            && self.retry.is_empty()
            && self.held.get() < self.max_held
            && self
                .slots
                .iter()
                .filter_map(|s| s.process.as_ref())
                .any(|p| p.eligible(self.config.max_pending))
    }

    /// Whether some slot's process is ready (could take a connection once it has room).
    /// Whether every slot has a ready worker.
    pub fn all_ready(&self) -> bool {
        self.slots[..self.workers]
            .iter()
            .all(|s| s.process.as_ref().is_some_and(|p| p.phase == Phase::Ready))
    }

    pub fn any_ready(&self) -> bool {
        self.slots[..self.workers]
            .iter()
            .filter_map(|s| s.process.as_ref())
            .any(|p| p.phase == Phase::Ready)
    }

    /// Connections the master holds right now.
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// The most connections the master may hold.
    pub fn max_held(&self) -> usize {
        self.max_held
    }

    /// Sets the fds the master may spend on worker slots and held connections.
    pub fn set_fd_room(&mut self, room: usize) {
        self.fd_room = room;
        self.max_held = self.max_held_with(self.workers);
    }

    /// How many connections the master could hold with `workers` slots (0: none).
    pub fn max_held_with(&self, workers: usize) -> usize {
        self.fd_room.saturating_sub(FDS_PER_SLOT * workers)
    }

    /// Takes a freshly accepted connection and assigns it to a worker.
    pub fn accepted(&mut self, fd: OwnedFd, listener: u16, peer: Peer) {
        self.counters.accepted += 1;
        let id = self.next_id;
        self.next_id += 1;
        let conn = Pending {
            id,
            listener,
            peer,
            fd,
            prefix: Box::default(),
            _held: self.held.token(),
        };
        if let Err(conn) = self.assign(conn) {
            self.retry.push_back(conn);
        }
    }

    fn assign(&mut self, conn: Pending) -> Result<(), Pending> {
        self.refresh_candidates();
        let Some(index) = self
            .balancer
            .as_mut()
            .and_then(|b| b.pick(&self.candidates))
        else {
            return Err(conn);
        };
        let process = self.slots[index]
            .process
            .as_mut()
            .expect("eligible slots have a process");
        process.outbox.push_back(conn);
        process.assigned += 1;
        let limit_reached = process.retire.is_none()
            && process
                .limits
                .max_connections
                .is_some_and(|n| process.assigned >= n);
        if limit_reached {
            self.recycle(index, Reason::MaxConnections);
        }
        Ok(())
    }

    /// Hands connections of lost workers to the others, as far as they have room.
    pub fn redispatch(&mut self) {
        while let Some(conn) = self.retry.pop_front() {
            if let Err(conn) = self.assign(conn) {
                self.retry.push_front(conn);
                break;
            }
        }
    }

    /// Every process with something to send now (see [`Process::outgoing`]).
    pub fn outgoing(&mut self) -> impl Iterator<Item = (usize, &mut Process)> {
        self.slots.iter_mut().enumerate().flat_map(|(index, slot)| {
            slot.processes_mut()
                .filter(|p| p.wants_flush())
                .map(move |p| (index, p))
        })
    }

    /// Process `pid` of slot `index`, to change, wherever it is in the slot.
    pub fn find_mut(&mut self, index: usize, pid: u32) -> Option<&mut Process> {
        self.slots.get_mut(index)?.find_mut(pid)
    }

    /// Reads the totals the processes share in memory and applies those that changed as a
    /// STATUS frame would be; returns the processes whose totals broke the protocol.
    pub fn sync(&mut self) -> Vec<(usize, u32, Lost)> {
        let mut changed = std::mem::take(&mut self.changed);
        changed.clear();
        // With every connection it got finished, nothing of a process can move (it
        // received no more than was sent, finished no more than it received); in the kernel
        // modes it accepts for itself, so anything can.
        let idle_is_settled = self.balancer.is_some();
        for (index, slot) in self.slots.iter().enumerate() {
            for p in slot.processes() {
                if idle_is_settled && p.active() == 0 {
                    continue;
                }
                let Some(status) = p.shared_totals() else {
                    continue;
                };
                if (status.received_total, status.closed_total) != p.totals() {
                    changed.push((index, p.pid, status));
                }
            }
        }
        let mut broken = Vec::new();
        for &(index, pid, status) in &changed {
            if let Err(lost) = self.on_frame(index, pid, Frame::Status(status)) {
                broken.push((index, pid, lost));
            }
        }
        self.changed = changed;
        broken
    }

    /// [`Table::sync`] for process `pid` of slot `index` alone.
    pub fn sync_one(&mut self, index: usize, pid: u32) -> Result<(), Lost> {
        let Some(status) = self.find(index, pid).and_then(Process::shared_totals) else {
            return Ok(());
        };
        self.on_frame(index, pid, Frame::Status(status)).map(drop)
    }

    /// Whether some process acknowledges in memory connections the master still holds a
    /// copy of: no frame comes for those, so the master reads the counters a little later
    /// (`link::release`) rather than at its next accept, which may be far off.
    pub fn awaiting_shared_acks(&self) -> bool {
        self.slots
            .iter()
            .flat_map(Slot::processes)
            .any(Process::awaits_shared_ack)
    }

    /// Asks every process that shares its totals in memory and owes acknowledgements for a
    /// STATUS frame at its next change: the master is about to wait for progress.
    pub fn ask_for_reports(&self) {
        for slot in &self.slots {
            slot.processes().for_each(Process::ask_for_report);
        }
    }

    /// Applies a frame from worker `pid` of slot `index`.
    pub fn on_frame(&mut self, index: usize, pid: u32, frame: Frame) -> Result<Heard, Lost> {
        let at_budget = self.held.get() >= self.max_held;
        let heard = self.apply_frame(index, pid, frame);
        if at_budget && self.held.get() < self.max_held {
            // Acknowledged copies were closed: there is room to accept again.
            self.capacity.notify_waiters();
        }
        heard
    }

    fn apply_frame(&mut self, index: usize, pid: u32, frame: Frame) -> Result<Heard, Lost> {
        let max_pending = self.config.max_pending;
        let worker_accepts = self.balancer.is_none();
        let Some(process) = self.slots[index].find_mut(pid) else {
            return Ok(Heard::Repeat);
        };
        let now = Instant::now();
        process.last_heard = now;
        let was_eligible = process.eligible(max_pending);
        match frame {
            Frame::Ready => {
                if process.phase == Phase::Starting {
                    process.phase = Phase::Ready;
                    tracing::info!(worker = index, pid, "worker ready");
                    if self.slots[index]
                        .successor
                        .as_ref()
                        .is_some_and(|s| s.pid == pid)
                    {
                        self.take_over(index);
                    }
                    self.redispatch();
                    self.capacity.notify_waiters();
                    return Ok(Heard::News);
                }
                Ok(Heard::Repeat)
            }
            Frame::Status(status) => {
                let before = process.totals();
                process.apply_status(status, worker_accepts, now)?;
                let heard = if process.totals() == before {
                    Heard::Repeat
                } else {
                    Heard::News
                };
                if !was_eligible && process.eligible(max_pending) || !self.retry.is_empty() {
                    self.redispatch();
                    self.capacity.notify_waiters();
                }
                Ok(heard)
            }
            Frame::Draining(status) => {
                process.apply_status(status, worker_accepts, now)?;
                self.worker_draining(index, pid);
                Ok(Heard::News)
            }
            Frame::Refused { status, count } => {
                process.apply_status(status, worker_accepts, now)?;
                let refused = process.refuse(usize::from(count), now)?;
                if let Some(total) = process.refusals_to_log(now) {
                    tracing::warn!(
                        worker = index,
                        pid,
                        refused = total,
                        active = process.active(),
                        "worker out of file descriptors: its connections go to others"
                    );
                }
                self.counters.refused += refused.len() as u64;
                for conn in refused.into_iter().rev() {
                    self.retry.push_front(conn);
                }
                self.redispatch();
                self.capacity.notify_waiters();
                Ok(Heard::News)
            }
            other => Err(Lost::Protocol(ProtocolError(format!(
                "a worker sent a {} frame",
                other.name()
            )))),
        }
    }

    /// Process `pid` of slot `index`, wherever it is in the slot.
    pub fn find(&self, index: usize, pid: u32) -> Option<&Process> {
        self.slots.get(index)?.processes().find(|p| p.pid == pid)
    }

    /// Slot `index`'s successor is ready: it gets the slot's connections from now on and the
    /// process it replaces drains.
    fn take_over(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(successor) = slot.successor.take() else {
            return;
        };
        if let Some(old) = slot.process.replace(successor) {
            let reason = old.retire.unwrap_or(Reason::Restart);
            self.retire(index, old, reason);
        }
        self.wake.notify_one();
    }

    /// Asks for a replacement of slot `index`'s process (the lifecycle task starts it); the
    /// process keeps serving until the replacement is ready. Returns false if one was already
    /// asked for, or there is no process to replace.
    pub fn recycle(&mut self, index: usize, reason: Reason) -> bool {
        let now = Instant::now();
        let Some(process) = self.slots.get_mut(index).and_then(|s| s.process.as_mut()) else {
            return false;
        };
        if process.retire.is_some() || process.phase == Phase::Draining {
            return false;
        }
        process.retire = Some(reason);
        self.counters.recycled += 1;
        let (pid, usage, limits) = (process.pid, process.usage(now), process.limits);
        match reason {
            Reason::MaxConnections => tracing::info!(
                worker = index,
                pid,
                reason = %reason,
                connections = usage.connections,
                limit = limits.max_connections,
                "recycling worker"
            ),
            Reason::MaxRss => tracing::info!(
                worker = index,
                pid,
                reason = %reason,
                rss_kib = usage.rss.map(|b| b / 1024),
                limit_kib = limits.max_rss.map(|b| b / 1024),
                "recycling worker"
            ),
            Reason::MaxAge => tracing::info!(
                worker = index,
                pid,
                reason = %reason,
                age_ms = usage.age.as_millis() as u64,
                limit_ms = limits.max_age.map(|a| a.as_millis() as u64),
                "recycling worker"
            ),
            _ => tracing::info!(worker = index, pid, reason = %reason, "recycling worker"),
        }
        self.wake.notify_one();
        true
    }

    /// Worker `pid` said it is draining on its own. Its totals are final, so whatever it has
    /// not acknowledged goes to other workers whoever asked first. A ready worker that the
    /// master was not already draining leaves its slot at once (a starting successor takes
    /// its place) and drains like a replaced worker; the lifecycle task refills the slot,
    /// through the backoff when the worker lived only briefly. One that never said READY is
    /// left to its exit, which counts as a failure.
    fn worker_draining(&mut self, index: usize, pid: u32) {
        let stopping = self.stopping;
        let slot = &mut self.slots[index];
        let Some(process) = slot.find_mut(pid) else {
            return;
        };
        let orphans = process.take_orphans();
        let hand_over = process.phase == Phase::Ready && !stopping;
        self.counters.redispatched += orphans.len() as u64;
        for conn in orphans.into_iter().rev() {
            self.retry.push_front(conn);
        }
        if hand_over && slot.process.as_ref().is_some_and(|p| p.pid == pid) {
            let process = slot.process.take().expect("checked above");
            slot.process = slot.successor.take();
            slot.handover = Some(process.started.elapsed());
            self.retire(index, process, Reason::WorkerDraining);
            self.wake.notify_one();
        }
        self.redispatch();
        self.capacity.notify_waiters();
    }

    /// Moves `process` to slot `index`'s retiring list, draining: no new connections, the
    /// channel's sending side closed once its outbox is sent (by the next flush), killed if
    /// it is still there after the drain timeout.
    fn retire(&mut self, index: usize, mut process: Process, reason: Reason) {
        process.phase = Phase::Draining;
        process.retire = Some(reason);
        process.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        tracing::info!(
            worker = index,
            pid = process.pid,
            reason = %reason,
            active = process.active(),
            "worker draining"
        );
        if let Some(live) = self.live.get_mut(&process.pid) {
            live.fate = Fate::Draining;
        }
        self.slots[index].retiring.push(process);
    }

    /// Removes process `pid` of slot `index` wherever it is, and queues every connection it
    /// had not acknowledged for another worker. If it was the slot's process, a starting
    /// successor takes its place. Returns what it was, or `None` if it was already gone.
    pub fn lose(&mut self, index: usize, pid: u32, why: &Lost) -> Option<Role> {
        let slot = self.slots.get_mut(index)?;
        let (role, mut process) = if slot.process.as_ref().is_some_and(|p| p.pid == pid) {
            let process = slot.process.take().expect("checked above");
            slot.process = slot.successor.take();
            (Role::Current, process)
        } else if slot.successor.as_ref().is_some_and(|p| p.pid == pid) {
            (
                Role::Successor,
                slot.successor.take().expect("checked above"),
            )
        } else {
            let at = slot.retiring.iter().position(|p| p.pid == pid)?;
            (Role::Retiring, slot.retiring.swap_remove(at))
        };
        let orphans = process.pending();
        let owned = process.owned();
        self.counters.lost_with_worker = self.counters.lost_with_worker.saturating_add(owned);
        let ending = matches!(why, Lost::Exited | Lost::ChannelClosed);
        match why {
            _ if ending && process.phase == Phase::Draining && owned == 0 => {
                tracing::info!(worker = index, pid, orphans, "worker drained")
            }
            _ if ending && process.phase == Phase::Draining => tracing::warn!(
                worker = index,
                pid,
                orphans,
                owned,
                "worker ended before finishing its connections"
            ),
            Lost::Exited => tracing::debug!(worker = index, pid, orphans, owned, "worker gone"),
            _ => {
                tracing::warn!(worker = index, pid, reason = %why, source = ?std::error::Error::source(why), orphans, owned, "worker lost")
            }
        }
        if matches!(why, Lost::Protocol(_) | Lost::Channel(_)) {
            self.counters.protocol_errors += 1;
        }
        // Oldest first, so re-dispatch keeps accept order.
        let orphaned = process.take_orphans();
        self.counters.redispatched += orphaned.len() as u64;
        for conn in orphaned.into_iter().rev() {
            self.retry.push_front(conn);
        }
        self.redispatch();
        if self.stopping {
            // Every worker is draining: nobody can take these any more.
            self.drop_undeliverable();
        }
        Some(role)
    }

    /// Whether slot `index` is in use and lacks a process it should start now: none at all,
    /// or a successor for a process being replaced.
    pub fn wants_start(&self, index: usize) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        !self.stopping
            && index < self.workers
            && slot.successor.is_none()
            && slot
                .process
                .as_ref()
                .is_none_or(|p| p.retire.is_some() && p.phase != Phase::Draining)
    }

    /// Adds a worker slot (reusing the first removed one); returns its index.
    pub fn add_slot(&mut self) -> usize {
        let index = self.workers;
        self.workers += 1;
        self.max_held = self.max_held_with(self.workers);
        if self.slots.len() < self.workers {
            self.slots.push(Slot::new(self.config.backoff.clone()));
            self.candidates.push(Candidate::default());
        }
        index
    }

    /// Removes the last worker slot, draining its processes; never the last one. Returns the
    /// removed index.
    pub fn remove_slot(&mut self) -> Option<usize> {
        if self.workers <= 1 {
            return None;
        }
        self.workers -= 1;
        self.max_held = self.max_held_with(self.workers);
        let index = self.workers;
        let slot = &mut self.slots[index];
        slot.respawn_at = None;
        let leaving: Vec<Process> = slot
            .process
            .take()
            .into_iter()
            .chain(slot.successor.take())
            .collect();
        for process in leaving {
            self.retire(index, process, Reason::ScaleDown);
        }
        // Connections assigned to it and not yet sent go with it: it still serves them.
        Some(index)
    }

    /// Drops connections nobody can take any more (every worker is gone while stopping).
    pub fn drop_undeliverable(&mut self) {
        if !self.retry.is_empty() {
            tracing::warn!(
                count = self.retry.len(),
                "closing connections no worker can take"
            );
            self.counters.dropped += self.retry.len() as u64;
            self.retry.clear();
        }
    }

    /// Connections accepted and not yet handed to a live worker.
    pub fn retry_len(&self) -> usize {
        self.retry.len()
    }

    /// Closes the held connections whose client has `gone` before any worker got them
    /// (those waiting for re-dispatch, and outboxes not sent yet); returns how many.
    pub fn drop_abandoned(&mut self, gone: impl Fn(&OwnedFd) -> bool) -> usize {
        let before = self.retry.len();
        self.retry.retain(|c| !gone(&c.fd));
        let mut dropped = before - self.retry.len();
        for slot in &mut self.slots {
            dropped += slot
                .processes_mut()
                .map(|p| p.drop_abandoned(&gone))
                .sum::<usize>();
        }
        self.counters.abandoned += dropped as u64;
        if dropped > 0 {
            self.redispatch();
            self.capacity.notify_waiters();
        }
        dropped
    }

    /// Lets workers that refused connections before `cutoff` have connections again; true
    /// if any may (the caller re-dispatches and wakes the accept loops).
    pub fn end_full_pauses(&mut self, cutoff: Instant) -> bool {
        let mut any = false;
        for slot in &mut self.slots {
            if let Some(p) = slot.process.as_mut() {
                any |= p.end_full_pause(cutoff);
            }
        }
        if any {
            self.redispatch();
            self.capacity.notify_waiters();
        }
        any
    }

    /// Marks every process draining (the master is stopping): no new connections; the
    /// channel's sending side is closed once its outbox is sent. The shutdown timeout, not
    /// the drain timeout, bounds them now.
    pub fn drain_all(&mut self) {
        for slot in &mut self.slots {
            for p in slot.processes_mut() {
                p.phase = Phase::Draining;
                p.retire.get_or_insert(Reason::Shutdown);
                p.drain_deadline = None;
                if let Some(live) = self.live.get_mut(&p.pid) {
                    live.fate = Fate::Draining;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
