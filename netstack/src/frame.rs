//! The bttp frame: pure encoding and decoding, no I/O (DESIGN decision 6).
//!
//! Every message travels on its own QUIC stream as one frame; a call's reply (or
//! the receiver's error) comes back as one frame on the same stream. A frame is
//!
//! ```text
//! [version u8][kind u8][header_len u16 LE][payload_len u32 LE][header][payload]
//! ```
//!
//! The fixed 8-byte prefix lets a reader check the version, the kind and both
//! lengths against its limits before it buffers a single byte of the body, so a
//! peer cannot make it allocate more than it agreed to. The header is postcard:
//! [`RequestHeader`] for [`FrameKind::Send`] and [`FrameKind::Call`], a
//! [`RemoteError`] for [`FrameKind::Error`], nothing for [`FrameKind::Reply`]. The
//! payload is the postcard encoding of the message and is opaque here.
//!
//! Decoders return a [`FrameError`] for every malformed input and never panic;
//! the `bttp_frame` fuzz target holds them to that.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;
use uuid::Uuid;

use crate::addr::Name;

/// The frame format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Length of the fixed prefix.
pub const PREFIX_LEN: usize = 8;
/// The largest header accepted: a service name holds two paths of at most 4 KiB.
pub const MAX_HEADER_LEN: usize = 16 * 1024;
/// The longest error detail sent or accepted, in bytes.
pub const MAX_ERROR_DETAIL: usize = 1024;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A message that wants no reply (on a unidirectional stream).
    Send = 1,
    /// A message that wants exactly one reply (on a bidirectional stream).
    Call = 2,
    /// The reply to a call, on the call's stream.
    Reply = 3,
    /// The receiver's refusal of a message, on the message's stream.
    Error = 4,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        [
            FrameKind::Send,
            FrameKind::Call,
            FrameKind::Reply,
            FrameKind::Error,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == byte)
    }
}

/// Why bytes are not a frame, or a value cannot be framed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the prefix, or than the lengths in it promise.
    #[error("truncated frame: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes there are.
        got: usize,
    },
    /// Bytes after the end the lengths give.
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    /// A version this build does not speak.
    #[error("unsupported frame version {0} (this build speaks version {VERSION})")]
    UnsupportedVersion(u8),
    /// A kind byte that names no kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A header longer than [`MAX_HEADER_LEN`].
    #[error("frame header of {len} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge {
        /// The declared length.
        len: usize,
    },
    /// A payload longer than the reader's (or writer's) limit.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge {
        /// The declared or encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame of a kind that carries no header, with one; or without a
    /// required one.
    #[error("a {kind:?} frame cannot have a {header_len}-byte header")]
    BadHeaderLength {
        /// The frame's kind.
        kind: FrameKind,
        /// The declared header length.
        header_len: usize,
    },
    /// An error frame with a payload.
    #[error("an error frame carries no payload, but declares {0} bytes")]
    ErrorWithPayload(usize),
    /// A header that does not decode.
    #[error("malformed {kind:?} frame header: {reason}")]
    MalformedHeader {
        /// The frame's kind.
        kind: FrameKind,
        /// What the decoder said.
        reason: String,
    },
    /// A value that could not be serialized.
    #[error("message does not serialize: {0}")]
    Serialize(String),
}

/// The fixed prefix of a frame, checked against the reader's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Bytes of header after the prefix.
    pub header_len: usize,
    /// Bytes of payload after the header.
    pub payload_len: usize,
}

impl Prefix {
    /// Parses and checks a prefix: known version and kind, a header length that
    /// fits the kind and [`MAX_HEADER_LEN`], a payload within `max_payload`.
    pub fn parse(bytes: [u8; PREFIX_LEN], max_payload: usize) -> Result<Prefix, FrameError> {
        let [version, kind, h0, h1, p0, p1, p2, p3] = bytes;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = FrameKind::from_byte(kind).ok_or(FrameError::UnknownKind(kind))?;
        let header_len = usize::from(u16::from_le_bytes([h0, h1]));
        let payload_len = u32::from_le_bytes([p0, p1, p2, p3]) as usize;
        if header_len > MAX_HEADER_LEN {
            return Err(FrameError::HeaderTooLarge { len: header_len });
        }
        let header_fits = match kind {
            FrameKind::Reply => header_len == 0,
            FrameKind::Send | FrameKind::Call | FrameKind::Error => header_len > 0,
        };
        if !header_fits {
            return Err(FrameError::BadHeaderLength { kind, header_len });
        }
        if kind == FrameKind::Error && payload_len != 0 {
            return Err(FrameError::ErrorWithPayload(payload_len));
        }
        if payload_len > max_payload {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len,
                max: max_payload,
            });
        }
        Ok(Prefix {
            kind,
            header_len,
            payload_len,
        })
    }

    /// Bytes after the prefix.
    pub fn body_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Who sent a request and to whom; the sender's runtime is not in it, because
