//! NBD over TLS (`NBD_OPT_STARTTLS`, rustls on the server): libnbd's nbdinfo and
//! qemu-img (GnuTLS) against `--tls require` with a certificate made by openssl
//! for the test; plaintext clients refused; `--tls on` serving both; with
//! `--tls-client-ca`, only clients presenting a certificate from that CA.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod nbd_support;

use nbd_support::*;
use std::fs;
use std::path::Path;

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`:
/// ca-cert.pem (what the clients trust), server-cert.pem, server-key.pem.
fn certificates(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let path = |name: &str| arg(&dir.join(name));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &path("ca-key.pem"),
            "-out",
            &path("ca-cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=blocktree test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    issue(
        dir,
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         extendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
    );
}

/// A client certificate and key issued by the CA in `ca_dir`, in `dir`, named as
/// GnuTLS clients (libnbd's `tls-certificates`, qemu's `tls-creds-x509`) look for
/// them: client-cert.pem, client-key.pem, beside a copy of ca-cert.pem.
fn client_certificate(ca_dir: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(ca_dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    issue(
        ca_dir,
        dir,
        "client",
        "/CN=blocktree test client",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    );
}

/// A P-256 key and a certificate for `subject` with `extensions`, signed by the
/// CA in `ca_dir`: NAME-key.pem and NAME-cert.pem in `dir`.
fn issue(ca_dir: &Path, dir: &Path, name: &str, subject: &str, extensions: &str) {
    let path = |file: &str| arg(&dir.join(format!("{name}{file}")));
    let ca = |file: &str| arg(&ca_dir.join(file));
    fs::write(dir.join(format!("{name}.ext")), extensions).unwrap();
    run(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &path("-key.pem"),
            "-out",
            &path(".csr"),
            "-subj",
            subject,
        ],
    );
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &path(".csr"),
            "-CA",
            &ca("ca-cert.pem"),
            "-CAkey",
            &ca("ca-key.pem"),
            "-CAcreateserial",
            "-out",
            &path("-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &path(".ext"),
        ],
    );
}

fn tls_args(dir: &Path, mode: &str) -> Vec<String> {
    vec![
        "--tls".into(),
        mode.into(),
        "--tls-cert".into(),
        arg(&dir.join("server-cert.pem")),
        "--tls-key".into(),
        arg(&dir.join("server-key.pem")),
    ]
}

/// qemu-img's options for TLS with the certificates in `dir`, on export `vol0`.
fn qemu_tls(dir: &Path, port: u16) -> [String; 4] {
    [
        "--object".into(),
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", arg(dir)),
        "--image-opts".into(),
        format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=vol0,file.tls-creds=tls0"
        ),
    ]
}

#[test]
fn required_tls_serves_tls_clients_and_refuses_plaintext() {
    let data = Data::new();
    let pki = data.path("pki");
    certificates(&pki);
    let args = tls_args(&pki, "require");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = data.up(&args);
    let tls_uri = format!(
        "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
        up.port,
        arg(&pki)
    );
    assert_eq!(
        up.field("nbd"),
        format!("nbds://127.0.0.1:{}/vol0", up.port)
    );

    let info = run_text("nbdinfo", &[&tls_uri]);
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 1073741824"), "{info}");

    // qemu-img over TLS: an image in and back out.
    let image = data.path("image.img");
    let original = random_bytes(16 << 20, 42);
    fs::write(&image, &original).unwrap();
    let [object, creds, image_opts, spec] = qemu_tls(&pki, up.port);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            &object,
            &creds,
            "--target-image-opts",
            "-f",
            "raw",
            &arg(&image),
            &spec,
        ],
    );
    let back = data.path("back.img");
    run(
        "qemu-img",
        &[
            "convert",
            &object,
            &creds,
            &image_opts,
            &spec,
            "-O",
            "raw",
            &arg(&back),
        ],
    );
    run(
        "cmp",
        &["-n", &(16u64 << 20).to_string(), &arg(&image), &arg(&back)],
    );
    let map = run_text("nbdinfo", &["--map", &tls_uri]);
    assert!(map.contains("16777216"), "{map}");

    // Plaintext clients get nothing: libnbd, qemu, and the `nbd` crate's
    // NBD_OPT_EXPORT_NAME, which the server can only answer by hanging up.
    let plain = up.uri_of("vol0");
    let refused = run_failing("nbdinfo", &[&plain]);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(
        !stdout.contains("export-size"),
        "nothing is revealed: {stdout}"
    );
    run_failing("qemu-img", &["info", &plain]);
    let mut tcp = std::net::TcpStream::connect(up.address()).unwrap();
    assert!(nbd::client::handshake(&mut tcp, b"vol0").is_err());
    up.stop();
}

#[test]
fn offered_tls_serves_both() {
    let data = Data::new();
    let pki = data.path("pki");
    certificates(&pki);
    let args = tls_args(&pki, "on");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = data.up(&args);
    let tls_uri = format!(
        "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
        up.port,
        arg(&pki)
    );
    run(
        "qemu-io",
        &["-f", "raw", &up.uri, "-c", "write -P 0x3c 0 64k"],
    );
    let info = run_text("nbdinfo", &[&tls_uri]);
    assert!(info.contains("with TLS"), "{info}");
    let [object, creds, image_opts, spec] = qemu_tls(&pki, up.port);
    run(
        "qemu-io",
        &[
            &object,
            &creds,
            &image_opts,
            &spec,
            "-c",
            "read -P 0x3c 0 64k",
        ],
    );
    up.stop();
}

#[test]
fn tls_options_are_checked_before_anything_starts() {
    let data = Data::new();
    let output = data.blocktree_output(&["up", "--data", &arg(&data.data()), "--tls", "require"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(!data.data().exists(), "nothing was created");
    let output = data.blocktree_output(&[
        "up",
        "--data",
        &arg(&data.data()),
        "--tls",
        "on",
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.pem",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent.pem"), "{stderr}");
}

#[test]
fn a_client_ca_admits_only_clients_with_its_certificates() {
    let data = Data::new();
    let pki = data.path("pki");
    certificates(&pki);
    // A client of this CA; one without a certificate; one of another CA (which
    // still trusts the server's CA, so only its own certificate is wrong).
    let good = data.path("good-client");
    client_certificate(&pki, &good);
    let anonymous = data.path("anonymous-client");
    fs::create_dir_all(&anonymous).unwrap();
    fs::copy(pki.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let other_ca = data.path("other-pki");
    certificates(&other_ca);
    let stranger = data.path("stranger-client");
    client_certificate(&other_ca, &stranger);
    fs::copy(pki.join("ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();

    // Only with --tls require: --tls on would let plaintext clients around it.
    let ca = arg(&pki.join("ca-cert.pem"));
    let mut args = tls_args(&pki, "on");
    args.extend(["--tls-client-ca".to_owned(), ca.clone()]);
    let mut up_args = vec!["up".to_owned(), "--data".to_owned(), arg(&data.data())];
    up_args.extend(args);
    let up_args: Vec<&str> = up_args.iter().map(String::as_str).collect();
    let refused = data.blocktree_output(&up_args);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--tls-client-ca needs --tls require"),
        "{stderr}"
    );

    let mut args = tls_args(&pki, "require");
    args.extend(["--tls-client-ca".to_owned(), ca]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = data.up(&args);
    assert!(
        up.field("nbd clients")
            .starts_with("TLS clients with a certificate issued by a CA in"),
        "{}",
        up.stdout_text()
    );
    let uri = |dir: &Path| {
        format!(
            "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
            up.port,
            arg(dir)
        )
    };
    let info = run_text("nbdinfo", &[&uri(&good)]);
    assert!(info.contains("with TLS"), "{info}");
    let [object, creds, image_opts, spec] = qemu_tls(&good, up.port);
    run(
        "qemu-io",
        &[
            &object,
            &creds,
            &image_opts,
            &spec,
            "-c",
            "write -P 0x6b 0 64k",
            "-c",
            "read -P 0x6b 0 64k",
        ],
    );
    for refused in [&anonymous, &stranger] {
        let output = run_failing("nbdinfo", &[&uri(refused)]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!stdout.contains("export-size"), "{refused:?}: {stdout}");
        let [object, creds, image_opts, spec] = qemu_tls(refused, up.port);
        run_failing(
            "qemu-io",
            &[&object, &creds, &image_opts, &spec, "-c", "read 0 4k"],
        );
    }
    // The server lives on after the refusals.
    run_text("nbdinfo", &[&uri(&good)]);
    up.stop();
}
