//! Node's own IPC, spoken by the master to unmodified node apps (`handoff run --node`).
//!
//! Node starts an IPC channel on the fd named by `NODE_CHANNEL_FD`: a `SOCK_STREAM` Unix
//! socket carrying one JSON object per line (`NODE_CHANNEL_SERIALIZATION_MODE=json`). A
//! handle travels as a `{"cmd":"NODE_HANDLE","type":"net.Socket","msg":...}` line with the
//! fd attached (`SCM_RIGHTS`); node answers `{"cmd":"NODE_HANDLE_ACK"}` and emits
//! `process.on('message', (msg, socket))` with the fd as a `net.Socket` (or answers
//! `NODE_HANDLE_NACK` when the fd did not arrive). Node itself never sends a second handle
//! before the first is acknowledged, and neither does the master: one connection in flight
//! per process.
//!
//! The preload script (`src/ipc/node/preload.js`, injected with `NODE_OPTIONS=--require`)
//! turns the app's `server.listen()` into taking those sockets, and reports with
//! `process.send()`: `{"handoff":"ready"}`, `{"handoff":"status","closed":N}` (finished
//! connections, also the heartbeat) and `{"handoff":"draining"}`. This module translates
//! both ways, so the rest of the master sees the frames of `docs/protocol.md`.

use std::collections::VecDeque;

use serde::Deserialize;

use super::frame::{ConnectionHeader, Frame, Status};

/// The preload script every node worker gets.
pub const PRELOAD: &str = include_str!("node/preload.js");

/// The longest line a node process may send; past it the channel is broken (a protocol
/// error), so a process that never ends a line cannot make the master buffer without end.
pub const MAX_LINE: usize = 64 * 1024;

/// Why what a node process sent is not the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// A line longer than [`MAX_LINE`].
    #[error("a line of more than {MAX_LINE} bytes on node's IPC channel")]
    LineTooLong,
    /// An acknowledgement for no handle in flight.
    #[error("NODE_HANDLE_ACK with no handle in flight")]
    UnexpectedAck,
    /// The process sent fds: nothing node sends to the master carries one.
    #[error("node sent {0} fds on its IPC channel")]
    UnexpectedFds(usize),
}

/// The translation state of one node process's channel.
#[derive(Debug, Default)]
pub struct NodeState {
    /// Bytes of an unfinished line.
    line: Vec<u8>,
    /// Frames translated and not yet taken.
    frames: VecDeque<Frame>,
    /// A handle was sent and its ACK (or NACK) has not come.
    pub in_flight: bool,
    /// Bytes of a line that did not fit the socket at once (its fd went with its first
    /// byte); sent before anything else.
    pub unsent: Vec<u8>,
    acknowledged: u64,
    closed: u64,
    /// Lines that were valid JSON but no handoff word (the app's own `process.send()`).
    pub ignored: u64,
}

/// A line node sends.
#[derive(Debug, Deserialize)]
struct Line {
    cmd: Option<String>,
    handoff: Option<String>,
    closed: Option<u64>,
}

impl NodeState {
    /// The line that hands `connection` to node (its fd goes with it).
    pub fn handle_line(connection: &ConnectionHeader) -> Vec<u8> {
        let mut line = format!(
            r#"{{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{{"handoff":"connection","id":{},"listener":{}}}}}"#,
            connection.id, connection.listener
        )
        .into_bytes();
        line.push(b'\n');
        line
    }

