//! What lives on across a live upgrade besides the sockets: the totals a new master counts
//! on from, so `handoff_connections_accepted_total` and the workers' counters go on rising
//! instead of starting again at 0; the connections draining workers hand back; and the
//! shared map (see `handover`, which has its frames).
//!
//! They travel on the upgrade's handshake socket as frames of a tag, a u32 length
//! (little-endian) and a body (postcard for totals), an fd beside the frames that carry
//! one, both ways:
//!
//! ```text
//! old master                                    new master
//!   | START totals (at its start) ---------------->  counts on from them
//!   | <--------------------------------------- HELLO
//!   | MAP (the shared map) ----------------------->  restores it, starts its workers
//!   | WRITE / <-- ANSWER, CHANGES (see handover) ->
//!   | <--------------------------------------- READY (every worker ready)
//!   |   stops accepting, drains its workers
//!   | CONNECTION + fd (handed back by a worker) -->  gives it to one of its workers
//!   | FINAL totals (its last worker reaped) ------>  adds what grew since START
//! ```
//!
//! Compatibility with the previous release, which wrote one text line `ready PID\n` where
//! this one writes frames new → old: an old master of this release sets [`ENV_MAP`] for the
//! new one, and only a new master that sees it answers in frames (HELLO first). An old
//! master tells the two apart by the first byte: no tag is `r`. So a new master of the
//! previous release (no HELLO, a text line) is upgraded to as before, without the map
//! (the old master keeps applying writes until it exits), and a new master of this release
//! started by an old master of the previous one (no [`ENV_MAP`]) writes the text line and
//! starts with an empty map, as before.
//!
//! Until FINAL arrives the new master's totals lack only what the old one counted after
//! START; they never go down, and once FINAL is in they are exact. A master that dies
//! before FINAL leaves the new one with the START figures.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::ctx::Ctx;
use super::post::PostCounters;
use super::table::Counters;
use crate::sys::scm;

/// Set (to `1`) in a new master's environment by an old master that sends the totals on
/// the handshake; a master without it (an older binary upgrading) expects none.
pub(crate) const ENV_CARRY: &str = "HANDOFF_UPGRADE_CARRY";
/// Set (to `1`) in a new master's environment by an old master that reads the new one's
/// frames (HELLO ... READY) and hands its shared map over; without it, the new master
/// writes the text line `ready PID\n` of the previous release.
pub(crate) const ENV_MAP: &str = "HANDOFF_UPGRADE_MAP";
/// The largest frame a master reads: far above any real totals, small enough that a
/// broken peer cannot make it allocate without bound.
const MAX_FRAME: usize = 64 << 20;
/// How long FINAL's write or START's read may take: the peer is a master that is running.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

/// The totals a master hands its successor.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Carried {
    /// The master's own counters (accepted, redispatched, workers replaced...).
    pub table: Counters,
    /// Messages received, delivered and dropped.
    pub post: PostCounters,
    /// The workers' `metrics` counters, by key, live and gone.
    pub workers: BTreeMap<Vec<u8>, u64>,
}

impl Carried {
    /// This master's totals now.
    pub fn collect(ctx: &Ctx) -> Carried {
        Carried {
            table: ctx.table.borrow().counters,
            post: ctx.post.counters(),
            workers: ctx.cluster.figures().counters,
        }
    }

    /// Adds to this master's totals what the replaced master's grew by from `earlier` to
    /// `self` (from nothing, for START).
    pub fn add_growth_since(&self, earlier: &Carried, ctx: &Ctx) {
        ctx.table
            .borrow_mut()
            .counters
            .add_growth(&earlier.table, &self.table);
        ctx.post.add_growth(&earlier.post, &self.post);
        ctx.cluster.add_growth(&earlier.workers, &self.workers);
    }
}

/// What a frame on the handshake is.
pub(crate) mod tag {
    /// Old → new: the old master's totals ([`super::Carried`]): START, then FINAL.
    pub const TOTALS: u8 = b'T';
    /// Old → new, with the connection's fd: a connection one of the old master's draining
    /// workers handed back after the hand-over. The body: the listener's index (u16) and the
    /// bytes the worker had read from it.
    pub const CONNECTION: u8 = b'C';
    /// Old → new: part of the old master's shared map (a SYNC frame of a snapshot).
    pub const MAP: u8 = b'M';
    /// Old → new: a write the old master forwards (a STATE frame).
    pub const WRITE: u8 = b'W';
    /// New → old: the new master takes the map (empty body).
    pub const HELLO: u8 = b'H';
    /// New → old: what a forwarded write did (an ANSWER frame), and its change (a SYNC).
    pub const ANSWER: u8 = b'A';
    /// New → old: a change the new master applied (a SYNC frame).
    pub const CHANGES: u8 = b'S';
    /// New → old: every worker of the new master is ready (its pid, u32).
    pub const READY: u8 = b'R';
}

