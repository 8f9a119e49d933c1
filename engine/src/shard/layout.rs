//! Laying out spare segments ahead of need: a shard with no spare segment
//! allocates the next one and writes zeros over it in the background, so that
//! the segment it opens next is written blocks, not fresh extents.
//!
//! `fallocate` leaves unwritten extents on ext4 and XFS. A direct write into one
//! cannot complete inline (io_uring hands it to a worker thread), and the
//! `fdatasync` after it must commit the extent conversion to the file system's
//! journal. Writers that wait for durability pay both on every round: on this
//! project's benchmark disk, 32 durable writers reach about 43k writes/s into
//! fresh segments and 56k into written ones. Retired segments (compaction's
//! spares) are written blocks already; this fills in when there are none, as in a
//! store that is still growing.
//!
//! The zeros cost a write of the segment. They are paid from a credit of one
//! byte per byte users write, plus a step per idle tick, with one write in flight
//! at a time, so laying out takes at most half the shard's write traffic and
//! only while no spare is waiting. A spare is not trusted for anything: recovery
//! ignores what a reused segment held before (`Segment::reuse`), so a spare left
//! half laid out by a crash is still a good spare.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use io_uring::{opcode, types};

use super::{Op, Shard};
use crate::error::EngineError;
use crate::uring::AlignedBuf;

/// The most one zeroing write covers.
const STEP_BYTES: usize = 1 << 20;
/// Credit for zeros per idle tick: an idle shard lays out 8 MiB per tick.
const IDLE_CREDIT: i64 = 8 << 20;
/// The most credit saved up.
const MAX_CREDIT: i64 = 16 << 20;
/// A spare is laid out only while the file system has room for this many
/// segments: space held ahead of need must not be what a write finds missing.
const MIN_FREE_SEGMENTS: u64 = 5;

/// The spare being laid out and what it may spend.
#[derive(Default)]
pub(super) struct Layout {
    target: Option<Target>,
    credit: i64,
    zeros: Option<AlignedBuf>,
    in_flight: bool,
    /// Laying out stopped (no O_DIRECT here, no space, an I/O error) until the
    /// shard opens this segment number.
    paused_until: u32,
    /// The shard needed the space: delete the target once its write completes.
    abandon: bool,
}

struct Target {
    path: PathBuf,
    file: File,
    size: u64,
    zeroed: u64,
}

impl Layout {
    pub fn credit_user_write(&mut self, bytes: usize) {
        self.credit = (self.credit + bytes as i64).min(MAX_CREDIT);
    }

    pub fn credit_idle(&mut self) {
        self.credit = (self.credit + IDLE_CREDIT).min(MAX_CREDIT);
    }
}

impl Shard {
    /// Whether laying out has work that idle time should advance.
    pub(super) fn layout_pending(&self) -> bool {
        !self.layout.in_flight && (self.layout.target.is_some() || self.new_spare_wanted())
    }

    /// A new spare is laid out once the active segment is half written and no
    /// spare is waiting for it; never on a file system refusing O_DIRECT (the
    /// page cache hides extent conversion there) nor while space is short.
    fn new_spare_wanted(&self) -> bool {
        self.spares.is_empty()
            && self.active.is_some()
            && self.write_position * 2 >= self.config.segment_bytes
            && self.config.direct_io
            && !self.compaction.space_pressure
            && self.next_segment >= self.layout.paused_until
    }

    /// The spare being laid out, for a new segment that found no spare ready:
    /// taken as it is when no write of zeros is in flight (its blocks past the
    /// zeros are fresh extents, slower but sound), so that its space is used
    /// rather than allocated twice.
    pub(super) fn take_layout_target(&mut self) -> Option<PathBuf> {
        if self.layout.in_flight {
            return None;
        }
        self.layout.target.take().map(|target| target.path)
    }

