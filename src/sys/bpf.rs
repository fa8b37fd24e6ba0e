//! eBPF for `--strategy kernel-least`: the raw `bpf(2)` calls that create maps, update and
//! delete their elements and load a program ([`bpf(2)`]), attaching a program to a
//! `SO_REUSEPORT` group (`setsockopt(SO_ATTACH_REUSEPORT_EBPF)`, [`socket(7)`]), a shared
//! mapping of a `BPF_F_MMAPABLE` array ([`MappedArray`]), and the accept queue length of a
//! listener (`TCP_INFO`). rustix wraps none of these, so each call goes through
//! `libc::syscall` / `libc::setsockopt` here, with a `// SAFETY:` line. The attribute union
//! is built as 144 zeroed bytes with each field written at its offset in `union bpf_attr`
//! (checked against `linux/bpf.h`); the kernel requires unused trailing bytes to be zero.
//!
//! [`bpf(2)`]: https://man7.org/linux/man-pages/man2/bpf.2.html
//! [`socket(7)`]: https://man7.org/linux/man-pages/man7/socket.7.html

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use rustix::mm::{MapFlags, ProtFlags};

/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`.
pub const MAP_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_F_MMAPABLE`: an array map whose values can be `mmap`ped.
pub const F_MMAPABLE: u32 = 1 << 10;
/// `BPF_PROG_TYPE_SK_REUSEPORT`.
pub const PROG_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`: the program picks a listener for each new
/// connection, and also for the requests and connections queued on a
/// listener that closes (kernel 5.14).
pub const ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

const CMD_MAP_CREATE: libc::c_int = 0;
const CMD_MAP_UPDATE_ELEM: libc::c_int = 2;
const CMD_MAP_DELETE_ELEM: libc::c_int = 3;
const CMD_PROG_LOAD: libc::c_int = 5;
/// `sizeof(union bpf_attr)` on Linux 6.x.
const ATTR_LEN: usize = 144;
/// `SO_ATTACH_REUSEPORT_EBPF` (the same value on every architecture Linux has).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `union bpf_attr`, as zeroed bytes with fields written at their offsets.
#[repr(C, align(8))]
struct Attr([u8; ATTR_LEN]);

impl Attr {
    fn new() -> Self {
        Attr([0; ATTR_LEN])
    }

    fn u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn name(&mut self, offset: usize, name: &str) -> &mut Self {
        // BPF_OBJ_NAME_LEN is 16 with the NUL; the kernel accepts [A-Za-z0-9_.].
        let bytes = name.as_bytes();
        let len = bytes.len().min(15);
        self.0[offset..offset + len].copy_from_slice(&bytes[..len]);
        self
    }
}

/// `bpf(cmd, attr, sizeof attr)`; the returned value (an fd for the creating commands).
fn bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable `union bpf_attr` of ATTR_LEN bytes for the whole
    // call; every pointer written into it (keys, values, instructions, license, log buffer)
    // points to memory the caller keeps alive and sized as declared until this returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            ATTR_LEN as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An fd the kernel just returned, owned from this instant.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("bpf returned no fd"))?;
    // SAFETY: a non-negative return of a bpf command that creates an object is a new fd
    // that nothing else owns (bpf fds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf(BPF_MAP_CREATE)`: a new map, its fd.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags)
        .name(28, name);
    owned(bpf(CMD_MAP_CREATE, &mut attr)?)
}

