//! `--strategy kernel-least`: the least-loaded choice made in the kernel, the master off the
//! data path. The master (this module's [`Steering`], in the master process) binds one
//! `SO_REUSEPORT` listener per worker slot and per `--listen` address and keeps every one of
//! them open, so a worker's death never drops the connections queued on its listener: they
//! wait for the slot's next process, which gets the same listener. It loads a
//! `BPF_PROG_TYPE_SK_REUSEPORT` program ([`program`], assembled in Rust by [`asm`]) attached
//! as `SELECT_OR_MIGRATE`, which picks for each new connection the present slot with the
//! fewest active connections from a load array ([`layout`]) and selects that slot's listener
//! in a `REUSEPORT_SOCKARRAY`. Workers map the load array (`BPF_F_MMAPABLE`) and subtract 1
//! with an atomic add when a connection finishes; the program adds 1 when it picks. The
//! master keeps the socket array in step with the slots that have a ready process, and
//! reconciles each slot's count with the workers' own figures ([`Reconcile`]), so that
//! handshakes that never completed do not inflate a count forever.

pub(crate) mod asm;
pub(crate) mod layout;
pub(crate) mod program;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

use crate::sys;
use crate::sys::bpf::MappedArray;

pub(crate) use layout::MAX_SLOTS;

/// Why `kernel-least` or `kernel-p2c` could not be set up (the master's error names the
/// strategy in front).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// The kernel refused bpf(2): the process lacks CAP_BPF.
    #[error("needs CAP_BPF (run as root or grant the capability): bpf(2) refused with: {0}")]
    Capability(io::Error),
    /// The verifier refused the program.
    #[error("the kernel refused the program ({error}); verifier log:\n{log}")]
    Verifier {
        /// The OS error.
        error: io::Error,
        /// The verifier's log.
        log: String,
    },
    /// A step of the setup failed.
    #[error("{step} failed: {source}")]
    Io {
        /// The step.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The error of a failed `step`; `EPERM` from bpf(2) always means a missing capability.
fn step(step: &'static str) -> impl FnOnce(io::Error) -> SteerError {
    move |source| match source.raw_os_error() {
        Some(libc::EPERM) => SteerError::Capability(source),
        _ => SteerError::Io { step, source },
    }
}

/// Whether this process may create BPF maps (CAP_BPF): `kernel-least` can run here.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn available() -> bool {
    sys::bpf::create_map(sys::bpf::MAP_ARRAY, 4, 8, 1, 0, "handoff_probe").is_ok()
}

/// Which program picks the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// `kernel-least`: the present slot with the fewest active connections.
    Least,
    /// `kernel-p2c`: the less loaded of two present slots drawn at random.
    TwoChoices,
}

/// One `--listen` address: its reuseport group.
#[derive(Debug)]
struct Group {
    addr: SocketAddr,
    sockets: OwnedFd,
    _program: OwnedFd,
    /// Each slot's listener, held for as long as the slot exists.
    listeners: Vec<Option<OwnedFd>>,
}

/// The master's side of `kernel-least`: the maps, the program and every slot's listeners.
#[derive(Debug)]
pub(crate) struct Steering {
    loads: OwnedFd,
    mapped: MappedArray,
    groups: Vec<Group>,
    backlog: i32,
    /// Which slots the socket arrays hold now.
    present: Vec<bool>,
    reconcile: Vec<Reconcile>,
    pick: Pick,
}

impl Steering {
    /// Creates the maps and, for each address, the listeners of `slots` slots and the
    /// program attached to their group. Fails first (and with [`SteerError::Capability`])
    /// where bpf(2) is not allowed.
    pub fn new(
        addrs: &[SocketAddr],
        backlog: i32,
        slots: usize,
        pick: Pick,
    ) -> Result<Steering, SteerError> {
        let loads = sys::bpf::create_map(
            sys::bpf::MAP_ARRAY,
            4,
            layout::VALUE_LEN as u32,
            1,
            sys::bpf::F_MMAPABLE,
            "handoff_loads",
        )
        .map_err(step("creating the load array"))?;
        let mapped =
            MappedArray::map(&loads, layout::VALUE_LEN).map_err(step("mapping the load array"))?;
        let mut steering = Steering {
            loads,
            mapped,
            groups: Vec::new(),
            backlog,
            present: Vec::new(),
            reconcile: Vec::new(),
            pick,
        };
        for &addr in addrs {
            let group = steering.group(addr)?;
            steering.groups.push(group);
        }
        for slot in 0..slots {
            steering.add_slot(slot)?;
        }
        Ok(steering)
    }

