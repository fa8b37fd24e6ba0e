//! The bodies of the shared map's three frames (see `docs/protocol.md`, "Shared state"):
//! STATE (worker → master: subscribe, or one write), SYNC (master → worker: numbered
//! changes, or part of a snapshot) and ANSWER (master → worker: what a write did, and the
//! change number its writer must have applied before it reads its own write).
//!
//! Decoding never fails the channel: a body a peer got wrong is a [`StateFault`], dropped
//! and counted by its receiver.

use std::time::Duration;

use bytes::Bytes;

use super::frame::{HEADER_LEN, MAX_FRAME_LEN};
use crate::state::{Outcome, StateError, Write};

/// The largest body of a state frame.
pub const MAX_BODY: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Bytes before the key of a STATE body.
pub const REQUEST_FIXED: usize = 24;
/// Bytes before the entries of a SYNC body.
pub const SYNC_FIXED: usize = 16;
/// Bytes before the key of one SYNC entry.
pub const ENTRY_FIXED: usize = 24;
/// Bytes before the text of an ANSWER body.
pub const ANSWER_FIXED: usize = 40;

const OP_SUBSCRIBE: u8 = 0;
const OP_SET: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_INCREMENT: u8 = 3;
const OP_COMPARE_AND_SET: u8 = 4;

const HAS_TTL: u8 = 1;
const HAS_EXPECTED: u8 = 2;
const HAS_NEW: u8 = 4;
const ENTRY_PRESENT: u8 = 1;

/// SYNC flags: the entries are part of a snapshot; the first part; the last part.
pub const SNAPSHOT: u8 = 1;
/// The first frame of a snapshot: the replica drops what it held.
pub const SNAPSHOT_FIRST: u8 = 2;
/// The last frame of a snapshot: the replica is complete as of `seq`.
pub const SNAPSHOT_LAST: u8 = 4;

/// A STATE frame. (`Frame` is public only to the benches, through `internals`; the
/// writes it carries stay crate-private.)
#[allow(private_interfaces)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Send me a snapshot, then every change.
    Subscribe,
    /// Apply `write` and answer `id`.
    Write {
        /// The worker's number for this write, echoed in the ANSWER.
        id: u64,
        /// What to apply.
        write: Write,
    },
}

/// One entry of a SYNC frame: what `key` holds from change `seq` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEntry {
    /// The change's number (a snapshot's entries carry the snapshot's).
    pub seq: u64,
    /// The key.
    pub key: String,
    /// Its value and remaining time to live; `None`: the key is gone.
    pub value: Option<(Bytes, Option<Duration>)>,
}

/// A SYNC frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// [`SNAPSHOT`], [`SNAPSHOT_FIRST`], [`SNAPSHOT_LAST`]; 0 for changes.
    pub flags: u8,
    /// A snapshot's change number; for changes, the last entry's.
    pub seq: u64,
    /// Entries, in order.
    pub entries: Vec<SyncEntry>,
}

/// An ANSWER frame.
#[allow(private_interfaces)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The write it answers.
    pub id: u64,
    /// The master's change number once the write was applied: the writer's replica shows
    /// the write once it applied this change.
    pub seq: u64,
    /// What the write did.
    pub result: Result<Outcome, StateError>,
}

/// Why a state frame's body was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateFault {
    /// Fewer bytes than its fixed part, or than its lengths say.
    #[error("a state frame body of {0} bytes is shorter than its fields")]
    TooShort(usize),
    /// Longer than a frame.
    #[error("a state frame longer than the {MAX_FRAME_LEN}-byte limit")]
    TooLong,
    /// Bytes left over after what its fields say.
    #[error("a state frame body with {0} bytes past its fields")]
    Trailing(usize),
    /// An operation or an answer code this build does not know.
    #[error("unknown state operation {0}")]
    Operation(u8),
    /// A key that is not UTF-8.
    #[error("a state key that is not UTF-8")]
    Key,
    /// The header's count is not the entries that arrived.
    #[error("a SYNC frame declares {declared} entries, {actual} arrived")]
    Count {
        /// From the header.
        declared: usize,
        /// Decoded.
        actual: usize,
    },
    /// A frame that does not travel in this direction.
    #[error("a state frame of kind {0} cannot come from this peer")]
    Direction(&'static str),
}

fn ttl_nanos(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX))
}