/// the receiver takes it from the authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// The sending actor's id in its runtime, if an actor sent it.
    pub from: Option<Uuid>,
    /// The recipient.
    pub to: Name,
}

/// Why a receiver refused a message; sent back on the message's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The sender lacks execute permission on the receiving runtime.
    NotAuthorized,
    /// No such actor in the receiving runtime.
    NoSuchActor,
    /// The receiving runtime provides no such service, or is outside its scope.
    NoSuchService,
    /// The message is addressed to an actor of another runtime.
    WrongRuntime,
    /// The message exceeds the receiver's size limit.
    TooLarge,
    /// The frame or the message did not decode.
    Malformed,
    /// The receiver did not get the whole message in time.
    RequestTimeout,
    /// The receiving runtime is shutting down.
    ShuttingDown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::NotAuthorized => "not authorized (no execute permission on the runtime)",
            ErrorCode::NoSuchActor => "no such actor",
            ErrorCode::NoSuchService => "no such service",
            ErrorCode::WrongRuntime => "addressed to another runtime",
            ErrorCode::TooLarge => "message too large",
            ErrorCode::Malformed => "malformed message",
            ErrorCode::RequestTimeout => "message not received in time",
            ErrorCode::ShuttingDown => "runtime shutting down",
        })
    }
}

/// A receiver's refusal: a code and a bounded human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What went wrong.
    pub code: ErrorCode,
    /// More about it, at most [`MAX_ERROR_DETAIL`] bytes.
    pub detail: String,
}

impl RemoteError {
    /// An error with `detail` cut to [`MAX_ERROR_DETAIL`] bytes.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> RemoteError {
        let mut detail = detail.into();
        if detail.len() > MAX_ERROR_DETAIL {
            let mut end = MAX_ERROR_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        RemoteError { code, detail }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.detail)
        }
    }
}

/// A decoded frame. Payloads are the still-encoded messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A message without a reply.
    Send {
        /// Sender and recipient.
        header: RequestHeader,
        /// The encoded message.
        payload: Bytes,
    },
    /// A message that wants a reply.
    Call {
        /// Sender and recipient.
        header: RequestHeader,
        /// The encoded message.
        payload: Bytes,
    },
    /// A reply.
    Reply {
        /// The encoded reply.
        payload: Bytes,
    },
    /// A refusal.
    Error(RemoteError),
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Send { .. } => FrameKind::Send,
            Frame::Call { .. } => FrameKind::Call,
            Frame::Reply { .. } => FrameKind::Reply,
            Frame::Error(_) => FrameKind::Error,
        }
    }

    /// Encodes the frame, checking its payload against `max_payload`.
    pub fn encode(&self, max_payload: usize) -> Result<Vec<u8>, FrameError> {
        let mut out = start();
        let payload: &[u8] = match self {
            Frame::Send { header, payload } | Frame::Call { header, payload } => {
                out = extend(out, header)?;
                payload
            }
            Frame::Reply { payload } => payload,
            Frame::Error(error) => {
                out = extend(out, &bounded(error))?;
                &[]
            }
        };
        let header_len = out.len() - PREFIX_LEN;
        out.extend_from_slice(payload);
        finish(out, self.kind(), header_len, max_payload)
    }
}

fn bounded(error: &RemoteError) -> RemoteError {
    RemoteError::new(error.code, error.detail.clone())
}

fn start() -> Vec<u8> {
    vec![0; PREFIX_LEN]
}

fn extend<T: Serialize + ?Sized>(out: Vec<u8>, value: &T) -> Result<Vec<u8>, FrameError> {
    postcard::to_extend(value, out).map_err(|error| FrameError::Serialize(error.to_string()))
}

/// Fills in the prefix of `out`, whose header is `header_len` bytes and whose
/// payload is the rest.
fn finish(
    mut out: Vec<u8>,
    kind: FrameKind,
    header_len: usize,
    max_payload: usize,
) -> Result<Vec<u8>, FrameError> {
    let payload_len = out.len() - PREFIX_LEN - header_len;
    let header_u16 = u16::try_from(header_len)
        .ok()
        .filter(|len| usize::from(*len) <= MAX_HEADER_LEN)
        .ok_or(FrameError::HeaderTooLarge { len: header_len })?;
    let too_large = FrameError::PayloadTooLarge {
        len: payload_len,
        max: max_payload,
    };
    if payload_len > max_payload {
        return Err(too_large);
    }
    let payload_u32 = u32::try_from(payload_len).map_err(|_| too_large)?;
    out[0] = VERSION;
    out[1] = kind as u8;
    out[2..4].copy_from_slice(&header_u16.to_le_bytes());
    out[4..8].copy_from_slice(&payload_u32.to_le_bytes());
    Ok(out)
}

