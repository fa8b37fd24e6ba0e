//! The shared map across a live upgrade, in both masters. The old master hands its map to
//! the new one, which holds the map's one order of writes from then on; the old one
//! forwards the writes of its workers (still running, then draining) and mirrors into its
//! own copy the changes the new one streams back, so its workers' replicas go on following
//! the one map. Frames travel on the upgrade's handshake (see `carry`); their bodies are
//! the worker channel's own state frames (`ipc::state`):
//!
//! ```text
//! old master                                     new master
//!   | START totals ------------------------------->
//!   | <---------------------------------------- HELLO   it can take the map
//!   | MAP: the snapshot, in SYNC frames ------------>  restores it, then starts workers
//!   |   from HELLO on, this master applies no write itself:
//!   | WRITE id + the write (a STATE frame) --------->  applies it in its order
//!   | <----------- ANSWER id + outcome + its change     (the change with its answer)
//!   | <------------------------- CHANGES (a SYNC)       every other change it applies
//!   | <---------------------------------------- READY  (every worker ready)
//! ```
//!
//! The old master takes the map's snapshot and starts forwarding in one step (no write
//! between), and the stream keeps the order: the new master applies the old one's
//! writes after the map they were made to. A forwarded write is answered once its change
//! is in the old master's copy and queued for its workers, so its writer reads it back.
//!
//! If the upgrade fails before READY (the new master exits, breaks the handshake or is
//! not ready in time: it is killed), the old master first applies what the new one sent
//! before it went, then holds the order again: the writes it forwarded and got no answer
//! for are applied by it, in the order they were sent. An answered write's change is in
//! its copy already, an unanswered one's is not (the answer and the change travel in one
//! frame), so no write is lost and none is applied twice. A write that comes while the
//! link is already broken but the failure not yet handled is held back with them (not
//! failed) and applied then too. After READY, a new master that goes leaves the old one's
//! waiting writes failed (`Unavailable`), not applied.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::carry::{self, tag};
use super::ctx::Handshake;
use super::state::Authority;
use crate::ipc::frame::{self, Frame, FrameError, HEADER_LEN};
use crate::ipc::state::{self as wire, Answer, Request, StateFault, Sync, SyncEntry};
use crate::state::store::Change;
use crate::state::{Outcome, StateError, Write};

/// Writes forwarded to the new master and not answered yet, at most; past it a write
/// fails at once (`Unavailable`).
pub const MAX_FORWARDED: usize = 4096;
/// Frames queued for the other master, at most; past it the link is dropped (the other
/// master reads nothing: it is broken).
pub const MAX_QUEUED_FRAMES: usize = 1 << 16;

/// Why a frame from the other master is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HandoverError {
    /// Its body is not one of the worker channel's frames.
    #[error("a {tag} frame from the other master is malformed: {source}")]
    Frame {
        tag: char,
        #[source]
        source: FrameError,
    },
    /// Its state frame is malformed.
    #[error("a {tag} frame from the other master is malformed: {source}")]
    State {
        tag: char,
        #[source]
        source: StateFault,
    },
    /// It holds a frame of the wrong kind.
    #[error("a {tag} frame from the other master holds {found}")]
    Kind { tag: char, found: &'static str },
    /// An answer to a write that is not waiting.
    #[error("an answer from the new master to write {0}, which is not waiting")]
    Unknown(u64),
    /// A tag the map's hand-over does not know.
    #[error("a frame of tag {0:?} where a shared-map frame belongs")]
    Tag(char),
}

