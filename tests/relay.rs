//! The relay through real clients: psql, tokio-postgres (simple, extended, binary,
//! pipelined), COPY both ways, cancel, FunctionCall, notifications, pgbench in every query
//! mode, and 500 concurrent sessions. Every result is compared with a direct connection.

mod common;

use std::time::Duration;

use common::{output, psql_cmd, shared, stderr, stdout, TestProxy, SUPERUSER_PASSWORD};
use futures_util::{future::try_join_all, SinkExt, StreamExt, TryStreamExt};

fn direct_conn_str(user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=crm",
        shared().port
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_output_matches_direct() {
    let pg = shared();
    let proxy = TestProxy::start(pg, |_| {}).await;
    let script = "SELECT id, full_name, phone, email, birth_date, balance FROM customers ORDER BY id LIMIT 20;\n\
                  SELECT count(*), sum(amount) FROM deals;\n\
                  BEGIN; CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1),(2); SELECT * FROM t; ROLLBACK;\n\
                  SELECT 1; SELECT 2\\;SELECT 3;\n\
                  \\d customers\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script).unwrap();
    let run = |addr: String| {
        let mut c = psql_cmd(&addr, "alice", "alice_pw", "crm");
        c.arg("-f").arg(&file);
        output(c)
    };
    let direct = run(pg.addr()).await;
    let proxied = run(proxy.addr_string()).await;
    assert!(direct.status.success(), "{}", stderr(&direct));
    assert!(proxied.status.success(), "{}", stderr(&proxied));
    assert_eq!(stdout(&proxied), stdout(&direct));
    assert!(stdout(&proxied).contains("user1@example.com"));
}

#[tokio::test]
async fn extended_protocol_binary_results_match_direct() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let via = proxy.connect("alice", "alice_pw").await;
    let direct = common::connect(&direct_conn_str("alice", "alice_pw")).await;
    let sql = "SELECT id, full_name, phone, birth_date, balance::float8, created_at, \
               ARRAY[id, id * 2] AS arr, id % 2 = 0 AS even, convert_to(email, 'UTF8') AS raw \
               FROM customers WHERE id <= $1 ORDER BY id";
    for client in [&via, &direct] {
        let stmt = client.prepare(sql).await.unwrap();
        assert_eq!(stmt.columns().len(), 9);
    }
    let a = fetch_rows(&via, sql).await;
    let b = fetch_rows(&direct, sql).await;
    assert_eq!(a.len(), 50);
    assert_eq!(a, b);
}

/// Minimal binary decoding of `date` without pulling in a date crate.
mod chrono_free {
    use tokio_postgres::types::{FromSql, Type};

    #[derive(Debug, PartialEq)]
    pub struct Date(pub i32);

    impl<'a> FromSql<'a> for Date {
        fn from_sql(
            _: &Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Date(i32::from_be_bytes(raw.try_into()?)))
        }
        fn accepts(ty: &Type) -> bool {
            *ty == Type::DATE
        }
    }
}

type Row = (
    i64,
    String,
    Option<String>,
    Option<chrono_free::Date>,
    f64,
    Vec<i64>,
    bool,
    Vec<u8>,
);

async fn fetch_rows(c: &tokio_postgres::Client, sql: &str) -> Vec<Row> {
    let rows = c.query(sql, &[&50i64]).await.unwrap();
    rows.iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(6),
                r.get(7),
                r.get(8),
            )
        })
        .collect()
}

