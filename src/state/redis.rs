//! The shared map on a Redis server (`--state redis://HOST:PORT`), for clusters on several
//! hosts. Runs in every process that holds a [`SharedMap`] (a worker, or any program that
//! calls [`SharedMap::redis`]) and talks to Redis over two connections:
//!
//! - **commands**: each write is one Lua script (`redis.lua`, sent by EVALSHA) that applies
//!   the operation atomically, keeps the map's byte total (and refuses a write past
//!   [`StateLimits::max_total`]), numbers the change and PUBLISHes it. A redis-rs
//!   `ConnectionManager` reconnects on its own; it makes one attempt per write while Redis
//!   is down, so a write fails within [`CONNECT_TIMEOUT`] with [`StateError::Unavailable`].
//! - **the subscription**: a task subscribes to the change channel, loads the whole
//!   namespace (SCAN, MGET, PTTL) into the local [`Replica`] and applies every change in
//!   Redis's order. When the connection drops (or a ping goes unanswered) the replica is
//!   marked stale and reads serve the last known values; the task reconnects with backoff,
//!   loads the namespace again (changes were missed while it was down) and clears stale.
//!
//! Reads never wait. A write applies its own result to the replica before it returns (the
//! writer reads its write); the change numbers keep a late message from an older change
//! from undoing it.
//!
//! Keys live under `handoff:state:k:`; the script's bookkeeping under `handoff:state:`
//! (`meta`: `bytes`, `seq`; `sizes`; `expiry`), the channel is `handoff:state:changes`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{Backend, Outcome, Replica, SharedMap, StateError, StateLimits, Write, WriteFuture};

/// How long one connection attempt may take, and so the longest a write waits while Redis
/// is down before it fails with [`StateError::Unavailable`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis may take to answer one command; past it a write fails with
/// [`StateError::Timeout`] (it may have been applied).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the subscription pings Redis, to notice a connection that died silently.
const PING_EVERY: Duration = Duration::from_secs(1);
/// The subscription's reconnect backoff: doubling from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// Keys asked for per SCAN while loading the namespace.
const SCAN_BATCH: usize = 512;
const PREFIX: &str = "handoff:state:";

/// The scheme of a URL [`connect`] takes, or why it takes none: a clear line for
/// `--state` at startup.
pub(crate) fn check_url(url: &str) -> Result<redis::Client, StateError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss" | "redis+unix" | "unix")) {
        return Err(StateError::Unavailable(format!(
            "invalid Redis URL {:?}: expected redis://HOST:PORT[/DB] or redis+unix:///PATH",
            redact(url)
        )));
    }
    redis::Client::open(url)
        .map_err(|e| StateError::Unavailable(format!("invalid Redis URL {:?}: {e}", redact(url))))
}

/// `url` without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://***{}", &url[..start], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl SharedMap {
    /// A map on the Redis server at `url` (`redis://HOST:PORT[/DB]`,
    /// `redis+unix:///PATH`), for use outside a worker (a worker gets its map from the
    /// runtime). Connects, loads the namespace and subscribes before it returns; fails with
    /// [`StateError::Unavailable`] if Redis cannot be reached within the connection timeout
    /// (1 s). See `docs/state-redis.md`.
    pub async fn redis(url: &str, limits: StateLimits) -> Result<SharedMap, StateError> {
        connect(url, limits).await.map(SharedMap::new)
    }
}

