//! Bulk-delete limits (`max_rows` on `[[allow]]`): a DELETE (or a protected UPDATE) that
//! would remove more rows than the rule allows is rolled back and refused, with the rule
//! named, over the simple and the extended protocol, with and without RETURNING, inside a
//! transaction block and out, for a role that owns the table (the server would let it do
//! anything) and one that does not. The server is the oracle: a direct connection counts
//! the rows and the recycle bin's captures after each attempt. Statements whose rows pgveil
//! cannot count apart are refused, never run unlimited.

mod common;

use std::sync::OnceLock;

use common::{stderr, PgCluster, TestProxy, SUPERUSER_PASSWORD};

const RULES: &str = r#"
[settings]
protected = ["delete", "truncate", "drop", "update"]

[[allow]]
roles = ["crm_support", "mallory"]
statements = ["delete", "update"]
tables = ["public.tasks"]
max_rows = 3

[[allow]]
roles = ["crm_admin"]
statements = ["delete", "truncate", "drop", "update"]
tables = ["*"]

[[recycle]]
table = "public.tasks"
"#;

fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pg = PgCluster::start(Default::default());
        pg.psql_super(
            "postgres",
            "CREATE ROLE mallory LOGIN PASSWORD 'mallory_pw' IN ROLE crm_base",
        );
        // (For the attack tests' raw sessions.)
        pg.psql_super("postgres", "GRANT crm_base TO trust_user");
        pg
    })
}

/// A CRM database whose tasks table mallory owns, with the recycle bin installed.
fn database(name: &str, rules: &std::path::Path) -> &'static PgCluster {
    let pg = cluster();
    pg.create_crm_db(name);
    pg.psql_super(name, "ALTER TABLE tasks OWNER TO mallory");
    let url = format!(
        "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{name}",
        pg.port
    );
    let out = common::pgveil(&[
        "trash",
        "init",
        "--rules",
        rules.to_str().unwrap(),
        "--upstream-url",
        &url,
    ]);
    assert!(out.status.success(), "trash init: {}", stderr(&out));
    pg
}

/// Rows in tasks, tasks with the note the UPDATEs write, and captures in the bin.
fn state(pg: &PgCluster, db: &str) -> String {
    pg.psql_super(
        db,
        "SELECT (SELECT count(*) FROM tasks) || ' ' || \
         (SELECT count(*) FROM tasks WHERE note = 'overwritten') || ' ' || \
         (SELECT count(*) FROM pgveil_trash.deletions)",
    )
}

fn error_of(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

/// Asserts that pgveil refused `sql` for its row limit or for a form it cannot count.
fn assert_limit_refusal(sql: &str, e: &tokio_postgres::Error, why: &str) {
    let (code, message) = error_of(e);
    assert_eq!(code, "42501", "{sql}: {message}");
    assert!(message.starts_with("pgveil: "), "{sql}: {message}");
    assert!(message.contains(why), "{sql}: {message}");
    assert!(
        message.contains("rules.toml:"),
        "{sql}: the rule: {message}"
    );
}

async fn over_limit_for(user: &str, password: &str, db: &str) {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("rules.toml"), RULES).unwrap();
    let pg = database(db, rules.path());
    let p = TestProxy::with_rules(pg, RULES).await;
    let c = common::connect(&p.conn_str(user, password, db)).await;
    let before = state(pg, db);
    assert_eq!(before, "100 0 0");

    // Over the limit, every way it can be sent: nothing removed, nothing captured.
    for sql in [
        "DELETE FROM tasks WHERE id > 0",
        "DELETE FROM tasks WHERE id > 0 RETURNING id, note",
        "delete from public.tasks where owner = 'alice';",
        "UPDATE tasks SET note = 'overwritten' WHERE id > 0",
        "UPDATE tasks SET note = 'overwritten' WHERE id > 0 RETURNING *",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_limit_refusal(sql, &e, "allows at most 3 (max_rows)");
        assert_eq!(state(pg, db), before, "{sql}");
        let e = c.query(sql, &[]).await.unwrap_err();
        assert_limit_refusal(sql, &e, "allows at most 3 (max_rows)");
        assert_eq!(state(pg, db), before, "{sql} (extended)");
    }
    let e = c
        .execute("DELETE FROM tasks WHERE id > $1", &[&0i64])
        .await
        .unwrap_err();
    assert_limit_refusal("with a parameter", &e, "it would remove 100 rows");
    assert_eq!(state(pg, db), before);

    // Inside a transaction block: refused, and the block is aborted as by a server error.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("DELETE FROM tasks WHERE id = 1", &[])
        .await
        .unwrap();
    let e = c
        .execute("DELETE FROM tasks WHERE id > 1", &[])
        .await
        .unwrap_err();
    assert_limit_refusal("in a block", &e, "max_rows");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(error_of(&e).0, "25P02", "the block is aborted");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(state(pg, db), before);

    // Forms whose rows pgveil cannot count apart are refused, never run unlimited.
    for sql in [
        "WITH d AS (DELETE FROM tasks WHERE id > 0 RETURNING 1) SELECT count(*) FROM d",
        "PREPARE wipe AS DELETE FROM tasks WHERE id > 0",
        "EXPLAIN ANALYZE DELETE FROM tasks WHERE id > 0",
        "INSERT INTO tasks (id, owner) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET note = 'overwritten'",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_limit_refusal(sql, &e, "sent as a statement of its own");
    }
    let sql = "SELECT 1; DELETE FROM tasks WHERE id > 0";
    let e = c.simple_query(sql).await.unwrap_err();
    assert_limit_refusal(sql, &e, "send it as a query of its own");
    assert_eq!(state(pg, db), before);

    // Within the limit it runs as it would directly: tags, rows, parameters, blocks.
    let msgs = c
        .simple_query("DELETE FROM tasks WHERE id IN (1, 2)")
        .await
        .unwrap();
    assert!(
        matches!(
            msgs.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(2))
        ),
        "{msgs:?}"
    );
    assert_eq!(
        c.execute("DELETE FROM tasks WHERE id = $1", &[&3i64])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        c.execute("DELETE FROM tasks WHERE id > 1000", &[])
            .await
            .unwrap(),
        0
    );
    let rows = c
        .query(
            "DELETE FROM tasks WHERE id IN (4, 5) RETURNING id, note",
            &[],
        )
        .await
        .unwrap();
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort();
    assert_eq!(ids, vec![4, 5]);
    assert_eq!(rows[0].columns()[1].name(), "note");
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        c.execute("DELETE FROM tasks WHERE id IN (6, 7, 8)", &[])
            .await
            .unwrap(),
        3
    );
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        c.execute("UPDATE tasks SET note = 'overwritten' WHERE id = 9", &[])
            .await
            .unwrap(),
        1
    );
    // (Each DELETE that ran is one capture, the one that removed nothing too.)
    assert_eq!(state(pg, db), "92 1 5");

    // The refusals are audited with the rule, as refusals.
    let records = p.audit_records();
    let refused = records
        .iter()
        .find(|r| r["statement"] == "DELETE FROM tasks WHERE id > 0")
        .expect("a record");
    assert_eq!(refused["decision"], "blocked", "{refused}");
    assert_eq!(refused["sqlstate"], "42501", "{refused}");
    assert!(
        refused["rule"].as_str().unwrap().contains("rules.toml:"),
        "{refused}"
    );
    let allowed = records
        .iter()
        .find(|r| r["statement"] == "DELETE FROM tasks WHERE id IN (1, 2)")
        .expect("a record");
    assert_eq!(allowed["decision"], "allowed", "{allowed}");
    assert_eq!(allowed["rows"], 2, "{allowed}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_owns_the_table_cannot_delete_past_max_rows() {
    over_limit_for("mallory", "mallory_pw", "limits_owner").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_does_not_own_the_table_cannot_delete_past_max_rows() {
    over_limit_for("alice", "alice_pw", "limits_support").await;
}

// ---------------------------------------------------------------------------------------
// Attack pass on `max_rows`: every form tried is here. The server is the oracle: `state()`
// after each attempt. Forms pgveil holds to the limit are asserted in the tests below;
// what it does not hold is listed by `problems_found_by_the_attack`, which fails.
// ---------------------------------------------------------------------------------------

use pgveil::protocol::write;
use tokio::io::AsyncWriteExt;

/// RULES, and trust_user (raw protocol sessions, no password) under the same limit.
fn attack_rules() -> String {
    format!(
        "{RULES}\n[[allow]]\nroles = [\"trust_user\"]\nstatements = [\"delete\", \"update\"]\ntables = [\"public.tasks\"]\nmax_rows = 3\n"
    )
}

/// A fresh database `db` as `database` makes it, in which trust_user may delete and
/// update tasks, and pgveil in front of it with `rules` in a directory the test may
/// rewrite (for reloads). Returns the rules file too.
async fn attack_db(
    db: &str,
    rules: &str,
) -> (
    &'static PgCluster,
    TestProxy,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, rules).unwrap();
    let pg = database(db, dir.path());
    pg.psql_super(db, "GRANT DELETE, UPDATE ON tasks TO trust_user");
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(pg, move |s| s.rules = Some(path)).await;
    (pg, p, file, dir)
}

/// A database `db` like `attack_db`'s, without pgveil: for direct comparisons.
fn direct_db(db: &str, rules: &str) -> &'static PgCluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let pg = database(db, dir.path());
    pg.psql_super(db, "GRANT DELETE, UPDATE ON tasks TO trust_user");
    pg
}

