//! systemd: socket activation and `Type=notify`, through the sd-notify crate.
//!
//! - Listening sockets passed in `LISTEN_FDS` (for this pid: `LISTEN_PID`) are used instead
//!   of binding `--listen`, and never removed at stop (the service manager owns them).
//! - With `NOTIFY_SOCKET` set: `READY=1` once every worker slot has a ready worker (not
//!   before), `STATUS=` with a one-line summary, `RELOADING=1` with `MONOTONIC_USEC` at a
//!   SIGHUP rolling restart and `READY=1` when it is done, `STOPPING=1` on stop, and
//!   `WATCHDOG=1` at half `WatchdogSec` while the master's loop runs (it is sent from that
//!   loop, so a stuck master stops sending it).
//! - The fd store: where the service allows one (`FileDescriptorStoreMax=`, which systemd
//!   v254 and later announce in `FDSTORE`), listening sockets the master bound itself are
//!   stored with `FDSTORE=1` (`FDNAME=handoff-listen-N`). They outlive a master that dies:
//!   systemd holds them, the kernel queues the clients that connect meanwhile, and the
//!   restarted master gets them back in `LISTEN_FDS` and serves those clients.
//! - Workers never inherit `NOTIFY_SOCKET`, `LISTEN_*`, `WATCHDOG_*` or `FDSTORE`
//!   (`supervise::spawn`).

use std::cell::{Cell, RefCell};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use super::ctx::Ctx;
use super::table::{Phase, Table};
use crate::config::ListenAddr;
use crate::sys;
use crate::sys::socket::Peer;

/// How often the master looks at its workers for READY and STATUS.
const POLL: Duration = Duration::from_millis(100);
/// How often the one-line STATUS is refreshed, at most.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A listening socket the service manager passed, with its address.
#[derive(Debug)]
pub(crate) struct Activated {
    pub addr: ListenAddr,
    pub name: String,
    pub peer: Peer,
    pub fd: OwnedFd,
}

/// The sockets of `LISTEN_FDS` when they are for this process; none otherwise.
pub(crate) fn activated() -> std::io::Result<Vec<Activated>> {
    sd_notify::listen_fds()?
        .map(|raw| describe(sys::process::activated_listener(raw)?))
        .collect()
}

/// A listening socket with its address.
pub(crate) fn describe(fd: OwnedFd) -> std::io::Result<Activated> {
    let (addr, name, peer) = match sys::socket::local_addr(&fd)? {
        Some(local) => (ListenAddr::Tcp(local), local.to_string(), Peer::Ip(local)),
        None => {
            let path = sys::socket::unix_path(&fd)?;
            let name = format!("unix:{}", path.display());
            (ListenAddr::Unix(path), name, Peer::Unix)
        }
    };
    Ok(Activated {
        addr,
        name,
        peer,
        fd,
    })
}

/// Where the master is in systemd's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Reloading,
    Stopping,
    HandedOver,
}

/// What the master tells systemd.
#[derive(Debug)]
pub(crate) struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    state: Cell<State>,
    status: RefCell<(String, Option<Instant>)>,
}

impl Notifier {
    /// From the environment: silent without `NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            state: Cell::new(State::Starting),
            status: RefCell::new((String::new(), None)),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "telling systemd failed");
        }
    }

    /// Hands the listening sockets this master bound to systemd's fd store, where the
    /// service has one (`FDSTORE` set above 0); answers how many were stored.
    pub fn store_listeners(&self, listeners: &[BorrowedFd<'_>]) -> usize {
        let room = std::env::var("FDSTORE")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        if !self.enabled || room == 0 {
            return 0;
        }
        let mut stored = 0;
        for (index, fd) in listeners.iter().enumerate().take(room) {
            let name = format!("handoff-listen-{index}");
            let states = [NotifyState::FdStore, NotifyState::FdName(&name)];
            match sd_notify::notify_with_fds(&states, &[*fd]) {
                Ok(()) => stored += 1,
                Err(e) => {
                    tracing::warn!(error = %e, name, "storing a listener in systemd's fd store failed")
                }
            }
        }
        if listeners.len() > room {
            tracing::warn!(
                room,
                listeners = listeners.len(),
                "systemd's fd store has room for fewer listeners than this master has"
            );
        }
        stored
    }

    /// SIGHUP: a rolling restart begins.
    pub fn reloading(&self) {
        if !self.enabled || matches!(self.state.get(), State::Stopping | State::HandedOver) {
            return;
        }
        self.state.set(State::Reloading);
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => tracing::warn!(error = %e, "reading CLOCK_MONOTONIC for systemd failed"),
        }
    }

    /// This master handed over to a new one (a live upgrade): systemd's main process is now
    /// `pid`, which is ready.
    pub fn handed_over(&self, pid: u32) {
        if self.enabled {
            self.state.set(State::HandedOver);
            self.send(&[NotifyState::MainPid(pid), NotifyState::Ready]);
        }
    }

    /// A stop signal: the master is on its way out (not when it handed over: the service
    /// goes on).
    pub fn stopping(&self) {
        if self.enabled && self.state.get() != State::HandedOver {
            self.state.set(State::Stopping);
            self.send(&[NotifyState::Stopping]);
        }
    }

    /// Looks at the workers: READY=1 when every slot is ready (at start, and when a
    /// rolling restart is done); STATUS= when the summary changed.
    fn update(&self, table: &Table) {
        let ready = table.slots[..table.workers]
            .iter()
            .filter(|s| s.process.as_ref().is_some_and(|p| p.phase == Phase::Ready))
            .count();
        let all_ready = table.all_ready();
        match self.state.get() {
            State::Starting if all_ready => self.ready(),
            State::Reloading if !table.restarting && all_ready => self.ready(),
            _ => {}
        }
        let summary = format!(
            "{ready}/{} workers ready, {} connections accepted{}",
            table.workers,
            table.counters.accepted,
            if table.restarting { ", restarting" } else { "" }
        );
        let mut status = self.status.borrow_mut();
        let due = status.1.is_none_or(|at| at.elapsed() >= STATUS_EVERY);
        if summary != status.0 && due {
            self.send(&[NotifyState::Status(&summary)]);
            *status = (summary, Some(Instant::now()));
        }
    }

    fn ready(&self) {
        self.state.set(State::Ready);
        self.send(&[NotifyState::Ready]);
        tracing::info!("told systemd: ready");
    }
}

/// Tells systemd how the master is doing, from the master's own loop, until it stops.
pub(crate) async fn run(ctx: Rc<Ctx>) {
    let notifier = &ctx.systemd;
    if !notifier.enabled {
        return;
    }
    let mut poll = tokio::time::interval(POLL);
    let mut last_ping = Instant::now();
    loop {
        poll.tick().await;
        notifier.update(&ctx.table.borrow());
        if let Some(watchdog) = notifier.watchdog {
            if last_ping.elapsed() >= watchdog / 2 {
                notifier.send(&[NotifyState::Watchdog]);
                last_ping = Instant::now();
            }
        }
    }
}