impl From<HandoverError> for io::Error {
    fn from(e: HandoverError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Who waits for a write's answer.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// A worker of this master: an ANSWER on its channel.
    Worker { slot: usize, pid: u32, id: u64 },
    /// The master's own [`crate::state::SharedMap`].
    Local(oneshot::Sender<Result<Outcome, StateError>>),
    /// The master this one replaces, which forwarded it: an ANSWER frame with the change.
    Predecessor { id: u64 },
}

/// Who holds the map's order of writes.
#[derive(Debug, Default)]
pub(crate) enum Role {
    /// This master: it applies every write.
    #[default]
    Authority,
    /// The master it hands over to: writes go there.
    Forwarding(Forward),
}

/// The old master's side of a hand-over.
#[derive(Debug)]
pub(crate) struct Forward {
    /// `None` once the link to the new master is gone.
    link: Option<Link>,
    /// The new master said READY: it serves the map for good, and a write that cannot
    /// reach it fails. Before, such a write waits here for the upgrade's outcome.
    ready: bool,
    next: u64,
    /// Forwarded (or, the link gone before READY, held back), not answered yet, by number
    /// (the order they came in).
    waiting: BTreeMap<u64, Waiting>,
}

/// A write waiting in the old master for the new master's answer.
#[derive(Debug)]
struct Waiting {
    write: Write,
    waiter: Waiter,
    /// Whether it went onto the link (else it was held back: the link was gone before READY).
    sent: bool,
}

impl Forward {
    /// Forwards `write`; gives the waiter back with the reason when it cannot. Until READY
    /// a write that cannot go (the link is gone: the upgrade is failing) is held back, to
    /// be applied here once the upgrade has failed (see [`Authority::take_back`]).
    fn forward(&mut self, write: Write, waiter: Waiter) -> Result<(), (Waiter, StateError)> {
        let gone = |why: &str| StateError::Unavailable(why.into());
        if self.waiting.len() >= MAX_FORWARDED {
            return Err((
                waiter,
                gone("too many writes on their way to the new master"),
            ));
        }
        let body = match encode_write(self.next, &write) {
            Ok(body) => body,
            Err(e) => return Err((waiter, e)),
        };
        let sent = self
            .link
            .as_ref()
            .is_some_and(|link| link.send(tag::WRITE, &body));
        if !sent {
            self.link = None;
            if self.ready {
                return Err((waiter, gone("the master that took the map over is gone")));
            }
        }
        let waiting = Waiting {
            write,
            waiter,
            sent,
        };
        self.waiting.insert(self.next, waiting);
        self.next += 1;
        Ok(())
    }

    /// The new master said READY: the writes held back (never sent, the link gone) are
    /// given back to fail, and later ones that cannot go fail at once; those sent wait for
    /// their answers.
    fn ready(&mut self) -> Vec<Waiter> {
        self.ready = true;
        let unsent: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| !w.sent)
            .map(|(id, _)| *id)
            .collect();
        unsent
            .into_iter()
            .filter_map(|id| self.waiting.remove(&id))
            .map(|w| w.waiter)
            .collect()
    }
}

/// Frames queued for the other master's handshake (written by [`write_link`] or, in the
/// old master, `upgrade::feed_successor`), at most [`MAX_QUEUED_FRAMES`].
#[derive(Debug, Clone)]
pub(crate) struct Link {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    queued: Rc<Cell<usize>>,
}

/// The other end of a [`Link`].
#[derive(Debug)]
pub(crate) struct LinkFrames {
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Rc<Cell<usize>>,
}

impl Link {
    pub fn new() -> (Link, LinkFrames) {
        let (frames, taken) = mpsc::unbounded_channel();
        let queued = Rc::new(Cell::new(0));
        let link = Link {
            frames,
            queued: queued.clone(),
        };
        (
            link,
            LinkFrames {
                frames: taken,
                queued,
            },
        )
    }

    /// Queues a frame of `tag`; false when the link is gone or past its bound.
    pub fn send(&self, tag: u8, body: &[u8]) -> bool {
        if self.queued.get() >= MAX_QUEUED_FRAMES {
            return false;
        }
        let sent = self.frames.send(carry::frame(tag, body)).is_ok();
        if sent {
            self.queued.set(self.queued.get() + 1);
        }
        sent
    }
}

