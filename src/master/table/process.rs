//! One worker process as the master sees it: where it is in its life, the connections held
//! for it (outbox: accepted, not yet sent; unacknowledged: sent, the master's copy kept until
//! the worker confirms receipt), its counters and its own recycling limits. No I/O: it says
//! what to send next ([`Process::outgoing`]) and is told what was sent; the master's
//! `link` room does the sending, and the [`Table`](super::Table) decides who gets what.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::ipc::frame::{ConnectionHeader, Status};
use crate::supervise::recycle::{Limits, Reason, Usage};
use crate::sys::shm::Counters;
use crate::sys::socket::Peer;

/// How often a worker that keeps refusing connections is logged, at most.
const REFUSAL_LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// An accepted connection the master still holds.
#[derive(Debug)]
pub(crate) struct Pending {
    pub id: u64,
    pub listener: u16,
    pub peer: Peer,
    pub fd: OwnedFd,
    /// Bytes a worker read from it before handing it back, for the next worker to take as
    /// the first ones read (empty for a connection as accepted).
    pub prefix: Box<[u8]>,
    /// Counts it among the connections the master holds, while it lives.
    pub _held: Held,
}

/// How many connections (fds) the master holds, wherever they are: one [`Held`] token per
/// live [`Pending`], so no path that drops a connection can forget to count it.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldCount(Rc<Cell<usize>>);

impl HeldCount {
    pub fn get(&self) -> usize {
        self.0.get()
    }

    /// A token counted until it is dropped.
    pub fn token(&self) -> Held {
        self.0.set(self.0.get() + 1);
        Held(self.0.clone())
    }
}

