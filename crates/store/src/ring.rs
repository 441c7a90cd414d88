//! The io_uring of one disk: a thread that owns the ring and the device's file, takes IO
//! requests from any task, and hands each result back with the buffer it used.
//!
//! Buffers are owned by the request while the kernel may touch them: a caller that stops
//! waiting does not free memory the kernel is still writing into.
#![allow(unsafe_code)]

use crate::buf::IoMemory;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

/// IOs in flight per disk; further requests wait in the ring thread's backlog.
pub const RING_DEPTH: usize = 128;
/// The user_data of the eventfd read that wakes the ring thread for new requests.
const WAKE: u64 = u64::MAX;

const _: () = assert!(RING_DEPTH < WAKE as usize);

pub(crate) enum Op {
    /// A read into memory the caller shares (its own buffer, or a guest's for zero-copy).
    Read {
        buf: Arc<dyn IoMemory>,
        buf_offset: usize,
        len: u32,
        offset: u64,
    },
    Write {
        buf: Arc<dyn IoMemory>,
        buf_offset: usize,
        len: u32,
        offset: u64,
    },
    DataSync,
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
}

pub(crate) struct Completion {
    /// Bytes transferred (reads and writes), or 0.
    pub result: io::Result<u32>,
}

struct Request {
    op: Op,
    done: oneshot::Sender<Completion>,
}

pub(crate) struct Ring {
    requests: Option<mpsc::Sender<Request>>,
    wake: File,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ring {
    /// Starts the ring thread for `file`, which it owns from now on.
    pub fn new(file: File, name: &str) -> io::Result<Self> {
        let ring = IoUring::new((RING_DEPTH * 2) as u32)?;
        // SAFETY: eventfd has no memory-safety preconditions; we check its result.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let wake_reader = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ring-{name}"))
            .spawn(move || RingThread::new(ring, file, wake_reader, rx).run())?;
        Ok(Ring { requests: Some(tx), wake, thread: Some(thread) })
    }

    pub async fn submit(&self, op: Op) -> Completion {
        let (done, result) = oneshot::channel();
        let gone = || Completion {
            result: Err(io::Error::new(io::ErrorKind::BrokenPipe, "the disk's IO thread has stopped")),
        };
        let Some(requests) = &self.requests else {
            return gone();
        };
        if requests.send(Request { op, done }).is_err() {
            return gone();
        }
        if let Err(e) = (&self.wake).write_all(&1u64.to_ne_bytes()) {
            return Completion { result: Err(e) };
        }
        result.await.unwrap_or_else(|_| gone())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish what is in flight and exit.
        self.requests.take();
        let _ = (&self.wake).write_all(&1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct RingThread {
    ring: IoUring,
    file: File,
    wake: File,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    requests: mpsc::Receiver<Request>,
    closing: bool,
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Request>,
}

impl RingThread {
    fn new(ring: IoUring, file: File, wake: File, requests: mpsc::Receiver<Request>) -> Self {
        RingThread {
            ring,
            file,
            wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            requests,
            closing: false,
            slots: (0..RING_DEPTH).map(|_| None).collect(),
            free_slots: (0..RING_DEPTH).rev().collect(),
            backlog: VecDeque::new(),
        }
    }

    fn in_flight(&self) -> usize {
        RING_DEPTH - self.free_slots.len()
    }

    fn run(mut self) {
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(RING_DEPTH + 1);
        self.arm_wake();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // Nothing we submit can make io_uring_enter fail for good; back off and
                    // retry rather than strand the requests in flight.
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            }
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, result) in &completions {
                if user_data == WAKE {
                    self.wake_armed = false;
                    self.take_requests();
                } else {
                    self.complete(user_data as usize, result);
                }
            }
            self.start_backlog();
            if !self.closing && !self.wake_armed {
                self.arm_wake();
            }
            if self.closing && !self.wake_armed && self.in_flight() == 0 && self.backlog.is_empty() {
                return;
            }
        }
    }

    fn take_requests(&mut self) {
        loop {
            match self.requests.try_recv() {
                Ok(request) => self.backlog.push_back(request),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    fn arm_wake(&mut self) {
        let entry =
            opcode::Read::new(types::Fd(self.wake.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
        // SAFETY: `wake_buf` is boxed, owned by `self`, and `run` does not return while
        // this read is armed, so the memory outlives the read.
        unsafe { self.ring.submission().push(&entry) }.expect("the ring has room for the wake read");
        self.wake_armed = true;
    }

    fn start_backlog(&mut self) {
        while !self.backlog.is_empty() {
            let Some(slot) = self.free_slots.pop() else {
                return;
            };
            let mut request = self.backlog.pop_front().expect("backlog is not empty");
            let fd = types::Fd(self.file.as_raw_fd());
            let entry = match &mut request.op {
                Op::Read { buf, buf_offset, len, offset } => {
                    assert!(*buf_offset + *len as usize <= buf.io_len(), "read past its memory");
                    // SAFETY: the range was checked against the memory just above.
                    let ptr = unsafe { buf.io_ptr().add(*buf_offset) };
                    opcode::Read::new(fd, ptr, *len).offset(*offset).build()
                }
                Op::Write { buf, buf_offset, len, offset } => {
                    assert!(*buf_offset + *len as usize <= buf.io_len(), "write past its memory");
                    // SAFETY: the range was checked against the memory just above.
                    let ptr = unsafe { buf.io_ptr().add(*buf_offset) };
                    opcode::Write::new(fd, ptr, *len).offset(*offset).build()
                }
                Op::DataSync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                Op::Fallocate { mode, offset, len } => {
                    opcode::Fallocate::new(fd, *len).offset(*offset).mode(*mode).build()
                }
            };
            // SAFETY: the memory the entry points into is held by `request`, which stays
            // in `slots` until its completion is reaped in `complete`.
            unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }
                .expect("the ring has room for every slot");
            self.slots[slot] = Some(request);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let request = self.slots[slot].take().expect("a completion for a slot in flight");
        self.free_slots.push(slot);
        let result = if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as u32) };
        let Request { op, done } = request;
        // The memory is released before the caller hears of the completion, so a caller
        // that owns it alone again can take it back.
        drop(op);
        let _ = done.send(Completion { result });
    }
}
