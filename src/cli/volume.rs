//! `blocktree volume`: create, list, resize and delete the volumes that
//! `blocktree up` exports over NBD.
//!
//! A volume is a regular file `/volumes/<name>` of the data directory's Blocktree
//! file system, encrypted and verified like every file; its data sector size is
//! its block size. The commands open the store directly, so they refuse to run
//! while `blocktree up` (or another `volume` command) holds the data directory.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::credstore::CredStore;
use blocktree_fs::{FsConfig, local};
use blocktree_nbd::volumes::{DEFAULT_BLOCK_SIZE, check_block_size};
use blocktree_nbd::{Volume, Volumes};
use clap::{Args, Subcommand};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bench::parse_bytes;
use super::domain::{self, CREDENTIALS_DIR, DomainStore, NewStoreArg};
use super::output::Report;
use super::provision::{StoreSpec, open_store};

/// The lock file of a data directory: held by `up` and `volume` while they use
/// the store.
pub(crate) const LOCK_FILE: &str = "lock";

/// Arguments of `blocktree volume`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume. It is sparse: it reads as zeros and takes no space until
    /// written. Creates the domain first when DATA holds none, as `up` does.
    Create {
        /// The volume's name, its NBD export name: 1 to 64 of A-Z a-z 0-9 . _ -
        name: String,
        /// Size (e.g. 1G, 512M, 10GiB; a multiple of the block size).
        #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_bytes)]
        size: u64,
        /// Block size: the volume's sector size and the NBD preferred block size
        /// (512 to 64K, a power of two).
        #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_bytes)]
        block_size: u64,
        #[command(flatten)]
        data: DataArgs,
        /// Read the root password from the first line of FILE (used only when a
        /// new domain is created).
        #[arg(long, value_name = "FILE")]
        root_password_file: Option<PathBuf>,
        #[command(flatten)]
        store: NewStoreArg,
    },
    /// List the volumes: name, size, block size.
    List {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Change a volume's size. Growing reads as zeros; shrinking drops the end and
    /// needs --shrink.
    Resize {
        /// The volume.
        name: String,
        /// The new size (a multiple of the volume's block size).
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        size: u64,
        /// Allow a smaller size: the data past it is lost.
        #[arg(long)]
        shrink: bool,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Delete a volume and its data.
    Delete {
        /// The volume.
        name: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Args)]
struct DataArgs {
    /// Data directory of the appliance (as `blocktree up --data`).
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
}

/// Runs `blocktree volume`.
pub fn run(args: VolumeArgs) -> Result<()> {
    match args.command {
        VolumeCommand::Create {
            name,
            size,
            block_size,
            data,
            root_password_file,
            store,
        } => {
            let block_size = check_block_size(block_size)?;
            let store =
                domain::open_or_create(&data.data, root_password_file.as_deref(), &store.kind)?;
            let (_lock, volumes) = open(&data.data, store, block_size)?;
            let volume = volumes
                .create(&name, size, block_size)
                .with_context(|| format!("cannot create volume {name}"))?;
            let mut report = Report::new();
            report
                .field("created volume", &volume.name)
                .field("size", size_text(volume.size))
                .field("block size", volume.block_size)
                .field(
                    "export",
                    format!(
                        "nbd://127.0.0.1:10809/{} while `blocktree up --data {}` runs",
                        volume.name,
                        data.data.display()
                    ),
                );
            report.print()
        }
        VolumeCommand::List { data } => {
            let (_lock, volumes) =
                open(&data.data, existing_store(&data.data)?, DEFAULT_BLOCK_SIZE)?;
            let list = volumes.list().context("cannot list the volumes")?;
            print_list(&list)
        }
        VolumeCommand::Resize {
            name,
            size,
            shrink,
            data,
        } => {
            let (_lock, volumes) =
                open(&data.data, existing_store(&data.data)?, DEFAULT_BLOCK_SIZE)?;
            let (old, new) = volumes
                .resize(&name, size, shrink)
                .with_context(|| format!("cannot resize volume {name}"))?;
            let mut report = Report::new();
            report.field("resized volume", &new.name).field(
                "size",
                format!("{} -> {}", size_text(old.size), size_text(new.size)),
            );
            report.print()
        }
        VolumeCommand::Delete { name, data } => {
            let (_lock, volumes) =
                open(&data.data, existing_store(&data.data)?, DEFAULT_BLOCK_SIZE)?;
            let volume = volumes
                .delete(&name)
                .with_context(|| format!("cannot delete volume {name}"))?;
            let mut report = Report::new();
            report
                .field("deleted volume", &volume.name)
                .field("size", size_text(volume.size));
            report.print()
        }
    }
}

/// The credential store of an existing appliance in `data`.
fn existing_store(data: &Path) -> Result<DomainStore> {
    let dir = data.join(CREDENTIALS_DIR);
    if !dir.exists() {
        bail!(
            "{} holds no appliance: start one with `blocktree up --data {0}` or create a volume \
             with `blocktree volume create NAME --data {0}`",
            data.display()
        );
    }
    let store = open_store(&StoreSpec::Dir(dir.clone()))
        .with_context(|| format!("cannot open the credential store {}", dir.display()))?;
    Ok(DomainStore {
        store,
        dir,
        how: "existing".to_owned(),
    })
}

/// Locks data directory `data` (creating it if needed): only one process may use
/// its store at a time. The lock lasts as long as the returned file is open.
pub(crate) fn lock_data_dir(data: &Path) -> Result<File> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    let path = data.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(anyhow!(
            "{} is in use by another blocktree process (`blocktree up` or `blocktree volume`); \
             stop it first",
            data.display()
        )),
        Err(TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Locks `data` and opens its file system with `sector_size`-byte sectors for the
/// files it creates.
fn open(data: &Path, domain: DomainStore, sector_size: u32) -> Result<(File, Volumes)> {
    let lock = lock_data_dir(data)?;
    if domain.store.writecap().is_some() {
        domain::check_writecap(&*domain.store, &domain.dir)?;
    }
    let creds: Arc<dyn CredStore> = domain.store.into();
    let config = FsConfig {
        sector_size,
        ..FsConfig::default()
    };
    let fs = local::open_local(data, creds, config)
        .with_context(|| format!("cannot open the Blocktree store in {}", data.display()))?;
    Ok((lock, Volumes::new(Arc::new(fs), sector_size, false)))
}

/// `1 GiB`, `512 MiB`, or bytes when not a whole number of a unit.
pub(crate) fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

fn print_list(volumes: &[Volume]) -> Result<()> {
    if volumes.is_empty() {
        println!("no volumes (create one with `blocktree volume create NAME --size 1G`)");
        return Ok(());
    }
    let width = volumes
        .iter()
        .map(|volume| volume.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!("{:<width$}  {:>14}  {:>10}  BLOCK", "NAME", "BYTES", "SIZE");
    for volume in volumes {
        println!(
            "{:<width$}  {:>14}  {:>10}  {}",
            volume.name,
            volume.size,
            size_text(volume.size),
            volume.block_size
        );
    }
    Ok(())
}
