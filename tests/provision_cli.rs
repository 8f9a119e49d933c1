//! `blocktree provision`, run as the real binary on real files.
//!
//! Each test walks part of the design's provisioning procedure (section 4.4):
//! root credentials, runtime credentials, request, approval, import, and root
//! backup between stores, then checks what the binary printed, not only its exit
//! status. Every failure must be one `error:` line naming its cause.
//!
//! Root operations cost an Argon2id derivation (64 MiB, 3 passes) each, so tests
//! share no state but keep their root operations few.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tempfile::TempDir;

const BLOCKTREE: &str = env!("CARGO_BIN_EXE_blocktree");
const PASSWORD: &str = "correct horse battery staple";

/// Runs the binary with no password in the environment and no terminal.
fn blocktree(args: &[&str]) -> Output {
    blocktree_with_env(args, None)
}

fn blocktree_with_env(args: &[&str], password_env: Option<&str>) -> Output {
    let mut command = Command::new(BLOCKTREE);
    command
        .args(args)
        .env_remove("BLOCKTREE_ROOT_PASSWORD")
        .stdin(Stdio::null());
    if let Some(password) = password_env {
        command.env("BLOCKTREE_ROOT_PASSWORD", password);
    }
    command.output().expect("run the blocktree binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

/// Runs a command that must succeed; returns its stdout.
fn succeed(args: &[&str]) -> String {
    check_success(args, blocktree(args))
}

fn check_success(args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "blocktree {args:?} failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Runs a command that must fail with exit status 1 and exactly one
/// `error: ` line on stderr; returns that line.
fn fail(args: &[&str]) -> String {
    check_failure(args, blocktree(args))
}

fn check_failure(args: &[&str], output: Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "blocktree {args:?} should fail with status 1; stdout: {} stderr: {stderr}",
        text(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    lines[0].to_owned()
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

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// A temporary directory with an operator store holding a domain's root.
struct Domain {
    dir: TempDir,
    root: String,
}

impl Domain {
    /// `provision new-root --store <dir>/operator`.
    fn new() -> Domain {
        let dir = tempfile::tempdir().expect("temporary directory");
        fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).expect("password file");
        let domain = Domain {
            dir,
            root: String::new(),
        };
        let out = succeed(&[
            "provision",
            "new-root",
            "--store",
            &domain.file("operator"),
            "--password-file",
            &domain.file("password"),
        ]);
        let root = field(&out, "root principal");
        assert_eq!(field(&out, "domain root path"), format!("/{root}"));
        Domain { root, ..domain }
    }

    fn file(&self, name: &str) -> String {
        path_str(&self.dir.path().join(name)).to_owned()
    }

    fn path_buf(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A path in this domain: `/<root>/<rest>`.
    fn domain_path(&self, rest: &str) -> String {
        if rest.is_empty() {
            format!("/{}", self.root)
        } else {
            format!("/{}/{rest}", self.root)
        }
    }

    /// `provision new-runtime`; returns the runtime's principal.
    fn new_runtime(&self, store: &str) -> String {
        let out = succeed(&["provision", "new-runtime", "--store", &self.file(store)]);
        field(&out, "runtime principal")
    }

    /// `provision request --path`.
    fn request(&self, store: &str, path: &str, out: &str) {
        let stdout = succeed(&[
            "provision",
            "request",
            "--store",
            &self.file(store),
            "--path",
            path,
            "--out",
            &self.file(out),
        ]);
        assert_eq!(field(&stdout, "requested path"), path);
    }

    /// The arguments of `provision approve` by `approver` with the root password file.
    fn approve_args(
        &self,
        approver: &str,
        request: &str,
        out: &str,
        extra: &[&str],
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "provision",
            "approve",
            "--store",
            &self.file(approver),
            "--request",
            &self.file(request),
            "--password-file",
            &self.file("password"),
            "--out",
            &self.file(out),
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    }

    fn approve(&self, approver: &str, request: &str, out: &str, extra: &[&str]) -> String {
        let args = self.approve_args(approver, request, out, extra);
        succeed(&as_strs(&args))
    }

    fn import_args(&self, store: &str, writecap: &str) -> Vec<String> {
        [
            "provision",
            "import",
            "--store",
            store,
            "--writecap",
            writecap,
        ]
        .iter()
        .enumerate()
        .map(|(index, arg)| match index {
            3 | 5 => self.file(arg),
            _ => arg.to_string(),
        })
        .collect()
    }

    fn import(&self, store: &str, writecap: &str) -> String {
        succeed(&as_strs(&self.import_args(store, writecap)))
    }

    fn show(&self, store: &str) -> String {
        succeed(&["provision", "show", "--store", &self.file(store)])
    }

    /// A server store holding a root-issued writecap for `/<root>/<rest>`.
    fn provisioned_runtime(&self, store: &str, rest: &str) -> String {
        let principal = self.new_runtime(store);
        let request = format!("{store}.request");
        let writecap = format!("{store}.writecap");
        self.request(store, &self.domain_path(rest), &request);
        self.approve("operator", &request, &writecap, &[]);
        self.import(store, &writecap);
        principal
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn full_walkthrough_provisions_a_server_and_a_delegated_runtime() {
    let domain = Domain::new();
    let root_path = domain.domain_path("");

    // Steps 2-5 of the design: runtime credentials, request, root approval, import.
    let server = domain.new_runtime("server");
    domain.request("server", &root_path, "server.request");
    let approved = domain.approve(
        "operator",
        "server.request",
        "server.writecap",
        &["--expires", "30d"],
    );
    assert_eq!(field(&approved, "issued to"), server);
    assert_eq!(field(&approved, "path"), root_path);
    assert_eq!(field(&approved, "approved by"), format!("root {root_path}"));
    assert_eq!(field(&approved, "chain"), "1 certificate");
    let expires = field(&approved, "expires");
    let expires_time = humantime::parse_rfc3339(&expires).expect("RFC 3339 expiry");
    let days = expires_time
        .duration_since(std::time::SystemTime::now())
        .expect("expiry in the future")
        .as_secs()
        / 86_400;
    assert!(
        (29..=30).contains(&days),
        "30d gave an expiry {days} days away"
    );
    let request_mode = fs::metadata(domain.path_buf("server.request"))
        .expect("request file")
        .permissions()
        .mode();
    assert_eq!(
        request_mode & 0o600,
        0o600,
        "request file is readable and writable by its owner"
    );

    let imported = domain.import("server", "server.writecap");
    assert_eq!(field(&imported, "path"), root_path);
    assert_eq!(field(&imported, "valid until"), expires);

    let shown = domain.show("server");
    assert_eq!(field(&shown, "runtime principal"), server);
    assert_eq!(field(&shown, "root credentials"), "none");
    assert_eq!(field(&shown, "writecap"), "1 certificate");
    assert_eq!(field(&shown, "    path"), root_path);
    assert_eq!(field(&shown, "    issued to"), server);
    assert_eq!(
        field(&shown, "    issuer"),
        format!("{} (root)", domain.root)
    );
    assert_eq!(
        field(&shown, "writecap status"),
        format!("valid until {expires}")
    );
    for key in ["signing key", "encryption key", "storage key"] {
        // Unpadded base64url of a 65-byte point is 87 characters.
        assert_eq!(field(&shown, key).len(), 87, "{key} in:\n{shown}");
    }

    let operator = domain.show("operator");
    assert!(
        field(&operator, "root credentials").contains(&domain.root),
        "{operator}"
    );
    assert_eq!(
        field(&operator, "writecap"),
        "none (request one with `blocktree provision request`)"
    );

    // The server, holding no root, delegates part of its authority; with no
    // --expires the grant is cut to the server's own expiry.
    let worker = domain.new_runtime("worker");
    let worker_path = domain.domain_path("apps/worker");
    domain.request("worker", &worker_path, "worker.request");
    let delegated = succeed(&[
        "provision",
        "approve",
        "--store",
        &domain.file("server"),
        "--request",
        &domain.file("worker.request"),
        "--out",
        &domain.file("worker.writecap"),
    ]);
    assert_eq!(field(&delegated, "issued to"), worker);
    assert_eq!(field(&delegated, "expires"), expires);
    assert!(field(&delegated, "approved by").starts_with(&format!("runtime {server}")));
    assert_eq!(field(&delegated, "chain"), "2 certificates");
    domain.import("worker", "worker.writecap");
    let shown = domain.show("worker");
    assert_eq!(field(&shown, "writecap"), "2 certificates");
    assert!(
        shown.contains(&format!("    issuer:        {server}\n")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("    path:          {worker_path}\n")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("    path:          {root_path}\n")),
        "{shown}"
    );
    assert_eq!(
        field(&shown, "writecap status"),
        format!("valid until {expires}")
    );
}

#[test]
fn approve_with_a_wrong_password_fails() {
    let domain = Domain::new();
    domain.new_runtime("server");
    domain.request("server", &domain.domain_path(""), "server.request");
    fs::write(domain.path_buf("wrong"), "not the password\n").expect("write");
    let mut args = domain.approve_args("operator", "server.request", "server.writecap", &[]);
    let password_index = args
        .iter()
        .position(|arg| arg == "--password-file")
        .expect("flag")
        + 1;
    args[password_index] = domain.file("wrong");
    let error = fail(&as_strs(&args));
    assert_eq!(error, "error: wrong password for the root credentials");
    assert!(!domain.path_buf("server.writecap").exists());
}

#[test]
fn password_comes_from_the_environment_and_is_required_without_a_terminal() {
    let domain = Domain::new();
    domain.new_runtime("server");
    domain.request("server", &domain.domain_path(""), "server.request");
    let args = [
        "provision",
        "approve",
        "--store",
        &domain.file("operator"),
        "--request",
        &domain.file("server.request"),
        "--out",
        &domain.file("server.writecap"),
    ];
    let error = fail(&args);
    assert_eq!(
        error,
        "error: no root password: pass --password-file or set BLOCKTREE_ROOT_PASSWORD, or run on a terminal"
    );
    let out = check_success(&args, blocktree_with_env(&args, Some(PASSWORD)));
    assert_eq!(field(&out, "path"), domain.domain_path(""));
    let error = check_failure(&args, blocktree_with_env(&args, Some("wrong password")));
    assert!(
        error.contains("wrong password for the root credentials"),
        "{error}"
    );

    // A password file whose first line is empty is refused, not taken as "".
    fs::write(domain.path_buf("empty"), "\nsecond line\n").expect("write");
    let error = fail(&[
        "provision",
        "new-root",
        "--store",
        &domain.file("another"),
        "--password-file",
        &domain.file("empty"),
    ]);
    assert!(
        error.contains("password file") && error.contains("is empty"),
        "{error}"
    );
    assert!(
        !domain.path_buf("another").exists(),
        "no store is created without a password"
    );
}

#[test]
fn importing_an_expired_writecap_fails() {
    let domain = Domain::new();
    domain.new_runtime("server");
    domain.request("server", &domain.domain_path("short"), "server.request");
    let approved = domain.approve(
        "operator",
        "server.request",
        "server.writecap",
        &["--expires", "1s"],
    );
    let expires = field(&approved, "expires");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let error = fail(&as_strs(&domain.import_args("server", "server.writecap")));
    assert!(error.contains(&domain.file("server.writecap")), "{error}");
    assert!(
        error.ends_with(&format!(
            "certificate 0 of the writecap expired at {expires}"
        )),
        "{error}"
    );
    assert_eq!(
        field(&domain.show("server"), "writecap"),
        "none (request one with `blocktree provision request`)"
    );
}

#[test]
fn importing_a_writecap_issued_to_another_runtime_fails() {
    let domain = Domain::new();
    let server = domain.new_runtime("server");
    let intruder = domain.new_runtime("intruder");
    domain.request("server", &domain.domain_path(""), "server.request");
    domain.approve("operator", "server.request", "server.writecap", &[]);
    let error = fail(&as_strs(&domain.import_args("intruder", "server.writecap")));
    assert!(
        error.ends_with(&format!("writecap was issued to {server}, not {intruder}")),
        "{error}"
    );
}

#[test]
fn delegated_approver_cannot_grant_outside_its_writecap() {
    let domain = Domain::new();
    domain.provisioned_runtime("delegate", "a");
    domain.new_runtime("other");
    let outside = domain.domain_path("b");
    domain.request("other", &outside, "other.request");
    let delegate_approve = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "provision",
            "approve",
            "--store",
            &domain.file("delegate"),
            "--request",
            &domain.file("other.request"),
            "--out",
            &domain.file("other.writecap"),
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    };

    let error = fail(&as_strs(&delegate_approve(&[])));
    assert_eq!(
        error,
        format!(
            "error: cannot grant {outside}: the issuer's authority covers {}",
            domain.domain_path("a")
        )
    );
    // --as-runtime makes no difference to a store without root credentials.
    let error = fail(&as_strs(&delegate_approve(&["--as-runtime"])));
    assert!(error.contains("the issuer's authority covers"), "{error}");
    // Inside its authority, but not beyond its own expiry.
    let inside = domain.domain_path("a/b");
    let error = fail(&as_strs(&delegate_approve(&[
        "--path",
        &inside,
        "--expires",
        "400d",
    ])));
    assert!(error.contains("cannot grant until"), "{error}");
    assert!(
        error.contains("the issuer's writecap expires at"),
        "{error}"
    );
    assert!(!domain.path_buf("other.writecap").exists());

    // The operator's runtime holds no writecap, so it cannot approve as a runtime.
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "other.request",
        "other.writecap",
        &["--as-runtime"],
    )));
    assert!(
        error.contains("has no writecap to delegate from"),
        "{error}"
    );
}

#[test]
fn root_cannot_grant_a_path_under_another_root() {
    let domain = Domain::new();
    // Any principal other than the root will do as a foreign root.
    let foreign = domain.new_runtime("foreign");
    domain.new_runtime("server");
    let foreign_path = format!("/{foreign}/data");
    domain.request("server", &foreign_path, "server.request");
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "server.request",
        "server.writecap",
        &[],
    )));
    assert_eq!(
        error,
        format!(
            "error: cannot grant {foreign_path}: the issuer's authority covers /{}",
            domain.root
        )
    );
}

