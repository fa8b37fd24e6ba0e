//! The master's post office: routes the MESSAGE frames workers send (to the master's
//! handler, or relayed to every other worker) and carries the handler's messages out.
//!
//! Bounds, so that no worker can make the master grow: each worker's queue of messages the
//! channel could not take at once holds at most [`MAX_QUEUED_BYTES`]; the handler's inbox
//! holds [`HANDLER_CAPACITY`] messages. Past either, the message is dropped, counted
//! ([`PostCounters::dropped`]) and logged (the first, then every 1000th). A request that is
//! dropped is answered with an error at once, so its sender does not wait for its timeout.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::ipc::frame;
use crate::ipc::message::{Encoding, Message, MessageError, MessageFault, Route, FROM_MASTER};
use crate::ipc::Channel;

/// Bytes of messages queued for one worker whose channel is full, at most.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Messages waiting for the master's handler, at most.
pub const HANDLER_CAPACITY: usize = 4096;

/// A message for the master's handler, as it arrived.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub slot: usize,
    pub pid: u32,
    pub message: Message,
}

/// What the post office has done, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PostCounters {
    /// Messages workers sent (every route).
    pub received: u64,
    /// Messages delivered to a worker's channel (relayed, sent, broadcast, replies).
    pub delivered: u64,
    /// Messages dropped: malformed, a wrong route, a full queue, no handler to take them.
    pub dropped: u64,
}

/// One worker process's address: its channel and what waits to go through it.
#[derive(Debug)]
struct Address {
    slot: usize,
    /// Order of registration: the newest process of a slot is the one a message to the
    /// slot goes to.
    serial: u64,
    channel: Rc<Channel>,
    writer: Rc<Notify>,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
}

/// The master's post office.
#[derive(Debug, Default)]
pub(crate) struct Post {
    addresses: RefCell<HashMap<u32, Address>>,
    handler: RefCell<Option<mpsc::Sender<Inbound>>>,
    serial: Cell<u64>,
    counters: Cell<PostCounters>,
    log_budget: LogBudget,
}

/// Log lines about dropped messages, at most, per second.
pub const MAX_DROP_LINES: u32 = 10;

/// A budget of log lines per second; what it silences is counted for the next line.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    window: Cell<Option<Instant>>,
    lines: Cell<u32>,
    silenced: Cell<u64>,
}

impl LogBudget {
    /// `Some(lines silenced since the last one)` if a line may be logged at `now`.
    pub fn spend(&self, now: Instant) -> Option<u64> {
        let window_over = self
            .window
            .get()
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if window_over {
            self.window.set(Some(now));
            self.lines.set(0);
        }
        if self.lines.get() >= MAX_DROP_LINES {
            self.silenced.set(self.silenced.get() + 1);
            return None;
        }
        self.lines.set(self.lines.get() + 1);
        Some(self.silenced.replace(0))
    }
}

impl Post {
    /// Registers process `pid` of slot `slot`; `writer` wakes the task that writes its
    /// channel when it becomes writable.
    pub fn open(&self, slot: usize, pid: u32, channel: Rc<Channel>, writer: Rc<Notify>) {
        let serial = self.serial.get() + 1;
        self.serial.set(serial);
        let address = Address {
            slot,
            serial,
            channel,
            writer,
            queue: VecDeque::new(),
            queued_bytes: 0,
        };
        self.addresses.borrow_mut().insert(pid, address);
    }

    /// Forgets process `pid` and what was queued for it.
    pub fn close(&self, pid: u32) {
        self.addresses.borrow_mut().remove(&pid);
    }

