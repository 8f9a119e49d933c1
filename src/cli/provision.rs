//! `blocktree provision`: the original design's btprovision.
//!
//! Creates credential stores, makes writecap requests, approves them with root
//! credentials or with a delegated writecap, imports the resulting writecaps, and
//! moves root credentials between stores. Each subcommand is one step of the
//! design's provisioning procedure; the checks that matter (signatures, scopes,
//! expiry, which store an export is for) are core's, and their errors are reported
//! as they are.
//!
//! A store is a directory: a file store, or a TPM store (`--store tpm:TCTI`, built
//! with the `tpm` feature) whose keys live in a TPM and whose directory holds only
//! what the TPM wrapped, a cookie and the sealed root. A directory is opened as
//! whichever kind of store it holds.

use anyhow::{Context, Result, anyhow, bail};
#[cfg(feature = "tpm")]
use blocktree_core::credstore::tpm::{Tcti, TpmCredStore};
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
use std::fmt;
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

Keeping the keys in a TPM 2.0 (a blocktree built with the `tpm` feature): give the TPM as \
--store tpm:TCTI and the store's directory as --tpm-state DIR, e.g.

  blocktree provision new-runtime --store tpm:device:/dev/tpmrm0 --tpm-state server
  blocktree provision new-runtime --store tpm:swtpm:host=127.0.0.1,port=2321 --tpm-state server

and afterwards either the same two options or just --store server (the directory remembers \
its TPM). TCTIs: device:PATH (/dev/tpmrm0, the kernel resource manager), tabrmd:[bus_name=NAME], \
swtpm:host=HOST,port=PORT, mssim:host=HOST,port=PORT. The runtime keys never leave the TPM; using \
them takes the cookie file in the directory (mode 0600). Root credentials are sealed by the TPM \
under the root password: the TPM counts wrong passwords and locks out after too many.

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

/// The `--store` option every subcommand takes, and `--tpm-state` beside it.
#[derive(Debug, Args)]
struct StoreArg {
    /// Credential store: a directory (a file store holds runtime.cred and, with
    /// root credentials, root.cred, each mode 0600; a TPM store holds tpm.cred, its
    /// cookie and tpm-root.cred), or tpm:TCTI for a store whose keys a TPM 2.0
    /// keeps, e.g. tpm:device:/dev/tpmrm0 or tpm:swtpm:host=127.0.0.1,port=2321,
    /// with its directory in --tpm-state. A directory named tpm:... is ./tpm:...
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STORE)]
    store: String,
    /// The directory of the TPM store given as --store tpm:TCTI [default:
    /// ./blocktree-data/credentials]
    #[arg(long, value_name = "DIR")]
    tpm_state: Option<PathBuf>,
}

/// Which credential store a command works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreSpec {
    /// A directory: a file store, or a TPM store reopened on the TPM it names.
    Dir(PathBuf),
    /// A TPM store in `dir` on the TPM at `tcti`.
    Tpm {
        /// The TCTI, e.g. `device:/dev/tpmrm0`.
        tcti: String,
        /// The store's directory.
        dir: PathBuf,
    },
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Dir(dir) => write!(f, "{}", dir.display()),
            StoreSpec::Tpm { tcti, dir } => write!(f, "{} (TPM at {tcti})", dir.display()),
        }
    }
}

impl StoreArg {
    fn spec(&self) -> Result<StoreSpec> {
        match (self.store.strip_prefix("tpm:"), &self.tpm_state) {
            (Some(tcti), state) => Ok(StoreSpec::Tpm {
                tcti: tcti.to_owned(),
                dir: state
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
            }),
            (None, None) => Ok(StoreSpec::Dir(PathBuf::from(&self.store))),
            (None, Some(_)) => bail!(
                "--tpm-state goes with --store tpm:TCTI; for a store directory, give it as --store DIR"
            ),
        }
    }
}

