//! btfuse: mounts a Blocktree directory through FUSE.
//!
//! This crate is the FUSE front end of the filesystem service and nothing more:
//! it turns kernel requests into calls on [`blocktree_fs::FileSystem`] and their
//! answers (or errno) into replies. It does no cryptography, stores nothing, and
//! makes no permission decision of its own: the file system's Authorizer checks
//! every request (the kernel's `default_permissions` is never used).
//!
//! [`mount`] mounts and returns a [`MountHandle`]; [`serve`] mounts, waits for
//! SIGINT or SIGTERM or an external unmount, unmounts cleanly and makes every
//! write durable. Requests are served by `threads` threads at once, each reading
//! the FUSE device through its own cloned descriptor; the kernel is asked for
//! 1 MiB reads and writes, asynchronous reads, parallel directory operations and,
//! unless read-only, its writeback cache.

mod adapter;
pub mod caller;
mod options;

pub use adapter::Negotiated;
pub use options::{DEFAULT_THREADS, MAX_IO, MAX_THREADS, MountOptions};
/// Log levels for [`log_to_stderr`] (`error`, `warn`, `info`, `debug`, `trace`).
pub use tracing::Level as LogLevel;

use blocktree_fs::{FileSystem, FsError};
use fuser::{Config, MountOption, SessionACL};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use thiserror::Error;

/// Why mounting, serving or unmounting failed.
#[derive(Debug, Error)]
pub enum MountError {
    /// A `-o` option is not valid.
    #[error("invalid mount option {option:?}: {why}")]
    Option {
        /// The option as given.
        option: String,
        /// What is wrong with it.
        why: String,
    },
    /// The mount point is missing or not a directory.
    #[error("cannot mount on {}: {why}", path.display())]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The kernel (or fusermount3) refused the mount.
    #[error("cannot mount on {}: {source}", path.display())]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The refusal.
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("cannot unmount {}: {source}", path.display())]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The session with the kernel ended with an error.
    #[error("the FUSE session on {} failed: {source}", path.display())]
    Session {
        /// The mount point.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// Committing buffered writes after the session ended failed: they may be lost.
    #[error("writes buffered when {} was unmounted could not be made durable: {source}", path.display())]
    Sync {
        /// The mount point.
        path: PathBuf,
        /// The file system's error.
        source: FsError,
    },
    /// SIGINT and SIGTERM could not be watched.
    #[error("cannot watch for SIGINT and SIGTERM: {0}")]
    Signals(io::Error),
}

/// A mounted file system. Dropping it unmounts.
pub struct MountHandle {
    mountpoint: PathBuf,
    fs: Arc<FileSystem>,
    unmounter: Unmounter,
    session: Option<JoinHandle<io::Result<()>>>,
    negotiated: Option<Negotiated>,
}

/// Asks for the unmount of a mount from any thread (a signal handler's, say).
#[derive(Clone)]
pub struct Unmounter {
    mountpoint: PathBuf,
    inner: Arc<Mutex<Option<fuser::SessionUnmounter>>>,
}

impl Unmounter {
    /// Whether [`Unmounter::unmount`] was called.
    fn requested(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Unmounts. The kernel first sends back every write it still caches. If the
    /// mount is busy (a file is open or a process works in it), it is detached
    /// instead (lazy unmount): gone from the namespace at once, and served until
    /// the last user lets go. Unmounting twice is harmless.
    pub fn unmount(&self) -> Result<(), MountError> {
        let taken = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut unmounter) = taken else {
            return Ok(());
        };
        match unmounter.unmount() {
            Ok(()) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(
                    "{} is busy; detaching it (it is served until its last user lets go)",
                    self.mountpoint.display()
                );
                detach(&self.mountpoint).map_err(|source| MountError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
            Err(source) => Err(MountError::Unmount {
                path: self.mountpoint.clone(),
                source,
            }),
        }
    }
}

/// Lazy unmount with `fusermount3 -u -z`, which works for root and for the user
/// who mounted.
fn detach(mountpoint: &Path) -> io::Result<()> {
    let output = Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u -z failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl MountHandle {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What the kernel agreed to at `FUSE_INIT`.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// A handle that unmounts from another thread.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Waits until the file system is unmounted (by [`Unmounter::unmount`],
    /// `fusermount3 -u` or `umount`), then commits and makes durable every write
    /// still buffered.
    pub fn wait(mut self) -> Result<(), MountError> {
        self.finish()
    }

    /// Unmounts, then does what [`MountHandle::wait`] does.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmounter.unmount()?;
        self.finish()
    }

    fn finish(&mut self) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let ended = match session.join() {
            Ok(Err(error))
                if error.raw_os_error() == Some(libc::ECONNABORTED)
                    && self.unmounter.requested() =>
            {
                // We asked for the unmount; the kernel tore the connection down
                // before the session read its end (ENODEV). The session is over
                // all the same, and what is buffered is synced below.
                tracing::info!(
                    "the kernel aborted the FUSE connection on {} while it was unmounted",
                    self.mountpoint.display()
                );
                Ok(())
            }
            Ok(ended) => ended,
            Err(_) => Err(io::Error::other("a FUSE worker thread panicked")),
        };
        // Whatever ended the session, what the file system buffers must reach disk.
        let synced = self.fs.sync_all();
        ended.map_err(|source| MountError::Session {
            path: self.mountpoint.clone(),
            source,
        })?;
        synced.map_err(|source| MountError::Sync {
            path: self.mountpoint.clone(),
            source,
        })
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(error) = self.unmounter.unmount() {
                tracing::error!("{error}");
            }
            if let Err(error) = self.finish() {
                tracing::error!("{error}");
            }
        }
    }
}

