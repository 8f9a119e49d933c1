//! The NBD wire format (the NBD project's `doc/proto.md`), with no I/O: the
//! constants, decoders for everything a client sends (client flags, option
//! headers and option data, request headers) and encoders for everything the
//! server sends.
//!
//! Every decoder works on a byte slice or a fixed-size array, checks its limits
//! explicitly and returns an error instead of panicking; `fuzz/fuzz_targets/nbd_*.rs`
//! drives them with arbitrary bytes. Integers are big-endian on the wire.

use thiserror::Error;

// ----- magic numbers -----

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after [`NBDMAGIC`] and by
/// the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: the first field of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ----- handshake flags -----

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ----- transmission flags -----

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL` (never set by this server).
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`.
pub const TF_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// ----- options -----

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ----- option replies -----

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_ERROR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_ERROR | 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERROR | 7;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR | 9;

// ----- information types of NBD_OPT_INFO / NBD_OPT_GO -----

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ----- commands and their flags -----

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ----- structured replies -----

/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` flag `NBD_STATE_HOLE`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag `NBD_STATE_ZERO`.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ----- sizes and limits -----

/// Bytes of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The most option data this server reads; a longer option ends the connection.
/// Enough for a name, every information request and many context queries.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The most metadata context queries in one option (more: `NBD_REP_ERR_TOO_BIG`).
pub const MAX_META_QUERIES: usize = 128;
/// The largest payload the protocol asks every server to accept (2^25 bytes);
/// this server's maximum payload.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// A frame or field that ends the connection: the stream cannot be trusted to
/// be in step any more, or the peer broke a MUST of the handshake.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number is not the one the protocol puts there.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// What the protocol puts there.
        expected: u64,
        /// What came.
        found: u64,
    },
    /// The client set flags the server did not offer.
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    /// Option data longer than [`MAX_OPTION_DATA`].
    #[error("option data of {len} bytes is over the limit of {max}")]
    OptionTooLong {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A write whose payload is longer than the maximum payload: the server will
    /// not read that much, so the stream cannot be followed past it.
    #[error("write payload of {len} bytes is over the maximum payload of {max}")]
    PayloadTooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

// ----- small readers -----

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let field = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(field.try_into().ok()?))
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(field.try_into().ok()?))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(field.try_into().ok()?))
}

// ----- handshake -----

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The client's flags, the 32 bits it sends after the greeting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Decodes the client flags; a flag the server did not offer in
    /// `handshake_flags` (or an unknown one) is an error: the server MUST drop
    /// the connection.
    pub fn decode(bytes: [u8; 4], handshake_flags: u16) -> Result<ClientFlags, ProtoError> {
        let raw = u32::from_be_bytes(bytes);
        let mut allowed = 0;
        if handshake_flags & FLAG_FIXED_NEWSTYLE != 0 {
            allowed |= FLAG_C_FIXED_NEWSTYLE;
        }
        if handshake_flags & FLAG_NO_ZEROES != 0 {
            allowed |= FLAG_C_NO_ZEROES;
        }
        if raw & !allowed != 0 {
            return Err(ProtoError::ClientFlags(raw));
        }
        Ok(ClientFlags {
            fixed_newstyle: raw & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: raw & FLAG_C_NO_ZEROES != 0,
        })
    }
}

/// The header of an option the client sends during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Decodes an option header, refusing a wrong magic and data longer than
    /// `max_data` (which the server would have to read to stay in step).
    pub fn decode(bytes: &[u8; OPTION_HEADER_LEN], max_data: u32) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
        let len = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or([0; 4]));
        if len > max_data {
            return Err(ProtoError::OptionTooLong { len, max: max_data });
        }
        Ok(OptionHeader { option, len })
    }

    /// Encodes the header (what a client sends; for tests and the fuzz seeds).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The name and information requests of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportQuery {
    /// The export's name ("" for the default export).
    pub name: String,
    /// The `NBD_INFO_*` items asked for, duplicates removed.
    pub info: Vec<u16>,
}

/// The export and queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaQuery {
    /// The export the contexts are for.
    pub export: String,
    /// The queries, e.g. `base:allocation` or `base:`.
    pub queries: Vec<String>,
}

/// An option, decoded from its code and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(ExportQuery),
    /// `NBD_OPT_GO`.
    Go(ExportQuery),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaQuery),
    /// Any other option: `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// An option the server understood but whose data is malformed: answered with
