//! Fuzzes the NBD request decoder (`proto::split_request`, which is
//! `RequestHeader::decode` and `payload_len`) and the transmission checks
//! (`Session::check`) on a stream of arbitrary bytes, as a client could send in
//! the transmission phase. Decoding and checking never panic; a decoded header
//! re-encodes to the bytes it came from; a write's payload is never longer than
//! the maximum payload; and every request that passes the checks lies within the
//! export, aligned to the minimum block size, of a length the server accepts.
#![no_main]

use blocktree_nbd::proto::{self, BlockSizes, REQUEST_HEADER_LEN};
use blocktree_nbd::session::{Op, Session, transmission_flags};
use libfuzzer_sys::fuzz_target;

fn sessions() -> [Session; 3] {
    let sizes = BlockSizes::for_block_size(4096).unwrap_or(BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: proto::MAX_PAYLOAD,
    });
    [
        Session {
            size: 1 << 30,
            flags: transmission_flags(false, true),
            structured: true,
            allocation: Some(1),
            sizes,
        },
        Session {
            size: (1 << 20) + 512,
            flags: transmission_flags(false, false),
            structured: false,
            allocation: None,
            sizes,
        },
        Session {
            size: u64::MAX - 511,
            flags: transmission_flags(true, true),
            structured: true,
            allocation: None,
            sizes,
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let sessions = sessions();
    let mut rest = data;
    // A small maximum from the first byte, so long payloads are split off too.
    let max_payload = match data.first() {
        Some(byte) if byte & 1 == 1 => u32::from(*byte) * 64,
        _ => proto::MAX_PAYLOAD,
    };
    loop {
        let split = proto::split_request(rest, max_payload);
        let Ok(Some((header, payload, used))) = split else {
            if let Err(error) = &split {
                let _ = format!("{error} {error:?}");
            }
            break;
        };
        assert_eq!(header.encode()[..], rest[..REQUEST_HEADER_LEN]);
        assert_eq!(used, REQUEST_HEADER_LEN + payload.len());
        assert!(payload.len() <= max_payload as usize);
        for session in &sessions {
            let Ok(op) = session.check(&header) else {
                continue;
            };
            let range = match op {
                Op::Read { offset, len }
                | Op::Write { offset, len, .. }
                | Op::Trim { offset, len, .. }
                | Op::Cache { offset, len }
                | Op::WriteZeroes { offset, len, .. }
                | Op::BlockStatus { offset, len, .. } => Some((offset, len)),
                Op::Flush | Op::Disconnect => None,
            };
            if let Some((offset, len)) = range {
                let end = offset.checked_add(u64::from(len));
                assert!(end.is_some_and(|end| end <= session.size));
                assert_eq!(offset % u64::from(session.sizes.minimum), 0);
                assert_eq!(len % session.sizes.minimum, 0);
            }
            match op {
                Op::Read { len, .. } => assert!(len <= session.sizes.maximum),
                Op::Write { len, .. } => {
                    assert_eq!(len as usize, payload.len());
                    assert!(session.flags & proto::TF_READ_ONLY == 0);
                }
                Op::BlockStatus { len, .. } => {
                    assert!(len > 0 && session.structured && session.allocation.is_some());
                }
                _ => {}
            }
        }
        rest = &rest[used..];
    }
});
