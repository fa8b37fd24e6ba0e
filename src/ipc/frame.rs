//! The wire format of the master–worker channel (see `docs/protocol.md`). Each frame is one
//! `SOCK_SEQPACKET` datagram: an 8-byte header, then a body whose length the header states.
//! Decoding checks everything a peer controls and never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::message::{Message, MessageFault, ENVELOPE_LEN, MAX_PAYLOAD};
use super::state::{self, Answer, Request, StateFault, Sync};
use crate::sys::scm::MAX_FDS;
use crate::sys::socket::Peer;

/// The protocol version in every header.
pub const VERSION: u8 = 1;
/// Bytes of the header: version u8, kind u8, count u16, body length u32 (little-endian).
pub const HEADER_LEN: usize = 8;
/// Bytes of one connection entry in a [`Frame::Connections`] body.
pub const CONNECTION_ENTRY_LEN: usize = 32;
/// The largest frame either side sends: a message with the largest payload (a full batch
/// of connections is 8,104 bytes).
pub const MAX_FRAME_LEN: usize = HEADER_LEN + ENVELOPE_LEN + MAX_PAYLOAD;
/// Bytes of one histogram sample in a [`Frame::Samples`] body: a metric's slot (u32) and
/// the value (f64).
pub const SAMPLE_LEN: usize = 12;
/// Bytes of a [`Frame::Status`] body.
pub const STATUS_BODY_LEN: usize = 16;

const KIND_CONNECTIONS: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_STATUS: u8 = 3;
const KIND_LISTENERS: u8 = 4;
const KIND_DRAINING: u8 = 5;
const KIND_REFUSED: u8 = 6;
const KIND_COUNTERS: u8 = 7;
pub(crate) const KIND_MESSAGE: u8 = 8;
const KIND_METRICS: u8 = 10;
const KIND_SAMPLES: u8 = 11;
const KIND_LOADS: u8 = 9;
const KIND_HANDBACK: u8 = 12;
/// The most bytes a [`Frame::HandBack`] carries after its entry: what fits the largest
/// frame (65,520).
pub const MAX_HANDBACK_BYTES: usize = MAX_FRAME_LEN - HEADER_LEN - CONNECTION_ENTRY_LEN;
pub(crate) const KIND_STATE: u8 = 13;
pub(crate) const KIND_SYNC: u8 = 14;
pub(crate) const KIND_ANSWER: u8 = 15;
/// Bytes of a [`Frame::Loads`] body.
pub const LOADS_BODY_LEN: usize = 8;

/// One handed-off connection, as described next to its fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionHeader {
    /// The master's id for the connection, increasing; acknowledged back by the worker.
    pub id: u64,
    /// Index of the listener (in `--listen` order) that accepted it.
    pub listener: u16,
    /// The client's address.
    pub peer: Peer,
}

