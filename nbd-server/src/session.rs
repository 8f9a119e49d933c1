//! The transmission phase without I/O: what was negotiated for a connection
//! ([`Session`]), and the check of each request against it ([`Session::check`]),
//! which turns a [`RequestHeader`] into an [`Op`] or the error reply the protocol
//! asks for.

use crate::proto::{
    BlockSizes, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, NbdError, RequestHeader, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY,
    TF_SEND_CACHE, TF_SEND_DF, TF_SEND_FAST_ZERO, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
};

/// Every command flag this server knows.
const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// What a connection negotiated before entering transmission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The export's size in bytes.
    pub size: u64,
    /// The transmission flags sent to the client.
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The id of the `base:allocation` context, if the client selected it for
    /// this export.
    pub allocation: Option<u32>,
    /// The block size constraints announced (and enforced whether or not the
    /// client asked for them).
    pub sizes: BlockSizes,
}

/// The transmission flags of an export: everything this server supports, less
/// the writes of a read-only export; `DF` only with structured replies.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TF_SEND_DF;
    }
    flags
}

/// A request that passed the checks: what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read {
        /// Start.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write the payload at `offset`; durable before the reply if `fua`.
    Write {
        /// Start.
        offset: u64,
        /// Bytes (the payload's length).
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Make every write already replied to durable.
    Flush,
    /// Discard a range (it reads as zeros afterwards).
    Trim {
        /// Start.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Warm the server's cache for a range.
    Cache {
        /// Start.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Start.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Force unit access.
        fua: bool,
        /// The range must stay allocated (`NO_HOLE`): write zeros, do not punch.
        no_hole: bool,
        /// Fail with `ENOTSUP` unless it is faster than a write (`FAST_ZERO`).
        fast: bool,
    },
    /// Report the allocation of a range in context `context`.
    BlockStatus {
        /// Start.
        offset: u64,
        /// Bytes asked about.
        len: u32,
        /// One extent only, no longer than `len` (`REQ_ONE`).
        req_one: bool,
        /// The `base:allocation` context id.
        context: u32,
    },
    /// End the connection once every request in flight has been answered.
    Disconnect,
}

/// A request refused with an error reply; the connection goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error to reply with.
    pub error: NbdError,
    /// Why, for the client's user (in a structured error chunk) and the log.
    pub message: &'static str,
}

fn refuse(error: NbdError, message: &'static str) -> Refusal {
    Refusal { error, message }
}

