//! The library used as a user would: the examples (a tokio echo server, a hyper server, an
//! axum app) started as their own binaries, which the master re-executes as its workers.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::util::{http_get_path, read_response, wait_until, Spawned, PATIENCE};

/// target/debug/examples/NAME: `cargo test` builds the examples before it runs any test
/// (`cargo test --test integration library::` alone does not: build them with `cargo build --examples`).
pub(crate) fn example(name: &str) -> Command {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{path:?} is missing: run `cargo test` or `cargo build --examples`"
    );
    Command::new(path)
}

/// Starts an example and waits until its master logged its address and `workers` workers
/// are ready; returns it with the address.
pub(crate) fn start(mut cmd: Command, workers: usize) -> (Spawned, SocketAddr) {
    cmd.env_remove("HANDOFF_LOG");
    let example = Spawned::start(cmd);
    let mut addr = None;
    let up = wait_until(PATIENCE, || {
        let log = example.log();
        addr = log
            .split("address=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.trim_matches(|c: char| c.is_control()).parse().ok());
        addr.is_some() && log.matches("worker ready").count() >= workers
    });
    assert!(up, "not up in time:\n{}", example.log());
    (example, addr.unwrap())
}

/// SIGTERM, then a clean exit within the patience.
pub(crate) fn stop(mut example: Spawned) {
    crate::util::send_signal(example.pid(), "TERM");
    let status = example.wait_exit(PATIENCE);
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        example.log()
    );
}

fn get(addr: SocketAddr, keep_alive: bool) -> (crate::util::Response, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "GET / HTTP/1.1\r\nhost: test\r\nconnection: {connection}\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    (read_response(&mut reader).unwrap(), reader)
}

#[test]
fn the_echo_example_serves_through_its_workers_and_stops_cleanly() {
    let mut cmd = example("echo");
    cmd.arg("127.0.0.1:0");
    let (echo, addr) = start(cmd, 4);
    for i in 0..8 {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let message = format!("hello {i}\n");
        stream.write_all(message.as_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echoed = String::new();
        stream.read_to_string(&mut echoed).unwrap();
        assert_eq!(echoed, message);
    }
    stop(echo);
}

#[test]
fn the_axum_example_serves_with_connect_info_and_drains_keep_alive_on_stop() {
    let mut cmd = example("axum");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let (axum, addr) = start(cmd, 2);
    let (response, _) = get(addr, false);
    assert_eq!(response.status, 200);
    assert!(
        response.body.starts_with("hello from worker ") && response.body.contains("Ip(127.0.0.1:"),
        "ConnectInfo<Peer> carries the client: {:?}",
        response.body
    );
    // A keep-alive client during the stop: axum's graceful shutdown closes it cleanly.
    let (_, mut idle) = get(addr, true);
    crate::util::send_signal(axum.pid(), "TERM");
    let mut rest = Vec::new();
    idle.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap(),
        0,
        "closed, nothing more"
    );
    stop(axum);
}

#[test]
fn keep_alive_connections_survive_rolling_restarts_of_the_axum_example() {
    let mut cmd = example("axum");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let (axum, addr) = start(cmd, 2);
    crate::keepalive::two_restarts_under_keep_alive_load(addr, axum.pid(), &|| axum.log());
    stop(axum);
}

#[test]
fn keep_alive_connections_survive_rolling_restarts_of_the_hyper_example() {
    let mut cmd = example("hyper");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--threads",
        "2",
    ]);
    let (hyper, addr) = start(cmd, 2);
    crate::keepalive::two_restarts_under_keep_alive_load(addr, hyper.pid(), &|| hyper.log());
    stop(hyper);
}

#[test]
fn the_hyper_example_serves_on_multi_threaded_workers_and_stops_cleanly() {
    let mut cmd = example("hyper");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--threads",
        "3",
    ]);
    let (hyper, addr) = start(cmd, 2);
    let mut workers = std::collections::HashSet::new();
    for _ in 0..4 {
        let (response, _) = get(addr, false);
        assert_eq!(response.status, 200);
        let pid = response
            .body
            .strip_prefix("hello from worker ")
            .and_then(|rest| rest.trim().parse::<u32>().ok());
        workers.extend(pid);
        assert!(pid.is_some(), "{:?}", response.body);
    }
    for pid in workers {
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count();
        assert!(
            threads > 3,
            "worker {pid} runs {threads} threads: its main thread and a runtime of 3"
        );
    }
    let (_, mut idle) = get(addr, true);
    crate::util::send_signal(hyper.pid(), "TERM");
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap(),
        0,
        "closed, nothing more"
    );
    stop(hyper);
}

#[test]
fn global_stats_adds_every_worker_s_requests_and_every_worker_knows_the_total() {
    let mut cmd = example("global_stats");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "4"]);
    let (stats, addr) = start(cmd, 4);
    let mut served_by = std::collections::HashSet::new();
    for _ in 0..400 {
        let response = http_get_path(addr, "/").unwrap();
        assert_eq!(response.status, 200, "{}", stats.log());
        served_by.insert(response.pid);
    }
    assert!(served_by.len() >= 2, "one worker took everything");
    // Workers report every second and the master broadcasts each new total: ask until two
    // different workers say 400 (a total past 400 would be a count made twice).
    let mut knowing = std::collections::HashSet::new();
    let agreed = wait_until(PATIENCE, || {
        let response = http_get_path(addr, "/stats").unwrap();
        let total: u64 = response
            .body
            .trim()
            .trim_start_matches("{\"global_requests\": ")
            .trim_end_matches('}')
            .parse()
            .expect("a number");
        assert!(total <= 400, "counted twice: {}", response.body);
        if total == 400 {
            knowing.insert(response.pid);
        }
        knowing.len() >= 2
    });
    assert!(agreed, "workers never agreed on 400:\n{}", stats.log());
    // A request and its reply: the master's total, there and then.
    let asked = http_get_path(addr, "/ask").unwrap();
    assert_eq!(
        asked.body,
        "{\"global_requests\": 400}\n",
        "{}",
        stats.log()
    );
    stop(stats);
}
