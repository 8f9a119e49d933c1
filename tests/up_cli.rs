//! `blocktree up`, run as the real binary on real data directories.
//!
//! `up` provisions a domain on first start and checks it on later starts, then
//! serves the volumes over NBD in the foreground until SIGTERM (the NBD side is
//! tested with real clients in `tests/nbd_*.rs`).

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BLOCKTREE: &str = env!("CARGO_BIN_EXE_blocktree");
const PASSWORD: &str = "correct horse battery staple";
const STOPPED: &str = "stopped: every write is durable";

/// Runs the binary with no password in the environment and stdin not a terminal.
fn blocktree(args: &[&str]) -> Output {
    Command::new(BLOCKTREE)
        .args(args)
        .env_remove("BLOCKTREE_ROOT_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run the blocktree binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

/// Runs a command that must succeed; returns (stdout, stderr).
fn succeed(args: &[&str]) -> (String, String) {
    let output = blocktree(args);
    assert!(
        output.status.success(),
        "blocktree {args:?} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    (text(&output.stdout), text(&output.stderr))
}

/// Runs `blocktree up args... --nbd 127.0.0.1:0` (no password in the
/// environment, stdin not a terminal) until it is ready, then stops it with
/// SIGTERM; it must exit 0. Returns (stdout, stderr).
fn up(args: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (stdout, stderr) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(BLOCKTREE)
        .arg("up")
        .args(args)
        .args(["--nbd", "127.0.0.1:0"])
        .env_remove("BLOCKTREE_ROOT_PASSWORD")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).expect("stdout file"))
        .stderr(fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start blocktree up");
    let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
    let started = Instant::now();
    while !read(&stdout).lines().any(|line| line.starts_with("ready:")) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("blocktree up {args:?} exited ({status}): {}", read(&stderr));
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not ready: {}",
            read(&stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    let status = child.wait().expect("wait for blocktree up");
    assert!(
        status.success(),
        "up exited with {status}: {}",
        read(&stderr)
    );
    (read(&stdout), read(&stderr))
}

/// `up` served `vol0` on its free port and stopped cleanly.
fn assert_served(stdout: &str) {
    let ready = stdout
        .lines()
        .find(|line| line.starts_with("ready:"))
        .unwrap_or_else(|| panic!("no ready line in:\n{stdout}"));
    assert!(
        ready.starts_with("ready: serving nbd://127.0.0.1:"),
        "{ready}"
    );
    assert!(ready.contains("/vol0"), "{ready}");
    assert!(field(stdout, "nbd").ends_with("/vol0"), "{stdout}");
    assert_eq!(field(stdout, "volumes"), "vol0 (1 GiB, 4096-byte blocks)");
    assert_eq!(stdout.lines().last(), Some(STOPPED), "{stdout}");
}

/// The value of the first `label: value` line of `output`.
fn field(output: &str, label: &str) -> String {
    let prefix = format!("{label}:");
    output
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{output}"))
        .trim()
        .to_owned()
}

/// The principal at the start of a `root principal` value, before its note.
fn principal_of(value: &str) -> String {
    value
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn first_up_creates_a_domain_and_later_ups_reuse_it() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = path_str(&dir.path().join("data")).to_owned();
    let password_file = path_str(&dir.path().join("password")).to_owned();
    fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");

    let (first, stderr) = up(&["--data", &data, "--root-password-file", &password_file]);
    assert_eq!(stderr, "", "nothing to warn about on a clean first start");
    let root = field(&first, "root principal");
    assert!(
        root.ends_with("(root credentials in this store)"),
        "{first}"
    );
    let root = principal_of(&root);
    let server = field(&first, "server principal");
    assert_ne!(root, server);
    assert!(
        field(&first, "credential store").ends_with("(created)"),
        "{first}"
    );
    assert!(
        field(&first, "data directory").ends_with("/data"),
        "{first}"
    );
    let writecap = field(&first, "writecap");
    assert!(
        writecap.starts_with(&format!("/{root}, valid until ")),
        "{first}"
    );
    assert_served(&first);
    assert!(!first.contains(PASSWORD), "the password is never printed");

    // The store `up` made is one `provision` can read: the root is there, and the
    // server's writecap covers the whole domain.
    let credentials = path_str(&dir.path().join("data/credentials")).to_owned();
    let (shown, _) = succeed(&["provision", "show", "--store", &credentials]);
    assert_eq!(field(&shown, "runtime principal"), server);
    assert!(field(&shown, "root credentials").contains(&root), "{shown}");
    assert_eq!(field(&shown, "    path"), format!("/{root}"));
    assert!(
        field(&shown, "writecap status").starts_with("valid until"),
        "{shown}"
    );

    // Later starts need no password and keep the same identities.
    let (second, stderr) = up(&["--data", &data]);
    assert_eq!(stderr, "");
    assert_eq!(principal_of(&field(&second, "root principal")), root);
    assert_eq!(field(&second, "server principal"), server);
    assert_eq!(field(&second, "writecap"), writecap);
    assert!(
        field(&second, "credential store").ends_with("(existing)"),
        "{second}"
    );
    assert_served(&second);
}

#[test]
fn up_off_a_terminal_without_a_password_generates_one_and_shows_it_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = path_str(&dir.path().join("data")).to_owned();

    let (stdout, stderr) = up(&["--data", &data]);
    let generated = field(&stderr, "root password");
    assert!(
        generated.len() >= 22,
        "at least 128 bits of base64url: {generated:?}"
    );
    assert!(
        generated
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{generated:?}"
    );
    assert!(
        stderr.contains("Write this down; it is not stored."),
        "{stderr}"
    );
    let everything = format!("{stdout}{stderr}");
    assert_eq!(
        everything.matches(&generated).count(),
        1,
        "printed exactly once"
    );
    assert_served(&stdout);
    let root = principal_of(&field(&stdout, "root principal"));

    // The printed password really unlocks the root: approve a request with it.
    let password_file = path_str(&dir.path().join("password")).to_owned();
    fs::write(&password_file, format!("{generated}\n")).expect("password file");
    let other = path_str(&dir.path().join("other")).to_owned();
    let request = path_str(&dir.path().join("other.request")).to_owned();
    let writecap = path_str(&dir.path().join("other.writecap")).to_owned();
    succeed(&["provision", "new-runtime", "--store", &other]);
    succeed(&[
        "provision",
        "request",
        "--store",
        &other,
        "--path",
        &format!("/{root}/other"),
        "--out",
        &request,
    ]);
    let (approved, _) = succeed(&[
        "provision",
        "approve",
        "--store",
        &format!("{data}/credentials"),
        "--request",
        &request,
        "--password-file",
        &password_file,
        "--out",
        &writecap,
    ]);
    assert_eq!(field(&approved, "approved by"), format!("root /{root}"));

    // A later start generates nothing and prints no password.
    let (again, stderr) = up(&["--data", &data]);
    assert_eq!(stderr, "");
    assert!(!again.contains(&generated));
}

#[test]
fn up_finishes_a_first_start_that_stopped_before_the_writecap() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let credentials = path_str(&data.join("credentials")).to_owned();
    let password_file = path_str(&dir.path().join("password")).to_owned();
    fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    // What an interrupted first start leaves: root and runtime keys, no writecap.
    let (created, _) = succeed(&[
        "provision",
        "new-root",
        "--store",
        &credentials,
        "--password-file",
        &password_file,
    ]);
    let root = field(&created, "root principal");

    let output = blocktree(&["up", "--data", path_str(&data)]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>().as_slice(),
        [
            "error: no root password: pass --root-password-file or set BLOCKTREE_ROOT_PASSWORD, or run on a terminal"
        ],
        "no password is generated for existing root credentials: {stderr}"
    );

    let (stdout, stderr) = up(&[
        "--data",
        path_str(&data),
        "--root-password-file",
        &password_file,
    ]);
    assert!(
        stderr.contains("holds root credentials but no writecap"),
        "{stderr}"
    );
    assert_eq!(principal_of(&field(&stdout, "root principal")), root);
    assert!(
        field(&stdout, "writecap").starts_with(&format!("/{root}, valid until")),
        "{stdout}"
    );
    assert!(field(&stdout, "credential store").ends_with("(existing, writecap issued now)"));
}

#[test]
fn up_uses_a_writecap_provisioned_by_an_operator_and_refuses_a_store_without_one() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = |name: &str| path_str(&dir.path().join(name)).to_owned();
    fs::write(file("password"), format!("{PASSWORD}\n")).expect("password file");
    let (created, _) = succeed(&[
        "provision",
        "new-root",
        "--store",
        &file("operator"),
        "--password-file",
        &file("password"),
    ]);
    let root = field(&created, "root principal");

    let server_store = file("data/credentials");
    let (server, _) = succeed(&["provision", "new-runtime", "--store", &server_store]);
    let server = field(&server, "runtime principal");

    let output = blocktree(&["up", "--data", &file("data")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: {server_store} holds runtime credentials but no writecap"
        )),
        "{stderr}"
    );

    // For the whole domain: a store for a directory below the root needs a
    // generation number from the root's cluster (tests/cluster_cli.rs).
    let servers = format!("/{root}");
    succeed(&[
        "provision",
        "request",
        "--store",
        &server_store,
        "--path",
        &servers,
        "--out",
        &file("server.request"),
    ]);
    succeed(&[
        "provision",
        "approve",
        "--store",
        &file("operator"),
        "--request",
        &file("server.request"),
        "--password-file",
        &file("password"),
        "--out",
        &file("server.writecap"),
    ]);
    succeed(&[
        "provision",
        "import",
        "--store",
        &server_store,
        "--writecap",
        &file("server.writecap"),
    ]);

    let (stdout, _) = up(&["--data", &file("data")]);
    assert_eq!(
        field(&stdout, "root principal"),
        format!("{root} (root credentials kept elsewhere)")
    );
    assert_eq!(field(&stdout, "server principal"), server);
    assert!(field(&stdout, "writecap").starts_with(&format!("{servers}, valid until")));
    assert_served(&stdout);
}