fn header(out: &mut Vec<u8>, kind: u8, count: u16) {
    out.clear();
    out.push(super::frame::VERSION);
    out.push(kind);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

fn finish(out: &mut [u8]) {
    let len = (out.len() - HEADER_LEN) as u32;
    out[4..8].copy_from_slice(&len.to_le_bytes());
}

/// Writes a STATE frame for `request` into `out` (cleared first); fails with
/// [`StateError::TooLarge`] when it would not fit a frame.
pub fn encode_request(out: &mut Vec<u8>, request: &Request) -> Result<(), StateError> {
    header(out, super::frame::KIND_STATE, 0);
    let (id, write) = match request {
        Request::Subscribe => {
            out.extend_from_slice(&[0; REQUEST_FIXED]);
            finish(out);
            return Ok(());
        }
        Request::Write { id, write } => (*id, write),
    };
    let key = write.key();
    let (op, ttl, mut flags) = match write {
        Write::Set { ttl, .. } => (OP_SET, *ttl, 0),
        Write::Delete { .. } => (OP_DELETE, None, 0),
        Write::Increment { ttl, .. } => (OP_INCREMENT, *ttl, 0),
        Write::CompareAndSet {
            ttl, expected, new, ..
        } => {
            let flags = if expected.is_some() { HAS_EXPECTED } else { 0 }
                | if new.is_some() { HAS_NEW } else { 0 };
            (OP_COMPARE_AND_SET, *ttl, flags)
        }
    };
    if ttl.is_some() {
        flags |= HAS_TTL;
    }
    let expected_len = match write {
        Write::CompareAndSet {
            expected: Some(e), ..
        } => e.len(),
        _ => 0,
    };
    let len = REQUEST_FIXED
        + key.len()
        + match write {
            Write::Set { value, .. } => value.len(),
            Write::Delete { .. } => 0,
            Write::Increment { .. } => 8,
            Write::CompareAndSet { new, .. } => expected_len + new.as_ref().map_or(0, Bytes::len),
        };
    if len > MAX_BODY || key.len() > usize::from(u16::MAX) {
        return Err(StateError::TooLarge {
            what: "write (key and values together)",
            len,
            limit: MAX_BODY - REQUEST_FIXED,
        });
    }
    out.extend_from_slice(&id.to_le_bytes());
    out.push(op);
    out.push(flags);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(expected_len as u32).to_le_bytes());
    out.extend_from_slice(&ttl_nanos(ttl).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    match write {
        Write::Set { value, .. } => out.extend_from_slice(value),
        Write::Delete { .. } => {}
        Write::Increment { by, .. } => out.extend_from_slice(&by.to_le_bytes()),
        Write::CompareAndSet { expected, new, .. } => {
            out.extend_from_slice(expected.as_deref().unwrap_or_default());
            out.extend_from_slice(new.as_deref().unwrap_or_default());
        }
    }
    finish(out);
    Ok(())
}

fn u16_at(body: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(body[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(body: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(body: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"))
}

fn key_at(body: &[u8], at: usize, len: usize) -> Result<String, StateFault> {
    let bytes = body
        .get(at..at + len)
        .ok_or(StateFault::TooShort(body.len()))?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| StateFault::Key)
}

/// Parses a STATE body.
pub fn decode_request(body: &[u8]) -> Result<Request, StateFault> {
    if body.len() < REQUEST_FIXED {
        return Err(StateFault::TooShort(body.len()));
    }
    let (id, op, flags) = (u64_at(body, 0), body[8], body[9]);
    let key_len = usize::from(u16_at(body, 10));
    let expected_len = u32_at(body, 12) as usize;
    let ttl = (flags & HAS_TTL != 0).then(|| Duration::from_nanos(u64_at(body, 16)));
    if op == OP_SUBSCRIBE {
        return match body.len() - REQUEST_FIXED {
            0 => Ok(Request::Subscribe),
            extra => Err(StateFault::Trailing(extra)),
        };
    }
    let key = key_at(body, REQUEST_FIXED, key_len)?;
    let rest = &body[REQUEST_FIXED + key_len..];
    let exact = |want: usize| match rest.len().cmp(&want) {
        std::cmp::Ordering::Less => Err(StateFault::TooShort(body.len())),
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(StateFault::Trailing(rest.len() - want)),
    };
    let write = match op {
        OP_SET => Write::Set {
            key,
            value: Bytes::copy_from_slice(rest),
            ttl,
        },
        OP_DELETE => {
            exact(0)?;
            Write::Delete { key }
        }
        OP_INCREMENT => {
            exact(8)?;
            Write::Increment {
                key,
                by: i64::from_le_bytes(rest.try_into().expect("8 bytes")),
                ttl,
            }
        }
        OP_COMPARE_AND_SET => {
            if rest.len() < expected_len {
                return Err(StateFault::TooShort(body.len()));
            }
            let (expected, new) = rest.split_at(expected_len);
            if flags & HAS_EXPECTED == 0 && !expected.is_empty() {
                return Err(StateFault::Trailing(expected.len()));
            }
            if flags & HAS_NEW == 0 && !new.is_empty() {
                return Err(StateFault::Trailing(new.len()));
            }
            Write::CompareAndSet {
                key,
                expected: (flags & HAS_EXPECTED != 0).then(|| Bytes::copy_from_slice(expected)),
                new: (flags & HAS_NEW != 0).then(|| Bytes::copy_from_slice(new)),
                ttl,
            }
        }
        other => return Err(StateFault::Operation(other)),
    };
    Ok(Request::Write { id, write })
}

/// Starts a SYNC frame in `out` (cleared first): `flags`, `seq`, no entries yet.
pub fn begin_sync(out: &mut Vec<u8>, flags: u8, seq: u64) {
    header(out, super::frame::KIND_SYNC, 0);
    out.push(flags);
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(&seq.to_le_bytes());
    finish(out);
}

/// Bytes one entry takes in a SYNC frame.
pub fn entry_len(key: &str, value: Option<&Bytes>) -> usize {
    ENTRY_FIXED + key.len() + value.map_or(0, Bytes::len)
}

/// Appends an entry to the SYNC frame in `out` if it fits a frame (and the header's
/// count); false if it does not (start another frame).
pub fn push_entry(
    out: &mut Vec<u8>,
    seq: u64,
    key: &str,
    value: Option<(&Bytes, Option<Duration>)>,
) -> bool {
    let count = u16_at(out, 2);
    if out.len() + entry_len(key, value.map(|(v, _)| v)) > MAX_FRAME_LEN || count == u16::MAX {
        return false;
    }
    out.extend_from_slice(&seq.to_le_bytes());
    let (present, ttl, len) = match value {
        Some((v, ttl)) => (ENTRY_PRESENT, ttl, v.len()),
        None => (0, None, 0),
    };
    out.push(present | if ttl.is_some() { 2 } else { 0 });
    out.push(0);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&ttl_nanos(ttl).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Some((v, _)) = value {
        out.extend_from_slice(v);
    }
    out[2..4].copy_from_slice(&(count + 1).to_le_bytes());
    // The frame's seq is its last entry's (a snapshot keeps its own).
    if out[HEADER_LEN] & SNAPSHOT == 0 {
        out[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&seq.to_le_bytes());
    }
    finish(out);
    true
}

/// Parses a SYNC body whose header declares `count` entries.
pub fn decode_sync(count: usize, body: &[u8]) -> Result<Sync, StateFault> {
    if body.len() < SYNC_FIXED {
        return Err(StateFault::TooShort(body.len()));
    }
    let flags = body[0];
    if flags & !(SNAPSHOT | SNAPSHOT_FIRST | SNAPSHOT_LAST) != 0
        || (flags != 0 && flags & SNAPSHOT == 0)
    {
        return Err(StateFault::Operation(flags));
    }
    let seq = u64_at(body, 8);
    let mut entries = Vec::with_capacity(count.min(body.len() / ENTRY_FIXED));
    let mut at = SYNC_FIXED;
    while at < body.len() {
        if body.len() - at < ENTRY_FIXED {
            return Err(StateFault::TooShort(body.len()));
        }
        let entry_flags = body[at + 8];
        let key_len = usize::from(u16_at(body, at + 10));
        let value_len = u32_at(body, at + 12) as usize;
        let ttl = (entry_flags & 2 != 0).then(|| Duration::from_nanos(u64_at(body, at + 16)));
        let key = key_at(body, at + ENTRY_FIXED, key_len)?;
        let start = at + ENTRY_FIXED + key_len;
        let value = body
            .get(start..start + value_len)
            .ok_or(StateFault::TooShort(body.len()))?;
        let value = match entry_flags & ENTRY_PRESENT {
            0 if value_len > 0 => return Err(StateFault::Trailing(value_len)),
            0 => None,
            _ => Some((Bytes::copy_from_slice(value), ttl)),
        };
        entries.push(SyncEntry {
            seq: u64_at(body, at),
            key,
            value,
        });
        at = start + value_len;
    }
    if entries.len() != count {
        return Err(StateFault::Count {
            declared: count,
            actual: entries.len(),
        });
    }
    Ok(Sync {
        flags,
        seq,
        entries,
    })
}

const CODE_STORED: u8 = 0;
const CODE_DELETED: u8 = 1;
const CODE_COUNTER: u8 = 2;
const CODE_SWAPPED: u8 = 3;
const CODE_TOO_LARGE: u8 = 16;
const CODE_FULL: u8 = 17;
const CODE_NOT_AN_INTEGER: u8 = 18;
const CODE_REFUSED: u8 = 19;

/// Writes an ANSWER frame into `out` (cleared first).
pub fn encode_answer(out: &mut Vec<u8>, answer: &Answer) {
    header(out, super::frame::KIND_ANSWER, 0);
    let (code, a, b, text): (u8, i64, u64, &str) = match &answer.result {
        Ok(Outcome::Stored) => (CODE_STORED, 0, 0, ""),
        Ok(Outcome::Deleted(was)) => (CODE_DELETED, i64::from(*was), 0, ""),
        Ok(Outcome::Counter(value)) => (CODE_COUNTER, *value, 0, ""),
        Ok(Outcome::Swapped(swapped)) => (CODE_SWAPPED, i64::from(*swapped), 0, ""),
        Err(StateError::TooLarge { what, len, limit }) => {
            (CODE_TOO_LARGE, *len as i64, *limit as u64, what)
        }
        Err(StateError::Full { limit }) => (CODE_FULL, 0, *limit as u64, ""),
        Err(StateError::NotAnInteger(key)) => (CODE_NOT_AN_INTEGER, 0, 0, key),
        Err(_) => (CODE_REFUSED, 0, 0, ""),
    };
    let text = match &answer.result {
        Err(StateError::Unavailable(why)) => why.as_str(),
        Err(StateError::Timeout(_) | StateError::Encoding(_)) => "the master refused the write",
        _ => text,
    };
    out.extend_from_slice(&answer.id.to_le_bytes());
    out.extend_from_slice(&answer.seq.to_le_bytes());
    out.push(code);
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    let room = MAX_BODY - ANSWER_FIXED;
    out.extend_from_slice(&text.as_bytes()[..text.len().min(room)]);
    finish(out);
}

/// Parses an ANSWER body.
pub fn decode_answer(body: &[u8]) -> Result<Answer, StateFault> {
    if body.len() < ANSWER_FIXED {
        return Err(StateFault::TooShort(body.len()));
    }
    let (id, seq, code) = (u64_at(body, 0), u64_at(body, 8), body[16]);
    let a = u64_at(body, 24) as i64;
    let b = u64_at(body, 32);
    let text = String::from_utf8_lossy(&body[ANSWER_FIXED..]).into_owned();
    let result = match code {
        CODE_STORED => Ok(Outcome::Stored),
        CODE_DELETED => Ok(Outcome::Deleted(a != 0)),
        CODE_COUNTER => Ok(Outcome::Counter(a)),
        CODE_SWAPPED => Ok(Outcome::Swapped(a != 0)),
        CODE_TOO_LARGE => Err(StateError::TooLarge {
            what: match text.as_str() {
                "key" => "key",
                "value" => "value",
                _ => "write (key and values together)",
            },
            len: a as usize,
            limit: b as usize,
        }),
        CODE_FULL => Err(StateError::Full { limit: b as usize }),
        CODE_NOT_AN_INTEGER => Err(StateError::NotAnInteger(text)),
        CODE_REFUSED => Err(StateError::Unavailable(text)),
        other => return Err(StateFault::Operation(other)),
    };
    Ok(Answer { id, seq, result })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::frame::{decode, Frame};
    use proptest::prelude::*;

    fn writes() -> Vec<Write> {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        vec![
            Write::Set {
                key: "k".into(),
                value: b("value"),
                ttl: Some(Duration::from_millis(1500)),
            },
            Write::Set {
                key: "é".into(),
                value: Bytes::new(),
                ttl: None,
            },
            Write::Delete { key: "gone".into() },
            Write::Increment {
                key: "n".into(),
                by: -7,
                ttl: None,
            },
            Write::CompareAndSet {
                key: "c".into(),
                expected: Some(b("old")),
                new: Some(b("")),
                ttl: Some(Duration::from_secs(3600)),
            },
            Write::CompareAndSet {
                key: "c".into(),
                expected: None,
                new: None,
                ttl: None,
            },
        ]
    }

    #[test]
    fn requests_round_trip_through_a_frame() {
        let mut buf = Vec::new();
        encode_request(&mut buf, &Request::Subscribe).unwrap();
        assert_eq!(decode(&buf), Ok(Frame::State(Ok(Request::Subscribe))));
        for (id, write) in writes().into_iter().enumerate() {
            let request = Request::Write {
                id: id as u64 + 1,
                write,
            };
            encode_request(&mut buf, &request).unwrap();
            assert_eq!(decode(&buf), Ok(Frame::State(Ok(request))));
        }
    }

    #[test]
    fn a_write_that_cannot_fit_a_frame_is_refused_before_it_is_sent() {
        let write = Write::CompareAndSet {
            key: "c".into(),
            expected: Some(Bytes::from(vec![0; 40_000])),
            new: Some(Bytes::from(vec![0; 40_000])),
            ttl: None,
        };
        let mut buf = Vec::new();
        let err = encode_request(&mut buf, &Request::Write { id: 1, write }).unwrap_err();
        assert!(
            matches!(err, StateError::TooLarge { len: 80_025, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn sync_frames_batch_entries_until_a_frame_is_full() {
        let mut buf = Vec::new();
        begin_sync(&mut buf, 0, 0);
        let value = Bytes::from(vec![7u8; 20_000]);
        assert!(push_entry(&mut buf, 5, "a", Some((&value, None))));
        assert!(push_entry(&mut buf, 6, "b", None));
        let ttl = Some(Duration::from_nanos(123_456_789));
        assert!(push_entry(&mut buf, 7, "c", Some((&value, ttl))));
        assert!(push_entry(&mut buf, 8, "d", Some((&value, None))));
        assert!(!push_entry(&mut buf, 9, "e", Some((&value, None))), "full");
        let Ok(Frame::Sync(Ok(sync))) = decode(&buf) else {
            panic!("{:?}", decode(&buf))
        };
        assert_eq!((sync.flags, sync.seq, sync.entries.len()), (0, 8, 4));
        assert_eq!(sync.entries[1].value, None);
        assert_eq!(sync.entries[2].value, Some((value, ttl)));
        assert_eq!(sync.entries[3].key, "d");
        begin_sync(&mut buf, SNAPSHOT | SNAPSHOT_FIRST | SNAPSHOT_LAST, 42);
        let Ok(Frame::Sync(Ok(empty))) = decode(&buf) else {
            panic!()
        };
        assert_eq!((empty.seq, empty.entries.len()), (42, 0));
    }

    #[test]
    fn answers_round_trip_every_outcome_and_error() {
        let results = [
            Ok(Outcome::Stored),
            Ok(Outcome::Deleted(true)),
            Ok(Outcome::Counter(-5)),
            Ok(Outcome::Swapped(false)),
            Err(StateError::TooLarge {
                what: "value",
                len: 70_000,
                limit: 61_440,
            }),
            Err(StateError::Full { limit: 1 << 26 }),
            Err(StateError::NotAnInteger("hits".into())),
            Err(StateError::Unavailable("malformed".into())),
        ];
        let mut buf = Vec::new();
        for result in results {
            let answer = Answer {
                id: 3,
                seq: 99,
                result,
            };
            encode_answer(&mut buf, &answer);
            assert_eq!(decode(&buf), Ok(Frame::Answer(Ok(answer))));
        }
    }

    #[test]
    fn what_a_peer_got_wrong_is_a_fault_not_a_broken_channel() {
        let mut buf = Vec::new();
        let write = writes().remove(3);
        encode_request(&mut buf, &Request::Write { id: 1, write }).unwrap();
        let body = buf[HEADER_LEN..].to_vec();
        assert_eq!(decode_request(&body[..10]), Err(StateFault::TooShort(10)));
        let mut bad = body.clone();
        bad[8] = 77;
        assert_eq!(decode_request(&bad), Err(StateFault::Operation(77)));
        let mut bad = body.clone();
        bad.push(0);
        assert_eq!(decode_request(&bad), Err(StateFault::Trailing(1)));
        let mut bad = body.clone();
        bad[REQUEST_FIXED] = 0xff;
        assert_eq!(decode_request(&bad), Err(StateFault::Key));
        let mut bad = body.clone();
        bad[10] = 200;
        assert!(matches!(decode_request(&bad), Err(StateFault::TooShort(_))));
        assert!(matches!(
            decode_sync(1, &[1; 16]),
            Err(StateFault::Operation(1) | StateFault::Count { .. })
        ));
        assert_eq!(
            decode_sync(2, &[0; 16]),
            Err(StateFault::Count {
                declared: 2,
                actual: 0
            })
        );
        assert!(decode_answer(&[0; 39]).is_err());
        let mut answer = vec![0; ANSWER_FIXED];
        answer[16] = 200;
        assert_eq!(decode_answer(&answer), Err(StateFault::Operation(200)));
    }

    proptest! {
        #[test]
        fn decoding_any_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), count in 0usize..8) {
            let _ = decode_request(&body);
            let _ = decode_sync(count, &body);
            let _ = decode_answer(&body);
        }
    }
}
