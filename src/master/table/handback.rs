//! Connections a draining worker hands back (HANDBACK frames): the table's checks and the
//! way such a connection goes to another worker. The fd was checked by the `link` room (a
//! connected stream of the listener named); what the table decides here needs no I/O.

use std::os::fd::OwnedFd;

use super::{Pending, Phase, Table};
use crate::sys::socket::Peer;

/// Why the master refused a connection a worker handed back (it closes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandBackRefused {
    #[error("the worker is not in the table")]
    Gone,
    #[error("the master is stopping: no worker can take it")]
    Stopping,
    #[error("in a kernel mode the master dispatches nothing")]
    KernelMode,
    #[error("the worker is not draining")]
    NotDraining,
    #[error("the worker has handed back as many connections as it was sent ({0})")]
    MoreThanSent(u64),
    #[error("the master holds as many connections as its fd budget allows")]
    AtBudget,
}

/// A connection handed back after this master handed over to a new one (a live upgrade):
/// none of its workers takes connections any more, so it goes to the new master.
#[derive(Debug)]
pub(crate) struct Onward {
    pub fd: OwnedFd,
    pub listener: u16,
    pub prefix: Vec<u8>,
}

impl Table {
    /// Takes a connection worker `pid` of slot `index` handed back (its fd already checked:
    /// a connected stream of `listener`) with the `bytes` it had read, and assigns it to
    /// another worker like a connection just accepted, after those waiting for
    /// re-dispatch. Refused unless the worker is draining and has handed back no more than
    /// it was sent, the master can dispatch (not stopping, not a kernel mode) and has room
    /// under its fd budget; a refused connection is closed. A master that handed over to a
    /// new one (`self.onward`) answers it [`Onward`], for the new master's workers.
    pub fn handed_back(
        &mut self,
        index: usize,
        pid: u32,
        fd: OwnedFd,
        (listener, peer): (u16, Peer),
        bytes: Vec<u8>,
    ) -> Result<Option<Onward>, HandBackRefused> {
        let dispatching = self.balancer.is_some();
        let (stopping, at_budget) = (self.stopping, self.held.get() >= self.max_held);
        let Some(process) = self.slots.get_mut(index).and_then(|s| s.find_mut(pid)) else {
            self.refuse_hand_back(index, pid);
            return Err(HandBackRefused::Gone);
        };
        let onward = self.onward;
        let refused = if !dispatching {
            Some(HandBackRefused::KernelMode)
        } else if stopping && !onward {
            Some(HandBackRefused::Stopping)
        } else if process.phase != Phase::Draining {
            Some(HandBackRefused::NotDraining)
        } else if process.handed_back >= process.sent_total() {
            Some(HandBackRefused::MoreThanSent(process.sent_total()))
        } else if at_budget {
            Some(HandBackRefused::AtBudget)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(fd);
            self.refuse_hand_back(index, pid);
            return Err(refused);
        }
        process.handed_back += 1;
        self.counters.handed_back += 1;
        if onward {
            let prefix = bytes;
            return Ok(Some(Onward {
                fd,
                listener,
                prefix,
            }));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.retry.push_back(Pending {
            id,
            listener,
            peer,
            fd,
            prefix: bytes.into_boxed_slice(),
            _held: self.held.token(),
        });
        self.redispatch();
        Ok(None)
    }

    /// Takes a connection the master this one replaced forwarded (one of its workers handed
    /// it back after the hand-over): assigned like a connection handed back here. Refused,
    /// and closed, when this master stops or is at its fd budget.
    pub fn inherited(
        &mut self,
        fd: OwnedFd,
        (listener, peer): (u16, Peer),
        prefix: Vec<u8>,
    ) -> Result<Option<Onward>, HandBackRefused> {
        if self.balancer.is_none() {
            return Err(HandBackRefused::KernelMode);
        }
        if self.onward {
            // Handed over in turn while the master before still drains (upgrades in
            // quick succession): it goes on to the newest master.
            self.counters.handed_back += 1;
            return Ok(Some(Onward {
                fd,
                listener,
                prefix,
            }));
        }
        if self.stopping {
            return Err(HandBackRefused::Stopping);
        }
        if self.held.get() >= self.max_held {
            return Err(HandBackRefused::AtBudget);
        }
        self.counters.handed_back += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.retry.push_back(Pending {
            id,
            listener,
            peer,
            fd,
            prefix: prefix.into_boxed_slice(),
            _held: self.held.token(),
        });
        self.redispatch();
        Ok(None)
    }

    /// Counts a connection process `pid` of slot `index` handed back as refused (closed).
    pub fn refuse_hand_back(&mut self, index: usize, pid: u32) {
        self.counters.handbacks_refused += 1;
        if let Some(process) = self.slots.get_mut(index).and_then(|s| s.find_mut(pid)) {
            process.handbacks_refused += 1;
        }
    }

    /// Connections process `pid` of slot `index` handed back that the master refused, all
    /// told: what decides whether a refusal is logged (the first few, then every power of
    /// two), so a worker that floods cannot flood the log.
    pub fn handbacks_refused(&self, index: usize, pid: u32) -> u64 {
        self.find(index, pid).map_or(0, |p| p.handbacks_refused)
    }
}
