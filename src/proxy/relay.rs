//! Relaying a connection's bytes both ways between the client and its backend, in a proxy
//! worker. Each direction runs on its own: with `splice(2)` through a pipe (the kernel moves
//! the socket buffers' pages, nothing is copied through this process), or, where splice is
//! refused or not asked for, with `read`/`write` through a buffer. Half-close is kept: when
//! one side ends its stream, the other side's write half is shut down (it sees FIN) and the
//! other direction goes on until it ends too. An error in either direction ends both, and
//! so does an idle timeout: no byte moved either way for that long (a half-closed
//! connection's remaining direction keeps it alive while it moves bytes).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::sys;
use crate::sys::pipe::Pipe;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Relay {
    /// `splice(2)` through a pipe per direction: zero copy (falls back to copying for a
    /// connection where the kernel refuses it).
    #[default]
    Splice,
    /// `read(2)` and `write(2)` through a 64 KiB buffer per direction.
    Copy,
}

/// Bytes of the plain-copy buffer.
const COPY_BUFFER: usize = 64 * 1024;

/// One end of a relayed connection: a socket tokio drives.
#[derive(Debug, Clone, Copy)]
pub enum Side<'a> {
    /// A TCP socket.
    Tcp(&'a TcpStream),
    /// A Unix stream socket (a client of a `unix:` listener).
    Unix(&'a UnixStream),
}

impl Side<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Side::Tcp(s) => s.as_fd(),
            Side::Unix(s) => s.as_fd(),
        }
    }

    /// Runs `op` once the socket is ready for `interest`, again after each `WouldBlock`.
    async fn io<R>(
        &self,
        interest: Interest,
        mut op: impl FnMut() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Side::Tcp(s) => s.async_io(interest, &mut op).await,
            Side::Unix(s) => s.async_io(interest, &mut op).await,
        }
    }

    /// Writes all of `bytes`.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self
                .io(Interest::WRITABLE, || sys::pipe::write(self.fd(), bytes))
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn shutdown_write(&self) {
        // ENOTCONN once the peer is gone: nothing left to tell it.
        let _ = sys::socket::shutdown_write(&self.fd());
    }
}

/// Pipes kept for reuse by the connections of one worker: an empty pipe goes back here
/// when its connection ends, so a short connection costs no pipe2 and close.
#[derive(Debug)]
pub struct PipePool {
    pipes: Mutex<Vec<Pipe>>,
    keep: usize,
    capacity: usize,
}

impl PipePool {
    /// A pool that keeps up to `keep` pipes of `capacity` bytes (0: the kernel's default).
    pub fn new(keep: usize, capacity: usize) -> PipePool {
        PipePool {
            pipes: Mutex::new(Vec::new()),
            keep,
            capacity,
        }
    }

    fn take(&self) -> io::Result<Pipe> {
        let kept = self.pipes.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match kept {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(self.capacity),
        }
    }

    /// Takes back a pipe known to be empty.
    fn give(&self, pipe: Pipe) {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        if pipes.len() < self.keep {
            pipes.push(pipe);
        }
    }
}

/// Bytes relayed each way, and whether the relay ended for being idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the client to the backend.
    pub to_backend: u64,
    /// From the backend to the client.
    pub to_client: u64,
    /// Neither side moved a byte for the idle timeout: the relay was cut there (the
    /// caller closes both sockets).
    pub idle_timeout: bool,
}

/// When a relay last moved a byte (read or written, either way), and the bytes moved so
/// far, for its idle timeout. Both directions write it; they run in one task.
#[derive(Debug)]
struct Activity {
    /// Whether anyone looks at `last` (no clock is read otherwise).
    watched: bool,
    start: Instant,
    /// Nanoseconds from `start` to the last byte moved.
    last: AtomicU64,
    to_backend: AtomicU64,
    to_client: AtomicU64,
}

impl Activity {
    fn new(watched: bool) -> Activity {
        Activity {
            watched,
            start: Instant::now(),
            last: AtomicU64::new(0),
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        }
    }

    /// A byte read or written: the relay is not idle now.
    fn touch(&self) {
        if self.watched {
            let nanos = self.start.elapsed().as_nanos();
            self.last
                .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Returns once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    fn relayed(&self, idle_timeout: bool) -> Relayed {
        Relayed {
            to_backend: self.to_backend.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
            idle_timeout,
        }
    }
}

/// The direction a `one_way` moves bytes, as its count on [`Activity`].
#[derive(Debug, Clone, Copy)]
struct Way<'a> {
    activity: &'a Activity,
    moved: &'a AtomicU64,
}

impl Way<'_> {
    fn read(&self) {
        self.activity.touch();
    }

    fn wrote(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }

    fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
}

