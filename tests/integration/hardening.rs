//! The master as an attacker or a careless operator finds it: fd exhaustion heals, a worker
//! that heartbeats but never acknowledges is replaced, a worker flooding reports only slows
//! itself, signals sent by habit change nothing, a replaced binary still respawns, limits
//! that cannot work are refused at start, and a master with no worker left stops at once.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{http_get, send_signal, wait_until, Load, Master, Spawned, PATIENCE};

/// A path inside the crate, whatever the current directory.
fn crate_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// The master binary under `prlimit --nofile=N:N`: it and its workers get N fds at most.
fn with_fd_limit(limit: u32) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={limit}:{limit}"))
        .arg(crate::util::BIN);
    cmd
}

/// Up to `count` client connections that connect (into the kernel backlog, if need be) and
/// send nothing; past the backlog a connect gives up after 50 ms.
fn idle_connections(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(50)).ok())
        .collect()
}

/// Runs a master that should refuse to start: its exit status and stderr, or a panic if it
/// is still running after [`PATIENCE`] (then it is killed, with every worker it started).
fn refused_at_start(cmd: Command) -> (std::process::ExitStatus, String) {
    let mut master = Spawned::start(cmd);
    let status = master.wait_exit(PATIENCE);
    let log = master.log();
    (
        status.unwrap_or_else(|| panic!("it did not refuse to start:\n{log}")),
        log,
    )
}

fn counter(master: &Master, name: &str) -> u64 {
    master.status()["counters"][name].as_u64().unwrap()
}

/// `ulimit -n 64`, 500 idle clients: workers fill their fd tables and refuse the rest
/// (instead of dying on MSG_CTRUNC), the master holds only what its budget allows, and once
/// the clients leave, new requests are served within 15 s by the same workers.
fn fd_exhaustion_heals(args: &[&str], idle: usize) {
    let mut master = Master::start_via(with_fd_limit(64), args);
    let pids = master.wait_all_ready();
    let clients = idle_connections(master.addr, idle);
    let opened = clients.len();
    assert!(
        wait_until(PATIENCE, || counter(&master, "refused") > 0),
        "the workers never ran out of fds ({opened} idle clients); {}\n{}",
        master.status(),
        master.log()
    );
    drop(clients);
    let left = Instant::now();
    let served = wait_until(Duration::from_secs(15), || {
        http_get(master.addr).is_ok_and(|r| r.status == 200)
    });
    let after = left.elapsed();
    assert!(
        served,
        "not served within 15 s of the clients leaving; {}\n{}",
        master.status(),
        master.log()
    );
    eprintln!("fd exhaustion: {opened} idle clients; served again {after:?} after they left");
    for _ in 0..50 {
        let response = http_get(master.addr).expect("served");
        assert_eq!(response.status, 200);
    }
    assert_eq!(master.wait_all_ready(), pids, "no worker was replaced");
    let status = master.status();
    assert_eq!(status["counters"]["spawned"], pids.len(), "{status}");
    assert_eq!(status["counters"]["protocol_errors"], 0, "{status}");
    let log = master.log();
    assert!(!log.contains("MSG_CTRUNC"), "{log}");
    assert!(!log.contains("spawning worker failed"), "{log}");
    master.signal("TERM");
    let exit = master.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}\n{log}");
}

#[test]
fn fd_exhaustion_heals_once_the_idle_clients_leave() {
    fd_exhaustion_heals(&["--workers", "2"], 500);
}

#[test]
fn fd_exhaustion_heals_with_python_workers_too() {
    let script = crate_path("examples/worker.py");
    fd_exhaustion_heals(&["--workers", "2", "--", "python3", "-B", &script], 300);
}

#[test]
fn a_limit_too_low_for_the_workers_is_refused_at_start() {
    let mut cmd = with_fd_limit(40);
    cmd.args(["run", "--listen", "127.0.0.1:0", "--workers", "4"]);
    let (status, stderr) = refused_at_start(cmd);
    assert!(!status.success());
    assert!(
        stderr.contains("the fd limit (RLIMIT_NOFILE) of 40"),
        "{stderr}"
    );
}

#[test]
fn a_worker_that_heartbeats_but_never_acknowledges_is_replaced_and_every_client_served() {
    let script = crate_path("tests/fixtures/never_ack_worker.py");
    let master = Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--ack-timeout",
        "1s",
        "--",
        "python3",
        "-B",
        &script,
    ]);
    let stuck = master.worker_pids()[0].unwrap();
    // Every client has 10 s; the stuck worker holds some of them for the ack timeout.
    let report = Load::start(master.addr, 100, 200).finish();
    assert_eq!(
        (report.ok, report.failures.len()),
        (200, 0),
        "{:?}\n{}",
        report.failure_kinds(),
        master.log()
    );
    assert!(
        !report.by_pid.contains_key(&stuck),
        "the stuck worker served nothing"
    );
    let status = master.status();
    assert!(
        status["counters"]["unacknowledged"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        status["counters"]["redispatched"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        wait_until(PATIENCE, || !crate::util::process_exists(stuck)),
        "the stuck worker was not killed"
    );
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("acknowledged no connection for")));
}

