//! The shared map's authority, in the master: takes the STATE frames workers send, applies
//! each write to the [`Store`] (one at a time, on the master's thread: one order for the
//! whole cluster), answers the writer, and feeds every subscribed worker the numbered
//! changes, after a snapshot of the map when it subscribes.
//!
//! Bounds: each worker's feed holds at most [`MAX_QUEUED_BYTES`] of changes its channel
//! could not take yet. A worker that falls further behind loses those queued changes and
//! gets a fresh snapshot instead (streamed from a frozen copy as its channel takes it), so
//! its replica catches up whole and never silently diverges. Answers wait in a queue of
//! their own of at most [`MAX_QUEUED_ANSWERS`]; past it an answer is dropped (the writer
//! times out). A malformed frame is dropped, counted and logged; its sender keeps its
//! channel.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::ctx::Ctx;
use super::handover::{self, Link, Role, Waiter};
use super::post::LogBudget;
use crate::ipc::state::{self as wire, Answer, Request, StateFault};
use crate::ipc::Channel;
use crate::state::store::{Change, Frozen, Store};
use crate::state::{
    Backend, Outcome, Replica, SharedMap, StateError, StateLimits, Write, WriteFuture,
};

/// Bytes of changes queued for one worker whose channel is full, at most (then: a fresh
/// snapshot instead).
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Answers queued for one worker, at most.
pub const MAX_QUEUED_ANSWERS: usize = 4096;
/// How often expired entries are removed (and the replicas told).
pub const EXPIRY_PERIOD: Duration = Duration::from_secs(1);

/// What the authority has done, for status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct StateCounters {
    /// Writes applied (that changed something or not).
    pub writes: u64,
    /// Writes refused by a limit or as not an integer.
    pub refused: u64,
    /// Frames dropped: malformed, the wrong direction, answers past their queue.
    pub dropped: u64,
    /// Snapshots sent (subscriptions and catch-ups).
    pub snapshots: u64,
    /// Snapshots sent to a worker that fell behind.
    pub resyncs: u64,
}

/// A snapshot on its way to one worker.
#[derive(Debug)]
struct Cursor {
    entries: Rc<Vec<Frozen>>,
    seq: u64,
    next: usize,
    started: bool,
}

/// What goes to one worker process.
#[derive(Debug)]
struct Feed {
    slot: usize,
    channel: Rc<Channel>,
    writer: Rc<Notify>,
    /// It subscribed: it gets every change.
    subscribed: bool,
    snapshot: Option<Cursor>,
    /// SYNC frames of changes, oldest first; the last one may grow.
    changes: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    answers: VecDeque<Vec<u8>>,
}

/// The master's shared map and the feeds of its replicas.
#[derive(Debug)]
pub(crate) struct Authority {
    pub(super) store: RefCell<Store>,
    feeds: RefCell<HashMap<u32, Feed>>,
    /// The last frozen copy and the change it was taken at, shared by the snapshots that
    /// start at that change.
    frozen: RefCell<Option<(u64, Rc<Vec<Frozen>>)>>,
    counters: Cell<StateCounters>,
    log_budget: LogBudget,
    /// The master's own replica, for the handler's [`SharedMap`] (see [`local`]).
    local: Arc<Local>,
    /// Whether this master applies the writes or hands them to the master that replaces
    /// it (see `handover`).
    pub(super) role: RefCell<Role>,
    /// In a master that took the map over in an upgrade: the master it replaces, which
    /// gets every change.
    pub(super) predecessor: RefCell<Option<Link>>,
}

impl Authority {
    /// An empty map under `limits` (a value is limited further to what one frame carries).
    pub fn new(limits: StateLimits) -> Self {
        let room = wire::MAX_BODY - wire::SYNC_FIXED - wire::ENTRY_FIXED - limits.max_key;
        let limits = StateLimits {
            max_value: limits.max_value.min(room),
            ..limits
        };
        Authority {
            store: RefCell::new(Store::new(limits)),
            feeds: RefCell::new(HashMap::new()),
            frozen: RefCell::new(None),
            counters: Cell::new(StateCounters::default()),
            log_budget: LogBudget::default(),
            local: Arc::new(Local::new()),
            role: RefCell::new(Role::Authority),
            predecessor: RefCell::new(None),
        }
    }

