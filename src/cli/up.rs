//! `blocktree up`: start the appliance in a data directory.
//!
//! On first start it creates a domain in `DATA/credentials`: one file credential
//! store holding both the root credentials and the server's runtime credentials,
//! provisioned by the same steps as `blocktree provision` (generate the root,
//! request, approve by the root for the domain root path, import). Later starts
//! reuse the store and check its writecap.
//!
//! The filesystem service and the NBD export do not exist yet (issues #4 and #5), so
//! `up` says so and exits instead of pretending to serve.

use anyhow::{Result, anyhow, bail};
use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, CredStoreError, FileCredStore, RootPublicKeys};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, WritecapError};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::output::Report;
use super::password::{self, PASSWORD_ENV, Password, Purpose};
use super::provision::DEFAULT_VALIDITY;

/// The credential store's directory inside the data directory.
const CREDENTIALS_DIR: &str = "credentials";

/// Below this much remaining validity, `up` warns that the writecap needs renewing.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const PASSWORD_FLAG: &str = "--root-password-file";

const NOT_SERVING: &str = "The filesystem service and NBD export are not built yet (issues #4, #5): \
nothing is served; `blocktree up` will export nbd://127.0.0.1:10809/vol0 once they land.";

/// The long `--help` text of `blocktree up`.
pub const LONG_ABOUT: &str = "Start the appliance in a data directory.

On first start, creates a new domain in DATA/credentials: root credentials sealed with \
the root password, and the server's runtime credentials with a writecap for the whole \
domain (/<root principal>, valid 365 days). Later starts reuse them and check the \
writecap is still valid.

The root password for a new domain comes from --root-password-file, else \
$BLOCKTREE_ROOT_PASSWORD, else a prompt on the terminal. When none is available (stdin is \
not a terminal), a random password is generated and printed once to stderr; it is not \
stored anywhere.

Not built yet: the filesystem service and the NBD export (issues #4, #5). Until they land, \
`up` provisions and checks the credentials, prints them, and exits.";

/// Arguments of `blocktree up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory; the credential store is DATA/credentials.
    #[arg(long, value_name = "DATA", default_value = "./blocktree-data")]
    data: PathBuf,
    /// Read the root password from the first line of FILE (used only when the domain
    /// is created).
    #[arg(long, value_name = "FILE")]
    root_password_file: Option<PathBuf>,
}

/// Runs `blocktree up`.
pub fn run(args: UpArgs) -> Result<()> {
    let store_dir = args.data.join(CREDENTIALS_DIR);
    let (store, how) = match FileCredStore::open(&store_dir) {
        Ok(store) if store.writecap().is_some() => (store, "existing"),
        Ok(store) => (
            finish_interrupted_start(store, &args)?,
            "existing, writecap issued now",
        ),
        Err(CredStoreError::NotFound(_)) => (create_domain(&store_dir, &args)?, "created"),
        Err(error) => return Err(error.into()),
    };
    let writecap = store
        .writecap()
        .ok_or_else(|| anyhow!("{} holds no writecap", store_dir.display()))?;
    let path = writecap.path().cloned().ok_or(WritecapError::Empty)?;
    let now = Timestamp::now();
    match writecap.validate_for(&store.principal(), &path, now, &RevocationList::new()) {
        Ok(()) => {}
        Err(WritecapError::Expired { expired, .. }) => bail!(
            "the server's writecap for {path} in {} expired at {expired}; renewal is not \
             built yet: issue a new one with `blocktree provision request`, `approve` and \
             `import`",
            store_dir.display()
        ),
        Err(error) => bail!(
            "the server's writecap in {} is not valid: {error}",
            store_dir.display()
        ),
    }
    let expires = writecap.expires().ok_or(WritecapError::Empty)?;
    if expires < now.after(EXPIRY_WARNING) {
        eprintln!(
            "warning: the server's writecap expires at {expires}; renewal is not built yet: \
             issue a new one with `blocktree provision request`, `approve` and `import`"
        );
    }

    let root = path.root();
    let root_note = if store.root_public().map(|keys| keys.principal()) == Some(root) {
        "root credentials in this store"
    } else {
        "root credentials kept elsewhere"
    };
    // Absolute, so the operator can tell which directory a relative --data meant.
    let data = std::fs::canonicalize(&args.data).unwrap_or_else(|_| args.data.clone());
    let mut report = Report::new();
    report
        .field("data directory", data.display())
        .field(
            "credential store",
            format!("{} ({how})", data.join(CREDENTIALS_DIR).display()),
        )
        .field("root principal", format!("{root} ({root_note})"))
        .field("server principal", store.principal())
        .field("writecap", format!("{path}, valid until {expires}"))
        .text(NOT_SERVING);
    report.print()
}

/// First start: a new store with root credentials and a writecap for the domain.
fn create_domain(store_dir: &Path, args: &UpArgs) -> Result<FileCredStore> {
    let password = match password::obtain(args.root_password_file.as_deref(), Purpose::Create)? {
        Some(password) => password,
        None => {
            let password = password::generate()?;
            // Shown before the root is sealed with it, so that no run ends with
            // root credentials whose password nobody saw.
            eprintln!(
                "No root password was given ({PASSWORD_FLAG}, {PASSWORD_ENV}) and stdin is \
                 not a terminal, so one was generated for the new domain's root credentials:"
            );
            eprintln!("root password: {}", password.as_str());
            eprintln!(
                "Write this down; it is not stored. It is needed to approve writecaps \
                 and to back up the root credentials (`blocktree provision approve`, \
                 `export-root`)."
            );
            password
        }
    };
    let mut store = FileCredStore::create(store_dir)?;
    let root = store.generate_root(&password)?;
    issue_server_writecap(&mut store, root, &password)?;
    Ok(store)
}

/// A store with root credentials but no writecap is what a first start leaves when
/// it is stopped between generating the root and importing the writecap; finish it.
fn finish_interrupted_start(mut store: FileCredStore, args: &UpArgs) -> Result<FileCredStore> {
    let Some(root) = store.root_public() else {
        bail!(
            "{} holds runtime credentials but no writecap: have it approved with \
             `blocktree provision request --store {0}`, `approve` and `import`",
            store.dir().display()
        );
    };
    let password = password::require(
        args.root_password_file.as_deref(),
        Purpose::Unlock(root.principal()),
        PASSWORD_FLAG,
    )?;
    // After the password, so a run that cannot continue prints only its error.
    eprintln!(
        "{} holds root credentials but no writecap (an earlier first start was \
         interrupted); issuing the server's writecap",
        store.dir().display()
    );
    issue_server_writecap(&mut store, root, &password)?;
    Ok(store)
}

/// Request, approve by the root for `/<root>`, import: the design's steps 3-5.
fn issue_server_writecap(
    store: &mut FileCredStore,
    root: RootPublicKeys,
    password: &Password,
) -> Result<()> {
    let domain = BtPath::root_of(root.principal());
    let request = WritecapRequest::new(store, Some(domain.clone()))?;
    let now = Timestamp::now();
    let writecap = {
        let signer = store.root_signer(password)?;
        provision::approve(
            &request,
            &*signer,
            None,
            Some(domain),
            now.after(DEFAULT_VALIDITY),
            now,
        )?
    };
    store.set_writecap(writecap)?;
    Ok(())
}
