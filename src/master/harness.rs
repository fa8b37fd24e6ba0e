//! The master's real dispatch path, driven step by step for `cargo bench`
//! (`benches/dispatch.rs`): the same [`Table`], accept batch, [`transmit`] and frame handling
//! the running master uses, over real sockets and real worker channels, without the tokio
//! tasks around them. The caller plays the workers on the other ends of the channels.

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use tokio::sync::Notify;

use super::accept::accept_batch;
use super::ctx::Scratch;
use super::link::{transmit, Flush};
use super::table::{Phase, Process, Table};
use crate::balance::Strategy;
use crate::config::Config;
use crate::ipc::channel::frame_buffer;
use crate::ipc::frame::Frame;
use crate::ipc::Channel;
use crate::sys::shm::Counters;

/// A master without its tasks: one listener, one ready process per channel.
#[derive(Debug)]
pub struct MasterPath {
    table: Table,
    listener: OwnedFd,
    channels: Vec<Channel>,
    writer: Notify,
    scratch: Scratch,
    buf: Vec<u8>,
}

/// The pid a process of the harness is known by: its slot, from 1.
fn pid(index: usize) -> u32 {
    index as u32 + 1
}

impl MasterPath {
    /// A master accepting on `listener`, each of `channels` (the master's ends) a ready
    /// worker, connections spread by `strategy`. Call it inside a tokio runtime (the
    /// channels register with its reactor).
    pub fn new(listener: OwnedFd, channels: Vec<OwnedFd>, strategy: Strategy) -> io::Result<Self> {
        let config = Config {
            workers: channels.len(),
            strategy,
            max_pending: usize::MAX,
            ..Config::default()
        };
        let mut table = Table::new(Rc::new(config));
        for (index, slot) in table.slots.iter_mut().enumerate() {
            let mut process = Process::new(pid(index));
            process.phase = Phase::Ready;
            slot.process = Some(process);
        }
        Ok(MasterPath {
            table,
            listener,
            channels: channels
                .into_iter()
                .map(Channel::new)
                .collect::<io::Result<_>>()?,
            writer: Notify::new(),
            scratch: Scratch::default(),
            buf: frame_buffer(),
        })
    }

    /// Accepts everything queued, assigns each connection and sends every worker its batch;
    /// returns how many were accepted.
    pub fn dispatch_queued(&mut self) -> io::Result<usize> {
        let (accepted, _) = accept_batch(&mut self.table, &self.listener, 0, usize::MAX);
        for (index, process) in self.table.outgoing() {
            let channel = &self.channels[index];
            match transmit(process, channel, &self.writer, &mut self.scratch) {
                Flush::Done => {}
                Flush::Blocked => return Err(io::ErrorKind::WouldBlock.into()),
                Flush::Short(e) | Flush::Broken(e) => return Err(e),
            }
        }
        Ok(accepted)
    }

    /// Applies every frame the workers have sent and the totals they share in memory
    /// (acknowledgements close the master's copies); returns how many copies it closed.
    pub fn settle(&mut self) -> io::Result<usize> {
        let held = self.table.held();
        for (index, channel) in self.channels.iter().enumerate() {
            while let Some((frame, fds)) = channel
                .try_recv_frame(&mut self.buf)
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                if let Frame::Counters = frame {
                    let fd = fds.into_iter().next().expect("checked: one fd");
                    let process = self.table.find_mut(index, pid(index)).expect("a process");
                    process.attach_counters(Counters::map(fd)?);
                    continue;
                }
                self.table
                    .on_frame(index, pid(index), frame)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
        }
        if let Some((_, _, lost)) = self.table.sync().into_iter().next() {
            return Err(io::Error::other(lost.to_string()));
        }
        Ok(held - self.table.held())
    }

    /// Connections the master still holds (sent, not acknowledged).
    pub fn held(&self) -> usize {
        self.table.held()
    }
}
