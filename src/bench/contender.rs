//! The servers a benchmark compares, started and stopped one at a time from the bench
//! process: `handoff run` (this very binary) with each strategy, and node's cluster module
//! (`scripts/node-cluster.js`, embedded here) when `node` is on PATH. Each runs the same
//! work per request on 127.0.0.1, port 0; the bench learns its address and worker pids from
//! the control socket (handoff) or the script's ready line and `/proc` (node).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::procfs;

/// The node cluster script, written to a temporary folder when a node contender starts.
const NODE_SCRIPT: &str = include_str!("../../scripts/node-cluster.js");

/// How long a contender gets to have every worker ready.
const START_PATIENCE: Duration = Duration::from_secs(20);
/// How long a contender gets to exit after SIGTERM before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(5);
/// Lines of a contender's stderr kept for error messages.
const LOG_LINES: usize = 20;

/// Every contender, in the default order (the default leaves out [`OPT_IN`]).
pub const ALL: [&str; 10] = [
    "kernel-shared",
    "kernel-reuseport",
    "handoff-rr",
    "handoff-least",
    "handoff-p2c",
    "handoff-kernel-least",
    "handoff-kernel-p2c",
    "node-rr",
    "node-none",
    "handoff-node",
];

/// Contenders run only when named in `--contenders`.
pub const OPT_IN: [&str; 1] = ["handoff-kernel-p2c"];

/// The contenders a bench runs by default: [`ALL`] less [`OPT_IN`].
pub fn defaults() -> impl Iterator<Item = &'static str> {
    ALL.into_iter().filter(|c| !OPT_IN.contains(c))
}

/// Why a contender could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContenderError {
    /// The name is not one of [`ALL`].
    #[error("unknown contender {0:?} (known: {known})", known = ALL.join(", "))]
    Unknown(String),
    /// The name is not one of the proxy frontends (`handoff bench --proxy`).
    #[error("unknown proxy frontend {0:?} (known: {known})", known = super::proxy::frontend::ALL.join(", "))]
    UnknownFrontend(String),
    /// `node` is not on PATH.
    #[error("node is not on PATH")]
    NoNode,
    /// Creating the temporary folder for the control socket or script.
    #[error("creating a temporary folder: {0}")]
    TempDir(#[source] std::io::Error),
    /// Spawning the process.
    #[error("starting {program:?}: {source}")]
    Spawn {
        /// What was started.
        program: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// It exited before its workers were ready.
    #[error("exited ({status}) before its workers were ready: {log}")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The last lines of its stderr.
        log: String,
    },
    /// Its workers were not all ready in time.
    #[error("workers not ready after {:?}: {detail}", START_PATIENCE)]
    NotReady {
        /// The last status or stderr seen.
        detail: String,
    },
}

/// Which server a contender is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `handoff run --strategy STRATEGY`.
    Handoff {
        /// The value of `--strategy`.
        strategy: &'static str,
    },
    /// `node scripts/node-cluster.js` with `NODE_CLUSTER_SCHED_POLICY=POLICY`.
    Node {
        /// `rr` or `none`.
        policy: &'static str,
    },
    /// `handoff run --node -- node scripts/node-cluster.js --single`: the same node server,
    /// unmodified, balanced by handoff (least-loaded).
    HandoffNode,
}

impl Kind {
    /// The kind a contender name stands for.
    pub fn parse(name: &str) -> Result<Kind, ContenderError> {
        Ok(match name {
            "kernel-shared" => Kind::Handoff {
                strategy: "kernel-shared",
            },
            "kernel-reuseport" => Kind::Handoff {
                strategy: "kernel-reuseport",
            },
            "handoff-rr" => Kind::Handoff {
                strategy: "round-robin",
            },
            "handoff-least" => Kind::Handoff {
                strategy: "least-loaded",
            },
            "handoff-p2c" => Kind::Handoff {
                strategy: "two-choices",
            },
            "handoff-kernel-least" => Kind::Handoff {
                strategy: "kernel-least",
            },
            "handoff-kernel-p2c" => Kind::Handoff {
                strategy: "kernel-p2c",
            },
            "node-rr" => Kind::Node { policy: "rr" },
            "node-none" => Kind::Node { policy: "none" },
            "handoff-node" => Kind::HandoffNode,
            other => return Err(ContenderError::Unknown(other.to_owned())),
        })
    }
}

