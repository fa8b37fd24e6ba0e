//! `sendmsg(2)` / `recvmsg(2)` with `SCM_RIGHTS`: one datagram of bytes plus up to
//! [`MAX_FDS`] file descriptors, on a `SOCK_SEQPACKET` Unix socket.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::syscall;

/// The most fds one message can carry (`SCM_MAX_FD` in the kernel).
pub const MAX_FDS: usize = 253;

/// Room for the control message of [`MAX_FDS`] fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuffer([u8; cmsg_space(MAX_FDS)]);

const fn cmsg_space(fds: usize) -> usize {
    // CMSG_SPACE is not const in libc; this is its definition for 8-byte alignment.
    let align = size_of::<usize>();
    let header = (size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    let data = (fds * size_of::<RawFd>() + align - 1) & !(align - 1);
    header + data
}

/// `sendmsg(fd, bytes + SCM_RIGHTS(fds), MSG_DONTWAIT | MSG_NOSIGNAL)`. Sends the whole
/// datagram or nothing (`SOCK_SEQPACKET`); `WouldBlock` when the peer's queue is full.
pub fn send_with_fds(socket: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 fds in one message",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cmsg = CmsgBuffer([0; cmsg_space(MAX_FDS)]);
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload as u32) } as _;
        // SAFETY: msg_control points at a zeroed, aligned buffer of at least msg_controllen
        // bytes, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `payload` bytes.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(header),
                payload,
            );
        }
    }
    // SAFETY: `msg` describes live buffers; the fds are borrowed for the call only.
    let sent = syscall!(sendmsg(
        socket.as_raw_fd(),
        &msg,
        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL
    ))?;
    Ok(sent as usize)
}

/// What one [`recv_with_fds`] call got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the datagram written to the buffer; 0 with no fds means the peer closed.
    pub len: usize,
    /// The fds that came with it, already owned and close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The datagram was longer than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    /// Some fds were dropped by the kernel for lack of room (`MSG_CTRUNC`).
    pub fds_truncated: bool,
}

/// `recvmsg(fd, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)`: one datagram and its fds. Every fd that
/// arrived is owned by the result before anything is checked, so none leaks on any path.
pub fn recv_with_fds(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuffer([0; cmsg_space(MAX_FDS)]);
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: `msg` describes live, writable buffers of the lengths it states.
    let len = syscall!(recvmsg(
        socket.as_raw_fd(),
        &mut msg,
        libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC
    ))? as usize;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // within it, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 new fds
    // that this process now owns.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::seqpacket_pair;

    fn is_cloexec(fd: &OwnedFd) -> bool {
        let flags =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let line = flags.lines().find(|l| l.starts_with("flags:")).unwrap();
        let octal = u32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).unwrap();
        octal & libc::O_CLOEXEC as u32 != 0
    }

    #[test]
    fn fds_and_bytes_travel_together_and_arrive_cloexec() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        let sent = send_with_fds(&a, b"hello", &[x.as_raw_fd(), y.as_raw_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.truncated && !got.fds_truncated);
        assert!(got.fds.iter().all(is_cloexec));
    }

    #[test]
    fn a_full_batch_of_253_fds_arrives_whole() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        let fds = vec![x.as_raw_fd(); MAX_FDS];
        send_with_fds(&a, b"batch", &fds).unwrap();
        let mut buf = [0u8; 64];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(got.fds.len(), MAX_FDS);
    }

    #[test]
    fn more_than_253_fds_is_refused_before_the_syscall() {
        let (a, _b) = seqpacket_pair().unwrap();
        let fds = vec![a.as_raw_fd(); MAX_FDS + 1];
        let err = send_with_fds(&a, b"x", &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn an_oversized_datagram_is_flagged_truncated() {
        let (a, b) = seqpacket_pair().unwrap();
        send_with_fds(&a, &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert!(got.truncated);
    }

    #[test]
    fn a_closed_peer_reads_as_zero_length() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(a);
        let mut buf = [0u8; 10];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(got.len, 0);
        assert!(got.fds.is_empty());
    }
}
