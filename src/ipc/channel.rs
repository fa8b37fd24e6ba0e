//! One end of a master–worker channel, registered with tokio. Receiving checks what the
//! peer controls: truncation, the frame itself, and that the fds which arrived are exactly
//! the fds the frame declares (or, for CONNECTIONS to a receiver whose fd table is full,
//! the first of them).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;

use super::frame::{self, Frame, FrameError, MAX_FRAME_LEN};
use super::message::MessageFault;
use super::node::{NodeError, NodeState};
use crate::sys::scm;

/// Why a frame could not be received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed its end (or died).
    #[error("the peer closed the channel")]
    Closed,
    /// `recvmsg` or `sendmsg` failed.
    #[error("channel I/O failed")]
    Io(#[from] io::Error),
    /// The datagram was not a valid frame.
    #[error("malformed frame")]
    Frame(#[from] FrameError),
    /// The kernel dropped fds for lack of control-message room (`MSG_CTRUNC`).
    #[error("fds were truncated in transit (MSG_CTRUNC)")]
    FdsTruncated,
    /// A valid frame that never travels in this direction (e.g. `ready` sent to a worker).
    #[error("unexpected {0} frame in this direction")]
    Unexpected(&'static str),
    /// A node process broke node's IPC protocol (see [`super::node`]).
    #[error("node IPC: {0}")]
    Node(#[from] NodeError),
    /// The frame declares a different number of fds than arrived.
    #[error("frame declares {declared} fds, {arrived} arrived")]
    FdCount {
        /// What the frame says.
        declared: usize,
        /// What `recvmsg` delivered.
        arrived: usize,
    },
}

impl ChannelError {
    /// Whether this is the ordinary end of the channel rather than a fault.
    pub fn is_closed(&self) -> bool {
        match self {
            ChannelError::Closed => true,
            ChannelError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// One end of the channel: handoff's frames on a `SOCK_SEQPACKET` socket, or (the master's
/// end, `--node`) node's IPC on a `SOCK_STREAM` socket, translated to and from the same
/// frames.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    node: Option<Mutex<NodeState>>,
}

impl Channel {
    /// Registers a non-blocking `SOCK_SEQPACKET` socket with the current tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Channel {
            fd: crate::sys::async_fd(fd)?,
            node: None,
        })
    }

    /// Registers the master's end of a node process's IPC channel (a non-blocking
    /// `SOCK_STREAM` socket).
    pub fn node(fd: OwnedFd) -> io::Result<Self> {
        Ok(Channel {
            fd: crate::sys::async_fd(fd)?,
            node: Some(Mutex::new(NodeState::default())),
        })
    }

    fn node_state(&self) -> Option<std::sync::MutexGuard<'_, NodeState>> {
        let node = self.node.as_ref()?;
        Some(node.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many connections the next CONNECTIONS frame may carry now: a batch, or for node
    /// one at a time, none while the last one's acknowledgement has not come.
    pub fn room(&self) -> usize {
        match self.node_state() {
            None => scm::MAX_FDS,
            Some(node) if node.in_flight || !node.unsent.is_empty() => 0,
            Some(_) => 1,
        }
    }

    /// Sends one frame and its fds now, or fails with `WouldBlock`.
    pub fn try_send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        match self.node_state() {
            None => scm::send_with_fds(self.fd.get_ref(), bytes, fds).map(drop),
            Some(mut node) => self.try_send_node(&mut node, bytes, fds),
        }
    }

    /// Node's side of [`Channel::try_send`]: a connection becomes a NODE_HANDLE line with
    /// its fd; frames node has no word for (messages) are not sent.
    fn try_send_node(
        &self,
        node: &mut NodeState,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if !node.unsent.is_empty() {
            let sent = scm::send_with_fds(self.fd.get_ref(), &node.unsent, &[])?;
            node.unsent.drain(..sent);
            if !node.unsent.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let Ok(Frame::Connections(entries)) = frame::decode(bytes) else {
            if !fds.is_empty() {
                // A frame with an fd node has no word for (HANDBACK): an error, so the
                // caller keeps the connection instead of counting it sent.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "node takes connections only in CONNECTIONS frames",
                ));
            }
            return Ok(());
        };
        let ([entry], [_]) = (&entries[..], fds) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "node takes one connection at a time",
            ));
        };
        let line = NodeState::handle_line(entry);
        let sent = scm::send_with_fds(self.fd.get_ref(), &line, fds)?;
        // The fd went with the first byte; the rest of the line follows when there is room.
        node.unsent.extend_from_slice(&line[sent..]);
        node.in_flight = true;
        Ok(())
    }

    /// Sends one frame and its fds, waiting while the peer's queue is full.
    pub async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| scm::send_with_fds(fd.get_ref(), bytes, fds)) {
                Ok(result) => return result.map(drop),
                Err(_would_block) => continue,
            }
        }
    }

    /// Waits until the channel can take another frame.
    pub async fn writable(&self) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
        self.fd.writable().await
    }

    /// Receives one frame with its fds, waiting for it.
    pub async fn recv_frame(&self, buf: &mut [u8]) -> Result<(Frame, Vec<OwnedFd>), ChannelError> {
        loop {
            if let Some(frame) = self.node_state().and_then(|mut n| n.next_frame()) {
                return Ok((frame, Vec::new()));
            }
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| scm::recv_with_fds(fd.get_ref(), buf)) {
                Ok(received) => match self.node_state() {
                    None => return check(received?, buf),
                    Some(mut node) => feed(&mut node, received?, buf)?,
                },
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one frame with its fds if one is queued; `Ok(None)` if none is.
    pub fn try_recv_frame(
        &self,
        buf: &mut [u8],
    ) -> Result<Option<(Frame, Vec<OwnedFd>)>, ChannelError> {
        loop {
            if let Some(frame) = self.node_state().and_then(|mut n| n.next_frame()) {
                return Ok(Some((frame, Vec::new())));
            }
            match scm::recv_with_fds(self.fd.get_ref(), buf) {
                Ok(received) => match self.node_state() {
                    None => return check(received, buf).map(Some),
                    Some(mut node) => feed(&mut node, received, buf)?,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Shuts down this end's sending side: the peer reads the end of the channel after the
    /// frames already queued.
    pub fn close_sending(&self) -> io::Result<()> {
        crate::sys::socket::shutdown_write(self.fd.get_ref())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Takes what a node process sent into its translation state.
fn feed(node: &mut NodeState, received: scm::Received, buf: &[u8]) -> Result<(), ChannelError> {
    if received.len == 0 && received.fds.is_empty() {
        return Err(ChannelError::Closed);
    }
    if !received.fds.is_empty() {
        // Closed as they drop: the master takes no fd from node.
        return Err(NodeError::UnexpectedFds(received.fds.len()).into());
    }
    Ok(node.feed(&buf[..received.len])?)
}

/// A buffer big enough for any frame plus one byte, so an oversized one shows as truncated.
pub fn frame_buffer() -> Vec<u8> {
    vec![0u8; MAX_FRAME_LEN + 1]
}

fn check(received: scm::Received, buf: &[u8]) -> Result<(Frame, Vec<OwnedFd>), ChannelError> {
    if received.len == 0 && received.fds.is_empty() {
        return Err(ChannelError::Closed);
    }
    if received.truncated || received.len > MAX_FRAME_LEN {
        if received.len > 1 && buf[1] == frame::KIND_MESSAGE && received.fds.is_empty() {
            // One message too long: that message is dropped, the channel stays.
            return Ok((Frame::Message(Err(MessageFault::TooLong)), Vec::new()));
        }
        if received.len > 1 && buf[1] == frame::KIND_STATE && received.fds.is_empty() {
            // Likewise one state write too long.
            let fault = crate::ipc::state::StateFault::TooLong;
            return Ok((Frame::State(Err(fault)), Vec::new()));
        }
        return Err(FrameError::TooLong.into());
    }
    let frame = frame::decode(&buf[..received.len])?;
    let declared = match &frame {
        Frame::Connections(entries) | Frame::Listeners(entries) => entries.len(),
        Frame::Counters | Frame::Metrics | Frame::Loads { .. } | Frame::HandBack { .. } => 1,
        _ => 0,
    };
    let arrived = received.fds.len();
    if received.fds_truncated {
        // The receiver's fd table is full: the kernel installed the first fds and dropped
        // the rest. Only CONNECTIONS may arrive so, and its receiver refuses what is
        // missing (REFUSED; a HANDBACK's one connection likewise); anything else is broken.
        return match frame {
            Frame::Connections(_) | Frame::HandBack { .. } if arrived < declared => {
                Ok((frame, received.fds))
            }
            _ => Err(ChannelError::FdsTruncated),
        };
    }
    if declared != arrived {
        return Err(ChannelError::FdCount { declared, arrived });
    }
    Ok((frame, received.fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::frame::{encode_connections, encode_status, ConnectionHeader, Status};
    use crate::sys::socket::{seqpacket_pair, Peer};

    fn pair() -> (Channel, Channel) {
        let (a, b) = seqpacket_pair().unwrap();
        (Channel::new(a).unwrap(), Channel::new(b).unwrap())
    }

    #[tokio::test]
    async fn a_frame_with_fewer_fds_than_declared_is_refused() {
        let (a, b) = pair();
        let mut bytes = Vec::new();
        let header = ConnectionHeader {
            id: 1,
            listener: 0,
            peer: Peer::Unix,
        };
        encode_connections(&mut bytes, [header, header].into_iter());
        a.send(&bytes, &[a.as_fd()]).await.unwrap();
        let mut buf = frame_buffer();
        let err = b.recv_frame(&mut buf).await.unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::FdCount {
                    declared: 2,
                    arrived: 1
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn fds_on_a_status_frame_are_refused_and_closed() {
        let (a, b) = pair();
        let mut bytes = Vec::new();
        encode_status(&mut bytes, Status::default());
        a.send(&bytes, &[a.as_fd()]).await.unwrap();
        let mut buf = frame_buffer();
        let err = b.recv_frame(&mut buf).await.unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::FdCount {
                    declared: 0,
                    arrived: 1
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_datagram_is_refused() {
        let (a, b) = pair();
        a.send(&vec![1u8; MAX_FRAME_LEN + 100], &[]).await.unwrap();
        let mut buf = frame_buffer();
        let err = b.recv_frame(&mut buf).await.unwrap_err();
        assert!(
            matches!(err, ChannelError::Frame(FrameError::TooLong)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn node_refuses_a_frame_whose_fd_it_cannot_take_and_ignores_messages() {
        let (master, _node) = crate::sys::socket::stream_pair().unwrap();
        let channel = Channel::node(master).unwrap();
        let mut bytes = Vec::new();
        let header = ConnectionHeader {
            id: 1,
            listener: 0,
            peer: Peer::Unix,
        };
        frame::encode_hand_back(&mut bytes, header, b"GET /");
        let err = channel.try_send(&bytes, &[channel.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(channel.room(), 1, "nothing in flight");
        bytes.clear();
        encode_status(&mut bytes, Status::default());
        channel.try_send(&bytes, &[]).unwrap();
        assert_eq!(channel.room(), 1);
    }

    #[tokio::test]
    async fn the_end_of_the_channel_reads_as_closed() {
        let (a, b) = pair();
        a.close_sending().unwrap();
        let mut buf = frame_buffer();
        assert!(b.recv_frame(&mut buf).await.unwrap_err().is_closed());
        drop(a);
        assert!(b.try_recv_frame(&mut buf).unwrap_err().is_closed());
    }
}