/// The file that marks a TPM store's directory (core's `TpmCredStore` writes it),
/// so that a build without TPM support can say what it found.
#[cfg(not(feature = "tpm"))]
const TPM_STORE_FILE: &str = "tpm.cred";

/// What a build without TPM support says about a TPM store at `spec`.
#[cfg(not(feature = "tpm"))]
fn no_tpm_support(spec: &StoreSpec) -> anyhow::Error {
    let what = match spec {
        StoreSpec::Dir(dir) => format!("{} is a TPM credential store", dir.display()),
        StoreSpec::Tpm { tcti, .. } => {
            format!("--store tpm:{tcti} asks for a TPM credential store")
        }
    };
    anyhow!(
        "{what}, and this blocktree was built without TPM support (build it with \
         `--features tpm`, which needs libtss2-dev)"
    )
}

/// An open credential store of either kind, and what keeps its keys.
pub(crate) struct Store {
    inner: Box<dyn CredStore>,
    kept_by: String,
    in_tpm: bool,
}

impl Store {
    fn file(store: FileCredStore) -> Store {
        let kept_by = format!("files in {} (mode 0600)", store.dir().display());
        Store {
            inner: Box::new(store),
            kept_by,
            in_tpm: false,
        }
    }

    #[cfg(feature = "tpm")]
    fn tpm(store: TpmCredStore) -> Store {
        let kept_by = format!(
            "the TPM at {} (cookie in {})",
            store.tcti(),
            store.dir().join("cookie").display()
        );
        Store {
            inner: Box::new(store),
            kept_by,
            in_tpm: true,
        }
    }

    /// Where the runtime keys are, for reports.
    pub(crate) fn kept_by(&self) -> &str {
        &self.kept_by
    }

    /// Whether a TPM keeps the runtime keys.
    pub(crate) fn in_tpm(&self) -> bool {
        self.in_tpm
    }
}

/// For the services that share a store between threads (`up`, `mount`).
impl From<Store> for std::sync::Arc<dyn CredStore> {
    fn from(store: Store) -> Self {
        std::sync::Arc::from(store.inner)
    }
}

impl std::ops::Deref for Store {
    type Target = dyn CredStore;

    fn deref(&self) -> &(dyn CredStore + 'static) {
        &*self.inner
    }
}

impl std::ops::DerefMut for Store {
    fn deref_mut(&mut self) -> &mut (dyn CredStore + 'static) {
        &mut *self.inner
    }
}

/// Opens the store `spec` names, of either kind.
pub(crate) fn open_store(spec: &StoreSpec) -> Result<Store> {
    match spec {
        #[cfg(feature = "tpm")]
        StoreSpec::Dir(dir) if TpmCredStore::exists_in(dir) => {
            quiet_tss_logging();
            Ok(Store::tpm(TpmCredStore::open(dir)?))
        }
        #[cfg(not(feature = "tpm"))]
        StoreSpec::Dir(dir) if dir.join(TPM_STORE_FILE).exists() => Err(no_tpm_support(spec)),
        StoreSpec::Dir(dir) => Ok(Store::file(FileCredStore::open(dir)?)),
        #[cfg(feature = "tpm")]
        StoreSpec::Tpm { tcti, dir } => {
            let tcti: Tcti = tcti.parse()?;
            quiet_tss_logging();
            Ok(Store::tpm(TpmCredStore::open_with(dir, &tcti)?))
        }
        #[cfg(not(feature = "tpm"))]
        StoreSpec::Tpm { .. } => Err(no_tpm_support(spec)),
    }
}

/// Creates the store `spec` names: a file store for a directory, a TPM store for
/// `tpm:TCTI`.
pub(crate) fn create_store(spec: &StoreSpec) -> Result<Store> {
    match spec {
        StoreSpec::Dir(dir) => Ok(Store::file(FileCredStore::create(dir)?)),
        #[cfg(feature = "tpm")]
        StoreSpec::Tpm { tcti, dir } => {
            let tcti: Tcti = tcti.parse()?;
            quiet_tss_logging();
            Ok(Store::tpm(TpmCredStore::create(dir, &tcti)?))
        }
        #[cfg(not(feature = "tpm"))]
        StoreSpec::Tpm { .. } => Err(no_tpm_support(spec)),
    }
}

