//! Starting one worker process: a fresh channel socketpair, the worker's end at fd 3, the
//! slot and spawn count in its environment, death tied to the master's. What runs is
//! settled once, when the master starts ([`Launcher`]): the master's own executable is
//! opened then and every worker is started from that open file, so a deploy that replaces
//! or deletes the binary on disk never stops respawns; a COMMAND that cannot be executed
//! is refused at start instead of crash-looping.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::ipc::Channel;
use crate::sys;

/// What a worker process runs.
#[derive(Debug, Clone)]
pub enum Program {
    /// The master's own binary with the master's arguments (the library's worker role).
    CurrentExe,
    /// A user's command (`handoff run -- COMMAND ARGS...`), in any language.
    Command(Vec<OsString>),
    /// An unmodified node app (`handoff run --node -- node app.js`): the master speaks
    /// node's own IPC (`NODE_CHANNEL_FD`) and a preload script takes the app's `listen()`.
    Node(Vec<OsString>),
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The node preload script could not be written.
    #[error("writing the node preload script failed")]
    Preload(#[source] io::Error),
    /// The channel socketpair could not be created.
    #[error("creating the worker channel failed")]
    CreateChannel(#[source] io::Error),
    /// The master's own executable could not be found.
    #[error("finding the current executable failed")]
    CurrentExe(#[source] io::Error),
    /// The command is empty.
    #[error("the worker command is empty")]
    EmptyCommand,
    /// The command names no executable file.
    #[error("the worker command {program:?} cannot be executed: {reason}")]
    NotExecutable {
        /// As given.
        program: OsString,
        /// What is wrong with it.
        reason: String,
    },
    /// fork/exec failed.
    #[error("starting {program:?} failed")]
    Exec {
        /// What was run.
        program: OsString,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The service manager's variables (and the upgrade's), which workers never inherit.
const SERVICE_MANAGER_ENV: [&str; 9] = [
    "FDSTORE",
    "HANDOFF_UPGRADE",
    "HANDOFF_UPGRADE_CARRY",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// What a master starts as each worker, settled when it starts.
#[derive(Debug)]
pub struct Launcher {
    program: Program,
    /// The master's own executable, open since its start (for [`Program::CurrentExe`]).
    exe: Option<File>,
    /// The master's own `argv[0]`, kept for its workers.
    arg0: OsString,
    /// Environment every worker gets beyond handoff's own variables.
    env: Vec<(&'static str, OsString)>,
    /// For [`Program::Node`]: the preload script, written where node can `--require` it.
    preload: Option<Preload>,
}

/// The node preload script in a private directory of its own, removed with it.
#[derive(Debug)]
struct Preload {
    dir: PathBuf,
    file: PathBuf,
}

impl Preload {
    fn write() -> io::Result<Preload> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("handoff-{}-node", std::process::id()));
        // A directory left by an earlier process of this pid is not ours to trust.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let file = dir.join("preload.js");
        std::fs::write(&file, crate::ipc::node::PRELOAD)?;
        Ok(Preload { dir, file })
    }

    /// `NODE_OPTIONS` with the preload added to what the user set.
    fn node_options(&self) -> OsString {
        let mut options = std::env::var_os("NODE_OPTIONS").unwrap_or_default();
        if !options.is_empty() {
            options.push(" ");
        }
        options.push("--require ");
        options.push(&self.file);
        options
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Launcher {
    /// Opens the master's executable (`/proc/self/exe`) for [`Program::CurrentExe`], or
    /// checks that a [`Program::Command`] names an executable file (through `PATH` when it
    /// has no `/`).
    pub fn new(program: Program) -> Result<Launcher, SpawnError> {
        let arg0 = std::env::args_os().next().unwrap_or_default();
        let exe = match &program {
            Program::CurrentExe => {
                // Above fd 3, which each worker's channel takes before the exec.
                let exe = File::open("/proc/self/exe")
                    .and_then(|file| sys::process::dup_above_channel(&file))
                    .map_err(SpawnError::CurrentExe)?;
                Some(File::from(exe))
            }
            Program::Command(argv) | Program::Node(argv) => {
                let program = argv.first().ok_or(SpawnError::EmptyCommand)?;
                find_executable(program).map_err(|reason| SpawnError::NotExecutable {
                    program: program.clone(),
                    reason,
                })?;
                None
            }
        };
        let preload = match &program {
            Program::Node(_) => Some(Preload::write().map_err(SpawnError::Preload)?),
            _ => None,
        };
        Ok(Launcher {
            program,
            exe,
            arg0,
            env: Vec::new(),
            preload,
        })
    }

    /// Sets `key` to `value` in every worker's environment.
    pub fn env(&mut self, key: &'static str, value: impl Into<OsString>) {
        self.env.push((key, value.into()));
    }

    fn command(&self) -> Result<tokio::process::Command, SpawnError> {
        match (&self.program, &self.exe) {
            (Program::Command(argv) | Program::Node(argv), _) => {
                let (program, args) = argv.split_first().ok_or(SpawnError::EmptyCommand)?;
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args);
                Ok(cmd)
            }
            (Program::CurrentExe, Some(exe)) => {
                // execve of /proc/self/fd/N runs the file the master opened at its start,
                // whatever is at its path now (the fd is close-on-exec, but still open
                // while execve reads it: this is how fexecve(3) works).
                let mut cmd =
                    tokio::process::Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
                cmd.arg0(&self.arg0).args(std::env::args_os().skip(1));
                Ok(cmd)
            }
            (Program::CurrentExe, None) => {
                let exe = std::env::current_exe().map_err(SpawnError::CurrentExe)?;
                let mut cmd = tokio::process::Command::new(exe);
                cmd.args(std::env::args_os().skip(1));
                Ok(cmd)
            }
        }
    }
}

/// Where `program` is, if it names an executable regular file: as a path when it has a `/`,
/// else the first match in `PATH`.
fn find_executable(program: &OsStr) -> Result<PathBuf, String> {
    let check = |path: &Path| -> Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err("not executable (no x permission)".into());
        }
        Ok(())
    };
    if program.is_empty() {
        return Err("empty program name".into());
    }
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return check(&path).map(|()| path);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|path| check(path).is_ok())
        .ok_or_else(|| "not found in PATH".into())
}

/// A started worker: its process and the master's end of its channel.
#[derive(Debug)]
pub struct Spawned {
    /// The child process (reaped by awaiting it).
    pub child: tokio::process::Child,
    /// Its pid.
    pub pid: u32,
    /// The master's end of the channel.
    pub channel: Channel,
}

/// Starts the worker for `slot` (its `spawn`-th process). `heartbeat` and `drain` are passed
/// in the environment for the worker runtime.
pub fn spawn(
    launcher: &Launcher,
    slot: usize,
    spawn: u64,
    heartbeat: Duration,
    drain: Duration,
) -> Result<Spawned, SpawnError> {
    let pair = match launcher.preload {
        Some(_) => sys::socket::stream_pair(),
        None => sys::socket::seqpacket_pair(),
    };
    let (master_end, worker_end) = pair.map_err(SpawnError::CreateChannel)?;
    let mut cmd = launcher.command()?;
    cmd.envs(launcher.env.iter().map(|(k, v)| (k, v)));
    // systemd's words are for the master: a worker must not notify, take the activated
    // sockets or feed the watchdog in its place.
    for inherited in SERVICE_MANAGER_ENV {
        cmd.env_remove(inherited);
    }
    cmd.env(super::ENV_FD, sys::process::CHANNEL_FD.to_string())
        .env(super::ENV_WORKER, slot.to_string())
        .env(super::ENV_SPAWN, spawn.to_string())
        .env(super::ENV_HEARTBEAT_MS, heartbeat.as_millis().to_string())
        .env(super::ENV_DRAIN_MS, drain.as_millis().to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    if let Some(preload) = &launcher.preload {
        cmd.env("NODE_CHANNEL_FD", sys::process::CHANNEL_FD.to_string())
            .env("NODE_CHANNEL_SERIALIZATION_MODE", "json")
            .env("NODE_OPTIONS", preload.node_options());
    }
    sys::process::prepare_worker(&mut cmd, &worker_end, libc::SIGTERM);
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        program: cmd.as_std().get_program().to_owned(),
        source,
    })?;
    drop(worker_end);
    let pid = child.id().unwrap_or(0);
    let channel = match launcher.preload {
        Some(_) => Channel::node(master_end),
        None => Channel::new(master_end),
    };
    let channel = channel.map_err(SpawnError::CreateChannel)?;
    Ok(Spawned {
        child,
        pid,
        channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_found_in_path_or_refused_with_the_reason() {
        assert!(find_executable(OsStr::new("sh")).is_ok());
        assert!(find_executable(OsStr::new("/bin/sh")).is_ok());
        let missing = find_executable(OsStr::new("/nonexistent/worker")).unwrap_err();
        assert!(missing.contains("No such file"), "{missing}");
        let unknown = find_executable(OsStr::new("no-such-handoff-worker")).unwrap_err();
        assert_eq!(unknown, "not found in PATH");
        let dir = find_executable(OsStr::new("/tmp")).unwrap_err();
        assert_eq!(dir, "not a regular file");
        let file = tempfile::NamedTempFile::new().unwrap();
        let plain = find_executable(file.path().as_os_str()).unwrap_err();
        assert!(plain.contains("not executable"), "{plain}");
    }

    #[test]
    fn an_unusable_command_is_refused_before_any_worker_starts() {
        let err = Launcher::new(Program::Command(vec!["/nonexistent/worker".into()])).unwrap_err();
        assert!(err.to_string().contains("cannot be executed"), "{err}");
        assert!(matches!(
            Launcher::new(Program::Command(Vec::new())),
            Err(SpawnError::EmptyCommand)
        ));
    }
}
