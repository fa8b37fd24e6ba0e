//! The built-in HTTP/1.1 load generator of `handoff bench`. Runs in the bench process, on its
//! tokio runtime, and talks only to the contender under test (a loopback address).
//!
//! Two paces: **open loop** sends at a fixed arrival rate whatever the server does, and
//! measures each latency from the request's *scheduled* send time, so a stalled server shows
//! as latency instead of as fewer requests (no coordinated omission); **closed loop** keeps N
//! clients busy as fast as the server answers (capacity). Requests go on a new connection
//! each (`connection: close`) or over persistent connections, evenly or with a skewed
//! activity (a few busy connections and many quiet ones).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::stats::latency_histogram;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// A fixed arrival rate (requests per second), whatever the server does.
    Open {
        /// Requests per second, over all connections.
        rate: f64,
    },
    /// This many clients, each sending its next request as soon as the last is answered.
    Closed {
        /// Concurrent clients (for persistent connections: ignored, one per connection).
        clients: usize,
    },
}

/// How requests map to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// A new connection for each request, `connection: close`.
    PerRequest,
    /// `count` persistent connections, each carrying an equal part of the load.
    KeepAlive {
        /// Persistent connections.
        count: usize,
    },
    /// `count` persistent connections whose activity falls off like Zipf's law: connection k
    /// carries a share proportional to 1/(k+1) (a few busy ones, many quiet ones).
    Skewed {
        /// Persistent connections.
        count: usize,
    },
}

/// How open-loop requests on new connections arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arrivals {
    /// At a fixed interval: the gentlest load a rate can be.
    #[default]
    Even,
    /// Independently of each other (a Poisson process): exponential gaps of the same mean,
    /// drawn from a fixed seed, so every contender gets the same sequence. Bursts happen, as
    /// with real clients.
    Poisson,
}

/// The seed of [`Arrivals::Poisson`].
const ARRIVALS_SEED: u64 = 0x5eed;

/// Send times `rate` per second on average with exponential gaps, from `start`.
pub fn poisson(rate: f64, start: Instant, seed: u64) -> impl Iterator<Item = Instant> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mean = 1.0 / rate.max(1e-3);
    let mut t = 0.0f64;
    std::iter::from_fn(move || {
        let due = start + Duration::from_secs_f64(t);
        // 1 - [0, 1) is in (0, 1]: its logarithm is finite and at most 0.
        t += -mean * (1.0 - rng.f64()).ln();
        Some(due)
    })
}

/// One load run against one address.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// Where to send (a loopback address).
    pub addr: SocketAddr,
    /// Open or closed loop.
    pub pace: Pace,
    /// New connection per request or persistent connections.
    pub connections: Connections,
    /// Traffic before the measured window (not recorded).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// The longest one request (connect included) may take before it counts as a timeout.
    pub timeout: Duration,
    /// New-connection requests in flight at most (bounds the generator's fds); in open loop,
    /// a request waiting for a slot is late, and its latency says so.
    pub max_in_flight: usize,
    /// Open loop, new connections: how requests arrive.
    pub arrivals: Arrivals,
    /// Open loop, new connections: keep each answered request's [`Span`] in the window (for
    /// the connections in flight per worker, counted afterwards).
    pub spans: bool,
}

impl LoadSpec {
    fn window(&self, start: Instant) -> (Instant, Instant) {
        let from = start + self.warmup;
        (from, from + self.duration)
    }
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Errors {
    /// The connection could not be made (refused, no ports left, ...).
    pub connect: u64,
    /// No complete answer within the timeout (connect included).
    pub timeout: u64,
    /// An answer that was not `200`.
    pub status: u64,
    /// Reset, broken pipe or closed before the whole response.
    pub reset: u64,
    /// Anything else: a malformed response, another I/O error.
    pub other: u64,
}

impl std::fmt::Display for Errors {
    /// `N errors (connect .., timeout .., status .., reset .., other ..)`: a report's warning.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} errors (connect {}, timeout {}, status {}, reset {}, other {})",
            self.total(),
            self.connect,
            self.timeout,
            self.status,
            self.reset,
            self.other
        )
    }
}

