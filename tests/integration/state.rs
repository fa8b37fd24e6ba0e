//! The shared map held by the master, end to end: the `shared_state` and `tokens` examples
//! (their workers loading the map from inside, or driven over HTTP), and a Python worker
//! that sends the master broken shared-map frames.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::library::{example, start, stop};
use crate::util::{log_field, read_response, send_signal, wait_until, Master, Response, PATIENCE};

/// One request with `Connection: close`.
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    let mut kept = Kept::new(stream);
    kept.request(method, path, body, false)
}

/// A keep-alive connection: its requests all go to the worker that got it.
struct Kept(BufReader<TcpStream>);

impl Kept {
    fn new(stream: TcpStream) -> Kept {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Kept(BufReader::new(stream))
    }

    fn open(addr: SocketAddr) -> Kept {
        Kept::new(TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap())
    }

    fn request(&mut self, method: &str, path: &str, body: &[u8], keep: bool) -> Response {
        let connection = if keep { "keep-alive" } else { "close" };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: {connection}\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.0.get_mut();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        read_response(&mut self.0).unwrap()
    }
}

fn shared_state(
    workers: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> (crate::util::Spawned, SocketAddr) {
    let mut cmd = example("shared_state");
    let workers_arg = workers.to_string();
    cmd.args(["--listen", "127.0.0.1:0", "--workers", &workers_arg]);
    cmd.args(args);
    for (name, value) in env {
        cmd.env(name, value);
    }
    start(cmd, workers)
}

#[test]
fn sixteen_workers_incrementing_one_key_count_every_increment_exactly() {
    const WORKERS: usize = 16;
    const EACH: u64 = 10_000;
    let started = Instant::now();
    // At a lower priority: its 17 busy processes on 2 cores must not starve the tests that
    // run beside it (the workers inherit the niceness).
    let mut cmd = std::process::Command::new("nice");
    cmd.args(["-n", "10"])
        .arg(example("shared_state").get_program())
        .args(["--listen", "127.0.0.1:0", "--workers", &WORKERS.to_string()])
        .env("SHARED_STATE_INCREMENTS", EACH.to_string());
    let (example, addr) = start(cmd, WORKERS);
    let done = wait_until(Duration::from_secs(120), || {
        http(addr, "GET", "/get/done", b"").body == WORKERS.to_string()
    });
    let took = started.elapsed();
    assert!(done, "not every worker finished:\n{}", example.log());
    let hits = http(addr, "GET", "/get/hits", b"");
    assert_eq!(
        hits.body,
        (WORKERS as u64 * EACH).to_string(),
        "{}",
        example.log()
    );
    eprintln!(
        "{WORKERS} workers x {EACH} increments: {} in {took:?} ({:.0} increments/s, start included)",
        hits.body,
        (WORKERS as u64 * EACH) as f64 / took.as_secs_f64()
    );
    stop(example);
}

#[test]
fn a_worker_reads_its_own_write_at_once() {
    let (example, addr) = shared_state(2, &[], &[]);
    let mut kept = Kept::open(addr);
    for i in 0..200 {
        let key = format!("/set/own-{}", i % 7);
        let value = format!("value {i}");
        let set = kept.request("PUT", &key, value.as_bytes(), true);
        assert_eq!(set.status, 204, "{}", set.body);
        let got = kept.request("GET", &key.replace("/set/", "/get/"), b"", true);
        assert_eq!(
            (got.status, got.body.as_str(), got.pid),
            (200, value.as_str(), set.pid)
        );
        let counted = kept.request("POST", "/incr/own-counter", b"", true);
        let read = kept.request("GET", "/get/own-counter", b"", true);
        assert_eq!(
            read.body, counted.body,
            "the counter as the increment answered it"
        );
    }
    assert_eq!(http(addr, "GET", "/get/own-counter", b"").body, "200");
    // The master's handler wrote one too (Master::state).
    let from_master = http(addr, "GET", "/get/master", b"");
    assert_eq!(
        (from_master.status, from_master.body.as_str()),
        (200, "here")
    );
    stop(example);
}

/// The newest ready pid of every slot, from the master's log.
fn ready_pids(log: &str) -> HashMap<usize, u32> {
    let mut pids = HashMap::new();
    for line in log.lines().filter(|l| l.contains("worker ready")) {
        let slot = log_field(line, "worker").and_then(|s| s.parse().ok());
        let pid = log_field(line, "pid").and_then(|s| s.parse().ok());
        if let (Some(slot), Some(pid)) = (slot, pid) {
            pids.insert(slot, pid);
        }
    }
    pids
}

#[test]
fn a_respawned_worker_has_the_whole_map_before_it_serves() {
    let (example, addr) = shared_state(2, &[], &[]);
    // 300 values of 1 KiB: a snapshot of several frames.
    let value = vec![b's'; 1024];
    let mut kept = Kept::open(addr);
    for i in 0..300 {
        let set = kept.request("PUT", &format!("/set/snap-{i}"), &value, true);
        assert_eq!(set.status, 204, "{}", set.body);
    }
    drop(kept);
    let old = ready_pids(&example.log());
    assert_eq!(old.len(), 2);
    for pid in old.values() {
        send_signal(*pid, "KILL");
    }
    let respawned = wait_until(PATIENCE, || {
        let now = ready_pids(&example.log());
        now.len() == 2 && now.values().all(|pid| !old.values().any(|o| o == pid))
    });
    assert!(respawned, "{}", example.log());
    // Every worker serving now is new: its first answers come from the snapshot.
    let mut seen = HashSet::new();
    for i in (0..300).rev() {
        let got = http(addr, "GET", &format!("/get/snap-{i}"), b"");
        assert_eq!(got.status, 200, "snap-{i} missing in worker {}", got.pid);
        assert_eq!(got.body.len(), 1024);
        seen.insert(got.pid);
    }
    assert!(seen.iter().all(|pid| !old.values().any(|o| o == pid)));
    stop(example);
}

#[test]
fn writes_past_a_limit_fail_with_the_reason_and_change_nothing() {
    let (example, addr) = shared_state(2, &["--state-max-bytes", "100000"], &[]);
    let long_key = "k".repeat(2000);
    let refused = http(addr, "PUT", &format!("/set/{long_key}"), b"v");
    assert_eq!(refused.status, 413);
    assert_eq!(
        refused.body,
        "key of 2000 bytes is over the limit of 1024 bytes\n"
    );
    assert_eq!(
        http(addr, "GET", &format!("/get/{long_key}"), b"").status,
        404
    );

    let big = vec![b'v'; 62_000];
    let refused = http(addr, "PUT", "/set/big", &big);
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (
            413,
            "value of 62000 bytes is over the limit of 61440 bytes\n"
        )
    );
    let too_big = vec![b'v'; 70_000];
    let refused = http(addr, "PUT", "/set/big", &too_big);
    assert_eq!(refused.status, 413, "{}", refused.body);
    assert!(refused.body.contains("70027 bytes"), "{}", refused.body);
    assert_eq!(http(addr, "GET", "/get/big", b"").status, 404);

    let half = vec![b'h'; 50_000];
    assert_eq!(http(addr, "PUT", "/set/a", &half).status, 204);
    let full = http(addr, "PUT", "/set/b", &half);
    assert_eq!(
        (full.status, full.body.as_str()),
        (507, "the shared map is full (100000 bytes)\n")
    );
    assert_eq!(http(addr, "GET", "/get/b", b"").status, 404);
    assert_eq!(http(addr, "GET", "/get/a", b"").body.len(), 50_000);

    assert_eq!(http(addr, "PUT", "/set/word", b"abc").status, 204);
    let not_a_number = http(addr, "POST", "/incr/word", b"");
    assert_eq!(
        (not_a_number.status, not_a_number.body.as_str()),
        (
            409,
            "the value of \"word\" is not an integer, or the increment overflows\n"
        )
    );
    assert_eq!(http(addr, "GET", "/get/word", b"").body, "abc");
    assert_eq!(
        http(addr, "POST", "/incr/max?by=9223372036854775807", b"").body,
        i64::MAX.to_string()
    );
    assert_eq!(http(addr, "POST", "/incr/max", b"").status, 409);
    assert_eq!(
        http(addr, "GET", "/get/max", b"").body,
        i64::MAX.to_string()
    );
    stop(example);
}

