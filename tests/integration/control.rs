//! The control socket and Unix socket paths, tested on the real binary: only the master's
//! own user is answered, idle control connections cannot spend the master's fds, and a
//! socket path a live process answers on is never taken over.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::{
    log_lines, read_response, status_at, wait_until, Master, Spawned, BIN, PATIENCE,
};

/// One `GET /` over the Unix listener at `path`; the status code.
fn unix_get(path: &Path) -> std::io::Result<u16> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
    Ok(read_response(&mut BufReader::new(stream))?.status)
}

/// One `GET /` within `limit` all told (connect, send, answer); its latency.
fn timed_get(addr: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let attempt = || -> std::io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
        Ok(read_response(&mut BufReader::new(stream))?.status)
    };
    match attempt() {
        Ok(200) if start.elapsed() <= limit => Ok(start.elapsed()),
        Ok(200) => Err(format!("answered after {:?}", start.elapsed())),
        Ok(status) => Err(format!("status {status}")),
        Err(e) => Err(format!("{:?} after {:?}", e.kind(), start.elapsed())),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// This process's soft RLIMIT_NOFILE, from /proc/self/limits.
fn soft_fd_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Makes sure this test process may open `fds` more files, raising RLIMIT_NOFILE (to the
/// hard limit, or past it with `prlimit` as root).
fn allow_fds(fds: u64) {
    let enough = || soft_fd_limit() >= fds;
    if !enough() {
        let limit = format!("--nofile={fds}:{fds}");
        let pid = std::process::id().to_string();
        let raised = Command::new("prlimit")
            .args(["--pid", &pid, &limit])
            .status();
        assert!(
            raised.is_ok_and(|s| s.success()) && enough(),
            "this test needs RLIMIT_NOFILE of {fds}"
        );
    }
}

#[test]
fn control_socket_was_world_writable_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"umask 000; exec "$0" "$@""#, BIN, "run"])
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--control"])
        .arg(&control);
    let master = Spawned::start(cmd);
    assert!(
        wait_until(PATIENCE, || status_at(&control).is_some()),
        "no control socket; log:\n{}",
        master.log()
    );
    assert_eq!(mode(&control), 0o600, "{:o}", mode(&control));
}

#[test]
fn idle_control_connections_exhausted_the_masters_fds_and_stalled_http() {
    const FLOOD: usize = 1_100;
    const REQUESTS: usize = 600;
    const CLIENTS: usize = 4;
    allow_fds(4096);
    // The old master accepted every control connection at once: 1,100 of them cannot fit
    // in 1,024 fds, and HTTP accepts failed with EMFILE until they timed out.
    let mut limited = Command::new("prlimit");
    limited.args(["--nofile=1024:1024", BIN]);
    let master = Master::start_via(limited, &["--workers", "2"]);

    let flood_start = Instant::now();
    let (done, flooded) = mpsc::channel();
    let control = master.control.clone();
    std::thread::spawn(move || {
        let held: std::io::Result<Vec<UnixStream>> =
            (0..FLOOD).map(|_| UnixStream::connect(&control)).collect();
        let _ = done.send(held);
    });
    let held = flooded
        .recv_timeout(PATIENCE)
        .expect("1,100 connects to the control socket in time")
        .expect("connect to the control socket");
    eprintln!("flood connected in {:?}", flood_start.elapsed());

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = master.addr;
            std::thread::spawn(move || {
                (0..REQUESTS / CLIENTS)
                    .map(|_| timed_get(addr, Duration::from_secs(5)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Result<Duration, String>> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut latencies: Vec<Duration> = results.iter().filter_map(|r| r.clone().ok()).collect();
    latencies.sort();
    let p99 = latencies.get(latencies.len() * 99 / 100).copied();
    eprintln!(
        "{REQUESTS} GETs under {FLOOD} idle control connections: {} failed, p99 {p99:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} failed, e.g. {:?}; log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        master.log()
    );
    assert!(
        wait_until(PATIENCE, || master.try_status().is_some()),
        "no status while the flood is held; log:\n{}",
        master.log()
    );
    drop(held);
}

/// Runs `handoff ctl --control PATH` as uid 65534 (nobody) with `setpriv` (util-linux; the
/// tests run as root, as CI does). Its stdout, or its stderr on failure.
fn ctl_as_nobody(path: &Path, program: &Path) -> Result<String, String> {
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(program)
        .args(["ctl", "--control"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success() || stderr.starts_with("handoff: "),
        "setpriv could not switch to uid 65534 (the tests run as root): {stderr}"
    );
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(stderr)
    }
}

#[test]
fn a_peer_running_as_another_user_got_answers() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "switching to uid 65534 needs root: run the tests as root, as CI does"
    );
    let master = Master::start(&["--workers", "1"]);
    // The binary must be reachable by nobody: copy it out of a private checkout if need be.
    let copy = tempfile::tempdir().unwrap();
    chmod(copy.path(), 0o755);
    let program = PathBuf::from(BIN);
    let readable = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let program = if readable {
        program
    } else {
        let copied = copy.path().join("handoff");
        std::fs::copy(&program, &copied).unwrap();
        chmod(&copied, 0o755);
        copied
    };
    chmod(master.control.parent().unwrap(), 0o755);

    // The file mode alone keeps other users out...
    let denied =
        ctl_as_nobody(&master.control, &program).expect_err("connect as nobody to a 0600 socket");
    assert!(denied.contains("ermission denied"), "{denied}");

    // ...and with the file opened up, the peer's credentials still do.
    chmod(&master.control, 0o666);
    // Closed without an answer: an empty reply, or a reset when the command was unread.
    match ctl_as_nobody(&master.control, &program) {
        Ok(reply) => assert_eq!(reply, "", "no answer to another user"),
        Err(e) => assert!(!e.contains("connecting"), "it did connect: {e}"),
    }
    assert!(
        wait_until(PATIENCE, || log_lines(
            &master.log(),
            &["refused", "uid=65534"]
        ) == 1),
        "one refusal line with the peer's uid; log:\n{}",
        master.log()
    );
    assert!(log_lines(&master.log(), &["refused", "pid="]) == 1);
    assert_eq!(
        master.status()["pid"],
        master.pid(),
        "root is still answered"
    );
}

#[test]
fn a_second_master_took_over_a_live_unix_listen_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let listen = format!("unix:{}", path.display());
    let master = Master::start(&["--workers", "1", "--listen", &listen]);
    assert_eq!(unix_get(&path).unwrap(), 200);

    let mut second = Spawned::run(&["--listen", &listen, "--workers", "1"]);
    let exit = second.wait_exit(PATIENCE).expect("the second master exits");
    assert!(!exit.success(), "{exit:?}");
    assert!(
        wait_until(PATIENCE, || second.log().contains("in use")),
        "{}",
        second.log()
    );
    assert_eq!(
        unix_get(&path).unwrap(),
        200,
        "the first master still serves its unix listener; log:\n{}",
        master.log()
    );
}

#[test]
fn a_second_master_took_over_a_live_control_path() {
    let master = Master::start(&["--workers", "1"]);
    let control = master.control.to_str().unwrap();
    let mut second = Spawned::run(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--control",
        control,
    ]);
    let exit = second.wait_exit(PATIENCE).expect("the second master exits");
    assert!(!exit.success(), "{exit:?}");
    assert!(
        wait_until(PATIENCE, || second.log().contains("in use")),
        "{}",
        second.log()
    );
    assert_eq!(
        master.status()["pid"],
        master.pid(),
        "the first still answers"
    );
}

#[test]
fn stale_socket_files_are_still_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (http, control) = (
        dir.path().join("http.sock"),
        dir.path().join("control.sock"),
    );
    for path in [&http, &control] {
        drop(UnixListener::bind(path).unwrap());
        assert!(path.exists(), "the stale file stays");
    }
    let listen = format!("unix:{}", http.display());
    let master = Spawned::run(&[
        "--listen",
        &listen,
        "--workers",
        "1",
        "--control",
        control.to_str().unwrap(),
    ]);
    assert!(
        wait_until(PATIENCE, || status_at(&control).is_some()),
        "no control socket; log:\n{}",
        master.log()
    );
    assert!(
        wait_until(PATIENCE, || unix_get(&http).is_ok_and(|s| s == 200)),
        "no answer over the replaced unix listener; log:\n{}",
        master.log()
    );
}