/// The postcard length of `value`, found without writing it.
fn serialized_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, FrameError> {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .map_err(|error| FrameError::Serialize(error.to_string()))
}

/// A buffer with room for exactly the frame, its prefix zeroed; so a message
/// is written once, never moved by the buffer growing, and one over
/// `max_payload` is refused before it is serialized.
fn sized<H: Serialize + ?Sized, T: Serialize + ?Sized>(
    header: Option<&H>,
    message: &T,
    max_payload: usize,
) -> Result<Vec<u8>, FrameError> {
    let payload_len = serialized_len(message)?;
    if payload_len > max_payload {
        return Err(FrameError::PayloadTooLarge {
            len: payload_len,
            max: max_payload,
        });
    }
    let header_len = header.map(serialized_len).transpose()?.unwrap_or(0);
    let mut out = Vec::with_capacity(PREFIX_LEN + header_len + payload_len);
    out.resize(PREFIX_LEN, 0);
    Ok(out)
}

/// Encodes a request frame, serializing `message` straight into the frame.
pub fn encode_request<T: Serialize + ?Sized>(
    kind: FrameKind,
    header: &RequestHeader,
    message: &T,
    max_payload: usize,
) -> Result<Vec<u8>, FrameError> {
    if !matches!(kind, FrameKind::Send | FrameKind::Call) {
        return Err(FrameError::BadHeaderLength {
            kind,
            header_len: 0,
        });
    }
    let out = extend(sized(Some(header), message, max_payload)?, header)?;
    let header_len = out.len() - PREFIX_LEN;
    let out = extend(out, message)?;
    finish(out, kind, header_len, max_payload)
}

/// Encodes a reply frame, serializing `message` straight into the frame.
pub fn encode_reply<T: Serialize + ?Sized>(
    message: &T,
    max_payload: usize,
) -> Result<Vec<u8>, FrameError> {
    let out = extend(sized(None::<&()>, message, max_payload)?, message)?;
    finish(out, FrameKind::Reply, 0, max_payload)
}

/// Encodes an error frame.
pub fn encode_error(error: &RemoteError) -> Vec<u8> {
    match Frame::Error(bounded(error)).encode(0) {
        Ok(bytes) => bytes,
        // A code and at most MAX_ERROR_DETAIL bytes always serialize and fit.
        Err(error) => unreachable!("encoding an error frame failed: {error}"),
    }
}

/// Decodes the body that follows `prefix` (exactly `prefix.body_len()` bytes).
pub fn decode_body(prefix: Prefix, body: Bytes) -> Result<Frame, FrameError> {
    let expected = prefix.body_len();
    if body.len() < expected {
        return Err(FrameError::Truncated {
            needed: PREFIX_LEN + expected,
            got: PREFIX_LEN + body.len(),
        });
    }
    if body.len() > expected {
        return Err(FrameError::TrailingBytes(body.len() - expected));
    }
    let header = &body[..prefix.header_len];
    let payload = body.slice(prefix.header_len..);
    let malformed = |reason: String| FrameError::MalformedHeader {
        kind: prefix.kind,
        reason,
    };
    match prefix.kind {
        FrameKind::Send | FrameKind::Call => {
            let header: RequestHeader = decode_exact(header).map_err(malformed)?;
            Ok(if prefix.kind == FrameKind::Send {
                Frame::Send { header, payload }
            } else {
                Frame::Call { header, payload }
            })
        }
        FrameKind::Reply => Ok(Frame::Reply { payload }),
        FrameKind::Error => {
            let error: RemoteError = decode_exact(header).map_err(malformed)?;
            if error.detail.len() > MAX_ERROR_DETAIL {
                return Err(malformed(format!(
                    "error detail of {} bytes exceeds {MAX_ERROR_DETAIL}",
                    error.detail.len()
                )));
            }
            Ok(Frame::Error(error))
        }
    }
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the header", rest.len()));
    }
    Ok(value)
}