/// Connects to Redis at `url`, loads the namespace into a fresh replica and starts the
/// subscription task on the current tokio runtime.
pub(crate) async fn connect(
    url: &str,
    limits: StateLimits,
) -> Result<Arc<dyn Backend>, StateError> {
    let client = check_url(url)?;
    let address = redact(url);
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(0);
    let connecting = ConnectionManager::new_with_config(client.clone(), config);
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(unavailable(&address, &e)),
        Err(_) => {
            return Err(StateError::Unavailable(format!(
                "redis {address}: no answer"
            )))
        }
    };
    let shared = Arc::new(Shared {
        replica: Replica::default(),
        order: Mutex::new(Order::default()),
        names: Names::new(),
        address,
    });
    let (ready, first_load) = oneshot::channel();
    let task = tokio::spawn(subscribe(shared.clone(), client, conn.clone(), ready));
    let backend = RedisBackend {
        shared,
        conn,
        script: Script::new(include_str!("redis.lua")),
        limits,
        subscription: task.abort_handle(),
    };
    match first_load.await {
        Ok(Ok(())) => Ok(Arc::new(backend)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StateError::Unavailable(
            "the Redis subscription task ended".into(),
        )),
    }
}

/// The first connection's retry backoff, doubling from the first to the second, for a
/// process that started while Redis was down.
const FIRST_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The backend `--state redis://...` gives a worker: connects once before it returns. If
/// Redis cannot be reached then, the process still starts: its map is a [`Connecting`] that
/// keeps trying in the background (the reason is logged once per change of reason).
pub(crate) async fn start(url: &str, limits: StateLimits) -> Arc<dyn Backend> {
    if check_url(url).is_ok() {
        match connect(url, limits).await {
            Ok(backend) => return backend,
            Err(e) => return retrying(url, limits, e.to_string(), FIRST_BACKOFF.0),
        }
    }
    start_later(url, limits)
}

/// A map whose first connection to Redis has not succeeded yet: reads see an empty
/// replica marked stale and writes fail at once with [`StateError::Unavailable`] and the
/// last reason; once connected, everything goes through the connected backend (and
/// [`SharedMap::changed`] waiters wake up).
#[derive(Debug)]
pub(crate) struct Connecting {
    waiting: Replica,
    connected: std::sync::OnceLock<Arc<dyn Backend>>,
    why: Mutex<String>,
}

impl Connecting {
    pub fn new(why: String) -> Arc<Self> {
        let waiting = Replica::default();
        waiting.set_stale(true);
        Arc::new(Connecting {
            waiting,
            connected: std::sync::OnceLock::new(),
            why: Mutex::new(why),
        })
    }

    /// Tries to connect until it does, first after `pause`, then with backoff.
    pub async fn retry(self: Arc<Self>, url: String, limits: StateLimits, mut pause: Duration) {
        let mut logged = String::new();
        loop {
            let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if why != logged {
                tracing::warn!(reason = %why, "shared state: Redis not reachable yet, retrying");
                logged = why;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).clamp(FIRST_BACKOFF.0, FIRST_BACKOFF.1);
            match connect(&url, limits).await {
                Ok(backend) => {
                    let _ = self.connected.set(backend);
                    tracing::info!(address = %redact(&url), "shared state: connected to Redis");
                    // Waiters of `changed()` subscribed to the placeholder.
                    self.waiting.replace_all([]);
                    return;
                }
                Err(e) => *self.why.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string(),
            }
        }
    }
}

/// The master's own handle on a Redis map (for its handler): never delays the master's
/// start; connects in the background.
pub(crate) fn start_later(url: &str, limits: StateLimits) -> Arc<dyn Backend> {
    if let Err(e) = check_url(url) {
        tracing::error!(reason = %e, "shared state unavailable");
        return Arc::new(super::Unavailable::new(e.to_string()));
    }
    let why = format!("redis {}: connecting", redact(url));
    retrying(url, limits, why, Duration::ZERO)
}

/// A [`Connecting`] map (`why` its reason until then) with its retries started, the first
/// after `pause`.
fn retrying(url: &str, limits: StateLimits, why: String, pause: Duration) -> Arc<dyn Backend> {
    let waiting = Connecting::new(why);
    tokio::spawn(waiting.clone().retry(url.to_owned(), limits, pause));
    waiting
}

impl Backend for Connecting {
    fn replica(&self) -> &Replica {
        match self.connected.get() {
            Some(backend) => backend.replica(),
            None => &self.waiting,
        }
    }

