//! The worker-facing I/O of the master: each worker process's link (its channel, a task
//! reading frames in, a task writing its outbox out when the channel was full), sending
//! what the [`Table`](super::table::Table) says each channel should carry, and giving up on a worker whose
//! channel broke. The table decides; this room does the syscalls.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::spawn_local;

use super::ctx::{Ctx, Link, Scratch};
use super::table::{Fate, Heard, Lost, Outgoing, Pending, Process, ProtocolError};
use crate::ipc::channel::frame_buffer;
use crate::ipc::frame::{self, Frame};
use crate::ipc::{Channel, ChannelError};
use crate::sys;
use crate::sys::shm::Counters;
use crate::sys::socket::Peer;

/// The result of sending what a process's channel should carry.
#[derive(Debug)]
pub(crate) enum Flush {
    Done,
    /// The worker's queue is full: retry when the channel is writable.
    Blocked,
    /// The kernel is short of a resource that is not the worker's fault (in-flight fd
    /// limit, buffers): retry after a pause.
    Short(io::Error),
    Broken(io::Error),
}

/// `sendmsg` errors that say the system, not the worker, is short of something:
/// `ETOOMANYREFS` (this user's in-flight fd limit, `RLIMIT_NOFILE`), `ENOBUFS`, `ENOMEM`.
fn is_shortage(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ETOOMANYREFS | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Sends what `process`'s channel should carry now: its outbox, up to 253 fds per
/// `sendmsg`, and once a draining process's outbox is empty, the end of the channel.
pub(crate) fn transmit(
    process: &mut Process,
    channel: &Channel,
    writer: &Notify,
    scratch: &mut Scratch,
) -> Flush {
    loop {
        // Node takes one connection at a time, the next once the last is acknowledged (the
        // acknowledgement's frame flushes again).
        let room = channel.room();
        if room == 0 {
            return Flush::Done;
        }
        let result = match process.outgoing(room) {
            Outgoing::Nothing => return Flush::Done,
            Outgoing::Connections(batch) => {
                frame::encode_connections(&mut scratch.frame, batch.iter().map(Pending::header));
                // Borrowed for this one sendmsg; the table keeps owning them.
                let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|c| c.fd.as_fd()).collect();
                let count = batch.len();
                channel
                    .try_send(&scratch.frame, &fds)
                    .map(|()| process.sent(count, Instant::now()))
            }
            Outgoing::HandBack(conn) => {
                frame::encode_hand_back(&mut scratch.frame, conn.header(), &conn.prefix);
                channel
                    .try_send(&scratch.frame, &[conn.fd.as_fd()])
                    .map(|()| process.sent(1, Instant::now()))
            }
            Outgoing::End => channel.close_sending().map(|()| process.ended()),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                process.blocked();
                writer.notify_one();
                return Flush::Blocked;
            }
            Err(e) if is_shortage(&e) => {
                process.blocked();
                writer.notify_one();
                return Flush::Short(e);
            }
            Err(e) => return Flush::Broken(e),
        }
    }
}

/// Sends everything that can go now; a worker whose channel broke is given up on.
pub(crate) fn flush(ctx: &Ctx) {
    loop {
        let broken = send_all(ctx);
        if broken.is_empty() {
            let table = ctx.table.borrow();
            ctx.handout.steer(&table);
            // Once armed, the release task looks again itself: no scan per batch.
            if !table.release_armed.get() && table.awaiting_shared_acks() {
                table.release_armed.set(true);
                table.release.notify_one();
            }
            return;
        }
        for (index, pid, error) in broken {
            give_up(ctx, index, pid, Lost::channel(error.into()));
        }
    }
}

/// One pass of [`transmit`] over every process with something to send; returns those whose
/// channel broke.
fn send_all(ctx: &Ctx) -> Vec<(usize, u32, io::Error)> {
    let mut table = ctx.table.borrow_mut();
    let links = ctx.links.borrow();
    let mut scratch = ctx.scratch.borrow_mut();
    let mut broken = Vec::new();
    for (index, process) in table.outgoing() {
        let Some(link) = links.get(&process.pid) else {
            continue;
        };
        if let Flush::Broken(e) = transmit(process, &link.channel, &link.writer, &mut scratch) {
            broken.push((index, process.pid, e));
        }
    }
    broken
}

