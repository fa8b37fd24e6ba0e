//! The respawn schedule: a worker that dies soon after it started waits exponentially longer
//! before the next start (so a crash loop never spins the CPU); one that ran for a stable
//! period is restarted at once and clears the count.

use std::time::Duration;

/// Per-slot respawn delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable_after: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays start at `base`, double per quick failure up to `cap`, and reset once a worker
    /// has lived for `stable_after`.
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Self {
        Backoff {
            base,
            cap,
            stable_after,
            failures: 0,
        }
    }

    /// Records an exit after `uptime` and returns how long to wait before the next start.
    pub fn on_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable_after {
            self.failures = 0;
            return Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// Quick failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Notes that the slot's worker has now run for `uptime` without failing: once that is
    /// the stable period, the failure count is cleared (a worker that recovered from a crash
    /// loop stops being reported as one).
    pub fn note_uptime(&mut self, uptime: Duration) {
        if uptime >= self.stable_after {
            self.failures = 0;
        }
    }

    /// Whether the slot is in a crash loop: [`CRASH_LOOP_FAILURES`] quick failures in a row
    /// or more.
    pub fn crash_looping(&self) -> bool {
        self.failures >= CRASH_LOOP_FAILURES
    }
}

/// Quick failures in a row after which a slot is reported as crash-looping.
pub const CRASH_LOOP_FAILURES: u32 = 5;

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_millis(5);

    #[test]
    fn quick_failures_double_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..12).map(|_| b.on_exit(QUICK).as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(b.failures(), 12);
    }

    #[test]
    fn a_stable_run_resets_the_schedule() {
        let mut b = Backoff::default();
        b.on_exit(QUICK);
        b.on_exit(QUICK);
        assert_eq!(b.on_exit(Duration::from_secs(60)), Duration::ZERO);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.on_exit(QUICK), Duration::from_millis(100));
    }

    #[test]
    fn a_worker_that_stays_up_clears_the_crash_loop() {
        let mut b = Backoff::default();
        for _ in 0..CRASH_LOOP_FAILURES {
            b.on_exit(QUICK);
        }
        assert!(b.crash_looping());
        b.note_uptime(Duration::from_secs(3));
        assert!(b.crash_looping(), "not yet stable");
        b.note_uptime(Duration::from_secs(10));
        assert!(!b.crash_looping());
        assert_eq!(
            b.on_exit(QUICK),
            Duration::from_millis(100),
            "schedule restarts"
        );
    }

    #[test]
    fn thousands_of_failures_never_overflow() {
        let mut b = Backoff::default();
        for _ in 0..10_000 {
            assert!(b.on_exit(Duration::ZERO) <= Duration::from_secs(30));
        }
    }
}
