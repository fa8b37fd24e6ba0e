//! Sockets: listeners with a chosen backlog and `SO_REUSEPORT`, `accept4(2)` with the peer
//! address, `socketpair(2)` for the master–worker channel, `shutdown(2)` and fd flags. All
//! through rustix: no `unsafe` here.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::io::{Errno, FdFlags};
use rustix::net::{AddressFamily, RecvFlags, Shutdown, SocketAddrUnix, SocketFlags, SocketType};

/// A peer's address as `accept4(2)` reports it: an IP socket address, or a Unix peer (whose
/// address is nearly always unnamed, so only the fact is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// An IPv4 or IPv6 peer.
    Ip(SocketAddr),
    /// A peer on a Unix stream socket.
    Unix,
}

impl Peer {
    /// The peer of an address the kernel reported: IPv4 and IPv6 keep it, any other family
    /// (or none, an unnamed Unix peer) is [`Peer::Unix`].
    fn from_any(addr: Option<rustix::net::SocketAddrAny>) -> Peer {
        match addr.map(SocketAddr::try_from) {
            Some(Ok(ip)) => Peer::Ip(ip),
            _ => Peer::Unix,
        }
    }
}

/// `socket(2)` + `setsockopt(SO_REUSEADDR[, SO_REUSEPORT])` + `bind(2)` + `listen(2)`: a
/// non-blocking, close-on-exec TCP listener.
pub fn tcp_listener(addr: SocketAddr, backlog: i32, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = tcp_bound(addr, reuseport)?;
    listen(&fd, backlog)?;
    Ok(fd)
}

/// `listen(2)`.
pub fn listen(fd: &impl AsFd, backlog: i32) -> io::Result<()> {
    Ok(rustix::net::listen(fd, backlog)?)
}

/// A TCP socket bound to `addr` but not listening: with `reuseport`, it reserves the port
/// (resolving port 0) for a group of `SO_REUSEPORT` listeners without taking connections.
pub fn tcp_bound(addr: SocketAddr, reuseport: bool) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        domain,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    if reuseport {
        rustix::net::sockopt::set_socket_reuseport(&fd, true)?;
    }
    if addr.is_ipv6() {
        rustix::net::sockopt::set_ipv6_v6only(&fd, true)?;
    }
    rustix::net::bind(&fd, &addr)?;
    Ok(fd)
}

/// Binds a Unix stream listener at `path` and sets its backlog with `listen(2)`. Non-blocking
/// and close-on-exec. A socket file already at `path` is replaced only when it is stale (see
/// [`remove_stale_socket`]); a live one, or a file that is not a socket, makes binding fail
/// with `AddrInUse` and a message that says which.
pub fn unix_listener(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    remove_stale_socket(path)?;
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| explain_unix_bind(path, e))?;
    listener.set_nonblocking(true)?;
    let fd = OwnedFd::from(listener);
    listen(&fd, backlog)?;
    Ok(fd)
}

/// Removes the socket file at `path` if no process listens on it any more: a connect to it
/// ([`probe_unix`]) is refused. A socket that answers is in use (`AddrInUse`); a path that is
/// not a socket, or not there, is left as it is. Anything that cannot be told apart (say,
/// `EACCES`) is an error rather than a removal.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        _ => return Ok(()),
    }
    match probe_unix(path) {
        Ok(()) => Err(socket_in_use(path)),
        // A listener whose accept queue is full: very much alive.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(socket_in_use(path)),
        Err(e) if e.raw_os_error() == Some(Errno::CONNREFUSED.raw_os_error()) => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} is a socket that could not be probed ({e}); not replacing it",
                path.display()
            ),
        )),
    }
}

fn socket_in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{} is in use by a live process (a socket there answers)",
            path.display()
        ),
    )
}

/// Says why `bind(2)` on a Unix path failed when the path is taken.
fn explain_unix_bind(path: &Path, error: io::Error) -> io::Error {
    use std::os::unix::fs::FileTypeExt;
    if error.kind() != io::ErrorKind::AddrInUse {
        return error;
    }
    let what = match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            "a file that is not a socket is there; remove it or choose another path"
        }
        _ => "another process bound a socket there just now",
    };
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{} is in use: {what}", path.display()),
    )
}

