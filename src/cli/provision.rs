//! `blocktree provision`: the original design's btprovision.
//!
//! Creates credential stores, makes writecap requests, approves them with root
//! credentials or with a delegated writecap, imports the resulting writecaps, and
//! moves root credentials between stores. Each subcommand is one step of the
//! design's provisioning procedure; the checks that matter (signatures, scopes,
//! expiry, which store an export is for) are core's, and their errors are reported
//! as they are.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::credstore::{
    CredStore, CredStoreError, ExportedRoot, FileCredStore, RuntimeSigner,
};
use blocktree_core::encoding;
use blocktree_core::keys::{EncryptionPublicKey, POINT_LEN};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, Writecap, WritecapError};
use blocktree_core::{BtPath, PrincipalId};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::output::{Report, key_text};
use super::password::{self, Purpose};
use super::{read_encoded, read_exact_len, write_file};

/// The store `provision` works on unless told otherwise: the one `blocktree up`
/// creates in its default data directory.
pub const DEFAULT_STORE: &str = "./blocktree-data/credentials";

/// How long an approved writecap lasts unless `--expires` or `--expires-at` says.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Requests, writecaps and storage keys hold public keys and signatures only.
const PUBLIC_FILE_MODE: u32 = 0o644;
/// Exported root credentials are encrypted twice, but still only for their owner.
const PRIVATE_FILE_MODE: u32 = 0o600;

const PASSWORD_FLAG: &str = "--password-file";

const WALKTHROUGH: &str = "\
Setting up a new domain with one server (each step prints what it did):

  blocktree provision new-root    --store operator
  blocktree provision new-runtime --store server
  blocktree provision request     --store server --path /<root principal> --out server.request
  blocktree provision approve     --store operator --request server.request --expires 365d --out server.writecap
  blocktree provision import      --store server --writecap server.writecap
  blocktree provision show        --store server

Backing up the root credentials into another store:

  blocktree provision new-runtime --store backup
  blocktree provision storage-key --store backup --out backup.storage-key
  blocktree provision export-root --store operator --to backup.storage-key --out root.export
  blocktree provision import-root --store backup --from root.export

Root passwords come from --password-file (its first line), else the environment variable \
BLOCKTREE_ROOT_PASSWORD, else a prompt on the terminal. There is no default password.";

/// Arguments of `blocktree provision`.
#[derive(Debug, Args)]
#[command(after_long_help = WALKTHROUGH)]
pub struct ProvisionArgs {
    #[command(subcommand)]
    command: ProvisionCommand,
}

#[derive(Debug, Subcommand)]
enum ProvisionCommand {
    /// Generate a domain's root credentials, sealed with a root password; creates
    /// the store if absent.
    #[command(
        long_about = "Generate the root credentials of a new domain in the store \
(creating the store first if DIR holds none), sealed with a root password of at least 8 \
characters. On a terminal the password is asked for twice. Prints the root principal and \
the domain's root path, /<root principal>, under which every path of the domain lies."
    )]
    NewRoot(NewRootArgs),
    /// Create a store with fresh runtime credentials (for a server or an operator).
    #[command(
        long_about = "Create a credential store holding fresh runtime credentials: a \
signing key, an encryption key and a storage key. Fails if DIR already holds a store. \
Prints the runtime's principal."
    )]
    NewRuntime(NewRuntimeArgs),
    /// Write a request for a writecap for this store's runtime.
    #[command(
        long_about = "Write a writecap request for the store's runtime: its public \
keys and the path it asks for, signed with its key. The file holds no secrets; hand it \
to whoever approves it."
    )]
    Request(RequestArgs),
    /// Issue a writecap for a request, with the root credentials or a delegated writecap.
    #[command(
        long_about = "Issue a writecap for a request. If the store holds root \
credentials, the root approves (this needs the root password) and may grant any path in \
its domain. Otherwise, or with --as-runtime, the store's runtime approves with its own \
writecap, and may grant only paths inside that writecap until it expires."
    )]
    Approve(ApproveArgs),
    /// Store a writecap issued to this store's runtime.
    #[command(
        long_about = "Store a writecap in the credential store. It must have been \
issued to this store's runtime, its signatures must verify up to the root of its path, and \
it must not have expired. Replaces the writecap the store held before."
    )]
    Import(ImportArgs),
    /// Print a store's principal, public keys, root credentials and writecap.
    #[command(
        long_about = "Print the store's runtime principal, its public keys (unpadded \
base64url of the uncompressed SEC1 points), whether it holds root credentials, and its \
writecap chain, writer's certificate first, with whether the writecap is valid now. \
Revocations are not known to the store and are not checked."
    )]
    Show(ShowArgs),
    /// Write a store's public storage key, the address for `export-root`.
    #[command(
        long_about = "Write the store's public storage key: the 65-byte uncompressed \
P-256 point that `export-root --to` encrypts root credentials for, so only this store can \
import them."
    )]
    StorageKey(StorageKeyArgs),
    /// Export the root credentials, encrypted for one receiving store.
    #[command(
        long_about = "Export the store's root credentials for one other store: \
encrypted to that store's storage key, inside a layer encrypted under the root password. \
Importing needs both that store and the password."
    )]
    ExportRoot(ExportRootArgs),
    /// Import root credentials exported for this store.
    #[command(long_about = "Import root credentials exported for this store with \
