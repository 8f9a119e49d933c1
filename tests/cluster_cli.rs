//! `blocktree up --listen`, `join`, `cluster status`, `leave` and a readcap
//! granted by a running server: three real servers (processes) on 127.0.0.1
//! form one cluster; NBD clients write through the first and read through
//! all; the leader is SIGKILLed and the others elect one of themselves; the
//! killed one comes back as a follower whose writes are forwarded; a member
//! leaves. Servers of directories below the root get their generation
//! numbers from the root directory's cluster (`up --root-cluster`).

mod nbd_support;

use nbd_support::{Client, Data, Up, arg};
use std::time::{Duration, Instant};

/// The `--listen` address from the `cluster:` line of `up`'s report.
fn listen_of(up: &Up) -> String {
    let line = up.field("cluster");
    line.split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no listening address in {line:?}"))
        .to_owned()
}

/// `cluster status --json` of the server in `data`.
fn status(data: &Data) -> serde_json::Value {
    let out = data.blocktree(&["cluster", "status", "--data", &arg(&data.data()), "--json"]);
    serde_json::from_str(&out).expect("status is JSON")
}

/// Waits until the server in `data` sees `voters` voters and a leader.
fn wait_for_cluster(data: &Data, voters: usize) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = status(data);
        let counted = status["members"].as_array().map_or(0, |members| {
            members.iter().filter(|m| m["voter"] == true).count()
        });
        if counted == voters && !status["leader"].is_null() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cluster did not reach {voters} voters with a leader: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server in `data` knows a leader other than `old`.
