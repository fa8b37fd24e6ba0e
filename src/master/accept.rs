//! The accept loop, one task per listener: waits until some worker has room, drains the
//! kernel's accept queue (up to a batch), assigns each connection, then sends every
//! worker's batch in one `sendmsg`. Per-connection errors are skipped; fd exhaustion backs
//! off instead of spinning.

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

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

pub(crate) async fn run(ctx: Rc<Ctx>, listener: Rc<AsyncFd<OwnedFd>>, index: u16) {
    let capacity = ctx.table.borrow().capacity.clone();
    let mut pause = EXHAUSTED_PAUSE.0;
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
            Outcome::Drained => guard.clear_ready(),
            Outcome::Yield => {
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
}
