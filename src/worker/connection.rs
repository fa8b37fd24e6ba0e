//! A connection handed to this worker: a tokio stream plus what the master said about it.
//! Dropping it shuts down the write side (so the client sees FIN even while the master still
//! holds its copy of the fd), reports the connection finished, and leaves the fd to
//! `linger` for its close. A draining worker may instead hand an idle connection back to
//! the master ([`Connection::hand_back`]), which gives it to another worker; a connection
//! that arrives so may bring bytes the previous worker had read, and reads them first.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::Shared;
use crate::ipc::ConnectionHeader;
use crate::sys;
use crate::sys::socket::Peer;

/// The stream of an accepted connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix listener.
    Unix(UnixStream),
}

/// Counts a connection as active while it lives and as finished when dropped; the worker
/// runtime reports finished connections to the master, which balances on them.
#[derive(Debug)]
pub struct ActiveGuard {
    shared: Arc<Shared>,
}

impl ActiveGuard {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { shared }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.shared.connection_finished();
    }
}

/// A connection from the master: `AsyncRead + AsyncWrite`, so it plugs into hyper
/// (`hyper_util::rt::TokioIo::new(conn)`) or any tokio code.
#[derive(Debug)]
pub struct Connection {
    stream: Option<Stream>,
    header: ConnectionHeader,
    guard: Option<ActiveGuard>,
    /// The master may still hold a copy of the fd: the close waits (see `linger`).
    from_master: bool,
    /// Bytes read from the connection before it reached this worker (or before a hand-back
    /// failed), read first; `unread` is where reading them goes on.
    prefix: Vec<u8>,
    unread: usize,
}

/// Why [`Connection::hand_back`] could not hand a connection back. The connection comes
/// back with it, the bytes given restored as the first ones it reads: serve it here, and
/// end it after the request in flight (`Connection: close`).
#[derive(Debug, thiserror::Error)]
#[error("handing the connection back failed: {reason}")]
pub struct HandBackError {
    /// The connection, to serve here.
    pub connection: Connection,
    /// Why.
    pub reason: HandBackFailure,
}

/// Why a connection could not be handed back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandBackFailure {
    /// The worker is not draining: only a draining worker hands connections back.
    #[error("the worker is not draining")]
    NotDraining,
    /// The worker accepted it itself (the kernel baseline modes): the master never had it.
    #[error("the connection did not come from the master")]
    NotFromMaster,
    /// More bytes were read from it than a HANDBACK frame carries.
    #[error("{0} bytes read from it are more than a handback carries ({max})", max = crate::ipc::frame::MAX_HANDBACK_BYTES)]
    TooManyBytes(usize),
    /// The channel to the master failed (the master is gone).
    #[error("the channel to the master failed")]
    Channel(#[source] io::Error),
}

