//! Finished connections the worker keeps open a little longer. The master holds its own copy
//! of each connection's fd until it reads the worker's acknowledgement; a short request is
//! often served and finished before that, and then the master's close is the last one and
//! the whole TCP teardown (`tcp_close`) runs on the master's single thread, at 2.5–3.7 µs a
//! connection. A worker that keeps a finished fd for [`LINGER`] (its write side already shut
//! down, so the client has its FIN) lets the master's close be the cheap one (0.2 µs) and
//! pays the teardown itself, on one of many workers. Runs in each worker process.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a finished connection's fd stays open in the worker: far longer than the master
/// takes to read an acknowledgement, short enough that few fds wait.
pub(crate) const LINGER: Duration = Duration::from_millis(20);

/// Finished fds waiting for their close, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Lingering {
    queue: Mutex<VecDeque<(Instant, OwnedFd)>>,
    wake: Notify,
}

impl Lingering {
    /// Keeps `fd` open until [`LINGER`] after `now`.
    pub fn keep(&self, fd: OwnedFd, now: Instant) {
        let mut queue = self.lock();
        queue.push_back((now, fd));
        if queue.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// Closes every fd kept (the worker needs its fds, or is ending).
    pub fn close_all(&self) -> usize {
        let closed = std::mem::take(&mut *self.lock());
        closed.len()
    }

    /// Closes the fds whose linger is over at `now`; returns when the next one is due.
    fn close_due(&self, now: Instant) -> Option<Instant> {
        let mut queue = self.lock();
        while queue.front().is_some_and(|(at, _)| *at + LINGER <= now) {
            queue.pop_front();
        }
        queue.front().map(|(at, _)| *at + LINGER)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, OwnedFd)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes each kept fd once its time has come; runs for the worker's life.
    pub async fn run(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.close_due(Instant::now()) {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn fds_close_once_their_linger_is_over_oldest_first() {
        let lingering = Lingering::default();
        let start = Instant::now();
        lingering.keep(fd(), start);
        lingering.keep(fd(), start + Duration::from_millis(5));
        assert_eq!(lingering.close_due(start), Some(start + LINGER));
        assert_eq!(
            lingering.close_due(start + LINGER),
            Some(start + Duration::from_millis(5) + LINGER),
            "the first closed, the second still waits"
        );
        assert_eq!(lingering.close_due(start + LINGER * 2), None);
        lingering.keep(fd(), start);
        assert_eq!(lingering.close_all(), 1);
    }
}