impl Errors {
    /// Errors of every kind.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.status + self.reset + self.other
    }

    fn add(&mut self, other: &Errors) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.status += other.status;
        self.reset += other.reset;
        self.other += other.other;
    }

    fn count(&mut self, failure: Failure) {
        match failure {
            Failure::Connect => self.connect += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Status => self.status += 1,
            Failure::Reset => self.reset += 1,
            Failure::Other => self.other += 1,
        }
    }
}

/// What the measured window saw.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latencies of the successful requests, in microseconds.
    pub histogram: Histogram<u64>,
    /// Successful requests by the `x-worker-pid` that answered.
    pub by_pid: HashMap<u32, u64>,
    /// Failed requests.
    pub errors: Errors,
    /// Successful requests.
    pub ok: u64,
    /// Connections opened.
    pub connects: u64,
    /// Requests sent or scheduled (open loop).
    pub attempted: u64,
    /// Open loop: how late the generator itself sent, in µs (its own lag, not the server's).
    pub dispatch_lag: Histogram<u64>,
    /// With [`LoadSpec::spans`]: when each answered request was in flight (those of the
    /// warm-up too).
    pub spans: Vec<Span>,
}

/// One answered request's time in flight, as the generator saw it: from the start of its
/// connect to the end of the answer (before the server's close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The `x-worker-pid` that answered.
    pub pid: u32,
    /// When the connect began.
    pub from: Instant,
    /// When the whole answer had arrived.
    pub to: Instant,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            histogram: latency_histogram(),
            by_pid: HashMap::new(),
            errors: Errors::default(),
            ok: 0,
            connects: 0,
            attempted: 0,
            dispatch_lag: latency_histogram(),
            spans: Vec::new(),
        }
    }
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        for (pid, n) in &other.by_pid {
            *self.by_pid.entry(*pid).or_default() += n;
        }
        self.errors.add(&other.errors);
        self.ok += other.ok;
        self.connects += other.connects;
        self.attempted += other.attempted;
        let _ = self.dispatch_lag.add(&other.dispatch_lag);
        self.spans.extend_from_slice(&other.spans);
    }

    fn record(&mut self, outcome: Result<u32, Failure>, latency: Duration) {
        self.attempted += 1;
        match outcome {
            Ok(pid) => {
                self.ok += 1;
                *self.by_pid.entry(pid).or_default() += 1;
                self.histogram
                    .saturating_record((latency.as_micros() as u64).max(1));
            }
            Err(failure) => self.errors.count(failure),
        }
    }
}

type Shared = Arc<Mutex<Tally>>;

fn merge_into(shared: &Shared, local: &Tally) {
    lock(shared).merge(local);
}

/// The send times of one stream of requests: `offset + j·interval` after the start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// When the first request is due, after the start.
    pub offset: Duration,
    /// Time between two requests.
    pub interval: Duration,
}

impl Schedule {
    /// `rate` requests per second from the start.
    pub fn at_rate(rate: f64) -> Schedule {
        Schedule {
            offset: Duration::ZERO,
            interval: Duration::from_secs_f64(1.0 / rate.max(1e-3)),
        }
    }

    /// Stream `k` of `n` that together make `rate` requests per second, interleaved: each
    /// sends every n/rate seconds, stream k starting k/rate seconds in.
    pub fn interleaved(rate: f64, k: usize, n: usize) -> Schedule {
        let rate = rate.max(1e-3);
        Schedule {
            offset: Duration::from_secs_f64(k as f64 / rate),
            interval: Duration::from_secs_f64(n.max(1) as f64 / rate),
        }
    }

    /// Stream `k` of `n` whose rates fall off like 1/(k+1) and add up to `rate`; phases are
    /// spread so the streams do not all fire at the start.
    pub fn zipf(rate: f64, k: usize, n: usize) -> Schedule {
        let harmonic: f64 = (1..=n.max(1)).map(|i| 1.0 / i as f64).sum();
        let own = rate.max(1e-3) / ((k + 1) as f64 * harmonic);
        let interval = 1.0 / own;
        Schedule {
            offset: Duration::from_secs_f64(interval * k as f64 / n.max(1) as f64),
            interval: Duration::from_secs_f64(interval),
        }
    }