/// `socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK)` + `connect(2)` to `path`, then closes the
/// connection. `Ok`: a listener took it into its queue; `WouldBlock` (`EAGAIN`): a listener
/// whose queue is full; `ECONNREFUSED`: nobody listens. Non-blocking because a blocking
/// connect to a full queue waits until the listener accepts, which may be never.
pub fn probe_unix(path: &Path) -> io::Result<()> {
    let addr = unix_addr(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &addr)?;
    Ok(())
}

/// The `sockaddr_un` for `path`: `InvalidInput` for a path that cannot be one (empty, a NUL
/// inside, or no room left in `sun_path` for the terminating NUL).
fn unix_addr(path: &Path) -> io::Result<SocketAddrUnix> {
    use std::os::unix::ffi::OsStrExt;
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot be a Unix socket path", path.display()),
        )
    };
    // sun_path is 108 bytes on Linux; one stays zero, the terminator.
    const SUN_PATH: usize = 108;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH || bytes.contains(&0) {
        return Err(invalid());
    }
    SocketAddrUnix::new(path).map_err(|_| invalid())
}

#[cfg(feature = "control")]
/// `geteuid(2)`: the user this process acts as, which a Unix peer's `SO_PEERCRED` uid is
/// compared with.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The local address of a bound IP socket (`getsockname(2)`), e.g. to learn the port that
/// binding port 0 chose; `None` for any other family.
pub fn local_addr(fd: &impl AsFd) -> io::Result<Option<SocketAddr>> {
    let addr = rustix::net::getsockname(fd)?;
    Ok(SocketAddr::try_from(addr).ok())
}

/// The path a unix socket is bound to.
pub fn unix_path(fd: &impl AsFd) -> io::Result<std::path::PathBuf> {
    let addr = rustix::net::getsockname(fd)?;
    let unix = SocketAddrUnix::try_from(addr)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a unix socket"))?;
    unix.path()
        .map(|path| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path.to_bytes())))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an unnamed unix socket"))
}

/// `accept4(2)` with `SOCK_NONBLOCK | SOCK_CLOEXEC`: the connection and its peer.
pub fn accept(listener: &impl AsFd) -> io::Result<(OwnedFd, Peer)> {
    let (fd, addr) =
        rustix::net::acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    Ok((fd, Peer::from_any(addr)))
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET)`, both ends non-blocking and close-on-exec: the
/// master–worker channel. Message boundaries are kept, so each `sendmsg` is one frame and
/// carries its own fds.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A connected, non-blocking, close-on-exec `AF_UNIX` `SOCK_STREAM` pair (node's IPC).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// `shutdown(fd, SHUT_WR)`: sends FIN now, even while another process still holds a copy of
/// the socket. `ENOTCONN` (the peer is already gone) is not an error.
pub fn shutdown_write(fd: &impl AsFd) -> io::Result<()> {
    match rustix::net::shutdown(fd, Shutdown::Write) {
        Ok(()) | Err(Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `fcntl(F_SETFD)`: turns `FD_CLOEXEC` on or off.
pub fn set_cloexec(fd: &impl AsFd, on: bool) -> io::Result<()> {
    let mut flags = rustix::io::fcntl_getfd(fd)?;
    flags.set(FdFlags::CLOEXEC, on);
    Ok(rustix::io::fcntl_setfd(fd, flags)?)
}

/// `fcntl(F_SETFL)`: turns `O_NONBLOCK` on or off.
pub fn set_nonblocking(fd: &impl AsFd, on: bool) -> io::Result<()> {
    let mut flags = rustix::fs::fcntl_getfl(fd)?;
    flags.set(rustix::fs::OFlags::NONBLOCK, on);
    Ok(rustix::fs::fcntl_setfl(fd, flags)?)
}

/// What a received fd is, if it is a connected stream socket: `getsockopt(SO_TYPE)` (fails
/// with `ENOTSOCK` on anything but a socket), `getsockopt(SO_ACCEPTCONN)` (a listener is
/// not a connection), `getsockname(2)` and `getpeername(2)` (`ENOTCONN` when it is not
/// connected).
pub fn connected_stream(fd: &impl AsFd) -> io::Result<(Option<SocketAddr>, Peer)> {
    if rustix::net::sockopt::socket_type(fd)? != SocketType::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream socket",
        ));
    }
    if rustix::net::sockopt::socket_acceptconn(fd)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a listening socket",
        ));
    }
    let peer = Peer::from_any(rustix::net::getpeername(fd)?);
    Ok((local_addr(fd)?, peer))
}

/// Whether a connected stream's peer has gone: `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte
/// reads the end of the stream (it closed without sending anything still unread) or an error
/// (reset). A peer that sent data, or nothing yet, is still there.
pub fn peer_gone(fd: &impl AsFd) -> bool {
    let mut byte = [0u8; 1];
    match rustix::net::recv(fd, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((_, 0)) => true,
        Ok(_) => false,
        Err(e) => !matches!(e, Errno::AGAIN | Errno::INTR),
    }
}

