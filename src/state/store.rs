//! The authoritative map of the through-the-master backend, as a plain state machine: it
//! runs in the master, takes one [`Write`] at a time and answers what it did and the change
//! every replica must apply. No I/O here: `master::state` carries writes in and changes out.
//!
//! Entries expire at their deadline: an expired entry reads as absent to every write, and
//! [`Store::expire`] removes the expired ones as changes (so the replicas forget them too).
//! Every write checks [`StateLimits`] first; a write that fails changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Outcome, StateError, StateLimits, Write};

/// One applied change, numbered: what every replica applies, in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// 1 for the first change of a store, then one more per change.
    pub seq: u64,
    pub key: Arc<str>,
    /// The new value and its remaining time to live; `None`: the key is gone.
    pub value: Option<(Bytes, Option<Duration>)>,
}

#[derive(Debug, Clone)]
struct Stored {
    value: Bytes,
    expires: Option<Instant>,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }

    fn ttl(&self, now: Instant) -> Option<Duration> {
        self.expires.map(|at| at.saturating_duration_since(now))
    }
}

/// An entry of a snapshot: key, value, deadline.
pub(crate) type Frozen = (Arc<str>, Bytes, Option<Instant>);

/// The master's copy of the shared map.
#[derive(Debug, Default)]
pub(crate) struct Store {
    entries: HashMap<Arc<str>, Stored>,
    /// Bytes of every key and value.
    total: usize,
    limits: StateLimits,
    seq: u64,
}

/// The deadline `ttl` from `now`; a deadline past what `Instant` holds is none.
pub(crate) fn deadline(now: Instant, ttl: Option<Duration>) -> Option<Instant> {
    ttl.and_then(|ttl| now.checked_add(ttl))
}

impl Store {
    pub fn new(limits: StateLimits) -> Self {
        Store {
            limits,
            ..Store::default()
        }
    }

    /// The number of the last change applied (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes of every key and value held (expired entries until they are removed).
    #[cfg_attr(not(any(test, feature = "prometheus")), allow(dead_code))]
    pub fn total(&self) -> usize {
        self.total
    }

