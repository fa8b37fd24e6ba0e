//! The control socket's operations, each answered when it is done (or has failed), so
//! `handoff ctl` can exit non-zero on failure: `reload` (a rolling restart, answered once
//! every worker was replaced and is ready), `scale N` (answered once N workers are
//! ready), `upgrade [BINARY]` (answered once the new master is ready, or with why it failed
//! while this one serves on), `stop` (a graceful stop; answered as it begins, the socket
//! goes away when the master is gone).

use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::ctx::Ctx;
use super::lifecycle;
use super::table::{Phase, Table};
use crate::config::MAX_WORKERS;

/// How often a waiting operation looks at the workers.
const POLL: Duration = Duration::from_millis(20);

/// Runs `command` if it is an operation; `None` if it is not one.
pub(crate) async fn operate(ctx: &Rc<Ctx>, command: &str) -> Option<Value> {
    let mut words = command.split_whitespace();
    let reply = match (words.next()?, words.next(), words.next()) {
        ("reload", None, _) => reload(ctx).await,
        ("scale", Some(n), None) => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => scale(ctx, n).await,
            _ => Err(format!(
                "scale takes a worker count from 1 to {MAX_WORKERS}, not {n:?}"
            )),
        },
        ("upgrade", binary, None) => super::upgrade::upgrade(ctx, binary.map(Into::into))
            .await
            .map(|pid| json!({ "ok": "upgraded", "pid": pid })),
        ("stop", None, _) => {
            ctx.stop.notify_one();
            Ok(json!({ "ok": "stopping" }))
        }
        _ => return None,
    };
    Some(reply.unwrap_or_else(|error| json!({ "error": error })))
}

/// The longest an operation waits: a replacement may take the worker timeout to say READY
/// and its predecessor the drain timeout to leave, batch after batch.
fn patience(table: &Table) -> Duration {
    let config = &table.config;
    let batches = table
        .workers
        .div_ceil(config.restart_batch_for(table.workers)) as u32;
    (config.worker_timeout + config.drain_timeout) * batches.max(1) + Duration::from_secs(5)
}

fn ready_pids(table: &Table) -> Option<Vec<u32>> {
    table.slots[..table.workers]
        .iter()
        .map(|s| {
            s.process
                .as_ref()
                .filter(|p| p.phase == Phase::Ready)
                .map(|p| p.pid)
        })
        .collect()
}

/// Waits until `done` holds of the table, at most `patience`; the ready workers' pids.
async fn wait(ctx: &Ctx, what: &str, done: impl Fn(&Table) -> bool) -> Result<Value, String> {
    let deadline = Instant::now() + patience(&ctx.table.borrow());
    loop {
        {
            let table = ctx.table.borrow();
            if table.stopping {
                return Err(format!("{what}: the master is stopping"));
            }
            if done(&table) {
                if let Some(pids) = ready_pids(&table) {
                    return Ok(json!({ "ok": what, "workers": pids }));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what}: not done within {:?}; see the master's log",
                patience(&ctx.table.borrow())
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn reload(ctx: &Rc<Ctx>) -> Result<Value, String> {
    if ctx.table.borrow().restarting {
        return Err("reload: a rolling restart is already under way".into());
    }
    lifecycle::rolling_restart(ctx);
    ctx.table.borrow().wake.notify_one();
    wait(ctx, "reloaded", |table| !table.restarting).await
}

async fn scale(ctx: &Rc<Ctx>, workers: usize) -> Result<Value, String> {
    loop {
        let now = ctx.table.borrow().workers;
        let changed = match now.cmp(&workers) {
            std::cmp::Ordering::Less => lifecycle::scale_up(ctx),
            std::cmp::Ordering::Greater => lifecycle::scale_down(ctx),
            std::cmp::Ordering::Equal => break,
        };
        if !changed {
            return Err(format!(
                "scale: stopped at {} workers (see the master's log)",
                ctx.table.borrow().workers
            ));
        }
    }
    wait(ctx, "scaled", |table| table.workers == workers).await
}