/// Decodes exactly one whole frame from `bytes`.
pub fn decode(bytes: &[u8], max_payload: usize) -> Result<Frame, FrameError> {
    let Some((prefix, body)) = bytes.split_first_chunk::<PREFIX_LEN>() else {
        return Err(FrameError::Truncated {
            needed: PREFIX_LEN,
            got: bytes.len(),
        });
    };
    let prefix = Prefix::parse(*prefix, max_payload)?;
    decode_body(prefix, Bytes::copy_from_slice(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{ActorName, ServiceId, ServiceName};
    use blocktree_core::{BtPath, PrincipalId};

    const MAX: usize = 1 << 20;

    fn runtime() -> BtPath {
        BtPath::root_of(PrincipalId::from_bytes([9; 32]))
            .join("rt")
            .unwrap()
    }

    fn header() -> RequestHeader {
        RequestHeader {
            from: Some(Uuid::from_u128(7)),
            to: Name::Service(ServiceName {
                service: runtime().join("svc").unwrap(),
                scope: runtime(),
                rootward: true,
                id: ServiceId::name("provider").unwrap(),
            }),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let frames = [
            Frame::Send {
                header: header(),
                payload: Bytes::from_static(b"hello"),
            },
            Frame::Call {
                header: RequestHeader {
                    from: None,
                    to: Name::Actor(ActorName::new(runtime(), Uuid::from_u128(1))),
                },
                payload: Bytes::new(),
            },
            Frame::Reply {
                payload: Bytes::from_static(b"reply"),
            },
            Frame::Reply {
                payload: Bytes::new(),
            },
            Frame::Error(RemoteError::new(ErrorCode::NoSuchActor, "gone")),
        ];
        for frame in frames {
            let bytes = frame.encode(MAX).unwrap();
            assert_eq!(decode(&bytes, MAX).unwrap(), frame);
        }
    }

    #[test]
    fn typed_encoders_match_the_generic_one() {
        let message = (1u32, "text".to_string());
        let bytes = encode_request(FrameKind::Call, &header(), &message, MAX).unwrap();
        let Frame::Call {
            header: got,
            payload,
        } = decode(&bytes, MAX).unwrap()
        else {
            panic!("not a call");
        };
        assert_eq!(got, header());
        assert_eq!(
            postcard::from_bytes::<(u32, String)>(&payload).unwrap(),
            message
        );
        let reply = encode_reply(&message, MAX).unwrap();
        assert_eq!(
            decode(&reply, MAX).unwrap(),
            Frame::Reply {
                payload: Bytes::from(postcard::to_allocvec(&message).unwrap())
            }
        );
    }

    #[test]
    fn prefix_is_checked_before_the_body() {
        let bytes = encode_request(FrameKind::Send, &header(), &vec![0u8; 100], MAX).unwrap();
        let prefix: [u8; PREFIX_LEN] = bytes[..PREFIX_LEN].try_into().unwrap();
        assert!(Prefix::parse(prefix, 101).is_ok());
        assert!(matches!(
            Prefix::parse(prefix, 50),
            Err(FrameError::PayloadTooLarge { max: 50, .. })
        ));
        let mut wrong_version = prefix;
        wrong_version[0] = 2;
        assert_eq!(
            Prefix::parse(wrong_version, MAX),
            Err(FrameError::UnsupportedVersion(2))
        );
        let mut wrong_kind = prefix;
        wrong_kind[1] = 9;
        assert_eq!(
            Prefix::parse(wrong_kind, MAX),
            Err(FrameError::UnknownKind(9))
        );
        let mut huge_header = prefix;
        huge_header[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            Prefix::parse(huge_header, MAX),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        let mut headerless_request = prefix;
        headerless_request[2..4].copy_from_slice(&[0, 0]);
        assert!(matches!(
            Prefix::parse(headerless_request, MAX),
            Err(FrameError::BadHeaderLength { .. })
        ));
    }

    #[test]
    fn frames_are_built_in_one_allocation() {
        let message = (vec![5u8; 3000], "text".to_string());
        let bytes = encode_request(FrameKind::Send, &header(), &message, MAX).unwrap();
        assert_eq!(bytes.capacity(), bytes.len());
        let reply = encode_reply(&message, MAX).unwrap();
        assert_eq!(reply.capacity(), reply.len());
    }

    #[test]
    fn writers_refuse_what_readers_would_refuse() {
        assert!(matches!(
            encode_reply(&vec![0u8; 100], 50),
            Err(FrameError::PayloadTooLarge { max: 50, .. })
        ));
        assert!(encode_request(FrameKind::Reply, &header(), &(), MAX).is_err());
        let long = RemoteError::new(ErrorCode::Malformed, "é".repeat(MAX_ERROR_DETAIL));
        assert!(long.detail.len() <= MAX_ERROR_DETAIL);
        assert!(decode(&encode_error(&long), 0).is_ok());
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        let bytes = encode_request(FrameKind::Send, &header(), &[1u8, 2, 3], MAX).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], MAX).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer, MAX), Err(FrameError::TrailingBytes(1)));
        let mut bad_header = bytes;
        bad_header[PREFIX_LEN] = 0xff;
        assert!(matches!(
            decode(&bad_header, MAX),
            Err(FrameError::MalformedHeader { .. })
        ));
    }
}