impl LinkFrames {
    /// The next frame, whole (tag, length, body); `None` once every [`Link`] is dropped.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.frames.recv().await?;
        self.queued.set(self.queued.get().saturating_sub(1));
        Some(frame)
    }
}

/// Writes the frames of a link on `stream` until the link is dropped or a write fails;
/// then shuts the stream down for writing, so the other master sees the end.
pub(crate) async fn write_link(stream: Rc<Handshake>, mut frames: LinkFrames) {
    while let Some(bytes) = frames.recv().await {
        if let Err(e) = carry::send_raw(&stream, &bytes, None, carry::TIMEOUT).await {
            tracing::warn!(error = %e, "writing to the other master failed");
            break;
        }
    }
    let _ = rustix::net::shutdown(&*stream, rustix::net::Shutdown::Write);
}

impl Authority {
    /// Applies `write` in this master's order, or forwards it to the master that holds
    /// the order; `waiter` gets the answer.
    pub fn submit(&self, write: Write, waiter: Waiter) {
        let mut role = self.role.borrow_mut();
        let Role::Forwarding(forward) = &mut *role else {
            drop(role);
            let (result, change) = self.apply_here(write);
            return self.settle(waiter, result, change);
        };
        let refused = forward.forward(write, waiter).err();
        drop(role);
        if let Some((waiter, e)) = refused {
            self.answer(waiter, Err(e), None);
        }
    }

    /// Whether this master holds the map's order (and removes what expires).
    pub fn is_authority(&self) -> bool {
        matches!(*self.role.borrow(), Role::Authority)
    }

    /// Publishes `change` and answers `waiter`. The master this one replaces gets the
    /// change of its own write with the answer, in one frame.
    fn settle(&self, waiter: Waiter, result: Result<Outcome, StateError>, change: Option<Change>) {
        let with_answer = matches!(waiter, Waiter::Predecessor { .. });
        if let Some(change) = &change {
            self.publish_to(change, !with_answer);
        }
        self.answer(waiter, result, change.as_ref());
    }

    fn answer(&self, waiter: Waiter, result: Result<Outcome, StateError>, change: Option<&Change>) {
        match waiter {
            Waiter::Worker { slot, pid, id } => self.answer_worker(slot, pid, id, result),
            Waiter::Local(answer) => {
                let _ = answer.send(result);
            }
            Waiter::Predecessor { id } => {
                let seq = self.seq();
                let body = encode_answer(Answer { id, seq, result }, change);
                self.to_predecessor(tag::ANSWER, &body);
            }
        }
    }

    /// In a new master that took the map over: every change from now on also goes to the
    /// master it replaces, on `link`.
    pub fn serve_predecessor(&self, link: Link) {
        *self.predecessor.borrow_mut() = Some(link);
    }

    /// The master this one replaced is gone: nothing more goes to it.
    pub fn drop_predecessor(&self) {
        self.predecessor.borrow_mut().take();
    }

    pub(super) fn to_predecessor(&self, tag: u8, body: &[u8]) {
        let mut predecessor = self.predecessor.borrow_mut();
        if predecessor
            .as_ref()
            .is_some_and(|link| !link.send(tag, body))
        {
            predecessor.take();
            tracing::warn!("the master being replaced takes no more of the shared map's changes: dropping its link");
        }
    }