/// Rows of tasks, overwritten notes, captures: as numbers.
fn counts(pg: &PgCluster, db: &str) -> (i64, i64, i64) {
    let s = state(pg, db);
    let v: Vec<i64> = s.split(' ').map(|n| n.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

/// Puts tasks back to its 100 fixture rows, none overwritten (as the superuser, directly).
fn refill(pg: &PgCluster, db: &str) {
    pg.psql_super(
        db,
        "DELETE FROM tasks WHERE id > 100; \
         INSERT INTO tasks (id, customer_id, owner, note, due) \
         SELECT g, (g % 200) + 1, (ARRAY['alice','carol'])[g % 2 + 1], 'Call back #' || g, current_date + g::int \
         FROM generate_series(1::bigint, 100) g \
         ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note, owner = EXCLUDED.owner",
    );
}

/// How many rows one attempt removed and changed (the server's word).
fn removed_changed(before: (i64, i64, i64), after: (i64, i64, i64)) -> (i64, i64) {
    (before.0 - after.0, after.1 - before.1)
}

// --- raw protocol ------------------------------------------------------------------

async fn raw_trust(addr: &str, db: &str) -> tokio::net::TcpStream {
    common::raw_session_with(addr, &[("user", "trust_user"), ("database", db)]).await
}

fn sync() -> Vec<u8> {
    write::frame(b'S', |_| {}).raw().to_vec()
}

fn flush() -> Vec<u8> {
    write::frame(b'H', |_| {}).raw().to_vec()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    write::parse(name, sql).raw().to_vec()
}

fn query(sql: &str) -> Vec<u8> {
    write::query(sql).raw().to_vec()
}

fn describe(target: u8, name: &str) -> Vec<u8> {
    write::describe(target, name).raw().to_vec()
}

fn close(target: u8, name: &str) -> Vec<u8> {
    write::frame(b'C', |b| {
        b.extend_from_slice(&[target]);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&[0]);
    })
    .raw()
    .to_vec()
}

/// Bind with text parameters and the given result format codes.
fn bind(portal: &str, statement: &str, params: &[Option<&str>], formats: &[i16]) -> Vec<u8> {
    write::frame(b'B', |b| {
        b.extend_from_slice(portal.as_bytes());
        b.extend_from_slice(&[0]);
        b.extend_from_slice(statement.as_bytes());
        b.extend_from_slice(&[0]);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
    })
    .raw()
    .to_vec()
}

/// Execute of `portal` returning at most `max_rows` rows (0: all).
fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    write::frame(b'E', |b| {
        b.extend_from_slice(portal.as_bytes());
        b.extend_from_slice(&[0]);
        b.extend_from_slice(&max_rows.to_be_bytes());
    })
    .raw()
    .to_vec()
}

/// Sends `batch` and reads every message up to the ReadyForQuery of each of `syncs`
/// Syncs or Queries.
async fn exchange(s: &mut tokio::net::TcpStream, batch: &[u8], syncs: usize) -> Vec<(u8, Vec<u8>)> {
    s.write_all(batch).await.unwrap();
    let mut out = Vec::new();
    let mut ready = 0;
    while ready < syncs {
        let m = tokio::time::timeout(std::time::Duration::from_secs(20), common::read_message(s))
            .await
            .expect("an answer in time")
            .expect("the connection open");
        if m.0 == b'Z' {
            ready += 1;
        }
        out.push(m);
    }
    out
}

fn cstr(body: &[u8]) -> (String, &[u8]) {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    (
        String::from_utf8_lossy(&body[..end]).into_owned(),
        &body[(end + 1).min(body.len())..],
    )
}

fn field(body: &[u8], code: u8) -> String {
    let mut rest = body;
    while let Some((&c, tail)) = rest.split_first() {
        if c == 0 {
            break;
        }
        let (v, tail) = cstr(tail);
        if c == code {
            return v;
        }
        rest = tail;
    }
    String::new()
}

/// What a client sees, message by message (error messages by SQLSTATE only; row
/// descriptions by name, type, attribute number and whether the table is known).
fn summary(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t != b'S')
        .map(|(t, b)| match t {
            b'1' => "ParseComplete".to_string(),
            b'2' => "BindComplete".to_string(),
            b'3' => "CloseComplete".to_string(),
            b'n' => "NoData".to_string(),
            b's' => "PortalSuspended".to_string(),
            b'I' => "EmptyQuery".to_string(),
            b't' => {
                let n = i16::from_be_bytes([b[0], b[1]]) as usize;
                let types: Vec<u32> = (0..n)
                    .map(|i| u32::from_be_bytes(b[2 + 4 * i..6 + 4 * i].try_into().unwrap()))
                    .collect();
                format!("ParameterDescription{types:?}")
            }
            b'T' => {
                let n = i16::from_be_bytes([b[0], b[1]]) as usize;
                let mut rest = &b[2..];
                let mut cols = Vec::new();
                for _ in 0..n {
                    let (name, tail) = cstr(rest);
                    let table = u32::from_be_bytes(tail[0..4].try_into().unwrap());
                    let attnum = i16::from_be_bytes(tail[4..6].try_into().unwrap());
                    let ty = u32::from_be_bytes(tail[6..10].try_into().unwrap());
                    let format = i16::from_be_bytes(tail[16..18].try_into().unwrap());
                    // (OIDs of types a database defines differ from one database to the next.)
                    let ty = if ty >= 16384 {
                        "user type".to_string()
                    } else {
                        ty.to_string()
                    };
                    cols.push(format!("{name}:{ty}:{attnum}:{}:{format}", table != 0));
                    rest = &tail[18..];
                }
                format!("RowDescription{cols:?}")
            }
            b'D' => {
                let n = i16::from_be_bytes([b[0], b[1]]) as usize;
                let mut rest = &b[2..];
                let mut vals = Vec::new();
                for _ in 0..n {
                    let len = i32::from_be_bytes(rest[0..4].try_into().unwrap());
                    rest = &rest[4..];
                    if len < 0 {
                        vals.push("NULL".to_string());
                    } else {
                        let v = &rest[..len as usize];
                        vals.push(match std::str::from_utf8(v) {
                            Ok(s) => s.to_string(),
                            Err(_) => format!("{v:?}"),
                        });
                        rest = &rest[len as usize..];
                    }
                }
                format!("DataRow{vals:?}")
            }
            b'C' => format!("CommandComplete({})", cstr(b).0),
            b'E' => format!("Error({})", field(b, b'C')),
            b'N' => format!("Notice({})", field(b, b'C')),
            b'Z' => format!("Ready({})", b[0] as char),
            other => format!("{}", *other as char),
        })
        .collect()
}

fn error_message(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| format!("{} {}", field(b, b'C'), field(b, b'M')))
        .unwrap_or_default()
}

const MASKED_NOTE: &str = "\n[[mask]]\ncolumn = \"public.tasks.note\"\nfunction = \"redact\"\nunmasked_for = [\"crm_admin\"]\n";

/// Each check returns the problem it found, if any.
type Found = Option<String>;

/// A masked statement's rewrite is written with standard strings (`E'\\'` becomes `'\'`)
/// and is refused only while standard_conforming_strings is known to be off; while a
/// pipelined `SET standard_conforming_strings = off` is in flight (pgveil reads the
/// statement under "Unknown", where `E'\\'` lexes alike) the rewrite goes out, and the
/// server reads `'\'` as an escaped quote: the rest of the wrapped text is the client's
/// code, a DELETE of its own included.
async fn masked_rewrite_breaks_out_of_the_wrapper() -> Found {
    let db = "attack_breakout";
    let (pg, p, _file, _dir) = attack_db(db, &format!("{}{MASKED_NOTE}", attack_rules())).await;
    let before = counts(pg, db);
    let mut s = raw_trust(&p.addr_string(), db).await;
    let attack = r#"DELETE FROM tasks WHERE id = 1 RETURNING note || '', E'\\', ') SELECT 1; DELETE FROM tasks WHERE true; WITH pgveil_rows AS (DELETE FROM tasks WHERE false RETURNING 1, ', $q$'a$q$"#;
    let mut batch = query("SET standard_conforming_strings = off");
    batch.extend(query(attack));
    let reply = exchange(&mut s, &batch, 2).await;
    let after = counts(pg, db);
    let (removed, _) = removed_changed(before, after);
    p.shutdown().await;
    (removed > 3).then(|| {
        format!(
            "masked rewrite read under a pipelined `SET standard_conforming_strings = off`: \
             Query 1 `SET standard_conforming_strings = off` and, in the same write, Query 2 `{attack}` \
             (trust_user, limit 3, note masked with redact): the server removed {removed} rows; \
             the client saw {:?}",
            summary(&reply)
        )
    })
}

/// A statement prepared (protocol level) while the rules set no limit runs unlimited
/// after a reload adds `max_rows`: the reload re-screens prepared statements only for
/// refusals, and the statement was sent unwrapped.
async fn prepared_before_a_reload_that_adds_max_rows() -> Found {
    let db = "attack_reload_add";
    let unlimited = RULES.replace("max_rows = 3\n", "");
    let (pg, p, file, _dir) = attack_db(db, &unlimited).await;
    let c = common::connect(&p.conn_str("mallory", "mallory_pw", db)).await;
    let stmt = c.prepare("DELETE FROM tasks WHERE id > $1").await.unwrap();
    std::fs::write(&file, RULES).unwrap();
    p.proxy.reload_rules().unwrap();
    // Under the new rules, the same text is refused.
    let fresh = c.execute("DELETE FROM tasks WHERE id > $1", &[&0i64]).await;
    let fresh_refused = fresh.is_err();
    let before = counts(pg, db);
    let r = c.execute(&stmt, &[&0i64]).await;
    let (removed, _) = removed_changed(before, counts(pg, db));
    p.shutdown().await;
    (removed > 3).then(|| {
        format!(
            "mallory prepared `DELETE FROM tasks WHERE id > $1` (tokio-postgres prepare) under a rule without max_rows; \
             the rules were reloaded with max_rows = 3 (the same text sent fresh is now refused: {fresh_refused}); \
             executing the prepared statement with $1 = 0 removed {removed} rows, the client saw {r:?}"
        )
    })
}

