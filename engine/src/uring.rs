//! The thin unsafe layer under a shard: block-aligned buffers, and an io_uring
//! with those buffers registered.
//!
//! io_uring reads and writes through raw pointers the kernel keeps until the
//! operation completes. The rule this module keeps: a buffer handed to the ring
//! is owned by the in-flight operation (the shard's op table) until its
//! completion is reaped, and registered buffers live as long as the ring.

use io_uring::{IoUring, squeue};
use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;

use crate::record::BLOCK;

/// A heap buffer aligned to [`BLOCK`], as O_DIRECT requires.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a whole block).
    pub fn new(len: usize) -> AlignedBuf {
        let len = crate::record::align_up(len.max(BLOCK), BLOCK);
        let layout = Layout::from_size_align(len, BLOCK).unwrap_or_else(|_| {
            unreachable!("a {len}-byte buffer aligned to {BLOCK} is a valid layout")
        });
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, BLOCK),
            )
        }
    }
}

/// An io_uring with a fixed set of registered buffers.
pub(crate) struct Ring {
    pub ring: IoUring,
    pub buffers: Vec<AlignedBuf>,
    pub capacity: usize,
}

impl Ring {
    /// A ring of `entries` slots with `buffers` registered (index = position).
    pub fn new(entries: u32, buffers: Vec<AlignedBuf>) -> io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        let iovecs: Vec<libc::iovec> = buffers
            .iter()
            .map(|buffer| libc::iovec {
                iov_base: buffer.as_ptr() as *mut libc::c_void,
                iov_len: buffer.len(),
            })
            .collect();
        // SAFETY: the buffers are owned by the returned `Ring` and are dropped
        // only after the ring (field order: `ring` is dropped first), so the
        // kernel never holds a registration to freed memory.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        Ok(Ring {
            ring,
            buffers,
            capacity: entries as usize,
        })
    }

    /// Queues `entry`.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid and untouched by anything
    /// else until its completion is reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller upholds the buffer contract above.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }
}