#[test]
fn broken_state_frames_from_a_worker_are_dropped_and_it_keeps_its_channel() {
    let script = format!(
        "{}/tests/fixtures/state_garbage_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
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
    let pids = master.wait_all_ready();
    let mut dropped = 0;
    let counted = wait_until(PATIENCE, || {
        dropped = master.status()["state"]["dropped"].as_u64().unwrap();
        dropped >= 7
    });
    assert!(counted, "dropped {dropped}; log:\n{}", master.log());
    assert_eq!(dropped, 7, "each broken frame once");
    let log = master.log();
    for reason in [
        "shorter than its fields",
        "unknown state operation 77",
        "not UTF-8",
        "8 bytes past its fields",
        "longer than the",
        "a state frame of kind sync cannot come from this peer",
        "a state frame of kind answer cannot come from this peer",
    ] {
        assert_eq!(
            crate::util::log_lines(&log, &["dropping a state frame", reason]),
            1,
            "{reason}:\n{log}"
        );
    }
    // Its good write was applied and answered: the first change of the map.
    let answered = wait_until(PATIENCE, || {
        master
            .log()
            .contains("answer kind=15 id=9 seq=1 code=2 value=5")
    });
    assert!(answered, "{}", master.log());
    assert_eq!(master.status()["state"]["writes"], 1);
    // Nobody was replaced, and both workers serve.
    assert_eq!(master.wait_all_ready(), pids, "no worker replaced");
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let response = master.get();
        assert_eq!(response.body, "hola, mundo\n");
        seen.insert(response.pid);
    }
    assert_eq!(seen, pids.into_iter().collect(), "{}", master.log());
}

