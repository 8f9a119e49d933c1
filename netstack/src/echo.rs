//! A diagnostic echo service: answers calls with their payload, optionally
//! after a delay, and counts what it receives. Operators use it to check that
//! two runtimes can reach and authenticate each other; the benchmarks and the
//! process tests use it as the far end.

use blocktree_core::BtPath;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::BttpError;
use crate::runtime::Runtime;

/// The longest delay a [`EchoRequest::Delayed`] may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// What the echo service is asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EchoRequest {
    /// Reply with these bytes (as a call), or just count them (as a send).
    Echo(ByteBuf),
    /// Reply with `payload` after `millis` milliseconds (at most [`MAX_DELAY`]).
    Delayed {
        /// The delay.
        millis: u64,
        /// What to reply with.
        payload: ByteBuf,
    },
    /// Reply with the counters.
    Stats,
}

/// What the echo service answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EchoReply {
    /// The bytes of an echo or delayed request.
    Echo(ByteBuf),
    /// The counters.
    Stats(EchoStats),
}

/// The echo service's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoStats {
    /// Calls received.
    pub calls: u64,
    /// Sends (messages without a reply) received.
    pub sends: u64,
    /// Payload bytes received in calls and sends.
    pub bytes: u64,
    /// The most delayed calls that were waiting at once.
    pub max_in_flight: u64,
}

/// Live counters of a registered echo service.
#[derive(Debug, Default)]
pub struct EchoCounters {
    calls: AtomicU64,
    sends: AtomicU64,
    bytes: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl EchoCounters {
    /// The counters now.
    pub fn snapshot(&self) -> EchoStats {
        EchoStats {
            calls: self.calls.load(Ordering::Relaxed),
            sends: self.sends.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
    }

    fn received(&self, call: bool, bytes: usize) {
        let counter = if call { &self.calls } else { &self.sends };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

fn payload_len(request: &EchoRequest) -> usize {
    match request {
        EchoRequest::Echo(payload) | EchoRequest::Delayed { payload, .. } => payload.len(),
        EchoRequest::Stats => 0,
    }
}

/// Registers the echo service at `service` in `runtime`, whose file must list
/// it, and returns its counters.
pub fn register_echo(runtime: &Runtime, service: BtPath) -> Result<Arc<EchoCounters>, BttpError> {
    let counters = Arc::new(EchoCounters::default());
    let shared = counters.clone();
    runtime.register_service(service, move |_id, mut mailbox| {
        let counters = shared.clone();
        tokio::spawn(async move {
            while let Some(envelope) = mailbox.recv().await {
                // A message of another type was already refused to its caller.
                let Ok((request, reply)) = envelope.open::<EchoRequest>() else {
                    continue;
                };
                counters.received(reply.is_some(), payload_len(&request));
                let Some(reply) = reply else {
                    continue;
                };
                match request {
                    EchoRequest::Echo(payload) => {
                        let _ = reply.send(EchoReply::Echo(payload)).await;
                    }
                    EchoRequest::Stats => {
                        let _ = reply.send(EchoReply::Stats(counters.snapshot())).await;
                    }
                    EchoRequest::Delayed { millis, payload } => {
                        let waiting = counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                        counters.max_in_flight.fetch_max(waiting, Ordering::Relaxed);
                        let counters = counters.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(millis).min(MAX_DELAY)).await;
                            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                            let _ = reply.send(EchoReply::Echo(payload)).await;
                        });
                    }
                }
            }
        });
    })?;
    Ok(counters)
}
