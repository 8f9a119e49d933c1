//! `blocktree up` served to the real NBD clients: libnbd's nbdinfo, nbdcopy and
//! nbdfuse, qemu-img and qemu-io, fio's nbd engine, the `nbd` crate's client, and
//! an ext4 file system made and checked through nbdfuse.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod nbd_support;

use nbd_support::*;
use std::fs;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn nbdinfo_lists_the_export_and_maps_holes_and_data() {
    let data = Data::new();
    let up = data.up(&[]);
    assert_eq!(up.uri, up.uri_of("vol0"));

    let list = run_text("nbdinfo", &["--list", &up.uri]);
    for needle in [
        "export=\"vol0\"",
        "export-size: 1073741824",
        "base:allocation",
        "block_size_minimum: 512",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "can_multi_conn: true",
        "can_fua: true",
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_cache: true",
        "can_df: true",
        "is_read_only: false",
        "encrypted and verified",
    ] {
        assert!(list.contains(needle), "{needle:?} missing from:\n{list}");
    }

    // A fresh volume is one hole.
    assert_eq!(map(&up.uri), [(0, GIB, true)]);

    // 64 KiB of data at 1 MiB; then 16 KiB trimmed out of it; 8 KiB of zeros that
    // must stay allocated (NO_HOLE) and 8 KiB that may be punched, at 2 MiB.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "write -P 0x61 1M 64k",
            "-c",
            "discard 1040k 16k",
            "-c",
            "write -z 2M 8k",
            "-c",
            "write -z -u 2056k 8k",
        ],
    );
    assert_eq!(
        map(&up.uri),
        [
            (0, MIB, true),
            (MIB, 16 * 1024, false),
            (MIB + 16 * 1024, 16 * 1024, true),
            (MIB + 32 * 1024, 32 * 1024, false),
            (MIB + 64 * 1024, MIB - 64 * 1024, true),
            (2 * MIB, 8 * 1024, false),
            (2 * MIB + 8 * 1024, GIB - 2 * MIB - 8 * 1024, true),
        ]
    );
    // Holes read as zeros, and so do trimmed blocks.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &up.uri,
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0x61 1M 16k",
            "-c",
            "read -P 0 1040k 16k",
            "-c",
            "read -P 0x61 1056k 32k",
            "-c",
            "read -P 0 2M 16k",
        ],
    );
    up.stop();
}

#[test]
fn qemu_img_converts_a_random_256_mib_image_in_and_back_out() {
    let data = Data::new();
    let up = data.up(&[]);
    let image = data.path("random.img");
    let original = random_bytes((256 * MIB) as usize, 0x5eed);
    fs::write(&image, &original).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &arg(&image),
            &up.uri,
        ],
    );
    assert_eq!(
        map(&up.uri),
        [(0, 256 * MIB, false), (256 * MIB, 768 * MIB, true)]
    );

    // Out again through a fresh server: what was written was committed.
    let (stdout, _) = up.stop();
    assert!(
        stdout.contains("stopped: every write is durable"),
        "{stdout}"
    );
    let up = data.up(&[]);
    let back = data.path("back.img");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &up.uri, &arg(&back)],
    );
    assert_eq!(fs::metadata(&back).unwrap().len(), GIB);
    run(
        "cmp",
        &["-n", &(256 * MIB).to_string(), &arg(&image), &arg(&back)],
    );
    // The rest of the volume reads as zeros.
    run(
        "cmp",
        &[
            "-n",
            &(768 * MIB).to_string(),
            "-i",
            &format!("{}:0", 256 * MIB),
            &arg(&back),
            "/dev/zero",
        ],
    );
    up.stop();
}

#[test]
fn qemu_io_patterns_read_back_verified() {
    let data = Data::new();
    let up = data.up(&[]);
    let uri = up.uri.clone();
    // Writes of every alignment the export allows (512 B minimum, 4 KiB sectors:
    // read-modify-write inside the server), many in flight at once (aio), FUA,
    // discards and zeroing, each read back and checked.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x11 0 4k",
            "-c",
            "write -P 0x22 4608 512",
            "-c",
            "write -P 0x33 7k 3k",
            "-c",
            "write -f -P 0x44 1M 1M",
            "-c",
            "aio_write -P 0x55 8M 64k",
            "-c",
            "aio_write -P 0x66 9M 64k",
            "-c",
            "aio_write -P 0x77 10M 128k",
            "-c",
            "aio_flush",
            "-c",
            "discard 1536k 512k",
            "-c",
            "write -z 8M 4k",
            "-c",
            "write -z -u 9M 64k",
            "-c",
            "flush",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x11 0 4k",
            "-c",
            "read -P 0 4k 512",
            "-c",
            "read -P 0x22 4608 512",
            "-c",
            "read -P 0 5k 2k",
            "-c",
            "read -P 0x33 7k 3k",
            "-c",
            "read -P 0 10k 2k",
            "-c",
            "read -P 0x44 1M 512k",
            "-c",
            "read -P 0 1536k 512k",
            "-c",
            "read -P 0 8M 4k",
            "-c",
            "read -P 0x55 8196k 60k",
            "-c",
            "read -P 0 9M 64k",
            "-c",
            "read -P 0x77 10M 128k",
        ],
    );
    // The same, through the `nbd` crate's client (NBD_OPT_EXPORT_NAME, simple
    // replies): an independent implementation of the protocol.
    let mut client = Client::connect(&up.address(), "vol0");
    assert_eq!(client.size(), GIB);
    assert_eq!(client.read_at(4608, 512), vec![0x22; 512]);
    let pattern = random_bytes(300 * 1024, 3);
    client.write_at(20 * MIB + 512, &pattern);
    client.flush();
    assert_eq!(client.read_at(20 * MIB + 512, pattern.len()), pattern);
    run("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0 20M 512"]);
    up.stop();
}

