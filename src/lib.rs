//! # handoff
//!
//! A master-side userspace load balancer for multi-process servers. Instead of letting every
//! worker accept on a shared socket (where the kernel wakes whichever worker it likes, and a
//! few workers end up with most of the connections), the **master owns the only listening
//! sockets**, accepts every connection and hands its fd to one worker process over a Unix
//! socket with `SCM_RIGHTS`: by round-robin, least-loaded (live connection counts the
//! workers report) or power-of-two-choices.
//!
//! ```text
//! listener -> master (accept) -> balance (pick) -> ipc (fd + header, SCM_RIGHTS)
//!          -> worker (fd -> tokio stream) -> your service
//!                ^-------- acks, load reports, heartbeat (ipc) --------'
//! ```
//!
//! The same binary is both: [`Server::run`] supervises workers when started by hand, and in
//! a worker (the binary re-executed by the master, with `HANDOFF_FD` set) calls your async
//! function with the [`Incoming`] connections.
//!
//! ```no_run
//! use handoff::{Server, Strategy};
//! use tokio::io::AsyncWriteExt;
//!
//! fn main() -> Result<(), handoff::Error> {
//!     Server::builder()
//!         .listen("127.0.0.1:8000".parse().unwrap())
//!         .workers(4)
//!         .strategy(Strategy::LeastLoaded)
//!         .build()
//!         .run(|mut incoming| async move {
//!             while let Some(mut conn) = incoming.accept().await {
//!                 tokio::spawn(async move {
//!                     let _ = conn.write_all(b"hello\n").await;
//!                 });
//!             }
//!             Ok(())
//!         })
//! }
//! ```
//!
//! Workers in other languages speak the protocol in `docs/protocol.md`.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

mod balance;
#[cfg(feature = "cli")]
mod bench;
mod bpf;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
mod config;
#[cfg(feature = "cli")]
mod demo;
mod ipc;
mod master;
mod procfs;
#[cfg(feature = "cli")]
mod proxy;
mod signals;
pub mod state;
mod supervise;
mod sys;
mod worker;

/// The pieces `cargo bench` drives from outside the crate; not an API.
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod internals {
    pub use crate::balance::{Balance, Candidate, LeastLoaded, RoundRobin, Strategy, TwoChoices};
    pub use crate::ipc::frame;
    pub use crate::master::harness::MasterPath;
    pub use crate::sys::{process, scm, shm, socket};
}

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use balance::Strategy;
pub use config::{Config, ListenAddr};
pub use ipc::message::MessageError;
pub use master::{FromWorker, Master, MasterError};
pub use supervise::Limits;
pub use sys::socket::Peer;
#[cfg(feature = "hyper")]
pub use worker::http1;
pub use worker::{
    BoxError, Connection, Drain, HandBackError, HandBackFailure, Inbox, Incoming, Messenger,
    Origin, Received, Stream, WorkerError,
};

/// Why [`Server::run`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// In the master.
    #[error(transparent)]
    Master(#[from] MasterError),
    /// In a worker.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// A configured server: a master that supervises workers, or one of those workers.
#[derive(Debug, Clone)]
pub struct Server {
    config: Config,
    handler: master::MasterHandler,
}

/// Builds a [`Server`].
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: Config,
    handler: master::MasterHandler,
}

impl Builder {
    /// Adds a listening address (repeatable; order gives [`Connection::listener`]).
    pub fn listen(mut self, addr: ListenAddr) -> Self {
        self.config.listen.push(addr);
        self
    }

