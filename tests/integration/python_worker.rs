//! The worker protocol from another language: `handoff run -- python3 examples/worker.py`
//! serves HTTP from every worker, drains and exits 0 on stop, works in the kernel baseline
//! modes, and Python workers that break the protocol (fixtures in `tests/fixtures/`) are
//! killed and replaced while every request is still answered.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::{read_response, wait_until, Held, Master, PATIENCE};

/// A path inside the crate, whatever the current directory.
fn crate_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// Two round-robin workers running `script` with `python3 -B` (no `__pycache__` left behind).
fn start(script: &str) -> Master {
    let script = crate_path(script);
    Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--shutdown-timeout",
        "10s",
        "--",
        "python3",
        "-B",
        &script,
    ])
}

/// Whether a master log line names `pid` as a field (`pid=123`, not `pid=1234`).
fn names_pid(line: &str, pid: u32) -> bool {
    line.split_whitespace()
        .any(|field| field == format!("pid={pid}"))
}

/// Reads until the server closes its side; panics if it does not within the read timeout.
fn assert_closed_by_server(stream: &mut impl Read) {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("the worker closes the connection (FIN) after its last response");
    assert!(
        rest.is_empty(),
        "unexpected bytes after the last response: {rest:?}"
    );
}

#[test]
fn python_workers_answer_from_both() {
    let master = start("examples/worker.py");
    let pids: HashSet<u32> = master.wait_all_ready().into_iter().collect();
    assert_eq!(pids.len(), 2, "two distinct worker pids");

    let mut answers: HashMap<u32, usize> = HashMap::new();
    for _ in 0..20 {
        let response = master.get();
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "hola, mundo\n")
        );
        *answers.entry(response.pid).or_default() += 1;
    }
    let expected: HashMap<u32, usize> = pids.iter().map(|&pid| (pid, 10)).collect();
    assert_eq!(
        answers, expected,
        "round-robin over two workers: 10 answers each"
    );

    // Keep-alive: three answers on one connection, from one worker; then `connection: close`
    // gets its answer and a FIN although the master may still hold a copy of the socket.
    let mut held = Held::open(master.addr).expect("keep-alive connection");
    for _ in 0..2 {
        held.stream
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .unwrap();
        let response =
            read_response(&mut held.stream).expect("another answer on the same connection");
        assert_eq!(
            (response.pid, response.body.as_str()),
            (held.pid, "hola, mundo\n")
        );
    }
    held.stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let last = read_response(&mut held.stream).expect("an answer to the closing request");
    assert_eq!(last.pid, held.pid);
    assert_closed_by_server(&mut held.stream);

    // HTTP/1.0 without keep-alive: one answer, then the worker closes.
    let mut stream = TcpStream::connect_timeout(&master.addr, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let response = read_response(&mut reader).expect("an answer to HTTP/1.0");
    assert_eq!(response.body, "hola, mundo\n");
    assert!(pids.contains(&response.pid));
    assert_closed_by_server(&mut reader);
}

#[test]
fn python_workers_drain_and_exit_zero_when_the_master_stops() {
    let mut master = start("examples/worker.py");
    let pids = master.wait_all_ready();
    let mut idle = Held::open(master.addr).expect("keep-alive connection");

    master.signal("TERM");
    // The master closes each channel; the worker drains: its idle keep-alive connection is
    // closed, it exits 0, and then the master exits.
    assert_closed_by_server(&mut idle.stream);
    let status = master.wait_exit(PATIENCE);
    assert!(
        status.is_some_and(|s| s.success()),
        "master did not stop cleanly: {status:?}; log:\n{}",
        master.log()
    );
    let log = master.log();
    for pid in pids {
        assert!(
            log.lines().any(|line| line.contains("worker exited")
                && names_pid(line, pid)
                && line.contains("code=0")),
            "worker {pid} did not exit 0; log:\n{log}"
        );
    }
}

