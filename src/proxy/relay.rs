//! Relaying a connection's bytes both ways between the client and its backend, in a proxy
//! worker. Each direction runs on its own: with `splice(2)` through a pipe (the kernel moves
//! the socket buffers' pages, nothing is copied through this process), or, where splice is
//! refused or not asked for, with `read`/`write` through a buffer. Half-close is kept: when
//! one side ends its stream, the other side's write half is shut down (it sees FIN) and the
//! other direction goes on until it ends too. An error in either direction ends both.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

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

/// Bytes relayed each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the client to the backend.
    pub to_backend: u64,
    /// From the backend to the client.
    pub to_client: u64,
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
/// once, a failed write lets the other direction finish first.
pub async fn relay(
    client: Side<'_>,
    backend: Side<'_>,
    how: Relay,
    pipes: &PipePool,
) -> io::Result<Relayed> {
    let to_backend = one_way(client, backend, how, pipes);
    let to_client = one_way(backend, client, how, pipes);
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
    let (to_backend, to_client) = if backend_first {
        (first, second)
    } else {
        (second, first)
    };
    Ok(Relayed {
        to_backend: to_backend.map_err(Failed::into_inner)?,
        to_client: to_client.map_err(Failed::into_inner)?,
    })
}

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s write half down.
async fn one_way(
    from: Side<'_>,
    to: Side<'_>,
    how: Relay,
    pipes: &PipePool,
) -> Result<u64, Failed> {
    let moved = match how {
        Relay::Splice => match pipes.take() {
            Ok(pipe) => spliced(from, to, pipe, pipes).await?,
            Err(_) => copied(from, to, 0).await?,
        },
        Relay::Copy => copied(from, to, 0).await?,
    };
    to.shutdown_write();
    Ok(moved)
}

/// Moves bytes through `pipe`, zero copy; on the first splice the kernel refuses (EINVAL:
/// a socket type without splice support) goes on by copying.
async fn spliced(
    from: Side<'_>,
    to: Side<'_>,
    pipe: Pipe,
    pipes: &PipePool,
) -> Result<u64, Failed> {
    let chunk = pipe.capacity().unwrap_or(64 * 1024);
    let mut moved = 0u64;
    loop {
        let filled = from
            .io(Interest::READABLE, || pipe.fill_from(from.fd(), chunk))
            .await;
        let mut in_pipe = match filled {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if moved == 0 && is_unsupported(&e) => return copied(from, to, 0).await,
            Err(e) => return Err(Failed::Read(e)),
        };
        while in_pipe > 0 {
            let n = to
                .io(Interest::WRITABLE, || pipe.drain_to(to.fd(), in_pipe))
                .await
                .map_err(Failed::Write)?;
            in_pipe -= n;
            moved += n as u64;
        }
    }
    pipes.give(pipe);
    Ok(moved)
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// Moves bytes through a buffer in this process; `moved` counts bytes already relayed.
async fn copied(from: Side<'_>, to: Side<'_>, mut moved: u64) -> Result<u64, Failed> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = from
            .io(Interest::READABLE, || {
                sys::pipe::read(from.fd(), &mut buffer)
            })
            .await
            .map_err(Failed::Read)?;
        if n == 0 {
            return Ok(moved);
        }
        to.write_all(&buffer[..n]).await.map_err(Failed::Write)?;
        moved += n as u64;
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
        );
        let ((), (), relayed) = tokio::join!(client_side, backend_side, proxy);
        relayed.unwrap()
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
