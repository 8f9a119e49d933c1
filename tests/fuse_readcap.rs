//! Principals through btfuse: a second principal of the domain, mounting the same
//! data with its own credentials, gets EACCES on encrypted files until it is
//! granted a readcap on their directory (`blocktree readcap grant`); and a
//! principal whose writecap does not cover the store's directory cannot write.

// Helpers of a test, like its #[test] bodies, may unwrap (clippy.toml allows
// that in tests but cannot tell a helper from product code).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use fuse_support::*;
use std::fs::{self, OpenOptions};
use std::io::Write;

#[test]
fn a_principal_without_a_readcap_gets_eacces_until_granted_one_on_the_directory() {
    let volume = Volume::new();
    // A plaintext root whose new children are encrypted: `enc` is an encrypted
    // directory that principal B can reach but not open.
    let m = volume.mount(&["--no-encrypt"]);
    let root = m.root_principal();
    fs::write(m.path("plain.txt"), "anyone may read this\n").unwrap();
    run(
        "setfattr",
        &["-n", "user.blocktree.encrypt", "-v", "on", "."],
        &m.path(""),
    );
    fs::create_dir(m.path("enc")).unwrap();
    fs::write(m.path("enc/secret.txt"), "for readcap holders\n").unwrap();
    fs::create_dir(m.path("enc/deeper")).unwrap();
    fs::write(m.path("enc/deeper/more.txt"), "deeper secret\n").unwrap();
    m.unmount();

    let b = volume.principal("principal-b", &root, "");
    let m = volume.mount_as(&b, &[]);
    assert_eq!(
        fs::read_to_string(m.path("plain.txt")).unwrap(),
        "anyone may read this\n"
    );
    assert_eq!(errno(fs::read(m.path("enc/secret.txt"))), EACCES);
    assert_eq!(errno(fs::read(m.path("enc/deeper/more.txt"))), EACCES);
    m.unmount();

    let granted = volume.blocktree(&[
        "readcap",
        "grant",
        "--data",
        &arg(&volume.data()),
        "--path",
        "/enc",
        "--reader-store",
        &arg(&b),
    ]);
    assert!(granted.contains("readcap granted"), "{granted}");

    let m = volume.mount_as(&b, &[]);
    assert_eq!(
        fs::read_to_string(m.path("enc/secret.txt")).unwrap(),
        "for readcap holders\n"
    );
    assert_eq!(
        fs::read_to_string(m.path("enc/deeper/more.txt")).unwrap(),
        "deeper secret\n"
    );
    // B holds a writecap for the whole domain, so it may write there too.
    fs::write(m.path("enc/from-b.txt"), "written by B\n").unwrap();
    m.unmount();

    // The owner reads what B wrote.
    let m = volume.mount(&[]);
    assert_eq!(
        fs::read_to_string(m.path("enc/from-b.txt")).unwrap(),
        "written by B\n"
    );
    m.unmount();
}

#[test]
fn a_principal_whose_writecap_does_not_cover_the_store_gets_erofs() {
    let volume = Volume::new();
    let m = volume.mount(&["--no-encrypt"]);
    let root = m.root_principal();
    fs::write(m.path("existing.txt"), "existing\n").unwrap();
    m.unmount();

    // C may write only below /<root>/elsewhere, not the store's /<root>.
    let c = volume.principal("principal-c", &root, "elsewhere");
    let m = volume.mount_as(&c, &[]);
    assert_eq!(
        fs::read_to_string(m.path("existing.txt")).unwrap(),
        "existing\n"
    );
    assert_eq!(errno(fs::write(m.path("new.txt"), "x")), EROFS);
    assert_eq!(errno(fs::create_dir(m.path("dir"))), EROFS);
    assert_eq!(errno(fs::remove_file(m.path("existing.txt"))), EROFS);
    assert_eq!(
        errno(fs::rename(m.path("existing.txt"), m.path("moved.txt"))),
        EROFS
    );
    // Overwriting is refused at the latest when the data is committed (fsync).
    let overwrite = OpenOptions::new()
        .write(true)
        .open(m.path("existing.txt"))
        .and_then(|mut file| {
            file.write_all(b"changed!!")?;
            file.sync_all()
        });
    assert_eq!(errno(overwrite), EROFS);
    // Changes the file system buffered before refusing them cannot be made
    // durable at unmount either; the daemon may say so, but only about them.
    let (status, stderr) = m.stop();
    if !status.success() {
        assert!(
            stderr.contains("write refused") && stderr.contains("writecap covers"),
            "the daemon failed for another reason: {stderr}"
        );
    }
    let m = volume.mount(&[]);
    assert_eq!(
        fs::read_to_string(m.path("existing.txt")).unwrap(),
        "existing\n"
    );
    m.unmount();
}
