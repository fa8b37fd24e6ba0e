//! Unit tests of the worker table: dispatch, acknowledgements, loss, and the slot life
//! cycle (successor, take-over, retiring, scaling).

use super::*;
use crate::balance::Strategy;
use crate::ipc::frame::Status;
use crate::ipc::Channel;
use crate::supervise::Limits;
use crate::sys::socket::seqpacket_pair;

fn table(workers: usize, max_pending: usize) -> (Table, Vec<OwnedFd>) {
    let config = Config {
        workers,
        max_pending,
        strategy: Strategy::RoundRobin,
        ..Config::default()
    };
    let mut table = Table::new(Rc::new(config));
    let mut worker_ends = Vec::new();
    for (i, slot) in table.slots.iter_mut().enumerate() {
        let (master, worker) = seqpacket_pair().unwrap();
        let mut p = Process::new(1000 + i as u32, Channel::new(master).unwrap());
        p.phase = Phase::Ready;
        slot.process = Some(p);
        worker_ends.push(worker);
    }
    (table, worker_ends)
}

fn connection() -> OwnedFd {
    seqpacket_pair().unwrap().0
}

#[tokio::test]
async fn stops_accepting_at_the_pending_cap_and_resumes_on_ack() {
    let (mut t, _ends) = table(2, 3);
    for _ in 0..6 {
        assert!(t.can_accept());
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(!t.can_accept(), "both workers at their cap of 3");
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(2, 10);
    for _ in 0..4 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(1, 10);
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
    let (mut t, _ends) = table(1, 10);
    t.accepted(connection(), 0, Peer::Unix);
    t.flush_all();
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
    let (mut t, _ends) = table(1, 10);
    let err = t
        .on_frame(0, 1000, Frame::Connections(Vec::new()))
        .unwrap_err();
    assert!(matches!(err, Lost::Protocol(_)));
}

#[tokio::test]
async fn load_counts_assigned_minus_finished() {
    let (mut t, _ends) = table(1, 10);
    for _ in 0..3 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    t.flush_all();
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
    let (mut t, _ends) = table(1, 10);
    t.slots[0].process.as_mut().unwrap().phase = Phase::Starting;
    assert!(!t.can_accept());
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(t.retry_len(), 1);
    t.on_frame(0, 1000, Frame::Ready).unwrap();
    assert_eq!(t.retry_len(), 0);
}

/// A process for slot `index` in phase `phase`, registered as live; returns the worker's
/// end of its channel.
fn add_process(t: &mut Table, index: usize, pid: u32, successor: bool) -> OwnedFd {
    let (master, worker) = seqpacket_pair().unwrap();
    let p = Process::new(pid, Channel::new(master).unwrap());
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
    worker
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
    let (mut t, ends) = table(1, 10);
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
    let new_end = add_process(&mut t, 0, 2000, true);
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
    assert!(t.flush_all().is_empty());
    let old = Channel::new(ends.into_iter().next().unwrap()).unwrap();
    let mut buf = crate::ipc::channel::frame_buffer();
    let (frame, fds) = old.try_recv_frame(&mut buf).unwrap().unwrap();
    assert!(
        matches!(frame, Frame::Connections(ref c) if c.len() == 2),
        "{frame:?}"
    );
    assert_eq!(fds.len(), 2);
    assert!(
        old.try_recv_frame(&mut buf).unwrap_err().is_closed(),
        "then the end"
    );
    drop(new_end);
}

#[tokio::test]
async fn the_connection_limit_asks_for_a_replacement_once() {
    let (mut t, _ends) = table(2, 100);
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
    let (mut t, _ends) = table(1, 10);
    t.accepted(connection(), 0, Peer::Unix);
    t.recycle(0, Reason::MaxAge);
    let _new = add_process(&mut t, 0, 2000, true);
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
    let (mut t, _ends) = table(1, 10);
    for _ in 0..3 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    t.flush_all();
    ack(&mut t, 0, 1000, 1, 0);
    t.recycle(0, Reason::Restart);
    let _new = add_process(&mut t, 0, 2000, true);
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
    let (mut t, _ends) = table(2, 10);
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
    let (mut t, _ends) = table(2, 10);
    t.recycle(0, Reason::MaxAge);
    let _new = add_process(&mut t, 0, 2000, true);
    t.drain_all();
    let all: Vec<&Process> = t.slots.iter().flat_map(Slot::processes).collect();
    assert_eq!(all.len(), 3);
    assert!(all
        .iter()
        .all(|p| p.phase == Phase::Draining && p.drain_deadline.is_none()));
    t.stopping = true;
    assert!(!t.wants_start(1));
}

#[tokio::test]
async fn a_full_channel_keeps_connections_in_the_outbox_until_the_worker_reads() {
    let (mut t, ends) = table(1, 1000);
    let mut sent_before_full = None;
    for i in 0..10_000 {
        t.accepted(connection(), 0, Peer::Unix);
        match t.flush(0, 1000) {
            Flush::Done => {}
            Flush::Blocked => {
                sent_before_full = Some(i);
                break;
            }
            Flush::Short(e) | Flush::Broken(e) => panic!("{e}"),
        }
    }
    let sent = sent_before_full.expect("a worker that reads nothing fills its channel");
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!(
        (p.unacked.len(), p.outbox.len()),
        (sent, 1),
        "nothing lost, nothing sent twice"
    );
    assert!(
        !p.wants_flush(),
        "the writer task retries, not every accept"
    );

    let mut buf = crate::ipc::channel::frame_buffer();
    let mut arrived = 0;
    while let Ok(got) = crate::sys::scm::recv_with_fds(&ends[0], &mut buf) {
        arrived += got.fds.len();
    }
    assert_eq!(arrived, sent);
    assert!(matches!(t.flush(0, 1000), Flush::Done));
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!((p.unacked.len(), p.outbox.len()), (sent + 1, 0));
}

#[test]
fn resource_shortages_on_send_are_not_the_worker_s_fault() {
    use crate::master::process::is_shortage;
    let err = std::io::Error::from_raw_os_error;
    assert!(is_shortage(&err(libc::ETOOMANYREFS)));
    assert!(is_shortage(&err(libc::ENOBUFS)));
    assert!(is_shortage(&err(libc::ENOMEM)));
    assert!(!is_shortage(&err(libc::EPIPE)));
    assert!(!is_shortage(&err(libc::EBADF)));
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
    let (mut t, _ends) = table(2, 100);
    for _ in 0..6 {
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.flush_all().is_empty());
    assert!(matches!(
        refused(&mut t, 1000, 1, 0, 1),
        Err(Lost::Protocol(_))
    ));
}

#[tokio::test]
async fn the_ack_clock_runs_only_while_connections_wait_unacknowledged() {
    let (mut t, _ends) = table(1, 100);
    let waiting = |t: &Table| t.slots[0].process.as_ref().unwrap().ack_wait_since();
    assert_eq!(waiting(&t), None);
    t.accepted(connection(), 0, Peer::Unix);
    assert_eq!(waiting(&t), None, "accepted, not sent yet");
    assert!(t.flush_all().is_empty());
    let since = waiting(&t).expect("sent and unacknowledged");
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(1, 100);
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.flush_all().is_empty());
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
    let (mut t, _ends) = table(2, 100);
    t.set_fd_room(FDS_PER_SLOT * 2 + 3);
    assert_eq!(t.max_held(), 3);
    for _ in 0..3 {
        assert!(t.can_accept());
        t.accepted(connection(), 0, Peer::Unix);
    }
    assert!(!t.can_accept(), "3 held of 3");
    assert!(t.flush_all().is_empty());
    ack(&mut t, 0, 1000, 2, 0);
    assert_eq!(t.held(), 1, "acknowledged copies are closed");
    assert!(t.can_accept());
    assert_eq!(t.max_held_with(3), 0, "a third worker would leave no room");
}