    /// Entries held, expired ones included until [`Store::expire`] removes them.
    #[cfg_attr(not(any(test, feature = "prometheus")), allow(dead_code))]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str, now: Instant) -> Option<Bytes> {
        self.entries
            .get(key)
            .filter(|s| s.live(now))
            .map(|s| s.value.clone())
    }

    /// Applies `write` at `now`: what it did, and the change the replicas must apply (none
    /// when nothing changed). A write that fails changes nothing.
    pub fn apply(
        &mut self,
        write: Write,
        now: Instant,
    ) -> Result<(Outcome, Option<Change>), StateError> {
        self.check_key(write.key())?;
        let current = self.get(write.key(), now);
        match write {
            Write::Set { key, value, ttl } => {
                let change = self.put(&key, value, ttl, now)?;
                Ok((Outcome::Stored, Some(change)))
            }
            Write::Delete { key } => match current {
                Some(_) => Ok((Outcome::Deleted(true), Some(self.remove(&key)))),
                None => {
                    // An expired entry goes quietly: no replica reads it anyway.
                    self.forget(&key);
                    Ok((Outcome::Deleted(false), None))
                }
            },
            Write::Increment { key, by, ttl } => {
                let not_an_integer = || StateError::NotAnInteger(key.clone());
                let (old, ttl) = match &current {
                    None => (0, ttl),
                    Some(bytes) => {
                        let text = std::str::from_utf8(bytes).map_err(|_| not_an_integer())?;
                        let old: i64 = text.parse().map_err(|_| not_an_integer())?;
                        // An existing counter keeps its deadline.
                        let ttl = self.entries.get(key.as_str()).and_then(|s| s.ttl(now));
                        (old, ttl)
                    }
                };
                let new = old.checked_add(by).ok_or_else(not_an_integer)?;
                let change = self.put(&key, Bytes::from(new.to_string()), ttl, now)?;
                Ok((Outcome::Counter(new), Some(change)))
            }
            Write::CompareAndSet {
                key,
                expected,
                new,
                ttl,
            } => {
                if current != expected {
                    return Ok((Outcome::Swapped(false), None));
                }
                let change = match new {
                    Some(value) => self.put(&key, value, ttl, now)?,
                    None if current.is_some() => self.remove(&key),
                    // Absent, and absent it stays.
                    None => return Ok((Outcome::Swapped(true), None)),
                };
                Ok((Outcome::Swapped(true), Some(change)))
            }
        }
    }

    fn check_key(&self, key: &str) -> Result<(), StateError> {
        if key.len() > self.limits.max_key {
            return Err(StateError::TooLarge {
                what: "key",
                len: key.len(),
                limit: self.limits.max_key,
            });
        }
        Ok(())
    }

    /// Stores `value` under `key` if the limits allow it.
    fn put(
        &mut self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Change, StateError> {
        if value.len() > self.limits.max_value {
            return Err(StateError::TooLarge {
                what: "value",
                len: value.len(),
                limit: self.limits.max_value,
            });
        }
        let old = self
            .entries
            .get(key)
            .map_or(0, |s| key.len() + s.value.len());
        let total = self.total - old + key.len() + value.len();
        if total > self.limits.max_total {
            return Err(StateError::Full {
                limit: self.limits.max_total,
            });
        }
        Ok(self.insert(key, value, ttl, now, total))
    }

    /// Stores `value` under `key`, `total` being the bytes held after it; no limit checked.
    fn insert(
        &mut self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        now: Instant,
        total: usize,
    ) -> Change {
        let key: Arc<str> = match self.entries.get_key_value(key) {
            Some((held, _)) => held.clone(),
            None => Arc::from(key),
        };
        let expires = deadline(now, ttl);
        let stored = Stored {
            value: value.clone(),
            expires,
        };
        self.entries.insert(key.clone(), stored);
        self.total = total;
        self.seq += 1;
        Change {
            seq: self.seq,
            key,
            value: Some((value, expires.map(|at| at - now))),
        }
    }

    /// Applies, as this store's next change, what another store decided: the master that
    /// holds the map's order of writes while this one hands it over in an upgrade. No limit
    /// is checked (that store checked its own); removing a key not here changes nothing.
    pub fn mirror(
        &mut self,
        key: &str,
        value: Option<(Bytes, Option<Duration>)>,
        now: Instant,
    ) -> Option<Change> {
        match value {
            Some((value, ttl)) => {
                let old = self
                    .entries
                    .get(key)
                    .map_or(0, |s| key.len() + s.value.len());
                let total = self.total - old + key.len() + value.len();
                Some(self.insert(key, value, ttl, now, total))
            }
            None if self.entries.contains_key(key) => Some(self.remove(key)),
            None => None,
        }
    }

    /// Removes `key` (it is there) as a change.
    fn remove(&mut self, key: &str) -> Change {
        let key = self.forget(key).expect("the caller saw the key");
        self.seq += 1;
        Change {
            seq: self.seq,
            key,
            value: None,
        }
    }

    /// Removes `key` without a change; its key if it was there.
    fn forget(&mut self, key: &str) -> Option<Arc<str>> {
        let (key, stored) = self.entries.remove_entry(key)?;
        self.total -= key.len() + stored.value.len();
        Some(key)
    }

    /// Removes every entry expired at `now`, as changes for the replicas.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let expired: Vec<Arc<str>> = self
            .entries
            .iter()
            .filter(|(_, s)| !s.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        expired.iter().map(|key| self.remove(key)).collect()
    }

    /// Every live entry at `now` with its deadline: what a new replica starts from, as of
    /// [`Store::seq`].
    pub fn freeze(&self, now: Instant) -> Vec<Frozen> {
        self.entries
            .iter()
            .filter(|(_, s)| s.live(now))
            .map(|(k, s)| (k.clone(), s.value.clone(), s.expires))
            .collect()
    }

    /// Every live entry with its remaining time to live: what a live upgrade hands to the
    /// next master ([`Store::restore`] takes it back).
    pub fn snapshot(&self) -> Vec<(String, Bytes, Option<Duration>)> {
        let now = Instant::now();
        self.freeze(now)
            .into_iter()
            .map(|(key, value, expires)| {
                let ttl = expires.map(|at| at.saturating_duration_since(now));
                (key.to_string(), value, ttl)
            })
            .collect()
    }

    /// Loads a [`Store::snapshot`] (of a previous master) into this store, entry by entry
    /// under this store's limits; answers the entries refused (each with the reason), which
    /// are left out. Entries whose time to live is zero are expired and left out.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn restore(
        &mut self,
        snapshot: impl IntoIterator<Item = (String, Bytes, Option<Duration>)>,
    ) -> Vec<(String, StateError)> {
        let now = Instant::now();
        let mut refused = Vec::new();
        for (key, value, ttl) in snapshot {
            if ttl.is_some_and(|ttl| ttl.is_zero()) {
                continue;
            }
            let write = Write::Set {
                key: key.clone(),
                value,
                ttl,
            };
            if let Err(e) = self.apply(write, now) {
                refused.push((key, e));
            }
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str, ttl: Option<Duration>) -> Write {
        Write::Set {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ttl,
        }
    }

    fn incr(key: &str, by: i64) -> Write {
        Write::Increment {
            key: key.into(),
            by,
            ttl: None,
        }
    }

    fn cas(key: &str, expected: Option<&str>, new: Option<&str>) -> Write {
        Write::CompareAndSet {
            key: key.into(),
            expected: expected.map(|e| Bytes::copy_from_slice(e.as_bytes())),
            new: new.map(|n| Bytes::copy_from_slice(n.as_bytes())),
            ttl: None,
        }
    }

    fn small() -> Store {
        Store::new(StateLimits {
            max_key: 8,
            max_value: 16,
            max_total: 40,
        })
    }

    #[test]
    fn changes_are_numbered_in_the_order_they_are_applied() {
        let mut store = Store::default();
        let now = Instant::now();
        let (outcome, change) = store.apply(set("a", "1", None), now).unwrap();
        assert_eq!(outcome, Outcome::Stored);
        let change = change.unwrap();
        assert_eq!((change.seq, &*change.key), (1, "a"));
        assert_eq!(change.value, Some((Bytes::from("1"), None)));
        let (_, change) = store.apply(incr("a", 4), now).unwrap();
        assert_eq!(change.unwrap().seq, 2);
        assert_eq!(store.get("a", now), Some(Bytes::from("5")));
        let (outcome, change) = store.apply(Write::Delete { key: "a".into() }, now).unwrap();
        assert_eq!(outcome, Outcome::Deleted(true));
        assert_eq!(change.unwrap().value, None);
        let (outcome, change) = store.apply(Write::Delete { key: "a".into() }, now).unwrap();
        assert_eq!((outcome, change), (Outcome::Deleted(false), None));
        assert_eq!((store.seq(), store.total(), store.len()), (3, 0, 0));
    }

    #[test]
    fn an_entry_reads_as_absent_once_its_ttl_passed_and_expire_removes_it_as_a_change() {
        let mut store = Store::default();
        let now = Instant::now();
        let ttl = Some(Duration::from_secs(10));
        let (_, change) = store.apply(set("t", "v", ttl), now).unwrap();
        assert_eq!(change.unwrap().value, Some((Bytes::from("v"), ttl)));
        store.apply(set("keep", "v", None), now).unwrap();
        let later = now + Duration::from_secs(10);
        assert_eq!(
            store.get("t", now + Duration::from_secs(9)),
            Some("v".into())
        );
        assert_eq!(store.get("t", later), None, "expired at its deadline");
        assert_eq!(store.freeze(later).len(), 1, "a snapshot leaves it out");
        let expired = store.expire(later);
        assert_eq!(expired.len(), 1);
        assert_eq!((&*expired[0].key, &expired[0].value), ("t", &None));
        assert_eq!((store.len(), store.total()), (1, 5));
        assert!(store.expire(later).is_empty(), "once");
    }

    #[test]
    fn an_expired_entry_counts_as_absent_to_writes() {
        let mut store = Store::default();
        let now = Instant::now();
        store
            .apply(set("n", "41", Some(Duration::from_secs(1))), now)
            .unwrap();
        let later = now + Duration::from_secs(2);
        let (outcome, _) = store.apply(incr("n", 1), later).unwrap();
        assert_eq!(outcome, Outcome::Counter(1), "counted from 0, not 41");
        store
            .apply(set("c", "x", Some(Duration::from_secs(1))), now)
            .unwrap();
        let (outcome, _) = store.apply(cas("c", None, Some("y")), later).unwrap();
        assert_eq!(outcome, Outcome::Swapped(true), "expired is absent");
        let (outcome, change) = store
            .apply(set("d", "x", Some(Duration::ZERO)), now)
            .map(|(o, c)| (o, c.is_some()))
            .unwrap();
        assert_eq!((outcome, change), (Outcome::Stored, true));
        let (outcome, change) = store.apply(Write::Delete { key: "d".into() }, now).unwrap();
        assert_eq!((outcome, change), (Outcome::Deleted(false), None));
        assert_eq!(store.total(), "n1cy".len(), "the expired d went quietly");
    }

    #[test]
    fn a_counter_keeps_its_deadline_and_a_new_one_takes_the_increment_s() {
        let mut store = Store::default();
        let now = Instant::now();
        let ttl = Some(Duration::from_secs(60));
        let write = Write::Increment {
            key: "c".into(),
            by: 2,
            ttl,
        };
        let (_, change) = store.apply(write, now).unwrap();
        assert_eq!(change.unwrap().value, Some((Bytes::from("2"), ttl)));
        let later = now + Duration::from_secs(20);
        let (_, change) = store.apply(incr("c", -5), later).unwrap();
        assert_eq!(
            change.unwrap().value,
            Some((Bytes::from("-3"), Some(Duration::from_secs(40))))
        );
    }

    #[test]
    fn increment_refuses_a_non_integer_and_an_overflow_and_changes_nothing() {
        let mut store = Store::default();
        let now = Instant::now();
        for bad in ["x", "1.5", " 1", "", "99999999999999999999"] {
            store.apply(set("k", bad, None), now).unwrap();
            let seq = store.seq();
            assert_eq!(
                store.apply(incr("k", 1), now),
                Err(StateError::NotAnInteger("k".into())),
                "{bad:?}"
            );
            assert_eq!(
                store.get("k", now),
                Some(Bytes::copy_from_slice(bad.as_bytes()))
            );
            assert_eq!(store.seq(), seq);
        }
        store
            .apply(set("k", &i64::MAX.to_string(), None), now)
            .unwrap();
        assert_eq!(
            store.apply(incr("k", 1), now),
            Err(StateError::NotAnInteger("k".into()))
        );
        store
            .apply(set("k", &i64::MIN.to_string(), None), now)
            .unwrap();
        assert_eq!(
            store.apply(incr("k", -1), now),
            Err(StateError::NotAnInteger("k".into()))
        );
        assert_eq!(store.get("k", now), Some(Bytes::from(i64::MIN.to_string())));
    }

    #[test]
    fn compare_and_set_swaps_only_on_a_match() {
        let mut store = Store::default();
        let now = Instant::now();
        let (outcome, change) = store.apply(cas("k", Some("a"), Some("b")), now).unwrap();
        assert_eq!((outcome, change), (Outcome::Swapped(false), None));
        let (outcome, _) = store.apply(cas("k", None, Some("a")), now).unwrap();
        assert_eq!(outcome, Outcome::Swapped(true), "absent as expected");
        let (outcome, _) = store.apply(cas("k", None, Some("z")), now).unwrap();
        assert_eq!(outcome, Outcome::Swapped(false), "no longer absent");
        let (outcome, _) = store.apply(cas("k", Some("a"), Some("b")), now).unwrap();
        assert_eq!(outcome, Outcome::Swapped(true));
        assert_eq!(store.get("k", now), Some(Bytes::from("b")));
        let (outcome, change) = store.apply(cas("k", Some("b"), None), now).unwrap();
        assert_eq!(outcome, Outcome::Swapped(true));
        assert_eq!(change.unwrap().value, None, "a swap to nothing removes");
        let (outcome, change) = store.apply(cas("k", None, None), now).unwrap();
        assert_eq!((outcome, change), (Outcome::Swapped(true), None));
    }

    #[test]
    fn writes_past_a_limit_fail_clearly_and_change_nothing() {
        let mut store = small();
        let now = Instant::now();
        store.apply(set("a", "0123456789", None), now).unwrap();
        let before = (store.seq(), store.total(), store.get("a", now));
        assert_eq!(
            store.apply(set("123456789", "v", None), now),
            Err(StateError::TooLarge {
                what: "key",
                len: 9,
                limit: 8
            })
        );
        assert_eq!(
            store.apply(set("a", "01234567890123456", None), now),
            Err(StateError::TooLarge {
                what: "value",
                len: 17,
                limit: 16
            })
        );
        assert_eq!(
            store.apply(cas("a", Some("0123456789"), Some("01234567890123456")), now),
            Err(StateError::TooLarge {
                what: "value",
                len: 17,
                limit: 16
            })
        );
        // 11 held; 2 × 16 more would be 44 > 40.
        store
            .apply(set("b", "0123456789abcdef", None), now)
            .unwrap();
        let full = store.apply(set("c", "0123456789abcdef", None), now);
        assert_eq!(full, Err(StateError::Full { limit: 40 }));
        assert_eq!(store.get("c", now), None);
        assert_eq!(store.total(), 11 + 17);
        // Replacing a value counts the difference, not the sum.
        store
            .apply(set("b", "0123456789abcdef", None), now)
            .unwrap();
        assert_eq!(store.total(), 11 + 17);
        assert_eq!(before.2, store.get("a", now));
        assert_eq!(store.seq(), before.0 + 2, "only the two sets that fit");
        assert_eq!(before.1, 11);
    }

    #[test]
    fn a_huge_ttl_never_expires_instead_of_overflowing() {
        let mut store = Store::default();
        let now = Instant::now();
        let (_, change) = store
            .apply(set("k", "v", Some(Duration::MAX)), now)
            .unwrap();
        assert_eq!(change.unwrap().value, Some((Bytes::from("v"), None)));
        assert_eq!(
            store.get("k", now + Duration::from_secs(1 << 40)),
            Some("v".into())
        );
    }

    #[test]
    fn a_snapshot_restores_into_a_new_store_with_its_remaining_ttls() {
        let mut old = Store::default();
        let now = Instant::now();
        old.apply(set("forever", "1", None), now).unwrap();
        old.apply(set("hour", "2", Some(Duration::from_secs(3600))), now)
            .unwrap();
        old.apply(set("gone", "3", Some(Duration::ZERO)), now)
            .unwrap();
        let mut snapshot = old.snapshot();
        snapshot.sort();
        assert_eq!(snapshot.len(), 2, "the expired entry is left out");
        assert_eq!(snapshot[0].0, "forever");
        assert_eq!(snapshot[0].2, None);
        let ttl = snapshot[1].2.unwrap();
        assert!(ttl <= Duration::from_secs(3600) && ttl > Duration::from_secs(3590));
        let mut new = small();
        let mut with_big = snapshot.clone();
        with_big.push(("big".into(), Bytes::from(vec![b'x'; 17]), None));
        let refused = new.restore(with_big);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, "big");
        let now = Instant::now();
        assert_eq!(new.get("forever", now), Some("1".into()));
        assert_eq!(new.get("hour", now), Some("2".into()));
        assert!(new.get("hour", now + Duration::from_secs(3600)).is_none());
    }
}
