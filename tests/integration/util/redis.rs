//! A real `redis-server` for the tests of the Redis backend: started on a Unix socket in its
//! own temporary folder (no port to race for), killed and restarted at will, killed when
//! dropped. Without `redis-server` on PATH the tests fail, naming the package.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

/// How long a fresh `redis-server` may take to answer PING.
const START: Duration = Duration::from_secs(10);

/// One `redis-server` process (or none, between [`RedisServer::kill`] and
/// [`RedisServer::restart`]) on `dir/redis.sock`.
pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers PING.
    pub fn start() -> RedisServer {
        let binary = find("redis-server").unwrap_or_else(|| {
            panic!(
                "redis-server is not installed: the Redis backend's tests need a real one \
                 (Debian: apt-get install redis-server; .ci/run installs it)"
            )
        });
        let dir = tempfile::tempdir().expect("tempdir for redis-server");
        let mut server = RedisServer { dir, child: None };
        server.spawn(&binary);
        server
    }

    /// `redis+unix:///…/redis.sock`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn spawn(&mut self, binary: &Path) {
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(binary)
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        assert!(
            wait_until(START, || self.command(b"PING\r\n").as_deref()
                == Some("+PONG\r\n")),
            "redis-server did not answer PING within {START:?}"
        );
    }

    /// SIGKILL: gone at once, with nothing saved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same socket (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        let binary = find("redis-server").expect("redis-server on PATH");
        self.spawn(&binary);
    }

    /// Sends one inline command (e.g. `b"GET k\r\n"`) and answers the first reply's bytes.
    pub fn command(&self, command: &[u8]) -> Option<String> {
        let mut stream = UnixStream::connect(self.socket()).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(command).ok()?;
        let mut reply = vec![0; 4096];
        let n = stream.read(&mut reply).ok()?;
        String::from_utf8(reply[..n].to_vec()).ok()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
