//! Every system call handoff makes that the standard library does not wrap, and all of its
//! `unsafe`. Each wrapper takes borrowed fds (`impl AsFd`/`AsRawFd`), returns `OwnedFd` for
//! anything it creates, and reports failure as `io::Error`. Nothing above this module touches
//! a raw pointer.
#![allow(unsafe_code)]

pub mod process;
pub mod scm;
pub mod shm;
pub mod socket;

/// Calls a libc function and turns the C convention (`-1` and `errno`) into `io::Result`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller's surrounding block documents the arguments' validity.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Registers an owned fd with the current tokio reactor, for readiness in both directions.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that it alone closes, and its as_raw_fd always
    // returns that same fd, so it stays open and unchanged for the AsyncFd's lifetime.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}
