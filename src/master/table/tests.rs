//! Unit tests of the worker table: dispatch, acknowledgements, loss, and the slot life
//! cycle (successor, take-over, retiring, scaling). No sockets: the table does no I/O, so a
//! connection is any fd (`/dev/null`) and "sending" is telling the table it was sent.

use std::os::fd::AsRawFd;

use super::handback::HandBackRefused;
use super::*;
use crate::balance::Strategy;
use crate::ipc::frame::Status;
use crate::supervise::Limits;

/// A table of `workers` ready processes (pids 1000, 1001, ...).
fn table(workers: usize, max_pending: usize) -> Table {
    let config = Config {
        workers,
        max_pending,
        strategy: Strategy::RoundRobin,
        ..Config::default()
    };
    let mut table = Table::new(Rc::new(config));
    for (i, slot) in table.slots.iter_mut().enumerate() {
        let mut p = Process::new(1000 + i as u32);
        p.phase = Phase::Ready;
        slot.process = Some(p);
    }
    table
}

/// A stand-in for an accepted connection: any fd will do.
fn connection() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// What one process's channel carried in [`deliver`].
#[derive(Debug, Default, PartialEq, Eq)]
struct Delivered {
    connections: usize,
    ended: bool,
}

/// Sends everything the table wants sent, as if every channel took it; what each process
/// got, by pid.
fn deliver(t: &mut Table) -> HashMap<u32, Delivered> {
    let mut delivered = HashMap::new();
    for (_, p) in t.outgoing() {
        let got: &mut Delivered = delivered.entry(p.pid).or_default();
        loop {
            match p.outgoing(253) {
                Outgoing::Nothing => break,
                Outgoing::Connections(batch) => {
                    let count = batch.len();
                    p.sent(count, Instant::now());
                    got.connections += count;
                }
                Outgoing::HandBack(_) => {
                    p.sent(1, Instant::now());
                    got.connections += 1;
                }
                Outgoing::End => {
                    p.ended();
                    got.ended = true;
                }
            }
        }
    }
    delivered
}

