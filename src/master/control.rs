//! The control socket: a Unix socket where the master answers one-line commands. `status`
//! returns the worker table and counters as one line of JSON (what `handoff ctl status`
//! prints): per slot its process, a starting successor, crash-loop state; the processes
//! draining; the counters. Runs in the master; never on the accept path.

use std::io;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::table::{Phase, Process, Table};
use super::Ctx;
use crate::supervise::Reason;

/// The longest command line read.
const MAX_COMMAND: u64 = 256;

pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

pub(crate) async fn serve(ctx: Rc<Ctx>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(&ctx, stream)).await;
        });
    }
}

async fn answer(ctx: &Ctx, stream: tokio::net::UnixStream) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(AsyncReadExt::take(read, MAX_COMMAND))
        .read_line(&mut line)
        .await?;
    let reply = respond(ctx, line.trim());
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

fn respond(ctx: &Ctx, command: &str) -> String {
    match command {
        "status" => {
            let table = ctx.table.borrow();
            serde_json::json!({
                "pid": std::process::id(),
                "strategy": table.config.strategy,
                "listening": ctx.listening,
                "accepting": table.can_accept(),
                "stopping": table.stopping,
                "max_pending": table.config.max_pending,
                "awaiting_redispatch": table.retry_len(),
                "counters": table.counters,
                "crash_looping": table.slots[..table.workers]
                    .iter()
                    .filter(|s| s.backoff.crash_looping())
                    .count(),
                "restarting": table.restarting,
                "workers": slots(&table),
                "draining": draining(&table),
            })
            .to_string()
        }
        other => {
            serde_json::json!({ "error": format!("unknown command {other:?}; try \"status\"") })
                .to_string()
        }
    }
}

/// The control socket's view of one slot in use.
#[derive(Debug, serde::Serialize)]
struct SlotReport {
    worker: usize,
    pid: Option<u32>,
    phase: Option<Phase>,
    active: u64,
    pending: usize,
    assigned: u64,
    finished: u64,
    spawns: u64,
    failures: u32,
    /// Failing again and again soon after start (see `supervise::CRASH_LOOP_FAILURES`).
    crash_loop: bool,
    uptime_ms: u64,
    /// Why its process is being replaced, while the replacement starts.
    recycling: Option<Reason>,
    /// The replacement's pid, while it starts.
    successor: Option<u32>,
    /// Resident set of its process in KiB, when memory is watched.
    rss_kib: Option<u64>,
}

/// A replaced process finishing its connections.
#[derive(Debug, serde::Serialize)]
struct DrainingReport {
    worker: usize,
    pid: u32,
    reason: Option<Reason>,
    active: u64,
    pending: usize,
}

fn slots(table: &Table) -> Vec<SlotReport> {
    table.slots[..table.workers]
        .iter()
        .enumerate()
        .map(|(worker, slot)| {
            let p = slot.process.as_ref();
            SlotReport {
                worker,
                pid: p.map(|p| p.pid),
                phase: p.map(|p| p.phase),
                active: p.map_or(0, Process::active),
                pending: p.map_or(0, Process::pending),
                assigned: p.map_or(0, Process::assigned),
                finished: p.map_or(0, Process::finished),
                spawns: slot.spawns,
                failures: slot.backoff.failures(),
                crash_loop: slot.backoff.crash_looping(),
                uptime_ms: p.map_or(0, |p| p.started.elapsed().as_millis() as u64),
                recycling: p.and_then(|p| p.retire),
                successor: slot.successor.as_ref().map(|s| s.pid),
                rss_kib: p.and_then(|p| p.rss).map(|b| b / 1024),
            }
        })
        .collect()
}

fn draining(table: &Table) -> Vec<DrainingReport> {
    table
        .slots
        .iter()
        .enumerate()
        .flat_map(|(worker, slot)| {
            slot.retiring.iter().map(move |p| DrainingReport {
                worker,
                pid: p.pid,
                reason: p.retire,
                active: p.active(),
                pending: p.pending(),
            })
        })
        .collect()
}
