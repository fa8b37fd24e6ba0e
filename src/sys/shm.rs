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
use std::sync::atomic::{AtomicU32, AtomicU64};

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

/// A mapping of a counters region.
#[derive(Debug)]
pub struct Counters {
    region: NonNull<Region>,
    /// The memfd, kept by the worker to send; the master closes it once mapped (the mapping
    /// stays), so a worker's region costs the master no fd.
    fd: Option<OwnedFd>,
}

// SAFETY: the region holds only atomics, shared by design; the pointer stays valid until
// `Drop` unmaps it, and nothing hands out a `&mut Region`.
unsafe impl Send for Counters {}
// SAFETY: as above; every access goes through `&AtomicU*`.
unsafe impl Sync for Counters {}

impl Counters {
    /// In a worker: a new sealed memfd of [`LEN`] bytes (zeroed), mapped, its version set.
    pub fn create() -> io::Result<Counters> {
        let fd = rustix::fs::memfd_create(
            c"handoff-counters",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, LEN as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let counters = Counters::mmap(fd)?;
        counters
            .region()
            .version
            .store(VERSION, std::sync::atomic::Ordering::SeqCst);
        Ok(counters)
    }

    /// In the master: maps the region a worker sent, after checking that it is a memfd
    /// sealed against shrinking, of at least [`LEN`] bytes, in this layout's version.
    pub fn map(fd: OwnedFd) -> io::Result<Counters> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|_| invalid("the counters fd is not a sealable memfd"))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(invalid(
                "the counters memfd is not sealed against shrinking",
            ));
        }
        let size = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if size < LEN as u64 {
            return Err(invalid("the counters memfd is smaller than a page"));
        }
        let mut counters = Counters::mmap(fd)?;
        counters.fd = None;
        let version = counters
            .region()
            .version
            .load(std::sync::atomic::Ordering::SeqCst);
        if version != VERSION {
            return Err(invalid(&format!(
                "the counters region has version {version}, not {VERSION}"
            )));
        }
        Ok(counters)
    }

    fn mmap(fd: OwnedFd) -> io::Result<Counters> {
        // SAFETY: a new shared mapping of LEN bytes of `fd`, which is at least LEN bytes
        // long and cannot shrink (sealed); the kernel picks the address.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let region = NonNull::new(ptr.cast::<Region>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Counters {
            region,
            fd: Some(fd),
        })
    }

    /// The shared counters.
    pub fn region(&self) -> &Region {
        // SAFETY: the mapping is page-aligned (so aligned for Region), LEN ≥ its size, lives
        // until drop, and holds only atomics (any bit pattern is a valid value).
        unsafe { self.region.as_ref() }
    }

    /// The memfd, to send to the master (`None` in the master, which closed it).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `mmap`, of LEN bytes, unmapped once; no reference to
        // the region outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.region.as_ptr().cast(), LEN) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

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
