//! The control socket: a Unix socket where the master answers one-line commands. `status`
//! returns the worker table and counters as one line of JSON (what `handoff ctl status`
//! prints). Runs in the master; never on the accept path.

use std::io;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::Ctx;

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
                "workers": table.report(),
            })
            .to_string()
        }
        other => {
            serde_json::json!({ "error": format!("unknown command {other:?}; try \"status\"") })
                .to_string()
        }
    }
}