    /// In the old master, as the new one says HELLO: hands it the map (MAP frames on
    /// `link`) and from now on forwards every write to it.
    pub fn hand_over(&self, link: Link) -> Result<usize, &'static str> {
        let mut role = self.role.borrow_mut();
        if !matches!(*role, Role::Authority) {
            return Err("this master handed its map over already");
        }
        let snapshot = self.snapshot();
        let entries = snapshot.len();
        for body in encode_snapshot(snapshot) {
            if !link.send(tag::MAP, &body) {
                return Err("the link to the new master is gone");
            }
        }
        *role = Role::Forwarding(Forward {
            link: Some(link),
            ready: false,
            next: 1,
            waiting: BTreeMap::new(),
        });
        Ok(entries)
    }

    /// In the old master: a CHANGES or ANSWER frame from the master it handed the map to.
    pub fn on_successor_frame(&self, tag: u8, body: &[u8]) -> Result<(), HandoverError> {
        match tag {
            tag::CHANGES => {
                for entry in decode_changes(body)?.entries {
                    self.mirror(entry, true);
                }
                Ok(())
            }
            tag::ANSWER => {
                let (answer, entry) = decode_answer(body)?;
                // Only a write that went over can be answered (one held back stays, to
                // be applied here if the upgrade fails).
                let waiting = match &mut *self.role.borrow_mut() {
                    Role::Forwarding(forward) => match forward.waiting.get(&answer.id) {
                        Some(waiting) if waiting.sent => forward.waiting.remove(&answer.id),
                        _ => None,
                    },
                    Role::Authority => None,
                };
                let waiter = waiting.ok_or(HandoverError::Unknown(answer.id))?.waiter;
                let with_answer = matches!(waiter, Waiter::Predecessor { .. });
                let change = entry.and_then(|entry| self.mirror(entry, !with_answer));
                self.answer(waiter, answer.result, change.as_ref());
                Ok(())
            }
            other => Err(HandoverError::Tag(char::from(other))),
        }
    }

    /// Applies a change the new master made, as this store's next change, and publishes it.
    fn mirror(&self, entry: SyncEntry, to_predecessor: bool) -> Option<Change> {
        let change = self
            .store
            .borrow_mut()
            .mirror(&entry.key, entry.value, Instant::now())?;
        self.publish_to(&change, to_predecessor);
        Some(change)
    }

    /// In the old master, once the upgrade failed before the new master was ready (and
    /// what it sent is applied): holds the map's order again. The writes forwarded and not
    /// answered are applied here, in the order they were sent.
    pub fn take_back(&self) {
        let role = std::mem::take(&mut *self.role.borrow_mut());
        let Role::Forwarding(forward) = role else {
            return;
        };
        let applied = forward.waiting.len();
        for (_, Waiting { write, waiter, .. }) in forward.waiting {
            let (result, change) = self.apply_here(write);
            self.settle(waiter, result, change);
        }
        tracing::info!(
            applied,
            "upgrade failed: this master holds the shared map again (the writes forwarded and not answered applied here)"
        );
    }

    /// In the old master, as the new master says READY: it serves the map from now on, so
    /// the writes held back because the link to it broke before (none, unless its
    /// handshake is failing) fail rather than wait for an answer that cannot come.
    pub fn successor_ready(&self) {
        let unsent = match &mut *self.role.borrow_mut() {
            Role::Forwarding(forward) => forward.ready(),
            Role::Authority => return,
        };
        for waiter in unsent {
            let e = StateError::Unavailable("the link to the new master broke".into());
            self.answer(waiter, Err(e), None);
        }
    }

    /// In the old master, once the new master (ready) is gone: the writes waiting for it
    /// fail, and so do later ones.
    pub fn successor_lost(&self, why: &str) {
        let waiting = match &mut *self.role.borrow_mut() {
            Role::Forwarding(forward) => {
                forward.link = None;
                forward.ready = true;
                std::mem::take(&mut forward.waiting)
            }
            Role::Authority => return,
        };
        for (_, Waiting { waiter, .. }) in waiting {
            let e = StateError::Unavailable(format!("the new master is gone ({why})"));
            self.answer(waiter, Err(e), None);
        }
    }

    /// In the new master: restores one MAP frame; the entries refused; `true` on the last.
    pub fn restore_part(&self, body: &[u8]) -> Result<(usize, usize, bool), HandoverError> {
        let sync = decode_snapshot(body)?;
        let entries = sync.entries.len();
        let refused = self.restore(sync.entries.into_iter().filter_map(|e| {
            let (value, ttl) = e.value?;
            Some((e.key, value, ttl))
        }));
        for (key, e) in refused.iter().take(3) {
            tracing::warn!(key, error = %e, "an entry of the replaced master's map is over this master's limits: left out");
        }
        Ok((
            entries,
            refused.len(),
            sync.flags & wire::SNAPSHOT_LAST != 0,
        ))
    }
}

