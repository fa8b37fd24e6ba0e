//! Process control: how a worker is exec'd (its channel at a fixed fd, death tied to the
//! master's), signals, and the resource usage the master reads about itself.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::syscall;

/// The fd number at which every worker finds its channel to the master.
pub const CHANNEL_FD: RawFd = 3;

/// Arranges for the spawned child to find `channel` at fd [`CHANNEL_FD`] (not close-on-exec),
/// to inherit no other fd above it (`close_range(2)` with `CLOSE_RANGE_CLOEXEC`: whatever
/// the master's own parent leaked stays out of the workers), to run in a process group of its
/// own (so a terminal's Ctrl-C reaches only the master, which stops the workers gracefully),
/// and to receive `death_signal` when the master dies
/// (`prctl(PR_SET_PDEATHSIG)`). If the master died before the child could ask, the child
/// exits at once.
pub fn prepare_worker(cmd: &mut tokio::process::Command, channel: &OwnedFd, death_signal: i32) {
    let channel = channel.as_raw_fd();
    let master = std::process::id() as libc::pid_t;
    let hook = move || -> io::Result<()> {
        if channel == CHANNEL_FD {
            let flags = syscall!(fcntl(CHANNEL_FD, libc::F_GETFD))?;
            syscall!(fcntl(CHANNEL_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
        } else {
            // dup2 clears FD_CLOEXEC on the new fd; the original stays close-on-exec.
            syscall!(dup2(channel, CHANNEL_FD))?;
        }
        // Mark every fd above the channel close-on-exec rather than closing it: std's own
        // exec-error pipe is among them, and must stay open until exec succeeds (closing it
        // turned a failed exec into an abort in the child). On kernels before 5.11
        // (ENOSYS/EINVAL) the stray fds stay inherited; nothing else changes.
        let _ = syscall!(syscall(
            libc::SYS_close_range,
            CHANNEL_FD as libc::c_uint + 1,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC
        ));
        // A process group of its own: Ctrl-C in a terminal signals the foreground group,
        // and only the master should get it (it drains the workers gracefully); a worker
        // that died of SIGINT would cut its connections.
        syscall!(setpgid(0, 0))?;
        die_with(master, death_signal)
    };
    // SAFETY: the hook runs between fork and exec and calls only async-signal-safe functions
    // (fcntl, dup2, close_range, setpgid, prctl, getppid, _exit); it allocates nothing and takes no
    // locks. It closes no fd (close_range only sets close-on-exec), so std's exec-error pipe
    // and the master's own fds are untouched.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// In a child between fork and exec: asks for `signal` when `parent` dies
/// (`prctl(PR_SET_PDEATHSIG)`), and exits at once if it already has (the child was
/// re-parented before it could ask). Async-signal-safe: prctl, getppid, _exit.
fn die_with(parent: libc::pid_t, signal: i32) -> io::Result<()> {
    syscall!(prctl(
        libc::PR_SET_PDEATHSIG,
        signal as libc::c_ulong,
        0,
        0,
        0
    ))?;
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: _exit is async-signal-safe and ends the child before exec.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// `fcntl(F_DUPFD_CLOEXEC)`: a close-on-exec copy of `fd` numbered above [`CHANNEL_FD`],
/// where a worker's exec cannot find it replaced by its channel.
pub fn dup_above_channel(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    let raw = syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, CHANNEL_FD + 1))?;
    // SAFETY: fcntl just returned this new fd and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// `prctl(PR_SET_NAME)`: the calling thread's name, which for the main thread is the
/// process's `comm` (what `ps`, `top` and `pgrep` show); the kernel keeps 15 bytes.
pub fn set_thread_name(name: &std::ffi::OsStr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut bytes = [0u8; 16];
    let name = name.as_bytes();
    let len = name.len().min(15);
    bytes[..len].copy_from_slice(&name[..len]);
    // SAFETY: `bytes` is a live, NUL-terminated buffer of 16 bytes, as PR_SET_NAME reads.
    syscall!(prctl(
        libc::PR_SET_NAME,
        bytes.as_ptr() as libc::c_ulong,
        0,
        0,
        0
    ))?;
    Ok(())
}

/// `kill(2)`. `ESRCH` (already gone) is reported as `Ok(false)`.
pub fn signal(pid: u32, signal: i32) -> io::Result<bool> {
    match syscall!(kill(pid as libc::pid_t, signal)) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(feature = "bench")]
/// CPU time (user + system) this process has used so far, from `getrusage(RUSAGE_SELF)`.
pub fn self_cpu_time() -> std::time::Duration {
    // SAFETY: an all-zero rusage is valid and getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable rusage.
    let _ = syscall!(getrusage(libc::RUSAGE_SELF, &mut usage));
    let micros = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    std::time::Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

#[cfg(feature = "bench")]
/// Ticks of `/proc/PID/stat` per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Takes ownership of the channel fd a worker inherited at `fd`, after checking that it is
/// an open `SOCK_SEQPACKET` socket; makes it close-on-exec (the worker's own children must
/// not hold it) and non-blocking.
pub fn inherited_channel(fd: RawFd) -> io::Result<OwnedFd> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    syscall!(fcntl(fd, libc::F_GETFD))?;
    let mut kind: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `kind` is a live c_int and `len` says so.
    syscall!(getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_TYPE,
        &mut kind as *mut i32 as *mut libc::c_void,
        &mut len
    ))?;
    if kind != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a SOCK_SEQPACKET socket"),
        ));
    }
    if TAKEN.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the worker channel was already taken by this process",
        ));
    }
    // SAFETY: the fd is open (F_GETFD succeeded), it was passed to this process for its sole
    // use by the master, and TAKEN makes this the only OwnedFd ever made of it here.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    super::socket::set_cloexec(&owned, true)?;
    super::socket::set_nonblocking(&owned, true)?;
    Ok(owned)
}

#[cfg(feature = "bench")]
/// CPU time the calling thread has used (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`): what a
/// benchmark charges to the master's one thread, excluding time spent blocked.
pub fn thread_cpu_time() -> std::time::Duration {
    // SAFETY: an all-zero timespec is valid and clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a live, writable timespec.
    let _ = syscall!(clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts));
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(feature = "bench")]
/// Makes the child started by `cmd` receive SIGTERM when this process dies
/// (`prctl(PR_SET_PDEATHSIG)`), e.g. the servers `handoff bench` starts: a killed benchmark
/// must not leave them running. Call it on the thread that stays alive (PDEATHSIG follows
/// the spawning thread).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    let hook = move || die_with(parent, libc::SIGTERM);
    // SAFETY: the hook runs between fork and exec and calls only async-signal-safe functions
    // (prctl, getppid, _exit); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `getrlimit(RLIMIT_NOFILE)`: the (soft, hard) limit on open fds.
pub fn fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live, writable rlimit.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut limit))?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (`setrlimit(2)`), as Go's runtime and
/// most servers do: the soft default (often 1024) exists for `select(2)` users. Returns the
/// soft limit in force afterwards.
pub fn raise_fd_limit() -> io::Result<u64> {
    let (soft, hard) = fd_limit()?;
    if soft >= hard {
        return Ok(soft);
    }
    let limit = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: `limit` is a live rlimit; the call only reads it.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &limit))?;
    Ok(hard)
}
