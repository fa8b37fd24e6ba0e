//! `handoff run --node`: unmodified node apps. The master speaks node's own IPC
//! (`NODE_CHANNEL_FD`) to each process and a preload script turns the app's
//! `server.listen()` into taking the connections the master hands over.

use std::io::{BufReader, Write};
use std::net::TcpStream;

use crate::util::{read_response, wait_until, Load, Master, BIN, PATIENCE};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn node_master(workers: &str, extra: &[&str]) -> Master {
    let app = fixture("node_app.js");
    let mut args = vec!["--workers", workers];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--node", "--", "node", &app]);
    Master::start(&args)
}

/// `GET /whoami` on a new connection: the pid that answered, and the client address and
/// port the app saw, beside the client's own.
fn whoami(master: &Master) -> (u32, String, String) {
    let stream = TcpStream::connect_timeout(&master.addr, PATIENCE).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let local = stream.local_addr().unwrap();
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"GET /whoami HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let response = read_response(&mut stream).unwrap();
    assert_eq!(response.status, 200, "{}", master.log());
    let mut words = response.body.split_whitespace();
    let pid: u32 = words.next().unwrap().parse().unwrap();
    assert_eq!(pid, response.pid);
    let seen = format!("{} {}", words.next().unwrap(), words.next().unwrap());
    (pid, seen, format!("{} {}", local.ip(), local.port()))
}

#[test]
fn an_unmodified_node_app_is_balanced_and_sees_its_clients_addresses() {
    let master = node_master("4", &["--strategy", "round-robin"]);
    let workers = master.worker_pids();
    let mut served = std::collections::HashMap::<u32, usize>::new();
    for _ in 0..40 {
        let (pid, seen, client) = whoami(&master);
        assert_eq!(seen, client, "the app sees the real client");
        assert!(workers.contains(&Some(pid)), "{pid} is one of {workers:?}");
        *served.entry(pid).or_default() += 1;
    }
    assert_eq!(
        served.len(),
        4,
        "round-robin over the 4 node processes: {served:?}"
    );
    assert!(served.values().all(|&n| n == 10), "{served:?}");
    let status = master.status();
    assert_eq!(status["counters"]["accepted"], 40, "{status}");
    // The node processes report what they finished: nothing is left active.
    let idle = wait_until(PATIENCE, || {
        master.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["active"] == 0)
    });
    assert!(idle, "{}", master.status());
}

#[test]
fn sighup_restarts_the_node_processes_without_a_failed_request() {
    let mut master = node_master("2", &[]);
    let before = master.worker_pids();
    let load = Load::start(master.addr, 200, 1_200);
    for round in 1..=2 {
        assert!(load.wait_sent(300 * round));
        master.signal("HUP");
        let done = wait_until(PATIENCE, || {
            crate::util::log_lines(&master.log(), &["rolling restart done"]) == round
        });
        assert!(done, "{}", master.log());
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{} of {} failed: {:?}\n{}",
        report.failures.len(),
        report.sent,
        report.failure_kinds(),
        master.log()
    );
    assert_eq!(report.ok, 1_200);
    let after = master.worker_pids();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    master.signal("TERM");
    assert!(master.wait_exit(PATIENCE).is_some_and(|s| s.success()));
    let log = master.log();
    assert!(
        !log.contains("killing"),
        "the node processes drained: {log}"
    );
}

#[test]
fn a_worker_breaking_node_s_protocol_is_replaced_and_the_app_s_own_messages_are_ignored() {
    let script = fixture("fake_node_worker.py");
    for (how, reason) in [
        ("ack-for-nothing", "UnexpectedAck"),
        ("endless-line", "LineTooLong"),
        ("sends-fds", "UnexpectedFds"),
    ] {
        let master = Master::launch(
            &[
                "--workers",
                "1",
                "--node",
                "--",
                "python3",
                "-B",
                &script,
                how,
            ],
            |_| {},
        );
        let replaced = wait_until(PATIENCE, || {
            master.status()["counters"]["protocol_errors"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        });
        assert!(replaced, "{how}: {}\n{}", master.status(), master.log());
        // The status counts the error before its log line is read back: wait for it.
        let logged = wait_until(PATIENCE, || master.log().contains(reason));
        assert!(logged, "{how}: {}", master.log());
    }
    let master = Master::start(&[
        "--workers",
        "1",
        "--node",
        "--",
        "python3",
        "-B",
        &script,
        "app-messages",
    ]);
    for _ in 0..5 {
        assert_eq!(master.get().status, 200, "{}", master.log());
    }
    let status = master.status();
    assert_eq!(status["counters"]["protocol_errors"], 0, "{status}");
    assert_eq!(status["workers"][0]["spawns"], 1, "{status}");
}

#[test]
fn node_mode_refuses_a_kernel_strategy_and_a_missing_command() {
    let output = std::process::Command::new(BIN)
        .args([
            "run",
            "--node",
            "--strategy",
            "kernel-shared",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--", "node", "app.js"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("--node takes its connections from the master"),
        "{error}"
    );
    let output = std::process::Command::new(BIN)
        .args(["run", "--node", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("COMMAND"));
}