    /// Every live entry with its remaining time to live: what a live upgrade hands to the
    /// next master, which takes it with [`Authority::restore`].
    pub fn snapshot(&self) -> Vec<(String, bytes::Bytes, Option<Duration>)> {
        self.store.borrow().snapshot()
    }

    /// Loads what the previous master's [`Authority::snapshot`] gave, under this master's
    /// limits, as changes (the master's own replica and any subscriber get them); answers
    /// the entries refused, with the reason.
    pub fn restore(
        &self,
        snapshot: impl IntoIterator<Item = (String, bytes::Bytes, Option<Duration>)>,
    ) -> Vec<(String, StateError)> {
        let mut refused = Vec::new();
        for (key, value, ttl) in snapshot {
            if ttl.is_some_and(|ttl| ttl.is_zero()) {
                continue; // Expired in transit.
            }
            let write = Write::Set {
                key: key.clone(),
                value,
                ttl,
            };
            match self.apply_here(write) {
                (Err(e), _) => refused.push((key, e)),
                (Ok(_), change) => change.iter().for_each(|c| self.publish(c)),
            }
        }
        refused
    }

    #[cfg_attr(
        not(any(feature = "control", feature = "prometheus")),
        allow(dead_code)
    )]
    pub fn counters(&self) -> StateCounters {
        self.counters.get()
    }

    fn count(&self, change: impl FnOnce(&mut StateCounters)) {
        let mut counters = self.counters.get();
        change(&mut counters);
        self.counters.set(counters);
    }

    /// Entries in the map, and the bytes of every key and value together.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub fn size(&self) -> (usize, usize) {
        let store = self.store.borrow();
        (store.len(), store.total())
    }

    /// Forgets process `pid`'s feed.
    pub fn close(&self, pid: u32) {
        self.feeds.borrow_mut().remove(&pid);
    }

    pub fn drop_one(&self, slot: usize, pid: u32, why: &dyn std::fmt::Display) {
        self.count(|c| c.dropped += 1);
        let dropped = self.counters.get().dropped;
        if let Some(silenced) = self.log_budget.spend(Instant::now()) {
            tracing::warn!(worker = slot, pid, dropped, silenced, reason = %why, "dropping a state frame");
        }
    }

    /// The number of the last change applied.
    pub fn seq(&self) -> u64 {
        self.store.borrow().seq()
    }

    /// Removes the entries expired at `now` and tells every replica; nothing while the
    /// map is handed over (the master that holds it tells this one what expired).
    pub fn expire(&self, now: Instant) {
        if !self.is_authority() {
            return;
        }
        let changes = self.store.borrow_mut().expire(now);
        for change in &changes {
            self.publish(change);
        }
    }

    /// Queues `change` for every subscribed worker (and applies it to the master's own
    /// replica), and for the master this one replaces, if any.
    fn publish(&self, change: &Change) {
        self.publish_to(change, true);
    }

    /// [`Authority::publish`], the master this one replaces left out unless
    /// `to_predecessor`.
    pub(super) fn publish_to(&self, change: &Change, to_predecessor: bool) {
        if to_predecessor && self.predecessor.borrow().is_some() {
            self.to_predecessor(super::carry::tag::CHANGES, &handover::encode_change(change));
        }
        match &change.value {
            Some((value, ttl)) => {
                self.local
                    .replica
                    .put(change.key.to_string(), value.clone(), *ttl)
            }
            None => self.local.replica.remove(&change.key),
        }
        let mut feeds = self.feeds.borrow_mut();
        let mut behind = Vec::new();
        for (pid, feed) in feeds.iter_mut().filter(|(_, f)| f.subscribed) {
            if feed.snapshot.as_ref().is_some_and(|c| !c.started) {
                // A snapshot not started yet is taken later, with this change in it.
                continue;
            }
            if !feed.queue(change) {
                behind.push(*pid);
            }
            feed.writer.notify_one();
        }
        drop(feeds);
        for pid in behind {
            self.resync(pid);
        }
    }

    /// Starts a fresh snapshot for `pid` in place of what was queued for it.
    fn resync(&self, pid: u32) {
        let slot = {
            let mut feeds = self.feeds.borrow_mut();
            let Some(feed) = feeds.get_mut(&pid) else {
                return;
            };
            feed.changes.clear();
            feed.queued_bytes = 0;
            feed.snapshot = None;
            feed.slot
        };
        self.count(|c| c.resyncs += 1);
        let resyncs = self.counters.get().resyncs;
        if resyncs == 1 || resyncs % 100 == 0 {
            tracing::warn!(
                worker = slot,
                pid,
                resyncs,
                "a worker fell behind the shared map's changes: sending it a fresh snapshot"
            );
        }
        self.start_snapshot(pid);
    }

    fn start_snapshot(&self, pid: u32) {
        let seq = self.store.borrow().seq();
        let entries = {
            let mut frozen = self.frozen.borrow_mut();
            match &*frozen {
                Some((at, entries)) if *at == seq => entries.clone(),
                _ => {
                    let entries = Rc::new(self.store.borrow().freeze(Instant::now()));
                    *frozen = Some((seq, entries.clone()));
                    entries
                }
            }
        };
        if let Some(feed) = self.feeds.borrow_mut().get_mut(&pid) {
            feed.snapshot = Some(Cursor {
                entries,
                seq,
                next: 0,
                started: false,
            });
            feed.writer.notify_one();
        }
        self.count(|c| c.snapshots += 1);
    }

    /// Sends what is queued for `pid` while its channel takes it: answers, the snapshot,
    /// the changes; `Ok(false)` when the channel is full again.
    pub fn flush(&self, pid: u32) -> io::Result<bool> {
        // A snapshot whose first frame has not gone yet starts from the map as it is now.
        let restart = self
            .feeds
            .borrow()
            .get(&pid)
            .and_then(|f| f.snapshot.as_ref())
            .is_some_and(|c| !c.started && c.seq != self.store.borrow().seq());
        if restart {
            self.start_snapshot(pid);
            self.count(|c| c.snapshots -= 1);
        }
        let mut feeds = self.feeds.borrow_mut();
        let Some(feed) = feeds.get_mut(&pid) else {
            return Ok(true);
        };
        feed.flush()
    }
}

