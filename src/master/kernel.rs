//! The kernel baselines, for benchmarks and side-by-side comparison, not for balancing: the
//! master binds as usual but does not accept; each worker gets listening sockets in a
//! [`Frame::Listeners`](crate::ipc::Frame::Listeners) frame and accepts itself.
//! `kernel-shared` sends every worker the master's one listener (the kernel wakes whichever
//! worker it likes: node's SCHED_NONE, gunicorn, puma); `kernel-reuseport` binds a fresh
//! `SO_REUSEPORT` listener per worker process on the port the master reserved (the kernel
//! hashes each connection to one of them).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::balance::Strategy;
use crate::ipc::frame::{self, ConnectionHeader};
use crate::ipc::Channel;
use crate::sys;
use crate::sys::socket::Peer;

/// Who accepts, and with what.
#[derive(Debug)]
pub(crate) enum Handout {
    /// The master accepts (every balancing strategy).
    Master,
    /// Every worker gets these same listeners.
    Shared(Vec<(ConnectionHeader, OwnedFd)>),
    /// Every worker gets its own `SO_REUSEPORT` listener on each address; the master's
    /// bound, non-listening sockets keep the ports reserved.
    Reuseport {
        addrs: Vec<(ConnectionHeader, SocketAddr)>,
        backlog: i32,
        _reserved: Vec<OwnedFd>,
    },
}

impl Handout {
    /// Splits bound sockets by strategy; returns the listeners the master accepts on itself.
    /// In `kernel-reuseport` mode the sockets must be bound with `SO_REUSEPORT` and not
    /// listening (see `master::bind`).
    pub fn new(
        strategy: Strategy,
        bound: Vec<(Peer, OwnedFd)>,
        backlog: i32,
    ) -> (Self, Vec<OwnedFd>) {
        let entry = |index: usize, peer: Peer| ConnectionHeader {
            id: 0,
            listener: index as u16,
            peer,
        };
        match strategy {
            Strategy::KernelShared => {
                let shared = bound
                    .into_iter()
                    .enumerate()
                    .map(|(i, (peer, fd))| (entry(i, peer), fd))
                    .collect();
                (Handout::Shared(shared), Vec::new())
            }
            Strategy::KernelReuseport => {
                let addrs = bound
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (peer, _))| match peer {
                        Peer::Ip(addr) => Some((entry(i, *peer), *addr)),
                        Peer::Unix => None,
                    })
                    .collect();
                let reserved = bound.into_iter().map(|(_, fd)| fd).collect();
                (
                    Handout::Reuseport {
                        addrs,
                        backlog,
                        _reserved: reserved,
                    },
                    Vec::new(),
                )
            }
            _ => (
                Handout::Master,
                bound.into_iter().map(|(_, fd)| fd).collect(),
            ),
        }
    }

    /// Whether workers accept for themselves (the kernel baseline modes).
    pub fn workers_accept(&self) -> bool {
        !matches!(self, Handout::Master)
    }

    /// Sends a new worker its listeners, if workers accept in this mode.
    pub fn send_to(&self, channel: &Channel) -> io::Result<()> {
        let mut bytes = Vec::new();
        match self {
            Handout::Master => Ok(()),
            Handout::Shared(listeners) => {
                frame::encode_listeners(&mut bytes, listeners.iter().map(|(entry, _)| *entry));
                let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
                channel.try_send(&bytes, &fds)
            }
            Handout::Reuseport { addrs, backlog, .. } => {
                let own: Vec<OwnedFd> = addrs
                    .iter()
                    .map(|(_, addr)| sys::socket::tcp_listener(*addr, *backlog, true))
                    .collect::<io::Result<_>>()?;
                frame::encode_listeners(&mut bytes, addrs.iter().map(|(entry, _)| *entry));
                let fds: Vec<BorrowedFd<'_>> = own.iter().map(AsFd::as_fd).collect();
                // The worker holds the only copy once this returns; its death closes them.
                channel.try_send(&bytes, &fds)
            }
        }
    }
}
