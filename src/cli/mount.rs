//! `blocktree mount`: btfuse, a Blocktree directory mounted through FUSE.
//!
//! With `--data DIR` it serves the local sector store in DIR/sectors with the
//! credentials in DIR/credentials, creating both (a new domain, as `blocktree up`
//! does) when DIR is empty. `--credentials STORE` mounts the same data as another
//! principal of the domain. The daemon stays in the foreground until SIGINT or
//! SIGTERM (or an external unmount), then unmounts and makes every write durable.

use anyhow::{Context, Result, bail};
use blocktree_core::credstore::CredStore;
use blocktree_fs::{FileSystem, FsConfig, local};
use blocktree_fuse::{MountHandle, MountOptions};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

use super::absolute;
use super::bench::{parse_bytes, parse_sector_size};
use super::domain::{self, NewStoreArg};
use super::output::Report;
use super::provision::{StoreSpec, open_store};
use super::volume::lock_data_dir;

/// The long `--help` text of `blocktree mount`.
pub const LONG_ABOUT: &str = "Mount a Blocktree directory through FUSE (btfuse).

Serves the local sector store in DATA/sectors with the credentials in DATA/credentials. \
When DATA holds no credential store, a new domain is created first, exactly as \
`blocktree up` does: root credentials sealed with the root password (from \
--root-password-file, else $BLOCKTREE_ROOT_PASSWORD, else the terminal, else generated and \
printed once), and a writecap for the whole domain. The volume's root directory is created \
on first mount, encrypted unless --no-encrypt.

--credentials STORE mounts the same data as another principal of the domain (a store made \
with `blocktree provision new-runtime`, `request`, `approve`, `import`). Encrypted files it \
holds no readcap for read as EACCES (grant one with `blocktree readcap grant`); writes \
outside its writecap fail with EROFS.

Files are encrypted (AES-256-GCM) and verified (Merkle tree under a signed root) by the \
filesystem service; a sector that fails verification reads as EIO, never as data. \
fsync and fdatasync return once the data is durable.

The daemon stays in the foreground. SIGINT or SIGTERM unmounts (the kernel first hands back \
the writes it caches), commits and syncs everything, and exits; so does an external \
`fusermount3 -u MOUNTPOINT` or `umount MOUNTPOINT`. If the mount is busy, it is detached and \
served until its last user lets go.

Mount options (-o, comma separated, repeatable):
  ro                     read-only
  allow_other            let other users in (permissions are still checked by Blocktree)
  allow_root             let root in
  auto_unmount           unmount if the daemon dies (needs allow_other or allow_root)
  no_writeback_cache     no kernel writeback cache (on by default unless ro)
  threads=N              requests served at once (default 8)
  readahead_kb=N         readahead of the mount (default 4096 when run as root; 0 = kernel's)
  attr_timeout=S         seconds the kernel caches attributes (default 60: the
                         mount is its store's only writer)
  entry_timeout=S        seconds the kernel caches names (default 60)
  negative_timeout=S     seconds the kernel caches missing names (default 1, 0 = off)
  fsname=NAME, subtype=NAME   names in the mount table (default blocktree)
  nodev, nosuid, noexec, noatime, sync, dirsync, ... passed to the kernel as they are
default_permissions is refused: Blocktree's Authorizer checks every request itself.

Not built yet: --connect (mounting through a running appliance needs its sector service \
reachable over bttp, issue #7).";

/// Arguments of `blocktree mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where to mount: an existing directory.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    /// Data directory of a local store: DATA/sectors and DATA/credentials, both
    /// created if missing.
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
    /// Mount as the runtime in this credential store instead of DATA/credentials.
    #[arg(long, value_name = "STORE")]
    credentials: Option<PathBuf>,
    /// Mount options, comma separated (see below); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Data sector size of files this mount creates (e.g. 4096, 4K, 64K; at most 1M).
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_sector_size)]
    sector_size: u64,
    /// Bytes a file may buffer before a write commits them as one batch by itself
    /// (sealed, Merkle-updated, signed once); fsync and close commit earlier.
    /// Smaller batches keep the daemon's memory low and reach the disk sooner.
    #[arg(long, value_name = "BYTES", default_value = "2M", value_parser = parse_dirty_limit)]
    dirty_limit: u64,
    /// When this mount creates the volume's root directory: leave it unencrypted
    /// (children inherit; the xattr user.blocktree.encrypt=on|off of a directory
    /// overrides for what is created in it).
    #[arg(long)]
    no_encrypt: bool,
    /// Read the root password from the first line of FILE (used only when a new
    /// domain is created).
    #[arg(long, value_name = "FILE")]
    root_password_file: Option<PathBuf>,
    #[command(flatten)]
    store: NewStoreArg,
    /// Mount through a running appliance at ADDRESS instead of a local store.
    /// Not built yet (issue #7).
    #[arg(long, value_name = "ADDRESS", conflicts_with_all = ["credentials", "root_password_file"])]
    connect: Option<String>,
    /// Log level of the daemon's messages on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log: blocktree_fuse::LogLevel,
}

