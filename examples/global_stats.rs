//! The seed's "internal messages" example on handoff's messages: each worker counts the
//! requests to `/` and sends its count to the master every second; the master keeps the
//! global total and broadcasts it to every worker; `GET /stats` on any worker answers
//! `{"global_requests": N}`, and `GET /ask` asks the master for its total there and then
//! (a request and its reply). Every answer carries `x-worker-pid`.
//!
//! Run with: cargo run --release --example global_stats -- --listen 127.0.0.1:3000 --workers 4
//! Then:     curl http://127.0.0.1:3000/ ; sleep 1.5 ; curl http://127.0.0.1:3000/stats

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use handoff::{Master, Messenger, Server};
use serde::{Deserialize, Serialize};

/// What workers and the master tell each other.
#[derive(Debug, Serialize, Deserialize)]
enum Stats {
    /// worker → master: requests served since its last report.
    Served(u64),
    /// master → every worker: the cluster's total so far.
    Global(u64),
    /// worker → master, a request: the total now (the reply is a `u64`).
    Ask,
}

/// A worker's figures: its requests not yet reported, and the last global total it heard.
#[derive(Debug, Default)]
struct Counts {
    unreported: AtomicU64,
    global: AtomicU64,
}

type Reply = ([(&'static str, String); 1], String);

fn reply(body: String) -> Reply {
    ([("x-worker-pid", std::process::id().to_string())], body)
}

async fn hello(State(counts): State<Arc<Counts>>) -> Reply {
    counts.unreported.fetch_add(1, Ordering::Relaxed);
    reply(format!("hello from worker {}\n", std::process::id()))
}

async fn stats(State(counts): State<Arc<Counts>>) -> Reply {
    let global = counts.global.load(Ordering::Relaxed);
    reply(format!("{{\"global_requests\": {global}}}\n"))
}

async fn ask(State(messenger): State<Messenger<Stats>>) -> Reply {
    match messenger
        .request::<u64>(&Stats::Ask, Duration::from_secs(1))
        .await
    {
        Ok(total) => reply(format!("{{\"global_requests\": {total}}}\n")),
        Err(e) => reply(format!("{{\"error\": \"{e}\"}}\n")),
    }
}

/// The master's side: add up what workers report, tell everyone the new total.
async fn master(mut master: Master<Stats>) {
    let mut total = 0;
    while let Some(message) = master.recv().await {
        match message.body {
            Stats::Served(n) => {
                total += n;
                let _ = master.broadcast(&Stats::Global(total));
            }
            Stats::Ask => {
                let _ = master.reply(&message, &total);
            }
            Stats::Global(_) => {}
        }
    }
}

/// Sends what this worker served since its last report, if anything.
async fn report(counts: &Counts, messenger: &Messenger<Stats>) {
    let served = counts.unreported.swap(0, Ordering::Relaxed);
    if served > 0 && messenger.send(&Stats::Served(served)).await.is_err() {
        counts.unreported.fetch_add(served, Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() -> Result<(), handoff::Error> {
    let flags = common::setup();
    Server::builder()
        .listen(flags.listen)
        .workers(flags.workers)
        .worker_threads(flags.threads)
        .master(master)
        .build()
        .run(|incoming| async move {
            let counts = Arc::new(Counts::default());
            let messenger = incoming.messenger::<Stats>();
            let mut inbox = incoming.inbox::<Stats>().expect("the first claim");
            let heard = counts.clone();
            tokio::spawn(async move {
                while let Some(message) = inbox.recv().await {
                    if let Stats::Global(total) = message.body {
                        heard.global.fetch_max(total, Ordering::Relaxed);
                    }
                }
            });
            let (reporting, sender) = (counts.clone(), messenger.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    report(&reporting, &sender).await;
                }
            });
            let asking = Router::new()
                .route("/ask", get(ask))
                .with_state(messenger.clone());
            let app = Router::new()
                .route("/", get(hello))
                .route("/stats", get(stats))
                .with_state(counts.clone())
                .merge(asking);
            let shutdown = incoming.shutdown_signal();
            axum::serve(incoming, app)
                .with_graceful_shutdown(shutdown)
                .await?;
            // Draining: what was served since the last report still counts.
            report(&counts, &messenger).await;
            Ok(())
        })
}