/// A WRITE body: the write as a worker's STATE frame, numbered `id`.
pub(crate) fn encode_write(id: u64, write: &Write) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::new();
    let request = Request::Write {
        id,
        write: write.clone(),
    };
    wire::encode_request(&mut out, &request)?;
    Ok(out)
}

/// Decodes a WRITE body.
pub(crate) fn decode_write(body: &[u8]) -> Result<(u64, Write), HandoverError> {
    let tag = 'W';
    match frame::decode(body).map_err(|source| HandoverError::Frame { tag, source })? {
        Frame::State(Ok(Request::Write { id, write })) => Ok((id, write)),
        Frame::State(Ok(Request::Subscribe)) => Err(HandoverError::Kind {
            tag,
            found: "a subscription",
        }),
        Frame::State(Err(source)) => Err(HandoverError::State { tag, source }),
        other => Err(HandoverError::Kind {
            tag,
            found: other.name(),
        }),
    }
}

/// One SYNC frame holding `change`.
fn sync_of(change: &Change) -> Vec<u8> {
    let mut out = Vec::new();
    wire::begin_sync(&mut out, 0, change.seq);
    let value = change.value.as_ref().map(|(v, ttl)| (v, *ttl));
    let pushed = wire::push_entry(&mut out, change.seq, &change.key, value);
    debug_assert!(pushed, "one change always fits a frame");
    out
}

/// A CHANGES body: one change, as a SYNC frame.
pub(crate) fn encode_change(change: &Change) -> Vec<u8> {
    sync_of(change)
}

/// An ANSWER body: the ANSWER frame, then the change the write made (if any) as a SYNC.
pub(crate) fn encode_answer(answer: Answer, change: Option<&Change>) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_answer(&mut out, &answer);
    if let Some(change) = change {
        out.extend_from_slice(&sync_of(change));
    }
    out
}

/// Decodes one SYNC frame of `tag`'s body.
fn decode_sync(tag: char, bytes: &[u8]) -> Result<Sync, HandoverError> {
    match frame::decode(bytes).map_err(|source| HandoverError::Frame { tag, source })? {
        Frame::Sync(Ok(sync)) => Ok(sync),
        Frame::Sync(Err(source)) => Err(HandoverError::State { tag, source }),
        other => Err(HandoverError::Kind {
            tag,
            found: other.name(),
        }),
    }
}

/// Decodes a CHANGES body: changes, not a snapshot.
pub(crate) fn decode_changes(body: &[u8]) -> Result<Sync, HandoverError> {
    let sync = decode_sync('S', body)?;
    if sync.flags & wire::SNAPSHOT != 0 {
        return Err(HandoverError::Kind {
            tag: 'S',
            found: "part of a snapshot",
        });
    }
    Ok(sync)
}

/// Decodes an ANSWER body: the answer, and the change its write made.
pub(crate) fn decode_answer(body: &[u8]) -> Result<(Answer, Option<SyncEntry>), HandoverError> {
    let tag = 'A';
    let first = match body.get(4..HEADER_LEN) {
        Some(len) => HEADER_LEN + u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize,
        None => body.len(),
    };
    let (answer, rest) = body.split_at(first.min(body.len()));
    let answer =
        match frame::decode(answer).map_err(|source| HandoverError::Frame { tag, source })? {
            Frame::Answer(Ok(answer)) => answer,
            Frame::Answer(Err(source)) => return Err(HandoverError::State { tag, source }),
            other => {
                return Err(HandoverError::Kind {
                    tag,
                    found: other.name(),
                })
            }
        };
    if rest.is_empty() {
        return Ok((answer, None));
    }
    let mut sync = decode_sync(tag, rest)?;
    if sync.flags != 0 || sync.entries.len() != 1 {
        return Err(HandoverError::Kind {
            tag,
            found: "changes other than its write's one",
        });
    }
    Ok((answer, sync.entries.pop()))
}

