//! `blocktree up`: start the appliance in a data directory.
//!
//! On first start it creates a domain in `DATA/credentials` (see [`super::domain`]):
//! one credential store holding both the root credentials and the server's
//! runtime credentials — in the TPM when the machine has one — provisioned by the
//! same steps as `blocktree provision` (generate the root, request, approve by the
//! root for the domain root path, import). Later starts reuse the store and check
//! its writecap.
//!
//! Then it opens the file system on the sector store (`DATA/sectors`): a Raft
//! cluster of this server alone, or, with `--listen`, a member other servers can
//! join (`blocktree join`, below, is `up` that first joins a running cluster),
//! creates the volume `vol0` (1 GiB) on first start, and serves every volume
//! (`/volumes/<name>`, managed with `blocktree volume`) over NBD until SIGINT or
//! SIGTERM, printing the report and one `ready:` line once the exports are
//! reachable. On a signal, connections finish the requests they sent, and every
//! write is made durable before `up` exits.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::credstore::CredStore;
use blocktree_fs::local::{self, Membership, ServiceOptions};
use blocktree_fs::{FileSystem, FsConfig};
use blocktree_nbd::control::{CONTROL_SOCKET, ControlServer};
use blocktree_nbd::volumes::{DEFAULT_BLOCK_SIZE, DEFAULT_VOLUME};
use blocktree_nbd::{LogLevel, ServerConfig, Stop, TlsMode, Volume, Volumes};
use blocktree_raftlog::{RaftService, SectorService};
use clap::{Args, ValueEnum};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::absolute;
use super::cluster::{ServiceControl, cluster_entry};
use super::domain::{self, NewStoreArg};
use super::output::Report;
use super::volume::{lock_data_dir, size_text};

/// The size of the volume `up` creates on first start.
const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// The long `--help` text of `blocktree up`.
pub const LONG_ABOUT: &str = "Start the appliance in a data directory.

On first start, creates a new domain in DATA/credentials: root credentials sealed with \
the root password, and the server's runtime credentials with a writecap for the whole \
domain (/<root principal>, valid 365 days). When the machine has a TPM 2.0 (/dev/tpmrm0) \
and blocktree was built with `--features tpm`, the keys are created inside the TPM and \
never leave it (--store chooses: auto, file or tpm:TCTI). Later starts reuse the store, \
whichever kind it is, and check the writecap is still valid.

The root password for a new domain comes from --root-password-file, else \
$BLOCKTREE_ROOT_PASSWORD, else a prompt on the terminal. When none is available (stdin is \
not a terminal), a random password is generated and printed once to stderr; it is not \
stored anywhere.

