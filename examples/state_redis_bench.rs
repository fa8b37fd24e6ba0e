//! How fast the Redis-backed shared map is: how long a write in one `SharedMap` takes to
//! show in another's replica (pub/sub), and 16 clients × 10,000 increments of one counter.
//! Each `SharedMap` here is its own client, with its own connections, as each worker is.
//!
//! Run with: redis-server --port 6390 --save '' &
//!           cargo run --release --example state_redis_bench -- redis://127.0.0.1:6390 [SAMPLES]
//!
//! It writes under `handoff:state:` in that Redis: give it one of its own.

use std::time::{Duration, Instant};

use handoff::state::{SharedMap, StateLimits};

const CLIENTS: usize = 16;
const INCREMENTS: usize = 10_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: state_redis_bench REDIS_URL [SAMPLES]")?;
    let samples: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(5_000);
    let writer = SharedMap::redis(&url, StateLimits::default()).await?;
    let reader = SharedMap::redis(&url, StateLimits::default()).await?;

    // Visibility: from just before `set` to the reader's replica holding the value.
    let (mut written, mut visible) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let value = i.to_string();
        let started = Instant::now();
        writer.set("probe", value.clone()).await?;
        written.push(started.elapsed());
        let deadline = started + Duration::from_secs(5);
        while reader.get("probe").as_deref() != Some(value.as_bytes()) {
            if Instant::now() > deadline {
                return Err(format!("write {i} not visible in 5 s").into());
            }
            tokio::task::yield_now().await;
        }
        visible.push(started.elapsed());
    }
    println!("{samples} writes of a small value, one at a time:");
    println!(
        "  write answered (the writer reads it):   {}",
        percentiles(&mut written)
    );
    println!(
        "  visible in another client's replica:    {}",
        percentiles(&mut visible)
    );

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(SharedMap::redis(&url, StateLimits::default()).await?);
    }
    let start = clients[0].increment("bench-hits", 0).await?;
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|map| {
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    map.increment("bench-hits", 1).await?;
                }
                Ok::<_, handoff::state::StateError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let took = started.elapsed();
    let total = clients[0].increment("bench-hits", 0).await? - start;
    let expected = (CLIENTS * INCREMENTS) as i64;
    println!(
        "{CLIENTS} clients x {INCREMENTS} increments: total {total} (expected {expected}) in \
         {took:.2?}, {:.0} increments/s",
        expected as f64 / took.as_secs_f64()
    );
    if total != expected {
        return Err("the counter is off".into());
    }
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "p50 {:?}  p99 {:?}  max {:?}",
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    )
}
