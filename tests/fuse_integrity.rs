//! Integrity and durability through btfuse: a byte flipped in the sector
//! engine's files makes that sector read as EIO (never as data) while the rest
//! still reads, whether the engine's checksum catches it or, when the attacker
//! fixed that checksum, the file's Merkle tree; and what was fsynced survives
//! `kill -9` of the daemon.

// Helpers of a test, like its #[test] bodies, may unwrap (clippy.toml allows
// that in tests but cannot tell a helper from product code).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use fuse_support::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: usize = 4096;
const SECTORS: usize = 1024;
/// Flipped on disk: the engine's checksum catches it.
const VICTIM: usize = 517;
/// Forged with a matching engine checksum: only the Merkle verification catches it.
const FORGED: usize = 300;

/// Sector `i` of the victim file: a label naming it, repeated.
fn sector_content(i: usize) -> Vec<u8> {
    let label = format!("BTSECTOR-{i:06}|");
    label.bytes().cycle().take(SECTOR).collect()
}

fn victim_content() -> Vec<u8> {
    (0..SECTORS).flat_map(sector_content).collect()
}

/// Every segment file of the engine under DATA/sectors.
fn engine_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("list the engine directory") {
        let path = entry.expect("engine directory entry").path();
        if path.is_dir() {
            files.extend(engine_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Flips one bit in the middle of every stored copy of `needle`; returns how
/// many copies were found.
fn flip_every_copy(dir: &Path, needle: &[u8]) -> usize {
    let mut found = 0;
    for path in engine_files(dir) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open an engine file");
        let len = file.metadata().expect("engine file length").len();
        let chunk = 8 << 20;
        let mut offset = 0u64;
        while offset < len {
            let size = (len - offset).min(chunk + needle.len() as u64) as usize;
            let mut buf = vec![0u8; size];
            file.read_exact_at(&mut buf, offset)
                .expect("read an engine file");
            let mut at = 0;
            while let Some(pos) = buf[at..].windows(needle.len()).position(|w| w == needle) {
                let hit = offset + (at + pos) as u64;
                let byte = hit + needle.len() as u64 / 2;
                let mut one = [0u8; 1];
                file.read_exact_at(&mut one, byte).expect("read a byte");
                file.write_all_at(&[one[0] ^ 0x01], byte)
                    .expect("flip a byte");
                found += 1;
                // The rest of this copy of the sector repeats the label: skip it.
                at += pos + SECTOR;
                if at >= buf.len() {
                    break;
                }
            }
            offset += chunk;
        }
        file.sync_all().expect("sync an engine file");
    }
    found
}

/// CRC-32C (Castagnoli), the engine's record checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Forges every stored copy of `needle`: flips a bit in it and rewrites the
/// engine record's payload checksum to match, as an attacker with the disk
/// could. Only the file system's Merkle verification can catch this. Records
/// are `header (48 B: ... payload_len u32 at 16 ... crc32c(header[..40]) at 40,
/// crc32c(payload) at 44) · payload`, 16-byte aligned (engine/src/record.rs).
fn forge_every_copy(dir: &Path, needle: &[u8]) -> usize {
    let mut forged = 0;
    for path in engine_files(dir) {
        let mut bytes = fs::read(&path).unwrap();
        let mut at = 0;
        let mut changed = false;
        while let Some(pos) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
            let hit = at + pos;
            at = hit + SECTOR;
            // The record header: the nearest 16-byte aligned header before the
            // hit whose checksum holds and whose payload covers the hit.
            let header = (0..=hit.saturating_sub(48) / 16)
                .rev()
                .map(|i| i * 16)
                .take(512)
                .find(|&h| {
                    h + 48 <= hit
                        && crc32c(&bytes[h..h + 40]) == le_u32(&bytes, h + 40)
                        && h + 48 + le_u32(&bytes, h + 16) as usize >= hit + needle.len()
                });
            let Some(h) = header else { continue };
            let payload_len = le_u32(&bytes, h + 16) as usize;
            bytes[hit + needle.len() / 2] ^= 0x01;
            let crc = crc32c(&bytes[h + 48..h + 48 + payload_len]);
            bytes[h + 44..h + 48].copy_from_slice(&crc.to_le_bytes());
            forged += 1;
            changed = true;
            if at >= bytes.len() {
                break;
            }
        }
        if changed {
            fs::write(&path, &bytes).unwrap();
        }
    }
    forged
}

#[test]
fn a_tampered_sector_reads_as_eio_and_the_rest_still_reads() {
    let volume = Volume::new();
    let m = volume.mount(&[]);
    // Plaintext (verified, not encrypted) so the sector can be found on disk.
    fs::create_dir(m.path("plain")).unwrap();
    run(
        "setfattr",
        &["-n", "user.blocktree.encrypt", "-v", "off", "plain"],
        &m.path(""),
    );
    fs::write(m.path("plain/victim"), victim_content()).unwrap();
    let other: Vec<u8> = b"OTHERFILE|"
        .iter()
        .copied()
        .cycle()
        .take(200_000)
        .collect();
    fs::write(m.path("plain/other"), &other).unwrap();
    let secret: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(m.path("encrypted"), &secret).unwrap();
    m.unmount();

    let label = format!("BTSECTOR-{VICTIM:06}|");
    let copies = flip_every_copy(
        &volume.data().join("sectors").join("engine"),
        label.as_bytes(),
    );
    assert!(
        copies >= 1,
        "sector {VICTIM} of the victim was not found on disk"
    );
    let label = format!("BTSECTOR-{FORGED:06}|");
    let forged = forge_every_copy(
        &volume.data().join("sectors").join("engine"),
        label.as_bytes(),
    );
    assert!(
        forged >= 1,
        "sector {FORGED} of the victim was not found on disk"
    );

    let m = volume.mount(&[]);
    let victim = File::open(m.path("plain/victim")).unwrap();
    let mut failed = Vec::new();
    for i in 0..SECTORS {
        let mut buf = vec![0u8; SECTOR];
        match victim.read_exact_at(&mut buf, (i * SECTOR) as u64) {
            Ok(()) => assert!(buf == sector_content(i), "sector {i} read wrong data"),
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(EIO), "sector {i}: {error}");
                failed.push(i);
            }
        }
    }
    assert_eq!(
        failed,
        vec![FORGED, VICTIM],
        "exactly the tampered sectors fail"
    );
    // A read that spans the tampered sector fails as a whole, never returns it.
    let mut span = vec![0u8; 8 * SECTOR];
    let spanning = victim.read_exact_at(&mut span, ((VICTIM - 3) * SECTOR) as u64);
    assert_eq!(errno(spanning), EIO);
    assert_eq!(fs::read(m.path("plain/other")).unwrap(), other);
    assert_eq!(fs::read(m.path("encrypted")).unwrap(), secret);
    // The daemon logged why (the engine's checksum or the Merkle verification,
    // whichever catches it first), naming the sector.
    drop(victim);
    let stderr = m.stderr_text();
    m.unmount();
    let logged = |sector: usize, why: &str| {
        stderr
            .lines()
            .any(|line| line.contains(&format!("Data({sector})")) && line.contains(why))
    };
    assert!(
        logged(VICTIM, "corrupt"),
        "no checksum error for {VICTIM}: {stderr}"
    );
    assert!(
        logged(FORGED, "failed verification"),
        "no verification error for {FORGED}: {stderr}"
    );
}

