//! The envelope of a MESSAGE frame (see `docs/protocol.md`): where a message goes, how its
//! payload is encoded, who sent it and which request it answers. The payload itself is the
//! sender's: postcard for the Rust runtime, JSON for workers in other languages. The master
//! routes by the envelope and never needs to read a payload it only relays.
//!
//! Parsing never fails the channel: a message a peer got wrong is dropped, counted and
//! logged by its receiver, and the peer keeps serving ([`MessageFault`]).

/// Bytes of the envelope, after the frame header.
pub const ENVELOPE_LEN: usize = 16;
/// The largest payload a message may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// `from` in messages the master itself sends.
pub const FROM_MASTER: u32 = u32::MAX;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// worker → master.
    ToMaster = 1,
    /// master → one worker.
    ToWorker = 2,
    /// master → every worker.
    Broadcast = 3,
    /// worker → every other worker, through the master (which stamps `from`).
    Relay = 4,
    /// worker → master, answered by a [`Route::Reply`] with the same `id`.
    Request = 5,
    /// master → the worker that sent request `id`.
    Reply = 6,
}

impl Route {
    fn from_u8(byte: u8) -> Option<Route> {
        Some(match byte {
            1 => Route::ToMaster,
            2 => Route::ToWorker,
            3 => Route::Broadcast,
            4 => Route::Relay,
            5 => Route::Request,
            6 => Route::Reply,
            _ => return None,
        })
    }

    /// Whether the route goes toward the master: the only routes a worker may send on.
    pub fn upstream(self) -> bool {
        matches!(self, Route::ToMaster | Route::Relay | Route::Request)
    }
}

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// postcard: what the Rust runtime sends and expects.
    Postcard = 1,
    /// UTF-8 JSON: for workers in other languages.
    Json = 2,
}

/// A parsed MESSAGE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it goes.
    pub route: Route,
    /// How the payload is encoded.
    pub encoding: Encoding,
    /// In a reply: the request failed, and the payload is the reason as UTF-8 text.
    pub failed: bool,
    /// The sending worker's slot, or [`FROM_MASTER`]; stamped by the master on what it
    /// relays (a worker's own value is ignored).
    pub from: u32,
    /// The request a [`Route::Request`] opens and its [`Route::Reply`] answers; 0 otherwise.
    pub id: u64,
    /// The sender's bytes.
    pub payload: Vec<u8>,
}

/// Why a MESSAGE body was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageFault {
    /// Fewer bytes than the envelope.
    #[error("message of {0} bytes is shorter than its 16-byte envelope")]
    TooShort(usize),
    /// More than [`MAX_PAYLOAD`] bytes (or more than the receive buffer held).
    #[error("message longer than the {MAX_PAYLOAD}-byte payload limit")]
    TooLong,
    /// A route this build does not know.
    #[error("unknown message route {0}")]
    Route(u8),
    /// An encoding this build does not know.
    #[error("unknown message encoding {0}")]
    Encoding(u8),
    /// A route that does not travel in this direction.
    #[error("a {0:?} message cannot come from this peer")]
    Direction(Route),
}

impl Message {
    /// Writes this message's body (envelope and payload) after `out`'s current contents.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.route as u8);
        out.push(self.encoding as u8);
        out.push(u8::from(self.failed));
        out.push(0);
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// Parses a MESSAGE body.
    pub fn parse(body: &[u8]) -> Result<Message, MessageFault> {
        if body.len() < ENVELOPE_LEN {
            return Err(MessageFault::TooShort(body.len()));
        }
        let payload = &body[ENVELOPE_LEN..];
        if payload.len() > MAX_PAYLOAD {
            return Err(MessageFault::TooLong);
        }
        let route = Route::from_u8(body[0]).ok_or(MessageFault::Route(body[0]))?;
        let encoding = match body[1] {
            1 => Encoding::Postcard,
            2 => Encoding::Json,
            other => return Err(MessageFault::Encoding(other)),
        };
        Ok(Message {
            route,
            encoding,
            failed: body[2] != 0,
            from: u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")),
            id: u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
            payload: payload.to_vec(),
        })
    }
}

