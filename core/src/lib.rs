//! Blocktree's identity and cryptography, with no network or sector I/O.
//!
//! Everything that decides *who may do what* and *whether bytes are authentic* lives
//! here, so the layers above (engine, raftlog, netstack, fs) share one audited
//! implementation:
//!
//! - [`path`]: self-certifying absolute paths, `/<root principal>/a/b`.
//! - [`principal`] and [`keys`]: ECDSA P-256 signing keys, P-256 encryption keys and
//!   principal ids (base64url of the SHA-256 of the key's SubjectPublicKeyInfo).
//! - [`hpke`]: RFC 9180 base-mode HPKE, DHKEM(P-256, HKDF-SHA256), used to wrap keys.
//! - [`writecap`]: certificate chains that delegate write authority over a path.
//! - [`readcap`]: file keys wrapped for principals and for parent directories.
//! - [`metadata`]: the signed metadata sector of a file.
//! - [`merkle`]: the Merkle tree over a file's data sectors.
//! - [`sector`]: sector identities and AES-256-GCM sector sealing.
//! - [`credstore`]: the [`credstore::CredStore`] trait and the file-backed store. The
//!   file store is the one module that touches the local file system: a credential
//!   store exists to keep keys somewhere.
//! - [`provision`]: writecap requests and their approval.
//! - [`encoding`]: the one versioned binary format used on disk and on the wire.
//!
//! Symmetric primitives (AES-GCM, SHA-2, HMAC) come from `aws-lc-rs`, whose assembly
//! uses AES-NI/VAES and SHA-NI; `benches/` checks that against `openssl speed`.

pub mod aead;
pub mod credstore;
pub mod encoding;
pub mod hash;
pub mod hpke;
pub mod keys;
pub mod merkle;
pub mod metadata;
pub mod path;
pub mod principal;
pub mod provision;
pub mod readcap;
pub mod sector;
pub mod time;
pub mod writecap;

pub use path::BtPath;
pub use principal::PrincipalId;