`blocktree provision export-root`. Needs the root password they were exported with, which \
also seals them in this store.")]
    ImportRoot(ImportRootArgs),
}

/// The `--store` option every subcommand takes.
#[derive(Debug, Args)]
struct StoreArg {
    /// Credential store directory (holds runtime.cred, and root.cred when the store
    /// has root credentials; both must be mode 0600).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STORE)]
    store: PathBuf,
}

/// The `--password-file` option of subcommands that use the root password.
#[derive(Debug, Args)]
struct PasswordArg {
    /// Read the root password from the first line of FILE. Without it:
    /// $BLOCKTREE_ROOT_PASSWORD, else a prompt on the terminal.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct NewRootArgs {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    password: PasswordArg,
}

#[derive(Debug, Args)]
struct NewRuntimeArgs {
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Debug, Args)]
struct RequestArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The path the runtime asks authority over, /<root principal>/...; the approver
    /// may grant another one.
    #[arg(long, value_name = "PATH")]
    path: Option<BtPath>,
    /// Where to write the request.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ApproveArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The request file written by `blocktree provision request`.
    #[arg(long, value_name = "FILE")]
    request: PathBuf,
    /// The path to grant, /<root principal>/... [default: the path in the request]
    #[arg(long, value_name = "PATH")]
    path: Option<BtPath>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    /// Approve with the runtime's writecap even though the store holds root credentials.
    #[arg(long)]
    as_runtime: bool,
    #[command(flatten)]
    password: PasswordArg,
    /// Where to write the writecap.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ExpiryArgs {
    /// How long the writecap lasts, e.g. 365d, 12h, 30m [default: 365d, or less if the
    /// approver's own writecap expires sooner]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expires: Option<Duration>,
    /// When the writecap lapses, in UTC, e.g. 2027-01-31T00:00:00Z
    #[arg(long, value_name = "TIME", value_parser = parse_utc_time, conflicts_with = "expires")]
    expires_at: Option<Timestamp>,
}

#[derive(Debug, Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The writecap file written by `blocktree provision approve`.
    #[arg(long, value_name = "FILE")]
    writecap: PathBuf,
}

#[derive(Debug, Args)]
struct ShowArgs {
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Debug, Args)]
struct StorageKeyArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Where to write the storage key.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ExportRootArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The receiving store's storage key, written by `blocktree provision storage-key`.
    #[arg(long, value_name = "STORAGE_KEY_FILE")]
    to: PathBuf,
    /// Where to write the exported root credentials (mode 0600).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    password: PasswordArg,
}

#[derive(Debug, Args)]
struct ImportRootArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The file written by `blocktree provision export-root`.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    #[command(flatten)]
    password: PasswordArg,
}

