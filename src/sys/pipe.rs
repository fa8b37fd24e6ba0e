//! `pipe2(2)` and `splice(2)`: the kernel moves a connection's bytes from one socket into a
//! pipe and from the pipe into the other socket, by reference to the socket buffers' pages,
//! never through this process's memory (the proxy's zero-copy relay, `crate::proxy::relay`).
//! rustix makes every call here safe; this file only names them and fixes their flags.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};

/// A pipe used as a splice buffer: both ends non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// `pipe2(O_NONBLOCK | O_CLOEXEC)`, then `fcntl(F_SETPIPE_SZ)` to `capacity` bytes when
    /// that is not 0 (the kernel rounds up to a power of two pages; a refusal, e.g. above
    /// `/proc/sys/fs/pipe-max-size`, leaves the default of 64 KiB).
    pub fn new(capacity: usize) -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        if capacity > 0 {
            let _ = rustix::pipe::fcntl_setpipe_size(&write, capacity);
        }
        Ok(Pipe { read, write })
    }

    /// The pipe's capacity in bytes (`fcntl(F_GETPIPE_SZ)`).
    pub fn capacity(&self) -> io::Result<usize> {
        Ok(rustix::pipe::fcntl_getpipe_size(&self.write)?)
    }

    /// `splice(from, NULL, pipe, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`: up to `len`
    /// bytes from a socket into the pipe. `Ok(0)` is the end of the stream; `WouldBlock`
    /// means the socket has nothing to read (or the pipe is full).
    pub fn fill_from(&self, from: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(rustix::pipe::splice(
            from,
            None,
            &self.write,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }

    /// `splice(pipe, NULL, to, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`: up to `len`
    /// bytes the pipe holds into a socket. `WouldBlock` means the socket's send buffer is full
    /// (or the pipe is empty: call it only with bytes in the pipe).
    pub fn drain_to(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(rustix::pipe::splice(
            &self.read,
            None,
            to,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }
}

/// `read(2)` into `buf`: the plain-copy relay's half.
pub fn read(from: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(from, buf)?)
}

/// `write(2)` of `buf`: the plain-copy relay's other half.
pub fn write(to: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::io::write(to, buf)?)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn bytes_go_through_the_pipe_unchanged() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        let pipe = Pipe::new(0).unwrap();
        assert!(pipe.capacity().unwrap() >= 4096);
        let err = pipe.fill_from(&b, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "nothing to read yet");
        a.write_all(b"hello, splice").unwrap();
        let n = pipe.fill_from(&b, 4096).unwrap();
        assert_eq!(n, 13);
        assert_eq!(pipe.drain_to(&c, n).unwrap(), 13);
        let mut got = [0u8; 13];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, splice");
        drop(a);
        assert_eq!(pipe.fill_from(&b, 4096).unwrap(), 0, "end of stream");
    }

    #[test]
    fn a_larger_pipe_can_be_asked_for() {
        let pipe = Pipe::new(256 * 1024).unwrap();
        assert!(pipe.capacity().unwrap() >= 64 * 1024);
    }
}
