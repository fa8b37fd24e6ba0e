//! Least-loaded: the eligible worker with the fewest active connections; among equals, the
//! search starts after the last pick, so ties rotate instead of piling onto slot 0.

use super::{Balance, Candidate};

/// Fewest active connections, ties rotating.
#[derive(Debug, Default)]
pub struct LeastLoaded {
    next: usize,
}

impl Balance for LeastLoaded {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        let n = candidates.len();
        let mut best: Option<usize> = None;
        for offset in 0..n {
            let i = (self.next + offset) % n;
            let c = candidates[i];
            if c.eligible && best.is_none_or(|b| c.load < candidates[b].load) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.next = (i + 1) % n;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::candidates;

    #[test]
    fn picks_the_fewest_active_connections() {
        let c = candidates(&[Some(5), Some(2), Some(7)]);
        assert_eq!(LeastLoaded::default().pick(&c), Some(1));
    }

    #[test]
    fn ties_rotate() {
        let c = candidates(&[Some(3), Some(3), Some(3)]);
        let mut ll = LeastLoaded::default();
        let picks: Vec<_> = (0..6).map(|_| ll.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn ignores_a_less_loaded_slot_that_is_not_eligible() {
        let c = candidates(&[Some(4), None, Some(6)]);
        assert_eq!(LeastLoaded::default().pick(&c), Some(0));
        assert_eq!(LeastLoaded::default().pick(&candidates(&[None])), None);
    }

    #[test]
    fn fills_the_idle_worker_until_it_catches_up() {
        let mut loads = [10u64, 0];
        let mut ll = LeastLoaded::default();
        for _ in 0..10 {
            let c: Vec<_> = loads
                .iter()
                .map(|&l| Candidate {
                    eligible: true,
                    load: l,
                })
                .collect();
            let i = ll.pick(&c).unwrap();
            loads[i] += 1;
        }
        assert_eq!(loads, [10, 10]);
    }
}
