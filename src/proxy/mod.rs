//! `handoff proxy`: a TCP load balancer in front of unmodified backends. The master accepts
//! every client as for `handoff run` and hands it to a proxy worker (this binary again);
//! the worker picks a backend on the shared [`board`] (exact least-connections across all
//! workers, or round-robin), connects, and relays both ways with `splice(2)` ([`relay`]).
//!
//! ```text
//! client -> master (accept, hand fd) -> proxy worker -> backend (fewest in flight, all workers)
//!                |                          ^  relay: splice through a pipe per direction
//!                +-- health checks, --spawn backends, the board (memfd) --+
//! ```
//!
//! The master creates the board before its workers start and keeps its memfd open; a worker
//! maps the same memfd by opening `/proc/MASTER/fd/N` (the path travels in
//! `HANDOFF_PROXY_BOARD`), as the worker channel is the only fd a worker inherits. The
//! backends' addresses travel in `HANDOFF_PROXY_BACKENDS`, since ports of `--spawn`
//! backends are only known once the master chose them; every other setting a worker reads
//! from the arguments it is started with, which are the master's.

pub mod board;
pub mod health;
pub mod proxy_protocol;
pub mod relay;
pub mod spawned;
pub mod worker;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use board::{Balance, Board};
use relay::Relay;

use crate::sys::shm::Mapping;

/// The environment variable naming the board's memfd, for workers.
pub const ENV_BOARD: &str = "HANDOFF_PROXY_BOARD";
/// The environment variable listing the backends' addresses, for workers.
pub const ENV_BACKENDS: &str = "HANDOFF_PROXY_BACKENDS";

/// What a proxy does, in the master and in each worker alike.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The backends, in order: the `--backend`s, then the `--spawn`ed ones.
    pub backends: Vec<SocketAddr>,
    /// How a backend is chosen.
    pub balance: Balance,
    /// Connections in flight to one backend, at most (all workers together).
    pub max_conns_per_backend: Option<u32>,
    /// Connections waiting for a backend under the cap, at most (all workers together).
    pub queue: u32,
    /// How long a connection may wait in the queue.
    pub queue_timeout: Duration,
    /// How long connecting to backends may take, per client (retries included), and each
    /// health check.
    pub connect_timeout: Duration,
    /// How often each backend is checked.
    pub health_interval: Duration,
    /// Whether a PROXY protocol v2 header goes to the backend first.
    pub proxy_protocol: bool,
    /// How long a relay may move no byte either way before both sides are closed (`None`:
    /// forever).
    pub idle_timeout: Option<Duration>,
    /// How bytes are moved.
    pub relay: Relay,
    /// Bytes of each splice pipe (0: the kernel's default, 64 KiB).
    pub pipe_size: usize,
}

