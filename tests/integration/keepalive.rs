//! Keep-alive connections survive rolling restarts: while 20 keep-alive clients send
//! requests back to back, two SIGHUP restarts replace every worker, and no client sees an
//! error. Draining workers hand their idle connections back to the master at a request
//! boundary (HANDBACK), which gives them to the new workers; a request in flight is answered
//! with `Connection: close` at worst, and the client reconnects. Both the embedded demo
//! worker (Rust, hyper) and `examples/worker.py`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::util::{log_lines, wait_until, Master, PATIENCE};

/// Keep-alive clients, as in the wrk run.
const CLIENTS: usize = 20;

/// What the clients saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub requests: AtomicU64,
    /// Responses that said `Connection: close` (the client reconnects: not an error).
    pub closes: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

/// Threads, each with one keep-alive connection, sending `GET /` until stopped (back to
/// back, or one every `pace`); a connection closed on a `Connection: close` response is
/// reopened.
pub(crate) struct KeepAliveLoad {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
}

impl KeepAliveLoad {
    fn start(addr: SocketAddr) -> KeepAliveLoad {
        Self::paced(addr, CLIENTS, None)
    }

    /// `clients` connections, each sending a request every `pace` (on schedule: a late one
    /// goes at once), or back to back.
    pub fn paced(addr: SocketAddr, clients: usize, pace: Option<Duration>) -> KeepAliveLoad {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (tally, stop) = (tally.clone(), stop.clone());
                std::thread::spawn(move || client(addr, &tally, &stop, pace))
            })
            .collect();
        KeepAliveLoad {
            tally,
            stop,
            clients,
        }
    }

    pub fn requests(&self) -> u64 {
        self.tally.requests.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests beyond `from` were answered.
    pub fn wait_requests(&self, from: u64, more: u64) -> bool {
        wait_until(PATIENCE, || self.requests() >= from + more)
    }

    pub fn finish(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().expect("a client thread panicked");
        }
        self.tally
    }
}

fn client(addr: SocketAddr, tally: &Tally, stop: &AtomicBool, pace: Option<Duration>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let start = std::time::Instant::now();
    let mut sent = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if let Some(pace) = pace {
            // The schedule, not a wait for correctness: an open-loop client.
            let due = start + pace * sent;
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            sent += 1;
        }
        let stream = match conn.as_mut() {
            Some(stream) => stream,
            None => match connect(addr) {
                Ok(stream) => conn.insert(stream),
                Err(e) => {
                    tally.errors.lock().unwrap().push(format!("connect: {e}"));
                    return;
                }
            },
        };
        match request(stream) {
            Ok(close) => {
                tally.requests.fetch_add(1, Ordering::Relaxed);
                if close {
                    tally.closes.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            Err(e) => {
                tally.errors.lock().unwrap().push(e.to_string());
                conn = None;
            }
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// One keep-alive `GET /`; whether the response said `Connection: close`. Anything but a
/// whole 200 response is an error.
fn request(stream: &mut BufReader<TcpStream>) -> std::io::Result<bool> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")?;
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(bad("connection closed before a response".into()));
    }
    if line.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("status line {line:?}")));
    }
    let (mut length, mut close) = (None, false);
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(bad("connection closed in the response's head".into()));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(format!("header {header:?}")));
        };
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "connection" => close |= value.to_ascii_lowercase().contains("close"),
            _ => {}
        }
    }
    let length = length.ok_or_else(|| bad("no content-length".into()))?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(close)
}

/// Two SIGHUP rolling restarts of the master `pid` serving `addr` under keep-alive load,
/// each waited for (`log` says `rolling restart done`): no client error, and requests go on
/// through both. Returns what the clients saw.
pub(crate) fn two_restarts_under_keep_alive_load(
    addr: SocketAddr,
    pid: u32,
    log: &dyn Fn() -> String,
) -> Arc<Tally> {
    let load = KeepAliveLoad::start(addr);
    assert!(load.wait_requests(0, 200), "load started; log:\n{}", log());
    for restart in 1..=2 {
        let before = load.requests();
        crate::util::send_signal(pid, "HUP");
        let done = wait_until(PATIENCE, || {
            log_lines(&log(), &["rolling restart done"]) >= restart
        });
        assert!(done, "restart {restart} not done; log:\n{}", log());
        assert!(
            load.wait_requests(before, 200),
            "requests continued through restart {restart}; log:\n{}",
            log()
        );
    }
    let tally = load.finish();
    let errors = tally.errors.lock().unwrap();
    eprintln!(
        "keep-alive through two restarts: {} requests, {} Connection: close, {} errors",
        tally.requests.load(Ordering::Relaxed),
        tally.closes.load(Ordering::Relaxed),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} client errors, first {:?}; log:\n{}",
        errors.len(),
        errors.first(),
        log()
    );
    drop(errors);
    tally
}

