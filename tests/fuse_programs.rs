//! btfuse under real programs: cp -a and diff -r of a source tree, tar round
//! trips, git, and sqlite3, each checked again after an unmount and remount
//! (so what is compared comes from the store, not from the kernel's cache).

// Helpers of a test, like its #[test] bodies, may unwrap (clippy.toml allows
// that in tests but cannot tell a helper from product code).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use fuse_support::{Volume, run, shell, source_tree};
use std::fs;

#[test]
fn cp_a_of_a_source_tree_diffs_equal_before_and_after_remount() {
    let volume = Volume::new();
    let mount = volume.mount(&[]);
    let copy = mount.path("tree");
    fs::create_dir(&copy).unwrap();
    for tree in ["core", "engine"] {
        run(
            "cp",
            &["-a", &fuse_support::arg(&source_tree(tree)), "tree/"],
            &mount.path(""),
        );
        run(
            "diff",
            &[
                "-r",
                &fuse_support::arg(&source_tree(tree)),
                &format!("tree/{tree}"),
            ],
            &mount.path(""),
        );
    }
    // cp -a keeps modes and times: compare them too.
    let listing = |dir: &std::path::Path| {
        shell(
            "find . -printf '%p %M %s %TY-%Tm-%Td %TH:%TM:%TS\\n' | sort",
            dir,
        )
    };
    let original = listing(&source_tree("core"));
    assert_eq!(listing(&copy.join("core")), original);
    mount.unmount();

    let mount = volume.mount(&[]);
    for tree in ["core", "engine"] {
        run(
            "diff",
            &[
                "-r",
                &fuse_support::arg(&source_tree(tree)),
                &format!("tree/{tree}"),
            ],
            &mount.path(""),
        );
    }
    assert_eq!(listing(&mount.path("tree/core")), original);
    mount.unmount();
}

#[test]
fn tar_create_and_extract_round_trip() {
    let volume = Volume::new();
    let mount = volume.mount(&[]);
    let source = fuse_support::arg(&source_tree("core"));
    // Archive into the mount, extract inside the mount, compare.
    shell(
        &format!(
            "tar -C {source}/.. -cf archive.tar core && mkdir out && tar -C out -xf archive.tar"
        ),
        &mount.path(""),
    );
    run("diff", &["-r", &source, "out/core"], &mount.path(""));
    // Archive the mounted tree out to the host, extract there, compare.
    let host = volume.path("host");
    fs::create_dir(&host).unwrap();
    shell(
        &format!(
            "tar -C {} -cf {}/from-mount.tar core && tar -C {} -xf {}/from-mount.tar",
            fuse_support::arg(&mount.path("out")),
            fuse_support::arg(&host),
            fuse_support::arg(&host),
            fuse_support::arg(&host)
        ),
        &host,
    );
    run("diff", &["-r", &source, "core"], &host);
    mount.unmount();

    let mount = volume.mount(&[]);
    let listed = shell("tar -tvf archive.tar | wc -l", &mount.path(""));
    let expected = shell(
        &format!("tar -C {source}/.. -cf - core | tar -tv | wc -l"),
        &host,
    );
    assert_eq!(listed, expected);
    run("diff", &["-r", &source, "out/core"], &mount.path(""));
    mount.unmount();
}

#[test]
fn git_init_commit_and_fsck() {
    let volume = Volume::new();
    let mount = volume.mount(&[]);
    let repo = mount.path("repo");
    fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let mut full = vec![
            "-c",
            "user.name=Blocktree Test",
            "-c",
            "user.email=test@blocktree.invalid",
            "-c",
            "init.defaultBranch=main",
        ];
        full.extend_from_slice(args);
        run("git", &full, &repo)
    };
    git(&["init", "-q"]);
    run(
        "cp",
        &["-a", &fuse_support::arg(&source_tree("fs")), "."],
        &repo,
    );
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "the filesystem service"]);
    fs::write(
        repo.join("fs/README.md"),
        "changed inside a Blocktree mount\n",
    )
    .unwrap();
    fs::rename(repo.join("fs/Cargo.toml"), repo.join("fs/Cargo.toml.moved")).unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "change, rename"]);
    git(&["gc", "-q"]);
    git(&["fsck", "--full", "--strict"]);
    mount.unmount();

    let mount = volume.mount(&[]);
    let repo = mount.path("repo");
    let run_git = |args: &[&str]| run("git", args, &repo);
    run_git(&["fsck", "--full", "--strict"]);
    let log = run_git(&["log", "--format=%s"]);
    assert_eq!(
        String::from_utf8_lossy(&log.stdout),
        "change, rename\nthe filesystem service\n"
    );
    let status = run_git(&["status", "--porcelain"]);
    assert!(
        status.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&status.stdout)
    );
    mount.unmount();
}

#[test]
fn sqlite3_ten_thousand_inserts_pass_integrity_check() {
    let volume = Volume::new();
    let mut script = String::from(
        "PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, n INTEGER);\n\
         CREATE INDEX t_name ON t(name);\nBEGIN;\n",
    );
    for i in 0..10_000 {
        script.push_str(&format!(
            "INSERT INTO t(name, n) VALUES('row {i:05}', {i});\n"
        ));
    }
    script.push_str("COMMIT;\n");
    fs::write(volume.path("inserts.sql"), script).unwrap();
    let mount = volume.mount(&[]);
    let db = mount.path("test.db");
    let sqlite = |sql: &str| {
        let output = run("sqlite3", &[&fuse_support::arg(&db), sql], &volume.path(""));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    sqlite(&format!(
        ".read {}",
        fuse_support::arg(&volume.path("inserts.sql"))
    ));
    sqlite("UPDATE t SET n = n * 2 WHERE id % 7 = 0; DELETE FROM t WHERE id % 10 = 3;");
    assert_eq!(sqlite("PRAGMA integrity_check;"), "ok");
    assert_eq!(sqlite("SELECT count(*), sum(n) FROM t;"), expected_counts());
    mount.unmount();

    let mount = volume.mount(&[]);
    let db = mount.path("test.db");
    let sqlite = |sql: &str| {
        let output = run("sqlite3", &[&fuse_support::arg(&db), sql], &volume.path(""));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(sqlite("PRAGMA integrity_check;"), "ok");
    assert_eq!(sqlite("SELECT count(*), sum(n) FROM t;"), expected_counts());
    mount.unmount();
}

/// The count and sum the SQL above leaves, computed independently.
fn expected_counts() -> String {
    let mut count = 0u64;
    let mut sum = 0u64;
    for i in 0..10_000u64 {
        let id = i + 1;
        if id % 10 == 3 {
            continue;
        }
        count += 1;
        sum += if id % 7 == 0 { 2 * i } else { i };
    }
    format!("{count}|{sum}")
}