impl ProxyConfig {
    /// The cap per backend, if any.
    pub fn cap(&self) -> Option<u32> {
        self.max_conns_per_backend
    }
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// No backend was given.
    #[error("no backend: give --backend HOST:PORT or --spawn N -- COMMAND")]
    NoBackend,
    /// More backends than the board holds.
    #[error("{0} backends; at most {max} are supported", max = board::MAX_BACKENDS)]
    TooManyBackends(usize),
    /// A free port for a `--spawn` backend could not be found.
    #[error("finding a free port for a spawned backend failed")]
    FreePort(#[source] std::io::Error),
    /// The board's memfd could not be created or mapped.
    #[error("creating the proxy board failed")]
    CreateBoard(#[source] std::io::Error),
    /// A worker started without the master's environment.
    #[error("{0} is not set: a proxy worker is started by `handoff proxy`")]
    MissingEnv(&'static str),
    /// A worker could not map the master's board.
    #[error("mapping the proxy board {path} failed")]
    MapBoard {
        /// Where it looked.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backends the master passed do not parse.
    #[error("bad {ENV_BACKENDS} {0:?}")]
    BadBackends(String),
}

/// The master's side, prepared before the master starts: the board, and what the master
/// handler runs.
#[derive(Debug)]
pub struct MasterSide {
    board: Arc<Mapping<Board>>,
    config: ProxyConfig,
    /// Ports and the command of the `--spawn`ed backends (the last of `config.backends`).
    spawn: Vec<u16>,
    command: Vec<OsString>,
}

impl MasterSide {
    /// Chooses ports for `spawn` backends running `command`, creates the board with every
    /// backend (the spawned ones down until they accept) and puts the board's path and the
    /// backends in this process's environment, for the workers it will start. Call it
    /// before any thread is started.
    pub fn prepare(
        mut config: ProxyConfig,
        spawn: usize,
        command: Vec<OsString>,
    ) -> Result<MasterSide, ProxyError> {
        let ports = (0..spawn)
            .map(|_| spawned::free_port())
            .collect::<Result<Vec<u16>, _>>()
            .map_err(ProxyError::FreePort)?;
        let given = config.backends.len();
        config.backends.extend(
            ports
                .iter()
                .map(|&port| SocketAddr::from(([127, 0, 0, 1], port))),
        );
        match config.backends.len() {
            0 => return Err(ProxyError::NoBackend),
            n if n > board::MAX_BACKENDS => return Err(ProxyError::TooManyBackends(n)),
            _ => {}
        }
        let mapping = Mapping::<Board>::create().map_err(ProxyError::CreateBoard)?;
        mapping.region().init(config.backends.len(), true);
        for index in given..config.backends.len() {
            mapping.region().set_up(index, false);
        }
        let fd = mapping
            .fd()
            .ok_or_else(|| ProxyError::CreateBoard(std::io::Error::other("no memfd")))?;
        let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        let list: Vec<String> = config.backends.iter().map(ToString::to_string).collect();
        // Before any thread runs (the caller's promise): nothing reads the environment
        // concurrently.
        std::env::set_var(ENV_BOARD, path);
        std::env::set_var(ENV_BACKENDS, list.join(","));
        Ok(MasterSide {
            board: Arc::new(mapping),
            config,
            spawn: ports,
            command,
        })
    }

    /// The backends, as the workers will see them.
    pub fn backends(&self) -> &[SocketAddr] {
        &self.config.backends
    }

    /// Runs in the master (its handler, on the master's thread): starts the `--spawn`ed
    /// backends and the health checks, and keeps them going as long as the master runs.
    pub async fn run(self) {
        let MasterSide {
            board,
            config,
            spawn,
            command,
        } = self;
        let first_spawned = config.backends.len() - spawn.len();
        for (k, port) in spawn.into_iter().enumerate() {
            let index = first_spawned + k;
            spawned::supervise(
                board.clone(),
                index,
                config.backends[index],
                port,
                command.clone(),
                config.connect_timeout,
            );
        }
        health::spawn_checks(
            board,
            config.backends.clone(),
            config.health_interval,
            config.connect_timeout,
        );
        std::future::pending::<()>().await;
    }
}

/// In a worker: the backends and the board the master left in the environment.
pub fn worker_side(mut config: ProxyConfig) -> Result<(ProxyConfig, Mapping<Board>), ProxyError> {
    let list = std::env::var(ENV_BACKENDS).map_err(|_| ProxyError::MissingEnv(ENV_BACKENDS))?;
    config.backends = list
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| ProxyError::BadBackends(list.clone()))?;
    let path = std::env::var(ENV_BOARD).map_err(|_| ProxyError::MissingEnv(ENV_BOARD))?;
    let map_error = |source| ProxyError::MapBoard {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(map_error)?;
    let mapping = Mapping::<Board>::map(file.into()).map_err(map_error)?;
    if mapping.region().len() != config.backends.len() {
        return Err(ProxyError::BadBackends(list));
    }
    Ok((config, mapping))
}
