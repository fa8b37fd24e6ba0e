//! The worker's side of the shared map held by the master: a [`Backend`] whose replica the
//! master's SYNC frames keep current and whose writes go up as STATE frames, each resolved
//! by its ANSWER once this worker's replica has applied the change the answer names
//! (read-your-writes).
//!
//! Frames from the master are read where the rest of the channel is: in
//! [`Incoming::accept`](super::Incoming::accept), which `axum::serve` and any accept loop
//! keep calling. Before the service starts, [`MasterBackend::subscribe`] reads the
//! snapshot itself, so a worker says READY with the whole map in its replica.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::ipc::frame::Frame;
use crate::ipc::state::{self as wire, Answer, Request, StateFault, Sync};
use crate::ipc::{Channel, ChannelError};
use crate::state::{Backend, Replica, StateError, Write, WriteFuture};

/// How long a write waits for the master's answer and its change.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a starting worker waits for its snapshot before it serves with a stale replica.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame read while waiting for the snapshot that is not the shared map's: applied later,
/// in order, by the accept loop.
pub(crate) type Early = Result<(Frame, Vec<OwnedFd>), ChannelError>;

/// A snapshot's entries: key, value, remaining time to live.
type Entries = Vec<(String, Bytes, Option<Duration>)>;

/// The shared map through the master, in a worker.
#[derive(Debug)]
pub(crate) struct MasterBackend {
    channel: Arc<Channel>,
    replica: Replica,
    /// The number of the last change the replica applied.
    applied: watch::Sender<u64>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    /// A snapshot being received: its entries so far.
    receiving: Mutex<Option<Entries>>,
    /// The channel is gone: no write can be answered.
    closed: AtomicBool,
    /// It subscribed again after a gap: changes before the new snapshot are dropped
    /// without asking once more.
    resubscribed: AtomicBool,
    /// Frames from the master dropped as malformed.
    dropped: AtomicU64,
    /// How long a write waits ([`WRITE_TIMEOUT`]).
    timeout: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl MasterBackend {
    pub fn new(channel: Arc<Channel>) -> Self {
        let replica = Replica::default();
        // Stale until the first snapshot is in.
        replica.set_stale(true);
        MasterBackend {
            channel,
            replica,
            applied: watch::Sender::new(0),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            receiving: Mutex::new(None),
            closed: AtomicBool::new(false),
            resubscribed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            timeout: WRITE_TIMEOUT,
        }
    }

    /// Asks the master for the map and reads the channel until the snapshot is in (at most
    /// `timeout`); any other frame read meanwhile goes to `early`, in order. A channel
    /// error goes there too and ends the wait.
    pub async fn subscribe(&self, buf: &mut [u8], early: &mut VecDeque<Early>, timeout: Duration) {
        if let Err(e) = self.send_subscribe().await {
            early.push_back(Err(e.into()));
            return;
        }
        let receive = async {
            while self.replica.is_stale() {
                match self.channel.recv_frame(buf).await {
                    Ok((Frame::Sync(sync), _)) => {
                        if self.on_sync(sync) {
                            // A gap in a fresh subscription cannot be: the master is
                            // broken; serve what we have.
                            return;
                        }
                    }
                    Ok((Frame::Answer(answer), _)) => self.on_answer(answer),
                    Ok(other) => early.push_back(Ok(other)),
                    Err(e) => {
                        early.push_back(Err(e));
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(timeout, receive).await.is_err() {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "no snapshot of the shared map from the master: serving with a stale replica"
            );
        }
    }

    /// Sends SUBSCRIBE: the master answers with a snapshot, then every change.
    pub async fn send_subscribe(&self) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        wire::encode_request(&mut bytes, &Request::Subscribe).expect("a subscribe fits");
        self.channel.send(&bytes, &[]).await
    }

    fn drop_one(&self, why: &dyn std::fmt::Display) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped % 1000 == 0 {
            tracing::warn!(dropped, reason = %why, "dropping a state frame from the master");
        }
    }

    /// Applies a SYNC frame; true when the replica missed a change and must subscribe
    /// again (it is marked stale until the new snapshot is in).
    pub fn on_sync(&self, sync: Result<Sync, StateFault>) -> bool {
        let sync = match sync {
            Ok(sync) => sync,
            Err(fault) => {
                // A change we cannot read is a change we miss.
                self.drop_one(&fault);
                return self.missed();
            }
        };
        if sync.flags & wire::SNAPSHOT != 0 {
            let mut receiving = lock(&self.receiving);
            if sync.flags & wire::SNAPSHOT_FIRST != 0 {
                *receiving = Some(Vec::new());
            }
            let Some(entries) = receiving.as_mut() else {
                self.drop_one(&"a snapshot part without its first part");
                return false;
            };
            entries.extend(sync.entries.into_iter().filter_map(|e| {
                let (value, ttl) = e.value?;
                Some((e.key, value, ttl))
            }));
            if sync.flags & wire::SNAPSHOT_LAST != 0 {
                let entries = receiving.take().unwrap_or_default();
                self.replica.replace_all(entries);
                self.replica.set_stale(false);
                self.resubscribed.store(false, Ordering::Release);
                self.applied.send_replace(sync.seq);
            }
            return false;
        }
        if self.resubscribed.load(Ordering::Acquire) {
            return false; // The snapshot on its way has them.
        }
        let mut applied = *self.applied.borrow();
        for entry in sync.entries {
            if entry.seq <= applied {
                continue; // In the snapshot already.
            }
            if entry.seq != applied + 1 {
                self.drop_one(&format!(
                    "change {} after change {applied}: a gap; subscribing again",
                    entry.seq
                ));
                self.applied.send_replace(applied);
                return self.missed();
            }
            match entry.value {
                Some((value, ttl)) => self.replica.put(entry.key, value, ttl),
                None => self.replica.remove(&entry.key),
            }
            applied = entry.seq;
        }
        self.applied.send_replace(applied);
        false
    }

    /// The replica missed a change: stale until a fresh snapshot is in; true the first
    /// time (subscribe again), false while that snapshot is on its way.
    fn missed(&self) -> bool {
        self.replica.set_stale(true);
        !self.resubscribed.swap(true, Ordering::AcqRel)
    }

    /// Hands an ANSWER to the write waiting for it.
    pub fn on_answer(&self, answer: Result<Answer, StateFault>) {
        match answer {
            Ok(answer) => {
                // An answer after its write timed out has no one to go to.
                if let Some(waiting) = lock(&self.pending).remove(&answer.id) {
                    let _ = waiting.send(answer);
                }
            }
            Err(fault) => self.drop_one(&fault),
        }
    }

    /// The channel is gone: waiting writes fail, the replica serves its last values.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.replica.set_stale(true);
        lock(&self.pending).clear();
        // Writes answered but waiting for their change stop waiting.
        self.applied.send_modify(|_| {});
    }

    async fn write_now(&self, write: Write) -> Result<crate::state::Outcome, StateError> {
        let gone = || StateError::Unavailable("the channel to the master is closed".into());
        if self.closed.load(Ordering::Acquire) {
            return Err(gone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::new();
        wire::encode_request(&mut bytes, &Request::Write { id, write })?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let answered = async {
            self.channel.send(&bytes, &[]).await.map_err(|_| gone())?;
            let answer = rx.await.map_err(|_| gone())?;
            let mut applied = self.applied.subscribe();
            let _ = applied
                .wait_for(|seq| *seq >= answer.seq || self.closed.load(Ordering::Acquire))
                .await;
            answer.result
        };
        let result = tokio::time::timeout(self.timeout, answered).await;
        lock(&self.pending).remove(&id);
        result.unwrap_or(Err(StateError::Timeout(self.timeout)))
    }
}

impl Backend for MasterBackend {
    fn replica(&self) -> &Replica {
        &self.replica
    }

    fn write(&self, write: Write) -> WriteFuture<'_> {
        Box::pin(self.write_now(write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::channel::frame_buffer;
    use crate::state::{Outcome, SharedMap};
    use crate::sys::socket::seqpacket_pair;

    fn pair() -> (Arc<MasterBackend>, Channel) {
        let (worker, master) = seqpacket_pair().unwrap();
        let worker = Arc::new(Channel::new(worker).unwrap());
        (
            Arc::new(MasterBackend::new(worker)),
            Channel::new(master).unwrap(),
        )
    }

    fn sync(flags: u8, seq: u64, entries: &[(u64, &str, Option<&str>)]) -> Sync {
        let mut buf = Vec::new();
        wire::begin_sync(&mut buf, flags, seq);
        for (seq, key, value) in entries {
            let value = value.map(|v| Bytes::copy_from_slice(v.as_bytes()));
            assert!(wire::push_entry(
                &mut buf,
                *seq,
                key,
                value.as_ref().map(|v| (v, None))
            ));
        }
        match crate::ipc::frame::decode(&buf) {
            Ok(Frame::Sync(Ok(sync))) => sync,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_snapshot_replaces_the_replica_and_changes_apply_in_order() {
        let (backend, _master) = pair();
        let all = wire::SNAPSHOT | wire::SNAPSHOT_FIRST;
        assert!(!backend.on_sync(Ok(sync(all, 5, &[(5, "a", Some("1"))]))));
        assert!(backend.replica.is_stale(), "not complete yet");
        let last = wire::SNAPSHOT | wire::SNAPSHOT_LAST;
        assert!(!backend.on_sync(Ok(sync(last, 5, &[(5, "b", Some("2"))]))));
        assert!(!backend.replica.is_stale());
        assert_eq!(backend.replica.get("a"), Some(Bytes::from("1")));
        assert_eq!(*backend.applied.borrow(), 5);
        let changes = [(6, "a", None), (7, "c", Some("3"))];
        assert!(!backend.on_sync(Ok(sync(0, 7, &changes))));
        assert_eq!(backend.replica.get("a"), None);
        assert_eq!(backend.replica.get("c"), Some(Bytes::from("3")));
        assert_eq!(*backend.applied.borrow(), 7);
    }

    #[tokio::test]
    async fn a_missed_change_marks_the_replica_stale_and_asks_for_a_snapshot() {
        let (backend, _master) = pair();
        let whole = wire::SNAPSHOT | wire::SNAPSHOT_FIRST | wire::SNAPSHOT_LAST;
        backend.on_sync(Ok(sync(whole, 1, &[])));
        assert!(
            backend.on_sync(Ok(sync(0, 3, &[(3, "x", Some("1"))]))),
            "2 is missing"
        );
        assert!(backend.replica.is_stale());
        assert_eq!(
            backend.replica.get("x"),
            None,
            "nothing applied past the gap"
        );
        assert!(
            !backend.on_sync(Ok(sync(0, 4, &[(4, "y", Some("1"))]))),
            "asked once: the snapshot on its way has it"
        );
        assert!(!backend.on_sync(Err(StateFault::TooShort(3))));
        assert_eq!(backend.replica.get("y"), None);
        backend.on_sync(Ok(sync(whole, 4, &[(4, "y", Some("1"))])));
        assert!(!backend.replica.is_stale());
        assert_eq!(backend.replica.get("y"), Some(Bytes::from("1")));
        assert!(
            backend.on_sync(Err(StateFault::TooShort(3))),
            "a new miss asks again"
        );
    }

    #[tokio::test]
    async fn a_write_resolves_once_the_replica_shows_it() {
        let (backend, master) = pair();
        let map = SharedMap::new(backend.clone());
        let writing = tokio::spawn({
            let map = map.clone();
            async move { map.increment("n", 2).await }
        });
        let mut buf = frame_buffer();
        let (frame, _) = master.recv_frame(&mut buf).await.unwrap();
        let Frame::State(Ok(Request::Write { id, .. })) = frame else {
            panic!("{frame:?}")
        };
        // The answer first, its change later: the write waits for the change.
        backend.on_answer(Ok(Answer {
            id,
            seq: 1,
            result: Ok(Outcome::Counter(2)),
        }));
        tokio::task::yield_now().await;
        assert!(!writing.is_finished(), "the replica does not show it yet");
        backend.on_sync(Ok(sync(0, 1, &[(1, "n", Some("2"))])));
        assert_eq!(writing.await.unwrap(), Ok(2));
        assert_eq!(map.get("n"), Some(Bytes::from("2")));
    }

    #[tokio::test]
    async fn a_write_the_master_never_answers_times_out_and_a_late_answer_goes_nowhere() {
        let (worker, master) = seqpacket_pair().unwrap();
        let mut backend = MasterBackend::new(Arc::new(Channel::new(worker).unwrap()));
        let master = Channel::new(master).unwrap();
        backend.timeout = Duration::from_millis(50);
        let backend = Arc::new(backend);
        let map = SharedMap::new(backend.clone());
        let started = std::time::Instant::now();
        let written = map.set("k", "v").await;
        assert_eq!(written, Err(StateError::Timeout(Duration::from_millis(50))));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(lock(&backend.pending).is_empty(), "forgotten");
        // The write did reach the master; its answer now has no one to go to.
        let mut buf = frame_buffer();
        let (frame, _) = master.recv_frame(&mut buf).await.unwrap();
        let Frame::State(Ok(Request::Write { id, .. })) = frame else {
            panic!("{frame:?}")
        };
        backend.on_answer(Ok(Answer {
            id,
            seq: 1,
            result: Ok(Outcome::Stored),
        }));
        assert_eq!(backend.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn writes_fail_as_unavailable_once_the_master_is_gone() {
        let (backend, master) = pair();
        let map = SharedMap::new(backend.clone());
        let writing = tokio::spawn({
            let map = map.clone();
            async move { map.set("k", "v").await }
        });
        let mut buf = frame_buffer();
        master.recv_frame(&mut buf).await.unwrap();
        backend.close();
        assert!(matches!(
            writing.await.unwrap(),
            Err(StateError::Unavailable(_))
        ));
        assert!(matches!(
            map.delete("k").await,
            Err(StateError::Unavailable(_))
        ));
        assert!(map.is_stale());
    }
}
