//! The frontends the proxy benchmark compares, each started in front of the same backends
//! and stopped before the next: `handoff proxy` (least-connections and round-robin),
//! HAProxy (`mode tcp`, `balance leastconn`) and nginx (`least_conn` with a shared `zone`),
//! the last two from their Debian packages when installed, configured in a temporary folder.
//! Runs in the bench process.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench::contender::{
    self, exited, kill_all, log_tail, spawn, wait_for_handoff, ContenderError, Running, TempDir,
};
use crate::procfs;

/// Every frontend, in the default order.
pub const ALL: [&str; 4] = [
    "handoff-proxy",
    "handoff-proxy-rr",
    "haproxy-leastconn",
    "nginx-least-conn",
];

/// Where Debian installs HAProxy.
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// How long a frontend gets to listen with all its workers.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// Which program a frontend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// `handoff proxy --balance BALANCE`.
    Handoff {
        /// The value of `--balance`.
        balance: &'static str,
    },
    /// HAProxy, `balance leastconn`.
    Haproxy,
    /// nginx, `least_conn` with a `zone`.
    Nginx,
}

impl Frontend {
    /// The frontend a contender name stands for.
    pub fn parse(name: &str) -> Result<Frontend, ContenderError> {
        Ok(match name {
            "handoff-proxy" => Frontend::Handoff {
                balance: "least-conn",
            },
            "handoff-proxy-rr" => Frontend::Handoff {
                balance: "round-robin",
            },
            "haproxy-leastconn" => Frontend::Haproxy,
            "nginx-least-conn" => Frontend::Nginx,
            other => return Err(ContenderError::UnknownFrontend(other.to_owned())),
        })
    }

    /// The program it needs besides handoff, if that is not installed.
    pub fn missing(self) -> Option<&'static str> {
        let program = match self {
            Frontend::Handoff { .. } => return None,
            Frontend::Haproxy => HAPROXY,
            Frontend::Nginx => NGINX,
        };
        (!Path::new(program).is_file()).then_some(program)
    }
}

/// HAProxy's configuration: TCP mode, `balance leastconn` over `backends`, `threads`
/// threads in one process (its way of using several cores), listening on `listen`.
pub fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr], threads: usize) -> String {
    let mut text = format!(
        "global\n    nbthread {threads}\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend bench\n    bind {listen}\n    default_backend backends\n\n\
         backend backends\n    balance leastconn\n"
    );
    for (i, backend) in backends.iter().enumerate() {
        let _ = writeln!(text, "    server b{i} {backend}");
    }
    text
}

