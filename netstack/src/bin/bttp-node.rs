//! `bttp-node`: runs a bttp runtime that serves the echo service, or calls one.
//!
//! `serve` opens a file credential store, listens (by default on a random port
//! of 49152–65535 on 127.0.0.1), prints `ready <address> <path>` and serves until
//! its standard input closes. `call` sends one echo call, with the credentials
//! of a store or anonymously, and prints `reply <text>`. Operators use it to
//! check that two runtimes can reach and authenticate each other; the process
//! tests of `blocktree-netstack` use it as the far end.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::credstore::{CredStore, FileCredStore};
use blocktree_core::encoding;
use blocktree_core::writecap::{RevocationList, Writecap};
use blocktree_core::{BtPath, PrincipalId};
use blocktree_netstack::echo::{EchoReply, EchoRequest, register_echo};
use blocktree_netstack::{
    AccessPolicy, AuthzAttrs, Credentials, Runtime, RuntimeConfig, RuntimeRecord, ServiceId,
    ServiceName, StoreSigner,
};
use clap::{Args, Parser, Subcommand};
use serde_bytes::ByteBuf;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Run a bttp runtime with the echo service, or call one")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the echo service until standard input closes.
    Serve(ServeArgs),
    /// Make one echo call and print the reply.
    Call(CallArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The file credential store holding this runtime's key and writecap.
    #[arg(long)]
    store: PathBuf,
    /// Present this encoded writecap instead of the store's (for testing refusals).
    #[arg(long)]
    writecap: Option<PathBuf>,
    /// Where to listen; port 0 picks a random free port of 49152–65535.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Owner of the runtime's file, UID:GID.
    #[arg(long, default_value = "0:0")]
    owner: String,
    /// Permission bits of the runtime's file, in octal.
    #[arg(long, default_value = "750")]
    mode: String,
    /// A principal's attributes, PRINCIPAL=UID:GID[,GROUP...]; repeatable.
    #[arg(long = "attrs", allow_hyphen_values = true)]
    attrs: Vec<String>,
    /// Another domain whose runtimes may connect; repeatable.
    #[arg(long = "trust", allow_hyphen_values = true)]
    trust: Vec<PrincipalId>,
    /// A revoked principal; repeatable.
    #[arg(long = "revoke", allow_hyphen_values = true)]
    revoke: Vec<PrincipalId>,
    /// The path of the echo service.
    #[arg(long)]
    service: BtPath,
    /// The largest message accepted, in bytes.
    #[arg(long)]
    max_message: Option<usize>,
    /// Concurrent streams a peer may open.
    #[arg(long)]
    max_streams: Option<u32>,
    /// Idle timeout of connections, in milliseconds.
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
}

#[derive(Args)]
struct CallArgs {
    /// Call with the credentials of this file credential store.
    #[arg(long, required_unless_present = "anonymous")]
    store: Option<PathBuf>,
    /// Call without credentials.
    #[arg(long, conflicts_with = "store")]
    anonymous: bool,
    /// The address the runtime listens on.
    #[arg(long)]
    peer: SocketAddr,
    /// The path of the runtime called.
    #[arg(long)]
    runtime: BtPath,
    /// The path of its echo service.
    #[arg(long)]
    service: BtPath,
    /// The text to echo.
    #[arg(long, default_value = "ping")]
    message: String,
    /// How long to wait for the reply, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

fn parse_ids(text: &str) -> Result<(u32, u32)> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| anyhow!("expected UID:GID, got {text:?}"))?;
    Ok((uid.parse()?, gid.parse()?))
}

fn parse_attrs(text: &str) -> Result<(PrincipalId, AuthzAttrs)> {
    let (principal, rest) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("expected PRINCIPAL=UID:GID[,GROUP...], got {text:?}"))?;
    let mut parts = rest.split(',');
    let (uid, gid) = parse_ids(parts.next().unwrap_or_default())?;
    let mut attrs = AuthzAttrs::new(uid, gid);
    for group in parts {
        attrs.groups.insert(group.parse()?);
    }
    Ok((principal.parse()?, attrs))
}

fn open_store(dir: &PathBuf) -> Result<Arc<dyn CredStore>> {
    let store = FileCredStore::open(dir)
        .with_context(|| format!("opening the credential store {}", dir.display()))?;
    Ok(Arc::new(store))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let store = open_store(&args.store)?;
    let credentials = match &args.writecap {
        None => Credentials::from_store(store)?,
        Some(file) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let writecap: Writecap = encoding::decode(&bytes)?;
            let signer = Arc::new(StoreSigner(store));
            Credentials::new(signer, writecap)?
        }
    };
    let (uid, gid) = parse_ids(&args.owner)?;
    let mode = u32::from_str_radix(&args.mode, 8).context("--mode is octal")?;
    let record = RuntimeRecord {
        uid,
        gid,
        mode,
        services: [args.service.clone()].into(),
    };
    let mut access = AccessPolicy::new(record);
    for text in &args.attrs {
        let (principal, attrs) = parse_attrs(text)?;
        access.principals.insert(principal, attrs);
    }
    let mut config = RuntimeConfig::new(args.listen, access);
    config.trusted_roots.extend(args.trust.iter().copied());
    let mut revoked = RevocationList::new();
    for principal in &args.revoke {
        revoked.revoke(*principal);
    }
    config.revoked = revoked;
    if let Some(max) = args.max_message {
        config.limits.max_message_size = max;
    }
    if let Some(streams) = args.max_streams {
        config.limits.max_streams_per_peer = streams;
    }
    if let Some(millis) = args.idle_timeout_ms {
        config.limits.idle_timeout = Duration::from_millis(millis);
    }
    let path = credentials.path().clone();
    let runtime = Runtime::start(config, credentials)?;
    register_echo(&runtime, args.service)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready {} {path}", runtime.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);

    let (closed, wait) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = closed.send(());
    });
    let _ = wait.await;
    runtime.shutdown().await;
    Ok(())
}

async fn call(args: CallArgs) -> Result<()> {
    let runtime = match &args.store {
        Some(dir) if !args.anonymous => {
            let credentials = Credentials::from_store(open_store(dir)?)?;
            let access = AccessPolicy::new(RuntimeRecord::default());
            Runtime::start(
                RuntimeConfig::new("127.0.0.1:0".parse()?, access),
                credentials,
            )?
        }
        _ => Runtime::anonymous(RuntimeConfig::anonymous())?,
    };
    let Some(scope) = args.runtime.parent() else {
        bail!("a runtime's path has a parent directory");
    };
    runtime.add_peer(args.runtime.clone(), args.peer, [args.service.clone()]);
    let to = ServiceName {
        service: args.service,
        scope,
        rootward: false,
        id: ServiceId::name("echo")?,
    };
    let request = EchoRequest::Echo(ByteBuf::from(args.message.into_bytes()));
    let reply: EchoReply = runtime
        .call(to, request, Duration::from_millis(args.timeout_ms))
        .await?;
    match reply {
        EchoReply::Echo(bytes) => println!("reply {}", String::from_utf8_lossy(&bytes)),
        EchoReply::Stats(stats) => println!("stats {stats:?}"),
    }
    runtime.shutdown().await;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting Tokio")?;
    tokio.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Call(args) => call(args).await,
        }
    })
}