    /// The socket array and program of one address; its first listener resolves port 0.
    fn group(&self, addr: SocketAddr) -> Result<Group, SteerError> {
        let sockets = sys::bpf::create_map(
            sys::bpf::MAP_REUSEPORT_SOCKARRAY,
            4,
            8,
            MAX_SLOTS as u32,
            0,
            "handoff_socks",
        )
        .map_err(step("creating the socket array"))?;
        let program = match self.pick {
            Pick::Least => program::least_loaded,
            Pick::TwoChoices => program::two_choices,
        };
        let insns = program(self.loads.as_raw_fd(), sockets.as_raw_fd());
        let program = sys::bpf::load_program(
            sys::bpf::PROG_SK_REUSEPORT,
            sys::bpf::ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE,
            &insns,
            "handoff_least",
        )
        .map_err(|e| match e.error.raw_os_error() {
            Some(libc::EPERM) => SteerError::Capability(e.error),
            _ => SteerError::Verifier {
                error: e.error,
                log: e.log,
            },
        })?;
        let first = sys::socket::tcp_listener(addr, self.backlog, true)
            .map_err(step("binding a slot listener"))?;
        sys::bpf::attach_reuseport(&first, &program)
            .map_err(step("attaching the program (SO_ATTACH_REUSEPORT_EBPF)"))?;
        let bound = sys::socket::local_addr(&first)
            .map_err(step("reading a listener's address"))?
            .unwrap_or(addr);
        Ok(Group {
            addr: bound,
            sockets,
            _program: program,
            listeners: vec![Some(first)],
        })
    }

