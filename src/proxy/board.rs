//! The proxy's scoreboard: one shared-memory region (a sealed memfd the master creates and
//! every proxy worker maps) holding, per backend, the connections in flight across *all*
//! workers and whether the backend is up. A worker picks the backend with the fewest
//! connections in flight by scanning the counters and claiming the least one with a
//! compare-and-swap, so two workers racing for the same backend cannot both take it at the
//! count they saw: the loser scans again. That is exact least-connections across processes
//! (HAProxy's `leastconn`; nginx's `least_conn` counts per worker unless given a shared
//! zone), at the cost of a few atomic loads per connection.
//!
//! Each worker also keeps its own share of the counts in a row of the board it claims at
//! start (by pid). A worker that dies without releasing its connections leaves its row
//! behind; whoever finds the row's owner gone (a new worker at start, the master at each
//! health check) takes the row's counts off the totals, so a crash does not leave a backend
//! looking busy forever.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sys::shm::Layout;

/// Backends one proxy can balance over, at most.
pub const MAX_BACKENDS: usize = 64;
/// Worker processes that can hold connections at one time (running and draining), at most.
pub const MAX_ROWS: usize = 128;

/// A row being emptied by whoever found its owner dead.
const RECLAIMING: u32 = u32::MAX;

/// What the board knows of one backend, on a cache line of its own.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct BackendSlot {
    /// Connections in flight to it, all workers together.
    pub in_flight: AtomicU32,
    /// 1 while it is up (health checks pass), 0 while down.
    pub up: AtomicU32,
    /// Connections made to it, since the master started.
    pub connections: AtomicU64,
}

/// One worker's share of the counts: its pid, and its connections in flight per backend.
#[repr(C)]
#[derive(Debug)]
pub struct Row {
    /// The owner's pid; 0 when free, [`RECLAIMING`] while being emptied.
    pub owner: AtomicU32,
    in_flight: [AtomicU32; MAX_BACKENDS],
}

/// The region's layout; a change of it changes [`VERSION`].
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Board {
    version: AtomicU32,
    /// Backends in use (the first `backends` slots), written by the master before any
    /// worker starts.
    pub backends: AtomicU32,
    /// Tickets, one per pick: the round-robin position, and what a least-connections pick
    /// scrambles to choose among tied backends.
    cursor: AtomicU64,
    /// Connections waiting for a backend under `--max-conns-per-backend`, all workers.
    pub queued: AtomicU32,
    slots: [BackendSlot; MAX_BACKENDS],
    rows: [Row; MAX_ROWS],
}

/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the memfd.
pub const LEN: usize = 64 * 1024;
const _: () = assert!(std::mem::size_of::<Board>() <= LEN);

impl Layout for Board {
    const NAME: &'static std::ffi::CStr = c"handoff-proxy-board";
    const LEN: usize = LEN;
    const VERSION: u32 = VERSION;
    fn version(&self) -> &AtomicU32 {
        &self.version
    }
}

/// How a backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Balance {
    /// The backend with the fewest connections in flight across all workers (ties broken
    /// evenly, pseudo-randomly).
    #[default]
    LeastConn,
    /// Each backend in turn, whatever it is doing.
    RoundRobin,
}

/// The outcome of a [`Board::pick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// This backend, now counted as one more in flight.
    Backend(usize),
    /// Every backend that is up (and not excluded) is at `--max-conns-per-backend`.
    Full,
    /// No backend is up (or every one that is was excluded).
    NoneUp,
}

/// Compare-and-swap attempts before a pick takes its backend regardless (only reached under
/// a storm of concurrent picks; the count is then off by the racers, never lost).
const CAS_ATTEMPTS: usize = 64;

impl Board {
    /// Backends in use.
    pub fn len(&self) -> usize {
        (self.backends.load(Ordering::Relaxed) as usize).min(MAX_BACKENDS)
    }

    /// The master, before any worker starts: `backends` backends, all `up`.
    pub fn init(&self, backends: usize, up: bool) {
        let backends = backends.min(MAX_BACKENDS);
        for slot in &self.slots[..backends] {
            slot.up.store(up as u32, Ordering::Relaxed);
        }
        self.backends.store(backends as u32, Ordering::Release);
    }