/// an error reply (`NBD_REP_ERR_INVALID` or `NBD_REP_ERR_TOO_BIG`), after which
/// the handshake goes on.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct OptionError {
    /// The error reply type.
    pub reply: u32,
    /// A message for the client's user.
    pub message: String,
}

impl OptionError {
    fn invalid(message: impl Into<String>) -> OptionError {
        OptionError {
            reply: REP_ERR_INVALID,
            message: message.into(),
        }
    }
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
fn string(bytes: &[u8], what: &str) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING {
        return Err(OptionError::invalid(format!(
            "{what} is longer than {MAX_STRING} bytes"
        )));
    }
    if bytes.contains(&0) {
        return Err(OptionError::invalid(format!("{what} contains NUL")));
    }
    String::from_utf8(bytes.to_vec())
        .map_err(|_| OptionError::invalid(format!("{what} is not UTF-8")))
}

/// A 32-bit length, then that many bytes of string, from `data` at `*at`.
fn counted_string(data: &[u8], at: &mut usize, what: &str) -> Result<String, OptionError> {
    let len =
        be_u32(data, *at).ok_or_else(|| OptionError::invalid(format!("{what}: length missing")))?;
    let start = at
        .checked_add(4)
        .ok_or_else(|| OptionError::invalid("length overflow"))?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
        .filter(|&end| end <= data.len())
        .ok_or_else(|| OptionError::invalid(format!("{what} runs past the option data")))?;
    let value = string(&data[start..end], what)?;
    *at = end;
    Ok(value)
}

impl ClientOption {
    /// Decodes option `option` with its `data`. Never panics; malformed data of a
    /// known option is an [`OptionError`].
    pub fn decode(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
        let no_data = |what: ClientOption| {
            if data.is_empty() {
                Ok(what)
            } else {
                Err(OptionError::invalid("this option takes no data"))
            }
        };
        match option {
            OPT_EXPORT_NAME => Ok(ClientOption::ExportName(string(data, "export name")?)),
            // The server SHOULD ignore data sent with NBD_OPT_ABORT.
            OPT_ABORT => Ok(ClientOption::Abort),
            OPT_LIST => no_data(ClientOption::List),
            OPT_STARTTLS => no_data(ClientOption::StartTls),
            OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            OPT_INFO => Ok(ClientOption::Info(Self::export_query(data)?)),
            OPT_GO => Ok(ClientOption::Go(Self::export_query(data)?)),
            OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(Self::meta_query(data)?)),
            OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(Self::meta_query(data)?)),
            other => Ok(ClientOption::Unsupported(other)),
        }
    }

    fn export_query(data: &[u8]) -> Result<ExportQuery, OptionError> {
        let mut at = 0;
        let name = counted_string(data, &mut at, "export name")?;
        let count = be_u16(data, at)
            .ok_or_else(|| OptionError::invalid("number of information requests missing"))?;
        at += 2;
        let expected = at + 2 * usize::from(count);
        if data.len() != expected {
            return Err(OptionError::invalid(format!(
                "{count} information requests need {expected} bytes of data, not {}",
                data.len()
            )));
        }
        let mut info = Vec::with_capacity(usize::from(count).min(16));
        for index in 0..usize::from(count) {
            let item = be_u16(data, at + 2 * index)
                .ok_or_else(|| OptionError::invalid("information request missing"))?;
            if !info.contains(&item) {
                info.push(item);
            }
        }
        Ok(ExportQuery { name, info })
    }

    fn meta_query(data: &[u8]) -> Result<MetaQuery, OptionError> {
        let mut at = 0;
        let export = counted_string(data, &mut at, "export name")?;
        let count =
            be_u32(data, at).ok_or_else(|| OptionError::invalid("number of queries missing"))?;
        at += 4;
        // Each query takes at least its 4-byte length: a count the data cannot
        // hold is malformed, whatever the limit.
        if usize::try_from(count).map_or(true, |count| count > (data.len() - at) / 4) {
            return Err(OptionError::invalid(format!(
                "{count} queries do not fit in the option data"
            )));
        }
        if count as usize > MAX_META_QUERIES {
            return Err(OptionError {
                reply: REP_ERR_TOO_BIG,
                message: format!("more than {MAX_META_QUERIES} queries"),
            });
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            queries.push(counted_string(data, &mut at, "query")?);
        }
        if at != data.len() {
            return Err(OptionError::invalid("data after the last query"));
        }
        Ok(MetaQuery { export, queries })
    }
}

