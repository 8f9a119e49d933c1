//! Volumes: regular files in the directory `/volumes` of a Blocktree file system,
//! one per export. A volume's data sector size is its block size (fixed when it
//! is created, recorded in the xattr [`BLOCK_SIZE_XATTR`]); its length is the
//! export's size. The files are created by `root` with mode 0600 and encrypted
//! as their directory is (the root directory is encrypted by default), so the
//! filesystem service seals and verifies every sector and the NBD client sees
//! plaintext.
//!
//! [`Volumes`] manages them (`blocktree volume create|list|resize|delete`) and is
//! the [`Catalog`] the server exports; [`FsVolume`] is a volume opened for one
//! connection.

use crate::export::{Catalog, CatalogError, Device, DeviceError, ExportInfo, Extent, errno};
use blocktree_fs::{Caller, FileKind, FileSystem, FsError, SetAttr};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use thiserror::Error;

/// The directory of the volumes, under the file system's root.
pub const VOLUMES_DIR: &str = "volumes";
/// The xattr that records a volume's block size (decimal bytes).
pub const BLOCK_SIZE_XATTR: &[u8] = b"user.blocktree.volume.block-size";
/// The block size of a volume unless chosen otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// The name of the volume `blocktree up` creates on first start and serves as
/// the default export.
pub const DEFAULT_VOLUME: &str = "vol0";
/// The most a write of zeros (`NO_HOLE`) or a cache request handles at a time.
const CHUNK: u64 = 1 << 20;

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    /// Not a usable volume name.
    #[error(
        "invalid volume name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    /// No such volume.
    #[error("no volume named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("a volume named {0:?} exists already")]
    Exists(String),
    /// Not a usable block size.
    #[error("invalid block size {0}: use a power of two from 512 to 65536 bytes")]
    BadBlockSize(u64),
    /// Deleting or shrinking a volume that NBD clients have open would pull the
    /// device from under them.
    #[error("volume {name} is open on {connections} NBD connection(s); disconnect them first")]
    InUse {
        /// The volume.
        name: String,
        /// Its open connections.
        connections: u32,
    },
    /// The size is zero or not a whole number of blocks.
    #[error("size {size} is not a positive multiple of the block size {block_size}")]
    BadSize {
        /// The size asked for.
        size: u64,
        /// The volume's block size.
        block_size: u32,
    },
    /// A resize that would drop data needs to be asked for explicitly.
    #[error("shrinking {name} from {from} to {to} bytes drops its end; pass --shrink to do it")]
    Shrink {
        /// The volume.
        name: String,
        /// Its size now.
        from: u64,
        /// The size asked for.
        to: u64,
    },
    /// The file system refused or failed.
    #[error("{0}")]
    Fs(#[from] FsError),
}

/// A volume as `blocktree volume list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Its name, the export name.
    pub name: String,
    /// Its inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes (the file's data sector size).
    pub block_size: u32,
}

/// Checks a volume name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::BadName(name.to_owned()))
    }
}

/// Checks a block size: a power of two from 512 to 64 KiB (NBD's minimum block
/// size may not exceed 64 KiB).
pub fn check_block_size(block_size: u64) -> Result<u32, VolumeError> {
    u32::try_from(block_size)
        .ok()
        .filter(|size| size.is_power_of_two() && (512..=65536).contains(size))
        .ok_or(VolumeError::BadBlockSize(block_size))
}

fn check_size(size: u64, block_size: u32) -> Result<(), VolumeError> {
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(VolumeError::BadSize { size, block_size });
    }
    Ok(())
}

/// NBD connections per open volume (by inode).
type OpenCounts = Arc<Mutex<HashMap<u64, u32>>>;

fn lock_counts(counts: &Mutex<HashMap<u64, u32>>) -> MutexGuard<'_, HashMap<u64, u32>> {
    // The map stays consistent whatever panicked while it was held.
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection's hold on a volume: counted while it lives.
struct OpenHold {
    counts: OpenCounts,
    ino: u64,
}

impl Drop for OpenHold {
    fn drop(&mut self) {
        let mut counts = lock_counts(&self.counts);
        if let Some(count) = counts.get_mut(&self.ino) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ino);
            }
        }
    }
}

/// The volumes of a file system.
pub struct Volumes {
    fs: Arc<FileSystem>,
    read_only: bool,
    /// Held while a volume is opened, resized or deleted, so that a delete or a
    /// shrink never races with a connection opening the volume.
    changing: Mutex<()>,
    open: OpenCounts,
}