#[tokio::test]
async fn stops_accepting_at_the_pending_cap_and_resumes_on_ack() {
    let mut t = table(2, 3);
    for _ in 0..6 {
        assert!(t.can_accept());
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(!t.can_accept(), "both workers at their cap of 3");
    deliver(&mut t);
    t.on_frame(
        0,
        1000,
        Frame::Status(Status {
            received_total: 2,
            closed_total: 0,
        }),
    )
    .unwrap();
    assert!(t.can_accept());
    assert_eq!(t.slots[0].process.as_ref().unwrap().pending(), 1);
}

#[tokio::test]
async fn a_lost_worker_s_unacknowledged_connections_go_to_another() {
    let mut t = table(2, 10);
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    t.on_frame(
        0,
        1000,
        Frame::Status(Status {
            received_total: 1,
            closed_total: 0,
        }),
    )
    .unwrap();
    assert_eq!(t.lose(0, 1000, &Lost::ChannelClosed), Some(Role::Current));
    let survivor = t.slots[1].process.as_ref().unwrap();
    assert_eq!(
        survivor.pending(),
        3,
        "its own 2 plus the dead worker's 1 unacknowledged"
    );
    assert_eq!(t.counters.redispatched, 1);
    assert_eq!(
        t.lose(0, 1000, &Lost::Exited),
        None,
        "losing twice is a no-op"
    );
}

#[tokio::test]
async fn a_status_acknowledging_unsent_connections_is_a_protocol_error() {
    let mut t = table(1, 10);
    t.accepted(connection(), 0, Peer::Unix);
    let err = t
        .on_frame(
            0,
            1000,
            Frame::Status(Status {
                received_total: 5,
                closed_total: 0,
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Lost::Protocol(_)), "{err}");
}

#[tokio::test]
async fn a_status_finishing_more_than_received_is_a_protocol_error() {
    let mut t = table(1, 10);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    let err = t
        .on_frame(
            0,
            1000,
            Frame::Status(Status {
                received_total: 1,
                closed_total: 2,
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Lost::Protocol(_)), "{err}");
}

#[tokio::test]
async fn a_worker_sending_connections_is_a_protocol_error() {
    let mut t = table(1, 10);
    let err = t
        .on_frame(0, 1000, Frame::Connections(Vec::new()))
        .unwrap_err();
    assert!(matches!(err, Lost::Protocol(_)));
}

#[tokio::test]
async fn load_counts_assigned_minus_finished() {
    let mut t = table(1, 10);
    for _ in 0..3 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    t.on_frame(
        0,
        1000,
        Frame::Status(Status {
            received_total: 3,
            closed_total: 2,
        }),
    )
    .unwrap();
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!((p.active(), p.pending()), (1, 0));
}

#[tokio::test]
async fn with_no_worker_ready_connections_wait_for_redispatch() {
    let mut t = table(1, 10);
    t.slots[0].process.as_mut().unwrap().phase = Phase::Starting;
    assert!(!t.can_accept());
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(t.retry_len(), 1);
    t.on_frame(0, 1000, Frame::Ready).unwrap();
    assert_eq!(t.retry_len(), 0);
}

/// A process for slot `index` in phase `phase`, registered as live; returns the worker's
/// end of its channel.
fn add_process(t: &mut Table, index: usize, pid: u32, successor: bool) {
    let p = Process::new(pid);
    t.live.insert(
        pid,
        Live {
            slot: index,
            fate: Fate::Serving,
            kill_at: None,
        },
    );
    if successor {
        t.slots[index].successor = Some(p);
    } else {
        t.slots[index].process = Some(p);
    }
}

fn ack(t: &mut Table, index: usize, pid: u32, received: u64, closed: u64) {
    t.on_frame(
        index,
        pid,
        Frame::Status(Status {
            received_total: received,
            closed_total: closed,
        }),
    )
    .unwrap();
}

#[tokio::test]
async fn a_successor_s_ready_hands_it_the_slot_and_drains_the_old_process() {
    let mut t = table(1, 10);
    t.live.insert(
        1000,
        Live {
            slot: 0,
            fate: Fate::Serving,
            kill_at: None,
        },
    );
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.recycle(0, Reason::Restart));
    assert!(!t.recycle(0, Reason::MaxAge), "asked for once");
    assert!(t.wants_start(0));
    add_process(&mut t, 0, 2000, true);
    assert!(!t.wants_start(0), "the successor is starting");
    // Until the successor is ready the old process keeps getting connections.
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(t.slots[0].process.as_ref().unwrap().pid, 1000);
    t.on_frame(0, 2000, Frame::Ready).unwrap();
    let slot = &t.slots[0];
    assert_eq!(slot.process.as_ref().unwrap().pid, 2000);
    assert!(slot.successor.is_none());
    assert_eq!(slot.retiring.len(), 1);
    assert_eq!(slot.retiring[0].phase, Phase::Draining);
    assert_eq!(slot.retiring[0].retire, Some(Reason::Restart));
    assert!(slot.retiring[0].drain_deadline.is_some());
    assert_eq!(t.live[&1000].fate, Fate::Draining);
    // New connections go to the successor; the old one's two are sent, then its end.
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(t.slots[0].process.as_ref().unwrap().assigned(), 1);
    let delivered = deliver(&mut t);
    assert_eq!(
        delivered[&1000],
        Delivered {
            connections: 2,
            ended: true
        },
        "the old process's two, then the end of its channel"
    );
    assert_eq!(delivered[&2000].connections, 1);
    assert!(deliver(&mut t).is_empty(), "nothing is sent twice");
}

#[tokio::test]
async fn the_connection_limit_asks_for_a_replacement_once() {
    let mut t = table(2, 100);
    t.slots[0].process.as_mut().unwrap().limits = Limits {
        max_connections: Some(3),
        ..Limits::default()
    };
    for _ in 0..6 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!(p.retire, Some(Reason::MaxConnections));
    assert!(t.slots[1].process.as_ref().unwrap().retire.is_none());
    for _ in 0..6 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert_eq!(
        t.counters.recycled, 1,
        "one replacement, however far past the limit"
    );
    assert_eq!(
        t.slots[0].process.as_ref().unwrap().assigned(),
        6,
        "it keeps serving until the replacement is ready"
    );
}

#[tokio::test]
async fn losing_a_process_being_replaced_promotes_its_starting_successor() {
    let mut t = table(1, 10);
    t.accepted(connection(), 0, Peer::Unix);
    t.recycle(0, Reason::MaxAge);
    add_process(&mut t, 0, 2000, true);
    assert_eq!(t.lose(0, 1000, &Lost::Exited), Some(Role::Current));
    let slot = &t.slots[0];
    assert_eq!(slot.process.as_ref().unwrap().pid, 2000);
    assert_eq!(slot.process.as_ref().unwrap().phase, Phase::Starting);
    assert!(!t.wants_start(0), "the successor fills the slot");
    assert_eq!(
        t.retry_len(),
        1,
        "the lost connection waits for the successor"
    );
    t.on_frame(0, 2000, Frame::Ready).unwrap();
    assert_eq!(t.retry_len(), 0);
    assert!(t.slots[0].retiring.is_empty());
}

#[tokio::test]
async fn losing_a_retiring_process_redispatches_what_it_had_not_acknowledged() {
    let mut t = table(1, 10);
    for _ in 0..3 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    ack(&mut t, 0, 1000, 1, 0);
    t.recycle(0, Reason::Restart);
    add_process(&mut t, 0, 2000, true);
    t.on_frame(0, 2000, Frame::Ready).unwrap();
    assert_eq!(t.lose(0, 1000, &Lost::ChannelClosed), Some(Role::Retiring));
    assert_eq!(t.counters.redispatched, 2);
    assert_eq!(
        t.counters.lost_with_worker, 1,
        "one acknowledged, never finished"
    );
    assert_eq!(t.slots[0].process.as_ref().unwrap().pending(), 2);
}

#[tokio::test]
async fn scaling_down_drains_the_last_slot_and_never_removes_the_last_one() {
    let mut t = table(2, 10);
    assert_eq!(t.remove_slot(), Some(1));
    assert_eq!(t.workers, 1);
    assert!(t.slots[1].process.is_none());
    assert_eq!(t.slots[1].retiring[0].retire, Some(Reason::ScaleDown));
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert_eq!(t.slots[0].process.as_ref().unwrap().assigned(), 4);
    assert_eq!(t.remove_slot(), None, "never below one worker");
    assert_eq!(t.workers, 1);
    assert!(!t.wants_start(1), "a removed slot starts nothing");
    assert_eq!(t.add_slot(), 1, "the removed slot is reused");
    assert!(t.wants_start(1));
    assert_eq!(t.add_slot(), 2);
    assert_eq!((t.slots.len(), t.workers), (3, 3));
    t.accepted(connection(), 0, Peer::Unix);
}

#[tokio::test]
async fn a_stopping_master_drains_everything_without_a_drain_deadline() {
    let mut t = table(2, 10);
    t.recycle(0, Reason::MaxAge);
    add_process(&mut t, 0, 2000, true);
    t.drain_all();
    let all: Vec<&Process> = t.slots.iter().flat_map(Slot::processes).collect();
    assert_eq!(all.len(), 3);
    assert!(all
        .iter()
        .all(|p| p.phase == Phase::Draining && p.drain_deadline.is_none()));
    t.stopping = true;
    assert!(!t.wants_start(1));
}

fn refused(t: &mut Table, pid: u32, received: u64, closed: u64, count: u16) -> Result<Heard, Lost> {
    t.on_frame(
        0,
        pid,
        Frame::Refused {
            status: Status {
                received_total: received,
                closed_total: closed,
            },
            count,
        },
    )
}

#[tokio::test]
async fn a_worker_out_of_fds_hands_back_what_it_refused_and_gets_nothing_until_it_frees_one() {
    let mut t = table(2, 100);
    for _ in 0..6 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    // Worker 0 got 3 (ids 0, 2, 4), took the first and refused the other two.
    refused(&mut t, 1000, 1, 0, 2).unwrap();
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!((p.pending(), p.active(), p.totals()), (0, 1, (1, 0)));
    assert_eq!(t.counters.refused, 2);
    let p1 = t.slots[1].process.as_ref().unwrap();
    assert_eq!(p1.pending(), 5, "both refused went to worker 1");
    let ids: Vec<u64> = p1.outbox.iter().map(|c| c.id).collect();
    assert_eq!(ids, [2, 4], "oldest first");
    assert_eq!(t.held(), 5, "nothing closed, nothing lost");
    // Full: new connections go elsewhere, until it reports one finished.
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert_eq!(t.slots[0].process.as_ref().unwrap().pending(), 0);
    ack(&mut t, 0, 1000, 1, 1);
    t.accepted(connection(), 0, Peer::Unix);
    t.accepted(connection(), 0, Peer::Unix);
    assert!(
        t.slots[0].process.as_ref().unwrap().pending() > 0,
        "it has room again"
    );
}

#[tokio::test]
async fn a_lone_full_worker_gets_connections_again_after_the_pause() {
    let mut t = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    refused(&mut t, 1000, 0, 0, 1).unwrap();
    assert_eq!(t.retry_len(), 1, "nobody else can take it: it waits");
    assert!(
        !t.can_accept(),
        "the kernel backlog holds the rest meanwhile"
    );
    assert!(!t.end_full_pauses(Instant::now() - std::time::Duration::from_secs(1)));
    assert!(t.end_full_pauses(Instant::now()));
    assert_eq!(
        (
            t.retry_len(),
            t.slots[0].process.as_ref().unwrap().pending()
        ),
        (0, 1)
    );
}

#[tokio::test]
async fn refusing_more_than_it_holds_unacknowledged_is_a_protocol_error() {
    let mut t = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    assert!(matches!(
        refused(&mut t, 1000, 1, 0, 1),
        Err(Lost::Protocol(_))
    ));
}

#[tokio::test]
async fn the_ack_clock_runs_only_while_connections_wait_unacknowledged() {
    let mut t = table(1, 100);
    let waiting = |t: &Table| t.slots[0].process.as_ref().unwrap().ack_wait_since();
    assert_eq!(waiting(&t), None);
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(waiting(&t), None, "accepted, not sent yet");
    deliver(&mut t);
    let since = waiting(&t).expect("sent and unacknowledged");
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    assert_eq!(
        waiting(&t),
        Some(since),
        "more sent: the oldest wait counts"
    );
    ack(&mut t, 0, 1000, 1, 0);
    assert!(waiting(&t).unwrap() >= since, "progress restarts the clock");
    ack(&mut t, 0, 1000, 2, 0);
    assert_eq!(waiting(&t), None, "all acknowledged");
}

#[tokio::test]
async fn heartbeats_and_repeated_reports_are_told_from_news() {
    let mut t = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    let status = |r, c| {
        Frame::Status(Status {
            received_total: r,
            closed_total: c,
        })
    };
    assert_eq!(t.on_frame(0, 1000, status(0, 0)).unwrap(), Heard::Repeat);
    assert_eq!(t.on_frame(0, 1000, status(1, 0)).unwrap(), Heard::News);
    assert_eq!(t.on_frame(0, 1000, status(1, 0)).unwrap(), Heard::Repeat);
    assert_eq!(t.on_frame(0, 1000, status(1, 1)).unwrap(), Heard::News);
    assert_eq!(
        t.on_frame(0, 1000, Frame::Ready).unwrap(),
        Heard::Repeat,
        "already ready"
    );
}

#[tokio::test]
async fn at_the_fd_budget_the_master_stops_accepting_and_resumes_as_connections_leave() {
    let mut t = table(2, 100);
    t.set_fd_room(FDS_PER_SLOT * 2 + 3);
    assert_eq!(t.max_held(), 3);
    for _ in 0..3 {
        assert!(t.can_accept());
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(!t.can_accept(), "3 held of 3");
    deliver(&mut t);
    ack(&mut t, 0, 1000, 2, 0);
    assert_eq!(t.held(), 1, "acknowledged copies are closed");
    assert!(t.can_accept());
    assert_eq!(t.max_held_with(3), 0, "a third worker would leave no room");
}

#[test]
fn held_connections_whose_client_left_are_closed_before_any_worker_gets_them() {
    let mut t = table(1, 100);
    // Nobody is ready: all three wait for re-dispatch.
    t.slots[0].process.as_mut().unwrap().phase = Phase::Starting;
    let fds: Vec<OwnedFd> = (0..3).map(|_| connection()).collect();
    let gone = fds[1].as_raw_fd();
    for fd in fds {
        t.accepted(fd, 0, Peer::Unix);
    }
    assert_eq!(t.retry_len(), 3);
    assert_eq!(t.drop_abandoned(|fd| fd.as_raw_fd() == gone), 1);
    assert_eq!((t.retry_len(), t.held(), t.counters.abandoned), (2, 2, 1));

    // One sent to a ready worker is the worker's to read, gone or not; one still in an
    // outbox is closed.
    t.slots[0].process.as_mut().unwrap().phase = Phase::Ready;
    t.redispatch();
    deliver(&mut t);
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(t.drop_abandoned(|_| true), 1, "only the unsent one");
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!(
        (p.pending(), p.active()),
        (2, 2),
        "never sent, never its load"
    );
}

#[tokio::test]
async fn a_worker_that_leaves_connections_unacknowledged_gets_nothing_new_until_it_acknowledges() {
    let mut t = table(2, 100);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    // Worker 0 got one and has not acknowledged it for longer than the stall.
    let stall = t.config.ack_stall();
    t.slots[0].process.as_mut().unwrap().ack_wait_since = Some(Instant::now() - stall * 2);
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert_eq!(
        t.slots[0].process.as_ref().unwrap().pending(),
        1,
        "nothing new for it"
    );
    assert_eq!(t.slots[1].process.as_ref().unwrap().pending(), 4);
    ack(&mut t, 0, 1000, 1, 0);
    t.accepted(connection(), 0, Peer::Unix);
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(
        t.slots[0].process.as_ref().unwrap().pending(),
        1,
        "it takes its share again"
    );
}

/// Process `pid` of slot 0 shares its totals in memory; returns the worker's mapping.
fn share_counters(t: &mut Table, pid: u32) -> crate::sys::shm::Counters {
    let worker = crate::sys::shm::Counters::create().unwrap();
    let master =
        crate::sys::shm::Counters::map(worker.fd().unwrap().try_clone_to_owned().unwrap()).unwrap();
    t.find_mut(0, pid).unwrap().attach_counters(master);
    worker
}

#[test]
fn totals_shared_in_memory_release_copies_and_loads_without_a_frame() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = table(1, 100);
    let worker = share_counters(&mut t, 1000);
    for _ in 0..3 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    assert!(t.sync().is_empty());
    assert_eq!(t.held(), 3, "nothing acknowledged yet");
    worker.region().received.fetch_add(3, SeqCst);
    worker.region().closed.fetch_add(1, SeqCst);
    assert!(t.sync().is_empty());
    let p = t.find(0, 1000).unwrap();
    assert_eq!((t.held(), p.active()), (0, 2), "copies closed, load read");
    // A frame older than the memory changes nothing, and is no violation.
    ack(&mut t, 0, 1000, 2, 0);
    assert_eq!(t.find(0, 1000).unwrap().totals(), (3, 1));
}

#[test]
fn copies_acknowledged_in_memory_are_awaited_until_the_counters_are_read() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = table(2, 100);
    let worker = share_counters(&mut t, 1000);
    assert!(!t.awaiting_shared_acks(), "nothing sent");
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(!t.awaiting_shared_acks(), "nothing sent yet");
    deliver(&mut t);
    assert!(
        t.awaiting_shared_acks(),
        "slot 0's copies wait for its counters"
    );
    // Received in the channel's order: 1 of slot 0's 2 so far.
    worker.region().received.fetch_add(1, SeqCst);
    assert!(t.sync().is_empty());
    assert!(t.awaiting_shared_acks(), "one copy left");
    worker.region().received.fetch_add(1, SeqCst);
    assert!(t.sync().is_empty());
    assert!(
        !t.awaiting_shared_acks(),
        "slot 1 acknowledges by frames: its copies wake the master themselves"
    );
    assert_eq!(t.held(), 2, "slot 1's copies are still held");
    // A worker that dies before receiving loses nothing: its copies go to another worker.
    t.accepted(connection(), 0, Peer::Unix);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    assert!(t.awaiting_shared_acks());
    t.lose(0, 1000, &Lost::Exited);
    assert!(!t.awaiting_shared_acks());
    assert_eq!(t.counters.redispatched, 1, "the one it never took");
}

#[test]
fn a_refusal_in_memory_waits_for_its_refused_frame() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = table(1, 100);
    let worker = share_counters(&mut t, 1000);
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    // The worker took 2 of the 4 and refused 2; then got 0 more. Until the REFUSED frame
    // comes, "received 2" could hide a refusal: the table waits.
    worker.region().refused.fetch_add(2, SeqCst);
    worker.region().received.fetch_add(2, SeqCst);
    assert!(t.sync().is_empty());
    assert_eq!(t.find(0, 1000).unwrap().totals(), (0, 0), "not applied yet");
    refused(&mut t, 1000, 2, 0, 2).unwrap();
    assert_eq!(t.retry_len(), 2, "the refused two go to another worker");
    assert!(t.sync().is_empty());
    assert_eq!(t.find(0, 1000).unwrap().totals(), (2, 0));
}