/// Sends `bytes` on `channel`: `Ok(true)` if it went, `Ok(false)` if the channel is full.
fn try_send(channel: &Channel, bytes: &[u8]) -> io::Result<bool> {
    match channel.try_send(bytes, &[]) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

impl Feed {
    fn new(slot: usize, channel: Rc<Channel>, writer: Rc<Notify>) -> Self {
        Feed {
            slot,
            channel,
            writer,
            subscribed: false,
            snapshot: None,
            changes: VecDeque::new(),
            queued_bytes: 0,
            answers: VecDeque::new(),
        }
    }

    /// Appends `change` to the newest queued frame, or a new one; false past the bound.
    fn queue(&mut self, change: &Change) -> bool {
        let value = change.value.as_ref().map(|(v, ttl)| (v, *ttl));
        let len = wire::entry_len(&change.key, value.map(|(v, _)| v));
        if self.queued_bytes + len > MAX_QUEUED_BYTES {
            return false;
        }
        let appended = self
            .changes
            .back_mut()
            .is_some_and(|last| wire::push_entry(last, change.seq, &change.key, value));
        if !appended {
            let mut frame = Vec::with_capacity(len + wire::SYNC_FIXED + 8);
            wire::begin_sync(&mut frame, 0, change.seq);
            let pushed = wire::push_entry(&mut frame, change.seq, &change.key, value);
            debug_assert!(pushed, "one change always fits a frame");
            self.changes.push_back(frame);
        }
        self.queued_bytes += len;
        true
    }

    fn flush(&mut self) -> io::Result<bool> {
        while let Some(answer) = self.answers.front() {
            if !try_send(&self.channel, answer)? {
                return Ok(false);
            }
            self.answers.pop_front();
        }
        while let Some(cursor) = &mut self.snapshot {
            let mut frame = Vec::with_capacity(wire::MAX_BODY);
            let first = if cursor.started {
                0
            } else {
                wire::SNAPSHOT_FIRST
            };
            wire::begin_sync(&mut frame, wire::SNAPSHOT | first, cursor.seq);
            let now = Instant::now();
            let mut next = cursor.next;
            while let Some((key, value, expires)) = cursor.entries.get(next) {
                let ttl = expires.map(|at| at.saturating_duration_since(now));
                if !wire::push_entry(&mut frame, cursor.seq, key, Some((value, ttl))) {
                    break;
                }
                next += 1;
            }
            let last = next == cursor.entries.len();
            if last {
                frame[crate::ipc::frame::HEADER_LEN] |= wire::SNAPSHOT_LAST;
            }
            if !try_send(&self.channel, &frame)? {
                return Ok(false);
            }
            cursor.next = next;
            cursor.started = true;
            if last {
                self.snapshot = None;
            }
        }
        while let Some(frame) = self.changes.front() {
            if !try_send(&self.channel, frame)? {
                return Ok(false);
            }
            let sent = frame.len() - wire::SYNC_FIXED - crate::ipc::frame::HEADER_LEN;
            self.queued_bytes = self.queued_bytes.saturating_sub(sent);
            self.changes.pop_front();
        }
        Ok(true)
    }
}

/// Takes a STATE frame from process `pid` of slot `index`.
pub(crate) fn receive(ctx: &Ctx, index: usize, pid: u32, request: Result<Request, StateFault>) {
    let authority = &ctx.state;
    let request = match request {
        Ok(request) => request,
        Err(fault) => return authority.drop_one(index, pid, &fault),
    };
    if let std::collections::hash_map::Entry::Vacant(vacant) =
        authority.feeds.borrow_mut().entry(pid)
    {
        let links = ctx.links.borrow();
        let Some(link) = links.get(&pid) else {
            return; // Given up on already.
        };
        vacant.insert(Feed::new(index, link.channel.clone(), link.writer.clone()));
    }
    match request {
        Request::Subscribe => {
            if let Some(feed) = authority.feeds.borrow_mut().get_mut(&pid) {
                feed.subscribed = true;
                feed.changes.clear();
                feed.queued_bytes = 0;
            }
            authority.start_snapshot(pid);
        }
        Request::Write { id, write } => apply(authority, index, pid, id, write),
    }
}

/// Applies (or forwards, during an upgrade) one write of a worker; it gets the answer.
fn apply(authority: &Authority, index: usize, pid: u32, id: u64, write: Write) {
    let waiter = Waiter::Worker {
        slot: index,
        pid,
        id,
    };
    authority.submit(write, waiter);
}

impl Authority {
    /// Queues the answer to write `id` of process `pid`, as of the last change applied.
    pub(super) fn answer_worker(
        &self,
        slot: usize,
        pid: u32,
        id: u64,
        result: Result<Outcome, StateError>,
    ) {
        let seq = self.seq();
        let mut bytes = Vec::new();
        wire::encode_answer(&mut bytes, &Answer { id, seq, result });
        let mut feeds = self.feeds.borrow_mut();
        let Some(feed) = feeds.get_mut(&pid) else {
            return;
        };
        if feed.answers.len() >= MAX_QUEUED_ANSWERS {
            drop(feeds);
            return self.drop_one(slot, pid, &"the worker's answer queue is full");
        }
        feed.answers.push_back(bytes);
        feed.writer.notify_one();
    }
}

/// Writes of the master's own [`SharedMap`] waiting for the master's thread, at most.
pub const LOCAL_QUEUE: usize = 1024;

type LocalWrite = (Write, oneshot::Sender<Result<Outcome, StateError>>);

/// The shared map in the master itself (`Master::state` in the handler): reads from a
/// replica the authority updates as it applies each change, writes handed to the master's
/// thread (the map is not `Send`) and applied there like any worker's.
#[derive(Debug)]
pub(crate) struct Local {
    replica: Replica,
    writes: mpsc::Sender<LocalWrite>,
    /// Taken once, by the task that applies the writes.
    pending: std::sync::Mutex<Option<mpsc::Receiver<LocalWrite>>>,
}

impl Local {
    fn new() -> Self {
        let (writes, pending) = mpsc::channel(LOCAL_QUEUE);
        Local {
            replica: Replica::default(),
            writes,
            pending: std::sync::Mutex::new(Some(pending)),
        }
    }
}

impl Backend for Local {
    fn replica(&self) -> &Replica {
        &self.replica
    }

    fn write(&self, write: Write) -> WriteFuture<'_> {
        Box::pin(async move {
            let gone = || StateError::Unavailable("the master is stopping".into());
            let (tx, rx) = oneshot::channel();
            self.writes.send((write, tx)).await.map_err(|_| gone())?;
            // Applied on the master's thread, replica included, before the answer.
            rx.await.map_err(|_| gone())?
        })
    }
}

