//! systemd: socket activation with Debian's `systemd-socket-activate`, and `Type=notify`
//! messages read from a datagram socket standing in for systemd's NOTIFY_SOCKET.

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{http_get, ready_workers, wait_until, Master, Spawned, BIN, PATIENCE};

#[test]
fn systemd_socket_activate_starts_handoff_for_the_first_request_and_it_is_served() {
    // A free port, given back for systemd-socket-activate to bind.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        BIN,
        "run",
        "--workers",
        "2",
    ]);
    let activated = Spawned::start(cmd);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // The socket exists before handoff does; the first request starts it.
    let mut answer = None;
    let served = wait_until(PATIENCE, || {
        answer = http_get(addr).ok();
        answer.is_some()
    });
    assert!(served, "{}", activated.log());
    let answer = answer.unwrap();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "hola, mundo\n")
    );
    let log = activated.log();
    assert!(
        log.contains("LISTEN_FDS"),
        "it used the passed socket:\n{log}"
    );
    assert_eq!(http_get(addr).unwrap().status, 200);
}

/// The notifications that arrive within `timeout`, until one contains `until`.
fn notifications_until(socket: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else { break };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = message.contains(until);
        got.push(message);
        if done {
            break;
        }
    }
    got
}

#[test]
fn notify_says_ready_only_when_every_worker_is_and_around_reloads_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    let script = format!(
        "{}/tests/fixtures/never_ready_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut master = Master::launch(
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
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path)
                .env("WATCHDOG_USEC", "400000");
        },
    );
    // Slot 0's first worker never says READY: READY=1 waits for its replacement.
    let start = notifications_until(&systemd, "READY=1", PATIENCE);
    assert!(
        start.last().is_some_and(|m| m.contains("READY=1")),
        "{start:?}\n{}",
        master.log()
    );
    let status = master.status();
    assert_eq!(
        ready_workers(&status),
        2,
        "READY=1 before every worker was: {status}"
    );
    assert_eq!(
        status["workers"][0]["spawns"], 2,
        "only after the replacement: {status}"
    );
    assert!(start.iter().any(|m| m.contains("WATCHDOG=1")), "{start:?}");

    // No worker inherited what is the master's.
    for pid in master.worker_pids().into_iter().flatten() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("NOTIFY_SOCKET") && !environ.contains("WATCHDOG_USEC"));
    }

    master.signal("HUP");
    let reload = notifications_until(&systemd, "RELOADING=1", PATIENCE);
    let reloading = reload.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reload:?}");
    let done = notifications_until(&systemd, "READY=1", PATIENCE);
    assert!(
        done.last().is_some_and(|m| m.contains("READY=1")),
        "{done:?}\n{}",
        master.log()
    );
    let status = master.status();
    assert_eq!(
        status["restarting"], false,
        "READY=1 before the restart was done: {status}"
    );

    master.signal("TERM");
    let stop = notifications_until(&systemd, "STOPPING=1", PATIENCE);
    assert!(
        stop.last().is_some_and(|m| m.contains("STOPPING=1")),
        "{stop:?}"
    );
    assert!(master.wait_exit(PATIENCE).is_some_and(|s| s.success()));
}

#[test]
fn a_passed_socket_that_does_not_listen_is_refused_with_a_clear_error() {
    // fd 3 is a plain file: LISTEN_FDS says otherwise.
    let file = tempfile::tempfile().unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"exec 3<&0; LISTEN_PID=$$ exec "$0" "$@""#,
        BIN,
        "run",
        "--workers",
        "1",
    ])
    .env("LISTEN_FDS", "1")
    .stdin(file);
    let output = cmd.output().unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("LISTEN_FDS"), "{error}");
}

/// The first datagram on `socket` (standing in for systemd) that contains `until`, with
/// the fds it carried; waits at most `timeout`.
fn notification_with_fds(
    socket: &UnixDatagram,
    until: &str,
    timeout: Duration,
) -> Option<(String, Vec<std::os::fd::OwnedFd>)> {
    use handoff::internals::scm::recv_with_fds;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match recv_with_fds(socket, &mut buf) {
            Ok(got) => {
                let text = String::from_utf8_lossy(&buf[..got.len]).into_owned();
                if text.contains(until) {
                    return Some((text, got.fds));
                }
            }
            // Nothing yet: the socket is non-blocking (MSG_DONTWAIT).
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    None
}

#[test]
fn the_fd_store_keeps_the_listener_across_a_sigkilled_master_and_queued_clients_are_served() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    let mut first = Master::start_with(&["--workers", "2"], |cmd| {
        cmd.env("NOTIFY_SOCKET", &path).env("FDSTORE", "4");
    });
    let (message, mut fds) = notification_with_fds(&systemd, "FDSTORE=1", PATIENCE)
        .unwrap_or_else(|| panic!("no FDSTORE=1\n{}", first.log()));
    assert!(message.contains("FDNAME=handoff-listen-0"), "{message}");
    assert_eq!(fds.len(), 1, "{message}");
    let stored = fds.pop().unwrap();
    let listener = TcpListener::from(stored.try_clone().unwrap());
    assert_eq!(listener.local_addr().unwrap(), first.addr);
    // No worker inherits FDSTORE.
    for pid in first.worker_pids().into_iter().flatten() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(!String::from_utf8_lossy(&environ).contains("FDSTORE="));
    }
    assert_eq!(first.get().status, 200);

    // The master dies; the store (this test) still holds the socket: a client connects and
    // waits in the kernel's queue instead of being refused.
    first.signal("KILL");
    assert!(first.wait_exit(PATIENCE).is_some());
    let mut client = std::net::TcpStream::connect(first.addr).expect("queued, not refused");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();

    // systemd restarts the master with the stored socket in LISTEN_FDS.
    let mut base = Command::new("sh");
    base.args([
        "-c",
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=handoff-listen-0; exec \"$0\" \"$@\"",
        BIN,
    ]);
    let copies = handoff::internals::process::prepare_successor(
        &mut base,
        &[std::os::fd::AsFd::as_fd(&stored)],
    )
    .unwrap();
    let second = Master::start_via(base, &["--workers", "2"]);
    drop(copies);
    assert_eq!(second.addr, first.addr, "{}", second.log());
    client
        .set_read_timeout(Some(PATIENCE))
        .expect("a read timeout");
    let mut answer = String::new();
    client
        .read_to_string(&mut answer)
        .expect("the queued client is answered");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        second.log()
    );
    assert!(
        wait_until(PATIENCE, || second.log().contains("LISTEN_FDS")),
        "{}",
        second.log()
    );
    drop(listener);
}
