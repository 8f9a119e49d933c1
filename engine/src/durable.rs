//! Replacing a small file (superblock, checkpoint) so that a crash leaves the old
//! or the new contents, never a torn mix: write a temporary file, sync it, rename
//! it over the old one, sync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::EngineError;

/// Writes `bytes` to `path` (mode 0600) atomically and durably.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let temporary = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(EngineError::io("creating", &temporary))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(EngineError::io("writing", &temporary))?;
    fs::rename(&temporary, path).map_err(EngineError::io("renaming", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(EngineError::io("syncing", dir))?;
    }
    Ok(())
}
