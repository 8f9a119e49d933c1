//! The runtime: a QUIC endpoint, the actors and services it hosts, and its
//! connections to other runtimes.
//!
//! A runtime with credentials listens (the server side is always
//! authenticated) and dials with its certificate; an anonymous runtime only
//! dials. Each peer has at most one connection, found by path and shared by
//! every message to that peer whichever side opened it; a dead connection is
//! replaced on the next message, and failed attempts back off exponentially.
//! Every message is one QUIC stream: unidirectional for `send`, bidirectional
//! for `call`, whose reply comes back on the same stream.

use blocktree_core::credstore::CredStore;
use blocktree_core::keys::{CryptoError, Signature, Signer, SigningPublicKey};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, Writecap};
use blocktree_core::{BtPath, PrincipalId};
use quinn::{EndpointConfig, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use socket2::{Domain, Protocol, Socket, Type};
use std::any::type_name;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::addr::{ActorName, Name, ServiceId};
use crate::auth::AccessPolicy;
use crate::cert::{SharedSigner, parse_certificate};
use crate::config::{Limits, RuntimeConfig};
use crate::envelope::{Envelope, Mailbox, Message, Payload, Peer, Reply, ReplyTo, write_final};
use crate::error::BttpError;
use crate::frame::{self, ErrorCode, Frame, FrameKind, RemoteError, RequestHeader};
use crate::tls;
use crate::verify::{ClientVerifier, Security, SecurityState, ServerVerifier, VerifyError};
use crate::wire::{
    Budgets, ReadFailure, alert_of, connection_error, read_frame, stop_code, write_error,
};

/// The first port of the dynamic range a runtime listens in by default.
pub const DYNAMIC_PORTS_START: u16 = 49152;
/// How many random ports are tried before giving up.
const PORT_ATTEMPTS: usize = 256;

/// A runtime's identity: a key that signs (through a credential store or a TPM)
/// and the writecap issued to it, which names the runtime's path.
#[derive(Clone)]
pub struct Credentials {
    signer: SharedSigner,
    writecap: Writecap,
    path: BtPath,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({} at {})", self.principal(), self.path)
    }
}

impl Credentials {
    /// Pairs a signer with its writecap. The writecap must be issued to the
    /// signer's principal; whether it is valid is for peers to judge, so an
    /// expired one is accepted here and refused by them.
    pub fn new(signer: SharedSigner, writecap: Writecap) -> Result<Credentials, BttpError> {
        let principal = signer.principal();
        if writecap.subject() != Some(principal) {
            return Err(BttpError::Credentials(format!(
                "the writecap was issued to {:?}, not to this key's principal {principal}",
                writecap.subject()
            )));
        }
        let path = writecap
            .path()
            .cloned()
            .ok_or_else(|| BttpError::Credentials("the writecap is empty".into()))?;
        Ok(Credentials {
            signer,
            writecap,
            path,
        })
    }

    /// The runtime key and writecap of a credential store.
    pub fn from_store(store: Arc<dyn CredStore>) -> Result<Credentials, BttpError> {
        let writecap = store.writecap().cloned().ok_or_else(|| {
            BttpError::Credentials(format!(
                "the credential store of {} holds no writecap yet; have one approved and imported first",
                store.principal()
            ))
        })?;
        Credentials::new(Arc::new(StoreSigner(store)), writecap)
    }

    /// The runtime's path: what its writecap grants.
    pub fn path(&self) -> &BtPath {
        &self.path
    }

    /// The runtime's principal.
    pub fn principal(&self) -> PrincipalId {
        self.signer.principal()
    }

    /// The writecap presented to peers.
    pub fn writecap(&self) -> &Writecap {
        &self.writecap
    }
}

/// A credential store's runtime key as a signer that rustls's handshake
/// threads can share (core's `RuntimeSigner` borrows the store).
pub struct StoreSigner(pub Arc<dyn CredStore>);

impl Signer for StoreSigner {
    fn public_key(&self) -> SigningPublicKey {
        self.0.signing_public_key()
    }

    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        Ok(self.0.sign(message)?)
    }

    fn signs_in_process(&self) -> bool {
        self.0.signs_in_process()
    }
}

/// What a runtime knows of the peers it can dial: where each listens and which
/// services it provides. Stands in for runtime discovery (design §2.5).
#[derive(Debug, Default)]
struct Routes {
    peers: HashMap<BtPath, Route>,
    /// The runtimes providing each service, so that routing a service name looks
    /// only at them.
    providers: HashMap<BtPath, BTreeSet<BtPath>>,
}

#[derive(Debug)]
struct Route {
    addr: SocketAddr,
    services: BTreeSet<BtPath>,
}

impl Routes {
    fn insert(&mut self, path: BtPath, route: Route) {
        self.remove(&path);
        for service in &route.services {
            self.providers
                .entry(service.clone())
                .or_default()
                .insert(path.clone());
        }
        self.peers.insert(path, route);
    }

