//! The counters a worker shares with the master in memory: a sealed memfd of one page,
//! mapped by both. The worker creates it ([`Counters::create`]), sends its fd in a COUNTERS
//! frame and counts its received and finished connections there with atomic adds; the
//! master maps it ([`Counters::map`]) and reads the totals when it chooses, without a frame
//! per connection, and still after the worker died. The memfd is sealed against shrinking
//! and growing, so a worker cannot truncate it under the master's mapping (which would
//! raise `SIGBUS` in the master).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The layout of the region; a change of it changes [`VERSION`].
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Region {
    /// [`VERSION`], written by the worker before it sends the fd.
    pub version: AtomicU32,
    _pad: u32,
    /// Connections the worker received, since it started (written by the worker).
    pub received: AtomicU64,
    /// Connections the worker finished, since it started (written by the worker).
    pub closed: AtomicU64,
    /// Connections the worker refused (REFUSED frames), since it started: added to before
    /// `received` moves past them, so the master can tell a REFUSED frame is on its way
    /// and wait for it rather than take a refused connection for a received one.
    pub refused: AtomicU64,
    /// The master's cache line: 1 asks the worker for a STATUS frame at its next change
    /// (the master is waiting for its progress); the worker resets it when it sends one.
    pub wake: Aligned<AtomicU32>,
}

/// A value on a cache line of its own.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Aligned<T>(pub T);

/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;

/// The size of the memfd and of each mapping: one page.
pub const LEN: usize = 4096;

const _: () = assert!(std::mem::size_of::<Region>() <= LEN);

/// A region layout shared through a sealed memfd: only atomics, any bit pattern valid.
pub trait Layout {
    /// The memfd's name (in `/proc/PID/fd`).
    const NAME: &'static std::ffi::CStr;
    /// Bytes of the memfd and of each mapping; at least the layout's size.
    const LEN: usize;
    /// The layout's version, written by the worker and checked by the master.
    const VERSION: u32;
    /// Where the version is kept.
    fn version(&self) -> &AtomicU32;
}

impl Layout for Region {
    const NAME: &'static std::ffi::CStr = c"handoff-counters";
    const LEN: usize = LEN;
    const VERSION: u32 = VERSION;
    fn version(&self) -> &AtomicU32 {
        &self.version
    }
}

/// Bytes of a metric's key in a [`MetricSlot`], at most.
pub const KEY_BYTES: usize = 240;
const KEY_WORDS: usize = KEY_BYTES / 8;
/// Metrics one worker can share.
pub const METRIC_SLOTS: usize = 511;

/// What a [`MetricSlot`] holds (0 until it is published).
pub mod kind {
    /// A counter: `value` is its total, only ever increased.
    pub const COUNTER: u32 = 1;
    /// A gauge: `value` holds an f64's bits.
    pub const GAUGE: u32 = 2;
    /// A histogram: its samples travel in SAMPLES frames; `value` is unused.
    pub const HISTOGRAM: u32 = 3;
}

/// A worker's `metrics` counters and gauges, in a memfd the master maps: the worker
/// publishes a slot per metric (its key, then its kind, then `published`), and adds to its
/// value with atomics; the master reads the values whenever it is asked for them, and once
/// more after the worker exited (the mapping outlives it), so no increment is lost.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct MetricsRegion {
    /// [`METRICS_VERSION`].
    pub version: AtomicU32,
    /// Slots published, in order: slot `i` is complete once `published > i` (Release).
    pub published: AtomicU32,
    _pad: [u64; 7],
    /// The metrics.
    pub slots: [MetricSlot; METRIC_SLOTS],
}

/// One metric of a [`MetricsRegion`].
#[repr(C)]
#[derive(Debug)]
pub struct MetricSlot {
    /// A counter's total, or a gauge's f64 bits.
    pub value: AtomicU64,
    /// One of [`kind`].
    pub kind: AtomicU32,
    /// Bytes of `key` in use.
    pub key_len: AtomicU32,
    key: [AtomicU64; KEY_WORDS],
}

