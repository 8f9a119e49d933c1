//! Option haggling (the fixed newstyle handshake) as a state machine with no
//! I/O: [`Negotiation::handle`] takes one option and says what to send and what
//! happens next ([`Outcome`]). The server drives it with the bytes it reads; the
//! tests drive it directly.

use crate::export::{Catalog, CatalogError, Device, ExportInfo};
use crate::proto::{
    self, BASE_ALLOCATION, BlockSizes, ClientFlags, ClientOption, ExportQuery, INFO_DESCRIPTION,
    INFO_NAME, MetaQuery, OPT_EXPORT_NAME, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY,
    REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};
use crate::session::{Session, transmission_flags};
use std::sync::Arc;

/// How many options one connection may send before the server gives up on it.
pub const MAX_OPTIONS: u32 = 4096;

/// The id this server gives the `base:allocation` context.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// Whether the server offers or insists on TLS (`--tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY` (the protocol's NOTLS).
    Off,
    /// TLS at the client's choice; every export is served either way
    /// (SELECTIVETLS with no TLS-only export).
    On,
    /// Nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` before TLS (FORCEDTLS).
    Require,
}

/// What to do after an option.
pub enum Outcome {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send these bytes (the ACK of `NBD_OPT_STARTTLS`), then run the TLS
    /// handshake and call [`Negotiation::tls_started`].
    StartTls(Vec<u8>),
    /// Send these bytes, then enter the transmission phase.
    Transmit {
        /// The final replies of `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
        reply: Vec<u8>,
        /// The export, opened for this connection.
        device: Arc<dyn Device>,
        /// What was negotiated.
        session: Session,
    },
    /// Send these bytes (possibly none), then close the connection.
    Close {
        /// The last bytes to send.
        reply: Vec<u8>,
        /// Why, for the log.
        reason: String,
    },
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply(bytes) => f.debug_tuple("Reply").field(&bytes.len()).finish(),
            Outcome::StartTls(_) => f.write_str("StartTls"),
            Outcome::Transmit { session, .. } => f
                .debug_struct("Transmit")
                .field("session", session)
                .finish(),
            Outcome::Close { reason, .. } => {
                f.debug_struct("Close").field("reason", reason).finish()
            }
        }
    }
}

/// The metadata contexts chosen with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug)]
struct MetaSelection {
    /// The canonical name of the export they were chosen for.
    export: String,
    /// Whether `base:allocation` was selected.
    allocation: bool,
}

/// The handshake state of one connection.
#[derive(Debug)]
pub struct Negotiation {
    tls: TlsMode,
    tls_active: bool,
    client: ClientFlags,
    read_only: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options: u32,
}

impl Negotiation {
    /// A handshake with a client that sent `client` flags. `read_only` forces
    /// every export read-only.
    pub fn new(tls: TlsMode, client: ClientFlags, read_only: bool) -> Negotiation {
        Negotiation {
            tls,
            tls_active: false,
            client,
            read_only,
            structured: false,
            meta: None,
            options: 0,
        }
    }

    /// Whether TLS is running on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after `NBD_OPT_STARTTLS` succeeded: nothing negotiated
    /// before it survives.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }

    /// Handles option `option` with its `data`, looking exports up in `catalog`
    /// (which may block).
    pub fn handle(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        self.options += 1;
        if self.options > MAX_OPTIONS {
            return Outcome::Close {
                reply: Vec::new(),
                reason: format!("more than {MAX_OPTIONS} options"),
            };
        }
        let decoded = match ClientOption::decode(option, data) {
            Ok(decoded) => decoded,
            Err(error) if option == OPT_EXPORT_NAME => {
                // NBD_OPT_EXPORT_NAME cannot be answered with an error.
                return Outcome::Close {
                    reply: Vec::new(),
                    reason: format!("NBD_OPT_EXPORT_NAME: {error}"),
                };
            }
            Err(error) => {
                return self.reply(if self.tls_required() {
                    proto::option_error(option, REP_ERR_TLS_REQD, "TLS is required")
                } else {
                    proto::option_error(option, error.reply, &error.message)
                });
            }
        };
        if self.tls_required() {
            match decoded {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    return Outcome::Close {
                        reply: Vec::new(),
                        reason: "NBD_OPT_EXPORT_NAME before TLS, which is required".into(),
                    };
                }
                _ => {
                    return self.reply(proto::option_error(
                        option,
                        REP_ERR_TLS_REQD,
                        "this server requires TLS: start it with NBD_OPT_STARTTLS",
                    ));
                }
            }
        }
        match decoded {
            ClientOption::Abort => Outcome::Close {
                reply: proto::option_reply(option, REP_ACK, &[]),
                reason: "the client aborted the handshake".into(),
            },
            ClientOption::List => self.list(option, catalog),
            ClientOption::StartTls => self.start_tls(option),
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(proto::option_reply(option, REP_ACK, &[]))
            }
            ClientOption::Info(query) => self.info(option, &query, catalog),
            ClientOption::Go(query) => self.go(option, &query, catalog),
            ClientOption::ExportName(name) => self.export_name(&name, catalog),
            ClientOption::ListMetaContext(query) => self.list_meta(option, &query, catalog),
            ClientOption::SetMetaContext(query) => self.set_meta(option, &query, catalog),
            ClientOption::Unsupported(_) => self.reply(proto::option_error(
                option,
                REP_ERR_UNSUP,
                "option not supported by this server",
            )),
        }
    }

    fn tls_required(&self) -> bool {
        self.tls == TlsMode::Require && !self.tls_active
    }

    fn reply(&self, bytes: Vec<u8>) -> Outcome {
        Outcome::Reply(bytes)
    }

    fn catalog_error(option: u32, error: &CatalogError) -> Vec<u8> {
        proto::option_error(option, REP_ERR_UNKNOWN, &error.to_string())
    }

    fn list(&self, option: u32, catalog: &dyn Catalog) -> Outcome {
        match catalog.list() {
            Ok(exports) => {
                let mut out = Vec::new();
                for export in exports {
                    out.extend(proto::option_reply(
                        option,
                        REP_SERVER,
                        &proto::rep_server(&export.name, &export.description),
                    ));
                }
                out.extend(proto::option_reply(option, REP_ACK, &[]));
                self.reply(out)
            }
            Err(error) => self.reply(Self::catalog_error(option, &error)),
        }
    }

    fn start_tls(&mut self, option: u32) -> Outcome {
        if self.tls == TlsMode::Off || !self.client.fixed_newstyle {
            return self.reply(proto::option_error(
                option,
                REP_ERR_POLICY,
                "TLS is not enabled on this server",
            ));
        }
        if self.tls_active {
            return self.reply(proto::option_error(
                option,
                REP_ERR_INVALID,
                "TLS is already running",
            ));
        }
        Outcome::StartTls(proto::option_reply(option, REP_ACK, &[]))
    }

    fn flags_of(&self, info: &ExportInfo) -> u16 {
        transmission_flags(self.read_only || info.read_only, self.structured)
    }

    fn sizes_of(info: &ExportInfo) -> Result<BlockSizes, CatalogError> {
        BlockSizes::for_block_size(info.block_size).ok_or_else(|| {
            CatalogError::Failed(format!(
                "export {:?} has an unusable block size of {}",
                info.name, info.block_size
            ))
        })
    }

    /// The `NBD_REP_INFO` replies of `NBD_OPT_INFO` / `NBD_OPT_GO`, then the ACK.
    fn info_replies(&self, option: u32, query: &ExportQuery, info: &ExportInfo) -> Vec<u8> {
        let mut out = Vec::new();
        let mut item = |data: Vec<u8>| out.extend(proto::option_reply(option, REP_INFO, &data));
        item(proto::info_export(info.size, self.flags_of(info)));
        if query.info.contains(&INFO_NAME) {
            item(proto::info_text(INFO_NAME, &info.name));
        }
        if query.info.contains(&INFO_DESCRIPTION) {
            item(proto::info_text(INFO_DESCRIPTION, &info.description));
        }
        // Sent whether or not it was asked for: the constraints hold either way,
        // and a client ignores information it did not request.
        if let Ok(sizes) = Self::sizes_of(info) {
            item(proto::info_block_size(sizes));
        }
        out.extend(proto::option_reply(option, REP_ACK, &[]));
        out
    }

    fn info(&self, option: u32, query: &ExportQuery, catalog: &dyn Catalog) -> Outcome {
        match catalog
            .describe(&query.name)
            .and_then(|info| Self::sizes_of(&info).map(|_| info))
        {
            Ok(info) => self.reply(self.info_replies(option, query, &info)),
            Err(error) => self.reply(Self::catalog_error(option, &error)),
        }
    }

    fn session(&self, info: &ExportInfo) -> Result<Session, CatalogError> {
        let allocation = self
            .meta
            .as_ref()
            .filter(|meta| meta.allocation && meta.export == info.name && self.structured)
            .map(|_| ALLOCATION_CONTEXT_ID);
        Ok(Session {
            size: info.size,
            flags: self.flags_of(info),
            structured: self.structured,
            allocation,
            sizes: Self::sizes_of(info)?,
        })
    }

    fn open(
        &self,
        name: &str,
        catalog: &dyn Catalog,
    ) -> Result<(Arc<dyn Device>, Session), CatalogError> {
        let device = catalog.open(name)?;
        match self.session(device.info()) {
            Ok(session) => Ok((device, session)),
            Err(error) => {
                // Best effort: the export is refused either way.
                let _ = device.close();
                Err(error)
            }
        }
    }

    fn go(&self, option: u32, query: &ExportQuery, catalog: &dyn Catalog) -> Outcome {
        match self.open(&query.name, catalog) {
            Ok((device, session)) => Outcome::Transmit {
                reply: self.info_replies(option, query, device.info()),
                device,
                session,
            },
            Err(error) => self.reply(Self::catalog_error(option, &error)),
        }
    }

    fn export_name(&self, name: &str, catalog: &dyn Catalog) -> Outcome {
        match self.open(name, catalog) {
            Ok((device, session)) => Outcome::Transmit {
                reply: proto::export_name_reply(session.size, session.flags, self.client.no_zeroes),
                device,
                session,
            },
            Err(error) => Outcome::Close {
                reply: Vec::new(),
                reason: format!("NBD_OPT_EXPORT_NAME: {error}"),
            },
        }
    }

    /// The contexts `queries` select among those offered (just `base:allocation`);
    /// `listing` makes `base:` a wildcard and no query at all mean every context.
    fn matching(queries: &[String], listing: bool) -> bool {
        if listing && queries.is_empty() {
            return true;
        }
        queries
            .iter()
            .any(|query| query == BASE_ALLOCATION || (listing && query == "base:"))
    }

    fn list_meta(&self, option: u32, query: &MetaQuery, catalog: &dyn Catalog) -> Outcome {
        if let Err(error) = catalog.describe(&query.export) {
            return self.reply(Self::catalog_error(option, &error));
        }
        let mut out = Vec::new();
        if Self::matching(&query.queries, true) {
            out.extend(proto::option_reply(
                option,
                REP_META_CONTEXT,
                &proto::rep_meta_context(0, BASE_ALLOCATION),
            ));
        }
        out.extend(proto::option_reply(option, REP_ACK, &[]));
        self.reply(out)
    }

    fn set_meta(&mut self, option: u32, query: &MetaQuery, catalog: &dyn Catalog) -> Outcome {
        // Replaces every earlier selection, also when it fails.
        self.meta = None;
        if !self.structured {
            return self.reply(proto::option_error(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies first",
            ));
        }
        let info = match catalog.describe(&query.export) {
            Ok(info) => info,
            Err(error) => return self.reply(Self::catalog_error(option, &error)),
        };
        let allocation = Self::matching(&query.queries, false);
        let mut out = Vec::new();
        if allocation {
            out.extend(proto::option_reply(
                option,
                REP_META_CONTEXT,
                &proto::rep_meta_context(ALLOCATION_CONTEXT_ID, BASE_ALLOCATION),
            ));
        }
        out.extend(proto::option_reply(option, REP_ACK, &[]));
        self.meta = Some(MetaSelection {
            export: info.name,
            allocation,
        });
        self.reply(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{DeviceError, Extent};
    use crate::proto::*;

    struct Fake;
    struct FakeDevice(ExportInfo);

    fn info(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            size: 1 << 20,
            block_size: 4096,
            read_only: false,
            description: "a test volume".into(),
        }
    }

    impl Device for FakeDevice {
        fn info(&self) -> &ExportInfo {
            &self.0
        }
        fn read(&self, _: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
            Ok(vec![0; len as usize])
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write_zeroes(
            &self,
            _: u64,
            _: u32,
            _: bool,
            _: bool,
            _: bool,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn extents(&self, _: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
            Ok(vec![Extent {
                length: u64::from(len),
                hole: true,
            }])
        }
        fn cache(&self, _: u64, _: u32) -> Result<(), DeviceError> {
            Ok(())
        }
        fn close(&self) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    impl Catalog for Fake {
        fn list(&self) -> Result<Vec<ExportInfo>, CatalogError> {
            Ok(vec![info("vol0"), info("vol1")])
        }
        fn describe(&self, name: &str) -> Result<ExportInfo, CatalogError> {
            match name {
                "" | "vol0" => Ok(info("vol0")),
                "vol1" => Ok(info("vol1")),
                other => Err(CatalogError::Unknown(other.into())),
            }
        }
        fn open(&self, name: &str) -> Result<Arc<dyn Device>, CatalogError> {
            Ok(Arc::new(FakeDevice(self.describe(name)?)))
        }
    }

    const FIXED: ClientFlags = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    };

    /// (option, reply type, data) of every option reply in `bytes`.
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            out.push((option, kind, bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        out
    }

    fn reply_of(outcome: Outcome) -> Vec<(u32, u32, Vec<u8>)> {
        match outcome {
            Outcome::Reply(bytes) => replies(&bytes),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn list_info_and_go() {
        let mut n = Negotiation::new(TlsMode::Off, FIXED, false);
        let list = reply_of(n.handle(OPT_LIST, &[], &Fake));
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].1, REP_SERVER);
        assert_eq!(&list[0].2[4..8], b"vol0");
        assert_eq!(list[2].1, REP_ACK);

        let unknown = reply_of(n.handle(OPT_INFO, &encode_export_query("nope", &[]), &Fake));
        assert_eq!(unknown[0].1, REP_ERR_UNKNOWN);

        let info = reply_of(n.handle(
            OPT_INFO,
            &encode_export_query("", &[INFO_NAME, INFO_BLOCK_SIZE]),
            &Fake,
        ));
        let kinds: Vec<u16> = info
            .iter()
            .filter(|reply| reply.1 == REP_INFO)
            .map(|reply| u16::from_be_bytes(reply.2[..2].try_into().unwrap()))
            .collect();
        assert_eq!(kinds, [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(info.last().unwrap().1, REP_ACK);

        reply_of(n.handle(OPT_STRUCTURED_REPLY, &[], &Fake));
        let set = reply_of(n.handle(
            OPT_SET_META_CONTEXT,
            &encode_meta_query("", &["base:allocation", "other:thing"]),
            &Fake,
        ));
        assert_eq!(set[0].1, REP_META_CONTEXT);
        assert_eq!(
            set[0].2,
            rep_meta_context(ALLOCATION_CONTEXT_ID, BASE_ALLOCATION)
        );
        match n.handle(OPT_GO, &encode_export_query("vol0", &[]), &Fake) {
            Outcome::Transmit { session, .. } => {
                assert!(session.structured);
                assert_eq!(session.allocation, Some(ALLOCATION_CONTEXT_ID));
                assert_ne!(session.flags & TF_SEND_DF, 0);
                assert_ne!(session.flags & TF_CAN_MULTI_CONN, 0);
                assert_eq!(session.sizes.minimum, 512);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn meta_contexts_belong_to_the_export_they_were_set_for() {
        let mut n = Negotiation::new(TlsMode::Off, FIXED, false);
        // SET before STRUCTURED_REPLY is refused.
        let early = reply_of(n.handle(
            OPT_SET_META_CONTEXT,
            &encode_meta_query("vol0", &["base:allocation"]),
            &Fake,
        ));
        assert_eq!(early[0].1, REP_ERR_INVALID);
        reply_of(n.handle(OPT_STRUCTURED_REPLY, &[], &Fake));
        let listed = reply_of(n.handle(
            OPT_LIST_META_CONTEXT,
            &encode_meta_query("vol0", &["base:"]),
            &Fake,
        ));
        assert_eq!(listed[0].2, rep_meta_context(0, BASE_ALLOCATION));
        // base: selects nothing with SET.
        let none = reply_of(n.handle(
            OPT_SET_META_CONTEXT,
            &encode_meta_query("vol0", &["base:"]),
            &Fake,
        ));
        assert_eq!(none.len(), 1);
        reply_of(n.handle(
            OPT_SET_META_CONTEXT,
            &encode_meta_query("vol1", &["base:allocation"]),
            &Fake,
        ));
        match n.handle(OPT_GO, &encode_export_query("vol0", &[]), &Fake) {
            Outcome::Transmit { session, .. } => assert_eq!(session.allocation, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let mut n = Negotiation::new(TlsMode::Require, FIXED, false);
        assert_eq!(
            reply_of(n.handle(OPT_LIST, &[], &Fake))[0].1,
            REP_ERR_TLS_REQD
        );
        assert_eq!(
            reply_of(n.handle(OPT_GO, &encode_export_query("vol0", &[]), &Fake))[0].1,
            REP_ERR_TLS_REQD
        );
        assert_eq!(reply_of(n.handle(77, &[], &Fake))[0].1, REP_ERR_TLS_REQD);
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, b"vol0", &Fake),
            Outcome::Close { .. }
        ));
        assert!(matches!(
            n.handle(OPT_STARTTLS, &[], &Fake),
            Outcome::StartTls(_)
        ));
        n.tls_started();
        assert_eq!(
            reply_of(n.handle(OPT_STARTTLS, &[], &Fake))[0].1,
            REP_ERR_INVALID
        );
        assert_eq!(
            reply_of(n.handle(OPT_LIST, &[], &Fake)).last().unwrap().1,
            REP_ACK
        );
    }

    #[test]
    fn no_tls_refuses_starttls_by_policy_and_abort_closes() {
        let mut n = Negotiation::new(TlsMode::Off, FIXED, false);
        assert_eq!(
            reply_of(n.handle(OPT_STARTTLS, &[], &Fake))[0].1,
            REP_ERR_POLICY
        );
        assert_eq!(
            reply_of(n.handle(OPT_LIST, &[1], &Fake))[0].1,
            REP_ERR_INVALID
        );
        assert_eq!(reply_of(n.handle(42, &[1, 2], &Fake))[0].1, REP_ERR_UNSUP);
        match n.handle(OPT_ABORT, &[], &Fake) {
            Outcome::Close { reply, .. } => assert_eq!(replies(&reply)[0].1, REP_ACK),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn export_name_enters_transmission_or_closes() {
        let mut n = Negotiation::new(TlsMode::On, FIXED, true);
        match n.handle(OPT_EXPORT_NAME, b"vol1", &Fake) {
            Outcome::Transmit { reply, session, .. } => {
                assert_eq!(reply.len(), 10, "NO_ZEROES was agreed");
                assert_ne!(session.flags & TF_READ_ONLY, 0);
            }
            other => panic!("{other:?}"),
        }
        let mut n = Negotiation::new(TlsMode::On, ClientFlags::default(), false);
        match n.handle(OPT_EXPORT_NAME, b"", &Fake) {
            Outcome::Transmit { reply, .. } => assert_eq!(reply.len(), 134),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, b"missing", &Fake),
            Outcome::Close { .. }
        ));
    }

    #[test]
    fn a_flood_of_options_ends_the_connection() {
        let mut n = Negotiation::new(TlsMode::Off, FIXED, false);
        for _ in 0..MAX_OPTIONS {
            assert!(matches!(n.handle(OPT_LIST, &[], &Fake), Outcome::Reply(_)));
        }
        assert!(matches!(
            n.handle(OPT_LIST, &[], &Fake),
            Outcome::Close { .. }
        ));
    }
}
