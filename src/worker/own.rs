//! Listening sockets a worker accepts on itself: only in the kernel baseline modes
//! (`kernel-shared`, `kernel-reuseport`), which exist to compare the kernel's spreading with
//! the master's on the same worker code.

use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};

use super::{Connection, Shared, Stream};
use crate::ipc::ConnectionHeader;
use crate::sys;
use crate::sys::socket::Peer;

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The listeners the master sent, in `--listen` order.
#[derive(Debug, Default)]
pub(crate) struct OwnListeners {
    listeners: Vec<(u16, Listener)>,
    accepted: u64,
}

impl OwnListeners {
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Registers the listeners of a `listeners` frame.
    pub fn install(&mut self, headers: Vec<ConnectionHeader>, fds: Vec<OwnedFd>) -> io::Result<()> {
        for (header, fd) in headers.into_iter().zip(fds) {
            sys::socket::set_nonblocking(&fd, true)?;
            let listener = match header.peer {
                Peer::Ip(_) => {
                    Listener::Tcp(TcpListener::from_std(std::net::TcpListener::from(fd))?)
                }
                Peer::Unix => Listener::Unix(UnixListener::from_std(
                    std::os::unix::net::UnixListener::from(fd),
                )?),
            };
            self.listeners.push((header.listener, listener));
        }
        Ok(())
    }

    /// Waits until any listener yields a connection or an error.
    pub async fn accept(&self) -> (u16, io::Result<(Stream, Peer)>) {
        poll_fn(|cx| {
            for (index, listener) in &self.listeners {
                let polled = match listener {
                    Listener::Tcp(l) => l
                        .poll_accept(cx)
                        .map_ok(|(s, a)| (Stream::Tcp(s), Peer::Ip(a))),
                    Listener::Unix(l) => l
                        .poll_accept(cx)
                        .map_ok(|(s, _)| (Stream::Unix(s), Peer::Unix)),
                };
                if let Poll::Ready(result) = polled {
                    return Poll::Ready((*index, result));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Turns an accept result into a connection, counting it as received for the master's
    /// view of the load; pauses on fd exhaustion instead of spinning.
    pub async fn connection(
        &mut self,
        (listener, accepted): (u16, io::Result<(Stream, Peer)>),
        shared: &Arc<Shared>,
    ) -> Option<Connection> {
        match accepted {
            Ok((stream, peer)) => {
                self.accepted += 1;
                let header = ConnectionHeader {
                    id: self.accepted,
                    listener,
                    peer,
                };
                let conn = Connection::accepted(header, stream, shared);
                // Reported with the next heartbeat: nobody balances on it in these modes.
                shared.counts.received().fetch_add(1, Ordering::SeqCst);
                Some(conn)
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                None
            }
        }
    }
}