/// `bpf(BPF_MAP_UPDATE_ELEM, BPF_ANY)`: sets `key` to `value` (for a socket array, `value`
/// is the listener's fd as a `u64`).
pub fn update_elem(map: &impl AsFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_fd().as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64)
        .u64(24, 0);
    bpf(CMD_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `bpf(BPF_MAP_DELETE_ELEM)`: removes `key`; a key that is not there is no error.
pub fn delete_elem(map: &impl AsFd, key: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_fd().as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64);
    match bpf(CMD_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

/// Why a program did not load.
#[derive(Debug)]
pub struct LoadError {
    /// The OS error (`EACCES` or `EINVAL` for a program the verifier refused, `EPERM`
    /// without `CAP_BPF`).
    pub error: io::Error,
    /// The verifier's log, when it refused the program.
    pub log: String,
}

/// `bpf(BPF_PROG_LOAD)`: loads `insns` (8 bytes each, in the machine's byte order) as a
/// program of `prog_type` for `attach_type`, GPL-licensed (the helpers it may call are not
/// restricted to GPL programs, but the license costs nothing). On failure it loads again
/// with the verifier's log on, to return it.
pub fn load_program(
    prog_type: u32,
    attach_type: u32,
    insns: &[[u8; 8]],
    name: &str,
) -> Result<OwnedFd, LoadError> {
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .name(48, name)
        .u32(68, attach_type);
    match bpf(CMD_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd).map_err(|error| LoadError {
            error,
            log: String::new(),
        }),
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => Err(LoadError {
            error,
            log: String::new(),
        }),
        Err(error) => {
            let mut log = vec![0u8; 1 << 20];
            attr.u32(24, 1)
                .u32(28, log.len() as u32)
                .u64(32, log.as_mut_ptr() as u64);
            let _ = bpf(CMD_PROG_LOAD, &mut attr).map(owned);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(LoadError {
                error,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// `setsockopt(SO_ATTACH_REUSEPORT_EBPF)`: `program` picks the listener for each new
/// connection of the `SO_REUSEPORT` group `socket` belongs to (one attach serves the group).
pub fn attach_reuseport(socket: &impl AsFd, program: &impl AsFd) -> io::Result<()> {
    let prog: libc::c_int = program.as_fd().as_raw_fd();
    // SAFETY: a valid socket fd, and a pointer to a c_int of the stated length that lives
    // through the call.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            (&prog as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `getsockopt(TCP_INFO)` on a listener: connections waiting in its accept queue
/// (`tcpi_unacked` is the accept backlog for a listening socket).
pub fn accept_queue_len(listener: &impl AsFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, and a writable tcp_info of `len` bytes that lives through the
    // call; the kernel writes at most `len` bytes and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            listener.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(info.tcpi_unacked)
    }
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array map of one element, seen as
/// 64-bit atomics: the program's atomic adds and the processes' are on the same memory.
#[derive(Debug)]
pub struct MappedArray {
    ptr: NonNull<AtomicU64>,
    words: usize,
    len: usize,
}

// SAFETY: the mapping holds only atomics, shared by design; it stays valid until `Drop`
// unmaps it, and nothing hands out a `&mut` to it.
unsafe impl Send for MappedArray {}
// SAFETY: as above; every access goes through `&AtomicU64`.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// `mmap(2)`s the value of a `BPF_F_MMAPABLE` array map of one element of `value_size`
    /// bytes (a multiple of 8). The map fd may be closed afterwards: the mapping holds it.
    pub fn map(map: &impl AsFd, value_size: usize) -> io::Result<MappedArray> {
        if value_size == 0 || value_size % 8 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a mapped array's value is a whole number of 64-bit words",
            ));
        }
        let page = rustix::param::page_size();
        let len = value_size.div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's value area, which the kernel sizes to
        // whole pages of at least `value_size` bytes (it refuses a longer mapping); the
        // kernel picks the address.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                map,
                0,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(MappedArray {
            ptr,
            words: value_size / 8,
            len,
        })
    }

    /// The value's 64-bit words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, at least `words * 8` bytes long, lives until
        // drop, and is only ever accessed atomically (any bit pattern is a valid u64).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` bytes, unmapped once; no reference to
        // it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// Whether this process may use bpf(2) (CAP_BPF); tests that need it say so and pass
    /// without it, since a developer's machine may not run them as root. CI runs as root.
    fn bpf_allowed() -> bool {
        create_map(MAP_ARRAY, 4, 8, 1, 0, "probe").is_ok()
    }

    #[test]
    fn a_mapped_array_shares_its_words_between_mappings() {
        if !bpf_allowed() {
            eprintln!("skipped: bpf(2) needs CAP_BPF");
            return;
        }
        let map = create_map(MAP_ARRAY, 4, 4096, 1, F_MMAPABLE, "test").unwrap();
        let one = MappedArray::map(&map, 4096).unwrap();
        let two = MappedArray::map(&map, 4096).unwrap();
        drop(map);
        one.words()[3].fetch_add(5, Ordering::SeqCst);
        assert_eq!(two.words()[3].load(Ordering::SeqCst), 5);
        assert_eq!(two.words().len(), 512);
    }

    #[test]
    fn a_value_size_that_is_not_whole_words_is_refused() {
        let fd: OwnedFd = tempfile::tempfile().unwrap().into();
        assert!(MappedArray::map(&fd, 12).is_err());
    }
}