/// Whether a failed [`open_store`] found no store there yet.
pub(crate) fn is_not_found(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<CredStoreError>(),
        Some(CredStoreError::NotFound(_))
    )
}

/// Silences the TSS2 libraries' own diagnostics on stderr (`TSS2_LOG`), unless
/// the user set `TSS2_LOG`: every failure is reported as one `error:` line, and
/// the TSS's lines about the same failure would only bury it.
#[cfg(feature = "tpm")]
fn quiet_tss_logging() {
    if std::env::var_os("TSS2_LOG").is_some() {
        return;
    }
    // Only while this process has a single thread: setting a variable races with
    // any other thread reading the environment.
    let single_threaded = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.split_whitespace().eq(["Threads:", "1"]))
    });
    if single_threaded {
        // SAFETY: this process has one thread (checked just above, and nothing
        // on this thread starts another in between), so no other thread can be
        // reading or writing the environment while it changes.
        unsafe { std::env::set_var("TSS2_LOG", "all+none") };
    }
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
    let spec = args.store.spec()?;
    // Refuse before asking for a password: typing one twice to learn the store
    // already has a root would be a poor welcome.
    let existing = match open_store(&spec) {
        Ok(store) => {
            if let Some(root) = store.root_public() {
                return Err(CredStoreError::RootExists(root.principal()).into());
            }
            Some(store)
        }
        Err(error) if is_not_found(&error) => None,
        Err(error) => return Err(error),
    };
    let password = password::require(
        args.password.password_file.as_deref(),
        Purpose::Create,
        PASSWORD_FLAG,
    )?;
    let created = existing.is_none();
    let mut store = match existing {
        Some(store) => store,
        None => create_store(&spec)?,
    };
    let root = store.generate_root(&password)?;
    let mut report = Report::new();
    report
        .field("credential store", &spec)
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
    let spec = args.store.spec()?;
    let store = create_store(&spec)?;
    let mut report = Report::new();
    report
        .field("credential store", &spec)
        .field("keys kept by", store.kept_by())
        .field("runtime principal", store.principal());
    report.print()
}

fn request(args: RequestArgs) -> Result<()> {
    let store = open_store(&args.store.spec()?)?;
    let request = WritecapRequest::new(&*store, args.path.clone())?;
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
    let spec = args.store.spec()?;
    let store = open_store(&spec)?;
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
            &spec
        ),
        (None, None) => bail!(
            "{} holds neither root credentials nor a writecap, so it cannot approve requests",
            &spec
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
                &RuntimeSigner(&*store),
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
    let spec = args.store.spec()?;
    let mut store = open_store(&spec)?;
    let writecap: Writecap = read_encoded(&args.writecap, "writecap")?;
    let replaced = store.writecap().and_then(Writecap::path).cloned();
    store
        .set_writecap(writecap.clone())
        .map_err(unwrap_writecap_error)
        .with_context(|| format!("cannot import the writecap in {}", args.writecap.display()))?;
    let mut report = Report::new();
    report.field("imported into", &spec);
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
    let spec = args.store.spec()?;
    let store = open_store(&spec)?;
    let mut report = Report::new();
    report
        .field("credential store", &spec)
        .field("keys kept by", store.kept_by())
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
    let spec = args.store.spec()?;
    let store = open_store(&spec)?;
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
        .field("of store", &spec)
        .field("written to", args.out.display());
    report.print()
}

fn export_root(args: ExportRootArgs) -> Result<()> {
    let spec = args.store.spec()?;
    let store = open_store(&spec)?;
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
    let spec = args.store.spec()?;
    let mut store = open_store(&spec)?;
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
        .field("imported into", &spec)
        .field("root principal", root.principal())
        .field("domain root path", BtPath::root_of(root.principal()));
    report.print()
}