/// Option data of `NBD_OPT_INFO`/`NBD_OPT_GO` (what a client sends; for tests and
/// the fuzz seeds).
pub fn encode_export_query(name: &str, info: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * info.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for item in info {
        out.extend_from_slice(&item.to_be_bytes());
    }
    out
}

/// Option data of the META_CONTEXT options (what a client sends).
pub fn encode_meta_query(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        out.extend_from_slice(&(query.len() as u32).to_be_bytes());
        out.extend_from_slice(query.as_bytes());
    }
    out
}

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Cuts `message` to at most [`MAX_STRING`] bytes, at a character boundary.
pub fn clip_message(message: &str) -> &str {
    if message.len() <= MAX_STRING {
        return message;
    }
    let mut end = MAX_STRING;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// An error reply to an option, with a message for the user.
pub fn option_error(option: u32, reply: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply, clip_message(message).as_bytes())
}

/// The data of an `NBD_REP_SERVER` reply: name, then a description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(clip_message(description).as_bytes());
    out
}

/// The data of an `NBD_REP_META_CONTEXT` reply.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let text = clip_message(text);
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(sizes: BlockSizes) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&sizes.minimum.to_be_bytes());
    out.extend_from_slice(&sizes.preferred.to_be_bytes());
    out.extend_from_slice(&sizes.maximum.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless both
/// sides agreed to `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// The block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// The smallest addressable length and alignment.
    pub minimum: u32,
    /// The size at which aligned requests avoid read-modify-write: the volume's
    /// block size.
    pub preferred: u32,
    /// The largest payload of one request.
    pub maximum: u32,
}

impl BlockSizes {
    /// Constraints for an export of `block_size` bytes per block: requests
    /// aligned to 512 bytes, `block_size` preferred, [`MAX_PAYLOAD`] at most.
    /// `None` unless `block_size` is a power of two from 512 to 64 KiB.
    pub fn for_block_size(block_size: u32) -> Option<BlockSizes> {
        (block_size.is_power_of_two() && (512..=65536).contains(&block_size)).then_some(
            BlockSizes {
                minimum: 512,
                preferred: block_size,
                maximum: MAX_PAYLOAD,
            },
        )
    }
}

// ----- transmission -----

/// A request header, as the client sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`NBD_CMD_*`).
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload, for a write).
    pub length: u32,
}

impl RequestHeader {
    /// Decodes a request header; a wrong magic ends the connection.
    pub fn decode(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, ProtoError> {
        let field32 = |at: usize| be_u32(bytes, at).unwrap_or(0);
        let magic = field32(0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(RequestHeader {
            flags: be_u16(bytes, 4).unwrap_or(0),
            kind: be_u16(bytes, 6).unwrap_or(0),
            cookie: be_u64(bytes, 8).unwrap_or(0),
            offset: be_u64(bytes, 16).unwrap_or(0),
            length: field32(24),
        })
    }

    /// Encodes the header (what a client sends; for tests and the fuzz seeds).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header: the length of a write, else 0.
    /// A write longer than `max_payload` is an error that ends the connection.
    pub fn payload_len(&self, max_payload: u32) -> Result<usize, ProtoError> {
        if self.kind != CMD_WRITE {
            return Ok(0);
        }
        if self.length > max_payload {
            return Err(ProtoError::PayloadTooLarge {
                len: self.length,
                max: max_payload,
            });
        }
        Ok(self.length as usize)
    }
}

/// A request split off a byte stream: its header, its payload (a write's data)
/// and the bytes it took.
pub type Frame<'a> = (RequestHeader, &'a [u8], usize);

/// One request split off the front of `buf`. `Ok(None)` when `buf` does not yet
/// hold a whole request.
pub fn split_request(buf: &[u8], max_payload: u32) -> Result<Option<Frame<'_>>, ProtoError> {
    let Some(head) = buf.first_chunk::<REQUEST_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = RequestHeader::decode(head)?;
    let payload = header.payload_len(max_payload)?;
    let end = REQUEST_HEADER_LEN + payload;
    match buf.get(REQUEST_HEADER_LEN..end) {
        Some(payload) => Ok(Some((header, payload, end))),
        None => Ok(None),
    }
}