impl MetricSlot {
    /// Writes `key` (at most [`KEY_BYTES`]); before the slot is published.
    pub fn write_key(&self, key: &[u8]) {
        debug_assert!(key.len() <= KEY_BYTES);
        for (word, chunk) in self.key.iter().zip(key.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        self.key_len.store(key.len() as u32, Ordering::Relaxed);
    }

    /// The key, or `None` if its length is out of bounds (a worker that wrote garbage).
    pub fn read_key(&self) -> Option<Vec<u8>> {
        let len = self.key_len.load(Ordering::Relaxed) as usize;
        if len > KEY_BYTES {
            return None;
        }
        let mut key: Vec<u8> = self
            .key
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        key.truncate(len);
        Some(key)
    }
}

/// The metrics layout version this build writes and reads.
pub const METRICS_VERSION: u32 = 1;

/// Bytes of a metrics memfd.
pub const METRICS_LEN: usize = 128 * 1024;

const _: () = assert!(std::mem::size_of::<MetricSlot>() == 256);
const _: () = assert!(std::mem::size_of::<MetricsRegion>() <= METRICS_LEN);

impl Layout for MetricsRegion {
    const NAME: &'static std::ffi::CStr = c"handoff-metrics";
    const LEN: usize = METRICS_LEN;
    const VERSION: u32 = METRICS_VERSION;
    fn version(&self) -> &AtomicU32 {
        &self.version
    }
}

/// A mapping of a shared region.
#[derive(Debug)]
pub struct Mapping<R: Layout> {
    region: NonNull<R>,
    /// The memfd, kept by the worker to send; the master closes it once mapped (the mapping
    /// stays), so a worker's region costs the master no fd.
    fd: Option<OwnedFd>,
}

/// A mapping of a worker's connection counters.
pub type Counters = Mapping<Region>;

// SAFETY: a region holds only atomics, shared by design; the pointer stays valid until
// `Drop` unmaps it, and nothing hands out a `&mut R`.
unsafe impl<R: Layout + Sync> Send for Mapping<R> {}
// SAFETY: as above; every access goes through `&R`, whose fields are atomics.
unsafe impl<R: Layout + Sync> Sync for Mapping<R> {}

impl<R: Layout> Mapping<R> {
    /// In a worker: a new sealed memfd of `R::LEN` bytes (zeroed), mapped, its version set.
    pub fn create() -> io::Result<Self> {
        let fd =
            rustix::fs::memfd_create(R::NAME, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, R::LEN as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let mapping = Self::mmap(fd)?;
        mapping
            .region()
            .version()
            .store(R::VERSION, std::sync::atomic::Ordering::SeqCst);
        Ok(mapping)
    }

    /// In the master: maps the region a worker sent, after checking that it is a memfd
    /// sealed against shrinking, of at least `R::LEN` bytes, in this layout's version.
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|_| invalid("the region's fd is not a sealable memfd"))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(invalid(
                "the region's memfd is not sealed against shrinking",
            ));
        }
        let size = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if size < R::LEN as u64 {
            return Err(invalid(&format!(
                "the region's memfd is smaller than {} bytes",
                R::LEN
            )));
        }
        let mut mapping = Self::mmap(fd)?;
        mapping.fd = None;
        let version = mapping
            .region()
            .version()
            .load(std::sync::atomic::Ordering::SeqCst);
        if version != R::VERSION {
            return Err(invalid(&format!(
                "the region has version {version}, not {}",
                R::VERSION
            )));
        }
        Ok(mapping)
    }

    fn mmap(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: a new shared mapping of R::LEN bytes of `fd`, which is at least that long
        // and cannot shrink (sealed); the kernel picks the address.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                R::LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let region = NonNull::new(ptr.cast::<R>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Mapping {
            region,
            fd: Some(fd),
        })
    }

    /// The shared region.
    pub fn region(&self) -> &R {
        // SAFETY: the mapping is page-aligned (so aligned for R), R::LEN ≥ its size, lives
        // until drop, and holds only atomics (any bit pattern is a valid value).
        unsafe { self.region.as_ref() }
    }

    /// The memfd, to send to the master (`None` in the master, which closed it).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }
}