/// How one direction failed: reading its source (that end is gone: nothing more can reach
/// it, so the relay ends) or writing its destination (that end stopped reading, but what it
/// already sent may still be delivered: the other direction goes on to its end).
#[derive(Debug)]
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

impl Failed {
    fn into_inner(self) -> io::Error {
        match self {
            Failed::Read(e) | Failed::Write(e) => e,
        }
    }
}

/// Relays between `client` and `backend` until both directions have ended (each end's
/// stream finished and passed on as a FIN) or one failed: a failed read ends the relay at
/// once, a failed write lets the other direction finish first. With `idle` set, a relay
/// where no byte moved either way for that long ends there ([`Relayed::idle_timeout`]).
pub async fn relay(
    client: Side<'_>,
    backend: Side<'_>,
    how: Relay,
    pipes: &PipePool,
    idle: Option<Duration>,
) -> io::Result<Relayed> {
    let activity = Activity::new(idle.is_some());
    let both = both_ways(client, backend, how, pipes, &activity);
    let Some(limit) = idle else {
        return both.await;
    };
    tokio::select! {
        relayed = both => relayed,
        () = activity.idle_for(limit) => Ok(activity.relayed(true)),
    }
}

async fn both_ways(
    client: Side<'_>,
    backend: Side<'_>,
    how: Relay,
    pipes: &PipePool,
    activity: &Activity,
) -> io::Result<Relayed> {
    let up = Way {
        activity,
        moved: &activity.to_backend,
    };
    let down = Way {
        activity,
        moved: &activity.to_client,
    };
    let to_backend = one_way(client, backend, how, pipes, up);
    let to_client = one_way(backend, client, how, pipes, down);
    tokio::pin!(to_backend, to_client);
    let (first, backend_first) = tokio::select! {
        moved = &mut to_backend => (moved, true),
        moved = &mut to_client => (moved, false),
    };
    if let Err(Failed::Read(e)) = first {
        return Err(e);
    }
    let second = if backend_first {
        (&mut to_client).await
    } else {
        (&mut to_backend).await
    };
    for ended in [first, second] {
        ended.map_err(Failed::into_inner)?;
    }
    Ok(activity.relayed(false))
}

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s write half down.
async fn one_way(
    from: Side<'_>,
    to: Side<'_>,
    how: Relay,
    pipes: &PipePool,
    way: Way<'_>,
) -> Result<(), Failed> {
    match how {
        Relay::Splice => match pipes.take() {
            Ok(pipe) => spliced(from, to, pipe, pipes, way).await?,
            Err(_) => copied(from, to, way).await?,
        },
        Relay::Copy => copied(from, to, way).await?,
    };
    to.shutdown_write();
    Ok(())
}

