//! A plain hyper 1.x server behind handoff, no framework: the master accepts on --listen
//! (default 127.0.0.1:3000) and hands each connection to one of --workers worker processes
//! (this binary, re-executed); each serves it with hyper's HTTP/1.1 connection through
//! `handoff::http1::serve`, which hands keep-alive connections back to the master at a
//! request boundary when the worker drains (a rolling restart loses none). `--threads N`
//! gives each worker a multi-threaded runtime of N threads.
//!
//! Run with: cargo run --example hyper -- --listen 127.0.0.1:3000 --workers 4 [--threads 2]
//! Then:     curl http://127.0.0.1:3000/

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use handoff::Server;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};

async fn hello(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!("hello from worker {}\n", std::process::id());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn main() -> Result<(), handoff::Error> {
    let flags = common::setup();
    Server::builder()
        .listen(flags.listen)
        .workers(flags.workers)
        .worker_threads(flags.threads)
        .build()
        .run(|mut incoming| async move {
            let builder = http1::Builder::new();
            while let Some(conn) = incoming.accept().await {
                let (drain, builder) = (incoming.drain_signal(), builder.clone());
                tokio::spawn(async move {
                    // Draining, the connection goes back to the master at its next request
                    // boundary, for another worker (or, where it cannot, the request in
                    // flight is answered with `Connection: close`).
                    let _ = handoff::http1::serve(conn, &builder, service_fn(hello), drain).await;
                });
            }
            Ok(())
        })
}
