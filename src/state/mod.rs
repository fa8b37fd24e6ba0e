//! Shared state: a map of string keys to bytes that every worker of a cluster reads and
//! writes, with the same API on two backends.
//!
//! - **Through the master** (the default): the master holds the authoritative copy and
//!   applies writes one at a time, in one order; every worker holds a local replica that the
//!   master updates by broadcast. Reads are local and never wait; a write returns once the
//!   master applied it, and the writing worker then reads its own write. A new or respawned
//!   worker gets a snapshot before it says ready.
//! - **Redis** (`--state redis://HOST:PORT`, for several hosts): the same operations on a
//!   Redis server, with a local replica kept current by pub/sub.
//!
//! Counters ([`SharedMap::increment`]) are stored as ASCII decimal, as Redis stores them, so
//! a counter's [`SharedMap::get`] reads `b"42"` on both backends.

// The backends land next; until then parts of the API have no caller.
#![allow(dead_code)]

#[cfg(feature = "redis")]
pub(crate) mod redis;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The bounds of a map: every write that would pass one fails with [`StateError::TooLarge`]
/// or [`StateError::Full`] and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Bytes of one key (default 1 KiB).
    pub max_key: usize,
    /// Bytes of one value (default 60 KiB: a write fits one message frame).
    pub max_value: usize,
    /// Bytes of every key and value together (default 64 MiB).
    pub max_total: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_key: 1024,
            max_value: 60 * 1024,
            max_total: 64 << 20,
        }
    }
}

/// Why a write failed. A failed write changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A key or a value is larger than its limit.
    #[error("{what} of {len} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// "key" or "value".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit it passed.
        limit: usize,
    },
    /// The write would take the whole map past [`StateLimits::max_total`].
    #[error("the shared map is full ({limit} bytes)")]
    Full {
        /// The limit.
        limit: usize,
    },
    /// [`SharedMap::increment`] on a value that is not an ASCII decimal i64, or an overflow.
    #[error("the value of {0:?} is not an integer, or the increment overflows")]
    NotAnInteger(String),
    /// The backend cannot take writes now (the master is gone, Redis is down); nothing was
    /// written.
    #[error("shared state unavailable: {0}")]
    Unavailable(String),
    /// No answer within the backend's timeout: the write may or may not have been applied.
    #[error("no answer from the shared state within {0:?}")]
    Timeout(Duration),
    /// A typed value failed to encode or decode (postcard).
    #[error("shared state value: {0}")]
    Encoding(String),
}

/// One write, as a backend applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    /// Store `value` under `key`, expiring after `ttl` if given.
    Set {
        key: String,
        value: Bytes,
        ttl: Option<Duration>,
    },
    /// Remove `key`.
    Delete { key: String },
    /// Add `by` to the counter at `key` (absent counts as 0); `ttl` is set when the key is
    /// created.
    Increment {
        key: String,
        by: i64,
        ttl: Option<Duration>,
    },
    /// If `key` holds `expected` (`None`: is absent), store `new` (`None`: remove it).
    CompareAndSet {
        key: String,
        expected: Option<Bytes>,
        new: Option<Bytes>,
        ttl: Option<Duration>,
    },
}

impl Write {
    /// The key it writes.
    pub fn key(&self) -> &str {
        match self {
            Write::Set { key, .. }
            | Write::Delete { key }
            | Write::Increment { key, .. }
            | Write::CompareAndSet { key, .. } => key,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A set was applied.
    Stored,
    /// A delete: whether the key was there.
    Deleted(bool),
    /// An increment: the counter's new value.
    Counter(i64),
    /// A compare-and-set: whether it swapped.
    Swapped(bool),
}

/// A boxed future a [`Backend`] answers a write with.
pub(crate) type WriteFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Outcome, StateError>> + Send + 'a>>;

/// What [`SharedMap`] needs of a backend.
pub(crate) trait Backend: Send + Sync + fmt::Debug + 'static {
    /// The local replica the reads are served from.
    fn replica(&self) -> &Replica;
    /// Applies one write at the authority; resolves once it is applied and the local
    /// replica shows it.
    fn write(&self, write: Write) -> WriteFuture<'_>;
}

/// A handle on the cluster's shared map; cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedMap {
    backend: Arc<dyn Backend>,
}