/// The same with a limit lowered by the reload: the wrapper carries the old number.
async fn prepared_before_a_reload_that_lowers_max_rows() -> Found {
    let db = "attack_reload_lower";
    let (pg, p, file, _dir) = attack_db(db, RULES).await;
    let c = common::connect(&p.conn_str("mallory", "mallory_pw", db)).await;
    let stmt = c
        .prepare("DELETE FROM tasks WHERE id IN ($1, $2, $3)")
        .await
        .unwrap();
    std::fs::write(&file, RULES.replace("max_rows = 3", "max_rows = 1")).unwrap();
    p.proxy.reload_rules().unwrap();
    let before = counts(pg, db);
    let r = c.execute(&stmt, &[&1i64, &2i64, &3i64]).await;
    let (removed, _) = removed_changed(before, counts(pg, db));
    p.shutdown().await;
    (removed > 1).then(|| {
        format!(
            "mallory prepared `DELETE FROM tasks WHERE id IN ($1, $2, $3)` under max_rows = 3; the rules were \
             reloaded with max_rows = 1; executing it removed {removed} rows, the client saw {r:?}"
        )
    })
}

/// An UPDATE prepared while `update` was not protected runs unlimited once a reload
/// protects it with a limit.
async fn prepared_update_before_a_reload_that_protects_update() -> Found {
    let db = "attack_reload_update";
    let unprotected = RULES.replace(
        "protected = [\"delete\", \"truncate\", \"drop\", \"update\"]",
        "protected = [\"delete\", \"truncate\", \"drop\"]",
    );
    let (pg, p, file, _dir) = attack_db(db, &unprotected).await;
    let c = common::connect(&p.conn_str("alice", "alice_pw", db)).await;
    let stmt = c
        .prepare("UPDATE tasks SET note = 'overwritten' WHERE id > $1")
        .await
        .unwrap();
    std::fs::write(&file, RULES).unwrap();
    p.proxy.reload_rules().unwrap();
    let before = counts(pg, db);
    let r = c.execute(&stmt, &[&0i64]).await;
    let (_, changed) = removed_changed(before, counts(pg, db));
    p.shutdown().await;
    (changed > 3).then(|| {
        format!(
            "alice prepared `UPDATE tasks SET note = 'overwritten' WHERE id > $1` while update was not protected; \
             a reload protected update with max_rows = 3; executing it changed {changed} rows, the client saw {r:?}"
        )
    })
}

/// The owner adds a self-referencing foreign key with ON DELETE CASCADE through pgveil
/// (ALTER TABLE ... ADD is neither protected nor a "drop"): a one-row DELETE then removes
/// every row of the limited table, and a one-row UPDATE of the key (ON UPDATE CASCADE)
/// changes every row.
async fn owner_self_cascade() -> Found {
    let db = "attack_cascade";
    let (pg, p, _file, _dir) = attack_db(db, RULES).await;
    let c = common::connect(&p.conn_str("mallory", "mallory_pw", db)).await;
    let setup = "ALTER TABLE tasks ADD COLUMN parent bigint DEFAULT 1; \
                 ALTER TABLE tasks ADD CONSTRAINT tasks_parent FOREIGN KEY (parent) REFERENCES tasks (id) ON DELETE CASCADE ON UPDATE CASCADE";
    let mut found = Vec::new();
    for stmt in setup.split("; ") {
        if let Err(e) = c.batch_execute(stmt).await {
            eprintln!("self cascade setup refused: {stmt}: {e:?}");
            return None;
        }
    }
    let before = counts(pg, db);
    let sql = "UPDATE tasks SET id = 1000 WHERE id = 1";
    let r = c.execute(sql, &[]).await;
    let changed = pg.psql_super(db, "SELECT count(*) FROM tasks WHERE parent = 1000");
    let changed: i64 = changed.parse().unwrap();
    if changed > 3 {
        found.push(format!(
            "`{sql}` changed the parent of {changed} rows (client saw {r:?})"
        ));
    }
    let sql = "DELETE FROM tasks WHERE id = 1000";
    let r = c.execute(sql, &[]).await;
    let (removed, _) = removed_changed(before, counts(pg, db));
    if removed > 3 {
        found.push(format!("`{sql}` removed {removed} rows (client saw {r:?})"));
    }
    p.shutdown().await;
    (!found.is_empty()).then(|| {
        format!(
            "mallory (owner) ran `{setup}` through pgveil (allowed), then: {}",
            found.join("; ")
        )
    })
}

/// Runs `batch` (ending in `syncs` Syncs or Queries) through pgveil and directly, each on
/// its own copy of the database; returns (through pgveil, direct) as (summary, removed,
/// changed).
async fn both_ways(
    tag: &str,
    setup: &str,
    batch: &[u8],
    syncs: usize,
) -> (
    (Vec<String>, i64, i64, String),
    (Vec<String>, i64, i64, String),
) {
    let rules = attack_rules();
    let (pg, p, _file, _dir) = attack_db(&format!("{tag}_proxy"), &rules).await;
    let direct = direct_db(&format!("{tag}_direct"), &rules);
    let mut out = Vec::new();
    for (db, addr) in [
        (format!("{tag}_proxy"), p.addr_string()),
        (format!("{tag}_direct"), direct.addr()),
    ] {
        if !setup.is_empty() {
            pg.psql_super(&db, setup);
        }
        let before = counts(pg, &db);
        let mut s = raw_trust(&addr, &db).await;
        let reply = exchange(&mut s, batch, syncs).await;
        let (removed, changed) = removed_changed(before, counts(pg, &db));
        out.push((summary(&reply), removed, changed, error_message(&reply)));
    }
    p.shutdown().await;
    let direct = out.pop().unwrap();
    (out.pop().unwrap(), direct)
}

fn compare(
    what: &str,
    proxied: &(Vec<String>, i64, i64, String),
    direct: &(Vec<String>, i64, i64, String),
) -> Found {
    (proxied.0 != direct.0 || proxied.1 != direct.1 || proxied.2 != direct.2).then(|| {
        format!(
            "{what}: directly the client sees {:?} ({}) and {} rows are removed, {} changed; \
             through pgveil it sees {:?} ({}) and {} rows are removed, {} changed",
            direct.0, direct.3, direct.1, direct.2, proxied.0, proxied.3, proxied.1, proxied.2
        )
    })
}

/// A Parse holding two statements: the server refuses it (no multiple commands in a
/// prepared statement); pgveil wraps the first part alone.
async fn parse_of_two_statements() -> Found {
    let sql = "DELETE FROM tasks WHERE id = 1; DELETE FROM tasks WHERE id = 2";
    let mut batch = parse("", sql);
    batch.extend(bind("", "", &[], &[]));
    batch.extend(execute("", 0));
    batch.extend(sync());
    let (proxied, direct) = both_ways("attack_parse2", "", &batch, 1).await;
    compare(
        &format!("Parse/Bind/Execute/Sync of `{sql}`"),
        &proxied,
        &direct,
    )
}

/// The same with an INSERT first: pgveil sends the INSERT wrapped and reports `DELETE n`.
async fn parse_of_insert_then_delete() -> Found {
    let sql =
        "INSERT INTO tasks (owner, note) VALUES ('x', 'inserted'); DELETE FROM tasks WHERE id = 2";
    let mut batch = parse("", sql);
    batch.extend(bind("", "", &[], &[]));
    batch.extend(execute("", 0));
    batch.extend(sync());
    let rules = attack_rules();
    let db = "attack_parse_ins";
    let (pg, p, _file, _dir) = attack_db(db, &rules).await;
    pg.psql_super(
        db,
        "GRANT INSERT ON tasks TO trust_user; GRANT USAGE ON SEQUENCE tasks_id_seq TO trust_user",
    );
    let mut s = raw_trust(&p.addr_string(), db).await;
    let reply = exchange(&mut s, &batch, 1).await;
    let inserted = pg.psql_super(db, "SELECT count(*) FROM tasks WHERE note = 'inserted'");
    p.shutdown().await;
    let seen = summary(&reply);
    (inserted != "0" || !seen.iter().any(|m| m.starts_with("Error(42601)"))).then(|| {
        format!(
            "Parse/Bind/Execute/Sync of `{sql}` (the server refuses a Parse of two commands, 42601): \
             {inserted} row(s) inserted, the client saw {seen:?}"
        )
    })
}

/// Execute with a row limit of a limited DELETE without RETURNING: directly the DELETE
/// runs to completion (CommandComplete); pgveil's wrapper returns one row, which it
/// swallows, and the client gets PortalSuspended.
async fn execute_with_max_rows() -> Found {
    let sql = "DELETE FROM tasks WHERE id IN (1, 2)";
    let mut batch = parse("", sql);
    batch.extend(bind("", "", &[], &[]));
    batch.extend(execute("", 1));
    batch.extend(sync());
    let (proxied, direct) = both_ways("attack_maxrows", "", &batch, 1).await;
    compare(
        &format!("Parse/Bind/Execute(max_rows = 1)/Sync of `{sql}`"),
        &proxied,
        &direct,
    )
}

/// Bind with two result format codes for a DELETE without RETURNING: the server ignores
/// them for a statement that returns no rows; the wrapper returns one column.
async fn bind_with_result_formats() -> Found {
    let sql = "DELETE FROM tasks WHERE id IN (1, 2)";
    let mut batch = parse("", sql);
    batch.extend(bind("", "", &[], &[0, 0]));
    batch.extend(execute("", 0));
    batch.extend(sync());
    let (proxied, direct) = both_ways("attack_formats", "", &batch, 1).await;
    compare(
        &format!("Parse/Bind(result formats [0, 0])/Execute/Sync of `{sql}`"),
        &proxied,
        &direct,
    )
}