/// nginx's configuration: `workers` worker processes proxying HTTP to `backends` with
/// `least_conn`; the `zone` puts the upstream's counters in shared memory, so the least is
/// taken across all workers (without it each worker counts only its own connections). Its
/// pid file, logs and temporary folders go into `dir`. HTTP, as Debian's nginx builds the
/// stream (TCP) module as a separate package.
pub fn nginx_config(
    listen: SocketAddr,
    backends: &[SocketAddr],
    workers: usize,
    dir: &Path,
) -> String {
    let d = dir.display();
    let mut servers = String::new();
    for backend in backends {
        // max_fails=0: never take a backend out (the others have no health checks either).
        let _ = writeln!(servers, "        server {backend} max_fails=0;");
    }
    format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\n\
         events {{\n    worker_connections 8192;\n}}\n\n\
         http {{\n    access_log off;\n\
         \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\n\
         \x20   upstream backends {{\n        least_conn;\n        zone backends 64k;\n{servers}    }}\n\n\
         \x20   server {{\n        listen {listen};\n        location / {{\n            proxy_pass http://backends;\n        }}\n    }}\n}}\n"
    )
}

/// Starts frontend `name` with `workers` workers (or threads) in front of `backends` and
/// waits (bounded) until it accepts.
pub fn start(
    program: &Path,
    name: &str,
    workers: usize,
    backends: &[SocketAddr],
) -> Result<Running, ContenderError> {
    let frontend = Frontend::parse(name)?;
    let dir = TempDir::new().map_err(ContenderError::TempDir)?;
    let log = Arc::new(Mutex::new(VecDeque::new()));
    match frontend {
        Frontend::Handoff { balance } => {
            let control = dir.path.join("ctl.sock");
            let mut cmd = Command::new(program);
            cmd.arg("proxy")
                .args(["--listen", "127.0.0.1:0", "--balance", balance])
                .arg("--workers")
                .arg(workers.to_string())
                .arg("--control")
                .arg(&control)
                .args(["--shutdown-timeout", "2s"])
                .env("HANDOFF_LOG", "warn")
                .stdout(Stdio::null());
            for backend in backends {
                cmd.arg("--backend").arg(backend.to_string());
            }
            let mut child = spawn(cmd, program, &log)?;
            match wait_for_handoff(&mut child, &control, workers, &log) {
                Ok((addr, pids)) => Ok(Running::new(addr, child, pids, dir)),
                Err(e) => {
                    let pids = procfs::children(child.id());
                    kill_all(&mut child, &pids);
                    Err(e)
                }
            }
        }
        Frontend::Haproxy | Frontend::Nginx => {
            let port = crate::proxy::spawned::free_port().map_err(ContenderError::TempDir)?;
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            let config = dir.path.join("frontend.conf");
            let (program, text, children) = if frontend == Frontend::Haproxy {
                (HAPROXY, haproxy_config(listen, backends, workers), 0)
            } else {
                (
                    NGINX,
                    nginx_config(listen, backends, workers, &dir.path),
                    workers,
                )
            };
            std::fs::write(&config, text).map_err(ContenderError::TempDir)?;
            let mut cmd = Command::new(program);
            if frontend == Frontend::Haproxy {
                cmd.arg("-f").arg(&config).arg("-db");
            } else {
                cmd.arg("-p")
                    .arg(&dir.path)
                    .arg("-c")
                    .arg(&config)
                    .arg("-e")
                    .arg(dir.path.join("error.log"));
            }
            cmd.stdout(Stdio::null());
            let program = PathBuf::from(program);
            let mut child = spawn(cmd, &program, &log)?;
            match wait_for_listener(&mut child, listen, children, &log) {
                Ok(pids) => Ok(Running::new(listen, child, pids, dir)),
                Err(e) => {
                    let pids = procfs::children(child.id());
                    kill_all(&mut child, &pids);
                    Err(e)
                }
            }
        }
    }
}

/// Waits until `addr` accepts and the process has `children` children; returns them.
fn wait_for_listener(
    child: &mut std::process::Child,
    addr: SocketAddr,
    children: usize,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Result<Vec<u32>, ContenderError> {
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        if let Some(e) = exited(child, log) {
            return Err(e);
        }
        let pids = procfs::children(child.id());
        if pids.len() >= children
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(pids);
        }
        if Instant::now() >= deadline {
            return Err(ContenderError::NotReady {
                detail: format!(
                    "{addr} not accepting with {children} workers; stderr: {}",
                    log_tail(log)
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The backends: `count` single-worker, single-thread `handoff run` demo servers (the worker
/// accepts for itself, so no master hop; one request at a time, the next queued behind it),
/// each request costing `work_us` of CPU and `wait_us` of blocking wait, the first backend's
/// `slow` times both.
pub fn start_backends(
    program: &Path,
    count: usize,
    work_us: u64,
    wait_us: u64,
    slow: u64,
) -> Result<Vec<Running>, ContenderError> {
    let launcher = contender::Launcher {
        program: program.to_owned(),
        workers: 1,
    };
    (0..count)
        .map(|i| {
            let factor = if i == 0 { slow } else { 1 };
            let cost = contender::Cost {
                work_us: work_us * factor,
                heavy: None,
                wait_us: wait_us * factor,
            };
            launcher.start("kernel-shared", cost)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (SocketAddr, Vec<SocketAddr>) {
        (
            "127.0.0.1:9000".parse().unwrap(),
            vec![
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.1:9002".parse().unwrap(),
            ],
        )
    }

    #[test]
    fn every_frontend_has_a_kind() {
        for name in ALL {
            assert!(Frontend::parse(name).is_ok(), "{name}");
        }
        assert!(Frontend::parse("envoy").is_err());
        assert_eq!(Frontend::parse("handoff-proxy").unwrap().missing(), None);
    }

    #[test]
    fn haproxy_balances_tcp_by_least_connections_with_a_thread_per_worker() {
        let (listen, backends) = addrs();
        let text = haproxy_config(listen, &backends, 3);
        assert!(text.contains("\n    nbthread 3\n"), "{text}");
        assert!(text.contains("\n    mode tcp\n"), "{text}");
        assert!(text.contains("\n    bind 127.0.0.1:9000\n"), "{text}");
        assert!(text.contains("\n    balance leastconn\n"), "{text}");
        assert!(text.contains("\n    server b0 127.0.0.1:9001\n"), "{text}");
        assert!(text.ends_with("    server b1 127.0.0.1:9002\n"), "{text}");
        for timeout in ["connect", "client", "server"] {
            assert!(text.contains(&format!("timeout {timeout} ")), "{text}");
        }
    }

    #[test]
    fn nginx_shares_its_least_conn_counters_in_a_zone_and_writes_only_into_its_folder() {
        let (listen, backends) = addrs();
        let text = nginx_config(listen, &backends, 2, Path::new("/tmp/b"));
        assert!(text.contains("worker_processes 2;"), "{text}");
        assert!(text.contains("daemon off;"), "{text}");
        let upstream = text.split("upstream backends {").nth(1).unwrap();
        let upstream = upstream.split('}').next().unwrap();
        assert!(upstream.contains("least_conn;"), "{text}");
        assert!(upstream.contains("zone backends 64k;"), "{text}");
        assert!(
            upstream.contains("server 127.0.0.1:9001 max_fails=0;"),
            "{text}"
        );
        assert!(
            upstream.contains("server 127.0.0.1:9002 max_fails=0;"),
            "{text}"
        );
        assert!(text.contains("listen 127.0.0.1:9000;"), "{text}");
        assert!(text.contains("proxy_pass http://backends;"), "{text}");
        for line in text.lines().filter(|l| l.contains("/tmp")) {
            assert!(line.contains("/tmp/b/"), "{line}");
        }
        assert_eq!(text.matches("_temp_path /tmp/b/").count(), 5, "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }
}
