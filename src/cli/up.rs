//! `blocktree up`: start the appliance in a data directory.
//!
//! On first start it creates a domain in `DATA/credentials`: one file credential
//! store holding both the root credentials and the server's runtime credentials,
//! provisioned by the same steps as `blocktree provision` (generate the root,
//! request, approve by the root for the domain root path, import). Later starts
//! reuse the store and check its writecap.
//!
//! Then it opens the file system on the local sector store (`DATA/sectors`),
//! creates the volume `vol0` (1 GiB) on first start, and serves every volume
//! (`/volumes/<name>`, managed with `blocktree volume`) over NBD until SIGINT or
//! SIGTERM, printing the report and one `ready:` line once the exports are
//! reachable. On a signal, connections finish the requests they sent, and every
//! write is made durable before `up` exits.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, CredStoreError, FileCredStore, RootPublicKeys};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, WritecapError};
use blocktree_fs::{FileSystem, FsConfig, local};
use blocktree_nbd::volumes::{DEFAULT_BLOCK_SIZE, DEFAULT_VOLUME};
use blocktree_nbd::{LogLevel, ServerConfig, Stop, TlsMode, Volume, Volumes};
use clap::{Args, ValueEnum};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::output::Report;
use super::password::{self, PASSWORD_ENV, Password, Purpose};
use super::provision::DEFAULT_VALIDITY;
use super::volume::{lock_data_dir, size_text};

/// The credential store's directory inside the data directory.
pub(crate) const CREDENTIALS_DIR: &str = "credentials";

/// Below this much remaining validity, `up` warns that the writecap needs renewing.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const PASSWORD_FLAG: &str = "--root-password-file";

/// The size of the volume `up` creates on first start.
const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

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

Then it serves the volumes of DATA over NBD (default nbd://127.0.0.1:10809/vol0) and stays \
in the foreground. On first start it creates the volume vol0 (1 GiB, 4096-byte blocks); \
`blocktree volume create|list|resize|delete` manage volumes while `up` is stopped. A volume \
is a file of the Blocktree file system: every sector is encrypted (AES-256-GCM) and verified \
(Merkle tree under a signed root) on the server, so clients see plaintext, and a sector that \
fails verification is an I/O error. Unwritten and trimmed blocks read as zeros and show as \
holes in NBD_CMD_BLOCK_STATUS (base:allocation).

The export is ready when `up` prints its `ready:` line. Attach it with e.g. \
`nbd-client 127.0.0.1 10809 -N vol0 /dev/nbd0`, `nbdfuse DIR nbd://127.0.0.1:10809/vol0` or \
`qemu-img`/`qemu-io`/`nbdcopy` on the URI. Several appliances can run side by side with \
their own --data and --nbd. SIGINT or SIGTERM stops: open connections finish the requests \
they sent, then every write is made durable.

TLS (--tls on: offered with NBD_OPT_STARTTLS; --tls require: nothing else is accepted, \
URI nbds://) needs --tls-cert and --tls-key (PEM; the certificate chain, server first).";

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
    /// The TCP address to serve NBD on (port 0: any free port, printed when ready).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10809")]
    nbd: String,
    /// Also serve NBD on this Unix socket (URI nbd+unix:///vol0?socket=PATH).
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// TLS for NBD: off, on (offered through NBD_OPT_STARTTLS) or require.
    #[arg(long, value_enum, value_name = "MODE", default_value = "off")]
    tls: TlsArg,
    /// The TLS certificate chain (PEM, the server's certificate first).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Serve every volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Log level of the server's messages on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log: LogLevel,
}

/// `--tls`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TlsArg {
    /// No TLS.
    Off,
    /// TLS offered; plaintext clients are served too.
    On,
    /// TLS required; plaintext clients are refused.
    Require,
}

impl From<TlsArg> for TlsMode {
    fn from(tls: TlsArg) -> TlsMode {
        match tls {
            TlsArg::Off => TlsMode::Off,
            TlsArg::On => TlsMode::On,
            TlsArg::Require => TlsMode::Require,
        }
    }
}

/// The TLS configuration `--tls`, `--tls-cert` and `--tls-key` ask for.
fn tls_config(args: &UpArgs) -> Result<Option<blocktree_nbd::tls::TlsConfig>> {
    match (args.tls, &args.tls_cert, &args.tls_key) {
        (TlsArg::Off, None, None) => Ok(None),
        (TlsArg::Off, _, _) => bail!("--tls-cert and --tls-key need --tls on or --tls require"),
        (_, Some(cert), Some(key)) => Ok(Some(blocktree_nbd::tls::server_config(cert, key)?)),
        (_, _, _) => bail!("--tls on and --tls require need --tls-cert and --tls-key"),
    }
}

fn resolve(address: &str) -> Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("--nbd {address}: not an address and port"))?
        .next()
        .ok_or_else(|| anyhow!("--nbd {address}: the name resolves to no address"))
}

/// `vol0 (1 GiB), vol1 (10 GiB)`.
fn volumes_text(volumes: &[Volume]) -> String {
    if volumes.is_empty() {
        return "none (stop `up` and create one with `blocktree volume create NAME`)".into();
    }
    let names: Vec<String> = volumes
        .iter()
        .map(|volume| {
            format!(
                "{} ({}, {}-byte blocks)",
                volume.name,
                size_text(volume.size),
                volume.block_size
            )
        })
        .collect();
    names.join(", ")
}