    /// The `j`th send time after `start`.
    pub fn at(&self, start: Instant, j: u64) -> Instant {
        start + self.offset + self.interval.mul_f64(j as f64)
    }
}

/// Runs `spec` from `start` (the caller reads CPU counters at the window's edges, which are
/// `start + warmup` and `start + warmup + duration`) and returns what the window saw:
/// requests scheduled (open loop) or sent (closed loop) inside it.
///
/// Open-loop send times come from a dispatcher thread that sleeps with the kernel's
/// high-resolution timers (tokio's timer wheel ticks in milliseconds, which would add up
/// to a millisecond of the generator's own lag to every latency).
pub async fn run(spec: LoadSpec, start: Instant) -> Tally {
    let shared: Shared = Arc::default();
    match (spec.pace, spec.connections) {
        (Pace::Open { rate }, Connections::PerRequest) => {
            open_per_request(spec, rate, start, &shared).await
        }
        (Pace::Open { rate }, Connections::KeepAlive { count } | Connections::Skewed { count }) => {
            let skewed = matches!(spec.connections, Connections::Skewed { .. });
            let count = count.max(1);
            let streams: Vec<Schedule> = (0..count)
                .map(|k| {
                    if skewed {
                        Schedule::zipf(rate, k, count)
                    } else {
                        Schedule::interleaved(rate, k, count)
                    }
                })
                .collect();
            let mut tasks = JoinSet::new();
            let mut senders = Vec::with_capacity(count);
            for _ in 0..count {
                let (send, receive) = mpsc::unbounded_channel();
                senders.push(send);
                tasks.spawn(persistent_open(spec, start, receive, shared.clone()));
            }
            let (from, to) = spec.window(start);
            let lag = tokio::task::spawn_blocking(move || {
                dispatch(&streams, start, to, from, |k, due| {
                    // A closed receiver is a finished connection task: nothing to do.
                    let _ = senders[k].send(due);
                })
            })
            .await
            .unwrap_or_else(|_| latency_histogram());
            while tasks.join_next().await.is_some() {}
            lock(&shared).dispatch_lag = lag;
        }
        (Pace::Closed { clients }, connections) => {
            let (clients, persistent) = match connections {
                Connections::PerRequest => (clients, false),
                Connections::KeepAlive { count } | Connections::Skewed { count } => (count, true),
            };
            let mut tasks = JoinSet::new();
            for _ in 0..clients.max(1) {
                tasks.spawn(closed_client(spec, start, persistent, shared.clone()));
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let tally = lock(&shared);
    tally.clone()
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Calls `fire(stream, due)` for every send time of `streams` before `to`, in time order, on
/// time: this thread sleeps until each is due. Returns how late the calls inside the window
/// (from `from`) were, in µs: the generator's own lag.
fn dispatch(
    streams: &[Schedule],
    start: Instant,
    to: Instant,
    from: Instant,
    fire: impl FnMut(usize, Instant),
) -> Histogram<u64> {
    let mut next: BinaryHeap<Reverse<(Instant, usize, u64)>> = streams
        .iter()
        .enumerate()
        .map(|(k, s)| Reverse((s.at(start, 0), k, 0)))
        .collect();
    let times = std::iter::from_fn(move || {
        let Reverse((due, k, j)) = next.pop()?;
        next.push(Reverse((streams[k].at(start, j + 1), k, j + 1)));
        Some((k, due))
    });
    fire_on_time(times, to, from, fire)
}

/// Calls `fire(stream, due)` for each of `times` (in time order) before `to`, on time; returns
/// the lag of the calls from `from` on, in µs.
fn fire_on_time(
    times: impl Iterator<Item = (usize, Instant)>,
    to: Instant,
    from: Instant,
    mut fire: impl FnMut(usize, Instant),
) -> Histogram<u64> {
    let mut lag = latency_histogram();
    for (k, due) in times {
        if due >= to {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        fire(k, due);
        if due >= from {
            lag.saturating_record(due.elapsed().as_micros() as u64);
        }
    }
    lag
}

async fn open_per_request(spec: LoadSpec, rate: f64, start: Instant, shared: &Shared) {
    let (from, to) = spec.window(start);
    let slots = Arc::new(Semaphore::new(spec.max_in_flight.max(1)));
    let handle = tokio::runtime::Handle::current();
    let (dispatch_slots, dispatch_shared) = (slots.clone(), shared.clone());
    let give_up = to + spec.timeout;
    let lag = tokio::task::spawn_blocking(move || {
        let fire = |_, due: Instant| {
            // In open loop a request that waits for a slot is late, and its latency says so;
            // one that cannot get a slot until well past the end has timed out.
            let wait = tokio::time::timeout_at(
                tokio::time::Instant::from_std(give_up),
                dispatch_slots.clone().acquire_owned(),
            );
            let Ok(Ok(slot)) = handle.block_on(wait) else {
                if due >= from {
                    lock(&dispatch_shared).record(Err(Failure::Timeout), due.elapsed());
                }
                return;
            };
            let shared = dispatch_shared.clone();
            handle.spawn(async move {
                let began = Instant::now();
                let outcome = match timeout(spec.timeout, new_connection_request(spec.addr)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::Timeout),
                };
                drop(slot);
                let mut tally = lock(&shared);
                // Warm-up requests too: they are in flight as the window opens.
                if let (true, Ok((pid, answered))) = (spec.spans, outcome) {
                    tally.spans.push(Span {
                        pid,
                        from: began,
                        to: answered,
                    });
                }
                if due >= from {
                    if outcome != Err(Failure::Connect) {
                        tally.connects += 1;
                    }
                    tally.record(outcome.map(|(pid, _)| pid), due.elapsed());
                }
            });
        };
        match spec.arrivals {
            Arrivals::Even => dispatch(&[Schedule::at_rate(rate)], start, to, from, fire),
            Arrivals::Poisson => {
                let times = poisson(rate, start, ARRIVALS_SEED).map(|due| (0, due));
                fire_on_time(times, to, from, fire)
            }
        }
    })
    .await
    .unwrap_or_else(|_| latency_histogram());
    // Every request holds a slot until it is done (bounded by its timeout): take them all.
    let all = u32::try_from(spec.max_in_flight.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    lock(shared).dispatch_lag = lag;
}

/// A closed-loop client: a new connection per request, or one persistent connection.
async fn closed_client(spec: LoadSpec, start: Instant, persistent: bool, shared: Shared) {
    let (from, to) = spec.window(start);
    let mut local = Tally::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    loop {
        let sent = Instant::now();
        if sent >= to {
            break;
        }
        let measured = sent >= from;
        let outcome = if persistent {
            persistent_request(spec, &mut conn, measured.then_some(&mut local)).await
        } else {
            let outcome = match timeout(spec.timeout, new_connection_request(spec.addr)).await {
                Ok(outcome) => outcome.map(|(pid, _)| pid),
                Err(_) => Err(Failure::Timeout),
            };
            if measured && outcome != Err(Failure::Connect) {
                local.connects += 1;
            }
            outcome
        };
        if measured {
            local.record(outcome, sent.elapsed());
        }
        if outcome.is_err() {
            // A refused or broken server: do not spin.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    merge_into(&shared, &local);
}

async fn persistent_open(
    spec: LoadSpec,
    start: Instant,
    mut due: mpsc::UnboundedReceiver<Instant>,
    shared: Shared,
) {
    let (from, to) = spec.window(start);
    // Requests still queued this long after the schedule ended are not sent: timed out.
    let give_up = to + spec.timeout;
    let mut local = Tally::default();
    // Long-lived: connect now, before the first request is due.
    let mut conn = match timeout(spec.timeout, TcpStream::connect(spec.addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Some(BufReader::new(stream))
        }
        _ => None,
    };
    while let Some(due) = due.recv().await {
        let measured = due >= from;
        if Instant::now() > give_up {
            if measured {
                local.record(Err(Failure::Timeout), due.elapsed());
            }
            continue;
        }
        let outcome = persistent_request(spec, &mut conn, measured.then_some(&mut local)).await;
        if measured {
            local.record(outcome, due.elapsed());
        }
    }
    merge_into(&shared, &local);
}

/// One request on the persistent connection `conn`, (re)connecting first if there is none;
/// drops the connection after a failure or when the server says it closes.
async fn persistent_request(
    spec: LoadSpec,
    conn: &mut Option<BufReader<TcpStream>>,
    tally: Option<&mut Tally>,
) -> Result<u32, Failure> {
    let exchange = async {
        if conn.is_none() {
            let stream = TcpStream::connect(spec.addr)
                .await
                .map_err(|_| Failure::Connect)?;
            let _ = stream.set_nodelay(true);
            if let Some(tally) = tally {
                tally.connects += 1;
            }
            *conn = Some(BufReader::new(stream));
        }
        match conn.as_mut() {
            Some(stream) => request(stream, false).await,
            None => Err(Failure::Other),
        }
    };
    let outcome = match timeout(spec.timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Timeout),
    };
    match outcome {
        Ok(Answer { pid, closes: false }) => Ok(pid),
        Ok(Answer { pid, closes: true }) => {
            *conn = None;
            Ok(pid)
        }
        Err(failure) => {
            *conn = None;
            Err(failure)
        }
    }
}

/// One request on a new connection: the answering pid and when the answer was complete.
async fn new_connection_request(addr: SocketAddr) -> Result<(u32, Instant), Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    let mut stream = BufReader::new(stream);
    let answer = request(&mut stream, true).await?;
    let answered = Instant::now();
    // Let the server close first (it said `connection: close`), so the TIME_WAIT is its.
    let mut rest = [0u8; 64];
    let _ = stream.read(&mut rest).await;
    Ok((answer.pid, answered))
}

/// Why one request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    Timeout,
    Status,
    Reset,
    Other,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => Failure::Reset,
            io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// A successful response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    /// Its `x-worker-pid`.
    pid: u32,
    /// The server closes the connection after it.
    closes: bool,
}

/// The longest status or header line read.
const MAX_LINE: u64 = 8 * 1024;
/// The largest body read.
const MAX_BODY: usize = 64 * 1024;

/// Sends `GET /` and reads one response with a `content-length` body.
async fn request(stream: &mut BufReader<TcpStream>, close: bool) -> Result<Answer, Failure> {
    let request: &[u8] = if close {
        b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"
    };
    stream.get_mut().write_all(request).await?;
    let mut line = String::new();
    read_line(stream, &mut line).await?;
    if line.is_empty() {
        return Err(Failure::Reset);
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(Failure::Other)?;
    let mut pid = None;
    let mut closes = close;
    let mut length: Option<usize> = None;
    loop {
        line.clear();
        read_line(stream, &mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            if line.is_empty() {
                return Err(Failure::Reset);
            }
            break;
        }
        let (name, value) = header.split_once(':').ok_or(Failure::Other)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("x-worker-pid") {
            pid = Some(value.parse().map_err(|_| Failure::Other)?);
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| Failure::Other)?);
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            closes = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Failure::Other);
        }
    }
    let length = length.ok_or(Failure::Other)?;
    if length > MAX_BODY {
        return Err(Failure::Other);
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    if status != 200 {
        return Err(Failure::Status);
    }
    // Every answer names its worker: one without is not from a contender's worker.
    let pid = pid.ok_or(Failure::Other)?;
    Ok(Answer { pid, closes })
}

async fn read_line(stream: &mut BufReader<TcpStream>, line: &mut String) -> Result<(), Failure> {
    let read = AsyncReadExt::take(&mut *stream, MAX_LINE)
        .read_line(line)
        .await?;
    if read as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(Failure::Other);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_in(schedule: &Schedule, start: Instant, from: Duration, to: Duration) -> usize {
        (0..1_000_000u64)
            .map(|j| schedule.at(start, j))
            .take_while(|t| *t < start + to)
            .filter(|t| *t >= start + from)
            .count()
    }

    #[test]
    fn an_open_loop_schedule_sends_at_the_rate_from_the_start() {
        let start = Instant::now();
        let s = Schedule::at_rate(1000.0);
        assert_eq!(s.at(start, 0), start);
        assert_eq!(s.at(start, 1000), start + Duration::from_secs(1));
        assert_eq!(
            count_in(&s, start, Duration::ZERO, Duration::from_secs(2)),
            2000
        );
        assert_eq!(
            count_in(
                &s,
                start,
                Duration::from_millis(500),
                Duration::from_millis(1500)
            ),
            1000
        );
    }

    #[test]
    fn interleaved_streams_add_up_to_the_rate_without_colliding() {
        let start = Instant::now();
        let (rate, n) = (800.0, 8);
        let mut times = Vec::new();
        for k in 0..n {
            let s = Schedule::interleaved(rate, k, n);
            times.extend((0..100u64).map(|j| s.at(start, j)));
        }
        times.sort();
        times.dedup();
        assert_eq!(times.len(), 800, "no two streams share a send time");
        let one_second = times
            .iter()
            .filter(|t| **t < start + Duration::from_secs(1))
            .count();
        assert_eq!(one_second, 800);
    }

    #[test]
    fn zipf_streams_add_up_to_the_rate_with_the_first_the_busiest() {
        let (rate, n) = (1000.0, 100);
        let rates: Vec<f64> = (0..n)
            .map(|k| 1.0 / Schedule::zipf(rate, k, n).interval.as_secs_f64())
            .collect();
        let total: f64 = rates.iter().sum();
        assert!((total - rate).abs() < 1.0, "{total}");
        assert!((rates[0] / rates[9] - 10.0).abs() < 1e-6);
        assert!(rates.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn the_dispatcher_fires_every_stream_in_time_order_and_never_early() {
        let start = Instant::now() + Duration::from_millis(5);
        let streams: Vec<Schedule> = (0..3)
            .map(|k| Schedule::interleaved(3000.0, k, 3))
            .collect();
        let to = start + Duration::from_millis(30);
        let from = start + Duration::from_millis(10);
        let mut fired = Vec::new();
        let lag = dispatch(&streams, start, to, from, |k, due| {
            assert!(Instant::now() >= due, "fired early");
            fired.push((k, due));
        });
        assert_eq!(fired.len(), 90, "3000 req/s for 30 ms");
        assert!(fired.windows(2).all(|w| w[0].1 < w[1].1), "in time order");
        assert_eq!(fired.iter().filter(|(k, _)| *k == 1).count(), 30);
        assert_eq!(
            fired.iter().take(3).map(|f| f.0).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(lag.len(), 60, "lag is recorded inside the window only");
    }

    #[test]
    fn poisson_arrivals_keep_the_mean_rate_in_order_and_repeat_with_the_seed() {
        let start = Instant::now();
        let times: Vec<Instant> = poisson(1000.0, start, 9).take(20_001).collect();
        assert_eq!(times[0], start);
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "in time order");
        let mean = (times[20_000] - start).as_secs_f64() / 20_000.0;
        assert!((mean - 1e-3).abs() < 0.05e-3, "mean gap {mean}");
        // Exponential gaps: about e^-1 of them exceed the mean, unlike even ones.
        let long = times
            .windows(2)
            .filter(|w| (w[1] - w[0]).as_secs_f64() > 1e-3)
            .count() as f64
            / 20_000.0;
        assert!((long - (-1.0f64).exp()).abs() < 0.02, "{long}");
        let again: Vec<Instant> = poisson(1000.0, start, 9).take(20_001).collect();
        assert_eq!(times, again);
    }

    #[test]
    fn errors_add_up_by_kind() {
        let mut e = Errors::default();
        for f in [
            Failure::Connect,
            Failure::Timeout,
            Failure::Reset,
            Failure::Reset,
        ] {
            e.count(f);
        }
        assert_eq!((e.connect, e.timeout, e.reset, e.total()), (1, 1, 2, 4));
        assert_eq!(
            Failure::from(io::Error::from(io::ErrorKind::ConnectionReset)),
            Failure::Reset
        );
        assert_eq!(
            Failure::from(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Failure::Reset
        );
    }
}
