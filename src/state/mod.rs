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

pub(crate) mod store;

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

    /// Completes at the next change this worker's replica applies after the call (a write
    /// of any worker, an expiry the authority announced, a fresh snapshot): to react to
    /// writes without polling [`SharedMap::get`].
    pub fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.backend.replica().next_change()
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

/// Environment variable: which backend a worker's [`SharedMap`] uses. Absent, empty or
/// `master`: the map held by the master; `redis://HOST:PORT[/DB]`: a Redis server.
pub const ENV_STATE: &str = "HANDOFF_STATE";

/// Which backend [`ENV_STATE`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    Master,
    Redis(String),
    /// Not a backend: why.
    Invalid(String),
}

impl Choice {
    pub fn from_env() -> Self {
        Choice::parse(std::env::var(ENV_STATE).ok().as_deref())
    }

    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("" | "master") => Choice::Master,
            Some(url)
                if ["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme)) =>
            {
                Choice::Redis(url.to_owned())
            }
            Some(other) => Choice::Invalid(format!(
                "{ENV_STATE}={other:?} names no backend: use `master` or redis://HOST:PORT"
            )),
        }
    }
}

/// A backend that takes no writes, for a worker whose backend could not start: every write
/// fails with [`StateError::Unavailable`] and the reason; the empty replica is stale.
#[derive(Debug)]
pub(crate) struct Unavailable {
    replica: Replica,
    why: String,
}

impl Unavailable {
    pub fn new(why: String) -> Self {
        let replica = Replica::default();
        replica.set_stale(true);
        Unavailable { replica, why }
    }
}

impl Backend for Unavailable {
    fn replica(&self) -> &Replica {
        &self.replica
    }

    fn write(&self, _write: Write) -> WriteFuture<'_> {
        let why = self.why.clone();
        Box::pin(async move { Err(StateError::Unavailable(why)) })
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
    /// One more at every change: what [`SharedMap::changed`] waits on.
    version: tokio::sync::watch::Sender<u64>,
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
        let expires = store::deadline(Instant::now(), ttl);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, Entry { value, expires });
        drop(entries);
        self.changed();
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.remove(key);
        drop(entries);
        self.changed();
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Completes at the next change to the replica after the call.
    pub fn next_change(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.version.subscribe();
        rx.mark_unchanged();
        async move {
            let _ = rx.changed().await;
        }
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
                        expires: store::deadline(now, ttl),
                    },
                )
            })
            .collect();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.changed();
    }

    /// Entries in the replica (expired ones included until they are replaced).
    #[allow(dead_code)] // Part of the replica's interface to the backends; no caller yet.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_named_by_handoff_state() {
        assert_eq!(Choice::parse(None), Choice::Master);
        assert_eq!(Choice::parse(Some("master")), Choice::Master);
        assert_eq!(Choice::parse(Some(" ")), Choice::Master);
        assert_eq!(
            Choice::parse(Some("redis://127.0.0.1:6379")),
            Choice::Redis("redis://127.0.0.1:6379".into())
        );
        // Every form `--state` accepts at startup reaches the workers as Redis.
        for url in [
            "rediss://h:1",
            "redis+unix:///run/r.sock",
            "unix:///run/r.sock",
        ] {
            assert_eq!(Choice::parse(Some(url)), Choice::Redis(url.into()));
        }
        let Choice::Invalid(why) = Choice::parse(Some("memcached://x")) else {
            panic!()
        };
        assert!(
            why.contains("HANDOFF_STATE=\"memcached://x\" names no backend"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn an_unavailable_backend_refuses_writes_with_its_reason_and_reads_nothing() {
        let map = SharedMap::new(Arc::new(Unavailable::new("no redis here".into())));
        assert_eq!(
            map.set("k", "v").await,
            Err(StateError::Unavailable("no redis here".into()))
        );
        assert_eq!(map.get("k"), None);
        assert!(map.is_stale());
    }

    #[tokio::test]
    async fn changed_completes_at_the_next_change_of_the_replica() {
        let replica = Replica::default();
        let before = replica.next_change();
        replica.put("k".into(), Bytes::from_static(b"v"), Some(Duration::MAX));
        tokio::time::timeout(Duration::from_secs(5), before)
            .await
            .expect("woken by the put");
        assert_eq!(
            replica.get("k"),
            Some(Bytes::from_static(b"v")),
            "a huge TTL is no TTL"
        );
        let after = replica.next_change();
        let waiting = tokio::spawn(after);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no change since");
        replica.remove("k");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the removal")
            .unwrap();
    }
}
