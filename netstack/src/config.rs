//! Runtime configuration and the limits that protect a runtime from its peers.

use blocktree_core::PrincipalId;
use blocktree_core::writecap::RevocationList;
use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::auth::AccessPolicy;
use crate::error::BttpError;
use crate::frame::{MAX_HEADER_LEN, PREFIX_LEN};

/// What peers may make this runtime spend. A peer over a limit gets an error
/// (or, for QUIC's own limits, a connection error from the QUIC stack), never
/// more memory: what peers' messages can occupy is at most
/// `max_connections × receive_window` not yet read from QUIC plus
/// `max_buffered_bytes` read and not yet taken by actors (about 3 GiB with the
/// defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest message payload sent or accepted, in bytes.
    pub max_message_size: usize,
    /// Concurrent streams (messages in flight) a peer may open, each direction
    /// and kind; a QUIC transport parameter, so a conforming peer waits for
    /// credit and a non-conforming one loses its connection.
    pub max_streams_per_peer: u32,
    /// A connection with no traffic for this long is closed; keep-alives are sent
    /// at a third of it, so only a dead or silent peer hits it.
    pub idle_timeout: Duration,
    /// Bytes a peer may have in flight on one connection that this runtime has
    /// not read yet (QUIC's connection flow-control window).
    pub receive_window: usize,
    /// Bytes of one peer's messages this runtime holds once read and before
    /// their actors take them. Must fit one message of `max_message_size` with
    /// its header.
    pub max_buffered_bytes_per_peer: usize,
    /// The same, for all peers together.
    pub max_buffered_bytes: usize,
    /// Connections a runtime serves at once; more are refused.
    pub max_connections: usize,
    /// Time a peer has to deliver a whole message once it opened its stream.
    pub request_timeout: Duration,
    /// Time a connection attempt may take.
    pub handshake_timeout: Duration,
    /// Time a `send` may take to reach a connection and queue its message.
    pub send_timeout: Duration,
    /// Messages an actor's mailbox holds before senders wait.
    pub mailbox_capacity: usize,
    /// Wait after the first failed connection attempt to a peer; doubled after
    /// each further failure.
    pub backoff_initial: Duration,
    /// The longest wait between connection attempts.
    pub backoff_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 8 << 20,
            max_streams_per_peer: 256,
            idle_timeout: Duration::from_secs(30),
            receive_window: 4 << 20,
            max_buffered_bytes_per_peer: 32 << 20,
            max_buffered_bytes: 1 << 30,
            max_connections: 512,
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            mailbox_capacity: 1024,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Checks that the limits can work together.
    pub fn check(&self) -> Result<(), BttpError> {
        let fail = |reason: String| Err(BttpError::Config(reason));
        if self.max_message_size > u32::MAX as usize {
            return fail(format!(
                "max_message_size {} exceeds the frame's 4 GiB limit",
                self.max_message_size
            ));
        }
        let largest_frame = self.max_message_size + MAX_HEADER_LEN + PREFIX_LEN;
        if self.max_buffered_bytes_per_peer < largest_frame {
            return fail(format!(
                "max_buffered_bytes_per_peer {} cannot hold one message of max_message_size {} with its header ({largest_frame} bytes)",
                self.max_buffered_bytes_per_peer, self.max_message_size
            ));
        }
        if self.max_buffered_bytes < self.max_buffered_bytes_per_peer {
            return fail(format!(
                "max_buffered_bytes {} is less than max_buffered_bytes_per_peer {}",
                self.max_buffered_bytes, self.max_buffered_bytes_per_peer
            ));
        }
        if self.max_buffered_bytes > Semaphore::MAX_PERMITS {
            return fail("max_buffered_bytes is too large".into());
        }
        if self.max_streams_per_peer == 0 || self.mailbox_capacity == 0 || self.receive_window == 0
        {
            return fail(
                "max_streams_per_peer, mailbox_capacity and receive_window must be positive".into(),
            );
        }
        for (name, value) in [
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if value.is_zero() {
                return fail(format!("{name} must be positive"));
            }
        }
        Ok(())
    }

    /// The wait before connection attempt `failures + 1` to a peer.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
    }
}

/// How a runtime listens and whom it trusts.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where to listen. Port 0 picks a free port uniformly from the dynamic range
    /// 49152–65535 (design §2.1); `[::]` accepts IPv4 and IPv6.
    pub bind: SocketAddr,
    /// Domains whose runtimes may connect as clients; the runtime's own domain is
    /// always trusted.
    pub trusted_roots: BTreeSet<PrincipalId>,
    /// The runtime's file and the principals' attributes: who may message it.
    pub access: AccessPolicy,
    /// Principals whose writecaps are no longer honoured.
    pub revoked: RevocationList,
    /// What peers may make the runtime spend.
    pub limits: Limits,
}

impl RuntimeConfig {
    /// Listens on `bind` with `access`, trusting only its own domain.
    pub fn new(bind: SocketAddr, access: AccessPolicy) -> RuntimeConfig {
        RuntimeConfig {
            bind,
            trusted_roots: BTreeSet::new(),
            access,
            revoked: RevocationList::new(),
            limits: Limits::default(),
        }
    }

    /// A configuration for an anonymous client: any local address and port,
    /// IPv4 and IPv6.
    pub fn anonymous() -> RuntimeConfig {
        RuntimeConfig::new(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            AccessPolicy::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_hold_together() {
        Limits::default().check().unwrap();
    }

    #[test]
    fn a_budget_smaller_than_one_message_is_refused() {
        let limits = Limits {
            max_message_size: 1 << 20,
            max_buffered_bytes_per_peer: 1 << 20,
            ..Limits::default()
        };
        assert!(limits.check().is_err());
    }

    #[test]
    fn a_total_budget_smaller_than_a_peers_is_refused() {
        let limits = Limits {
            max_buffered_bytes: 16 << 20,
            ..Limits::default()
        };
        assert!(limits.max_buffered_bytes_per_peer > limits.max_buffered_bytes);
        assert!(limits.check().is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let limits = Limits {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..Limits::default()
        };
        let waits: Vec<_> = (1..=6).map(|n| limits.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(limits.backoff(u32::MAX), Duration::from_secs(1));
    }
}