/// Applies a frame from process `pid` of slot `index`: COUNTERS and METRICS map the region
/// their fd names (see `sys::shm`), MESSAGE goes to the post, SAMPLES to the cluster's
/// metrics; every other frame goes to the table.
fn apply(
    ctx: &Ctx,
    index: usize,
    pid: u32,
    frame: Frame,
    fds: Vec<OwnedFd>,
) -> Result<Heard, Lost> {
    match frame {
        Frame::Message(message) => {
            ctx.post.route(index, pid, message);
            return Ok(Heard::News);
        }
        Frame::State(request) => {
            super::state::receive(ctx, index, pid, request);
            return Ok(Heard::News);
        }
        Frame::Sync(_) | Frame::Answer(_) => {
            let fault = crate::ipc::state::StateFault::Direction(frame.name());
            ctx.state.drop_one(index, pid, &fault);
            return Ok(Heard::News);
        }
        Frame::Metrics => {
            let fd = fds.into_iter().next().expect("the channel checked: one fd");
            ctx.cluster
                .attach(pid, fd)
                .map_err(|e| Lost::Protocol(ProtocolError(format!("its METRICS region: {e}"))))?;
            return Ok(Heard::News);
        }
        Frame::Samples(samples) => {
            let dropped = ctx.cluster.samples(pid, &samples);
            if dropped > 0 {
                tracing::debug!(
                    worker = index,
                    pid,
                    dropped,
                    "samples of no histogram dropped"
                );
            }
            return Ok(Heard::News);
        }
        Frame::HandBack { entry, bytes } => {
            let fd = fds.into_iter().next().expect("the channel checked: one fd");
            hand_back(ctx, index, pid, entry, fd, bytes);
            return Ok(Heard::News);
        }
        Frame::Counters => {}
        other => return ctx.table.borrow_mut().on_frame(index, pid, other),
    }
    let fd = fds.into_iter().next().expect("the channel checked: one fd");
    let counters = Counters::map(fd)
        .map_err(|e| Lost::Protocol(ProtocolError(format!("its COUNTERS region: {e}"))))?;
    let mut table = ctx.table.borrow_mut();
    let Some(process) = table.find_mut(index, pid) else {
        return Ok(Heard::Repeat);
    };
    if process.shares_counters() {
        return Err(Lost::Protocol(ProtocolError(
            "a second COUNTERS frame".into(),
        )));
    }
    process.attach_counters(counters);
    tracing::debug!(worker = index, pid, "worker shares its counters in memory");
    Ok(Heard::News)
}

/// Takes a connection process `pid` of slot `index` handed back: its fd must be a
/// connected stream socket whose local address is that of the listener the entry names
/// (the peer is read from the socket, not believed); the table decides the rest. A refused
/// connection is closed, counted and logged (the first few of a worker, then every power of
/// two); the worker keeps serving.
fn hand_back(
    ctx: &Ctx,
    index: usize,
    pid: u32,
    entry: frame::ConnectionHeader,
    fd: OwnedFd,
    bytes: Vec<u8>,
) {
    let len = bytes.len();
    let checked = named(ctx, &fd, entry.listener);
    let mut table = ctx.table.borrow_mut();
    let refused = match checked {
        Ok(named) => match table.handed_back(index, pid, fd, named, bytes) {
            Ok(None) => {
                tracing::debug!(worker = index, pid, bytes = len, "connection handed back");
                return;
            }
            // Handed over: it goes on to the new master.
            Ok(Some(onward)) => match super::upgrade::pass_on(ctx, onward) {
                Ok(()) => return,
                Err(why) => {
                    table.refuse_hand_back(index, pid);
                    why.to_string()
                }
            },
            Err(why) => why.to_string(),
        },
        Err(why) => {
            drop(fd);
            table.refuse_hand_back(index, pid);
            why
        }
    };
    let count = table.handbacks_refused(index, pid);
    if count <= 3 || count.is_power_of_two() {
        tracing::warn!(worker = index, pid, reason = %refused, refused = count, "closing a connection the worker handed back");
    }
}