impl Authority {
    /// The master's own handle on the map; its writes apply once [`local`] runs.
    pub fn map(&self) -> SharedMap {
        SharedMap::new(self.local.clone())
    }

    /// Applies a write to this master's store: what it did and the change it made (not
    /// published yet).
    pub(super) fn apply_here(&self, write: Write) -> (Result<Outcome, StateError>, Option<Change>) {
        let result = self.store.borrow_mut().apply(write, Instant::now());
        match result {
            Ok((outcome, change)) => {
                self.count(|c| c.writes += 1);
                (Ok(outcome), change)
            }
            Err(e) => {
                self.count(|c| c.refused += 1);
                (Err(e), None)
            }
        }
    }

    /// Applies a write of the master's own, and publishes its change.
    #[cfg(test)]
    fn apply_local(&self, write: Write) -> Result<Outcome, StateError> {
        let (result, change) = self.apply_here(write);
        if let Some(change) = change {
            self.publish(&change);
        }
        result
    }
}

/// Applies the writes of the master's own [`SharedMap`], on the master's thread.
pub(crate) async fn local(ctx: Rc<Ctx>) {
    let pending = ctx
        .state
        .local
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let Some(mut pending) = pending else {
        return;
    };
    while let Some((write, answer)) = pending.recv().await {
        ctx.state.submit(write, Waiter::Local(answer));
    }
}

