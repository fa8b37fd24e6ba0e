//! Every system call handoff makes that the standard library does not wrap, and all of its
//! `unsafe`. The calls go through rustix, which takes borrowed fds (`impl AsFd`), returns
//! `OwnedFd` for anything it creates, and reports failure as an `Errno` that becomes
//! `io::Error` here. What stays `unsafe` is what rustix cannot say: the worker's pre-exec
//! hook, taking ownership of the inherited channel fd, registering an fd with tokio, and
//! `bpf(2)`, `SO_ATTACH_REUSEPORT_EBPF`, `TCP_INFO` and the load array's mapping ([`bpf`]);
//! each such block has a `// SAFETY:` line. Nothing above this module touches a raw pointer;
//! fds travel above it as `OwnedFd` and `BorrowedFd`; the raw numbers are the channel a
//! worker inherits, which [`process::inherited_channel`] turns into an `OwnedFd`, and the
//! map and listener fds `crate::bpf` writes into its program and socket array as values.
#![allow(unsafe_code)]

pub mod bpf;
#[cfg(feature = "cli")]
pub mod pipe;
pub mod process;
pub mod scm;
pub mod shm;
pub mod socket;

/// Registers an owned fd with the current tokio reactor, for readiness in both directions.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that it alone closes, and its as_raw_fd always
    // returns that same fd, so it stays open and unchanged for the AsyncFd's lifetime.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}
