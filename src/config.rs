//! What a master is asked to do: listeners, worker count, strategy and limits. Built by
//! [`crate::Builder`] or from `handoff run` flags.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::balance::Strategy;
use crate::supervise::{Backoff, Limits};

/// An address to listen on: `127.0.0.1:8000`, `[::1]:8000`, `localhost:8000` (a host name
/// stands for its first address) or `unix:/path/to.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddr {
    /// A TCP address (port 0 picks a free port; the master logs the one it got).
    Tcp(SocketAddr),
    /// A Unix stream socket path (a stale socket file there is replaced).
    Unix(PathBuf),
}

/// A listen address that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {0:?}: expected HOST:PORT, [IPV6]:PORT or unix:/path")]
pub struct ParseListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ParseListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ParseListenAddrError(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse() {
            return Ok(ListenAddr::Tcp(addr));
        }
        // HOST:PORT with a host name (`localhost:8000`): its first address, as resolved now.
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ParseListenAddrError(s.to_owned()))?;
        // A host name has a letter and nothing but letters, digits, dots and dashes: "0",
        // "127.1" or "::1" are not names (the resolver would read "0" as 0.0.0.0, every
        // interface), and an address must be written in full.
        let is_name = host.bytes().any(|b| b.is_ascii_alphabetic())
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !is_name || port.parse::<u16>().is_err() {
            return Err(ParseListenAddrError(s.to_owned()));
        }
        std::net::ToSocketAddrs::to_socket_addrs(s)
            .ok()
            .and_then(|mut addrs| addrs.next())
            .map(ListenAddr::Tcp)
            .ok_or_else(|| ParseListenAddrError(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything the master needs to know.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Listening addresses, in order (a connection's `listener` index refers to it).
    pub listen: Vec<ListenAddr>,
    /// Worker processes.
    pub workers: usize,
    /// How connections are spread.
    pub strategy: Strategy,
    /// The kernel accept queue length of each listener.
    pub backlog: i32,
    /// Connections handed to one worker and not yet acknowledged, at most.
    pub max_pending: usize,
    /// How long workers get to finish in-flight connections on stop.
    pub shutdown_timeout: Duration,
    /// How often workers send a status report when nothing happens, at most; workers are
    /// asked for one at least every quarter of [`Config::worker_timeout`].
    pub heartbeat: Duration,
    /// A Unix socket path where the master answers `status` with JSON.
    pub control: Option<PathBuf>,
    /// An address where the master serves Prometheus text at `/metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Respawn delays.
    pub(crate) backoff: Backoff,
    /// When a worker is replaced by a fresh one (age, connections, memory).
    pub limits: Limits,
    /// Each worker's limits are lowered by a random share of up to this many percent, so
    /// workers started together are not recycled together.
    pub jitter_percent: f64,
    /// How often worker memory is read when [`Limits::max_rss`] is set.
    pub rss_interval: Duration,
    /// How long a worker being replaced (recycled, restarted, scaled down) may take to finish
    /// its connections before it is killed.
    pub drain_timeout: Duration,
    /// Workers replaced at a time by a rolling restart (SIGHUP); `None`: a quarter of them,
    /// at least one.
    pub restart_batch: Option<usize>,
    /// A worker silent for this long (no frame at all) is aborted and replaced.
    pub worker_timeout: Duration,
    /// A worker that holds connections unacknowledged this long without acknowledging or
    /// finishing any is given up on like a silent one: its connections go to other workers.
    pub ack_timeout: Duration,
    /// Threads of each worker's tokio runtime: 1 (the default) is a current-thread runtime,
    /// more a multi-threaded one. Read in the worker; `handoff run` COMMAND workers ignore it.
    pub worker_threads: usize,
    /// The bounds of the shared map held by the master (see [`crate::state`]).
    pub state: crate::state::StateLimits,
    /// Where the workers' shared map lives: `None` or `master` (the default: in the master),
    /// or a Redis URL (`redis://HOST:PORT[/DB]`, `redis+unix:///PATH`). Workers get it in
    /// `HANDOFF_STATE`.
    pub state_url: Option<String>,
}

/// Refuses socket paths that would collide: `--control` equal to a `unix:` listen path, or
/// one `unix:` listen path given twice (each bind would replace the other's socket file).
/// Paths are compared made absolute, without resolving symlinks.
fn check_paths(config: &Config) -> Result<(), String> {
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(|e| format!("the socket path {path:?}: {e}"))
    };
    let mut listening: Vec<PathBuf> = Vec::new();
    for addr in &config.listen {
        if let ListenAddr::Unix(path) = addr {
            let path = absolute(path)?;
            if listening.contains(&path) {
                return Err(format!("--listen unix:{} is given twice", path.display()));
            }
            listening.push(path);
        }
    }
    if let Some(control) = &config.control {
        let control = absolute(control)?;
        if listening.contains(&control) {
            return Err(format!(
                "--control {} is also a unix: listen path; give the control socket a path of \
                 its own",
                control.display()
            ));
        }
    }
    Ok(())
}

/// Refuses a `--state` that names no backend this build has: `master`, or a Redis URL with
/// the `redis` feature.
fn check_state(url: &str) -> Result<(), String> {
    if url == "master" {
        return Ok(());
    }
    #[cfg(feature = "redis")]
    {
        crate::state::redis::check_url(url)
            .map(drop)
            .map_err(|e| format!("--state: {e}"))
    }
    #[cfg(not(feature = "redis"))]
    {
        Err(format!(
            "--state {url:?}: this build has no Redis backend (the `redis` feature); \
             `master` is the one it has"
        ))
    }
}

/// The most threads a worker's runtime may have.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The most worker processes a master runs (`--workers`, SIGTTIN).
pub const MAX_WORKERS: usize = 1024;
/// The smallest `--max-rss`: a worker's runtime alone takes a few MiB.
pub const MIN_MAX_RSS: u64 = 8 << 20;
/// The shortest `--max-age`.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(1);
/// The shortest `--worker-timeout` and `--ack-timeout`.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

impl Config {
    /// The heartbeat period workers are asked for: [`Config::heartbeat`], or a quarter of
    /// [`Config::worker_timeout`] if that is shorter.
    pub fn worker_heartbeat(&self) -> Duration {
        self.heartbeat.min(self.worker_timeout / 4)
    }

    /// Checks the limits a master refuses to start with; the error is one line naming the
    /// flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(format!(
                "--workers must be from 1 to {MAX_WORKERS} (got {})",
                self.workers
            ));
        }
        if self.max_pending == 0 {
            return Err("--max-pending must be at least 1".into());
        }
        if self.worker_threads == 0 || self.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "worker threads must be from 1 to {MAX_WORKER_THREADS} (got {})",
                self.worker_threads
            ));
        }
        if self.listen.is_empty() {
            return Err("no listen address".into());
        }
        if !(0.0..=90.0).contains(&self.jitter_percent) {
            return Err("--jitter must be a percentage from 0 to 90".into());
        }
        if self.worker_timeout < MIN_TIMEOUT || self.ack_timeout < MIN_TIMEOUT {
            return Err(format!(
                "--worker-timeout and --ack-timeout must be at least {} ms",
                MIN_TIMEOUT.as_millis()
            ));
        }
        if self.rss_interval.is_zero() {
            return Err("--rss-interval must be longer than 0".into());
        }
        if self.limits.max_connections == Some(0) {
            return Err("--max-connections must be at least 1".into());
        }
        if self.limits.max_rss.is_some_and(|bytes| bytes < MIN_MAX_RSS) {
            return Err(format!(
                "--max-rss must be at least {} MiB: a worker's runtime alone takes a few",
                MIN_MAX_RSS >> 20
            ));
        }
        if self.control.is_some() && !cfg!(feature = "control") {
            return Err(
                "--control: this build has no control socket (the `control` feature)".into(),
            );
        }
        if self.metrics.is_some() && !cfg!(feature = "prometheus") {
            return Err(
                "--metrics: this build has no Prometheus endpoint (the `prometheus` feature)"
                    .into(),
            );
        }
        check_paths(self)?;
        if let Some(url) = &self.state_url {
            check_state(url)?;
        }
        if self.limits.max_age.is_some_and(|age| age < MIN_MAX_AGE) {
            return Err(format!(
                "--max-age must be at least {} s",
                MIN_MAX_AGE.as_secs()
            ));
        }
        Ok(())
    }

    /// How long a worker may leave connections unacknowledged before it gets no new ones
    /// until it acknowledges: a fiftieth of [`Config::ack_timeout`], from 10 to 100 ms.
    /// Acknowledgements come within microseconds from a worker that reads its channel.
    pub fn ack_stall(&self) -> Duration {
        (self.ack_timeout / 50).clamp(Duration::from_millis(10), Duration::from_millis(100))
    }

    /// Workers replaced at a time by a rolling restart of `workers` workers.
    pub fn restart_batch_for(&self, workers: usize) -> usize {
        self.restart_batch.unwrap_or(workers / 4).max(1)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            workers: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
                .min(MAX_WORKERS),
            strategy: Strategy::default(),
            backlog: 1024,
            max_pending: 256,
            shutdown_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            control: None,
            metrics: None,
            backoff: Backoff::default(),
            limits: Limits::default(),
            jitter_percent: 10.0,
            rss_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            restart_batch: None,
            worker_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
            worker_threads: 1,
            state: crate::state::StateLimits::default(),
            state_url: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_listen_form() {
        assert_eq!(
            "127.0.0.1:8000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse(),
            Ok(ListenAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert_eq!(
            "unix:/tmp/h.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/h.sock".into()))
        );
    }

    #[test]
    fn a_host_name_resolves_to_its_first_address() {
        let ListenAddr::Tcp(addr) = "localhost:8000".parse().unwrap() else {
            panic!("localhost is a TCP address");
        };
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 8000);
    }

    #[test]
    fn refuses_a_wrong_listen_address_with_the_input_in_the_message() {
        for bad in [
            "localhost",
            "8000",
            "unix:",
            "1.2.3.4:99999",
            "",
            ":80",
            "localhost:http",
            "0:8000",
            "127.1:80",
            "::1:80",
            "10:80",
            "local host:80",
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn displays_as_it_parses() {
        for text in ["127.0.0.1:8000", "[::1]:9", "unix:/run/x.sock"] {
            assert_eq!(text.parse::<ListenAddr>().unwrap().to_string(), text);
        }
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn the_worker_heartbeat_is_a_quarter_of_the_timeout_at_most() {
        let mut config = Config::default();
        assert_eq!(config.worker_heartbeat(), Duration::from_secs(1));
        config.worker_timeout = Duration::from_secs(2);
        assert_eq!(config.worker_heartbeat(), Duration::from_millis(500));
    }

    fn config(listen: &[&str], control: Option<&str>) -> Config {
        Config {
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            control: control.map(PathBuf::from),
            ..Config::default()
        }
    }

    #[test]
    fn control_path_equal_to_a_unix_listen_path_is_refused() {
        let here = std::env::current_dir().unwrap();
        let absolute = here.join("x.sock");
        let error = check_paths(&config(&["unix:./x.sock"], absolute.to_str())).unwrap_err();
        assert!(error.contains("--control"), "{error}");
        assert!(check_paths(&config(&["unix:/a.sock"], Some("/a.sock"))).is_err());
    }

    #[test]
    fn a_unix_listen_path_given_twice_is_refused() {
        let here = std::env::current_dir().unwrap().join("y.sock");
        let twice = [format!("unix:{}", here.display()), "unix:y.sock".into()];
        let twice: Vec<&str> = twice.iter().map(String::as_str).collect();
        let error = check_paths(&config(&twice, None)).unwrap_err();
        assert!(error.contains("twice"), "{error}");
    }

    #[test]
    fn distinct_socket_paths_pass() {
        let ok = config(
            &["127.0.0.1:0", "127.0.0.1:0", "unix:/a.sock", "unix:/b.sock"],
            Some("/c.sock"),
        );
        assert_eq!(check_paths(&ok), Ok(()));
        assert_eq!(check_paths(&config(&["unix:/a.sock"], None)), Ok(()));
    }

    #[test]
    fn state_master_or_a_redis_url_passes() {
        assert_eq!(check_state("master"), Ok(()));
        let redis = check_state("redis://127.0.0.1:6379/0");
        if cfg!(feature = "redis") {
            assert_eq!(redis, Ok(()));
        } else {
            assert!(redis.unwrap_err().contains("`redis` feature"));
        }
    }

    #[test]
    fn limits_that_cannot_work_are_refused_naming_the_flag() {
        let with = |change: fn(&mut Config)| {
            let mut config = Config::default();
            config.listen.push("127.0.0.1:0".parse().unwrap());
            change(&mut config);
            config.validate()
        };
        assert_eq!(with(|_| {}), Ok(()));
        type Change = fn(&mut Config);
        let refused: [(Change, &str); 9] = [
            (
                |c| c.state_url = Some("http://127.0.0.1:6379".into()),
                "--state",
            ),
            (|c| c.workers = 0, "--workers"),
            (|c| c.workers = 1_000_000, "--workers"),
            (|c| c.max_pending = 0, "--max-pending"),
            (|c| c.limits.max_rss = Some(1), "--max-rss"),
            (|c| c.limits.max_age = Some(Duration::ZERO), "--max-age"),
            (|c| c.limits.max_connections = Some(0), "--max-connections"),
            (
                |c| c.ack_timeout = Duration::from_millis(1),
                "--ack-timeout",
            ),
            (|c| c.listen.clear(), "listen"),
        ];
        for (change, flag) in refused {
            let err = with(change).unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
        assert_eq!(with(|c| c.workers = MAX_WORKERS), Ok(()));
        assert_eq!(with(|c| c.limits.max_rss = Some(MIN_MAX_RSS)), Ok(()));
    }

    #[test]
    fn a_worker_stalls_after_a_fiftieth_of_the_ack_timeout_within_bounds() {
        let mut config = Config::default();
        assert_eq!(config.ack_stall(), Duration::from_millis(100));
        config.ack_timeout = Duration::from_secs(1);
        assert_eq!(config.ack_stall(), Duration::from_millis(20));
        config.ack_timeout = Duration::from_millis(100);
        assert_eq!(config.ack_stall(), Duration::from_millis(10));
    }

    #[test]
    fn a_rolling_restart_replaces_a_quarter_at_a_time_at_least_one() {
        let mut config = Config::default();
        assert_eq!(config.restart_batch_for(1), 1);
        assert_eq!(config.restart_batch_for(8), 2);
        assert_eq!(config.restart_batch_for(17), 4);
        config.restart_batch = Some(3);
        assert_eq!(config.restart_batch_for(8), 3);
        config.restart_batch = Some(0);
        assert_eq!(config.restart_batch_for(8), 1);
    }
}
