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
    // While it runs, `volume` asks it through its control socket.
    let live = data.blocktree(&["volume", "list", "--data", &dir]);
    assert!(
        live.starts_with("NAME") && live.contains("CONNECTIONS"),
        "{live}"
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

/// The rows of a `volume list` made while `up` runs: name and connections.
fn live_rows(list: &str) -> Vec<(String, u32)> {
    list.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let connections = fields.last().unwrap().parse().unwrap();
            (fields[0].to_owned(), connections)
        })
        .collect()
}

#[test]
fn volumes_are_managed_while_up_serves_them() {
    let data = Data::new();
    let dir = arg(&data.data());
    let up = data.up(&[]);
    let socket = data.data().join("control.sock");
    assert!(up.field("control socket").ends_with("/control.sock"));

    // Created while up runs: exported at once, with its own block size.
    let created = data.blocktree(&[
        "volume",
        "create",
        "live",
        "--size",
        "16M",
        "--block-size",
        "512",
        "--data",
        &dir,
    ]);
    assert!(created.contains("served now by the running"), "{created}");
    let info = run_text("nbdinfo", &[&up.uri_of("live")]);
    assert!(info.contains("export-size: 16777216"), "{info}");
    assert!(info.contains("block_size_preferred: 512"), "{info}");
    run(
        "qemu-io",
        &["-f", "raw", &up.uri_of("live"), "-c", "write -P 0x5a 1M 1M"],
    );

    // A connection holds it: no delete, no shrink; growing is fine.
    let mut client = Client::connect(&up.address(), "live");
    assert_eq!(client.read_at(1 << 20, 4096), vec![0x5a; 4096]);
    let list = data.blocktree(&["volume", "list", "--data", &dir]);
    assert_eq!(
        live_rows(&list),
        [("live".to_owned(), 1), ("vol0".to_owned(), 0)],
        "{list}"
    );
    for args in [
        vec!["volume", "delete", "live"],
        vec!["volume", "resize", "live", "--size", "8M", "--shrink"],
    ] {
        let mut args = args;
        args.extend(["--data", &dir]);
        let refused = data.blocktree_output(&args);
        assert!(!refused.status.success(), "{args:?} succeeded");
        assert!(
            stderr_of(&refused).contains("is open on 1 NBD connection(s)"),
            "{args:?}: {}",
            stderr_of(&refused)
        );
    }
    let grown = data.blocktree(&["volume", "resize", "live", "--size", "32M", "--data", &dir]);
    assert!(grown.contains("16 MiB -> 32 MiB"), "{grown}");
    assert!(grown.contains("keep the size they negotiated"), "{grown}");
    assert_eq!(client.size(), 16 << 20);
    drop(client);

    // Garbage on the control socket gets an error reply; the server goes on.
    {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream.write_all(&[0, 0, 0, 3, 7, 7, 7]).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert!(reply.len() > 6, "{reply:?}");
        let mut huge = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        huge.write_all(&u32::MAX.to_be_bytes()).unwrap();
    }

    // Once the connection is gone, the volume can be deleted.
    let started = std::time::Instant::now();
    loop {
        let list = data.blocktree(&["volume", "list", "--data", &dir]);
        if live_rows(&list).contains(&("live".to_owned(), 0)) {
            break;
        }
        assert!(started.elapsed().as_secs() < 20, "still open: {list}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let info = run_text("nbdinfo", &[&up.uri_of("live")]);
    assert!(info.contains("export-size: 33554432"), "{info}");
    data.blocktree(&["volume", "delete", "live", "--data", &dir]);
    run_failing("nbdinfo", &[&up.uri_of("live")]);
    run("qemu-io", &["-f", "raw", &up.uri, "-c", "write -P 1 0 64k"]);
    up.stop();
    assert!(!socket.exists(), "the control socket is removed on exit");

    // The deletion and vol0's data outlive the server.
    let list = data.blocktree(&["volume", "list", "--data", &dir]);
    assert!(!list.contains("live") && list.contains("vol0"), "{list}");
}

fn db_uri(up: &Up) -> String {
    up.uri_of("db")
}
