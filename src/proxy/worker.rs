//! A proxy worker: for each connection the master hands over, it takes a backend from the
//! shared [`Board`] (waiting in the bounded queue when every backend is at its cap),
//! connects within `--connect-timeout` (trying the other backends if one refuses, and
//! marking it down until a health check finds it back), writes a PROXY v2 header if asked,
//! and relays both ways until both ends are done. A client that cannot be served is closed
//! (FIN) and counted by reason; nothing waits without a deadline. A relay that moves no byte
//! for `--idle-timeout` is closed both ways and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::board::{Board, Pick};
use super::relay::{self, PipePool, Side};
use super::{proxy_protocol, ProxyConfig};
use crate::sys::shm::Mapping;
use crate::{BoxError, Connection, Incoming, Peer, Stream};

/// How often a queued connection looks at the board again for a slot freed in another
/// worker (one freed in this worker wakes it at once).
const QUEUE_POLL: Duration = Duration::from_millis(2);

/// How long an unserved client's bytes are read and dropped after its FIN, so that its
/// close is a clean one (unread bytes would make it a reset), and how many at most.
const UNSERVED_DRAIN: Duration = Duration::from_secs(1);
const UNSERVED_DRAIN_BYTES: usize = 256 * 1024;

/// Empty pipes each worker keeps for reuse.
const PIPES_KEPT: usize = 256;

/// Why a client was closed without being relayed (the `reason` label of
/// `proxy_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No backend is up.
    NoBackend,
    /// Every backend is at its cap and the queue is full.
    QueueFull,
    /// It waited in the queue for `--queue-timeout`.
    QueueTimeout,
    /// No backend could be reached within `--connect-timeout`.
    ConnectFailed,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::NoBackend,
        Refusal::QueueFull,
        Refusal::QueueTimeout,
        Refusal::ConnectFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::NoBackend => "no_backend",
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::ConnectFailed => "connect_failed",
        }
    }
}

/// What a worker counts, through its `metrics` recorder (added up across the cluster in
/// the master's status and at `--metrics`).
struct Figures {
    connections: Vec<metrics::Counter>,
    connect_errors: Vec<metrics::Counter>,
    /// This worker's connections in flight per backend: summed over the workers by the
    /// master, the cluster's.
    in_flight: Vec<metrics::Gauge>,
    refused: Vec<metrics::Counter>,
    to_backend: metrics::Counter,
    to_client: metrics::Counter,
    /// Relays closed for moving no byte for `--idle-timeout`.
    idle_timeouts: metrics::Counter,
    /// This worker's connections waiting in the queue (summed: the cluster's).
    queued: metrics::Gauge,
}

impl Figures {
    fn new(backends: &[SocketAddr]) -> Figures {
        let per_backend = |name: &'static str| -> Vec<metrics::Counter> {
            backends
                .iter()
                .map(|b| metrics::counter!(name, "backend" => b.to_string()))
                .collect()
        };
        Figures {
            connections: per_backend("proxy_connections_total"),
            connect_errors: per_backend("proxy_connect_errors_total"),
            in_flight: backends
                .iter()
                .map(|b| metrics::gauge!("proxy_in_flight", "backend" => b.to_string()))
                .collect(),
            refused: Refusal::ALL
                .iter()
                .map(|r| metrics::counter!("proxy_refused_total", "reason" => r.label()))
                .collect(),
            to_backend: metrics::counter!("proxy_bytes_total", "direction" => "to_backend"),
            to_client: metrics::counter!("proxy_bytes_total", "direction" => "to_client"),
            idle_timeouts: metrics::counter!("proxy_idle_timeouts_total"),
            queued: metrics::gauge!("proxy_queued"),
        }
    }
}

/// A proxy worker's state, shared by its connections.
struct Worker {
    config: Arc<ProxyConfig>,
    board: Arc<Mapping<Board>>,
    /// This worker's row of the board.
    row: usize,
    pipes: PipePool,
    /// Woken when a connection of this worker releases its backend.
    freed: Notify,
    figures: Figures,
}

/// A backend taken for one connection: released (and a queued connection woken) on drop.
struct Lease<'a> {
    worker: &'a Worker,
    backend: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let worker = self.worker;
        worker.board().release(worker.row, self.backend);
        worker.show_in_flight(self.backend);
        worker.freed.notify_one();
    }
}

/// A place in the queue, given back on drop.
struct Queued<'a>(&'a Worker);

impl<'a> Queued<'a> {
    fn new(worker: &'a Worker) -> Self {
        worker.figures.queued.increment(1.0);
        Queued(worker)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let queued = &self.0.board().queued;
        queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.figures.queued.decrement(1.0);
    }
}

/// Serves every connection the master hands over with `config`, counting them on `board`,
/// until the worker drains.
pub async fn serve(
    mut incoming: Incoming,
    config: Arc<ProxyConfig>,
    board: Mapping<Board>,
) -> Result<(), BoxError> {
    let pid = std::process::id();
    let row = board
        .region()
        .claim_row(pid, crate::sys::process::is_alive)
        .ok_or("every row of the proxy board is held by a live worker")?;
    let worker = Arc::new(Worker {
        pipes: PipePool::new(PIPES_KEPT, config.pipe_size),
        figures: Figures::new(&config.backends),
        config,
        board: Arc::new(board),
        row,
        freed: Notify::new(),
    });
    while let Some(conn) = incoming.accept().await {
        let worker = worker.clone();
        tokio::spawn(async move { worker.proxy(conn).await });
    }
    Ok(())
}