#[test]
fn python_workers_accept_themselves_in_the_kernel_baseline_modes() {
    for strategy in ["kernel-shared", "kernel-reuseport"] {
        let script = crate_path("examples/worker.py");
        let master = Master::start(&[
            "--workers",
            "2",
            "--strategy",
            strategy,
            "--",
            "python3",
            "-B",
            &script,
        ]);
        let pids: HashSet<u32> = master.wait_all_ready().into_iter().collect();
        for _ in 0..20 {
            let response = master.get();
            assert_eq!(
                (response.status, response.body.as_str()),
                (200, "hola, mundo\n"),
                "{strategy}"
            );
            assert!(
                pids.contains(&response.pid),
                "{strategy}: answer from {}",
                response.pid
            );
        }
        // The workers count what they accepted themselves in their STATUS reports.
        let mut status = None;
        let reported = wait_until(PATIENCE, || {
            let workers = master.status()["workers"].clone();
            let sum = |field: &str| {
                workers
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w[field].as_u64().unwrap())
                    .sum::<u64>()
            };
            let done = sum("assigned") == 20 && sum("finished") == 20;
            status = Some(workers);
            done
        });
        assert!(
            reported,
            "{strategy}: reports {status:?}; log:\n{}",
            master.log()
        );
    }
}

/// Slot 0's first process breaks the protocol when its first connection arrives (see
/// `tests/fixtures/misbehave.py`). The master must log it, count it, kill that process, hand
/// its unacknowledged connection to slot 1, and start a replacement; every request succeeds.
fn a_misbehaving_worker_is_replaced(fixture: &str, logged: &str) {
    let master = start(fixture);
    let pids = master.worker_pids();
    let (bad, good) = (pids[0].unwrap(), pids[1].unwrap());

    let mut replaced = false;
    let deadline = std::time::Instant::now() + PATIENCE;
    while !replaced && std::time::Instant::now() < deadline {
        let response = master.get();
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "hola, mundo\n")
        );
        assert_ne!(response.pid, bad, "the misbehaving worker never serves");
        replaced = master.worker_pids()[0].is_some_and(|pid| pid != bad);
    }
    assert!(replaced, "slot 0 was not replaced; log:\n{}", master.log());
    assert!(
        wait_until(PATIENCE, || !crate::util::process_exists(bad)),
        "the misbehaving worker {bad} still runs"
    );

    let log = master.log();
    assert!(
        log.lines().any(|line| line.contains("worker lost")
            && names_pid(line, bad)
            && line.contains(logged)),
        "no `worker lost` line for {bad} with {logged:?}; log:\n{log}"
    );
    let counters = master.status()["counters"].clone();
    assert!(
        counters["protocol_errors"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert!(
        counters["redispatched"].as_u64().unwrap() >= 1,
        "the connection it held went to another worker: {counters}"
    );

    // Both slots serve again: the replacement and the worker that was there all along.
    let now = master.wait_all_ready();
    assert_eq!(now.len(), 2, "{now:?}");
    let replacement = now[0];
    assert_ne!(replacement, bad);
    assert_eq!(now[1], good, "slot 1 kept its worker");
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let response = master.get();
        assert_eq!(response.body, "hola, mundo\n");
        seen.insert(response.pid);
    }
    assert_eq!(
        seen,
        HashSet::from([replacement, good]),
        "both slots answer; log:\n{}",
        master.log()
    );
}

#[test]
fn a_python_worker_reports_by_frames() {
    let master = start("examples/worker.py");
    master.wait_all_ready();
    assert_eq!(master.get().status, 200);
    let status = master.status();
    assert!(
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["reports"] == "frames"),
        "{status}"
    );
}

#[test]
fn a_worker_that_writes_garbage_is_replaced() {
    // "GET " is not version 1: the master refuses the frame at its first byte.
    a_misbehaving_worker_is_replaced("tests/fixtures/garbage_worker.py", "Version(71)");
}

#[test]
fn a_worker_that_attaches_fds_to_a_status_is_replaced() {
    a_misbehaving_worker_is_replaced(
        "tests/fixtures/fd_on_status_worker.py",
        "FdCount { declared: 0, arrived: 1 }",
    );
}

#[test]
fn a_worker_that_shares_counters_it_could_truncate_is_replaced() {
    a_misbehaving_worker_is_replaced(
        "tests/fixtures/unsealed_counters_worker.py",
        "not sealed against shrinking",
    );
}

#[test]
fn a_worker_that_claims_more_than_it_got_in_shared_counters_is_replaced() {
    a_misbehaving_worker_is_replaced(
        "tests/fixtures/lying_counters_worker.py",
        "status says 1000 received",
    );
}

#[test]
fn a_worker_that_acknowledges_more_than_it_got_is_replaced() {
    a_misbehaving_worker_is_replaced(
        "tests/fixtures/over_ack_worker.py",
        "it broke the protocol: status says",
    );
}

