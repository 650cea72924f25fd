//! Authentication is relayed: every method the server uses works through pgveil, the
//! server's verdict reaches the client unchanged, and replication connections are refused.

mod common;

use common::{output, psql_cmd, shared, stderr, TestProxy};

async fn current_user(proxy: &TestProxy, user: &str, password: &str) -> String {
    let client = proxy.connect(user, password).await;
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn every_password_method_is_relayed() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    assert_eq!(current_user(&proxy, "alice", "alice_pw").await, "alice");
    assert_eq!(current_user(&proxy, "md5_user", "md5_pw").await, "md5_user");
    assert_eq!(
        current_user(&proxy, "clear_user", "clear_pw").await,
        "clear_user"
    );
    assert_eq!(current_user(&proxy, "trust_user", "").await, "trust_user");
}

#[tokio::test]
async fn wrong_password_gets_the_servers_28p01() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    for (user, password) in [
        ("alice", "wrong"),
        ("md5_user", "wrong"),
        ("clear_user", "x"),
    ] {
        let err = tokio_postgres::connect(
            &proxy.conn_str(user, password, "crm"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{user} must not get in with a wrong password"));
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{user}: {err}");
    }
    // The proxy keeps serving after failed logins.
    assert_eq!(current_user(&proxy, "alice", "alice_pw").await, "alice");
}

#[tokio::test]
async fn unknown_database_error_passes_through() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let err = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "no_such_db"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_refused() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let (host, port) = proxy
        .addr_string()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let mut c = std::process::Command::new("psql");
    c.arg(format!(
        "host={host} port={port} user=repl_user dbname=crm replication=database"
    ))
    .args(["-X", "-c", "IDENTIFY_SYSTEM"])
    .env("PGPASSWORD", "repl_pw");
    let out = output(c).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("replication connections are not supported"),
        "{}",
        stderr(&out)
    );
    // A normal connection by the same role works.
    let mut c = psql_cmd(&proxy.addr_string(), "repl_user", "repl_pw", "crm");
    c.args(["-c", "SELECT 1"]);
    assert!(output(c).await.status.success());
}
