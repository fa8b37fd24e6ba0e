//! The accept loop, one task per listener: waits until some worker has room, drains the
//! kernel's accept queue (up to a batch), assigns each connection, then sends every
//! worker's batch in one `sendmsg`. Per-connection errors are skipped; fd exhaustion backs
//! off instead of spinning. Under a high arrival rate it paces itself ([`Pacer`]): it
//! collects connections for a fraction of a millisecond between batches instead of waking
//! for each one.

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use super::ctx::Ctx;
use super::link::{flush, sync};
use super::table::Table;
use crate::sys;

/// Connections accepted before the loop yields to acknowledgements and other listeners.
const BATCH: usize = 512;
/// First and longest pause after `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM`.
const EXHAUSTED_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

pub(crate) enum Outcome {
    /// The kernel queue is empty.
    Drained,
    /// A batch is done or workers are full; come back.
    Yield,
    /// Out of fds or memory.
    Exhausted(io::Error),
    /// Something unexpected; pause and retry.
    Failed(io::Error),
}

/// Why an `accept4` error ends (or not) the current batch.
fn classify(error: &io::Error) -> Option<bool> {
    match error.raw_os_error() {
        // The connection died in the queue, or was refused by a firewall hook: skip it.
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR) => None,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Some(true),
        _ => Some(false),
    }
}

/// How long the accept loop collects connections between batches while the arrival rate
/// is at least [`PACED_RATE`].
const GATHER: Duration = Duration::from_micros(200);
/// Connections per second from which the loop paces itself: two or more arrive per
/// [`GATHER`], so a pause gathers more than a wake-up per connection would take.
const PACED_RATE: u64 = 10_000;
/// How long the arrival rate is measured over before the pacing is decided again.
const RATE_WINDOW: Duration = Duration::from_millis(10);

/// Decides whether the accept loop waits a little before its next batch. A wake-up of the
/// master costs more than accepting a connection (on the 2-core VM about 10 µs against
/// 2 µs, docs/benchmarks.md), and at a high rate each connection arriving on its own
/// would wake it once. While the rate stays at [`PACED_RATE`] or more, the loop accepts
/// what is queued, sends it, then sleeps [`GATHER`] and looks again without going back
/// to epoll (where each arrival would wake it); a look that finds nothing ends the pacing
/// until the next wake-up. Below the rate, each connection is taken as it comes: pacing
/// delays a connection by up to [`GATHER`], never at a low rate.
#[derive(Debug)]
pub(crate) struct Pacer {
    window: Instant,
    accepted: u64,
    paced: bool,
}

impl Pacer {
    pub fn new(now: Instant) -> Self {
        Pacer {
            window: now,
            accepted: 0,
            paced: false,
        }
    }

    /// A batch of `accepted` connections ended with the queue not yet drained
    /// (it hit its limit): they count toward the rate.
    pub fn count(&mut self, accepted: usize) {
        self.accepted += accepted as u64;
    }

    /// A batch of `accepted` connections ended at `now` with the kernel queue empty: how
    /// long to gather before the next batch, or `None` to wait for the listener.
    pub fn after_batch(&mut self, accepted: usize, now: Instant) -> Option<Duration> {
        self.count(accepted);
        let elapsed = now.saturating_duration_since(self.window);
        if elapsed >= RATE_WINDOW {
            let per_second = self.accepted as u128 * 1_000_000 / elapsed.as_micros().max(1);
            self.paced = per_second >= u128::from(PACED_RATE);
            self.window = now;
            self.accepted = 0;
        }
        (self.paced && accepted > 0).then_some(GATHER)
    }
}

pub(crate) async fn run(ctx: Rc<Ctx>, listener: Rc<AsyncFd<OwnedFd>>, index: u16) {
    let capacity = ctx.table.borrow().capacity.clone();
    let mut pause = EXHAUSTED_PAUSE.0;
    let mut pacer = Pacer::new(Instant::now());
    loop {
        wait_for_room(&ctx, &capacity).await;
        let mut guard = match listener.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "listener failed; accept loop ends");
                return;
            }
        };
        // The workers' totals in memory first: acknowledged copies go, loads are fresh.
        sync(&ctx);
        let (accepted, outcome) = accept_batch(
            &mut ctx.table.borrow_mut(),
            listener.get_ref(),
            index,
            BATCH,
        );
        if accepted > 0 {
            pause = EXHAUSTED_PAUSE.0;
        }
        flush(&ctx);
        match outcome {
            Outcome::Drained => match pacer.after_batch(accepted, Instant::now()) {
                Some(gather) => {
                    // The queue was empty a moment ago: keep the readiness, so the next
                    // round accepts without waiting for epoll. A blocking sleep on purpose:
                    // waiting in the runtime would let each arrival wake the thread.
                    // Frames and timers wait at most this long; the yield runs them.
                    drop(guard);
                    std::thread::sleep(gather);
                    tokio::task::yield_now().await;
                }
                None => guard.clear_ready(),
            },
            Outcome::Yield => {
                pacer.count(accepted);
                drop(guard);
                tokio::task::yield_now().await;
            }
            Outcome::Exhausted(e) => {
                drop(guard);
                ctx.table.borrow_mut().counters.accept_errors += 1;
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept: out of resources, pausing");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(EXHAUSTED_PAUSE.1);
            }
            Outcome::Failed(e) => {
                drop(guard);
                ctx.table.borrow_mut().counters.accept_errors += 1;
                tracing::error!(error = %e, "accept failed, pausing");
                tokio::time::sleep(EXHAUSTED_PAUSE.1).await;
            }
        }
    }
}