#[test]
fn totals_in_memory_that_break_the_protocol_lose_the_worker() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = table(1, 100);
    let worker = share_counters(&mut t, 1000);
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    worker.region().received.store(5, SeqCst);
    let broken = t.sync();
    assert_eq!(broken.len(), 1);
    assert!(
        matches!(broken[0].2, Lost::Protocol(_)),
        "{:?}",
        broken[0].2
    );
}

#[test]
fn the_master_asks_for_a_frame_only_of_workers_that_owe_acknowledgements() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut t = table(1, 100);
    let worker = share_counters(&mut t, 1000);
    t.ask_for_reports();
    assert_eq!(worker.region().wake.0.load(SeqCst), 0, "nothing owed");
    t.accepted(connection(), 0, Peer::Unix);
    deliver(&mut t);
    t.ask_for_reports();
    assert_eq!(worker.region().wake.0.load(SeqCst), 1);
}

/// Slot 0's process 1000 got `sent` connections and acknowledged them, then was replaced
/// by 2000 (ready) and drains.
fn draining_with(sent: usize) -> Table {
    let mut t = table(1, 10);
    for _ in 0..sent {
        t.accepted(connection(), 0, Peer::Unix);
    }
    deliver(&mut t);
    ack(&mut t, 0, 1000, sent as u64, 0);
    assert!(t.recycle(0, Reason::Restart));
    add_process(&mut t, 0, 2000, true);
    t.on_frame(0, 2000, Frame::Ready).unwrap();
    deliver(&mut t);
    t
}

