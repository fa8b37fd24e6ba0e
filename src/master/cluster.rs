//! The workers' `metrics`, added up across the cluster. Each worker shares its counters and
//! gauges in a region the master maps (`sys::shm::MetricsRegion`); the master reads them
//! when asked (a scrape, `status`) and once more after the worker exited, folding its final
//! counts into the totals of the workers that are gone. So a counter's cluster total is
//! every increment ever made, including those of workers recycled, drained or SIGKILLed, and
//! it never decreases: what the master saw of a worker is kept as the most it ever read.
//! Gauges are summed over the live workers. Histogram samples arrive in SAMPLES frames and
//! go to the sink the exporter sets.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use crate::sys::shm::{kind, Mapping, MetricsRegion, METRIC_SLOTS};

/// A metric's key as workers write it: the name, then `\0key\0value` per label.
pub(crate) type KeyBytes = Vec<u8>;

/// A worker's key bytes split into the name and its labels; `None` for bytes that are no
/// key (not UTF-8, no name, a label without its value).
pub(crate) fn split_key(bytes: &[u8]) -> Option<(&str, Vec<(&str, &str)>)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split('\0');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let rest: Vec<&str> = parts.collect();
    if rest.len() % 2 != 0 {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(|p| (p[0], p[1])).collect()))
}

/// A key as people read it: `name{key="value",...}` (`None` for bytes that are no key).
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn display_key(bytes: &[u8]) -> Option<String> {
    let (name, labels) = split_key(bytes)?;
    if labels.is_empty() {
        return Some(name.to_owned());
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    Some(format!("{name}{{{}}}", labels.join(",")))
}

/// Where histogram samples go: the exporter's histograms.
pub(crate) type Sink = Box<dyn Fn(&[u8], f64)>;

/// The cluster's figures at one moment.
#[cfg_attr(
    not(any(feature = "control", feature = "prometheus")),
    allow(dead_code)
)]
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Figures {
    /// Every counter's total: live workers' and gone workers' together.
    pub counters: BTreeMap<KeyBytes, u64>,
    /// Every gauge, summed over the live workers.
    pub gauges: BTreeMap<KeyBytes, f64>,
}

/// One live worker's region and what the master has read of it.
#[derive(Debug)]
struct Source {
    region: Mapping<MetricsRegion>,
    /// Each slot's kind and key, read once when first published.
    keys: Vec<(u32, KeyBytes)>,
    /// The most each counter was ever read at.
    seen: Vec<u64>,
}

impl Source {
    /// Reads the region: new slots' keys, every counter (kept as the most seen) and gauge.
    fn read(&mut self) {
        let region = self.region.region();
        let published = (region.published.load(Ordering::Acquire) as usize).min(METRIC_SLOTS);
        while self.keys.len() < published {
            let slot = &region.slots[self.keys.len()];
            let of = slot.kind.load(Ordering::Acquire);
            // A garbage key keeps its slot (the indexes must line up) but is never shown.
            let key = slot.read_key().unwrap_or_default();
            self.keys.push((of, key));
            self.seen.push(0);
        }
        for (index, (of, _)) in self.keys.iter().enumerate() {
            let value = region.slots[index].value.load(Ordering::Relaxed);
            match *of {
                kind::COUNTER => self.seen[index] = self.seen[index].max(value),
                kind::GAUGE => self.seen[index] = value,
                _ => {}
            }
        }
    }
}

/// Distinct counter keys kept for the workers that are gone. One region holds at most 511
/// keys, but a worker that comes back with new keys each time (random labels, a bug, an
/// attack) would grow the totals without end: past this, a gone worker's counts under keys
/// not yet known are dropped, counted ([`Cluster::dropped`]) and logged once.
pub(crate) const MAX_RETIRED_KEYS: usize = 4096;

/// The cluster's metrics.
#[derive(Default)]
pub(crate) struct Cluster {
    live: RefCell<HashMap<u32, Source>>,
    /// Counter totals of the workers that are gone.
    retired: RefCell<BTreeMap<KeyBytes, u64>>,
    /// Counts dropped for want of room for their key (see [`MAX_RETIRED_KEYS`]).
    dropped: std::cell::Cell<u64>,
    sink: RefCell<Option<Sink>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("live", &self.live.borrow().len())
            .field("retired", &self.retired.borrow().len())
            .finish()
    }
}