/// An error whose message holds the marker: not the wrapper's, but turned into a
/// max_rows refusal with a count the client made up.
async fn spurious_marker() -> Found {
    let sql = "DELETE FROM tasks WHERE id = 'pgveil-max-rows:4711'::int8";
    let batch = query(sql);
    let (proxied, direct) = both_ways("attack_marker", "", &batch, 1).await;
    compare(&format!("Query `{sql}`"), &proxied, &direct)
        .map(|p| format!("{p} (pgveil says: {})", proxied.3))
}

/// A table with a DO ALSO rule (an audit log an administrator set up): a DELETE of one
/// row works directly; inside the wrapper's WITH the server refuses it.
async fn table_with_a_rule() -> Found {
    let sql = "DELETE FROM tasks WHERE id = 1";
    let setup = "CREATE TABLE task_log (id bigint); GRANT INSERT ON task_log TO PUBLIC; \
                 CREATE RULE log_delete AS ON DELETE TO tasks DO ALSO INSERT INTO task_log VALUES (OLD.id)";
    let (proxied, direct) = both_ways("attack_rule", setup, &query(sql), 1).await;
    compare(
        &format!("Query `{sql}` on a table with `{setup}`"),
        &proxied,
        &direct,
    )
}

/// A portal of a DELETE executed a second time: the server refuses it (55000, the
/// implicit transaction and the first run's DELETE rolled back); the wrapper's portal (a
/// SELECT) runs again and pgveil reports `DELETE 0`, so the first run commits.
async fn completed_portal_executed_again() -> Found {
    let sql = "DELETE FROM tasks WHERE id = 16";
    let mut batch = parse("", sql);
    batch.extend(bind("p2", "", &[], &[]));
    batch.extend(execute("p2", 0));
    batch.extend(execute("p2", 0));
    batch.extend(sync());
    let (proxied, direct) = both_ways("attack_portal2", "", &batch, 1).await;
    compare(
        &format!("Parse/Bind p2/Execute p2/Execute p2/Sync of `{sql}`"),
        &proxied,
        &direct,
    )
}

/// SQL-level PREPARE while no limit applied, then a reload that adds one: the session
/// must not run it unlimited (it is ended, or EXECUTE is refused).
async fn sql_prepare_before_a_reload_that_adds_max_rows() -> Found {
    let db = "attack_reload_sql";
    let unlimited = RULES.replace("max_rows = 3\n", "");
    let (pg, p, file, _dir) = attack_db(db, &unlimited).await;
    let c = common::connect(&p.conn_str("mallory", "mallory_pw", db)).await;
    c.batch_execute("PREPARE wipe AS DELETE FROM tasks WHERE id > $1")
        .await
        .unwrap();
    std::fs::write(&file, RULES).unwrap();
    p.proxy.reload_rules().unwrap();
    let before = counts(pg, db);
    let r = c.simple_query("EXECUTE wipe(0)").await;
    let (removed, _) = removed_changed(before, counts(pg, db));
    p.shutdown().await;
    (removed > 3).then(|| format!("SQL PREPARE then reload then EXECUTE removed {removed}: {r:?}"))
}

/// RETURNING a masked column from a limited DELETE: the wrapper's rows keep their
/// origins, so the column is masked in flight (simple and extended, text and binary),
/// and an expression over it is rewritten.
async fn masked_returning_through_the_wrapper() -> Found {
    let db = "attack_masked_returning";
    let (_pg, p, _file, _dir) = attack_db(db, &format!("{}{MASKED_NOTE}", attack_rules())).await;
    let mut s = raw_trust(&p.addr_string(), db).await;
    let mut leaks = Vec::new();
    for batch in [
        query("DELETE FROM tasks WHERE id = 1 RETURNING note"),
        query("DELETE FROM tasks WHERE id = 2 RETURNING *"),
        query("UPDATE tasks SET owner = 'x' WHERE id = 3 RETURNING note || '' AS n, upper(note)"),
        [
            parse("", "DELETE FROM tasks WHERE id = 4 RETURNING note"),
            bind("", "", &[], &[1]),
            execute("", 0),
            sync(),
        ]
        .concat(),
        [
            parse("m", "DELETE FROM tasks WHERE id = 5 RETURNING id, note"),
            describe(b'S', "m"),
            bind("", "m", &[], &[0]),
            execute("", 1),
            sync(),
        ]
        .concat(),
    ] {
        let reply = exchange(&mut s, &batch, 1).await;
        let seen = summary(&reply);
        if std::env::var("ATTACK_VERBOSE").is_ok() {
            eprintln!("masked returning: {seen:?}");
        }
        if seen
            .iter()
            .any(|m| m.contains("Call back") || m.contains("CALL BACK"))
        {
            leaks.push(format!("{seen:?}"));
        }
    }
    p.shutdown().await;
    (!leaks.is_empty()).then(|| {
        format!(
            "masked note read in clear through a limited RETURNING: {}",
            leaks.join("; ")
        )
    })
}

/// A DELETE through an automatically updatable view over the limited table, under a
/// rule whose glob covers both: the view's rows are the table's, counted.
async fn updatable_view_is_counted() -> Found {
    let db = "attack_view";
    let rules = RULES.replace(
        "tables = [\"public.tasks\"]",
        "tables = [\"public.tasks*\"]",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), &rules).unwrap();
    let pg = database(db, dir.path());
    pg.psql_super(db, "CREATE VIEW tasks_open AS SELECT * FROM tasks WHERE note IS NOT NULL; GRANT ALL ON tasks_open TO crm_support, mallory");
    let p = TestProxy::with_rules(pg, &rules).await;
    let c = common::connect(&p.conn_str("alice", "alice_pw", db)).await;
    let found = past_the_limit(
        pg,
        db,
        &c,
        &[
            "DELETE FROM tasks_open WHERE id > 0",
            "UPDATE tasks_open SET note = 'overwritten' WHERE id > 0 RETURNING id",
        ],
    )
    .await;
    p.shutdown().await;
    (!found.is_empty()).then(|| found.join("; "))
}

/// Each of `forms` over the simple protocol, with what it did past a limit of 3 rows
/// (removed or changed, by a direct count) and what the client saw.
async fn past_the_limit(
    pg: &PgCluster,
    db: &str,
    c: &tokio_postgres::Client,
    forms: &[&str],
) -> Vec<String> {
    let mut found = Vec::new();
    for sql in forms {
        let before = counts(pg, db);
        let r = c
            .simple_query(sql)
            .await
            .map(|_| ())
            .map_err(|e| error_of(&e));
        let (removed, changed) = removed_changed(before, counts(pg, db));
        if removed > 3 || changed > 3 {
            found.push(format!(
                "`{sql}`: {removed} removed, {changed} changed (client: {r:?})"
            ));
        }
    }
    found
}

/// Reloads and rewrites that pgveil holds: a prepared statement sent wrapped under a limit
/// ends its session when a reload lowers the limit; a masked rewrite with a backslash is
/// refused while standard_conforming_strings may be changing; an SQL PREPARE is checked
/// again on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_reloads_and_masked_rewrites_that_hold() {
    assert_eq!(masked_rewrite_breaks_out_of_the_wrapper().await, None);
    assert_eq!(prepared_before_a_reload_that_lowers_max_rows().await, None);
    assert_eq!(sql_prepare_before_a_reload_that_adds_max_rows().await, None);
    assert_eq!(masked_returning_through_the_wrapper().await, None);
    assert_eq!(updatable_view_is_counted().await, None);
}

/// With `settings.unanalysable = "allow"`, a DELETE of a limited table that sqlparser
/// cannot parse (ONLY, `tasks*`, WHERE CURRENT OF) has no accesses, so no limit: it is
/// forwarded unwrapped and runs unlimited, although README says a limited DELETE whose
/// rows cannot be counted is refused, never run unlimited.
async fn unanalysable_allow_lifts_the_limit() -> Found {
    let db = "attack_allow";
    let rules = RULES.replace("[settings]\n", "[settings]\nunanalysable = \"allow\"\n");
    let (pg, p, _file, _dir) = attack_db(db, &rules).await;
    let c = common::connect(&p.conn_str("alice", "alice_pw", db)).await;
    let found = past_the_limit(
        pg,
        db,
        &c,
        &[
            "DELETE FROM ONLY tasks WHERE id > 90",
            "UPDATE ONLY tasks SET note = 'overwritten' WHERE id <= 10",
            "DELETE FROM tasks* WHERE id BETWEEN 50 AND 60",
        ],
    )
    .await;
    p.shutdown().await;
    (!found.is_empty()).then(|| {
        format!(
            "alice, rules with unanalysable = \"allow\" and max_rows = 3: {}",
            found.join("; ")
        )
    })
}

/// What an attack pass found, fixed: a statement prepared before a reload that adds a
/// limit (or protects UPDATE with one) no longer runs unlimited (the session is ended, as
/// for a statement the new rules refuse); a table whose rows cascade through a foreign key
/// (an owner can add one on the table itself) is not limited, it is refused; an Execute
/// with a row limit gets the statement's CommandComplete; a Bind with several result
/// formats binds; a client's own error that looks like pgveil's count stays its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_found_by_the_attack_are_fixed() {
    let checks: Vec<(&str, Found)> = vec![
        (
            "reload adds max_rows",
            prepared_before_a_reload_that_adds_max_rows().await,
        ),
        (
            "reload protects update",
            prepared_update_before_a_reload_that_protects_update().await,
        ),
        ("owner self cascade", owner_self_cascade().await),
        ("Execute with max_rows", execute_with_max_rows().await),
        ("Bind result formats", bind_with_result_formats().await),
        ("spurious marker", spurious_marker().await),
    ];
    assert_problems(checks);
}

