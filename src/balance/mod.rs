//! Picking the worker for the next connection. Pure logic: the master describes each worker
//! slot as a [`Candidate`] and a [`Balance`] returns the index of the one to use. Runs in the
//! master, on the accept path, so a pick allocates nothing and looks at each slot once.

mod least_loaded;
mod round_robin;
mod two_choices;

pub use least_loaded::LeastLoaded;
pub use round_robin::RoundRobin;
pub use two_choices::TwoChoices;

/// How the master spreads connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Strategy {
    /// An exact rotation over the workers that can take a connection.
    RoundRobin,
    /// The worker with the fewest active connections; ties rotate.
    #[default]
    LeastLoaded,
    /// Two workers at random; the less loaded of the two.
    TwoChoices,
}

impl Strategy {
    /// A balancer for this strategy.
    pub fn balancer(self) -> Box<dyn Balance> {
        match self {
            Strategy::RoundRobin => Box::new(RoundRobin::default()),
            Strategy::LeastLoaded => Box::new(LeastLoaded::default()),
            Strategy::TwoChoices => Box::new(TwoChoices::default()),
        }
    }
}

/// One worker slot as a balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    /// Ready and below its pending limit: it may be picked.
    pub eligible: bool,
    /// Connections handed to it and not yet finished.
    pub load: u64,
}

/// A load-balancing policy.
pub trait Balance: std::fmt::Debug {
    /// The index of the candidate to hand the next connection to, or `None` if no candidate
    /// is eligible.
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize>;
}

#[cfg(test)]
pub(crate) fn candidates(loads: &[Option<u64>]) -> Vec<Candidate> {
    loads
        .iter()
        .map(|l| Candidate {
            eligible: l.is_some(),
            load: l.unwrap_or(0),
        })
        .collect()
}