impl<R: Layout> Drop for Mapping<R> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `mmap`, of R::LEN bytes, unmapped once; no reference
        // to the region outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.region.as_ptr().cast(), R::LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_mappings_see_the_same_counters() {
        let worker = Counters::create().unwrap();
        let master = Counters::map(worker.fd().unwrap().try_clone_to_owned().unwrap()).unwrap();
        worker.region().received.fetch_add(3, Ordering::SeqCst);
        worker.region().closed.fetch_add(1, Ordering::SeqCst);
        assert_eq!(master.region().received.load(Ordering::SeqCst), 3);
        assert_eq!(master.region().closed.load(Ordering::SeqCst), 1);
        master.region().wake.0.store(1, Ordering::SeqCst);
        assert_eq!(worker.region().wake.0.swap(0, Ordering::SeqCst), 1);
        drop(worker);
        assert_eq!(
            master.region().received.load(Ordering::SeqCst),
            3,
            "the master's mapping outlives the worker's"
        );
    }

    #[test]
    fn the_master_keeps_the_mapping_but_not_the_fd() {
        let worker = Counters::create().unwrap();
        let master = Counters::map(worker.fd().unwrap().try_clone_to_owned().unwrap()).unwrap();
        assert!(master.fd().is_none(), "closed once mapped");
        worker.region().received.fetch_add(1, Ordering::SeqCst);
        assert_eq!(master.region().received.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn metric_slots_carry_their_key_and_value_to_the_master() {
        let worker = Mapping::<MetricsRegion>::create().unwrap();
        let fd = worker.fd().unwrap().try_clone_to_owned().unwrap();
        let master = Mapping::<MetricsRegion>::map(fd).unwrap();
        let slot = &worker.region().slots[3];
        slot.write_key(b"requests_total\0method\x00GET");
        slot.kind.store(kind::COUNTER, Ordering::Release);
        slot.value.fetch_add(5, Ordering::Relaxed);
        let seen = &master.region().slots[3];
        assert_eq!(seen.read_key().unwrap(), b"requests_total\0method\x00GET");
        assert_eq!(seen.kind.load(Ordering::Acquire), kind::COUNTER);
        assert_eq!(seen.value.load(Ordering::Relaxed), 5);
        seen.key_len.store(10_000, Ordering::Relaxed);
        assert_eq!(seen.read_key(), None, "a garbage length is refused");
        let full = vec![b'x'; KEY_BYTES];
        slot.write_key(&full);
        assert_eq!(master.region().slots[3].read_key().unwrap(), full);
    }

    #[test]
    fn a_worker_cannot_shrink_the_region_under_the_master() {
        let worker = Counters::create().unwrap();
        let file = std::fs::File::from(worker.fd().unwrap().try_clone_to_owned().unwrap());
        assert!(file.set_len(0).is_err(), "sealed against shrinking");
    }

    #[test]
    fn anything_but_a_sealed_memfd_of_this_version_is_refused() {
        let file: OwnedFd = tempfile::tempfile().unwrap().into();
        let error = Counters::map(file).unwrap_err();
        assert!(error.to_string().contains("memfd"), "{error}");

        // A memfd without seals.
        let unsealed = rustix::fs::memfd_create(c"x", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, LEN as u64).unwrap();
        assert!(Counters::map(unsealed).is_err());

        let worker = Counters::create().unwrap();
        worker.region().version.store(99, Ordering::SeqCst);
        let error = Counters::map(worker.fd().unwrap().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(error.to_string().contains("version 99"), "{error}");
    }
}