    fn write(&self, write: Write) -> WriteFuture<'_> {
        if let Some(backend) = self.connected.get() {
            return backend.write(write);
        }
        let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Box::pin(async move { Err(StateError::Unavailable(why)) })
    }
}

/// The Redis names the map uses.
#[derive(Debug)]
struct Names {
    meta: String,
    sizes: String,
    expiry: String,
    channel: String,
}

impl Names {
    fn new() -> Self {
        Names {
            meta: format!("{PREFIX}meta"),
            sizes: format!("{PREFIX}sizes"),
            expiry: format!("{PREFIX}expiry"),
            channel: format!("{PREFIX}changes"),
        }
    }

    fn data_key(name: &str) -> String {
        format!("{PREFIX}k:{name}")
    }
}

/// What the write path and the subscription task share.
#[derive(Debug)]
struct Shared {
    replica: Replica,
    order: Mutex<Order>,
    names: Names,
    /// The URL without its password.
    address: String,
}

/// Which changes the replica holds, so changes apply in Redis's order.
///
/// Changes arrive on the channel in the order of their numbers. A write's own result is
/// applied at once and may run ahead of the channel; it is remembered in `ahead` until the
/// channel catches up, and an older message for that key is then not applied over it.
#[derive(Debug, Default)]
struct Order {
    /// The number of the last change applied from the channel (or the loaded namespace).
    seen: u64,
    ahead: HashMap<String, Ahead>,
}

#[derive(Debug, Clone)]
struct Ahead {
    seq: u64,
    /// `None`: deleted.
    value: Option<Bytes>,
    expires: Option<Instant>,
}

/// One change as published by the script.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    seq: u64,
    key: String,
    /// `None`: deleted.
    value: Option<Bytes>,
    ttl: Option<Duration>,
}

impl Change {
    /// Parses "SEQ KIND TTL_MS KEYLEN KEYVALUE" (KIND `s`: set, `d`: deleted).
    fn parse(payload: &[u8]) -> Option<Change> {
        let mut fields = payload.splitn(5, |&b| b == b' ');
        let mut text = || std::str::from_utf8(fields.next()?).ok();
        let seq: u64 = text()?.parse().ok()?;
        let kind = text()?;
        let ttl: i64 = text()?.parse().ok()?;
        let key_len: usize = text()?.parse().ok()?;
        let rest = fields.next()?;
        let key = std::str::from_utf8(rest.get(..key_len)?).ok()?.to_owned();
        let value = Bytes::copy_from_slice(&rest[key_len..]);
        let value = match kind {
            "s" => Some(value),
            "d" => None,
            _ => return None,
        };
        let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
        Some(Change {
            seq,
            key,
            value,
            ttl,
        })
    }
}

impl Shared {
    fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn show(&self, key: &str, value: Option<Bytes>, ttl: Option<Duration>) {
        match value {
            Some(value) => self.replica.put(key.to_owned(), value, ttl),
            None => self.replica.remove(key),
        }
    }

    /// A write's own result, change number `seq`: shown at once unless the channel (or a
    /// later write) already showed something newer.
    fn applied(&self, seq: u64, key: &str, value: Option<Bytes>, ttl: Option<Duration>) {
        let mut order = self.order();
        let newer = seq <= order.seen || order.ahead.get(key).is_some_and(|a| a.seq >= seq);
        if newer {
            return;
        }
        let expires = ttl.map(|ttl| Instant::now() + ttl);
        self.show(key, value.clone(), ttl);
        order.ahead.insert(
            key.to_owned(),
            Ahead {
                seq,
                value,
                expires,
            },
        );
    }

    /// A change from the channel.
    fn received(&self, change: Change) {
        let mut order = self.order();
        if change.seq <= order.seen {
            return; // in the namespace already loaded
        }
        order.seen = change.seq;
        let seen = order.seen;
        order.ahead.retain(|_, ahead| ahead.seq > seen);
        if order.ahead.contains_key(&change.key) {
            return; // this process wrote something newer there
        }
        self.show(&change.key, change.value, change.ttl);
    }