#[test]
fn fsynced_data_survives_kill_9_of_the_daemon() {
    let volume = Volume::new();
    let m = volume.mount(&[]);
    let synced: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut file = File::create(m.path("synced.bin")).unwrap();
    file.write_all(&synced).unwrap();
    file.sync_all().unwrap(); // fsync
    let datasynced: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
    let mut file2 = File::create(m.path("datasynced.bin")).unwrap();
    file2.write_all(&datasynced).unwrap();
    file2.sync_data().unwrap(); // fdatasync
    fs::create_dir(m.path("dir")).unwrap();
    let mut file3 = File::create(m.path("dir/nested.txt")).unwrap();
    file3.write_all(b"nested and synced\n").unwrap();
    file3.sync_all().unwrap();
    // Written after the last fsync and never synced: may or may not survive.
    let mut unsynced = File::create(m.path("unsynced.bin")).unwrap();
    unsynced.write_all(&vec![7u8; 1 << 20]).unwrap();
    // The daemon dies with files still open and writes still buffered.
    m.kill9();
    drop((file, file2, file3, unsynced));

    let m = volume.mount(&[]);
    assert_eq!(fs::read(m.path("synced.bin")).unwrap(), synced);
    assert_eq!(fs::read(m.path("datasynced.bin")).unwrap(), datasynced);
    assert_eq!(
        fs::read_to_string(m.path("dir/nested.txt")).unwrap(),
        "nested and synced\n"
    );
    if let Ok(data) = fs::read(m.path("unsynced.bin")) {
        assert!(
            data.iter().all(|&b| b == 7),
            "unsynced.bin holds foreign bytes"
        );
    }
    // The volume is still fully usable.
    fs::write(m.path("after.txt"), "after the crash\n").unwrap();
    m.unmount();
    let m = volume.mount(&[]);
    assert_eq!(
        fs::read_to_string(m.path("after.txt")).unwrap(),
        "after the crash\n"
    );
    assert_eq!(fs::read(m.path("synced.bin")).unwrap(), synced);
    m.unmount();
}