/// The work each request costs, the same for every contender.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Microseconds of busy CPU per request.
    pub work_us: u64,
    /// `(percent, microseconds)`: this share of requests costs this much instead.
    pub heavy: Option<(f64, u64)>,
    /// Microseconds each request blocks its worker thread without CPU (`handoff run`'s demo
    /// only: the proxy benchmark's backends).
    pub wait_us: u64,
}

impl Cost {
    /// `--work-us N [--heavy PCT:US]`, the same flags for `handoff run` and the node script.
    fn add_args(&self, cmd: &mut Command) {
        cmd.arg("--work-us").arg(self.work_us.to_string());
        if let Some((pct, us)) = self.heavy {
            cmd.arg("--heavy").arg(format!("{pct}:{us}"));
        }
        if self.wait_us > 0 {
            cmd.arg("--wait-us").arg(self.wait_us.to_string());
        }
    }
}

/// How to start contenders.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `handoff` binary (normally the running one).
    pub program: PathBuf,
    /// Worker processes per contender.
    pub workers: usize,
}

/// A started contender, stopped (then killed, if need be) when dropped.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The master (handoff) or primary (node) process.
    pub master: u32,
    /// Its worker processes.
    pub workers: Vec<u32>,
    child: Child,
    /// Holds the control socket or script until the contender is gone.
    _dir: TempDir,
}

impl Launcher {
    /// Starts contender `name` with `cost` and waits (bounded) until every worker is ready.
    pub fn start(&self, name: &str, cost: Cost) -> Result<Running, ContenderError> {
        let kind = Kind::parse(name)?;
        let dir = TempDir::new().map_err(ContenderError::TempDir)?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (mut child, waited) = match kind {
            Kind::Handoff { strategy } => {
                let control = dir.path.join("ctl.sock");
                let mut cmd = Command::new(&self.program);
                cmd.arg("run")
                    .args(["--listen", "127.0.0.1:0", "--strategy", strategy])
                    .arg("--workers")
                    .arg(self.workers.to_string())
                    .arg("--control")
                    .arg(&control)
                    .args(["--shutdown-timeout", "2s"])
                    .env("HANDOFF_LOG", "warn")
                    .stdout(Stdio::null());
                cost.add_args(&mut cmd);
                let mut child = spawn(cmd, &self.program, &log)?;
                let waited = wait_for_handoff(&mut child, &control, self.workers, &log);
                (child, waited)
            }
            Kind::HandoffNode => {
                let node = find_on_path("node").ok_or(ContenderError::NoNode)?;
                let script = dir.path.join("node-cluster.js");
                std::fs::write(&script, NODE_SCRIPT).map_err(ContenderError::TempDir)?;
                let control = dir.path.join("ctl.sock");
                let mut cmd = Command::new(&self.program);
                cmd.arg("run")
                    .args(["--listen", "127.0.0.1:0", "--strategy", "least-loaded"])
                    .arg("--workers")
                    .arg(self.workers.to_string())
                    .arg("--control")
                    .arg(&control)
                    .args(["--shutdown-timeout", "2s", "--node", "--"])
                    .arg(&node)
                    .arg(&script)
                    .arg("--single")
                    .env("HANDOFF_LOG", "warn")
                    .stdout(Stdio::null());
                cost.add_args(&mut cmd);
                let mut child = spawn(cmd, &self.program, &log)?;
                let waited = wait_for_handoff(&mut child, &control, self.workers, &log);
                (child, waited)
            }
            Kind::Node { policy } => {
                let node = find_on_path("node").ok_or(ContenderError::NoNode)?;
                let script = dir.path.join("node-cluster.js");
                std::fs::write(&script, NODE_SCRIPT).map_err(ContenderError::TempDir)?;
                let mut cmd = Command::new(&node);
                cmd.arg(&script)
                    .args(["--host", "127.0.0.1", "--port", "0"])
                    .arg("--workers")
                    .arg(self.workers.to_string())
                    .env("NODE_CLUSTER_SCHED_POLICY", policy)
                    .stdout(Stdio::piped());
                cost.add_args(&mut cmd);
                let mut child = spawn(cmd, &node, &log)?;
                let waited = wait_for_node(&mut child, self.workers, &log);
                (child, waited)
            }
        };
        match waited {
            Ok((addr, workers)) => Ok(Running {
                addr,
                master: child.id(),
                workers,
                child,
                _dir: dir,
            }),
            Err(e) => {
                let workers = procfs::children(child.id());
                kill_all(&mut child, &workers);
                Err(e)
            }
        }
    }
}

