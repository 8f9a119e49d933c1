//! Fuzzes the NBD handshake as a client drives it: the client flags
//! (`ClientFlags::decode`), option headers (`OptionHeader::decode`), option data
//! (`ClientOption::decode`) and the negotiation state machine
//! (`Negotiation::handle`) over an in-memory catalog, for each TLS mode. Nothing
//! panics; every byte the server would send is a sequence of well-formed option
//! replies (or an NBD_OPT_EXPORT_NAME reply); and an export is only entered
//! under forced TLS once TLS has started.
#![no_main]

use blocktree_nbd::export::{Catalog, CatalogError, Device, DeviceError, ExportInfo, Extent};
use blocktree_nbd::negotiate::{Negotiation, Outcome, TlsMode};
use blocktree_nbd::proto::{
    self, ClientFlags, MAX_OPTION_DATA, OPT_EXPORT_NAME, OPTION_HEADER_LEN, OPTION_REPLY_MAGIC,
    OptionHeader, SERVER_HANDSHAKE_FLAGS,
};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

struct Fake(ExportInfo);

impl Device for Fake {
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
    fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool, _: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    fn extents(&self, _: u64, _: u32) -> Result<Vec<Extent>, DeviceError> {
        Ok(Vec::new())
    }
    fn cache(&self, _: u64, _: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    fn close(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

struct Exports;

fn info(name: &str) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        size: 1 << 30,
        block_size: if name == "odd" { 3 } else { 4096 },
        read_only: name == "ro",
        description: format!("{name} volume"),
    }
}

impl Catalog for Exports {
    fn list(&self) -> Result<Vec<ExportInfo>, CatalogError> {
        Ok(vec![info("vol0"), info("ro")])
    }
    fn describe(&self, name: &str) -> Result<ExportInfo, CatalogError> {
        match name {
            "" | "vol0" => Ok(info("vol0")),
            "ro" | "odd" => Ok(info(name)),
            "broken" => Err(CatalogError::Failed("the store failed".into())),
            other => Err(CatalogError::Unknown(other.into())),
        }
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Device>, CatalogError> {
        Ok(Arc::new(Fake(self.describe(name)?)))
    }
}

/// Checks that `bytes` is a sequence of complete option replies.
fn well_formed(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        assert!(bytes.len() >= 20);
        assert_eq!(bytes[..8], OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
        assert!(bytes.len() >= 20 + len);
        bytes = &bytes[20 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((flags, options)) = data.split_first_chunk::<4>() else {
        return;
    };
    let client = match ClientFlags::decode(*flags, SERVER_HANDSHAKE_FLAGS) {
        Ok(client) => client,
        Err(error) => {
            let _ = format!("{error} {error:?}");
            return;
        }
    };
    for tls in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
        let mut negotiation = Negotiation::new(tls, client, false);
        let mut rest = options;
        loop {
            let Some((head, after)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() else {
                break;
            };
            let header = match OptionHeader::decode(head, MAX_OPTION_DATA) {
                Ok(header) => header,
                Err(error) => {
                    let _ = format!("{error}");
                    break;
                }
            };
            let len = (header.len as usize).min(after.len());
            let (option_data, after) = after.split_at(len);
            rest = after;
            let _ = proto::ClientOption::decode(header.option, option_data);
            match negotiation.handle(header.option, option_data, &Exports) {
                Outcome::Reply(bytes) => well_formed(&bytes),
                Outcome::StartTls(bytes) => {
                    well_formed(&bytes);
                    negotiation.tls_started();
                }
                Outcome::Transmit { reply, session, .. } => {
                    assert!(tls != TlsMode::Require || negotiation.tls_active());
                    if header.option != OPT_EXPORT_NAME {
                        well_formed(&reply);
                    }
                    assert!(session.sizes.minimum <= session.sizes.preferred);
                    break;
                }
                Outcome::Close { reply, .. } => {
                    well_formed(&reply);
                    break;
                }
            }
        }
    }
});
