//! The worker runtime: runs in each worker process. It takes the channel the master left at
//! fd 3, tells the master when the user's code is ready, turns each received fd into a
//! [`Connection`], acknowledges receipt, reports finished connections (the load the master
//! balances on) and a heartbeat, and drains on the master's word or on SIGTERM.

#[cfg(feature = "axum")]
mod axum;
mod connection;
#[cfg(feature = "hyper")]
pub mod http1;
mod linger;
mod own;
mod post;
mod recorder;
mod state;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

pub use connection::{Connection, HandBackError, HandBackFailure, Stream};
use own::OwnListeners;
use post::WorkerPost;
pub use post::{Inbox, Messenger, Origin, Received};

use crate::ipc::channel::frame_buffer;
use crate::ipc::frame::{self, Frame, Status};
use crate::ipc::{Channel, ChannelError};
use crate::supervise::{ENV_DRAIN_MS, ENV_FD, ENV_HEARTBEAT_MS, ENV_LISTEN, ENV_WORKER};
use crate::sys;
use crate::sys::shm::Counters;
use crate::sys::socket::Peer;

/// An error a worker's own code may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// `HANDOFF_FD` is missing or not a number.
    #[error("{ENV_FD} is not set to a file descriptor number: this process was not started by a handoff master")]
    NoChannel,
    /// The inherited fd is not a usable channel.
    #[error("taking the channel fd failed")]
    TakeChannel(#[source] std::io::Error),
    /// The tokio runtime could not be built.
    #[error("building the tokio runtime failed")]
    Runtime(#[source] std::io::Error),
    /// Talking to the master failed or the master broke the protocol.
    #[error("the channel to the master failed")]
    Channel(#[source] ChannelError),
    /// The user's service returned an error.
    #[error("the worker's service failed")]
    Service(#[source] BoxError),
}

/// Names this process after its program (`argv[0]`'s file name) in `ps`, `top` and
/// `pgrep`: the master starts it from an fd (`/proc/self/fd/N`), which the kernel would
/// otherwise show as "N". Call on the main thread.
pub(crate) fn take_program_name() {
    let arg0 = std::env::args_os().next().unwrap_or_default();
    if let Some(name) = std::path::Path::new(&arg0).file_name() {
        let _ = sys::process::set_thread_name(name);
    }
}

/// Whether this process was started by a handoff master as a worker.
pub fn is_worker() -> bool {
    std::env::var_os(ENV_FD).is_some()
}

/// State shared by the accept side, the connections and the reporter task.
#[derive(Debug)]
pub(crate) struct Shared {
    channel: Arc<Channel>,
    /// Messages: the inbox, requests waiting for replies.
    post: Arc<WorkerPost>,
    counts: Counts,
    active: AtomicU64,
    report: Notify,
    /// Report every finished connection at once (the master balances on it); off in the
    /// kernel modes, where the master only keeps statistics and the heartbeat suffices.
    eager_reports: std::sync::atomic::AtomicBool,
    idle: Notify,
    drain: watch::Sender<bool>,
    failure: Mutex<Option<ChannelError>>,
    /// The figures of the last status sent, by whichever path.
    last_sent: Mutex<Option<Status>>,
    /// Held while a DRAINING frame is being sent.
    announcing: tokio::sync::Mutex<()>,
    /// READY was sent: the master may count on this worker.
    ready: std::sync::atomic::AtomicBool,
    /// Finished connections whose fds close a little later.
    lingering: linger::Lingering,
    /// `kernel-least`: this slot's count in the kernel's load array, less 1 per finished
    /// connection (the program added 1 when it picked this slot).
    load: std::sync::OnceLock<LoadWord>,
    /// The shared map, and its feed when the master holds it (SYNC and ANSWER frames).
    state: crate::state::SharedMap,
    feed: Option<Arc<state::MasterBackend>>,
}

/// One 64-bit word of a mapped load array (`kernel-least`).
#[derive(Debug)]
struct LoadWord {
    mapped: sys::bpf::MappedArray,
    word: usize,
}

impl Shared {
    fn new(
        channel: Arc<Channel>,
        counts: Counts,
        drain: watch::Sender<bool>,
        (state, feed): (crate::state::SharedMap, Option<Arc<state::MasterBackend>>),
    ) -> Self {
        Shared {
            state,
            feed,
            post: Arc::new(WorkerPost::new(channel.clone())),
            channel,
            counts,
            active: AtomicU64::new(0),
            report: Notify::new(),
            eager_reports: std::sync::atomic::AtomicBool::new(true),
            idle: Notify::new(),
            drain,
            failure: Mutex::new(None),
            last_sent: Mutex::new(None),
            announcing: tokio::sync::Mutex::new(()),
            ready: std::sync::atomic::AtomicBool::new(false),
            lingering: linger::Lingering::default(),
            load: std::sync::OnceLock::new(),
        }
    }

    fn status(&self) -> Status {
        // Load closed before received: a report must never show more finished than received.
        let closed_total = self.counts.closed().load(Ordering::SeqCst);
        Status {
            received_total: self.counts.received().load(Ordering::SeqCst),
            closed_total,
        }
    }

    /// Sends the current status now, or fails with `WouldBlock`. The snapshot is taken right
    /// before the send, with no await between, so reports leave in the order of their
    /// figures (never a smaller count after a larger one).
    fn try_send_status(&self) -> std::io::Result<()> {
        self.try_send_report(&frame::encode_status)
    }

    /// Like [`Shared::try_send_status`], as the frame `encode` writes (STATUS, DRAINING or
    /// REFUSED).
    fn try_send_report(
        &self,
        encode: &(dyn Fn(&mut Vec<u8>, Status) + Sync),
    ) -> std::io::Result<()> {
        let status = self.status();
        let mut bytes = Vec::with_capacity(frame::HEADER_LEN + frame::STATUS_BODY_LEN);
        encode(&mut bytes, status);
        self.channel.try_send(&bytes, &[])?;
        *self.last_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        Ok(())
    }

    /// Sends the current figures as the frame `encode` writes, waiting while the channel is
    /// full; the figures are read when the send can happen, so they are never older than
    /// what was already sent.
    async fn send_report(
        &self,
        encode: &(dyn Fn(&mut Vec<u8>, Status) + Sync),
    ) -> std::io::Result<()> {
        loop {
            let mut guard = self.channel.writable().await?;
            match guard.try_io(|_| self.try_send_report(encode)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends the current status, waiting while the channel is full.
    async fn send_status(&self) -> std::io::Result<()> {
        self.send_report(&frame::encode_status).await
    }

    /// Starts draining on this worker's own initiative (SIGTERM, or the service returned)
    /// and tells the master with a DRAINING frame, whose figures say which connections are
    /// this worker's: the flag is set first, so nothing received after it is taken. A no-op
    /// when already draining (the master asked, or the channel failed).
    async fn announce_draining(&self) {
        // A second caller waits until the first one's frame is out (the runtime must not
        // end with it unsent).
        let _one_at_a_time = self.announcing.lock().await;
        if self.drain.send_replace(true) {
            return;
        }
        if let Err(e) = self.send_report(&frame::encode_draining).await {
            self.fail(ChannelError::Io(e));
        }
    }

    /// Whether the master already has the current figures.
    fn reported(&self) -> bool {
        *self.last_sent.lock().unwrap_or_else(|e| e.into_inner()) == Some(self.status())
    }

    pub(crate) fn connection_finished(&self) {
        self.counts.closed().fetch_add(1, Ordering::SeqCst);
        if let Some(load) = self.load.get() {
            load.mapped.words()[load.word].fetch_sub(1, Ordering::SeqCst);
        }
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
        if self.eager_reports.load(Ordering::Relaxed) {
            self.report.notify_one();
        }
    }

    /// Maps the load array of a LOADS frame (`kernel-least`), before any connection.
    fn map_loads(
        &self,
        fds: &[std::os::fd::OwnedFd],
        word: u32,
        value_len: u32,
    ) -> std::io::Result<()> {
        let fd = fds
            .first()
            .ok_or_else(|| std::io::Error::other("a loads frame without its fd"))?;
        let mapped = sys::bpf::MappedArray::map(fd, value_len as usize)?;
        let word = word as usize;
        if word >= mapped.words().len() {
            return Err(std::io::Error::other(
                "a loads frame's word lies outside its value",
            ));
        }
        let _ = self.load.set(LoadWord { mapped, word });
        Ok(())
    }

    fn fail(&self, error: ChannelError) {
        if let Some(feed) = &self.feed {
            feed.close();
        }
        if !error.is_closed() {
            tracing::error!(error = %error, source = ?std::error::Error::source(&error), "worker channel failed");
            self.failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(error);
        }
        self.drain.send_replace(true);
    }
}

/// The shared map [`crate::state::ENV_STATE`] names, and its feed when the master holds it.
/// With Redis it connects first (bounded; if Redis is down the map keeps trying in the
/// background, see `state::redis::start`).
async fn shared_map(
    channel: &Arc<Channel>,
    limits: crate::state::StateLimits,
) -> (crate::state::SharedMap, Option<Arc<state::MasterBackend>>) {
    use crate::state::{Choice, SharedMap, Unavailable};
    match Choice::from_env() {
        Choice::Master => {
            let feed = Arc::new(state::MasterBackend::new(channel.clone()));
            (SharedMap::new(feed.clone()), Some(feed))
        }
        #[cfg(feature = "redis")]
        Choice::Redis(url) => (
            SharedMap::new(crate::state::redis::start(&url, limits).await),
            None,
        ),
        #[cfg(not(feature = "redis"))]
        Choice::Redis(url) => {
            let _ = limits;
            let why = format!("{url}: this build has no Redis backend (cargo feature `redis`)");
            tracing::error!(reason = %why, "shared state unavailable");
            (SharedMap::new(Arc::new(Unavailable::new(why))), None)
        }
        Choice::Invalid(why) => {
            tracing::error!(reason = %why, "shared state unavailable");
            (SharedMap::new(Arc::new(Unavailable::new(why))), None)
        }
    }
}

/// A signal that the worker should stop taking work: the master closed the channel, SIGTERM
/// arrived, or the channel failed. Clone it into connection tasks to shut down keep-alive
/// connections gracefully.
#[derive(Debug, Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
}

impl Drain {
    /// Completes once draining has begun.
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|draining| *draining).await;
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

/// The connections the master hands to this worker.
#[derive(Debug)]
pub struct Incoming {
    shared: Arc<Shared>,
    queue: VecDeque<Connection>,
    buf: Vec<u8>,
    ready_sent: bool,
    own: OwnListeners,
    drain: Drain,
    /// Frames read while the snapshot of the shared map came in, to apply first.
    early: VecDeque<state::Early>,
}

impl Incoming {
    /// The next connection, or `None` once the worker is draining. The first call tells the
    /// master this worker is ready, so do initialisation before it.
    pub async fn accept(&mut self) -> Option<Connection> {
        if !self.ready_sent {
            self.ready_sent = true;
            self.shared.ready.store(true, Ordering::Release);
            let mut bytes = Vec::with_capacity(frame::HEADER_LEN);
            frame::encode_ready(&mut bytes);
            if let Err(e) = self.shared.channel.send(&bytes, &[]).await {
                self.shared.fail(e.into());
            }
        }
        loop {
            if let Some(conn) = self.queue.pop_front() {
                return Some(conn);
            }
            if self.drain.is_draining() {
                return None;
            }
            if let Some(early) = self.early.pop_front() {
                self.take_frame(early).await;
                continue;
            }
            let Incoming {
                shared,
                buf,
                own,
                drain,
                ..
            } = self;
            let received = tokio::select! {
                biased;
                _ = drain.wait() => return None,
                received = shared.channel.recv_frame(buf) => received,
                accepted = own.accept(), if !own.is_empty() => {
                    if let Some(conn) = own.connection(accepted, shared).await {
                        return Some(conn);
                    }
                    continue;
                }
            };
            self.take_frame(received).await;
        }
    }

    /// Applies a frame from the master: connections (acknowledged before the service sees
    /// them), the load array, listeners; anything else fails the channel.
    async fn take_frame(
        &mut self,
        received: Result<(Frame, Vec<std::os::fd::OwnedFd>), ChannelError>,
    ) {
        match received {
            Ok((Frame::Connections(_), fds)) if self.drain.is_draining() => {
                // Sent before the master read our DRAINING frame, which did not count
                // them: it hands them to another worker.
                drop(fds);
            }
            Ok((Frame::HandBack { .. }, fds)) if self.drain.is_draining() => drop(fds),
            Ok((frame @ (Frame::Connections(_) | Frame::HandBack { .. }), fds)) => {
                let (headers, prefix) = match frame {
                    Frame::Connections(headers) => (headers, Vec::new()),
                    Frame::HandBack { entry, bytes } => (vec![entry], bytes),
                    _ => unreachable!("matched above"),
                };
                let refused = headers.len() - fds.len();
                self.shared.counts.refuse(refused as u64);
                self.take(headers, fds, prefix);
                // Acknowledge before the service sees any of them: a handler that keeps
                // this thread busy must not hold the ack back, or the master would hand
                // a connection this worker may already have read to another one.
                // Counted in shared memory, they are acknowledged already: a frame goes
                // only to a master that asked for one.
                let acknowledged = if refused == 0 {
                    if self.shared.counts.frame_wanted() {
                        self.shared.send_status().await
                    } else {
                        Ok(())
                    }
                } else {
                    // Our fd table is full: the kernel dropped the last fds. The master
                    // still holds them and gives them to another worker; the fds of
                    // finished connections close now, to make room.
                    self.shared.lingering.close_all();
                    tracing::debug!(
                        refused,
                        active = self.shared.active.load(Ordering::Acquire),
                        "out of file descriptors: refusing connections"
                    );
                    let count = refused as u16;
                    let encode =
                        move |out: &mut Vec<u8>, status| frame::encode_refused(out, status, count);
                    self.shared.send_report(&encode).await
                };
                if let Err(e) = acknowledged {
                    self.shared.fail(e.into());
                }
            }
            Ok((Frame::Loads { word, value_len }, fds)) => {
                if let Err(e) = self.shared.map_loads(&fds, word, value_len) {
                    self.shared.fail(ChannelError::Io(e));
                }
            }
            Ok((Frame::Message(message), _)) => self.shared.post.deliver(message),
            Ok((Frame::Sync(sync), _)) => {
                let Some(feed) = &self.shared.feed else {
                    return; // Not subscribed: nothing to keep current.
                };
                if feed.on_sync(sync) {
                    if let Err(e) = feed.send_subscribe().await {
                        self.shared.fail(e.into());
                    }
                }
            }
            Ok((Frame::Answer(answer), _)) => {
                if let Some(feed) = &self.shared.feed {
                    feed.on_answer(answer);
                }
            }
            Ok((Frame::Listeners(headers), fds)) => {
                self.shared.eager_reports.store(false, Ordering::Relaxed);
                if let Err(e) = self.own.install(headers, fds) {
                    self.shared.fail(ChannelError::Io(e));
                }
            }
            Ok((other, _)) => self.shared.fail(ChannelError::Unexpected(other.name())),
            Err(e) => self.shared.fail(e),
        }
    }

    /// A handle that sends messages of type `M` to the master and, through it, to the
    /// other workers. Messages to this worker arrive while [`Incoming::accept`] is being
    /// called (as `axum::serve` does).
    pub fn messenger<M: serde::Serialize>(&self) -> Messenger<M> {
        Messenger::new(self.shared.post.clone())
    }

    /// The messages of type `M` the master and other workers send this worker: the first
    /// call takes the inbox, later calls get `None`. Until it is taken, messages to this
    /// worker are dropped (and counted).
    pub fn inbox<M: serde::de::DeserializeOwned>(&self) -> Option<Inbox<M>> {
        Inbox::claim(&self.shared.post)
    }

    /// The cluster's shared map (see [`crate::state`]): reads from this worker's replica,
    /// writes through the backend `HANDOFF_STATE` names (the master by default). With the
    /// master's backend, the replica is updated while [`Incoming::accept`] is being called
    /// (as `axum::serve` does), and a write resolves once this replica shows it.
    pub fn state(&self) -> crate::state::SharedMap {
        self.shared.state.clone()
    }

    /// A handle that completes when this worker starts draining.
    pub fn drain_signal(&self) -> Drain {
        self.drain.clone()
    }

    /// A future that completes when this worker starts draining: what a server's graceful
    /// shutdown waits for (`axum::serve(incoming, app).with_graceful_shutdown(signal)`,
    /// hyper-util's `GracefulShutdown`).
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut drain = self.drain.clone();
        async move { drain.wait().await }
    }

    /// The first of the master's listening addresses, in `--listen` order, as bound (port 0
    /// resolved): `Peer::Unix` for a unix listener.
    pub fn local_addr(&self) -> std::io::Result<Peer> {
        let listening = std::env::var(ENV_LISTEN).unwrap_or_default();
        let first = listening.split(',').next().unwrap_or_default();
        if first.starts_with("unix:") {
            return Ok(Peer::Unix);
        }
        first.parse().map(Peer::Ip).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{ENV_LISTEN} names no listening address ({listening:?})"),
            )
        })
    }

    /// Takes the connections whose fds arrived (the first `fds.len()` of `headers`).
    /// A HANDBACK frame's connection brings `prefix`, the bytes another worker read from it.
    fn take(
        &mut self,
        headers: Vec<crate::ipc::ConnectionHeader>,
        fds: Vec<std::os::fd::OwnedFd>,
        mut prefix: Vec<u8>,
    ) {
        // Counted first: a connection that fails below counts as finished too, and the
        // master may read the totals at any moment (never more finished than received).
        self.shared
            .counts
            .received()
            .fetch_add(fds.len() as u64, Ordering::SeqCst);
        for (header, fd) in headers.into_iter().zip(fds) {
            match Connection::new(header, fd, &self.shared) {
                Ok(conn) if !prefix.is_empty() => self
                    .queue
                    .push_back(conn.with_prefix(std::mem::take(&mut prefix))),
                Ok(conn) => self.queue.push_back(conn),
                Err(e) => {
                    tracing::warn!(id = header.id, error = %e, "dropping a connection that cannot be registered");
                    // Count it as received and finished so the master's load stays right.
                    self.shared.active.fetch_add(1, Ordering::AcqRel);
                    self.shared.connection_finished();
                }
            }
        }
    }
}

fn env_duration(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(default)
}

/// Runs this process as a worker: `serve` gets the [`Incoming`] connections. When `serve`
/// returns, or the worker drains, the runtime waits for live connections to finish (up to
/// the master's drain timeout), sends a last report and returns. `threads` is the size of
/// its tokio runtime: 1 is a current-thread runtime, more a multi-threaded one. `limits`
/// bound the shared map when it lives on Redis (the master enforces its own otherwise).
pub fn run<F, Fut>(
    serve: F,
    threads: usize,
    limits: crate::state::StateLimits,
) -> Result<(), WorkerError>
where
    F: FnOnce(Incoming) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let fd = std::env::var(ENV_FD)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(WorkerError::NoChannel)?;
    // A worker's connections are its fds: take all the kernel allows (the soft limit is
    // often 1024 where the hard one is far higher).
    let _ = sys::process::raise_fd_limit();
    // Every line this worker logs names it: its slot and pid.
    let slot = std::env::var(ENV_WORKER).unwrap_or_default();
    let span = tracing::info_span!("worker", slot = %slot, pid = std::process::id());
    let runtime = runtime(threads, &span).map_err(WorkerError::Runtime)?;
    let _entered = span.enter();
    runtime.block_on(work(fd, serve, limits))
}