#[test]
fn missing_store_is_reported() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = path_str(&dir.path().join("nowhere")).to_owned();
    for subcommand in ["show", "storage-key"] {
        let mut args = vec!["provision", subcommand, "--store", &missing];
        if subcommand == "storage-key" {
            args.extend(["--out", "unused"]);
        }
        let error = fail(&args);
        assert_eq!(
            error,
            format!(
                "error: no credential store at {missing} (create one with `blocktree provision new-runtime --store {missing}`)"
            )
        );
    }
}

#[test]
fn corrupt_store_files_are_reported() {
    let domain = Domain::new();
    let runtime_file = domain.path_buf("operator/runtime.cred");
    let root_file = domain.path_buf("operator/root.cred");

    fs::write(&root_file, b"\x01\x05 not sealed root credentials").expect("overwrite");
    assert_eq!(
        fs::metadata(&root_file).expect("stat").permissions().mode() & 0o777,
        0o600
    );
    let error = fail(&["provision", "show", "--store", &domain.file("operator")]);
    assert!(
        error.starts_with(&format!(
            "error: credential store file {} is corrupt: ",
            root_file.display()
        )),
        "{error}"
    );

    fs::write(&runtime_file, b"garbage, not runtime credentials").expect("overwrite");
    assert_eq!(
        fs::metadata(&runtime_file)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let error = fail(&["provision", "show", "--store", &domain.file("operator")]);
    assert!(
        error.starts_with(&format!(
            "error: credential store file {} is corrupt: ",
            runtime_file.display()
        )),
        "{error}"
    );

    // With runtime.cred gone, the store is not silently recreated over the root.
    fs::remove_file(&runtime_file).expect("remove");
    let error = fail(&[
        "provision",
        "new-root",
        "--store",
        &domain.file("operator"),
        "--password-file",
        &domain.file("password"),
    ]);
    assert!(
        error.contains("root credentials without runtime.cred"),
        "{error}"
    );
}

#[test]
fn store_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = path_str(&dir.path().join("server")).to_owned();
    succeed(&["provision", "new-runtime", "--store", &store]);
    let runtime_file = dir.path().join("server/runtime.cred");
    fs::set_permissions(&runtime_file, fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = fail(&["provision", "show", "--store", &store]);
    assert_eq!(
        error,
        format!(
            "error: credential store file {} has mode 644; it must not be accessible to group or others (chmod 600)",
            runtime_file.display()
        )
    );
}

#[test]
fn corrupt_or_misplaced_request_and_writecap_files_are_reported() {
    let domain = Domain::new();
    domain.provisioned_runtime("server", "");
    let garbage = domain.path_buf("garbage");
    fs::write(&garbage, b"this is not a request").expect("write");

    // None of these reach the password: they fail on the file.
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "garbage",
        "out.writecap",
        &[],
    )));
    assert!(
        error.starts_with(&format!(
            "error: {} is not a valid writecap request: ",
            garbage.display()
        )),
        "{error}"
    );
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "server.writecap",
        "out.writecap",
        &[],
    )));
    assert_eq!(
        error,
        format!(
            "error: {} is not a valid writecap request: it holds a Writecap",
            domain.file("server.writecap")
        )
    );
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "absent.request",
        "out.writecap",
        &[],
    )));
    assert!(
        error.starts_with(&format!(
            "error: cannot read writecap request {}: ",
            domain.file("absent.request")
        )),
        "{error}"
    );

    // A request whose signature no longer matches its contents.
    let mut tampered = fs::read(domain.path_buf("server.request")).expect("read");
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    fs::write(domain.path_buf("tampered.request"), &tampered).expect("write");
    let error = fail(&as_strs(&domain.approve_args(
        "operator",
        "tampered.request",
        "out.writecap",
        &[],
    )));
    assert!(error.contains("signature does not verify"), "{error}");
    assert!(!domain.path_buf("out.writecap").exists());

    let error = fail(&as_strs(&domain.import_args("server", "server.request")));
    assert_eq!(
        error,
        format!(
            "error: {} is not a valid writecap: it holds a WritecapRequest",
            domain.file("server.request")
        )
    );
    let error = fail(&as_strs(&domain.import_args("server", "garbage")));
    assert!(
        error.starts_with(&format!(
            "error: {} is not a valid writecap: ",
            garbage.display()
        )),
        "{error}"
    );
}