    /// The whole namespace as of change `base` (every later change is still to come on the
    /// channel): replaces the replica, keeps own writes newer than `base`, clears stale.
    fn reloaded(&self, snapshot: Vec<(String, Bytes, Option<Duration>)>, base: u64) {
        let mut order = self.order();
        self.replica.replace_all(snapshot);
        order.seen = base;
        order.ahead.retain(|_, ahead| ahead.seq > base);
        let now = Instant::now();
        for (key, ahead) in &order.ahead {
            let ttl = ahead.expires.map(|at| at.saturating_duration_since(now));
            self.show(key, ahead.value.clone(), ttl);
        }
        self.replica.set_stale(false);
    }

    /// The subscription is gone: reads serve what is there, marked stale. Change numbers
    /// may start over (a Redis restarted empty), so own writes are forgotten: the next load
    /// shows them.
    fn lost(&self) {
        let mut order = self.order();
        order.ahead.clear();
        self.replica.set_stale(true);
    }
}

/// The Redis backend of one [`SharedMap`].
#[derive(Debug)]
struct RedisBackend {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    script: Script,
    limits: StateLimits,
    subscription: AbortHandle,
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.subscription.abort();
    }
}

impl Backend for RedisBackend {
    fn replica(&self) -> &Replica {
        &self.shared.replica
    }

    fn write(&self, write: Write) -> WriteFuture<'_> {
        Box::pin(self.apply(write))
    }
}

/// What the script answered.
#[derive(Debug, PartialEq)]
enum Reply {
    /// Applied as change `seq` (0: nothing changed); `result` is the operation's answer
    /// (1/0, or a counter's new value), `ttl` a counter's TTL.
    Ok {
        seq: u64,
        result: Value,
        ttl: Option<Duration>,
    },
    Full,
    NotAnInteger,
}

impl Reply {
    fn parse(value: Value) -> Option<Reply> {
        let Value::Array(items) = value else {
            return None;
        };
        let mut items = items.into_iter();
        let status = items.next()?;
        match bulk(&status)? {
            b"full" => return Some(Reply::Full),
            b"nan" => return Some(Reply::NotAnInteger),
            b"ok" => {}
            _ => return None,
        }
        let Value::Int(seq) = items.next()? else {
            return None;
        };
        let result = items.next()?;
        let ttl = match items.next() {
            Some(Value::Int(ms)) => u64::try_from(ms).ok().map(Duration::from_millis),
            _ => None,
        };
        Some(Reply::Ok {
            seq: u64::try_from(seq).ok()?,
            result,
            ttl,
        })
    }
}

