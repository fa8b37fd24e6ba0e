//! Rejuvenation policy: when a worker process should be replaced by a fresh one. Pure logic
//! plus one `/proc` read, used by the master. Each process gets its own, slightly lowered
//! copy of the configured limits ([`Limits::jittered`]) so workers started together do not
//! all reach a limit, and recycle, at the same moment.

use std::fmt;

use std::time::Duration;

/// The configured recycling limits; `None` means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Replace a worker once it has run this long.
    pub max_age: Option<Duration>,
    /// Replace a worker once this many connections have been handed to it.
    pub max_connections: Option<u64>,
    /// Replace a worker once its resident set reaches this many bytes.
    pub max_rss: Option<u64>,
}

/// Why a worker process is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Reason {
    /// It reached `--max-age`.
    MaxAge,
    /// It reached `--max-connections`.
    MaxConnections,
    /// Its resident set reached `--max-rss`.
    MaxRss,
    /// A rolling restart (SIGHUP).
    Restart,
    /// Its slot was removed (SIGTTOU).
    ScaleDown,
    /// The master is stopping.
    Shutdown,
    /// The worker said it is draining on its own (e.g. it got SIGTERM).
    WorkerDraining,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::MaxAge => "max-age",
            Reason::MaxConnections => "max-connections",
            Reason::MaxRss => "max-rss",
            Reason::Restart => "restart",
            Reason::ScaleDown => "scale-down",
            Reason::Shutdown => "shutdown",
            Reason::WorkerDraining => "worker-draining",
        })
    }
}

/// What the master knows about a running worker when it checks the limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// How long it has run.
    pub age: Duration,
    /// Connections handed to it so far.
    pub connections: u64,
    /// Its resident set in bytes, if it was read.
    pub rss: Option<u64>,
}

/// Lowers `limit` by up to `percent` percent: `unit` (in `0.0..1.0`, drawn at random per
/// process) says how far. Never raises a limit, so a configured `--max-rss` stays an upper
/// bound; never returns 0 for a positive limit.
pub fn jitter(limit: u64, percent: f64, unit: f64) -> u64 {
    let fraction = (percent.clamp(0.0, 100.0) / 100.0) * unit.clamp(0.0, 1.0);
    let lowered = (limit as f64 * (1.0 - fraction)).round() as u64;
    lowered.clamp(limit.min(1), limit)
}

impl Limits {
    /// This process's own limits: each one lowered by the same random fraction of `percent`
    /// (see [`jitter`]).
    pub(crate) fn jittered(&self, percent: f64, unit: f64) -> Limits {
        Limits {
            max_age: self
                .max_age
                .map(|age| Duration::from_micros(jitter(age.as_micros() as u64, percent, unit))),
            max_connections: self.max_connections.map(|n| jitter(n, percent, unit)),
            max_rss: self.max_rss.map(|n| jitter(n, percent, unit)),
        }
    }

    /// The first limit `usage` has reached, if any: memory first, then connections, then
    /// age.
    pub(crate) fn reached(&self, usage: Usage) -> Option<Reason> {
        if let (Some(limit), Some(rss)) = (self.max_rss, usage.rss) {
            if rss >= limit {
                return Some(Reason::MaxRss);
            }
        }
        if self.max_connections.is_some_and(|n| usage.connections >= n) {
            return Some(Reason::MaxConnections);
        }
        if self.max_age.is_some_and(|age| usage.age >= age) {
            return Some(Reason::MaxAge);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_lowers_and_by_at_most_the_percentage() {
        for unit in [0.0, 0.25, 0.5, 0.999] {
            let j = jitter(1000, 10.0, unit);
            assert!((900..=1000).contains(&j), "{unit}: {j}");
        }
        assert_eq!(jitter(1000, 10.0, 0.0), 1000);
        assert_eq!(jitter(1000, 10.0, 0.5), 950);
        assert_eq!(jitter(1000, 0.0, 0.7), 1000, "no jitter");
        assert_eq!(jitter(1, 90.0, 0.99), 1, "never 0 for a positive limit");
        assert_eq!(jitter(0, 10.0, 0.5), 0);
        assert_eq!(
            jitter(1000, 500.0, 2.0),
            1,
            "out-of-range inputs are clamped"
        );
    }

    #[test]
    fn jitter_spreads_workers_started_together() {
        let mut rng = fastrand::Rng::with_seed(7);
        let limits: Vec<u64> = (0..8).map(|_| jitter(50, 10.0, rng.f64())).collect();
        let distinct: std::collections::HashSet<_> = limits.iter().collect();
        assert!(distinct.len() >= 3, "{limits:?}");
        assert!(limits.iter().all(|l| (45..=50).contains(l)), "{limits:?}");
    }

    #[test]
    fn jittered_limits_lower_every_limit_alike() {
        let limits = Limits {
            max_age: Some(Duration::from_secs(100)),
            max_connections: Some(200),
            max_rss: Some(1 << 30),
        };
        let own = limits.jittered(10.0, 0.5);
        assert_eq!(own.max_age, Some(Duration::from_secs(95)));
        assert_eq!(own.max_connections, Some(190));
        assert_eq!(
            own.max_rss,
            Some(((1u64 << 30) as f64 * 0.95).round() as u64)
        );
        assert_eq!(Limits::default().jittered(10.0, 0.5), Limits::default());
    }

    #[test]
    fn reached_names_the_first_limit_hit() {
        let limits = Limits {
            max_age: Some(Duration::from_secs(60)),
            max_connections: Some(50),
            max_rss: Some(1000),
        };
        let fresh = Usage {
            age: Duration::from_secs(1),
            connections: 3,
            rss: Some(10),
        };
        assert_eq!(limits.reached(fresh), None);
        let old = Usage {
            age: Duration::from_secs(60),
            ..fresh
        };
        assert_eq!(limits.reached(old), Some(Reason::MaxAge));
        let busy = Usage {
            connections: 50,
            ..old
        };
        assert_eq!(limits.reached(busy), Some(Reason::MaxConnections));
        let fat = Usage {
            rss: Some(1000),
            ..busy
        };
        assert_eq!(limits.reached(fat), Some(Reason::MaxRss));
        let unread = Usage { rss: None, ..fresh };
        assert_eq!(limits.reached(unread), None, "no reading, no rss verdict");
        assert_eq!(Limits::default().reached(fat), None);
    }
}
