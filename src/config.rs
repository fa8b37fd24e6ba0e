//! What a master is asked to do: listeners, worker count, strategy and limits. Built by
//! [`crate::Builder`] or from `handoff run` flags.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::balance::Strategy;
use crate::supervise::Backoff;

/// An address to listen on: `127.0.0.1:8000`, `[::1]:8000` or `unix:/path/to.sock`.
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
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ParseListenAddrError(s.to_owned()))
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
    /// How often workers send a status report when nothing happens.
    pub heartbeat: Duration,
    /// A Unix socket path where the master answers `status` with JSON.
    pub control: Option<PathBuf>,
    /// Respawn delays.
    pub backoff: Backoff,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            workers: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            strategy: Strategy::default(),
            backlog: 1024,
            max_pending: 256,
            shutdown_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            control: None,
            backoff: Backoff::default(),
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
    fn refuses_a_wrong_listen_address_with_the_input_in_the_message() {
        for bad in ["localhost", "8000", "unix:", "1.2.3.4:99999", ""] {
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

/// Parses a duration: `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn parses_units_and_refuses_garbage() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "10x", "abc", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
