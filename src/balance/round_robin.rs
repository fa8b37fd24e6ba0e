//! Round-robin: an exact rotation over eligible workers, whatever their load.

use super::{Balance, Candidate};

/// Exact rotation; a slot that is not eligible is skipped, not owed a turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Balance for RoundRobin {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        let n = candidates.len();
        (0..n)
            .map(|offset| (self.next + offset) % n)
            .find(|&i| candidates[i].eligible)
            .inspect(|&i| {
                self.next = (i + 1) % n;
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::candidates;

    #[test]
    fn rotates_exactly_whatever_the_load() {
        let c = candidates(&[Some(9), Some(0), Some(5), Some(1)]);
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..8).map(|_| rr.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn skips_slots_that_cannot_take_a_connection() {
        let c = candidates(&[Some(0), None, Some(0)]);
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..4).map(|_| rr.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn none_when_nobody_is_eligible() {
        assert_eq!(RoundRobin::default().pick(&candidates(&[None, None])), None);
        assert_eq!(RoundRobin::default().pick(&[]), None);
    }
}
