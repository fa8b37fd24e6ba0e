//! Process control: how a worker is exec'd (its channel at a fixed fd, death tied to the
//! master's), signals, and the resource usage the master reads about itself.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::{Errno, FdFlags};
use rustix::process::{Pid, Resource, Rlimit, Signal};

/// The fd number at which every worker finds its channel to the master.
pub const CHANNEL_FD: RawFd = 3;

/// Turns the C convention (`-1` and `errno`) of a raw libc call into `io::Result`, for the
/// few calls rustix cannot make for us (see [`prepare_worker`]). Reads `errno` only:
/// async-signal-safe, allocates nothing.
fn cvt(result: libc::c_long) -> io::Result<libc::c_long> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Arranges for the spawned child to find `channel` at fd [`CHANNEL_FD`] (not close-on-exec),
/// to inherit no other fd above it (`close_range(2)` with `CLOSE_RANGE_CLOEXEC`: whatever
/// the master's own parent leaked stays out of the workers), to run in a process group of its
/// own (so a terminal's Ctrl-C reaches only the master, which stops the workers gracefully),
/// and to receive `death_signal` when the master dies
/// (`prctl(PR_SET_PDEATHSIG)`). If the master died before the child could ask, the child
/// exits at once. `channel` must stay open until the command is spawned; a `death_signal`
/// that is not a signal makes the spawn fail with `InvalidInput`.
pub fn prepare_worker(cmd: &mut tokio::process::Command, channel: &OwnedFd, death_signal: i32) {
    let channel = channel.as_raw_fd();
    let master = rustix::process::getpid();
    let death_signal = Signal::from_named_raw(death_signal);
    let hook = move || -> io::Result<()> {
        if channel == CHANNEL_FD {
            // SAFETY: the fd table is the master's, copied at fork; `channel` was open then
            // (the caller keeps it open until spawn) and nothing in this single-threaded
            // child closes it while it is borrowed here.
            let channel = unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) };
            let flags = rustix::io::fcntl_getfd(channel)?;
            rustix::io::fcntl_setfd(channel, flags - FdFlags::CLOEXEC)?;
        } else {
            // dup2 clears FD_CLOEXEC on the new fd; the original stays close-on-exec.
            // rustix's dup2 wants the target as an OwnedFd, and fd 3 may not be open here.
            // SAFETY: dup2 touches no memory; it replaces whatever fd 3 was in this child's
            // copy of the fd table, and no code in the child uses that fd again before exec
            // (as std's own dup2 of stdio in the same child).
            cvt(unsafe { libc::dup2(channel, CHANNEL_FD) }.into())?;
        }
        // Mark every fd above the channel close-on-exec rather than closing it: std's own
        // exec-error pipe is among them, and must stay open until exec succeeds (closing it
        // turned a failed exec into an abort in the child). On kernels before 5.11
        // (ENOSYS/EINVAL) the stray fds stay inherited; nothing else changes. rustix has no
        // close_range.
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing and touches no memory;
        // it sets a flag on fds of this child's table.
        let _ = cvt(unsafe {
            libc::syscall(
                libc::SYS_close_range,
                CHANNEL_FD as libc::c_uint + 1,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        });
        // A process group of its own: Ctrl-C in a terminal signals the foreground group,
        // and only the master should get it (it drains the workers gracefully); a worker
        // that died of SIGINT would cut its connections.
        rustix::process::setpgid(None, None)?;
        let Some(signal) = death_signal else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        die_with(master, signal)
    };
    // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls
    // (fcntl, dup2, close_range, setpgid, prctl, getppid, _exit: raw syscalls through rustix
    // or libc); it allocates nothing (its errors are OS codes or a bare ErrorKind) and takes
    // no locks. It closes no fd (close_range only sets close-on-exec), so std's exec-error
    // pipe and the master's own fds are untouched.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// In a child between fork and exec: asks for `signal` when `parent` dies
