//! An axum app behind handoff: the master accepts on --listen (default 127.0.0.1:3000) and
//! hands each connection to one of --workers worker processes (this binary, re-executed),
//! each serving the app on each connection with `handoff::http1::serve`, so that a draining
//! worker hands its keep-alive connections back to the master at a request boundary (a
//! rolling restart loses none). `axum::serve(incoming, app)` works too (`Incoming` is an
//! `axum::serve::Listener`), but its graceful shutdown closes idle keep-alive connections.
//!
//! Run with: cargo run --example axum -- --listen 127.0.0.1:3000 --workers 4 [--threads 2]
//! Then:     curl http://127.0.0.1:3000/

mod common;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use handoff::{Peer, Server};
use hyper_util::service::TowerToHyperService;

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
        .run(|mut incoming| async move {
            let app = Router::new().route("/", get(hello));
            let builder = hyper::server::conn::http1::Builder::new();
            while let Some(conn) = incoming.accept().await {
                // What `into_make_service_with_connect_info::<Peer>()` would insert.
                let app = app.clone().layer(Extension(ConnectInfo(conn.peer())));
                let service = TowerToHyperService::new(app);
                let (drain, builder) = (incoming.drain_signal(), builder.clone());
                tokio::spawn(async move {
                    let _ = handoff::http1::serve(conn, &builder, service, drain).await;
                });
            }
            Ok(())
        })
}
