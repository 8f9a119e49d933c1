//! The NBD server: listeners on TCP and a Unix socket, one task per connection,
//! STARTTLS through rustls, and a transmission phase in which requests run
//! concurrently and are answered out of order.
//!
//! A connection's reader task decodes requests ([`proto`]), checks them
//! ([`Session::check`]) and hands each valid one to a blocking thread (the file
//! system blocks); the thread queues the reply for the connection's writer task,
//! which coalesces replies into few writes. Limits keep a client from taking the
//! server's memory: at most `max_in_flight` requests per connection, and payload
//! bytes in flight (write data read, read data not yet sent) within a budget per
//! connection and one for the whole server. A frame that cannot be followed
//! (wrong magic, a write longer than the maximum payload, a truncated header)
//! ends only its own connection, after the requests already read are answered.

use crate::export::{Catalog, Device, DeviceError};
use crate::negotiate::{Negotiation, Outcome, TlsMode};
use crate::proto::{
    self, ClientFlags, Descriptor, MAX_OPTION_DATA, NbdError, OPTION_HEADER_LEN, OptionHeader,
    ProtoError, REQUEST_HEADER_LEN, RequestHeader, SERVER_HANDSHAKE_FLAGS, STATE_HOLE, STATE_ZERO,
};
use crate::session::{Op, Refusal, Session};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Bytes buffered when reading requests.
const READ_BUFFER: usize = 256 * 1024;
/// Bytes buffered when writing replies (larger payloads go straight out).
const WRITE_BUFFER: usize = 256 * 1024;
/// Reads and writes at most this long are gathered into one hand-over to the
/// device while the client keeps sending (larger ones already fill a trip on
/// their own).
const BATCHED_READ_MAX: u32 = 64 * 1024;
const BATCHED_WRITE_MAX: u32 = 64 * 1024;
/// The most reads or writes, and bytes of them, handed to the device together.
const READ_BATCH_COUNT: usize = 64;
const READ_BATCH_BYTES: usize = 1 << 20;
const WRITE_BATCH_COUNT: usize = 64;
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// The most block status descriptors in one reply (the protocol's advice).
const MAX_DESCRIPTORS: usize = 1 << 20;
/// How long connections get to finish their requests when the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How the server runs.
#[derive(Clone)]
pub struct ServerConfig {
    /// The TCP address to listen on (port 0: any free port).
    pub tcp: Option<SocketAddr>,
    /// The Unix socket to listen on (replaced if it exists).
    pub unix: Option<PathBuf>,
    /// Whether TLS is offered or required.
    pub tls: TlsMode,
    /// The certificate and key, when `tls` is not [`TlsMode::Off`].
    pub tls_config: Option<crate::tls::TlsConfig>,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Requests of one connection in flight at once.
    pub max_in_flight: usize,
    /// Payload bytes in flight per connection (at least the maximum payload).
    pub connection_budget: usize,
    /// Payload bytes in flight in the whole server (at least the maximum payload).
    pub server_budget: usize,
    /// Threads running the protocol (the file system runs on blocking threads).
    pub worker_threads: usize,
    /// Threads running file system calls at once.
    pub blocking_threads: usize,
    /// How long a client may take over the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp: None,
            unix: None,
            tls: TlsMode::Off,
            tls_config: None,
            read_only: false,
            max_in_flight: 128,
            connection_budget: 2 * proto::MAX_PAYLOAD as usize,
            server_budget: 4 * proto::MAX_PAYLOAD as usize,
            worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            blocking_threads: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("tcp", &self.tcp)
            .field("unix", &self.unix)
            .field("tls", &self.tls)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Where the server listens, once it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listening {
    /// The bound TCP address (with the real port when 0 was asked for).
    pub tcp: Option<SocketAddr>,
    /// The Unix socket.
    pub unix: Option<PathBuf>,
}

/// What stops the server.
pub enum Stop {
    /// SIGINT or SIGTERM.
    Signals,
    /// A message on this channel (or its sender dropped).
    On(oneshot::Receiver<()>),
}

/// Why the server could not run.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Neither a TCP address nor a Unix socket.
    #[error("nothing to listen on: give a TCP address or a Unix socket")]
    NoListener,
    /// TLS on or required without a certificate.
    #[error("TLS needs a certificate and a key")]
    TlsWithoutCertificate,
    /// A listener could not be opened.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or socket.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The runtime or the signal handlers could not be set up.
    #[error("cannot start the server: {0}")]
    Runtime(io::Error),
}

/// Why a connection ended early (logged, never fatal to the server).
#[derive(Debug, Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("the handshake took too long")]
    Timeout,
    #[error("{0}")]
    Internal(String),
}

/// A byte stream a connection runs over: TCP, a Unix socket, or TLS over either.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;

