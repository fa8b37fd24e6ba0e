//! The master process: owns every listening socket, is the only process that accepts, and
//! hands each connection to a worker over its channel. It starts and restarts the workers,
//! reads their acknowledgements and load reports, replaces workers without dropping a
//! connection (recycling limits, SIGHUP rolling restart, hung workers, SIGTTIN/SIGTTOU
//! scaling: see `lifecycle`), and on SIGTERM/SIGINT stops accepting, lets workers finish and
//! exits with none left behind.

mod accept;
mod carry;
mod cluster;
#[cfg(feature = "control")]
mod control;
mod ctx;
mod handler;
mod handover;
#[cfg(feature = "cli")]
pub(crate) mod harness;
mod kernel;
mod lifecycle;
mod link;
#[cfg(feature = "control")]
mod operate;
mod post;
#[cfg(feature = "prometheus")]
mod prometheus;
mod state;
mod systemd;
mod table;
mod upgrade;
mod workers;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::{spawn_local, JoinHandle};

use crate::balance::Strategy;
use crate::config::{Config, ListenAddr};
use crate::supervise::{Launcher, Program, SpawnError};
use crate::sys;
use crate::sys::socket::Peer;
use ctx::{Ctx, Listener};
pub(crate) use handler::MasterHandler;
pub use handler::{FromWorker, Master};
use kernel::Handout;
use link::flush;
use table::Table;

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The tokio runtime could not be built.
    #[error("building the tokio runtime failed")]
    Runtime(#[source] io::Error),
    /// A listener could not be bound.
    #[error("binding {addr} failed")]
    Bind {
        /// The address.
        addr: ListenAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The control socket could not be bound.
    #[error("binding the control socket {path:?} failed")]
    Control {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The worker program cannot be started.
    #[error("the worker program cannot be started")]
    Program(#[source] SpawnError),
    /// The `--metrics` address could not be bound.
    #[error("binding the metrics address {addr} failed")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The sockets of the master this one replaces cannot be used.
    #[error("taking over the sockets of the master being replaced failed")]
    Upgrade(#[source] io::Error),
    /// The sockets systemd passed (`LISTEN_FDS`) cannot be used.
    #[error("taking the sockets systemd passed (LISTEN_FDS) failed")]
    Activation(#[source] io::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers failed")]
    Signals(#[source] io::Error),
    /// `--strategy kernel-least` (or `kernel-p2c`) could not be set up (no CAP_BPF, or the
    /// kernel refused).
    #[error("{0}")]
    KernelLeast(String),
}

/// Runs a master until SIGTERM, SIGINT or SIGQUIT; returns once every worker has exited.
pub fn run(
    mut config: Config,
    program: Program,
    handler: MasterHandler,
) -> Result<(), MasterError> {
    let given = Given::take()?;
    if !given.listeners.is_empty() {
        config.listen = given.listeners.iter().map(|a| a.addr.clone()).collect();
    }
    config.validate().map_err(MasterError::Config)?;
    if matches!(program, Program::Node(_)) && config.strategy.is_kernel() {
        return Err(MasterError::Config(format!(
            "--node takes its connections from the master: {:?} has the workers accept",
            config.strategy
        )));
    }
    let launcher = Launcher::new(program).map_err(MasterError::Program)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MasterError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, master(config, launcher, handler, given))
}

/// Sockets a master gets at its start instead of binding them: from the master it replaces
/// (a live upgrade), or from systemd (socket activation).
#[derive(Debug, Default)]
struct Given {
    listeners: Vec<systemd::Activated>,
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    control: Option<OwnedFd>,
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    metrics: Option<OwnedFd>,
    /// From the master being replaced: where to say when this one is ready.
    handshake: Option<OwnedFd>,
    /// The listeners are systemd's: they stay when this master stops.
    from_systemd: bool,
}

impl Given {
    fn take() -> Result<Given, MasterError> {
        if let Some(inherited) = upgrade::inherited().map_err(MasterError::Upgrade)? {
            tracing::info!("taking over the sockets of the master this one replaces");
            return Ok(Given {
                listeners: inherited.listeners,
                control: inherited.control,
                metrics: inherited.metrics,
                handshake: Some(inherited.handshake),
                from_systemd: false,
            });
        }
        let listeners = systemd::activated().map_err(MasterError::Activation)?;
        if !listeners.is_empty() {
            tracing::info!(
                "listening on the sockets systemd passed (LISTEN_FDS) instead of --listen"
            );
        }
        let from_systemd = !listeners.is_empty();
        Ok(Given {
            listeners,
            from_systemd,
            ..Given::default()
        })
    }
}

/// Binds every listen address: listening sockets, or, for `kernel-reuseport`, bound
/// `SO_REUSEPORT` sockets that only reserve the port. Returns each one's printable address
/// and local address.
fn bind(config: &Config) -> Result<Vec<(String, Peer, OwnedFd)>, MasterError> {
    let reuseport = config.strategy == Strategy::KernelReuseport;
    config
        .listen
        .iter()
        .map(|addr| {
            let bound = match addr {
                ListenAddr::Tcp(socket) if reuseport => sys::socket::tcp_bound(*socket, true),
                ListenAddr::Tcp(socket) => {
                    sys::socket::tcp_listener(*socket, config.backlog, false)
                }
                ListenAddr::Unix(_) if reuseport => {
                    return Err(MasterError::Config(
                        "kernel-reuseport needs TCP listen addresses".into(),
                    ))
                }
                ListenAddr::Unix(path) => sys::socket::unix_listener(path, config.backlog),
            };
            let named = bound.and_then(|fd| {
                Ok(match sys::socket::local_addr(&fd)? {
                    Some(local) => (local.to_string(), Peer::Ip(local), fd),
                    None => (addr.to_string(), Peer::Unix, fd),
                })
            });
            named.map_err(|source| MasterError::Bind {
                addr: addr.clone(),
                source,
            })
        })
        .collect()
}

/// The signals that stop the master: SIGTERM, SIGINT (Ctrl-C) and SIGQUIT (nginx's
/// graceful stop) all drain; a second one kills what is left.
struct StopSignals([(Signal, &'static str); 3]);

impl StopSignals {
    fn install() -> io::Result<StopSignals> {
        Ok(StopSignals([
            (signal(SignalKind::terminate())?, "SIGTERM"),
            (signal(SignalKind::interrupt())?, "SIGINT"),
            (signal(SignalKind::quit())?, "SIGQUIT"),
        ]))
    }

    /// Waits for the next stop signal; returns its name.
    async fn recv(&mut self) -> &'static str {
        let [(term, a), (int, b), (quit, c)] = &mut self.0;
        tokio::select! {
            _ = term.recv() => a,
            _ = int.recv() => b,
            _ = quit.recv() => c,
        }
    }
}

/// Fds the master keeps for itself beyond those it has open once its sockets are bound:
/// control connections (at most 16), and a spawn's scratch (socketpair, exec-error pipe,
/// /dev/null), with room to spare.
const OWN_FDS: usize = 32;

/// Raises the master's fd limit to the hard limit (its workers inherit it) and returns the
/// fds it may spend on worker slots and held connections: the limit less what is open now
/// and [`OWN_FDS`]. Refuses a limit that leaves no room for a connection.
fn fd_room(workers: usize) -> Result<usize, MasterError> {
    let limit = sys::process::raise_fd_limit()
        .or_else(|_| sys::process::fd_limit().map(|(soft, _)| soft))
        .map_err(MasterError::Runtime)?;
    let open = crate::procfs::open_fds().map_err(MasterError::Runtime)?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let room = limit.saturating_sub(open + OWN_FDS);
    // At least a connection in hand per worker.
    let needed = (table::FDS_PER_SLOT + 1) * workers;
    if room < needed {
        return Err(MasterError::Config(format!(
            "the fd limit (RLIMIT_NOFILE) of {limit} is too low for {workers} workers: \
             it needs at least {}; raise it (ulimit -n) or run fewer workers",
            open + OWN_FDS + needed
        )));
    }
    tracing::debug!(limit, open, room, "fd budget");
    Ok(room)
}

/// The shared map the master's handler gets: the master's own, or the same Redis map the
/// workers use (`--state redis://...`, or `HANDOFF_STATE` in the master's environment).
fn handler_map(ctx: &Ctx, config: &Config) -> crate::state::SharedMap {
    use crate::state::{Choice, SharedMap, Unavailable};
    use std::sync::Arc;
    let choice = match &config.state_url {
        Some(url) => Choice::parse(Some(url)),
        None => Choice::from_env(),
    };
    match choice {
        Choice::Master => ctx.state.map(),
        #[cfg(feature = "redis")]
        Choice::Redis(url) => SharedMap::new(crate::state::redis::start_later(&url, config.state)),
        #[cfg(not(feature = "redis"))]
        Choice::Redis(url) => SharedMap::new(Arc::new(Unavailable::new(format!(
            "{url}: this build has no Redis backend (cargo feature `redis`)"
        )))),
        Choice::Invalid(why) => SharedMap::new(Arc::new(Unavailable::new(why))),
    }
}

async fn master(
    config: Config,
    launcher: Launcher,
    handler: MasterHandler,
    given: Given,
) -> Result<(), MasterError> {
    let mut stop_signals = StopSignals::install().map_err(MasterError::Signals)?;
    let lifecycle_signals = lifecycle::Signals::install().map_err(MasterError::Signals)?;
    crate::signals::ignore_stray(crate::signals::Role::Master);
    let config = Rc::new(config);
    let from_systemd = given.from_systemd;
    let (ctx, listeners) = prepare(&config, launcher, given.listeners)?;
    #[cfg(feature = "control")]
    let control = control_listener(&config, given.control)?;
    handler.start(&ctx.post, || handler_map(&ctx, &config));
    #[cfg(feature = "prometheus")]
    let metrics_task = serve_metrics(&ctx, config.metrics, given.metrics)?;
    if !from_systemd && given.handshake.is_none() {
        let fds: Vec<_> = listeners.iter().map(|l| l.get_ref().as_fd()).collect();
        let stored = ctx.systemd.store_listeners(&fds);
        if stored > 0 {
            tracing::info!(
                listeners = stored,
                "listening sockets kept in systemd's fd store"
            );
        }
    }
    let handshake = match given.handshake {
        Some(fd) => Some(
            upgrade::take_over(&ctx, fd)
                .await
                .map_err(MasterError::Upgrade)?,
        ),
        None => None,
    };
    for index in 0..config.workers {
        workers::start_worker(&ctx, index);
    }
    let following = handshake
        .map(|predecessor| spawn_local(upgrade::follow_predecessor(ctx.clone(), predecessor)));
    let mut tasks = vec![
        spawn_local(lifecycle::run(ctx.clone(), lifecycle_signals)),
        spawn_local(systemd::run(ctx.clone())),
        spawn_local(state::expire(ctx.clone())),
        spawn_local(state::local(ctx.clone())),
        spawn_local(link::release(ctx.clone())),
    ];
    if config.strategy.is_steered() {
        tasks.push(spawn_local(steer(ctx.clone())));
    }
    let accepting: Vec<JoinHandle<()>> = listeners
        .iter()
        .enumerate()
        .map(|(index, listener)| {
            spawn_local(accept::run(ctx.clone(), listener.clone(), index as u16))
        })
        .collect();
    #[cfg(feature = "control")]
    let control_task = control.map(|listener| {
        *ctx.control_fd.borrow_mut() = Some(listener.clone());
        spawn_local(control::serve(ctx.clone(), listener))
    });
    #[cfg(not(feature = "control"))]
    let control_task: Option<JoinHandle<()>> = None;
    #[cfg(feature = "prometheus")]
    tasks.extend(metrics_task);
    *ctx.listeners.borrow_mut() = listeners.clone();

    let first = tokio::select! {
        signal = stop_signals.recv() => signal,
        () = ctx.stop.notified() => if ctx.handed_over.get() { "upgraded" } else { "handoff ctl stop" },
    };
    tracing::info!("{first}: stopping");
    ctx.systemd.stopping();
    if let Some(task) = control_task {
        // Handed over, the control socket is the new master's alone from now on.
        if ctx.handed_over.get() {
            task.abort();
        } else {
            tasks.push(task);
        }
    }
    ctx.listeners.borrow_mut().clear();
    let stop = stop(&ctx, listeners, accepting);
    tokio::select! {
        _ = stop => {}
        second = stop_signals.recv() => kill_all(&ctx, &format!("second stop signal ({second})")),
    }
    wait_all_exited(&ctx, Duration::from_secs(5)).await;
    if let Some(following) = following.filter(|_| ctx.handed_over.get()) {
        // Upgraded again while the master before this one still drains: what it passes
        // on goes on to the newest master, so stay until it is done (bounded by its drain).
        let bound = config.drain_timeout + upgrade::FOLLOW_GRACE;
        if tokio::time::timeout(bound, following).await.is_err() {
            tracing::warn!("the replaced master before this one is still draining; leaving it");
        }
    }
    upgrade::hand_final_totals(&ctx).await;
    tasks.iter().for_each(JoinHandle::abort);
    // Handed over, the sockets are the new master's; systemd's listeners are systemd's.
    if !ctx.handed_over.get() {
        remove_socket_files(&config, !from_systemd);
    }
    let counters = ctx.table.borrow().counters;
    tracing::info!(
        accepted = counters.accepted,
        redispatched = counters.redispatched,
        dropped = counters.dropped,
        recycled = counters.recycled,
        lost_with_worker = counters.lost_with_worker,
        "master stopped"
    );
    Ok(())
}

/// The control socket: the one handed over by the master this one replaces, or bound.
#[cfg(feature = "control")]
fn control_listener(
    config: &Config,
    given: Option<OwnedFd>,
) -> Result<Option<Listener>, MasterError> {
    let Some(path) = &config.control else {
        return Ok(None);
    };
    let bound = match given {
        Some(fd) => sys::async_fd(fd),
        None => control::bind(path),
    };
    bound
        .map(|l| Some(Rc::new(l)))
        .map_err(|source| MasterError::Control {
            path: path.clone(),
            source,
        })
}

/// Binds `--metrics` and serves scrapes there; histogram samples go to its exporter.
#[cfg(feature = "prometheus")]
fn serve_metrics(
    ctx: &Rc<Ctx>,
    addr: Option<std::net::SocketAddr>,
    given: Option<OwnedFd>,
) -> Result<Option<JoinHandle<()>>, MasterError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = match given {
        Some(fd) => Ok(std::net::TcpListener::from(fd)),
        None => prometheus::bind(addr),
    };
    let listener = listener
        .and_then(|l| {
            *ctx.metrics_fd.borrow_mut() = Some(OwnedFd::from(l.try_clone()?));
            Ok(l)
        })
        .map_err(|source| MasterError::Metrics { addr, source })?;
    let exporter = prometheus::Exporter::new();
    let sink = exporter.clone();
    ctx.cluster
        .set_sink(Box::new(move |key, value| sink.record(key, value)));
    tracing::info!(address = %listener.local_addr().unwrap_or(addr), "serving metrics");
    Ok(Some(spawn_local(prometheus::serve(
        ctx.clone(),
        exporter,
        listener,
    ))))
}

/// Binds the listeners, sizes the fd budget and builds the shared state; returns it with
/// the listeners the master accepts on (none in the kernel modes).
fn prepare(
    config: &Rc<Config>,
    mut launcher: Launcher,
    given: Vec<systemd::Activated>,
) -> Result<(Rc<Ctx>, Vec<Listener>), MasterError> {
    let (handout, accept_fds, listening) = if config.strategy.is_steered() {
        if !given.is_empty() {
            return Err(MasterError::Config(format!(
                "{} binds a socket per worker: it cannot use sockets passed to it \
                 (LISTEN_FDS, an upgrade)",
                config.strategy.name()
            )));
        }
        let steering = steering(config)?;
        let listening = steering.addrs().map(|a| a.to_string()).collect();
        (Handout::Least(steering.into()), Vec::new(), listening)
    } else {
        let bound = if given.is_empty() {
            bind(config)?
        } else if config.strategy == Strategy::KernelReuseport {
            return Err(MasterError::Config(
                "kernel-reuseport binds a socket per worker: it cannot use sockets passed to \
                 it (LISTEN_FDS, an upgrade)"
                    .into(),
            ));
        } else {
            given.into_iter().map(|a| (a.name, a.peer, a.fd)).collect()
        };
        let listening: Vec<String> = bound.iter().map(|(name, _, _)| name.clone()).collect();
        let (handout, accept_fds) = Handout::new(
            config.strategy,
            bound.into_iter().map(|(_, peer, fd)| (peer, fd)).collect(),
            config.backlog,
        );
        (handout, accept_fds, listening)
    };
    for name in &listening {
        tracing::info!(address = %name, "listening");
    }
    launcher.env(crate::supervise::ENV_LISTEN, listening.join(","));
    if let Some(url) = &config.state_url {
        launcher.env(crate::supervise::ENV_STATE, url.as_str());
    }
    let mut table = Table::new(config.clone());
    table.set_fd_room(fd_room(config.workers)?);
    tracing::info!(
        pid = std::process::id(),
        workers = config.workers,
        strategy = ?config.strategy,
        max_pending = config.max_pending,
        worker_timeout_ms = config.worker_timeout.as_millis() as u64,
        drain_timeout_ms = config.drain_timeout.as_millis() as u64,
        max_age_ms = config.limits.max_age.map(|a| a.as_millis() as u64),
        max_connections = config.limits.max_connections,
        max_rss_kib = config.limits.max_rss.map(|b| b / 1024),
        max_held = table.max_held(),
        "master starting"
    );
    let ctx = Rc::new(Ctx::new(table, launcher, listening, handout));
    let listeners = accept_fds
        .into_iter()
        .map(|fd| sys::async_fd(fd).map(Rc::new))
        .collect::<io::Result<Vec<_>>>()
        .map_err(MasterError::Runtime)?;
    Ok((ctx, listeners))
}

/// `kernel-least`, `kernel-p2c`: the slot listeners, maps and program, for TCP addresses
/// and at most [`crate::bpf::MAX_SLOTS`] workers; refused at start, in one line, without
/// CAP_BPF.
fn steering(config: &Config) -> Result<crate::bpf::Steering, MasterError> {
    let name = config.strategy.name();
    let addrs = config
        .listen
        .iter()
        .map(|addr| match addr {
            ListenAddr::Tcp(socket) => Ok(*socket),
            ListenAddr::Unix(_) => Err(MasterError::Config(format!(
                "{name} needs TCP listen addresses"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if config.workers > crate::bpf::MAX_SLOTS {
        return Err(MasterError::Config(format!(
            "{name} takes at most {} workers (got {})",
            crate::bpf::MAX_SLOTS,
            config.workers
        )));
    }
    let pick = match config.strategy {
        Strategy::KernelP2c => crate::bpf::Pick::TwoChoices,
        _ => crate::bpf::Pick::Least,
    };
    crate::bpf::Steering::new(&addrs, config.backlog, config.workers, pick)
        .map_err(|e| MasterError::KernelLeast(format!("--strategy {name}: {e}")))
}

/// `kernel-least`: keeps the socket arrays in step with the table and reconciles each
/// slot's count with the workers' figures, every [`RECONCILE_PERIOD`].
async fn steer(ctx: Rc<Ctx>) {
    let mut tick = tokio::time::interval(RECONCILE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = ctx.table.borrow();
        ctx.handout.steer(&table);
        ctx.handout.reconcile(&table);
    }
}

/// How often `kernel-least` reconciles: often enough that a leaked count (a handshake that
/// never completed, a worker that died with connections) does not skew many picks, rarely
/// enough to cost nothing (a few atomic reads per slot).
const RECONCILE_PERIOD: Duration = Duration::from_millis(100);

/// Removes the socket files the master created: the control socket, and `unix:` listeners
/// unless they are not its own.
fn remove_socket_files(config: &Config, listeners: bool) {
    let socket_files = config.listen.iter().filter_map(|addr| match addr {
        ListenAddr::Unix(path) if listeners => Some(path),
        _ => None,
    });
    for path in socket_files.chain(&config.control) {
        let _ = std::fs::remove_file(path);
    }
}

/// Graceful stop: serve what the kernel already queued, close the listeners, let workers
/// finish in-flight connections up to the shutdown timeout, then kill what is left.
async fn stop(ctx: &Rc<Ctx>, listeners: Vec<Listener>, accepting: Vec<JoinHandle<()>>) {
    let timeout = ctx.table.borrow().config.shutdown_timeout;
    let deadline = Instant::now() + timeout;
    for task in accepting {
        task.abort();
        let _ = task.await;
    }
    for (index, listener) in listeners.iter().enumerate() {
        let queued = accept::drain_queue(ctx, listener, index as u16);
        if queued > 0 {
            tracing::info!(
                connections = queued,
                "serving connections queued before the stop"
            );
        }
    }
    flush(ctx);
    // Close the listeners now: new clients are refused instead of waiting in a dead queue.
    // (The accept tasks have ended, so these are the last references.)
    drop(listeners);
    // Hand out what lost workers left behind before the survivors stop taking connections,
    // as long as some worker is there to take them.
    let capacity = ctx.table.borrow().capacity.clone();
    let waiting = |table: &Table| table.retry_len() > 0 && table.any_ready();
    while waiting(&ctx.table.borrow()) && Instant::now() < deadline {
        let notified = capacity.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !waiting(&ctx.table.borrow()) {
            break;
        }
        ctx.table.borrow().ask_for_reports();
        link::sync(ctx);
        flush(ctx);
        if !waiting(&ctx.table.borrow()) {
            break;
        }
        let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        flush(ctx);
    }
    {
        let mut table = ctx.table.borrow_mut();
        table.stopping = true;
        table.drop_undeliverable();
        table.drain_all();
    }
    flush(ctx);
    if !wait_all_exited(ctx, deadline.saturating_duration_since(Instant::now())).await {
        kill_all(ctx, "shutdown timeout");
    }
}

/// Waits until every worker process has been reaped; false on timeout.
async fn wait_all_exited(ctx: &Rc<Ctx>, timeout: Duration) -> bool {
    let all_exited = ctx.table.borrow().all_exited.clone();
    let wait = async {
        loop {
            let notified = all_exited.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ctx.table.borrow().live.is_empty() {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

fn kill_all(ctx: &Ctx, why: &str) {
    let mut table = ctx.table.borrow_mut();
    table.stopping = true;
    tracing::warn!(
        workers = table.live.len(),
        reason = why,
        "killing remaining workers"
    );
    for &pid in table.live.keys() {
        let _ = sys::process::signal(pid, libc::SIGKILL);
    }
}