fn bulk(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// A TTL as the script takes it: whole milliseconds, at least 1 (`PX 0` is an error).
fn ttl_arg(ttl: Option<Duration>) -> String {
    ttl.map(|ttl| ttl.as_millis().clamp(1, u64::MAX as u128).to_string())
        .unwrap_or_default()
}

impl RedisBackend {
    fn check(&self, key: &str, value: Option<&Bytes>) -> Result<(), StateError> {
        let limits = &self.limits;
        if key.len() > limits.max_key {
            return Err(StateError::TooLarge {
                what: "key",
                len: key.len(),
                limit: limits.max_key,
            });
        }
        match value {
            Some(value) if value.len() > limits.max_value => Err(StateError::TooLarge {
                what: "value",
                len: value.len(),
                limit: limits.max_value,
            }),
            _ => Ok(()),
        }
    }

    async fn apply(&self, write: Write) -> Result<Outcome, StateError> {
        let key = write.key().to_owned();
        let names = &self.shared.names;
        let mut call = self.script.prepare_invoke();
        call.key(Names::data_key(&key))
            .key(&names.meta)
            .key(&names.sizes)
            .key(&names.expiry);
        let op = match &write {
            Write::Set { .. } => "set",
            Write::Delete { .. } => "del",
            Write::Increment { .. } => "incr",
            Write::CompareAndSet { .. } => "cas",
        };
        call.arg(op)
            .arg(&names.channel)
            .arg(self.limits.max_total)
            .arg(&key);
        match &write {
            Write::Set { value, ttl, .. } => {
                self.check(&key, Some(value))?;
                call.arg(value.as_ref()).arg(ttl_arg(*ttl));
            }
            Write::Delete { .. } => self.check(&key, None)?,
            Write::Increment { by, ttl, .. } => {
                self.check(&key, None)?;
                call.arg(*by).arg(ttl_arg(*ttl));
            }
            Write::CompareAndSet {
                expected, new, ttl, ..
            } => {
                self.check(&key, new.as_ref())?;
                let flag = |present: bool| if present { "1" } else { "0" };
                call.arg(flag(expected.is_some()))
                    .arg(expected.as_deref().unwrap_or_default())
                    .arg(flag(new.is_some()))
                    .arg(new.as_deref().unwrap_or_default())
                    .arg(ttl_arg(*ttl));
            }
        }
        let mut conn = self.conn.clone();
        // The connection manager bounds each step; this bounds them together.
        let bound = CONNECT_TIMEOUT + RESPONSE_TIMEOUT * 2;
        let answer = match tokio::time::timeout(bound, call.invoke_async::<Value>(&mut conn)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) if e.is_timeout() => return Err(StateError::Timeout(RESPONSE_TIMEOUT)),
            Ok(Err(e)) => return Err(unavailable(&self.shared.address, &e)),
            Err(_) => return Err(StateError::Timeout(bound)),
        };
        let reply = Reply::parse(answer).ok_or_else(|| {
            StateError::Unavailable(format!(
                "redis {}: an answer the script never gives",
                self.shared.address
            ))
        })?;
        self.outcome(write, reply)
    }

    /// Shows a write's result in the replica and says what it did.
    fn outcome(&self, write: Write, reply: Reply) -> Result<Outcome, StateError> {
        let (seq, result, counter_ttl) = match reply {
            Reply::Full => {
                return Err(StateError::Full {
                    limit: self.limits.max_total,
                })
            }
            Reply::NotAnInteger => return Err(StateError::NotAnInteger(write.key().to_owned())),
            Reply::Ok { seq, result, ttl } => (seq, result, ttl),
        };
        let shared = &self.shared;
        let flag = matches!(result, Value::Int(n) if n != 0);
        match write {
            Write::Set { key, value, ttl } => {
                shared.applied(seq, &key, Some(value), ttl);
                Ok(Outcome::Stored)
            }
            Write::Delete { key } => {
                shared.applied(seq, &key, None, None);
                Ok(Outcome::Deleted(flag))
            }
            Write::Increment { key, .. } => {
                let text = bulk(&result).unwrap_or_default();
                let counter = std::str::from_utf8(text)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| StateError::NotAnInteger(key.clone()))?;
                let value = Bytes::copy_from_slice(text);
                shared.applied(seq, &key, Some(value), counter_ttl);
                Ok(Outcome::Counter(counter))
            }
            Write::CompareAndSet { key, new, ttl, .. } => {
                if flag {
                    shared.applied(seq, &key, new, ttl);
                }
                Ok(Outcome::Swapped(flag))
            }
        }
    }
}

fn unavailable(address: &str, e: &RedisError) -> StateError {
    StateError::Unavailable(format!("redis {address}: {e}"))
}