/// A worker's report: what it has received and how many connections it has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Connections received on this channel since the worker started (cumulative); the
    /// master releases its copies of that many, oldest first.
    pub received_total: u64,
    /// Connections the worker has finished since it started (cumulative).
    pub closed_total: u64,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// master → worker: connections, one fd each, in the same order as the entries.
    Connections(Vec<ConnectionHeader>),
    /// worker → master: initialised, send connections.
    Ready,
    /// worker → master: acknowledgement and load report; also the heartbeat.
    Status(Status),
    /// master → worker, only in the kernel baseline modes: listening sockets (one fd each,
    /// `id` 0, `peer` the local address) the worker accepts on itself.
    Listeners(Vec<ConnectionHeader>),
    /// worker → master: draining on its own (e.g. SIGTERM): it takes no more connections.
    /// Its status is final for receiving: every connection it has not acknowledged by this
    /// frame goes back to the master.
    Draining(Status),
    /// worker → master: the worker could not take the last `count` connections of the
    /// CONNECTIONS frame it just received (its fd table is full: the kernel dropped their
    /// fds, `MSG_CTRUNC`). The status applies first; then the `count` oldest connections the
    /// master still holds unacknowledged for it go back to the master, which hands them to
    /// another worker.
    Refused {
        /// The worker's totals, as in STATUS.
        status: Status,
        /// Connections refused, 1 to 253.
        count: u16,
    },
    /// worker → master, once, before READY: the fd of a sealed memfd where the worker keeps
    /// its received and finished totals (see `sys::shm`), so the master reads them without
    /// a frame per connection. Optional: a worker that never sends it reports by STATUS.
    Counters,
    /// Either way: a message between the workers' code and the master's (see
    /// [`super::message`]). A message the peer got wrong arrives as its fault, to be dropped
    /// and counted, not as a broken channel.
    Message(Result<Message, MessageFault>),
    /// worker → master, once, before READY: the fd of a sealed memfd holding the worker's
    /// `metrics` counters and gauges (see `sys::shm::MetricsRegion`). Optional.
    Metrics,
    /// worker → master: histogram samples recorded since the last such frame, each a metric
    /// slot of the worker's metrics region and a value.
    Samples(Vec<(u32, f64)>),
    /// master → worker, only in `kernel-least`, before LISTENERS: the fd of the load array
    /// (a `BPF_F_MMAPABLE` BPF array map of one element of `value_len` bytes), where the
    /// worker subtracts 1 from the 64-bit word `word` when a connection finishes.
    Loads {
        /// The index of this worker's slot's 64-bit word in the value.
        word: u32,
        /// The value's length in bytes, a multiple of 8, to map.
        value_len: u32,
    },
    /// Either way, one fd: a connection handed back with the bytes already read from it.
    /// worker → master: a draining worker gives up an idle keep-alive connection at a
    /// request boundary, for another worker. master → worker: such a connection, whose
    /// `bytes` the worker presents as the first ones read from it (a connection handed back
    /// with no bytes travels in an ordinary CONNECTIONS frame).
    HandBack {
        /// The connection: its id, listener and peer.
        entry: ConnectionHeader,
        /// Bytes already read from it and not yet used, at most [`MAX_HANDBACK_BYTES`].
        bytes: Vec<u8>,
    },
    /// worker → master: subscribe to the shared map, or one write to it (see
    /// [`super::state`]). A body the peer got wrong arrives as its fault, to be dropped.
    State(Result<Request, StateFault>),
    /// master → worker: numbered changes to the shared map, or part of a snapshot.
    Sync(Result<Sync, StateFault>),
    /// master → worker: what a write did.
    Answer(Result<Answer, StateFault>),
}

impl Frame {
    /// The frame's kind, by name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Connections(_) => "connections",
            Frame::Ready => "ready",
            Frame::Status(_) => "status",
            Frame::Listeners(_) => "listeners",
            Frame::Draining(_) => "draining",
            Frame::Refused { .. } => "refused",
            Frame::Counters => "counters",
            Frame::Message(_) => "message",
            Frame::Metrics => "metrics",
            Frame::Samples(_) => "samples",
            Frame::Loads { .. } => "loads",
            Frame::HandBack { .. } => "handback",
            Frame::State(_) => "state",
            Frame::Sync(_) => "sync",
            Frame::Answer(_) => "answer",
        }
    }
}

/// Why a datagram is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame of {0} bytes is shorter than the 8-byte header")]
    TooShort(usize),
    /// The datagram did not fit the receive buffer.
    #[error("frame longer than the {MAX_FRAME_LEN}-byte limit")]
    TooLong,
    /// A version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A kind this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The header's body length is not the body that arrived.
    #[error("header declares a {declared}-byte body, {actual} bytes arrived")]
    BodyLength {
        /// From the header.
        declared: usize,
        /// In the datagram.
        actual: usize,
    },
    /// The body does not have the size its kind and count require.
    #[error("{kind} frame with count {count} cannot have a {len}-byte body")]
    Shape {
        /// The frame's kind, by name.
        kind: &'static str,
        /// The header's count.
        count: usize,
        /// The body's length.
        len: usize,
    },
    /// A connection entry with an unknown address family.
    #[error("connection entry with unknown address family {0}")]
    Family(u8),
}

fn header(out: &mut Vec<u8>, kind: u8, count: u16, body_len: usize) {
    out.clear();
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
}

/// Writes a [`Frame::Connections`] frame for `entries` into `out` (cleared first).
pub fn encode_connections(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = ConnectionHeader>,
) {
    encode_entries(out, KIND_CONNECTIONS, entries);
}

/// Writes a [`Frame::Listeners`] frame for `entries` into `out` (cleared first).
pub fn encode_listeners(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = ConnectionHeader>,
) {
    encode_entries(out, KIND_LISTENERS, entries);
}

