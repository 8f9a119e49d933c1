//! The NBD server of Blocktree: exports Blocktree files as network block devices
//! (the fixed newstyle protocol of the NBD project's `doc/proto.md`).
//!
//! The protocol is kept apart from I/O, so it can be tested and fuzzed alone:
//!
//! - [`proto`]: the wire format: constants, decoders with explicit limits, encoders.
//! - [`negotiate`]: option haggling as a state machine ([`negotiate::Negotiation`]).
//! - [`session`]: the transmission phase's rules: which request is valid, and as
//!   what ([`session::Session::check`]).
//! - [`export`]: what is served: a [`export::Catalog`] of exports, each opened as a
//!   [`export::Device`].
//! - [`control`]: the control socket through which `blocktree volume` manages the
//!   volumes of a running server (its frames; the socket itself with `server`).
//!
//! With the default feature `server`:
//!
//! - [`volumes`]: volumes (files in `/volumes` of a Blocktree file system) as a
//!   catalog, and their management (`blocktree volume`).
//! - [`server`]: the tokio server: TCP and Unix listeners, STARTTLS (rustls),
//!   requests of a connection run concurrently and answered out of order.
//! - [`tls`]: loading the certificate and key.
//!
//! Encryption and Merkle verification happen below, in the filesystem service, so
//! clients see plaintext; a sector that fails verification is an `NBD_EIO` reply.

pub mod control;
pub mod export;
pub mod negotiate;
pub mod proto;
pub mod session;

#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod volumes;

pub use export::{Catalog, CatalogError, Device, DeviceError, ExportInfo, Extent};
pub use negotiate::TlsMode;
#[cfg(feature = "server")]
pub use server::{Listening, ServerConfig, ServerError, Stop, serve};
#[cfg(feature = "server")]
pub use volumes::{Volume, VolumeError, Volumes};

/// Log levels, for [`log_to_stderr`].
#[cfg(feature = "server")]
pub use tracing::Level as LogLevel;

/// Tunes the C allocator for a server process; call it first thing. Does
/// nothing on other C libraries.
///
/// - Arenas: at most one per core. glibc otherwise gives up to eight per core
///   to the threads that allocate at once (the blocking threads running file
///   system calls), and memory freed in one arena is not reused by the others,
///   which costs about a hundred MiB of resident memory under load.
/// - A fixed mmap threshold (32 MiB). By default glibc raises the threshold
///   to the size of every large block freed, and with it the heap's trim
///   threshold, so after the first write batch (up to 16 MiB, several copies
///   on the Raft path) such blocks come from the arenas and their memory is
///   kept when freed: under NBD write load that was about 440 MiB resident
///   against 290 MiB with the threshold fixed (and the default 128 KiB trim
///   threshold), at the same speed. Blocks above 32 MiB are rare (snapshots
///   stream in 4 MiB chunks) and still mapped apart.
/// - A background thread hands free memory back to the kernel once a second
///   when the arenas hold more than 16 MiB of it. glibc trims only the
///   top of a heap, so the buffers of a burst of writes freed in its middle
///   stayed resident: after laying out a 1 GiB volume the server held 224 MiB
///   resident with 144 MiB in use, and 154 MiB after one `malloc_trim`.
#[cfg(feature = "server")]
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt(3) only changes allocator tunables; glibc takes its
        // own lock for them. M_ARENA_MAX bounds how many arenas threads create
        // from now on and M_MMAP_THRESHOLD which later blocks are mapped
        // apart; no memory is touched or freed.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
        let trimmer = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    // SAFETY: mallinfo2(3) and malloc_trim(3) take each arena's
                    // lock while they walk it; they neither free nor move a block
                    // in use, only return the pages of free chunks to the kernel.
                    unsafe {
                        if libc::mallinfo2().fordblks > TRIM_ABOVE {
                            libc::malloc_trim(0);
                        }
                    }
                }
            });
        if let Err(error) = trimmer {
            tracing::warn!("no malloc-trim thread, free memory stays resident: {error}");
        }
    }
}

/// Free memory the arenas may keep before the trim thread returns it.
#[cfg(all(feature = "server", target_os = "linux", target_env = "gnu"))]
const TRIM_ABOVE: usize = 16 << 20;

/// How often the trim thread looks at the arenas.
#[cfg(all(feature = "server", target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Blocks at least this large are mapped apart (see [`tune_malloc`]).
#[cfg(all(feature = "server", target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Sends the log of a foreground server to stderr, at `level` and above. Does
/// nothing if a logger is already installed.
#[cfg(feature = "server")]
pub fn log_to_stderr(level: LogLevel) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