impl SharedMap {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        SharedMap { backend }
    }

    /// The value of `key` in this worker's replica (an expired entry reads as absent). Never
    /// waits.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.backend.replica().get(key)
    }

    /// The value of `key` decoded from postcard (see [`SharedMap::set_as`]).
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        self.get(key)
            .map(|bytes| {
                postcard::from_bytes(&bytes).map_err(|e| StateError::Encoding(e.to_string()))
            })
            .transpose()
    }

    /// Whether the replica may be behind: the backend lost its authority (Redis down, the
    /// master gone) and reads serve the last known values.
    pub fn is_stale(&self) -> bool {
        self.backend.replica().is_stale()
    }

    /// Stores `value` under `key`.
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<(), StateError> {
        self.set_with(key, value.into(), None).await
    }

    /// Stores `value` under `key` for `ttl`, after which it reads as absent.
    pub async fn set_for(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<(), StateError> {
        self.set_with(key, value.into(), Some(ttl)).await
    }

    /// Stores `value` encoded with postcard, for `ttl` if given.
    pub async fn set_as<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| StateError::Encoding(e.to_string()))?;
        self.set_with(key, bytes.into(), ttl).await
    }

    async fn set_with(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let write = Write::Set {
            key: key.to_owned(),
            value,
            ttl,
        };
        self.backend.write(write).await.map(|_| ())
    }

    /// Removes `key`; whether it was there.
    pub async fn delete(&self, key: &str) -> Result<bool, StateError> {
        match self
            .backend
            .write(Write::Delete {
                key: key.to_owned(),
            })
            .await?
        {
            Outcome::Deleted(was) => Ok(was),
            other => Err(unexpected(other)),
        }
    }

    /// Adds `by` to the counter at `key` (an absent key counts as 0) and answers the new
    /// value. Exact across the cluster: every worker's increments are applied one by one.
    pub async fn increment(&self, key: &str, by: i64) -> Result<i64, StateError> {
        let write = Write::Increment {
            key: key.to_owned(),
            by,
            ttl: None,
        };
        match self.backend.write(write).await? {
            Outcome::Counter(value) => Ok(value),
            other => Err(unexpected(other)),
        }
    }

    /// If `key` holds `expected` (`None`: is absent), stores `new` (`None`: removes the key)
    /// and answers true; otherwise changes nothing and answers false.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        let write = Write::CompareAndSet {
            key: key.to_owned(),
            expected: expected.map(Bytes::copy_from_slice),
            new,
            ttl,
        };
        match self.backend.write(write).await? {
            Outcome::Swapped(swapped) => Ok(swapped),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(outcome: Outcome) -> StateError {
    StateError::Unavailable(format!(
        "the backend answered {outcome:?} to another operation"
    ))
}

/// A worker's local copy of the map, updated by its backend; what reads are served from.
#[derive(Debug, Default)]
pub(crate) struct Replica {
    entries: RwLock<HashMap<String, Entry>>,
    stale: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    expires: Option<Instant>,
}

impl Replica {
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key)?;
        match entry.expires {
            Some(at) if at <= Instant::now() => None,
            _ => Some(entry.value.clone()),
        }
    }

    /// Stores what the authority says `key` now holds, for `ttl` from now if given.
    pub fn put(&self, key: String, value: Bytes, ttl: Option<Duration>) {
        let expires = ttl.map(|ttl| Instant::now() + ttl);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, Entry { value, expires });
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.remove(key);
    }

    /// Replaces everything with a snapshot of `(key, value, ttl)`.
    pub fn replace_all(
        &self,
        snapshot: impl IntoIterator<Item = (String, Bytes, Option<Duration>)>,
    ) {
        let now = Instant::now();
        let fresh = snapshot
            .into_iter()
            .map(|(key, value, ttl)| {
                (
                    key,
                    Entry {
                        value,
                        expires: ttl.map(|ttl| now + ttl),
                    },
                )
            })
            .collect();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// Entries in the replica (expired ones included until they are replaced).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_stale(&self, stale: bool) {
        self.stale
            .store(stale, std::sync::atomic::Ordering::Relaxed);
    }
}