/// Runs `blocktree provision`.
pub fn run(args: ProvisionArgs) -> Result<()> {
    match args.command {
        ProvisionCommand::NewRoot(args) => new_root(args),
        ProvisionCommand::NewRuntime(args) => new_runtime(args),
        ProvisionCommand::Request(args) => request(args),
        ProvisionCommand::Approve(args) => approve(args),
        ProvisionCommand::Import(args) => import(args),
        ProvisionCommand::Show(args) => show(args),
        ProvisionCommand::StorageKey(args) => storage_key(args),
        ProvisionCommand::ExportRoot(args) => export_root(args),
        ProvisionCommand::ImportRoot(args) => import_root(args),
    }
}

fn parse_utc_time(text: &str) -> Result<Timestamp, String> {
    let time = humantime::parse_rfc3339(text).map_err(|error| {
        format!("{error}; expected an RFC 3339 time in UTC, e.g. 2027-01-31T00:00:00Z")
    })?;
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the time is before 1970".to_owned())?;
    Ok(Timestamp(since_epoch.as_secs()))
}

/// A writecap error shown as itself: [`CredStoreError::Writecap`] would prefix
/// "writecap: " to messages that already say "writecap".
fn unwrap_writecap_error(error: CredStoreError) -> anyhow::Error {
    match error {
        CredStoreError::Writecap(inner) => inner.into(),
        other => other.into(),
    }
}

fn new_root(args: NewRootArgs) -> Result<()> {
    let dir = &args.store.store;
    // Refuse before asking for a password: typing one twice to learn the store
    // already has a root would be a poor welcome.
    let existing = match FileCredStore::open(dir) {
        Ok(store) => {
            if let Some(root) = store.root_public() {
                return Err(CredStoreError::RootExists(root.principal()).into());
            }
            Some(store)
        }
        Err(CredStoreError::NotFound(_)) => None,
        Err(error) => return Err(error.into()),
    };
    let password = password::require(
        args.password.password_file.as_deref(),
        Purpose::Create,
        PASSWORD_FLAG,
    )?;
    let created = existing.is_none();
    let mut store = match existing {
        Some(store) => store,
        None => FileCredStore::create(dir)?,
    };
    let root = store.generate_root(&password)?;
    let mut report = Report::new();
    report
        .field("credential store", dir.display())
        .field(
            "store",
            if created {
                "created"
            } else {
                "existing, root credentials added"
            },
        )
        .field("root principal", root.principal())
        .field("domain root path", BtPath::root_of(root.principal()))
        .field("runtime principal", store.principal());
    report.print()
}

fn new_runtime(args: NewRuntimeArgs) -> Result<()> {
    let store = FileCredStore::create(&args.store.store)?;
    let mut report = Report::new();
    report
        .field("credential store", args.store.store.display())
        .field("runtime principal", store.principal());
    report.print()
}

fn request(args: RequestArgs) -> Result<()> {
    let store = FileCredStore::open(&args.store.store)?;
    let request = WritecapRequest::new(&store, args.path.clone())?;
    write_file(
        &args.out,
        &encoding::encode(&request),
        PUBLIC_FILE_MODE,
        "the writecap request",
    )?;
    let mut report = Report::new();
    report.field("request for", request.principal()).field(
        "requested path",
        args.path.map_or_else(
            || "none (the approver chooses)".to_owned(),
            |p| p.to_string(),
        ),
    );
    report.field("written to", args.out.display());
    report.print()
}

/// "1 certificate", "2 certificates".
fn certificate_count(writecap: &Writecap) -> String {
    match writecap.chain().len() {
        1 => "1 certificate".to_owned(),
        count => format!("{count} certificates"),
    }
}

/// Who signs an approval.
enum Approver<'a> {
    /// The root credentials in the store (of this root principal), unlocked with
    /// the password.
    Root(PrincipalId),
    /// The store's runtime, delegating from its own writecap.
    Runtime(&'a Writecap),
}

impl ExpiryArgs {
    /// The expiry asked for; by default [`DEFAULT_VALIDITY`] from `now`, cut to
    /// `cap` (the approver's own expiry) so a delegated approval does not fail for
    /// asking beyond what the approver holds.
    fn resolve(&self, now: Timestamp, cap: Option<Timestamp>) -> Result<Timestamp> {
        let expires = match (self.expires, self.expires_at) {
            (Some(duration), _) => now.after(duration),
            (None, Some(at)) => at,
            (None, None) => {
                let default = now.after(DEFAULT_VALIDITY);
                cap.map_or(default, |cap| default.min(cap))
            }
        };
        if expires <= now {
            bail!("the expiry {expires} is not in the future (now is {now})");
        }
        Ok(expires)
    }
}