/// The MAP bodies of a snapshot: SYNC frames flagged as its parts (one at least).
pub(crate) fn encode_snapshot(entries: Vec<(String, Bytes, Option<Duration>)>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut frame = Vec::new();
    wire::begin_sync(&mut frame, wire::SNAPSHOT | wire::SNAPSHOT_FIRST, 0);
    for (key, value, ttl) in entries {
        if wire::push_entry(&mut frame, 0, &key, Some((&value, ttl))) {
            continue;
        }
        frames.push(std::mem::take(&mut frame));
        wire::begin_sync(&mut frame, wire::SNAPSHOT, 0);
        if !wire::push_entry(&mut frame, 0, &key, Some((&value, ttl))) {
            // Values are limited to what one frame holds: this cannot be.
            tracing::error!(
                key,
                "an entry too large for a frame: left out of the hand-over"
            );
        }
    }
    frame[HEADER_LEN] |= wire::SNAPSHOT_LAST;
    frames.push(frame);
    frames
}

/// Decodes a MAP body: part of a snapshot.
pub(crate) fn decode_snapshot(body: &[u8]) -> Result<Sync, HandoverError> {
    let sync = decode_sync('M', body)?;
    if sync.flags & wire::SNAPSHOT == 0 {
        return Err(HandoverError::Kind {
            tag: 'M',
            found: "changes, not a snapshot",
        });
    }
    Ok(sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn change(seq: u64, key: &str, value: Option<&str>) -> Change {
        Change {
            seq,
            key: Arc::from(key),
            value: value.map(|v| (Bytes::copy_from_slice(v.as_bytes()), None)),
        }
    }

    #[test]
    fn a_write_an_answer_with_its_change_and_a_change_cross_intact() {
        let write = Write::Increment {
            key: "hits".into(),
            by: 3,
            ttl: Some(Duration::from_secs(9)),
        };
        let body = encode_write(42, &write).unwrap();
        assert_eq!(decode_write(&body).unwrap(), (42, write));

        let answer = Answer {
            id: 7,
            seq: 99,
            result: Ok(Outcome::Counter(3)),
        };
        let with = encode_answer(answer.clone(), Some(&change(99, "hits", Some("3"))));
        let (decoded, entry) = decode_answer(&with).unwrap();
        assert_eq!(decoded, answer);
        let entry = entry.unwrap();
        assert_eq!((entry.key.as_str(), entry.seq), ("hits", 99));
        assert_eq!(entry.value.unwrap().0, Bytes::from_static(b"3"));
        let without = encode_answer(answer.clone(), None);
        assert_eq!(decode_answer(&without).unwrap(), (answer, None));

        let removal = decode_changes(&encode_change(&change(5, "gone", None))).unwrap();
        assert_eq!(removal.entries.len(), 1);
        assert!(removal.entries[0].value.is_none());
    }

    #[test]
    fn a_snapshot_spans_frames_first_to_last_and_an_empty_one_is_one_frame() {
        let big = Bytes::from(vec![b'x'; 20_000]);
        let entries: Vec<_> = (0..10)
            .map(|i| (format!("k{i}"), big.clone(), None))
            .collect();
        let frames = encode_snapshot(entries);
        assert!(frames.len() > 1);
        let mut keys = 0;
        for (i, body) in frames.iter().enumerate() {
            let sync = decode_snapshot(body).unwrap();
            assert_eq!(sync.flags & wire::SNAPSHOT_FIRST != 0, i == 0);
            assert_eq!(sync.flags & wire::SNAPSHOT_LAST != 0, i == frames.len() - 1);
            keys += sync.entries.len();
        }
        assert_eq!(keys, 10);
        let empty = encode_snapshot(Vec::new());
        assert_eq!(empty.len(), 1);
        let sync = decode_snapshot(&empty[0]).unwrap();
        assert_eq!(
            sync.flags,
            wire::SNAPSHOT | wire::SNAPSHOT_FIRST | wire::SNAPSHOT_LAST
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let write = encode_write(1, &Write::Delete { key: "k".into() }).unwrap();
        let answer = encode_answer(
            Answer {
                id: 1,
                seq: 1,
                result: Ok(Outcome::Stored),
            },
            Some(&change(1, "k", Some("v"))),
        );
        let sync = encode_change(&change(1, "k", Some("v")));
        let answer_alone = answer.len() - sync.len();
        for body in [&write, &answer, &sync] {
            // Every cut, and a huge declared length: an error each time (an answer cut
            // just before its change is an answer without one).
            for cut in 0..body.len() {
                assert!(decode_write(&body[..cut]).is_err());
                if cut != answer_alone || body != &answer {
                    assert!(decode_answer(&body[..cut]).is_err(), "cut at {cut}");
                }
                assert!(decode_changes(&body[..cut]).is_err());
                assert!(decode_snapshot(&body[..cut]).is_err());
            }
            let mut huge = body.clone();
            huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(decode_write(&huge).is_err());
            assert!(decode_answer(&huge).is_err());
            assert!(decode_changes(&huge).is_err());
        }
        // The wrong kind in the right place.
        assert!(matches!(
            decode_write(&sync),
            Err(HandoverError::Kind { .. })
        ));
        assert!(matches!(
            decode_changes(&write),
            Err(HandoverError::Kind { .. })
        ));
        assert!(
            decode_snapshot(&sync).is_err(),
            "changes are not a snapshot"
        );
        assert!(decode_changes(&encode_snapshot(Vec::new())[0]).is_err());
        let mut two = answer.clone();
        two.extend_from_slice(&sync);
        assert!(decode_answer(&two).is_err(), "one change per answer");
    }

    fn incr() -> Write {
        Write::Increment {
            key: "n".into(),
            by: 1,
            ttl: None,
        }
    }

    /// The next frame on a link: (tag, body).
    async fn next(frames: &mut LinkFrames) -> (u8, Vec<u8>) {
        let bytes = frames.recv().await.unwrap();
        (bytes[0], bytes[5..].to_vec())
    }

    fn local(authority: &Authority) -> oneshot::Receiver<Result<Outcome, StateError>> {
        let (tx, rx) = oneshot::channel();
        authority.submit(incr(), Waiter::Local(tx));
        rx
    }

    #[tokio::test]
    async fn forwarded_writes_apply_in_the_new_master_s_order_and_show_in_the_old_copy() {
        let (old, new) = (
            Authority::new(crate::state::StateLimits::default()),
            Authority::new(crate::state::StateLimits::default()),
        );
        local(&old).await.unwrap().unwrap();
        let (to_new, mut at_new) = Link::new();
        assert_eq!(old.hand_over(to_new), Ok(1));
        assert!(!old.is_authority());
        let (tag, map) = next(&mut at_new).await;
        assert_eq!(tag, tag::MAP);
        assert_eq!(new.restore_part(&map).unwrap(), (1, 0, true));
        let (to_old, mut at_old) = Link::new();
        new.serve_predecessor(to_old);
        // The old master's write goes over; a write of the new master's own meanwhile.
        let mut answered = local(&old);
        let (tag, write) = next(&mut at_new).await;
        assert_eq!(tag, tag::WRITE);
        local(&new).await.unwrap().unwrap();
        let (id, write) = decode_write(&write).unwrap();
        new.submit(write, Waiter::Predecessor { id });
        assert!(
            answered.try_recv().is_err(),
            "not answered before the new master's"
        );
        for _ in 0..2 {
            let (tag, body) = next(&mut at_old).await;
            old.on_successor_frame(tag, &body).unwrap();
        }
        assert_eq!(answered.await.unwrap(), Ok(Outcome::Counter(3)));
        assert_eq!(old.map().get("n"), Some(Bytes::from_static(b"3")));
        assert_eq!(new.map().get("n"), Some(Bytes::from_static(b"3")));
        // An answer to nothing waiting is an error, not a guess.
        let stray = encode_answer(
            Answer {
                id: 99,
                seq: 1,
                result: Ok(Outcome::Stored),
            },
            None,
        );
        assert!(matches!(
            old.on_successor_frame(tag::ANSWER, &stray),
            Err(HandoverError::Unknown(99))
        ));
    }

    #[tokio::test]
    async fn a_failed_upgrade_applies_the_unanswered_writes_once_and_the_answered_ones_never_again()
    {
        let (old, new) = (
            Authority::new(crate::state::StateLimits::default()),
            Authority::new(crate::state::StateLimits::default()),
        );
        let (to_new, mut at_new) = Link::new();
        old.hand_over(to_new).unwrap();
        let (_, map) = next(&mut at_new).await;
        new.restore_part(&map).unwrap();
        let (to_old, mut at_old) = Link::new();
        new.serve_predecessor(to_old);
        let (first, second) = (local(&old), local(&old));
        // The new master applies and answers the first, then is gone before the second.
        let (_, write) = next(&mut at_new).await;
        let (id, write) = decode_write(&write).unwrap();
        new.submit(write, Waiter::Predecessor { id });
        let (tag, body) = next(&mut at_old).await;
        old.on_successor_frame(tag, &body).unwrap();
        assert_eq!(first.await.unwrap(), Ok(Outcome::Counter(1)));
        old.take_back();
        assert!(old.is_authority());
        assert_eq!(second.await.unwrap(), Ok(Outcome::Counter(2)));
        assert_eq!(local(&old).await.unwrap(), Ok(Outcome::Counter(3)));
        // After READY, a new master that goes fails what waits, and what comes later.
        let (to_next, _at_next) = Link::new();
        old.hand_over(to_next).unwrap();
        let waiting = local(&old);
        old.successor_lost("gone");
        assert!(matches!(
            waiting.await.unwrap(),
            Err(StateError::Unavailable(_))
        ));
        assert!(matches!(
            local(&old).await.unwrap(),
            Err(StateError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_write_that_cannot_reach_the_new_master_before_ready_waits_then_is_applied_once() {
        let old = Authority::new(crate::state::StateLimits::default());
        let (to_new, at_new) = Link::new();
        old.hand_over(to_new).unwrap();
        // The link's writer is gone (the handshake broke): the write is held back, not
        // failed, and applied here once the upgrade has failed.
        drop(at_new);
        let mut held = local(&old);
        assert!(held.try_recv().is_err(), "held back, not failed");
        old.take_back();
        assert_eq!(held.await.unwrap(), Ok(Outcome::Counter(1)));
        assert_eq!(old.map().get("n"), Some(Bytes::from_static(b"1")));
        // READY with the link broken: the new master serves the map, so a write held back
        // fails (it went nowhere), and so does a later one; nothing changes here.
        let (to_next, at_next) = Link::new();
        old.hand_over(to_next).unwrap();
        drop(at_next);
        let held = local(&old);
        old.successor_ready();
        assert!(matches!(
            held.await.unwrap(),
            Err(StateError::Unavailable(_))
        ));
        assert!(matches!(
            local(&old).await.unwrap(),
            Err(StateError::Unavailable(_))
        ));
        assert_eq!(old.map().get("n"), Some(Bytes::from_static(b"1")));
    }
}