impl Connection {
    pub(crate) fn new(
        header: ConnectionHeader,
        fd: OwnedFd,
        shared: &Arc<Shared>,
    ) -> io::Result<Self> {
        // The master accepted it non-blocking; a worker in another language may have changed
        // the shared file status before a re-dispatch, so make sure.
        sys::socket::set_nonblocking(&fd, true)?;
        let stream = match header.peer {
            Peer::Ip(_) => Stream::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?),
            Peer::Unix => Stream::Unix(UnixStream::from_std(
                std::os::unix::net::UnixStream::from(fd),
            )?),
        };
        let mut conn = Connection::accepted(header, stream, shared);
        conn.from_master = true;
        Ok(conn)
    }

    /// A connection the master handed over with `bytes` another worker had read from it:
    /// they are the first this one reads.
    pub(crate) fn with_prefix(mut self, bytes: Vec<u8>) -> Self {
        self.prefix = bytes;
        self.unread = 0;
        self
    }

    /// A connection this worker accepted itself (kernel baseline modes).
    pub(crate) fn accepted(header: ConnectionHeader, stream: Stream, shared: &Arc<Shared>) -> Self {
        Connection {
            stream: Some(stream),
            header,
            guard: Some(ActiveGuard::new(shared.clone())),
            from_master: false,
            prefix: Vec::new(),
            unread: 0,
        }
    }

    /// Hands this connection back to the master, which gives it to another worker: what a
    /// draining worker does with an idle keep-alive connection at a request boundary, so the
    /// client's next request is answered instead of finding the connection closed under it.
    /// `already_read` is what was read from it and not used (a request begun, pipelined
    /// ones), at most [`MAX_HANDBACK_BYTES`](crate::ipc::frame::MAX_HANDBACK_BYTES)
    /// together with any of its own first bytes not read yet; the next worker reads them
    /// first. Call it only where no response is half written. Counted as finished here.
    ///
    /// Fails, giving the connection back, when the worker is not draining, in the kernel
    /// modes, with too many bytes, or when the master is gone.
    pub async fn hand_back(mut self, already_read: &[u8]) -> Result<(), HandBackError> {
        let mut bytes = Vec::with_capacity(already_read.len() + self.prefix.len() - self.unread);
        bytes.extend_from_slice(already_read);
        bytes.extend_from_slice(&self.prefix[self.unread..]);
        let shared = self.guard.as_ref().map(|g| g.shared.clone());
        let failure = match &shared {
            _ if !self.from_master => Some(HandBackFailure::NotFromMaster),
            None => Some(HandBackFailure::NotFromMaster),
            Some(shared) if !*shared.drain.borrow() => Some(HandBackFailure::NotDraining),
            _ if bytes.len() > crate::ipc::frame::MAX_HANDBACK_BYTES => {
                Some(HandBackFailure::TooManyBytes(bytes.len()))
            }
            _ => None,
        };
        let sent = match (failure, &shared) {
            (Some(failure), _) => Err(failure),
            (None, Some(shared)) => {
                let mut frame = Vec::new();
                crate::ipc::frame::encode_hand_back(&mut frame, self.header, &bytes);
                let fd = match self.stream() {
                    Stream::Tcp(s) => s.as_fd(),
                    Stream::Unix(s) => s.as_fd(),
                };
                // After a DRAINING frame being sent (SIGTERM): the master takes handbacks
                // only from a worker it knows is draining.
                let _after_draining = shared.announcing.lock().await;
                shared
                    .channel
                    .send(&frame, &[fd])
                    .await
                    .map_err(HandBackFailure::Channel)
            }
            (None, None) => Err(HandBackFailure::NotFromMaster),
        };
        match sent {
            Ok(()) => {
                // The master holds it now: close this copy at once, with no shutdown (that
                // would end the connection for the next worker too). The guard counts it
                // finished.
                drop(self.stream.take());
                Ok(())
            }
            Err(reason) => {
                self.prefix = bytes;
                self.unread = 0;
                Err(HandBackError {
                    connection: self,
                    reason,
                })
            }
        }
    }

    /// The client's address (`Peer::Unix` on a Unix listener).
    pub fn peer(&self) -> Peer {
        self.header.peer
    }

    /// Index of the listener that accepted it, in `--listen` order.
    pub fn listener(&self) -> usize {
        self.header.listener as usize
    }

    /// The master's id for this connection.
    pub fn id(&self) -> u64 {
        self.header.id
    }

    /// The stream, for code that needs the concrete tokio type.
    pub fn stream(&self) -> &Stream {
        self.stream.as_ref().expect("stream present until drop")
    }

    /// Splits off the stream and the guard that counts the connection as active. Drop the
    /// guard when the connection is finished, and shut the stream's write side down then:
    /// the runtime no longer does either for you.
    pub fn into_parts(mut self) -> (Stream, ActiveGuard) {
        let stream = self.stream.take().expect("stream present until drop");
        let guard = self.guard.take().expect("guard present until drop");
        (stream, guard)
    }

    fn pinned(&mut self) -> Pin<&mut Stream> {
        Pin::new(self.stream.as_mut().expect("stream present until drop"))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let fd = match &stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        };
        // The peer must see FIN now, not when the last copy of the fd closes.
        let _ = sys::socket::shutdown_write(&fd);
        let shared = self.guard.as_ref().map(|g| &g.shared);
        if let (true, Some(shared)) = (self.from_master, shared) {
            // Out of the reactor now; closed after the linger (see `linger`).
            let owned = match stream {
                Stream::Tcp(s) => s.into_std().map(OwnedFd::from),
                Stream::Unix(s) => s.into_std().map(OwnedFd::from),
            };
            if let Ok(fd) = owned {
                shared.lingering.keep(fd, std::time::Instant::now());
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let conn = self.get_mut();
        if conn.unread < conn.prefix.len() {
            let rest = &conn.prefix[conn.unread..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            conn.unread += n;
            if conn.unread == conn.prefix.len() {
                conn.prefix = Vec::new();
                conn.unread = 0;
            }
            return Poll::Ready(Ok(()));
        }
        conn.pinned().poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().pinned().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().pinned().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().pinned().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().pinned().poll_shutdown(cx)
    }
}
