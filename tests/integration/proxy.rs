//! `handoff proxy` end to end: the real binary in front of backends this test runs on
//! 127.0.0.1 port 0 (threads of the test process, or `python3 -m http.server` for
//! `--spawn`): byte-exact relaying with half-close, exact least-connections across workers,
//! the queue and its timeout, every backend down, a backend coming back, the idle timeout,
//! PROXY v2.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{ready_workers, status_at, wait_until, Spawned, BIN, PATIENCE};

/// A running `handoff proxy` with a control socket, killed with its children on drop.
struct Proxy {
    process: Spawned,
    control: PathBuf,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// `handoff proxy --listen 127.0.0.1:0 --control TMP --workers N ARGS...`, once every
    /// worker is ready.
    fn start(workers: usize, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control.sock");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path())
            .args(["proxy", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .args(["--workers", &workers.to_string()])
            .args(args);
        let process = Spawned::start(cmd);
        let mut status = None;
        let ready = wait_until(PATIENCE, || {
            status = status_at(&control);
            status.as_ref().is_some_and(|s| ready_workers(s) == workers)
        });
        assert!(ready, "proxy not ready: {status:?}\n{}", process.log());
        let addr = status.unwrap()["listening"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        Proxy {
            process,
            control,
            addr,
            _dir: dir,
        }
    }

    /// A worker metric added up across the cluster (0 if not yet published).
    fn metric(&self, key: &str) -> u64 {
        let status = status_at(&self.control).expect("status");
        status["metrics"][key].as_f64().unwrap_or(0.0) as u64
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metric(&format!("proxy_refused_total{{reason=\"{reason}\"}}"))
    }
}

/// What a test backend does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Sends back every byte as it arrives; closes after the client's end of stream.
    Echo,
    /// Reads to the client's end of stream, waits this long, answers `ok`, closes.
    Answer(Duration),
    /// Reads to the end of stream, then waits for `release` before answering `ok`.
    Hold,
    /// Reads the first 28 bytes (a PROXY v2 header for IPv4) and sends them back.
    Header,
}

/// A backend on 127.0.0.1 port 0, each connection on a thread of its own; counts the
/// connections that send something (not the proxy's health checks), and their time in
/// flight on a board shared with the other backends of the test.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    release: Arc<AtomicBool>,
}

/// In-flight counts of a test's backends, and at each arrival how far the chosen backend
/// was above the least (its count before this connection, minus the least count).
#[derive(Default)]
struct Tally {
    in_flight: Vec<AtomicI64>,
    deviations: Mutex<Vec<i64>>,
}

impl Backend {
    fn start(behaviour: Behaviour, tally: Option<(Arc<Tally>, usize)>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener, behaviour, tally)
    }

    fn serve(
        listener: TcpListener,
        behaviour: Behaviour,
        tally: Option<(Arc<Tally>, usize)>,
    ) -> Backend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let release = Arc::new(AtomicBool::new(false));
        let (count, free) = (accepted.clone(), release.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (tally, free, count) = (tally.clone(), free.clone(), count.clone());
                std::thread::spawn(move || {
                    // A health check connects and closes: only a client that sends counts.
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    if !matches!(stream.peek(&mut [0u8; 1]), Ok(1)) {
                        return;
                    }
                    if let Some((tally, me)) = &tally {
                        let least = tally
                            .in_flight
                            .iter()
                            .map(|c| c.load(Ordering::SeqCst))
                            .min()
                            .unwrap();
                        let mine = tally.in_flight[*me].fetch_add(1, Ordering::SeqCst);
                        tally.deviations.lock().unwrap().push(mine - least);
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    handle(
                        stream,
                        behaviour,
                        &free,
                        tally.as_ref().map(|(t, me)| (&**t, *me)),
                    );
                });
            }
        });
        Backend {
            addr,
            accepted,
            release,
        }
    }
}

fn handle(
    mut stream: TcpStream,
    behaviour: Behaviour,
    release: &AtomicBool,
    tally: Option<(&Tally, usize)>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        },
        Behaviour::Answer(_) | Behaviour::Hold => {
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
            if let Behaviour::Answer(pause) = behaviour {
                std::thread::sleep(pause);
            } else {
                wait_until(PATIENCE, || release.load(Ordering::SeqCst));
            }
            let _ = stream.write_all(b"ok");
        }
        Behaviour::Header => {
            let mut header = [0u8; 28];
            if stream.read_exact(&mut header).is_ok() {
                let _ = stream.write_all(&header);
            }
        }
    }
    if let Some((tally, me)) = tally {
        tally.in_flight[me].fetch_sub(1, Ordering::SeqCst);
    }
}

