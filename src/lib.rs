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

pub mod balance;
pub mod bench;
pub mod config;
pub mod demo;
pub mod ipc;
pub mod master;
pub mod supervise;
pub mod sys;
pub mod worker;

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use balance::Strategy;
pub use config::{Config, ListenAddr};
pub use master::MasterError;
pub use worker::{BoxError, Connection, Drain, Incoming, Stream, WorkerError};

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
}

/// Builds a [`Server`].
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: Config,
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

    /// The finished configuration.
    pub fn build(self) -> Server {
        Server {
            config: self.config,
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
        Server { config }
    }

    /// In the master: binds, starts the workers (this binary re-executed with the same
    /// arguments) and supervises them until SIGTERM/SIGINT. In a worker: runs `serve` on the
    /// connections the master hands over.
    pub fn run<F, Fut>(self, serve: F) -> Result<(), Error>
    where
        F: FnOnce(Incoming) -> Fut,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        if worker::is_worker() {
            Ok(worker::run(serve)?)
        } else {
            Ok(master::run(self.config, supervise::Program::CurrentExe)?)
        }
    }

    /// Runs the master with `command` as each worker: a program in any language that speaks
    /// the worker protocol.
    pub fn run_command(self, command: Vec<OsString>) -> Result<(), Error> {
        Ok(master::run(
            self.config,
            supervise::Program::Command(command),
        )?)
    }
}