fn encode_entries(
    out: &mut Vec<u8>,
    kind: u8,
    entries: impl ExactSizeIterator<Item = ConnectionHeader>,
) {
    let count = entries.len();
    debug_assert!(count <= MAX_FDS);
    header(out, kind, count as u16, count * CONNECTION_ENTRY_LEN);
    for entry in entries {
        let mut slot = [0u8; CONNECTION_ENTRY_LEN];
        slot[0..8].copy_from_slice(&entry.id.to_le_bytes());
        slot[8..10].copy_from_slice(&entry.listener.to_le_bytes());
        match entry.peer {
            Peer::Unix => slot[10] = 0,
            Peer::Ip(addr) => {
                slot[12..14].copy_from_slice(&addr.port().to_le_bytes());
                match addr.ip() {
                    IpAddr::V4(ip) => {
                        slot[10] = 4;
                        slot[16..20].copy_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        slot[10] = 6;
                        slot[16..32].copy_from_slice(&ip.octets());
                    }
                }
            }
        }
        out.extend_from_slice(&slot);
    }
}

/// Writes a [`Frame::HandBack`] frame for `entry` and `bytes` (at most
/// [`MAX_HANDBACK_BYTES`]) into `out` (cleared first); the connection's fd goes with it.
pub fn encode_hand_back(out: &mut Vec<u8>, entry: ConnectionHeader, bytes: &[u8]) {
    debug_assert!(bytes.len() <= MAX_HANDBACK_BYTES);
    encode_entries(out, KIND_HANDBACK, std::iter::once(entry));
    out.extend_from_slice(bytes);
    let body_len = (out.len() - HEADER_LEN) as u32;
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
}

/// Writes a [`Frame::Ready`] frame into `out` (cleared first).
pub fn encode_ready(out: &mut Vec<u8>) {
    header(out, KIND_READY, 0, 0);
}

/// Writes a [`Frame::Counters`] frame into `out` (cleared first); its fd goes with it.
pub fn encode_counters(out: &mut Vec<u8>) {
    header(out, KIND_COUNTERS, 1, 0);
}

/// Writes a [`Frame::Metrics`] frame into `out` (cleared first); its fd goes with it.
pub fn encode_metrics(out: &mut Vec<u8>) {
    header(out, KIND_METRICS, 1, 0);
}

/// Writes a [`Frame::Message`] frame for `message` into `out` (cleared first).
pub fn encode_message(out: &mut Vec<u8>, message: &Message) {
    header(out, KIND_MESSAGE, 0, ENVELOPE_LEN + message.payload.len());
    message.encode_body(out);
}