/// The last acknowledged write each writer logged: `acked w:PID:N`.
fn last_acked(log: &str) -> HashMap<u32, u64> {
    let mut acked = HashMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("acked w:").nth(1) else {
            continue;
        };
        let mut parts = rest.split_whitespace().next().unwrap_or("").split(':');
        let (Some(pid), Some(n)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(pid), Ok(n)) = (pid.parse::<u32>(), n.parse::<u64>()) {
            let last = acked.entry(pid).or_insert(n);
            *last = (*last).max(n);
        }
    }
    acked
}

#[test]
fn no_acknowledged_write_is_lost_across_twenty_sigkills_of_writing_workers() {
    const WORKERS: usize = 4;
    const KILLS: usize = 20;
    let (example, addr) = shared_state(WORKERS, &[], &[("SHARED_STATE_WRITER", "1")]);
    let mut killed = HashSet::new();
    for kill in 0..KILLS {
        // The slot's current process has had 100 writes acknowledged: kill it mid-load.
        let slot = kill % WORKERS;
        let mut victim = None;
        let writing = wait_until(PATIENCE, || {
            let log = example.log();
            let acked = last_acked(&log);
            victim = ready_pids(&log)
                .get(&slot)
                .copied()
                .filter(|pid| !killed.contains(pid) && acked.get(pid).is_some_and(|n| *n >= 100));
            victim.is_some()
        });
        assert!(
            writing,
            "slot {slot} has no writing worker:\n{}",
            example.log()
        );
        let victim = victim.unwrap();
        send_signal(victim, "KILL");
        killed.insert(victim);
    }
    // The survivors and the respawned workers write on; every acknowledged write of every
    // process, killed or not, is in the map.
    let acked = last_acked(&example.log());
    assert!(acked.len() >= KILLS, "{acked:?}");
    let mut checked = 0;
    for (pid, last) in &acked {
        let missing = http(addr, "GET", &format!("/missing/w:{pid}:?upto={last}"), b"");
        assert_eq!(missing.status, 200, "{}", missing.body);
        assert_eq!(
            missing.body,
            "0",
            "worker {pid} lost writes up to {last}:\n{}",
            example.log()
        );
        checked += last + 1;
    }
    eprintln!(
        "{KILLS} SIGKILLs: {} writers, {checked} acknowledged writes all present",
        acked.len()
    );
    stop(example);
}

#[test]
fn a_token_is_accepted_by_every_worker_and_refused_by_every_worker_after_logout() {
    let mut cmd = example("tokens");
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "4"]);
    cmd.args(["--metrics", "127.0.0.1:0"]);
    let (tokens, addr) = start(cmd, 4);
    token_everywhere(addr, 4, &tokens);
    // The map's figures are on /metrics: the login, the logout and the second logout (of
    // nothing) applied, nothing left.
    let scrape = crate::metrics::scrape(crate::metrics::metrics_addr_in(|| tokens.log()));
    let series = |name| crate::metrics::series(&scrape, name);
    assert_eq!(series("handoff_state_writes_total"), Some(3.0), "{scrape}");
    assert_eq!(series("handoff_state_entries"), Some(0.0), "{scrape}");
    assert_eq!(series("handoff_state_writes_refused_total"), Some(0.0));
    assert!(
        series("handoff_state_snapshots_total") >= Some(4.0),
        "{scrape}"
    );
    stop(tokens);
}