/// Removes expired entries every [`EXPIRY_PERIOD`].
pub(crate) async fn expire(ctx: Rc<Ctx>) {
    let mut every = tokio::time::interval(EXPIRY_PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        ctx.state.expire(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::channel::frame_buffer;
    use crate::ipc::frame::Frame;
    use crate::sys::socket::seqpacket_pair;
    use bytes::Bytes;

    fn authority_with(pid: u32) -> (Authority, Channel) {
        let authority = Authority::new(StateLimits::default());
        let (master, worker) = seqpacket_pair().unwrap();
        let channel = Rc::new(Channel::new(master).unwrap());
        let mut feed = Feed::new(0, channel, Rc::new(Notify::new()));
        feed.subscribed = true;
        authority.feeds.borrow_mut().insert(pid, feed);
        (authority, Channel::new(worker).unwrap())
    }

    fn set(key: &str, len: usize) -> Write {
        Write::Set {
            key: key.into(),
            value: Bytes::from(vec![b'v'; len]),
            ttl: None,
        }
    }

    fn read_all(worker: &Channel) -> Vec<Frame> {
        let mut buf = frame_buffer();
        let mut frames = Vec::new();
        while let Ok(Some((frame, _))) = worker.try_recv_frame(&mut buf) {
            frames.push(frame);
        }
        frames
    }

    #[tokio::test]
    async fn changes_batch_while_queued_and_the_writer_gets_its_answer() {
        let (authority, worker) = authority_with(7);
        for i in 0..10 {
            apply(&authority, 0, 7, i, set(&format!("k{i}"), 10));
        }
        assert!(authority.flush(7).unwrap());
        let frames = read_all(&worker);
        let answers = frames
            .iter()
            .filter(|f| matches!(f, Frame::Answer(Ok(_))))
            .count();
        let syncs: Vec<_> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Sync(Ok(sync)) => Some(sync),
                _ => None,
            })
            .collect();
        assert_eq!(answers, 10);
        assert_eq!(syncs.len(), 1, "ten changes in one frame");
        let seqs: Vec<u64> = syncs[0].entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_worker_that_reads_nothing_costs_at_most_its_queue_then_gets_a_snapshot() {
        let (authority, worker) = authority_with(7);
        // Fill the socket first, so everything after waits in the feed.
        while authority.flush(7).unwrap() {
            apply(&authority, 0, 7, 0, set("filler", 30_000));
            authority
                .feeds
                .borrow_mut()
                .get_mut(&7)
                .unwrap()
                .answers
                .clear();
        }
        for i in 0..200u64 {
            apply(&authority, 0, 7, i, set(&format!("k{}", i % 50), 20_000));
            let feeds = authority.feeds.borrow();
            assert!(feeds[&7].queued_bytes <= MAX_QUEUED_BYTES);
        }
        assert!(authority.counters().resyncs >= 1);
        // Now it reads: it gets a snapshot as of the last change, and nothing it missed.
        let mut buf = frame_buffer();
        let mut held = HashMap::new();
        let mut complete_at = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while complete_at.is_none() && Instant::now() < deadline {
            authority.flush(7).unwrap();
            while let Ok(Some((frame, _))) = worker.try_recv_frame(&mut buf) {
                if let Frame::Sync(Ok(sync)) = frame {
                    if sync.flags & wire::SNAPSHOT_FIRST != 0 {
                        held.clear();
                    }
                    for entry in sync.entries {
                        held.insert(entry.key, entry.value);
                    }
                    if sync.flags & wire::SNAPSHOT_LAST != 0 {
                        complete_at = Some(sync.seq);
                    }
                }
            }
        }
        assert_eq!(complete_at, Some(authority.store.borrow().seq()));
        assert_eq!(held.len(), 51, "50 keys and the filler");
    }

    #[tokio::test]
    async fn the_master_s_own_replica_shows_every_change_as_it_is_applied() {
        let (authority, _worker) = authority_with(5);
        let map = authority.map();
        apply(&authority, 0, 5, 1, set("from-worker", 3));
        assert_eq!(map.get("from-worker"), Some(Bytes::from_static(b"vvv")));
        let outcome = authority.apply_local(Write::Increment {
            key: "n".into(),
            by: 4,
            ttl: None,
        });
        assert_eq!(outcome, Ok(Outcome::Counter(4)));
        assert_eq!(map.get("n"), Some(Bytes::from_static(b"4")));
        let refused = authority.apply_local(set(&"k".repeat(2000), 1));
        assert!(matches!(
            refused,
            Err(StateError::TooLarge { what: "key", .. })
        ));
        authority.expire(Instant::now());
        assert_eq!(authority.counters().writes, 2);
        assert_eq!(authority.counters().refused, 1);
    }

    #[tokio::test]
    async fn an_upgrade_hands_the_map_over_with_its_ttls_and_the_limits_of_the_new_master() {
        let (old, _worker) = authority_with(1);
        apply(&old, 0, 1, 1, set("kept", 10));
        let hour = Some(Duration::from_secs(3600));
        let write = Write::Set {
            key: "session".into(),
            value: Bytes::from_static(b"s"),
            ttl: hour,
        };
        apply(&old, 0, 1, 2, write);
        apply(&old, 0, 1, 3, set("big", 5000));
        let handed = old.snapshot();
        assert_eq!(handed.len(), 3);
        let new = Authority::new(StateLimits {
            max_value: 4096,
            ..StateLimits::default()
        });
        let refused = new.restore(handed);
        assert_eq!(refused.len(), 1);
        assert!(matches!(&refused[0], (key, StateError::TooLarge { .. }) if key == "big"));
        let map = new.map();
        assert_eq!(map.get("kept").map(|v| v.len()), Some(10));
        assert_eq!(map.get("session"), Some(Bytes::from_static(b"s")));
        let (_, _, ttl) = new
            .snapshot()
            .into_iter()
            .find(|(k, _, _)| k == "session")
            .unwrap();
        assert!(ttl.unwrap() > Duration::from_secs(3590), "{ttl:?}");
        assert_eq!(new.store.borrow().seq(), 2, "two changes");
    }

    #[tokio::test]
    async fn expiry_is_published_as_a_removal() {
        let (authority, worker) = authority_with(3);
        let write = Write::Set {
            key: "t".into(),
            value: Bytes::from_static(b"x"),
            ttl: Some(Duration::from_millis(1)),
        };
        apply(&authority, 0, 3, 1, write);
        authority.expire(Instant::now() + Duration::from_millis(2));
        authority.flush(3).unwrap();
        let removed = read_all(&worker).into_iter().any(|f| {
            matches!(f, Frame::Sync(Ok(sync)) if sync.entries.iter().any(|e| e.key == "t" && e.value.is_none()))
        });
        assert!(removed);
    }
}
