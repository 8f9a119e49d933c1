//! Segment files: the pieces of a shard's log.
//!
//! A segment is preallocated with `fallocate` when it is opened for writing, so
//! running out of space shows up there, before any record is written, and an
//! `fdatasync` after a write into it need not grow the file.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::EngineError;

/// The directory of shard `shard` in the store at `dir`.
pub(crate) fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

/// The path of segment `id` in `shard_dir`.
pub(crate) fn segment_path(shard_dir: &Path, id: u32) -> PathBuf {
    shard_dir.join(format!("{id:08}.seg"))
}

/// The segment numbers present in `shard_dir`, ascending.
pub(crate) fn list(shard_dir: &Path) -> Result<Vec<u32>, EngineError> {
    let mut ids = Vec::new();
    let entries = fs::read_dir(shard_dir).map_err(EngineError::io("listing", shard_dir))?;
    for entry in entries {
        let entry = entry.map_err(EngineError::io("listing", shard_dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|name| name.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(id) = stem.parse::<u32>() {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The path a retired segment `id` waits under until it is reused.
pub(crate) fn spare_path(shard_dir: &Path, id: u32) -> PathBuf {
    shard_dir.join(format!("spare-{id:08}.seg"))
}

/// The retired segment files in `shard_dir` with their sizes.
pub(crate) fn list_spares(shard_dir: &Path) -> Result<Vec<(PathBuf, u64)>, EngineError> {
    let mut spares = Vec::new();
    let entries = fs::read_dir(shard_dir).map_err(EngineError::io("listing", shard_dir))?;
    for entry in entries {
        let entry = entry.map_err(EngineError::io("listing", shard_dir))?;
        let is_spare = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("spare-") && name.ends_with(".seg"));
        if is_spare {
            let size = entry
                .metadata()
                .map_err(EngineError::io("reading metadata of", entry.path()))?
                .len();
            spares.push((entry.path(), size));
        }
    }
    Ok(spares)
}

/// An open segment file.
pub(crate) struct Segment {
    pub id: u32,
    pub file: Arc<File>,
    /// A second, buffered descriptor for reads through the page cache, opened on
    /// first use when the engine is configured for buffered reads.
    pub reader: Option<Arc<File>>,
    /// Bytes allocated on disk.
    pub size: u64,
    /// Bytes written into the segment: the end of its last chunk.
    pub written: u64,
    /// On-disk bytes of the records the index still points to.
    pub live_bytes: u64,
}

fn open_options(direct: bool) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options
}

/// Allocates `size` bytes of the new file `file` at `path` on disk, so that
/// running out of space shows here; deletes the file if that fails.
pub(crate) fn preallocate(file: File, path: &Path, size: u64) -> Result<File, EngineError> {
    // SAFETY: fallocate on a file descriptor we own, with a length that fits in
    // off_t (segment sizes are capped at 16 GiB by the configuration).
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if result == 0 {
        return Ok(file);
    }
    let error = std::io::Error::last_os_error();
    drop(file);
    let _ = fs::remove_file(path);
    Err(EngineError::io("allocating segment", path)(error))
}

impl Segment {
    /// Creates segment `id` of `size` bytes, allocating all of it now.
    pub fn create(
        shard_dir: &Path,
        id: u32,
        size: u64,
        direct: bool,
    ) -> Result<Segment, EngineError> {
        let path = segment_path(shard_dir, id);
        let file = open_options(direct)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .or_else(|error| {
                // Some file systems refuse O_DIRECT; buffered I/O still works.
                if direct && error.raw_os_error() == Some(libc::EINVAL) {
                    tracing::warn!(path = %path.display(), "O_DIRECT refused; using buffered I/O");
                    open_options(false).create_new(true).mode(0o600).open(&path)
                } else {
                    Err(error)
                }
            })
            .map_err(EngineError::io("creating segment", &path))?;
        let file = preallocate(file, &path, size)?;
        // The new name must survive a crash before anything in it is trusted.
        File::open(shard_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(EngineError::io("syncing", shard_dir))?;
        Ok(Segment {
            id,
            file: Arc::new(file),
            reader: None,
            size,
            written: 0,
            live_bytes: 0,
        })
    }

    /// The buffered read descriptor, opened on first use. Direct writes through
    /// `file` invalidate the page cache over what they write, so reads through it
    /// never see stale blocks.
    pub fn reader(&mut self, shard_dir: &Path) -> Result<Arc<File>, EngineError> {
        if let Some(reader) = &self.reader {
            return Ok(reader.clone());
        }
        let path = segment_path(shard_dir, self.id);
        let reader = Arc::new(
            File::open(&path).map_err(EngineError::io("opening segment for reads", &path))?,
        );
        self.reader = Some(reader.clone());
        Ok(reader)
    }

    /// Gives back the allocated space past what was written, once no more will be.
    pub fn seal(&mut self) {
        if self.written < self.size && self.file.set_len(self.written).is_ok() {
            self.size = self.written;
        }
    }

    /// Reuses a retired segment file as segment `id`: its blocks are already
    /// written, so writes into it are overwrites, which need no extent conversion
    /// and make `fdatasync` cheap. What it held before has lower chunk sequences
    /// than anything the shard writes now, so recovery skips it.
    pub fn reuse(
        shard_dir: &Path,
        spare: &Path,
        id: u32,
        direct: bool,
    ) -> Result<Segment, EngineError> {
        let path = segment_path(shard_dir, id);
        fs::rename(spare, &path).map_err(EngineError::io("reusing segment", &path))?;
        File::open(shard_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(EngineError::io("syncing", shard_dir))?;
        let mut segment = Segment::open(shard_dir, id, direct)?;
        segment.written = 0;
        Ok(segment)
    }

    /// Opens an existing segment.
    pub fn open(shard_dir: &Path, id: u32, direct: bool) -> Result<Segment, EngineError> {
        let path = segment_path(shard_dir, id);
        let file = open_options(direct)
            .open(&path)
            .or_else(|error| {
                if direct && error.raw_os_error() == Some(libc::EINVAL) {
                    open_options(false).open(&path)
                } else {
                    Err(error)
                }
            })
            .map_err(EngineError::io("opening segment", &path))?;
        let size = file
            .metadata()
            .map_err(EngineError::io("reading metadata of", &path))?
            .len();
        Ok(Segment {
            id,
            file: Arc::new(file),
            reader: None,
            size,
            written: size,
            live_bytes: 0,
        })
    }
}
