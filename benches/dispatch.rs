//! What the master spends per connection, measured on its own thread's CPU clock:
//! - `handoff/per_connection`: the master's own dispatch path (`MasterPath`: the real
//!   table, accept batch, sendmsg and frame handling) over a loopback listener and 16 real
//!   worker channels: accept4, pick a worker, one sendmsg per worker per batch, read the
//!   workers' cumulative acks and close the master's copies (without HTTP or tokio tasks);
//! - `pick/*`: one balancing decision among 16 workers;
//! - `frame/*`: encoding and decoding a full batch header.
//!
//! Run with: cargo bench --bench dispatch

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use handoff::internals::frame::{self, ConnectionHeader, Status};
use handoff::internals::scm::{self, MAX_FDS};
use handoff::internals::{process, shm, socket, MasterPath, Strategy};
use handoff::internals::{Balance, Candidate, LeastLoaded, RoundRobin, TwoChoices};

/// Connections made ready in the kernel queue before each measured drain.
const CHUNK: usize = 512;

fn candidates(loads: &[u64]) -> Vec<Candidate> {
    loads
        .iter()
        .map(|&load| Candidate {
            eligible: true,
            load,
        })
        .collect()
}

/// How the fake workers acknowledge.
#[derive(Debug, Clone, Copy)]
enum Acks {
    /// A STATUS frame per batch received.
    Frames,
    /// Atomic adds in counters shared in memory (sent once in a COUNTERS frame).
    Memory,
}

/// The worker side: receive batches and acknowledge them cumulatively. Like a real worker
/// it still holds a connection when the master drops its copy (it serves it first), so it
/// keeps the last chunk's worth open: the master's close is never the last one, which would
/// charge the whole TCP teardown to the master.
fn fake_worker(channel: OwnedFd, acks: Acks) {
    let counters = match acks {
        Acks::Frames => None,
        Acks::Memory => {
            let counters = shm::Counters::create().unwrap();
            let mut bytes = Vec::new();
            frame::encode_counters(&mut bytes);
            scm::send_with_fds(&channel, &bytes, &[counters.fd().unwrap()]).unwrap();
            Some(counters)
        }
    };
    let mut buf = vec![0u8; frame::MAX_FRAME_LEN + 1];
    let mut received = 0u64;
    let mut ack = Vec::new();
    let mut serving = VecDeque::new();
    loop {
        if !socket::wait_readable(&channel, 1000).unwrap_or(false) {
            continue;
        }
        let got = match scm::recv_with_fds(&channel, &mut buf) {
            Ok(got) if got.len == 0 => return,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let count = got.fds.len() as u64;
        received += count;
        serving.extend(got.fds);
        while serving.len() > CHUNK {
            serving.pop_front();
        }
        if let Some(counters) = &counters {
            counters.region().received.fetch_add(count, SeqCst);
            counters.region().closed.fetch_add(count, SeqCst);
            continue;
        }
        frame::encode_status(
            &mut ack,
            Status {
                received_total: received,
                closed_total: received,
            },
        );
        let _ = scm::send_with_fds(&channel, &ack, &[]);
    }
}

/// Workers on the other ends of the channels.
const WORKERS: usize = 16;

fn per_connection(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    for (name, acks) in [
        ("per_connection", Acks::Frames),
        ("per_connection_shared_counters", Acks::Memory),
    ] {
        measure_dispatch(&mut group, name, acks);
    }
    group.finish();
}

/// The master's CPU per connection over [`WORKERS`] fake workers acknowledging by `acks`.
fn measure_dispatch(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    acks: Acks,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _reactor = runtime.enter();
    let listener = socket::tcp_listener("127.0.0.1:0".parse().unwrap(), 4096, false).unwrap();
    let addr: SocketAddr = socket::local_addr(&listener).unwrap().unwrap();
    let channels = (0..WORKERS)
        .map(|_| {
            let (master_end, worker_end) = socket::seqpacket_pair().unwrap();
            std::thread::spawn(move || fake_worker(worker_end, acks));
            master_end
        })
        .collect();
    let mut master = MasterPath::new(listener, channels, Strategy::LeastLoaded).unwrap();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = CHUNK.min((iters - done) as usize).max(1);
                let clients: Vec<TcpStream> =
                    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
                // The kernel may still be queueing the last handshakes: accept until all came.
                let mut handed = 0;
                while handed < n {
                    let before = process::thread_cpu_time();
                    handed += master.dispatch_queued().expect("dispatch");
                    spent += process::thread_cpu_time() - before;
                }
                assert_eq!(handed, n, "every connection is handed off once");
                // The acknowledgements, on the master's clock too; polling for them while
                // none has come is the harness waiting (the master sleeps in epoll), not.
                while master.held() > 0 {
                    let before = process::thread_cpu_time();
                    if master.settle().expect("acknowledgements") > 0 {
                        spent += process::thread_cpu_time() - before;
                    } else {
                        std::thread::yield_now();
                    }
                }
                drop(clients);
                done += n as u64;
            }
            spent
        })
    });
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let loads: Vec<u64> = (0..16).map(|i| (i * 7919) % 13).collect();
    let c16 = candidates(&loads);
    let strategies: [(&str, Box<dyn Balance>); 3] = [
        ("round-robin", Box::new(RoundRobin::default())),
        ("least-loaded", Box::new(LeastLoaded::default())),
        ("two-choices", Box::new(TwoChoices::with_seed(1))),
    ];
    for (name, mut balancer) in strategies {
        group.bench_with_input(BenchmarkId::new(name, 16), &c16, |b, c| {
            b.iter(|| balancer.pick(black_box(c)))
        });
    }
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    let headers: Vec<ConnectionHeader> = (0..MAX_FDS as u64)
        .map(|id| ConnectionHeader {
            id,
            listener: 0,
            peer: socket::Peer::Ip("127.0.0.1:40000".parse().unwrap()),
        })
        .collect();
    let mut buf = Vec::new();
    group.throughput(Throughput::Elements(MAX_FDS as u64));
    group.bench_function("encode_253", |b| {
        b.iter(|| frame::encode_connections(&mut buf, black_box(&headers).iter().copied()))
    });
    frame::encode_connections(&mut buf, headers.iter().copied());
    group.bench_function("decode_253", |b| {
        b.iter(|| frame::decode(black_box(&buf)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, per_connection, pick, frames);
criterion_main!(benches);