fn wait_for_new_leader(data: &Data, old: &serde_json::Value) {
    let started = Instant::now();
    loop {
        let view = status(data);
        if !view["leader"].is_null() && view["leader"] != *old {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no leader other than {old}: {view}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Grants the server to be started in `joiner` a writecap for `/<root>/<name>`
/// (the whole directory, `/<root>`, when `name` is empty) with the root
/// credentials in `first`'s store, and a readcap on everything.
fn grant(first: &Data, joiner: &Data, root: &str, name: &str) {
    let store = arg(&joiner.data().join("credentials"));
    let request = arg(&joiner.path("server.request"));
    let writecap = arg(&joiner.path("server.writecap"));
    joiner.blocktree(&["provision", "new-runtime", "--store", &store]);
    joiner.blocktree(&[
        "provision",
        "request",
        "--store",
        &store,
        "--path",
        &if name.is_empty() {
            format!("/{root}")
        } else {
            format!("/{root}/{name}")
        },
        "--out",
        &request,
    ]);
    first.blocktree(&[
        "provision",
        "approve",
        "--store",
        &arg(&first.data().join("credentials")),
        "--request",
        &request,
        "--out",
        &writecap,
    ]);
    joiner.blocktree(&[
        "provision",
        "import",
        "--store",
        &store,
        "--writecap",
        &writecap,
    ]);
    // And lets it read the volumes, which are encrypted: asked of the running
    // first server, through its control socket.
    let granted = first.blocktree(&[
        "readcap",
        "grant",
        "--data",
        &arg(&first.data()),
        "--path",
        "/",
        "--reader-store",
        &store,
    ]);
    assert!(granted.contains("granted by:"), "{granted}");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` at `offset` of vol0 through the server at `address`, flushed.
fn write_through(address: &str, offset: u64, data: &[u8]) {
    let mut client = Client::connect(address, "vol0");
    client.write_at(offset, data);
    client.flush();
}

fn read_through(address: &str, offset: u64, len: usize) -> Vec<u8> {
    Client::connect(address, "vol0").read_at(offset, len)
}

#[test]
fn three_servers_replicate_fail_over_catch_up_and_one_leaves() {
    let first = Data::new();
    let a = first.up(&["--listen", "127.0.0.1:0"]);
    let a_listen = listen_of(&a);
    let root = root_of(&a);
    let alone = status(&first);
    let a_node = alone["node"].clone();
    assert_eq!(alone["role"], "Leader", "{alone}");
    assert_eq!(alone["members"][0]["address"], a_listen.as_str());

    // Before anyone joins, a write through A.
    let early = pattern(1, 64 << 10);
    write_through(&a.address(), 0, &early);

    let (second, third) = (Data::new(), Data::new());
    // B holds the directory's writecap, like A; C one for a path inside it.
    grant(&first, &second, &root, "");
    grant(&first, &third, &root, "c");
    let b = second.serve("join", &["--listen", "127.0.0.1:0", &a_listen]);
    assert!(
        b.field("cluster").starts_with("joined as member"),
        "{}",
        b.field("cluster")
    );
    let c = third.serve("join", &["--listen", "127.0.0.1:0", &a_listen]);
    let view = wait_for_cluster(&first, 3);
    assert_eq!(view["leader"], view["node"], "A still leads: {view}");

    // The joiners received what A held by snapshot, and serve it.
    assert_eq!(read_through(&b.address(), 0, early.len()), early);
    assert_eq!(read_through(&c.address(), 0, early.len()), early);
    // C's writecap lies inside the cluster's directory without covering it:
    // it stores and serves, but signs no writes, and says so.
    assert!(
        c.field("writes")
            .starts_with("refused, volumes served read-only")
    );
    // A write through A reaches every member, also one that cached vol0 before.
    let rewritten = pattern(2, 128 << 10);
    write_through(&a.address(), 0, &rewritten);
    assert_eq!(read_through(&b.address(), 0, rewritten.len()), rewritten);
    assert_eq!(read_through(&c.address(), 0, rewritten.len()), rewritten);
    // B, a follower holding the directory's writecap, signs writes of its
    // own (forwarded to the leader) that every member serves.
    let from_b = pattern(3, 64 << 10);
    write_through(&b.address(), 2 << 20, &from_b);
    assert_eq!(read_through(&a.address(), 2 << 20, from_b.len()), from_b);
    assert_eq!(read_through(&c.address(), 2 << 20, from_b.len()), from_b);

    // The leader dies: B and C elect one of themselves, still serve, and
    // B still takes writes: the cluster writes on without its first server.
    a.kill9();
    wait_for_new_leader(&second, &a_node);
    assert_eq!(read_through(&c.address(), 0, rewritten.len()), rewritten);
    let without_a = pattern(6, 64 << 10);
    write_through(&b.address(), 3 << 20, &without_a);
    assert_eq!(
        read_through(&c.address(), 3 << 20, without_a.len()),
        without_a
    );

    // A comes back on its address as a follower; its writes are forwarded to
    // the new leader and reach every member.
    let a = first.up(&["--listen", &a_listen]);
    let view = wait_for_cluster(&first, 3);
    assert_ne!(view["leader"], a_node, "{view}");
    let after = pattern(4, 256 << 10);
    write_through(&a.address(), 4 << 20, &after);
    assert_eq!(read_through(&b.address(), 4 << 20, after.len()), after);
    assert_eq!(read_through(&c.address(), 4 << 20, after.len()), after);
    assert_eq!(read_through(&a.address(), 0, rewritten.len()), rewritten);
    assert_eq!(
        read_through(&a.address(), 3 << 20, without_a.len()),
        without_a
    );

    // The leader (B or C, since A came back as a follower) leaves: it steps
    // down, stops, its sectors are set aside; two voters elect and go on.
    let leader = status(&first)["leader"].clone();
    let (leaving, leaving_up, staying) = if status(&second)["node"] == leader {
        (&second, b, c)
    } else {
        (&third, c, b)
    };
    let out = leaving.blocktree(&["leave", "--data", &arg(&leaving.data())]);
    assert!(out.contains("left the cluster"), "{out}");
    let (stdout, _) = leaving_up.wait_for_exit();
    assert!(stdout.contains("stopped: left the cluster"), "{stdout}");
    assert!(leaving.data().join("sectors.left").is_dir());
    assert!(!leaving.data().join("sectors").exists());
    wait_for_cluster(&first, 2);
    wait_for_new_leader(&first, &leader);
    let last = pattern(5, 64 << 10);
    write_through(&a.address(), 8 << 20, &last);
    assert_eq!(read_through(&staying.address(), 8 << 20, last.len()), last);
    drop(staying);
    drop(a);
}

/// Runs `blocktree up` for `data` with `extra`, which must fail; returns its
/// stderr.
fn refused_up(data: &Data, extra: &[&str]) -> String {
    let data_dir = arg(&data.data());
    let mut args = vec!["up", "--data", &data_dir, "--nbd", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let output = data.blocktree_output(&args);
    assert!(!output.status.success(), "up {extra:?} did not fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The root principal in `up`'s report.
fn root_of(up: &Up) -> String {
    up.field("root principal")
        .split(' ')
        .next()
        .expect("a principal")
        .to_owned()
}

/// The generation number in `up`'s report (`generation: N (directory D)`).
fn generation_of(up: &Up) -> (u64, String) {
    let line = up.field("generation");
    let (number, rest) = line
        .split_once(" (directory ")
        .unwrap_or_else(|| panic!("no generation in {line:?}"));
    let number = number.parse().expect("a generation number");
    (number, rest.trim_end_matches(')').to_owned())
}

#[test]
fn directories_below_the_root_get_their_generation_numbers_from_the_root_cluster() {
    let first = Data::new();
    let a = first.up(&["--listen", "127.0.0.1:0"]);
    let a_listen = listen_of(&a);
    let root = root_of(&a);
    assert_eq!(generation_of(&a), (1, format!("/{root}")));

    // A server of /<root>/b cannot number its new store itself.
    let (second, third, fourth) = (Data::new(), Data::new(), Data::new());
    grant(&first, &second, &root, "b");
    let stderr = refused_up(&second, &[]);
    assert!(
        stderr.contains(&format!("/{root}/b")) && stderr.contains("--root-cluster"),
        "{stderr}"
    );
    assert!(!second.data().join("sectors").join("generation").exists());

    // Asked of the root's cluster, it gets the next number, and serves.
    let b = second.up(&["--root-cluster", &a_listen, "--listen", "127.0.0.1:0"]);
    assert_eq!(generation_of(&b), (2, format!("/{root}/b")));
    assert_eq!(status(&second)["generation"], 2);
    let written = pattern(7, 64 << 10);
    write_through(&b.address(), 0, &written);
    assert_eq!(read_through(&b.address(), 0, written.len()), written);

    // Only the root directory's cluster hands numbers out.
    grant(&first, &third, &root, "c");
    let b_listen = listen_of(&b);
    let stderr = refused_up(&third, &["--root-cluster", &b_listen]);
    // (b's cluster does not even take requests from outside its directory.)
    assert!(
        stderr.contains(&format!("/{root}/c is not in /{root}/b")),
        "{stderr}"
    );

    // The root's cluster keeps count across a restart (in its log and state
    // machine): the next directory gets 3, never 2 again.
    drop(a);
    let a = first.up(&["--listen", &a_listen]);
    let c = third.up(&["--root-cluster", &a_listen]);
    assert_eq!(generation_of(&c), (3, format!("/{root}/c")));
    grant(&first, &fourth, &root, "d");

    // A store keeps its number: restarted without --root-cluster, and with
    // the root's cluster down.
    drop(a);
    drop(b);
    let b = second.up(&["--listen", &b_listen]);
    assert_eq!(generation_of(&b), (2, format!("/{root}/b")));
    assert_eq!(read_through(&b.address(), 0, written.len()), written);

    // A new store cannot be numbered while the root's cluster is down.
    let stderr = refused_up(&fourth, &["--root-cluster", &a_listen]);
    assert!(
        stderr.contains(&format!("asking /{root}'s cluster at {a_listen}")),
        "{stderr}"
    );
    drop(c);
    drop(b);
}

#[test]
fn a_server_with_follower_reads_serves_its_copy_even_without_a_majority() {
    let first = Data::new();
    let a = first.up(&["--listen", "127.0.0.1:0"]);
    let a_listen = listen_of(&a);
    let root = root_of(&a);
    assert!(a.field("reads").starts_with("linearizable"));
    let second = Data::new();
    grant(&first, &second, &root, "");
    let b = second.serve(
        "join",
        &["--listen", "127.0.0.1:0", "--follower-reads", &a_listen],
    );
    assert!(
        b.field("reads").starts_with("follower reads"),
        "{}",
        b.field("reads")
    );
    wait_for_cluster(&first, 2);

    // B reads its own copy: a write through A shows there once B applied it.
    let written = pattern(9, 256 << 10);
    write_through(&a.address(), 0, &written);
    let started = Instant::now();
    while read_through(&b.address(), 0, written.len()) != written {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never applied the write"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Both copies scrub clean (`cluster scrub`, answered by the running
    // servers; damage and its repair are raftlog's tests).
    for data in [&first, &second] {
        let out = data.blocktree(&["cluster", "scrub", "--data", &arg(&data.data()), "--json"]);
        let found: serde_json::Value = serde_json::from_str(&out).expect("scrub JSON");
        assert!(found["checked"].as_u64().unwrap_or(0) > 0, "{found}");
        assert_eq!(found["corrupt"], 0, "{found}");
    }
    assert!(
        a.field("scrub").starts_with("every 24 h"),
        "{}",
        a.field("scrub")
    );

    // With A gone, B is one of two voters: no majority, no leader, nothing
    // commits; its copy still serves.
    a.kill9();
    for _ in 0..3 {
        assert_eq!(read_through(&b.address(), 0, written.len()), written);
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(b);
}
