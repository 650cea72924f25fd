//! Bad input and faults: malformed or oversized messages close only the offending
//! connection with FATAL 08P01; a dead or unreachable upstream gives 08006 instead of a
//! hang and the proxy recovers when it returns; vanished clients release their backend;
//! the connection cap, handshake and idle timeouts, and SIGTERM's graceful drain.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    expect_error, free_port, is_closed, raw_session, raw_session_with, read_message, shared,
    sqlstate_of, ClusterOptions, PgCluster, TestProxy, SUPERUSER_PASSWORD,
};
use tokio::io::AsyncWriteExt;

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

fn backend_alive(pid: i32) -> bool {
    shared().psql_super(
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
    ) == "1"
}

#[tokio::test]
async fn malformed_messages_close_only_that_connection() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let bystander = proxy.connect("alice", "alice_pw").await;
    let bad_inputs: [&[u8]; 4] = [
        b"Q\x00\x00\x00\x02",                 // length below 4
        b"!\x00\x00\x00\x04",                 // unknown message type
        b"Q\x00\x00\x00\x08abcd",             // query without its terminator
        b"B\x00\x00\x00\x08\x00\x00\xff\xff", // Bind with a negative count
    ];
    for bad in bad_inputs {
        let mut s = raw_session(&proxy.addr_string(), "trust_user", "crm").await;
        s.write_all(bad).await.unwrap();
        let body = expect_error(&mut s).await.expect("a FATAL error");
        assert_eq!(sqlstate_of(&body), "08P01", "{bad:?}");
        assert!(String::from_utf8_lossy(&body).contains("FATAL"));
        assert!(is_closed(&mut s).await);
    }
    let row = bystander.query_one("SELECT 1::int", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn oversized_message_is_refused_before_it_is_read() {
    let proxy = TestProxy::start(shared(), |s| s.max_message_bytes = Some(1 << 20)).await;
    let mut s = raw_session(&proxy.addr_string(), "trust_user", "crm").await;
    // Announce 64 MiB and send none of it: the refusal must not wait for the body.
    s.write_all(b"Q\x04\x00\x00\x00").await.unwrap();
    let body = expect_error(&mut s).await.expect("a FATAL error");
    assert_eq!(sqlstate_of(&body), "08P01");
    assert!(is_closed(&mut s).await);
}

#[tokio::test]
async fn malformed_startup_packets() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let cases: [(&[u8], &str); 2] = [
        (b"\x00\x00\x00\x08\x00\x02\x00\x00", "0A000"), // protocol 2.0
        (b"\xff\xff\xff\xf0\x00\x03\x00\x00", "08P01"), // negative length
    ];
    for (bytes, code) in cases {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let body = expect_error(&mut s).await.expect("an error");
        assert_eq!(sqlstate_of(&body), code);
        assert!(is_closed(&mut s).await);
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_08006() {
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = TestProxy::start_upstream(&dead, |s| s.connect_timeout_secs = Some(2)).await;
    let err = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("no server, no session");
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_query_then_back() {
    let pg = PgCluster::start(ClusterOptions::default());
    let proxy = TestProxy::start(&pg, |_| {}).await;
    let client = proxy.connect("alice", "alice_pw").await;
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.kill();
    let result = tokio::time::timeout(Duration::from_secs(30), query)
        .await
        .expect("the client must get an error, not hang")
        .unwrap();
    assert!(result.is_err());
    // While the server is down new sessions fail cleanly ...
    let err = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err:?}");
    // ... and work again once it is back.
    pg.restart();
    let client = proxy.connect("alice", "alice_pw").await;
    let row = client.query_one("SELECT 7::int", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test]
async fn terminated_backend_ends_the_client_session() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let app = "terminate-me";
    let mut s = raw_session_with(
        &proxy.addr_string(),
        &[
            ("user", "trust_user"),
            ("database", "crm"),
            ("application_name", app),
        ],
    )
    .await;
    shared().psql_super(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'"),
    );
    let body = expect_error(&mut s)
        .await
        .expect("the server's FATAL error");
    assert_eq!(sqlstate_of(&body), "57P01");
    assert!(is_closed(&mut s).await);
    let other = proxy.connect("alice", "alice_pw").await;
    assert!(other.query_one("SELECT 1", &[]).await.is_ok());
}

#[tokio::test]
async fn vanished_client_releases_its_backend() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let (client, connection) = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(connection);
    let pid = backend_pid(&client).await;
    assert!(backend_alive(pid));
    // Dropping the connection task closes the socket without a Terminate message.
    conn.abort();
    let _ = conn.await;
    for _ in 0..100 {
        if !backend_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backend {pid} outlived its client");
}

#[tokio::test]
async fn connection_cap_answers_53300() {
    let proxy = TestProxy::start(shared(), |s| s.max_client_conn = Some(2)).await;
    let a = proxy.connect("alice", "alice_pw").await;
    let _b = proxy.connect("alice", "alice_pw").await;
    let err = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("over the cap");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err:?}");
    drop(a);
    for _ in 0..50 {
        if let Ok((c, conn)) = tokio_postgres::connect(
            &proxy.conn_str("alice", "alice_pw", "crm"),
            tokio_postgres::NoTls,
        )
        .await
        {
            tokio::spawn(conn);
            assert!(c.query_one("SELECT 1", &[]).await.is_ok());
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a freed slot must be usable again");
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let proxy = TestProxy::start(shared(), |s| s.handshake_timeout_secs = Some(1)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert!(is_closed(&mut s).await);
}

#[tokio::test]
async fn idle_client_gets_57p05() {
    let proxy = TestProxy::start(shared(), |s| s.client_idle_timeout_secs = Some(1)).await;
    let mut s = raw_session(&proxy.addr_string(), "trust_user", "crm").await;
    let body = expect_error(&mut s).await.expect("an idle-timeout error");
    assert_eq!(sqlstate_of(&body), "57P05");
    assert!(is_closed(&mut s).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let pg = shared();
    let rules = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &pg.addr(), "--upstream-tls", "disable"])
        .arg("--rules")
        .arg(rules.path())
        .args(["--shutdown-grace-secs", "30", "--audit-log", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conn_str = format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=crm"
    );
    let mut connected = None;
    for _ in 0..100 {
        if let Ok(c) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
            connected = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (busy, busy_conn) = connected.expect("pgveil must start");
    tokio::spawn(busy_conn);
    let (idle, idle_conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    let running = tokio::spawn(async move {
        busy.query_one("SELECT pg_sleep(2)::text, 'finished'", &[])
            .await
            .map(|r| r.get::<_, String>(1))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The idle session is closed with 57P01 ...
    let ended = tokio::time::timeout(Duration::from_secs(15), idle_conn)
        .await
        .expect("idle sessions close on shutdown")
        .unwrap();
    assert_eq!(ended.unwrap_err().code().map(|c| c.code()), Some("57P01"));
    drop(idle);
    // ... no new session is accepted ...
    assert!(tokio_postgres::connect(&conn_str, tokio_postgres::NoTls)
        .await
        .is_err());
    // ... and the running statement finishes.
    let finished = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the running statement completes")
        .unwrap();
    assert_eq!(finished.unwrap(), "finished");
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    panic!("pgveil did not exit after SIGTERM");
}

/// A request sent into COPY FROM STDIN would be swallowed by the server's protocol error
/// and never answered, shifting every later reply onto the wrong request (for a masked
/// session: another portal's mask plan). pgveil ends such a client instead, whether the
/// request comes after the CopyInResponse or pipelined right behind the COPY.
#[tokio::test]
async fn requests_sent_into_copy_in_end_the_session() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let setup = "CREATE TEMP TABLE copy_target (a int)";
    for pipelined in [false, true] {
        let mut s = raw_session(&proxy.addr_string(), "trust_user", "crm").await;
        s.write_all(query_frame(setup).raw()).await.unwrap();
        wait_ready(&mut s).await;
        s.write_all(query_frame("COPY copy_target FROM STDIN").raw())
            .await
            .unwrap();
        if pipelined {
            s.write_all(query_frame("SELECT 1").raw()).await.unwrap();
        } else {
            loop {
                let (tag, _) = read_message(&mut s).await.expect("CopyInResponse");
                if tag == b'G' {
                    break;
                }
            }
            s.write_all(query_frame("SELECT 1").raw()).await.unwrap();
        }
        let body = expect_error(&mut s).await.expect("a FATAL error");
        assert_eq!(sqlstate_of(&body), "08P01", "pipelined: {pipelined}");
        assert!(String::from_utf8_lossy(&body).contains("COPY FROM STDIN"));
        assert!(is_closed(&mut s).await);
    }
    // COPY itself still works.
    let c = proxy.connect("alice", "alice_pw").await;
    c.batch_execute("CREATE TEMP TABLE t_ok (a int)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY t_ok FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    let n: i64 = c
        .query_one("SELECT count(*) FROM t_ok", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

fn query_frame(sql: &str) -> pgveil::protocol::Frame {
    pgveil::protocol::write::query(sql)
}

async fn wait_ready(s: &mut tokio::net::TcpStream) {
    while let Some((tag, body)) = read_message(s).await {
        assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            return;
        }
    }
    panic!("no ReadyForQuery");
}