    /// Worker processes (default: available CPUs).
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// How connections are spread (default: least-loaded).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.config.strategy = strategy;
        self
    }

    /// Kernel accept queue length per listener (default 1024).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.config.backlog = backlog;
        self
    }

    /// Unacknowledged connections per worker before the master stops accepting (default 256).
    pub fn max_pending(mut self, max_pending: usize) -> Self {
        self.config.max_pending = max_pending;
        self
    }

    /// How long workers get to finish on stop (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// A Unix socket where the master answers `status` (see `handoff ctl`).
    pub fn control(mut self, path: PathBuf) -> Self {
        self.config.control = Some(path);
        self
    }

    /// An address where the master serves Prometheus text at `/metrics`: its own figures
    /// and the workers' `metrics`, added up across the cluster (the `prometheus` feature).
    pub fn metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }

    /// Replaces a worker once it has run this long (default: never). The replacement starts
    /// first; the old worker drains once it is ready, so no connection is lost.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.config.limits.max_age = Some(age);
        self
    }

    /// Replaces a worker once this many connections have been handed to it (default: never).
    pub fn max_connections(mut self, connections: u64) -> Self {
        self.config.limits.max_connections = Some(connections);
        self
    }

    /// Replaces a worker once its resident memory reaches `bytes` (default: never).
    pub fn max_rss(mut self, bytes: u64) -> Self {
        self.config.limits.max_rss = Some(bytes);
        self
    }

    /// How often worker memory is read for [`Builder::max_rss`] (default 1 s).
    pub fn rss_interval(mut self, interval: Duration) -> Self {
        self.config.rss_interval = interval;
        self
    }

    /// Lowers each worker's limits by a random share of up to `percent` percent, so workers
    /// do not recycle together (default 10).
    pub fn jitter(mut self, percent: f64) -> Self {
        self.config.jitter_percent = percent;
        self
    }

    /// How long a replaced worker may take to finish its connections (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Workers replaced at a time by a rolling restart on SIGHUP (default: a quarter of
    /// them, at least one).
    pub fn restart_batch(mut self, workers: usize) -> Self {
        self.config.restart_batch = Some(workers);
        self
    }

    /// A worker that sends nothing for this long is aborted and replaced (default 30 s);
    /// workers send a heartbeat at least every quarter of it.
    pub fn worker_timeout(mut self, timeout: Duration) -> Self {
        self.config.worker_timeout = timeout;
        self
    }

    /// A worker holding connections unacknowledged this long without acknowledging or
    /// finishing any is replaced like a silent one, and its connections go to other workers
    /// (default 5 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.config.ack_timeout = timeout;
        self
    }

    /// Threads of each worker's tokio runtime (default 1: a current-thread runtime, one
    /// worker per CPU being the usual shape). More gives each worker a multi-threaded
    /// runtime, for services that block or burn CPU per request.
    pub fn worker_threads(mut self, threads: usize) -> Self {
        self.config.worker_threads = threads;
        self
    }

    /// The bounds of the shared map when it is held by the master (the default backend;
    /// see [`state`]): key, value and total bytes. Writes past them fail with
    /// [`state::StateError::TooLarge`] or [`state::StateError::Full`].
    pub fn state_limits(mut self, limits: state::StateLimits) -> Self {
        self.config.state = limits;
        self
    }

    /// Where the workers' shared map lives: `master` (the default) or a Redis URL,
    /// `redis://HOST:PORT[/DB]` or `redis+unix:///PATH` (the `redis` feature), for a
    /// cluster on several hosts. Checked when the server starts; workers get it in
    /// `HANDOFF_STATE`.
    pub fn state(mut self, url: impl Into<String>) -> Self {
        self.config.state_url = Some(url.into());
        self
    }

    /// Runs `handler` in the master (on its thread, once) with a [`Master`] handle: it
    /// receives the messages of type `M` workers send with [`Messenger::send`] and
    /// [`Messenger::request`], and sends to one worker or all of them. Without a handler,
    /// messages to the master are dropped (counted) and requests answered with an error;
    /// workers still reach each other with [`Messenger::broadcast`].
    pub fn master<M, F, Fut>(mut self, handler: F) -> Self
    where
        M: serde::Serialize + serde::de::DeserializeOwned + 'static,
        F: FnOnce(Master<M>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.handler = master::MasterHandler::new(handler);
        self
    }

    /// The finished configuration.
    pub fn build(self) -> Server {
        Server {
            config: self.config,
            handler: self.handler,
        }
    }
}

impl Server {
    /// A builder with defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// From a complete configuration.
    pub fn from_config(config: Config) -> Self {
        Server {
            config,
            handler: master::MasterHandler::default(),
        }
    }

    /// In the master: binds, starts the workers (this binary re-executed with the same
    /// arguments) and supervises them until SIGTERM/SIGINT/SIGQUIT. In a worker: runs
    /// `serve` on the connections the master hands over.
    ///
    /// Each role runs its own single-threaded tokio runtime. Called from inside a runtime
    /// (`#[tokio::main]`), it runs on a thread of its own and blocks the caller until done,
    /// so the caller's runtime is never nested; call it from `main` either way. Workers are
    /// started by fork + exec of the binary, never by a bare fork of a process with threads.
    pub fn run<F, Fut>(self, serve: F) -> Result<(), Error>
    where
        F: FnOnce(Incoming) -> Fut + Send,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        if worker::is_worker() {
            worker::take_program_name();
        }
        off_any_runtime(move || {
            if worker::is_worker() {
                Ok(worker::run(
                    serve,
                    self.config.worker_threads,
                    self.config.state,
                )?)
            } else {
                let program = supervise::Program::CurrentExe;
                Ok(master::run(self.config, program, self.handler)?)
            }
        })
    }

    /// Runs the master with `command` as each worker: a program in any language that speaks
    /// the worker protocol.
    pub fn run_command(self, command: Vec<OsString>) -> Result<(), Error> {
        off_any_runtime(move || {
            let program = supervise::Program::Command(command);
            Ok(master::run(self.config, program, self.handler)?)
        })
    }
}

impl Server {
    /// Runs the master with `command`, an unmodified node app, as each worker: the master
    /// speaks node's own IPC to it and a preload script (`NODE_OPTIONS=--require`) turns
    /// the app's `server.listen()` into taking the connections the master hands over.
    pub fn run_node(self, command: Vec<OsString>) -> Result<(), Error> {
        off_any_runtime(move || {
            let program = supervise::Program::Node(command);
            Ok(master::run(self.config, program, self.handler)?)
        })
    }
}

/// Runs `role` here, or on a thread of its own when this thread is inside a tokio runtime
/// (which cannot start another one); waits for it either way.
fn off_any_runtime<T: Send>(role: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return role();
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("handoff".into())
            .spawn_scoped(scope, role)
            .expect("spawning the handoff thread");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
