//! The verdict: one line per workload saying how handoff did against what a user would run
//! instead, from the figures of that very run: capacity against `kernel-reuseport` (the
//! fastest kernel way) and evenness against `kernel-shared` (the shared accept queue of node,
//! gunicorn and puma). Pure functions of the measured figures; runs in the bench process.

use super::format::percent_range;
use super::stats::Capacity;
use super::Row;

/// Median capacities this close (as a fraction) read "as fast as".
pub const SAME_SPEED: f64 = 0.03;

/// Spreads of per-worker shares under this many percentage points read as even: below it,
/// the counting noise of a short run decides.
const EVEN_POINTS: f64 = 1.0;

/// One spread this many times another's is "more even"; closer, "as even as".
const EVENNESS_RATIO: f64 = 1.5;

/// The handoff contenders a verdict speaks for, in order of preference: least-loaded is the
/// default strategy.
const SUBJECTS: [&str; 3] = ["handoff-least", "handoff-rr", "handoff-p2c"];

/// What a verdict looks at for one contender.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// The contender.
    pub name: String,
    /// Its closed-loop capacity, when measured.
    pub capacity: Option<Capacity>,
    /// Each worker's fraction of the requests (open loop).
    pub shares: Vec<f64>,
    /// Failed requests (open loop).
    pub errors: u64,
}

impl Figures {
    /// The figures of a row that ran.
    pub fn of(row: &Row) -> Figures {
        Figures {
            name: row.contender.clone(),
            capacity: row.capacity.clone(),
            shares: row.workers.iter().map(|w| w.request_share).collect(),
            errors: row.error_total,
        }
    }
}

/// The verdict for one workload's rows: about `handoff-least` if it ran (else the first
/// handoff strategy that did), against the kernel rows that ran; `None` without a handoff row.
pub fn for_workload(rows: &[Row]) -> Option<String> {
    let ran = |name: &str| {
        rows.iter()
            .find(|r| r.contender == name && r.unavailable.is_none())
            .map(Figures::of)
    };
    let subject = SUBJECTS.into_iter().find_map(ran)?;
    let reuseport = ran("kernel-reuseport");
    let shared = ran("kernel-shared");
    Some(line(&subject, reuseport.as_ref(), shared.as_ref()))
}

/// `subject`'s verdict: its speed against `reuseport`'s (when both capacities were measured),
/// its evenness against `shared`'s, and its errors if it had any.
pub fn line(subject: &Figures, reuseport: Option<&Figures>, shared: Option<&Figures>) -> String {
    let mut parts = Vec::new();
    if let Some(speed) = speed(subject, reuseport) {
        parts.push(speed);
    }
    parts.push(evenness(subject, shared));
    if subject.errors > 0 {
        parts.push(format!("but {} failed requests", subject.errors));
    }
    format!("{}: {}", subject.name, parts.join("; "))
}

/// `x` as a multiplier: two decimals below 2, one below 10, none above.
fn times(x: f64) -> String {
    match x {
        x if x < 2.0 => format!("{x:.2}×"),
        x if x < 10.0 => format!("{x:.1}×"),
        x => format!("{x:.0}×"),
    }
}

fn speed(subject: &Figures, reuseport: Option<&Figures>) -> Option<String> {
    let mine = subject.capacity.as_ref()?;
    let theirs = reuseport?.capacity.as_ref()?;
    if theirs.median_rps <= 0.0 || mine.median_rps <= 0.0 {
        return None;
    }
    let ratio = mine.median_rps / theirs.median_rps;
    Some(if (ratio - 1.0).abs() <= SAME_SPEED {
        format!(
            "as fast as SO_REUSEPORT (within {:.0}%)",
            SAME_SPEED * 100.0
        )
    } else if mine.overlaps(theirs) {
        format!(
            "within noise of SO_REUSEPORT ({} its median, ranges overlap)",
            times(ratio)
        )
    } else if ratio > 1.0 {
        format!("{} faster than SO_REUSEPORT", times(ratio))
    } else {
        format!("{} slower than SO_REUSEPORT", times(1.0 / ratio))
    })
}

/// The lowest and highest share, in percent.
fn range(shares: &[f64]) -> (f64, f64) {
    let lo = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = shares.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if shares.is_empty() {
        (0.0, 0.0)
    } else {
        (lo * 100.0, hi * 100.0)
    }
}

