//! `sendmsg(2)` / `recvmsg(2)` with `SCM_RIGHTS`: one datagram of bytes plus up to
//! [`MAX_FDS`] file descriptors, on a `SOCK_SEQPACKET` Unix socket. rustix builds and walks
//! the control messages, so this file has no `unsafe`: the fds go out borrowed and come back
//! owned.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most fds one message can carry (`SCM_MAX_FD` in the kernel).
pub const MAX_FDS: usize = 253;

/// Bytes of control-message room for [`MAX_FDS`] fds, with the slack rustix needs to align
/// the buffer for `cmsghdr`.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// `sendmsg(fd, bytes + SCM_RIGHTS(fds), MSG_DONTWAIT | MSG_NOSIGNAL)`. Sends the whole
/// datagram or nothing (`SOCK_SEQPACKET`); `WouldBlock` when the peer's queue is full. More
/// than [`MAX_FDS`] fds is `InvalidInput`, before any syscall.
pub fn send_with_fds(
    socket: &impl AsFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 fds in one message",
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    // No control message at all when there are no fds, as before: an empty SCM_RIGHTS
    // header would be sent for nothing.
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        // Cannot happen: the buffer is sized for MAX_FDS, checked above.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the fds do not fit the control buffer",
        ));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    Ok(sent)
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

/// `recvmsg(fd, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)`: one datagram and its fds. rustix hands
/// each fd that arrived over as an `OwnedFd`, and closes any left in the control buffer when
/// it is dropped, so none leaks on any path.
pub fn recv_with_fds(socket: &impl AsFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(arrived) = message {
            fds.extend(arrived);
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::seqpacket_pair;
    use std::os::fd::AsRawFd;

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
        let sent = send_with_fds(&a, b"hello", &[x.as_fd(), y.as_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.truncated && !got.fds_truncated);
        assert!(got.fds.iter().all(is_cloexec));
    }

    #[test]
    fn a_received_fd_is_the_socket_that_was_sent() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send_with_fds(&a, b"x", &[x.as_fd()]).unwrap();
        drop(x);
        let mut buf = [0u8; 8];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        let [x] = <[OwnedFd; 1]>::try_from(got.fds).unwrap();
        send_with_fds(&x, b"through", &[]).unwrap();
        let mut buf = [0u8; 16];
        let got = recv_with_fds(&y, &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"through");
    }

    #[test]
    fn a_full_batch_of_253_fds_arrives_whole() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        let fds = vec![x.as_fd(); MAX_FDS];
        send_with_fds(&a, b"batch", &fds).unwrap();
        let mut buf = [0u8; 64];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(got.fds.len(), MAX_FDS);
        assert!(!got.fds_truncated);
    }

    #[test]
    fn more_than_253_fds_is_refused_before_the_syscall() {
        let (a, b) = seqpacket_pair().unwrap();
        let fds = vec![a.as_fd(); MAX_FDS + 1];
        let err = send_with_fds(&a, b"x", &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut buf = [0u8; 8];
        let nothing = recv_with_fds(&b, &mut buf).unwrap_err();
        assert_eq!(
            nothing.kind(),
            io::ErrorKind::WouldBlock,
            "nothing was sent"
        );
    }

    #[test]
    fn an_oversized_datagram_is_flagged_truncated() {
        let (a, b) = seqpacket_pair().unwrap();
        send_with_fds(&a, &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert!(got.truncated);
        assert!(!got.fds_truncated);
        assert_eq!(got.len, 10);
    }

    #[test]
    fn a_truncated_datagram_still_delivers_its_fds_owned() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        send_with_fds(&a, &[7u8; 100], &[x.as_fd(), x.as_fd()]).unwrap();
        let mut buf = [0u8; 10];
        let got = recv_with_fds(&b, &mut buf).unwrap();
        assert!(got.truncated && !got.fds_truncated);
        assert_eq!(got.fds.len(), 2);
        assert!(got.fds.iter().all(is_cloexec));
    }

    #[test]
    fn sending_to_a_closed_peer_is_a_broken_pipe_not_a_signal() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(b);
        let err = send_with_fds(&a, b"x", &[a.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn an_empty_queue_would_block() {
        let (_a, b) = seqpacket_pair().unwrap();
        let mut buf = [0u8; 10];
        let err = recv_with_fds(&b, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
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

    /// Tells the test binary, run again as a child, to be the receiving half of
    /// [`fds_beyond_a_full_fd_table_are_flagged_ctrunc`].
    const CTRUNC_CHILD: &str = "HANDOFF_TEST_CTRUNC_CHILD";

    /// A receiver whose fd table is full gets the first fds and `MSG_CTRUNC`, and the rest
    /// are closed by the kernel. The receiving half runs in a child (this test binary again,
    /// with the channel at fd 3) that lowers its own `RLIMIT_NOFILE`, so the other tests keep
    /// theirs.
    #[tokio::test]
    async fn fds_beyond_a_full_fd_table_are_flagged_ctrunc() {
        let (master, worker) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        send_with_fds(&master, b"fds", &[x.as_fd(); 10]).unwrap();
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "sys::scm::tests::ctrunc_receiver"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(CTRUNC_CHILD, "1");
        crate::sys::process::prepare_worker(&mut cmd, &worker, libc::SIGKILL);
        let out = cmd.output().await.unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}{why}");
        assert!(
            said.contains("1 passed"),
            "the child ran the receiver: {said}"
        );
    }

    #[test]
    #[ignore = "the receiving half of fds_beyond_a_full_fd_table_are_flagged_ctrunc"]
    fn ctrunc_receiver() {
        use rustix::process::{Resource, Rlimit};
        if std::env::var_os(CTRUNC_CHILD).is_none() {
            return;
        }
        let channel =
            crate::sys::process::inherited_channel(crate::sys::process::CHANNEL_FD).unwrap();
        let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .map(|entry| {
                entry
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        // The listing's own fd is closed by now.
        let open: Vec<i32> = listed
            .into_iter()
            .filter(|fd| std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok())
            .collect();
        let limit = *open.iter().max().unwrap() as usize + 3;
        let free = limit - open.len();
        assert!(
            free < 10,
            "{free} free fds below {limit}: the test would prove nothing"
        );
        let hard = rustix::process::getrlimit(Resource::Nofile).maximum;
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(limit as u64),
                maximum: hard,
            },
        )
        .unwrap();
        let mut buf = [0u8; 16];
        let got = recv_with_fds(&channel, &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"fds");
        assert!(got.fds_truncated, "MSG_CTRUNC");
        assert!(!got.truncated);
        assert_eq!(got.fds.len(), free);
        // No fd is left to read /proc with, as is_cloexec does.
        let cloexec = |fd: &OwnedFd| {
            rustix::io::fcntl_getfd(fd)
                .unwrap()
                .contains(rustix::io::FdFlags::CLOEXEC)
        };
        assert!(got.fds.iter().all(cloexec));
    }
}