#[test]
fn up_help_explains_what_it_does() {
    let (help, _) = succeed(&["up", "--help"]);
    for needle in [
        "--data <DATA>",
        "./blocktree-data",
        "--root-password-file <FILE>",
        "BLOCKTREE_ROOT_PASSWORD",
        "printed once",
        "--nbd <ADDR:PORT>",
        "127.0.0.1:10809",
        "--nbd-socket <PATH>",
        "--tls <MODE>",
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
        "--read-only",
        "nbd://127.0.0.1:10809/vol0",
        "blocktree volume",
        "SIGINT or SIGTERM",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

/// With `--features tpm`: a domain whose server keys a TPM (swtpm) keeps. `up`
/// creates it with `--store tpm:TCTI`, later commands find it by themselves, a
/// contradicting `--store` is refused, and a TPM that is gone is a clear error.
#[cfg(feature = "tpm")]
#[test]
fn up_keeps_the_server_keys_in_a_tpm_and_reopens_them_without_options() {
    #[path = "../core/tests/swtpm/mod.rs"]
    mod swtpm;

    let mut tpm = swtpm::Swtpm::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = path_str(&dir.path().join("data")).to_owned();
    let password_file = path_str(&dir.path().join("password")).to_owned();
    fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let store = format!("tpm:{}", tpm.tcti_text());

    let (first, _) = up(&[
        "--data",
        &data,
        "--root-password-file",
        &password_file,
        "--store",
        &store,
    ]);
    assert_served(&first);
    let kept_by = field(&first, "keys kept by");
    assert!(
        kept_by.starts_with(&format!("the TPM at {}", tpm.tcti_text())),
        "{first}"
    );
    let server = field(&first, "server principal");
    // The directory holds what the TPM wrapped, never a private key file.
    let credentials = dir.path().join("data/credentials");
    assert!(credentials.join("tpm.cred").exists());
    assert!(!credentials.join("runtime.cred").exists());

    // A later start opens the TPM store as it is: same identity, no options.
    let (second, _) = up(&["--data", &data]);
    assert_served(&second);
    assert_eq!(field(&second, "server principal"), server);
    assert_eq!(field(&second, "keys kept by"), kept_by);
    let (listed, _) = succeed(&["volume", "list", "--data", &data]);
    assert!(listed.contains("vol0"), "{listed}");

    let refused = blocktree(&["up", "--data", &data, "--store", "file"]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("--store file") && message.contains("already holds"),
        "{message}"
    );

    // Without its TPM the store cannot sign: `up` says which TPM it needs.
    tpm.stop();
    let failed = blocktree(&["up", "--data", &data, "--nbd", "127.0.0.1:0"]);
    assert!(!failed.status.success());
    let message = text(&failed.stderr);
    assert!(message.contains(&tpm.tcti_text()), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}