#[tokio::test]
async fn pipelined_queries_on_one_connection() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let client = proxy.connect("alice", "alice_pw").await;
    let stmt = client
        .prepare("SELECT email FROM customers WHERE id = $1")
        .await
        .unwrap();
    // tokio-postgres pipelines requests that are in flight at once.
    let futures = (1..=100i64).map(|id| {
        let client = &client;
        let stmt = &stmt;
        async move {
            let row = client.query_one(stmt, &[&id]).await?;
            Ok::<_, tokio_postgres::Error>((id, row.get::<_, String>(0)))
        }
    });
    let results = try_join_all(futures).await.unwrap();
    for (id, email) in results {
        assert_eq!(email, format!("user{id}@example.com"));
    }
    // An error in the middle of a pipeline fails only its own request.
    let (good, bad, good2) = tokio::join!(
        client.query_one("SELECT 1::int", &[]),
        client.query_one("SELECT 1/0", &[]),
        client.query_one("SELECT 2::int", &[])
    );
    assert_eq!(good.unwrap().get::<_, i32>(0), 1);
    assert_eq!(bad.unwrap_err().code().unwrap().code(), "22012");
    assert_eq!(good2.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_150k_rows() {
    let pg = shared();
    pg.psql_super(
        "crm",
        "CREATE TABLE IF NOT EXISTS copy_test(id int, payload text); GRANT ALL ON copy_test TO crm_admin",
    );
    let proxy = TestProxy::start(pg, |_| {}).await;
    let client = proxy.connect("crm_admin", "admin_pw").await;
    client.execute("TRUNCATE copy_test", &[]).await.unwrap();
    let sink = client.copy_in("COPY copy_test FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let rows = 150_000;
    let mut batch = String::new();
    for i in 0..rows {
        batch.push_str(&format!("{i}\tpayload number {i}\n"));
        if batch.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut batch)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(batch)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), rows);

    let stream = client
        .copy_out("COPY (SELECT * FROM copy_test ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let text: Vec<u8> = chunks.concat();
    let lines = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines as u64, rows);
    assert!(text.starts_with(b"0\tpayload number 0\n"));
    let check = pg.psql_super("crm", "SELECT count(*), sum(id) FROM copy_test");
    assert_eq!(check, format!("{rows}|{}", (rows - 1) * rows / 2));
    // The session is still usable after both COPYs.
    let n: i64 = client
        .query_one("SELECT count(*) FROM copy_test", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as u64, rows);
}

#[tokio::test]
async fn cancel_reaches_the_right_backend() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let client = proxy.connect("alice", "alice_pw").await;
    let other = proxy.connect("alice", "alice_pw").await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, took) = tokio::time::timeout(Duration::from_secs(15), sleeper)
        .await
        .expect("the cancelled query must end")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014", "{err}");
    assert!(took < Duration::from_secs(20));
    // The other session was not cancelled.
    let row = other.query_one("SELECT 1::int", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_via_large_objects() {
    // psql's \lo_import and \lo_export use libpq's fast-path FunctionCall messages.
    let pg = shared();
    let proxy = TestProxy::start(pg, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let mut c = psql_cmd(&proxy.addr_string(), "postgres", SUPERUSER_PASSWORD, "crm");
    c.args(["-c", &format!("\\lo_import {}", src.display())]);
    let out = output(c).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let oid = pg.psql_super("crm", "SELECT max(oid) FROM pg_largeobject_metadata");
    let mut c = psql_cmd(&proxy.addr_string(), "postgres", SUPERUSER_PASSWORD, "crm");
    c.args(["-c", &format!("\\lo_export {oid} {}", dst.display())]);
    let out = output(c).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    pg.psql_super("crm", &format!("SELECT lo_unlink({oid})"));
}

#[tokio::test]
async fn notifications_notices_and_parameter_status() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let (listener, mut connection) = tokio_postgres::connect(
        &proxy.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    listener.batch_execute("LISTEN crm_events").await.unwrap();
    let notifier = proxy.connect("carol", "carol_pw").await;
    notifier
        .batch_execute("NOTIFY crm_events, 'customer 42 updated'")
        .await
        .unwrap();
    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .unwrap();
    let mut got_notification = false;
    let mut got_notice = false;
    while !(got_notification && got_notice) {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("messages must be relayed")
            .unwrap();
        match m {
            tokio_postgres::AsyncMessage::Notification(n) => {
                assert_eq!(n.channel(), "crm_events");
                assert_eq!(n.payload(), "customer 42 updated");
                got_notification = true;
            }
            tokio_postgres::AsyncMessage::Notice(n) => {
                assert_eq!(n.message(), "hello from the server");
                got_notice = true;
            }
            _ => {}
        }
    }
    // ParameterStatus from SET reaches the client (psql shows it through SHOW as well).
    listener
        .batch_execute("SET application_name = 'crm-app'")
        .await
        .unwrap();
    let rows = listener
        .simple_query("SHOW application_name")
        .await
        .unwrap();
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("crm-app"));
}

#[tokio::test]
async fn transaction_states_are_relayed() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let mut client = proxy.connect("crm_admin", "admin_pw").await;
    let tx = client.transaction().await.unwrap();
    tx.execute("UPDATE deals SET stage = stage WHERE id = 1", &[])
        .await
        .unwrap();
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    let err = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "25P02");
    tx.rollback().await.unwrap();
    let row = client.query_one("SELECT 1::int", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn identity_has_transitive_roles() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let _alice = proxy.connect("alice", "alice_pw").await;
    let _md5 = proxy.connect("md5_user", "md5_pw").await;
    let find = |user: &str| {
        proxy
            .proxy
            .sessions
            .list()
            .into_iter()
            .find(|s| s.identity.user == user)
            .map(|s| s.identity.clone())
    };
    let alice = find("alice").expect("alice's session is registered");
    assert_eq!(alice.roles, vec!["alice", "crm_base", "crm_support"]);
    assert_eq!(alice.database, "crm");
    assert_eq!(alice.search_path, "\"$user\", public");
    let md5 = find("md5_user").unwrap();
    assert_eq!(md5.roles, vec!["crm_base", "crm_support", "md5_user"]);
}

