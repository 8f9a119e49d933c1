//! `blocktree volume create|list|resize|delete`, and what `blocktree up` then
//! serves.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod nbd_support;

use nbd_support::*;

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn volumes_are_created_listed_resized_and_deleted() {
    let data = Data::new();
    let dir = arg(&data.data());
    let list = data.blocktree_output(&["volume", "list", "--data", &dir]);
    assert!(!list.status.success());
    assert!(
        stderr_of(&list).contains("holds no appliance"),
        "{}",
        stderr_of(&list)
    );

    // The first create makes the domain too.
    let created = data.blocktree(&[
        "volume",
        "create",
        "db",
        "--size",
        "64M",
        "--block-size",
        "512",
        "--data",
        &dir,
    ]);
    assert!(created.contains("created volume: db"), "{created}");
    data.blocktree(&["volume", "create", "logs", "--size", "8M", "--data", &dir]);
    for (args, error) in [
        (vec!["create", "db"], "exists already"),
        (vec!["create", "../x"], "invalid volume name"),
        (vec!["create", ".hidden"], "invalid volume name"),
        (
            vec!["create", "odd", "--size", "1000"],
            "not a positive multiple",
        ),
        (
            vec!["create", "odd", "--block-size", "3000"],
            "invalid block size",
        ),
        (vec!["resize", "nope", "--size", "1M"], "no volume named"),
        (vec!["resize", "db", "--size", "32M"], "--shrink"),
        (vec!["delete", "nope"], "no volume named"),
    ] {
        let mut args: Vec<&str> = [&["volume"], args.as_slice()].concat();
        args.extend(["--data", &dir]);
        let output = data.blocktree_output(&args);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr_of(&output).contains(error),
            "{args:?}: {}",
            stderr_of(&output)
        );
    }
    let list = data.blocktree(&["volume", "list", "--data", &dir]);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["db", "67108864", "64", "MiB", "512"],
            vec!["logs", "8388608", "8", "MiB", "4096"]
        ],
        "{list}"
    );

    // `up` serves what exists (no vol0: the volumes directory was there already),
    // and holds the data directory while it runs.
    let up = data.up(&[]);
    assert!(
        up.field("volumes")
            .starts_with("db (64 MiB, 512-byte blocks), logs")
    );
    let busy = data.blocktree_output(&["volume", "list", "--data", &dir]);
    assert!(
        stderr_of(&busy).contains("in use by another blocktree process"),
        "{}",
        stderr_of(&busy)
    );
    let db = up.uri_of("db");
    let info = run_text("nbdinfo", &["--list", &db]);
    assert!(info.contains("export=\"db\""), "{info}");
    assert!(info.contains("export=\"logs\""), "{info}");
    assert!(!info.contains("vol0"), "{info}");
    let info = run_text("nbdinfo", &[&db]);
    assert!(info.contains("block_size_preferred: 512"), "{info}");
    assert!(info.contains("export-size: 67108864"), "{info}");
    // The default export is vol0 if it exists, else the only volume: here none.
    run_failing("nbdinfo", &[&up.uri_of("")]);
    run_failing("nbdinfo", &[&up.uri_of("vol0")]);
    run("qemu-io", &["-f", "raw", &db, "-c", "write -P 0x42 63M 1M"]);
    up.stop();

    // Growing keeps the data and reads as zeros past it; shrinking needs --shrink.
    let resized = data.blocktree(&["volume", "resize", "db", "--size", "128M", "--data", &dir]);
    assert!(resized.contains("64 MiB -> 128 MiB"), "{resized}");
    let up = data.up(&[]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &db_uri(&up),
            "-c",
            "read -P 0x42 63M 1M",
            "-c",
            "read -P 0 64M 64M",
        ],
    );
    up.stop();
    data.blocktree(&[
        "volume", "resize", "db", "--size", "32M", "--shrink", "--data", &dir,
    ]);
    data.blocktree(&["volume", "delete", "logs", "--data", &dir]);
    let list = data.blocktree(&["volume", "list", "--data", &dir]);
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.contains("33554432"), "{list}");

    // With a single volume, it is the default export.
    let up = data.up(&[]);
    let info = run_text("nbdinfo", &[&up.uri_of("")]);
    assert!(info.contains("export-size: 33554432"), "{info}");
    assert_eq!(up.uri, up.uri_of("db"));
    up.stop();
    data.blocktree(&["volume", "delete", "db", "--data", &dir]);
    let list = data.blocktree(&["volume", "list", "--data", &dir]);
    assert!(list.starts_with("no volumes"), "{list}");
}

fn db_uri(up: &Up) -> String {
    up.uri_of("db")
}