impl Running {
    /// A contender started elsewhere in the bench (the proxy frontends): `child` listens on
    /// `addr` and has these worker processes; `dir` is removed once it is gone.
    pub(super) fn new(addr: SocketAddr, child: Child, workers: Vec<u32>, dir: TempDir) -> Running {
        Running {
            addr,
            master: child.id(),
            workers,
            child,
            _dir: dir,
        }
    }

    /// Sends SIGTERM and waits (bounded) for the master and its workers to exit; kills what
    /// is left after that.
    pub fn stop(self) {
        drop(self);
    }

    fn shut_down(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = crate::sys::process::signal(self.master, libc::SIGTERM);
            let deadline = Instant::now() + STOP_PATIENCE;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Workers follow their master out; give them a moment, then make sure.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && self.workers.iter().any(|&pid| procfs::is_running(pid)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_all(&mut self.child, &self.workers);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shut_down();
    }
}

pub(super) fn spawn(
    mut cmd: Command,
    program: &Path,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Result<Child, ContenderError> {
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    crate::sys::process::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| ContenderError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    if let Some(stderr) = child.stderr.take() {
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(PoisonError::into_inner);
                if log.len() == LOG_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
    }
    Ok(child)
}

pub(super) fn log_tail(log: &Arc<Mutex<VecDeque<String>>>) -> String {
    // The stderr reader may still be catching up with a process that just exited.
    std::thread::sleep(Duration::from_millis(50));
    let log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let lines: Vec<&str> = log
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(no output)".to_owned()
    } else {
        lines.join(" | ")
    }
}

pub(super) fn kill_all(child: &mut Child, workers: &[u32]) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
    for &pid in workers {
        if procfs::is_running(pid) {
            let _ = crate::sys::process::signal(pid, libc::SIGKILL);
        }
    }
}