/// Checks that `fd` is a connected stream socket of listener `listener` (its local address
/// that listener's); answers the listener and the peer, read from the socket.
fn named(ctx: &Ctx, fd: &OwnedFd, listener: u16) -> Result<(u16, Peer), String> {
    let (local, peer) = sys::socket::connected_stream(fd)
        .map_err(|e| format!("not a connected stream socket: {e}"))?;
    let listening = ctx.listening.get(usize::from(listener));
    if listening.is_some_and(|name| of_listener(name, local)) {
        Ok((listener, peer))
    } else {
        Err(format!(
            "its local address ({local:?}) is not that of listener {listener}"
        ))
    }
}

/// In a master started by an upgrade: takes a connection the master it replaced passed on
/// (a `carry::tag::CONNECTION` body: the listener's index, then the bytes read from it).
pub(crate) fn inherit(ctx: &Ctx, fd: OwnedFd, body: &[u8]) {
    let result = match body {
        [a, b, prefix @ ..] => {
            let listener = u16::from_le_bytes([*a, *b]);
            named(ctx, &fd, listener).and_then(|named| {
                let mut table = ctx.table.borrow_mut();
                (table.inherited(fd, named, prefix.to_vec())).map_err(|why| why.to_string())
            })
        }
        _ => Err("a frame shorter than its listener".to_owned()),
    };
    let result = match result {
        Ok(Some(onward)) => super::upgrade::pass_on(ctx, onward)
            .map(|()| false)
            .map_err(str::to_owned),
        Ok(None) => Ok(true),
        Err(why) => Err(why),
    };
    match result {
        Ok(false) => {}
        Ok(true) => flush(ctx),
        Err(why) => {
            tracing::warn!(reason = %why, "closing a connection the replaced master passed on")
        }
    }
}

/// Whether a connection whose local address is `local` (`None`: not IP) came through the
/// listener printed as `listening` (an IP address as bound, or `unix:PATH`).
fn of_listener(listening: &str, local: Option<std::net::SocketAddr>) -> bool {
    match (listening.parse::<std::net::SocketAddr>(), local) {
        (Ok(bound), Some(local)) => {
            bound.port() == local.port()
                && (bound.ip().is_unspecified() || bound.ip() == local.ip())
        }
        (Err(_), None) => listening.starts_with("unix:"),
        _ => false,
    }
}

/// Reads the totals the workers share in memory (acknowledgements, finished connections);
/// a worker whose totals break the protocol is given up on.
pub(crate) fn sync(ctx: &Ctx) {
    let broken = ctx.table.borrow_mut().sync();
    for (index, pid, lost) in broken {
        give_up(ctx, index, pid, lost);
    }
}

/// How long after sending the master reads the counters of workers that acknowledge in
/// memory, if nothing (an accept batch) read them before: shorter than a worker's linger
/// of a finished fd (`worker::linger`), so the master's copy is closed before the worker's
/// and the master does not pay the connection's teardown, and short against the ack
/// stall, so a worker is not taken for stalled by acknowledgements nobody read.
const RELEASE_AFTER: Duration = Duration::from_millis(5);

/// Releases the copies of connections that workers acknowledged in memory: woken by a
/// flush that left some, it reads the counters [`RELEASE_AFTER`] later, and again while
/// some remain. At a high rate the accept batches read them first; at a low one this
/// closes each copy within a few ms instead of at the next connection or health tick.
pub(crate) async fn release(ctx: Rc<Ctx>) {
    let release = ctx.table.borrow().release.clone();
    loop {
        release.notified().await;
        loop {
            tokio::time::sleep(RELEASE_AFTER).await;
            sync(&ctx);
            flush(&ctx);
            if !ctx.table.borrow().awaiting_shared_acks() {
                break;
            }
        }
        ctx.table.borrow().release_armed.set(false);
    }
}