impl Volumes {
    /// The volumes of `fs`. With `read_only`, every export is read-only.
    pub fn new(fs: Arc<FileSystem>, read_only: bool) -> Volumes {
        Volumes {
            fs,
            read_only,
            changing: Mutex::new(()),
            open: Arc::default(),
        }
    }

    /// NBD connections that have the volume with inode `ino` open now.
    pub fn connections(&self, ino: u64) -> u32 {
        lock_counts(&self.open).get(&ino).copied().unwrap_or(0)
    }

    fn changing(&self) -> MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse_if_open(&self, volume: &Volume) -> Result<(), VolumeError> {
        match self.connections(volume.ino) {
            0 => Ok(()),
            connections => Err(VolumeError::InUse {
                name: volume.name.clone(),
                connections,
            }),
        }
    }

    /// The file system.
    pub fn filesystem(&self) -> &Arc<FileSystem> {
        &self.fs
    }

    fn caller() -> Caller {
        Caller::root()
    }

    /// The inode of `/volumes`, if it exists.
    fn dir(&self) -> Result<Option<u64>, VolumeError> {
        match self
            .fs
            .lookup(&Self::caller(), FileSystem::ROOT, VOLUMES_DIR.as_bytes())
        {
            Ok(attr) if attr.kind == FileKind::Directory => Ok(Some(attr.ino)),
            Ok(_) => Err(VolumeError::Fs(FsError::NotDir)),
            Err(FsError::NotFound) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The inode of `/volumes`, created (mode 0700) if missing; and whether it
    /// was created now.
    pub fn ensure_dir(&self) -> Result<(u64, bool), VolumeError> {
        if let Some(ino) = self.dir()? {
            return Ok((ino, false));
        }
        match self.fs.mkdir(
            &Self::caller(),
            FileSystem::ROOT,
            VOLUMES_DIR.as_bytes(),
            0o700,
            0,
        ) {
            Ok(attr) => Ok((attr.ino, true)),
            Err(FsError::Exists) => Ok((self.dir()?.ok_or(FsError::NotFound)?, false)),
            Err(error) => Err(error.into()),
        }
    }

    fn block_size_of(&self, ino: u64, blksize: u32) -> u32 {
        self.fs
            .getxattr(&Self::caller(), ino, BLOCK_SIZE_XATTR)
            .ok()
            .and_then(|value| String::from_utf8(value).ok())
            .and_then(|value| value.parse::<u64>().ok())
            .and_then(|value| check_block_size(value).ok())
            .unwrap_or(blksize)
    }

    fn volume(&self, dir: u64, name: &str) -> Result<Volume, VolumeError> {
        let attr = match self.fs.lookup(&Self::caller(), dir, name.as_bytes()) {
            Ok(attr) if attr.kind == FileKind::Regular => attr,
            Ok(_) | Err(FsError::NotFound) => return Err(VolumeError::NotFound(name.into())),
            Err(error) => return Err(error.into()),
        };
        Ok(Volume {
            name: name.to_owned(),
            ino: attr.ino,
            size: attr.size,
            block_size: self.block_size_of(attr.ino, attr.blksize),
        })
    }

    /// The volume called `name`.
    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        check_name(name).map_err(|_| VolumeError::NotFound(name.into()))?;
        let dir = self
            .dir()?
            .ok_or_else(|| VolumeError::NotFound(name.into()))?;
        self.volume(dir, name)
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let Some(dir) = self.dir()? else {
            return Ok(Vec::new());
        };
        let mut volumes = Vec::new();
        let mut offset = 0;
        loop {
            let entries = self.fs.readdir(&Self::caller(), dir, offset)?;
            let Some(last) = entries.last() else {
                break;
            };
            offset = last.next_offset;
            for entry in entries {
                if entry.kind != FileKind::Regular {
                    continue;
                }
                let Ok(name) = String::from_utf8(entry.name) else {
                    continue;
                };
                if check_name(&name).is_err() {
                    continue;
                }
                match self.volume(dir, &name) {
                    Ok(volume) => volumes.push(volume),
                    Err(VolumeError::NotFound(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    /// Creates volume `name` of `size` bytes (sparse: it reads as zeros) with
    /// `block_size`-byte blocks, its file's data sector size. Atomic: it is
    /// prepared under a hidden name and renamed.
    pub fn create(&self, name: &str, size: u64, block_size: u32) -> Result<Volume, VolumeError> {
        check_name(name)?;
        let block_size = check_block_size(u64::from(block_size))?;
        check_size(size, block_size)?;
        let _changing = self.changing();
        let (dir, _) = self.ensure_dir()?;
        let caller = Self::caller();
        if self.fs.lookup(&caller, dir, name.as_bytes()).is_ok() {
            return Err(VolumeError::Exists(name.into()));
        }
        let temporary = format!(".{name}.creating");
        // A leftover of an interrupted create.
        match self.fs.unlink(&caller, dir, temporary.as_bytes()) {
            Ok(()) | Err(FsError::NotFound) => {}
            Err(error) => return Err(error.into()),
        }
        let (attr, fh) = self.fs.create_with_sector_size(
            &caller,
            dir,
            temporary.as_bytes(),
            0o600,
            0,
            libc::O_RDWR,
            block_size,
        )?;
        let prepared = (|| -> Result<(), FsError> {
            self.fs.setxattr(
                &caller,
                attr.ino,
                BLOCK_SIZE_XATTR,
                block_size.to_string().as_bytes(),
                0,
            )?;
            self.fs.setattr(
                &caller,
                attr.ino,
                &SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                },
            )?;
            self.fs.release(fh)?;
            self.fs.rename(
                &caller,
                dir,
                temporary.as_bytes(),
                dir,
                name.as_bytes(),
                blocktree_fs::RenameMode::NoReplace,
            )?;
            self.fs.fsyncdir(dir)
        })();
        if let Err(error) = prepared {
            // Best effort: the create failed, and that is the error to report.
            let _ = self.fs.release(fh);
            let _ = self.fs.unlink(&caller, dir, temporary.as_bytes());
            return Err(match error {
                FsError::Exists => VolumeError::Exists(name.into()),
                other => other.into(),
            });
        }
        self.get(name)
    }

    /// Changes the size of volume `name`; growing reads as zeros, shrinking drops
    /// the end and needs `allow_shrink` and no open connection. Connections open
    /// now keep the size they negotiated; new ones see the new size. Returns the
    /// old and new volume.
    pub fn resize(
        &self,
        name: &str,
        size: u64,
        allow_shrink: bool,
    ) -> Result<(Volume, Volume), VolumeError> {
        let _changing = self.changing();
        let old = self.get(name)?;
        check_size(size, old.block_size)?;
        if size < old.size {
            if !allow_shrink {
                return Err(VolumeError::Shrink {
                    name: name.into(),
                    from: old.size,
                    to: size,
                });
            }
            self.refuse_if_open(&old)?;
        }
        self.fs.setattr(
            &Self::caller(),
            old.ino,
            &SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )?;
        self.fs.sync_all()?;
        let new = self.get(name)?;
        Ok((old, new))
    }

    /// Deletes volume `name` and its data; refused while connections have it open.
    pub fn delete(&self, name: &str) -> Result<Volume, VolumeError> {
        let _changing = self.changing();
        let volume = self.get(name)?;
        self.refuse_if_open(&volume)?;
        let dir = self
            .dir()?
            .ok_or_else(|| VolumeError::NotFound(name.into()))?;
        self.fs.unlink(&Self::caller(), dir, name.as_bytes())?;
        self.fs.fsyncdir(dir)?;
        Ok(volume)
    }

    /// The name the default export ("") stands for: `vol0` if it exists, else the
    /// only volume if there is exactly one.
    fn default_name(&self) -> Result<String, CatalogError> {
        let volumes = self
            .list()
            .map_err(|error| CatalogError::Failed(error.to_string()))?;
        if volumes.iter().any(|volume| volume.name == DEFAULT_VOLUME) {
            return Ok(DEFAULT_VOLUME.into());
        }
        match volumes.as_slice() {
            [only] => Ok(only.name.clone()),
            _ => Err(CatalogError::Unknown(String::new())),
        }
    }

    fn info(&self, volume: &Volume) -> ExportInfo {
        ExportInfo {
            name: volume.name.clone(),
            size: volume.size,
            block_size: volume.block_size,
            read_only: self.read_only,
            description: format!(
                "Blocktree volume {}: {} bytes, {}-byte blocks, encrypted and verified",
                volume.name, volume.size, volume.block_size
            ),
        }
    }

    fn lookup(&self, name: &str) -> Result<Volume, CatalogError> {
        let name = if name.is_empty() {
            self.default_name()?
        } else {
            name.to_owned()
        };
        self.get(&name).map_err(|error| match error {
            VolumeError::NotFound(name) => CatalogError::Unknown(name),
            other => CatalogError::Failed(other.to_string()),
        })
    }
}

impl Catalog for Volumes {
    fn list(&self) -> Result<Vec<ExportInfo>, CatalogError> {
        let volumes =
            Volumes::list(self).map_err(|error| CatalogError::Failed(error.to_string()))?;
        Ok(volumes.iter().map(|volume| self.info(volume)).collect())
    }

    fn describe(&self, name: &str) -> Result<ExportInfo, CatalogError> {
        Ok(self.info(&self.lookup(name)?))
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Device>, CatalogError> {
        let _changing = self.changing();
        let volume = self.lookup(name)?;
        let flags = if self.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        let fh = self
            .fs
            .open(&Self::caller(), volume.ino, flags)
            .map_err(|error| CatalogError::Failed(error.to_string()))?;
        *lock_counts(&self.open).entry(volume.ino).or_insert(0) += 1;
        let hold = OpenHold {
            counts: self.open.clone(),
            ino: volume.ino,
        };
        Ok(Arc::new(FsVolume {
            fs: self.fs.clone(),
            ino: volume.ino,
            fh,
            info: self.info(&volume),
            closed: AtomicBool::new(false),
            _hold: hold,
        }))
    }
}

/// A volume opened for one connection: one file handle. Every handle of a file
/// shares the file's buffered writes, so a flush on any connection makes the
/// writes completed on all of them durable (`NBD_FLAG_CAN_MULTI_CONN`).
pub struct FsVolume {
    fs: Arc<FileSystem>,
    ino: u64,
    fh: u64,
    info: ExportInfo,
    closed: AtomicBool,
    /// Counts this connection against the volume until it is dropped.
    _hold: OpenHold,
}

fn device_error(error: FsError) -> DeviceError {
    DeviceError::new(error.errno(), error.to_string())
}

impl FsVolume {
    fn durable_if(&self, fua: bool) -> Result<(), DeviceError> {
        if fua {
            self.fs.fsync(self.fh, true).map_err(device_error)?;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.fs
            .fallocate(
                &Caller::root(),
                self.ino,
                offset,
                u64::from(len),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            )
            .map_err(device_error)
    }
}

impl Device for FsVolume {
    fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let mut data = self.fs.read(self.fh, offset, len).map_err(device_error)?;
        // Within the export (the server checked), so only a volume shrunk under
        // the connection reads short: the rest reads as zeros.
        data.resize(len as usize, 0);
        Ok(data)
    }

    fn read_many(&self, ranges: &[(u64, u32)]) -> Vec<Result<Vec<u8>, DeviceError>> {
        self.fs
            .read_many(self.fh, ranges)
            .into_iter()
            .zip(ranges)
            .map(|(read, &(_, len))| {
                let mut data = read.map_err(device_error)?;
                data.resize(len as usize, 0);
                Ok(data)
            })
            .collect()
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let written = self.fs.write(self.fh, offset, data).map_err(device_error)?;
        if written as usize != data.len() {
            return Err(DeviceError::new(errno::EIO, "short write"));
        }
        self.durable_if(fua)
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), DeviceError>> {
        self.fs
            .write_many(self.fh, writes)
            .into_iter()
            .zip(writes)
            .map(
                |(written, &(_, data))| match written.map_err(device_error)? {
                    count if count as usize == data.len() => Ok(()),
                    _ => Err(DeviceError::new(errno::EIO, "short write")),
                },
            )
            .collect()
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.fs.fsync(self.fh, false).map_err(device_error)
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.punch(offset, len)?;
        self.durable_if(fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        if no_hole {
            if fast {
                return Err(DeviceError::new(
                    errno::EOPNOTSUPP,
                    "zeros that must stay allocated are written: no faster than a write",
                ));
            }
            let end = offset + u64::from(len);
            let mut at = offset;
            let zeros = vec![0u8; CHUNK.min(u64::from(len)) as usize];
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                self.fs
                    .write(self.fh, at, &zeros[..n])
                    .map_err(device_error)?;
                at += n as u64;
            }
        } else {
            self.punch(offset, len)?;
        }
        self.durable_if(fua)
    }

    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let runs = self
            .fs
            .allocation(self.ino, offset, u64::from(len))
            .map_err(device_error)?;
        Ok(runs
            .into_iter()
            .map(|(length, hole)| Extent { length, hole })
            .collect())
    }

    fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        // Reading verifies the range and leaves its sectors in the file's cache;
        // the cache is small, so only the first chunk is worth reading.
        let len = u64::from(len).min(CHUNK) as u32;
        self.fs
            .read(self.fh, offset, len)
            .map(|_| ())
            .map_err(device_error)
    }

    fn close(&self) -> Result<(), DeviceError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.fs.release(self.fh).map_err(device_error)
    }
}

impl Drop for FsVolume {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel)
            && let Err(error) = self.fs.release(self.fh)
        {
            tracing::warn!(volume = %self.info.name, "closing the volume failed: {error}");
        }
    }
}
