//! Connections in flight per backend, sampled: from the time each answered request was in
//! flight at the load generator ([`Span`]s, attributed to a backend by the pid that answered),
//! the count per backend at every sample instant of the window, and how far each count stood
//! above the least of them. Pure arithmetic, run in the bench process after a load run.
//!
//! The generator's span of a request begins at its connect and ends with the answer, so it
//! also holds the frontend's accept and connect to the backend: a little longer than the
//! backend's own view, the same for every contender.

use std::time::{Duration, Instant};

use serde::Serialize;

/// One backend's in-flight counts over the samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BackendInFlight {
    /// The mean count.
    pub mean: f64,
    /// The fraction of samples in which it was at most one above the least backend.
    pub within_one: f64,
    /// The most it stood above the least backend in any sample.
    pub max_above_least: u32,
}

/// All backends' in-flight counts over the samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Sample instants in the window.
    pub samples: u64,
    /// The fraction of samples in which every backend was within one of the least (the most
    /// loaded minus the least loaded at most 1).
    pub within_one: f64,
    /// The 99th percentile over the samples of the most loaded minus the least loaded.
    pub p99_above_least: u32,
    /// The largest such difference.
    pub max_above_least: u32,
    /// Per backend, in the order of the backends.
    pub backends: Vec<BackendInFlight>,
}

/// A request's time in flight at one backend (its index).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The backend's index.
    pub backend: usize,
    /// When it began.
    pub from: Instant,
    /// When it ended.
    pub to: Instant,
}

/// Counts the intervals in flight at each backend at `from`, `from + every`, … before `to`
/// (an interval counts at `t` when `from <= t < to`), over `backends` backends; intervals
/// naming a backend out of range are left out.
pub fn sample(
    intervals: &[Interval],
    backends: usize,
    from: Instant,
    to: Instant,
    every: Duration,
) -> Spread {
    if backends == 0 || every.is_zero() || to <= from {
        return Spread::default();
    }
    // (time, backend, +1 or -1), in time order; at one instant an end before a start.
    let mut events: Vec<(Instant, bool, usize)> = Vec::with_capacity(intervals.len() * 2);
    for i in intervals
        .iter()
        .filter(|i| i.backend < backends && i.from < i.to)
    {
        events.push((i.from, true, i.backend));
        events.push((i.to, false, i.backend));
    }
    events.sort_unstable_by_key(|&(at, starts, _)| (at, starts));
    let mut counts = vec![0i64; backends];
    let mut sums = vec![0u64; backends];
    let mut within = vec![0u64; backends];
    let mut worst = vec![0u32; backends];
    let mut differences: Vec<u32> = Vec::new();
    let mut next = events.iter().peekable();
    let mut at = from;
    while at < to {
        while let Some(&&(time, starts, backend)) = next.peek() {
            if time > at {
                break;
            }
            counts[backend] += if starts { 1 } else { -1 };
            next.next();
        }
        let least = counts.iter().copied().min().unwrap_or(0);
        let most = counts.iter().copied().max().unwrap_or(0);
        for (b, &count) in counts.iter().enumerate() {
            let above = u32::try_from(count - least).unwrap_or(u32::MAX);
            sums[b] += u64::try_from(count).unwrap_or(0);
            within[b] += u64::from(above <= 1);
            worst[b] = worst[b].max(above);
        }
        differences.push(u32::try_from(most - least).unwrap_or(u32::MAX));
        at += every;
    }
    let samples = differences.len() as u64;
    let fraction = |n: u64| n as f64 / samples.max(1) as f64;
    let all_within = differences.iter().filter(|&&d| d <= 1).count() as u64;
    differences.sort_unstable();
    let p99_index = ((differences.len() as f64 * 0.99).ceil() as usize).saturating_sub(1);
    Spread {
        samples,
        within_one: fraction(all_within),
        p99_above_least: differences.get(p99_index).copied().unwrap_or(0),
        max_above_least: differences.last().copied().unwrap_or(0),
        backends: (0..backends)
            .map(|b| BackendInFlight {
                mean: fraction(sums[b]),
                within_one: fraction(within[b]),
                max_above_least: worst[b],
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_what_is_in_flight_at_each_sample() {
        let t0 = Instant::now();
        let at = |backend, from, to| Interval {
            backend,
            from: t0 + ms(from),
            to: t0 + ms(to),
        };
        // Samples at 0, 10, 20, 30. Backend 0: 2 at 0 and 10, 1 at 20, 0 at 30.
        // Backend 1: 0, 0, 1, 1. Backend 2: always 0.
        let intervals = [
            at(0, 0, 25),
            at(0, 0, 15),
            at(1, 20, 40),
            // Ends exactly at a sample: not counted there.
            at(1, 5, 10),
            // Out of range: left out.
            at(7, 0, 40),
        ];
        let spread = sample(&intervals, 3, t0, t0 + ms(40), ms(10));
        assert_eq!(spread.samples, 4);
        assert_eq!(spread.backends[0].mean, (2 + 2 + 1) as f64 / 4.0);
        assert_eq!(spread.backends[0].max_above_least, 2);
        assert_eq!(spread.backends[0].within_one, 0.5);
        assert_eq!(spread.backends[1].mean, 0.5);
        assert_eq!(spread.backends[1].within_one, 1.0);
        assert_eq!(spread.backends[2].max_above_least, 0);
        // Differences most − least: 2, 2, 1, 1.
        assert_eq!(spread.within_one, 0.5);
        assert_eq!(spread.max_above_least, 2);
        assert_eq!(spread.p99_above_least, 2);
    }

    #[test]
    fn an_interval_that_started_before_the_window_counts_in_it() {
        let t0 = Instant::now() + ms(100);
        let intervals = [Interval {
            backend: 1,
            from: t0 - ms(50),
            to: t0 + ms(5),
        }];
        let spread = sample(&intervals, 2, t0, t0 + ms(10), ms(1));
        assert_eq!(spread.samples, 10);
        assert_eq!(spread.backends[1].mean, 0.5);
        assert_eq!(spread.within_one, 1.0);
    }

    #[test]
    fn nothing_to_sample_is_an_empty_spread() {
        let t0 = Instant::now();
        assert_eq!(sample(&[], 0, t0, t0 + ms(1), ms(1)), Spread::default());
        assert_eq!(sample(&[], 2, t0, t0, ms(1)).samples, 0);
    }
}
