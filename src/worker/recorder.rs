//! The `metrics` recorder of a worker: `metrics::counter!`, `gauge!` and `histogram!` in the
//! worker's code land in memory the master maps (`sys::shm::MetricsRegion`), so the master
//! adds them up across the cluster without a message per increment, and an increment is
//! never lost to the worker's death: the master reads the region once more after it exited.
//! Histogram samples are buffered and sent to the master in SAMPLES frames every second
//! (and when the worker ends); a worker killed outright loses at most that second's samples.
//!
//! Keys: the name, then each label as `\0key\0value`, at most [`KEY_BYTES`] bytes; a metric
//! past that, or past the region's [`METRIC_SLOTS`], counts only locally (logged once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use crate::ipc::frame::{self, SAMPLE_LEN};
use crate::ipc::message::MAX_PAYLOAD;
use crate::ipc::Channel;
use crate::sys::shm::{kind, Mapping, MetricsRegion, KEY_BYTES, METRIC_SLOTS};

/// Histogram samples buffered between two flushes, at most; past it they are dropped.
const MAX_BUFFERED_SAMPLES: usize = 1 << 16;
/// How often buffered samples go to the master.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// A key's bytes in the region: `name`, then `\0key\0value` per label.
pub fn encode_key(key: &Key) -> Vec<u8> {
    let mut bytes = key.name().as_bytes().to_vec();
    for label in key.labels() {
        bytes.push(0);
        bytes.extend_from_slice(label.key().as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(label.value().as_bytes());
    }
    bytes
}

/// The recorder a worker installs.
#[derive(Debug)]
pub(crate) struct SharedRecorder {
    region: Arc<Mapping<MetricsRegion>>,
    state: Mutex<Registry>,
    samples: Arc<Samples>,
    warned: AtomicBool,
}

#[derive(Debug, Default)]
struct Registry {
    slots: HashMap<(u32, Vec<u8>), usize>,
    next: usize,
}

/// Histogram samples waiting for the next SAMPLES frame.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    buffer: Mutex<Vec<(u32, f64)>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl SharedRecorder {
    pub fn new(region: Mapping<MetricsRegion>) -> Self {
        SharedRecorder {
            region: Arc::new(region),
            state: Mutex::new(Registry::default()),
            samples: Arc::new(Samples::default()),
            warned: AtomicBool::new(false),
        }
    }

    pub fn samples(&self) -> Arc<Samples> {
        self.samples.clone()
    }

    /// The slot of `key` as a metric of kind `of`, published on first use; `None` when it
    /// cannot be shared (key too long, region full).
    fn slot(&self, of: u32, key: &Key) -> Option<usize> {
        let bytes = encode_key(key);
        let mut registry = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&index) = registry.slots.get(&(of, bytes.clone())) {
            return Some(index);
        }
        if bytes.len() > KEY_BYTES || registry.next >= METRIC_SLOTS {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    metric = key.name(),
                    "this metric is counted in this worker only: its key is over {KEY_BYTES} bytes or the worker has {METRIC_SLOTS} metrics already"
                );
            }
            return None;
        }
        let index = registry.next;
        let slot = &self.region.region().slots[index];
        slot.write_key(&bytes);
        slot.kind.store(of, Ordering::Release);
        registry.next += 1;
        self.region
            .region()
            .published
            .store(registry.next as u32, Ordering::Release);
        registry.slots.insert((of, bytes), index);
        Some(index)
    }
}

/// A handle on one slot.
#[derive(Debug)]
struct SlotHandle {
    region: Arc<Mapping<MetricsRegion>>,
    index: usize,
}

impl SlotHandle {
    fn value(&self) -> &std::sync::atomic::AtomicU64 {
        &self.region.region().slots[self.index].value
    }

    fn update_f64(&self, change: impl Fn(f64) -> f64) {
        let _ = self
            .value()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(change(f64::from_bits(bits)).to_bits())
            });
    }
}

