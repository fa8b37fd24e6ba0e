//! The master–worker channel: a `SOCK_SEQPACKET` socketpair per worker, carrying typed
//! frames ([`frame`]) and, with [`Frame::Connections`], the connections' fds. Used by the
//! master (which sends connections and reads acknowledgements and load reports) and by the
//! worker runtime (the other way round).

pub mod channel;
pub mod frame;
pub mod message;
pub mod node;
pub mod state;

pub use channel::{Channel, ChannelError};
pub use frame::ConnectionHeader;