/// Moves bytes through `pipe`, zero copy; on the first splice the kernel refuses (EINVAL:
/// a socket type without splice support) goes on by copying.
async fn spliced(
    from: Side<'_>,
    to: Side<'_>,
    pipe: Pipe,
    pipes: &PipePool,
    way: Way<'_>,
) -> Result<(), Failed> {
    let chunk = pipe.capacity().unwrap_or(64 * 1024);
    loop {
        let filled = from
            .io(Interest::READABLE, || pipe.fill_from(from.fd(), chunk))
            .await;
        let mut in_pipe = match filled {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if way.moved() == 0 && is_unsupported(&e) => return copied(from, to, way).await,
            Err(e) => return Err(Failed::Read(e)),
        };
        way.read();
        while in_pipe > 0 {
            let n = to
                .io(Interest::WRITABLE, || pipe.drain_to(to.fd(), in_pipe))
                .await
                .map_err(Failed::Write)?;
            in_pipe -= n;
            way.wrote(n);
        }
    }
    pipes.give(pipe);
    Ok(())
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// Moves bytes through a buffer in this process.
async fn copied(from: Side<'_>, to: Side<'_>, way: Way<'_>) -> Result<(), Failed> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = from
            .io(Interest::READABLE, || {
                sys::pipe::read(from.fd(), &mut buffer)
            })
            .await
            .map_err(Failed::Read)?;
        if n == 0 {
            return Ok(());
        }
        way.read();
        to.write_all(&buffer[..n]).await.map_err(Failed::Write)?;
        way.wrote(n);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of TCP sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client <-> [proxy_client | proxy_backend] <-> backend, relayed `how`; the client
    /// sends `up` and half-closes, the backend reads to the end, answers `down`, closes.
    async fn round_trip(how: Relay, up: Vec<u8>, down: Vec<u8>) -> Relayed {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let pipes = PipePool::new(4, 0);
        let expect_up = up.clone();
        let expect_down = down.clone();
        let client_side = async move {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got == expect_down, "the client got other bytes");
        };
        let backend_side = async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert!(got == expect_up, "the backend got other bytes");
            backend.write_all(&down).await.unwrap();
        };
        let proxy = relay(
            Side::Tcp(&proxy_client),
            Side::Tcp(&proxy_backend),
            how,
            &pipes,
            None,
        );
        let ((), (), relayed) = tokio::join!(client_side, backend_side, proxy);
        relayed.unwrap()
    }

    /// Neither side sends: the relay ends at the idle timeout, counted as such.
    #[tokio::test]
    async fn a_silent_relay_ends_at_the_idle_timeout() {
        let (_client, proxy_client) = pair().await;
        let (proxy_backend, _backend) = pair().await;
        let pipes = PipePool::new(4, 0);
        let limit = Duration::from_millis(100);
        let started = Instant::now();
        let relay = relay(
            Side::Tcp(&proxy_client),
            Side::Tcp(&proxy_backend),
            Relay::Splice,
            &pipes,
            Some(limit),
        );
        let relayed = tokio::time::timeout(Duration::from_secs(20), relay)
            .await
            .expect("the idle timeout never fired")
            .unwrap();
        assert!(relayed.idle_timeout);
        assert!(started.elapsed() >= limit);
    }

    /// The client half-closes at once; the backend answers in small pieces, the whole
    /// answer taking several idle timeouts but no gap as long as one: nothing is cut.
    #[tokio::test]
    async fn a_half_closed_relay_that_keeps_moving_is_not_cut() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let pipes = PipePool::new(4, 0);
        let limit = Duration::from_millis(150);
        let client_side = async move {
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let backend_side = async move {
            let mut nothing = Vec::new();
            backend.read_to_end(&mut nothing).await.unwrap();
            for piece in 0..12u8 {
                backend.write_all(&[piece; 10]).await.unwrap();
                // Pacing the traffic, not waiting for an outcome.
                tokio::time::sleep(limit / 3).await;
            }
        };
        let proxy = relay(
            Side::Tcp(&proxy_client),
            Side::Tcp(&proxy_backend),
            Relay::Splice,
            &pipes,
            Some(limit),
        );
        let all = async { tokio::join!(client_side, backend_side, proxy) };
        let (got, (), relayed) = tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("the relay or a side hung");
        let relayed = relayed.unwrap();
        assert!(!relayed.idle_timeout, "cut while bytes still moved");
        assert_eq!(relayed.to_client, 120);
        assert_eq!(got.len(), 120);
    }

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[tokio::test]
    async fn splice_relays_both_ways_byte_exact_with_half_close() {
        let (up, down) = (bytes(3 << 20, 1), bytes(1 << 20, 2));
        let relayed = round_trip(Relay::Splice, up, down).await;
        assert_eq!(relayed.to_backend, 3 << 20);
        assert_eq!(relayed.to_client, 1 << 20);
    }

    #[tokio::test]
    async fn copy_relays_the_same() {
        let relayed = round_trip(Relay::Copy, bytes(700_001, 3), bytes(5, 4)).await;
        assert_eq!(relayed.to_backend, 700_001);
        assert_eq!(relayed.to_client, 5);
    }

    #[tokio::test]
    async fn empty_streams_end_cleanly() {
        let relayed = round_trip(Relay::Splice, Vec::new(), Vec::new()).await;
        assert_eq!(relayed, Relayed::default());
    }

    /// A backend that answers and closes without reading the client's whole upload: the
    /// write towards it fails, and its answer still reaches the client in full.
    #[tokio::test]
    async fn an_answer_survives_a_backend_that_stops_reading() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let pipes = PipePool::new(4, 0);
        let answer = bytes(32_000, 9);
        let expected = answer.clone();
        let backend_side = async move {
            let mut head = [0u8; 16];
            backend.read_exact(&mut head).await.unwrap();
            backend.write_all(&answer).await.unwrap();
            drop(backend); // unread upload bytes: the kernel resets
        };
        let client_side = async move {
            let upload = bytes(8 << 20, 10);
            let (mut read, mut write) = client.split();
            let sending = async {
                let _ = write.write_all(&upload).await;
            };
            let mut got = Vec::new();
            let receiving = async {
                let _ = read.read_to_end(&mut got).await;
            };
            tokio::join!(sending, receiving);
            assert!(
                got.len() >= expected.len(),
                "{} bytes of the answer",
                got.len()
            );
            assert!(got[..expected.len()] == expected[..]);
        };
        // The worker closes both sockets when the relay returns; so does this test.
        let proxy = async move {
            let relayed = relay(
                Side::Tcp(&proxy_client),
                Side::Tcp(&proxy_backend),
                Relay::Splice,
                &pipes,
                None,
            )
            .await;
            drop((proxy_client, proxy_backend));
            relayed
        };
        let all = async { tokio::join!(backend_side, client_side, proxy) };
        let finished = tokio::time::timeout(std::time::Duration::from_secs(20), all).await;
        assert!(finished.is_ok(), "the relay or a side hung");
    }
}