/// A port on 127.0.0.1 nothing listens on (bound, then closed).
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends `request`, half-closes, reads the answer to its end.
fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(answer)
}

/// Whether an exchange ended with the proxy's clean close and no answer.
fn closed_unserved(answer: std::io::Result<Vec<u8>>) -> bool {
    match answer {
        Ok(answer) => answer.is_empty(),
        Err(e) => panic!("not a clean close: {e}"),
    }
}

/// Sends `payload` through an echo backend while reading it back; half-closes after the
/// last byte and returns what came back before the end of stream.
fn echo_through(addr: SocketAddr, payload: &Arc<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let mut writer = stream.try_clone()?;
    let sent = payload.clone();
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        for chunk in sent.chunks(100_000) {
            writer.write_all(chunk)?;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(payload.len());
    stream.read_to_end(&mut back)?;
    sending.join().unwrap()?;
    Ok(back)
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 200 transfers of 1 MiB each way (the 10,000 scaled down; the full run is in
/// docs/benchmarks.md), 8 at a time, through 2 workers and 2 echo backends: every byte
/// comes back in order, after the client's half-close, with no error, by splice and by copy.
#[test]
fn transfers_are_byte_exact_with_half_close() {
    for relay in ["splice", "copy"] {
        let backends = [
            Backend::start(Behaviour::Echo, None),
            Backend::start(Behaviour::Echo, None),
        ];
        let (a, b) = (backends[0].addr.to_string(), backends[1].addr.to_string());
        let proxy = Proxy::start(2, &["--backend", &a, "--backend", &b, "--relay", relay]);
        let transfers = if relay == "splice" { 200 } else { 40 };
        let next = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (next, errors, addr) = (next.clone(), errors.clone(), proxy.addr);
                std::thread::spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= transfers {
                        return;
                    }
                    let sent = Arc::new(payload(1 << 20, i + 1));
                    match echo_through(addr, &sent) {
                        Ok(back) if back == *sent => {}
                        Ok(back) => {
                            eprintln!("transfer {i}: {} bytes back, not the same", back.len());
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            eprintln!("transfer {i}: {e}");
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        assert_eq!(
            errors.load(Ordering::SeqCst),
            0,
            "{relay}: {}",
            proxy.process.log()
        );
        let served: u64 = backends
            .iter()
            .map(|b| b.accepted.load(Ordering::SeqCst))
            .sum();
        assert_eq!(served, transfers);
        // A worker counts a relay's bytes as it ends, which may be just after its client
        // read the last byte: wait (bounded) for the count, which must be exact.
        let key = "proxy_bytes_total{direction=\"to_backend\"}";
        let mut to_backend = 0;
        wait_until(PATIENCE, || {
            to_backend = proxy.metric(key);
            to_backend >= transfers << 20
        });
        assert_eq!(to_backend, transfers << 20, "{relay}: every byte counted");
    }
}

/// 8 backends, one 10x slower than the others, 12 clients in a closed loop: with
/// least-connections the backend a connection reaches is within one of the least loaded
/// (sampled at the backends at each arrival), and the slow backend gets far fewer
/// connections than round-robin's eighth.
#[test]
fn least_connections_holds_across_workers_and_spares_the_slow_backend() {
    let run = |balance: &str| -> (Vec<i64>, f64, Vec<Duration>) {
        let tally = Arc::new(Tally {
            in_flight: (0..8).map(|_| AtomicI64::new(0)).collect(),
            deviations: Mutex::default(),
        });
        let backends: Vec<Backend> = (0..8)
            .map(|i| {
                let pause = Duration::from_millis(if i == 0 { 30 } else { 3 });
                Backend::start(Behaviour::Answer(pause), Some((tally.clone(), i)))
            })
            .collect();
        let mut args = vec!["--balance".to_owned(), balance.to_owned()];
        for backend in &backends {
            args.extend(["--backend".to_owned(), backend.addr.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = Proxy::start(2, &args);
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = (0..12)
            .map(|_| {
                let (latencies, addr) = (latencies.clone(), proxy.addr);
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        let start = Instant::now();
                        let answer = exchange(addr, b"GET").unwrap();
                        assert_eq!(answer, b"ok");
                        latencies.lock().unwrap().push(start.elapsed());
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        let total: u64 = backends
            .iter()
            .map(|b| b.accepted.load(Ordering::SeqCst))
            .sum();
        let slow_share = backends[0].accepted.load(Ordering::SeqCst) as f64 / total as f64;
        let deviations = tally.deviations.lock().unwrap().clone();
        let mut latencies = latencies.lock().unwrap().clone();
        latencies.sort();
        (deviations, slow_share, latencies)
    };
    let (deviations, least_share, least) = run("least-conn");
    let (_, rr_share, rr) = run("round-robin");
    let p99 = |l: &[Duration]| l[l.len() * 99 / 100];
    let within_one = deviations.iter().filter(|&&d| d <= 1).count();
    eprintln!(
        "least-conn: {within_one}/{} arrivals within one of the least, worst {:?}, slow \
         share {least_share:.3}, p99 {:?}; round-robin: slow share {rr_share:.3}, p99 {:?}",
        deviations.len(),
        deviations.iter().max(),
        p99(&least),
        p99(&rr)
    );
    // The backends see a connection a moment after the proxy counted it, and its end a
    // moment before: a sample may be off by the connections in those moments.
    assert!(
        within_one * 100 >= deviations.len() * 95,
        "{within_one} of {} within one",
        deviations.len()
    );
    assert!(deviations.iter().all(|&d| d <= 3), "{deviations:?}");
    assert!(
        least_share < rr_share / 2.0,
        "least-conn gave the slow backend {least_share:.3}, round-robin {rr_share:.3}"
    );
}

/// Every backend down (one refusing, one whose accept queue is full and drops SYNs): each
/// client is closed within --connect-timeout and counted; nothing hangs.
#[test]
fn with_every_backend_down_clients_are_closed_within_the_connect_timeout() {
    let refusing = closed_port().to_string();
    // listen(0) with one connection already queued: further SYNs are dropped.
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    rustix::net::listen(&blackhole, 0).unwrap();
    let _queued = TcpStream::connect(blackhole.local_addr().unwrap()).unwrap();
    let _queued2 =
        TcpStream::connect_timeout(&blackhole.local_addr().unwrap(), Duration::from_millis(200));
    let silent = blackhole.local_addr().unwrap().to_string();
    let timeout = Duration::from_millis(500);
    let proxy = Proxy::start(
        2,
        &[
            "--backend",
            &refusing,
            "--backend",
            &silent,
            "--connect-timeout",
            "500ms",
            "--health-interval",
            "10s",
        ],
    );
    let mut worst = Duration::ZERO;
    for _ in 0..6 {
        let start = Instant::now();
        let answer = exchange(proxy.addr, b"hello");
        let took = start.elapsed();
        worst = worst.max(took);
        assert!(closed_unserved(answer), "nothing to answer with");
    }
    eprintln!("every backend down: the slowest client was closed after {worst:?}");
    assert!(worst < timeout + Duration::from_millis(400), "{worst:?}");
    let refused = proxy.refused("connect_failed") + proxy.refused("no_backend");
    assert_eq!(refused, 6, "{}", proxy.process.log());
}

/// A backend that comes back is used again within one health-check interval.
#[test]
fn a_backend_that_comes_back_is_used_within_one_health_interval() {
    let addr = closed_port();
    let interval = Duration::from_millis(400);
    let proxy = Proxy::start(
        1,
        &[
            "--backend",
            &addr.to_string(),
            "--health-interval",
            "400ms",
            "--connect-timeout",
            "300ms",
        ],
    );
    assert!(closed_unserved(exchange(proxy.addr, b"x")), "down at first");
    let Ok(listener) = TcpListener::bind(addr) else {
        eprintln!("the port was taken meanwhile; skipping");
        return;
    };
    let back = Instant::now();
    let backend = Backend::serve(listener, Behaviour::Answer(Duration::ZERO), None);
    let mut answered = false;
    wait_until(PATIENCE, || {
        answered = exchange(proxy.addr, b"x").is_ok_and(|a| a == b"ok");
        answered
    });
    let took = back.elapsed();
    eprintln!("backend back, used again after {took:?} (interval {interval:?})");
    assert!(answered, "{}", proxy.process.log());
    assert!(took < interval + Duration::from_millis(300), "{took:?}");
    assert!(backend.accepted.load(Ordering::SeqCst) >= 1);
}

/// --max-conns-per-backend 1 --queue 1: a second client waits and is closed at the queue
/// timeout, a third finds the queue full and is closed at once; both counted; once the
/// first is done, clients are served again.
#[test]
fn a_full_queue_and_a_queue_timeout_close_the_client_and_are_counted() {
    let backend = Backend::start(Behaviour::Hold, None);
    let proxy = Proxy::start(
        2,
        &[
            "--backend",
            &backend.addr.to_string(),
            "--max-conns-per-backend",
            "1",
            "--queue",
            "1",
            "--queue-timeout",
            "600ms",
        ],
    );
    let addr = proxy.addr;
    let first = std::thread::spawn(move || exchange(addr, b"first"));
    assert!(wait_until(PATIENCE, || backend
        .accepted
        .load(Ordering::SeqCst)
        == 1));
    let queued = std::thread::spawn(move || {
        let start = Instant::now();
        (exchange(addr, b"second"), start.elapsed())
    });
    // The second waits in the queue: then the third finds it full.
    assert!(wait_until(PATIENCE, || proxy.metric("proxy_queued") == 1));
    let start = Instant::now();
    assert!(closed_unserved(exchange(addr, b"third")));
    let third = start.elapsed();
    assert_eq!(proxy.refused("queue_full"), 1);
    let (answer, waited) = queued.join().unwrap();
    assert!(closed_unserved(answer));
    eprintln!("queue full: closed after {third:?}; queue timeout: closed after {waited:?}");
    assert!(third < Duration::from_millis(500), "{third:?}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(proxy.refused("queue_timeout"), 1);
    backend.release.store(true, Ordering::SeqCst);
    assert_eq!(first.join().unwrap().unwrap(), b"ok");
    assert_eq!(exchange(addr, b"again").unwrap(), b"ok");
}

/// --proxy-protocol v2: the backend reads the client's address first.
/// `--idle-timeout 300ms`: a client that sends nothing is closed (a clean end of stream)
/// after the timeout and counted; a client whose transfer lasts four timeouts, a piece
/// every 100 ms, gets every byte back and is not cut.
#[test]
fn an_idle_client_is_closed_and_an_active_transfer_is_not_cut() {
    let timeout = Duration::from_millis(300);
    let echo = Backend::start(Behaviour::Echo, None);
    let backend = echo.addr.to_string();
    let proxy = Proxy::start(1, &["--backend", &backend, "--idle-timeout", "300ms"]);

    let mut idle = TcpStream::connect(proxy.addr).unwrap();
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let ended = idle.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(ended.is_ok(), "not a clean close: {ended:?}");
    assert!(rest.is_empty());
    assert!(waited >= timeout, "closed after {waited:?}");
    assert!(waited < PATIENCE, "never closed");
    assert!(
        wait_until(PATIENCE, || proxy.metric("proxy_idle_timeouts_total") == 1),
        "the idle close was not counted"
    );

    let mut active = TcpStream::connect(proxy.addr).unwrap();
    active.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut back = Vec::new();
    for piece in 0..12u8 {
        active.write_all(&[piece; 100]).unwrap();
        let mut echoed = [0u8; 100];
        active.read_exact(&mut echoed).unwrap();
        back.extend_from_slice(&echoed);
        // Pacing the traffic (each gap a third of the timeout), not waiting for an outcome.
        std::thread::sleep(timeout / 3);
    }
    active.shutdown(Shutdown::Write).unwrap();
    active.read_to_end(&mut back).unwrap();
    assert!(
        started.elapsed() > timeout * 3,
        "the transfer was too short to tell"
    );
    let sent: Vec<u8> = (0..12u8).flat_map(|p| [p; 100]).collect();
    assert!(back == sent, "{} bytes came back", back.len());
    assert_eq!(
        proxy.metric("proxy_idle_timeouts_total"),
        1,
        "the active one was cut"
    );
}

#[test]
fn proxy_protocol_v2_tells_the_backend_the_client_address() {
    let backend = Backend::start(Behaviour::Header, None);
    let proxy = Proxy::start(
        1,
        &[
            "--backend",
            &backend.addr.to_string(),
            "--proxy-protocol",
            "v2",
        ],
    );
    let mut stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let client = stream.local_addr().unwrap();
    let mut header = [0u8; 28];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&header[12..16], &[0x21, 0x11, 0, 12]);
    assert_eq!(&header[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([header[24], header[25]]), client.port());
    assert_eq!(
        u16::from_be_bytes([header[26], header[27]]),
        proxy.addr.port()
    );
}

/// --spawn 2 -- python3 -m http.server {port}: two unmodified backends, each on its own
/// port, both used.
#[test]
fn spawned_python_backends_are_balanced() {
    let proxy = Proxy::start(
        1,
        &[
            "--spawn",
            "2",
            "--",
            "python3",
            "-m",
            "http.server",
            "{port}",
            "--bind",
            "127.0.0.1",
        ],
    );
    let mut served = 0;
    let both = wait_until(PATIENCE, || {
        if exchange(proxy.addr, b"GET / HTTP/1.0\r\n\r\n")
            .is_ok_and(|a| a.starts_with(b"HTTP/1.0 200"))
        {
            served += 1;
        }
        let status = status_at(&proxy.control).unwrap();
        let used = status["metrics"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, v)| k.starts_with("proxy_connections_total") && v.as_f64() > Some(0.0))
            .count();
        used == 2
    });
    assert!(both, "served {served}\n{}", proxy.process.log());
}
