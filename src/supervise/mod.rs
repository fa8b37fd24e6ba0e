//! Supervision: how a worker process is started (the current binary re-executed, or a
//! user's command), when a dead one is started again ([`Backoff`]) and when a live one is
//! replaced by a fresh one ([`recycle`]). Runs in the master.

mod backoff;
pub mod recycle;
mod spawn;

pub use backoff::Backoff;
pub use recycle::{Limits, Reason};
pub use spawn::{spawn, Launcher, Program, SpawnError};

/// Environment variable naming the worker's channel fd (always 3).
pub const ENV_FD: &str = "HANDOFF_FD";
/// Environment variable with the worker's slot index (0-based).
pub const ENV_WORKER: &str = "HANDOFF_WORKER";
/// Environment variable counting how many processes this slot has started (0-based).
pub const ENV_SPAWN: &str = "HANDOFF_SPAWN";
/// Environment variable: milliseconds between a worker's status heartbeats.
pub const ENV_HEARTBEAT_MS: &str = "HANDOFF_HEARTBEAT_MS";
/// Environment variable: how long a draining worker waits for its connections, in ms.
pub const ENV_DRAIN_MS: &str = "HANDOFF_DRAIN_TIMEOUT_MS";
/// Environment variable: the master's listening addresses, comma-separated, in `--listen`
/// order (`127.0.0.1:8000,unix:/run/app.sock`), as bound (port 0 resolved).
pub const ENV_LISTEN: &str = "HANDOFF_LISTEN";
/// Environment variable: where the shared map lives, `master` or a Redis URL
/// ([`crate::Config::state`]); absent means `master`.
pub const ENV_STATE: &str = "HANDOFF_STATE";