/// What every connection shares.
struct Shared {
    catalog: Arc<dyn Catalog>,
    tls: TlsMode,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    read_only: bool,
    max_in_flight: usize,
    connection_budget: usize,
    server_budget: Arc<Semaphore>,
    handshake_timeout: Duration,
}

/// Serves `catalog` as `config` says, blocking until `stop`; calls `ready` once
/// every listener is bound. Connections still open when it stops finish the
/// requests they already sent (for up to a minute), then close.
pub fn serve(
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
    ready: impl FnOnce(&Listening),
    stop: Stop,
) -> Result<(), ServerError> {
    if config.tcp.is_none() && config.unix.is_none() {
        return Err(ServerError::NoListener);
    }
    let acceptor = match (config.tls, &config.tls_config) {
        (TlsMode::Off, _) => None,
        (_, Some(tls)) => Some(tokio_rustls::TlsAcceptor::from(tls.clone())),
        (_, None) => return Err(ServerError::TlsWithoutCertificate),
    };
    let max_payload = proto::MAX_PAYLOAD as usize;
    let shared = Arc::new(Shared {
        catalog,
        tls: config.tls,
        acceptor,
        read_only: config.read_only,
        max_in_flight: config.max_in_flight.clamp(1, 1 << 16),
        connection_budget: config.connection_budget.max(max_payload),
        server_budget: Arc::new(Semaphore::new(config.server_budget.max(max_payload))),
        handshake_timeout: config.handshake_timeout,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .max_blocking_threads(config.blocking_threads.max(1))
        .thread_name("blocktree-nbd")
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let result = runtime.block_on(run(shared, config, ready, stop));
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn accept_tcp(listener: &Option<TcpListener>) -> io::Result<(TcpStream, String)> {
    match listener {
        Some(listener) => {
            let (stream, peer) = listener.accept().await?;
            // The protocol asks both sides to disable Nagle's algorithm.
            stream.set_nodelay(true)?;
            Ok((stream, peer.to_string()))
        }
        None => std::future::pending().await,
    }
}

async fn accept_unix(listener: &Option<UnixListener>) -> io::Result<(UnixStream, String)> {
    match listener {
        Some(listener) => {
            let (stream, _) = listener.accept().await?;
            Ok((stream, "unix socket".into()))
        }
        None => std::future::pending().await,
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let bind_error = |source| ServerError::Bind {
        what: path.display().to_string(),
        source,
    };
    // A socket left by an earlier run that did not stop cleanly.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && std::os::unix::net::UnixStream::connect(path).is_err()
    {
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    UnixListener::bind(path).map_err(bind_error)
}

async fn run(
    shared: Arc<Shared>,
    config: ServerConfig,
    ready: impl FnOnce(&Listening),
    stop: Stop,
) -> Result<(), ServerError> {
    let tcp = match config.tcp {
        Some(address) => {
            Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ServerError::Bind {
                        what: address.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let unix = match &config.unix {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let listening = Listening {
        tcp: match &tcp {
            Some(listener) => Some(listener.local_addr().map_err(ServerError::Runtime)?),
            None => None,
        },
        unix: config.unix.clone(),
    };
    let mut stop: Pin<Box<dyn Future<Output = ()> + Send>> = match stop {
        Stop::Signals => {
            use tokio::signal::unix::{SignalKind, signal};
            let mut terminate = signal(SignalKind::terminate()).map_err(ServerError::Runtime)?;
            let mut interrupt = signal(SignalKind::interrupt()).map_err(ServerError::Runtime)?;
            Box::pin(async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            })
        }
        Stop::On(receiver) => Box::pin(async move {
            let _ = receiver.await;
        }),
    };
    ready(&listening);

    let (shutdown, shutdown_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = accept_tcp(&tcp) => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(connection(Box::new(stream), peer, shared.clone(), shutdown_seen.clone()));
                }
                Err(error) => {
                    tracing::warn!("accepting a TCP connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            accepted = accept_unix(&unix) => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(connection(Box::new(stream), peer, shared.clone(), shutdown_seen.clone()));
                }
                Err(error) => {
                    tracing::warn!("accepting a Unix connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = done {
                    tracing::error!("a connection task failed: {error}");
                }
            }
        }
    }
    tracing::info!("stopping: no new connections; open ones finish their requests");
    let _ = shutdown.send(true);
    drop(tcp);
    drop(unix);
    if let Some(path) = &config.unix {
        let _ = std::fs::remove_file(path);
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}: closing them");
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

async fn connection(
    stream: BoxStream,
    peer: String,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::debug!(%peer, "connected");
    let negotiated = tokio::select! {
        _ = shutdown.changed() => return,
        negotiated = tokio::time::timeout(shared.handshake_timeout, handshake(stream, &shared)) => {
            negotiated.unwrap_or(Err(ConnError::Timeout))
        }
    };
    let result = match negotiated {
        Ok(Some((stream, device, session))) => {
            tracing::debug!(%peer, export = %device.info().name, ?session, "transmission");
            transmission(stream, device, session, &shared, shutdown).await
        }
        Ok(None) => Ok(()),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => tracing::debug!(%peer, "disconnected"),
        Err(error) => tracing::info!(%peer, "connection closed: {error}"),
    }
}

async fn send(stream: &mut BoxStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn close_device(device: Arc<dyn Device>) {
    let name = device.info().name.clone();
    match tokio::task::spawn_blocking(move || device.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(volume = %name, "closing failed: {error}"),
        Err(error) => tracing::error!(volume = %name, "closing failed: {error}"),
    }
}

type Negotiated = Option<(BoxStream, Arc<dyn Device>, Session)>;

/// The handshake: greeting, client flags, options until one enters transmission
/// (`Some`) or ends the connection (`None`).
async fn handshake(mut stream: BoxStream, shared: &Arc<Shared>) -> Result<Negotiated, ConnError> {
    send(&mut stream, &proto::greeting(SERVER_HANDSHAKE_FLAGS)).await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = ClientFlags::decode(flags, SERVER_HANDSHAKE_FLAGS)?;
    let mut negotiation = Negotiation::new(shared.tls, client, shared.read_only);
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut head).await?;
        let header = OptionHeader::decode(&head, MAX_OPTION_DATA)?;
        let mut data = Vec::with_capacity(header.len as usize);
        (&mut stream)
            .take(u64::from(header.len))
            .read_to_end(&mut data)
            .await?;
        if data.len() != header.len as usize {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        // Looking exports up may block on the file system.
        let catalog = shared.catalog.clone();
        let (state, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = negotiation.handle(header.option, &data, &*catalog);
            (negotiation, outcome)
        })
        .await
        .map_err(|error| ConnError::Internal(error.to_string()))?;
        negotiation = state;
        match outcome {
            Outcome::Reply(bytes) => send(&mut stream, &bytes).await?,
            Outcome::StartTls(bytes) => {
                send(&mut stream, &bytes).await?;
                let acceptor = shared
                    .acceptor
                    .clone()
                    .ok_or_else(|| ConnError::Internal("STARTTLS without TLS".into()))?;
                let tls = acceptor.accept(stream).await.map_err(ConnError::Tls)?;
                stream = Box::new(tls);
                negotiation.tls_started();
            }
            Outcome::Transmit {
                reply,
                device,
                session,
            } => {
                if let Err(error) = send(&mut stream, &reply).await {
                    close_device(device).await;
                    return Err(error.into());
                }
                return Ok(Some((stream, device, session)));
            }
            Outcome::Close { reply, reason } => {
                tracing::debug!("closing in the handshake: {reason}");
                if !reply.is_empty() {
                    send(&mut stream, &reply).await?;
                }
                let _ = stream.shutdown().await;
                return Ok(None);
            }
        }
    }
}

/// A reply on its way to the client, with the permits it holds until written.
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    _permits: Permits,
}

struct Permits {
    _slot: OwnedSemaphorePermit,
    _connection: Option<OwnedSemaphorePermit>,
    _server: Option<OwnedSemaphorePermit>,
}

async fn write_replies(
    half: tokio::io::WriteHalf<BoxStream>,
    mut replies: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, half);
    let result = async {
        while let Some(reply) = replies.recv().await {
            out.write_all(&reply.head).await?;
            out.write_all(&reply.data).await?;
            drop(reply);
            // Everything already queued goes out in the same flush.
            while let Ok(reply) = replies.try_recv() {
                out.write_all(&reply.head).await?;
                out.write_all(&reply.data).await?;
            }
            out.flush().await?;
        }
        Ok(())
    }
    .await;
    // Closes TLS (close_notify) and the connection's sending side.
    let _ = out.shutdown().await;
    result
}

/// A read request waiting to be handed to the device with the ones after it.
struct QueuedRead {
    cookie: u64,
    offset: u64,
    len: u32,
    permits: Permits,
}

/// A write request (without FUA) waiting to be handed to the device with the
/// ones after it.
struct QueuedWrite {
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
    permits: Permits,
}

/// Small writes of one connection that arrived back to back, as
/// [`ReadBatch`] gathers reads: one hand-over and one lock of the file for a
/// queue of 4 KiB writes (`Device::write_many`), each answered once all are
/// buffered. NBD makes no promise about the order of requests in flight
/// together, and a client that needs one waits for the replies.
#[derive(Default)]
struct WriteBatch {
    writes: Vec<QueuedWrite>,
    bytes: usize,
}

impl WriteBatch {
    fn is_full(&self) -> bool {
        self.writes.len() >= WRITE_BATCH_COUNT || self.bytes >= WRITE_BATCH_BYTES
    }

    fn push(&mut self, write: QueuedWrite) {
        self.bytes += write.payload.len();
        self.writes.push(write);
    }

    fn dispatch(
        &mut self,
        device: &Arc<dyn Device>,
        session: &Arc<Session>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) {
        if self.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.writes);
        self.bytes = 0;
        let device = device.clone();
        let session = session.clone();
        let replies = replies.clone();
        tokio::task::spawn_blocking(move || {
            let ranges: Vec<(u64, &[u8])> = writes
                .iter()
                .map(|write| (write.offset, write.payload.as_slice()))
                .collect();
            let results = device.write_many(&ranges);
            drop(ranges);
            for (write, result) in writes.into_iter().zip(results) {
                let head = match result {
                    Ok(()) => proto::simple_reply(write.cookie, None).to_vec(),
                    Err(error) => {
                        failure_reply(&*device, &session, write.cookie, &error, "write", false).0
                    }
                };
                drop(write.payload);
                let _ = replies.send(Reply {
                    head,
                    data: Vec::new(),
                    _permits: write.permits,
                });
            }
        });
    }
}

/// The small requests of one connection gathered for the device.
#[derive(Default)]
struct Gathered {
    reads: ReadBatch,
    writes: WriteBatch,
}

impl Gathered {
    fn is_full(&self) -> bool {
        self.reads.is_full() || self.writes.is_full()
    }

    fn dispatch(
        &mut self,
        device: &Arc<dyn Device>,
        session: &Arc<Session>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) {
        self.reads.dispatch(device, session, replies);
        self.writes.dispatch(device, session, replies);
    }
}

/// Small reads of one connection that arrived back to back: the client had
/// already sent the next request when this one was parsed. They go to the
/// device together (`Device::read_many`), on one blocking thread, so that a
/// queue of 4 KiB reads costs one hand-over and one trip to the store rather
/// than one each. Gathering stops as soon as the next request is not already
/// buffered, so a lone read is never held back.
#[derive(Default)]
struct ReadBatch {
    reads: Vec<QueuedRead>,
    bytes: usize,
}

impl ReadBatch {
    fn is_full(&self) -> bool {
        self.reads.len() >= READ_BATCH_COUNT || self.bytes >= READ_BATCH_BYTES
    }

    fn push(&mut self, read: QueuedRead) {
        self.bytes += read.len as usize;
        self.reads.push(read);
    }

    /// Hands the gathered reads to a blocking thread; their replies go out in
    /// request order as soon as all have been read.
    fn dispatch(
        &mut self,
        device: &Arc<dyn Device>,
        session: &Arc<Session>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) {
        if self.reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.reads);
        self.bytes = 0;
        let device = device.clone();
        let session = session.clone();
        let replies = replies.clone();
        tokio::task::spawn_blocking(move || {
            let ranges: Vec<(u64, u32)> =
                reads.iter().map(|read| (read.offset, read.len)).collect();
            let results = device.read_many(&ranges);
            for (read, result) in reads.into_iter().zip(results) {
                let (head, data) = read_reply(&*device, &session, read.cookie, read.offset, result);
                let _ = replies.send(Reply {
                    head,
                    data,
                    _permits: read.permits,
                });
            }
        });
    }
}

/// The transmission phase of one connection.
async fn transmission(
    stream: BoxStream,
    device: Arc<dyn Device>,
    session: Session,
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(READ_BUFFER, read_half);
    let (replies, queue) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(write_half, queue));
    let slots = Arc::new(Semaphore::new(shared.max_in_flight));
    let budget = Arc::new(Semaphore::new(shared.connection_budget));
    let session = Arc::new(session);
    let mut batch = Gathered::default();
    let result: Result<(), ConnError> = loop {
        if reader.buffer().len() < REQUEST_HEADER_LEN || batch.is_full() {
            batch.dispatch(&device, &session, &replies);
        }
        let mut head = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Ok(()),
            read = reader.read_exact(&mut head) => match read {
                Ok(_) => {}
                // The client closed without NBD_CMD_DISC (a hard disconnect).
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(error) => break Err(error.into()),
            },
        }
        let header = match RequestHeader::decode(&head) {
            Ok(header) => header,
            Err(error) => break Err(error.into()),
        };
        let payload_len = match header.payload_len(session.sizes.maximum) {
            Ok(len) => len,
            Err(error) => break Err(error.into()),
        };
        let check = session.check(&header);
        if check == Ok(Op::Disconnect) {
            break Ok(());
        }
        if slots.available_permits() == 0 {
            // The permits held by the gathered reads come back only once they
            // are answered.
            batch.dispatch(&device, &session, &replies);
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break Err(ConnError::Internal("request slots closed".into()));
        };
        let bytes = match check {
            Ok(Op::Read { len, .. }) => len as usize,
            _ => payload_len,
        };
        let (connection_permit, server_permit) = if bytes > 0 {
            // At most the maximum payload, which both budgets hold.
            let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
            if budget.available_permits() < bytes as usize
                || shared.server_budget.available_permits() < bytes as usize
            {
                batch.dispatch(&device, &session, &replies);
            }
            let connection = budget.clone().acquire_many_owned(bytes).await;
            let server = shared.server_budget.clone().acquire_many_owned(bytes).await;
            match (connection, server) {
                (Ok(connection), Ok(server)) => (Some(connection), Some(server)),
                _ => break Err(ConnError::Internal("payload budget closed".into())),
            }
        } else {
            (None, None)
        };
        let mut payload = Vec::new();
        if payload_len > 0 {
            payload.reserve_exact(payload_len);
            match (&mut reader)
                .take(payload_len as u64)
                .read_to_end(&mut payload)
                .await
            {
                Ok(n) if n == payload_len => {}
                Ok(_) => break Ok(()),
                Err(error) => break Err(error.into()),
            }
        }
        let permits = Permits {
            _slot: slot,
            _connection: connection_permit,
            _server: server_permit,
        };
        match check {
            Err(refusal) => {
                tracing::debug!(?header, "refused: {}", refusal.message);
                let head = refusal_reply(&session, header.cookie, &refusal);
                let _ = replies.send(Reply {
                    head,
                    data: Vec::new(),
                    _permits: permits,
                });
            }
            Ok(Op::Read { offset, len }) if len <= BATCHED_READ_MAX => {
                batch.reads.push(QueuedRead {
                    cookie: header.cookie,
                    offset,
                    len,
                    permits,
                })
            }
            Ok(Op::Write {
                offset,
                len,
                fua: false,
            }) if len <= BATCHED_WRITE_MAX => batch.writes.push(QueuedWrite {
                cookie: header.cookie,
                offset,
                payload,
                permits,
            }),
            Ok(op) => {
                batch.dispatch(&device, &session, &replies);
                let device = device.clone();
                let session = session.clone();
                let replies = replies.clone();
                tokio::task::spawn_blocking(move || {
                    let (head, data) = execute(&*device, &session, header.cookie, op, &payload);
                    drop(payload);
                    let _ = replies.send(Reply {
                        head,
                        data,
                        _permits: permits,
                    });
                });
            }
        }
    };
    batch.dispatch(&device, &session, &replies);
    // Every request read is answered before the connection closes.
    let _ = slots.acquire_many(shared.max_in_flight as u32).await;
    drop(replies);
    let written = writer.await;
    close_device(device).await;
    result?;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.into()),
        Err(error) => Err(ConnError::Internal(error.to_string())),
    }
}