/// Runs `blocktree mount`.
pub fn run(args: MountArgs) -> Result<()> {
    if let Some(address) = &args.connect {
        bail!(
            "--connect {address}: mounting through a running appliance is not built yet \
             (it needs the sector service reachable over bttp, issue #7); mount a local store \
             with --data"
        );
    }
    // The same allocator tuning as `up`: the daemon's write batches are the
    // same large blocks on the same Raft path.
    blocktree_nbd::tune_malloc();
    blocktree_fuse::log_to_stderr(args.log);
    let options = MountOptions::parse(&args.options)?;
    if !args.mountpoint.is_dir() {
        bail!(
            "the mount point {} is not an existing directory",
            args.mountpoint.display()
        );
    }
    // One process per store: `up`, `volume`, `mount` and `readcap` take this lock.
    let _lock = lock_data_dir(&args.data)?;
    let domain::DomainStore { store, dir, how } = match &args.credentials {
        Some(dir) => domain::DomainStore {
            store: open_store(&StoreSpec::Dir(dir.clone()))
                .with_context(|| format!("cannot open the credential store {}", dir.display()))?,
            dir: dir.clone(),
            how: "given with --credentials".to_owned(),
        },
        None => domain::open_or_create(
            &args.data,
            args.root_password_file.as_deref(),
            &args.store.kind,
        )?,
    };
    let writecap = if store.writecap().is_some() {
        let (path, expires) = domain::check_writecap(&*store, &dir)?;
        format!("{path}, valid until {expires}")
    } else {
        eprintln!(
            "warning: {} holds no writecap: every write will fail with EROFS",
            dir.display()
        );
        "none (read-only)".to_owned()
    };
    let principal = store.principal();
    let kept_by = store.kept_by().to_owned();
    let config = FsConfig {
        read_only: options.read_only,
        encrypt_root: !args.no_encrypt,
        sector_size: u32::try_from(args.sector_size).context("sector size")?,
        dirty_limit: usize::try_from(args.dirty_limit).context("dirty limit")?,
        ..FsConfig::default()
    };
    let creds: Arc<dyn CredStore> = store.into();
    let fs = local::open_local(&args.data, creds, config)
        .with_context(|| format!("cannot open the Blocktree store in {}", args.data.display()))?;
    let data = absolute(&args.data);
    let credentials = absolute(&dir);
    let fs = Arc::new(fs);
    FileSystem::start_flusher(&fs);
    blocktree_fuse::serve(fs, &args.mountpoint, &options, |handle| {
        let mut report = Report::new();
        report
            .field("mounted", absolute(handle.mountpoint()).display())
            .field("data directory", data.display())
            .field(
                "credential store",
                format!("{} ({how})", credentials.display()),
            )
            .field("keys kept by", &kept_by)
            .field("principal", principal)
            .field("writecap", &writecap)
            .field("mode", mode_text(handle, &options))
            .text("SIGINT or SIGTERM unmounts.");
        if let Err(error) = report.print() {
            eprintln!("warning: {error:#}");
        }
    })?;
    eprintln!("unmounted {}", args.mountpoint.display());
    Ok(())
}

fn mode_text(handle: &MountHandle, options: &MountOptions) -> String {
    let access = if options.read_only {
        "read-only"
    } else {
        "read-write"
    };
    match handle.negotiated() {
        Some(kernel) => format!(
            "{access}, {} threads, max read/write {} KiB, writeback cache {}",
            kernel.threads,
            kernel.max_write / 1024,
            if kernel.writeback_cache { "on" } else { "off" }
        ),
        None => access.to_owned(),
    }
}

/// A dirty limit: 64 KiB to 1 GiB.
fn parse_dirty_limit(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if !(64 << 10..=1 << 30).contains(&bytes) {
        return Err(format!("the dirty limit must be 64K to 1G, got {bytes}"));
    }
    Ok(bytes)
}