    fn remove(&mut self, path: &BtPath) {
        let Some(route) = self.peers.remove(path) else {
            return;
        };
        for service in &route.services {
            if let Some(runtimes) = self.providers.get_mut(service) {
                runtimes.remove(path);
                if runtimes.is_empty() {
                    self.providers.remove(service);
                }
            }
        }
    }
}

/// One connection and what the handshake established about its peer.
#[derive(Clone)]
struct PeerConnection {
    connection: quinn::Connection,
    state: Arc<PeerState>,
}

struct PeerState {
    peer: Peer,
    /// Decided at the handshake: whether the peer may send unsolicited messages.
    may_send: bool,
    writecap: Option<Writecap>,
    /// Bytes of this peer's messages held before their actors take them.
    budget: Arc<Semaphore>,
}

impl PeerConnection {
    fn is_live(&self) -> bool {
        self.connection.close_reason().is_none()
    }
}

#[derive(Default)]
struct DialState {
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: Option<BttpError>,
}

impl DialState {
    fn failed(&mut self, error: BttpError, limits: &Limits) {
        self.failures = self.failures.saturating_add(1);
        self.next_attempt = Some(Instant::now() + limits.backoff(self.failures));
        self.last_error = Some(error);
    }

    fn reset(&mut self) {
        *self = DialState::default();
    }
}

type ProviderSpawner = dyn Fn(ServiceId, Mailbox) + Send + Sync;

struct Service {
    spawn: Box<ProviderSpawner>,
    /// The actor serving each provider id.
    providers: Mutex<HashMap<ServiceId, Uuid>>,
}

enum Destination {
    Local,
    Remote(BtPath),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// An actor runtime and its bttp endpoint. Cloning gives another handle to the
/// same runtime; it closes its endpoint when the last handle is dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Runtime({})", self.inner.label())
    }
}

pub(crate) struct Inner {
    weak: Weak<Inner>,
    path: Option<BtPath>,
    certified: Option<Arc<CertifiedKey>>,
    endpoint: quinn::Endpoint,
    security: Arc<Security>,
    limits: Limits,
    /// Bytes of all peers' messages held before their actors take them.
    budget: Arc<Semaphore>,
    actors: RwLock<HashMap<Uuid, mpsc::Sender<Envelope>>>,
    services: RwLock<HashMap<BtPath, Arc<Service>>>,
    routes: RwLock<Routes>,
    /// The connection used to reach each authenticated peer.
    by_path: RwLock<HashMap<BtPath, PeerConnection>>,
    /// Every live connection, by QUIC's stable id.
    live: RwLock<HashMap<usize, PeerConnection>>,
    dials: Mutex<HashMap<BtPath, Arc<tokio::sync::Mutex<DialState>>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"runtime stopped");
    }
}

