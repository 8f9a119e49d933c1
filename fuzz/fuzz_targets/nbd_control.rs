//! Fuzzes the control socket's frames (`blocktree_nbd::control`): a frame read
//! from arbitrary bytes, and its body decoded as a request and as a reply. Nothing
//! panics, and whatever decodes encodes back to a body that decodes the same.
#![no_main]

use blocktree_nbd::control::{
    decode_reply, decode_request, encode_reply, encode_request, read_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let body = read_frame(&mut reader).unwrap_or_else(|_| data.to_vec());
    if let Ok(request) = decode_request(&body) {
        assert_eq!(
            decode_request(&encode_request(&request)).ok(),
            Some(request)
        );
    }
    if let Ok(reply) = decode_reply(&body) {
        assert_eq!(decode_reply(&encode_reply(&reply)).ok(), Some(reply));
    }
});
