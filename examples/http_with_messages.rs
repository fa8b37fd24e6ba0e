//! Does a stream of messages through the master slow HTTP down? Workers serve a small HTTP
//! response (each request burns `--work-us` of CPU) while, with `--messages M`, they send M
//! messages a second in all to the master's handler. A client thread in the master's
//! process offers `--rate` requests a second (open loop, a new connection each, latency
//! measured from when each request was due) and prints the percentiles. Run it with
//! `--messages 0` and with `--messages 100000` and compare (docs/benchmarks.md).
//!
//! Run with: cargo run --release --example http_with_messages -- --rate 2000 --messages 100000

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use handoff::{Master, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy)]
struct Flags {
    workers: usize,
    rate: u64,
    messages: u64,
    work: Duration,
    seconds: u64,
    port: u16,
}

fn flags() -> Flags {
    let mut flags = Flags {
        workers: 4,
        rate: 2000,
        messages: 100_000,
        work: Duration::from_micros(100),
        seconds: 5,
        port: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: u64 = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--workers" => flags.workers = value as usize,
            "--rate" => flags.rate = value,
            "--messages" => flags.messages = value,
            "--work-us" => flags.work = Duration::from_micros(value),
            "--seconds" => flags.seconds = value,
            "--port" => flags.port = value as u16,
            other => panic!("unknown flag {other}"),
        }
    }
    flags
}

/// Burns `work` of CPU, like a request that computes something.
fn burn(work: Duration) {
    let start = Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

/// One HTTP/1.1 exchange on `conn`: read the head, answer, close.
async fn serve(mut conn: handoff::Connection, work: Duration) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    burn(work);
    let _ = conn
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
        .await;
}

/// The client: `rate` requests a second for `seconds`, from 32 threads taking turns.
fn client(addr: SocketAddr, rate: u64, seconds: u64) -> Vec<Duration> {
    let total = rate * seconds;
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let start = Instant::now() + Duration::from_millis(100);
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let (next, latencies) = (next.clone(), latencies.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if exchange(addr).is_ok() {
                    latencies.lock().unwrap().push(due.elapsed());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_unstable();
    latencies
}

fn exchange(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200"))
    }
}

/// The master's handler: counts the messages and prints the rate when the client is done.
async fn master(mut master: Master<u64>, flags: Flags) {
    let start = Instant::now();
    let mut received = 0u64;
    while master.recv().await.is_some() {
        received += 1;
        if received % 100_000 == 0 {
            let rate = received as f64 / start.elapsed().as_secs_f64();
            eprintln!(
                "master: {received} messages, {rate:.0}/s (asked {})",
                flags.messages
            );
        }
    }
}

fn main() -> Result<(), handoff::Error> {
    let flags = flags();
    let port = if flags.port == 0 {
        47_000 + (std::process::id() % 1000) as u16
    } else {
        flags.port
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    if std::env::var_os("HANDOFF_FD").is_none() {
        // The master's process: the client runs beside it and stops it when done.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            let latencies = client(addr, flags.rate, flags.seconds);
            let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
            println!(
                "rate {}/s, messages {}/s, {} answered of {}: p50 {:?} p99 {:?} p99.9 {:?}",
                flags.rate,
                flags.messages,
                latencies.len(),
                flags.rate * flags.seconds,
                at(0.5),
                at(0.99),
                at(0.999)
            );
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::TERM,
            );
        });
    }
    Server::builder()
        .listen(handoff::ListenAddr::Tcp(addr))
        .workers(flags.workers)
        .master(move |m| master(m, flags))
        .build()
        .run(move |mut incoming| async move {
            let messenger = incoming.messenger::<u64>();
            let per_ms = flags.messages as f64 / flags.workers as f64 / 1000.0;
            tokio::spawn(async move {
                // Paced: every millisecond, this worker's share (fractions carried over).
                let mut every = tokio::time::interval(Duration::from_millis(1));
                let mut owed = 0.0;
                loop {
                    every.tick().await;
                    owed += per_ms;
                    while owed >= 1.0 {
                        let _ = messenger.send(&1).await;
                        owed -= 1.0;
                    }
                }
            });
            while let Some(conn) = incoming.accept().await {
                tokio::spawn(serve(conn, flags.work));
            }
            Ok(())
        })
}