/// The subscription task: subscribe, load, follow; on any failure mark the replica stale,
/// wait (backoff with jitter) and start over. The first outcome goes to `ready`; if the
/// first load fails the task ends (so [`connect`] fails).
async fn subscribe(
    shared: Arc<Shared>,
    client: redis::Client,
    conn: ConnectionManager,
    ready: oneshot::Sender<Result<(), StateError>>,
) {
    let mut ready = Some(ready);
    let mut backoff = BACKOFF.0;
    loop {
        let mut followed = false;
        let reason = follow(&shared, &client, conn.clone(), &mut ready, &mut followed).await;
        shared.lost();
        if let Some(ready) = ready.take() {
            let _ = ready.send(Err(StateError::Unavailable(format!(
                "redis {}: {reason}",
                shared.address
            ))));
            return;
        }
        if followed {
            backoff = BACKOFF.0;
        }
        tracing::warn!(
            redis = %shared.address,
            error = %reason,
            retry_in_ms = backoff.as_millis() as u64,
            "shared state: lost the Redis subscription; reads serve the last known values"
        );
        let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One subscription, until it fails: answers why.
async fn follow(
    shared: &Shared,
    client: &redis::Client,
    mut conn: ConnectionManager,
    ready: &mut Option<oneshot::Sender<Result<(), StateError>>>,
    followed: &mut bool,
) -> String {
    let pubsub = match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return format!("subscribe: {e}"),
        Err(_) => return format!("subscribe: no connection within {CONNECT_TIMEOUT:?}"),
    };
    let (mut sink, mut stream) = pubsub.split();
    match tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&shared.names.channel)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return format!("subscribe: {e}"),
        Err(_) => return format!("subscribe: no answer within {RESPONSE_TIMEOUT:?}"),
    }
    // Subscribed first, loaded second: a change made during the load is in the load or on
    // the channel (or both; its number sorts that out).
    let (snapshot, base) = match load(&mut conn).await {
        Ok(loaded) => loaded,
        Err(e) => return format!("load the namespace: {e}"),
    };
    tracing::debug!(redis = %shared.address, keys = snapshot.len(), base, "shared state: loaded");
    shared.reloaded(snapshot, base);
    *followed = true;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return "the subscription connection closed".into();
                };
                match Change::parse(message.get_payload_bytes()) {
                    Some(change) => shared.received(change),
                    None => tracing::warn!(
                        redis = %shared.address,
                        "shared state: a change message handoff does not write; ignored"
                    ),
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("ping: {e}"),
                    Err(_) => return format!("ping: no answer within {RESPONSE_TIMEOUT:?}"),
                }
            }
        }
    }
}

type Snapshot = Vec<(String, Bytes, Option<Duration>)>;