async fn pgbench(addr: &str, args: &[&str]) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut c = std::process::Command::new("pgbench");
    c.args(["-h", host, "-p", port, "-U", "postgres"])
        .args(args)
        .arg("bench")
        .env("PGPASSWORD", SUPERUSER_PASSWORD);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "pgbench {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_query_mode() {
    let pg = shared();
    pg.psql_super("postgres", "CREATE DATABASE bench");
    let proxy = TestProxy::start(pg, |_| {}).await;
    let addr = proxy.addr_string();
    // Initialisation runs DDL and COPY through the proxy.
    pgbench(&addr, &["-i", "-s", "1", "-q"]).await;
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut args = vec!["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "100"];
            if select_only {
                args.push("-S");
            }
            let out = pgbench(&addr, &args).await;
            assert!(
                out.contains("number of transactions actually processed: 400/400"),
                "{mode} {select_only}: {out}"
            );
            assert!(out.contains("number of failed transactions: 0"), "{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_sessions() {
    let proxy = TestProxy::start(shared(), |_| {}).await;
    let conn_str = proxy.conn_str("bob", "bob_pw", "crm");
    let clients = try_join_all((0..500).map(|_| {
        let conn_str = conn_str.clone();
        async move {
            let (client, connection) =
                tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    }))
    .await
    .unwrap();
    assert_eq!(proxy.proxy.active_sessions(), 500);
    let pids = try_join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let row = c
            .query_one("SELECT pg_backend_pid(), $1::int", &[&(i as i32)])
            .await?;
        assert_eq!(row.get::<_, i32>(1), i as i32);
        Ok::<_, tokio_postgres::Error>(row.get::<_, i32>(0))
    }))
    .await
    .unwrap();
    let mut unique = pids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 500, "each session has its own backend");
    drop(clients);
    for _ in 0..100 {
        if proxy.proxy.active_sessions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.proxy.active_sessions(), 0);
}

