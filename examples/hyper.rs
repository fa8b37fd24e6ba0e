//! A plain hyper 1.x server behind handoff, no framework: the master accepts on --listen
//! (default 127.0.0.1:3000) and hands each connection to one of --workers worker processes
//! (this binary, re-executed); each serves it with hyper's HTTP/1.1 connection, which ends
//! keep-alive gracefully when the worker drains. `--threads N` gives each worker a
//! multi-threaded runtime of N threads.
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
use hyper_util::rt::TokioIo;

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
            while let Some(conn) = incoming.accept().await {
                let mut drain = incoming.drain_signal();
                tokio::spawn(async move {
                    let http = http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service_fn(hello));
                    tokio::pin!(http);
                    tokio::select! {
                        _ = http.as_mut() => {}
                        _ = drain.wait() => {
                            // Finish the request in flight, then close the keep-alive.
                            http.as_mut().graceful_shutdown();
                            let _ = http.await;
                        }
                    }
                });
            }
            Ok(())
        })
}
