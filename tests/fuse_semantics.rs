//! POSIX semantics through btfuse: rename, hard links, symlinks, unlinked open
//! files, xattrs, read-only mounts, and a non-root user refused where the mode
//! bits say so (btfuse passes no `default_permissions`: Blocktree's Authorizer
//! decides).

// Helpers of a test, like its #[test] bodies, may unwrap (clippy.toml allows
// that in tests but cannot tell a helper from product code).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use fuse_support::*;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Checks rename, link and symlink results; run once on the live mount and once
/// after a remount.
fn check_namespace(m: &Mount) {
    assert_eq!(read(&m.path("renamed.txt")), "source\n");
    assert!(!m.path("source.txt").exists());
    assert_eq!(read(&m.path("b/moved.txt")), "moved\n");
    assert_eq!(read(&m.path("dir2/inner/file")), "inner\n");
    assert!(!m.path("dir1").exists());

    let original = fs::metadata(m.path("original")).unwrap();
    let linked = fs::metadata(m.path("b/hardlink")).unwrap();
    assert_eq!(original.ino(), linked.ino());
    assert_eq!(original.nlink(), 2);
    assert_eq!(
        read(&m.path("b/hardlink")),
        "written through the original\nand through the link\n"
    );

    assert_eq!(
        fs::read_link(m.path("rel-link")).unwrap(),
        Path::new("b/moved.txt")
    );
    assert_eq!(read(&m.path("rel-link")), "moved\n");
    assert_eq!(read(&m.path("dir-link/inner/file")), "inner\n");
    assert!(
        fs::symlink_metadata(m.path("dangling"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(errno(fs::read(m.path("dangling"))), ENOENT);
    assert_eq!(errno(fs::read(m.path("loop-a"))), ELOOP);
    let long_target = "x/".repeat(500) + "end";
    assert_eq!(
        fs::read_link(m.path("long-link")).unwrap(),
        Path::new(&long_target)
    );
}

#[test]
fn rename_link_and_symlink_semantics() {
    let volume = Volume::new();
    let m = volume.mount(&[]);
    let p = |name: &str| m.path(name);

    // rename: replaces the target atomically; the replaced inode lives on while open.
    fs::write(p("source.txt"), "source\n").unwrap();
    fs::write(p("renamed.txt"), "old target\n").unwrap();
    let mut still_open = File::open(p("renamed.txt")).unwrap();
    let source_ino = fs::metadata(p("source.txt")).unwrap().ino();
    fs::rename(p("source.txt"), p("renamed.txt")).unwrap();
    assert_eq!(fs::metadata(p("renamed.txt")).unwrap().ino(), source_ino);
    let mut old = String::new();
    still_open.read_to_string(&mut old).unwrap();
    assert_eq!(old, "old target\n");
    drop(still_open);

    // rename across directories, of directories, and the refusals.
    fs::create_dir_all(p("a")).unwrap();
    fs::create_dir_all(p("b")).unwrap();
    fs::write(p("a/moved.txt"), "moved\n").unwrap();
    fs::rename(p("a/moved.txt"), p("b/moved.txt")).unwrap();
    fs::create_dir_all(p("dir1/inner")).unwrap();
    fs::write(p("dir1/inner/file"), "inner\n").unwrap();
    fs::create_dir(p("dir2")).unwrap();
    fs::rename(p("dir1"), p("dir2")).unwrap(); // over an empty directory
    fs::create_dir(p("full")).unwrap();
    fs::write(p("full/x"), "x").unwrap();
    assert_eq!(errno(fs::rename(p("a"), p("full"))), ENOTEMPTY);
    assert_eq!(errno(fs::rename(p("renamed.txt"), p("a"))), EISDIR);
    assert_eq!(errno(fs::rename(p("a"), p("renamed.txt"))), ENOTDIR);
    assert_eq!(errno(fs::rename(p("dir2"), p("dir2/inner/sub"))), EINVAL);
    assert_eq!(errno(fs::rename(p("nothing"), p("something"))), ENOENT);
    assert_eq!(
        errno(fs::rename(p("renamed.txt"), "/tmp/btfuse-elsewhere")),
        EXDEV
    );
    assert_eq!(errno(fs::remove_dir(p("full"))), ENOTEMPTY);

    // Hard links share the inode and its data.
    fs::write(p("original"), "written through the original\n").unwrap();
    fs::hard_link(p("original"), p("b/hardlink")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(p("b/hardlink"))
        .unwrap()
        .write_all(b"and through the link\n")
        .unwrap();
    assert_eq!(
        errno(fs::hard_link(p("original"), p("b/moved.txt"))),
        EEXIST
    );
    assert_eq!(errno(fs::hard_link(p("a"), p("dir-hardlink"))), EPERM);
    fs::hard_link(p("original"), p("third")).unwrap();
    assert_eq!(fs::metadata(p("original")).unwrap().nlink(), 3);
    fs::remove_file(p("third")).unwrap();

    // Symlinks: relative, to a directory, dangling, loops, long targets.
    symlink("b/moved.txt", p("rel-link")).unwrap();
    symlink("dir2", p("dir-link")).unwrap();
    symlink("does/not/exist", p("dangling")).unwrap();
    symlink("loop-b", p("loop-a")).unwrap();
    symlink("loop-a", p("loop-b")).unwrap();
    symlink("x/".repeat(500) + "end", p("long-link")).unwrap();
    assert_eq!(errno(symlink("anything", p("rel-link"))), EEXIST);
    let link_meta = fs::symlink_metadata(p("rel-link")).unwrap();
    assert_eq!(link_meta.len(), "b/moved.txt".len() as u64);
    assert_eq!(link_meta.permissions().mode() & 0o777, 0o777);

    // An unlinked file stays readable and writable through its open descriptor.
    fs::write(p("doomed"), "still here").unwrap();
    let mut doomed = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("doomed"))
        .unwrap();
    fs::remove_file(p("doomed")).unwrap();
    assert!(!p("doomed").exists());
    doomed.seek(SeekFrom::End(0)).unwrap();
    doomed.write_all(b" and more").unwrap();
    doomed.seek(SeekFrom::Start(0)).unwrap();
    let mut text = String::new();
    doomed.read_to_string(&mut text).unwrap();
    assert_eq!(text, "still here and more");
    drop(doomed);

    check_namespace(&m);
    m.unmount();
    let m = volume.mount(&[]);
    check_namespace(&m);
    assert!(!m.path("doomed").exists());
    m.unmount();
}

#[test]
fn special_files_times_modes_and_xattrs() {
    let volume = Volume::new();
    let m = volume.mount(&[]);
    run("mkfifo", &["fifo"], &m.path(""));
    assert!(shell("stat -c %F fifo", &m.path("")).starts_with("fifo"));
    fs::write(m.path("f"), "0123456789").unwrap();
    run("truncate", &["-s", "4", "f"], &m.path(""));
    run(
        "touch",
        &["-d", "2001-02-03 04:05:06.789", "f"],
        &m.path(""),
    );
    run("chmod", &["4751", "f"], &m.path(""));
    run(
        "setfattr",
        &["-n", "user.colour", "-v", "blue", "f"],
        &m.path(""),
    );
    run(
        "setfattr",
        &["-n", "user.gone", "-v", "x", "f"],
        &m.path(""),
    );
    run("setfattr", &["-x", "user.gone", "f"], &m.path(""));
    // Writing clears the set-user-id bit, as on any file system.
    fs::write(m.path("g"), "g").unwrap();
    run("chmod", &["4755", "g"], &m.path(""));
    OpenOptions::new()
        .append(true)
        .open(m.path("g"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    let check = |m: &Mount| {
        let f = fs::metadata(m.path("f")).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f.mode() & 0o7777, 0o4751);
        assert_eq!((f.mtime(), f.mtime_nsec()), (981_173_106, 789_000_000));
        let xattrs = shell("getfattr -d f", &m.path(""));
        assert!(xattrs.contains("user.colour=\"blue\""), "{xattrs}");
        assert!(!xattrs.contains("user.gone"), "{xattrs}");
        assert_eq!(fs::metadata(m.path("g")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(read(&m.path("g")), "g!");
        assert_eq!(read(&m.path("f")), "0123");
    };
    check(&m);
    m.unmount();
    let m = volume.mount(&[]);
    check(&m);
    m.unmount();
}

#[test]
fn read_only_mount_refuses_changes_with_erofs() {
    let volume = Volume::new();
    let m = volume.mount(&[]);
    fs::write(m.path("kept"), "kept\n").unwrap();
    m.unmount();
    let m = volume.mount(&["-o", "ro"]);
    assert!(m.field("mode").starts_with("read-only"));
    // One process per store: a second mount of the same data is refused.
    let second = std::process::Command::new(BLOCKTREE)
        .args([
            "mount",
            &arg(&volume.path("")),
            "--data",
            &arg(&volume.data()),
        ])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another blocktree process"),
        "{stderr}"
    );
    assert_eq!(read(&m.path("kept")), "kept\n");
    assert_eq!(errno(fs::write(m.path("new"), "x")), EROFS);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(m.path("kept"))),
        EROFS
    );
    assert_eq!(errno(fs::remove_file(m.path("kept"))), EROFS);
    assert_eq!(errno(fs::create_dir(m.path("d"))), EROFS);
    m.unmount();
}

/// Runs `sh -c script` in `dir` as user and group 65534 (nobody) with no
/// supplementary groups; returns (success, stderr).
fn as_nobody(script: &str, dir: &Path) -> (bool, String) {
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn non_root_user_is_refused_where_mode_bits_say_so() {
    let volume = Volume::new();
    let m = volume.mount(&["-o", "allow_other"]);
    let dir = m.path("");
    fs::write(m.path("public"), "public\n").unwrap();
    fs::write(m.path("private"), "private\n").unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(m.path("closed")).unwrap();
    fs::write(m.path("closed/inside"), "inside\n").unwrap();
    fs::set_permissions(m.path("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir(m.path("sticky")).unwrap();
    fs::set_permissions(m.path("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(m.path("sticky/roots"), "root's\n").unwrap();
    fs::set_permissions(m.path("sticky/roots"), fs::Permissions::from_mode(0o666)).unwrap();

    // Allowed by the mode bits.
    for allowed in [
        "cat public",
        "ls -la . shared",
        "echo mine > shared/mine && cat shared/mine && chmod 600 shared/mine",
        "mkdir shared/sub && rmdir shared/sub",
        "echo more >> sticky/roots",
    ] {
        let (ok, stderr) = as_nobody(allowed, &dir);
        assert!(ok, "nobody should be allowed `{allowed}`: {stderr}");
    }
    // Refused by them.
    for refused in [
        "cat private",
        "echo x >> public",
        "echo x > new-in-root",
        "mkdir new-dir",
        "rm public",
        "mv public elsewhere",
        "ls closed",
        "cat closed/inside",
        "chmod 777 public",
        "touch -d 2000-01-01 public",
        "rm sticky/roots",
        "setfattr -n user.x -v y public",
    ] {
        let (ok, stderr) = as_nobody(refused, &dir);
        assert!(!ok, "nobody should be refused `{refused}`");
        assert!(
            stderr.contains("Permission denied") || stderr.contains("Operation not permitted"),
            "`{refused}` failed for another reason: {stderr}"
        );
    }
    // Taking search away from a directory takes effect at once, even for names
    // the kernel had cached while everyone could search it.
    fs::create_dir(m.path("closing")).unwrap();
    fs::write(m.path("closing/file"), "was public\n").unwrap();
    let (ok, stderr) = as_nobody("cat closing/file", &dir);
    assert!(ok, "{stderr}");
    fs::set_permissions(m.path("closing"), fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, _) = as_nobody("cat closing/file", &dir);
    assert!(
        !ok,
        "nobody still reads through a directory it may no longer search"
    );

    // Root still reads nobody's 0600 file; nothing refused was done.
    assert_eq!(read(&m.path("shared/mine")), "mine\n");
    assert_eq!(fs::metadata(m.path("shared/mine")).unwrap().uid(), 65534);
    assert_eq!(read(&m.path("public")), "public\n");
    assert_eq!(read(&m.path("sticky/roots")), "root's\nmore\n");
    assert!(!m.path("new-in-root").exists() && !m.path("new-dir").exists());
    m.unmount();

    // Without allow_other, the kernel keeps other users out altogether.
    let m = volume.mount(&[]);
    let (ok, _) = as_nobody("cat public", &m.path(""));
    assert!(!ok, "without allow_other, nobody must not get in");
    m.unmount();
}

#[test]
fn mount_refuses_what_it_cannot_do_with_one_error_line() {
    let volume = Volume::new();
    let data = arg(&volume.data());
    let missing = arg(&volume.path("no-such-dir"));
    let mnt = arg(&volume.mountpoint());
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["mount", &missing, "--data", &data],
            "is not an existing directory",
        ),
        (
            vec!["mount", &mnt, "--data", &data, "-o", "default_permissions"],
            "invalid mount option \"default_permissions\"",
        ),
        (
            vec!["mount", &mnt, "--data", &data, "-o", "threads=0"],
            "invalid mount option \"threads=0\"",
        ),
        (
            vec!["mount", &mnt, "--connect", "10.0.0.1:4433"],
            "not built yet",
        ),
    ];
    for (args, expected) in cases {
        let output = Command::new(BLOCKTREE)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(expected),
            "{args:?}: {stderr}"
        );
    }
    assert!(!is_mounted(&volume.mountpoint().canonicalize().unwrap()));
}