/// The whole namespace: every key with its value and TTL, and the number of the last change
/// made before the load began.
async fn load(conn: &mut ConnectionManager) -> Result<(Snapshot, u64), RedisError> {
    let base: Option<u64> = redis::cmd("HGET")
        .arg(format!("{PREFIX}meta"))
        .arg("seq")
        .query_async(conn)
        .await?;
    let data_prefix = Names::data_key("");
    let pattern = format!("{data_prefix}*");
    let mut snapshot = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let values: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(conn).await?;
            let mut ttls = redis::pipe();
            for key in &keys {
                ttls.cmd("PTTL").arg(key);
            }
            let ttls: Vec<i64> = ttls.query_async(conn).await?;
            for ((key, value), ttl) in keys.iter().zip(values).zip(ttls) {
                // Gone since the SCAN (the channel tells the rest), or not handoff's.
                let (Some(value), Ok(key)) = (value, std::str::from_utf8(key)) else {
                    continue;
                };
                let Some(name) = key.strip_prefix(&data_prefix) else {
                    continue;
                };
                let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
                snapshot.push((name.to_owned(), Bytes::from(value), ttl));
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok((snapshot, base.unwrap_or(0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_message_parses() {
        let change = Change::parse(b"42 s 1500 3 keyva lue").unwrap();
        assert_eq!(
            change,
            Change {
                seq: 42,
                key: "key".into(),
                value: Some(Bytes::from_static(b"va lue")),
                ttl: Some(Duration::from_millis(1500)),
            }
        );
        let gone = Change::parse(b"7 d -1 4 a b ").unwrap();
        assert_eq!(gone.value, None);
        assert_eq!(gone.key, "a b ");
        assert_eq!(gone.ttl, None);
        let empty = Change::parse(b"8 s -1 1 k").unwrap();
        assert_eq!(empty.value, Some(Bytes::new()));
    }

    #[test]
    fn a_malformed_change_message_is_refused() {
        for payload in [
            &b""[..],
            b"x s -1 1 k",
            b"1 q -1 1 k",
            b"1 s -1 9 k",
            b"1 s -1",
        ] {
            assert_eq!(Change::parse(payload), None, "{payload:?}");
        }
    }

    fn shared() -> Shared {
        Shared {
            replica: Replica::default(),
            order: Mutex::new(Order::default()),
            names: Names::new(),
            address: "redis://test".into(),
        }
    }

    fn change(seq: u64, key: &str, value: Option<&'static str>) -> Change {
        Change {
            seq,
            key: key.into(),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
            ttl: None,
        }
    }

    #[test]
    fn an_older_message_does_not_undo_an_own_write() {
        let shared = shared();
        shared.applied(5, "k", Some(Bytes::from_static(b"mine")), None);
        shared.received(change(4, "k", Some("older")));
        assert_eq!(shared.replica.get("k").as_deref(), Some(&b"mine"[..]));
        shared.received(change(5, "k", Some("mine")));
        shared.received(change(6, "k", Some("newer")));
        assert_eq!(shared.replica.get("k").as_deref(), Some(&b"newer"[..]));
    }

    #[test]
    fn an_own_write_older_than_the_channel_is_not_shown() {
        let shared = shared();
        shared.received(change(9, "k", None));
        shared.applied(8, "k", Some(Bytes::from_static(b"old")), None);
        assert_eq!(shared.replica.get("k"), None);
    }

    #[test]
    fn a_reload_keeps_own_writes_past_its_base_and_drops_messages_before_it() {
        let shared = shared();
        shared.lost();
        assert!(shared.replica.is_stale());
        shared.applied(12, "mine", Some(Bytes::from_static(b"new")), None);
        let snapshot = vec![
            ("mine".to_owned(), Bytes::from_static(b"old"), None),
            ("other".to_owned(), Bytes::from_static(b"x"), None),
        ];
        shared.reloaded(snapshot, 10);
        assert!(!shared.replica.is_stale());
        assert_eq!(shared.replica.get("mine").as_deref(), Some(&b"new"[..]));
        shared.received(change(9, "other", Some("before the load")));
        assert_eq!(shared.replica.get("other").as_deref(), Some(&b"x"[..]));
        shared.received(change(11, "other", None));
        assert_eq!(shared.replica.get("other"), None);
    }

    #[test]
    fn a_script_reply_parses() {
        let ok = Value::Array(vec![
            Value::BulkString(b"ok".to_vec()),
            Value::Int(3),
            Value::BulkString(b"17".to_vec()),
            Value::Int(-1),
        ]);
        assert_eq!(
            Reply::parse(ok),
            Some(Reply::Ok {
                seq: 3,
                result: Value::BulkString(b"17".to_vec()),
                ttl: None
            })
        );
        let full = Value::Array(vec![Value::BulkString(b"full".to_vec())]);
        assert_eq!(Reply::parse(full), Some(Reply::Full));
        assert_eq!(Reply::parse(Value::Int(1)), None);
    }

    #[test]
    fn a_url_is_checked_and_its_password_hidden() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("redis+unix:///tmp/redis.sock").is_ok());
        let wrong = check_url("http://127.0.0.1:6379").unwrap_err().to_string();
        assert!(wrong.contains("expected redis://"), "{wrong}");
        assert_eq!(
            redact("redis://user:secret@host:1/0"),
            "redis://***@host:1/0"
        );
        assert_eq!(redact("redis://host:1"), "redis://host:1");
    }
}
