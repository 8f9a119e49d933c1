//! bttp: Blocktree's authenticated message transport over QUIC, and the actor
//! runtime on top of it (design §2, DESIGN decision 5).
//!
//! - [`frame`]: the versioned binary frame, pure encode/decode with limits.
//! - [`cert`]: self-signed X.509 certificates that carry a writecap, signed
//!   through core's `Signer` so the key can live in a TPM.
//! - [`verify`]: the rustls verifiers: a peer is who its writecap says, for the
//!   path it claims, under the root that path names; no certificate authority.
//! - [`auth`]: who may send unsolicited messages to a runtime (execute
//!   permission on the runtime's file).
//! - [`addr`]: actor names and service names.
//! - [`Runtime`]: the QUIC endpoint, one connection per peer with reconnection
//!   and backoff, `send` and `call` with timeouts, actors, services and
//!   zero-copy delivery inside one process.
//! - [`echo`]: a diagnostic echo service.
//!
//! Not here yet: runtime discovery (DNS SRV, link-local multicast, design §2.5),
//! scheduled messages, and reading runtime records from the filesystem; peers'
//! addresses and attributes are given to the runtime directly.

pub mod addr;
pub mod auth;
pub mod cert;
pub mod config;
pub mod echo;
mod envelope;
pub mod error;
pub mod frame;
mod runtime;
pub mod tls;
pub mod verify;
mod wire;

pub use addr::{ActorName, Name, ServiceId, ServiceName};
pub use auth::{AccessPolicy, AuthzAttrs, RuntimeRecord};
pub use config::{Limits, RuntimeConfig};
pub use envelope::{Envelope, Mailbox, Message, Peer, Reply};
pub use error::{BttpError, Refusal};
pub use runtime::{Credentials, DYNAMIC_PORTS_START, Runtime, StoreSigner};
