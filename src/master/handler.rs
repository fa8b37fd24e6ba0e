//! The master's side of messages for a Rust program: the handler given to
//! `Builder::master` runs in the master, on its thread, with a [`Master`] handle that
//! receives what workers send and sends to one worker or to all of them.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::post::{failure, from_master, Inbound, Post};
use crate::ipc::message::{from_payload, to_payload, MessageError, Route};
use crate::state::SharedMap;

type Task = Pin<Box<dyn Future<Output = ()>>>;
type Start = Box<dyn FnOnce(Rc<Post>, mpsc::Receiver<Inbound>, SharedMap) -> Task + Send>;

/// The handler a master runs, once (cloning a builder shares it).
#[derive(Clone, Default)]
pub(crate) struct MasterHandler(Arc<Mutex<Option<Start>>>);

impl std::fmt::Debug for MasterHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|h| h.is_some()).unwrap_or(false);
        f.debug_tuple("MasterHandler").field(&set).finish()
    }
}

impl MasterHandler {
    pub fn new<M, F, Fut>(handler: F) -> Self
    where
        M: Serialize + DeserializeOwned + 'static,
        F: FnOnce(Master<M>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let start: Start = Box::new(move |post, inbox, state| {
            let master = Master {
                post,
                inbox,
                state,
                _type: PhantomData,
            };
            Box::pin(handler(master))
        });
        MasterHandler(Arc::new(Mutex::new(Some(start))))
    }

    /// Starts the handler on the master's thread, if there is one and it has not started.
    pub fn start(&self, post: &Rc<Post>, state: impl FnOnce() -> SharedMap) {
        let start = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(start) = start {
            let inbox = post.attach_handler();
            tokio::task::spawn_local(start(post.clone(), inbox, state()));
        }
    }
}

/// A message a worker sent the master.
#[derive(Debug, Clone, PartialEq)]
pub struct FromWorker<M> {
    /// The sender's slot (0-based, stable across its restarts).
    pub slot: usize,
    /// The sender's pid.
    pub pid: u32,
    /// What it says.
    pub body: M,
    /// The request id, if the sender waits for a reply.
    request: Option<u64>,
}

impl<M> FromWorker<M> {
    /// Whether the sender waits for a [`Master::reply`].
    pub fn is_request(&self) -> bool {
        self.request.is_some()
    }
}

/// The master's handle on messages of type `M`: given to the handler of
/// `Builder::master`, on the master's thread.
#[derive(Debug)]
pub struct Master<M> {
    post: Rc<Post>,
    inbox: mpsc::Receiver<Inbound>,
    state: SharedMap,
    _type: PhantomData<fn(M) -> M>,
}

impl<M: Serialize + DeserializeOwned> Master<M> {
    /// The next message from a worker. One that is not an `M` is dropped, counted and
    /// logged (a request among them gets an error reply).
    pub async fn recv(&mut self) -> Option<FromWorker<M>> {
        loop {
            let Inbound { slot, pid, message } = self.inbox.recv().await?;
            match from_payload(&message) {
                Ok(body) => {
                    let request = (message.route == Route::Request).then_some(message.id);
                    return Some(FromWorker {
                        slot,
                        pid,
                        body,
                        request,
                    });
                }
                Err(e) => {
                    self.post.drop_one(slot, pid, &e);
                    if message.route == Route::Request {
                        let _ = self.post.deliver(pid, failure(&message, &e.to_string()));
                    }
                }
            }
        }
    }

    /// The cluster's shared map as the master holds it (see [`crate::state`]): reads are
    /// current, and a write is applied and sent to every worker before it resolves.
    pub fn state(&self) -> SharedMap {
        self.state.clone()
    }

    /// Sends `message` to the worker in slot `slot` (its newest process).
    pub fn send(&self, slot: usize, message: &M) -> Result<(), MessageError> {
        let pid = self.post.pid_of(slot).ok_or(MessageError::NoWorker(slot))?;
        let bytes = from_master(Route::ToWorker, 0, to_payload(message)?);
        self.post.deliver(pid, bytes)
    }

    /// Sends `message` to every worker; returns how many it went to (or was queued for).
    pub fn broadcast(&self, message: &M) -> Result<usize, MessageError> {
        let bytes = from_master(Route::Broadcast, 0, to_payload(message)?);
        let pids = self.post.pids();
        Ok(pids
            .into_iter()
            .filter(|&pid| self.post.deliver(pid, bytes.clone()).is_ok())
            .count())
    }

    /// Answers `request` (a message whose [`FromWorker::is_request`] is true) with `reply`.
    pub fn reply<R: Serialize>(
        &self,
        request: &FromWorker<M>,
        reply: &R,
    ) -> Result<(), MessageError> {
        let Some(id) = request.request else {
            return Err(MessageError::Encode(
                "replying to a message that is not a request".into(),
            ));
        };
        let bytes = from_master(Route::Reply, id, to_payload(reply)?);
        self.post.deliver(request.pid, bytes)
    }
}