/// Binds a UDP socket to exactly `addr`; an IPv6 wildcard also takes IPv4.
fn bind_exact(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn random_dynamic_port() -> Result<u16, BttpError> {
    let mut bytes = [0u8; 2];
    blocktree_core::aead::random_fill(&mut bytes)
        .map_err(|error| BttpError::Config(error.to_string()))?;
    // 65536 is a multiple of the range's 16384 ports, so this is uniform.
    Ok(DYNAMIC_PORTS_START + u16::from_le_bytes(bytes) % (u16::MAX - DYNAMIC_PORTS_START + 1))
}

/// Binds `addr`, or with port 0 a free port drawn uniformly from 49152–65535.
fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, BttpError> {
    let failed = |addr: SocketAddr, error: io::Error| BttpError::Bind {
        addr: addr.to_string(),
        reason: error.to_string(),
    };
    if addr.port() != 0 {
        return bind_exact(addr).map_err(|error| failed(addr, error));
    }
    for _ in 0..PORT_ATTEMPTS {
        let candidate = SocketAddr::new(addr.ip(), random_dynamic_port()?);
        match bind_exact(candidate) {
            Ok(socket) => return Ok(socket),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => continue,
            Err(error) => return Err(failed(candidate, error)),
        }
    }
    Err(BttpError::Bind {
        addr: addr.to_string(),
        reason: format!("{PORT_ATTEMPTS} random ports of 49152–65535 were all in use"),
    })
}

impl Runtime {
    /// Starts a runtime that listens on `config.bind` as `credentials`' path.
    /// Must be called within a Tokio runtime.
    pub fn start(config: RuntimeConfig, credentials: Credentials) -> Result<Runtime, BttpError> {
        let path = credentials.path().clone();
        let mut trusted_roots = config.trusted_roots.clone();
        trusted_roots.insert(path.root());
        let now = Timestamp::now();
        if let Err(error) =
            credentials
                .writecap
                .validate_for(&credentials.principal(), &path, now, &config.revoked)
        {
            tracing::warn!(
                "bttp: this runtime's own writecap is not valid ({error}); peers will refuse it"
            );
        }
        let certified = tls::certified_key(credentials.signer.clone(), &credentials.writecap)?;
        Runtime::build(config, Some((path, certified)), trusted_roots)
    }

    /// Starts a runtime without credentials: it connects anonymously, only to
    /// runtimes whose files let others execute them, and hosts no actors.
    pub fn anonymous(config: RuntimeConfig) -> Result<Runtime, BttpError> {
        Runtime::build(config, None, BTreeSet::new())
    }

    fn build(
        config: RuntimeConfig,
        identity: Option<(BtPath, Arc<CertifiedKey>)>,
        trusted_roots: BTreeSet<PrincipalId>,
    ) -> Result<Runtime, BttpError> {
        config.limits.check()?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| BttpError::Config("a runtime must be started within Tokio".into()))?;
        let quic_runtime = quinn::default_runtime()
            .ok_or_else(|| BttpError::Config("no async runtime for QUIC".into()))?;
        let provider = tls::provider();
        let security = Arc::new(Security::new(
            SecurityState {
                trusted_roots,
                revoked: config.revoked,
                access: config.access,
            },
            provider.clone(),
        ));
        let (path, certified) = identity.unzip();
        let server = match &certified {
            Some(certified) => Some(tls::server_config(
                certified.clone(),
                Arc::new(ClientVerifier::new(security.clone())),
                provider,
                &config.limits,
            )?),
            None => None,
        };
        let socket = match bind_udp(config.bind) {
            // A client-only runtime asked for the IPv6 wildcard on a host
            // without IPv6 makes do with IPv4.
            Err(_) if server.is_none() && config.bind.ip().is_unspecified() => bind_udp(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.bind.port())),
            )?,
            other => other?,
        };
        let local = socket.local_addr().ok();
        let endpoint =
            quinn::Endpoint::new(EndpointConfig::default(), server, socket, quic_runtime).map_err(
                |error| BttpError::Bind {
                    addr: format!("{local:?}"),
                    reason: error.to_string(),
                },
            )?;
        let inner = Arc::new_cyclic(|weak| Inner {
            weak: weak.clone(),
            path,
            certified,
            endpoint: endpoint.clone(),
            security,
            budget: Arc::new(Semaphore::new(config.limits.max_buffered_bytes)),
            limits: config.limits,
            actors: RwLock::default(),
            services: RwLock::default(),
            routes: RwLock::default(),
            by_path: RwLock::default(),
            live: RwLock::default(),
            dials: Mutex::default(),
        });
        if inner.certified.is_some() {
            handle.spawn(accept_loop(endpoint, Arc::downgrade(&inner)));
        }
        Ok(Runtime { inner })
    }

    /// The runtime's path; `None` for an anonymous runtime.
    pub fn path(&self) -> Option<&BtPath> {
        self.inner.path.as_ref()
    }

    /// The address the runtime's endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, BttpError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|error| BttpError::Bind {
                addr: "the endpoint".into(),
                reason: error.to_string(),
            })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Tells the runtime where the runtime at `path` listens and which services
    /// it provides (what runtime files and discovery will supply).
    pub fn add_peer(
        &self,
        path: BtPath,
        addr: SocketAddr,
        services: impl IntoIterator<Item = BtPath>,
    ) {
        let route = Route {
            addr,
            services: services.into_iter().collect(),
        };
        write(&self.inner.routes).insert(path, route);
    }

    /// Forgets the route to `path`; an open connection stays until it closes.
    pub fn remove_peer(&self, path: &BtPath) {
        write(&self.inner.routes).remove(path);
    }

    /// Creates an actor and returns its mailbox; dropping the mailbox removes it.
    pub fn register_actor(&self) -> Result<Mailbox, BttpError> {
        self.inner.new_mailbox().map(|(mailbox, _)| mailbox)
    }

    /// Registers `service`, which the runtime's file must list. When a message
    /// for a provider id arrives that no live actor serves, the runtime creates
    /// a mailbox and hands it to `spawn` (which typically spawns a task to
    /// serve it).
    pub fn register_service<F>(&self, service: BtPath, spawn: F) -> Result<(), BttpError>
    where
        F: Fn(ServiceId, Mailbox) + Send + Sync + 'static,
    {
        if self.inner.path.is_none() {
            return Err(BttpError::NoIdentity);
        }
        if !self
            .inner
            .security
            .read()
            .access
            .record
            .services
            .contains(&service)
        {
            return Err(BttpError::ServiceNotPermitted(service.to_string()));
        }
        let mut services = write(&self.inner.services);
        if services.contains_key(&service) {
            return Err(BttpError::ServiceRegistered(service.to_string()));
        }
        services.insert(
            service,
            Arc::new(Service {
                spawn: Box::new(spawn),
                providers: Mutex::default(),
            }),
        );
        Ok(())
    }

    /// Sends `message` to `to` without waiting for a reply. Locally the message is
    /// moved into the recipient's mailbox; to another runtime it is queued on a
    /// stream of its own. Delivery errors at the far end are not reported.
    pub async fn send<T: Message>(&self, to: impl Into<Name>, message: T) -> Result<(), BttpError> {
        self.inner.send(None, to.into(), message).await
    }

    /// [`Runtime::send`] on behalf of the local actor `from`.
    pub async fn send_from<T: Message>(
        &self,
        from: &ActorName,
        to: impl Into<Name>,
        message: T,
    ) -> Result<(), BttpError> {
        self.inner.send(Some(from.id), to.into(), message).await
    }

    /// Sends `message` to `to` and waits at most `timeout` for its one reply.
    pub async fn call<T: Message, R: Message>(
        &self,
        to: impl Into<Name>,
        message: T,
        timeout: Duration,
    ) -> Result<R, BttpError> {
        self.inner.call(None, to.into(), message, timeout).await
    }

    /// [`Runtime::call`] on behalf of the local actor `from`.
    pub async fn call_from<T: Message, R: Message>(
        &self,
        from: &ActorName,
        to: impl Into<Name>,
        message: T,
        timeout: Duration,
    ) -> Result<R, BttpError> {
        self.inner
            .call(Some(from.id), to.into(), message, timeout)
            .await
    }

    /// Replaces the revocation list, and closes live connections whose peer's
    /// writecap it now invalidates.
    pub fn set_revocations(&self, revoked: RevocationList) {
        self.inner
            .security
            .update(|state| state.revoked = revoked.clone());
        let now = Timestamp::now();
        for connection in read(&self.inner.live).values() {
            let (Some(path), Some(writecap)) =
                (connection.state.peer.path(), &connection.state.writecap)
            else {
                continue;
            };
            if !crate::verify::still_valid(writecap, path, now, &revoked) {
                tracing::info!("bttp: closing the connection of {path}: its writecap is revoked");
                connection
                    .connection
                    .close(VarInt::from_u32(1), b"writecap revoked");
            }
        }
    }

    /// Replaces the access policy. As the design says, a peer's permission is
    /// decided at its handshake: live connections keep theirs until they
    /// reconnect; whether anonymous clients are admitted applies at once.
    pub fn set_access(&self, access: AccessPolicy) {
        self.inner.security.update(|state| state.access = access);
    }

    /// The most recent certificates this runtime refused, oldest first.
    pub fn recent_refusals(&self) -> Vec<VerifyError> {
        self.inner.security.recent_refusals()
    }

    /// Connections open now, inbound and outbound.
    pub fn open_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Closes every connection, telling peers, and stops accepting new ones.
    pub async fn shutdown(&self) {
        self.inner
            .endpoint
            .close(VarInt::from_u32(0), b"runtime shut down");
        let _ = tokio::time::timeout(tls::CLOSE_GRACE, self.inner.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, runtime: Weak<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(inner) = runtime.upgrade() else {
            incoming.refuse();
            break;
        };
        if endpoint.open_connections() >= inner.limits.max_connections {
            tracing::warn!(
                "bttp: refusing a connection from {}: {} connections are open",
                incoming.remote_address(),
                inner.limits.max_connections
            );
            incoming.refuse();
            continue;
        }
        tokio::spawn(async move { inner.accept(incoming).await });
    }
}