Then it serves the volumes of DATA over NBD (default nbd://127.0.0.1:10809/vol0) and stays \
in the foreground. On first start it creates the volume vol0 (1 GiB, 4096-byte blocks); \
`blocktree volume create|list|resize|delete --data DATA` manage volumes, also while `up` runs \
(through its control socket DATA/control.sock, mode 0600): a new volume is exported at once; \
a volume open on NBD connections is not deleted or shrunk. A volume \
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
URI nbds://) needs --tls-cert and --tls-key (PEM; the certificate chain, server first). \
Without TLS client certificates, any client that reaches the port may use the volumes, as \
with qemu-nbd and nbdkit: serve on a trusted network, or add --tls-client-ca FILE (with \
--tls require) so that only clients presenting a certificate issued by a CA in FILE are \
served (libnbd: nbds://HOST/vol0?tls-certificates=DIR with ca-cert.pem, client-cert.pem \
and client-key.pem in DIR; qemu: --object tls-creds-x509,dir=DIR,endpoint=client).";

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
    #[command(flatten)]
    store: NewStoreArg,
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
    /// Serve only TLS clients whose certificate was issued by a CA in FILE (PEM);
    /// needs --tls require.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Serve every volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Listen for the other servers of the store's cluster (bttp over QUIC) on
    /// this address; without it the store is a cluster of this server alone.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Where a member of the domain root directory's cluster listens (its
    /// --listen): asked for the generation number of a new store whose writecap
    /// is for a directory below the root. Not needed once the store exists, nor
    /// for the root directory's own store (generation 1).
    #[arg(long, value_name = "ADDR:PORT")]
    root_cluster: Option<String>,
    /// Serve reads from this server's copy as applied so far, without asking the
    /// leader first (Raft follower reads): faster on a server that does not lead,
    /// but a read may miss a write another server acknowledged a moment ago. By
    /// default reads are linearizable: each sees every write acknowledged before it.
    #[arg(long)]
    follower_reads: bool,
    /// Scrub the store every HOURS: check every sector (checksums, signatures,
    /// Merkle trees) and replace damaged ones with another member's copy; 0 never
    /// does (`blocktree cluster scrub` runs one at any time).
    #[arg(long, value_name = "HOURS", default_value_t = 24)]
    scrub_interval: u64,
    /// The most the periodic scrub reads, in MB/s, so that it leaves the disk to
    /// clients; 0 reads as fast as the disk allows. `blocktree cluster scrub` is
    /// not paced.
    #[arg(long, value_name = "MB_PER_S", default_value_t = 100)]
    scrub_rate: u64,
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

/// The TLS configuration `--tls`, `--tls-cert`, `--tls-key` and
/// `--tls-client-ca` ask for.
fn tls_config(args: &UpArgs) -> Result<Option<blocktree_nbd::tls::TlsConfig>> {
    if args.tls_client_ca.is_some() && args.tls != TlsArg::Require {
        bail!(
            "--tls-client-ca needs --tls require: otherwise plaintext clients would be served \
             without a certificate"
        );
    }
    match (args.tls, &args.tls_cert, &args.tls_key) {
        (TlsArg::Off, None, None) => Ok(None),
        (TlsArg::Off, _, _) => bail!("--tls-cert and --tls-key need --tls on or --tls require"),
        (_, Some(cert), Some(key)) => Ok(Some(blocktree_nbd::tls::server_config(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?)),
        (_, _, _) => bail!("--tls on and --tls require need --tls-cert and --tls-key"),
    }
}

/// The first address `address` (`host:port`) resolves to; `what` names it in
/// errors (`--nbd`).
pub(crate) fn resolve(what: &str, address: &str) -> Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("{what} {address}: not an address and port"))?
        .next()
        .ok_or_else(|| anyhow!("{what} {address}: the name resolves to no address"))
}

/// The long `--help` text of `blocktree join`.
pub const JOIN_LONG_ABOUT: &str = "Start a new server as a member of a running server's cluster.

The server's sectors are then replicated by Raft with the other members': writes commit on a majority, and any member serves NBD (a member that does not lead forwards writes to the leader). DATA must hold a credential store whose writecap is for the cluster's directory (the first server's writecap path), and no sectors yet. Grant it one with the root credentials, which the first server's DATA/credentials holds:

  blocktree provision new-runtime --store DATA/credentials
  blocktree provision request --store DATA/credentials --path /<root> --out s.request
  blocktree provision approve --store FIRST/credentials --request s.request --out s.writecap
  blocktree provision import --store DATA/credentials --writecap s.writecap
  blocktree join --data DATA --listen ADDR:PORT --nbd ADDR:PORT PEER_ADDR:PORT

The new server joins as a learner, receives the generation's sectors as a snapshot while writes go on, becomes a voter, and then serves like `blocktree up`, which restarts it later (with the same --listen). It signs writes with its own key, so the cluster goes on writing without the first server. A writecap for a path inside the directory (--path /<root>/<name>) makes a read-only replica instead: it stores, votes and serves reads, and refuses writes. `blocktree cluster status` shows the members; `blocktree leave` takes a server out.";

/// Arguments of `blocktree join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// A member of the cluster to join: its --listen address.
    #[arg(value_name = "PEER_ADDR:PORT")]
    peer: String,
    #[command(flatten)]
    up: UpArgs,
}