impl Session {
    /// Checks a request against what was negotiated: the command and its flags,
    /// read-only, the range against the export's size, the alignment to the
    /// minimum block size, the payload against the maximum. Never panics.
    pub fn check(&self, request: &RequestHeader) -> Result<Op, Refusal> {
        use NbdError::{Inval, NoSpc, Overflow, Perm};
        let flags = request.flags;
        let kind = request.kind;
        let has = |flag: u16| self.flags & flag != 0;
        if kind == CMD_DISC {
            return Ok(Op::Disconnect);
        }
        if !matches!(
            kind,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        ) {
            return Err(refuse(Inval, "unknown command"));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(refuse(Inval, "unknown command flag"));
        }
        if flags & CMD_FLAG_FUA != 0 && !has(TF_SEND_FUA) {
            return Err(refuse(Inval, "FUA was not offered"));
        }
        if flags & CMD_FLAG_NO_HOLE != 0 && kind != CMD_WRITE_ZEROES {
            return Err(refuse(Inval, "NO_HOLE applies to WRITE_ZEROES only"));
        }
        if flags & CMD_FLAG_FAST_ZERO != 0 && (kind != CMD_WRITE_ZEROES || !has(TF_SEND_FAST_ZERO))
        {
            return Err(refuse(Inval, "FAST_ZERO applies to WRITE_ZEROES only"));
        }
        if flags & CMD_FLAG_DF != 0 && (kind != CMD_READ || !has(TF_SEND_DF)) {
            return Err(refuse(
                Inval,
                "DF applies to READ with structured replies only",
            ));
        }
        if flags & CMD_FLAG_REQ_ONE != 0 && kind != CMD_BLOCK_STATUS {
            return Err(refuse(Inval, "REQ_ONE applies to BLOCK_STATUS only"));
        }
        let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && has(TF_READ_ONLY) {
            return Err(refuse(Perm, "the export is read-only"));
        }
        let offered = match kind {
            CMD_FLUSH => has(TF_SEND_FLUSH),
            CMD_TRIM => has(TF_SEND_TRIM),
            CMD_WRITE_ZEROES => has(TF_SEND_WRITE_ZEROES),
            CMD_CACHE => has(TF_SEND_CACHE),
            _ => true,
        };
        if !offered {
            return Err(refuse(Inval, "command not offered for this export"));
        }
        let offset = request.offset;
        let len = request.length;
        if kind == CMD_FLUSH {
            if offset != 0 || len != 0 {
                return Err(refuse(Inval, "FLUSH needs offset and length 0"));
            }
            return Ok(Op::Flush);
        }
        let context = if kind == CMD_BLOCK_STATUS {
            match self.allocation {
                Some(context) if self.structured => Some(context),
                _ => {
                    return Err(refuse(
                        Inval,
                        "BLOCK_STATUS needs structured replies and base:allocation",
                    ));
                }
            }
        } else {
            None
        };
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.size);
        if !in_range {
            let error = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                NoSpc
            } else {
                Inval
            };
            return Err(refuse(error, "the range runs past the end of the export"));
        }
        let minimum = u64::from(self.sizes.minimum.max(1));
        if !offset.is_multiple_of(minimum) || !u64::from(len).is_multiple_of(minimum) {
            return Err(refuse(
                Inval,
                "offset and length must be multiples of the minimum block size",
            ));
        }
        let fua = flags & CMD_FLAG_FUA != 0;
        Ok(match kind {
            CMD_READ => {
                if len > self.sizes.maximum {
                    let error = if flags & CMD_FLAG_DF != 0 {
                        Overflow
                    } else {
                        Inval
                    };
                    return Err(refuse(error, "read longer than the maximum payload"));
                }
                Op::Read { offset, len }
            }
            CMD_WRITE => Op::Write { offset, len, fua },
            CMD_TRIM => Op::Trim { offset, len, fua },
            CMD_CACHE => Op::Cache { offset, len },
            CMD_WRITE_ZEROES => Op::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                fast: flags & CMD_FLAG_FAST_ZERO != 0,
            },
            _ => {
                if len == 0 {
                    return Err(refuse(Inval, "BLOCK_STATUS of an empty range"));
                }
                Op::BlockStatus {
                    offset,
                    len,
                    req_one: flags & CMD_FLAG_REQ_ONE != 0,
                    context: context.unwrap_or(0),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::MAX_PAYLOAD;

    fn session(read_only: bool, structured: bool) -> Session {
        Session {
            size: 1 << 20,
            flags: transmission_flags(read_only, structured),
            structured,
            allocation: structured.then_some(1),
            sizes: BlockSizes::for_block_size(4096).unwrap(),
        }
    }

    fn request(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    fn error(session: &Session, request: RequestHeader) -> NbdError {
        session.check(&request).unwrap_err().error
    }

    #[test]
    fn good_requests_become_ops() {
        let s = session(false, true);
        assert_eq!(
            s.check(&request(CMD_READ, CMD_FLAG_DF, 512, 4096)),
            Ok(Op::Read {
                offset: 512,
                len: 4096
            })
        );
        assert_eq!(
            s.check(&request(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 512, 512)),
            Ok(Op::Write {
                offset: (1 << 20) - 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(s.check(&request(CMD_FLUSH, 0, 0, 0)), Ok(Op::Flush));
        assert_eq!(
            s.check(&request(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                1 << 20
            )),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(
            s.check(&request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096)),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 4096,
                req_one: true,
                context: 1
            })
        );
        assert_eq!(s.check(&request(CMD_DISC, 0, 5, 5)), Ok(Op::Disconnect));
        assert_eq!(
            s.check(&request(CMD_READ, 0, 0, 0)),
            Ok(Op::Read { offset: 0, len: 0 })
        );
    }

    #[test]
    fn bad_requests_get_the_protocols_errors() {
        let s = session(false, true);
        use NbdError::*;
        assert_eq!(error(&s, request(9, 0, 0, 0)), Inval);
        assert_eq!(error(&s, request(CMD_READ, 1 << 7, 0, 512)), Inval);
        assert_eq!(error(&s, request(CMD_READ, 0, 1 << 20, 512)), Inval);
        assert_eq!(error(&s, request(CMD_READ, 0, u64::MAX, 512)), Inval);
        assert_eq!(error(&s, request(CMD_WRITE, 0, 1 << 20, 512)), NoSpc);
        assert_eq!(error(&s, request(CMD_WRITE_ZEROES, 0, 1 << 20, 512)), NoSpc);
        assert_eq!(
            error(&s, request(CMD_TRIM, 0, (1 << 20) - 512, 1024)),
            Inval
        );
        assert_eq!(error(&s, request(CMD_READ, 0, 100, 512)), Inval);
        assert_eq!(error(&s, request(CMD_WRITE, 0, 0, 100)), Inval);
        assert_eq!(error(&s, request(CMD_FLUSH, 0, 0, 512)), Inval);
        assert_eq!(
            error(&s, request(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512)),
            Inval
        );
        assert_eq!(error(&s, request(CMD_WRITE, CMD_FLAG_DF, 0, 512)), Inval);
        assert_eq!(
            error(&s, request(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512)),
            Inval
        );
        assert_eq!(
            error(&s, request(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 512)),
            Inval
        );
        assert_eq!(error(&s, request(CMD_BLOCK_STATUS, 0, 0, 0)), Inval);
        let big = Session {
            size: u64::MAX,
            ..s.clone()
        };
        assert_eq!(
            error(&big, request(CMD_READ, 0, 0, MAX_PAYLOAD + 512)),
            Inval
        );
        assert_eq!(
            error(&big, request(CMD_READ, CMD_FLAG_DF, 0, MAX_PAYLOAD + 512)),
            Overflow
        );
        // Without structured replies: no DF, no BLOCK_STATUS.
        let simple = session(false, false);
        assert_eq!(
            error(&simple, request(CMD_READ, CMD_FLAG_DF, 0, 512)),
            Inval
        );
        assert_eq!(error(&simple, request(CMD_BLOCK_STATUS, 0, 0, 512)), Inval);
        // Read-only: writes are EPERM, and FUA was not offered.
        let ro = session(true, true);
        assert_eq!(error(&ro, request(CMD_WRITE, 0, 0, 512)), Perm);
        assert_eq!(error(&ro, request(CMD_TRIM, 0, 0, 512)), Perm);
        assert_eq!(error(&ro, request(CMD_READ, CMD_FLAG_FUA, 0, 512)), Inval);
        assert!(ro.check(&request(CMD_READ, 0, 0, 512)).is_ok());
    }
}