impl Inner {
    fn label(&self) -> String {
        match &self.path {
            Some(path) => path.to_string(),
            None => "an anonymous runtime".into(),
        }
    }

    async fn accept(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!("bttp: connection from {remote} failed: {error}");
                return;
            }
        };
        let connection = match tokio::time::timeout(self.limits.handshake_timeout, connecting).await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                tracing::info!("bttp: handshake with {remote} failed: {error}");
                return;
            }
            Err(_) => {
                tracing::info!("bttp: handshake with {remote} timed out");
                return;
            }
        };
        let peer_certificate = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|der| parse_certificate(der)));
        let (peer, writecap) = match peer_certificate {
            None => (Peer::Anonymous, None),
            Some(Ok(certificate)) => match certificate.writecap.path().cloned() {
                Some(path) => (
                    Peer::Runtime {
                        path,
                        principal: certificate.key.principal(),
                    },
                    Some(certificate.writecap),
                ),
                None => (Peer::Anonymous, None),
            },
            // The verifier accepted this certificate, so it parses; refuse
            // rather than guess if it somehow does not.
            Some(Err(error)) => {
                connection.close(VarInt::from_u32(2), b"certificate");
                tracing::warn!("bttp: verified certificate of {remote} does not parse: {error}");
                return;
            }
        };
        let connection = self.adopt(connection, peer, writecap, false);
        tracing::debug!(
            "bttp: {} connected from {remote} (may send: {})",
            connection.state.peer,
            connection.state.may_send
        );
    }

    /// Records a new connection and starts serving the streams its peer opens.
    fn adopt(
        &self,
        connection: quinn::Connection,
        peer: Peer,
        writecap: Option<Writecap>,
        dialled: bool,
    ) -> PeerConnection {
        let principal = match &peer {
            Peer::Runtime { principal, .. } => Some(principal),
            Peer::Anonymous | Peer::Local => None,
        };
        let may_send = self.security.read().access.may_execute(principal);
        let state = Arc::new(PeerState {
            may_send,
            writecap,
            budget: Arc::new(Semaphore::new(self.limits.max_buffered_bytes_per_peer)),
            peer,
        });
        let peer_connection = PeerConnection {
            connection: connection.clone(),
            state: state.clone(),
        };
        write(&self.live).insert(connection.stable_id(), peer_connection.clone());
        if let Some(path) = state.peer.path() {
            let mut by_path = write(&self.by_path);
            let replace = dialled || by_path.get(path).is_none_or(|existing| !existing.is_live());
            if replace {
                by_path.insert(path.clone(), peer_connection.clone());
            }
        }
        tokio::spawn(serve_connection(self.weak.clone(), connection, state));
        peer_connection
    }

    fn forget_connection(&self, state: &PeerState, stable_id: usize) {
        write(&self.live).remove(&stable_id);
        let Some(path) = state.peer.path() else {
            return;
        };
        let mut by_path = write(&self.by_path);
        // A connection the peer refused at the handshake stays, so that the next
        // dial learns of the refusal and backs off.
        let forget = by_path.get(path).is_some_and(|current| {
            current.connection.stable_id() == stable_id
                && current
                    .connection
                    .close_reason()
                    .is_none_or(|reason| alert_of(&reason).is_none())
        });
        if forget {
            by_path.remove(path);
            drop(by_path);
            // It was a working connection: earlier failures no longer count. A
            // dial under way keeps its own account.
            let slot = lock(&self.dials).get(path).cloned();
            if let Some(mut state) = slot.as_ref().and_then(|slot| slot.try_lock().ok()) {
                state.reset();
            }
        }
    }

    fn new_mailbox(&self) -> Result<(Mailbox, mpsc::Sender<Envelope>), BttpError> {
        let path = self.path.clone().ok_or(BttpError::NoIdentity)?;
        let (sender, receiver) = mpsc::channel(self.limits.mailbox_capacity);
        let id = Uuid::new_v4();
        write(&self.actors).insert(id, sender.clone());
        let mailbox = Mailbox {
            name: ActorName::new(path, id),
            receiver,
            runtime: self.weak.clone(),
        };
        Ok((mailbox, sender))
    }

    pub(crate) fn forget_actor(&self, id: Uuid) {
        write(&self.actors).remove(&id);
    }

    /// Where a message for `to` goes: this runtime or which peer.
    fn destination(&self, to: &Name) -> Result<Destination, BttpError> {
        match to {
            Name::Actor(actor) => Ok(if self.path.as_ref() == Some(&actor.runtime) {
                Destination::Local
            } else {
                Destination::Remote(actor.runtime.clone())
            }),
            Name::Service(service) => {
                let mut best: Option<(usize, Destination)> = None;
                if let Some(path) = &self.path
                    && read(&self.services).contains_key(&service.service)
                    && let Some(distance) = service.distance(path)
                {
                    best = Some((distance, Destination::Local));
                }
                let routes = read(&self.routes);
                for path in routes.providers.get(&service.service).into_iter().flatten() {
                    if let Some(distance) = service.distance(path)
                        && best.as_ref().is_none_or(|(closest, _)| distance < *closest)
                    {
                        best = Some((distance, Destination::Remote(path.clone())));
                    }
                }
                best.map(|(_, destination)| destination)
                    .ok_or_else(|| BttpError::NoRoute(to.to_string()))
            }
        }
    }

    /// The mailbox of the local actor or service provider `to` names.
    fn mailbox_for(&self, to: &Name) -> Result<mpsc::Sender<Envelope>, RemoteError> {
        let Some(own) = &self.path else {
            return Err(RemoteError::new(
                ErrorCode::NoSuchActor,
                "an anonymous runtime hosts no actors",
            ));
        };
        match to {
            Name::Actor(actor) => {
                if &actor.runtime != own {
                    return Err(RemoteError::new(
                        ErrorCode::WrongRuntime,
                        format!("{actor} is not in {own}"),
                    ));
                }
                read(&self.actors)
                    .get(&actor.id)
                    .cloned()
                    .ok_or_else(|| RemoteError::new(ErrorCode::NoSuchActor, actor.to_string()))
            }
            Name::Service(name) => {
                let service = read(&self.services)
                    .get(&name.service)
                    .cloned()
                    .ok_or_else(|| {
                        RemoteError::new(
                            ErrorCode::NoSuchService,
                            format!("{} is not registered in {own}", name.service),
                        )
                    })?;
                if !name.admits(own) {
                    return Err(RemoteError::new(
                        ErrorCode::NoSuchService,
                        format!("{own} is outside the scope of {name}"),
                    ));
                }
                self.provider(&service, &name.id)
            }
        }
    }

    /// The mailbox of provider `id` of `service`, spawning the provider first if
    /// no live actor serves that id.
    fn provider(
        &self,
        service: &Service,
        id: &ServiceId,
    ) -> Result<mpsc::Sender<Envelope>, RemoteError> {
        let mut providers = lock(&service.providers);
        if let Some(actor) = providers.get(id)
            && let Some(sender) = read(&self.actors).get(actor)
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let (mailbox, sender) = self
            .new_mailbox()
            .map_err(|error| RemoteError::new(ErrorCode::NoSuchService, error.to_string()))?;
        providers.insert(id.clone(), mailbox.id());
        // Spawned outside the lock: the provider may well message its service.
        drop(providers);
        (service.spawn)(id.clone(), mailbox);
        Ok(sender)
    }

    /// Delivers to a local actor; on failure gives the envelope back with the
    /// reason, so a call can be answered with it.
    async fn deliver(&self, envelope: Envelope) -> Result<(), (RemoteError, Envelope)> {
        let sender = match self.mailbox_for(&envelope.to) {
            Ok(sender) => sender,
            Err(error) => return Err((error, envelope)),
        };
        sender.send(envelope).await.map_err(|returned| {
            (
                RemoteError::new(ErrorCode::NoSuchActor, "the actor has stopped"),
                returned.0,
            )
        })
    }

    fn rejected(&self, error: RemoteError) -> BttpError {
        BttpError::Rejected {
            peer: self.label(),
            error,
        }
    }

    fn local_sender(&self, from: Option<Uuid>) -> Option<ActorName> {
        from.zip(self.path.clone())
            .map(|(id, path)| ActorName::new(path, id))
    }

    async fn send<T: Message>(
        &self,
        from: Option<Uuid>,
        to: Name,
        message: T,
    ) -> Result<(), BttpError> {
        let timeout = self.limits.send_timeout;
        let deadline = Instant::now() + timeout;
        tokio::time::timeout_at(deadline, self.send_within(from, to, message, deadline))
            .await
            .unwrap_or(Err(BttpError::Timeout(timeout)))
    }

    async fn send_within<T: Message>(
        &self,
        from: Option<Uuid>,
        to: Name,
        message: T,
        deadline: Instant,
    ) -> Result<(), BttpError> {
        match self.destination(&to)? {
            Destination::Local => {
                let envelope = Envelope {
                    from: self.local_sender(from),
                    peer: Peer::Local,
                    to,
                    payload: Payload::Local(Box::new(message)),
                    reply: None,
                };
                self.deliver(envelope)
                    .await
                    .map_err(|(error, _)| self.rejected(error))
            }
            Destination::Remote(path) => {
                let bytes = frame::encode_request(
                    FrameKind::Send,
                    &RequestHeader { from, to },
                    &message,
                    self.limits.max_message_size,
                )?;
                let peer = self.connection(&path, deadline).await?;
                let mut stream = peer
                    .connection
                    .open_uni()
                    .await
                    .map_err(|error| connection_error(&path, &error))?;
                stream
                    .write_all(&bytes)
                    .await
                    .map_err(|error| write_error(&path, error))?;
                let _ = stream.finish();
                Ok(())
            }
        }
    }

    async fn call<T: Message, R: Message>(
        &self,
        from: Option<Uuid>,
        to: Name,
        message: T,
        timeout: Duration,
    ) -> Result<R, BttpError> {
        let deadline = Instant::now() + timeout;
        tokio::time::timeout_at(deadline, self.call_within(from, to, message, deadline))
            .await
            .unwrap_or(Err(BttpError::Timeout(timeout)))
    }

    async fn call_within<T: Message, R: Message>(
        &self,
        from: Option<Uuid>,
        to: Name,
        message: T,
        deadline: Instant,
    ) -> Result<R, BttpError> {
        let path = match self.destination(&to)? {
            Destination::Remote(path) => path,
            Destination::Local => {
                let (sender, receiver) = oneshot::channel();
                let envelope = Envelope {
                    from: self.local_sender(from),
                    peer: Peer::Local,
                    to,
                    payload: Payload::Local(Box::new(message)),
                    reply: Some(ReplyTo::Local(sender)),
                };
                self.deliver(envelope)
                    .await
                    .map_err(|(error, _)| self.rejected(error))?;
                return match receiver.await {
                    Ok(Ok(reply)) => reply.downcast::<R>().map(|reply| *reply).map_err(|_| {
                        BttpError::WrongType {
                            expected: type_name::<R>(),
                        }
                    }),
                    Ok(Err(error)) => Err(self.rejected(error)),
                    Err(_) => Err(BttpError::NoReply),
                };
            }
        };
        let bytes = frame::encode_request(
            FrameKind::Call,
            &RequestHeader { from, to },
            &message,
            self.limits.max_message_size,
        )?;
        let peer = self.connection(&path, deadline).await?;
        let (mut send, mut recv) = peer
            .connection
            .open_bi()
            .await
            .map_err(|error| connection_error(&path, &error))?;
        match send.write_all(&bytes).await {
            Ok(()) => {
                let _ = send.finish();
            }
            // The receiver refused before reading it all; its reason follows.
            Err(WriteError::Stopped(_)) => {}
            Err(error) => return Err(write_error(&path, error)),
        }
        let (frame, _) = read_frame(&mut recv, self.limits.max_message_size, None)
            .await
            .map_err(|failure| failure.into_reply_error(&path))?;
        match frame {
            Frame::Reply { payload } => {
                postcard::from_bytes::<R>(&payload).map_err(|error| BttpError::Decode {
                    expected: type_name::<R>(),
                    reason: error.to_string(),
                })
            }
            Frame::Error(error) => Err(BttpError::Rejected {
                peer: path.to_string(),
                error,
            }),
            other => Err(BttpError::Protocol {
                peer: path.to_string(),
                reason: format!("a {:?} frame came back where a reply belongs", other.kind()),
            }),
        }
    }

    fn live_connection(&self, path: &BtPath) -> Option<PeerConnection> {
        read(&self.by_path)
            .get(path)
            .filter(|connection| connection.is_live())
            .cloned()
    }

    fn dial_slot(&self, path: &BtPath) -> Arc<tokio::sync::Mutex<DialState>> {
        lock(&self.dials).entry(path.clone()).or_default().clone()
    }

    /// The connection to `path`: the live one, or a new one unless recent
    /// failures say to wait past `deadline`.
    async fn connection(
        &self,
        path: &BtPath,
        deadline: Instant,
    ) -> Result<PeerConnection, BttpError> {
        if let Some(connection) = self.live_connection(path) {
            return Ok(connection);
        }
        let slot = self.dial_slot(path);
        let mut state = slot.lock().await;
        if let Some(connection) = self.live_connection(path) {
            return Ok(connection);
        }
        // What became of the previous connection decides whether to back off.
        let previous = {
            let mut by_path = write(&self.by_path);
            match by_path.get(path) {
                Some(existing) if !existing.is_live() => by_path.remove(path),
                _ => None,
            }
        };
        if let Some(reason) = previous.and_then(|previous| previous.connection.close_reason()) {
            if alert_of(&reason).is_some() {
                state.failed(connection_error(path, &reason), &self.limits);
            } else {
                state.reset();
            }
        }
        if let Some(next) = state.next_attempt {
            let now = Instant::now();
            if next > now {
                if next > deadline {
                    return Err(BttpError::Backoff {
                        peer: path.to_string(),
                        retry_in: next - now,
                        last: Box::new(
                            state
                                .last_error
                                .clone()
                                .unwrap_or_else(|| BttpError::NoRoute(path.to_string())),
                        ),
                    });
                }
                tokio::time::sleep_until(next).await;
            }
        }
        let addr = read(&self.routes)
            .peers
            .get(path)
            .map(|route| route.addr)
            .ok_or_else(|| BttpError::NoRoute(path.to_string()))?;
        let attempt = tokio::time::timeout(self.limits.handshake_timeout, self.dial(path, addr));
        let error = match attempt.await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(error)) => error,
            Err(_) => BttpError::Connect {
                peer: format!("{path} at {addr}"),
                reason: format!("no handshake within {:?}", self.limits.handshake_timeout),
            },
        };
        state.failed(error.clone(), &self.limits);
        Err(error)
    }

    async fn dial(&self, path: &BtPath, addr: SocketAddr) -> Result<PeerConnection, BttpError> {
        let label = path.to_string();
        let verifier = Arc::new(ServerVerifier::new(path.clone(), self.security.clone()));
        let config = tls::client_config(
            self.certified.clone(),
            verifier.clone(),
            self.security.provider().clone(),
            &self.limits,
        )?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, tls::SERVER_NAME)
            .map_err(|error| BttpError::Connect {
                peer: format!("{label} at {addr}"),
                reason: error.to_string(),
            })?;
        let connection = match connecting.await {
            Ok(connection) => connection,
            Err(error) => {
                return Err(match verifier.verdict() {
                    Some(Err(error)) => BttpError::PeerRejected { peer: label, error },
                    _ => match connection_error(&label, &error) {
                        BttpError::ConnectionLost { reason, .. } => BttpError::Connect {
                            peer: format!("{label} at {addr}"),
                            reason,
                        },
                        other => other,
                    },
                });
            }
        };
        let Some(Ok(server)) = verifier.verdict() else {
            connection.close(VarInt::from_u32(2), b"certificate");
            return Err(BttpError::Protocol {
                peer: label,
                reason: "the handshake completed without a verified certificate".into(),
            });
        };
        let peer = Peer::Runtime {
            path: path.clone(),
            principal: server.key.principal(),
        };
        Ok(self.adopt(connection, peer, Some(server.writecap), true))
    }

    /// Serves one stream a peer opened: checks the peer may message us, reads
    /// the frame within the limits, and delivers it.
    async fn handle_stream(
        &self,
        peer: Arc<PeerState>,
        send: Option<quinn::SendStream>,
        mut recv: quinn::RecvStream,
    ) {
        if !peer.may_send {
            let error = RemoteError::new(
                ErrorCode::NotAuthorized,
                format!("{} lacks execute permission on {}", peer.peer, self.label()),
            );
            tracing::debug!("bttp: refused a message: {error}");
            return refuse_stream(send, recv, error).await;
        }
        let limits = &self.limits;
        let read = tokio::time::timeout(
            limits.request_timeout,
            read_frame(
                &mut recv,
                limits.max_message_size,
                Some(Budgets {
                    peer: &peer.budget,
                    total: &self.budget,
                }),
            ),
        )
        .await;
        let (frame, held) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(ReadFailure::Frame(error))) => {
                let code = match error {
                    frame::FrameError::PayloadTooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Malformed,
                };
                tracing::debug!("bttp: refused a message from {}: {error}", peer.peer);
                return refuse_stream(send, recv, RemoteError::new(code, error.to_string())).await;
            }
            Ok(Err(ReadFailure::Trailing)) => {
                let error = RemoteError::new(ErrorCode::Malformed, "bytes followed the message");
                return refuse_stream(send, recv, error).await;
            }
            Ok(Err(ReadFailure::Truncated(got))) => {
                let error = RemoteError::new(
                    ErrorCode::Malformed,
                    format!("the message ended after {got} bytes"),
                );
                return refuse_stream(send, recv, error).await;
            }
            // The peer reset the stream or lost its connection: nobody to tell.
            Ok(Err(_)) => return,
            Err(_) => {
                let error = RemoteError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the message was not complete within {:?}",
                        limits.request_timeout
                    ),
                );
                return refuse_stream(send, recv, error).await;
            }
        };
        let (header, payload) = match (frame, send.is_some()) {
            (Frame::Call { header, payload }, true) | (Frame::Send { header, payload }, false) => {
                (header, payload)
            }
            (other, bidirectional) => {
                let error = RemoteError::new(
                    ErrorCode::Malformed,
                    format!(
                        "a {:?} frame on a {} stream",
                        other.kind(),
                        if bidirectional {
                            "bidirectional"
                        } else {
                            "unidirectional"
                        }
                    ),
                );
                return refuse_stream(send, recv, error).await;
            }
        };
        let from = header
            .from
            .zip(peer.peer.path())
            .map(|(id, path)| ActorName::new(path.clone(), id));
        let envelope = Envelope {
            from,
            peer: peer.peer.clone(),
            to: header.to,
            payload: Payload::Remote {
                bytes: payload,
                held,
            },
            reply: send.map(|stream| ReplyTo::Remote {
                stream,
                max_message_size: limits.max_message_size,
            }),
        };
        if let Err((error, envelope)) = self.deliver(envelope).await {
            tracing::debug!(
                "bttp: could not deliver a message from {}: {error}",
                peer.peer
            );
            if let Some(reply) = envelope.reply {
                Reply(reply).refuse(error);
            }
        }
    }
}