/// Waits until the master may accept: some worker has room, nothing waits for re-dispatch,
/// the fd budget allows. Before sleeping it asks the workers that report in memory for a
/// frame at their next progress, then looks once more (their totals may have moved before
/// they saw the request).
async fn wait_for_room(ctx: &Ctx, capacity: &tokio::sync::Notify) {
    loop {
        let notified = capacity.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if ctx.table.borrow().can_accept() {
            return;
        }
        ctx.table.borrow().ask_for_reports();
        sync(ctx);
        flush(ctx);
        if ctx.table.borrow().can_accept() {
            return;
        }
        notified.await;
    }
}

/// Accepts up to `limit` connections from `listener` (number `index`) into the table, while
/// it can take them; returns how many, and why it stopped.
pub(crate) fn accept_batch(
    table: &mut Table,
    listener: &OwnedFd,
    index: u16,
    limit: usize,
) -> (usize, Outcome) {
    let mut accepted = 0;
    let outcome = loop {
        if !table.can_accept() || accepted == limit {
            break Outcome::Yield;
        }
        match sys::socket::accept(listener) {
            Ok((fd, peer)) => {
                table.accepted(fd, index, peer);
                accepted += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Outcome::Drained,
            Err(e) => match classify(&e) {
                None => table.counters.accept_errors += 1,
                Some(true) => break Outcome::Exhausted(e),
                Some(false) => break Outcome::Failed(e),
            },
        }
    };
    (accepted, outcome)
}

/// Accepts whatever waits in the kernel queue right now, without waiting; used once when
/// stopping, so connections the kernel already completed are served rather than reset.
pub(crate) fn drain_queue(ctx: &Ctx, listener: &AsyncFd<OwnedFd>, index: u16) -> usize {
    let mut table = ctx.table.borrow_mut();
    let mut accepted = 0;
    loop {
        match sys::socket::accept(listener.get_ref()) {
            Ok((fd, peer)) => {
                table.accepted(fd, index, peer);
                accepted += 1;
            }
            Err(e) if classify(&e).is_none() => continue,
            Err(_) => return accepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_errors_are_skipped_and_exhaustion_pauses() {
        let err = |code| io::Error::from_raw_os_error(code);
        assert_eq!(classify(&err(libc::ECONNABORTED)), None);
        assert_eq!(classify(&err(libc::EMFILE)), Some(true));
        assert_eq!(classify(&err(libc::ENFILE)), Some(true));
        assert_eq!(classify(&err(libc::EBADF)), Some(false));
    }

    #[test]
    fn the_loop_paces_itself_only_at_a_high_rate_and_while_connections_come() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut pacer = Pacer::new(start);
        // 1,000 connections/s: each taken as it comes.
        for ms in 1..=20 {
            assert_eq!(pacer.after_batch(1, at(ms)), None, "{ms} ms");
        }
        // 20,000/s over a window: paced from the window's end.
        assert_eq!(pacer.after_batch(200, at(29)), None);
        assert_eq!(pacer.after_batch(10, at(30)), Some(GATHER));
        assert_eq!(pacer.after_batch(3, at(31)), Some(GATHER));
        // A look that finds nothing waits for the listener, still in a fast window.
        assert_eq!(pacer.after_batch(0, at(32)), None);
        assert_eq!(pacer.after_batch(2, at(33)), Some(GATHER));
        // Batches cut at their limit count toward the rate too.
        pacer.count(300);
        assert_eq!(pacer.after_batch(0, at(40)), None);
        assert_eq!(pacer.after_batch(1, at(41)), Some(GATHER));
        // The rate falls: the next window ends the pacing.
        assert_eq!(pacer.after_batch(1, at(55)), None);
        assert_eq!(pacer.after_batch(1, at(56)), None);
    }
}