/// The worker's tokio runtime; every thread it starts logs inside `span`.
fn runtime(threads: usize, span: &tracing::Span) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        // Everything is polled on this thread, inside the span `run` enters.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let span = span.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .on_thread_start(move || {
            // Entered for the thread's whole life: the guard is never dropped.
            std::mem::forget(span.clone().entered());
        })
        .build()
}

/// The worker's life on its runtime: take the channel, serve, drain, report last.
async fn work<F, Fut>(
    fd: std::os::fd::RawFd,
    serve: F,
    limits: crate::state::StateLimits,
) -> Result<(), WorkerError>
where
    F: FnOnce(Incoming) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let channel = sys::process::inherited_channel(fd).map_err(WorkerError::TakeChannel)?;
    let channel = Channel::new(channel).map_err(WorkerError::TakeChannel)?;
    let counts = Counts::share(&channel).await;
    let samples = recorder::install(&channel).await;
    let (drain_tx, drain_rx) = watch::channel(false);
    let channel = Arc::new(channel);
    let map = shared_map(&channel, limits).await;
    let shared = Arc::new(Shared::new(channel, counts, drain_tx, map));
    let sampler = samples.clone().map(|samples| {
        let channel = shared.channel.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(recorder::SAMPLE_PERIOD);
            loop {
                every.tick().await;
                if samples.flush(&channel).await.is_err() {
                    return;
                }
            }
        })
    });
    let heartbeat = env_duration(ENV_HEARTBEAT_MS, Duration::from_secs(1));
    let reporter = tokio::spawn(report(shared.clone(), heartbeat));
    let closer = {
        let shared = shared.clone();
        tokio::spawn(async move { shared.lingering.run().await })
    };
    tokio::spawn(drain_on_sigterm(shared.clone()));

    // The shared map's snapshot before the service starts: it says READY with it.
    let mut buf = frame_buffer();
    let mut early = VecDeque::new();
    if let Some(feed) = &shared.feed {
        feed.subscribe(&mut buf, &mut early, state::SUBSCRIBE_TIMEOUT)
            .await;
    }
    let incoming = Incoming {
        shared: shared.clone(),
        queue: VecDeque::new(),
        buf,
        ready_sent: false,
        own: OwnListeners::default(),
        drain: Drain { rx: drain_rx },
        early,
    };
    let served = serve(incoming).await;
    if served.is_ok() && shared.ready.load(Ordering::Acquire) {
        // The service is done on its own: a clean handover.
        shared.announce_draining().await;
    } else {
        // Failed (or never ready): no DRAINING, the exit tells the master, which counts
        // it as a failure and backs off.
        shared.drain.send_replace(true);
    }
    wait_idle(&shared, env_duration(ENV_DRAIN_MS, Duration::from_secs(30))).await;
    reporter.abort();
    closer.abort();
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    if let Some(samples) = samples {
        let _ = samples.flush(&shared.channel).await;
    }
    shared.lingering.close_all();
    let _ = shared.try_send_status();

    served.map_err(WorkerError::Service)?;
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    failure.map_or(Ok(()), |error| Err(WorkerError::Channel(error)))
}