/// Writes a [`Frame::Samples`] frame into `out` (cleared first): at most
/// [`MAX_PAYLOAD`] / [`SAMPLE_LEN`] samples, the rest are the caller's to send next.
pub fn encode_samples(out: &mut Vec<u8>, samples: &[(u32, f64)]) {
    debug_assert!(samples.len() * SAMPLE_LEN <= MAX_PAYLOAD);
    header(out, KIND_SAMPLES, 0, samples.len() * SAMPLE_LEN);
    for (slot, value) in samples {
        out.extend_from_slice(&slot.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Writes a [`Frame::Loads`] frame into `out` (cleared first); its fd goes with it.
pub fn encode_loads(out: &mut Vec<u8>, word: u32, value_len: u32) {
    header(out, KIND_LOADS, 1, LOADS_BODY_LEN);
    out.extend_from_slice(&word.to_le_bytes());
    out.extend_from_slice(&value_len.to_le_bytes());
}

/// Writes a [`Frame::Status`] frame into `out` (cleared first).
pub fn encode_status(out: &mut Vec<u8>, status: Status) {
    encode_status_kind(out, KIND_STATUS, status);
}

/// Writes a [`Frame::Draining`] frame into `out` (cleared first).
pub fn encode_draining(out: &mut Vec<u8>, status: Status) {
    encode_status_kind(out, KIND_DRAINING, status);
}

/// Writes a [`Frame::Refused`] frame into `out` (cleared first).
pub fn encode_refused(out: &mut Vec<u8>, status: Status, count: u16) {
    header(out, KIND_REFUSED, count, STATUS_BODY_LEN);
    encode_status_body(out, status);
}

fn encode_status_kind(out: &mut Vec<u8>, kind: u8, status: Status) {
    header(out, kind, 0, STATUS_BODY_LEN);
    encode_status_body(out, status);
}

fn encode_status_body(out: &mut Vec<u8>, status: Status) {
    out.extend_from_slice(&status.received_total.to_le_bytes());
    out.extend_from_slice(&status.closed_total.to_le_bytes());
}

/// Decodes one datagram, checking version, kind, body length and shape. The fd count a
/// [`Frame::Connections`] declares is checked against the fds that arrived by the caller
/// (`Channel::recv_frame`), which holds them.
pub fn decode(datagram: &[u8]) -> Result<Frame, FrameError> {
    if datagram.len() < HEADER_LEN {
        return Err(FrameError::TooShort(datagram.len()));
    }
    if datagram[0] != VERSION {
        return Err(FrameError::Version(datagram[0]));
    }
    let kind = datagram[1];
    let count = u16::from_le_bytes([datagram[2], datagram[3]]) as usize;
    let declared =
        u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) as usize;
    let body = &datagram[HEADER_LEN..];
    if declared != body.len() {
        return Err(FrameError::BodyLength {
            declared,
            actual: body.len(),
        });
    }
    let shape = |kind: &'static str| FrameError::Shape {
        kind,
        count,
        len: body.len(),
    };
    match kind {
        KIND_CONNECTIONS | KIND_LISTENERS => {
            let name = if kind == KIND_CONNECTIONS {
                "connections"
            } else {
                "listeners"
            };
            if count == 0 || count > MAX_FDS || body.len() != count * CONNECTION_ENTRY_LEN {
                return Err(shape(name));
            }
            let entries = body
                .chunks_exact(CONNECTION_ENTRY_LEN)
                .map(decode_entry)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if kind == KIND_CONNECTIONS {
                Frame::Connections(entries)
            } else {
                Frame::Listeners(entries)
            })
        }
        KIND_READY if count == 0 && body.is_empty() => Ok(Frame::Ready),
        KIND_READY => Err(shape("ready")),
        KIND_COUNTERS if count == 1 && body.is_empty() => Ok(Frame::Counters),
        KIND_COUNTERS => Err(shape("counters")),
        KIND_METRICS if count == 1 && body.is_empty() => Ok(Frame::Metrics),
        KIND_METRICS => Err(shape("metrics")),
        KIND_MESSAGE if count == 0 => Ok(Frame::Message(Message::parse(body))),
        KIND_MESSAGE => Err(shape("message")),
        KIND_SAMPLES if count == 0 && body.len() % SAMPLE_LEN == 0 && body.len() <= MAX_PAYLOAD => {
            Ok(Frame::Samples(
                body.chunks_exact(SAMPLE_LEN).map(decode_sample).collect(),
            ))
        }
        KIND_SAMPLES => Err(shape("samples")),
        KIND_LOADS if count == 1 && body.len() == LOADS_BODY_LEN => {
            let word = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
            let value_len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
            if value_len == 0 || value_len % 8 != 0 || u64::from(word) * 8 >= u64::from(value_len) {
                return Err(shape("loads"));
            }
            Ok(Frame::Loads { word, value_len })
        }
        KIND_LOADS => Err(shape("loads")),
        KIND_HANDBACK
            if count == 1
                && body.len() >= CONNECTION_ENTRY_LEN
                && body.len() - CONNECTION_ENTRY_LEN <= MAX_HANDBACK_BYTES =>
        {
            let (entry, bytes) = body.split_at(CONNECTION_ENTRY_LEN);
            Ok(Frame::HandBack {
                entry: decode_entry(entry)?,
                bytes: bytes.to_vec(),
            })
        }
        KIND_HANDBACK => Err(shape("handback")),
        KIND_STATE if count == 0 => Ok(Frame::State(state::decode_request(body))),
        KIND_STATE => Err(shape("state")),
        KIND_SYNC => Ok(Frame::Sync(state::decode_sync(count, body))),
        KIND_ANSWER if count == 0 => Ok(Frame::Answer(state::decode_answer(body))),
        KIND_ANSWER => Err(shape("answer")),
        KIND_STATUS | KIND_DRAINING if count == 0 && body.len() == STATUS_BODY_LEN => {
            let status = decode_status(body);
            Ok(if kind == KIND_STATUS {
                Frame::Status(status)
            } else {
                Frame::Draining(status)
            })
        }
        KIND_REFUSED if (1..=MAX_FDS).contains(&count) && body.len() == STATUS_BODY_LEN => {
            Ok(Frame::Refused {
                status: decode_status(body),
                count: count as u16,
            })
        }
        KIND_STATUS => Err(shape("status")),
        KIND_DRAINING => Err(shape("draining")),
        KIND_REFUSED => Err(shape("refused")),
        other => Err(FrameError::UnknownKind(other)),
    }
}