/// `vol0 (1 GiB), vol1 (10 GiB)`.
fn volumes_text(volumes: &[Volume]) -> String {
    if volumes.is_empty() {
        return "none (create one with `blocktree volume create NAME`)".into();
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

/// Who may use the exports, for the report: the answer to the first question a
/// storage operator asks of an NBD server.
fn clients_text(args: &UpArgs) -> String {
    match (&args.tls_client_ca, args.tls) {
        (Some(ca), _) => format!(
            "TLS clients with a certificate issued by a CA in {}",
            absolute(ca).display()
        ),
        (None, TlsArg::Require) => {
            "any TLS client (no client certificate asked for; see --tls-client-ca)".into()
        }
        (None, _) => {
            "any client that reaches the address (no authentication; see --tls-client-ca)".into()
        }
    }
}

/// Runs `blocktree up`: provisions or checks the domain, opens the file system,
/// creates `vol0` on first start, and serves the volumes over NBD until SIGINT or
/// SIGTERM.
pub fn run(args: UpArgs) -> Result<()> {
    let membership = match &args.listen {
        Some(listen) => Membership::Listen(resolve("--listen", listen)?),
        None => Membership::Alone,
    };
    serve(args, membership)
}

/// Runs `blocktree join`: `up`, joining the cluster of the member at PEER first
/// when DATA holds no member yet.
pub fn join(args: JoinArgs) -> Result<()> {
    let Some(listen) = &args.up.listen else {
        bail!("join needs --listen ADDR:PORT: where the other members reach this server");
    };
    let listen = resolve("--listen", listen)?;
    let peer = resolve("the peer", &args.peer)?;
    let credentials = args.up.data.join(domain::CREDENTIALS_DIR);
    if !credentials.exists() {
        bail!(
            "{} holds no credential store: a joining server needs a writecap in the              cluster's directory, issued with the root credentials (see `blocktree join              --help`)",
            credentials.display()
        );
    }
    serve(args.up, Membership::Join { listen, peer })
}

fn serve(args: UpArgs, membership: Membership) -> Result<()> {
    blocktree_nbd::tune_malloc();
    blocktree_nbd::log_to_stderr(args.log);
    let tcp = resolve("--nbd", &args.nbd)?;
    let tls_config = tls_config(&args)?;
    let domain::DomainStore { store, dir, how } = domain::open_or_create(
        &args.data,
        args.root_password_file.as_deref(),
        &args.store.kind,
    )?;
    let (path, expires) = domain::check_writecap(&*store, &dir)?;

    let root = path.root();
    let root_note = if store.root_public().map(|keys| keys.principal()) == Some(root) {
        "root credentials in this store"
    } else {
        "root credentials kept elsewhere"
    };
    let data = absolute(&args.data);
    let mut report = Report::new();
    report
        .field("data directory", data.display())
        .field(
            "credential store",
            format!("{} ({how})", absolute(&dir).display()),
        )
        .field("keys kept by", store.kept_by())
        .field("root principal", format!("{root} ({root_note})"))
        .field("server principal", store.principal())
        .field("writecap", format!("{path}, valid until {expires}"))
        .field("nbd clients", clients_text(&args));

    let _lock = lock_data_dir(&args.data)?;
    let creds: Arc<dyn CredStore> = store.into();
    let config = FsConfig {
        read_only: args.read_only,
        sector_size: DEFAULT_BLOCK_SIZE,
        ..FsConfig::default()
    };
    let joining = matches!(membership, Membership::Join { .. }) && !local::exists(&args.data);
    if joining {
        eprintln!("joining the cluster (receiving its sectors first)…");
    }
    let root_cluster = match &args.root_cluster {
        Some(addr) => Some(resolve("--root-cluster", addr)?),
        None => None,
    };
    let options = ServiceOptions {
        root_cluster,
        follower_reads: args.follower_reads,
    };
    let service = local::open_service(&args.data, creds.clone(), &membership, &options)
        .with_context(|| format!("cannot open the Blocktree store in {}", data.display()))?;
    report.field("cluster", cluster_text(&service, joining));
    report.field(
        "reads",
        if args.follower_reads {
            "follower reads (this server's copy as applied; may lag the leader)"
        } else {
            "linearizable (each sees every write acknowledged before it)"
        },
    );
    let status = service.status();
    report.field(
        "generation",
        format!("{} (directory {})", status.generation, status.directory),
    );
    let sectors: Arc<dyn SectorService> = service.clone();
    let fs = Arc::new(
        FileSystem::new(sectors, creds, config)
            .with_context(|| format!("cannot open the Blocktree store in {}", data.display()))?,
    );
    FileSystem::start_flusher(&fs);
    // A member whose writecap does not cover the cluster's directory (a
    // joined server granted a path inside it) stores and serves, but cannot
    // sign writes: its exports are read-only, and the report says why.
    let refusal = (!args.read_only).then(|| fs.write_refusal()).flatten();
    if let Some(why) = &refusal {
        report.field(
            "writes",
            format!("refused, volumes served read-only: {why}"),
        );
    }
    let read_only = args.read_only || refusal.is_some();
    let volumes = Arc::new(Volumes::new(fs.clone(), read_only));
    if !read_only {
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
        read_only,
        ..ServerConfig::default()
    };
    let control_path = args.data.join(CONTROL_SOCKET);
    if args.scrub_interval > 0 {
        let every = Duration::from_secs(args.scrub_interval.saturating_mul(3600));
        let bytes_per_second = args.scrub_rate.saturating_mul(1_000_000);
        scrub_periodically(Arc::downgrade(&service), every, bytes_per_second);
        let rate = match args.scrub_rate {
            0 => "as fast as the disk allows".to_string(),
            rate => format!("at most {rate} MB/s"),
        };
        report.field(
            "scrub",
            format!(
                "every {} h, {rate} (`blocktree cluster scrub` runs one now)",
                args.scrub_interval
            ),
        );
    } else {
        report.field("scrub", "only when asked (`blocktree cluster scrub`)");
    }
    let cluster = Arc::new(ServiceControl::new(service.clone(), fs.clone()));
    let control = ControlServer::start(&control_path, volumes.clone(), cluster.clone())
        .with_context(|| {
            format!(
                "cannot listen on the control socket {}",
                control_path.display()
            )
        })?;
    let served = blocktree_nbd::serve(
        volumes,
        server,
        |listening| {
            report.field("volumes", volumes_text(&list));
            report.field("control socket", absolute(control.path()).display());
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
    drop(control);
    // Whatever the server did, everything written is made durable.
    let synced = fs.sync_all();
    served.context("the NBD server failed")?;
    synced.context("cannot make every write durable")?;
    if cluster.has_left() {
        drop(cluster);
        drop(fs);
        drop(service);
        let sectors = args.data.join(local::SECTORS_DIR);
        let aside = args.data.join(format!("{}.left", local::SECTORS_DIR));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&sectors, &aside).with_context(|| {
            format!(
                "left the cluster, but cannot move {} aside",
                sectors.display()
            )
        })?;
        println!(
            "stopped: left the cluster; this server's last copy of the sectors is in {}",
            absolute(&aside).display()
        );
        return Ok(());
    }
    println!("stopped: every write is durable");
    Ok(())
}

/// Scrubs the store every `every` while it is open, reading at most
/// `bytes_per_second` (0: unpaced), in a thread of its own
/// (holding the service only while it scrubs, so a stopping server is not kept
/// open by the wait), and logs what each scrub found.
fn scrub_periodically(
    service: std::sync::Weak<RaftService>,
    every: Duration,
    bytes_per_second: u64,
) {
    let spawned = std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(service) = service.upgrade() else {
                    return;
                };
                match service.scrub_paced(bytes_per_second) {
                    Ok(found) if found.corrupt > 0 => tracing::warn!(
                        checked = found.sectors_checked,
                        corrupt = found.corrupt,
                        repaired = found.repaired,
                        "scrub found damaged sectors"
                    ),
                    Ok(found) => {
                        tracing::info!(checked = found.sectors_checked, "scrub: no damage")
                    }
                    Err(error) => tracing::warn!("scrub failed: {error}"),
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!("cannot start the scrub thread: {error}");
    }
}

/// The `cluster:` line of the report.
fn cluster_text(service: &RaftService, joined_now: bool) -> String {
    let status = cluster_entry(&service.status());
    let Some(addr) = service.local_addr() else {
        return format!(
            "this server alone (Raft member {}, no network; `--listen ADDR:PORT` lets others \
             join)",
            status.node
        );
    };
    let voters = status.members.iter().filter(|member| member.voter).count();
    let leader = match &status.leader {
        Some(leader) if *leader == status.node => "this server leads".to_owned(),
        Some(leader) => format!("leader {leader}"),
        None => "no leader yet".to_owned(),
    };
    format!(
        "{} member {} listening on {addr}, one of {voters} voters, {leader}, term {}",
        if joined_now { "joined as" } else { "Raft" },
        status.node,
        status.term
    )
}
