//! The arithmetic of a benchmark row: Jain's fairness index, max/min ratios, shares and
//! latency percentiles from an HDR histogram. Pure functions, run in the bench process.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Jain's fairness index J = (Σx)² / (n·Σx²): 1 when every `x` is equal, k/n when k of the
/// n values carry everything. `None` for no values or all zeros (nothing to be fair about).
pub fn jain(values: &[f64]) -> Option<f64> {
    let n = values.len() as f64;
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if values.is_empty() || squares <= 0.0 {
        return None;
    }
    Some((sum * sum) / (n * squares))
}

/// The largest value over the smallest; `None` when there are no values or the smallest is
/// zero (an idle worker: the ratio is unbounded).
pub fn max_over_min(values: &[f64]) -> Option<f64> {
    let max = values.iter().copied().fold(f64::NAN, f64::max);
    let min = values.iter().copied().fold(f64::NAN, f64::min);
    if values.is_empty() || min.is_nan() || min <= 0.0 {
        return None;
    }
    Some(max / min)
}

/// Each value as a fraction of their sum (all zeros when the sum is zero).
pub fn shares(values: &[f64]) -> Vec<f64> {
    let sum: f64 = values.iter().sum();
    values
        .iter()
        .map(|x| if sum > 0.0 { x / sum } else { 0.0 })
        .collect()
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Responses the figures are drawn from.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// The slowest response.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `histogram` (values recorded in microseconds).
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: histogram.len(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// A closed-loop capacity measured in several runs: every run, and their median, lowest and
/// highest, in requests per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    /// Each run's requests per second, in the order run.
    pub runs_rps: Vec<f64>,
    /// The median run (the mean of the middle two for an even count).
    pub median_rps: f64,
    /// The slowest run.
    pub min_rps: f64,
    /// The fastest run.
    pub max_rps: f64,
}

impl Capacity {
    /// The spread of `runs`; `None` when there are none (or one is not a number).
    pub fn of(runs: Vec<f64>) -> Option<Capacity> {
        if runs.is_empty() || runs.iter().any(|r| r.is_nan()) {
            return None;
        }
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Capacity {
            median_rps: median,
            min_rps: sorted[0],
            max_rps: sorted[n - 1],
            runs_rps: runs,
        })
    }

    /// Whether the two min–max ranges share any value.
    pub fn overlaps(&self, other: &Capacity) -> bool {
        self.min_rps <= other.max_rps && other.min_rps <= self.max_rps
    }
}

/// A histogram for latencies from 1 µs to an hour at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn jain_is_one_for_equal_shares_and_k_over_n_for_k_busy_workers() {
        assert!(close(jain(&[5.0, 5.0, 5.0, 5.0]).unwrap(), 1.0));
        assert!(close(jain(&[7.0, 0.0, 0.0, 0.0]).unwrap(), 0.25));
        assert!(close(jain(&[3.0, 3.0, 0.0, 0.0]).unwrap(), 0.5));
        // (1+2+3+4)² / (4·(1+4+9+16)) = 100/120
        assert!(close(jain(&[1.0, 2.0, 3.0, 4.0]).unwrap(), 100.0 / 120.0));
        assert_eq!(jain(&[]), None);
        assert_eq!(jain(&[0.0, 0.0]), None);
    }

    #[test]
    fn max_over_min_is_unbounded_with_an_idle_worker() {
        assert!(close(max_over_min(&[2.0, 8.0, 4.0]).unwrap(), 4.0));
        assert!(close(max_over_min(&[3.0]).unwrap(), 1.0));
        assert_eq!(max_over_min(&[0.0, 8.0]), None);
        assert_eq!(max_over_min(&[]), None);
    }

    #[test]
    fn shares_sum_to_one_or_are_all_zero() {
        let s = shares(&[1.0, 3.0]);
        assert!(close(s[0], 0.25) && close(s[1], 0.75));
        assert_eq!(shares(&[0.0, 0.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn capacity_is_the_median_and_range_of_its_runs() {
        let c = Capacity::of(vec![900.0, 1200.0, 1000.0]).unwrap();
        assert_eq!(
            (c.median_rps, c.min_rps, c.max_rps),
            (1000.0, 900.0, 1200.0)
        );
        assert_eq!(c.runs_rps, vec![900.0, 1200.0, 1000.0], "kept in run order");
        let even = Capacity::of(vec![4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(even.median_rps, 2.5);
        assert_eq!(Capacity::of(Vec::new()), None);
        assert_eq!(Capacity::of(vec![1.0, f64::NAN]), None);
        let apart = Capacity::of(vec![1300.0, 1400.0]).unwrap();
        assert!(c.overlaps(&Capacity::of(vec![1200.0, 1500.0]).unwrap()));
        assert!(!c.overlaps(&apart) && !apart.overlaps(&c));
    }

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p90, 900);
        assert_eq!(p.p99, 990);
        assert_eq!(p.p999, 999);
        assert_eq!(p.max, 1000);
        assert!(close(p.mean, 500.5));
        assert_eq!(
            Percentiles::of(&latency_histogram()),
            Percentiles::default()
        );
    }
}