fn approve(args: ApproveArgs) -> Result<()> {
    let store = FileCredStore::open(&args.store.store)?;
    let request: WritecapRequest = read_encoded(&args.request, "writecap request")?;
    request
        .verify()
        .with_context(|| format!("request {}", args.request.display()))?;
    let path = match args.path.clone().or_else(|| request.path.clone()) {
        Some(path) => path,
        None => bail!(
            "the request in {} names no path; pass --path to choose what to grant",
            args.request.display()
        ),
    };
    let approver = match (store.root_public(), store.writecap()) {
        (Some(root), _) if !args.as_runtime => Approver::Root(root.principal()),
        (_, Some(writecap)) => Approver::Runtime(writecap),
        (Some(_), None) => bail!(
            "--as-runtime: the runtime in {} has no writecap to delegate from",
            args.store.store.display()
        ),
        (None, None) => bail!(
            "{} holds neither root credentials nor a writecap, so it cannot approve requests",
            args.store.store.display()
        ),
    };
    let now = Timestamp::now();
    let (writecap, approved_by) = match approver {
        Approver::Root(root) => {
            // The same check core makes, made before the password is asked for.
            if path.root() != root {
                return Err(WritecapError::OutsideAuthority {
                    requested: path,
                    authority: BtPath::root_of(root),
                }
                .into());
            }
            let expires = args.expiry.resolve(now, None)?;
            let password = password::require(
                args.password.password_file.as_deref(),
                Purpose::Unlock(root),
                PASSWORD_FLAG,
            )?;
            let signer = store.root_signer(&password)?;
            let writecap = provision::approve(&request, &*signer, None, Some(path), expires, now)?;
            (writecap, format!("root {}", BtPath::root_of(root)))
        }
        Approver::Runtime(own) => {
            let expires = args.expiry.resolve(now, own.expires())?;
            let writecap = provision::approve(
                &request,
                &RuntimeSigner(&store),
                Some(own),
                Some(path),
                expires,
                now,
            )?;
            let own_path = own
                .path()
                .map_or_else(String::new, |path| format!(" (its writecap covers {path})"));
            (writecap, format!("runtime {}{own_path}", store.principal()))
        }
    };
    write_file(
        &args.out,
        &encoding::encode(&writecap),
        PUBLIC_FILE_MODE,
        "the writecap",
    )?;
    let mut report = Report::new();
    report.field("issued to", request.principal());
    if let Some(path) = writecap.path() {
        report.field("path", path);
    }
    if let Some(expires) = writecap.expires() {
        report.field("expires", expires);
    }
    report
        .field("approved by", approved_by)
        .field("chain", certificate_count(&writecap))
        .field("written to", args.out.display());
    report.print()
}

fn import(args: ImportArgs) -> Result<()> {
    let mut store = FileCredStore::open(&args.store.store)?;
    let writecap: Writecap = read_encoded(&args.writecap, "writecap")?;
    let replaced = store.writecap().and_then(Writecap::path).cloned();
    store
        .set_writecap(writecap.clone())
        .map_err(unwrap_writecap_error)
        .with_context(|| format!("cannot import the writecap in {}", args.writecap.display()))?;
    let mut report = Report::new();
    report.field("imported into", args.store.store.display());
    if let Some(path) = writecap.path() {
        report.field("path", path);
    }
    if let Some(expires) = writecap.expires() {
        report.field("valid until", expires);
    }
    if let Some(replaced) = replaced {
        report.field("replaced", format!("the previous writecap for {replaced}"));
    }
    report.print()
}