/// Links process `pid` of slot `index` to its channel: a task reads its frames into the
/// table, another sends its outbox whenever the channel was full and is writable again.
pub(crate) fn open(ctx: &Rc<Ctx>, index: usize, pid: u32, channel: Channel) {
    let channel = Rc::new(channel);
    let writer = Rc::new(Notify::new());
    let reader = spawn_local(read_channel(ctx.clone(), index, pid, channel.clone()));
    let writing = spawn_local(write_channel(
        ctx.clone(),
        index,
        pid,
        channel.clone(),
        writer.clone(),
    ));
    ctx.post.open(index, pid, channel.clone(), writer.clone());
    let link = Link {
        channel,
        writer,
        tasks: vec![reader.abort_handle(), writing.abort_handle()],
    };
    ctx.links.borrow_mut().insert(pid, link);
}

/// Closes process `pid`'s link (its tasks stop); it has left the table.
pub(crate) fn close(ctx: &Ctx, pid: u32) {
    ctx.post.close(pid);
    ctx.state.close(pid);
    let link = ctx.links.borrow_mut().remove(&pid);
    drop(link);
}

/// Removes a worker whose channel is unusable (killing it, unless it is a draining worker
/// on its way out) and re-dispatches its unacknowledged connections.
pub(crate) fn give_up(ctx: &Ctx, index: usize, pid: u32, why: Lost) {
    if !matches!(why, Lost::Protocol(_)) {
        // Its last acknowledgements decide which connections are its own (lost with it)
        // and which go to another worker; a peer that broke the protocol is not believed.
        read_last_frames(ctx, index, pid);
    }
    let (lost, draining, deadline) = {
        let mut table = ctx.table.borrow_mut();
        let draining = table
            .live
            .get(&pid)
            .is_some_and(|l| l.fate == Fate::Draining);
        let deadline = table.find(index, pid).and_then(|p| p.drain_deadline);
        (table.lose(index, pid, &why).is_some(), draining, deadline)
    };
    close(ctx, pid);
    let exiting = matches!(why, Lost::Exited) || (draining && matches!(why, Lost::ChannelClosed));
    if lost && !exiting {
        let _ = sys::process::signal(pid, libc::SIGKILL);
    }
    if lost && draining && matches!(why, Lost::ChannelClosed) {
        // It closed its channel on its way out; should it linger, its drain deadline holds.
        if let Some(live) = ctx.table.borrow_mut().live.get_mut(&pid) {
            live.kill_at = deadline;
        }
    }
}