/// Logs in, then checks that every one of `workers` accepts the token, logs out and checks
/// that every one refuses it, with the latencies printed: the tokens example's contract on
/// either backend.
pub(crate) fn token_everywhere(addr: SocketAddr, workers: usize, tokens: &crate::util::Spawned) {
    let login = http(addr, "POST", "/login", b"");
    assert_eq!(login.status, 200, "{}", login.body);
    let token = login.body.clone();
    assert_eq!(token.len(), 32, "{token:?}");
    let check = format!("/check?token={token}");

    // Every worker accepts it (each replica got the write, in a bounded wait).
    let issued = Instant::now();
    let mut accepted: HashMap<u32, Duration> = HashMap::new();
    let everywhere = wait_until(PATIENCE, || {
        let response = http(addr, "GET", &check, b"");
        if response.status == 200 {
            accepted.entry(response.pid).or_insert(issued.elapsed());
        }
        accepted.len() == workers
    });
    assert!(everywhere, "accepted by {accepted:?}:\n{}", tokens.log());
    assert_eq!(accepted.get(&login.pid).copied().map(|_| ()), Some(()));

    let logout = http(addr, "POST", &format!("/logout?token={token}"), b"");
    assert_eq!((logout.status, logout.body.as_str()), (200, "revoked\n"));
    let revoked = Instant::now();
    let mut refused: HashMap<u32, Duration> = HashMap::new();
    let everywhere = wait_until(PATIENCE, || {
        let response = http(addr, "GET", &check, b"");
        match response.status {
            401 => {
                refused.entry(response.pid).or_insert(revoked.elapsed());
            }
            // A replica never shows it again once it has shown the revocation.
            200 => assert!(
                !refused.contains_key(&response.pid),
                "worker {} accepted a revoked token again",
                response.pid
            ),
            other => panic!("{other}: {}", response.body),
        }
        refused.len() == workers
    });
    assert!(everywhere, "refused by {refused:?}:\n{}", tokens.log());
    assert_eq!(
        http(addr, "POST", &format!("/logout?token={token}"), b"").status,
        404
    );
    assert_eq!(http(addr, "GET", "/check?token=nonsense", b"").status, 401);
    eprintln!(
        "token accepted by all {workers} workers within {:?} of its login; refused by all \
         within {:?} of its logout (one HTTP request per probe)",
        accepted.values().max().unwrap(),
        refused.values().max().unwrap()
    );
}

#[test]
fn a_worker_that_falls_behind_gets_a_fresh_snapshot_and_never_diverges() {
    let (example, addr) = shared_state(2, &[], &[]);
    // A keep-alive connection to each worker (the first stays open: least-loaded gives the
    // second to the other worker).
    let mut first = Kept::open(addr);
    let a = first.request("GET", "/get/nothing", b"", true).pid;
    let mut second = Kept::open(addr);
    let b = second.request("GET", "/get/nothing", b"", true).pid;
    assert_ne!(a, b, "both connections on one worker");
    // Stop worker a; worker b writes 2.4 MB of changes, more than the socket and the
    // master's 1 MiB queue for a hold.
    send_signal(a, "STOP");
    for round in 0..40u32 {
        let mut value = format!("{round:05}").into_bytes();
        value.resize(60_000, b'.');
        let set = second.request("PUT", &format!("/set/big-{}", round % 10), &value, true);
        assert_eq!(set.status, 204, "{}", set.body);
    }
    assert_eq!(second.request("PUT", "/set/last", b"x", true).status, 204);
    send_signal(a, "CONT");
    let caught_up = wait_until(PATIENCE, || {
        first.request("GET", "/get/last", b"", true).body == "x"
    });
    assert!(caught_up, "{}", example.log());
    for key in 0..10 {
        let got = first.request("GET", &format!("/get/big-{key}"), b"", true);
        assert_eq!(got.pid, a);
        assert_eq!(got.body.len(), 60_000);
        assert_eq!(
            &got.body[..5],
            format!("{:05}", 30 + key),
            "the last write of big-{key}"
        );
    }
    let behind = crate::util::log_lines(&example.log(), &["fell behind the shared map's changes"]);
    assert!(behind >= 1, "{}", example.log());
    drop((first, second));
    stop(example);
}