#[tokio::test]
async fn a_draining_worker_s_handback_goes_to_another_worker_with_its_bytes_first() {
    let mut t = draining_with(2);
    let peer = Peer::Ip("127.0.0.1:4000".parse().unwrap());
    t.handed_back(0, 1000, connection(), (0, peer), b"GET /".to_vec())
        .unwrap();
    t.handed_back(0, 1000, connection(), (0, peer), Vec::new())
        .unwrap();
    assert_eq!(t.counters.handed_back, 2);
    assert_eq!(t.find(0, 1000).unwrap().handed_back(), 2);
    let new = t.find_mut(0, 2000).unwrap();
    assert_eq!(new.assigned(), 2, "the successor's load");
    match new.outgoing(253) {
        Outgoing::HandBack(conn) => {
            assert_eq!(&*conn.prefix, b"GET /");
            assert_eq!(conn.peer, peer);
        }
        other => panic!("{other:?}"),
    }
    new.sent(1, Instant::now());
    match new.outgoing(253) {
        Outgoing::Connections(batch) => assert_eq!(batch.len(), 1, "no bytes: CONNECTIONS"),
        other => panic!("{other:?}"),
    }
    new.sent(1, Instant::now());
    ack(&mut t, 0, 2000, 2, 0);
    assert_eq!(t.held(), 0, "acknowledged like any connection");
}

