//! What every master task shares: the dispatch table, each worker's link (its channel and the
//! tasks that carry it), how to start a worker, and who accepts. One thread; a borrow is
//! never held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;

use tokio::io::unix::AsyncFd;

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::cluster::Cluster;
use super::kernel::Handout;
use super::post::Post;
use super::state::Authority;
use super::systemd::Notifier;
use super::table::Table;
use crate::ipc::frame::MAX_FRAME_LEN;
use crate::ipc::Channel;
use crate::supervise::Launcher;

/// The upgrade's handshake socket, between a master and the one that replaces it.
pub(crate) type Handshake = tokio::net::UnixStream;

/// A listening socket the master accepts on, shared with its accept task.
pub(crate) type Listener = Rc<AsyncFd<OwnedFd>>;

/// The master's shared state.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub table: RefCell<Table>,
    /// Each live process's link, by pid.
    pub links: RefCell<HashMap<u32, Link>>,
    /// Buffers for encoding what is sent.
    pub scratch: RefCell<Scratch>,
    pub launcher: Launcher,
    /// Messages: routing what workers send, queues of what waits for a full channel.
    pub post: Rc<Post>,
    /// The workers' `metrics`, added up.
    pub cluster: Cluster,
    /// What systemd is told (nothing without `NOTIFY_SOCKET`).
    pub systemd: Notifier,
    /// Notified to stop the master as a stop signal would (`handoff ctl stop`, an upgrade).
    pub stop: Notify,
    /// Where this master's binary was at its start: what an upgrade runs by default.
    pub exe: Option<PathBuf>,
    /// The sockets an upgrade hands over: listeners, control, metrics.
    pub listeners: RefCell<Vec<Listener>>,
    pub control_fd: RefCell<Option<Listener>>,
    pub metrics_fd: RefCell<Option<OwnedFd>>,
    /// An upgrade is under way.
    pub upgrading: Cell<bool>,
    /// A new master took over: the sockets are its own now.
    pub handed_over: Cell<bool>,
    /// What goes on to the master that took over: connections handed back, then this one's
    /// final totals (see `upgrade::feed_successor`).
    pub successor: RefCell<Option<tokio::sync::mpsc::Sender<super::upgrade::Onward>>>,
    #[cfg_attr(not(feature = "control"), allow(dead_code))]
    pub listening: Vec<String>,
    pub handout: Handout,
    /// The shared map's authority (`state::Authority::store` is what an upgrade hands
    /// over).
    pub state: Authority,
}

impl Ctx {
    pub fn new(table: Table, launcher: Launcher, listening: Vec<String>, handout: Handout) -> Self {
        let state = Authority::new(table.config.state);
        Ctx {
            state,
            table: RefCell::new(table),
            links: RefCell::new(HashMap::new()),
            scratch: RefCell::new(Scratch::default()),
            launcher,
            post: Rc::new(Post::default()),
            cluster: Cluster::default(),
            systemd: Notifier::from_env(),
            stop: Notify::new(),
            exe: std::env::current_exe().ok(),
            listeners: RefCell::new(Vec::new()),
            control_fd: RefCell::new(None),
            metrics_fd: RefCell::new(None),
            upgrading: Cell::new(false),
            handed_over: Cell::new(false),
            successor: RefCell::new(None),
            listening,
            handout,
        }
    }
}

/// A worker process's channel and the tasks that read and write it; dropping it stops them.
#[derive(Debug)]
pub(crate) struct Link {
    pub channel: Rc<Channel>,
    /// Wakes the task that waits for the channel to become writable.
    pub writer: Rc<Notify>,
    pub tasks: Vec<AbortHandle>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

/// A reused buffer for encoding a CONNECTIONS frame. Its fds are borrowed from the outbox
/// for each send (a `BorrowedFd` cannot outlive the batch it borrows from).
#[derive(Debug)]
pub(crate) struct Scratch {
    pub frame: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            frame: Vec::with_capacity(MAX_FRAME_LEN),
        }
    }
}