/// Answers a refused stream: stops reading it and, on a call, says why.
async fn refuse_stream(
    send: Option<quinn::SendStream>,
    mut recv: quinn::RecvStream,
    error: RemoteError,
) {
    let _ = recv.stop(stop_code(error.code));
    if let Some(mut send) = send {
        let _ = write_final(&mut send, &frame::encode_error(&error)).await;
    }
}

async fn serve_connection(
    runtime: Weak<Inner>,
    connection: quinn::Connection,
    state: Arc<PeerState>,
) {
    loop {
        let stream = tokio::select! {
            bi = connection.accept_bi() => bi.map(|(send, recv)| (Some(send), recv)),
            uni = connection.accept_uni() => uni.map(|recv| (None, recv)),
        };
        let Ok((send, recv)) = stream else {
            break;
        };
        let Some(inner) = runtime.upgrade() else {
            break;
        };
        let state = state.clone();
        tokio::spawn(async move { inner.handle_stream(state, send, recv).await });
    }
    if let Some(inner) = runtime.upgrade() {
        inner.forget_connection(&state, connection.stable_id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(component: &str) -> BtPath {
        BtPath::root_of(PrincipalId::from_bytes([1; 32]))
            .join(component)
            .unwrap()
    }

    #[test]
    fn routes_index_providers_and_forget_them() {
        let addr: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let mut routes = Routes::default();
        let route = |services: &[&str]| Route {
            addr,
            services: services.iter().map(|s| path(s)).collect(),
        };
        routes.insert(path("a"), route(&["echo", "fs"]));
        routes.insert(path("b"), route(&["echo"]));
        assert_eq!(routes.providers[&path("echo")].len(), 2);
        // Re-announcing a peer replaces what it provides.
        routes.insert(path("a"), route(&["fs"]));
        assert_eq!(routes.providers[&path("echo")], BTreeSet::from([path("b")]));
        routes.remove(&path("b"));
        assert!(!routes.providers.contains_key(&path("echo")));
        assert_eq!(routes.providers[&path("fs")], BTreeSet::from([path("a")]));
        routes.remove(&path("a"));
        assert!(routes.providers.is_empty() && routes.peers.is_empty());
    }

    #[test]
    fn random_ports_are_in_the_dynamic_range() {
        for _ in 0..1000 {
            assert!(random_dynamic_port().unwrap() >= DYNAMIC_PORTS_START);
        }
    }
}
