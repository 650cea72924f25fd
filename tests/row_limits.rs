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
