//! An axum app behind handoff: the master accepts on --listen (default 127.0.0.1:3000) and
//! hands each connection to one of --workers worker processes (this binary, re-executed),
//! each serving the app with `axum::serve(incoming, app)`.
//!
//! Run with: cargo run --example axum -- --listen 127.0.0.1:3000 --workers 4 [--threads 2]
//! Then:     curl http://127.0.0.1:3000/

mod common;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use handoff::{Peer, Server};

async fn hello(ConnectInfo(peer): ConnectInfo<Peer>) -> String {
    format!("hello from worker {}, {peer:?}\n", std::process::id())
}

#[tokio::main]
async fn main() -> Result<(), handoff::Error> {
    let flags = common::setup();
    Server::builder()
        .listen(flags.listen)
        .workers(flags.workers)
        .worker_threads(flags.threads)
        .build()
        .run(|incoming| async move {
            let app = Router::new().route("/", get(hello));
            let shutdown = incoming.shutdown_signal();
            axum::serve(incoming, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown)
                .await?;
            Ok(())
        })
}
