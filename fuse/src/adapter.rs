//! The fuser `Filesystem` that turns each kernel request into one call on
//! `blocktree_fs::FileSystem` and its answer into the reply.
//!
//! Every method runs on one of the session's worker threads (fuser reads
//! `/dev/fuse` from `threads` threads, each with its own cloned descriptor), so
//! requests are served concurrently; the file system is `Send + Sync` and blocks.

use crate::caller;
use crate::options::{MAX_IO, MountOptions};
use blocktree_fs::{
    AccessMask, Attr, Caller, FileKind, FileSystem, FsError, RenameMode, SetAttr, TimeSet,
};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the kernel and btfuse agreed on at `FUSE_INIT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Largest write request, in bytes.
    pub max_write: u32,
    /// Largest readahead, in bytes.
    pub max_readahead: u32,
    /// The kernel caches writes and sends them back in batches (`FUSE_WRITEBACK_CACHE`).
    pub writeback_cache: bool,
    /// Reads of one file may be in flight together (`FUSE_ASYNC_READ`).
    pub async_read: bool,
    /// Lookups and readdirs of one directory may run together (`FUSE_PARALLEL_DIROPS`).
    pub parallel_dirops: bool,
    /// Requests larger than 32 pages are allowed (`FUSE_MAX_PAGES`).
    pub max_pages: bool,
    /// Threads serving requests.
    pub threads: usize,
}

/// Capabilities btfuse asks for when the kernel offers them.
const WANTED: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_BIG_WRITES)
    .union(InitFlags::FUSE_MAX_PAGES)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_ATOMIC_O_TRUNC)
    .union(InitFlags::FUSE_CACHE_SYMLINKS);

/// Asked for only with the writeback cache. `HANDLE_KILLPRIV_V2` lets the kernel
/// skip asking for `security.capability` before every cached write; in return
/// the daemon clears set-user-id and set-group-id bits on writes, which the file
/// system does on every write anyway.
const WANTED_WRITEBACK: InitFlags =
    InitFlags::FUSE_WRITEBACK_CACHE.union(InitFlags::FUSE_HANDLE_KILLPRIV_V2);

/// Background requests (readahead, writeback) the kernel may have in flight.
const MAX_BACKGROUND: u16 = 64;

/// The FUSE front end of one mounted file system.
pub(crate) struct Adapter {
    fs: Arc<FileSystem>,
    options: MountOptions,
    /// Set at `init` from what the kernel granted.
    writeback: bool,
    lookups: Lookups,
    negotiated: Arc<Mutex<Option<Negotiated>>>,
    /// Set once the session exists: how cached names are dropped (see
    /// [`Adapter::entry_ttl`]).
    notifier: Arc<OnceLock<Notifier>>,
}

impl Adapter {
    pub(crate) fn new(
        fs: Arc<FileSystem>,
        options: MountOptions,
        negotiated: Arc<Mutex<Option<Negotiated>>>,
        notifier: Arc<OnceLock<Notifier>>,
    ) -> Adapter {
        Adapter {
            fs,
            options,
            writeback: false,
            lookups: Lookups::default(),
            negotiated,
            notifier,
        }
    }

    /// How long the kernel may keep a name of directory `parent`.
    ///
    /// Without `default_permissions` the kernel checks no search permission on
    /// the directories of a path: a name it has cached is used without asking,
    /// whoever walks the path. So names are cached only in directories that every
    /// user may search (mode `--x--x--x` at least), where asking could not have
    /// been refused (the readcap check is the same for every caller of a mount);
    /// elsewhere every walk comes to the Authorizer. A chmod that takes search
    /// away drops the names cached so far ([`Adapter::drop_cached_names`]).
    fn entry_ttl(&self, parent: u64) -> Duration {
        match self.fs.getattr(&Caller::root(), parent) {
            Ok(dir) if searchable_by_all(&dir) => self.options.entry_ttl,
            _ => Duration::ZERO,
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, parent: u64, attr: &Attr) {
        let entry_ttl = self.entry_ttl(parent);
        self.lookups.remember(attr.ino);
        reply.entry_with_ttls(
            &self.options.attr_ttl,
            &entry_ttl,
            &file_attr(attr),
            Generation(0),
        );
    }

    /// Asks the kernel to forget the names it caches in directory `dir`. Runs on
    /// a thread of its own, after the reply: the kernel holds the directory's
    /// lock until the chmod is answered, and invalidating needs that lock.
    fn drop_cached_names(&self, dir: u64) {
        let Some(notifier) = self.notifier.get().cloned() else {
            return;
        };
        let fs = Arc::clone(&self.fs);
        let spawned = std::thread::Builder::new()
            .name("btfuse-invalidate".into())
            .spawn(move || {
                let mut offset = 0;
                loop {
                    let entries = match fs.readdir(&Caller::root(), dir, offset) {
                        Ok(entries) if !entries.is_empty() => entries,
                        Ok(_) => return,
                        Err(error) => {
                            tracing::warn!("listing directory {dir} to drop cached names: {error}");
                            return;
                        }
                    };
                    for entry in &entries {
                        if entry.name != b"." && entry.name != b".." {
                            // ENOENT: the kernel did not have that name cached.
                            let _ =
                                notifier.inval_entry(INodeNo(dir), OsStr::from_bytes(&entry.name));
                        }
                    }
                    let next = entries.last().map_or(offset, |entry| entry.next_offset);
                    if next <= offset {
                        return;
                    }
                    offset = next;
                }
            });
        if let Err(error) = spawned {
            tracing::error!("cannot start a thread to drop cached names: {error}");
        }
    }

    /// Open flags as the file system should see them. With the writeback cache the
    /// kernel reads pages to fill partly written ones, even through a write-only
    /// descriptor, and places appends itself.
    fn open_flags(&self, flags: i32) -> (i32, bool) {
        if !self.writeback {
            return (flags, false);
        }
        let flags = flags & !libc::O_APPEND;
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            ((flags & !libc::O_ACCMODE) | libc::O_RDWR, true)
        } else {
            (flags, false)
        }
    }
}

/// How many times the kernel holds each inode (one per entry reply), so that
/// the file system forgets an inode only when the kernel has dropped every
/// reference, whatever order concurrent lookups and forgets are served in.
#[derive(Default)]
struct Lookups {
    counts: Mutex<HashMap<u64, u64>>,
}

impl Lookups {
    fn remember(&self, ino: u64) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(ino).or_insert(0) += 1;
    }

    /// Drops `n` references; true when none is left.
    fn forget(&self, ino: u64, n: u64) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match counts.get_mut(&ino) {
            Some(count) if *count > n => {
                *count -= n;
                false
            }
            Some(_) => {
                counts.remove(&ino);
                true
            }
            None => true,
        }
    }
}

/// The caller of `req`.
fn caller_of(req: &Request) -> Caller {
    caller::of_request(req.uid(), req.gid(), req.pid())
}

/// The errno for `error`; I/O errors (verification failures among them) are
/// logged, the rest are ordinary answers.
fn errno(op: &str, error: &FsError) -> Errno {
    let code = error.errno();
    if code == libc::EIO {
        tracing::warn!("{op}: {error}");
    } else {
        tracing::debug!("{op}: {error}");
    }
    Errno::from_i32(code)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: attr.blksize,
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0 tells the kernel the name does
/// not exist, for the entry's time to live.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// True if every user may search directory `dir` (its mode has `--x--x--x`).
fn searchable_by_all(dir: &Attr) -> bool {
    dir.kind == FileKind::Directory && dir.perm & 0o111 == 0o111
}

fn time_set(time: TimeOrNow) -> TimeSet {
    match time {
        TimeOrNow::SpecificTime(at) => TimeSet::At(at),
        TimeOrNow::Now => TimeSet::Now,
    }
}

fn name_bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

impl fuser::Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let max_write = match config.set_max_write(MAX_IO) {
            Ok(_) => MAX_IO,
            Err(nearest) => {
                let _ = config.set_max_write(nearest);
                nearest
            }
        };
        let max_readahead = match config.set_max_readahead(MAX_IO) {
            Ok(_) => MAX_IO,
            Err(nearest) => {
                let _ = config.set_max_readahead(nearest);
                nearest
            }
        };
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        let mut wanted = WANTED;
        if self.options.wants_writeback_cache() {
            wanted |= WANTED_WRITEBACK;
        }
        let granted = wanted & config.capabilities();
        if let Err(unsupported) = config.add_capabilities(granted) {
            tracing::warn!("the kernel refused FUSE capabilities {unsupported:?}");
        }
        self.writeback = granted.contains(InitFlags::FUSE_WRITEBACK_CACHE);
        let negotiated = Negotiated {
            max_write,
            max_readahead,
            writeback_cache: self.writeback,
            async_read: granted.contains(InitFlags::FUSE_ASYNC_READ),
            parallel_dirops: granted.contains(InitFlags::FUSE_PARALLEL_DIROPS),
            max_pages: granted.contains(InitFlags::FUSE_MAX_PAGES),
            threads: self.options.threads,
        };
        tracing::debug!(?negotiated, "FUSE_INIT");
        *self
            .negotiated
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(negotiated);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(&caller_of(req), parent.0, name_bytes(name)) {
            Ok(attr) => self.reply_entry(reply, parent.0, &attr),
            Err(FsError::NotFound)
                if !self.options.negative_ttl.is_zero() && !self.entry_ttl(parent.0).is_zero() =>
            {
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.options.negative_ttl,
                    &negative_attr(),
                    Generation(0),
                )
            }
            Err(error) => reply.error(errno("lookup", &error)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if self.lookups.forget(ino.0, nlookup) {
            self.fs.forget(ino.0);
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(&caller_of(req), ino.0) {
            Ok(attr) => reply.attr(&self.options.attr_ttl, &file_attr(&attr)),
            Err(error) => reply.error(errno("getattr", &error)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode: mode.map(|mode| mode & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        // A directory that everyone could search may have names cached.
        let was_searchable = set.mode.is_some()
            && self
                .fs
                .getattr(&Caller::root(), ino.0)
                .is_ok_and(|attr| searchable_by_all(&attr));
        match self.fs.setattr(&caller_of(req), ino.0, &set) {
            Ok(attr) => {
                reply.attr(&self.options.attr_ttl, &file_attr(&attr));
                if was_searchable && !searchable_by_all(&attr) {
                    self.drop_cached_names(ino.0);
                }
            }
            Err(error) => reply.error(errno("setattr", &error)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(&caller_of(req), ino.0) {
            Ok(target) => reply.data(&target),
            Err(error) => reply.error(errno("readlink", &error)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self
            .fs
            .mknod(&caller_of(req), parent.0, name_bytes(name), mode, umask)
        {
            Ok(attr) => self.reply_entry(reply, parent.0, &attr),
            Err(error) => reply.error(errno("mknod", &error)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self
            .fs
            .mkdir(&caller_of(req), parent.0, name_bytes(name), mode, umask)
        {
            Ok(attr) => self.reply_entry(reply, parent.0, &attr),
            Err(error) => reply.error(errno("mkdir", &error)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(&caller_of(req), parent.0, name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("unlink", &error)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(&caller_of(req), parent.0, name_bytes(name)) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("rmdir", &error)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.fs.symlink(
            &caller_of(req),
            parent.0,
            name_bytes(link_name),
            target.as_os_str().as_bytes(),
        ) {
            Ok(attr) => self.reply_entry(reply, parent.0, &attr),
            Err(error) => reply.error(errno("symlink", &error)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            // RENAME_WHITEOUT is for overlay file systems; combinations are invalid.
            return reply.error(Errno::EINVAL);
        };
        match self.fs.rename(
            &caller_of(req),
            parent.0,
            name_bytes(name),
            newparent.0,
            name_bytes(newname),
            mode,
        ) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("rename", &error)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self
            .fs
            .link(&caller_of(req), ino.0, newparent.0, name_bytes(newname))
        {
            Ok(attr) => self.reply_entry(reply, newparent.0, &attr),
            Err(error) => reply.error(errno("link", &error)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let caller = caller_of(req);
        let (flags, upgraded) = self.open_flags(flags.0);
        let opened = match self.fs.open(&caller, ino.0, flags) {
            // Write-only was widened to read-write for the page cache; a caller
            // allowed to write but not to read still gets its write-only open,
            // checked as such, and the kernel alone reads through it.
            Err(FsError::Access(_)) if upgraded => self
                .fs
                .access(&caller, ino.0, AccessMask::WRITE)
                .and_then(|()| self.fs.open(&Caller::root(), ino.0, flags)),
            other => other,
        };
        match opened {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(error) => reply.error(errno("open", &error)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(errno("read", &error)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The file system clears set-user-id and set-group-id on every write, so
        // FUSE_WRITE_KILL_SUIDGID needs nothing more.
        match self.fs.write(fh.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(errno("write", &error)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.fs.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("flush", &error)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        let flushed = if flush { self.fs.flush(fh.0) } else { Ok(()) };
        // Release whatever the flush said: the handle must not leak.
        let released = self.fs.release(fh.0);
        match flushed.and(released) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("release", &error)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("fsync", &error)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(&caller_of(req), ino.0) {
            // Every change to a directory goes through this mount, and the kernel
            // drops its cached listing on each, so listings may be cached.
            Ok(()) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(error) => reply.error(errno("opendir", &error)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.fs.readdir(&caller_of(req), ino.0, offset) {
            Ok(entries) => entries,
            Err(error) => return reply.error(errno("readdir", &error)),
        };
        for entry in entries {
            let full = reply.add(
                INodeNo(entry.ino),
                entry.next_offset,
                file_type(entry.kind),
                OsStr::from_bytes(&entry.name),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("fsyncdir", &error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(stat) => reply.statfs(
                stat.blocks,
                stat.blocks_free,
                stat.blocks_available,
                stat.files,
                stat.files_free,
                stat.block_size,
                stat.name_max,
                stat.block_size,
            ),
            Err(error) => reply.error(errno("statfs", &error)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            // Only macOS resource forks have positions.
            return reply.error(Errno::EINVAL);
        }
        match self
            .fs
            .setxattr(&caller_of(req), ino.0, name_bytes(name), value, flags)
        {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("setxattr", &error)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(&caller_of(req), ino.0, name_bytes(name)) {
            Ok(value) => reply_xattr(reply, &value, size),
            Err(error) => reply.error(errno("getxattr", &error)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(&caller_of(req), ino.0) {
            Ok(names) => {
                let mut list = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
                for name in names {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                reply_xattr(reply, &list, size);
            }
            Err(error) => reply.error(errno("listxattr", &error)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .fs
            .removexattr(&caller_of(req), ino.0, name_bytes(name))
        {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("removexattr", &error)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let mask = AccessMask::from_bits(mask.bits());
        match self.fs.access(&caller_of(req), ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("access", &error)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // The creator may always use what it created, so widening write-only to
        // read-write (for the page cache) needs no second check here.
        let (flags, _) = self.open_flags(flags);
        match self.fs.create(
            &caller_of(req),
            parent.0,
            name_bytes(name),
            mode,
            umask,
            flags,
        ) {
            Ok((attr, fh)) => {
                let entry_ttl = self.entry_ttl(parent.0);
                self.lookups.remember(attr.ino);
                reply.created(
                    &entry_ttl,
                    &file_attr(&attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
            Err(error) => reply.error(errno("create", &error)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self
            .fs
            .fallocate(&caller_of(req), ino.0, offset, length, mode)
        {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("fallocate", &error)),
        }
    }
}

/// Replies to getxattr or listxattr: the size alone when asked with size 0,
/// ERANGE when the value does not fit.
fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_forgotten_only_when_every_reference_is_dropped() {
        let lookups = Lookups::default();
        lookups.remember(7);
        lookups.remember(7);
        lookups.remember(7);
        assert!(!lookups.forget(7, 2));
        assert!(lookups.forget(7, 1));
        // An inode the kernel forgets without a counted lookup is forgotten.
        assert!(lookups.forget(8, 1));
    }

    #[test]
    fn kinds_map_to_fuse_types() {
        assert_eq!(file_type(FileKind::Regular), FileType::RegularFile);
        assert_eq!(file_type(FileKind::Directory), FileType::Directory);
        assert_eq!(file_type(FileKind::Symlink), FileType::Symlink);
        assert_eq!(file_type(FileKind::Fifo), FileType::NamedPipe);
        assert_eq!(file_type(FileKind::Socket), FileType::Socket);
    }
}
