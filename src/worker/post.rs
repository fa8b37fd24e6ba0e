//! Messages in a worker: a [`Messenger`] sends to the master (one way, or a request that
//! waits for its reply) and to every other worker (relayed by the master); the [`Inbox`]
//! receives what the master and the other workers send. Values are any serde type, encoded
//! with postcard; the wire is `docs/protocol.md`'s MESSAGE frame.
//!
//! Bounds: sending waits while the channel to the master is full (backpressure, never an
//! unbounded buffer); the inbox holds [`INBOX_CAPACITY`] messages, and one arriving at a full
//! inbox is dropped, counted and logged, so a worker that stops reading cannot make anyone
//! grow.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::ipc::frame;
use crate::ipc::message::{
    from_payload, to_payload, Encoding, Message, MessageError, Route, FROM_MASTER,
};
use crate::ipc::Channel;

/// Messages an [`Inbox`] holds before new ones are dropped.
pub const INBOX_CAPACITY: usize = 1024;

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The master.
    Master,
    /// The worker in this slot.
    Worker(usize),
}

/// A message this worker received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received<M> {
    /// Who sent it.
    pub from: Origin,
    /// What it says.
    pub body: M,
}

/// The worker's side of the post: what the channel reader delivers into and what the
/// handles send through.
#[derive(Debug)]
pub(crate) struct WorkerPost {
    channel: Arc<Channel>,
    inbox: mpsc::Sender<Message>,
    unclaimed: Mutex<Option<mpsc::Receiver<Message>>>,
    claimed: AtomicBool,
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl WorkerPost {
    pub fn new(channel: Arc<Channel>) -> Self {
        let (inbox, unclaimed) = mpsc::channel(INBOX_CAPACITY);
        WorkerPost {
            channel,
            inbox,
            unclaimed: Mutex::new(Some(unclaimed)),
            claimed: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Takes a message the master sent: a reply goes to the request waiting for it, anything
    /// else into the inbox.
    pub fn deliver(&self, message: Result<Message, crate::ipc::message::MessageFault>) {
        let message = match message {
            // A relay comes back down from the master; the other upstream routes never do.
            Ok(m) if m.route.upstream() && m.route != Route::Relay => {
                return self.drop_one(&format!("a {:?} message from the master", m.route))
            }
            Ok(m) => m,
            Err(fault) => return self.drop_one(&fault.to_string()),
        };
        if message.route == Route::Reply {
            let waiting = lock(&self.pending).remove(&message.id);
            // A reply after its request timed out has no one to go to.
            if let Some(waiting) = waiting {
                let _ = waiting.send(message);
            }
            return;
        }
        if !self.claimed.load(Ordering::Acquire) {
            // Nobody reads messages in this worker: nothing to queue them for.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.inbox.try_send(message) {
            self.drop_one("the inbox is full (the worker's code is not reading it)");
        }
    }

    fn drop_one(&self, why: &str) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // One line for the first and then every 1000th, not one per message.
        if dropped == 1 || dropped % 1000 == 0 {
            tracing::warn!(dropped, reason = why, "dropping a message");
        }
    }

    async fn send(&self, route: Route, id: u64, payload: Vec<u8>) -> Result<(), MessageError> {
        let message = Message {
            route,
            encoding: Encoding::Postcard,
            failed: false,
            from: 0,
            id,
            payload,
        };
        let mut bytes = Vec::with_capacity(frame::HEADER_LEN + 16 + message.payload.len());
        frame::encode_message(&mut bytes, &message);
        self.channel
            .send(&bytes, &[])
            .await
            .map_err(|_| MessageError::Closed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends messages of type `M` from this worker. Cheap to clone; every clone sends on the
/// same channel.
#[derive(Debug)]
pub struct Messenger<M> {
    post: Arc<WorkerPost>,
    _type: PhantomData<fn(M)>,
}

impl<M> Clone for Messenger<M> {
    fn clone(&self) -> Self {
        Messenger {
            post: self.post.clone(),
            _type: PhantomData,
        }
    }
}

impl<M: Serialize> Messenger<M> {
    pub(crate) fn new(post: Arc<WorkerPost>) -> Self {
        Messenger {
            post,
            _type: PhantomData,
        }
    }

    /// Sends `message` to the master's handler (see `Builder::master`); waits while the
    /// channel is full.
    pub async fn send(&self, message: &M) -> Result<(), MessageError> {
        let payload = to_payload(message)?;
        self.post.send(Route::ToMaster, 0, payload).await
    }

    /// Sends `message` to every other worker, through the master.
    pub async fn broadcast(&self, message: &M) -> Result<(), MessageError> {
        let payload = to_payload(message)?;
        self.post.send(Route::Relay, 0, payload).await
    }

    /// Sends `message` to the master's handler and waits up to `timeout` for its reply, a
    /// value of type `R`.
    pub async fn request<R: DeserializeOwned>(
        &self,
        message: &M,
        timeout: Duration,
    ) -> Result<R, MessageError> {
        let payload = to_payload(message)?;
        let id = self.post.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.post.pending).insert(id, tx);
        let answered = async {
            self.post.send(Route::Request, id, payload).await?;
            rx.await.map_err(|_| MessageError::Closed)
        };
        let reply = match tokio::time::timeout(timeout, answered).await {
            Ok(reply) => reply,
            Err(_) => Err(MessageError::Timeout(timeout)),
        };
        lock(&self.post.pending).remove(&id);
        let reply = reply?;
        if reply.failed {
            return Err(MessageError::Failed(
                String::from_utf8_lossy(&reply.payload).into_owned(),
            ));
        }
        from_payload(&reply)
    }
}

/// Receives the messages of type `M` the master and the other workers send this worker.
#[derive(Debug)]
pub struct Inbox<M> {
    rx: mpsc::Receiver<Message>,
    post: Arc<WorkerPost>,
    _type: PhantomData<fn() -> M>,
}

impl<M: DeserializeOwned> Inbox<M> {
    /// The inbox, the first time it is asked for; `None` after.
    pub(crate) fn claim(post: &Arc<WorkerPost>) -> Option<Self> {
        let rx = lock(&post.unclaimed).take()?;
        post.claimed.store(true, Ordering::Release);
        Some(Inbox {
            rx,
            post: post.clone(),
            _type: PhantomData,
        })
    }

    /// Waits for the next message. A message that is not an `M` is dropped, counted and
    /// logged.
    pub async fn recv(&mut self) -> Option<Received<M>> {
        loop {
            let message = self.rx.recv().await?;
            match from_payload(&message) {
                Ok(body) => {
                    let from = match message.from {
                        FROM_MASTER => Origin::Master,
                        slot => Origin::Worker(slot as usize),
                    };
                    return Some(Received { from, body });
                }
                Err(e) => self.post.drop_one(&e.to_string()),
            }
        }
    }

    /// Messages this worker dropped so far: garbage, wrong type, a full inbox.
    pub fn dropped(&self) -> u64 {
        self.post.dropped.load(Ordering::Relaxed)
    }
}