    /// Sends the messages of the master's handler through `handler` from now on; returns
    /// its receiving end.
    pub fn attach_handler(&self) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(HANDLER_CAPACITY);
        *self.handler.borrow_mut() = Some(tx);
        rx
    }

    #[cfg_attr(
        not(any(feature = "control", feature = "prometheus")),
        allow(dead_code)
    )]
    pub fn counters(&self) -> PostCounters {
        self.counters.get()
    }

    /// Adds what a replaced master's counters grew by from `earlier` to `later` (a live
    /// upgrade: see `carry`).
    pub fn add_growth(&self, earlier: &PostCounters, later: &PostCounters) {
        self.count(|c| {
            c.received += later.received.saturating_sub(earlier.received);
            c.delivered += later.delivered.saturating_sub(earlier.delivered);
            c.dropped += later.dropped.saturating_sub(earlier.dropped);
        });
    }

    fn count(&self, change: impl FnOnce(&mut PostCounters)) {
        let mut counters = self.counters.get();
        change(&mut counters);
        self.counters.set(counters);
    }

    /// Drops a message: counted, and one log line for it while the lines of the last
    /// second stay under [`MAX_DROP_LINES`] (a flood is summed up in the next line).
    pub fn drop_one(&self, slot: usize, pid: u32, why: &dyn std::fmt::Display) {
        self.count(|c| c.dropped += 1);
        let dropped = self.counters.get().dropped;
        if let Some(silenced) = self.log_budget.spend(Instant::now()) {
            tracing::warn!(worker = slot, pid, dropped, silenced, reason = %why, "dropping a message");
        }
    }

    /// Routes a MESSAGE frame from process `pid` of slot `slot`.
    pub fn route(&self, slot: usize, pid: u32, message: Result<Message, MessageFault>) {
        self.count(|c| c.received += 1);
        let mut message = match message {
            Ok(m) if m.route.upstream() => m,
            Ok(m) => return self.drop_one(slot, pid, &MessageFault::Direction(m.route)),
            Err(fault) => return self.drop_one(slot, pid, &fault),
        };
        message.from = slot as u32;
        match message.route {
            Route::Relay => {
                let mut bytes = Vec::new();
                frame::encode_message(&mut bytes, &message);
                let others: Vec<u32> = self.pids().into_iter().filter(|&p| p != pid).collect();
                for other in others {
                    let _ = self.deliver(other, bytes.clone());
                }
            }
            _ => self.to_handler(Inbound { slot, pid, message }),
        }
    }

    fn to_handler(&self, inbound: Inbound) {
        let refused = match &*self.handler.borrow() {
            Some(handler) => match handler.try_send(inbound) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(inbound)) => {
                    (inbound, "the master's handler is behind: its queue is full")
                }
                Err(mpsc::error::TrySendError::Closed(inbound)) => {
                    (inbound, "the master's handler has ended")
                }
            },
            None => (
                inbound,
                "no master handler takes messages (Builder::master)",
            ),
        };
        let (inbound, why) = refused;
        self.drop_one(inbound.slot, inbound.pid, &why);
        if inbound.message.route == Route::Request {
            let reply = failure(&inbound.message, why);
            let _ = self.deliver(inbound.pid, reply);
        }
    }

    /// Every registered process, oldest first.
    pub fn pids(&self) -> Vec<u32> {
        let addresses = self.addresses.borrow();
        let mut pids: Vec<(u64, u32)> = addresses.iter().map(|(p, a)| (a.serial, *p)).collect();
        pids.sort_unstable();
        pids.into_iter().map(|(_, p)| p).collect()
    }

    /// The newest process of slot `slot`.
    pub fn pid_of(&self, slot: usize) -> Option<u32> {
        let addresses = self.addresses.borrow();
        addresses
            .iter()
            .filter(|(_, a)| a.slot == slot)
            .max_by_key(|(_, a)| a.serial)
            .map(|(p, _)| *p)
    }

    /// Sends one encoded MESSAGE frame to process `pid` now, or queues it behind what its
    /// full channel already holds.
    pub fn deliver(&self, pid: u32, bytes: Vec<u8>) -> Result<(), MessageError> {
        let mut addresses = self.addresses.borrow_mut();
        let Some(address) = addresses.get_mut(&pid) else {
            return Err(MessageError::Closed);
        };
        if address.queue.is_empty() {
            match address.channel.try_send(&bytes, &[]) {
                Ok(()) => {
                    drop(addresses);
                    self.count(|c| c.delivered += 1);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The reader task sees the broken channel and gives the worker up.
                Err(_) => return Err(MessageError::Closed),
            }
        }
        if address.queued_bytes + bytes.len() > MAX_QUEUED_BYTES {
            let slot = address.slot;
            drop(addresses);
            self.drop_one(slot, pid, &"the worker's message queue is full");
            return Err(MessageError::Full);
        }
        address.queued_bytes += bytes.len();
        address.queue.push_back(bytes);
        address.writer.notify_one();
        Ok(())
    }

    /// Sends what is queued for process `pid` while its channel takes it; `Ok(false)` when
    /// the channel is full again (wait for writable and call again).
    pub fn flush(&self, pid: u32) -> io::Result<bool> {
        let mut addresses = self.addresses.borrow_mut();
        let Some(address) = addresses.get_mut(&pid) else {
            return Ok(true);
        };
        let mut delivered = 0;
        let result = loop {
            let Some(bytes) = address.queue.front() else {
                break Ok(true);
            };
            match address.channel.try_send(bytes, &[]) {
                Ok(()) => {
                    address.queued_bytes -= bytes.len();
                    address.queue.pop_front();
                    delivered += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            }
        };
        drop(addresses);
        self.count(|c| c.delivered += delivered);
        result
    }
}

/// An encoded MESSAGE frame from the master.
pub(crate) fn from_master(route: Route, id: u64, payload: Vec<u8>) -> Vec<u8> {
    let message = Message {
        route,
        encoding: Encoding::Postcard,
        failed: false,
        from: FROM_MASTER,
        id,
        payload,
    };
    let mut bytes = Vec::new();
    frame::encode_message(&mut bytes, &message);
    bytes
}

/// The failed reply to `request`, in the request's encoding, with `why` as its text.
pub(crate) fn failure(request: &Message, why: &str) -> Vec<u8> {
    let message = Message {
        route: Route::Reply,
        encoding: request.encoding,
        failed: true,
        from: FROM_MASTER,
        id: request.id,
        payload: why.as_bytes().to_vec(),
    };
    let mut bytes = Vec::new();
    frame::encode_message(&mut bytes, &message);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::seqpacket_pair;

    fn relay(payload: usize) -> Message {
        Message {
            route: Route::Relay,
            encoding: Encoding::Json,
            failed: false,
            from: 0,
            id: 0,
            payload: vec![b' '; payload],
        }
    }

    #[tokio::test]
    async fn a_worker_that_reads_nothing_costs_the_master_at_most_its_queue() {
        let post = Post::default();
        let (sender, _sender_peer) = seqpacket_pair().unwrap();
        let (slow, _slow_peer) = seqpacket_pair().unwrap();
        post.open(
            0,
            1,
            Rc::new(Channel::new(sender).unwrap()),
            Rc::new(Notify::new()),
        );
        post.open(
            1,
            2,
            Rc::new(Channel::new(slow).unwrap()),
            Rc::new(Notify::new()),
        );
        // Worker 1 relays 60 KiB messages to worker 2, which never reads.
        for _ in 0..200 {
            post.route(0, 1, Ok(relay(60 * 1024)));
        }
        let counters = post.counters();
        assert_eq!(counters.received, 200);
        assert!(counters.dropped > 0, "{counters:?}");
        assert_eq!(
            counters.delivered + counters.dropped + queued(&post, 2),
            200
        );
        let bytes = post.addresses.borrow()[&2].queued_bytes;
        assert!(bytes <= MAX_QUEUED_BYTES, "{bytes}");
    }

    fn queued(post: &Post, pid: u32) -> u64 {
        post.addresses.borrow()[&pid].queue.len() as u64
    }

    #[tokio::test]
    async fn a_request_nobody_handles_is_answered_with_an_error_at_once() {
        let post = Post::default();
        let (master, worker) = seqpacket_pair().unwrap();
        post.open(
            0,
            1,
            Rc::new(Channel::new(master).unwrap()),
            Rc::new(Notify::new()),
        );
        let mut request = relay(2);
        request.route = Route::Request;
        request.id = 9;
        post.route(0, 1, Ok(request));
        let worker = Channel::new(worker).unwrap();
        let mut buf = crate::ipc::channel::frame_buffer();
        let (frame, _) = worker.recv_frame(&mut buf).await.unwrap();
        let crate::ipc::frame::Frame::Message(Ok(reply)) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(
            (reply.route, reply.id, reply.failed),
            (Route::Reply, 9, true)
        );
        let why = String::from_utf8(reply.payload).unwrap();
        assert!(why.contains("no master handler"), "{why}");
        assert_eq!(post.counters().dropped, 1);
    }

    #[tokio::test]
    async fn a_handler_that_falls_behind_loses_messages_it_cannot_hold_not_the_master() {
        let post = Post::default();
        let (master, _worker) = seqpacket_pair().unwrap();
        post.open(
            0,
            1,
            Rc::new(Channel::new(master).unwrap()),
            Rc::new(Notify::new()),
        );
        let mut inbox = post.attach_handler();
        let mut message = relay(1);
        message.route = Route::ToMaster;
        for _ in 0..HANDLER_CAPACITY + 10 {
            post.route(0, 1, Ok(message.clone()));
        }
        assert_eq!(post.counters().dropped, 10);
        let mut held = 0;
        while inbox.try_recv().is_ok() {
            held += 1;
        }
        assert_eq!(held, HANDLER_CAPACITY);
    }

    #[test]
    fn dropped_messages_log_ten_lines_a_second_and_sum_up_the_rest() {
        let budget = LogBudget::default();
        let start = Instant::now();
        for _ in 0..MAX_DROP_LINES {
            assert_eq!(budget.spend(start), Some(0));
        }
        assert_eq!(budget.spend(start), None);
        assert_eq!(budget.spend(start + Duration::from_millis(500)), None);
        assert_eq!(
            budget.spend(start + Duration::from_secs(1)),
            Some(2),
            "the next window's first line counts what was silenced"
        );
    }
}
