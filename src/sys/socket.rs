//! Sockets: listeners with a chosen backlog and `SO_REUSEPORT`, `accept4(2)` with the peer
//! address, `socketpair(2)` for the master–worker channel, `shutdown(2)` and fd flags.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::syscall;

/// A peer's address as `accept4(2)` reports it: an IP socket address, or a Unix peer (whose
/// address is nearly always unnamed, so only the fact is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// An IPv4 or IPv6 peer.
    Ip(SocketAddr),
    /// A peer on a Unix stream socket.
    Unix,
}

/// `socket(2)` + `setsockopt(SO_REUSEADDR[, SO_REUSEPORT])` + `bind(2)` + `listen(2)`: a
/// non-blocking, close-on-exec TCP listener.
pub fn tcp_listener(addr: SocketAddr, backlog: i32, reuseport: bool) -> io::Result<OwnedFd> {
    let fd = tcp_bound(addr, reuseport)?;
    listen(&fd, backlog)?;
    Ok(fd)
}

/// `listen(2)`.
pub fn listen(fd: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    syscall!(listen(fd.as_raw_fd(), backlog)).map(drop)
}

/// A TCP socket bound to `addr` but not listening: with `reuseport`, it reserves the port
/// (resolving port 0) for a group of `SO_REUSEPORT` listeners without taking connections.
pub fn tcp_bound(addr: SocketAddr, reuseport: bool) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let raw = syscall!(socket(
        domain,
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: `socket` just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    if addr.is_ipv6() {
        set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (storage, len) = sockaddr_from(addr);
    // SAFETY: `storage` is a valid sockaddr of `len` bytes for the socket's family.
    syscall!(bind(
        fd.as_raw_fd(),
        &storage as *const libc::sockaddr_storage as *const libc::sockaddr,
        len
    ))?;
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
    syscall!(listen(fd.as_raw_fd(), backlog))?;
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
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
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
    let (addr, len) = sockaddr_un_from(path)?;
    let raw = syscall!(socket(
        libc::AF_UNIX,
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: `socket` just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    syscall!(connect(
        fd.as_raw_fd(),
        &addr as *const libc::sockaddr_un as *const libc::sockaddr,
        len
    ))?;
    Ok(())
}

fn sockaddr_un_from(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the terminator.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot be a Unix socket path", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

#[cfg(feature = "control")]
/// `geteuid(2)`: the user this process acts as, which a Unix peer's `SO_PEERCRED` uid is
/// compared with.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// The local address of a bound IP socket (`getsockname(2)`), e.g. to learn the port that
/// binding port 0 chose.
pub fn local_addr(fd: &impl AsRawFd) -> io::Result<Option<SocketAddr>> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for any address and `len` says so.
    syscall!(getsockname(
        fd.as_raw_fd(),
        storage.as_mut_ptr() as *mut libc::sockaddr,
        &mut len
    ))?;
    // SAFETY: zeroed storage is a valid sockaddr_storage; the kernel filled `len` bytes.
    Ok(match sockaddr_to(unsafe { &storage.assume_init() }) {
        Peer::Ip(addr) => Some(addr),
        Peer::Unix => None,
    })
}

/// `accept4(2)` with `SOCK_NONBLOCK | SOCK_CLOEXEC`: the connection and its peer.
pub fn accept(listener: &impl AsRawFd) -> io::Result<(OwnedFd, Peer)> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for any address and `len` says so.
    let raw = syscall!(accept4(
        listener.as_raw_fd(),
        storage.as_mut_ptr() as *mut libc::sockaddr,
        &mut len,
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    ))?;
    // SAFETY: `accept4` returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed storage is a valid sockaddr_storage; the kernel filled `len` bytes.
    let peer = sockaddr_to(unsafe { &storage.assume_init() });
    Ok((fd, peer))
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET)`, both ends non-blocking and close-on-exec: the
/// master–worker channel. Message boundaries are kept, so each `sendmsg` is one frame and
/// carries its own fds.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))?;
    // SAFETY: socketpair returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `shutdown(fd, SHUT_WR)`: sends FIN now, even while another process still holds a copy of
/// the socket. `ENOTCONN` (the peer is already gone) is not an error.
pub fn shutdown_write(fd: &impl AsRawFd) -> io::Result<()> {
    match syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_WR)) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `fcntl(F_SETFD)`: turns `FD_CLOEXEC` on or off.
pub fn set_cloexec(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFD))?;
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    syscall!(fcntl(fd.as_raw_fd(), libc::F_SETFD, flags))?;
    Ok(())
}

/// `fcntl(F_SETFL)`: turns `O_NONBLOCK` on or off.
pub fn set_nonblocking(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    syscall!(fcntl(fd.as_raw_fd(), libc::F_SETFL, flags))?;
    Ok(())
}

fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length says so.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        &value as *const i32 as *const libc::c_void,
        size_of::<i32>() as libc::socklen_t
    ))?;
    Ok(())
}

fn sockaddr_from(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn sockaddr_to(storage: &libc::sockaddr_storage) -> Peer {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Peer::Ip(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Peer::Ip(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => Peer::Unix,
    }
}

/// Whether a connected stream's peer has gone: `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte
/// reads the end of the stream (it closed without sending anything still unread) or an error
/// (reset). A peer that sent data, or nothing yet, is still there.
pub fn peer_gone(fd: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is one live, writable byte and the length says so.
    let read = syscall!(recv(
        fd.as_raw_fd(),
        &mut byte as *mut u8 as *mut libc::c_void,
        1,
        libc::MSG_PEEK | libc::MSG_DONTWAIT
    ));
    match read {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(feature = "bench")]
/// `poll(2)` for readability: true if `fd` became readable within `timeout_ms`.
pub fn wait_readable(fd: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pollfd` is one live pollfd and the count says so.
    let ready = syscall!(poll(&mut pollfd, 1, timeout_ms))?;
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
}