/// Why a message could not be sent or received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The encoded payload is larger than the limit.
    #[error("a message payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// The value could not be encoded.
    #[error("encoding the message failed: {0}")]
    Encode(String),
    /// The payload is not a value of the expected type.
    #[error("decoding the message failed: {0}")]
    Decode(String),
    /// No reply came in time.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The request failed on the master's side; the reason it gave.
    #[error("the master answered with an error: {0}")]
    Failed(String),
    /// The channel to the master is gone (the worker is draining or the master died).
    #[error("the channel to the master is closed")]
    Closed,
    /// The receiver's queue is full: the message was dropped (and counted).
    #[error("the receiver's message queue is full")]
    Full,
    /// No worker runs in that slot.
    #[error("no worker in slot {0}")]
    NoWorker(usize),
}

/// Encodes a value as the Rust runtime's payload (postcard).
pub fn to_payload<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, MessageError> {
    let bytes = postcard::to_allocvec(value).map_err(|e| MessageError::Encode(e.to_string()))?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a postcard payload; a JSON one (from a worker in another language) is refused
/// with a clear reason.
pub fn from_payload<T: serde::de::DeserializeOwned>(message: &Message) -> Result<T, MessageError> {
    match message.encoding {
        Encoding::Postcard => {
            postcard::from_bytes(&message.payload).map_err(|e| MessageError::Decode(e.to_string()))
        }
        Encoding::Json => Err(MessageError::Decode(
            "a JSON payload where the Rust runtime expects postcard".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(route: Route) -> Message {
        Message {
            route,
            encoding: Encoding::Json,
            failed: false,
            from: 3,
            id: 42,
            payload: br#"{"n":1}"#.to_vec(),
        }
    }

    #[test]
    fn a_message_round_trips() {
        for route in [
            Route::ToMaster,
            Route::ToWorker,
            Route::Broadcast,
            Route::Relay,
            Route::Request,
            Route::Reply,
        ] {
            let mut body = Vec::new();
            message(route).encode_body(&mut body);
            assert_eq!(Message::parse(&body), Ok(message(route)));
        }
    }

    #[test]
    fn what_a_peer_got_wrong_is_a_fault_not_a_panic() {
        assert_eq!(Message::parse(&[1; 5]), Err(MessageFault::TooShort(5)));
        let mut body = Vec::new();
        message(Route::ToMaster).encode_body(&mut body);
        body[0] = 9;
        assert_eq!(Message::parse(&body), Err(MessageFault::Route(9)));
        body[0] = 1;
        body[1] = 7;
        assert_eq!(Message::parse(&body), Err(MessageFault::Encoding(7)));
        let mut big = vec![1, 1, 0, 0];
        big.resize(ENVELOPE_LEN + MAX_PAYLOAD + 1, 0);
        assert_eq!(Message::parse(&big), Err(MessageFault::TooLong));
    }

    #[test]
    fn payloads_round_trip_and_the_wrong_type_is_an_error() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        enum Msg {
            Count(u64),
            Name(String),
        }
        let mut m = message(Route::ToMaster);
        m.encoding = Encoding::Postcard;
        m.payload = to_payload(&Msg::Count(7)).unwrap();
        assert_eq!(from_payload::<Msg>(&m), Ok(Msg::Count(7)));
        m.payload = vec![9, 9, 9];
        assert!(matches!(
            from_payload::<Msg>(&m),
            Err(MessageError::Decode(_))
        ));
        m.encoding = Encoding::Json;
        assert!(matches!(
            from_payload::<Msg>(&m),
            Err(MessageError::Decode(_))
        ));
        let big = Msg::Name("x".repeat(MAX_PAYLOAD + 1));
        assert!(matches!(to_payload(&big), Err(MessageError::TooLarge(_))));
    }

    #[test]
    fn workers_may_only_send_toward_the_master() {
        assert!(Route::ToMaster.upstream());
        assert!(Route::Relay.upstream());
        assert!(Route::Request.upstream());
        assert!(!Route::Reply.upstream());
        assert!(!Route::Broadcast.upstream());
        assert!(!Route::ToWorker.upstream());
    }
}
