//! The kernel baselines, for benchmarks and side-by-side comparison, not for balancing: the
//! master binds as usual but does not accept; each worker gets listening sockets in a
//! [`Frame::Listeners`](crate::ipc::Frame::Listeners) frame and accepts itself.
//! `kernel-shared` sends every worker the master's one listener (the kernel wakes whichever
//! worker it likes: node's SCHED_NONE, gunicorn, puma); `kernel-reuseport` binds a fresh
//! `SO_REUSEPORT` listener per worker process on the port the master reserved (the kernel
//! hashes each connection to one of them). `kernel-least` is not a baseline but a strategy
//! the kernel runs: each slot's listener is the master's (held for the slot's life, see
//! `crate::bpf`), a worker gets its slot's listener and the load array, and the master keeps
//! the socket array in step with the table ([`Handout::steer`]) and reconciles the counts.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::table::{Phase, Table};
use crate::balance::Strategy;
use crate::bpf::{layout, Steering};
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
    /// `kernel-least`: each slot's listeners and the program that picks among them.
    Least(RefCell<Steering>),
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

    /// Sends a new worker of slot `index` its listeners, if workers accept in this mode.
    pub fn send_to(&self, index: usize, channel: &Channel) -> io::Result<()> {
        let mut bytes = Vec::new();
        match self {
            Handout::Master => Ok(()),
            Handout::Least(steering) => {
                let mut steering = steering.borrow_mut();
                steering.add_slot(index).map_err(io::Error::other)?;
                let word = layout::load_word(index) as u32;
                frame::encode_loads(&mut bytes, word, layout::VALUE_LEN as u32);
                channel.try_send(&bytes, &[steering.loads()])?;
                let listeners = steering.listeners(index);
                let entries = listeners
                    .iter()
                    .enumerate()
                    .map(|(i, (addr, _))| ConnectionHeader {
                        id: 0,
                        listener: i as u16,
                        peer: Peer::Ip(*addr),
                    });
                frame::encode_listeners(&mut bytes, entries);
                let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
                // The master keeps its copies: the slot's queue outlives the worker.
                channel.try_send(&bytes, &fds)
            }
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

/// `kernel-least`: one slot as the program sees it, for the control socket.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) struct SteeredSlot {
    worker: usize,
    /// In the socket array: the program may pick it.
    present: bool,
    /// The count the program compares.
    load: i64,
    /// Connections waiting in its accept queues.
    queued: u64,
}

impl Handout {
    /// `kernel-least`: each slot in use as the program sees it; `None` in other modes.
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub fn steered(&self, workers: usize) -> Option<Vec<SteeredSlot>> {
        let Handout::Least(steering) = self else {
            return None;
        };
        let steering = steering.borrow();
        Some(
            (0..workers)
                .map(|worker| SteeredSlot {
                    worker,
                    present: steering.is_present(worker),
                    load: steering.load(worker),
                    queued: steering.queued(worker),
                })
                .collect(),
        )
    }

    /// `kernel-least`: puts in the socket arrays exactly the slots in use whose process is
    /// ready (a slot whose process drains, died or is not ready yet is taken out first), and
    /// closes the listeners of slots scaled away or of a stopping master. Cheap: called
    /// after every change the master sends out.
    pub fn steer(&self, table: &Table) {
        let Handout::Least(steering) = self else {
            return;
        };
        let mut steering = steering.borrow_mut();
        for (index, slot) in table.slots.iter().enumerate() {
            let in_use = index < table.workers && !table.stopping;
            let ready = slot
                .process
                .as_ref()
                .is_some_and(|p| p.phase == Phase::Ready);
            steering.set_present(index, in_use && ready);
            if !in_use {
                steering.remove_slot(index);
            }
        }
    }

    /// `kernel-least`: brings each slot's count toward what its processes report active
    /// (the shared counters, or the last STATUS) plus what waits in its accept queues.
    pub fn reconcile(&self, table: &Table) {
        let Handout::Least(steering) = self else {
            return;
        };
        let mut steering = steering.borrow_mut();
        for (index, slot) in table.slots.iter().enumerate() {
            let active: u64 = slot
                .processes()
                .map(|p| match p.shared_totals() {
                    Some(status) => status.received_total.saturating_sub(status.closed_total),
                    None => p.owned(),
                })
                .sum();
            let truth = (active + steering.queued(index)) as i64;
            let change = steering.reconcile(index, truth);
            if change != 0 {
                tracing::debug!(slot = index, truth, change, "kernel-least count reconciled");
            }
        }
    }
}