#[test]
fn control_path_equal_to_a_unix_listen_path_clobbered_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("both.sock");
    let listen = format!("unix:{}", path.display());
    let start = Instant::now();
    let mut master = Spawned::run(&[
        "--listen",
        &listen,
        "--workers",
        "1",
        "--control",
        path.to_str().unwrap(),
    ]);
    let exit = master.wait_exit(PATIENCE).expect("refused at start");
    assert!(!exit.success(), "{exit:?}");
    let stderr = master.log();
    assert!(
        stderr.contains("invalid configuration") && stderr.contains("--control"),
        "{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(!path.exists(), "nothing was bound");
}

/// Regression: while control connections churned (opened and dropped by the hundred), the
/// master made room by closing `handoff ctl`'s own connection with its command unread, and
/// `ctl` printed nothing and exited 0.
#[test]
fn handoff_ctl_answers_while_control_connections_churn() {
    allow_fds(4096);
    let master = Master::start(&["--workers", "1"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churners: Vec<_> = (0..2)
        .map(|_| {
            let (path, stop) = (master.control.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                let deadline = Instant::now() + PATIENCE;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    if let Ok(stream) = UnixStream::connect(&path) {
                        held.push_back(stream);
                    }
                    if held.len() > 1_000 {
                        held.pop_front();
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for _ in 0..20 {
        let out = Command::new(BIN)
            .args(["ctl", "--control"])
            .arg(&master.control)
            .output()
            .unwrap();
        let reply = String::from_utf8_lossy(&out.stdout);
        let answered = out.status.success()
            && serde_json::from_str::<serde_json::Value>(&reply).is_ok_and(|s| s["pid"].is_u64());
        if !answered {
            failures.push((
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churners.into_iter().for_each(|c| c.join().unwrap());
    assert!(
        failures.is_empty(),
        "{} of 20 failed: {failures:?}",
        failures.len()
    );
}

#[test]
fn top_once_prints_every_worker_with_its_rates_and_the_totals() {
    let master = Master::start(&["--workers", "2"]);
    let pids = master.wait_all_ready();
    for _ in 0..10 {
        assert_eq!(master.get().status, 200);
    }
    let output = Command::new(BIN)
        .args(["top", "--once", "--interval", "200ms", "--control"])
        .arg(&master.control)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let frame = String::from_utf8(output.stdout).unwrap();
    assert!(frame.contains("workers 2/2 ready"), "{frame}");
    assert!(frame.contains("accepted 10"), "{frame}");
    assert!(frame.contains("SLOT") && frame.contains("REQ/S") && frame.contains("RESTARTS"));
    for pid in pids {
        let line = frame
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no line for {pid}:\n{frame}"));
        assert_eq!(line.split_whitespace().nth(2), Some("ready"), "{line}");
    }
}

#[test]
fn top_says_clearly_when_no_master_answers() {
    let output = Command::new(BIN)
        .args(["top", "--once", "--control", "/nonexistent/handoff.sock"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("connecting to the control socket"),
        "{error}"
    );
}

/// `handoff ctl --control PATH WORDS...`: its exit status, stdout and stderr.
fn ctl(master: &Master, words: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(&master.control)
        .args(words)
        .output()
        .unwrap()
}

#[test]
fn ctl_reload_returns_once_every_worker_was_replaced_and_is_ready() {
    let master = Master::start(&["--workers", "3", "--drain-timeout", "5s"]);
    let before = master.wait_all_ready();
    let output = ctl(&master, &["reload"]);
    assert!(output.status.success(), "{output:?}\n{}", master.log());
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let after: Vec<u32> = serde_json::from_value(answer["workers"].clone()).unwrap();
    assert_eq!(after.len(), 3, "{answer}");
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "{before:?} -> {after:?}"
    );
    // Answered when done: the status agrees at once.
    let status = master.status();
    assert_eq!(status["restarting"], false, "{status}");
    assert_eq!(crate::util::ready_workers(&status), 3, "{status}");
    assert_eq!(master.get().status, 200);
}

#[test]
fn ctl_scale_returns_with_that_many_ready_workers_and_refuses_nonsense() {
    let master = Master::start(&["--workers", "2"]);
    let up = ctl(&master, &["scale", "4"]);
    assert!(up.status.success(), "{up:?}\n{}", master.log());
    assert_eq!(crate::util::ready_workers(&master.status()), 4);
    let down = ctl(&master, &["scale", "1"]);
    assert!(down.status.success(), "{down:?}");
    assert_eq!(master.status()["workers"].as_array().unwrap().len(), 1);
    for nonsense in [&["scale", "0"][..], &["scale", "lots"], &["reboot"]] {
        let refused = ctl(&master, nonsense);
        assert!(!refused.status.success(), "{nonsense:?} exited 0");
        let error = String::from_utf8_lossy(&refused.stderr);
        assert!(error.contains(&nonsense.join(" ")), "{error}");
    }
    assert_eq!(master.get().status, 200, "still serving");
}

#[test]
fn ctl_stop_returns_once_the_master_is_gone() {
    let mut master = Master::start(&["--workers", "2"]);
    let output = ctl(&master, &["stop"]);
    assert!(output.status.success(), "{output:?}\n{}", master.log());
    let exited = master.wait_exit(PATIENCE);
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    assert!(!master.control.exists(), "the control socket is removed");
    assert!(
        wait_until(PATIENCE, || master
            .log()
            .contains("handoff ctl stop: stopping")),
        "{}",
        master.log()
    );
}
