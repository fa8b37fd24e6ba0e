//! What lives on across a live upgrade besides the sockets: the totals a new master counts
//! on from, so `handoff_connections_accepted_total` and the workers' counters go on rising
//! instead of starting again at 0.
//!
//! They travel on the upgrade's handshake socket as frames of a u32 length (little-endian)
//! and a postcard body:
//!
//! ```text
//! old master                                    new master
//!   | START totals (at its start) ---------------->  counts on from them
//!   | <---------------------------- ready PID\n      (every worker ready)
//!   |   stops accepting, drains its workers
//!   | FINAL totals (its last worker reaped) ------>  adds what grew since START
//! ```
//!
//! Until FINAL arrives the new master's totals lack only what the old one counted after
//! START; they never go down, and once FINAL is in they are exact. A master that dies
//! before FINAL leaves the new one with the START figures.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::ctx::Ctx;
use super::post::PostCounters;
use super::table::Counters;

/// Set (to `1`) in a new master's environment by an old master that sends the totals on
/// the handshake; a master without it (an older binary upgrading) expects none.
pub(crate) const ENV_CARRY: &str = "HANDOFF_UPGRADE_CARRY";
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

/// Writes one frame.
pub(crate) async fn write(
    stream: &mut UnixStream,
    carried: &Carried,
    timeout: Duration,
) -> io::Result<()> {
    let body = postcard::to_stdvec(carried).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    tokio::time::timeout(timeout, stream.write_all(&frame))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the other master reads nothing"))?
}

/// Reads one frame; `None` if the stream ends before its first byte.
pub(crate) async fn read(stream: &mut UnixStream) -> io::Result<Option<Carried>> {
    let mut len = [0u8; 4];
    match stream.read(&mut len[..1]).await? {
        0 => return Ok(None),
        _ => stream.read_exact(&mut len[1..]).await?,
    };
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a totals frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(accepted: u64, dropped: u64, requests: u64) -> Carried {
        let mut carried = Carried::default();
        carried.table.accepted = accepted;
        carried.post.dropped = dropped;
        carried.workers.insert(b"requests\0".to_vec(), requests);
        carried
    }

    #[tokio::test]
    async fn frames_cross_a_socket_intact_and_the_end_reads_as_none() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let sent = totals(7, 2, 1000);
        write(&mut a, &sent, TIMEOUT).await.unwrap();
        write(&mut a, &Carried::default(), TIMEOUT).await.unwrap();
        drop(a);
        assert_eq!(read(&mut b).await.unwrap(), Some(sent));
        assert_eq!(read(&mut b).await.unwrap(), Some(Carried::default()));
        assert_eq!(read(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_huge_length_or_a_broken_body_is_an_error_not_an_allocation() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let err = read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&3u32.to_le_bytes()).await.unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        let err = read(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[9, 0]).await.unwrap();
        drop(a);
        let err = read(&mut b).await.unwrap_err();
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