fn evenness(subject: &Figures, shared: Option<&Figures>) -> String {
    let (lo, hi) = range(&subject.shares);
    let mine = percent_range(&subject.shares);
    let Some(shared) = shared else {
        return format!("workers took {mine} of the requests each");
    };
    let (their_lo, their_hi) = range(&shared.shares);
    let theirs = percent_range(&shared.shares);
    let (my_spread, their_spread) = (hi - lo, their_hi - their_lo);
    if my_spread < EVEN_POINTS && their_spread < EVEN_POINTS {
        return "as even as the kernel's shared accept (both within 1 point)".to_owned();
    }
    if my_spread < EVEN_POINTS {
        return format!(
            "even across workers ({mine} each) where the kernel's shared accept gives {theirs}"
        );
    }
    let ratio = their_spread / my_spread;
    let comparison = if ratio >= EVENNESS_RATIO {
        format!("{} more even than", times(ratio))
    } else if ratio <= 1.0 / EVENNESS_RATIO {
        format!("{} less even than", times(1.0 / ratio))
    } else {
        "as even as".to_owned()
    };
    format!("{comparison} the kernel's shared accept ({mine} per worker against {theirs})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(name: &str, runs: &[f64], shares: &[f64]) -> Figures {
        Figures {
            name: name.to_owned(),
            capacity: Capacity::of(runs.to_vec()),
            shares: shares.iter().map(|s| s / 100.0).collect(),
            errors: 0,
        }
    }

    const EVEN: [f64; 4] = [25.0, 25.0, 25.0, 25.0];

    #[test]
    fn within_three_percent_is_as_fast() {
        let handoff = figures("handoff-least", &[9_800.0, 10_000.0, 10_100.0], &EVEN);
        let reuseport = figures("kernel-reuseport", &[9_000.0, 10_200.0, 12_000.0], &EVEN);
        let line = line(&handoff, Some(&reuseport), None);
        assert!(
            line.starts_with("handoff-least: as fast as SO_REUSEPORT (within 3%);"),
            "{line}"
        );
    }

    #[test]
    fn overlapping_ranges_are_noise_and_apart_ones_a_ratio() {
        let reuseport = figures("kernel-reuseport", &[9_000.0, 10_000.0, 12_000.0], &EVEN);
        let close = figures("handoff-rr", &[8_000.0, 9_000.0, 9_500.0], &EVEN);
        let line_close = line(&close, Some(&reuseport), None);
        assert!(
            line_close.contains("within noise of SO_REUSEPORT (0.90× its median"),
            "{line_close}"
        );
        let slow = figures("handoff-rr", &[4_000.0, 4_400.0, 5_000.0], &EVEN);
        let line_slow = line(&slow, Some(&reuseport), None);
        assert!(
            line_slow.contains("2.3× slower than SO_REUSEPORT"),
            "{line_slow}"
        );
        let fast = figures("handoff-rr", &[12_500.0, 13_000.0, 14_000.0], &EVEN);
        let line_fast = line(&fast, Some(&reuseport), None);
        assert!(
            line_fast.contains("1.30× faster than SO_REUSEPORT"),
            "{line_fast}"
        );
    }

    #[test]
    fn evenness_is_the_ratio_of_share_spreads_against_the_shared_queue() {
        let shared = figures("kernel-shared", &[], &[31.0, 27.0, 15.0, 27.0]);
        let least = figures("handoff-least", &[], &[24.0, 26.0, 25.0, 25.0]);
        let line_least = line(&least, None, Some(&shared));
        assert_eq!(
            line_least,
            "handoff-least: 8.0× more even than the kernel's shared accept \
             (24–26% per worker against 15–31%)"
        );
        let exact = figures("handoff-rr", &[], &EVEN);
        let line_exact = line(&exact, None, Some(&shared));
        assert!(
            line_exact.contains("even across workers (25% each)"),
            "{line_exact}"
        );
        let worse = figures("handoff-p2c", &[], &[40.0, 20.0, 20.0, 20.0]);
        let line_worse = line(
            &worse,
            None,
            Some(&figures("k", &[], &[26.0, 24.0, 25.0, 25.0])),
        );
        assert!(line_worse.contains("10× less even than"), "{line_worse}");
        let alike = line(
            &least,
            None,
            Some(&figures("k", &[], &[24.5, 26.5, 25.0, 24.0])),
        );
        assert!(
            alike.contains("as even as the kernel's shared accept"),
            "{alike}"
        );
    }

    #[test]
    fn failed_requests_are_part_of_the_verdict() {
        let mut handoff = figures("handoff-least", &[], &EVEN);
        handoff.errors = 3;
        assert!(line(&handoff, None, None).ends_with("; but 3 failed requests"));
    }

    #[test]
    fn the_verdict_speaks_for_least_loaded_and_needs_a_handoff_row() {
        let row = |name: &str, runs: &[f64]| {
            let mut row = super::super::measure::unavailable(name, String::new());
            row.unavailable = None;
            row.capacity = Capacity::of(runs.to_vec());
            row
        };
        let mut rows = vec![
            row("kernel-reuseport", &[100.0]),
            row("handoff-rr", &[50.0]),
        ];
        let only_rr = for_workload(&rows).unwrap();
        assert!(
            only_rr.starts_with("handoff-rr: 2.0× slower than SO_REUSEPORT"),
            "{only_rr}"
        );
        rows.push(row("handoff-least", &[101.0]));
        let least = for_workload(&rows).unwrap();
        assert!(least.starts_with("handoff-least: as fast as"), "{least}");
        rows[2].unavailable = Some("did not start".to_owned());
        assert!(for_workload(&rows).unwrap().starts_with("handoff-rr"));
        assert_eq!(for_workload(&rows[..1]), None);
    }
}