#[tokio::test]
async fn a_connection_with_bytes_ends_a_batch_and_travels_alone() {
    let mut t = draining_with(1);
    let peer = Peer::Unix;
    t.accepted(connection(), 0, peer);
    t.handed_back(0, 1000, connection(), (0, peer), b"x".to_vec())
        .unwrap();
    t.accepted(connection(), 0, peer);
    let new = t.find_mut(0, 2000).unwrap();
    let mut frames = Vec::new();
    loop {
        match new.outgoing(253) {
            Outgoing::Connections(batch) => {
                let n = batch.len();
                frames.push(("connections", n));
                new.sent(n, Instant::now());
            }
            Outgoing::HandBack(_) => {
                frames.push(("handback", 1));
                new.sent(1, Instant::now());
            }
            _ => break,
        }
    }
    assert_eq!(
        frames,
        [("connections", 1), ("handback", 1), ("connections", 1)],
        "accept order kept"
    );
}

#[tokio::test]
async fn handbacks_are_refused_from_a_serving_worker_past_what_it_was_sent_and_while_stopping() {
    let mut t = draining_with(1);
    let peer = Peer::Unix;
    assert_eq!(
        t.handed_back(0, 2000, connection(), (0, peer), Vec::new())
            .err(),
        Some(HandBackRefused::NotDraining)
    );
    t.handed_back(0, 1000, connection(), (0, peer), Vec::new())
        .unwrap();
    assert_eq!(
        t.handed_back(0, 1000, connection(), (0, peer), Vec::new())
            .err(),
        Some(HandBackRefused::MoreThanSent(1)),
        "a flood is bounded by what the worker got"
    );
    assert_eq!(
        t.handed_back(0, 4242, connection(), (0, peer), Vec::new())
            .err(),
        Some(HandBackRefused::Gone)
    );
    t.stopping = true;
    assert_eq!(
        t.handed_back(0, 1000, connection(), (0, peer), Vec::new())
            .err(),
        Some(HandBackRefused::Stopping)
    );
    assert_eq!(t.counters.handed_back, 1);
    assert_eq!(t.counters.handbacks_refused, 4);
    assert_eq!(t.handbacks_refused(0, 1000), 2);
}

