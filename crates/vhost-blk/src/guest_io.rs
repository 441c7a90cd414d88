//! Guest memory handed to the engine for IO without a copy: the disk's io_uring reads into
//! and writes from it, and the wire sends from it, directly.
#![allow(unsafe_code)]

use crate::request::GuestBuf;
use std::sync::Arc;
use store::IoMemory;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A guest buffer that lies within one region of guest memory, kept mapped while it lives.
pub struct GuestRange {
    /// Holding the memory map keeps the region mapped even if QEMU changes the map meanwhile.
    _mem: Arc<GuestMemoryMmap>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is into a shared mapping owned by `_mem`, which is Send and Sync;
// the range is only accessed as IO memory.
unsafe impl Send for GuestRange {}
// SAFETY: as above.
unsafe impl Sync for GuestRange {}

impl GuestRange {
    /// `None` when the buffer is not entirely inside one region of guest memory (the caller
    /// then copies through the bounds-checked path, or fails the request).
    pub fn new(mem: Arc<GuestMemoryMmap>, buf: GuestBuf) -> Option<Self> {
        let slice = GuestMemoryBackend::get_slice(&*mem, GuestAddress(buf.addr), buf.len as usize).ok()?;
        let ptr = slice.ptr_guard_mut().as_ptr();
        Some(GuestRange { _mem: mem, ptr, len: buf.len as usize })
    }
}

// SAFETY: `ptr` points to `len` bytes of a mapping that `_mem` keeps alive for as long as
// this value lives; the guest may change them, which is the guest's own race, as with DMA.
unsafe impl IoMemory for GuestRange {
    fn io_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn io_len(&self) -> usize {
        self.len
    }
}
