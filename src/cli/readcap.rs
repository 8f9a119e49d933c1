//! `blocktree readcap grant`: give another principal a readcap on an encrypted
//! file or directory of a local store.
//!
//! It opens the store in DATA with the granter's credentials (DATA/credentials by
//! default) — or, while `blocktree up` runs in DATA, asks it through its control
//! socket, which grants with the server's credentials — and asks the
//! filesystem service to wrap the file's key for the reader's encryption key. A
//! readcap on a directory opens everything below it.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use blocktree_core::credstore::CredStore;
use blocktree_core::keys::{EncryptionPublicKey, POINT_LEN};
use blocktree_fs::{FsConfig, local};
use blocktree_nbd::control::{self, CONTROL_SOCKET, ControlReply, ControlRequest};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

use super::domain::CREDENTIALS_DIR;
use super::output::{Report, key_text};
use super::provision::{StoreSpec, open_store};
use super::volume::try_lock_data_dir;

/// Arguments of `blocktree readcap`.
#[derive(Debug, Args)]
pub struct ReadcapArgs {
    #[command(subcommand)]
    command: ReadcapCommand,
}

#[derive(Debug, Subcommand)]
enum ReadcapCommand {
    /// Let another principal read an encrypted file or directory (and all below it).
    #[command(
        long_about = "Grant a readcap: wrap the file key of an encrypted file or \
directory of the local store in DATA for a reader's encryption key, so that a mount with the \
reader's credentials can read it (and, for a directory, everything below it). Only the \
file's owner (or root) may grant. The store must not be mounted meanwhile."
    )]
    Grant(GrantArgs),
}

#[derive(Debug, Args)]
struct GrantArgs {
    /// Data directory of the local store.
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
    /// The granter's credential store [default: DATA/credentials].
    #[arg(long, value_name = "STORE")]
    credentials: Option<PathBuf>,
    /// The file or directory, as a path inside the volume (e.g. /projects/secret).
    #[arg(long, value_name = "PATH")]
    path: String,
    /// The reader's credential store (only its public encryption key is read).
    #[arg(
        long,
        value_name = "STORE",
        required_unless_present = "reader_key",
        conflicts_with = "reader_key"
    )]
    reader_store: Option<PathBuf>,
    /// The reader's encryption key: the `encryption key` that `blocktree provision
    /// show` prints (base64url), or the same 65-byte point in hex.
    #[arg(long, value_name = "KEY")]
    reader_key: Option<String>,
}

/// Runs `blocktree readcap`.
pub fn run(args: ReadcapArgs) -> Result<()> {
    match args.command {
        ReadcapCommand::Grant(args) => grant(args),
    }
}

fn grant(args: GrantArgs) -> Result<()> {
    let (reader, reader_name) = match (&args.reader_store, &args.reader_key) {
        (Some(dir), _) => {
            let store = open_store(&StoreSpec::Dir(dir.clone()))
                .with_context(|| format!("cannot open the reader's store {}", dir.display()))?;
            (
                store.encryption_public_key(),
                format!("principal {}", store.principal()),
            )
        }
        (None, Some(text)) => {
            let key = parse_key(text)?;
            let name = format!("encryption key {}", key_text(key.as_sec1()));
            (key, name)
        }
        (None, None) => return Err(anyhow!("give --reader-store or --reader-key")),
    };
    let Some(_lock) = try_lock_data_dir(&args.data)? else {
        return grant_live(&args, &reader, &reader_name);
    };
    let store_dir = args
        .credentials
        .clone()
        .unwrap_or_else(|| args.data.join(CREDENTIALS_DIR));
    let store = open_store(&StoreSpec::Dir(store_dir.clone()))
        .with_context(|| format!("cannot open the credential store {}", store_dir.display()))?;
    let creds: Arc<dyn CredStore> = store.into();
    let fs = local::open_local(&args.data, creds, FsConfig::default())
        .with_context(|| format!("cannot open the Blocktree store in {}", args.data.display()))?;
    let caller = blocktree_fuse::caller::of_process(std::process::id())
        .context("cannot read this process's user and groups")?;
    let ino = fs
        .resolve(&caller, &args.path)
        .with_context(|| format!("cannot find {} in the volume", args.path))?;
    fs.grant_readcap(&caller, ino, &reader)
        .with_context(|| format!("cannot grant a readcap on {}", args.path))?;
    fs.sync_all().context("cannot make the readcap durable")?;
    let mut report = Report::new();
    report
        .field("readcap granted", format!("{} (inode {ino})", args.path))
        .field("reader", reader_name);
    report.print()
}

/// Asks the `blocktree up` running in DATA to grant the readcap, as this
/// process's user (the server checks that it owns the file, or is root).
fn grant_live(args: &GrantArgs, reader: &EncryptionPublicKey, reader_name: &str) -> Result<()> {
    let socket = args.data.join(CONTROL_SOCKET);
    if !socket.exists() || args.credentials.is_some() {
        bail!(
            "{} is in use by another blocktree process; stop it first (a running `blocktree \
             up` grants with its own credentials, so --credentials needs it stopped)",
            args.data.display()
        );
    }
    let caller = blocktree_fuse::caller::of_process(std::process::id())
        .context("cannot read this process's user and groups")?;
    let request = ControlRequest::GrantReadcap {
        path: args.path.clone(),
        reader: reader.as_sec1().to_vec(),
        uid: caller.uid,
        gid: caller.gid,
    };
    let ino = match control::call(&socket, &request).with_context(|| {
        format!(
            "the running blocktree up did not answer on {}",
            socket.display()
        )
    })? {
        ControlReply::Granted(ino) => ino,
        ControlReply::Refused(reason) => bail!(reason),
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    let mut report = Report::new();
    report
        .field("readcap granted", format!("{} (inode {ino})", args.path))
        .field("reader", reader_name)
        .field("granted by", "the running server");
    report.print()
}

/// A reader key as base64url (what `provision show` prints) or hex.
fn parse_key(text: &str) -> Result<EncryptionPublicKey> {
    let text = text.trim();
    let bytes = if text.len() == 2 * POINT_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..POINT_LEN)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| anyhow!("--reader-key is not valid hex"))?
    } else {
        URL_SAFE_NO_PAD.decode(text).map_err(|_| {
            anyhow!("--reader-key is neither base64url nor hex of a {POINT_LEN}-byte key")
        })?
    };
    EncryptionPublicKey::from_sec1(&bytes)
        .map_err(|error| anyhow!("--reader-key is not a P-256 public key: {error}"))
}
