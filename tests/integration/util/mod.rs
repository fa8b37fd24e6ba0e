//! Shared helpers for the integration tests: start the real `handoff` binary on port 0 with
//! a control socket, wait (bounded) for its workers, talk HTTP to it, signal it, read /proc.

#[cfg(feature = "redis")]
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_handoff");
/// The longest any test waits for something that should happen in milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `condition` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `handoff` process started by a test, its stderr collected line by line; killed with
/// every child it started when dropped. [`Master`] is one with a control socket; use this
/// one directly for what `Master` cannot do (chosen socket paths, a start meant to fail).
pub struct Spawned {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The stderr reader reached the end: every line is in `log`.
    log_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Spawned {
    /// Starts `cmd` with `HANDOFF_LOG=info`, stdin and stdout null, stderr collected.
    pub fn start(mut cmd: Command) -> Spawned {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("HANDOFF_LOG", "info");
        let mut child = cmd.spawn().expect("spawn handoff");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        let log_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = log_done.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        Spawned {
            child,
            log,
            log_done,
        }
    }

    /// `handoff run ARGS...`.
    pub fn run(args: &[&str]) -> Spawned {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").args(args);
        Self::start(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far (its workers' too, as long as they hold the same stderr).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether it has exited (without waiting).
    pub fn try_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits for the exit, up to `timeout`, and then for its last log lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_some() {
            let done = self.log_done.clone();
            wait_until(timeout, || done.load(std::sync::atomic::Ordering::Acquire));
        }
        status
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Every child: current workers, successors and draining ones alike.
            let _ = Command::new("pkill")
                .arg("-KILL")
                .arg("-P")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `handoff run` master with a control socket, killed with its workers when
/// dropped.
pub struct Master {
    process: Spawned,
    pub control: PathBuf,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Master {
    /// `handoff run --listen 127.0.0.1:0 --control TMP ARGS...`, waiting until every worker
    /// is ready. `args` must include `--workers N`.
    pub fn start(args: &[&str]) -> Master {
        Self::start_with(args, |_| {})
    }

    /// Like [`Master::start`], with a hook to adjust the command (environment, rlimits).
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Master {
        Self::start_via_with(Command::new(BIN), args, adjust)
    }

    /// Like [`Master::start`], with `base` as the program and its first arguments (a copy
    /// of the binary, or `prlimit --nofile=64:64 BIN`); `run ...` follows them.
    pub fn start_via(base: Command, args: &[&str]) -> Master {
        Self::start_via_with(base, args, |_| {})
    }

    fn start_via_with(base: Command, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Master {
        let master = Self::launch_via(base, args, adjust);
        let workers: usize = args
            .windows(2)
            .find(|w| w[0] == "--workers")
            .map(|w| w[1].parse().unwrap())
            .expect("tests pass --workers");
        let mut status = None;
        let ready = wait_until(PATIENCE, || {
            status = master.try_status();
            status.as_ref().is_some_and(|s| ready_workers(s) == workers)
        });
        assert!(
            ready,
            "workers not ready in time; status {status:?}\nlog:\n{}",
            master.log()
        );
        master
    }

    /// Starts the master and waits only for its control socket, not for workers.
    pub fn launch(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Master {
        Self::launch_via(Command::new(BIN), args, adjust)
    }

    /// Like [`Master::launch`], with `base` as the program and its first arguments.
    pub fn launch_via(
        mut cmd: Command,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Master {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control.sock");
        cmd.arg("run")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--control")
            .arg(&control)
            .args(args);
        adjust(&mut cmd);
        let mut master = Master {
            process: Spawned::start(cmd),
            control,
            addr: "127.0.0.1:1".parse().unwrap(),
            _dir: dir,
        };
        let mut status = None;
        let up = wait_until(PATIENCE, || {
            status = master.try_status();
            status.is_some()
        });
        assert!(up, "no control socket in time; log:\n{}", master.log());
        master.addr = status.unwrap()["listening"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        master
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn try_status(&self) -> Option<serde_json::Value> {
        status_at(&self.control)
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status from the master; log:\n{}", self.log()))
    }

    /// Pids of the workers the master currently runs, by slot.
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        worker_pids(&self.status())
    }

    /// Waits until every slot has a ready worker; returns their pids.
    pub fn wait_all_ready(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let ok = wait_until(PATIENCE, || {
            let status = self.status();
            let n = status["workers"].as_array().unwrap().len();
            pids = worker_pids(&status).into_iter().flatten().collect();
            ready_workers(&status) == n
        });
        assert!(ok, "workers not ready; log:\n{}", self.log());
        pids
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// Waits for the master to exit, up to `timeout`, and for its last log lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    pub fn get(&self) -> Response {
        http_get(self.addr).unwrap_or_else(|e| panic!("GET failed: {e}; log:\n{}", self.log()))
    }
}

/// `status` over the control socket at `path`, as `handoff ctl` asks it.
pub fn status_at(path: &std::path::Path) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(path).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"status\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

pub fn ready_workers(status: &serde_json::Value) -> usize {
    status["workers"]
        .as_array()
        .map_or(0, |w| w.iter().filter(|w| w["phase"] == "ready").count())
}

pub fn worker_pids(status: &serde_json::Value) -> Vec<Option<u32>> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie has exited; only a process that can still run counts.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Open fds of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User + system CPU ticks a process has used.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub pid: u32,
    pub body: String,
}

/// Parses one HTTP/1.1 response with a content-length body from `reader`.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let (mut pid, mut length) = (0, 0);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').ok_or_else(|| bad("header"))?;
        match name.to_ascii_lowercase().as_str() {
            "x-worker-pid" => pid = value.trim().parse().map_err(|_| bad("pid"))?,
            "content-length" => length = value.trim().parse().map_err(|_| bad("length"))?,
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Response {
        status,
        pid,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Connects and sends `GET /` with `Connection: close` without reading the answer yet.
pub fn send_request(addr: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    BufReader::new(stream)
}

/// One `GET /` on a new connection with `Connection: close`.
pub fn http_get(addr: SocketAddr) -> std::io::Result<Response> {
    http_get_path(addr, "/")
}

/// One `GET path` on a new connection with `Connection: close`.
pub fn http_get_path(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    read_response(&mut BufReader::new(stream))
}

/// A keep-alive connection that has had one request answered: still open on its worker.
pub struct Held {
    pub stream: BufReader<TcpStream>,
    pub pid: u32,
}

impl Held {
    pub fn open(addr: SocketAddr) -> std::io::Result<Held> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")?;
        let response = read_response(&mut stream)?;
        Ok(Held {
            stream,
            pid: response.pid,
        })
    }
}

/// How many lines of the master's log contain every one of `needles`.
pub fn log_lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// The value of `field=` in a log line (`field=123` → `"123"`).
pub fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let key = format!(" {field}=");
    let start = line.find(&key)? + key.len();
    line[start..].split_whitespace().next()
}

/// What an open-loop load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests started.
    pub sent: usize,
    /// Answered 200 with the demo body.
    pub ok: usize,
    /// Why each failed request failed.
    pub failures: Vec<String>,
    /// Answers per worker pid.
    pub by_pid: std::collections::HashMap<u32, usize>,
}

impl LoadReport {
    /// Failure reasons with their counts, most frequent first.
    pub fn failure_kinds(&self) -> Vec<(String, usize)> {
        let mut kinds = std::collections::HashMap::<String, usize>::new();
        for failure in &self.failures {
            *kinds.entry(failure.clone()).or_default() += 1;
        }
        let mut kinds: Vec<_> = kinds.into_iter().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        kinds
    }
}

/// Bounded open-loop load on one address: a new connection with one `GET /` (connection:
/// close) every 1/`per_second` s on schedule, whatever the answers do, up to `max`
/// requests; up to `CLIENTS` requests in flight (later ones wait their turn, which counts
/// in their latency). Each request has 10 s timeouts.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicUsize>,
    dispatcher: Option<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    const CLIENTS: usize = 32;

    pub fn start(addr: SocketAddr, per_second: u32, max: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (stop_flag, sent_count) = (stop.clone(), sent.clone());
        let dispatcher = std::thread::spawn(move || {
            let (jobs, queue) = std::sync::mpsc::channel::<()>();
            let queue = Arc::new(Mutex::new(queue));
            let clients: Vec<_> = (0..Self::CLIENTS)
                .map(|_| {
                    let queue = queue.clone();
                    std::thread::spawn(move || {
                        let mut report = LoadReport::default();
                        loop {
                            let job = queue.lock().unwrap().recv();
                            if job.is_err() {
                                return report;
                            }
                            report.sent += 1;
                            match http_get(addr) {
                                Ok(r) if r.status == 200 && r.body == "hola, mundo\n" => {
                                    report.ok += 1;
                                    *report.by_pid.entry(r.pid).or_default() += 1;
                                }
                                Ok(r) => report.failures.push(format!("status {}", r.status)),
                                Err(e) => report.failures.push(format!("{:?}", e.kind())),
                            }
                        }
                    })
                })
                .collect();
            let period = Duration::from_secs_f64(1.0 / f64::from(per_second));
            let start = Instant::now();
            for i in 0..max {
                if stop_flag.load(Ordering::Relaxed) {
                    break;
                }
                let due = start + period * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                jobs.send(()).unwrap();
                sent_count.fetch_add(1, Ordering::Relaxed);
            }
            drop(jobs);
            let mut total = LoadReport::default();
            for client in clients {
                let report = client.join().unwrap();
                total.sent += report.sent;
                total.ok += report.ok;
                total.failures.extend(report.failures);
                for (pid, n) in report.by_pid {
                    *total.by_pid.entry(pid).or_default() += n;
                }
            }
            total
        });
        Load {
            stop,
            sent,
            dispatcher: Some(dispatcher),
        }
    }

    /// Requests started so far.
    pub fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` requests were started.
    pub fn wait_sent(&self, n: usize) -> bool {
        wait_until(PATIENCE, || self.sent() >= n)
    }

    /// Sends the rest of the schedule and waits for every answer.
    /// Stops the schedule now and waits for every answer to the requests already sent.
    pub fn finish_early(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.finish()
    }

    pub fn finish(mut self) -> LoadReport {
        self.dispatcher.take().unwrap().join().unwrap()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
