//! The master's worker table and the dispatch path: which worker gets a connection, the
//! per-worker outbox (accepted, not yet sent) and unacknowledged list (sent, copy kept until
//! the worker confirms receipt), batching into `sendmsg`, acknowledgements and load reports,
//! and re-dispatch when a worker is lost. Single-threaded: it lives in the master's one
//! thread behind an `Rc<RefCell<..>>` and never holds a borrow across an `.await`.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::balance::{Balance, Candidate};
use crate::config::Config;
use crate::ipc::frame::{self, ConnectionHeader, Frame, Status};
use crate::ipc::{Channel, ChannelError};
use crate::supervise::Backoff;
use crate::sys::scm::MAX_FDS;
use crate::sys::socket::Peer;

/// An accepted connection the master still holds.
#[derive(Debug)]
pub(crate) struct Pending {
    pub id: u64,
    pub listener: u16,
    pub peer: Peer,
    pub fd: OwnedFd,
}

impl Pending {
    fn header(&self) -> ConnectionHeader {
        ConnectionHeader {
            id: self.id,
            listener: self.listener,
            peer: self.peer,
        }
    }
}

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Phase {
    /// Started, has not said ready: gets no connections yet.
    Starting,
    /// Gets connections.
    Ready,
    /// Gets no new connections; finishing what it has.
    Draining,
}

/// A running worker process and the master's view of it.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: u32,
    pub channel: Rc<Channel>,
    pub phase: Phase,
    pub started: Instant,
    pub last_heard: Instant,
    /// Accepted for this worker, not yet sent.
    outbox: VecDeque<Pending>,
    /// Sent, not yet acknowledged; the master's copy keeps the connection alive.
    unacked: VecDeque<Pending>,
    /// Connections assigned to it (outbox + sent).
    assigned: u64,
    /// Connections sent on the channel.
    sent: u64,
    /// Connections it acknowledged.
    received: u64,
    /// Connections it reported finished.
    closed: u64,
    write_blocked: bool,
    sending_closed: bool,
    /// Wakes the task that waits for the channel to become writable.
    pub writer: Rc<Notify>,
    /// The tasks reading and writing its channel, stopped when it is lost.
    pub tasks: Vec<tokio::task::AbortHandle>,
}

impl Process {
    pub fn new(pid: u32, channel: Channel) -> Self {
        let now = Instant::now();
        Process {
            pid,
            channel: Rc::new(channel),
            phase: Phase::Starting,
            started: now,
            last_heard: now,
            outbox: VecDeque::new(),
            unacked: VecDeque::new(),
            assigned: 0,
            sent: 0,
            received: 0,
            closed: 0,
            write_blocked: false,
            sending_closed: false,
            writer: Rc::new(Notify::new()),
            tasks: Vec::new(),
        }
    }

    /// Connections handed to it and not finished: the load balancers compare.
    pub fn active(&self) -> u64 {
        self.assigned - self.closed
    }

    /// Connections the master still holds for it.
    pub fn pending(&self) -> usize {
        self.outbox.len() + self.unacked.len()
    }
}

/// One worker slot: a process when one runs, and its respawn schedule.
#[derive(Debug)]
pub(crate) struct Slot {
    pub process: Option<Process>,
    pub spawns: u64,
    pub backoff: Backoff,
}

/// Counters the control socket reports.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Counters {
    pub accepted: u64,
    pub redispatched: u64,
    pub dropped: u64,
    pub accept_errors: u64,
    pub protocol_errors: u64,
    pub spawned: u64,
}

/// Why a worker is being given up on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Lost {
    #[error("its channel closed")]
    ChannelClosed,
    #[error("its channel failed")]
    Channel(#[source] ChannelError),
    #[error("it broke the protocol: {0}")]
    Protocol(String),
    #[error("it exited")]
    Exited,
}

/// The result of trying to send a worker's outbox.
#[derive(Debug)]
pub(crate) enum Flush {
    Done,
    Blocked,
    Broken(io::Error),
}

/// The master's state.
#[derive(Debug)]
pub(crate) struct Table {
    pub config: Rc<Config>,
    pub slots: Vec<Slot>,
    pub counters: Counters,
    pub stopping: bool,
    /// Pids of every worker process not yet reaped, including lost ones.
    pub live: HashSet<u32>,
    /// Notified when workers can take connections again.
    pub capacity: Rc<Notify>,
    /// Notified when the last live process has been reaped.
    pub all_exited: Rc<Notify>,
    /// `None` in the kernel modes, where workers accept for themselves.
    balancer: Option<Box<dyn Balance>>,
    candidates: Vec<Candidate>,
    /// Connections of lost workers, handed out again before anything new is accepted.
    retry: VecDeque<Pending>,
    next_id: u64,
    frame: Vec<u8>,
    fds: Vec<RawFd>,
}

