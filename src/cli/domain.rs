//! The appliance's domain: the credential store in `DATA/credentials` that `up`,
//! `mount` and `volume create` open, or create with a new domain on first start.
//!
//! A new domain's store is a TPM store when the machine has a TPM (the kernel's
//! resource manager, `/dev/tpmrm0`) and this build has TPM support, else a file
//! store; `--store` chooses explicitly. An existing store is opened as whichever
//! kind it is (a TPM store names its TPM), so later commands need no option.

use anyhow::{Result, anyhow, bail};
use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, RootPublicKeys};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, WritecapError};
use clap::Args;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::password::{self, PASSWORD_ENV, Password, Purpose};
use super::provision::{
    DEFAULT_VALIDITY, Store, StoreSpec, create_store, is_not_found, open_store,
};

/// The credential store's directory inside the data directory.
pub(crate) const CREDENTIALS_DIR: &str = "credentials";

/// The TPM a new domain uses by itself: the kernel's TPM resource manager.
pub(crate) const TPM_DEVICE: &str = "/dev/tpmrm0";

/// Below this much remaining validity, a warning says the writecap needs renewing.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const PASSWORD_FLAG: &str = "--root-password-file";

/// The kind of credential store a new domain gets (`--store`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum NewStore {
    /// A TPM store on /dev/tpmrm0 when it exists and this build supports TPMs,
    /// else a file store.
    #[default]
    Auto,
    /// A file store: keys in files of mode 0600.
    File,
    /// A TPM store on the TPM this TCTI names (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, `tabrmd`).
    Tpm(String),
}

impl FromStr for NewStore {
    type Err = String;

    fn from_str(text: &str) -> Result<NewStore, String> {
        match text {
            "auto" => Ok(NewStore::Auto),
            "file" => Ok(NewStore::File),
            _ => match text.strip_prefix("tpm:") {
                Some("") => Err("tpm: needs a TCTI, e.g. tpm:device:/dev/tpmrm0".into()),
                Some(tcti) => Ok(NewStore::Tpm(tcti.to_owned())),
                None => Err(format!(
                    "`{text}` is not a store kind: auto, file or tpm:TCTI \
                     (e.g. tpm:device:/dev/tpmrm0)"
                )),
            },
        }
    }
}

impl fmt::Display for NewStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NewStore::Auto => f.write_str("auto"),
            NewStore::File => f.write_str("file"),
            NewStore::Tpm(tcti) => write!(f, "tpm:{tcti}"),
        }
    }
}

impl NewStore {
    /// The store to create in `dir`, for a machine whose TPM device is
    /// `tpm_device` (present or not), and a note on why when `auto` chose.
    fn resolve(&self, dir: &Path, tpm_device: &Path) -> (StoreSpec, Option<String>) {
        let tpm = |tcti: String| StoreSpec::Tpm {
            tcti,
            dir: dir.to_owned(),
        };
        match self {
            NewStore::File => (StoreSpec::Dir(dir.to_owned()), None),
            NewStore::Tpm(tcti) => (tpm(tcti.clone()), None),
            NewStore::Auto if !tpm_device.exists() => (StoreSpec::Dir(dir.to_owned()), None),
            NewStore::Auto if cfg!(feature = "tpm") => (
                tpm(format!("device:{}", tpm_device.display())),
                Some(format!("{} exists", tpm_device.display())),
            ),
            NewStore::Auto => (
                StoreSpec::Dir(dir.to_owned()),
                Some(format!(
                    "{} exists, but this blocktree was built without TPM support (build it \
                     with `--features tpm`): the keys are kept in files",
                    tpm_device.display()
                )),
            ),
        }
    }
}

/// `--store`, for the commands that may create a domain.
#[derive(Debug, Args)]
pub(crate) struct NewStoreArg {
    /// The kind of credential store a new domain gets: auto (a TPM store on
    /// /dev/tpmrm0 when the machine has one and this build supports TPMs, else
    /// files), file, or tpm:TCTI (e.g. tpm:device:/dev/tpmrm0,
    /// tpm:swtpm:host=127.0.0.1,port=2321). An existing store is opened as
    /// whichever kind it is.
    #[arg(long = "store", value_name = "KIND", default_value = "auto")]
    pub(crate) kind: NewStore,
}

/// An open domain store and how it was found.
pub(crate) struct DomainStore {
    /// The store.
    pub(crate) store: Store,
    /// Its directory, DATA/credentials.
    pub(crate) dir: PathBuf,
    /// "existing", "created", …, for reports.
    pub(crate) how: String,
}

/// The credential store of data directory `data` (DATA/credentials), and how it
/// was found: opened as it is, finished (an interrupted first start), or created
/// with a new domain whose root password comes from `root_password_file`, else
/// $BLOCKTREE_ROOT_PASSWORD, else the terminal, else is generated and printed once.
pub(crate) fn open_or_create(
    data: &Path,
    root_password_file: Option<&Path>,
    kind: &NewStore,
) -> Result<DomainStore> {
    let dir = data.join(CREDENTIALS_DIR);
    let (store, how) = match open_store(&StoreSpec::Dir(dir.clone())) {
        Ok(store) => {
            check_kind(&store, &dir, kind)?;
            if store.writecap().is_some() {
                (store, "existing".to_owned())
            } else {
                (
                    finish_interrupted_start(store, &dir, root_password_file)?,
                    "existing, writecap issued now".to_owned(),
                )
            }
        }
        Err(error) if is_not_found(&error) => {
            let (spec, why) = kind.resolve(&dir, Path::new(TPM_DEVICE));
            let how = match why {
                Some(why) => format!("created: {why}"),
                None => "created".to_owned(),
            };
            (create_domain(&spec, root_password_file)?, how)
        }
        Err(error) => return Err(error),
    };
    Ok(DomainStore { store, dir, how })
}

