//! The shared map across live upgrades of the `shared_state` example (SIGUSR2): the new
//! master starts with the old one's map, the writes of both sets of workers go on in one
//! order through the window, and an upgrade that fails while writes go on loses none.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::library::{example, start};
use crate::util::{log_field, process_exists, send_signal, wait_until, PATIENCE};

/// One request with `Connection: close`: (status, body, pid), or `None` if the connection
/// failed.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, String, u32)> {
    use std::io::{BufReader, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, PATIENCE).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let response = crate::util::read_response(&mut BufReader::new(stream)).ok()?;
    Some((response.status, response.body, response.pid))
}

/// Clients that increment `hits` and set keys `tN:I` until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

#[derive(Debug, Default)]
struct Tally {
    /// The counter values the increments answered.
    counted: Vec<u64>,
    /// The last key index set (all before it acknowledged), if any.
    last_set: Option<u64>,
    /// Requests that failed (no answer, or not 2xx), with what they got.
    failures: Vec<String>,
}

impl Writers {
    fn start(addr: SocketAddr, clients: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut tally = Tally::default();
                    let mut next = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match http(addr, "POST", "/incr/hits", b"") {
                            Some((200, body, _)) => tally.counted.push(body.parse().unwrap()),
                            other => tally.failures.push(format!("incr: {other:?}")),
                        }
                        let key = format!("/set/t{client}:{next}");
                        match http(addr, "PUT", &key, b"x") {
                            Some((204, _, _)) => {
                                tally.last_set = Some(next);
                                next += 1;
                            }
                            other => tally.failures.push(format!("set: {other:?}")),
                        }
                    }
                    tally
                })
            })
            .collect();
        Writers { stop, threads }
    }

    fn finish(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// The pid of the last master an upgrade started.
fn last_new_master(log: &str) -> Option<u32> {
    log.lines()
        .rfind(|l| l.contains("upgrade: new master started"))
        .and_then(|l| log_field(l, "pid"))
        .and_then(|pid| pid.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
}

/// On drop, a failed test's included, stops the newest master an upgrade started: it is
/// not the test's child (the example is), so nothing else would.
struct StopNewest<'a>(&'a crate::util::Spawned);

impl Drop for StopNewest<'_> {
    fn drop(&mut self) {
        if let Some(pid) = last_new_master(&self.0.log()).filter(|&pid| process_exists(pid)) {
            send_signal(pid, "TERM");
        }
    }
}

/// Upgrades the master `pid` (SIGUSR2) and waits until it is gone; the new master's pid.
fn upgrade(log: impl Fn() -> String, pid: u32, round: usize) -> u32 {
    send_signal(pid, "USR2");
    let ready = wait_until(PATIENCE, || {
        log()
            .matches("the new master is ready; this one stops")
            .count()
            > round
    });
    assert!(ready, "upgrade {round} not ready:\n{}", log());
    let new = last_new_master(&log()).unwrap();
    assert!(wait_until(PATIENCE, || !process_exists(pid)), "{}", log());
    new
}

/// Whether a failure is a write whose outcome the client cannot know: a draining worker
/// whose channel to its master closed with the write in flight, or a connection that
/// ended without an answer (see docs/shared-state.md, "Across an upgrade").
fn ambiguous(failure: &str) -> bool {
    failure.ends_with("None") || failure.contains("the channel to the master is closed")
}

/// The increments answered distinct values (none applied twice), the map's count is the
/// acknowledged ones plus at most the ambiguous failures (none when `exact`), every worker
/// reads it, and every key set is there. Returns (acknowledged, ambiguous).
fn check(addr: SocketAddr, tallies: &[Tally], exact: bool, log: impl Fn() -> String) -> (u64, u64) {
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    let hard: Vec<&&String> = failures.iter().filter(|f| exact || !ambiguous(f)).collect();
    assert!(
        hard.is_empty(),
        "{:?}\n{}",
        &hard[..hard.len().min(5)],
        log()
    );
    let unsure = failures.iter().filter(|f| f.starts_with("incr")).count() as u64;
    let mut counted: Vec<u64> = tallies.iter().flat_map(|t| t.counted.clone()).collect();
    counted.sort_unstable();
    let acked = counted.len() as u64;
    counted.dedup();
    assert_eq!(counted.len() as u64, acked, "an increment applied twice");
    let (_, total, _) = http(addr, "GET", "/get/hits", b"").unwrap();
    let total: u64 = total.parse().unwrap();
    assert!(
        (acked..=acked + unsure).contains(&total),
        "{acked} acknowledged, {unsure} unsure, the map counts {total}\n{}",
        log()
    );
    assert!(counted.last().is_none_or(|last| *last <= total));
    // Every worker reads the final count (connections spread over them all).
    let mut pids = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, body, pid) = http(addr, "GET", "/get/hits", b"").unwrap();
        assert_eq!((status, body), (200, total.to_string()), "{}", log());
        pids.insert(pid);
    }
    assert!(pids.len() >= 2, "{pids:?}");
    for (client, tally) in tallies.iter().enumerate() {
        let Some(last) = tally.last_set else { continue };
        let path = format!("/missing/t{client}:?upto={last}");
        let (_, missing, _) = http(addr, "GET", &path, b"").unwrap();
        assert_eq!(
            missing,
            "0",
            "client {client} lost sets up to {last}\n{}",
            log()
        );
    }
    (acked, failures.len() as u64)
}