impl CounterFn for SlotHandle {
    fn increment(&self, value: u64) {
        self.value().fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.value().fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for SlotHandle {
    fn increment(&self, value: f64) {
        self.update_f64(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update_f64(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.value().store(value.to_bits(), Ordering::Relaxed);
    }
}

/// A histogram: its samples go to the buffer.
#[derive(Debug)]
struct SampleHandle {
    samples: Arc<Samples>,
    index: u32,
}

impl HistogramFn for SampleHandle {
    fn record(&self, value: f64) {
        let mut buffer = self
            .samples
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if buffer.len() >= MAX_BUFFERED_SAMPLES {
            self.samples.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buffer.push((self.index, value));
    }
}

impl Recorder for SharedRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.slot(kind::COUNTER, key) {
            Some(index) => Counter::from_arc(Arc::new(SlotHandle {
                region: self.region.clone(),
                index,
            })),
            None => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.slot(kind::GAUGE, key) {
            Some(index) => Gauge::from_arc(Arc::new(SlotHandle {
                region: self.region.clone(),
                index,
            })),
            None => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.slot(kind::HISTOGRAM, key) {
            Some(index) => Histogram::from_arc(Arc::new(SampleHandle {
                samples: self.samples.clone(),
                index: index as u32,
            })),
            None => Histogram::noop(),
        }
    }
}

impl Samples {
    /// Sends every buffered sample to the master, in frames of at most [`MAX_PAYLOAD`].
    pub async fn flush(&self, channel: &Channel) -> std::io::Result<()> {
        let taken = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|e| e.into_inner()));
        let mut bytes = Vec::new();
        for chunk in taken.chunks(MAX_PAYLOAD / SAMPLE_LEN) {
            frame::encode_samples(&mut bytes, chunk);
            channel.send(&bytes, &[]).await?;
        }
        Ok(())
    }
}

/// Creates the metrics region, sends its fd to the master in a METRICS frame and installs
/// the recorder as the process's global one; returns the sample buffer to flush. `None` (and
/// a debug line) when any step fails, e.g. the program installed a recorder of its own.
pub(crate) async fn install(channel: &Channel) -> Option<Arc<Samples>> {
    let region = match Mapping::<MetricsRegion>::create() {
        Ok(region) => region,
        Err(e) => {
            tracing::debug!(error = %e, "no shared metrics: creating the region failed");
            return None;
        }
    };
    let mut bytes = Vec::new();
    frame::encode_metrics(&mut bytes);
    let fd = region.fd().expect("a new region has its fd");
    if let Err(e) = channel.send(&bytes, &[fd]).await {
        tracing::debug!(error = %e, "no shared metrics: sending the region failed");
        return None;
    }
    let recorder = SharedRecorder::new(region);
    let samples = recorder.samples();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => Some(samples),
        Err(_) => {
            tracing::debug!("no shared metrics: the program installed a recorder of its own");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (SharedRecorder, Mapping<MetricsRegion>) {
        let region = Mapping::<MetricsRegion>::create().unwrap();
        let fd = region.fd().unwrap().try_clone_to_owned().unwrap();
        (SharedRecorder::new(region), Mapping::map(fd).unwrap())
    }

    #[test]
    fn counters_and_gauges_land_in_the_region_the_master_maps() {
        let (recorder, master) = recorder();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("served_total", "code" => "200").increment(3);
            metrics::counter!("served_total", "code" => "200").increment(2);
            metrics::counter!("served_total", "code" => "500").increment(1);
            metrics::gauge!("queue").set(2.5);
            metrics::gauge!("queue").increment(1.0);
        });
        let region = master.region();
        assert_eq!(region.published.load(Ordering::Acquire), 3);
        assert_eq!(
            region.slots[0].read_key().unwrap(),
            b"served_total\0code\x00200"
        );
        assert_eq!(region.slots[0].value.load(Ordering::Relaxed), 5);
        assert_eq!(region.slots[1].value.load(Ordering::Relaxed), 1);
        assert_eq!(region.slots[2].kind.load(Ordering::Acquire), kind::GAUGE);
        assert_eq!(
            f64::from_bits(region.slots[2].value.load(Ordering::Relaxed)),
            3.5
        );
    }

    #[test]
    fn histograms_buffer_their_samples_and_a_full_buffer_drops_and_counts() {
        let (recorder, _master) = recorder();
        let samples = recorder.samples();
        metrics::with_local_recorder(&recorder, || {
            let latency = metrics::histogram!("latency_seconds");
            for _ in 0..MAX_BUFFERED_SAMPLES + 5 {
                latency.record(0.25);
            }
        });
        assert_eq!(samples.buffer.lock().unwrap().len(), MAX_BUFFERED_SAMPLES);
        assert_eq!(samples.dropped.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_key_too_long_counts_locally_instead_of_failing() {
        let (recorder, master) = recorder();
        let long = "x".repeat(KEY_BYTES + 1);
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(long).increment(1);
            metrics::counter!("short").increment(1);
        });
        assert_eq!(master.region().published.load(Ordering::Acquire), 1);
        assert_eq!(master.region().slots[0].read_key().unwrap(), b"short");
    }
}
