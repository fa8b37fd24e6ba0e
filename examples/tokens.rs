//! Session tokens in the cluster's shared map: a token one worker issues is accepted by
//! every worker, and refused by every worker once revoked. Every answer carries
//! `x-worker-pid`.
//!
//! - `POST /login`: a new random token as the plain-text body, valid for an hour
//! - `GET /check?token=T`: 200 while T is valid, 401 otherwise
//! - `POST /logout?token=T`: revokes T (200; 404 if it was not valid)
//!
//! Run with: cargo run --release --example tokens -- --listen 127.0.0.1:3000 --workers 4
//!           (add `--state redis://127.0.0.1:6379` to keep the tokens in Redis instead)
//! Then:     T=$(curl -s -X POST localhost:3000/login) ; curl -i "localhost:3000/check?token=$T"

mod common;

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use handoff::state::SharedMap;
use handoff::Server;

/// How long a token stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

fn answer(status: StatusCode, body: impl Into<String>) -> Response {
    let pid = [("x-worker-pid", std::process::id().to_string())];
    (status, pid, body.into()).into_response()
}

/// The map's key for token `token`.
fn key(token: &str) -> String {
    format!("token:{token}")
}

/// The `token` parameter of the query string.
fn token(uri: &Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .filter(|t| !t.is_empty() && t.len() <= 64)
        .map(str::to_owned)
}

async fn login(State(map): State<SharedMap>) -> Response {
    let token = format!("{:032x}", fastrand::u128(..));
    match map.set_for(&key(&token), "valid", TOKEN_TTL).await {
        Ok(()) => answer(StatusCode::OK, token),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn check(State(map): State<SharedMap>, uri: Uri) -> Response {
    match token(&uri).and_then(|t| map.get(&key(&t))) {
        Some(_) => answer(StatusCode::OK, "valid\n"),
        None => answer(StatusCode::UNAUTHORIZED, "invalid or expired token\n"),
    }
}

async fn logout(State(map): State<SharedMap>, uri: Uri) -> Response {
    let Some(token) = token(&uri) else {
        return answer(StatusCode::BAD_REQUEST, "no token= in the query\n");
    };
    match map.delete(&key(&token)).await {
        Ok(true) => answer(StatusCode::OK, "revoked\n"),
        Ok(false) => answer(StatusCode::NOT_FOUND, "no such token\n"),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

fn main() -> Result<(), handoff::Error> {
    let flags = common::setup();
    let mut builder = Server::builder()
        .listen(flags.listen)
        .workers(flags.workers)
        .worker_threads(flags.threads)
        .state_limits(flags.state_limits);
    if let Some(addr) = flags.metrics {
        builder = builder.metrics(addr);
    }
    builder.build().run(|incoming| async move {
        let app = Router::new()
            .route("/login", post(login))
            .route("/check", get(check))
            .route("/logout", post(logout))
            .with_state(incoming.state());
        let shutdown = incoming.shutdown_signal();
        axum::serve(incoming, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    })
}