/// Differences from a direct connection the attack found that never remove more rows
/// than the limit (each check reports how it differs; none may remove or change rows
/// beyond what the server would): a Parse of several statements is refused by pgveil
/// (42501) where the server says 42601, nothing running either way; a table with a DO
/// ALSO rule cannot be limited (the server refuses the rule in a WITH: 0A000, nothing
/// runs); a portal executed again after it completed gets `DELETE 0` where the server
/// raises 55000 and rolls the batch back; and `unanalysable = "allow"` forwards what
/// pgveil cannot parse (`DELETE FROM ONLY`, `tasks*`) unlimited, as it forwards it
/// unguarded: the DBA's choice, documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_differences_stay_within_the_limit() {
    for (name, found) in [
        ("Parse of two statements", parse_of_two_statements().await),
        (
            "Parse of INSERT; DELETE",
            parse_of_insert_then_delete().await,
        ),
        ("table with a rule", table_with_a_rule().await),
        (
            "completed portal executed again",
            completed_portal_executed_again().await,
        ),
        (
            "unanalysable = allow",
            unanalysable_allow_lifts_the_limit().await,
        ),
    ] {
        let found = found.unwrap_or_else(|| "as direct".into());
        // What the server did through pgveil, as each check words it.
        let through = found.split("through pgveil").nth(1).unwrap_or(&found);
        let within = match name {
            "Parse of two statements" | "table with a rule" => {
                through.contains("0 rows are removed, 0 changed")
            }
            "Parse of INSERT; DELETE" => found.contains("0 row(s) inserted"),
            "completed portal executed again" => through.contains("1 rows are removed"),
            // Forwarded unguarded, unlimited, by the DBA's choice: 10 rows, not 3.
            _ => found.contains("10 removed"),
        };
        assert!(within, "{name}: {found}");
    }
}