    /// The bound addresses, in `--listen` order (port 0 resolved).
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.groups.iter().map(|g| g.addr)
    }

    /// Gives slot `slot` its listeners (a slot added by scaling up); absent until
    /// [`Steering::set_present`].
    pub fn add_slot(&mut self, slot: usize) -> Result<(), SteerError> {
        if slot >= MAX_SLOTS {
            return Err(SteerError::Io {
                step: "adding a slot",
                source: io::Error::other(format!("at most {MAX_SLOTS} workers")),
            });
        }
        for group in &mut self.groups {
            if group.listeners.len() <= slot {
                group.listeners.resize_with(slot + 1, || None);
            }
            if group.listeners[slot].is_none() {
                let fd = sys::socket::tcp_listener(group.addr, self.backlog, true)
                    .map_err(step("binding a slot listener"))?;
                group.listeners[slot] = Some(fd);
            }
        }
        if self.present.len() <= slot {
            self.present.resize(slot + 1, false);
            self.reconcile.resize_with(slot + 1, Reconcile::default);
        }
        self.word(layout::SLOTS_WORD)
            .fetch_max(slot as u64 + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Closes slot `slot`'s listeners (scaled down): what is queued on them migrates to the
    /// other slots once the last process holding them closes them too.
    pub fn remove_slot(&mut self, slot: usize) {
        self.set_present(slot, false);
        for group in &mut self.groups {
            if let Some(listener) = group.listeners.get_mut(slot) {
                *listener = None;
            }
        }
    }

    /// Slot `slot`'s listeners, one per address in `--listen` order, to send to its process.
    pub fn listeners(&self, slot: usize) -> Vec<(SocketAddr, BorrowedFd<'_>)> {
        self.groups
            .iter()
            .filter_map(|g| {
                let fd = g.listeners.get(slot)?.as_ref()?;
                Some((g.addr, fd.as_fd()))
            })
            .collect()
    }

    /// The load array, to send to a worker so it maps it.
    pub fn loads(&self) -> BorrowedFd<'_> {
        self.loads.as_fd()
    }

    /// Puts slot `slot` in the socket arrays (a ready process accepts on it) or takes it out
    /// (none does). In: the socket array first, then the flag the program reads; out: the
    /// flag first. A connection that races either way is selected by hash instead.
    pub fn set_present(&mut self, slot: usize, present: bool) {
        if self.present.get(slot).copied().unwrap_or(false) == present {
            return;
        }
        let key = (slot as u32).to_ne_bytes();
        let flag = self.word(layout::present_word(slot));
        if !present {
            flag.store(0, Ordering::SeqCst);
        }
        for group in &self.groups {
            let result = match (present, group.listeners.get(slot).and_then(Option::as_ref)) {
                (true, Some(fd)) => {
                    let value = (fd.as_raw_fd() as u64).to_ne_bytes();
                    sys::bpf::update_elem(&group.sockets, &key, &value)
                }
                _ => sys::bpf::delete_elem(&group.sockets, &key),
            };
            if let Err(e) = result {
                tracing::error!(slot, present, error = %e, "updating the socket array failed");
            }
        }
        if present {
            flag.store(1, Ordering::SeqCst);
        }
        self.present[slot] = present;
        tracing::debug!(slot, present, "kernel-least slot");
    }

    /// Whether slot `slot` is in the socket arrays.
    pub fn is_present(&self, slot: usize) -> bool {
        self.present.get(slot).copied().unwrap_or(false)
    }

    /// Slot `slot`'s count as the program sees it.
    pub fn load(&self, slot: usize) -> i64 {
        self.word(layout::load_word(slot)).load(Ordering::SeqCst) as i64
    }

    /// Connections waiting in slot `slot`'s accept queues.
    pub fn queued(&self, slot: usize) -> u64 {
        self.listeners(slot)
            .iter()
            .map(|(_, fd)| u64::from(sys::bpf::accept_queue_len(fd).unwrap_or(0)))
            .sum()
    }

    /// Brings slot `slot`'s count toward `truth` (its processes' active connections and its
    /// queued ones) where the two disagree the same way twice in a row; returns the change.
    pub fn reconcile(&mut self, slot: usize, truth: i64) -> i64 {
        let seen = self.load(slot);
        let Some(state) = self.reconcile.get_mut(slot) else {
            return 0;
        };
        let change = state.correction(truth, seen);
        if change != 0 {
            self.word(layout::load_word(slot))
                .fetch_add(change as u64, Ordering::SeqCst);
        }
        change
    }

    fn word(&self, index: usize) -> &std::sync::atomic::AtomicU64 {
        &self.mapped.words()[index]
    }
}

/// One slot's reconciliation: the count the program reads drifts from the truth when a
/// handshake never completes (reserved, never accepted, never finished), when a worker dies
/// with connections (their decrements never come) or when a worker cannot map the array
/// (an external one). A difference seen once may be a connection in flight between the
/// queue and the worker's counters; one seen twice the same way is drift: the smaller of
/// the two is corrected.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Reconcile {
    last: i64,
}