/// (`prctl(PR_SET_PDEATHSIG)`), and exits at once if it already has (the child was
/// re-parented before it could ask). Async-signal-safe: prctl, getppid, _exit.
fn die_with(parent: Pid, signal: Signal) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(signal))?;
    if rustix::process::getppid() != Some(parent) {
        // rustix's exit_group lives in its hidden, unstable `runtime` module.
        // SAFETY: _exit is async-signal-safe and ends the child before exec, running no
        // destructors or atexit handlers of the master's copied state.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// Arranges for a spawned helper process (a backend `handoff proxy --spawn` starts) to run
/// in a process group of its own (a terminal's Ctrl-C reaches only the master, which stops
/// it after the workers have drained) and to receive `death_signal` when the master dies
/// (`prctl(PR_SET_PDEATHSIG)`), exiting at once if the master died before it could ask.
/// Unlike [`prepare_worker`] it gets no channel: its fds above stderr are close-on-exec as
/// std leaves them. A `death_signal` that is not a signal makes the spawn fail with
/// `InvalidInput`.
#[cfg(feature = "cli")]
pub fn prepare_helper(cmd: &mut tokio::process::Command, death_signal: i32) {
    let master = rustix::process::getpid();
    let death_signal = Signal::from_named_raw(death_signal);
    let hook = move || -> io::Result<()> {
        rustix::process::setpgid(None, None)?;
        let Some(signal) = death_signal else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        die_with(master, signal)
    };
    // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls
    // (setpgid, prctl, getppid, _exit); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `kill(pid, 0)`: whether a process with this pid exists (a zombie not yet reaped counts;
/// `EPERM`, someone else's process, counts too). 0 and pids above `i32::MAX` are not.
#[cfg(feature = "cli")]
pub fn is_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    !matches!(rustix::process::test_kill_process(pid), Err(Errno::SRCH))
}

/// `fcntl(F_DUPFD_CLOEXEC)`: a close-on-exec copy of `fd` numbered above [`CHANNEL_FD`],
/// where a worker's exec cannot find it replaced by its channel.
pub fn dup_above_channel(fd: &impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, CHANNEL_FD + 1)?)
}

/// `prctl(PR_SET_NAME)`: the calling thread's name, which for the main thread is the
/// process's `comm` (what `ps`, `top` and `pgrep` show); the kernel keeps 15 bytes, and a
/// NUL in `name` ends it there.
pub fn set_thread_name(name: &std::ffi::OsStr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut bytes = [0u8; 16];
    let name = name.as_bytes();
    let len = name.len().min(15);
    bytes[..len].copy_from_slice(&name[..len]);
    let name = std::ffi::CStr::from_bytes_until_nul(&bytes)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::thread::set_name(name)?)
}