    /// Gives back the space of the spare being laid out: a new segment could
    /// not be allocated.
    pub(super) fn abandon_layout(&mut self) {
        if self.layout.in_flight {
            self.layout.abandon = true;
        } else if let Some(target) = self.layout.target.take() {
            let _ = std::fs::remove_file(&target.path);
        }
    }

    /// Starts the next zeroing write, or a new spare to lay out, as credit allows.
    pub(super) fn layout_step(&mut self) {
        if self.layout.in_flight || self.layout.credit <= 0 {
            return;
        }
        if self.layout.target.is_none() {
            if !self.new_spare_wanted() {
                return;
            }
            match self.new_spare() {
                Ok(target) => self.layout.target = Some(target),
                Err(error) => {
                    tracing::debug!(%error, "not laying out a spare segment");
                    self.layout.paused_until = self.next_segment + 1;
                    return;
                }
            }
        }
        let Some(target) = &self.layout.target else {
            return;
        };
        let len = (target.size - target.zeroed).min(STEP_BYTES as u64) as u32;
        let zeros = self
            .layout
            .zeros
            .get_or_insert_with(|| AlignedBuf::new(STEP_BYTES));
        let entry = opcode::Write::new(types::Fd(target.file.as_raw_fd()), zeros.as_ptr(), len)
            .offset(target.zeroed)
            .build();
        self.layout.credit -= i64::from(len);
        self.layout.in_flight = true;
        let slot = self.op_slot(Op::Zero { len });
        // SAFETY: the zero buffer lives in `self.layout` until the shard is
        // dropped, and is never written to after allocation; the file stays open
        // in `self.layout.target` while the write is in flight (`in_flight`).
        if let Err(error) = unsafe { self.ring.push(&entry.user_data(slot as u64)) } {
            self.fail_op(
                slot,
                EngineError::io("queueing a write of zeros in", self.dir.clone())(error),
            );
        }
    }

    /// A zeroing write of `len` bytes completed with `result`.
    pub(super) fn zeroed(&mut self, len: u32, result: Result<u32, EngineError>) {
        self.layout.in_flight = false;
        if std::mem::take(&mut self.layout.abandon) {
            if let Some(target) = self.layout.target.take() {
                let _ = std::fs::remove_file(&target.path);
            }
            return;
        }
        let Some(target) = self.layout.target.as_mut() else {
            return;
        };
        match result {
            Ok(written) if written == len => {
                target.zeroed += u64::from(len);
                if target.zeroed >= target.size {
                    self.spare_laid_out();
                }
            }
            outcome => {
                tracing::warn!(path = %target.path.display(), ?outcome, "laying out a spare segment failed");
                let _ = std::fs::remove_file(&target.path);
                self.layout.target = None;
                self.layout.paused_until = self.next_segment + 1;
            }
        }
    }

    fn spare_laid_out(&mut self) {
        if let Some(target) = self.layout.target.take() {
            self.spares.push((target.path, target.size));
        }
    }

    /// Allocates a file for the next spare, named after the next segment number
    /// (a spare is laid out only while none is waiting, so the name is free
    /// unless a crash left it, in which case it is a spare already).
    fn new_spare(&self) -> Result<Target, EngineError> {
        let path = self
            .dir
            .join(format!("spare-new-{:08}.seg", self.next_segment));
        let size = self.config.segment_bytes;
        let free = free_bytes(&self.dir)?;
        if free < size.saturating_mul(MIN_FREE_SEGMENTS) {
            return Err(EngineError::NoSpace(path));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(EngineError::io("creating spare segment", &path))?;
        let file = crate::segment::preallocate(file, &path, size)?;
        Ok(Target {
            path,
            file,
            size,
            zeroed: 0,
        })
    }
}

/// Bytes available to this process on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Result<u64, EngineError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| EngineError::Layout(format!("{} holds a NUL byte", dir.display())))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` is writable memory of
    // the right type, which statvfs fills in when it returns 0.
    let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(EngineError::io("reading free space of", dir)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: statvfs returned 0, so it filled `stats` in.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
