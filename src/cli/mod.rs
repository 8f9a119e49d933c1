//! The subcommands of `blocktree`, and the file handling they share.
//!
//! Every rule about who may do what lives in `blocktree_core`; these modules turn
//! command-line arguments into calls on it, and its answers into output.

pub mod appliance;
pub mod bench;
pub mod cluster;
pub mod domain;
pub mod mount;
pub mod output;
pub mod password;
pub mod provision;
pub mod readcap;
pub mod up;
pub mod volume;

use anyhow::{Context, Result, anyhow};
use blocktree_core::encoding::{self, DecodeError, Encodable};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `path` made absolute, so the operator can tell which directory a relative
/// one meant.
pub(crate) fn absolute(path: &Path) -> std::path::PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Reads at most `max` bytes of `path`, plus one more so an oversized file is
/// reported as such instead of being read whole into memory.
fn read_bounded(path: &Path, max: usize, what: &str) -> Result<Vec<u8>> {
    let context = || format!("cannot read {what} {}", path.display());
    let file = File::open(path).with_context(context)?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(context)?;
    Ok(bytes)
}

/// Reads and decodes the `what` (e.g. "writecap request") in `path`, naming the
/// file, and the kind of object it really holds, when it is not one.
pub fn read_encoded<T: Encodable>(path: &Path, what: &str) -> Result<T> {
    let bytes = read_bounded(path, T::MAX_LEN, what)?;
    encoding::decode(&bytes).map_err(|error| {
        let found = match (&error, encoding::kind_of(&bytes)) {
            (DecodeError::WrongKind { .. }, Some(kind)) => format!("it holds a {kind:?}"),
            _ => error.to_string(),
        };
        anyhow!("{} is not a valid {what}: {found}", path.display())
    })
}

/// Reads a file that must hold exactly `len` bytes.
pub fn read_exact_len(path: &Path, len: usize, what: &str) -> Result<Vec<u8>> {
    let bytes = read_bounded(path, len, what)?;
    if bytes.len() != len {
        let found = if bytes.len() > len {
            "more".to_owned()
        } else {
            bytes.len().to_string()
        };
        return Err(anyhow!(
            "{} is not a valid {what}: expected {len} bytes, found {found}",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Replaces `path` with `bytes`, created with permission bits `mode` (before the
/// umask). The bytes go to a temporary file beside it that is renamed into place,
/// so a failed write never leaves a truncated request or writecap behind.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32, what: &str) -> Result<()> {
    let context = || format!("cannot write {what} to {}", path.display());
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} does not name a file", path.display()))
        .with_context(context)?;
    let mut temporary_name = OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if written.is_err() {
        // Best effort: the write already failed, and that is the error to report.
        let _ = fs::remove_file(&temporary);
    }
    written.with_context(context)
}
