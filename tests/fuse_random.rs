//! Thousands of random writes, truncates and reads through btfuse, mirrored on a
//! host file, with unmounts and remounts in between: the two must stay equal
//! byte for byte, with and without the kernel's writeback cache. The seed is
//! printed; `BTFUSE_SEED=n` replays a run.

// Helpers of a test, like its #[test] bodies, may unwrap (clippy.toml allows
// that in tests but cannot tell a helper from product code).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use fuse_support::Volume;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// xorshift64*: small, seedable, good enough to pick offsets and sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MAX_SIZE: u64 = 6 << 20;
const ROUNDS: usize = 5;
const OPS_PER_ROUND: usize = 800;

fn open(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}

fn read_range(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

fn assert_same(mounted: &File, host: &File, what: &str) {
    let len = host.metadata().unwrap().len();
    assert_eq!(mounted.metadata().unwrap().len(), len, "length {what}");
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(1 << 20) as usize;
        let expected = read_range(host, offset, chunk);
        let found = read_range(mounted, offset, chunk);
        if found != expected {
            let at = found
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(found.len().min(expected.len()));
            panic!("{what}: first difference at byte {}", offset + at as u64);
        }
        offset += chunk as u64;
    }
}

#[test]
fn random_writes_truncates_and_reads_match_a_host_mirror_across_remounts() {
    let seed = std::env::var("BTFUSE_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("BTFUSE_SEED={seed}");
    let mut rng = Rng(seed);
    let volume = Volume::new();
    let host = open(&volume.path("mirror.bin"));
    let (mut writes, mut truncates, mut reads) = (0, 0, 0);
    for round in 0..ROUNDS {
        // Odd rounds write through (no kernel writeback cache): both paths run.
        let extra: &[&str] = if round % 2 == 1 {
            &["-o", "no_writeback_cache"]
        } else {
            &[]
        };
        let mount = volume.mount(extra);
        let mut mounted = open(&mount.path("random.bin"));
        assert_same(&mounted, &host, &format!("after remount {round}"));
        for op in 0..OPS_PER_ROUND {
            let len = host.metadata().unwrap().len();
            match rng.below(100) {
                // Writes: mostly small and unaligned, some large; some past the end.
                0..=54 => {
                    let size = match rng.below(4) {
                        0 => 1 + rng.below(64),
                        1 => 1 + rng.below(8192),
                        2 => 4096 * (1 + rng.below(16)),
                        _ => 1 + rng.below(256 << 10),
                    } as usize;
                    let offset = rng.below(MAX_SIZE - size as u64);
                    let fill = rng.next();
                    let data: Vec<u8> = (0..size)
                        .map(|i| (fill.wrapping_add(i as u64 * 0x9e37_79b9) >> 24) as u8)
                        .collect();
                    mounted.write_all_at(&data, offset).unwrap();
                    host.write_all_at(&data, offset).unwrap();
                    writes += 1;
                }
                // Truncates: shrink or grow (the grown part reads as zeros).
                55..=64 => {
                    let size = match rng.below(3) {
                        0 => rng.below(len + 1),
                        1 => rng.below(MAX_SIZE),
                        _ => len.saturating_sub(rng.below(5000)),
                    };
                    mounted.set_len(size).unwrap();
                    host.set_len(size).unwrap();
                    truncates += 1;
                }
                // Reads at random offsets, also across and past the end.
                65..=94 => {
                    let offset = rng.below(len + 8192);
                    let size = 1 + rng.below(300 << 10) as usize;
                    let found = read_range(&mounted, offset, size);
                    let expected = read_range(&host, offset, size);
                    assert!(
                        found == expected,
                        "round {round} op {op}: read of {size} at {offset} differs (seed {seed})"
                    );
                    reads += 1;
                }
                // fsync, or close and reopen.
                95..=97 => mounted.sync_all().unwrap(),
                _ => mounted = open(&mount.path("random.bin")),
            }
        }
        assert_same(&mounted, &host, &format!("end of round {round}"));
        drop(mounted);
        mount.unmount();
    }
    let mount = volume.mount(&["-o", "ro"]);
    assert_same(&open_read(&mount.path("random.bin")), &host, "at the end");
    mount.unmount();
    eprintln!("{writes} writes, {truncates} truncates, {reads} reads");
    assert!(writes + truncates + reads > 3000);
}

fn open_read(path: &Path) -> File {
    File::open(path).unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}