/// One frame read from the handshake.
#[derive(Debug)]
pub(crate) struct Frame {
    pub tag: u8,
    pub body: Vec<u8>,
    /// The fd that came with it, for the tags that carry one.
    pub fd: Option<OwnedFd>,
}

/// Whether frames of `tag` carry an fd.
fn carries_fd(tag: u8) -> bool {
    tag == tag::CONNECTION
}

/// One frame: the tag, the body's length (u32), the body (at most [`MAX_FRAME`]).
pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    debug_assert!(body.len() <= MAX_FRAME);
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(tag);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Writes one frame (a tag, a u32 length, the body); `fd` goes with its first byte.
pub(crate) async fn send(
    stream: &UnixStream,
    tag: u8,
    body: &[u8],
    fd: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(invalid(format!("a frame of {} bytes", body.len())));
    }
    send_raw(stream, &frame(tag, body), fd, timeout).await
}

/// Writes `frame` whole (bytes already framed, or the previous release's text line);
/// `fd` goes with its first byte.
pub(crate) async fn send_raw(
    stream: &UnixStream,
    frame: &[u8],
    fd: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<()> {
    let write = async {
        let mut fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let mut sent = 0;
        while sent < frame.len() {
            stream.writable().await?;
            let result = stream.try_io(Interest::WRITABLE, || {
                scm::send_with_fds(stream, &frame[sent..], &fds)
            });
            match result {
                Ok(n) => {
                    sent += n;
                    fds.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the other master reads nothing"))?
}

/// Sends totals ([`tag::TOTALS`]).
pub(crate) async fn send_totals(
    stream: &UnixStream,
    carried: &Carried,
    timeout: Duration,
) -> io::Result<()> {
    let body = postcard::to_stdvec(carried).map_err(io::Error::other)?;
    send(stream, tag::TOTALS, &body, None, timeout).await
}

/// Reads the frames of a handshake, with the fds that come with them.
#[derive(Debug, Default)]
pub(crate) struct Reader {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Reader {
    /// The next frame; `None` when the stream ends between frames.
    pub async fn next(&mut self, stream: &UnixStream) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(frame));
            }
            if !self.fill(stream).await? {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }

    /// In the old master, first: whether the new master wrote the previous release's text
    /// line (`Some(line)`, without its newline) or frames follow (`None`, nothing taken).
    /// No tag is `r`: a first byte `r` is the line's. An end before any byte is an error.
    pub async fn legacy_line(&mut self, stream: &UnixStream) -> io::Result<Option<String>> {
        loop {
            match self.buf.first() {
                Some(b'r') => {
                    if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                        self.buf.drain(..=end);
                        return Ok(Some(line));
                    }
                    if self.buf.len() > 64 {
                        return Err(invalid("a line of over 64 bytes".into()));
                    }
                }
                Some(_) => return Ok(None),
                None => {}
            }
            if !self.fill(stream).await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the handshake ended",
                ));
            }
        }
    }

    /// Reads what is there (bytes and fds); false at the end of the stream.
    async fn fill(&mut self, stream: &UnixStream) -> io::Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            stream.readable().await?;
            let received = match stream.try_io(Interest::READABLE, || {
                scm::recv_with_fds(stream, &mut chunk)
            }) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if received.len == 0 && received.fds.is_empty() {
                return Ok(false);
            }
            self.buf.extend_from_slice(&chunk[..received.len]);
            self.fds.extend(received.fds);
            return Ok(true);
        }
    }

    /// Reads the next frame and decodes it as totals.
    pub async fn totals(&mut self, stream: &UnixStream) -> io::Result<Option<Carried>> {
        match self.next(stream).await? {
            None => Ok(None),
            Some(frame) if frame.tag == tag::TOTALS => decode_totals(&frame.body).map(Some),
            Some(frame) => Err(invalid(format!("a frame of tag {} for totals", frame.tag))),
        }
    }

    fn parse(&mut self) -> io::Result<Option<Frame>> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(invalid(format!(
                "a frame of {len} bytes (at most {MAX_FRAME})"
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let body = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        let fd = match carries_fd(tag) {
            true => Some(
                self.fds
                    .pop_front()
                    .ok_or_else(|| invalid("a frame without its fd".into()))?,
            ),
            false => None,
        };
        Ok(Some(Frame { tag, body, fd }))
    }
}

/// Decodes a [`tag::TOTALS`] body.
pub(crate) fn decode_totals(body: &[u8]) -> io::Result<Carried> {
    postcard::from_bytes(body).map_err(|e| invalid(e.to_string()))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn totals(accepted: u64, dropped: u64, requests: u64) -> Carried {
        let mut carried = Carried::default();
        carried.table.accepted = accepted;
        carried.post.dropped = dropped;
        carried.workers.insert(b"requests\0".to_vec(), requests);
        carried
    }

    #[tokio::test]
    async fn frames_cross_a_socket_intact_and_the_end_reads_as_none() {
        let (a, b) = UnixStream::pair().unwrap();
        let sent = totals(7, 2, 1000);
        send_totals(&a, &sent, TIMEOUT).await.unwrap();
        send_totals(&a, &Carried::default(), TIMEOUT).await.unwrap();
        drop(a);
        let mut reader = Reader::default();
        assert_eq!(reader.totals(&b).await.unwrap(), Some(sent));
        assert_eq!(reader.totals(&b).await.unwrap(), Some(Carried::default()));
        assert_eq!(reader.totals(&b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_huge_length_a_broken_body_or_a_cut_frame_is_an_error_not_an_allocation() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[tag::TOTALS]).await.unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let err = Reader::default().next(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[tag::TOTALS, 3, 0, 0, 0, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let err = Reader::default().totals(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[tag::TOTALS, 9, 0]).await.unwrap();
        drop(a);
        let err = Reader::default().next(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn connections_arrive_with_their_own_fd_in_order_between_other_frames() {
        use std::os::fd::AsFd;
        let (a, b) = UnixStream::pair().unwrap();
        let (one, _keep_one) = UnixStream::pair().unwrap();
        let (two, _keep_two) = UnixStream::pair().unwrap();
        let ino = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        send(&a, tag::CONNECTION, b"\0\0GET", Some(one.as_fd()), TIMEOUT)
            .await
            .unwrap();
        send_totals(&a, &totals(1, 0, 0), TIMEOUT).await.unwrap();
        send(&a, tag::CONNECTION, b"\x01\0", Some(two.as_fd()), TIMEOUT)
            .await
            .unwrap();
        drop(a);
        let mut reader = Reader::default();
        let first = reader.next(&b).await.unwrap().unwrap();
        assert_eq!(
            (first.tag, &first.body[..]),
            (tag::CONNECTION, &b"\0\0GET"[..])
        );
        let expect = |s: &UnixStream| rustix::fs::fstat(s).unwrap().st_ino;
        assert_eq!(ino(first.fd.as_ref().unwrap()), expect(&one));
        let totals = reader.next(&b).await.unwrap().unwrap();
        assert!(totals.fd.is_none());
        let second = reader.next(&b).await.unwrap().unwrap();
        assert_eq!(ino(second.fd.as_ref().unwrap()), expect(&two));
        assert!(reader.next(&b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_connection_frame_without_its_fd_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, tag::CONNECTION, b"\0\0", None, TIMEOUT)
            .await
            .unwrap();
        let err = Reader::default().next(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn the_previous_release_s_text_line_and_frames_are_told_apart_by_the_first_byte() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"ready 42\n").await.unwrap();
        let mut reader = Reader::default();
        assert_eq!(
            reader.legacy_line(&b).await.unwrap().as_deref(),
            Some("ready 42")
        );

        let (a, b) = UnixStream::pair().unwrap();
        send(&a, tag::HELLO, &[], None, TIMEOUT).await.unwrap();
        send(&a, tag::READY, &7u32.to_le_bytes(), None, TIMEOUT)
            .await
            .unwrap();
        let mut reader = Reader::default();
        assert_eq!(
            reader.legacy_line(&b).await.unwrap(),
            None,
            "frames: nothing taken"
        );
        assert_eq!(reader.next(&b).await.unwrap().unwrap().tag, tag::HELLO);
        assert_eq!(
            reader.next(&b).await.unwrap().unwrap().body,
            7u32.to_le_bytes()
        );

        // A line that never ends, or no byte at all, is an error.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[b'r'; 100]).await.unwrap();
        let err = Reader::default().legacy_line(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let err = Reader::default().legacy_line(&b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn growth_is_added_and_a_smaller_later_figure_subtracts_nothing() {
        let mut mine = Counters {
            accepted: 5,
            ..Counters::default()
        };
        let (start, end) = (totals(100, 1, 10), totals(130, 1, 25));
        mine.add_growth(&Counters::default(), &start.table);
        mine.add_growth(&start.table, &end.table);
        assert_eq!(mine.accepted, 135);
        mine.add_growth(&end.table, &start.table);
        assert_eq!(mine.accepted, 135);
    }
}