fn assert_problems(checks: Vec<(&str, Found)>) {
    let mut problems: Vec<String> = Vec::new();
    for (name, found) in checks {
        match found {
            Some(p) => problems.push(format!("{name}: {p}")),
            None => eprintln!("held: {name}"),
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// The statement whose text would run three statements if the server read `'a\'` as
/// pgveil read it under the other setting of standard_conforming_strings: with it off,
/// one DELETE of nothing; with it on, `DELETE FROM tasks` between two harmless ones.
const SCS_BREAKOUT: &str = r"DELETE FROM tasks WHERE note = 'a\' RETURNING 1) SELECT 1; DELETE FROM tasks; WITH pgveil_rows AS (DELETE FROM tasks WHERE false --'";

/// Every simple- and extended-protocol form tried as a role, on its own connection
/// state: (statements sent first through pgveil, the form). Each must leave at most 3
/// rows removed and 3 changed, whatever the client is told.
fn forms(db: &str) -> Vec<(Vec<&'static str>, String)> {
    let plain = |sql: &str| (vec![], sql.to_string());
    let mut v = vec![
        // Text that could break out of the wrapper.
        plain("DELETE FROM tasks WHERE id > 0 -- trailing comment"),
        plain("DELETE FROM tasks WHERE id > 0 /* trailing block */"),
        plain("DELETE FROM tasks WHERE id > 0 /* unterminated"),
        plain("DELETE FROM tasks WHERE id > 0 ;  ; \n "),
        plain("DELETE FROM tasks WHERE id > 0 --x\r OR true"),
        plain("DELETE FROM tasks WHERE id = 1 /* /* */ OR id > 0 */"),
        plain("/* lead */ DELETE FROM tasks WHERE id > 0"),
        plain("-- lead\nDELETE FROM tasks WHERE id > 0"),
        plain("DELETE FROM tasks WHERE note <> $$) RETURNING 1) SELECT 1; DELETE FROM tasks; --$$"),
        plain("DELETE FROM tasks WHERE note <> $x$ $$ ' \" ) ; $x$"),
        plain("DELETE FROM tasks WHERE note <> ')) RETURNING 1) SELECT 1; DELETE FROM tasks; SELECT (('"),
        plain(r"DELETE FROM tasks WHERE note <> E'\\'' OR id > 0 --'"),
        plain(r"DELETE FROM tasks WHERE note <> E'\') RETURNING 1) SELECT 1; DELETE FROM tasks; SELECT ('"),
        plain(r#"DELETE FROM tasks WHERE note <> U&'\0027) RETURNING 1) SELECT 1; DELETE FROM tasks; SELECT (' "#),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING id) SELECT 1 --"),
        plain("UPDATE tasks SET note = 'overwritten' WHERE id > 0 RETURNING 1) SELECT 1 --"),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING note -- c"),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING note /* c */ ;"),
        // standard_conforming_strings, as the server has it now and as it had it.
        (vec!["SET standard_conforming_strings = off"], SCS_BREAKOUT.into()),
        plain(SCS_BREAKOUT),
        (
            vec!["BEGIN", "SET LOCAL standard_conforming_strings = off", "COMMIT"],
            SCS_BREAKOUT.into(),
        ),
        (
            vec![
                "BEGIN",
                "SAVEPOINT s",
                "SET standard_conforming_strings = off",
                "ROLLBACK TO SAVEPOINT s",
            ],
            SCS_BREAKOUT.into(),
        ),
        (
            vec!["SET standard_conforming_strings = off", "RESET ALL"],
            SCS_BREAKOUT.into(),
        ),
        (
            vec!["SET standard_conforming_strings = off", "DISCARD ALL"],
            SCS_BREAKOUT.into(),
        ),
        (
            vec!["SET standard_conforming_strings = off"],
            r"DELETE FROM tasks WHERE note <> 'x\' OR id > 0 OR note <> '".into(),
        ),
        (vec![], "SELECT set_config('standard_conforming_strings', 'off', false)".into()),
        (
            vec![],
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'".into(),
        ),
        // Joins, inheritance, cursors, CTEs, and what counts rows elsewhere.
        plain("DELETE FROM tasks USING tasks t2 WHERE t2.id > 0"),
        plain("DELETE FROM tasks t USING customers c WHERE c.id = t.customer_id AND t.id <= 50"),
        plain("DELETE FROM ONLY tasks WHERE id > 0"),
        plain("DELETE FROM tasks* WHERE id > 0"),
        (
            vec![
                "BEGIN",
                "DECLARE c CURSOR FOR SELECT * FROM tasks FOR UPDATE",
                "FETCH 1 FROM c",
            ],
            "DELETE FROM tasks WHERE CURRENT OF c".into(),
        ),
        plain("WITH x AS (SELECT 1) DELETE FROM tasks WHERE id > 0"),
        plain("WITH x AS (SELECT 1) UPDATE tasks SET note = 'overwritten' WHERE id > 0"),
        plain("WITH RECURSIVE x AS (SELECT 1) DELETE FROM tasks WHERE id > 0"),
        plain("WITH x AS (DELETE FROM tasks WHERE id > 90 RETURNING id) DELETE FROM tasks WHERE id IN (SELECT id FROM x)"),
        plain("WITH x AS (SELECT id FROM tasks) DELETE FROM tasks WHERE id IN (SELECT id FROM x) RETURNING id"),
        plain("PREPARE wipe AS DELETE FROM tasks WHERE id > $1"),
        plain("EXECUTE wipe(0)"),
        (
            vec!["PREPARE one AS DELETE FROM tasks WHERE id = $1"],
            "EXECUTE one(1)".into(),
        ),
        plain("EXPLAIN ANALYZE DELETE FROM tasks WHERE id > 0"),
        plain("EXPLAIN (ANALYZE, FORMAT JSON) UPDATE tasks SET note = 'overwritten' WHERE id > 0"),
        plain("MERGE INTO tasks t USING (SELECT 1 AS k) s ON t.id > 0 WHEN MATCHED THEN DELETE"),
        plain("MERGE INTO tasks t USING (SELECT 1 AS k) s ON t.id > 0 WHEN MATCHED THEN UPDATE SET note = 'overwritten'"),
        plain("INSERT INTO tasks (id, owner) SELECT id, owner FROM tasks ON CONFLICT (id) DO UPDATE SET note = 'overwritten'"),
        plain("CREATE TEMP TABLE gone AS WITH d AS (DELETE FROM tasks WHERE id > 0 RETURNING *) SELECT * FROM d"),
        plain("SELECT * FROM tasks WHERE id IN (WITH d AS (DELETE FROM tasks WHERE id > 0 RETURNING id) SELECT id FROM d)"),
        plain("TRUNCATE tasks"),
        plain("ALTER TABLE tasks DISABLE TRIGGER ALL"),
        plain("ALTER TABLE tasks ALTER COLUMN note TYPE text USING 'overwritten'"),
        plain("CREATE RULE wipe AS ON UPDATE TO tasks DO ALSO DELETE FROM tasks"),
        plain("CREATE FUNCTION wipe() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN DELETE FROM tasks; RETURN NULL; END$$"),
        plain("DO $$BEGIN DELETE FROM tasks; END$$"),
        (vec!["SET session_replication_role = replica"], "DELETE FROM tasks WHERE id > 0".into()),
        // Plain over-limit statements in many spellings.
        plain("UPDATE tasks SET note = 'overwritten' WHERE id > 0"),
        plain("UPDATE tasks SET note = 'overwritten' FROM tasks t2 WHERE t2.id > 0"),
        plain("UPDATE tasks t SET note = 'overwritten' FROM customers c WHERE c.id = t.customer_id"),
        plain("UPDATE tasks SET (note, owner) = (SELECT 'overwritten', owner) WHERE id > 0"),
        plain("UPDATE tasks SET note = 'overwritten' WHERE id > 0 RETURNING note, 'pgveil-max-rows:' || id"),
        plain("DELETE FROM tasks WHERE id IN (SELECT id FROM tasks ORDER BY id LIMIT 4)"),
        plain("DELETE FROM tasks WHERE id = ANY (ARRAY[1, 2, 3, 4])"),
        plain("DELETE FROM public.tasks AS t WHERE t.id > 0 RETURNING t.*"),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING (SELECT 1)"),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING *, *"),
        plain("DELETE FROM tasks WHERE id > pg_catalog.abs(-1)"),
        plain("DELETE FROM tasks WHERE id > 0 AND pg_sleep(0) IS NOT NULL"),
        plain("DELETE FROM tasks WHERE id > 0 AND cleanup() IS NULL"),
        plain("DELETE FROM tasks WHERE id > 0 AND query_to_xml('DELETE FROM tasks RETURNING 1', true, false, '') IS NOT NULL"),
        plain("EXPLAIN DELETE FROM tasks WHERE id > 0"),
        plain("DELETE FROM tasks WHERE id > 0 AND id IN (SELECT id FROM tasks FOR UPDATE)"),
        plain("delete from TASKS where ID > 0"),
        plain("DELETE FROM \"tasks\" WHERE id > 0"),
        plain(r#"DELETE FROM U&"\0074asks" WHERE id > 0"#),
        (vec![], format!("DELETE FROM {db}.public.tasks WHERE id > 0")),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING 1 AS pgveil_rows"),
        plain("DELETE FROM tasks pgveil_rows WHERE pgveil_rows.id > 0"),
        plain("DELETE FROM tasks WHERE id > 0 RETURNING 'pgveil-max-rows:1'"),
        plain("DELETE FROM tasks WHERE id > 0; "),
        plain(" \n\t DELETE FROM tasks WHERE id > 0"),
        plain("(DELETE FROM tasks WHERE id > 0)"),
        (vec!["SET search_path = pg_temp, public"], "DELETE FROM tasks WHERE id > 0".into()),
        (
            vec!["CREATE TEMP TABLE tasks (id bigint, note text)", "INSERT INTO tasks VALUES (1, 'x')"],
            "DELETE FROM public.tasks WHERE id > 0".into(),
        ),
        (
            vec!["CREATE TEMP VIEW v AS SELECT * FROM public.tasks"],
            "DELETE FROM v WHERE id > 0".into(),
        ),
        (
            vec!["CREATE TEMP TABLE kid () INHERITS (public.tasks)"],
            "DELETE FROM public.tasks WHERE id > 0".into(),
        ),
    ];
    // The limit is per statement: the same 3 again and again.
    v.push(plain("DELETE FROM tasks WHERE id IN (1, 2, 3)"));
    v
}

/// Runs every form as `user`, by the simple protocol and then by the extended one
/// (tokio-postgres `execute`), refilling the table between forms; returns each form that
/// removed or changed more than 3 rows.
async fn forms_as(user: &str, password: &str, db: &str) -> (usize, Vec<String>) {
    let (pg, p, _file, _dir) = attack_db(db, &attack_rules()).await;
    let mut tried = 0;
    let mut over = Vec::new();
    for extended in [false, true] {
        for (setup, sql) in forms(db) {
            let c = common::connect(&p.conn_str(user, password, db)).await;
            for s in &setup {
                let _ = c.simple_query(s).await;
            }
            let before = counts(pg, db);
            let r = match extended {
                false => c
                    .simple_query(&sql)
                    .await
                    .map(|m| format!("{} messages", m.len())),
                true => c
                    .execute(sql.as_str(), &[])
                    .await
                    .map(|n| format!("{n} rows")),
            };
            let _ = c.simple_query("COMMIT").await;
            let (removed, changed) = removed_changed(before, counts(pg, db));
            tried += 1;
            if std::env::var("ATTACK_VERBOSE").is_ok() {
                eprintln!(
                    "{user} {} {sql:?} after {setup:?}: -{removed} ~{changed}: {:?}",
                    if extended { "ext" } else { "simple" },
                    r.as_ref().map_err(error_of)
                );
            }
            if removed > 3 || changed > 3 {
                over.push(format!(
                    "{user} {} `{sql}` after {setup:?}: {removed} removed, {changed} changed, client saw {:?}",
                    if extended { "extended" } else { "simple" },
                    r.map_err(|e| error_of(&e))
                ));
            }
            drop(c);
            pg.psql_super(db, "DROP TABLE IF EXISTS kid");
            refill(pg, db);
        }
    }
    p.shutdown().await;
    (tried, over)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_forms_are_held_to_the_limit_for_the_owner() {
    let (tried, over) = forms_as("mallory", "mallory_pw", "attack_forms_owner").await;
    eprintln!("{tried} attempts as mallory");
    assert!(over.is_empty(), "{}", over.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_forms_are_held_to_the_limit_for_a_non_owner() {
    let (tried, over) = forms_as("alice", "alice_pw", "attack_forms_support").await;
    eprintln!("{tried} attempts as alice");
    assert!(over.is_empty(), "{}", over.join("\n"));
}

/// A Query frame of raw bytes (for client encodings other than UTF-8).
fn query_bytes(sql: &[u8]) -> Vec<u8> {
    write::frame(b'Q', |b| {
        b.extend_from_slice(sql);
        b.extend_from_slice(&[0]);
    })
    .raw()
    .to_vec()
}

/// Raw-protocol forms as trust_user (limit 3, not the owner): pipelines, row limits on
/// Execute, Describe before Bind, binary formats, client encodings, COPY, pipelined
/// setting changes. Each batch runs on a fresh session; none may remove or change more
/// than 3 rows (the repeated-statement batch excepted: 5 statements of one row each,
/// allowed by design).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_raw_protocol_forms_are_held_to_the_limit() {
    let db = "attack_raw";
    let (pg, p, _file, _dir) = attack_db(db, &attack_rules()).await;
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let pbe = |sql: &str, formats: &[i16], max: i32| {
        cat(&[
            parse("", sql),
            bind("", "", &[], formats),
            execute("", max),
            sync(),
        ])
    };
    let mut cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("COPY (DELETE ... RETURNING) TO STDOUT", query("COPY (DELETE FROM tasks WHERE id > 0 RETURNING id) TO STDOUT"), 1),
        ("COPY (UPDATE ... RETURNING) TO STDOUT", query("COPY (UPDATE tasks SET note = 'overwritten' WHERE id > 0 RETURNING id) TO STDOUT"), 1),
        ("Parse/Bind/Execute over the limit", pbe("DELETE FROM tasks WHERE id > 10", &[], 0), 1),
        ("binary result format over the limit", pbe("DELETE FROM tasks WHERE id > 10", &[1], 0), 1),
        ("Execute(max_rows 1) over the limit", pbe("DELETE FROM tasks WHERE id > 10", &[], 1), 1),
        ("Execute(max_rows 1) with RETURNING over the limit", pbe("DELETE FROM tasks WHERE id > 10 RETURNING id", &[], 1), 1),
        ("binary Execute(max_rows 1) with RETURNING over", pbe("UPDATE tasks SET note = 'overwritten' WHERE id > 10 RETURNING id", &[1], 1), 1),
        (
            "Describe statement before Bind, over the limit",
            cat(&[parse("s", "DELETE FROM tasks WHERE id > $1"), describe(b'S', "s"), bind("p", "s", &[Some("0")], &[]), describe(b'P', "p"), execute("p", 0), sync()]),
            1,
        ),
        (
            "explicit int8 parameter in binary, over the limit",
            cat(&[
                write::parse_typed("", "DELETE FROM tasks WHERE id > $1", &[20]).raw().to_vec(),
                write::frame(b'B', |b| {
                    b.extend_from_slice(&[0, 0]);
                    b.extend_from_slice(&1i16.to_be_bytes());
                    b.extend_from_slice(&1i16.to_be_bytes());
                    b.extend_from_slice(&1i16.to_be_bytes());
                    b.extend_from_slice(&8i32.to_be_bytes());
                    b.extend_from_slice(&0i64.to_be_bytes());
                    b.extend_from_slice(&0i16.to_be_bytes());
                })
                .raw()
                .to_vec(),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        (
            "a within-limit Execute, then an over-limit one, before one Sync",
            cat(&[
                parse("d", "DELETE FROM tasks WHERE id = $1"),
                bind("a", "d", &[Some("1")], &[]),
                execute("a", 0),
                parse("o", "DELETE FROM tasks WHERE id > $1"),
                bind("b", "o", &[Some("10")], &[]),
                execute("b", 0),
                sync(),
            ]),
            1,
        ),
        (
            "Parse/Bind/Execute/Flush, then Sync",
            cat(&[parse("", "DELETE FROM tasks WHERE id > 10"), bind("", "", &[], &[]), execute("", 0), flush(), sync()]),
            1,
        ),
        (
            "BEGIN, extended over-limit DELETE, COMMIT (pipelined)",
            cat(&[query("BEGIN"), pbe("DELETE FROM tasks WHERE id > 10", &[], 0), query("COMMIT")]),
            3,
        ),
        (
            "BEGIN, simple over-limit UPDATE, COMMIT (pipelined)",
            cat(&[query("BEGIN"), query("UPDATE tasks SET note = 'overwritten' WHERE id > 10"), query("COMMIT")]),
            3,
        ),
        (
            "pipelined SET standard_conforming_strings = off, then the breakout text (simple)",
            cat(&[query("SET standard_conforming_strings = off"), query(SCS_BREAKOUT)]),
            2,
        ),
        (
            "pipelined SET standard_conforming_strings = off, then the breakout text (Parse)",
            cat(&[query("SET standard_conforming_strings = off"), pbe(SCS_BREAKOUT, &[], 0)]),
            2,
        ),
        (
            "pipelined extended SET standard_conforming_strings = on after off, then the breakout text",
            cat(&[
                query("SET standard_conforming_strings = off"),
                pbe("SET standard_conforming_strings = on", &[], 0),
                query(SCS_BREAKOUT),
            ]),
            3,
        ),
        (
            "client_encoding LATIN1, ASCII over-limit DELETE",
            cat(&[query("SET client_encoding = 'LATIN1'"), query("DELETE FROM tasks WHERE id > 10")]),
            2,
        ),
        (
            "client_encoding LATIN1, non-ASCII over-limit DELETE",
            cat(&[query("SET client_encoding = 'LATIN1'"), query_bytes(b"DELETE FROM tasks WHERE note <> '\xe9'")]),
            2,
        ),
        (
            "client_encoding SJIS, a character whose second byte is a backslash",
            cat(&[
                query("SET client_encoding = 'SJIS'"),
                query_bytes(b"DELETE FROM tasks WHERE note = '\x83\x5c' OR id > 0 OR note = '"),
            ]),
            2,
        ),
        (
            "pipelined SET client_encoding = 'SJIS', then SJIS bytes",
            cat(&[
                query("SET client_encoding = 'SJIS'"),
                query_bytes(b"DELETE FROM tasks WHERE note = '\x83\x5c' OR id > 0 OR note = '"),
            ]),
            2,
        ),
        (
            "Parse of SQL EXECUTE",
            cat(&[query("PREPARE w AS SELECT 1"), pbe("EXECUTE w", &[], 0)]),
            2,
        ),
        (
            "portal of a limited statement re-bound under another name after Close",
            cat(&[
                parse("s", "DELETE FROM tasks WHERE id > $1"),
                bind("p", "s", &[Some("0")], &[]),
                close(b'S', "s"),
                execute("p", 0),
                sync(),
            ]),
            1,
        ),
    ];
    // Five within-limit DELETEs in one pipeline (one implicit transaction): allowed.
    let mut five = parse("one", "DELETE FROM tasks WHERE id = $1");
    for id in ["1", "2", "3", "4", "5"] {
        five.extend(bind(id, "one", &[Some(id)], &[]));
        five.extend(execute(id, 0));
    }
    five.extend(sync());
    cases.push((
        "five Executes of a one-row DELETE before one Sync (by design)",
        five,
        1,
    ));
    let mut over = Vec::new();
    let tried = cases.len();
    for (what, batch, syncs) in cases {
        let mut s = raw_trust(&p.addr_string(), db).await;
        let before = counts(pg, db);
        let reply = exchange(&mut s, &batch, syncs).await;
        let (removed, changed) = removed_changed(before, counts(pg, db));
        if std::env::var("ATTACK_VERBOSE").is_ok() {
            eprintln!(
                "{what}: -{removed} ~{changed} {:?} {}",
                summary(&reply),
                error_message(&reply)
            );
        }
        let allowed = if what.contains("by design") { 5 } else { 3 };
        if removed > allowed || changed > 3 {
            over.push(format!(
                "{what}: {removed} removed, {changed} changed: {:?}",
                summary(&reply)
            ));
        }
        refill(pg, db);
    }
    // Not pipelined: the encoding is known when the statement arrives.
    for (encoding, sql) in [
        ("LATIN1", &b"DELETE FROM tasks WHERE note <> '\xe9'"[..]),
        (
            "SJIS",
            &b"DELETE FROM tasks WHERE note = '\x83\x5c' OR id > 0 OR note = '"[..],
        ),
        (
            "SJIS",
            &b"UPDATE tasks SET note = 'overwritten' WHERE note <> '\x83\x5c'"[..],
        ),
        ("LATIN1", &b"DELETE FROM tasks WHERE id > 10"[..]),
    ] {
        let mut s = raw_trust(&p.addr_string(), db).await;
        exchange(
            &mut s,
            &query(&format!("SET client_encoding = '{encoding}'")),
            1,
        )
        .await;
        let before = counts(pg, db);
        let reply = exchange(&mut s, &query_bytes(sql), 1).await;
        let (removed, changed) = removed_changed(before, counts(pg, db));
        if std::env::var("ATTACK_VERBOSE").is_ok() {
            eprintln!(
                "{encoding} {:?}: -{removed} ~{changed} {}",
                String::from_utf8_lossy(sql),
                error_message(&reply)
            );
        }
        if removed > 3 || changed > 3 {
            over.push(format!(
                "{encoding} {sql:?}: {removed} removed, {changed} changed"
            ));
        }
        refill(pg, db);
    }
    // A Parse that redefines a named statement fails on the server; pgveil must not take
    // the new text (a limited DELETE) for what the name runs (a SELECT).
    let mut s = raw_trust(&p.addr_string(), db).await;
    exchange(
        &mut s,
        &[parse("s", "SELECT 42 AS answer"), sync()].concat(),
        1,
    )
    .await;
    let failed = exchange(
        &mut s,
        &[parse("s", "DELETE FROM tasks WHERE id = 1"), sync()].concat(),
        1,
    )
    .await;
    let reply = exchange(
        &mut s,
        &[bind("p", "s", &[], &[]), execute("p", 0), sync()].concat(),
        1,
    )
    .await;
    if summary(&reply)
        != [
            "BindComplete",
            "DataRow[\"42\"]",
            "CommandComplete(SELECT 1)",
            "Ready(I)",
        ]
    {
        over.push(format!(
            "after a failed redefinition {:?}, the SELECT's portal reads {:?}",
            summary(&failed),
            summary(&reply)
        ));
    }
    eprintln!("{} raw-protocol forms", tried + 5);
    p.shutdown().await;
    assert!(over.is_empty(), "{}", over.join("\n"));
}

/// Within the limit, a client sees through pgveil what it sees directly: each batch runs
/// on a raw trust_user session through pgveil and on one straight to the server, each on
/// its own copy of the database, and the two conversations (tags, rows, row and parameter
/// descriptions, SQLSTATEs, notices, transaction status) and the rows removed must match.
/// Known differences are in `problems_found_by_the_attack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_within_the_limit_is_transparent_on_the_wire() {
    let rules = attack_rules();
    let (pg, p, _file, _dir) = attack_db("attack_wire_proxy", &rules).await;
    direct_db("attack_wire_direct", &rules);
    let mut proxied = raw_trust(&p.addr_string(), "attack_wire_proxy").await;
    let mut direct = raw_trust(&pg.addr(), "attack_wire_direct").await;
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("simple DELETE", query("DELETE FROM tasks WHERE id IN (1, 2)"), 1),
        ("simple DELETE, trailing comment", query("DELETE FROM tasks WHERE id = 22 -- bye"), 1),
        ("simple DELETE, lower case and semicolon", query("delete from tasks where id = 23;"), 1),
        ("simple DELETE of nothing", query("DELETE FROM tasks WHERE id > 1000"), 1),
        ("simple DELETE of nothing with RETURNING", query("DELETE FROM tasks WHERE id > 1000 RETURNING id"), 1),
        (
            "simple DELETE RETURNING mixed columns",
            query("DELETE FROM tasks WHERE id = 3 RETURNING id, note, owner AS o, 1, NULL, 'x', due + 1 AS next, id::text, tasks"),
            1,
        ),
        ("simple DELETE RETURNING duplicate names", query("DELETE FROM tasks WHERE id = 30 RETURNING id, id, 1, 1"), 1),
        ("simple UPDATE RETURNING *", query("UPDATE tasks SET note = 'overwritten' WHERE id = 4 RETURNING *"), 1),
        ("simple UPDATE unique violation", query("UPDATE tasks SET id = 6 WHERE id = 5"), 1),
        ("simple UPDATE foreign-key violation", query("UPDATE tasks SET customer_id = 99999 WHERE id = 5"), 1),
        ("simple UPDATE not-null violation", query("UPDATE tasks SET owner = NULL WHERE id = 5"), 1),
        ("simple DELETE division by zero", query("DELETE FROM tasks WHERE id = 1/0"), 1),
        ("simple DELETE of a column that does not exist", query("DELETE FROM tasks WHERE nope = 1"), 1),
        (
            "transaction block: DELETE, failing UPDATE, SELECT, ROLLBACK",
            cat(&[
                query("BEGIN"),
                query("DELETE FROM tasks WHERE id = 7"),
                query("UPDATE tasks SET id = 8 WHERE id = 9"),
                query("SELECT 1"),
                query("ROLLBACK"),
            ]),
            5,
        ),
        (
            "transaction block: three DELETEs within the limit each, COMMIT",
            cat(&[
                query("BEGIN"),
                query("DELETE FROM tasks WHERE id IN (31, 32, 33)"),
                query("DELETE FROM tasks WHERE id IN (34, 35, 36)"),
                query("DELETE FROM tasks WHERE id IN (37, 38, 39)"),
                query("COMMIT"),
            ]),
            5,
        ),
        ("standard_conforming_strings off", query("SET standard_conforming_strings = off"), 1),
        (
            "a warning notice (escape_string_warning) under standard_conforming_strings off",
            query(r"DELETE FROM tasks WHERE note = 'a\\b' OR id = 41"),
            1,
        ),
        ("standard_conforming_strings back on", query("RESET standard_conforming_strings"), 1),
        (
            "extended: Describe statement and portal, text",
            cat(&[
                parse("", "DELETE FROM tasks WHERE id = $1"),
                describe(b'S', ""),
                bind("", "", &[Some("10")], &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: RETURNING *, binary, Describe both",
            cat(&[
                parse("r", "DELETE FROM tasks WHERE id = $1 RETURNING *"),
                describe(b'S', "r"),
                bind("", "r", &[Some("11")], &[1]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: binary count",
            cat(&[parse("", "DELETE FROM tasks WHERE id = 14"), bind("", "", &[], &[1]), execute("", 0), sync()]),
            1,
        ),
        (
            "extended: RETURNING with Execute(max_rows 1) three times",
            cat(&[
                parse("", "DELETE FROM tasks WHERE id IN (12, 13) RETURNING id"),
                bind("", "", &[], &[]),
                execute("", 1),
                execute("", 1),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: a limited statement replaced by a SELECT under the unnamed name",
            cat(&[
                parse("", "DELETE FROM tasks WHERE id = 40"),
                parse("", "SELECT 42 AS answer"),
                bind("", "", &[], &[]),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: statement closed before its portal runs",
            cat(&[
                parse("s", "DELETE FROM tasks WHERE id = 15"),
                bind("p", "s", &[], &[]),
                close(b'S', "s"),
                execute("p", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: SELECT and limited DELETE portals interleaved",
            cat(&[
                parse("sel", "SELECT id FROM tasks WHERE id = 20"),
                bind("ps", "sel", &[], &[]),
                parse("del", "DELETE FROM tasks WHERE id = 21 RETURNING note"),
                bind("pd", "del", &[], &[]),
                execute("ps", 0),
                execute("pd", 0),
                execute("ps", 0),
                sync(),
            ]),
            1,
        ),
        (
            "extended: Describe of a limited statement in its own Sync, then Bind/Execute",
            cat(&[
                parse("later", "UPDATE tasks SET note = 'overwritten' WHERE id = $1"),
                describe(b'S', "later"),
                sync(),
                bind("", "later", &[Some("17")], &[]),
                execute("", 0),
                sync(),
            ]),
            2,
        ),
        (
            "extended: parameter types inferred",
            cat(&[parse("", "DELETE FROM tasks WHERE note = $1 OR id = $2 OR due = $3"), describe(b'S', ""), sync()]),
            1,
        ),
        (
            "extended: Bind with too few parameters",
            cat(&[parse("", "DELETE FROM tasks WHERE id = $1"), bind("", "", &[], &[]), execute("", 0), sync()]),
            1,
        ),
        (
            "extended: unique violation",
            cat(&[parse("", "UPDATE tasks SET id = 19 WHERE id = 18"), bind("", "", &[], &[]), execute("", 0), sync()]),
            1,
        ),
        (
            "extended: BEGIN; within-limit DELETE; COMMIT",
            cat(&[
                query("BEGIN"),
                parse("", "DELETE FROM tasks WHERE id = 24"),
                bind("", "", &[], &[]),
                execute("", 0),
                sync(),
                query("COMMIT"),
            ]),
            3,
        ),
        (
            "extended: RETURNING within the limit, portal suspended, then Sync",
            cat(&[
                parse("", "DELETE FROM tasks WHERE id IN (25, 26, 27) RETURNING id"),
                bind("", "", &[], &[]),
                execute("", 1),
                sync(),
            ]),
            1,
        ),
    ];
    let mut differences = Vec::new();
    let tried = cases.len();
    for (what, batch, syncs) in cases {
        let mut seen = Vec::new();
        for (s, db) in [
            (&mut proxied, "attack_wire_proxy"),
            (&mut direct, "attack_wire_direct"),
        ] {
            let before = counts(pg, db);
            let reply = exchange(s, &batch, syncs).await;
            let (removed, changed) = removed_changed(before, counts(pg, db));
            seen.push((summary(&reply), removed, changed, error_message(&reply)));
        }
        if std::env::var("ATTACK_VERBOSE").is_ok() {
            eprintln!("{what}: {:?}", seen[0]);
        }
        if let Some(d) = compare(what, &seen[0], &seen[1]) {
            differences.push(d);
        }
    }
    eprintln!("{tried} transparency cases");
    p.shutdown().await;
    assert!(differences.is_empty(), "{}", differences.join("\n\n"));
}

/// What tokio-postgres gives for `sql`: prepare (parameter and column types, names,
/// origins), execute (the row count) or query (rows), simple_query (CommandComplete),
/// errors by SQLSTATE.
async fn as_tokio_postgres_sees(c: &tokio_postgres::Client, sql: &str, returning: bool) -> String {
    let mut out = String::new();
    match c.prepare(sql).await {
        Ok(stmt) => {
            let cols: Vec<String> = stmt
                .columns()
                .iter()
                .map(|col| {
                    format!(
                        "{}:{}:{}:{:?}",
                        col.name(),
                        col.type_().name(),
                        col.table_oid().is_some(),
                        col.column_id()
                    )
                })
                .collect();
            let params: Vec<String> = stmt.params().iter().map(|t| t.name().to_string()).collect();
            out += &format!("prepare: params {params:?} columns {cols:?}; ");
        }
        Err(e) => out += &format!("prepare: {:?}; ", error_of(&e).0),
    }
    if returning {
        match c.query(sql, &[]).await {
            Ok(rows) => out += &format!("query: {} rows; ", rows.len()),
            Err(e) => out += &format!("query: {:?}; ", error_of(&e).0),
        }
    } else {
        match c.execute(sql, &[]).await {
            Ok(n) => out += &format!("execute: {n}; "),
            Err(e) => out += &format!("execute: {:?}; ", error_of(&e).0),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_within_the_limit_is_transparent_to_tokio_postgres() {
    let (pg, p, _file, _dir) = attack_db("attack_tp_proxy", RULES).await;
    direct_db("attack_tp_direct", RULES);
    let proxied = common::connect(&p.conn_str("mallory", "mallory_pw", "attack_tp_proxy")).await;
    let direct = common::connect(&format!(
        "host=127.0.0.1 port={} user=mallory password='mallory_pw' dbname=attack_tp_direct connect_timeout=10",
        pg.port
    ))
    .await;
    let cases: &[(&str, bool)] = &[
        ("DELETE FROM tasks WHERE id IN (1, 2)", false),
        (
            "DELETE FROM tasks WHERE id = 3 RETURNING id, note, owner AS o, 1 AS one, due",
            true,
        ),
        (
            "UPDATE tasks SET note = 'overwritten' WHERE id IN (4, 5, 6)",
            false,
        ),
        (
            "UPDATE tasks SET note = 'overwritten' WHERE id = 7 RETURNING *",
            true,
        ),
        ("DELETE FROM tasks WHERE id > 1000", false),
        ("DELETE FROM tasks WHERE id > 1000 RETURNING *", true),
        ("UPDATE tasks SET id = 9 WHERE id = 8", false),
        ("UPDATE tasks SET customer_id = 99999 WHERE id = 8", false),
        (
            "DELETE FROM tasks WHERE id = 10 RETURNING note || '!' AS shout, id::text",
            true,
        ),
    ];
    let mut differences = Vec::new();
    for (sql, returning) in cases {
        let a = as_tokio_postgres_sees(&proxied, sql, *returning).await;
        let b = as_tokio_postgres_sees(&direct, sql, *returning).await;
        let states = (
            counts(pg, "attack_tp_proxy").0,
            counts(pg, "attack_tp_direct").0,
        );
        if a != b || states.0 != states.1 {
            differences.push(format!(
                "`{sql}`: directly {b} ({} rows left); through pgveil {a} ({} rows left)",
                states.1, states.0
            ));
        }
    }
    // The simple protocol's CommandComplete, and a block with the limit used three times.
    for c in [&proxied, &direct] {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for sql in [
        "DELETE FROM tasks WHERE id IN (11, 12, 13)",
        "DELETE FROM tasks WHERE id IN (14, 15, 16)",
    ] {
        let mut seen = Vec::new();
        for c in [&proxied, &direct] {
            let msgs = c.simple_query(sql).await.unwrap();
            seen.push(format!(
                "{:?}",
                msgs.iter()
                    .map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::CommandComplete(n) =>
                            format!("complete {n}"),
                        tokio_postgres::SimpleQueryMessage::Row(_) => "row".into(),
                        _ => "other".into(),
                    })
                    .collect::<Vec<_>>()
            ));
        }
        if seen[0] != seen[1] {
            differences.push(format!(
                "simple `{sql}`: directly {}, through pgveil {}",
                seen[1], seen[0]
            ));
        }
    }
    for c in [&proxied, &direct] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(
        counts(pg, "attack_tp_proxy").0,
        counts(pg, "attack_tp_direct").0
    );
    p.shutdown().await;
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// A concurrent session inserts and commits rows the limited DELETE would match while
/// the DELETE waits on a row lock: the DELETE counts what it removes (its snapshot's rows
/// plus re-checked ones), never more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_concurrent_changes_while_a_limited_delete_waits() {
    let db = "attack_concurrent";
    let (pg, p, _file, _dir) = attack_db(db, RULES).await;
    let c = common::connect(&p.conn_str("alice", "alice_pw", db)).await;
    let other = common::connect(&format!(
        "host=127.0.0.1 port={} user=postgres password='{}' dbname={db} connect_timeout=10",
        pg.port,
        common::SUPERUSER_PASSWORD
    ))
    .await;
    // The other session holds the lock on rows 1 and 2, moves them and 10 more into the
    // DELETE's reach, and inserts 10 matching rows.
    other.batch_execute("BEGIN; UPDATE tasks SET owner = 'zed' WHERE id <= 12; INSERT INTO tasks (owner, note) SELECT 'zed', 'new' FROM generate_series(1, 10)").await.unwrap();
    let before = counts(pg, db);
    let delete = tokio::spawn(async move {
        let r = c
            .execute("DELETE FROM tasks WHERE id <= 2 OR owner = 'zed'", &[])
            .await;
        (r.map_err(|e| error_of(&e)), c)
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    other.batch_execute("COMMIT").await.unwrap();
    let (r, _c) = delete.await.unwrap();
    let after = counts(pg, db);
    // (10 rows were inserted meanwhile.)
    let removed = before.0 + 10 - after.0;
    p.shutdown().await;
    assert!(removed <= 3, "{removed} removed: {r:?}");
    eprintln!("concurrent: {removed} removed, client saw {r:?}");
}