/// Waits until no connection is live, at most `timeout`.
async fn wait_idle(shared: &Shared, timeout: Duration) {
    let idle = async {
        loop {
            let notified = shared.idle.notified();
            if shared.active.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(timeout, idle).await.is_err() {
        tracing::warn!(
            active = shared.active.load(Ordering::Acquire),
            "drain timed out"
        );
    }
}

/// Environment variable: `0` makes a Rust worker report by STATUS frames instead of shared
/// counters (to compare the two, or where memfds are not allowed).
pub const ENV_SHARED_COUNTERS: &str = "HANDOFF_SHARED_COUNTERS";

/// Where a worker counts the connections it received and finished.
#[derive(Debug)]
enum Counts {
    /// In memory the master maps too (`sys::shm`): it reads them when it chooses.
    Shared(Counters),
    /// Its own: every change goes to the master in a STATUS frame.
    Own {
        received: AtomicU64,
        closed: AtomicU64,
    },
}

impl Counts {
    /// Counters in shared memory, their fd sent to the master in a COUNTERS frame (before
    /// READY, so before any connection); its own counters if either step fails.
    async fn share(channel: &Channel) -> Counts {
        let shared = async {
            if std::env::var_os(ENV_SHARED_COUNTERS).is_some_and(|v| v == "0") {
                return Err(std::io::Error::other(format!("{ENV_SHARED_COUNTERS}=0")));
            }
            let counters = Counters::create()?;
            let mut bytes = Vec::new();
            frame::encode_counters(&mut bytes);
            let fd = counters.fd().expect("a new region has its fd");
            channel.send(&bytes, &[fd]).await?;
            Ok::<_, std::io::Error>(counters)
        };
        match shared.await {
            Ok(counters) => Counts::Shared(counters),
            Err(e) => {
                tracing::debug!(error = %e, "counting in frames: no shared counters");
                Counts::Own {
                    received: AtomicU64::new(0),
                    closed: AtomicU64::new(0),
                }
            }
        }
    }

    fn received(&self) -> &AtomicU64 {
        match self {
            Counts::Shared(counters) => &counters.region().received,
            Counts::Own { received, .. } => received,
        }
    }

    fn closed(&self) -> &AtomicU64 {
        match self {
            Counts::Shared(counters) => &counters.region().closed,
            Counts::Own { closed, .. } => closed,
        }
    }

    /// Counts `count` refused connections, before the received ones of the same frame.
    fn refuse(&self, count: u64) {
        if let (Counts::Shared(counters), 1..) = (self, count) {
            counters.region().refused.fetch_add(count, Ordering::SeqCst);
        }
    }

    /// Whether a change should go to the master in a frame now: always when it cannot read
    /// the counters, and when it asked for one (it waits for this worker's progress).
    fn frame_wanted(&self) -> bool {
        match self {
            Counts::Shared(counters) => counters.region().wake.0.swap(0, Ordering::SeqCst) == 1,
            Counts::Own { .. } => true,
        }
    }
}

/// Sends a status report when something changed, and at least every `heartbeat`. Closes
/// are reported at once (after one yield, so that those of the same scheduler turn share a
/// frame): holding them back for the next acknowledgement saved master wake-ups but made
/// least-loaded, seeing staler loads, measurably less even (docs/benchmarks.md).
async fn report(shared: Arc<Shared>, heartbeat: Duration) {
    loop {
        let changed = tokio::time::timeout(heartbeat, shared.report.notified())
            .await
            .is_ok();
        if changed {
            tokio::task::yield_now().await;
            if shared.reported() || !shared.counts.frame_wanted() {
                continue;
            }
        }
        if let Err(e) = shared.send_status().await {
            return shared.fail(e.into());
        }
    }
}

/// Drains on SIGTERM, SIGINT or SIGQUIT, as the master does; other signals a user may send
/// by habit (SIGUSR1, ...) are logged and ignored instead of killing the worker.
async fn drain_on_sigterm(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    crate::signals::ignore_stray(crate::signals::Role::Worker);
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.recv() => "SIGQUIT",
    };
    tracing::info!(pid = std::process::id(), signal = name, "draining");
    shared.announce_draining().await;
}
