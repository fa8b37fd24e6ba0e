//! Power of two choices: two distinct eligible workers at random, the less loaded of the
//! two. Nearly as even as least-loaded with stale load figures, without herding.

use super::{Balance, Candidate};

/// Two random choices, the less loaded wins.
#[derive(Debug)]
pub struct TwoChoices {
    rng: fastrand::Rng,
    eligible: Vec<usize>,
}

impl Default for TwoChoices {
    fn default() -> Self {
        TwoChoices {
            rng: fastrand::Rng::new(),
            eligible: Vec::new(),
        }
    }
}

impl TwoChoices {
    /// A balancer with a fixed seed, for reproducible tests and benchmarks.
    #[cfg(any(test, feature = "cli"))]
    pub fn with_seed(seed: u64) -> Self {
        TwoChoices {
            rng: fastrand::Rng::with_seed(seed),
            eligible: Vec::new(),
        }
    }
}

impl Balance for TwoChoices {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        self.eligible.clear();
        self.eligible.extend(
            candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| c.eligible)
                .map(|(i, _)| i),
        );
        let k = self.eligible.len();
        match k {
            0 => None,
            1 => Some(self.eligible[0]),
            _ => {
                let first = self.rng.usize(..k);
                let second = (first + 1 + self.rng.usize(..k - 1)) % k;
                let (a, b) = (self.eligible[first], self.eligible[second]);
                Some(if candidates[b].load < candidates[a].load {
                    b
                } else {
                    a
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::candidates;

    #[test]
    fn never_picks_the_most_loaded_of_several() {
        let c = candidates(&[Some(1), Some(1), Some(100)]);
        let mut p2c = TwoChoices::with_seed(7);
        for _ in 0..1000 {
            assert_ne!(p2c.pick(&c), Some(2));
        }
    }

    #[test]
    fn spreads_evenly_when_loads_track_picks() {
        let mut loads = [0u64; 8];
        let mut p2c = TwoChoices::with_seed(42);
        for _ in 0..8000 {
            let c: Vec<_> = loads
                .iter()
                .map(|&l| Candidate {
                    eligible: true,
                    load: l,
                })
                .collect();
            loads[p2c.pick(&c).unwrap()] += 1;
        }
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 3, "{loads:?}");
    }

    #[test]
    fn handles_one_or_no_eligible_slot() {
        let mut p2c = TwoChoices::with_seed(1);
        assert_eq!(p2c.pick(&candidates(&[None, Some(9), None])), Some(1));
        assert_eq!(p2c.pick(&candidates(&[None, None])), None);
    }
}