/// Regression: a worker whose runtime was busy with CPU-heavy requests acknowledged late and
/// was killed as stuck, cutting the connections it was serving.
#[test]
fn busy_workers_are_not_taken_for_stuck_ones() {
    let master = Master::start(&[
        "--workers",
        "2",
        "--work-us",
        "150000",
        "--ack-timeout",
        "1s",
    ]);
    let pids = master.wait_all_ready();
    // 32 in flight on 2 workers at 150 ms of CPU each: acknowledgements wait seconds behind
    // the work.
    let report = Load::start(master.addr, 40, 48).finish();
    assert_eq!(
        (report.ok, report.failures.len()),
        (48, 0),
        "{:?}\n{}",
        report.failure_kinds(),
        master.log()
    );
    let status = master.status();
    assert_eq!(status["counters"]["unacknowledged"], 0, "{status}");
    assert_eq!(master.wait_all_ready(), pids, "no worker was replaced");
}

#[test]
fn a_worker_flooding_reports_that_say_nothing_only_slows_itself() {
    let script = crate_path("tests/fixtures/status_flood_worker.py");
    let master = Master::start(&["--workers", "2", "--", "python3", "-B", &script]);
    let log = master.log();
    let line = log
        .lines()
        .find(|l| l.contains("status flood: sent="))
        .unwrap_or_else(|| panic!("the flood did not run; log:\n{log}"));
    let sent: u64 = line
        .split("sent=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // Unthrottled, a Python loop sends tens of thousands a second; the master reads 256 a
    // second and the channel's buffer holds a few hundred more.
    assert!(sent < 4_000, "{sent} frames went through in 2 s");
    assert!(log.contains("floods the channel"), "{log}");
    for _ in 0..10 {
        assert_eq!(master.get().status, 200);
    }
    eprintln!("status flood: {sent} frames in 2 s");
}

#[test]
fn signals_sent_by_habit_leave_the_master_and_its_workers_serving() {
    let mut master = Master::start(&["--workers", "2"]);
    let pids = master.wait_all_ready();
    for signal in ["USR1", "ALRM", "PWR", "VTALRM"] {
        master.signal(signal);
        let name = format!("signal=SIG{signal}");
        assert!(
            wait_until(PATIENCE, || master.log().contains(&name)),
            "no log line for SIG{signal}:\n{}",
            master.log()
        );
        assert_eq!(master.get().status, 200);
    }
    // `pkill -USR1 app` reaches the workers too.
    send_signal(pids[0], "USR1");
    assert!(wait_until(PATIENCE, || master.log().lines().any(|l| l
        .contains("role=\"worker\"")
        || l.contains("role=worker"))));
    // `pkill -HUP app`, `pkill -TTIN app`: meant for the master, they reach workers too.
    for signal in ["HUP", "TTIN", "TTOU"] {
        send_signal(pids[1], signal);
        let name = format!("signal=SIG{signal}");
        assert!(
            wait_until(PATIENCE, || master.log().lines().any(
                |l| l.contains(&name) && l.contains(&format!("pid={}", pids[1]))
            )),
            "the worker did not log SIG{signal}:\n{}",
            master.log()
        );
    }
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pids[1])).unwrap();
    let state = state
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert_ne!(state, "T", "the worker was stopped");
    assert_eq!(master.wait_all_ready(), pids, "every worker still runs");
    assert_eq!(master.get().status, 200);
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("no log file to reopen")));
    // SIGQUIT is nginx's graceful stop: the master drains and exits 0.
    master.signal("QUIT");
    let exit = master.wait_exit(PATIENCE);
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        master.log()
    );
}

#[test]
fn a_replaced_binary_still_respawns_workers_and_restarts_them() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::copy(crate::util::BIN, &app).unwrap();
    let master = Master::start_via(Command::new(&app), &["--workers", "2"]);
    let before = master.wait_all_ready();
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm(before[0]),
        "app\n",
        "ps and pgrep see the program's name"
    );
    // A deploy: a new file renamed over the old path, then deleted altogether.
    let next = dir.path().join("app.tmp");
    std::fs::write(&next, b"#!/bin/sh\nexit 42\n").unwrap();
    std::fs::rename(&next, &app).unwrap();
    std::fs::remove_file(&app).unwrap();
    send_signal(before[0], "KILL");
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            crate::util::ready_workers(&status) == 2 && status["workers"][0]["pid"] != before[0]
        }),
        "the killed worker was not replaced:\n{}",
        master.log()
    );
    master.signal("HUP");
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            let now = crate::util::worker_pids(&status);
            crate::util::ready_workers(&status) == 2
                && status["restarting"] == false
                && now.iter().flatten().all(|pid| !before.contains(pid))
        }),
        "the rolling restart did not finish:\n{}",
        master.log()
    );
    assert_eq!(master.get().status, 200);
    assert!(
        !master.log().contains("spawning worker failed"),
        "{}",
        master.log()
    );
}