/// The errors a reply may carry (`NBD_E*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdError {
    /// `NBD_EPERM`: not permitted (a write to a read-only export).
    Perm,
    /// `NBD_EIO`: the storage failed, or a sector failed verification.
    Io,
    /// `NBD_ENOMEM`.
    NoMem,
    /// `NBD_EINVAL`: malformed, misaligned or out of range.
    Inval,
    /// `NBD_ENOSPC`: no space, or a write past the end.
    NoSpc,
    /// `NBD_EOVERFLOW`: too large a read with `DF`.
    Overflow,
    /// `NBD_ENOTSUP`: a `FAST_ZERO` that would not be fast.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is stopping.
    Shutdown,
}

impl NbdError {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// The protocol's error for a POSIX `errno` (as nbdkit maps them: EROFS and
    /// EACCES are EPERM, EFBIG and EDQUOT are ENOSPC, anything unknown EIO).
    pub fn from_errno(errno: i32) -> NbdError {
        match errno {
            1 | 13 | 30 => NbdError::Perm,    // EPERM, EACCES, EROFS
            5 => NbdError::Io,                // EIO
            12 => NbdError::NoMem,            // ENOMEM
            22 | 9 => NbdError::Inval,        // EINVAL, EBADF
            27 | 28 | 122 => NbdError::NoSpc, // EFBIG, ENOSPC, EDQUOT
            75 => NbdError::Overflow,         // EOVERFLOW
            95 => NbdError::NotSup,           // EOPNOTSUPP
            108 => NbdError::Shutdown,        // ESHUTDOWN
            _ => NbdError::Io,
        }
    }
}

/// A simple reply header: magic, error, cookie.
pub fn simple_reply(cookie: u64, error: Option<NbdError>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.map_or(0, NbdError::code).to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk: chunk header and
/// offset; `data_len` bytes of data follow. `None` if `data_len` does not fit.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: usize) -> Option<[u8; 28]> {
    let len = u32::try_from(data_len).ok()?.checked_add(8)?;
    let mut out = [0u8; 28];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    Some(out)
}

