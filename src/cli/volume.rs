//! `blocktree volume`: create, list, resize and delete the volumes that
//! `blocktree up` exports over NBD.
//!
//! A volume is a regular file `/volumes/<name>` of the data directory's Blocktree
//! file system, encrypted and verified like every file; its data sector size is
//! its block size. The commands open the store directly when they can lock the
//! data directory; while `blocktree up` holds it, they ask that `up` through its
//! control socket (`blocktree_nbd::control`), so volumes change while it serves.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::credstore::CredStore;
use blocktree_fs::{FsConfig, local};
use blocktree_nbd::control::{self, CONTROL_SOCKET, ControlReply, ControlRequest, VolumeEntry};
use blocktree_nbd::volumes::check_block_size;
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
            let manager = Manager::open(&data.data, || {
                domain::open_or_create(&data.data, root_password_file.as_deref(), &store.kind)
            })?;
            let volume = manager
                .create(&name, size, block_size)
                .with_context(|| format!("cannot create volume {name}"))?;
            let export = if manager.is_live() {
                format!(
                    "served now by the running `blocktree up --data {}`",
                    data.data.display()
                )
            } else {
                format!(
                    "nbd://127.0.0.1:10809/{} while `blocktree up --data {}` runs",
                    volume.name,
                    data.data.display()
                )
            };
            let mut report = Report::new();
            report
                .field("created volume", &volume.name)
                .field("size", size_text(volume.size))
                .field("block size", volume.block_size)
                .field("export", export);
            report.print()
        }
        VolumeCommand::List { data } => {
            let manager = Manager::open(&data.data, || existing_store(&data.data))?;
            let list = manager.list().context("cannot list the volumes")?;
            print_list(&list, manager.is_live())
        }
        VolumeCommand::Resize {
            name,
            size,
            shrink,
            data,
        } => {
            let manager = Manager::open(&data.data, || existing_store(&data.data))?;
            let (old, new) = manager
                .resize(&name, size, shrink)
                .with_context(|| format!("cannot resize volume {name}"))?;
            let mut report = Report::new();
            report.field("resized volume", &new.name).field(
                "size",
                format!("{} -> {}", size_text(old.size), size_text(new.size)),
            );
            if new.connections > 0 {
                report.text(format!(
                    "{} open NBD connection(s) keep the size they negotiated until they reconnect",
                    new.connections
                ));
            }
            report.print()
        }
        VolumeCommand::Delete { name, data } => {
            let manager = Manager::open(&data.data, || existing_store(&data.data))?;
            let volume = manager
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

/// Who performs a volume command: this process on the store it locked, or the
/// running `blocktree up` that holds the store, through its control socket.
enum Manager {
    /// The store, opened here.
    Local {
        /// The data directory's lock, held as long as this lives.
        _lock: File,
        /// The store's volumes.
        volumes: Volumes,
    },
    /// The control socket of the `up` that holds the data directory.
    Live(PathBuf),
}

impl Manager {
    /// Locks `data` and opens its store with the credentials `store` gives, or,
    /// when `up` holds it, talks to that `up`.
    fn open(data: &Path, store: impl FnOnce() -> Result<DomainStore>) -> Result<Manager> {
        let Some(lock) = try_lock_data_dir(data)? else {
            let socket = data.join(CONTROL_SOCKET);
            if !socket.exists() {
                bail!(
                    "{} is in use by another blocktree process (`blocktree mount`, `readcap` \
                     or another `volume` command); stop it first",
                    data.display()
                );
            }
            return Ok(Manager::Live(socket));
        };
        let domain = store()?;
        if domain.store.writecap().is_some() {
            domain::check_writecap(&*domain.store, &domain.dir)?;
        }
        let creds: Arc<dyn CredStore> = domain.store.into();
        let fs = local::open_local(data, creds, FsConfig::default())
            .with_context(|| format!("cannot open the Blocktree store in {}", data.display()))?;
        Ok(Manager::Local {
            _lock: lock,
            volumes: Volumes::new(Arc::new(fs), false),
        })
    }

    fn is_live(&self) -> bool {
        matches!(self, Manager::Live(_))
    }

    /// Asks the running `up`.
    fn call(socket: &Path, request: ControlRequest) -> Result<ControlReply> {
        match control::call(socket, &request) {
            Ok(ControlReply::Refused(reason)) => Err(anyhow!(reason)),
            Ok(reply) => Ok(reply),
            Err(error) => Err(error).with_context(|| {
                format!(
                    "the running `blocktree up` did not answer on {}",
                    socket.display()
                )
            }),
        }
    }

    fn list(&self) -> Result<Vec<VolumeEntry>> {
        match self {
            Manager::Local { volumes, .. } => Ok(volumes.list()?.into_iter().map(entry).collect()),
            Manager::Live(socket) => match Self::call(socket, ControlRequest::List)? {
                ControlReply::Volumes(list) => Ok(list),
                other => Err(unexpected(&other)),
            },
        }
    }

    fn create(&self, name: &str, size: u64, block_size: u32) -> Result<VolumeEntry> {
        match self {
            Manager::Local { volumes, .. } => Ok(entry(volumes.create(name, size, block_size)?)),
            Manager::Live(socket) => {
                let request = ControlRequest::Create {
                    name: name.to_owned(),
                    size,
                    block_size,
                };
                match Self::call(socket, request)? {
                    ControlReply::Created(volume) => Ok(volume),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    fn resize(&self, name: &str, size: u64, shrink: bool) -> Result<(VolumeEntry, VolumeEntry)> {
        match self {
            Manager::Local { volumes, .. } => {
                let (old, new) = volumes.resize(name, size, shrink)?;
                Ok((entry(old), entry(new)))
            }
            Manager::Live(socket) => {
                let request = ControlRequest::Resize {
                    name: name.to_owned(),
                    size,
                    shrink,
                };
                match Self::call(socket, request)? {
                    ControlReply::Resized { old, new } => Ok((old, new)),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    fn delete(&self, name: &str) -> Result<VolumeEntry> {
        match self {
            Manager::Local { volumes, .. } => Ok(entry(volumes.delete(name)?)),
            Manager::Live(socket) => {
                let request = ControlRequest::Delete {
                    name: name.to_owned(),
                };
                match Self::call(socket, request)? {
                    ControlReply::Deleted(volume) => Ok(volume),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }
}

/// A volume of a store no server has open.
fn entry(volume: Volume) -> VolumeEntry {
    VolumeEntry {
        name: volume.name,
        size: volume.size,
        block_size: volume.block_size,
        connections: 0,
    }
}

fn unexpected(reply: &ControlReply) -> anyhow::Error {
    anyhow!("the running `blocktree up` answered with something else: {reply:?}")
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
    try_lock_data_dir(data)?.ok_or_else(|| {
        anyhow!(
            "{} is in use by another blocktree process (`blocktree up`, `mount`, `readcap` or \
             `volume`); stop it first",
            data.display()
        )
    })
}

/// [`lock_data_dir`], or `None` when another process holds the lock.
pub(crate) fn try_lock_data_dir(data: &Path) -> Result<Option<File>> {
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
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
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

fn print_list(volumes: &[VolumeEntry], live: bool) -> Result<()> {
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
    // Connections are known only to the running server.
    let header = format!("{:<width$}  {:>14}  {:>10}  BLOCK", "NAME", "BYTES", "SIZE");
    match live {
        true => println!("{header}  CONNECTIONS"),
        false => println!("{header}"),
    }
    for volume in volumes {
        let line = format!(
            "{:<width$}  {:>14}  {:>10}  {:<5}",
            volume.name,
            volume.size,
            size_text(volume.size),
            volume.block_size
        );
        match live {
            true => println!("{line}  {}", volume.connections),
            false => println!("{}", line.trim_end()),
        }
    }
    Ok(())
}
