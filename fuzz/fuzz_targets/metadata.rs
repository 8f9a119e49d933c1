//! Fuzzes `decode::<FileMeta>` (the metadata sector read from disk or a peer) and
//! what follows it: `FileMeta::verify` against the writecap's own path at a fixed
//! clock, opening the secrets (in the clear, and sealed under the epoch keys the
//! fixed file key unwraps), the key tables, and an encode → decode round trip.
#![no_main]

use blocktree_core::encoding;
use blocktree_core::metadata::{FileMeta, MetaError, SecretsPart};
use blocktree_core::writecap::RevocationList;
use blocktree_fuzz::{
    NOW, PARENT, assert_round_trip, epoch_keys, file_key, fixed_path, hpke_receiver, parent_key,
    show,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<FileMeta>(data);
    show(&decoded);
    let Ok(meta) = decoded else {
        return;
    };
    assert_round_trip(&meta);
    let _ = format!("{meta:?}");
    let body = meta.body();

    let directory = body.writecap.path().cloned().unwrap_or_else(fixed_path);
    let verdict = meta.verify(&directory, NOW, &RevocationList::new());
    show(&verdict);
    if verdict.is_ok() {
        let mut revoked = RevocationList::new();
        revoked.revoke(body.writer.principal());
        assert!(meta.verify(&directory, NOW, &revoked).is_err());
    }

    let clear = body.secrets(None);
    show(&clear);
    match (&body.secrets, &clear) {
        (SecretsPart::Clear(secrets), Ok(opened)) => {
            assert_eq!(secrets, opened);
            assert_round_trip(opened);
        }
        (SecretsPart::Sealed { .. }, Err(MetaError::EncryptionMismatch(_))) => {}
        (part, result) => panic!("secrets(None) of {part:?} gave {result:?}"),
    }
    show(&body.secrets(Some(epoch_keys())));
    if let Some(state) = &body.keys {
        let _ = state.epoch_keys.current();
        let unwrapped = state.epoch_keys.open_all(body.ids, &file_key());
        show(&unwrapped);
        if let Ok(keys) = unwrapped {
            let opened = body.secrets(Some(&keys));
            show(&opened);
            if let Ok(secrets) = opened {
                assert_round_trip(&secrets);
            }
        }
    }
    show(
        &body
            .parents
            .open(&body.salt, body.ids, PARENT, &parent_key()),
    );
    let _ = body.readcaps.allows(&body.salt, hpke_receiver().public());
});
