//! Starting one worker process: a fresh channel socketpair, the worker's end at fd 3, the
//! slot and spawn count in its environment, death tied to the master's.

use std::ffi::OsString;
use std::io;
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
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The channel socketpair could not be created.
    #[error("creating the worker channel failed")]
    CreateChannel(#[source] io::Error),
    /// The master's own executable could not be found.
    #[error("finding the current executable failed")]
    CurrentExe(#[source] io::Error),
    /// The command is empty.
    #[error("the worker command is empty")]
    EmptyCommand,
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
    program: &Program,
    slot: usize,
    spawn: u64,
    heartbeat: Duration,
    drain: Duration,
) -> Result<Spawned, SpawnError> {
    let (master_end, worker_end) =
        sys::socket::seqpacket_pair().map_err(SpawnError::CreateChannel)?;
    let mut cmd = match program {
        Program::CurrentExe => {
            let exe = std::env::current_exe().map_err(SpawnError::CurrentExe)?;
            let mut cmd = tokio::process::Command::new(exe);
            cmd.args(std::env::args_os().skip(1));
            cmd
        }
        Program::Command(argv) => {
            let (program, args) = argv.split_first().ok_or(SpawnError::EmptyCommand)?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            cmd
        }
    };
    cmd.env(super::ENV_FD, sys::process::CHANNEL_FD.to_string())
        .env(super::ENV_WORKER, slot.to_string())
        .env(super::ENV_SPAWN, spawn.to_string())
        .env(super::ENV_HEARTBEAT_MS, heartbeat.as_millis().to_string())
        .env(super::ENV_DRAIN_MS, drain.as_millis().to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    sys::process::prepare_worker(&mut cmd, &worker_end, libc::SIGTERM);
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        program: cmd.as_std().get_program().to_owned(),
        source,
    })?;
    drop(worker_end);
    let pid = child.id().unwrap_or(0);
    let channel = Channel::new(master_end).map_err(SpawnError::CreateChannel)?;
    Ok(Spawned {
        child,
        pid,
        channel,
    })
}
