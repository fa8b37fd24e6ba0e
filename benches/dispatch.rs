//! What the master spends per connection, measured on its own thread's CPU clock:
//! - `handoff/per_connection`: accept4 from a loopback listener, pick a worker out of 16,
//!   encode the batch header, one sendmsg per up to 253 fds, read the worker's cumulative
//!   ack and close the master's copies (the whole accept → send → ack path, without HTTP);
//! - `pick/*`: one balancing decision among 16 workers;
//! - `frame/*`: encoding and decoding a full batch header.
//!
//! Run with: cargo bench --bench dispatch

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use handoff::internals::frame::{self, ConnectionHeader, Frame, Status};
use handoff::internals::scm::{self, MAX_FDS};
use handoff::internals::{process, socket};
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

/// The worker side: receive batches and acknowledge them cumulatively. Like a real worker
/// it still holds a connection when the master drops its copy (it serves it first), so it
/// keeps the last few chunks open: the master's close is never the last one, which would
/// charge the whole TCP teardown to the master.
fn fake_worker(channel: OwnedFd) {
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
        received += got.fds.len() as u64;
        serving.extend(got.fds);
        while serving.len() > 4 * CHUNK {
            serving.pop_front();
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

struct Master {
    listener: OwnedFd,
    channel: OwnedFd,
    balancer: LeastLoaded,
    loads: Vec<u64>,
    unacked: VecDeque<OwnedFd>,
    acked: u64,
    frame: Vec<u8>,
    buf: Vec<u8>,
}

impl Master {
    /// Accept everything queued, hand it out in batches, wait for the acks, close copies.
    fn dispatch_all(&mut self) -> usize {
        let mut batch: Vec<(OwnedFd, socket::Peer)> = Vec::with_capacity(MAX_FDS);
        let mut handed = 0;
        loop {
            let accepted = socket::accept(&self.listener);
            let done = accepted.is_err();
            if let Ok((fd, peer)) = accepted {
                let worker = self
                    .balancer
                    .pick(&candidates(&self.loads))
                    .expect("eligible");
                self.loads[worker] += 1;
                batch.push((fd, peer));
            }
            if (done || batch.len() == MAX_FDS) && !batch.is_empty() {
                let headers = batch
                    .iter()
                    .enumerate()
                    .map(|(i, (_, peer))| ConnectionHeader {
                        id: (handed + i) as u64,
                        listener: 0,
                        peer: *peer,
                    });
                frame::encode_connections(&mut self.frame, headers);
                let fds: Vec<_> = batch.iter().map(|(fd, _)| fd.as_fd()).collect();
                scm::send_with_fds(&self.channel, &self.frame, &fds).expect("send batch");
                handed += batch.len();
                self.unacked.extend(batch.drain(..).map(|(fd, _)| fd));
            }
            if done {
                break;
            }
        }
        while !self.unacked.is_empty() {
            socket::wait_readable(&self.channel, 1000).expect("poll");
            while let Ok(got) = scm::recv_with_fds(&self.channel, &mut self.buf) {
                if let Ok(Frame::Status(status)) = frame::decode(&self.buf[..got.len]) {
                    let newly = (status.received_total - self.acked) as usize;
                    self.unacked.drain(..newly);
                    self.acked = status.received_total;
                }
            }
        }
        self.loads.iter_mut().for_each(|l| *l = 0);
        handed
    }
}

fn per_connection(c: &mut Criterion) {
    let listener = socket::tcp_listener("127.0.0.1:0".parse().unwrap(), 4096, false).unwrap();
    let addr: SocketAddr = socket::local_addr(&listener).unwrap().unwrap();
    let (master_end, worker_end) = socket::seqpacket_pair().unwrap();
    std::thread::spawn(move || fake_worker(worker_end));
    let mut master = Master {
        listener,
        channel: master_end,
        balancer: LeastLoaded::default(),
        loads: vec![0; 16],
        unacked: VecDeque::new(),
        acked: 0,
        frame: Vec::new(),
        buf: vec![0u8; frame::MAX_FRAME_LEN + 1],
    };
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("per_connection", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = CHUNK.min((iters - done) as usize).max(1);
                let clients: Vec<TcpStream> =
                    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
                let before = process::thread_cpu_time();
                let handed = master.dispatch_all();
                spent += process::thread_cpu_time() - before;
                assert_eq!(handed, n, "every queued connection is handed off");
                drop(clients);
                done += n as u64;
            }
            spent
        })
    });
    group.finish();
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