#[tokio::test]
async fn held_connections_whose_client_left_are_closed_before_any_worker_gets_them() {
    use std::io::Write;
    let (mut t, _ends) = table(1, 100);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let gone = std::net::TcpStream::connect(addr).unwrap();
    let mut talking = std::net::TcpStream::connect(addr).unwrap();
    let _idle = std::net::TcpStream::connect(addr).unwrap();
    talking.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(gone);
    drop(talking);
    // Nobody is ready: all three wait for re-dispatch.
    t.slots[0].process.as_mut().unwrap().phase = Phase::Starting;
    for _ in 0..3 {
        let (stream, _) = listener.accept().unwrap();
        t.accepted(OwnedFd::from(stream), 0, Peer::Unix);
    }
    assert_eq!(t.retry_len(), 3);
    assert!(
        wait_until_dropped(&mut t, 1),
        "the silent client that left is closed"
    );
    assert_eq!((t.retry_len(), t.held(), t.counters.abandoned), (2, 2, 1));
}

/// Sweeps until `count` connections were dropped (the peer's FIN takes a moment to land).
fn wait_until_dropped(t: &mut Table, count: usize) -> bool {
    let mut dropped = 0;
    for _ in 0..500 {
        dropped += t.drop_abandoned();
        if dropped >= count {
            return dropped == count;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

#[tokio::test]
async fn a_worker_that_leaves_connections_unacknowledged_gets_nothing_new_until_it_acknowledges() {
    let (mut t, _ends) = table(2, 100);
    t.accepted(connection(), 0, Peer::Unix);
    assert!(t.flush_all().is_empty());
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

#[tokio::test]
async fn an_abandoned_connection_in_an_outbox_is_no_longer_its_worker_s_load() {
    let (mut t, _ends) = table(1, 100);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (stream, _) = listener.accept().unwrap();
    drop(gone);
    t.accepted(OwnedFd::from(stream), 0, Peer::Unix);
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!(
        (p.outbox.len(), p.active()),
        (1, 1),
        "assigned, not sent yet"
    );
    assert!(wait_until_dropped(&mut t, 1));
    let p = t.slots[0].process.as_ref().unwrap();
    assert_eq!((p.pending(), p.active(), p.assigned()), (0, 0, 0));
}