#[test]
fn root_credentials_move_only_to_the_addressed_store_with_the_password() {
    let domain = Domain::new();
    domain.new_runtime("backup");
    let key_out = succeed(&[
        "provision",
        "storage-key",
        "--store",
        &domain.file("backup"),
        "--out",
        &domain.file("backup.storage-key"),
    ]);
    assert_eq!(
        fs::read(domain.path_buf("backup.storage-key"))
            .expect("read")
            .len(),
        65
    );
    assert_eq!(
        field(&key_out, "storage key"),
        field(&domain.show("backup"), "storage key")
    );

    let exported = succeed(&[
        "provision",
        "export-root",
        "--store",
        &domain.file("operator"),
        "--to",
        &domain.file("backup.storage-key"),
        "--out",
        &domain.file("root.export"),
        "--password-file",
        &domain.file("password"),
    ]);
    assert_eq!(field(&exported, "root principal"), domain.root);
    assert_eq!(
        field(&exported, "for storage key"),
        field(&key_out, "storage key")
    );
    let mode = fs::metadata(domain.path_buf("root.export"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the export is private to its owner");

    let import_root = |store: &str, password_file: &str| -> Vec<String> {
        [
            "provision".to_owned(),
            "import-root".to_owned(),
            "--store".to_owned(),
            domain.file(store),
            "--from".to_owned(),
            domain.file("root.export"),
            "--password-file".to_owned(),
            domain.file(password_file),
        ]
        .to_vec()
    };

    fs::write(domain.path_buf("wrong"), "not the password\n").expect("write");
    let error = fail(&as_strs(&import_root("backup", "wrong")));
    assert!(
        error.ends_with("wrong password for the root credentials"),
        "{error}"
    );
    assert!(error.contains(&domain.file("root.export")), "{error}");

    domain.new_runtime("third");
    let error = fail(&as_strs(&import_root("third", "password")));
    assert!(
        error.ends_with(
            "the exported root credentials were not made for this store, or were altered"
        ),
        "{error}"
    );
    assert_eq!(field(&domain.show("third"), "root credentials"), "none");

    let imported = succeed(&as_strs(&import_root("backup", "password")));
    assert_eq!(field(&imported, "root principal"), domain.root);
    let error = fail(&as_strs(&import_root("backup", "password")));
    assert!(error.contains("already holds root credentials"), "{error}");

    // The backup approves with the same root and the same password.
    let server = domain.new_runtime("server");
    domain.request(
        "server",
        &domain.domain_path("via-backup"),
        "server.request",
    );
    let approved = domain.approve("backup", "server.request", "server.writecap", &[]);
    assert_eq!(field(&approved, "issued to"), server);
    assert_eq!(
        field(&approved, "approved by"),
        format!("root /{}", domain.root)
    );
    domain.import("server", "server.writecap");

    let operator_root = field(&domain.show("operator"), "root credentials");
    let backup_root = field(&domain.show("backup"), "root credentials");
    assert!(operator_root.contains(&domain.root), "{operator_root}");
    assert_eq!(operator_root, backup_root);
}

#[test]
fn new_root_refuses_a_second_root_and_a_short_password() {
    let domain = Domain::new();
    let error = fail(&[
        "provision",
        "new-root",
        "--store",
        &domain.file("operator"),
        "--password-file",
        &domain.file("password"),
    ]);
    assert_eq!(
        error,
        format!(
            "error: this credential store already holds root credentials for {}",
            domain.root
        )
    );
    fs::write(domain.path_buf("short"), "2short\n").expect("write");
    let error = fail(&[
        "provision",
        "new-root",
        "--store",
        &domain.file("fresh"),
        "--password-file",
        &domain.file("short"),
    ]);
    assert!(error.contains("at least 8 characters"), "{error}");
    let error = fail(&[
        "provision",
        "new-runtime",
        "--store",
        &domain.file("operator"),
    ]);
    assert_eq!(
        error,
        format!(
            "error: a credential store already exists at {}",
            domain.file("operator")
        )
    );
}

#[test]
fn every_subcommand_has_help_and_usage_errors_exit_2() {
    for subcommand in [
        "new-root",
        "new-runtime",
        "request",
        "approve",
        "import",
        "show",
        "storage-key",
        "export-root",
        "import-root",
    ] {
        let out = succeed(&["provision", subcommand, "--help"]);
        assert!(out.contains("--store <DIR>"), "{subcommand}: {out}");
        assert!(
            out.contains("./blocktree-data/credentials"),
            "{subcommand}: {out}"
        );
    }
    let out = succeed(&["provision", "--help"]);
    for step in [
        "new-root",
        "new-runtime",
        "request",
        "approve",
        "import",
        "export-root",
    ] {
        assert!(
            out.contains(&format!("blocktree provision {step} ")),
            "{out}"
        );
    }
    let approve = succeed(&["provision", "approve", "--help"]);
    for flag in [
        "--expires <DURATION>",
        "--expires-at <TIME>",
        "--as-runtime",
        "--password-file <FILE>",
    ] {
        assert!(approve.contains(flag), "{approve}");
    }

    let output = blocktree(&[
        "provision",
        "approve",
        "--request",
        "r",
        "--out",
        "o",
        "--expires",
        "1d",
        "--expires-at",
        "2030-01-01T00:00:00Z",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot be used with"));
    let output = blocktree(&["provision", "request", "--path", "relative", "--out", "o"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("a path is absolute"));
}
