//! The Raft service's binary format for disk and wire (DESIGN decision 6):
//! `[RAFT_FORMAT_VERSION][kind][postcard body]`, like core's encoding, with
//! kinds of its own (core's kind list belongs to core). Decoders return errors
//! and never panic; postcard checks every length against the bytes left, so a
//! decoder allocates at most a small multiple of its input.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// The format version written first in every encoded object.
pub const RAFT_FORMAT_VERSION: u8 = 1;

/// Which type an encoded object holds; the second byte of every encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftKind {
    /// A log entry ([`crate::types::Entry`]), as stored by the log store.
    LogEntry = 1,
    /// The vote ([`openraft::Vote`]).
    Vote = 2,
    /// A log id (committed or purged).
    LogId = 3,
    /// The state machine's applied state ([`crate::statemachine::AppliedState`]).
    AppliedState = 4,
    /// A sector batch a follower forwards to the leader ([`crate::forward`]).
    SectorBatch = 5,
}

/// Why bytes did not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// Fewer than the two header bytes.
    #[error("the encoding is truncated")]
    Truncated,
    /// A version this build does not read.
    #[error("unsupported raft format version {0} (this build reads {RAFT_FORMAT_VERSION})")]
    Version(u8),
    /// Another kind of object than the one expected.
    #[error("expected a {expected:?}, found kind {found}")]
    WrongKind {
        /// What the caller expected.
        expected: RaftKind,
        /// The kind byte found.
        found: u8,
    },
    /// The body does not decode.
    #[error("malformed {kind:?}: {reason}")]
    Malformed {
        /// What was being decoded.
        kind: RaftKind,
        /// Postcard's complaint.
        reason: String,
    },
}

/// Encodes `value` as an object of `kind`.
pub fn encode<T: Serialize>(kind: RaftKind, value: &T) -> Vec<u8> {
    encode_after(Vec::new(), kind, value)
}

/// [`encode`], appended to `prefix` (so a caller that frames the encoding
/// does not copy it).
pub fn encode_after<T: Serialize>(mut prefix: Vec<u8>, kind: RaftKind, value: &T) -> Vec<u8> {
    let start = prefix.len();
    prefix.extend_from_slice(&[RAFT_FORMAT_VERSION, kind as u8]);
    // Serializing plain data into a Vec cannot fail (no I/O, no size limit);
    // should it ever, the empty body fails to decode instead of panicking here.
    postcard::to_extend(value, prefix).unwrap_or_else(|_| {
        let mut out = vec![0; start];
        out.extend_from_slice(&[RAFT_FORMAT_VERSION, kind as u8]);
        out
    })
}

/// Decodes an object of `kind`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(kind: RaftKind, bytes: &[u8]) -> Result<T, CodecError> {
    let [version, found, body @ ..] = bytes else {
        return Err(CodecError::Truncated);
    };
    if *version != RAFT_FORMAT_VERSION {
        return Err(CodecError::Version(*version));
    }
    if *found != kind as u8 {
        return Err(CodecError::WrongKind {
            expected: kind,
            found: *found,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|error| CodecError::Malformed {
            kind,
            reason: error.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed {
            kind,
            reason: format!("{} bytes follow the object", rest.len()),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_kinds_and_versions() {
        let bytes = encode(RaftKind::LogId, &(3u64, 4u64));
        assert_eq!(decode::<(u64, u64)>(RaftKind::LogId, &bytes), Ok((3, 4)));
        assert!(matches!(
            decode::<(u64, u64)>(RaftKind::Vote, &bytes),
            Err(CodecError::WrongKind { .. })
        ));
        let mut old = bytes.clone();
        old[0] = 9;
        assert_eq!(
            decode::<(u64, u64)>(RaftKind::LogId, &old),
            Err(CodecError::Version(9))
        );
        let mut long = bytes;
        long.push(0);
        assert!(decode::<(u64, u64)>(RaftKind::LogId, &long).is_err());
        assert_eq!(
            decode::<u64>(RaftKind::LogId, &[1]),
            Err(CodecError::Truncated)
        );
    }
}