pub(super) fn exited(
    child: &mut Child,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Option<ContenderError> {
    match child.try_wait() {
        Ok(Some(status)) => Some(ContenderError::Exited {
            status,
            log: log_tail(log),
        }),
        _ => None,
    }
}

/// Polls the control socket until `workers` workers are ready.
pub(super) fn wait_for_handoff(
    child: &mut Child,
    control: &Path,
    workers: usize,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Result<(SocketAddr, Vec<u32>), ContenderError> {
    let deadline = Instant::now() + START_PATIENCE;
    let mut last = String::from("no status yet");
    loop {
        if let Some(e) = exited(child, log) {
            return Err(e);
        }
        if let Some(status) = control_status(control) {
            if let Some(ready) = parse_ready(&status, workers) {
                return Ok(ready);
            }
            last = status.to_string();
        }
        if Instant::now() >= deadline {
            return Err(ContenderError::NotReady {
                detail: format!("{last}; stderr: {}", log_tail(log)),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `status` on a control socket, parsed.
pub fn control_status(control: &Path) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(control).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"status\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

/// The address and worker pids in a `status` reply once `workers` workers are ready.
pub fn parse_ready(status: &serde_json::Value, workers: usize) -> Option<(SocketAddr, Vec<u32>)> {
    let slots = status["workers"].as_array()?;
    let pids: Vec<u32> = slots
        .iter()
        .filter(|w| w["phase"] == "ready")
        .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    if pids.len() < workers {
        return None;
    }
    let addr = status["listening"][0].as_str()?.parse().ok()?;
    Some((addr, pids))
}

/// Waits for the node script's ready line on stdout.
fn wait_for_node(
    child: &mut Child,
    workers: usize,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Result<(SocketAddr, Vec<u32>), ContenderError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ContenderError::NotReady {
            detail: "no stdout".to_owned(),
        })?;
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = send.send(line);
    });
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        match receive.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                if let Some(ready) = parse_node_ready(&line, workers) {
                    // Every child of the primary is a worker; the ready line is the fallback.
                    let children = procfs::children(child.id());
                    let pids = if children.len() >= workers {
                        children
                    } else {
                        ready.1
                    };
                    return Ok((ready.0, pids));
                }
                if let Some(e) = exited(child, log) {
                    return Err(e);
                }
                return Err(ContenderError::NotReady {
                    detail: format!(
                        "unexpected ready line {:?}; stderr: {}",
                        line.trim(),
                        log_tail(log)
                    ),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Some(e) = exited(child, log) {
                    return Err(e);
                }
            }
            Err(_) => {
                return Err(ContenderError::NotReady {
                    detail: format!("no ready line; stderr: {}", log_tail(log)),
                })
            }
        }
    }
}

/// `{"port":P,"pid":PID,"workers":[...]}` with at least `workers` pids.
pub fn parse_node_ready(line: &str, workers: usize) -> Option<(SocketAddr, Vec<u32>)> {
    let ready: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let port = u16::try_from(ready["port"].as_u64()?).ok()?;
    let pids: Vec<u32> = ready["workers"]
        .as_array()?
        .iter()
        .filter_map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    (pids.len() >= workers && port != 0).then(|| (SocketAddr::from(([127, 0, 0, 1], port)), pids))
}

/// The first `name` in a folder of PATH that is a file.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path: OsString = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A private temporary folder, removed when dropped.
#[derive(Debug)]
pub(super) struct TempDir {
    pub(super) path: PathBuf,
}

impl TempDir {
    pub(super) fn new() -> std::io::Result<TempDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("handoff-bench-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_contender_has_a_kind() {
        for name in ALL {
            assert!(Kind::parse(name).is_ok(), "{name}");
        }
        assert!(matches!(
            Kind::parse("nginx"),
            Err(ContenderError::Unknown(_))
        ));
    }

    #[test]
    fn reads_the_address_and_ready_workers_from_a_status_reply() {
        let status = serde_json::json!({
            "listening": ["127.0.0.1:4321"],
            "workers": [
                {"pid": 10, "phase": "ready"},
                {"pid": 11, "phase": "starting"},
                {"pid": null, "phase": null},
            ],
        });
        assert_eq!(parse_ready(&status, 2), None);
        let (addr, pids) = parse_ready(&status, 1).unwrap();
        assert_eq!(addr, "127.0.0.1:4321".parse().unwrap());
        assert_eq!(pids, vec![10]);
    }

    #[test]
    fn reads_the_node_ready_line() {
        let (addr, pids) =
            parse_node_ready("{\"port\":5000,\"pid\":1,\"workers\":[7,8]}\n", 2).unwrap();
        assert_eq!(addr.port(), 5000);
        assert_eq!(pids, vec![7, 8]);
        assert_eq!(parse_node_ready("{\"port\":5000,\"workers\":[7]}", 2), None);
        assert_eq!(parse_node_ready("listening", 1), None);
    }
}