fn refusal_reply(session: &Session, cookie: u64, refusal: &Refusal) -> Vec<u8> {
    if session.structured {
        proto::error_chunk(cookie, refusal.error, refusal.message)
    } else {
        proto::simple_reply(cookie, Some(refusal.error)).to_vec()
    }
}

fn error_reply(session: &Session, cookie: u64, error: NbdError, message: &str) -> Vec<u8> {
    if session.structured {
        proto::error_chunk(cookie, error, message)
    } else {
        proto::simple_reply(cookie, Some(error)).to_vec()
    }
}

/// The protocol's error for a device error; `ENOTSUP` only for `FAST_ZERO`.
fn nbd_error(error: &DeviceError, fast_zero: bool) -> NbdError {
    match NbdError::from_errno(error.errno) {
        NbdError::NotSup if !fast_zero => NbdError::Inval,
        NbdError::Overflow => NbdError::Inval,
        other => other,
    }
}

/// Runs one checked request on a blocking thread; returns the reply's header and
/// data.
fn execute(
    device: &dyn Device,
    session: &Session,
    cookie: u64,
    op: Op,
    payload: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let ok = || proto::simple_reply(cookie, None).to_vec();
    let done = |result: Result<(), DeviceError>, what: &str, fast: bool| match result {
        Ok(()) => (ok(), Vec::new()),
        Err(error) => failure_reply(device, session, cookie, &error, what, fast),
    };
    match op {
        Op::Read { offset, len } => {
            read_reply(device, session, cookie, offset, device.read(offset, len))
        }
        Op::Write { offset, fua, .. } => done(device.write(offset, payload, fua), "write", false),
        Op::Flush => done(device.flush(), "flush", false),
        Op::Trim { offset, len, fua } => {
            if len == 0 {
                return (ok(), Vec::new());
            }
            done(device.trim(offset, len, fua), "trim", false)
        }
        Op::Cache { offset, len } => {
            if len == 0 {
                return (ok(), Vec::new());
            }
            done(device.cache(offset, len), "cache", false)
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            if len == 0 {
                return (ok(), Vec::new());
            }
            done(
                device.write_zeroes(offset, len, no_hole, fast, fua),
                "write zeroes",
                fast,
            )
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => match device.extents(offset, len) {
            Ok(extents) => {
                let descriptors = descriptors(&extents, len, req_one);
                (
                    proto::block_status_chunk(cookie, context, &descriptors),
                    Vec::new(),
                )
            }
            Err(error) => done(Err(error), "block status", false),
        },
        Op::Disconnect => (ok(), Vec::new()),
    }
}

/// The reply to a read at `offset` that returned `result`.
fn read_reply(
    device: &dyn Device,
    session: &Session,
    cookie: u64,
    offset: u64,
    result: Result<Vec<u8>, DeviceError>,
) -> (Vec<u8>, Vec<u8>) {
    match result {
        Ok(data) if session.structured => {
            match proto::offset_data_header(cookie, offset, data.len()) {
                Some(head) if !data.is_empty() => (head.to_vec(), data),
                _ => (proto::none_chunk(cookie).to_vec(), Vec::new()),
            }
        }
        Ok(data) => (proto::simple_reply(cookie, None).to_vec(), data),
        Err(error) => failure_reply(device, session, cookie, &error, "read", false),
    }
}

/// The error reply to a request (`what`) the device failed, logged: at warning
/// level for I/O errors, which may mean damage.
fn failure_reply(
    device: &dyn Device,
    session: &Session,
    cookie: u64,
    error: &DeviceError,
    what: &str,
    fast: bool,
) -> (Vec<u8>, Vec<u8>) {
    let nbd = nbd_error(error, fast);
    if nbd == NbdError::Io {
        tracing::warn!(volume = %device.info().name, "{what}: {error}");
    } else {
        tracing::debug!(volume = %device.info().name, "{what}: {error}");
    }
    (
        error_reply(session, cookie, nbd, &format!("{what}: {}", error.message)),
        Vec::new(),
    )
}

/// Block status descriptors for `extents` of a query of `len` bytes: at least
/// one, none past the query (so none longer than a u32), one with `req_one`.
fn descriptors(extents: &[crate::export::Extent], len: u32, req_one: bool) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let mut covered: u64 = 0;
    for extent in extents {
        let remaining = u64::from(len) - covered;
        if remaining == 0 || out.len() >= MAX_DESCRIPTORS {
            break;
        }
        let length = extent.length.min(remaining);
        if length == 0 {
            continue;
        }
        let flags = if extent.hole {
            STATE_HOLE | STATE_ZERO
        } else {
            0
        };
        out.push(Descriptor {
            length: length as u32,
            flags,
        });
        covered += length;
        if req_one {
            break;
        }
    }
    if out.is_empty() {
        // Always safe: "allocated, contents unknown".
        out.push(Descriptor {
            length: len,
            flags: 0,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{CatalogError, ExportInfo, Extent, errno};
    use crate::proto::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::Mutex;

    /// An export in memory; sectors never written are holes.
    struct Memory {
        info: ExportInfo,
        data: Mutex<Vec<u8>>,
        written: Mutex<Vec<bool>>,
        flushes: Mutex<u32>,
        /// How many ranges each `read_many` call carried.
        read_batches: Mutex<Vec<usize>>,
    }

    impl Memory {
        fn new(size: usize) -> Arc<Memory> {
            Arc::new(Memory {
                info: ExportInfo {
                    name: "mem".into(),
                    size: size as u64,
                    block_size: 4096,
                    read_only: false,
                    description: "memory".into(),
                },
                data: Mutex::new(vec![0; size]),
                written: Mutex::new(vec![false; size / 4096]),
                flushes: Mutex::new(0),
                read_batches: Mutex::new(Vec::new()),
            })
        }
    }

    struct MemoryDevice(Arc<Memory>);

    impl Device for MemoryDevice {
        fn info(&self) -> &ExportInfo {
            &self.0.info
        }
        fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
            let data = self.0.data.lock().unwrap();
            Ok(data[offset as usize..offset as usize + len as usize].to_vec())
        }
        fn read_many(&self, ranges: &[(u64, u32)]) -> Vec<Result<Vec<u8>, DeviceError>> {
            self.0.read_batches.lock().unwrap().push(ranges.len());
            ranges
                .iter()
                .map(|&(offset, len)| self.read(offset, len))
                .collect()
        }
        fn write(&self, offset: u64, bytes: &[u8], _: bool) -> Result<(), DeviceError> {
            if bytes.first() == Some(&0xee) {
                return Err(DeviceError::new(errno::EIO, "poisoned"));
            }
            let mut data = self.0.data.lock().unwrap();
            data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
            let mut written = self.0.written.lock().unwrap();
            for sector in offset / 4096..(offset + bytes.len() as u64).div_ceil(4096) {
                written[sector as usize] = true;
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            *self.0.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn trim(&self, offset: u64, len: u32, _: bool) -> Result<(), DeviceError> {
            self.write_zeroes(offset, len, false, false, false)
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u32,
            _: bool,
            fast: bool,
            _: bool,
        ) -> Result<(), DeviceError> {
            if fast {
                return Err(DeviceError::new(errno::EOPNOTSUPP, "not fast"));
            }
            let mut data = self.0.data.lock().unwrap();
            data[offset as usize..offset as usize + len as usize].fill(0);
            Ok(())
        }
        fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
            let written = self.0.written.lock().unwrap();
            let mut out: Vec<Extent> = Vec::new();
            for sector in offset / 4096..(offset + u64::from(len)).div_ceil(4096) {
                let hole = !written[sector as usize];
                match out.last_mut() {
                    Some(last) if last.hole == hole => last.length += 4096,
                    _ => out.push(Extent { length: 4096, hole }),
                }
            }
            Ok(out)
        }
        fn cache(&self, _: u64, _: u32) -> Result<(), DeviceError> {
            Ok(())
        }
        fn close(&self) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    struct MemoryCatalog(Arc<Memory>);

    impl Catalog for MemoryCatalog {
        fn list(&self) -> Result<Vec<ExportInfo>, CatalogError> {
            Ok(vec![self.0.info.clone()])
        }
        fn describe(&self, name: &str) -> Result<ExportInfo, CatalogError> {
            if name.is_empty() || name == "mem" {
                Ok(self.0.info.clone())
            } else {
                Err(CatalogError::Unknown(name.into()))
            }
        }
        fn open(&self, name: &str) -> Result<Arc<dyn Device>, CatalogError> {
            self.describe(name)?;
            Ok(Arc::new(MemoryDevice(self.0.clone())))
        }
    }

    struct Running {
        address: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap().unwrap();
            }
        }
    }

    fn start(memory: Arc<Memory>) -> Running {
        let (stop, stopped) = oneshot::channel();
        let (bound, address) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let config = ServerConfig {
                tcp: Some("127.0.0.1:0".parse().unwrap()),
                worker_threads: 2,
                blocking_threads: 4,
                ..ServerConfig::default()
            };
            serve(
                Arc::new(MemoryCatalog(memory)),
                config,
                |listening| bound.send(listening.tcp.unwrap()).unwrap(),
                Stop::On(stopped),
            )
        });
        Running {
            address: address.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The `nbd` crate's client (NBD_OPT_EXPORT_NAME, simple replies), an
    /// implementation independent of this one.
    #[test]
    fn the_nbd_crates_client_reads_and_writes() {
        let memory = Memory::new(1 << 20);
        let server = start(memory.clone());
        let mut tcp = std::net::TcpStream::connect(server.address).unwrap();
        let export = nbd::client::handshake(&mut tcp, b"mem").unwrap();
        assert_eq!(export.size, 1 << 20);
        assert!(export.send_flush && export.send_trim && !export.readonly);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        client.seek(SeekFrom::Start(8192)).unwrap();
        client.write_all(&pattern).unwrap();
        client.flush().unwrap();
        client.seek(SeekFrom::Start(8192)).unwrap();
        let mut back = vec![0; pattern.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(*memory.flushes.lock().unwrap(), 1);
        // The client clips at the end of the export itself.
        client.seek(SeekFrom::Start(1 << 20)).unwrap();
        assert!(client.write(&[1; 512]).is_ok_and(|n| n == 0));
        client.seek(SeekFrom::Start(0)).unwrap();
        let mut start = vec![1; 512];
        client.read_exact(&mut start).unwrap();
        assert_eq!(start, vec![0; 512]);
    }

    fn raw_handshake(tcp: &mut std::net::TcpStream, structured: bool) -> u64 {
        let mut greeting = [0u8; 18];
        tcp.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        tcp.write_all(&3u32.to_be_bytes()).unwrap();
        let mut send_option = |option: u32, data: &[u8]| {
            let header = OptionHeader {
                option,
                len: data.len() as u32,
            };
            tcp.write_all(&header.encode()).unwrap();
            tcp.write_all(data).unwrap();
            // Read replies until ACK or an error.
            loop {
                let mut head = [0u8; 20];
                tcp.read_exact(&mut head).unwrap();
                let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
                let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
                let mut data = vec![0; len as usize];
                tcp.read_exact(&mut data).unwrap();
                if kind == REP_ACK {
                    return;
                }
                assert_ne!(kind & (1 << 31), 1 << 31, "error reply {kind:#x}");
            }
        };
        if structured {
            send_option(OPT_STRUCTURED_REPLY, &[]);
            send_option(
                OPT_SET_META_CONTEXT,
                &encode_meta_query("mem", &["base:allocation"]),
            );
        }
        send_option(OPT_GO, &encode_export_query("mem", &[INFO_BLOCK_SIZE]));
        1 << 20
    }

    fn request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode()
        .to_vec()
    }

    /// Pipelined requests, replies out of order by cookie, structured replies,
    /// block status, and a bad frame that ends only its own connection.
    /// Small reads the client sent back to back reach the device in one
    /// `read_many` call, and each gets its own data back under its cookie.
    #[test]
    fn queued_reads_reach_the_device_together() {
        let memory = Memory::new(1 << 20);
        for (sector, chunk) in memory.data.lock().unwrap().chunks_mut(4096).enumerate() {
            chunk.fill((sector % 200) as u8 + 1);
        }
        let server = start(memory.clone());
        let mut tcp = std::net::TcpStream::connect(server.address).unwrap();
        raw_handshake(&mut tcp, false);
        let requests: Vec<u8> = (0..16u64)
            .flat_map(|i| request(CMD_READ, 0, 1000 + i, (15 - i) * 4096, 4096))
            .collect();
        tcp.write_all(&requests).unwrap();
        for _ in 0..16 {
            let mut head = [0u8; 16];
            tcp.read_exact(&mut head).unwrap();
            assert_eq!(
                u32::from_be_bytes(head[..4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC
            );
            assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0);
            let cookie = u64::from_be_bytes(head[8..].try_into().unwrap());
            let mut data = vec![0u8; 4096];
            tcp.read_exact(&mut data).unwrap();
            let sector = 15 - (cookie - 1000);
            assert_eq!(data, vec![sector as u8 + 1; 4096], "cookie {cookie}");
        }
        let batches = memory.read_batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 16);
        assert!(
            batches.iter().any(|&reads| reads > 1),
            "every read went to the device alone: {batches:?}"
        );
    }

    #[test]
    fn pipelined_structured_requests_and_a_bad_frame() {
        let memory = Memory::new(1 << 20);
        let server = start(memory.clone());
        let mut tcp = std::net::TcpStream::connect(server.address).unwrap();
        raw_handshake(&mut tcp, true);
        let mut batch = Vec::new();
        for i in 0..16u64 {
            batch.extend(request(CMD_WRITE, 0, i, i * 4096, 4096));
            batch.extend(vec![i as u8 + 1; 4096]);
        }
        batch.extend(request(CMD_WRITE, 0, 100, 0, 512));
        batch.extend(vec![0xee; 512]);
        batch.extend(request(CMD_READ, 0, 101, 3, 512));
        tcp.write_all(&batch).unwrap();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..18 {
            let mut magic = [0u8; 4];
            tcp.read_exact(&mut magic).unwrap();
            if u32::from_be_bytes(magic) == SIMPLE_REPLY_MAGIC {
                let mut rest = [0u8; 12];
                tcp.read_exact(&mut rest).unwrap();
                let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..].try_into().unwrap());
                seen.insert(cookie, error);
            } else {
                assert_eq!(u32::from_be_bytes(magic), STRUCTURED_REPLY_MAGIC);
                let mut rest = [0u8; 16];
                tcp.read_exact(&mut rest).unwrap();
                let kind = u16::from_be_bytes(rest[2..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
                let mut payload = vec![0; len as usize];
                tcp.read_exact(&mut payload).unwrap();
                assert_eq!(kind, REPLY_TYPE_ERROR);
                seen.insert(cookie, u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
        }
        for i in 0..16 {
            assert_eq!(seen[&i], 0);
        }
        assert_eq!(seen[&100], 5, "the device's EIO");
        assert_eq!(seen[&101], 22, "misaligned read");

        tcp.write_all(&request(CMD_BLOCK_STATUS, 0, 7, 0, 1 << 17))
            .unwrap();
        let mut head = [0u8; 20];
        tcp.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut payload = vec![0; len as usize];
        tcp.read_exact(&mut payload).unwrap();
        assert_eq!(&payload[..4], &1u32.to_be_bytes());
        assert_eq!(
            payload[4..],
            [
                0, 1, 0, 0, 0, 0, 0, 0, // 64 KiB of data
                0, 1, 0, 0, 0, 0, 0, 3, // 64 KiB of hole
            ]
        );

        // Another connection, then garbage on the first: only the first closes.
        let mut other = std::net::TcpStream::connect(server.address).unwrap();
        raw_handshake(&mut other, false);
        tcp.write_all(&[0xde; 28]).unwrap();
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        other
            .write_all(&request(CMD_READ, 0, 9, 4096, 4096))
            .unwrap();
        let mut reply = [0u8; 16];
        other.read_exact(&mut reply).unwrap();
        assert_eq!(reply, simple_reply(9, None));
        let mut data = vec![0; 4096];
        other.read_exact(&mut data).unwrap();
        assert_eq!(data, vec![2; 4096]);
        other.write_all(&request(CMD_DISC, 0, 10, 0, 0)).unwrap();
        let mut rest = Vec::new();
        other.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn descriptors_cover_the_query_and_no_more() {
        let extents = [
            Extent {
                length: 8192,
                hole: false,
            },
            Extent {
                length: 1 << 40,
                hole: true,
            },
        ];
        let all = descriptors(&extents, 1 << 20, false);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].length, (1 << 20) - 8192);
        let one = descriptors(&extents, 4096, true);
        assert_eq!(
            one,
            [Descriptor {
                length: 4096,
                flags: 0
            }]
        );
        assert_eq!(descriptors(&[], 512, false)[0].length, 512);
    }
}