/// `kill(2)`. `ESRCH` (already gone) is reported as `Ok(false)`. A `pid` that names no single
/// process (0, or above `i32::MAX`, which `kill` would take for a process group) or a
/// `signal` that is not one is `InvalidInput`.
pub fn signal(pid: u32, signal: i32) -> io::Result<bool> {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let (Some(pid), Some(signal)) = (pid, Signal::from_named_raw(signal)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    match rustix::process::kill_process(pid, signal) {
        Ok(()) => Ok(true),
        Err(Errno::SRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(feature = "cli")]
/// CPU time (user + system) this process has used so far, all its threads together:
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`, the same total `getrusage(RUSAGE_SELF)` splits
/// into user and system time, at nanosecond rather than tick resolution.
pub fn self_cpu_time() -> std::time::Duration {
    timespec_duration(rustix::time::clock_gettime(
        rustix::time::ClockId::ProcessCPUTime,
    ))
}

#[cfg(any(feature = "control", feature = "prometheus"))]
/// Ticks of `/proc/PID/stat` per second (`sysconf(_SC_CLK_TCK)`, which rustix reads from the
/// auxiliary vector); 100 if the kernel did not say.
pub fn clock_ticks_per_second() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        ticks => ticks,
    }
}

/// Takes ownership of the channel fd a worker inherited at `fd`, after checking that it is
/// an open `SOCK_SEQPACKET` socket; makes it close-on-exec (the worker's own children must
/// not hold it) and non-blocking.
pub fn inherited_channel(fd: RawFd) -> io::Result<OwnedFd> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: F_GETFD on any number only reads this process's fd table: EBADF if it is not
    // open, and no memory of ours is touched.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }.into())?;
    // SAFETY: `fd` is open (F_GETFD succeeded); this process does not close it while it is
    // borrowed for the one getsockopt below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if rustix::net::sockopt::socket_type(borrowed)? != rustix::net::SocketType::SEQPACKET {
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
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    super::socket::set_cloexec(&owned, true)?;
    super::socket::set_nonblocking(&owned, true)?;
    Ok(owned)
}

/// Arranges for the spawned child (a new master taking over from this one) to find
/// `fds` at fds 3, 4, ... in order (not close-on-exec) and to inherit no other fd above
/// them. Unlike a worker it keeps this process group and does not die with this process: it
/// outlives it. The copies it makes (returned) must stay open until the command is spawned.
pub fn prepare_successor(
    cmd: &mut std::process::Command,
    fds: &[BorrowedFd<'_>],
) -> io::Result<Vec<OwnedFd>> {
    let first = CHANNEL_FD;
    let after = first + fds.len() as RawFd;
    // Copies above every target, so that no dup2 below overwrites a source it still needs.
    let copies: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, after))
        .collect::<Result<_, _>>()?;
    let sources: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
    let hook = move || -> io::Result<()> {
        for (target, &source) in (first..).zip(&sources) {
            // SAFETY: dup2 touches no memory; it replaces whatever `target` was in this
            // child's copy of the fd table, and nothing in the child uses that fd again
            // before exec. `source` is open: the parent keeps the copies until spawn.
            cvt(unsafe { libc::dup2(source, target) }.into())?;
        }
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing and touches no memory;
        // it sets a flag on fds of this child's table (see `prepare_worker`).
        let _ = cvt(unsafe {
            libc::syscall(
                libc::SYS_close_range,
                after as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        });
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls
    // (dup2, close_range); it allocates nothing (its `sources` were built before the fork)
    // and takes no locks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, hook);
    }
    Ok(copies)
}

/// Takes ownership of an fd this process inherited at `fd` from the master it takes over
/// from (see [`prepare_successor`]), after checking that it is an open socket; makes it
/// close-on-exec and non-blocking. Call once per fd.
pub fn inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any number only reads this process's fd table.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }.into())?;
    // SAFETY: `fd` is open; nothing closes it while it is borrowed for the getsockopt.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::net::sockopt::socket_type(borrowed).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inherited fd {fd} is not a socket"),
        )
    })?;
    // SAFETY: the fd is open and was passed to this process for its sole use by the master
    // it takes over from; the caller takes each inherited fd once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    super::socket::set_cloexec(&owned, true)?;
    super::socket::set_nonblocking(&owned, true)?;
    Ok(owned)
}

/// Takes ownership of a listening socket the service manager passed at `fd` (systemd's
/// socket activation, `LISTEN_FDS`), after checking that it is an open `SOCK_STREAM`
/// socket that listens; makes it close-on-exec (workers must not inherit it) and
/// non-blocking. Call once per fd.
pub fn activated_listener(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any number only reads this process's fd table: EBADF if it is not
    // open, and no memory of ours is touched.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }.into())?;
    // SAFETY: `fd` is open (F_GETFD succeeded); nothing closes it while it is borrowed for
    // the two getsockopt calls below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stream = rustix::net::sockopt::socket_type(borrowed)? == rustix::net::SocketType::STREAM;
    if !stream || !rustix::net::sockopt::socket_acceptconn(borrowed)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} from LISTEN_FDS is not a listening stream socket"),
        ));
    }
    // SAFETY: the fd is open, the service manager passed it to this process for its sole
    // use (LISTEN_PID is ours), and the caller takes each LISTEN_FDS fd once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    super::socket::set_cloexec(&owned, true)?;
    super::socket::set_nonblocking(&owned, true)?;
    Ok(owned)
}

#[cfg(feature = "cli")]
/// CPU time the calling thread has used (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`): what a
/// benchmark charges to the master's one thread, excluding time spent blocked.
pub fn thread_cpu_time() -> std::time::Duration {
    timespec_duration(rustix::time::clock_gettime(
        rustix::time::ClockId::ThreadCPUTime,
    ))
}

#[cfg(feature = "cli")]
fn timespec_duration(ts: rustix::time::Timespec) -> std::time::Duration {
    // A CPU-time clock is never negative.
    std::time::Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(feature = "cli")]
/// Makes the child started by `cmd` receive SIGTERM when this process dies
/// (`prctl(PR_SET_PDEATHSIG)`), e.g. the servers `handoff bench` starts: a killed benchmark
/// must not leave them running. Call it on the thread that stays alive (PDEATHSIG follows
/// the spawning thread).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    let hook = move || die_with(parent, Signal::TERM);
    // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls
    // (prctl, getppid, _exit); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `getrlimit(RLIMIT_NOFILE)`: the (soft, hard) limit on open fds; `RLIM_INFINITY` is
/// `u64::MAX`.
pub fn fd_limit() -> io::Result<(u64, u64)> {
    let limit = rustix::process::getrlimit(Resource::Nofile);
    Ok((
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    ))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (`setrlimit(2)`), as Go's runtime and
/// most servers do: the soft default (often 1024) exists for `select(2)` users. Returns the
/// soft limit in force afterwards.
pub fn raise_fd_limit() -> io::Result<u64> {
    let (soft, hard) = fd_limit()?;
    if soft >= hard {
        return Ok(soft);
    }
    let hard_limit = (hard != u64::MAX).then_some(hard);
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard_limit,
            maximum: hard_limit,
        },
    )?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signalling_a_process_that_is_gone_is_not_an_error() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Reaped: the pid names no process (unless reused at once, which Linux avoids).
        assert!(!signal(pid, libc::SIGTERM).unwrap());
    }

    #[test]
    fn a_signal_reaches_a_live_process() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(signal(child.id(), libc::SIGKILL).unwrap());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_pid_or_signal_that_names_no_single_target_is_refused() {
        for (pid, sig) in [
            (0, libc::SIGTERM),
            (u32::MAX, libc::SIGTERM),
            (1, 0),
            (1, 1000),
        ] {
            let err = signal(pid, sig).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{pid} {sig}");
        }
    }

    #[test]
    fn a_copy_above_the_channel_is_cloexec() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let copy = dup_above_channel(&file).unwrap();
        assert!(copy.as_raw_fd() > CHANNEL_FD);
        assert!(rustix::io::fcntl_getfd(&copy)
            .unwrap()
            .contains(FdFlags::CLOEXEC));
    }

    #[test]
    fn a_thread_name_is_cut_to_15_bytes() {
        std::thread::spawn(|| {
            set_thread_name("handoff-worker-1234".as_ref()).unwrap();
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            assert_eq!(comm.trim_end(), "handoff-worker-");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn only_an_open_seqpacket_socket_is_taken_as_the_channel() {
        // Neither check sets TAKEN, so the real channel could still be taken after these.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let err = inherited_channel(file.as_raw_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        let (stream, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = inherited_channel(stream.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let closed = file.as_raw_fd();
        drop(file);
        let err = inherited_channel(closed).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = fd_limit().unwrap();
        assert!(soft <= hard);
        assert_eq!(raise_fd_limit().unwrap(), hard);
        assert_eq!(fd_limit().unwrap(), (hard, hard));
    }

    #[cfg(feature = "cli")]
    #[test]
    fn cpu_clocks_advance_with_work() {
        let (process, thread) = (self_cpu_time(), thread_cpu_time());
        let mut x = 0u64;
        while thread_cpu_time() - thread < std::time::Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(self_cpu_time() >= process + std::time::Duration::from_millis(5));
        assert!(clock_ticks_per_second() > 0);
    }

    #[tokio::test]
    async fn a_prepared_worker_finds_its_channel_at_fd_3_in_a_group_of_its_own() {
        let (master, worker) = crate::sys::socket::seqpacket_pair().unwrap();
        let stray = std::fs::File::open("/proc/self/exe").unwrap();
        super::super::socket::set_cloexec(&stray, false).unwrap();
        // fd 3 is a socket, the stray fd is not inherited, and the child leads its group.
        let script = format!(
            "[ -S /proc/self/fd/3 ] || exit 2; [ -e /proc/self/fd/{} ] && exit 3; \
             [ \"$(cut -d' ' -f5 /proc/$$/stat)\" = \"$$\" ] || exit 4; exit 0",
            stray.as_raw_fd()
        );
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(script);
        prepare_worker(&mut cmd, &worker, libc::SIGTERM);
        let status = cmd.status().await.unwrap();
        assert_eq!(status.code(), Some(0), "{status}");
        drop((master, worker));
    }

    #[tokio::test]
    async fn a_death_signal_that_is_no_signal_fails_the_spawn() {
        let (_master, worker) = crate::sys::socket::seqpacket_pair().unwrap();
        let mut cmd = tokio::process::Command::new("true");
        prepare_worker(&mut cmd, &worker, 0);
        let err = cmd.status().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
