//! Bad input and crashes: garbage, truncated frames, huge lengths and wrong magic
//! end only the connection that sent them (the server lives, other connections
//! and the data are intact); errors the protocol defines come back as error
//! replies; and what FUA or FLUSH acknowledged survives `kill -9`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod nbd_support;

use blocktree_nbd::proto::{self, *};
use nbd_support::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn connect(up: &Up) -> TcpStream {
    let tcp = TcpStream::connect(up.address()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp
}

/// Reads option replies until a final one; returns the final reply's type.
fn option(tcp: &mut TcpStream, code: u32, data: &[u8]) -> u32 {
    let header = OptionHeader {
        option: code,
        len: data.len() as u32,
    };
    tcp.write_all(&header.encode()).unwrap();
    tcp.write_all(data).unwrap();
    loop {
        let mut head = [0u8; 20];
        tcp.read_exact(&mut head).unwrap();
        assert_eq!(&head[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        tcp.read_exact(&mut data).unwrap();
        if kind == REP_ACK || kind & (1 << 31) != 0 {
            return kind;
        }
    }
}

/// Greeting and flags; with `structured`, structured replies and base:allocation.
fn handshake(tcp: &mut TcpStream, structured: bool) {
    let mut greeting = [0u8; 18];
    tcp.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    tcp.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    if structured {
        assert_eq!(option(tcp, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        assert_eq!(
            option(
                tcp,
                OPT_SET_META_CONTEXT,
                &encode_meta_query("vol0", &["base:allocation"])
            ),
            REP_ACK
        );
    }
    assert_eq!(
        option(
            tcp,
            OPT_GO,
            &encode_export_query("vol0", &[INFO_BLOCK_SIZE])
        ),
        REP_ACK
    );
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

/// A simple reply: (cookie, error).
fn simple_reply(tcp: &mut TcpStream) -> (u64, u32) {
    let mut reply = [0u8; 16];
    tcp.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u64::from_be_bytes(reply[8..].try_into().unwrap()),
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
    )
}

/// The server closes this connection: reading ends (EOF or reset), after any
/// replies it still owed.
fn assert_closed(tcp: &mut TcpStream) {
    let mut rest = Vec::new();
    match tcp.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

/// The server still serves, and the pattern written first is intact.
fn assert_intact(up: &mut Up) {
    assert!(up.alive(), "the server died: {}", up.stderr_text());
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0 1M 64k",
        ],
    );
}

#[test]
fn malformed_frames_end_only_their_connection() {
    let data = Data::new();
    let mut up = data.up(&[]);
    run(
        "qemu-io",
        &["-f", "raw", &up.uri, "-c", "write -P 0xa5 0 1M"],
    );
    // A well-behaved connection that lives through everything below.
    let mut bystander = connect(&up);
    handshake(&mut bystander, false);

    // Garbage instead of the client flags.
    let mut tcp = connect(&up);
    tcp.write_all(&random_bytes(4096, 1)).unwrap();
    assert_closed(&mut tcp);
    assert_intact(&mut up);

    // An option with the wrong magic, and one announcing 4 GiB of data.
    for bad in [
        random_bytes(16, 2),
        OptionHeader {
            option: OPT_GO,
            len: u32::MAX,
        }
        .encode()
        .to_vec(),
    ] {
        let mut tcp = connect(&up);
        let mut greeting = [0u8; 18];
        tcp.read_exact(&mut greeting).unwrap();
        tcp.write_all(&1u32.to_be_bytes()).unwrap();
        tcp.write_all(&bad).unwrap();
        assert_closed(&mut tcp);
    }
    assert_intact(&mut up);

    // In transmission: a wrong request magic after a good request, whose reply
    // still comes first.
    let mut tcp = connect(&up);
    handshake(&mut tcp, false);
    let mut frames = request(CMD_READ, 0, 1, 0, 4096);
    frames.extend(random_bytes(28, 3));
    tcp.write_all(&frames).unwrap();
    assert_eq!(simple_reply(&mut tcp), (1, 0));
    let mut block = vec![0; 4096];
    tcp.read_exact(&mut block).unwrap();
    assert_eq!(block, vec![0xa5; 4096]);
    assert_closed(&mut tcp);

    // A write announcing more than the maximum payload, with data that would
    // otherwise land on the pattern.
    let mut tcp = connect(&up);
    handshake(&mut tcp, true);
    let mut frames = request(CMD_WRITE, 0, 2, 0, proto::MAX_PAYLOAD + 512);
    frames.extend(vec![0xff; 1 << 20]);
    let _ = tcp.write_all(&frames);
    assert_closed(&mut tcp);

    // A header cut short, then the client vanishes; and a write whose payload
    // never fully arrives.
    let mut tcp = connect(&up);
    handshake(&mut tcp, false);
    tcp.write_all(&request(CMD_WRITE, 0, 3, 0, 4096)[..17])
        .unwrap();
    drop(tcp);
    let mut tcp = connect(&up);
    handshake(&mut tcp, false);
    let mut frames = request(CMD_WRITE, 0, 4, 0, 65536);
    frames.extend(vec![0xff; 1000]);
    tcp.write_all(&frames).unwrap();
    drop(tcp);
    std::thread::sleep(Duration::from_millis(200));
    assert_intact(&mut up);

    // The bystander is unharmed.
    bystander
        .write_all(&request(CMD_READ, 0, 9, 4096, 512))
        .unwrap();
    assert_eq!(simple_reply(&mut bystander), (9, 0));
    let mut block = vec![0; 512];
    bystander.read_exact(&mut block).unwrap();
    assert_eq!(block, vec![0xa5; 512]);
    bystander
        .write_all(&request(CMD_DISC, 0, 10, 0, 0))
        .unwrap();
    assert_closed(&mut bystander);
    up.stop();
}

#[test]
fn invalid_requests_get_error_replies_and_the_connection_goes_on() {
    let data = Data::new();
    let up = data.up(&[]);
    let size = 1u64 << 30;
    let mut tcp = connect(&up);
    handshake(&mut tcp, false);
    let cases: [(Vec<u8>, u32); 9] = [
        // Past the end: EINVAL for reads, ENOSPC for writes.
        (request(CMD_READ, 0, 1, size - 512, 1024), 22),
        (
            [request(CMD_WRITE, 0, 2, size, 512), vec![1; 512]].concat(),
            28,
        ),
        (request(CMD_WRITE_ZEROES, 0, 3, size - 512, 4096), 28),
        (request(CMD_READ, 0, 4, u64::MAX - 10, 512), 22),
        // Not aligned to the minimum block size.
        (request(CMD_READ, 0, 5, 100, 512), 22),
        (
            [request(CMD_WRITE, 0, 6, 0, 100), vec![1; 100]].concat(),
            22,
        ),
        // Unknown command, unknown flag, BLOCK_STATUS without structured replies.
        (request(42, 0, 7, 0, 0), 22),
        (request(CMD_READ, 1 << 9, 8, 0, 512), 22),
        (request(CMD_BLOCK_STATUS, 0, 9, 0, 512), 22),
    ];
    for (frame, errno) in &cases {
        tcp.write_all(frame).unwrap();
        let (cookie, error) = simple_reply(&mut tcp);
        assert_eq!(error, *errno, "request {cookie}");
    }
    // Nothing was written by the refused writes.
    tcp.write_all(&request(CMD_READ, 0, 20, size - 4096, 4096))
        .unwrap();
    assert_eq!(simple_reply(&mut tcp), (20, 0));
    let mut block = vec![1; 4096];
    tcp.read_exact(&mut block).unwrap();
    assert_eq!(block, vec![0; 4096]);
    // Structured replies carry the error with a message.
    let mut tcp = connect(&up);
    handshake(&mut tcp, true);
    tcp.write_all(&request(CMD_READ, 0, 30, 0, proto::MAX_PAYLOAD + 512))
        .unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).unwrap();
    assert_eq!(
        u16::from_be_bytes(head[6..8].try_into().unwrap()),
        REPLY_TYPE_ERROR
    );
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut payload = vec![0; len as usize];
    tcp.read_exact(&mut payload).unwrap();
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), 22);
    let message = String::from_utf8_lossy(&payload[6..]).into_owned();
    assert!(message.contains("maximum payload"), "{message}");
    up.stop();
}

#[test]
fn fua_and_flushed_writes_survive_kill_9() {
    let data = Data::new();
    let up = data.up(&[]);
    // FUA writes; writes followed by FLUSH; and writes on one connection flushed
    // by another (multi-conn: a flush covers writes completed on every
    // connection).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "write -f -P 0x5a 0 1M",
            "-c",
            "write -f -P 0x5b 1M 4k",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "write -P 0x6b 4M 2M",
            "-c",
            "discard 5M 64k",
            "-c",
            "flush",
        ],
    );
    let pattern = random_bytes(MIB as usize, 9);
    let mut writer = Client::connect(&up.address(), "vol0");
    let mut flusher = Client::connect(&up.address(), "vol0");
    writer.write_at(16 * MIB, &pattern);
    flusher.flush();
    up.kill9();

    let up = data.up(&[]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x5b 1M 4k",
            "-c",
            "read -P 0x6b 4M 1M",
            "-c",
            "read -P 0 5M 64k",
            "-c",
            "read -P 0x6b 5184k 960k",
        ],
    );
    let mut reader = Client::connect(&up.address(), "vol0");
    assert_eq!(reader.read_at(16 * MIB, pattern.len()), pattern);
    up.stop();
}