/// An explicit `--store` must match the kind of an existing store: moving a domain
/// between kinds is `provision export-root`/`import-root`, not a flag.
fn check_kind(store: &Store, dir: &Path, kind: &NewStore) -> Result<()> {
    let mismatch = match kind {
        NewStore::Auto => false,
        NewStore::File => store.in_tpm(),
        NewStore::Tpm(_) => !store.in_tpm(),
    };
    if mismatch {
        bail!(
            "--store {kind}: {} already holds a store whose keys are kept by {}; --store \
             chooses the kind of a new domain's store only",
            dir.display(),
            store.kept_by()
        );
    }
    Ok(())
}

/// Checks that the store's writecap is valid now (warning on stderr when it
/// expires within 30 days); returns its path and expiry. `dir` names the store in
/// messages.
pub(crate) fn check_writecap(store: &dyn CredStore, dir: &Path) -> Result<(BtPath, Timestamp)> {
    let writecap = store
        .writecap()
        .ok_or_else(|| anyhow!("{} holds no writecap", dir.display()))?;
    let path = writecap.path().cloned().ok_or(WritecapError::Empty)?;
    let now = Timestamp::now();
    match writecap.validate_for(&store.principal(), &path, now, &RevocationList::new()) {
        Ok(()) => {}
        Err(WritecapError::Expired { expired, .. }) => bail!(
            "the server's writecap for {path} in {} expired at {expired}; renewal is not \
             built yet: issue a new one with `blocktree provision request`, `approve` and \
             `import`",
            dir.display()
        ),
        Err(error) => bail!(
            "the server's writecap in {} is not valid: {error}",
            dir.display()
        ),
    }
    let expires = writecap.expires().ok_or(WritecapError::Empty)?;
    if expires < now.after(EXPIRY_WARNING) {
        eprintln!(
            "warning: the server's writecap expires at {expires}; renewal is not built yet: \
             issue a new one with `blocktree provision request`, `approve` and `import`"
        );
    }
    Ok((path, expires))
}

/// First start: a new store with root credentials and a writecap for the domain.
fn create_domain(spec: &StoreSpec, root_password_file: Option<&Path>) -> Result<Store> {
    let password = match password::obtain(root_password_file, Purpose::Create)? {
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
    let mut store = create_store(spec)?;
    let root = store.generate_root(&password)?;
    issue_server_writecap(&mut store, root, &password)?;
    Ok(store)
}

/// A store with root credentials but no writecap is what a first start leaves when
/// it is stopped between generating the root and importing the writecap; finish it.
fn finish_interrupted_start(
    mut store: Store,
    dir: &Path,
    root_password_file: Option<&Path>,
) -> Result<Store> {
    let Some(root) = store.root_public() else {
        bail!(
            "{} holds runtime credentials but no writecap: have it approved with \
             `blocktree provision request --store {0}`, `approve` and `import`",
            dir.display()
        );
    };
    let password = password::require(
        root_password_file,
        Purpose::Unlock(root.principal()),
        PASSWORD_FLAG,
    )?;
    // After the password, so a run that cannot continue prints only its error.
    eprintln!(
        "{} holds root credentials but no writecap (an earlier first start was \
         interrupted); issuing the server's writecap",
        dir.display()
    );
    issue_server_writecap(&mut store, root, &password)?;
    Ok(store)
}

/// Request, approve by the root for `/<root>`, import: the design's steps 3-5.
fn issue_server_writecap(
    store: &mut Store,
    root: RootPublicKeys,
    password: &Password,
) -> Result<()> {
    let domain = BtPath::root_of(root.principal());
    let request = WritecapRequest::new(&**store, Some(domain.clone()))?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn store_kinds_parse_and_print_back() {
        for text in [
            "auto",
            "file",
            "tpm:device:/dev/tpmrm0",
            "tpm:swtpm:port=2321",
        ] {
            assert_eq!(text.parse::<NewStore>().unwrap().to_string(), text);
        }
        assert!("tpm:".parse::<NewStore>().is_err());
        assert!("files".parse::<NewStore>().is_err());
    }

    #[test]
    fn auto_picks_the_tpm_only_when_its_device_exists() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("credentials");
        let device = scratch.path().join("tpmrm0");
        assert_eq!(
            NewStore::Auto.resolve(&dir, &device),
            (StoreSpec::Dir(dir.clone()), None)
        );

        std::fs::write(&device, b"").unwrap();
        let (spec, why) = NewStore::Auto.resolve(&dir, &device);
        if cfg!(feature = "tpm") {
            let tcti = format!("device:{}", device.display());
            assert_eq!(
                spec,
                StoreSpec::Tpm {
                    tcti,
                    dir: dir.clone()
                }
            );
        } else {
            assert_eq!(spec, StoreSpec::Dir(dir.clone()));
            assert!(
                why.as_deref()
                    .is_some_and(|why| why.contains("without TPM"))
            );
        }
        assert!(why.is_some());

        // An explicit kind is taken as it is, device or not.
        let file = NewStore::File.resolve(&dir, &device).0;
        assert_eq!(file, StoreSpec::Dir(dir.clone()));
        let tpm = NewStore::Tpm("tabrmd".into())
            .resolve(&dir, &scratch.path().join("none"))
            .0;
        assert_eq!(
            tpm,
            StoreSpec::Tpm {
                tcti: "tabrmd".into(),
                dir
            }
        );
    }
}