/// Applies the frames an exited worker left in its channel that the reader task has not
/// read yet: its last acknowledgements and reports. Connections it acknowledged are its own
/// (lost with it, never handed to another worker, which could find the request already
/// read); those it had not are re-dispatched.
pub(crate) fn read_last_frames(ctx: &Ctx, index: usize, pid: u32) {
    let Some(channel) = ctx.links.borrow().get(&pid).map(|l| l.channel.clone()) else {
        return;
    };
    let mut buf = frame_buffer();
    // A worker that exits with frames of ours unread leaves ECONNRESET on our end, and the
    // kernel reports it once, *before* the frames it had queued for us: read past it.
    let mut reset_seen = false;
    // A live peer could keep sending: read what a full queue holds, not forever.
    for _ in 0..MAX_LAST_FRAMES {
        match channel.try_recv_frame(&mut buf) {
            Ok(Some((frame, fds))) => {
                if apply(ctx, index, pid, frame, fds).is_err() {
                    // Nothing after a broken frame is believed: discard the rest, so a
                    // later call cannot apply it either.
                    while let Ok(Some(_)) = channel.try_recv_frame(&mut buf) {}
                    return;
                }
            }
            Err(ChannelError::Io(e))
                if e.kind() == io::ErrorKind::ConnectionReset && !reset_seen =>
            {
                reset_seen = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
    // What it counted in memory is final and newer than any frame: the memory outlives it.
    let _ = ctx.table.borrow_mut().sync_one(index, pid);
}

async fn read_channel(ctx: Rc<Ctx>, index: usize, pid: u32, channel: Rc<Channel>) {
    let mut buf = frame_buffer();
    let mut repeats = RepeatBudget::default();
    loop {
        // One recvmsg per frame; the one that finds the queue empty clears the readiness
        // (a raw read past it would cost a second empty recvmsg per wake-up).
        let mut message = false;
        let verdict = match channel.recv_frame(&mut buf).await {
            Ok((frame, fds)) => {
                message = matches!(frame, Frame::Message(_));
                apply(&ctx, index, pid, frame, fds)
            }
            Err(e) => Err(Lost::channel(e)),
        };
        if message {
            tokio::task::yield_now().await;
        }
        match verdict {
            Ok(Heard::News) => flush(&ctx),
            Ok(Heard::Repeat) => {
                flush(&ctx);
                if let Some(pause) = repeats.spend(Instant::now()) {
                    if repeats.warn() {
                        tracing::warn!(
                            worker = index,
                            pid,
                            budget = MAX_REPEATS,
                            "worker floods the channel with reports that say nothing new: \
                             reading it only once a second"
                        );
                    }
                    tokio::time::sleep(pause).await;
                }
            }
            Err(lost) => {
                give_up(&ctx, index, pid, lost);
                flush(&ctx);
                return;
            }
        }
    }
}

/// Frames that say nothing new (heartbeats, repeated reports) read from one worker per
/// [`REPEAT_WINDOW`]; a worker sends a few (one heartbeat a period). Past the budget the
/// master stops reading that channel until the window ends: the flooding worker's sends
/// block and the master's thread stays free for the others.
const MAX_REPEATS: u32 = 256;
const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// A worker's budget of frames with nothing new, per window.
#[derive(Debug, Default)]
struct RepeatBudget {
    window: Option<Instant>,
    spent: u32,
    warned: bool,
}

impl RepeatBudget {
    /// Counts one repeat at `now`; past the budget, how long to stop reading.
    fn spend(&mut self, now: Instant) -> Option<Duration> {
        let start = *self.window.get_or_insert(now);
        if now.saturating_duration_since(start) >= REPEAT_WINDOW {
            self.window = Some(now);
            self.spent = 0;
        }
        self.spent += 1;
        let end = self.window.expect("set above") + REPEAT_WINDOW;
        (self.spent > MAX_REPEATS).then(|| end.saturating_duration_since(now))
    }

    /// True the first time only: the flood is logged once per worker.
    fn warn(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }
}

/// The most frames read from a worker that is being given up on.
const MAX_LAST_FRAMES: usize = 1024;

/// How long the writer waits after a resource shortage before it sends again.
const SHORTAGE_PAUSE: Duration = Duration::from_millis(20);

async fn write_channel(
    ctx: Rc<Ctx>,
    index: usize,
    pid: u32,
    channel: Rc<Channel>,
    wake: Rc<tokio::sync::Notify>,
) {
    loop {
        wake.notified().await;
        // Warn once per shortage, not at every retry.
        let mut short = false;
        loop {
            let mut guard = match channel.writable().await {
                Ok(guard) => guard,
                Err(e) => return give_up(&ctx, index, pid, Lost::channel(e.into())),
            };
            let result = match transmit_one(&ctx, index, pid) {
                // Connections first; then the messages that waited for room, then the
                // shared map's answers and changes.
                Flush::Done => match ctx.post.flush(pid).and_then(|all| match all {
                    true => ctx.state.flush(pid),
                    false => Ok(false),
                }) {
                    Ok(true) => Flush::Done,
                    Ok(false) => Flush::Blocked,
                    Err(e) => Flush::Broken(e),
                },
                other => other,
            };
            match result {
                Flush::Done => break,
                Flush::Blocked => guard.clear_ready(),
                Flush::Short(e) => {
                    drop(guard);
                    if !short {
                        tracing::warn!(worker = index, pid, error = %e, "sending to the worker: the system is short of resources, retrying");
                    }
                    short = true;
                    tokio::time::sleep(SHORTAGE_PAUSE).await;
                }
                Flush::Broken(e) => {
                    give_up(&ctx, index, pid, Lost::channel(e.into()));
                    return flush(&ctx);
                }
            }
        }
    }
}

/// Sends process `pid`'s outbox now that its channel is writable.
fn transmit_one(ctx: &Ctx, index: usize, pid: u32) -> Flush {
    let mut table = ctx.table.borrow_mut();
    let links = ctx.links.borrow();
    match (table.find_mut(index, pid), links.get(&pid)) {
        (Some(process), Some(link)) => {
            process.writable();
            transmit(
                process,
                &link.channel,
                &link.writer,
                &mut ctx.scratch.borrow_mut(),
            )
        }
        _ => Flush::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::master::table::{Phase, Table};
    use crate::sys::scm::MAX_FDS;
    use crate::sys::socket::{seqpacket_pair, Peer};

    #[tokio::test]
    async fn a_full_channel_keeps_connections_in_the_outbox_until_the_worker_reads() {
        let config = Config {
            workers: 1,
            max_pending: 100_000,
            ..Config::default()
        };
        let mut t = Table::new(Rc::new(config));
        let mut p = Process::new(1000);
        p.phase = Phase::Ready;
        t.slots[0].process = Some(p);
        let (master, worker) = seqpacket_pair().unwrap();
        let channel = Channel::new(master).unwrap();
        let writer = Notify::new();
        let mut scratch = Scratch::default();
        let mut sent_before_full = None;
        for i in 0..10_000 {
            t.accepted(seqpacket_pair().unwrap().0, 0, Peer::Unix);
            let p = t.find_mut(0, 1000).unwrap();
            match transmit(p, &channel, &writer, &mut scratch) {
                Flush::Done => {}
                Flush::Blocked => {
                    sent_before_full = Some(i);
                    break;
                }
                Flush::Short(e) | Flush::Broken(e) => panic!("{e}"),
            }
        }
        let sent = sent_before_full.expect("a worker that reads nothing fills its channel");
        let p = t.find_mut(0, 1000).unwrap();
        assert_eq!(p.pending(), sent + 1, "nothing lost");
        assert!(
            !p.wants_flush(),
            "the writer task retries, not every accept"
        );
        assert!(matches!(p.outgoing(MAX_FDS), Outgoing::Nothing));

        let mut buf = frame_buffer();
        let mut arrived = 0;
        while let Ok(got) = sys::scm::recv_with_fds(&worker, &mut buf) {
            arrived += got.fds.len();
        }
        assert_eq!(arrived, sent, "nothing sent twice");
        p.writable();
        assert!(matches!(
            transmit(p, &channel, &writer, &mut scratch),
            Flush::Done
        ));
        assert_eq!(p.pending(), sent + 1);
        assert!(matches!(p.outgoing(MAX_FDS), Outgoing::Nothing), "all sent");
    }

    #[test]
    fn resource_shortages_on_send_are_not_the_worker_s_fault() {
        let err = io::Error::from_raw_os_error;
        assert!(is_shortage(&err(libc::ETOOMANYREFS)));
        assert!(is_shortage(&err(libc::ENOBUFS)));
        assert!(is_shortage(&err(libc::ENOMEM)));
        assert!(!is_shortage(&err(libc::EPIPE)));
        assert!(!is_shortage(&err(libc::EBADF)));
    }

    #[test]
    fn repeats_past_the_budget_pause_reading_until_the_window_ends() {
        let mut budget = RepeatBudget::default();
        let start = Instant::now();
        for _ in 0..MAX_REPEATS {
            assert_eq!(budget.spend(start), None);
        }
        let later = start + Duration::from_millis(300);
        assert_eq!(budget.spend(later), Some(Duration::from_millis(700)));
        assert!(budget.warn());
        assert!(!budget.warn(), "logged once");
        let next_window = start + REPEAT_WINDOW;
        assert_eq!(
            budget.spend(next_window),
            None,
            "a new window, a new budget"
        );
    }
}