impl Cluster {
    /// Maps the region process `pid` sent in its METRICS frame.
    pub fn attach(&self, pid: u32, fd: OwnedFd) -> io::Result<()> {
        let mut live = self.live.borrow_mut();
        if live.contains_key(&pid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a second METRICS frame",
            ));
        }
        let source = Source {
            region: Mapping::map(fd)?,
            keys: Vec::new(),
            seen: Vec::new(),
        };
        live.insert(pid, source);
        Ok(())
    }

    /// Process `pid` has exited (reaped: it can count no more): its counters' final values
    /// join the totals of the workers that are gone, and its region is unmapped.
    pub fn retire(&self, pid: u32) {
        let Some(mut source) = self.live.borrow_mut().remove(&pid) else {
            return;
        };
        source.read();
        for ((of, key), seen) in source.keys.into_iter().zip(source.seen) {
            if of == kind::COUNTER && !key.is_empty() {
                self.add_retired(key, seen);
            }
        }
    }

    /// Adds `count` to the gone workers' total of `key`, if there is room for it.
    fn add_retired(&self, key: KeyBytes, count: u64) {
        let mut retired = self.retired.borrow_mut();
        if let Some(total) = retired.get_mut(&key) {
            *total += count;
        } else if retired.len() < MAX_RETIRED_KEYS {
            retired.insert(key, count);
        } else if count > 0 {
            if self.dropped.get() == 0 {
                tracing::warn!(
                    keys = MAX_RETIRED_KEYS,
                    "workers that are gone left more distinct metric keys than kept: \
                     the counts of new ones are dropped (handoff_metric_counts_dropped_total)"
                );
            }
            self.dropped.set(self.dropped.get() + count);
        }
    }

    /// Counts dropped for want of room for their key.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Adds what a replaced master's worker counters grew by from `earlier` to `later` (a
    /// live upgrade: see `carry`) to the totals of the workers that are gone.
    pub fn add_growth(&self, earlier: &BTreeMap<KeyBytes, u64>, later: &BTreeMap<KeyBytes, u64>) {
        for (key, &total) in later {
            let before = earlier.get(key).copied().unwrap_or(0);
            if total > before {
                self.add_retired(key.clone(), total - before);
            }
        }
    }

    /// The cluster's figures now.
    #[cfg_attr(
        not(any(feature = "control", feature = "prometheus")),
        allow(dead_code)
    )]
    pub fn figures(&self) -> Figures {
        let mut figures = Figures {
            counters: self.retired.borrow().clone(),
            gauges: BTreeMap::new(),
        };
        for source in self.live.borrow_mut().values_mut() {
            source.read();
            for ((of, key), seen) in source.keys.iter().zip(&source.seen) {
                if key.is_empty() {
                    continue;
                }
                match *of {
                    kind::COUNTER => *figures.counters.entry(key.clone()).or_default() += seen,
                    kind::GAUGE => {
                        *figures.gauges.entry(key.clone()).or_default() += f64::from_bits(*seen)
                    }
                    _ => {}
                }
            }
        }
        figures
    }

    /// Where histogram samples go from now on.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub fn set_sink(&self, sink: Sink) {
        *self.sink.borrow_mut() = Some(sink);
    }

    /// Histogram samples from process `pid`: each names a histogram slot of its region.
    /// Samples naming anything else are dropped; returns how many were.
    pub fn samples(&self, pid: u32, samples: &[(u32, f64)]) -> usize {
        let sink = self.sink.borrow();
        let mut live = self.live.borrow_mut();
        let Some(source) = live.get_mut(&pid) else {
            return samples.len();
        };
        source.read();
        let mut dropped = 0;
        for &(index, value) in samples {
            match source.keys.get(index as usize) {
                Some((kind::HISTOGRAM, key)) if !key.is_empty() => {
                    if let Some(sink) = sink.as_ref() {
                        sink(key, value);
                    }
                }
                _ => dropped += 1,
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shm::{MetricSlot, METRICS_VERSION};

    fn worker() -> (Mapping<MetricsRegion>, OwnedFd) {
        let region = Mapping::<MetricsRegion>::create().unwrap();
        let fd = region.fd().unwrap().try_clone_to_owned().unwrap();
        assert_eq!(
            region.region().version.load(Ordering::Relaxed),
            METRICS_VERSION
        );
        (region, fd)
    }

    fn publish<'a>(
        region: &'a Mapping<MetricsRegion>,
        index: usize,
        of: u32,
        key: &[u8],
    ) -> &'a MetricSlot {
        let slot = &region.region().slots[index];
        slot.write_key(key);
        slot.kind.store(of, Ordering::Release);
        region
            .region()
            .published
            .store(index as u32 + 1, Ordering::Release);
        slot
    }

    #[test]
    fn counters_add_up_across_workers_and_survive_their_exit() {
        let cluster = Cluster::default();
        let (a, fd_a) = worker();
        let (b, fd_b) = worker();
        cluster.attach(1, fd_a).unwrap();
        cluster.attach(2, fd_b).unwrap();
        publish(&a, 0, kind::COUNTER, b"hits")
            .value
            .store(5, Ordering::Relaxed);
        publish(&b, 0, kind::COUNTER, b"hits")
            .value
            .store(7, Ordering::Relaxed);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 12);
        // Counts after the last read and before the exit are not lost.
        a.region().slots[0].value.store(9, Ordering::Relaxed);
        drop(a);
        cluster.retire(1);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 16);
        cluster.retire(2);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 16);
    }

    #[test]
    fn workers_gone_with_ever_new_keys_cannot_grow_the_totals_without_end() {
        let cluster = Cluster::default();
        let per_worker = 500;
        let workers = MAX_RETIRED_KEYS / per_worker + 2;
        for pid in 1..=workers as u32 {
            let (region, fd) = worker();
            cluster.attach(pid, fd).unwrap();
            for index in 0..per_worker {
                let key = format!("random_total\0id\0{pid}-{index}");
                publish(&region, index, kind::COUNTER, key.as_bytes())
                    .value
                    .store(1, Ordering::Relaxed);
            }
            publish(&region, per_worker, kind::COUNTER, b"hits")
                .value
                .store(2, Ordering::Relaxed);
            cluster.retire(pid);
        }
        let figures = cluster.figures();
        assert_eq!(figures.counters.len(), MAX_RETIRED_KEYS);
        let kept: u64 = figures.counters.values().sum();
        let total = (workers * (per_worker + 2)) as u64;
        assert_eq!(
            kept + cluster.dropped(),
            total,
            "every count kept or counted"
        );
        assert!(cluster.dropped() > 0);
        // A key already kept still counts in full.
        assert_eq!(figures.counters[&b"hits".to_vec()], 2 * workers as u64);
    }

    #[test]
    fn a_counter_never_goes_down_even_if_a_worker_writes_a_smaller_value() {
        let cluster = Cluster::default();
        let (a, fd) = worker();
        cluster.attach(1, fd).unwrap();
        let slot = publish(&a, 0, kind::COUNTER, b"hits");
        slot.value.store(10, Ordering::Relaxed);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 10);
        slot.value.store(3, Ordering::Relaxed);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 10);
        cluster.retire(1);
        assert_eq!(cluster.figures().counters[&b"hits".to_vec()], 10);
    }

    #[test]
    fn gauges_sum_over_live_workers_only() {
        let cluster = Cluster::default();
        let (a, fd_a) = worker();
        let (b, fd_b) = worker();
        cluster.attach(1, fd_a).unwrap();
        cluster.attach(2, fd_b).unwrap();
        publish(&a, 0, kind::GAUGE, b"queue")
            .value
            .store(1.5f64.to_bits(), Ordering::Relaxed);
        publish(&b, 0, kind::GAUGE, b"queue")
            .value
            .store(2.0f64.to_bits(), Ordering::Relaxed);
        assert_eq!(cluster.figures().gauges[&b"queue".to_vec()], 3.5);
        cluster.retire(1);
        assert_eq!(cluster.figures().gauges[&b"queue".to_vec()], 2.0);
    }

    #[test]
    fn samples_reach_the_sink_and_bad_ones_are_dropped() {
        let cluster = Cluster::default();
        let got = std::rc::Rc::new(RefCell::new(Vec::new()));
        let into = got.clone();
        cluster.set_sink(Box::new(move |key, value| {
            into.borrow_mut().push((key.to_vec(), value))
        }));
        let (a, fd) = worker();
        cluster.attach(1, fd).unwrap();
        publish(&a, 0, kind::HISTOGRAM, b"latency");
        publish(&a, 1, kind::COUNTER, b"hits");
        let dropped = cluster.samples(1, &[(0, 0.5), (1, 1.0), (99, 2.0)]);
        assert_eq!(dropped, 2, "a counter's slot and a slot never published");
        assert_eq!(*got.borrow(), vec![(b"latency".to_vec(), 0.5)]);
        assert_eq!(cluster.samples(77, &[(0, 1.0)]), 1, "an unknown worker");
    }

    #[test]
    fn keys_display_as_prometheus_writes_them() {
        assert_eq!(display_key(b"hits").unwrap(), "hits");
        assert_eq!(
            display_key(b"hits\0code\x00200\0m\0GET").unwrap(),
            r#"hits{code="200",m="GET"}"#
        );
        assert_eq!(display_key(b"hits\0odd"), None);
        assert_eq!(display_key(b""), None);
    }

    #[test]
    fn a_second_region_from_one_worker_is_refused() {
        let cluster = Cluster::default();
        let (_a, fd) = worker();
        let again = fd.try_clone().unwrap();
        cluster.attach(1, fd).unwrap();
        assert!(cluster.attach(1, again).is_err());
    }
}
