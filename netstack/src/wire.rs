//! Reading frames from QUIC streams, and what QUIC's errors mean to a caller.

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, ReadExactError, ReadToEndError, RecvStream, WriteError};
use std::fmt;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{BttpError, Refusal};
use crate::frame::{self, ErrorCode, Frame, FrameError, PREFIX_LEN, Prefix};

/// QUIC's error codes for TLS alerts: `0x100 + alert` (RFC 9001 §4.8).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The stream ended before any byte of a frame.
    Empty,
    /// The stream ended in the middle of a frame.
    Truncated(usize),
    /// The peer reset the stream.
    Reset,
    /// The connection closed.
    Connection(ConnectionError),
    /// The bytes are not a frame within our limits.
    Frame(FrameError),
    /// More bytes followed the frame.
    Trailing,
}

impl ReadFailure {
    /// What the reader of a reply tells its caller.
    pub fn into_reply_error(self, peer: &impl fmt::Display) -> BttpError {
        match self {
            ReadFailure::Empty => BttpError::NoReply,
            ReadFailure::Truncated(got) => BttpError::Protocol {
                peer: peer.to_string(),
                reason: format!("the reply ended after {got} bytes"),
            },
            ReadFailure::Reset => BttpError::NoReply,
            ReadFailure::Connection(error) => connection_error(peer, &error),
            ReadFailure::Frame(error) => BttpError::Frame(error),
            ReadFailure::Trailing => BttpError::Protocol {
                peer: peer.to_string(),
                reason: "bytes followed the reply".into(),
            },
        }
    }
}

fn read_failure(error: ReadExactError, read_before: usize) -> ReadFailure {
    match error {
        ReadExactError::FinishedEarly(0) if read_before == 0 => ReadFailure::Empty,
        ReadExactError::FinishedEarly(got) => ReadFailure::Truncated(read_before + got),
        ReadExactError::ReadError(ReadError::ConnectionLost(error)) => {
            ReadFailure::Connection(error)
        }
        ReadExactError::ReadError(_) => ReadFailure::Reset,
    }
}

/// Bytes of buffer a received message holds, from its peer's budget and the
/// runtime's; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    _peer: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// The budgets a message's bytes are taken from before they are read.
pub(crate) struct Budgets<'a> {
    pub peer: &'a Arc<Semaphore>,
    pub total: &'a Arc<Semaphore>,
}

impl Budgets<'_> {
    async fn take(&self, bytes: u32) -> Option<Held> {
        let peer = self.peer.clone().acquire_many_owned(bytes).await.ok()?;
        let total = self.total.clone().acquire_many_owned(bytes).await.ok()?;
        Some(Held {
            _peer: peer,
            _total: total,
        })
    }
}

/// Reads the one frame of a stream direction. With `budgets`, the body's bytes
/// are taken from them before they are read, and held by the returned [`Held`].
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    max_payload: usize,
    budgets: Option<Budgets<'_>>,
) -> Result<(Frame, Option<Held>), ReadFailure> {
    let mut prefix = [0u8; PREFIX_LEN];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|error| read_failure(error, 0))?;
    let prefix = Prefix::parse(prefix, max_payload).map_err(ReadFailure::Frame)?;
    let body_len = prefix.body_len();
    let held = match budgets {
        None => None,
        Some(budgets) => {
            // Limits::check keeps a whole frame within both budgets, so this
            // conversion holds and the acquisition can complete.
            let bytes = u32::try_from(body_len).map_err(|_| {
                ReadFailure::Frame(FrameError::PayloadTooLarge {
                    len: prefix.payload_len,
                    max: max_payload,
                })
            })?;
            Some(budgets.take(bytes).await.ok_or(ReadFailure::Reset)?)
        }
    };
    let mut body = vec![0u8; body_len];
    recv.read_exact(&mut body)
        .await
        .map_err(|error| read_failure(error, PREFIX_LEN))?;
    let frame = frame::decode_body(prefix, Bytes::from(body)).map_err(ReadFailure::Frame)?;
    // A frame is the whole of its stream direction. Reading up to the end also
    // spares the stream the STOP_SENDING that quinn sends for one dropped
    // unfinished, which would cost the sender a frame and a reset per message.
    match recv.read_to_end(0).await {
        Ok(_) => Ok((frame, held)),
        Err(ReadToEndError::TooLong) => Err(ReadFailure::Trailing),
        Err(ReadToEndError::Read(error)) => Err(read_failure(
            ReadExactError::ReadError(error),
            PREFIX_LEN + body_len,
        )),
    }
}

/// The TLS alert a connection was closed with, if it was refused by TLS.
pub(crate) fn alert_of(error: &ConnectionError) -> Option<u8> {
    let code = match error {
        ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        ConnectionError::TransportError(error) => u64::from(error.code),
        _ => return None,
    };
    code.checked_sub(CRYPTO_ERROR_BASE)
        .and_then(|alert| u8::try_from(alert).ok())
}

/// What a closed connection means to a message that was using it.
pub(crate) fn connection_error(peer: &impl fmt::Display, error: &ConnectionError) -> BttpError {
    if let Some(alert) = alert_of(error) {
        return BttpError::Refused {
            peer: peer.to_string(),
            refusal: Refusal::from_alert(alert),
        };
    }
    let reason = match error {
        ConnectionError::TimedOut => {
            "no answer within the idle timeout (the peer is gone or unreachable)".to_string()
        }
        ConnectionError::ApplicationClosed(close) => format!(
            "closed by the peer: {}",
            String::from_utf8_lossy(&close.reason)
        ),
        other => other.to_string(),
    };
    BttpError::ConnectionLost {
        peer: peer.to_string(),
        reason,
    }
}

/// What a failed write means to its sender.
pub(crate) fn write_error(peer: &impl fmt::Display, error: WriteError) -> BttpError {
    match error {
        WriteError::ConnectionLost(error) => connection_error(peer, &error),
        other => BttpError::ConnectionLost {
            peer: peer.to_string(),
            reason: format!("the stream failed: {other}"),
        },
    }
}

/// The QUIC application error code a refused stream is stopped with.
pub(crate) fn stop_code(code: ErrorCode) -> quinn::VarInt {
    let number: u32 = match code {
        ErrorCode::NotAuthorized => 1,
        ErrorCode::NoSuchActor => 2,
        ErrorCode::NoSuchService => 3,
        ErrorCode::WrongRuntime => 4,
        ErrorCode::TooLarge => 5,
        ErrorCode::Malformed => 6,
        ErrorCode::RequestTimeout => 7,
        ErrorCode::ShuttingDown => 8,
    };
    quinn::VarInt::from_u32(number)
}