#[tokio::test]
async fn after_a_hand_over_handbacks_go_on_to_the_new_master_even_while_stopping() {
    let mut t = draining_with(1);
    t.onward = true;
    t.stopping = true;
    let peer = Peer::Unix;
    let onward = t
        .handed_back(0, 1000, connection(), (0, peer), b"GET".to_vec())
        .unwrap()
        .expect("passed on, not queued here");
    assert_eq!((onward.listener, &onward.prefix[..]), (0, &b"GET"[..]));
    assert_eq!(t.retry_len(), 0);
    assert_eq!(t.counters.handed_back, 1);
    // Still bounded by what the worker was sent.
    assert_eq!(
        t.handed_back(0, 1000, connection(), (0, peer), Vec::new())
            .err(),
        Some(HandBackRefused::MoreThanSent(1))
    );
}

#[tokio::test]
async fn a_connection_passed_on_by_the_replaced_master_is_assigned_with_its_bytes() {
    let mut t = draining_with(1);
    let peer = Peer::Unix;
    assert!(t
        .inherited(connection(), (0, peer), b"GET /".to_vec())
        .unwrap()
        .is_none());
    let new = t.find_mut(0, 2000).unwrap();
    assert_eq!(new.pending(), 1);
    assert!(matches!(new.outgoing(253), Outgoing::HandBack(c) if &*c.prefix == b"GET /"));
    t.stopping = true;
    assert_eq!(
        t.inherited(connection(), (0, peer), Vec::new()).err(),
        Some(HandBackRefused::Stopping)
    );
    // Handed over in turn: it goes on to the newest master, bytes and all.
    t.onward = true;
    let onward = t
        .inherited(connection(), (0, peer), b"GET /x".to_vec())
        .unwrap()
        .expect("passed on");
    assert_eq!((onward.listener, &onward.prefix[..]), (0, &b"GET /x"[..]));
}

#[tokio::test]
async fn a_handback_waits_for_a_worker_when_none_can_take_it() {
    let mut t = draining_with(1);
    // The successor is lost too: nobody takes connections now.
    t.lose(0, 2000, &Lost::Exited);
    let peer = Peer::Unix;
    t.handed_back(0, 1000, connection(), (0, peer), b"GET".to_vec())
        .unwrap();
    assert_eq!(t.retry_len(), 1, "kept for the next worker");
    assert!(!t.can_accept());
    add_process(&mut t, 0, 3000, false);
    t.on_frame(0, 3000, Frame::Ready).unwrap();
    assert_eq!(t.retry_len(), 0);
    assert_eq!(t.find(0, 3000).unwrap().pending(), 1);
}