impl Table {
    pub fn new(config: Rc<Config>) -> Self {
        let slots = (0..config.workers)
            .map(|_| Slot {
                process: None,
                spawns: 0,
                backoff: config.backoff.clone(),
            })
            .collect();
        Table {
            balancer: config.strategy.balancer(),
            candidates: vec![Candidate::default(); config.workers],
            slots,
            counters: Counters::default(),
            stopping: false,
            live: HashSet::new(),
            capacity: Rc::new(Notify::new()),
            all_exited: Rc::new(Notify::new()),
            retry: VecDeque::new(),
            next_id: 0,
            frame: Vec::with_capacity(frame::MAX_FRAME_LEN),
            fds: Vec::with_capacity(MAX_FDS),
            config,
        }
    }

    fn eligible(&self, process: &Process) -> bool {
        process.phase == Phase::Ready && process.pending() < self.config.max_pending
    }

    fn refresh_candidates(&mut self) {
        for (candidate, slot) in self.candidates.iter_mut().zip(&self.slots) {
            *candidate = match &slot.process {
                Some(p) => Candidate {
                    eligible: p.phase == Phase::Ready && p.pending() < self.config.max_pending,
                    load: p.active(),
                },
                None => Candidate::default(),
            };
        }
    }

    /// Whether a new connection may be accepted now: running, nothing waiting for
    /// re-dispatch, and some worker below its pending limit.
    pub fn can_accept(&self) -> bool {
        !self.stopping
            && self.balancer.is_some()
            && self.retry.is_empty()
            && self
                .slots
                .iter()
                .filter_map(|s| s.process.as_ref())
                .any(|p| self.eligible(p))
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

    /// Sends every worker's outbox that can be sent now; returns the workers whose channel
    /// broke.
    pub fn flush_all(&mut self) -> Vec<(usize, u32, io::Error)> {
        let mut broken = Vec::new();
        for index in 0..self.slots.len() {
            let Some(process) = self.slots[index].process.as_ref() else {
                continue;
            };
            if process.write_blocked
                || (process.outbox.is_empty() && !self.wants_sending_closed(process))
            {
                continue;
            }
            let pid = process.pid;
            if let Flush::Broken(e) = self.flush(index) {
                broken.push((index, pid, e));
            }
        }
        broken
    }

    fn wants_sending_closed(&self, process: &Process) -> bool {
        process.phase == Phase::Draining && !process.sending_closed
    }

    /// Sends slot `index`'s outbox in batches of up to 253 fds per `sendmsg`; once a
    /// draining worker's outbox is empty, closes the sending side so it reads the end.
    pub fn flush(&mut self, index: usize) -> Flush {
        let Table {
            slots, frame, fds, ..
        } = self;
        let Some(process) = slots[index].process.as_mut() else {
            return Flush::Done;
        };
        process.write_blocked = false;
        while !process.outbox.is_empty() {
            let batch = process.outbox.len().min(MAX_FDS);
            frame::encode_connections(
                frame,
                process.outbox.iter().take(batch).map(Pending::header),
            );
            fds.clear();
            fds.extend(process.outbox.iter().take(batch).map(|c| c.fd.as_raw_fd()));
            match process.channel.try_send(frame, fds) {
                Ok(()) => {
                    process.unacked.extend(process.outbox.drain(..batch));
                    process.sent += batch as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    process.write_blocked = true;
                    process.writer.notify_one();
                    return Flush::Blocked;
                }
                Err(e) => return Flush::Broken(e),
            }
        }
        if process.phase == Phase::Draining && !process.sending_closed {
            process.sending_closed = true;
            if let Err(e) = process.channel.close_sending() {
                return Flush::Broken(e);
            }
        }
        Flush::Done
    }

    /// Applies a frame from the worker in slot `index`.
    pub fn on_frame(&mut self, index: usize, frame: Frame) -> Result<(), Lost> {
        let max_pending = self.config.max_pending;
        let Some(process) = self.slots[index].process.as_mut() else {
            return Ok(());
        };
        process.last_heard = Instant::now();
        let was_full = process.pending() >= max_pending;
        match frame {
            Frame::Ready => {
                if process.phase == Phase::Starting {
                    process.phase = Phase::Ready;
                    tracing::info!(worker = index, pid = process.pid, "worker ready");
                    self.redispatch();
                    self.capacity.notify_waiters();
                }
                Ok(())
            }
            Frame::Status(status) => {
                apply_status(process, status, self.balancer.is_none())?;
                if was_full && process.pending() < max_pending || !self.retry.is_empty() {
                    self.redispatch();
                    self.capacity.notify_waiters();
                }
                Ok(())
            }
            other => Err(Lost::Protocol(format!(
                "a worker sent a {} frame",
                other.name()
            ))),
        }
    }

    /// Removes the process of slot `index` if it is still `pid`, and queues every
    /// connection it had not acknowledged for another worker. Returns whether it was there.
    pub fn lose(&mut self, index: usize, pid: u32, why: &Lost) -> bool {
        let slot = &mut self.slots[index];
        if slot.process.as_ref().is_none_or(|p| p.pid != pid) {
            return false;
        }
        let process = slot.process.take().expect("checked above");
        process
            .tasks
            .iter()
            .for_each(tokio::task::AbortHandle::abort);
        let orphans = process.unacked.len() + process.outbox.len();
        match why {
            Lost::Exited => tracing::debug!(worker = index, pid, "worker gone"),
            Lost::ChannelClosed if process.phase == Phase::Draining => {
                tracing::debug!(
                    worker = index,
                    pid,
                    orphans,
                    "drained worker closed its channel"
                )
            }
            _ => {
                tracing::warn!(worker = index, pid, reason = %why, source = ?std::error::Error::source(why), orphans, "worker lost")
            }
        }
        if matches!(why, Lost::Protocol(_) | Lost::Channel(_)) {
            self.counters.protocol_errors += 1;
        }
        // Oldest first, so re-dispatch keeps accept order.
        let mut orphaned: Vec<Pending> =
            process.unacked.into_iter().chain(process.outbox).collect();
        orphaned.sort_by_key(|c| c.id);
        self.counters.redispatched += orphaned.len() as u64;
        for conn in orphaned.into_iter().rev() {
            self.retry.push_front(conn);
        }
        self.redispatch();
        true
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

    /// Marks every process draining: no new connections; the channel's sending side is
    /// closed once its outbox is sent.
    pub fn drain_all(&mut self) {
        for slot in &mut self.slots {
            if let Some(p) = slot.process.as_mut() {
                p.phase = Phase::Draining;
            }
        }
    }
}

/// Checks a worker's report against what it was sent and releases acknowledged copies. In
/// the kernel modes the worker accepts itself, so its count of received connections is what
/// it was "sent".
fn apply_status(process: &mut Process, status: Status, worker_accepts: bool) -> Result<(), Lost> {
    if worker_accepts && status.received_total >= process.sent {
        process.sent = status.received_total;
        process.assigned = status.received_total;
    }
    if status.received_total > process.sent || status.received_total < process.received {
        return Err(Lost::Protocol(format!(
            "status says {} received; {} were sent and {} acknowledged before",
            status.received_total, process.sent, process.received
        )));
    }
    if status.closed_total > status.received_total || status.closed_total < process.closed {
        return Err(Lost::Protocol(format!(
            "status says {} finished of {} received; {} were finished before",
            status.closed_total, status.received_total, process.closed
        )));
    }
    // received <= sent, so these are exactly the oldest unacknowledged copies (none in the
    // kernel modes). Dropping them closes the master's fds.
    let newly = (status.received_total - process.received) as usize;
    process.unacked.drain(..newly.min(process.unacked.len()));
    process.received = status.received_total;
    process.closed = status.closed_total;
    Ok(())
}

/// The control socket's view of one slot.
#[derive(Debug, serde::Serialize)]
pub(crate) struct SlotReport {
    pub worker: usize,
    pub pid: Option<u32>,
    pub phase: Option<Phase>,
    pub active: u64,
    pub pending: usize,
    pub assigned: u64,
    pub finished: u64,
    pub spawns: u64,
    pub failures: u32,
    pub uptime_ms: u64,
}

impl Table {
    pub fn report(&self) -> Vec<SlotReport> {
        self.slots
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
                    assigned: p.map_or(0, |p| p.assigned),
                    finished: p.map_or(0, |p| p.closed),
                    spawns: slot.spawns,
                    failures: slot.backoff.failures(),
                    uptime_ms: p.map_or(0, |p| p.started.elapsed().as_millis() as u64),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Strategy;
    use crate::sys::socket::seqpacket_pair;

    fn table(workers: usize, max_pending: usize) -> (Table, Vec<OwnedFd>) {
        let config = Config {
            workers,
            max_pending,
            strategy: Strategy::RoundRobin,
            ..Config::default()
        };
        let mut table = Table::new(Rc::new(config));
        let mut worker_ends = Vec::new();
        for (i, slot) in table.slots.iter_mut().enumerate() {
            let (master, worker) = seqpacket_pair().unwrap();
            let mut p = Process::new(1000 + i as u32, Channel::new(master).unwrap());
            p.phase = Phase::Ready;
            slot.process = Some(p);
            worker_ends.push(worker);
        }
        (table, worker_ends)
    }

    fn connection() -> OwnedFd {
        seqpacket_pair().unwrap().0
    }

    #[tokio::test]
    async fn stops_accepting_at_the_pending_cap_and_resumes_on_ack() {
        let (mut t, _ends) = table(2, 3);
        for _ in 0..6 {
            assert!(t.can_accept());
            t.accepted(connection(), 0, Peer::Unix);
        }
        assert!(!t.can_accept(), "both workers at their cap of 3");
        assert!(t.flush_all().is_empty());
        t.on_frame(
            0,
            Frame::Status(Status {
                received_total: 2,
                closed_total: 0,
            }),
        )
        .unwrap();
        assert!(t.can_accept());
        assert_eq!(t.slots[0].process.as_ref().unwrap().pending(), 1);
    }

    #[tokio::test]
    async fn a_lost_worker_s_unacknowledged_connections_go_to_another() {
        let (mut t, _ends) = table(2, 10);
        for _ in 0..4 {
            t.accepted(connection(), 0, Peer::Unix);
        }
        assert!(t.flush_all().is_empty());
        t.on_frame(
            0,
            Frame::Status(Status {
                received_total: 1,
                closed_total: 0,
            }),
        )
        .unwrap();
        assert!(t.lose(0, 1000, &Lost::ChannelClosed));
        let survivor = t.slots[1].process.as_ref().unwrap();
        assert_eq!(
            survivor.pending(),
            3,
            "its own 2 plus the dead worker's 1 unacknowledged"
        );
        assert_eq!(t.counters.redispatched, 1);
        assert!(!t.lose(0, 1000, &Lost::Exited), "losing twice is a no-op");
    }

    #[tokio::test]
    async fn a_status_acknowledging_unsent_connections_is_a_protocol_error() {
        let (mut t, _ends) = table(1, 10);
        t.accepted(connection(), 0, Peer::Unix);
        let err = t
            .on_frame(
                0,
                Frame::Status(Status {
                    received_total: 5,
                    closed_total: 0,
                }),
            )
            .unwrap_err();
        assert!(matches!(err, Lost::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn a_status_finishing_more_than_received_is_a_protocol_error() {
        let (mut t, _ends) = table(1, 10);
        t.accepted(connection(), 0, Peer::Unix);
        t.flush_all();
        let err = t
            .on_frame(
                0,
                Frame::Status(Status {
                    received_total: 1,
                    closed_total: 2,
                }),
            )
            .unwrap_err();
        assert!(matches!(err, Lost::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn a_worker_sending_connections_is_a_protocol_error() {
        let (mut t, _ends) = table(1, 10);
        let err = t.on_frame(0, Frame::Connections(Vec::new())).unwrap_err();
        assert!(matches!(err, Lost::Protocol(_)));
    }

    #[tokio::test]
    async fn load_counts_assigned_minus_finished() {
        let (mut t, _ends) = table(1, 10);
        for _ in 0..3 {
            t.accepted(connection(), 0, Peer::Unix);
        }
        t.flush_all();
        t.on_frame(
            0,
            Frame::Status(Status {
                received_total: 3,
                closed_total: 2,
            }),
        )
        .unwrap();
        let p = t.slots[0].process.as_ref().unwrap();
        assert_eq!((p.active(), p.pending()), (1, 0));
    }

    #[tokio::test]
    async fn with_no_worker_ready_connections_wait_for_redispatch() {
        let (mut t, _ends) = table(1, 10);
        t.slots[0].process.as_mut().unwrap().phase = Phase::Starting;
        assert!(!t.can_accept());
        t.accepted(connection(), 0, Peer::Unix);
        assert_eq!(t.retry_len(), 1);
        t.on_frame(0, Frame::Ready).unwrap();
        assert_eq!(t.retry_len(), 0);
    }
}