/// One connection counted in a [`HeldCount`].
#[derive(Debug)]
pub(crate) struct Held(Rc<Cell<usize>>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Pending {
    /// What the worker is told about it.
    pub fn header(&self) -> ConnectionHeader {
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

/// A worker broke the protocol: what it claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ProtocolError(pub String);

/// What a process's channel should carry next.
#[derive(Debug)]
pub(crate) enum Outgoing<'a> {
    /// Nothing now.
    Nothing,
    /// These connections, oldest first, in one CONNECTIONS frame; then [`Process::sent`].
    Connections(&'a [Pending]),
    /// This one connection and the bytes read from it before it was handed back, in a
    /// HANDBACK frame; then [`Process::sent`] of 1.
    HandBack(&'a Pending),
    /// The end: a draining process's outbox is empty, so its channel's sending side
    /// closes; then [`Process::ended`].
    End,
}

/// A running worker process and the master's view of it.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: u32,
    pub phase: Phase,
    pub started: Instant,
    pub last_heard: Instant,
    /// This process's own (jittered) recycling limits.
    pub limits: Limits,
    /// Why it is being replaced: set when its replacement is asked for, kept while it drains.
    pub retire: Option<Reason>,
    /// When a draining process is killed if it has not exited (none while the master stops:
    /// the shutdown timeout rules then).
    pub drain_deadline: Option<Instant>,
    /// Its resident set in bytes, when last read.
    pub rss: Option<u64>,
    /// Since when it has held connections unacknowledged without making progress
    /// (acknowledging or finishing any).
    pub(super) ack_wait_since: Option<Instant>,
    /// It refused connections for lack of fds: it gets none until it reports one finished
    /// (or the lifecycle task's pause is over).
    pub(super) full_since: Option<Instant>,
    /// Connections it refused, all told (REFUSED frames).
    refused_total: u64,
    /// Connections it refused since the last log line about it, and when that was.
    refused_unlogged: u64,
    refusal_logged: Option<Instant>,
    /// Accepted for this worker, not yet sent.
    pub(super) outbox: VecDeque<Pending>,
    /// Sent, not yet acknowledged; the master's copy keeps the connection alive.
    pub(super) unacked: VecDeque<Pending>,
    /// Connections assigned to it (outbox + sent).
    pub(super) assigned: u64,
    /// Connections sent on the channel.
    sent: u64,
    /// Connections it acknowledged.
    pub(super) received: u64,
    /// Connections it reported finished.
    pub(super) closed: u64,
    /// Connections it handed back (draining, at a request boundary).
    pub(super) handed_back: u64,
    /// Connections it handed back that the master refused.
    pub(super) handbacks_refused: u64,
    /// Its channel is full: nothing is sent until it is writable again.
    write_blocked: bool,
    sending_closed: bool,
    /// The totals it keeps in shared memory, once it sent them (COUNTERS).
    counters: Option<Counters>,
}

impl Process {
    pub fn new(pid: u32) -> Self {
        let now = Instant::now();
        Process {
            pid,
            phase: Phase::Starting,
            started: now,
            last_heard: now,
            limits: Limits::default(),
            retire: None,
            drain_deadline: None,
            rss: None,
            ack_wait_since: None,
            full_since: None,
            refused_total: 0,
            refused_unlogged: 0,
            refusal_logged: None,
            outbox: VecDeque::new(),
            unacked: VecDeque::new(),
            assigned: 0,
            sent: 0,
            received: 0,
            closed: 0,
            handed_back: 0,
            handbacks_refused: 0,
            write_blocked: false,
            sending_closed: false,
            counters: None,
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

    /// Connections it acknowledged and has not reported finished: what dies with it.
    pub fn owned(&self) -> u64 {
        self.received - self.closed
    }

    /// Connections handed to it so far.
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub fn assigned(&self) -> u64 {
        self.assigned
    }

    /// Connections it reported finished.
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub fn finished(&self) -> u64 {
        self.closed
    }

    /// Connections sent on its channel (less those it refused).
    pub fn sent_total(&self) -> u64 {
        self.sent
    }

    /// Connections it handed back.
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub fn handed_back(&self) -> u64 {
        self.handed_back
    }

    /// Its acknowledged and finished totals, as last reported.
    pub fn totals(&self) -> (u64, u64) {
        (self.received, self.closed)
    }

    /// What the recycling limits are checked against.
    pub fn usage(&self, now: Instant) -> Usage {
        Usage {
            age: now.saturating_duration_since(self.started),
            connections: self.assigned,
            rss: self.rss,
        }
    }

    /// Whether there is something to send now: its outbox, or the end of a draining
    /// worker's channel.
    pub fn wants_flush(&self) -> bool {
        !self.write_blocked
            && (!self.outbox.is_empty() || (self.phase == Phase::Draining && !self.sending_closed))
    }

    /// What to send next, in batches of at most `batch` connections.
    pub fn outgoing(&mut self, batch: usize) -> Outgoing<'_> {
        if self.write_blocked {
            Outgoing::Nothing
        } else if !self.outbox.is_empty() {
            let queued = self.outbox.make_contiguous();
            if !queued[0].prefix.is_empty() {
                return Outgoing::HandBack(&queued[0]);
            }
            // A batch stops at a connection with bytes: that one travels on its own.
            let len = queued
                .iter()
                .take(batch)
                .take_while(|c| c.prefix.is_empty())
                .count();
            Outgoing::Connections(&queued[..len])
        } else if self.phase == Phase::Draining && !self.sending_closed {
            Outgoing::End
        } else {
            Outgoing::Nothing
        }
    }

    /// The oldest `count` connections of its outbox went out at `now`: the master keeps its
    /// copies until the worker acknowledges them.
    pub fn sent(&mut self, count: usize, now: Instant) {
        if self.unacked.is_empty() {
            self.ack_wait_since = Some(now);
        }
        self.unacked.extend(self.outbox.drain(..count));
        self.sent += count as u64;
    }

    /// Its channel's sending side was closed.
    pub fn ended(&mut self) {
        self.sending_closed = true;
    }

    /// Its channel is full: nothing more until [`Process::writable`].
    pub fn blocked(&mut self) {
        self.write_blocked = true;
    }

    /// Its channel can take frames again.
    pub fn writable(&mut self) {
        self.write_blocked = false;
    }

    /// It shares its totals in memory from now on: its reports may then lag behind them.
    pub fn attach_counters(&mut self, counters: Counters) {
        self.counters = Some(counters);
    }

    /// Whether the master keeps copies of connections it sent that the worker acknowledges
    /// in memory: nothing wakes the master for those, so it reads the counters after a while.
    pub fn awaits_shared_ack(&self) -> bool {
        self.counters.is_some() && !self.unacked.is_empty()
    }

    /// Whether it shares its totals in memory.
    pub fn shares_counters(&self) -> bool {
        self.counters.is_some()
    }

    /// Its totals as it keeps them in shared memory now, if it does and they can be taken
    /// as they are (no REFUSED frame is on its way).
    pub fn shared_totals(&self) -> Option<Status> {
        let region = self.counters.as_ref()?.region();
        // Finished before received: a finished connection was received first, so the
        // totals read this way never show more finished than received.
        let closed_total = region.closed.load(Ordering::SeqCst);
        let received_total = region.received.load(Ordering::SeqCst);
        // Read last: a refusal the master has not had the REFUSED frame of yet may hide
        // among the received ones; wait for the frame.
        if region.refused.load(Ordering::SeqCst) > self.refused_total {
            return None;
        }
        Some(Status {
            received_total,
            closed_total,
        })
    }

    /// Asks it for a STATUS frame at its next change, if it shares its totals in memory and
    /// holds connections unacknowledged: the master is about to wait for its progress.
    pub fn ask_for_report(&self) {
        if let Some(counters) = &self.counters {
            if !self.unacked.is_empty() {
                counters.region().wake.0.store(1, Ordering::SeqCst);
            }
        }
    }

    /// Checks a report against what it was sent and releases acknowledged copies. In the
    /// kernel modes the worker accepts itself, so its count of received connections is what
    /// it was "sent".
    pub fn apply_status(
        &mut self,
        status: Status,
        worker_accepts: bool,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let status = match &self.counters {
            // A frame may be older than what the master last read from memory.
            Some(_) => Status {
                received_total: status.received_total.max(self.received),
                closed_total: status.closed_total.max(self.closed),
            },
            None => status,
        };
        if worker_accepts && status.received_total >= self.sent {
            self.sent = status.received_total;
            self.assigned = status.received_total;
        }
        if status.received_total > self.sent || status.received_total < self.received {
            return Err(ProtocolError(format!(
                "status says {} received; {} were sent and {} acknowledged before",
                status.received_total, self.sent, self.received
            )));
        }
        if status.closed_total > status.received_total || status.closed_total < self.closed {
            return Err(ProtocolError(format!(
                "status says {} finished of {} received; {} were finished before",
                status.closed_total, status.received_total, self.closed
            )));
        }
        // received <= sent, so these are exactly the oldest unacknowledged copies (none in
        // the kernel modes). Dropping them closes the master's fds.
        let newly = (status.received_total - self.received) as usize;
        self.unacked.drain(..newly.min(self.unacked.len()));
        let finished = status.closed_total > self.closed;
        if newly > 0 || finished {
            // Progress: a worker that finishes connections is busy, not stuck, even while
            // its acknowledgements wait behind its work.
            self.ack_wait_since = (!self.unacked.is_empty()).then_some(now);
        }
        if finished {
            // Something finished: it has an fd to spare again.
            self.full_since = None;
        }
        self.received = status.received_total;
        self.closed = status.closed_total;
        Ok(())
    }

    /// Takes back the `count` oldest connections it has not acknowledged: it refused them
    /// (REFUSED, after its status was applied). It counts as full from `now`.
    pub fn refuse(&mut self, count: usize, now: Instant) -> Result<Vec<Pending>, ProtocolError> {
        if count > self.unacked.len() {
            return Err(ProtocolError(format!(
                "refused {count} connections; {} were unacknowledged",
                self.unacked.len()
            )));
        }
        let refused: Vec<Pending> = self.unacked.drain(..count).collect();
        self.sent -= count as u64;
        self.assigned -= count as u64;
        self.ack_wait_since = (!self.unacked.is_empty()).then_some(now);
        self.full_since = Some(now);
        self.refused_total += count as u64;
        self.refused_unlogged += count as u64;
        Ok(refused)
    }

    /// The connections refused since the last log line, if one is due (the first refusal,
    /// then at most one line per [`REFUSAL_LOG_PERIOD`]).
    pub fn refusals_to_log(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .refusal_logged
            .is_none_or(|at| now.saturating_duration_since(at) >= REFUSAL_LOG_PERIOD);
        if !due {
            return None;
        }
        self.refusal_logged = Some(now);
        Some(std::mem::take(&mut self.refused_unlogged))
    }

    /// Whether it may be given connections: ready, below `max_pending`, not out of fds.
    pub fn eligible(&self, max_pending: usize) -> bool {
        self.phase == Phase::Ready && self.pending() < max_pending && self.full_since.is_none()
    }

    /// Whether it has held connections unacknowledged since before `cutoff`.
    pub fn stalled(&self, cutoff: Option<Instant>) -> bool {
        match (self.ack_wait_since, cutoff) {
            (Some(since), Some(cutoff)) => since < cutoff,
            _ => false,
        }
    }

    /// Since when it holds connections unacknowledged without acknowledging or finishing any.
    pub fn ack_wait_since(&self) -> Option<Instant> {
        self.ack_wait_since
    }

    /// Ends a full pause that began before `cutoff`; true if it did.
    pub fn end_full_pause(&mut self, cutoff: Instant) -> bool {
        let over = self.full_since.is_some_and(|since| since <= cutoff);
        if over {
            self.full_since = None;
        }
        over
    }

    /// Closes held connections whose client has `gone` (only those not yet sent: a sent one
    /// is the worker's to read); returns how many.
    pub fn drop_abandoned(&mut self, gone: impl Fn(&OwnedFd) -> bool) -> usize {
        let before = self.outbox.len();
        self.outbox.retain(|c| !gone(&c.fd));
        let dropped = before - self.outbox.len();
        // Never sent, so never its load.
        self.assigned -= dropped as u64;
        dropped
    }

    /// Every connection the master still holds for it, oldest first (it is being lost).
    pub fn take_orphans(&mut self) -> Vec<Pending> {
        self.ack_wait_since = None;
        let mut orphaned: Vec<Pending> = self
            .unacked
            .drain(..)
            .chain(self.outbox.drain(..))
            .collect();
        orphaned.sort_by_key(|c| c.id);
        orphaned
    }
}