    /// Backend `index`'s slot.
    #[cfg(test)]
    pub fn slot(&self, index: usize) -> &BackendSlot {
        &self.slots[index]
    }

    /// Whether backend `index` is up.
    pub fn is_up(&self, index: usize) -> bool {
        self.slots[index].up.load(Ordering::Acquire) == 1
    }

    /// Marks backend `index` up or down; true if that changed it.
    pub fn set_up(&self, index: usize, up: bool) -> bool {
        self.slots[index].up.swap(up as u32, Ordering::AcqRel) != up as u32
    }

    /// Claims a free row for the worker `pid`, first emptying the rows of workers that are
    /// gone (`alive` says which pids still run). `None` if every row is held.
    pub fn claim_row(&self, pid: u32, alive: impl Fn(u32) -> bool) -> Option<usize> {
        self.reclaim(&alive);
        self.rows.iter().position(|row| {
            row.owner
                .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Empties every row whose owner `alive` says is gone: its connections in flight come
    /// off the backends' totals. Returns how many connections that released.
    pub fn reclaim(&self, alive: impl Fn(u32) -> bool) -> u64 {
        let mut released = 0;
        for row in &self.rows {
            let owner = row.owner.load(Ordering::Acquire);
            if owner == 0 || owner == RECLAIMING || alive(owner) {
                continue;
            }
            // Only one reclaimer wins the row; the dead owner writes to it no more.
            if row
                .owner
                .compare_exchange(owner, RECLAIMING, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            for (index, count) in row.in_flight.iter().enumerate() {
                let held = count.swap(0, Ordering::AcqRel);
                if held > 0 {
                    self.slots[index]
                        .in_flight
                        .fetch_sub(held, Ordering::AcqRel);
                    released += u64::from(held);
                }
            }
            row.owner.store(0, Ordering::Release);
        }
        released
    }

    /// Chooses a backend for a new connection from the worker holding `row`, counting it in
    /// flight there: by `balance`, among the backends that are up, not in `excluded` (a bit
    /// per backend: those this connection already failed to reach) and below `cap`
    /// connections in flight.
    pub fn pick(&self, row: usize, balance: Balance, cap: Option<u32>, excluded: u64) -> Pick {
        let n = self.len();
        if n == 0 {
            return Pick::NoneUp;
        }
        let ticket = self.cursor.fetch_add(1, Ordering::Relaxed);
        for attempt in 0.. {
            let (best, any_up) = match balance {
                Balance::LeastConn => self.least(n, cap, excluded, ticket + attempt as u64),
                Balance::RoundRobin => self.next_in_turn(n, cap, excluded, ticket),
            };
            let Some((index, count)) = best else {
                return if any_up { Pick::Full } else { Pick::NoneUp };
            };
            let slot = &self.slots[index];
            let claimed = if attempt >= CAS_ATTEMPTS {
                slot.in_flight.fetch_add(1, Ordering::AcqRel);
                true
            } else {
                slot.in_flight
                    .compare_exchange(count, count + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            };
            if claimed {
                self.rows[row].in_flight[index].fetch_add(1, Ordering::AcqRel);
                slot.connections.fetch_add(1, Ordering::Relaxed);
                return Pick::Backend(index);
            }
        }
        unreachable!("the loop above returns")
    }

    /// Backend `index`'s connections in flight, if it is up and not in `excluded`.
    fn up_count(&self, index: usize, excluded: u64) -> Option<u32> {
        if excluded & (1 << index) != 0 || !self.is_up(index) {
            return None;
        }
        Some(self.slots[index].in_flight.load(Ordering::Acquire))
    }

    /// Least-connections (with whether any backend is up): one of the backends at the least
    /// count that may be picked, and that count, chosen among those tied
    /// by `ticket` scrambled, so each tied backend is as likely as the others whatever its
    /// position (a scan from a rotating start would favour the backend after a busy one:
    /// it wins from its own start and from the busy one's).
    fn least(
        &self,
        n: usize,
        cap: Option<u32>,
        excluded: u64,
        ticket: u64,
    ) -> (Option<(usize, u32)>, bool) {
        let mut any_up = false;
        let mut least = u32::MAX;
        let mut tied = 0u64;
        for index in 0..n {
            let Some(count) = self.up_count(index, excluded) else {
                continue;
            };
            any_up = true;
            if cap.is_some_and(|cap| count >= cap) {
                continue;
            }
            if count < least {
                least = count;
                tied = 1 << index;
            } else if count == least {
                tied |= 1 << index;
            }
        }
        if tied == 0 {
            return (None, any_up);
        }
        let rank = (scramble(ticket) % u64::from(tied.count_ones())) as u32;
        (Some((nth_set_bit(tied, rank), least)), any_up)
    }

    /// Round-robin (with whether any backend is up): the first backend that may be picked
    /// from position `ticket`, and its count.
    fn next_in_turn(
        &self,
        n: usize,
        cap: Option<u32>,
        excluded: u64,
        ticket: u64,
    ) -> (Option<(usize, u32)>, bool) {
        let start = (ticket % n as u64) as usize;
        let mut any_up = false;
        for k in 0..n {
            let index = (start + k) % n;
            let Some(count) = self.up_count(index, excluded) else {
                continue;
            };
            any_up = true;
            if cap.is_some_and(|cap| count >= cap) {
                continue;
            }
            return (Some((index, count)), true);
        }
        (None, any_up)
    }

    /// A connection of the worker holding `row` to backend `index` is finished.
    pub fn release(&self, row: usize, index: usize) {
        self.rows[row].in_flight[index].fetch_sub(1, Ordering::AcqRel);
        self.slots[index].in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// This worker's connections in flight to backend `index`.
    pub fn row_in_flight(&self, row: usize, index: usize) -> u32 {
        self.rows[row].in_flight[index].load(Ordering::Relaxed)
    }
}

/// SplitMix64's finaliser: consecutive tickets become well spread bits, so a rank taken
/// modulo the number of tied backends does not follow the pattern of the ties.
fn scramble(ticket: u64) -> u64 {
    let mut z = ticket.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The index of the `rank`-th (from 0) set bit of `bits`, which has more than `rank`.
fn nth_set_bit(mut bits: u64, rank: u32) -> usize {
    for _ in 0..rank {
        bits &= bits - 1;
    }
    bits.trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shm::Mapping;

    fn board(backends: usize) -> Mapping<Board> {
        let mapping = Mapping::<Board>::create().unwrap();
        mapping.region().init(backends, true);
        mapping
    }

    fn in_flight(board: &Board) -> Vec<u32> {
        (0..board.len())
            .map(|i| board.slot(i).in_flight.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn least_connections_takes_the_least_and_spreads_ties() {
        let mapping = board(3);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        let mut first = Vec::new();
        for _ in 0..3 {
            let Pick::Backend(i) = b.pick(row, Balance::LeastConn, None, 0) else {
                panic!()
            };
            first.push(i);
        }
        first.sort();
        assert_eq!(first, [0, 1, 2], "one each before any gets a second");
        b.release(row, 1);
        assert_eq!(b.pick(row, Balance::LeastConn, None, 0), Pick::Backend(1));
        assert_eq!(in_flight(b), [1, 1, 1]);
    }

    /// Picks `picks` times from `b`, releasing each pick at once, and counts per backend.
    fn picks_released_at_once(b: &Board, row: usize, picks: usize) -> Vec<u32> {
        let mut counts = vec![0u32; b.len()];
        for _ in 0..picks {
            let Pick::Backend(i) = b.pick(row, Balance::LeastConn, None, 0) else {
                panic!()
            };
            counts[i] += 1;
            b.release(row, i);
        }
        counts
    }

    /// The bias found in the benchmark: with a scan from a rotating start, the backend
    /// after a busy one won the ties of two starts (its own and the busy one's), 2/8 of the
    /// picks against 1/8 for the others. Counts, not time: the tickets are the same each run.
    #[test]
    fn ties_beside_a_busy_backend_are_shared_evenly() {
        let mapping = board(8);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        for _ in 0..8 {
            b.pick(row, Balance::LeastConn, None, 0);
        }
        for i in (0..8).filter(|&i| i != 2) {
            b.release(row, i);
        }
        assert_eq!(in_flight(b), [0, 0, 1, 0, 0, 0, 0, 0]);
        let counts = picks_released_at_once(b, row, 70_000);
        assert_eq!(counts[2], 0, "the busy backend is never the least");
        for (i, &count) in counts.iter().enumerate().filter(|&(i, _)| i != 2) {
            // 10,000 expected each; a pseudo-random choice strays by ~100.
            assert!((9_500..=10_500).contains(&count), "backend {i}: {counts:?}");
        }
    }

    #[test]
    fn ties_among_idle_backends_are_shared_evenly() {
        let mapping = board(5);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        let counts = picks_released_at_once(b, row, 50_000);
        for (i, &count) in counts.iter().enumerate() {
            assert!((9_500..=10_500).contains(&count), "backend {i}: {counts:?}");
        }
        assert_eq!(in_flight(b), [0; 5]);
    }

    #[test]
    fn nth_set_bit_counts_from_the_lowest() {
        assert_eq!(nth_set_bit(0b1011_0100, 0), 2);
        assert_eq!(nth_set_bit(0b1011_0100, 1), 4);
        assert_eq!(nth_set_bit(0b1011_0100, 3), 7);
        assert_eq!(nth_set_bit(1 << 63, 0), 63);
    }

    #[test]
    fn the_spread_never_exceeds_one_while_connections_only_arrive() {
        let mapping = board(5);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        for _ in 0..103 {
            b.pick(row, Balance::LeastConn, None, 0);
            let counts = in_flight(b);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "{counts:?}");
        }
    }

    #[test]
    fn down_excluded_and_full_backends_are_skipped() {
        let mapping = board(3);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        b.set_up(0, false);
        for _ in 0..2 {
            let pick = b.pick(row, Balance::LeastConn, Some(2), 0b100);
            assert_eq!(pick, Pick::Backend(1));
        }
        assert_eq!(b.pick(row, Balance::LeastConn, Some(2), 0b100), Pick::Full);
        assert_eq!(
            b.pick(row, Balance::LeastConn, Some(2), 0b110),
            Pick::NoneUp
        );
        b.set_up(2, false);
        assert_eq!(b.pick(row, Balance::RoundRobin, None, 0), Pick::Backend(1));
    }

    #[test]
    fn round_robin_ignores_the_counts() {
        let mapping = board(2);
        let b = mapping.region();
        let row = b.claim_row(10, |_| true).unwrap();
        let picks: Vec<Pick> = (0..4)
            .map(|_| b.pick(row, Balance::RoundRobin, None, 0))
            .collect();
        assert_eq!(
            picks,
            [
                Pick::Backend(0),
                Pick::Backend(1),
                Pick::Backend(0),
                Pick::Backend(1)
            ]
        );
    }

    #[test]
    fn a_dead_workers_connections_are_taken_off_the_totals() {
        let mapping = board(2);
        let b = mapping.region();
        let dead = b.claim_row(111, |_| true).unwrap();
        let live = b.claim_row(222, |_| true).unwrap();
        assert_ne!(dead, live);
        for _ in 0..3 {
            b.pick(dead, Balance::RoundRobin, None, 0);
        }
        b.pick(live, Balance::RoundRobin, None, 0);
        assert_eq!(in_flight(b).iter().sum::<u32>(), 4);
        let released = b.reclaim(|pid| pid != 111);
        assert_eq!(released, 3);
        assert_eq!(
            in_flight(b).iter().sum::<u32>(),
            1,
            "the live worker's stays"
        );
        assert_eq!(
            b.claim_row(333, |_| true),
            Some(dead),
            "the row is free again"
        );
    }

    #[test]
    fn racing_workers_keep_the_spread_within_one() {
        let mapping = std::sync::Arc::new(board(4));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let mapping = mapping.clone();
                std::thread::spawn(move || {
                    let b = mapping.region();
                    let row = b.claim_row(1000 + t, |_| true).unwrap();
                    for _ in 0..250 {
                        let Pick::Backend(_) = b.pick(row, Balance::LeastConn, None, 0) else {
                            panic!()
                        };
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(in_flight(mapping.region()), [250, 250, 250, 250]);
    }
}
