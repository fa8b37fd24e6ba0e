//! Every integration test, in one binary that builds once (ripgrep's layout): each module
//! runs the real `handoff` binary (or an example) through the helpers in `util`.
//!
//! Run one module with `cargo test --test integration lifecycle::` (add `-- --nocapture`
//! for the figures some tests print).

mod bench;
mod control;
mod core;
mod hardening;
mod keepalive;
mod kernel_least;
mod library;
mod lifecycle;
mod metrics;
mod node;
mod proxy;
mod python_worker;
mod state;
#[cfg(feature = "redis")]
mod state_redis;
mod state_upgrade;
mod systemd;
mod upgrade;
mod util;