/// [`two_restarts_under_keep_alive_load`] of a [`Master`], whose idle keep-alive
/// connections went back to it and none was refused.
fn restarts_lose_no_keep_alive_request(master: &Master) {
    two_restarts_under_keep_alive_load(master.addr, master.pid(), &|| master.log());
    let counters = master.status()["counters"].clone();
    eprintln!("counters: {counters}");
    assert!(
        counters["handed_back"].as_u64().unwrap() > 0,
        "idle keep-alive connections were handed back; log:\n{}",
        master.log()
    );
    assert_eq!(counters["handbacks_refused"].as_u64(), Some(0));
}

#[test]
fn keep_alive_connections_survive_two_rolling_restarts_of_the_demo_worker() {
    let master = Master::start(&["--workers", "2"]);
    restarts_lose_no_keep_alive_request(&master);
}

#[test]
fn keep_alive_connections_survive_two_rolling_restarts_of_the_python_worker() {
    let script = format!("{}/examples/worker.py", env!("CARGO_MANIFEST_DIR"));
    let master = Master::start(&["--workers", "2", "--", "python3", "-B", &script]);
    restarts_lose_no_keep_alive_request(&master);
}

/// A connection handed back with a whole request already read from it is answered by the
/// next worker from those bytes alone (see `tests/fixtures/handback_bytes_worker.py`).
fn bytes_handed_back_are_read_first(next_demo: bool) {
    let script = format!(
        "{}/tests/fixtures/handback_bytes_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let args = [
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--",
        "python3",
        "-B",
        &script,
    ];
    let master = Master::start_with(&args, |cmd| {
        if next_demo {
            cmd.env("HANDBACK_NEXT_DEMO", crate::util::BIN);
        }
    });
    let hostile = master.worker_pids()[0].unwrap();
    let handed = wait_until(PATIENCE, || {
        let response = crate::util::http_get(master.addr)
            .unwrap_or_else(|e| panic!("a client was not served: {e}; log:\n{}", master.log()));
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "hola, mundo\n")
        );
        assert_ne!(response.pid, hostile);
        master.status()["counters"]["handed_back"].as_u64() == Some(1)
    });
    assert!(handed, "no handback; log:\n{}", master.log());
}

#[test]
fn bytes_handed_back_are_read_first_by_a_python_worker() {
    bytes_handed_back_are_read_first(false);
}

#[test]
fn bytes_handed_back_are_read_first_by_the_demo_worker() {
    bytes_handed_back_are_read_first(true);
}

/// A worker sent SIGTERM drains on its own: it says DRAINING first, then hands its
/// keep-alive connections back (a handback before DRAINING would be refused), and no client
/// sees an error.
fn a_worker_sent_sigterm_hands_its_keep_alive_connections_back(master: &Master) {
    let load = KeepAliveLoad::start(master.addr);
    assert!(
        load.wait_requests(0, 200),
        "load started; log:\n{}",
        master.log()
    );
    let victim = master.worker_pids()[0].unwrap();
    crate::util::send_signal(victim, "TERM");
    assert!(
        wait_until(PATIENCE, || !crate::util::process_exists(victim)),
        "the worker drained and exited; log:\n{}",
        master.log()
    );
    let before = load.requests();
    assert!(load.wait_requests(before, 200), "requests go on");
    let tally = load.finish();
    let errors = tally.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors, first {:?}; log:\n{}",
        errors.len(),
        errors.first(),
        master.log()
    );
    let counters = master.status()["counters"].clone();
    assert!(counters["handed_back"].as_u64().unwrap() > 0, "{counters}");
    assert_eq!(
        counters["handbacks_refused"].as_u64(),
        Some(0),
        "{counters}"
    );
}

#[test]
fn a_demo_worker_sent_sigterm_hands_its_keep_alive_connections_back() {
    let master = Master::start(&["--workers", "2"]);
    a_worker_sent_sigterm_hands_its_keep_alive_connections_back(&master);
}

#[test]
fn a_python_worker_sent_sigterm_hands_its_keep_alive_connections_back() {
    let script = format!("{}/examples/worker.py", env!("CARGO_MANIFEST_DIR"));
    let master = Master::start(&["--workers", "2", "--", "python3", "-B", &script]);
    a_worker_sent_sigterm_hands_its_keep_alive_connections_back(&master);
}

/// A connection that reached a worker with no request yet when the master stops still gets
/// its first request answered: handed back unanswered, the stopping master (no worker to
/// give it to) would close it under the request.
#[test]
fn a_new_connection_is_answered_though_the_master_stops_before_its_first_request() {
    let script = format!("{}/examples/worker.py", env!("CARGO_MANIFEST_DIR"));
    let master = Master::start(&["--workers", "1", "--", "python3", "-B", &script]);
    let stream = TcpStream::connect_timeout(&master.addr, Duration::from_secs(10)).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let taken = wait_until(PATIENCE, || {
        master.status()["workers"][0]["active"].as_u64() == Some(1)
    });
    assert!(taken, "the worker has it; log:\n{}", master.log());
    master.signal("TERM");
    let draining = wait_until(PATIENCE, || {
        log_lines(&master.log(), &["the master closed the channel; draining"]) == 1
    });
    assert!(draining, "the worker drains; log:\n{}", master.log());
    let mut stream = BufReader::new(stream);
    if let Err(e) = request(&mut stream) {
        panic!("not answered: {e}; log:\n{}", master.log());
    }
}