fn decode_sample(sample: &[u8]) -> (u32, f64) {
    (
        u32::from_le_bytes(sample[0..4].try_into().expect("4 bytes")),
        f64::from_le_bytes(sample[4..12].try_into().expect("8 bytes")),
    )
}

fn decode_status(body: &[u8]) -> Status {
    Status {
        received_total: u64::from_le_bytes(body[0..8].try_into().expect("8 bytes")),
        closed_total: u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
    }
}

fn decode_entry(slot: &[u8]) -> Result<ConnectionHeader, FrameError> {
    let id = u64::from_le_bytes(slot[0..8].try_into().expect("8 bytes"));
    let listener = u16::from_le_bytes([slot[8], slot[9]]);
    let port = u16::from_le_bytes([slot[12], slot[13]]);
    let peer = match slot[10] {
        0 => Peer::Unix,
        4 => {
            let ip = Ipv4Addr::new(slot[16], slot[17], slot[18], slot[19]);
            Peer::Ip(SocketAddr::new(ip.into(), port))
        }
        6 => {
            let octets: [u8; 16] = slot[16..32].try_into().expect("16 bytes");
            Peer::Ip(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        family => return Err(FrameError::Family(family)),
    };
    Ok(ConnectionHeader { id, listener, peer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(id: u64, peer: &str) -> ConnectionHeader {
        ConnectionHeader {
            id,
            listener: 1,
            peer: Peer::Ip(peer.parse().unwrap()),
        }
    }

    #[test]
    fn connections_round_trip_for_every_family() {
        let entries = vec![
            entry(1, "127.0.0.1:4000"),
            entry(2, "[::1]:5000"),
            ConnectionHeader {
                id: 3,
                listener: 0,
                peer: Peer::Unix,
            },
        ];
        let mut buf = Vec::new();
        encode_connections(&mut buf, entries.clone().into_iter());
        assert_eq!(buf.len(), HEADER_LEN + 3 * CONNECTION_ENTRY_LEN);
        assert_eq!(decode(&buf), Ok(Frame::Connections(entries)));
    }

    #[test]
    fn draining_round_trips_with_its_final_status() {
        let mut buf = Vec::new();
        let status = Status {
            received_total: 9,
            closed_total: 4,
        };
        encode_draining(&mut buf, status);
        assert_eq!(decode(&buf), Ok(Frame::Draining(status)));
        buf[2] = 1;
        assert!(matches!(
            decode(&buf),
            Err(FrameError::Shape {
                kind: "draining",
                ..
            })
        ));
    }

    #[test]
    fn counters_round_trips_with_exactly_one_fd_and_no_body() {
        let mut buf = Vec::new();
        encode_counters(&mut buf);
        assert_eq!(decode(&buf), Ok(Frame::Counters));
        buf[2..4].copy_from_slice(&2u16.to_le_bytes());
        assert!(matches!(
            decode(&buf),
            Err(FrameError::Shape {
                kind: "counters",
                ..
            })
        ));
    }

    #[test]
    fn loads_round_trips_and_its_word_must_lie_in_the_value() {
        let mut buf = Vec::new();
        encode_loads(&mut buf, 16, 4160);
        assert_eq!(
            decode(&buf),
            Ok(Frame::Loads {
                word: 16,
                value_len: 4160
            })
        );
        for (word, value_len) in [(520, 4160), (0, 0), (0, 12)] {
            encode_loads(&mut buf, word, value_len);
            assert!(
                matches!(decode(&buf), Err(FrameError::Shape { kind: "loads", .. })),
                "word {word} of {value_len} bytes"
            );
        }
    }

    #[test]
    fn refused_round_trips_and_needs_a_count_of_1_to_253() {
        let mut buf = Vec::new();
        let status = Status {
            received_total: 5,
            closed_total: 2,
        };
        encode_refused(&mut buf, status, 3);
        assert_eq!(decode(&buf), Ok(Frame::Refused { status, count: 3 }));
        for bad in [0u16, MAX_FDS as u16 + 1] {
            buf[2..4].copy_from_slice(&bad.to_le_bytes());
            assert!(
                matches!(
                    decode(&buf),
                    Err(FrameError::Shape {
                        kind: "refused",
                        ..
                    })
                ),
                "count {bad}"
            );
        }
    }

    #[test]
    fn handback_round_trips_with_its_bytes_and_needs_one_entry() {
        let mut buf = Vec::new();
        let conn = entry(7, "127.0.0.1:4000");
        encode_hand_back(&mut buf, conn, b"GET / HT");
        assert_eq!(buf.len(), HEADER_LEN + CONNECTION_ENTRY_LEN + 8);
        assert_eq!(
            decode(&buf),
            Ok(Frame::HandBack {
                entry: conn,
                bytes: b"GET / HT".to_vec()
            })
        );
        encode_hand_back(&mut buf, conn, &[]);
        assert_eq!(
            decode(&buf),
            Ok(Frame::HandBack {
                entry: conn,
                bytes: Vec::new()
            })
        );
        buf[2] = 2;
        assert!(matches!(
            decode(&buf),
            Err(FrameError::Shape {
                kind: "handback",
                ..
            })
        ));
        // Shorter than its entry.
        let mut short = buf[..HEADER_LEN + 4].to_vec();
        short[2] = 1;
        short[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            decode(&short),
            Err(FrameError::Shape {
                kind: "handback",
                ..
            })
        ));
        let big = vec![b'x'; MAX_HANDBACK_BYTES];
        encode_hand_back(&mut buf, conn, &big);
        assert_eq!(
            buf.len(),
            MAX_FRAME_LEN,
            "the largest handback is the largest frame"
        );
        assert!(matches!(decode(&buf), Ok(Frame::HandBack { .. })));
    }

    #[test]
    fn listeners_round_trip() {
        let entries = vec![entry(0, "127.0.0.1:8000")];
        let mut buf = Vec::new();
        encode_listeners(&mut buf, entries.clone().into_iter());
        assert_eq!(decode(&buf), Ok(Frame::Listeners(entries)));
    }

    #[test]
    fn ready_and_status_round_trip() {
        let mut buf = Vec::new();
        encode_ready(&mut buf);
        assert_eq!(decode(&buf), Ok(Frame::Ready));
        let status = Status {
            received_total: 77,
            closed_total: 12,
        };
        encode_status(&mut buf, status);
        assert_eq!(decode(&buf), Ok(Frame::Status(status)));
    }

    #[test]
    fn garbage_is_refused_with_the_step_that_failed() {
        assert_eq!(decode(b"abc"), Err(FrameError::TooShort(3)));
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(FrameError::Version(b'G'))
        );
        assert_eq!(
            decode(&[1, 99, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(99))
        );
        assert_eq!(
            decode(&[1, 3, 0, 0, 16, 0, 0, 0]),
            Err(FrameError::BodyLength {
                declared: 16,
                actual: 0
            })
        );
        assert!(matches!(
            decode(&[1, 2, 1, 0, 0, 0, 0, 0]),
            Err(FrameError::Shape { .. })
        ));
    }

    #[test]
    fn a_connections_frame_whose_count_disagrees_with_its_body_is_refused() {
        let mut buf = Vec::new();
        encode_connections(
            &mut buf,
            vec![entry(1, "127.0.0.1:1"), entry(2, "127.0.0.1:2")].into_iter(),
        );
        buf[2] = 3; // claim three entries, carry two
        assert!(matches!(
            decode(&buf),
            Err(FrameError::Shape { count: 3, .. })
        ));
    }

    #[test]
    fn an_unknown_address_family_is_refused() {
        let mut buf = Vec::new();
        encode_connections(&mut buf, vec![entry(1, "127.0.0.1:1")].into_iter());
        buf[HEADER_LEN + 10] = 9;
        assert_eq!(decode(&buf), Err(FrameError::Family(9)));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn status_round_trips(acked in any::<u64>(), closed in any::<u64>()) {
            let mut buf = Vec::new();
            let status = Status { received_total: acked, closed_total: closed };
            encode_status(&mut buf, status);
            prop_assert_eq!(decode(&buf), Ok(Frame::Status(status)));
        }

        #[test]
        fn connection_batches_round_trip(ids in proptest::collection::vec((any::<u64>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>()), 1..MAX_FDS)) {
            let entries: Vec<_> = ids.iter().map(|&(id, listener, ip, port)| ConnectionHeader {
                id, listener, peer: Peer::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            }).collect();
            let mut buf = Vec::new();
            encode_connections(&mut buf, entries.clone().into_iter());
            prop_assert_eq!(decode(&buf), Ok(Frame::Connections(entries)));
        }
    }
}