#[test]
fn writes_across_three_upgrades_are_each_applied_once_in_one_order() {
    let mut cmd = example("shared_state");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let (example, addr) = start(cmd, 2);
    let _stop = StopNewest(&example);
    let log = || example.log();
    let writers = Writers::start(addr, 3);
    let mut master = example.pid();
    let counted = |n| {
        wait_until(PATIENCE, || {
            http(addr, "GET", "/get/hits", b"")
                .is_some_and(|(_, b, _)| b.parse::<u64>().is_ok_and(|v| v >= n))
        })
    };
    assert!(counted(100), "{}", log());
    for round in 0..3 {
        master = upgrade(log, master, round);
        assert!(counted(100 * (round as u64 + 2)), "{}", log());
    }
    let tallies = writers.finish();
    let (acked, unsure) = check(addr, &tallies, false, log);
    eprintln!("3 upgrades under write load: {acked} increments acknowledged, all counted once; {unsure} writes failed at draining workers");
    send_signal(master, "TERM");
    assert!(wait_until(PATIENCE, || !process_exists(master)));
}

#[test]
fn the_new_master_s_workers_start_with_the_map_and_its_ttls_still_expire() {
    let mut cmd = example("shared_state");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let (example, addr) = start(cmd, 2);
    let _stop = StopNewest(&example);
    let log = || example.log();
    assert_eq!(http(addr, "PUT", "/set/kept", b"k").unwrap().0, 204);
    assert_eq!(
        http(addr, "PUT", "/set/brief?ttl_ms=6000", b"b").unwrap().0,
        204
    );
    let master = upgrade(log, example.pid(), 0);
    // Right after the upgrade: every answer is from a new worker, with both keys.
    for key in ["kept", "brief"] {
        for _ in 0..6 {
            let (status, _, pid) = http(addr, "GET", &format!("/get/{key}"), b"").unwrap();
            assert_eq!(status, 200, "{key} from {pid}\n{}", log());
        }
    }
    let expired = wait_until(Duration::from_secs(15), || {
        http(addr, "GET", "/get/brief", b"").is_some_and(|(s, _, _)| s == 404)
    });
    assert!(expired, "{}", log());
    assert_eq!(http(addr, "GET", "/get/kept", b"").unwrap().1, "k");
    send_signal(master, "TERM");
    assert!(wait_until(PATIENCE, || !process_exists(master)));
}

#[test]
fn an_upgrade_that_fails_while_writes_are_forwarded_loses_none_and_the_old_master_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    let mut cmd = example("shared_state");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .env("SHARED_STATE_HANG_IF", &hang);
    let (example, addr) = start(cmd, 2);
    let stop_newest = StopNewest(&example);
    let log = || example.log();
    let writers = Writers::start(addr, 3);
    let hits = || {
        http(addr, "GET", "/get/hits", b"")
            .and_then(|(_, b, _)| b.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(wait_until(PATIENCE, || hits() >= 100), "{}", log());
    // The new master takes the map and the writes, its workers never get ready: it is
    // killed mid-window.
    std::fs::write(&hang, b"").unwrap();
    send_signal(example.pid(), "USR2");
    let handed = wait_until(PATIENCE, || log().contains("the shared map is handed over"));
    assert!(handed, "{}", log());
    let at = hits();
    assert!(
        wait_until(PATIENCE, || hits() >= at + 100),
        "forwarded writes go on\n{}",
        log()
    );
    let new = last_new_master(&log()).unwrap();
    send_signal(new, "KILL");
    let failed = wait_until(PATIENCE, || {
        log().contains("this master holds the shared map again")
    });
    assert!(failed, "{}", log());
    std::fs::remove_file(&hang).unwrap();
    let at = hits();
    assert!(
        wait_until(PATIENCE, || hits() >= at + 100),
        "the old master serves writes\n{}",
        log()
    );
    let tallies = writers.finish();
    let (acked, _) = check(addr, &tallies, true, log);
    eprintln!(
        "a failed upgrade under write load: {acked} increments acknowledged, all counted once"
    );
    assert!(process_exists(example.pid()));
    drop(stop_newest);
    crate::library::stop(example);
}