fn show(args: ShowArgs) -> Result<()> {
    let store = FileCredStore::open(&args.store.store)?;
    let mut report = Report::new();
    report
        .field("credential store", args.store.store.display())
        .field("runtime principal", store.principal())
        .field(
            "signing key",
            key_text(store.signing_public_key().as_sec1()),
        )
        .field(
            "encryption key",
            key_text(store.encryption_public_key().as_sec1()),
        )
        .field(
            "storage key",
            key_text(store.storage_public_key().as_sec1()),
        );
    match store.root_public() {
        Some(root) => report.field(
            "root credentials",
            format!(
                "present, root principal {} (sealed with the root password)",
                root.principal()
            ),
        ),
        None => report.field("root credentials", "none"),
    };
    match store.writecap() {
        None => {
            report.field(
                "writecap",
                "none (request one with `blocktree provision request`)",
            );
        }
        Some(writecap) => {
            report.field("writecap", certificate_count(writecap));
            for (index, certificate) in writecap.chain().iter().enumerate() {
                let issuer = certificate.issuer.principal();
                let role = if issuer == certificate.path.root() {
                    " (root)"
                } else {
                    ""
                };
                report.text(format!("  certificate {index}:"));
                report
                    .field("    issued to", certificate.issued_to)
                    .field("    path", &certificate.path)
                    .field("    expires", certificate.expires)
                    .field("    issuer", format!("{issuer}{role}"));
            }
            let status = match writecap.path() {
                Some(path) => match writecap.validate_for(
                    &store.principal(),
                    path,
                    Timestamp::now(),
                    &RevocationList::new(),
                ) {
                    Ok(()) => match writecap.expires() {
                        Some(expires) => format!("valid until {expires}"),
                        None => "valid".to_owned(),
                    },
                    Err(error) => format!("NOT VALID: {error}"),
                },
                None => format!("NOT VALID: {}", WritecapError::Empty),
            };
            report.field("writecap status", status);
        }
    }
    report.print()
}

/// Reads a storage key written by `storage-key`: the raw uncompressed SEC1 point,
/// whose leading 0x04 tag and fixed length identify the format.
fn read_storage_key(path: &Path) -> Result<EncryptionPublicKey> {
    let bytes = read_exact_len(path, POINT_LEN, "storage key")?;
    EncryptionPublicKey::from_sec1(&bytes)
        .map_err(|error| anyhow!("{} is not a valid storage key: {error}", path.display()))
}

fn storage_key(args: StorageKeyArgs) -> Result<()> {
    let store = FileCredStore::open(&args.store.store)?;
    let key = store.storage_public_key();
    write_file(
        &args.out,
        key.as_sec1(),
        PUBLIC_FILE_MODE,
        "the storage key",
    )?;
    let mut report = Report::new();
    report
        .field("storage key", key_text(key.as_sec1()))
        .field("of store", args.store.store.display())
        .field("written to", args.out.display());
    report.print()
}

fn export_root(args: ExportRootArgs) -> Result<()> {
    let store = FileCredStore::open(&args.store.store)?;
    let root = store.root_public().ok_or(CredStoreError::NoRoot)?;
    let receiver = read_storage_key(&args.to)?;
    let password = password::require(
        args.password.password_file.as_deref(),
        Purpose::Unlock(root.principal()),
        PASSWORD_FLAG,
    )?;
    let exported = store.export_root(&password, &receiver)?;
    write_file(
        &args.out,
        &encoding::encode(&exported),
        PRIVATE_FILE_MODE,
        "the exported root credentials",
    )?;
    let mut report = Report::new();
    report
        .field("root principal", root.principal())
        .field("for storage key", key_text(receiver.as_sec1()))
        .field("written to", args.out.display());
    report.print()
}

fn import_root(args: ImportRootArgs) -> Result<()> {
    let mut store = FileCredStore::open(&args.store.store)?;
    let exported: ExportedRoot = read_encoded(&args.from, "exported root credentials file")?;
    if let Some(existing) = store.root_public() {
        return Err(CredStoreError::RootExists(existing.principal()).into());
    }
    let password = password::require(
        args.password.password_file.as_deref(),
        Purpose::Unlock(exported.public.principal()),
        PASSWORD_FLAG,
    )?;
    let root = store.import_root(&password, &exported).with_context(|| {
        format!(
            "cannot import the root credentials in {}",
            args.from.display()
        )
    })?;
    let mut report = Report::new();
    report
        .field("imported into", args.store.store.display())
        .field("root principal", root.principal())
        .field("domain root path", BtPath::root_of(root.principal()));
    report.print()
}
