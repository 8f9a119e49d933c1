//! Fuzzes bttp's frame decoder (`frame::decode`, which is `Prefix::parse` then
//! `decode_body`): every frame a peer can put on a stream. Decoding never
//! panics; the prefix check refuses whatever the whole decode refuses for its
//! header, version, kind and lengths; a tighter payload limit never accepts
//! more; and a decoded frame re-encodes to one that decodes to the same value.
#![no_main]

use blocktree_fuzz::show;
use blocktree_netstack::frame::{self, Frame, PREFIX_LEN, Prefix};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;
const SMALL: usize = 16;

fuzz_target!(|data: &[u8]| {
    let decoded = frame::decode(data, MAX);
    show(&decoded);
    if let Some(prefix) = data.first_chunk::<PREFIX_LEN>() {
        let parsed = Prefix::parse(*prefix, MAX);
        show(&parsed);
        match parsed {
            Err(_) => assert!(decoded.is_err(), "the prefix was refused, the frame not"),
            Ok(prefix) if prefix.payload_len > SMALL => {
                assert!(
                    frame::decode(data, SMALL).is_err(),
                    "a tighter limit accepted more"
                );
            }
            Ok(_) => {}
        }
    }
    let Ok(frame) = decoded else {
        return;
    };
    let _ = format!("{frame:?}");
    match &frame {
        Frame::Send { header, .. } | Frame::Call { header, .. } => {
            let _ = header.to.to_string();
        }
        Frame::Error(error) => {
            let _ = error.to_string();
        }
        Frame::Reply { .. } => {}
    }
    let encoded = match frame.encode(MAX) {
        Ok(encoded) => encoded,
        Err(error) => panic!("a decoded frame does not re-encode: {error}"),
    };
    assert_eq!(frame::decode(&encoded, MAX).as_ref(), Ok(&frame));
});
