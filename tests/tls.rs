//! TLS on both legs: clients verify pgveil's certificate and name, `--require-tls` refuses
//! plaintext, the upstream leg follows libpq's sslmode semantics, SCRAM over two TLS legs
//! fails with a clear message, and plaintext injected before the handshake is refused.

mod common;

use std::process::Command;

use common::{output, shared, sqlstate_of, stderr, stdout, TestProxy, SUPERUSER_PASSWORD};
use pgveil::config::UpstreamTls;
use tokio::io::AsyncWriteExt;

fn tls_psql(
    proxy: &TestProxy,
    host: &str,
    user: &str,
    password: &str,
    extra: &str,
    sql: &str,
) -> Command {
    let tls = shared().tls.as_ref().unwrap();
    let mut c = Command::new("psql");
    c.arg(format!(
        "host={host} port={} user={user} dbname=crm sslrootcert={} {extra}",
        proxy.addr.port(),
        tls.ca.display()
    ))
    .args(["-X", "-A", "-t", "-c", sql])
    .env("PGPASSWORD", password)
    .env_remove("PGSSLMODE");
    c
}

async fn proxy_with_client_tls(upstream: UpstreamTls, require: bool) -> TestProxy {
    let tls = shared().tls.as_ref().unwrap();
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    TestProxy::start(shared(), move |s| {
        s.tls_cert = Some(cert);
        s.tls_key = Some(key);
        s.upstream_tls = Some(upstream);
        s.require_tls = Some(require);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verifies_certificate_and_name() {
    let proxy = proxy_with_client_tls(UpstreamTls::Disable, false).await;
    let out = output(tls_psql(
        &proxy,
        "localhost",
        "alice",
        "alice_pw",
        "sslmode=verify-full",
        "SELECT 'over tls'",
    ))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "over tls");
    // A CA that did not sign pgveil's certificate is refused by the client.
    let other = tempfile::tempdir().unwrap();
    let other_ca = common::tls_files(other.path()).ca;
    // A later keyword wins in a libpq connection string: this CA replaces the right one.
    let extra = format!("sslmode=verify-full sslrootcert={}", other_ca.display());
    let out = output(tls_psql(
        &proxy,
        "localhost",
        "alice",
        "alice_pw",
        &extra,
        "SELECT 1",
    ))
    .await;
    assert!(!out.status.success());
    // OpenSSL words it as a failed verification or a failed signature check.
    let err = stderr(&out);
    assert!(
        err.contains("certificate verify failed") || err.contains("SSL error"),
        "{err}"
    );
    assert!(stdout(&out).trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_refuses_plaintext() {
    let proxy = proxy_with_client_tls(UpstreamTls::Disable, true).await;
    let out = output(tls_psql(
        &proxy,
        "127.0.0.1",
        "alice",
        "alice_pw",
        "sslmode=disable",
        "SELECT 1",
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only TLS connections"),
        "{}",
        stderr(&out)
    );
    let out = output(tls_psql(
        &proxy,
        "127.0.0.1",
        "alice",
        "alice_pw",
        "sslmode=require",
        "SELECT 1",
    ))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Counted by its reason.
    let metrics = proxy.proxy.metrics.render(0);
    assert!(
        metrics.contains("pgveil_connections_refused_total{reason=\"tls_required\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_two_tls_legs_fails_clearly() {
    let proxy = proxy_with_client_tls(UpstreamTls::Require, false).await;
    let out = output(tls_psql(
        &proxy,
        "localhost",
        "alice",
        "alice_pw",
        "sslmode=verify-full",
        "SELECT 1",
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("channel_binding=disable"),
        "{}",
        stderr(&out)
    );
    // The workaround the message names works, and md5 has no channel binding at all.
    let out = output(tls_psql(
        &proxy,
        "localhost",
        "alice",
        "alice_pw",
        "sslmode=verify-full channel_binding=disable",
        "SELECT 2",
    ))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = output(tls_psql(
        &proxy,
        "localhost",
        "md5_user",
        "md5_pw",
        "sslmode=verify-full",
        "SELECT 3",
    ))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

async fn upstream_ssl(proxy: &TestProxy) -> Result<bool, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &proxy.conn_str("postgres", SUPERUSER_PASSWORD, "crm"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn upstream_tls_modes() {
    let tls = shared().tls.as_ref().unwrap();
    let ca = tls.ca.clone();
    let verified = TestProxy::start(shared(), |s| {
        s.upstream_tls = Some(UpstreamTls::VerifyFull);
        s.upstream_ca = Some(ca);
    })
    .await;
    assert!(upstream_ssl(&verified).await.unwrap());
    let preferred = TestProxy::start(shared(), |_| {}).await;
    assert!(upstream_ssl(&preferred).await.unwrap());
    let plain = TestProxy::start(shared(), |s| s.upstream_tls = Some(UpstreamTls::Disable)).await;
    assert!(!upstream_ssl(&plain).await.unwrap());
    // verify-full with a CA that did not sign the server's certificate: no connection.
    let other = tempfile::tempdir().unwrap();
    let other_ca = common::tls_files(other.path()).ca;
    let wrong = TestProxy::start(shared(), |s| {
        s.upstream_tls = Some(UpstreamTls::VerifyFull);
        s.upstream_ca = Some(other_ca);
    })
    .await;
    let err = upstream_ssl(&wrong).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err}");
    // verify-ca: the chain counts, the right CA connects, another does not.
    for (ca, connects) in [(tls.ca.clone(), true), (other_ca_of(&other), false)] {
        let proxy = TestProxy::start(shared(), |s| {
            s.upstream_tls = Some(UpstreamTls::VerifyCa);
            s.upstream_ca = Some(ca);
        })
        .await;
        match upstream_ssl(&proxy).await {
            Ok(ssl) => assert!(connects && ssl),
            Err(e) => assert!(!connects, "{e}"),
        }
    }
}

fn other_ca_of(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("ca.pem")
}

#[tokio::test]
async fn plaintext_after_ssl_request_is_refused() {
    let proxy = proxy_with_client_tls(UpstreamTls::Disable, false).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut bytes = pgveil::protocol::startup::ssl_request_packet().to_vec();
    bytes.extend_from_slice(
        pgveil::protocol::startup::StartupMessage::new(&[
            ("user", "trust_user"),
            ("database", "crm"),
        ])
        .raw(),
    );
    s.write_all(&bytes).await.unwrap();
    let mut first = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut first)
        .await
        .unwrap();
    assert_eq!(first[0], b'E', "must not answer S with plaintext waiting");
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest).await;
    let body = &rest[4..];
    assert_eq!(sqlstate_of(body), "08P01");
}

/// The admin commands read TLS settings from the connection string as libpq does
/// (`sslmode`, `sslrootcert`, in a URL or keyword string), so a DBA can check rules against
/// a server that accepts only TLS, and verify its certificate. `tls_only_user` is refused
/// by the server without TLS (`hostnossl ... reject`).
#[test]
fn admin_commands_follow_libpq_sslmode() {
    let pg = shared();
    let ca = pg.tls.as_ref().unwrap().ca.display().to_string();
    let other = tempfile::tempdir().unwrap();
    let other_ca = common::tls_files(other.path()).ca.display().to_string();
    let check = |conn: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["check", "--rules", "rules/", "--upstream-url", conn])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PGPASSWORD", "tls_pw")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .output()
            .unwrap();
        (
            out.status.code(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    let url = format!("postgres://tls_only_user@127.0.0.1:{}/crm", pg.port);
    // Without TLS the server refuses this user; the default (prefer) and require use TLS.
    let (code, text) = check(&format!("{url}?sslmode=disable"));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("pg_hba.conf"), "{text}");
    for conn in [url.clone(), format!("{url}?sslmode=require")] {
        let (code, text) = check(&conn);
        assert_eq!(code, Some(0), "{conn}: {text}");
    }
    // verify-full: the certificate must chain to the root given and name the host.
    let (code, text) = check(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = check(&format!("{url}?sslmode=verify-full&sslrootcert={other_ca}"));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    let keywords = format!(
        "host=localhost port={} user=tls_only_user dbname=crm sslmode=verify-full sslrootcert='{ca}'",
        pg.port
    );
    let (code, text) = check(&keywords);
    assert_eq!(code, Some(0), "{text}");
    // A name the certificate does not carry: verify-full refuses, verify-ca (chain only)
    // accepts, and a wrong root fails verify-ca too.
    let misnamed = |mode: &str, root: &str| {
        format!(
            "host=db.invalid hostaddr=127.0.0.1 port={} user=tls_only_user dbname=crm sslmode={mode} sslrootcert={root}",
            pg.port
        )
    };
    let (code, text) = check(&misnamed("verify-full", &ca));
    assert_eq!(code, Some(2), "{text}");
    let (code, text) = check(&misnamed("verify-ca", &ca));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = check(&misnamed("verify-ca", &other_ca));
    assert_eq!(code, Some(2), "{text}");
    // verify-* without a root to verify against is an error, not a silent downgrade.
    let (code, text) = check(&format!("{url}?sslmode=verify-full"));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("sslrootcert"), "{text}");
    assert!(!text.contains("tls_pw"), "{text}");
}