#[cfg(feature = "control")]
/// `poll(2)` for readability: true if `fd` became readable within `timeout_ms` (negative:
/// no limit).
pub fn wait_readable(fd: &impl AsFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pollfd = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let timeout = u32::try_from(timeout_ms)
        .ok()
        .map(|ms| rustix::event::Timespec {
            tv_sec: i64::from(ms / 1000),
            tv_nsec: i64::from(ms % 1000) * 1_000_000,
        });
    let ready = rustix::event::poll(&mut pollfd, timeout.as_ref())?;
    Ok(ready > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn tcp_listener_reports_the_port_it_bound() {
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = local_addr(&fd).unwrap().unwrap();
        assert_ne!(addr.port(), 0);
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (conn, peer) = accept(&fd).unwrap();
        assert_eq!(peer, Peer::Ip(client.local_addr().unwrap()));
        drop(conn);
    }

    #[test]
    fn only_a_connected_stream_passes_for_a_connection() {
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = local_addr(&fd).unwrap().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (conn, _) = accept(&fd).unwrap();
        let (local, peer) = connected_stream(&conn).unwrap();
        assert_eq!(local, Some(addr));
        assert_eq!(peer, Peer::Ip(client.local_addr().unwrap()));
        assert!(connected_stream(&fd).is_err(), "a listener");
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(connected_stream(&file).is_err(), "not a socket");
        let (channel, _other) = seqpacket_pair().unwrap();
        assert!(connected_stream(&channel).is_err(), "not a stream");
        let unconnected = tcp_bound("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert!(connected_stream(&unconnected).is_err(), "not connected");
    }

    #[test]
    fn accept_on_an_empty_queue_would_block() {
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let err = accept(&fd).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_peer_is_gone_once_it_closed_with_nothing_unread() {
        use std::io::Write;
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = local_addr(&fd).unwrap().unwrap();
        let mut talker = std::net::TcpStream::connect(addr).unwrap();
        let (talking, _) = accept(&fd).unwrap();
        let quiet = std::net::TcpStream::connect(addr).unwrap();
        let (waiting, _) = accept(&fd).unwrap();
        assert!(!peer_gone(&waiting), "connected and silent");
        talker.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(talker);
        assert!(!peer_gone(&talking), "its request is still unread");
        drop(quiet);
        assert!(wait_readable(&waiting, 5000).unwrap());
        assert!(peer_gone(&waiting), "closed with nothing sent");
    }

    #[test]
    fn ipv6_listener_round_trips_the_peer() {
        let fd = tcp_listener("[::1]:0".parse().unwrap(), 16, false).unwrap();
        let addr = local_addr(&fd).unwrap().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (_conn, peer) = accept(&fd).unwrap();
        assert_eq!(peer, Peer::Ip(client.local_addr().unwrap()));
    }

    #[test]
    fn binding_a_unix_path_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();

        let live = dir.path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        let error = unix_listener(&live, 16).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            error.to_string().contains("in use by a live process"),
            "{error}"
        );
        assert!(
            UnixStream::connect(&live).is_ok(),
            "the live socket is untouched"
        );

        let plain = dir.path().join("plain");
        std::fs::write(&plain, "keep me").unwrap();
        let error = unix_listener(&plain, 16).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");

        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let _fd = unix_listener(&stale, 16).expect("a stale socket is replaced");
        assert!(UnixStream::connect(&stale).is_ok());
    }

    #[test]
    fn an_accepted_unix_connection_has_a_unix_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.sock");
        let fd = unix_listener(&path, 16).unwrap();
        assert_eq!(local_addr(&fd).unwrap(), None, "not an IP socket");
        let _client = UnixStream::connect(&path).unwrap();
        let (_conn, peer) = accept(&fd).unwrap();
        assert_eq!(peer, Peer::Unix);
    }

    #[test]
    fn an_ipv6_listener_takes_no_ipv4_connections() {
        let fd = tcp_listener("[::]:0".parse().unwrap(), 16, false).unwrap();
        let port = local_addr(&fd).unwrap().unwrap().port();
        let refused = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(refused.is_err(), "IPV6_V6ONLY is set");
    }

    #[test]
    fn a_probe_tells_a_live_socket_from_a_stale_one_and_refuses_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        probe_unix(&live).expect("a listener answers");

        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let refused = probe_unix(&stale).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ECONNREFUSED));
        remove_stale_socket(&stale).unwrap();
        assert!(!stale.exists(), "the stale socket is removed");

        let missing = probe_unix(&dir.path().join("missing.sock")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        for bad in ["", "a\0b"] {
            let err = probe_unix(Path::new(bad)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        let long = dir.path().join("x".repeat(108));
        let err = probe_unix(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn shutting_down_an_unconnected_socket_is_not_an_error() {
        let fd = tcp_bound("127.0.0.1:0".parse().unwrap(), false).unwrap();
        shutdown_write(&fd).expect("ENOTCONN is not an error");
    }

    #[test]
    fn shutdown_write_sends_the_end_of_the_stream() {
        use std::io::Read;
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let mut client = std::net::TcpStream::connect(local_addr(&fd).unwrap().unwrap()).unwrap();
        let (conn, _) = accept(&fd).unwrap();
        let copy = conn.try_clone().unwrap();
        shutdown_write(&conn).unwrap();
        let mut rest = Vec::new();
        assert_eq!(
            client.read_to_end(&mut rest).unwrap(),
            0,
            "FIN while a copy is open"
        );
        drop(copy);
    }

    #[test]
    fn fd_flags_turn_on_and_off() {
        let (a, _b) = seqpacket_pair().unwrap();
        let cloexec = |fd: &OwnedFd| {
            rustix::io::fcntl_getfd(fd)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        };
        let nonblocking = |fd: &OwnedFd| {
            rustix::fs::fcntl_getfl(fd)
                .unwrap()
                .contains(rustix::fs::OFlags::NONBLOCK)
        };
        assert!(cloexec(&a) && nonblocking(&a), "socketpair sets both");
        set_cloexec(&a, false).unwrap();
        set_nonblocking(&a, false).unwrap();
        assert!(!cloexec(&a) && !nonblocking(&a));
        set_cloexec(&a, true).unwrap();
        set_nonblocking(&a, true).unwrap();
        assert!(cloexec(&a) && nonblocking(&a));
    }

    #[test]
    fn accepted_connections_are_nonblocking_and_cloexec() {
        let fd = tcp_listener("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let _client = std::net::TcpStream::connect(local_addr(&fd).unwrap().unwrap()).unwrap();
        let (conn, _) = accept(&fd).unwrap();
        assert!(rustix::io::fcntl_getfd(&conn)
            .unwrap()
            .contains(FdFlags::CLOEXEC));
        assert!(rustix::fs::fcntl_getfl(&conn)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK));
    }

    #[test]
    fn wait_readable_times_out_then_sees_data() {
        use std::io::Write;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!wait_readable(&b, 10).unwrap());
        (&a).write_all(b"x").unwrap();
        assert!(wait_readable(&b, -1).unwrap());
    }
}