/// A final `NBD_REPLY_TYPE_NONE` chunk: success with no content.
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for the user.
pub fn error_chunk(cookie: u64, error: NbdError, message: &str) -> Vec<u8> {
    // The message length is a 16-bit field and a string of at most 4096 bytes.
    let message = clip_message(message);
    let len = 6 + message.len();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len as u32,
    ));
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// One descriptor of a block status chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes the status applies to (non-zero).
    pub length: u32,
    /// `NBD_STATE_*` flags.
    pub flags: u32,
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `context`.
pub fn block_status_chunk(cookie: u64, context: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        u32::try_from(len).unwrap_or(u32::MAX),
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for descriptor in descriptors {
        out.extend_from_slice(&descriptor.length.to_be_bytes());
        out.extend_from_slice(&descriptor.flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_client_flags() {
        let greeting = greeting(SERVER_HANDSHAKE_FLAGS);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(greeting[16..], [0, 3]);
        assert_eq!(
            ClientFlags::decode([0, 0, 0, 3], SERVER_HANDSHAKE_FLAGS),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            ClientFlags::decode([0, 0, 0, 4], SERVER_HANDSHAKE_FLAGS),
            Err(ProtoError::ClientFlags(4))
        );
        // NO_ZEROES the server did not offer.
        assert!(ClientFlags::decode([0, 0, 0, 2], FLAG_FIXED_NEWSTYLE).is_err());
    }

    #[test]
    fn option_headers_round_trip_and_refuse_bad_magic_and_length() {
        let header = OptionHeader {
            option: OPT_GO,
            len: 10,
        };
        assert_eq!(OptionHeader::decode(&header.encode(), 100), Ok(header));
        let mut bad = header.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad, 100),
            Err(ProtoError::BadMagic { .. })
        ));
        assert_eq!(
            OptionHeader::decode(&header.encode(), 9),
            Err(ProtoError::OptionTooLong { len: 10, max: 9 })
        );
    }

    #[test]
    fn go_and_meta_context_data() {
        let data = encode_export_query("vol0", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_NAME]);
        assert_eq!(
            ClientOption::decode(OPT_GO, &data),
            Ok(ClientOption::Go(ExportQuery {
                name: "vol0".into(),
                info: vec![INFO_BLOCK_SIZE, INFO_NAME],
            }))
        );
        // One byte short, one byte long, a name length past the end.
        assert!(ClientOption::decode(OPT_GO, &data[..data.len() - 1]).is_err());
        let mut long = data.clone();
        long.push(0);
        assert!(ClientOption::decode(OPT_INFO, &long).is_err());
        assert!(ClientOption::decode(OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());

        let data = encode_meta_query("vol0", &["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            ClientOption::decode(OPT_SET_META_CONTEXT, &data),
            Ok(ClientOption::SetMetaContext(MetaQuery {
                export: "vol0".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
            }))
        );
        let mut huge_count = encode_meta_query("", &[]);
        huge_count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            ClientOption::decode(OPT_LIST_META_CONTEXT, &huge_count)
                .unwrap_err()
                .reply,
            REP_ERR_INVALID
        );
        let many: Vec<&str> = vec!["x:"; MAX_META_QUERIES + 1];
        assert_eq!(
            ClientOption::decode(OPT_LIST_META_CONTEXT, &encode_meta_query("", &many))
                .unwrap_err()
                .reply,
            REP_ERR_TOO_BIG
        );
    }

    #[test]
    fn options_without_data_refuse_data_and_strings_are_checked() {
        assert_eq!(ClientOption::decode(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(ClientOption::decode(OPT_LIST, &[1]).is_err());
        assert!(ClientOption::decode(OPT_STARTTLS, &[1]).is_err());
        assert_eq!(
            ClientOption::decode(OPT_ABORT, &[1]),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            ClientOption::decode(99, &[1, 2, 3]),
            Ok(ClientOption::Unsupported(99))
        );
        assert!(ClientOption::decode(OPT_EXPORT_NAME, &[0xff]).is_err());
        assert!(ClientOption::decode(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(ClientOption::decode(OPT_EXPORT_NAME, &[b'a'; MAX_STRING + 1]).is_err());
    }

    #[test]
    fn requests_split_off_a_stream() {
        let write = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 3,
        };
        let mut stream = write.encode().to_vec();
        stream.extend_from_slice(b"abc");
        let read = RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 8,
            offset: 0,
            length: 1 << 30,
        };
        stream.extend_from_slice(&read.encode());
        let (header, payload, used) = split_request(&stream, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!((header, payload, used), (write, &b"abc"[..], 31));
        let (header, payload, used) = split_request(&stream[31..], MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!((header, payload.len(), used), (read, 0, 28));
        assert_eq!(split_request(&stream[..30], MAX_PAYLOAD), Ok(None));
        let huge = RequestHeader {
            length: MAX_PAYLOAD + 1,
            ..write
        };
        assert!(matches!(
            split_request(&huge.encode(), MAX_PAYLOAD),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        let mut bad = read.encode();
        bad[3] = 0;
        assert!(matches!(
            split_request(&bad, MAX_PAYLOAD),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn reply_encodings() {
        assert_eq!(
            simple_reply(0x0102, Some(NbdError::Inval)),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let chunk = error_chunk(5, NbdError::Io, "bad sector");
        assert_eq!(chunk.len(), 20 + 6 + 10);
        assert_eq!(&chunk[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        let long = "é".repeat(3000);
        let chunk = error_chunk(5, NbdError::Io, &long);
        assert!(chunk.len() <= 20 + 6 + MAX_STRING);
        let status = block_status_chunk(
            1,
            1,
            &[Descriptor {
                length: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(&status[16..20], &12u32.to_be_bytes());
        assert_eq!(offset_data_header(1, 0, usize::MAX), None);
        assert_eq!(NbdError::from_errno(30), NbdError::Perm);
        assert_eq!(NbdError::from_errno(27), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(2), NbdError::Io);
        assert_eq!(BlockSizes::for_block_size(4096).unwrap().preferred, 4096);
        assert!(BlockSizes::for_block_size(4095).is_none());
        assert!(BlockSizes::for_block_size(256).is_none());
    }
}