#[test]
fn a_worker_that_heartbeats_but_never_says_ready_is_replaced() {
    let script = crate_path("tests/fixtures/never_ready_worker.py");
    let master = Master::launch(
        &[
            "--workers",
            "2",
            "--worker-timeout",
            "1s",
            "--",
            "python3",
            "-B",
            &script,
        ],
        |_| {},
    );
    let stuck = wait_for_pid(&master, 0);
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            crate::util::ready_workers(&status) == 2 && status["workers"][0]["pid"] != stuck
        }),
        "slot 0 should be replaced after the worker timeout: {}\n{}",
        master.status(),
        master.log()
    );
    assert!(
        master.status()["counters"]["unresponsive"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(master
        .log()
        .lines()
        .any(|l| l.contains("worker not responding") && names_pid(l, stuck)));
    assert_eq!(master.get().status, 200);
}

/// The pid of slot `index` as soon as it has one.
fn wait_for_pid(master: &Master, index: usize) -> u32 {
    let mut pid = None;
    assert!(wait_until(PATIENCE, || {
        pid = master.status()["workers"][index]["pid"].as_u64();
        pid.is_some()
    }));
    pid.unwrap() as u32
}

/// Regression: a worker that exits with frames of ours unread makes the kernel report
/// ECONNRESET on the master's end before the acknowledgements it sent last. The master used
/// to stop at the error and re-dispatch a connection the dead worker had acknowledged and
/// already read, whose client then waited for an answer that could never come.
#[test]
fn acknowledgements_behind_a_connection_reset_still_count() {
    let stages = tempfile::tempdir().unwrap();
    let script = crate_path("tests/fixtures/ack_then_die_worker.py");
    let master = Master::start_with(&["--workers", "1", "--", "python3", "-B", &script], |cmd| {
        cmd.env("STAGE_DIR", stages.path());
    });
    let victim = wait_for_pid(&master, 0);
    let stage = |name: &str| {
        let path = stages.path().join(name);
        assert!(
            wait_until(PATIENCE, || path.exists()),
            "stage {name} not reached"
        );
    };
    let mut a = crate::util::send_request(master.addr);
    stage("read-a");
    let mut b = crate::util::send_request(master.addr);
    stage("b-queued");
    // Hold the master still while the worker acknowledges A and dies, so that both the
    // reset and the ack wait for it.
    master.signal("STOP");
    crate::util::send_signal(victim, "USR1");
    let gone = wait_until(PATIENCE, || !crate::util::process_exists(victim));
    master.signal("CONT");
    assert!(gone, "the fixture did not exit");

    assert_eq!(
        read_response(&mut b)
            .expect("B is re-dispatched and answered")
            .status,
        200
    );
    a.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let closed = a.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "A dies with its worker, not hangs elsewhere: {closed:?}"
    );
    let status = master.status();
    assert_eq!(status["counters"]["lost_with_worker"], 1, "{status}");
    assert_eq!(status["counters"]["redispatched"], 1, "{status}");
}

#[test]
fn a_python_worker_sent_sigterm_announces_draining_and_its_slot_is_refilled() {
    let master = start("examples/worker.py");
    let victim = wait_for_pid(&master, 0);
    crate::util::send_signal(victim, "TERM");
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            crate::util::ready_workers(&status) == 2 && status["workers"][0]["pid"] != victim
        }),
        "{}",
        master.log()
    );
    assert!(wait_until(PATIENCE, || !crate::util::process_exists(
        victim
    )));
    let log = master.log();
    assert!(
        log.lines()
            .any(|l| l.contains("reason=worker-draining") && names_pid(l, victim)),
        "{log}"
    );
    for _ in 0..10 {
        let response = master.get();
        assert_eq!(response.status, 200);
        assert_ne!(response.pid, victim);
    }
}

/// Regression: a DRAINING frame read only after ECONNRESET (while giving the worker up)
/// emptied the slot without refilling it: with one worker, an outage.
#[test]
fn a_slot_is_refilled_when_draining_is_read_behind_a_connection_reset() {
    let stages = tempfile::tempdir().unwrap();
    let script = crate_path("tests/fixtures/drain_then_die_worker.py");
    let master = Master::start_with(&["--workers", "1", "--", "python3", "-B", &script], |cmd| {
        cmd.env("STAGE_DIR", stages.path());
    });
    let victim = wait_for_pid(&master, 0);
    let mut waiting = crate::util::send_request(master.addr);
    let queued = stages.path().join("queued");
    assert!(wait_until(PATIENCE, || queued.exists()));
    master.signal("STOP");
    crate::util::send_signal(victim, "USR1");
    let gone = wait_until(PATIENCE, || !crate::util::process_exists(victim));
    master.signal("CONT");
    assert!(gone);
    let response = read_response(&mut waiting).expect("served by the refilled slot");
    assert_eq!(response.status, 200);
    assert_ne!(response.pid, victim);
    assert!(wait_until(PATIENCE, || crate::util::ready_workers(
        &master.status()
    ) == 1));
}