    /// Takes bytes node sent; complete lines become frames for [`NodeState::next_frame`].
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), NodeError> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if self.line.len() + end > MAX_LINE {
                return Err(NodeError::LineTooLong);
            }
            self.line.extend_from_slice(&bytes[..end]);
            bytes = &bytes[end + 1..];
            let line = std::mem::take(&mut self.line);
            self.translate(&line)?;
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            return Err(NodeError::LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// The next translated frame, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    fn status(&self) -> Status {
        Status {
            received_total: self.acknowledged,
            closed_total: self.closed,
        }
    }

    fn translate(&mut self, line: &[u8]) -> Result<(), NodeError> {
        let Ok(line) = serde_json::from_slice::<Line>(line) else {
            // Not an object of ours (another serialization, a stray line): the app's.
            self.ignored += 1;
            return Ok(());
        };
        let frame = match (line.cmd.as_deref(), line.handoff.as_deref()) {
            (Some("NODE_HANDLE_ACK"), _) => {
                if !std::mem::replace(&mut self.in_flight, false) {
                    return Err(NodeError::UnexpectedAck);
                }
                self.acknowledged += 1;
                Frame::Status(self.status())
            }
            (Some("NODE_HANDLE_NACK"), _) => {
                if !std::mem::replace(&mut self.in_flight, false) {
                    return Err(NodeError::UnexpectedAck);
                }
                // The fd did not arrive (node's fd table is full): another worker gets it.
                Frame::Refused {
                    status: self.status(),
                    count: 1,
                }
            }
            (_, Some("ready")) => Frame::Ready,
            (_, Some("status")) => {
                // Finished connections only grow; a smaller figure is stale, not news.
                self.closed = self.closed.max(line.closed.unwrap_or(0));
                Frame::Status(self.status())
            }
            (_, Some("draining")) => Frame::Draining(self.status()),
            _ => {
                self.ignored += 1;
                return Ok(());
            }
        };
        self.frames.push_back(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::Peer;

    fn frames(state: &mut NodeState) -> Vec<Frame> {
        std::iter::from_fn(|| state.next_frame()).collect()
    }

    #[test]
    fn node_s_lines_become_frames_whatever_their_split() {
        let mut state = NodeState::default();
        let text = concat!(
            "{\"handoff\":\"ready\"}\n",
            "{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            "{\"handoff\":\"status\",\"closed\":1}\n",
            "{\"handoff\":\"draining\"}\n"
        );
        for split in 0..text.len() {
            let mut state = NodeState {
                in_flight: true,
                ..NodeState::default()
            };
            state.feed(&text.as_bytes()[..split]).unwrap();
            state.feed(&text.as_bytes()[split..]).unwrap();
            let status = Status {
                received_total: 1,
                closed_total: 1,
            };
            assert_eq!(
                frames(&mut state),
                vec![
                    Frame::Ready,
                    Frame::Status(Status {
                        received_total: 1,
                        closed_total: 0
                    }),
                    Frame::Status(status),
                    Frame::Draining(status),
                ],
                "split at {split}"
            );
        }
        state
            .feed(b"{\"handoff\":\"status\",\"closed\":5}\n")
            .unwrap();
        state
            .feed(b"{\"handoff\":\"status\",\"closed\":3}\n")
            .unwrap();
        let closed: Vec<u64> = frames(&mut state)
            .into_iter()
            .map(|f| match f {
                Frame::Status(s) => s.closed_total,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(closed, [5, 5], "finished connections never go down");
    }

    #[test]
    fn the_app_s_own_messages_are_ignored_and_counted() {
        let mut state = NodeState::default();
        state
            .feed(b"{\"hello\":1}\n[1,2]\nnot json\n\"text\"\n{\"cmd\":\"NODE_CLUSTER\"}\n")
            .unwrap();
        assert!(frames(&mut state).is_empty());
        assert_eq!(state.ignored, 5);
    }

    #[test]
    fn a_nack_refuses_the_connection_in_flight() {
        let mut state = NodeState {
            in_flight: true,
            ..NodeState::default()
        };
        state.feed(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").unwrap();
        assert!(matches!(
            frames(&mut state)[..],
            [Frame::Refused { count: 1, .. }]
        ));
        assert!(!state.in_flight);
    }

    #[test]
    fn an_ack_for_nothing_and_an_endless_line_are_protocol_errors() {
        let mut state = NodeState::default();
        assert_eq!(
            state.feed(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"),
            Err(NodeError::UnexpectedAck)
        );
        let mut state = NodeState::default();
        let long = vec![b'x'; MAX_LINE / 2];
        state.feed(&long).unwrap();
        assert_eq!(state.feed(&long), Ok(()));
        assert_eq!(state.feed(b"xx"), Err(NodeError::LineTooLong));
        let mut state = NodeState::default();
        let mut line = vec![b' '; MAX_LINE + 1];
        line.push(b'\n');
        assert_eq!(state.feed(&line), Err(NodeError::LineTooLong));
    }

    #[test]
    fn a_handle_line_is_one_json_line_node_understands() {
        let header = ConnectionHeader {
            id: 42,
            listener: 1,
            peer: Peer::Unix,
        };
        let line = NodeState::handle_line(&header);
        assert_eq!(line.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["cmd"], "NODE_HANDLE");
        assert_eq!(value["type"], "net.Socket");
        assert_eq!(value["msg"]["id"], 42);
        assert_eq!(value["msg"]["listener"], 1);
    }
}