#[tokio::test]
async fn negotiate_protocol_version_passes_through() {
    use tokio::io::AsyncWriteExt;
    let proxy = TestProxy::start(shared(), |_| {}).await;
    // Protocol 3.2 with an unknown protocol option: the server answers with
    // NegotiateProtocolVersion and the session goes on at 3.0.
    let mut body = Vec::new();
    body.extend_from_slice(&((3i32 << 16) | 2).to_be_bytes());
    for (k, v) in [
        ("user", "trust_user"),
        ("database", "crm"),
        ("_pq_.pgveil_test", "1"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&packet).await.unwrap();
    let mut tags = Vec::new();
    while let Some((tag, body)) = common::read_message(&mut s).await {
        tags.push(tag);
        if tag == b'v' {
            assert!(String::from_utf8_lossy(&body).contains("_pq_.pgveil_test"));
        }
        if tag == b'Z' || tag == b'E' {
            break;
        }
    }
    assert!(tags.contains(&b'v'), "{tags:?}");
    assert_eq!(tags.last(), Some(&b'Z'), "{tags:?}");
}

/// Unix-domain sockets on both legs: clients connect to DIR/.s.PGSQL.PORT (as psql -h DIR
/// does) and pgveil reaches the server through its socket. The server is the oracle: it
/// sees no client address on a socket connection. A server that lets a client in without
/// a password there (peer, trust) would lend it pgveil's own identity: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_on_both_legs() {
    use pgveil::config::{Config, ServeSettings, UpstreamTls};
    let c = shared();
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(
        scratch.path().join("r.toml"),
        "[settings]\nprotected = []\n",
    )
    .unwrap();
    let settings = ServeSettings {
        upstream: Some(format!("unix:{}/.s.PGSQL.{}", c.dir.display(), c.port)),
        rules: Some(scratch.path().to_path_buf()),
        audit_log: Some(scratch.path().join("audit.jsonl").display().to_string()),
        upstream_tls: Some(UpstreamTls::Prefer),
        ..Default::default()
    };
    let proxy = std::sync::Arc::new(
        pgveil::proxy::Proxy::new(Config::from_settings(settings).unwrap()).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the socket would go is left alone; a socket nothing answers on
    // (a crashed pgveil's) is replaced.
    let path = dir.path().join(".s.PGSQL.6999");
    std::fs::write(&path, "not a socket").unwrap();
    assert!(pgveil::server::UnixSocket::bind(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    std::fs::remove_file(&path).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let socket = pgveil::server::UnixSocket::bind(&path).unwrap();
    let listeners = pgveil::server::Listeners {
        tcp: None,
        unix: Some(socket),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pgveil::server::run(listeners, proxy, async {
        let _ = stopped.await;
    }));
    let conn = |user: &str, pw: &str| {
        format!(
            "host={} port=6999 user={user} password={pw} dbname=crm",
            dir.path().display()
        )
    };
    let alice = common::connect(&conn("alice", "alice_pw")).await;
    let row = alice
        .query_one(
            "SELECT current_user::text, inet_client_addr() IS NULL, count(*) FROM customers",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice");
    assert!(row.get::<_, bool>(1), "the server saw a TCP client");
    assert_eq!(row.get::<_, i64>(2), 200);
    // A wrong password is the server's to refuse.
    let wrong = tokio_postgres::connect(&conn("alice", "nope"), tokio_postgres::NoTls).await;
    let err = wrong.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
    // bob's local line is `trust`: pgveil refuses to pass that on.
    let bob = tokio_postgres::connect(&conn("bob", "anything"), tokio_postgres::NoTls).await;
    let err = bob.err().unwrap();
    let db = err.as_db_error().unwrap();
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert!(
        db.message().contains("without a password"),
        "{}",
        db.message()
    );
    // psql -h DIR finds the socket by the libpq convention.
    let socket_dir = format!("{}:6999", dir.path().display());
    let out = psql_cmd(&socket_dir, "alice", "alice_pw", "crm")
        .args(["-c", "SELECT 'via ' || current_user"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "via alice", "{}", stderr(&out));
    let _ = stop.send(());
    task.await.unwrap();
    assert!(
        !dir.path().join(".s.PGSQL.6999").exists(),
        "socket file left behind"
    );
}