#[test]
fn limits_that_cannot_work_are_refused_at_start_with_one_line() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--workers", "1000000"],
            "--workers must be from 1 to 1024",
        ),
        (
            &["--workers", "1", "--max-rss", "1"],
            "--max-rss must be at least",
        ),
        (
            &["--workers", "1", "--max-age", "0s"],
            "--max-age must be at least",
        ),
        (&["--workers", "1", "--ack-timeout", "0s"], "--ack-timeout"),
        (
            &["--workers", "1", "--", "/nonexistent/worker"],
            "cannot be executed",
        ),
    ];
    for (args, message) in cases {
        let started = Instant::now();
        let mut cmd = Command::new(crate::util::BIN);
        cmd.args(["run", "--listen", "127.0.0.1:0"]).args(args);
        let (status, stderr) = refused_at_start(cmd);
        let took = started.elapsed();
        assert!(!status.success(), "{args:?} started");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("worker spawned"), "{args:?}: {stderr}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
}

#[test]
fn a_host_name_listen_address_resolves() {
    let master = Master::start(&["--workers", "1", "--listen", "localhost:0"]);
    let listening = master.status()["listening"].clone();
    let addr: SocketAddr = listening[1].as_str().unwrap().parse().unwrap();
    assert!(addr.ip().is_loopback(), "{listening}");
    assert_eq!(http_get(addr).unwrap().status, 200);
}

#[test]
fn a_stop_with_no_worker_left_to_take_held_connections_is_prompt() {
    let script = crate_path("tests/fixtures/take_then_die_worker.py");
    let mut master = Master::launch(
        &[
            "--workers",
            "1",
            "--shutdown-timeout",
            "20s",
            "--",
            "python3",
            "-B",
            &script,
        ],
        |_| {},
    );
    assert!(wait_until(PATIENCE, || crate::util::ready_workers(
        &master.status()
    ) == 1));
    let _client = TcpStream::connect(master.addr).unwrap();
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            status["awaiting_redispatch"] == 1 && crate::util::ready_workers(&status) == 0
        }),
        "{}\n{}",
        master.status(),
        master.log()
    );
    let asked = Instant::now();
    master.signal("TERM");
    let exit = master.wait_exit(PATIENCE);
    let took = asked.elapsed();
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        master.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?} for workers that cannot come (shutdown timeout 20 s)"
    );
}

/// A worker hands connections back every way it should not (see
/// `tests/fixtures/handback_garbage_worker.py`): while not draining, fds that are no
/// connection of the listener named, more than it was sent. Each is refused, closed,
/// counted and logged in a bounded number of lines; nothing else is harmed: the worker is
/// not killed, its one proper handback is answered by another worker, and every client is
/// served.
#[test]
fn bad_handbacks_are_refused_and_harm_nothing() {
    let script = crate_path("tests/fixtures/handback_garbage_worker.py");
    let master = Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--",
        "python3",
        "-B",
        &script,
    ]);
    let hostile = master.worker_pids()[0].unwrap();
    for _ in 0..4 {
        let response = http_get(master.addr)
            .unwrap_or_else(|e| panic!("a client was not served: {e}; log:\n{}", master.log()));
        assert_eq!(response.status, 200);
        assert_ne!(response.pid, hostile, "it never serves");
    }
    let refused = wait_until(PATIENCE, || {
        counter(&master, "handbacks_refused") >= 104 && counter(&master, "handed_back") >= 1
    });
    assert!(refused, "{}\n{}", master.status(), master.log());
    assert!(
        wait_until(PATIENCE, || !crate::util::process_exists(hostile)),
        "it finishes as a drained worker; log:\n{}",
        master.log()
    );
    let log = master.log();
    let pid = format!("pid={hostile}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("closing a connection the worker handed back") && l.contains(&pid))
        .collect();
    for reason in [
        "the worker is not draining",
        "not a connected stream socket",
        "is not that of listener 0",
        "as many connections as it was sent",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(reason)),
            "no line says {reason:?}; log:\n{log}"
        );
    }
    assert!(
        lines.len() <= 12,
        "{} lines: the log is not flooded",
        lines.len()
    );
    assert_eq!(counter(&master, "protocol_errors"), 0, "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("worker lost") && l.contains(&pid)),
        "{log}"
    );
    assert_eq!(master.get().status, 200);
}
