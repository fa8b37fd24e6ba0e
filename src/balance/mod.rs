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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
    /// Baseline, not balancing: every worker accepts on one shared listening socket (node's
    /// SCHED_NONE, gunicorn, puma); the kernel picks whoever it wakes.
    KernelShared,
    /// Baseline, not balancing: every worker accepts on its own `SO_REUSEPORT` socket; the
    /// kernel hashes each connection's 4-tuple to one of them.
    KernelReuseport,
    /// The least-loaded choice made in the kernel: an eBPF program on a group of
    /// `SO_REUSEPORT` listeners (one per worker, all held by the master) picks the
    /// listener of the worker with the fewest active connections; the master accepts
    /// nothing. Needs CAP_BPF.
    KernelLeast,
    /// Power of two choices made in the kernel, by the same means as `KernelLeast`: two
    /// workers at random, the less loaded of the two. Needs CAP_BPF.
    #[cfg_attr(feature = "cli", value(name = "kernel-p2c"))]
    #[serde(rename = "kernel-p2c")]
    KernelP2c,
}

impl Strategy {
    /// A balancer for this strategy; `None` for the kernel modes, where workers accept.
    pub fn balancer(self) -> Option<Box<dyn Balance>> {
        match self {
            Strategy::RoundRobin => Some(Box::new(RoundRobin::default())),
            Strategy::LeastLoaded => Some(Box::new(LeastLoaded::default())),
            Strategy::TwoChoices => Some(Box::new(TwoChoices::default())),
            Strategy::KernelShared
            | Strategy::KernelReuseport
            | Strategy::KernelLeast
            | Strategy::KernelP2c => None,
        }
    }

    /// Whether workers accept for themselves (a kernel baseline) instead of the master.
    pub fn is_kernel(self) -> bool {
        matches!(
            self,
            Strategy::KernelShared
                | Strategy::KernelReuseport
                | Strategy::KernelLeast
                | Strategy::KernelP2c
        )
    }

    /// Whether an eBPF program picks the worker (`kernel-least`, `kernel-p2c`).
    pub fn is_steered(self) -> bool {
        matches!(self, Strategy::KernelLeast | Strategy::KernelP2c)
    }

    /// The name `--strategy` takes.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastLoaded => "least-loaded",
            Strategy::TwoChoices => "two-choices",
            Strategy::KernelShared => "kernel-shared",
            Strategy::KernelReuseport => "kernel-reuseport",
            Strategy::KernelLeast => "kernel-least",
            Strategy::KernelP2c => "kernel-p2c",
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

#[cfg(test)]
mod tests {
    use super::Strategy;

    #[test]
    fn a_strategy_s_name_is_the_one_status_and_the_flag_use() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastLoaded,
            Strategy::TwoChoices,
            Strategy::KernelShared,
            Strategy::KernelReuseport,
            Strategy::KernelLeast,
            Strategy::KernelP2c,
        ] {
            let serialized = serde_json::to_value(strategy).unwrap();
            assert_eq!(serialized, strategy.name(), "{strategy:?}");
            #[cfg(feature = "cli")]
            assert_eq!(
                clap::ValueEnum::to_possible_value(&strategy)
                    .unwrap()
                    .get_name(),
                strategy.name()
            );
        }
    }
}