impl Reconcile {
    /// The change to apply to a count `seen` whose true value is `truth`.
    pub fn correction(&mut self, truth: i64, seen: i64) -> i64 {
        let now = truth - seen;
        let change = if now.signum() == self.last.signum() {
            now.signum() * now.abs().min(self.last.abs())
        } else {
            0
        };
        self.last = now - change;
        change
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    fn steering(slots: usize) -> Option<Steering> {
        steering_by(slots, Pick::Least)
    }

    fn steering_by(slots: usize, pick: Pick) -> Option<Steering> {
        match Steering::new(&["127.0.0.1:0".parse().unwrap()], 64, slots, pick) {
            Ok(s) => Some(s),
            Err(SteerError::Capability(e)) => {
                eprintln!("skipped: kernel-least needs CAP_BPF ({e})");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn queued(steering: &Steering) -> Vec<u64> {
        (0..steering.present.len())
            .map(|s| steering.queued(s))
            .collect()
    }

    /// Connects and waits (bounded) until the connection is in some slot's accept queue.
    fn connect(steering: &Steering, clients: &mut Vec<TcpStream>) {
        let before: u64 = queued(steering).iter().sum();
        let addr = steering.addrs().next().unwrap();
        clients.push(TcpStream::connect(addr).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queued(steering).iter().sum::<u64>() == before {
            assert!(std::time::Instant::now() < deadline, "never queued");
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_program_picks_the_present_slot_with_the_fewest_connections() {
        let Some(mut steering) = steering(3) else {
            return;
        };
        let mut clients = Vec::new();
        steering.set_present(1, true);
        steering.set_present(2, true);
        // Slot 2 starts with 2 more: the first two go to slot 1, then they alternate.
        steering
            .word(layout::load_word(2))
            .store(2, Ordering::SeqCst);
        for _ in 0..6 {
            connect(&steering, &mut clients);
        }
        assert_eq!(queued(&steering), vec![0, 4, 2]);
        assert_eq!(
            (steering.load(1), steering.load(2)),
            (4, 4),
            "each pick reserved"
        );
        // Slot 1 leaves: everything goes to slot 2 however loaded it is.
        steering.set_present(1, false);
        for _ in 0..2 {
            connect(&steering, &mut clients);
        }
        assert_eq!(queued(&steering), vec![0, 4, 4]);
    }

    #[test]
    fn two_choices_never_picks_the_busier_of_a_pair_nor_an_absent_slot() {
        let Some(mut steering) = steering_by(3, Pick::TwoChoices) else {
            return;
        };
        let mut clients = Vec::new();
        for slot in 0..3 {
            steering.set_present(slot, true);
        }
        // Slot 0 is far busier than the others: whichever pair is drawn (two distinct
        // slots), slot 0 loses it.
        steering
            .word(layout::load_word(0))
            .store(1000, Ordering::SeqCst);
        for _ in 0..40 {
            connect(&steering, &mut clients);
        }
        let first = queued(&steering);
        assert_eq!(first[0], 0, "{first:?}");
        // A pair (1, 2) goes to the lesser, so both get some.
        assert!(first[1] > 0 && first[2] > 0, "{first:?}");
        assert_eq!(
            steering.load(1) + steering.load(2),
            40,
            "each pick reserved"
        );
        // Slot 0 idle but absent: a pair with it goes to the other slot, never to it.
        steering
            .word(layout::load_word(0))
            .store(0, Ordering::SeqCst);
        steering.set_present(0, false);
        for _ in 0..20 {
            connect(&steering, &mut clients);
        }
        let then = queued(&steering);
        assert_eq!(then[0], 0, "{then:?}");
        assert_eq!(then[1] + then[2], 60, "{then:?}");
    }

    #[test]
    fn with_no_slot_present_the_kernel_picks_by_hash_and_nothing_is_dropped() {
        let Some(steering) = steering(2) else {
            return;
        };
        let mut clients = Vec::new();
        for _ in 0..4 {
            connect(&steering, &mut clients);
        }
        assert_eq!(queued(&steering).iter().sum::<u64>(), 4);
        assert_eq!(
            (steering.load(0), steering.load(1)),
            (0, 0),
            "no reservation"
        );
    }

    #[test]
    fn a_difference_seen_once_is_left_alone() {
        let mut r = Reconcile::default();
        assert_eq!(r.correction(5, 6), 0, "a handshake in flight");
        assert_eq!(r.correction(5, 5), 0);
        assert_eq!(r.correction(4, 5), 0);
        assert_eq!(r.correction(4, 3), 0, "the sign changed");
    }

    #[test]
    fn drift_seen_twice_is_corrected_by_the_smaller_difference() {
        let mut r = Reconcile::default();
        assert_eq!(r.correction(0, 3), 0);
        assert_eq!(r.correction(0, 5), -3);
        // Corrected to 2 over: 2 is what is left to take off once seen again.
        assert_eq!(r.correction(0, 2), -2);
        assert_eq!(r.correction(0, 0), 0);
    }

    #[test]
    fn a_count_below_the_truth_is_raised() {
        let mut r = Reconcile::default();
        assert_eq!(r.correction(4, 1), 0);
        assert_eq!(r.correction(4, 1), 3);
        assert_eq!(r.correction(4, 4), 0);
    }
}
