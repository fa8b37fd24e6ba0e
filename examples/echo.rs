//! A plain tokio echo server behind handoff: the master accepts on 127.0.0.1:7000 and hands
//! each connection to one of 4 worker processes (this same binary, re-executed).
//!
//! Run with: cargo run --example echo
//! Then:     printf 'hello\n' | nc -q1 127.0.0.1 7000

use handoff::{Server, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), handoff::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    Server::builder()
        .listen("127.0.0.1:7000".parse().expect("a valid address"))
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
