//! Waking a shard that waits on its ring when a request arrives.
//!
//! A shard with I/O in flight sleeps in `io_uring_enter` until a completion. So
//! that new requests start at once instead of waiting for that completion, the
//! ring always holds a read of an eventfd; a sender writes the eventfd, but only
//! when the shard said it is about to sleep, so a busy shard costs its senders
//! no system call.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{SendError, Sender};

use super::Request;

/// The eventfd of one shard and whether it is asleep on its ring.
pub(crate) struct Wake {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    pub fn new() -> std::io::Result<Wake> {
        // SAFETY: eventfd with valid flags returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> i32 {
        self.eventfd.as_raw_fd()
    }

    /// Called by the shard before it sleeps on the ring; the caller must then
    /// check its channel once more, since a request may have come just before.
    pub fn about_to_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Called by the shard once it is awake.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd; a failure
            // (counter overflow) only means the shard is being woken anyway.
            unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }
}

/// How other threads reach a shard: its channel and its wake-up.
#[derive(Clone)]
pub(crate) struct ShardHandle {
    pub sender: Sender<Request>,
    pub wake: std::sync::Arc<Wake>,
}

impl ShardHandle {
    pub fn send(&self, request: Request) -> Result<(), SendError<Request>> {
        self.sender.send(request)?;
        self.wake.wake();
        Ok(())
    }
}