#[test]
fn nbdcopy_copies_in_and_out() {
    let data = Data::new();
    let up = data.up(&[]);
    let source = data.path("source.img");
    let original = random_bytes((64 * MIB) as usize, 0xc0de);
    fs::write(&source, &original).unwrap();
    run("nbdcopy", &[&arg(&source), &up.uri]);
    let copy = data.path("copy.img");
    run("nbdcopy", &[&up.uri, &arg(&copy)]);
    assert_eq!(fs::metadata(&copy).unwrap().len(), GIB);
    run(
        "cmp",
        &["-n", &(64 * MIB).to_string(), &arg(&source), &arg(&copy)],
    );
    run(
        "cmp",
        &[
            "-n",
            &(GIB - 64 * MIB).to_string(),
            "-i",
            &format!("{}:0", 64 * MIB),
            &arg(&copy),
            "/dev/zero",
        ],
    );
    up.stop();
}

#[test]
fn fio_verifies_crc32c_with_several_jobs_on_one_export() {
    need("fio");
    let data = Data::new();
    let up = data.up(&[]);
    // Four jobs, each on its own 32 MiB, 16 requests in flight each, random 4 KiB
    // writes then a verifying read of every block; and one job of 1 MiB
    // sequential writes beside them.
    let output = run_text(
        "fio",
        &[
            "--name=random",
            "--ioengine=nbd",
            &format!("--uri={}", up.uri),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--offset_increment=32m",
            "--numjobs=4",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No state files in the working directory.
            "--verify_state_save=0",
            "--name=sequential",
            "--ioengine=nbd",
            &format!("--uri={}", up.uri),
            "--rw=write",
            "--bs=1m",
            "--offset=512m",
            "--size=64m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No state files in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(!output.contains("verify: bad"), "{output}");
    assert!(output.contains("err= 0"), "{output}");
    assert!(!output.contains("err= 5"), "{output}");
    up.stop();
}

#[test]
fn nbdfuse_carries_an_ext4_file_system() {
    need("nbdfuse");
    need("fusermount3");
    let data = Data::new();
    let up = data.up(&[]);
    let mountpoint = data.path("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let disk = mountpoint.join("disk");
    let content = random_bytes(3 * MIB as usize + 123, 77);
    fs::write(data.path("content"), &content).unwrap();
    {
        let _fuse = NbdFuse::mount(&disk, &up.uri);
        run("mkfs.ext4", &["-q", "-F", &arg(&disk)]);
        run(
            "debugfs",
            &[
                "-w",
                "-R",
                &format!("write {} content", arg(&data.path("content"))),
                &arg(&disk),
            ],
        );
    }
    // Through a restarted server and a fresh mount, so nothing comes from a cache.
    up.stop();
    let up = data.up(&[]);
    let _fuse = NbdFuse::mount(&disk, &up.uri);
    run("e2fsck", &["-f", "-n", &arg(&disk)]);
    let out = data.path("out");
    run(
        "debugfs",
        &["-R", &format!("dump content {}", arg(&out)), &arg(&disk)],
    );
    assert_eq!(fs::read(&out).unwrap(), content);
}

#[test]
fn a_unix_socket_serves_the_same_export() {
    let data = Data::new();
    let socket = data.path("nbd.sock");
    let up = data.up(&["--nbd-socket", &arg(&socket)]);
    let unix_uri = format!("nbd+unix:///vol0?socket={}", arg(&socket));
    assert_eq!(up.field("nbd socket"), unix_uri);
    run(
        "qemu-io",
        &["-f", "raw", &unix_uri, "-c", "write -P 0x7e 0 64k"],
    );
    run(
        "qemu-io",
        &["-f", "raw", &up.uri, "-c", "read -P 0x7e 0 64k"],
    );
    let info = run_text("nbdinfo", &[&unix_uri]);
    assert!(info.contains("export-size: 1073741824"), "{info}");
    up.stop();
    assert!(!socket.exists(), "the socket is removed when up stops");
}

/// An nbdfuse mount of an export as one file; unmounted on drop.
struct NbdFuse {
    child: std::process::Child,
    mountpoint: std::path::PathBuf,
}

impl NbdFuse {
    fn mount(file: &std::path::Path, uri: &str) -> NbdFuse {
        let mountpoint = file.parent().unwrap().to_owned();
        let child = std::process::Command::new("nbdfuse")
            .arg(file)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !file.exists() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "nbdfuse did not mount {}",
                file.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        NbdFuse { child, mountpoint }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status();
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