impl Worker {
    fn board(&self) -> &Board {
        self.board.region()
    }

    fn show_in_flight(&self, backend: usize) {
        let mine = self.board().row_in_flight(self.row, backend);
        self.figures.in_flight[backend].set(f64::from(mine));
    }

    /// One client connection, from the choice of its backend to the end of the relay.
    async fn proxy(&self, conn: Connection) {
        let backend = match self.connect().await {
            Ok(connected) => connected,
            Err(refusal) => {
                self.figures.refused[refusal as usize].increment(1);
                tracing::debug!(reason = refusal.label(), "client closed unserved");
                close_unserved(conn).await;
                return;
            }
        };
        let (lease, stream) = backend;
        let _ = stream.set_nodelay(true);
        let client = match conn.stream() {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                Side::Tcp(s)
            }
            Stream::Unix(s) => Side::Unix(s),
        };
        let server = Side::Tcp(&stream);
        if self.config.proxy_protocol {
            let client_addr = match conn.peer() {
                Peer::Ip(addr) => Some(addr),
                Peer::Unix => None,
            };
            let local = match conn.stream() {
                Stream::Tcp(s) => s.local_addr().ok(),
                Stream::Unix(_) => None,
            };
            let header = proxy_protocol::header(client_addr, local);
            if let Err(e) = server.write_all(&header).await {
                tracing::debug!(error = %e, "writing the PROXY header failed");
                return;
            }
        }
        let config = &self.config;
        match relay::relay(
            client,
            server,
            config.relay,
            &self.pipes,
            config.idle_timeout,
        )
        .await
        {
            Ok(relayed) => {
                self.figures.to_backend.increment(relayed.to_backend);
                self.figures.to_client.increment(relayed.to_client);
                if relayed.idle_timeout {
                    self.figures.idle_timeouts.increment(1);
                    tracing::debug!("relay idle for --idle-timeout: closed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "relay ended with an error"),
        }
        drop(lease);
    }

    /// A backend taken and connected to, within `--connect-timeout` from now: a backend
    /// that refuses or does not answer is marked down and the next one tried.
    async fn connect(&self) -> Result<(Lease<'_>, TcpStream), Refusal> {
        let mut excluded = 0u64;
        let mut lease = self.acquire(excluded).await?;
        let deadline = Instant::now() + self.config.connect_timeout;
        loop {
            let index = lease.backend;
            let addr = self.config.backends[index];
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    self.figures.connections[index].increment(1);
                    return Ok((lease, stream));
                }
                Ok(Err(e)) => tracing::debug!(backend = %addr, error = %e, "connect failed"),
                Err(_) => tracing::debug!(backend = %addr, "connect timed out"),
            }
            self.figures.connect_errors[index].increment(1);
            if self.board().set_up(index, false) {
                tracing::warn!(backend = %addr, "backend down: a connection to it failed");
            }
            drop(lease);
            excluded |= 1 << index;
            if Instant::now() >= deadline {
                return Err(Refusal::ConnectFailed);
            }
            lease =
                match self
                    .board()
                    .pick(self.row, self.config.balance, self.config.cap(), excluded)
                {
                    Pick::Backend(backend) => self.leased(backend),
                    Pick::Full | Pick::NoneUp => return Err(Refusal::ConnectFailed),
                };
        }
    }

    fn leased(&self, backend: usize) -> Lease<'_> {
        self.show_in_flight(backend);
        Lease {
            worker: self,
            backend,
        }
    }

    /// A backend for a new connection: at once, or after waiting in the queue while every
    /// backend that is up is at `--max-conns-per-backend`.
    async fn acquire(&self, excluded: u64) -> Result<Lease<'_>, Refusal> {
        let config = &self.config;
        match self
            .board()
            .pick(self.row, config.balance, config.cap(), excluded)
        {
            Pick::Backend(backend) => return Ok(self.leased(backend)),
            Pick::NoneUp => return Err(Refusal::NoBackend),
            Pick::Full => {}
        }
        let queued = &self.board().queued;
        let place = queued.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _place = Queued::new(self);
        if place >= config.queue {
            return Err(Refusal::QueueFull);
        }
        let deadline = Instant::now() + config.queue_timeout;
        loop {
            tokio::select! {
                () = self.freed.notified() => {}
                () = tokio::time::sleep(QUEUE_POLL) => {}
                () = tokio::time::sleep_until(deadline) => return Err(Refusal::QueueTimeout),
            }
            match self
                .board()
                .pick(self.row, config.balance, config.cap(), excluded)
            {
                Pick::Backend(backend) => return Ok(self.leased(backend)),
                Pick::NoneUp => return Err(Refusal::NoBackend),
                Pick::Full => {}
            }
        }
    }
}

/// Closes a client that cannot be served: FIN at once, then what it still sends is read
/// and dropped until its own end of stream (bounded in time and bytes), so the close is
/// clean rather than a reset.
async fn close_unserved(mut conn: Connection) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = conn.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 8192];
        let mut read = 0;
        while read < UNSERVED_DRAIN_BYTES {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(UNSERVED_DRAIN, drain).await;
}