#[test]
fn a_worker_that_drains_at_once_every_time_is_backed_off_not_respawned_in_a_loop() {
    let script = crate_path("tests/fixtures/drain_then_die_worker.py");
    let master = Master::launch(&["--workers", "1", "--", "python3", "-B", &script], |cmd| {
        cmd.env("DRAIN_AT_ONCE", "1");
    });
    assert!(
        wait_until(PATIENCE, || master.log().contains("next_start_ms=800")),
        "{}",
        master.log()
    );
    let log = master.log();
    assert!(log.contains("next_start_ms=400"), "{log}");
    assert_eq!(
        log.matches("next_start_ms=100 ").count() + log.matches("next_start_ms=100\n").count(),
        1,
        "one backoff step per exit, not two: {log}"
    );
    let spawned = master.status()["counters"]["spawned"].as_u64().unwrap();
    assert!(
        spawned <= 6,
        "{spawned} spawns: a loop, not a backoff\n{log}"
    );
}

#[test]
fn python_workers_hear_each_other_through_the_master_in_json() {
    let master = start("examples/worker.py");
    let pids = master.wait_all_ready();
    // Each worker says hello once ready; the master relays it to the other one, stamped
    // with the sender's slot. Ask until both workers answer /messages with the other's.
    let mut heard_by = HashSet::new();
    let both = wait_until(PATIENCE, || {
        let response = crate::util::http_get_path(master.addr, "/messages").unwrap();
        let heard: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        let from_other = heard["heard"].as_array().unwrap().iter().any(|entry| {
            entry[1]["hello"]
                .as_u64()
                .is_some_and(|pid| pid != u64::from(response.pid))
        });
        if from_other {
            heard_by.insert(response.pid);
        }
        heard_by.len() == 2
    });
    assert!(
        both,
        "heard by {heard_by:?} of {pids:?}; log:\n{}",
        master.log()
    );
    let status = master.status();
    assert_eq!(status["messages"]["received"], 2, "{status}");
    assert_eq!(status["messages"]["delivered"], 2, "{status}");
    assert_eq!(status["messages"]["dropped"], 0, "{status}");
}

#[test]
fn broken_messages_are_dropped_counted_and_logged_and_their_worker_keeps_serving() {
    let master = start("tests/fixtures/message_garbage_worker.py");
    let pids = master.wait_all_ready();
    let mut dropped = 0;
    let counted = wait_until(PATIENCE, || {
        dropped = master.status()["messages"]["dropped"].as_u64().unwrap();
        dropped >= 5
    });
    assert!(counted, "dropped {dropped}; log:\n{}", master.log());
    assert_eq!(dropped, 5, "each broken message once");
    let log = master.log();
    assert_eq!(
        crate::util::log_lines(&log, &["dropping a message"]),
        5,
        "one line each:\n{log}"
    );
    for reason in [
        "shorter than its 16-byte envelope",
        "unknown message route 9",
        "Reply",
        "encoding 7",
        "longer than",
    ] {
        assert!(
            crate::util::log_lines(&log, &["dropping a message", reason]) == 1,
            "{reason}:\n{log}"
        );
    }
    // The sender was not replaced, and both workers serve.
    assert_eq!(master.wait_all_ready(), pids, "no worker replaced");
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let response = master.get();
        assert_eq!(response.body, "hola, mundo\n");
        seen.insert(response.pid);
    }
    assert_eq!(seen, pids.into_iter().collect(), "{}", master.log());
}

#[test]
fn a_worker_that_hands_back_with_two_fds_is_replaced() {
    a_misbehaving_worker_is_replaced(
        "tests/fixtures/handback_two_fds_worker.py",
        "FdCount { declared: 1, arrived: 2 }",
    );
}

#[test]
fn a_worker_that_hands_back_more_bytes_than_a_frame_carries_is_replaced() {
    a_misbehaving_worker_is_replaced("tests/fixtures/handback_too_long_worker.py", "TooLong");
}
