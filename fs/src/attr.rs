//! The POSIX view of a file: attributes, the caller's credentials, and the
//! argument types of namespace operations.

use blocktree_core::metadata::{FileTime, MetaSecrets};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Block size reported in `st_blksize` and used for `st_blocks` accounting.
pub const BLOCK_SIZE: u32 = 4096;

/// Who is asking: the authorization attributes the Authorizer checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    /// The superuser.
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// True if the caller is in group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The type of a file, from the `S_IFMT` bits of its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileKind {
    /// The kind encoded in `mode`, if it is one Blocktree stores.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(FileKind::Regular),
            libc::S_IFDIR => Some(FileKind::Directory),
            libc::S_IFLNK => Some(FileKind::Symlink),
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            _ => None,
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
        }
    }

    pub(crate) fn from_byte(byte: u8) -> Option<FileKind> {
        Some(match byte {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            _ => return None,
        })
    }
}

/// A file's attributes, as `stat` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The inode number.
    pub ino: u64,
    /// The file's type.
    pub kind: FileKind,
    /// Permission bits (without the type), including setuid, setgid, sticky.
    pub perm: u16,
    /// Length in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access.
    pub atime: SystemTime,
    /// Last content change.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl Attr {
    pub(crate) fn from_secrets(ino: u64, secrets: &MetaSecrets, sector_size: u32) -> Attr {
        let kind = FileKind::from_mode(secrets.mode).unwrap_or(FileKind::Regular);
        Attr {
            ino,
            kind,
            perm: (secrets.mode & 0o7777) as u16,
            size: secrets.size,
            blocks: secrets.size.div_ceil(512),
            nlink: secrets.nlink,
            uid: secrets.uid,
            gid: secrets.gid,
            atime: to_system_time(secrets.atime),
            mtime: to_system_time(secrets.mtime),
            ctime: to_system_time(secrets.ctime),
            blksize: sector_size.max(BLOCK_SIZE),
        }
    }
}

/// A time to set: a given instant or the current time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// This instant.
    At(SystemTime),
    /// The time of the operation (`UTIME_NOW`).
    Now,
}

/// The attributes `setattr` changes; `None` leaves one alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits (chmod).
    pub mode: Option<u32>,
    /// New owner (chown).
    pub uid: Option<u32>,
    /// New group (chown).
    pub gid: Option<u32>,
    /// New length (truncate).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
}

/// One entry returned by `readdir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's inode.
    pub ino: u64,
    /// The offset to pass to the next `readdir` to continue after this entry.
    pub next_offset: u64,
    /// The entry's type.
    pub kind: FileKind,
    /// The name.
    pub name: Vec<u8>,
}

/// How `rename` treats an existing target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RenameMode {
    /// Replace the target if it exists (POSIX rename).
    #[default]
    Replace,
    /// Fail with EEXIST if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target, which must both exist (`RENAME_EXCHANGE`).
    Exchange,
}

/// File-system-wide figures for `statfs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks of `block_size`.
    pub blocks: u64,
    /// Free blocks.
    pub blocks_free: u64,
    /// Free blocks for unprivileged users.
    pub blocks_available: u64,
    /// Total inodes (an upper bound: inodes are not preallocated).
    pub files: u64,
    /// Free inodes.
    pub files_free: u64,
    /// Block size.
    pub block_size: u32,
    /// Longest name.
    pub name_max: u32,
}

/// Access requested by `access(2)` or implied by an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessMask {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Execute or search.
    pub execute: bool,
}

impl AccessMask {
    /// Read only.
    pub const READ: AccessMask = AccessMask {
        read: true,
        write: false,
        execute: false,
    };
    /// Write only.
    pub const WRITE: AccessMask = AccessMask {
        read: false,
        write: true,
        execute: false,
    };
    /// Search (directories) or execute.
    pub const EXECUTE: AccessMask = AccessMask {
        read: false,
        write: false,
        execute: true,
    };
    /// Write and search: what changing a directory's entries needs.
    pub const WRITE_EXECUTE: AccessMask = AccessMask {
        read: false,
        write: true,
        execute: true,
    };

    /// From the `R_OK | W_OK | X_OK` bits of `access(2)`.
    pub fn from_bits(mask: i32) -> AccessMask {
        AccessMask {
            read: mask & libc::R_OK != 0,
            write: mask & libc::W_OK != 0,
            execute: mask & libc::X_OK != 0,
        }
    }
}

/// A `FileTime` for `time`; instants before 1970 are negative seconds.
pub fn to_file_time(time: SystemTime) -> FileTime {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => FileTime {
            seconds: after.as_secs() as i64,
            nanos: after.subsec_nanos(),
        },
        Err(before) => {
            let before = before.duration();
            let mut seconds = -(before.as_secs() as i64);
            let mut nanos = before.subsec_nanos();
            if nanos > 0 {
                seconds -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            FileTime { seconds, nanos }
        }
    }
}

/// The `SystemTime` of a stored `FileTime`.
pub fn to_system_time(time: FileTime) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(time.nanos.min(999_999_999)));
    if time.seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(time.seconds as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(time.seconds.unsigned_abs()) + nanos
    }
}

/// The current time as a `FileTime`.
pub fn now() -> FileTime {
    to_file_time(SystemTime::now())
}