/// Runs `blocktree up`: provisions or checks the domain, opens the file system,
/// creates `vol0` on first start, and serves the volumes over NBD until SIGINT or
/// SIGTERM.
pub fn run(args: UpArgs) -> Result<()> {
    blocktree_nbd::limit_malloc_arenas();
    blocktree_nbd::log_to_stderr(args.log);
    let tcp = resolve(&args.nbd)?;
    let tls_config = tls_config(&args)?;
    let (store, how) = open_or_create_store(&args.data, args.root_password_file.as_deref())?;
    let (path, expires) = check_writecap(&store)?;

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
        .field("writecap", format!("{path}, valid until {expires}"));

    let _lock = lock_data_dir(&args.data)?;
    let creds: Arc<dyn CredStore> = Arc::new(store);
    let config = FsConfig {
        read_only: args.read_only,
        sector_size: DEFAULT_BLOCK_SIZE,
        ..FsConfig::default()
    };
    let fs = Arc::new(
        local::open_local(&args.data, creds, config)
            .with_context(|| format!("cannot open the Blocktree store in {}", data.display()))?,
    );
    FileSystem::start_flusher(&fs);
    let volumes = Volumes::new(fs.clone(), DEFAULT_BLOCK_SIZE, args.read_only);
    if !args.read_only {
        let (_, first_start) = volumes.ensure_dir()?;
        if first_start {
            volumes
                .create(DEFAULT_VOLUME, DEFAULT_VOLUME_SIZE, DEFAULT_BLOCK_SIZE)
                .context("cannot create the volume vol0")?;
        }
    }
    let list = volumes.list().context("cannot list the volumes")?;
    let shown = list
        .iter()
        .find(|volume| volume.name == DEFAULT_VOLUME)
        .or(list.first())
        .map(|volume| volume.name.clone());
    let tls = TlsMode::from(args.tls);
    let scheme = if tls == TlsMode::Require {
        "nbds"
    } else {
        "nbd"
    };
    let server = ServerConfig {
        tcp: Some(tcp),
        unix: args.nbd_socket.clone(),
        tls,
        tls_config,
        read_only: args.read_only,
        ..ServerConfig::default()
    };
    let served = blocktree_nbd::serve(
        Arc::new(volumes),
        server,
        |listening| {
            report.field("volumes", volumes_text(&list));
            let name = shown.clone().unwrap_or_default();
            let mut uri = None;
            if let Some(address) = listening.tcp {
                let tcp_uri = format!("{scheme}://{address}/{name}");
                report.field("nbd", &tcp_uri);
                uri = Some((tcp_uri, address));
            }
            if let Some(socket) = &listening.unix {
                report.field(
                    "nbd socket",
                    format!("{scheme}+unix:///{name}?socket={}", socket.display()),
                );
            }
            let ready = match (&shown, uri) {
                (Some(name), Some((uri, address))) => format!(
                    "ready: serving {uri}; attach it with `nbd-client {} {} -N {name} /dev/nbd0` \
                     (then mkfs and mount /dev/nbd0) or `nbdfuse DIR {uri}`; SIGINT or SIGTERM stops",
                    address.ip(),
                    address.port()
                ),
                _ => "ready: serving no volume yet; SIGINT or SIGTERM stops".to_owned(),
            };
            report.text(ready);
            if let Err(error) = report.print() {
                eprintln!("warning: {error:#}");
            }
        },
        Stop::Signals,
    );
    // Whatever the server did, everything written is made durable.
    let synced = fs.sync_all();
    served.context("the NBD server failed")?;
    synced.context("cannot make every write durable")?;
    println!("stopped: every write is durable");
    Ok(())
}

/// The credential store of data directory `data` (DATA/credentials), and how it
/// was found: opened as it is, finished (an interrupted first start), or created
/// with a new domain whose root password comes from `root_password_file`, else
/// $BLOCKTREE_ROOT_PASSWORD, else the terminal, else is generated and printed once.
pub(crate) fn open_or_create_store(
    data: &Path,
    root_password_file: Option<&Path>,
) -> Result<(FileCredStore, &'static str)> {
    let store_dir = data.join(CREDENTIALS_DIR);
    Ok(match FileCredStore::open(&store_dir) {
        Ok(store) if store.writecap().is_some() => (store, "existing"),
        Ok(store) => (
            finish_interrupted_start(store, root_password_file)?,
            "existing, writecap issued now",
        ),
        Err(CredStoreError::NotFound(_)) => {
            (create_domain(&store_dir, root_password_file)?, "created")
        }
        Err(error) => return Err(error.into()),
    })
}

/// Checks that the store's writecap is valid now (warning on stderr when it
/// expires within 30 days); returns its path and expiry.
pub(crate) fn check_writecap(store: &FileCredStore) -> Result<(BtPath, Timestamp)> {
    let store_dir = store.dir();
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
    Ok((path, expires))
}

/// First start: a new store with root credentials and a writecap for the domain.
fn create_domain(store_dir: &Path, root_password_file: Option<&Path>) -> Result<FileCredStore> {
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
    let mut store = FileCredStore::create(store_dir)?;
    let root = store.generate_root(&password)?;
    issue_server_writecap(&mut store, root, &password)?;
    Ok(store)
}

/// A store with root credentials but no writecap is what a first start leaves when
/// it is stopped between generating the root and importing the writecap; finish it.
fn finish_interrupted_start(
    mut store: FileCredStore,
    root_password_file: Option<&Path>,
) -> Result<FileCredStore> {
    let Some(root) = store.root_public() else {
        bail!(
            "{} holds runtime credentials but no writecap: have it approved with \
             `blocktree provision request --store {0}`, `approve` and `import`",
            store.dir().display()
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