/// Mounts `fs` on `mountpoint` and serves it from background threads until the
/// returned handle unmounts it (or is dropped, or someone else unmounts).
pub fn mount(
    fs: Arc<FileSystem>,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<MountHandle, MountError> {
    match std::fs::metadata(mountpoint) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => {
            return Err(MountError::MountPoint {
                path: mountpoint.to_owned(),
                why: "it is not a directory".into(),
            });
        }
        Err(error) => {
            return Err(MountError::MountPoint {
                path: mountpoint.to_owned(),
                why: error.to_string(),
            });
        }
    }
    let negotiated = Arc::new(Mutex::new(None));
    let notifier = Arc::new(OnceLock::new());
    let adapter = adapter::Adapter::new(
        Arc::clone(&fs),
        options.clone(),
        Arc::clone(&negotiated),
        Arc::clone(&notifier),
    );
    let mut session =
        fuser::Session::new(adapter, mountpoint, &session_config(options)).map_err(|source| {
            MountError::Mount {
                path: mountpoint.to_owned(),
                source,
            }
        })?;
    let _ = notifier.set(session.notifier());
    let unmounter = Unmounter {
        mountpoint: mountpoint.to_owned(),
        inner: Arc::new(Mutex::new(Some(session.unmount_callable()))),
    };
    let thread = std::thread::Builder::new()
        .name("btfuse-session".into())
        .spawn(move || session.run())
        .map_err(|source| MountError::Mount {
            path: mountpoint.to_owned(),
            source,
        })?;
    if options.readahead_kb > 0 {
        set_readahead(mountpoint, options.readahead_kb);
    }
    let negotiated = negotiated
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(MountHandle {
        mountpoint: mountpoint.to_owned(),
        fs,
        unmounter,
        session: Some(thread),
        negotiated,
    })
}

/// Sets the readahead of the mount's backing device info. The kernel starts every
/// FUSE mount at 128 KiB and `FUSE_INIT` can only lower it, which leaves
/// sequential reads waiting on many small requests, each a round trip through
/// the file system. Only root may write sysfs; otherwise the default stays.
fn set_readahead(mountpoint: &Path, kib: u32) {
    use std::os::unix::fs::MetadataExt;
    // A stat of the mount point is served by the session, which is running.
    let dev = match std::fs::metadata(mountpoint) {
        Ok(metadata) => metadata.dev(),
        Err(error) => {
            tracing::debug!("stat of {}: {error}", mountpoint.display());
            return;
        }
    };
    // Linux's dev_t layout (glibc's gnu_dev_major and gnu_dev_minor).
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(error) = std::fs::write(&path, format!("{kib}\n")) {
        tracing::debug!("cannot set the readahead in {path}: {error}");
    }
}

fn session_config(options: &MountOptions) -> Config {
    let mut mount_options = vec![
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype(options.subtype.clone()),
        if options.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if options.auto_unmount {
        mount_options.push(MountOption::AutoUnmount);
    }
    for option in &options.passthrough {
        mount_options.push(match option.as_str() {
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            other => MountOption::CUSTOM(other.to_owned()),
        });
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        SessionACL::All
    } else if options.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads);
    config.clone_fd = true;
    config
}

/// Mounts `fs` and serves it in the foreground until SIGINT or SIGTERM (then
/// unmounts) or until someone unmounts it; then commits and makes durable every
/// buffered write. `mounted` is called once the mount is up, e.g. to print where.
pub fn serve(
    fs: Arc<FileSystem>,
    mountpoint: &Path,
    options: &MountOptions,
    mounted: impl FnOnce(&MountHandle),
) -> Result<(), MountError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Watched before mounting, so a signal during the mount is not lost.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(MountError::Signals)?;
    let signal_handle = signals.handle();
    let handle = mount(fs, mountpoint, options)?;
    mounted(&handle);
    let unmounter = handle.unmounter();
    let watcher = std::thread::Builder::new()
        .name("btfuse-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!("signal {signal}: unmounting");
                if let Err(error) = unmounter.unmount() {
                    tracing::error!("{error}");
                }
            }
        })
        .map_err(MountError::Signals)?;
    let served = handle.wait();
    signal_handle.close();
    let _ = watcher.join();
    served
}

/// Sends `tracing` events at `level` and above to stderr; for binaries that
/// serve a mount in the foreground. Does nothing if a subscriber is already set.
pub fn log_to_stderr(level: tracing::Level) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(io::stderr)
        .with_target(false)
        .try_init();
}
