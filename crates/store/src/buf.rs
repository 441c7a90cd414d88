//! Page-aligned buffers: the memory handed to the kernel for direct IO.
#![allow(unsafe_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every `AlignedBuf`: enough for O_DIRECT on any logical block size.
pub const BUF_ALIGN_BYTES: usize = 4096;

/// Memory an IO moves data out of or into: an `AlignedBuf`, or a range of a guest's RAM
/// handed to the kernel without a copy.
///
/// # Safety
/// `io_ptr()` must point to `io_len()` bytes that stay mapped, and are not freed or reused,
/// for as long as the value lives; and only IO (the kernel, or the copies below) may write
/// them while it does.
pub unsafe trait IoMemory: Send + Sync + 'static {
    fn io_ptr(&self) -> *mut u8;
    fn io_len(&self) -> usize;
}

impl dyn IoMemory {
    /// The bytes of `range`, for sending. Memory shared with a guest may change under the
    /// reader: what is sent is then whatever the guest had there, as with a device's DMA.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.io_len(), "range past the IO memory");
        // SAFETY: in bounds (checked above) of memory the trait keeps valid while `self` lives.
        unsafe { std::slice::from_raw_parts(self.io_ptr().add(range.start), range.len()) }
    }

    /// Copies `data` into the memory at `at`.
    pub fn fill(&self, at: usize, data: &[u8]) {
        assert!(at.checked_add(data.len()).is_some_and(|end| end <= self.io_len()), "copy past the IO memory");
        // SAFETY: in bounds (checked above); the trait lets IO write this memory, and `data`
        // is a distinct Rust allocation, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.io_ptr().add(at), data.len()) }
    }

    /// Receives up to `len` bytes from the non-blocking socket `fd` straight into the memory
    /// at `at`: a remote replica's read lands in guest memory without a copy.
    pub fn recv_into(&self, fd: std::os::fd::RawFd, at: usize, len: usize) -> std::io::Result<usize> {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.io_len()), "receive past the IO memory");
        // SAFETY: in bounds (checked above) of memory the trait lets IO write; the kernel
        // writes at most `len` bytes there.
        let n = unsafe { libc::recv(fd, self.io_ptr().add(at).cast(), len, libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Whether `range` starts at an address direct IO can use.
    pub fn aligned(&self, range: &std::ops::Range<usize>, align: usize) -> bool {
        (self.io_ptr() as usize + range.start).is_multiple_of(align)
    }
}

/// A heap buffer aligned to `BUF_ALIGN_BYTES`, zeroed when made. It owns its memory, so an
/// IO that holds the buffer keeps the memory alive until the kernel is done with it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, like `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (see `layout`).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut buf = Self::zeroed(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), BUF_ALIGN_BYTES).expect("buffer size overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at least) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout, and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

// SAFETY: the allocation lives as long as the buffer; IO writes it only while it holds the
// buffer (a read owns it, or it is shared through an `Arc` for IO alone).
unsafe impl IoMemory for AlignedBuf {
    fn io_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn io_len(&self) -> usize {
        self.len
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_for_direct_io_and_zeroed() {
        let buf = AlignedBuf::zeroed(512);
        assert_eq!(buf.as_slice().as_ptr() as usize % BUF_ALIGN_BYTES, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }
}
