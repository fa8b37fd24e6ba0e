//! A plain tokio echo server behind handoff: the master accepts on 127.0.0.1:7000 (or the
//! address given as the first argument) and hands each connection to one of 4 worker
//! processes (this same binary, re-executed with the same arguments). `main` is an ordinary
//! `#[tokio::main]`: `run` steps off the caller's runtime onto a thread of its own.
//!
//! Run with: cargo run --example echo [ADDR]
//! Then:     printf 'hello\n' | nc -q1 127.0.0.1 7000

use handoff::{Server, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), handoff::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let addr = addr.parse().unwrap_or_else(|e| panic!("{e}"));
    Server::builder()
        .listen(addr)
        .workers(4)
        .strategy(Strategy::LeastLoaded)
        .build()
        .run(|mut incoming| async move {
            // Initialise per-worker state here: the first accept() tells the master we're ready.
            while let Some(mut conn) = incoming.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // Dropping `conn` shuts down the write side and reports it finished.
                });
            }
            Ok(())
        })
}
