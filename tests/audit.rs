//! The audit log (spec section 6), metrics (section 7) and alerts: every statement of
//! every protocol form leaves exactly one record, in order, with the right fields, written
//! before the client sees the result; the chain shows any edit, deletion, reordering or
//! cut; a pgveil killed with SIGKILL loses no record of a result a client received;
//! rotation continues the chain; alerts fire and block; the failed-login guard turns an
//! address away; metrics are served and parse.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, pgveil, shared, PgCluster, TestProxy, SUPERUSER_PASSWORD};
use serde_json::Value;

const RULES: &str = r#"
[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.email"
function = "email"
unmasked_for = ["crm_admin"]

[[allow]]
roles = ["crm_admin"]
statements = ["delete", "truncate", "drop"]
tables = ["*"]
"#;

fn cluster() -> &'static PgCluster {
    shared()
}

async fn proxy_with(
    rules: &str,
    tweak: impl FnOnce(&mut pgveil::config::ServeSettings),
) -> (TestProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(cluster(), move |s| {
        s.rules = Some(path);
        tweak(s);
    })
    .await;
    (p, dir)
}

fn verify(files: &[&Path]) -> (Option<i32>, String) {
    let mut args = vec!["audit".to_string(), "verify".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pgveil(&args);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The statement records of one session (by its user's connect record order).
fn statements_of(records: &[Value], user: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["event"] == "statement" && r["user"] == user)
        .cloned()
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_of_every_protocol_form_has_one_record_in_order() {
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let alice = p.connect("alice", "alice_pw").await;

    // Simple protocol: one statement, then a string of three whose second fails.
    alice
        .simple_query("SELECT id, phone FROM customers WHERE id <= 3")
        .await
        .unwrap();
    let err = alice
        .batch_execute("SELECT 1; SELECT 1/0; SELECT 2")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    // Extended protocol: a prepared statement executed three times, binary results.
    let stmt = alice
        .prepare("SELECT id, email FROM customers WHERE id = $1")
        .await
        .unwrap();
    for id in 1..=3i64 {
        alice.query(&stmt, &[&id]).await.unwrap();
    }
    // Pipelined: three queries in flight at once on one connection.
    let (a, b, c) = tokio::join!(
        alice.query("SELECT 10", &[]),
        alice.query("SELECT 11", &[]),
        alice.query("SELECT full_name FROM customers WHERE id = $1", &[&1i64]),
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    // COPY out and in.
    {
        use futures_util::{SinkExt, StreamExt};
        let out = alice
            .copy_out("COPY (SELECT id FROM tasks WHERE id <= 5) TO STDOUT")
            .await
            .unwrap();
        let chunks: Vec<_> = out.collect().await;
        assert!(!chunks.is_empty());
        alice
            .batch_execute("CREATE TEMP TABLE t_in (a int)")
            .await
            .unwrap();
        let sink = alice.copy_in("COPY t_in FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        assert_eq!(sink.finish().await.unwrap(), 3);
    }
    // Refused: DELETE is protected by default, over both protocols.
    let refused = alice
        .simple_query("DELETE FROM tasks WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "42501");
    // The refusal's record is on disk by the time the client has the error.
    let records = p.audit_records();
    let last = records.last().unwrap();
    assert_eq!(last["decision"], "blocked", "{records:#?}");
    assert_eq!(last["statement"], "DELETE FROM tasks WHERE id = 1");
    let refused = alice
        .query("DELETE FROM tasks WHERE id = $1", &[&2i64])
        .await
        .unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "42501");
    alice.simple_query("SELECT 'still usable'").await.unwrap();

    let records = p.audit_records();
    let mine = statements_of(&records, "alice");
    let summary: Vec<(String, String, String)> = mine
        .iter()
        .map(|r| {
            (
                r["statement"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
                r["protocol"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    let expected_prefix = [
        s(
            "SELECT id, phone FROM customers WHERE id <= 3",
            "masked",
            "simple",
        ),
        s("SELECT 1", "allowed", "simple"),
        s("SELECT 1/0", "error", "simple"),
        s("SELECT 2", "error", "simple"),
        s(
            "SELECT id, email FROM customers WHERE id = $1",
            "masked",
            "extended",
        ),
        s(
            "SELECT id, email FROM customers WHERE id = $1",
            "masked",
            "extended",
        ),
        s(
            "SELECT id, email FROM customers WHERE id = $1",
            "masked",
            "extended",
        ),
    ];
    assert_eq!(&summary[..7], &expected_prefix[..], "{summary:#?}");
    // Pipelined statements: all three, each once (tokio-postgres prepares each first, so
    // the order they run in is the order their preparations came back).
    let mut pipelined: Vec<&str> = summary[7..10].iter().map(|x| x.0.as_str()).collect();
    pipelined.sort();
    assert_eq!(
        pipelined,
        vec![
            "SELECT 10",
            "SELECT 11",
            "SELECT full_name FROM customers WHERE id = $1"
        ]
    );
    let rest: Vec<(String, String, String)> = summary[10..].to_vec();
    assert_eq!(
        rest,
        vec![
            s(
                "COPY (SELECT id FROM tasks WHERE id <= 5) TO STDOUT",
                "allowed",
                "extended"
            ),
            s("CREATE TEMP TABLE t_in (a int)", "allowed", "simple"),
            s("COPY t_in FROM STDIN", "allowed", "extended"),
            s("DELETE FROM tasks WHERE id = 1", "blocked", "simple"),
            s("DELETE FROM tasks WHERE id = $1", "blocked", "extended"),
            s("SELECT 'still usable'", "allowed", "simple"),
        ],
        "{summary:#?}"
    );
    // Fields.
    let first = &mine[0];
    assert_eq!(first["kind"], "select");
    assert_eq!(strs(&first["tables"]), vec!["public.customers"]);
    assert_eq!(
        strs(&first["masked_columns"]),
        vec!["public.customers.phone"]
    );
    assert_eq!(first["rows"], 3);
    assert_eq!(first["database"], "crm");
    assert!(first["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(first["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["ts"].as_str().unwrap().len(), 27, "microseconds, UTC");
    assert!(first["duration_us"].as_u64().is_some());
    assert_eq!(mine[2]["sqlstate"], "22012");
    assert!(mine[3]["message"].as_str().unwrap().contains("not run"));
    assert_eq!(mine[4]["rows"], 1);
    assert_eq!(mine[10]["kind"], "copy");
    assert_eq!(mine[10]["rows"], 5);
    assert_eq!(mine[12]["rows"], 3);
    let blocked = &mine[13];
    assert_eq!(blocked["kind"], "delete");
    assert_eq!(blocked["sqlstate"], "42501");
    assert_eq!(strs(&blocked["tables"]), vec!["public.tasks"]);
    assert!(blocked["message"]
        .as_str()
        .unwrap()
        .starts_with("pgveil: DELETE on public.tasks"));
    assert!(blocked.get("rows").is_none());
    // Session events and one session id throughout.
    let session = first["session"].as_u64().unwrap();
    assert!(mine.iter().all(|r| r["session"] == session));
    assert!(records
        .iter()
        .any(|r| r["event"] == "connect" && r["session"] == session && r["user"] == "alice"));

    // An exempt role reading sensitive columns in clear is recorded as such.
    let admin = p.connect("crm_admin", "admin_pw").await;
    admin
        .simple_query("SELECT c FROM customers c WHERE id = 1")
        .await
        .unwrap();
    let records = p.audit_records();
    let adm = statements_of(&records, "crm_admin");
    let r = adm.last().unwrap();
    assert_eq!(r["decision"], "allowed");
    assert_eq!(
        strs(&r["unmasked_columns"]),
        vec!["public.customers.email", "public.customers.phone"]
    );
    assert!(strs(&r["masked_columns"]).is_empty());

    drop(alice);
    drop(admin);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = p.audit_records();
    assert!(records
        .iter()
        .any(|r| r["event"] == "disconnect" && r["session"] == session));
    let (code, text) = verify(&[&p.audit_path()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("intact"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_and_prints_json_or_a_table() {
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let alice = p.connect("alice", "alice_pw").await;
    alice
        .simple_query("SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    alice
        .simple_query("SELECT count(*) FROM deals")
        .await
        .unwrap();
    let _ = alice
        .simple_query("DELETE FROM customers WHERE id = 1")
        .await;
    let path = p.audit_path().display().to_string();
    let out = pgveil(&[
        "audit",
        "search",
        &path,
        "--user",
        "alice",
        "--table",
        "customers",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let out = pgveil(&["audit", "search", &path, "--decision", "blocked"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().starts_with("ts"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("DELETE FROM customers WHERE id = 1"),
        "{text}"
    );
    let out = pgveil(&["audit", "search", &path, "--since", "2999-01-01", "--json"]);
    assert!(out.stdout.is_empty());
    let out = pgveil(&["audit", "search", &path, "--since", "tomorrow"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_replaces_literals() {
    let (p, _rules) = proxy_with(RULES, |s| s.audit_redact = Some(true)).await;
    let admin = p.connect("crm_admin", "admin_pw").await;
    admin
        .simple_query("SELECT id FROM customers WHERE phone = '13900000000' OR id = 42")
        .await
        .unwrap();
    let records = p.audit_records();
    let r = statements_of(&records, "crm_admin").pop().unwrap();
    assert_eq!(
        r["statement"],
        "SELECT id FROM customers WHERE phone = ? OR id = ?"
    );
    let text = std::fs::read_to_string(p.audit_path()).unwrap();
    assert!(!text.contains("13900000000"));
}

/// Every blocked record names the rule behind it: a mask's line for masking refusals
/// (whole rows, functions, relations pgveil cannot place), the `[settings]` line or the
/// default setting's name for what cannot be analysed or is protected by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_blocked_record_names_its_rule() {
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in [
        "SELECT * FROM pg_stats WHERE tablename = 'customers'",
        "SELECT query_to_xml('select 1', true, true, '')",
        "SELECT * FROM no_such_table",
        "DO $$ BEGIN END $$",
        "DELETE FROM tasks WHERE id = 1",
    ] {
        let err = alice.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "42501", "{sql}: {err}");
    }
    let records = p.audit_records();
    let blocked: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "blocked")
        .collect();
    assert_eq!(blocked.len(), 5, "{records:#?}");
    let rules: Vec<&str> = blocked
        .iter()
        .map(|r| r["rule"].as_str().unwrap_or_else(|| panic!("no rule: {r}")))
        .collect();
    // Masking refusals name the phone mask, the first rule of the file (line 2); the
    // guard refuses what runs SQL it cannot see and DO blocks by the default
    // `unanalysable = "deny"`, and DELETE by the default `protected`.
    assert!(rules[0].ends_with("rules.toml:2"), "{rules:?}");
    assert_eq!(rules[1], "settings.unanalysable");
    assert!(rules[2].ends_with("rules.toml:2"), "{rules:?}");
    assert_eq!(rules[3], "settings.unanalysable");
    assert_eq!(rules[4], "settings.protected");
    p.shutdown().await;

    // With `[settings]` in the file, what cannot be analysed names that line.
    let rules = format!("[settings]\nunanalysable = \"deny\"\n{RULES}");
    let (p, _rules) = proxy_with(&rules, |_| {}).await;
    let alice = p.connect("alice", "alice_pw").await;
    alice.simple_query("DO $$ BEGIN END $$").await.unwrap_err();
    let records = p.audit_records();
    let last = records
        .iter()
        .rev()
        .find(|r| r["decision"] == "blocked")
        .unwrap();
    assert!(
        last["rule"].as_str().unwrap().ends_with("rules.toml:1"),
        "{last}"
    );
    p.shutdown().await;
}

/// A prepared statement's record follows what the server accepted: a Parse the server
/// refuses (its name is taken) does not change what an Execute of that name runs, nor
/// what its record says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_parse_does_not_rename_what_runs() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let mut s = common::raw_session(&p.addr_string(), "trust_user", "crm").await;
    let sync = write::frame(b'S', |_| {});
    async fn until_ready(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Some((tag, body)) = common::read_message(s).await {
            tags.push(tag);
            if tag == b'E' {
                tags.extend(common::sqlstate_of(&body).bytes());
            }
            if tag == b'Z' {
                break;
            }
        }
        tags
    }
    let mut batch = Vec::new();
    batch.extend_from_slice(write::parse("s1", "SELECT 'what runs' AS first").raw());
    batch.extend_from_slice(sync.raw());
    s.write_all(&batch).await.unwrap();
    assert_eq!(until_ready(&mut s).await, b"1Z");
    // The name is taken: the server refuses this Parse, and pipelined with it, the same
    // batch's Bind and Execute (which the server skips).
    let mut batch = Vec::new();
    batch.extend_from_slice(write::parse("s1", "SELECT 'what the client claims'").raw());
    batch.extend_from_slice(write::bind("", "s1").raw());
    batch.extend_from_slice(write::execute("").raw());
    batch.extend_from_slice(sync.raw());
    s.write_all(&batch).await.unwrap();
    assert_eq!(until_ready(&mut s).await, b"E42P05Z");
    // The next batch runs what s1 is on the server.
    let mut batch = Vec::new();
    batch.extend_from_slice(write::bind("", "s1").raw());
    let describe_portal = write::frame(b'D', |b| b.extend_from_slice(b"P\0"));
    batch.extend_from_slice(describe_portal.raw());
    batch.extend_from_slice(write::execute("").raw());
    batch.extend_from_slice(sync.raw());
    s.write_all(&batch).await.unwrap();
    assert_eq!(until_ready(&mut s).await, b"2TDCZ");
    let records = p.audit_records();
    let mine = statements_of(&records, "trust_user");
    let ran: Vec<(&str, &str)> = mine
        .iter()
        .map(|r| {
            (
                r["statement"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ran.last(),
        Some(&("SELECT 'what runs' AS first", "allowed")),
        "{ran:?}"
    );
    assert!(
        !ran.iter()
            .any(|(text, d)| *text == "SELECT 'what the client claims'" && *d == "allowed"),
        "{ran:?}"
    );
    p.shutdown().await;
}

/// Under a client_encoding other than UTF-8 the audit records the statements the server
/// reads: in SJIS the bytes C3 81 5C are two characters, so what reads as one statement
/// in UTF-8 is two for the server, and each has its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_client_encoding() {
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let admin = p.connect("crm_admin", "admin_pw").await;
    admin
        .simple_query("SET client_encoding = 'SJIS'")
        .await
        .unwrap();
    admin
        .simple_query("SELECT length(E'\u{c1}\\'); SELECT 'second'; --'")
        .await
        .unwrap();
    let records = p.audit_records();
    let mine = statements_of(&records, "crm_admin");
    let texts: Vec<&str> = mine
        .iter()
        .map(|r| r["statement"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(texts[1].starts_with("SELECT length(E'"), "{texts:?}");
    assert!(!texts[1].contains("second"), "{texts:?}");
    assert_eq!(texts[2], "SELECT 'second'");
    p.shutdown().await;
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected_and_named() {
    let (p, _rules) = proxy_with(RULES, |s| {
        s.audit_flush = Some(pgveil::config::AuditFlush::Always)
    })
    .await;
    let alice = p.connect("alice", "alice_pw").await;
    for i in 0..6 {
        alice.simple_query(&format!("SELECT {i}")).await.unwrap();
    }
    let lines = lines_of(&p.audit_path());
    assert!(lines.len() >= 7);
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, lines: &[String]| {
        let f = dir.path().join(name);
        std::fs::write(&f, lines.concat()).unwrap();
        verify(&[&f])
    };
    let (code, text) = check("ok.jsonl", &lines);
    assert_eq!(code, Some(0), "{text}");

    let mut edited = lines.clone();
    edited[3] = edited[3].replace("\"alice\"", "\"mallory\"");
    assert_ne!(edited[3], lines[3]);
    let (code, text) = check("edited.jsonl", &edited);
    assert_eq!(code, Some(1));
    assert!(
        text.contains(":4: broken") && text.contains("edited"),
        "{text}"
    );

    let mut deleted = lines.clone();
    deleted.remove(2);
    let (code, text) = check("deleted.jsonl", &deleted);
    assert_eq!(code, Some(1));
    assert!(
        text.contains(":3: broken") && text.contains("removed"),
        "{text}"
    );

    let mut reordered = lines.clone();
    reordered.swap(4, 5);
    let (code, text) = check("reordered.jsonl", &reordered);
    assert_eq!(code, Some(1));
    assert!(text.contains(":5: broken"), "{text}");

    let mut torn = lines.clone();
    let last = torn.pop().unwrap();
    torn.push(last[..last.len() / 2].to_string());
    let (code, text) = check("torn.jsonl", &torn);
    assert_eq!(code, Some(1));
    assert!(text.contains("torn last line"), "{text}");

    // Removing whole lines from the end is caught against a hash kept elsewhere.
    let last_hash: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let mut cut = lines.clone();
    cut.pop();
    let f = dir.path().join("cut.jsonl");
    std::fs::write(&f, cut.concat()).unwrap();
    let out = pgveil(&[
        "audit",
        "verify",
        f.to_str().unwrap(),
        "--last-hash",
        last_hash["hash"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_continues_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let log_str = log.display().to_string();
    let (p, _rules) = proxy_with(RULES, move |s| {
        s.audit_log = Some(log_str);
        s.audit_max_bytes = Some(3000);
    })
    .await;
    let alice = p.connect("alice", "alice_pw").await;
    for i in 0..60 {
        alice
            .simple_query(&format!("SELECT {i} AS n"))
            .await
            .unwrap();
    }
    drop(alice);
    p.shutdown().await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &log)
        .collect();
    files.sort();
    assert!(files.len() >= 3, "rotated files: {files:?}");
    files.push(log.clone());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (code, text) = verify(&refs);
    assert_eq!(code, Some(0), "{text}");
    // Each file starts where the one before ended.
    let last_of =
        |p: &Path| -> Value { serde_json::from_str(lines_of(p).last().unwrap()).unwrap() };
    let first_of = |p: &Path| -> Value { serde_json::from_str(&lines_of(p)[0]).unwrap() };
    assert_eq!(first_of(&files[1])["prev_hash"], last_of(&files[0])["hash"]);
    // Every statement is in exactly one file.
    let all: Vec<String> = files.iter().flat_map(|f| lines_of(f)).collect();
    for i in 0..60 {
        let needle = format!("\"statement\":\"SELECT {i} AS n\"");
        assert_eq!(
            all.iter().filter(|l| l.contains(&needle)).count(),
            1,
            "SELECT {i}"
        );
    }
    // A file missing from the middle is named.
    let (code, text) = verify(&[&files[0], &files[2]]);
    assert_eq!(code, Some(1));
    assert!(text.contains("a file is missing"), "{text}");
}

/// `--audit-keep` and `--audit-keep-days`: rotated files beyond the count, or older than
/// the age, are removed (after each rotation, and at start); the live file and files that
/// are not the log's rotated ones stay; what is kept still verifies, as a chain that
/// continues from the files removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    // An old rotated file, a file of another log and a look-alike that is not rotated.
    let old = dir.path().join("audit.20200101T000000000000Z.jsonl");
    std::fs::write(&old, "").unwrap();
    let other = dir.path().join("other.20200101T000000000000Z.jsonl");
    std::fs::write(&other, "").unwrap();
    let notes = dir.path().join("audit.notes.jsonl");
    std::fs::write(&notes, "").unwrap();
    let log_str = log.display().to_string();
    let (p, _rules) = proxy_with(RULES, move |s| {
        s.audit_log = Some(log_str);
        s.audit_keep_days = Some(30);
    })
    .await;
    assert!(
        !old.exists(),
        "a rotated file older than 30 days is removed at start"
    );
    p.shutdown().await;
    let log_str = log.display().to_string();
    let (p, _rules) = proxy_with(RULES, move |s| {
        s.audit_log = Some(log_str);
        s.audit_max_bytes = Some(2000);
        s.audit_keep = Some(2);
    })
    .await;
    let alice = p.connect("alice", "alice_pw").await;
    for i in 0..60 {
        alice
            .simple_query(&format!("SELECT {i} AS n"))
            .await
            .unwrap();
    }
    drop(alice);
    p.shutdown().await;
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &log && p != &other && p != &notes)
        .collect();
    rotated.sort();
    assert_eq!(rotated.len(), 2, "kept: {rotated:?}");
    assert!(other.exists() && notes.exists() && log.exists());
    // The newest were kept: the last statement is in the live file or the newest one.
    let all: Vec<String> = rotated
        .iter()
        .chain([&log])
        .flat_map(|f| lines_of(f))
        .collect();
    assert!(all.iter().any(|l| l.contains("SELECT 59 AS n")));
    assert!(!all
        .iter()
        .any(|l| l.contains("\"statement\":\"SELECT 0 AS n\"")));
    let mut files: Vec<&Path> = rotated.iter().map(PathBuf::as_path).collect();
    files.push(&log);
    let (code, text) = verify(&files);
    assert_eq!(code, Some(0), "{text}");
}

fn spawn_pgveil(
    pg: &PgCluster,
    port: u16,
    rules: &Path,
    log: &Path,
    extra: &[&str],
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &pg.addr(), "--upstream-tls", "disable"])
        .arg("--rules")
        .arg(rules)
        .arg("--audit-log")
        .arg(log)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_connect(conn_str: &str) -> tokio_postgres::Client {
    for _ in 0..100 {
        if let Ok((c, conn)) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pgveil did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_record_of_a_delivered_result() {
    let pg = cluster();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let log = dir.path().join("audit.jsonl");
    let port = free_port();
    let mut child = spawn_pgveil(pg, port, dir.path(), &log, &[]);
    let conn_str = format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=crm"
    );
    wait_connect(&conn_str).await;
    // Eight clients send uniquely numbered statements as fast as they can; each notes the
    // numbers whose results it received.
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let conn_str = conn_str.clone();
        tasks.push(tokio::spawn(async move {
            let client = wait_connect(&conn_str).await;
            let mut delivered = Vec::new();
            for i in 0.. {
                let marker = worker * 1_000_000 + i;
                let sql = format!("SELECT {marker} AS marker");
                let ok = if i % 2 == 0 {
                    client.simple_query(&sql).await.is_ok()
                } else {
                    client.query(&sql, &[]).await.is_ok()
                };
                if !ok {
                    break;
                }
                delivered.push(marker);
            }
            delivered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
    let mut delivered = Vec::new();
    for t in tasks {
        delivered.extend(t.await.unwrap());
    }
    assert!(
        delivered.len() > 100,
        "load was too light: {}",
        delivered.len()
    );
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let missing: Vec<&u64> = delivered
        .iter()
        .filter(|m| !text.contains(&format!("\"statement\":\"SELECT {m} AS marker\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} delivered results have no record: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let (code, out) = verify(&[&log]);
    assert!(
        code == Some(0) || (code == Some(1) && out.contains("torn last line")),
        "after SIGKILL the chain must be intact but for a torn last line: {out}"
    );

    // A restart repairs a torn end and continues the chain.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"{\"ts\":\"2026-").unwrap();
    drop(f);
    let port = free_port();
    let mut child = spawn_pgveil(pg, port, dir.path(), &log, &[]);
    let conn_str = format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=crm"
    );
    let c = wait_connect(&conn_str).await;
    c.simple_query("SELECT 'after restart'").await.unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (code, out) = verify(&[&log]);
    assert_eq!(code, Some(0), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"event\":\"recovered\""));
    assert!(text.contains("after restart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_log_and_block_mass_reads_of_masked_tables() {
    let rules = format!(
        "{RULES}\n[[alert]]\nroles = [\"crm_support\"]\nmax_rows_per_minute = 50\naction = \"block\"\n\n[[alert]]\nroles = [\"crm_analyst\"]\nmax_rows_per_minute = 50\naction = \"log\"\n\n[[alert]]\nroles = [\"crm_admin\"]\nmax_rows_per_minute = 50\naction = \"block\"\n"
    );
    let (p, _rules) = proxy_with(&rules, |_| {}).await;
    let alert_line = rules.lines().position(|l| l == "[[alert]]").unwrap() + 1;
    let alert_rule = format!("rules.toml:{alert_line}");
    let alice = p.connect("alice", "alice_pw").await;
    // Prepared while under the limit, executed after it: refused all the same.
    let prepared = alice
        .prepare("SELECT phone FROM customers WHERE id = $1")
        .await
        .unwrap();
    // Under the limit: fine. Unmasked tables do not count.
    alice
        .simple_query("SELECT id, phone FROM customers WHERE id <= 40")
        .await
        .unwrap();
    alice.simple_query("SELECT * FROM deals").await.unwrap();
    // Over it: the statement that crosses completes, an alert is recorded ...
    alice
        .simple_query("SELECT id, phone FROM customers WHERE id <= 20")
        .await
        .unwrap();
    let records = p.audit_records();
    let alert = records
        .iter()
        .find(|r| r["event"] == "alert")
        .expect("an alert record");
    assert_eq!(alert["user"], "alice");
    assert!(
        alert["rule"].as_str().unwrap().ends_with(&alert_rule),
        "{alert}"
    );
    assert!(
        alert["message"].as_str().unwrap().contains("60 rows"),
        "{alert}"
    );
    // ... and further reads of masked tables are refused, naming the alert, over both
    // protocols, while other tables stay readable.
    let e = alice
        .simple_query("SELECT id FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501");
    assert!(
        e.as_db_error().unwrap().message().contains("alert"),
        "{e:?}"
    );
    let e = alice
        .query("SELECT email FROM customers WHERE id = $1", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501");
    alice
        .simple_query("SELECT count(*) FROM deals")
        .await
        .unwrap();
    let e = alice.query(&prepared, &[&1i64]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501");
    // Another user of the same role has a window of their own: carol is crm_sales, not
    // under the rule; bob is under a log-only rule.
    let bob = p.connect("bob", "bob_pw").await;
    bob.simple_query("SELECT id, phone FROM customers WHERE id <= 100")
        .await
        .unwrap();
    bob.simple_query("SELECT id FROM customers WHERE id = 1")
        .await
        .unwrap();
    let records = p.audit_records();
    assert!(records
        .iter()
        .any(|r| r["event"] == "alert" && r["user"] == "bob"));
    let blocked: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "blocked" && r["user"] == "alice")
        .collect();
    assert_eq!(blocked.len(), 3);
    // An exempt role is counted too; once blocked, what pgveil cannot analyse is refused
    // as well (it might read a masked table): pgveil's 42501, not the server's 42601.
    let admin = p.connect("crm_admin", "admin_pw").await;
    admin
        .simple_query("SELECT id, phone FROM customers WHERE id <= 60")
        .await
        .unwrap();
    let e = admin
        .simple_query("SELEC phone FROM customers")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501", "{e:?}");
    admin
        .simple_query("SELECT count(*) FROM deals")
        .await
        .unwrap();
    assert!(blocked[0]["rule"].as_str().unwrap().ends_with(&alert_rule));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_turn_the_address_away() {
    let (p, _rules) = proxy_with(RULES, |s| {
        s.auth_max_failures = Some(3);
        s.auth_ban_secs = Some(600);
    })
    .await;
    for _ in 0..3 {
        let e =
            tokio_postgres::connect(&p.conn_str("alice", "wrong", "crm"), tokio_postgres::NoTls)
                .await
                .err()
                .expect("a wrong password fails");
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"));
    }
    // Now even the right password is turned away, with a pgveil message.
    let e = tokio_postgres::connect(
        &p.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("the address is turned away");
    assert_eq!(e.code().map(|c| c.code()), Some("28000"));
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("too many failed login"), "{message}");
    let records = p.audit_records();
    let failed = records
        .iter()
        .filter(|r| r["event"] == "auth_failed")
        .count();
    let refused = records
        .iter()
        .filter(|r| r["event"] == "connection_refused")
        .count();
    assert_eq!((failed, refused), (3, 1), "{records:#?}");
    assert!(records
        .iter()
        .filter(|r| r["event"] == "auth_failed")
        .all(|r| r["user"] == "alice" && r["database"] == "crm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text_format() {
    let (p, _rules) = proxy_with(RULES, |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pgveil::server::serve_metrics(listener, p.proxy.clone()));
    let alice = p.connect("alice", "alice_pw").await;
    alice
        .simple_query("SELECT id, phone FROM customers WHERE id <= 4")
        .await
        .unwrap();
    let _ = alice.simple_query("DELETE FROM customers").await;

    let body = scrape(addr).await;
    let mut samples = std::collections::HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(name.to_string(), value);
    }
    for line in body.lines().filter(|l| l.starts_with("# TYPE")) {
        let kind = line.split(' ').nth(3).unwrap();
        assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
    }
    assert_eq!(samples["pgveil_connections_active"], 1.0);
    assert_eq!(
        samples["pgveil_statements_total{kind=\"select\",decision=\"masked\"}"],
        1.0
    );
    assert_eq!(
        samples["pgveil_statements_total{kind=\"delete\",decision=\"blocked\"}"],
        1.0
    );
    assert_eq!(samples["pgveil_rows_masked_total"], 4.0);
    assert_eq!(samples["pgveil_statement_duration_seconds_count"], 2.0);
    assert_eq!(
        samples["pgveil_statement_duration_seconds_bucket{le=\"+Inf\"}"],
        2.0
    );
    assert_eq!(
        samples["pgveil_refusals_total{rule=\"settings.protected\"}"],
        1.0
    );
    assert!(samples["pgveil_audit_records_total"] >= 3.0);
    // Anything but /metrics is a 404.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 404"));
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"));
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_statements_with_the_audit_log_off() {
    let (p, _rules) = proxy_with(RULES, |s| {
        s.audit = Some(false);
        s.metrics = Some("127.0.0.1:9".into()); // bound by `serve`, not by this test
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pgveil::server::serve_metrics(listener, p.proxy.clone()));
    let alice = p.connect("alice", "alice_pw").await;
    alice.simple_query("SELECT 1").await.unwrap();
    let body = scrape(addr).await;
    assert!(
        body.contains("pgveil_statements_total{kind=\"select\",decision=\"allowed\"} 1\n"),
        "{body}"
    );
    assert!(!p.audit_path().exists(), "no audit log with audit = false");
}

/// Rows of a statement the audit cannot analyse might be rows of a masked table: they
/// count toward alerts (an admin could otherwise export customers with `TABLE customers`
/// or `FROM ONLY customers`, which sqlparser does not read, without an alert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_count_rows_of_statements_pgveil_cannot_analyse() {
    let rules = format!(
        "{RULES}\n[[alert]]\nroles = [\"crm_admin\"]\nmax_rows_per_minute = 50\naction = \"block\"\n"
    );
    for export in [
        "TABLE customers",
        "SELECT * FROM ONLY customers",
        "UPDATE ONLY customers SET full_name = full_name RETURNING *",
    ] {
        let (p, _rules) = proxy_with(&rules, |_| {}).await;
        let admin = p.connect("crm_admin", "admin_pw").await;
        admin.simple_query(export).await.unwrap();
        let records = p.audit_records();
        let record = records
            .iter()
            .find(|r| r["statement"] == export)
            .expect("a record");
        assert_eq!(record["unanalysed"], true, "{record}");
        assert!(
            records
                .iter()
                .any(|r| r["event"] == "alert" && r["user"] == "crm_admin"),
            "{export}: no alert"
        );
        let e = admin
            .simple_query("SELECT id FROM customers WHERE id = 1")
            .await
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "42501", "{export}: {e:?}");
    }
}

/// Rows of an SQL cursor run by a protocol Execute of its name (a portal no Bind made)
/// count toward alerts like those of FETCH, a blocked user's next such Execute is refused,
/// and their record names the cursor's statement and tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_an_sql_cursor_run_by_protocol_execute_count_toward_alerts() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    cluster().psql_super("crm", "GRANT crm_base TO trust_user");
    let rules = format!(
        "{RULES}\n[[alert]]\nroles = [\"trust_user\"]\nmax_rows_per_minute = 50\naction = \"block\"\n"
    );
    let (p, _rules) = proxy_with(&rules, |_| {}).await;
    let mut s = trust_user_session(&p, "crm").await;
    // Everything up to ReadyForQuery: (tags, SQLSTATE of the first error).
    async fn reply(s: &mut tokio::net::TcpStream) -> (Vec<u8>, String) {
        let mut tags = Vec::new();
        let mut code = String::new();
        loop {
            let (tag, body) =
                tokio::time::timeout(Duration::from_secs(15), common::read_message(s))
                    .await
                    .expect("an answer")
                    .expect("the connection open");
            tags.push(tag);
            if tag == b'E' && code.is_empty() {
                code = common::sqlstate_of(&body);
            }
            if tag == b'Z' {
                return (tags, code);
            }
        }
    }
    let execute = |cursor: &str| {
        let mut batch = write::frame(b'E', |b| {
            b.extend_from_slice(cursor.as_bytes());
            b.extend_from_slice(&[0, 0, 0, 0, 0]);
        })
        .raw()
        .to_vec();
        batch.extend_from_slice(write::frame(b'S', |_| {}).raw());
        batch
    };
    s.write_all(
        write::query(
            "BEGIN; DECLARE export CURSOR FOR SELECT * FROM customers; \
             DECLARE later CURSOR FOR SELECT id, phone FROM customers",
        )
        .raw(),
    )
    .await
    .unwrap();
    let (_, code) = reply(&mut s).await;
    assert_eq!(code, "");
    s.write_all(&execute("export")).await.unwrap();
    let (tags, code) = reply(&mut s).await;
    assert_eq!(code, "");
    let rows = tags.iter().filter(|&&t| t == b'D').count();
    assert!(rows > 50, "{rows} rows");
    let records = p.audit_records();
    let record = records
        .iter()
        .find(|r| r["protocol"] == "extended" && r["user"] == "trust_user")
        .expect("the Execute's record");
    let statement = record["statement"].as_str().unwrap();
    assert!(
        statement.contains("DECLARE export CURSOR FOR SELECT * FROM customers"),
        "{record}"
    );
    assert_eq!(
        record["tables"],
        serde_json::json!(["public.customers"]),
        "{record}"
    );
    assert_eq!(record["rows"], rows as u64, "{record}");
    assert_eq!(record["kind"], "fetch", "{record}");
    // Counted as masked rows too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pgveil::server::serve_metrics(listener, p.proxy.clone()));
    let body = scrape(addr).await;
    assert!(
        body.contains(&format!("pgveil_rows_masked_total {rows}\n")),
        "{body}"
    );
    assert_ne!(record["unanalysed"], true, "{record}");
    assert!(
        record["masked_columns"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("public.customers.phone")),
        "{record}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "alert" && r["user"] == "trust_user"),
        "no alert"
    );
    // Blocked now: the rows of a cursor declared before are refused, by the server's
    // own error.
    s.write_all(&execute("later")).await.unwrap();
    let (tags, code) = reply(&mut s).await;
    assert_eq!(code, "42501", "Execute of a cursor while blocked: {tags:?}");
    assert!(!tags.contains(&b'D'), "{tags:?}");
    s.write_all(write::query("ROLLBACK").raw()).await.unwrap();
    reply(&mut s).await;
    p.shutdown().await;
}

/// A raw session of trust_user (no password) in `db`, through `p`.
async fn trust_user_session(p: &TestProxy, db: &str) -> tokio::net::TcpStream {
    common::raw_session_with(
        &p.addr_string(),
        &[("user", "trust_user"), ("database", db)],
    )
    .await
}

/// pgveil in front of a fresh CRM database `db` in which trust_user may delete tasks, and
/// a raw session of trust_user.
async fn deleting_session(db: &str) -> (TestProxy, tempfile::TempDir, tokio::net::TcpStream) {
    cluster().create_crm_db(db);
    cluster().psql_super(
        db,
        "GRANT DELETE ON tasks TO trust_user; GRANT crm_base TO trust_user",
    );
    let rules = format!(
        "{RULES}\n[[allow]]\nroles = [\"trust_user\"]\nstatements = [\"delete\"]\ntables = [\"public.tasks\"]\n"
    );
    let (p, dir) = proxy_with(&rules, |_| {}).await;
    let s = trust_user_session(&p, db).await;
    (p, dir, s)
}

/// The audit says what the server did, not what the client saw: a DELETE still running
/// when its client went away runs to the end on the server (and commits), and its record
/// says so, with its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_client_left_is_recorded_as_the_server_ran_it() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    let db = "audit_fate";
    let (p, _rules, mut s) = deleting_session(db).await;
    let sql = "SELECT pg_sleep(0.5); DELETE FROM tasks WHERE id IN (5, 6)";
    s.write_all(write::query(sql).raw()).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let record = loop {
        let found = p
            .audit_records()
            .into_iter()
            .find(|r| r["statement"] == "DELETE FROM tasks WHERE id IN (5, 6)");
        if let Some(r) = found.filter(|_| {
            p.audit_records()
                .iter()
                .any(|r| r["event"] == "disconnect" && r["user"] == "trust_user")
        }) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The server's word: the rows are gone.
    assert_eq!(
        cluster().psql_super(db, "SELECT count(*) FROM tasks WHERE id IN (5, 6)"),
        "0"
    );
    assert_eq!(record["decision"], "allowed", "{record}");
    assert_eq!(record["rows"], 2, "{record}");
    // A block left open is rolled back by the server: the disconnect record says so.
    let mut s = trust_user_session(&p, db).await;
    s.write_all(write::query("BEGIN; DELETE FROM tasks WHERE id = 7").raw())
        .await
        .unwrap();
    while let Some((tag, _)) = common::read_message(&mut s).await {
        if tag == b'Z' {
            break;
        }
    }
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let disconnect = loop {
        let found = p
            .audit_records()
            .into_iter()
            .filter(|r| r["event"] == "disconnect" && r["user"] == "trust_user")
            .nth(1);
        if let Some(r) = found {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no disconnect record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        disconnect["message"], "the server rolled back the transaction block the session left open",
        "{disconnect}"
    );
    assert_eq!(
        cluster().psql_super(db, "SELECT count(*) FROM tasks WHERE id = 7"),
        "1"
    );
    p.shutdown().await;
}

/// Statements the server rolled back because a later statement of the same implicit
/// transaction failed (a pipeline up to Sync, a query string) are recorded as rolled
/// back, without rows; those it committed keep theirs. The server is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_a_failed_implicit_transaction_are_recorded_as_rolled_back() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    let db = "audit_rolled_back";
    let (p, _rules, mut s) = deleting_session(db).await;
    async fn until_ready(s: &mut tokio::net::TcpStream) {
        while let Some((tag, _)) = common::read_message(s).await {
            if tag == b'Z' {
                return;
            }
        }
        panic!("the connection closed");
    }
    // A pipeline: the DELETE runs, then the division fails before Sync.
    let mut batch = Vec::new();
    for (sql, portal) in [
        ("DELETE FROM tasks WHERE id IN (10, 11)", "a"),
        ("SELECT 1 / 0", "b"),
    ] {
        batch.extend_from_slice(write::parse(portal, sql).raw());
        batch.extend_from_slice(write::bind(portal, portal).raw());
        batch.extend_from_slice(write::execute(portal).raw());
    }
    batch.extend_from_slice(write::frame(b'S', |_| {}).raw());
    s.write_all(&batch).await.unwrap();
    until_ready(&mut s).await;
    // A query string, failing and not; and a block, which the client ends itself.
    for sql in [
        "DELETE FROM tasks WHERE id = 12; SELECT 1 / 0",
        "DELETE FROM tasks WHERE id = 13; SELECT 1",
    ] {
        s.write_all(write::query(sql).raw()).await.unwrap();
        until_ready(&mut s).await;
    }
    let remaining = cluster().psql_super(
        db,
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM tasks WHERE id IN (10, 11, 12, 13)",
    );
    assert_eq!(remaining, "10,11,12", "the server's word");
    let records = p.audit_records();
    let record = |statement: &str| {
        records
            .iter()
            .find(|r| r["statement"] == statement)
            .unwrap_or_else(|| panic!("no record of {statement}"))
            .clone()
    };
    for undone in [
        "DELETE FROM tasks WHERE id IN (10, 11)",
        "DELETE FROM tasks WHERE id = 12",
    ] {
        let r = record(undone);
        assert_eq!(r["decision"], "error", "{r}");
        assert_eq!(r["sqlstate"], "22012", "{r}");
        assert!(
            r["message"].as_str().unwrap().starts_with("rolled back"),
            "{r}"
        );
        assert!(r.get("rows").is_none() || r["rows"].is_null(), "{r}");
    }
    let kept = record("DELETE FROM tasks WHERE id = 13");
    assert_eq!(kept["decision"], "allowed", "{kept}");
    assert_eq!(kept["rows"], 1, "{kept}");
    // Records stay in the order the statements ran.
    let order: Vec<&str> = records
        .iter()
        .filter(|r| r["user"] == "trust_user" && r["event"] == "statement")
        .map(|r| r["statement"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "DELETE FROM tasks WHERE id IN (10, 11)",
            "SELECT 1 / 0",
            "DELETE FROM tasks WHERE id = 12",
            "SELECT 1 / 0",
            "DELETE FROM tasks WHERE id = 13",
            "SELECT 1",
        ]
    );
    p.shutdown().await;
}

/// `pgveil_config_last_reload_successful` says whether the rules in force are the files'
/// (a refused reload keeps older ones), and `pgveil_build_info` names the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_whether_the_last_reload_took_and_the_version() {
    let (p, rules) = proxy_with(RULES, |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(pgveil::server::serve_metrics(listener, p.proxy.clone()));
    let body = scrape(addr).await;
    assert!(
        body.contains("pgveil_config_last_reload_successful 1\n"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "pgveil_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    let file = rules.path().join("rules.toml");
    std::fs::write(&file, "[[mask]]\ncolumn = \"no dots\"\n").unwrap();
    assert!(p.proxy.reload_rules().is_err());
    let body = scrape(addr).await;
    assert!(
        body.contains("pgveil_config_last_reload_successful 0\n"),
        "{body}"
    );
    std::fs::write(&file, RULES).unwrap();
    p.proxy.reload_rules().unwrap();
    let body = scrape(addr).await;
    assert!(
        body.contains("pgveil_config_last_reload_successful 1\n"),
        "{body}"
    );
    p.shutdown().await;
}
