//! Health checks, in the master: every `--health-interval` a TCP connect to each backend
//! (bounded by `--connect-timeout`); a backend that does not accept is marked down on the
//! board (workers stop picking it), one that accepts again is marked up. The same tick
//! empties the board rows of workers that died with connections in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::board::Board;
use crate::sys::shm::Mapping;

/// Whether `addr` accepts a TCP connection within `timeout`.
pub async fn accepts(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Checks `backends` every `interval` forever, one task per backend (a backend that takes
/// the whole timeout does not delay the others' checks), on the current `LocalSet`.
pub fn spawn_checks(
    board: Arc<Mapping<Board>>,
    backends: Vec<SocketAddr>,
    interval: Duration,
    timeout: Duration,
) {
    let timeout = timeout.min(interval);
    for (index, addr) in backends.into_iter().enumerate() {
        let board = board.clone();
        tokio::task::spawn_local(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let up = accepts(addr, timeout).await;
                mark(board.region(), index, addr, up, "health check");
            }
        });
    }
    tokio::task::spawn_local(async move {
        let mut every = tokio::time::interval(interval);
        loop {
            every.tick().await;
            let released = board.region().reclaim(crate::sys::process::is_alive);
            if released > 0 {
                tracing::warn!(
                    released,
                    "connections of workers that died taken off the board"
                );
            }
        }
    });
}

/// Marks backend `index` up or down, logging a change.
pub fn mark(board: &Board, index: usize, addr: SocketAddr, up: bool, by: &str) {
    if board.set_up(index, up) {
        if up {
            tracing::info!(backend = %addr, by, "backend up");
        } else {
            tracing::warn!(backend = %addr, by, "backend down");
        }
    }
}
