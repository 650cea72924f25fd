//! The statement guard (spec sections 4 and 5), attacked: `mallory` owns every CRM table,
//! so the server would let it delete, truncate and drop anything; only pgveil stands in the
//! way. Each form a DELETE, TRUNCATE or DROP can take is sent through pgveil, and a direct
//! superuser connection then proves that no row and no object went away. Positive
//! controls show that allowed statements do run, and transaction tests show that client
//! and server agree on the transaction's fate after a refusal.

mod common;

use std::sync::OnceLock;

use common::{PgCluster, TestProxy};

const RULES: &str = r#"
[settings]
protected = ["delete", "truncate", "drop"]

[[allow]]
roles = ["crm_support"]
statements = ["delete"]
tables = ["public.tasks"]
require_where = true

[[allow]]
roles = ["crm_admin"]
statements = ["delete", "truncate", "drop"]
tables = ["*"]

[[allow]]
roles = ["mallory"]
statements = ["delete"]
tables = ["sandbox.*"]
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

/// A fresh CRM database owned, table by table, by mallory, with a few objects to attack
/// through: a function and a procedure that delete, a sandbox schema mallory may clean.
fn database(name: &str) -> &'static PgCluster {
    let pg = cluster();
    pg.create_crm_db(name);
    pg.psql_super(
        name,
        "ALTER TABLE customers OWNER TO mallory; ALTER TABLE contacts OWNER TO mallory; \
         ALTER TABLE deals OWNER TO mallory; ALTER TABLE tasks OWNER TO mallory; \
         GRANT CREATE ON SCHEMA public TO mallory; \
         CREATE FUNCTION wipe() RETURNS void LANGUAGE sql AS 'DELETE FROM public.customers'; \
         CREATE PROCEDURE wipe_proc() LANGUAGE sql AS 'DELETE FROM public.customers'; \
         CREATE SCHEMA sandbox AUTHORIZATION mallory; \
         CREATE TABLE sandbox.notes (id int); INSERT INTO sandbox.notes VALUES (1), (2); \
         ALTER TABLE sandbox.notes OWNER TO mallory; \
         CREATE VIEW public.customer_names AS SELECT id, full_name FROM customers; \
         ALTER VIEW public.customer_names OWNER TO mallory",
    );
    pg
}

async fn client(p: &TestProxy, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
    common::connect(&p.conn_str(user, password, db)).await
}

/// The state an attack must not change: row counts and the objects that exist.
fn inventory(pg: &PgCluster, db: &str) -> String {
    pg.psql_super(
        db,
        "SELECT (SELECT count(*) FROM customers) || ' ' || (SELECT count(*) FROM contacts) || ' ' || \
         (SELECT count(*) FROM deals) || ' ' || (SELECT count(*) FROM tasks) || ' ' || \
         (SELECT count(*) FROM sandbox.notes) || ' ' || \
         (SELECT string_agg(table_name || '.' || column_name, ',' ORDER BY table_name, column_name) \
          FROM information_schema.columns WHERE table_schema IN ('public', 'sandbox'))",
    )
}

/// Asserts that `sql` was refused by pgveil with a message that contains `why`.
async fn assert_refused_for(c: &tokio_postgres::Client, sql: &str, why: &str) {
    let err = c.simple_query(sql).await.unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: {err:?}"));
    assert_eq!(db.code().code(), "42501", "{sql}: {err}");
    assert!(db.message().contains(why), "{sql}: {}", db.message());
}

/// Asserts that `sql` was refused by pgveil (not by the server) with 42501.
async fn assert_refused(c: &tokio_postgres::Client, sql: &str, kind: &str) {
    let err = match c.simple_query(sql).await {
        Ok(_) => panic!("not refused: {sql}"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: {err:?}"));
    assert_eq!(db.code().code(), "42501", "{sql}: {}", db.message());
    assert!(
        db.message().starts_with(&format!("pgveil: {kind} on ")),
        "{sql}: {}",
        db.message()
    );
    assert!(
        db.message().contains("role \"mallory\""),
        "{}",
        db.message()
    );
    // The session stays usable.
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn no_form_of_delete_truncate_or_drop_gets_through() {
    let pg = database("guard_forms");
    let before = inventory(pg, "guard_forms");
    let p = TestProxy::with_rules(pg, RULES).await;
    let c = client(&p, "mallory", "mallory_pw", "guard_forms").await;
    for (sql, kind) in [
        ("DELETE FROM customers", "DELETE"),
        ("delete from CUSTOMERS where id > 0", "DELETE"),
        ("DELETE FROM public.customers WHERE id = 1", "DELETE"),
        ("DELETE FROM \"public\".\"customers\" WHERE id = 1", "DELETE"),
        ("DELETE FROM guard_forms.public.customers", "DELETE"),
        ("DELETE FROM ONLY customers", "DELETE"),
        ("/* hello */ DELETE -- there\n FROM tasks", "DELETE"),
        ("WITH d AS (DELETE FROM customers RETURNING *) SELECT count(*) FROM d", "DELETE"),
        ("WITH d AS (DELETE FROM deals RETURNING *) INSERT INTO tasks (owner) SELECT 'm' FROM d", "DELETE"),
        ("EXPLAIN ANALYZE DELETE FROM customers", "DELETE"),
        ("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM deals", "DELETE"),
        ("PREPARE p AS DELETE FROM customers; EXECUTE p", "DELETE"),
        ("PREPARE p2 AS DELETE FROM deals WHERE id = $1", "DELETE"),
        ("COPY (DELETE FROM customers RETURNING id) TO STDOUT", "DELETE"),
        ("MERGE INTO customers c USING (SELECT 1 AS id) s ON c.id = s.id WHEN MATCHED THEN DELETE", "DELETE"),
        ("DELETE FROM customers USING deals WHERE deals.customer_id = customers.id", "DELETE"),
        ("DELETE FROM customer_names WHERE id = 3", "DELETE"),
        ("SELECT 1; DELETE FROM tasks", "DELETE"),
        ("INSERT INTO tasks (owner) VALUES ('m'); DELETE FROM tasks WHERE id = 1", "DELETE"),
        ("TRUNCATE customers CASCADE", "TRUNCATE"),
        ("TRUNCATE tasks, deals", "TRUNCATE"),
        ("TRUNCATE TABLE ONLY contacts RESTART IDENTITY", "TRUNCATE"),
        ("DROP TABLE tasks", "DROP"),
        ("DROP TABLE IF EXISTS sandbox.notes, tasks CASCADE", "DROP"),
        ("DROP VIEW customer_names", "DROP"),
        ("DROP SCHEMA sandbox CASCADE", "DROP"),
        ("DROP SCHEMA public CASCADE", "DROP"),
        ("ALTER TABLE customers DROP COLUMN phone", "DROP"),
        ("ALTER TABLE customers DISABLE TRIGGER ALL", "DROP"),
        // Statements pgveil cannot see into count as touching everything; the refusal names
        // them by their opening keyword.
        ("DO $$ BEGIN DELETE FROM customers; END $$", "DO"),
        ("SELECT wipe()", "SELECT"),
        ("SELECT public.wipe()", "SELECT"),
        ("SELECT * FROM wipe()", "SELECT"),
        ("CALL wipe_proc()", "CALL"),
        ("SELECT query_to_xml('DELETE FROM customers RETURNING id', true, false, '')", "SELECT"),
        ("SELECT set_config('search_path', 'sandbox', false)", "SELECT"),
        ("CREATE FUNCTION wipe2() RETURNS void LANGUAGE sql AS 'DELETE FROM customers'", "CREATE"),
        ("CREATE RULE r AS ON INSERT TO tasks DO ALSO DELETE FROM customers", "CREATE"),
        ("CREATE TRIGGER t AFTER INSERT ON tasks EXECUTE FUNCTION wipe()", "CREATE"),
        ("DELETE FROM U&\"customers\"", "DELETE"),
        ("DELETE FROM customers WHERE CURRENT OF c", "DELETE"),
        // Of several statements pgveil cannot tell which one it could not read.
        ("SELECT 1; DO $$ BEGIN DELETE FROM customers; END $$", "STATEMENT"),
    ] {
        assert_refused(&c, sql, kind).await;
    }
    // search_path games: a rule for sandbox.* does not cover public.customers, whatever
    // the path says when the DELETE runs.
    c.simple_query("SET search_path TO sandbox, public")
        .await
        .unwrap();
    assert_refused(&c, "DELETE FROM customers", "DELETE").await;
    c.simple_query("RESET search_path").await.unwrap();
    assert_refused(&c, "DELETE FROM customers", "DELETE").await;
    // With standard_conforming_strings off the server reads `\'` as a quote: pgveil reads
    // literals as the server does under the setting it reported, so the same bytes are a
    // harmless string (it runs) or hide a DELETE (refused) as they are for the server.
    let hidden_when_off = "SELECT '\\' ; SELECT '; DELETE FROM customers; --'";
    let hidden_when_on = "SELECT 'a\\'; DELETE FROM customers; --'";
    c.simple_query("SET standard_conforming_strings = off")
        .await
        .unwrap();
    assert_refused(&c, hidden_when_off, "DELETE").await;
    c.simple_query(hidden_when_on).await.unwrap();
    c.simple_query("SET standard_conforming_strings = on")
        .await
        .unwrap();
    assert_refused(&c, hidden_when_on, "DELETE").await;
    c.simple_query(hidden_when_off).await.unwrap();
    // The setting changed in a statement pipelined before the one screened: the server has
    // not confirmed it yet, so a literal that reads differently either way is refused.
    let (set, hidden) = tokio::join!(
        c.simple_query("SET standard_conforming_strings = off"),
        c.simple_query(hidden_when_off)
    );
    set.unwrap();
    let err = hidden.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");
    c.simple_query("SET standard_conforming_strings = on")
        .await
        .unwrap();
    // Extended protocol: the refusal comes at Parse; nothing runs.
    for sql in [
        "DELETE FROM customers WHERE id = $1",
        "WITH d AS (DELETE FROM deals WHERE id = $1 RETURNING 1) SELECT * FROM d",
    ] {
        let err = c.execute(sql, &[&1i64]).await.unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "42501");
        assert!(
            db.message().starts_with("pgveil: DELETE on public."),
            "{}",
            db.message()
        );
    }
    assert!(c.prepare("TRUNCATE customers").await.is_err());
    // The one thing mallory may do.
    let done = c
        .simple_query("DELETE FROM sandbox.notes WHERE id = 1")
        .await;
    assert!(done.is_ok(), "{done:?}");
    pg.psql_super("guard_forms", "INSERT INTO sandbox.notes VALUES (1)");
    assert_eq!(inventory(pg, "guard_forms"), before);
    p.shutdown().await;
}

#[tokio::test]
async fn allowed_roles_and_require_where() {
    let pg = database("guard_allow");
    let p = TestProxy::with_rules(pg, RULES).await;
    // alice (crm_support) may delete tasks, with a WHERE clause that names a column.
    let alice = client(&p, "alice", "alice_pw", "guard_allow").await;
    let n = alice
        .execute("DELETE FROM tasks WHERE id = $1", &[&1i64])
        .await
        .unwrap();
    assert_eq!(n, 1);
    alice
        .simple_query("DELETE FROM public.tasks WHERE id = 2")
        .await
        .unwrap();
    for sql in [
        "DELETE FROM tasks",
        "DELETE FROM tasks WHERE true",
        "DELETE FROM tasks WHERE 1 = 1",
    ] {
        let err = alice.simple_query(sql).await.unwrap_err();
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(
            message.contains("requires a WHERE clause"),
            "{sql}: {message}"
        );
        assert!(message.contains("rules.toml:"), "{message}");
    }
    // Not protected: runs.
    alice
        .simple_query("UPDATE tasks SET note = 'x' WHERE id = 3")
        .await
        .unwrap();
    // crm_admin may do anything; its statements are not even analysed.
    let admin = client(&p, "crm_admin", "admin_pw", "guard_allow").await;
    admin
        .simple_query("DELETE FROM deals WHERE id = 5")
        .await
        .unwrap();
    admin
        .simple_query("SELECT wipe_proc_does_not_exist()")
        .await
        .unwrap_err();
    assert_eq!(
        pg.psql_super("guard_allow", "SELECT count(*) FROM tasks"),
        "98"
    );
    assert_eq!(
        pg.psql_super("guard_allow", "SELECT count(*) FROM deals"),
        "399"
    );
    p.shutdown().await;

    // A DBA may protect more kinds.
    let strict = "[settings]\nprotected = [\"delete\", \"update\"]\n";
    let p = TestProxy::with_rules(pg, strict).await;
    let alice = client(&p, "alice", "alice_pw", "guard_allow").await;
    let err = alice
        .simple_query("UPDATE tasks SET note = 'y' WHERE id = 3")
        .await
        .unwrap_err();
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .starts_with("pgveil: UPDATE on public.tasks"));
    // ... and with `protected = []` the guard is off.
    p.shutdown().await;
    let p = TestProxy::with_rules(pg, "[settings]\nprotected = []\n").await;
    let alice = client(&p, "alice", "alice_pw", "guard_allow").await;
    alice
        .simple_query("DELETE FROM tasks WHERE id = 4")
        .await
        .unwrap();
    p.shutdown().await;
}

#[tokio::test]
async fn fresh_pgveil_refuses_deletes_by_default() {
    let pg = database("guard_default");
    let p = TestProxy::with_rules(pg, "").await;
    let alice = client(&p, "alice", "alice_pw", "guard_default").await;
    let err = alice
        .simple_query("DELETE FROM tasks WHERE id = 1")
        .await
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert_eq!(
        message,
        "pgveil: DELETE on public.tasks is not allowed for role \"alice\": delete is protected and no [[allow]] rule for the role covers this table (protected by default)"
    );
    assert_eq!(
        pg.psql_super("guard_default", "SELECT count(*) FROM tasks"),
        "100"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_refusal_aborts_the_transaction_as_a_server_error_would() {
    let pg = database("guard_tx");
    let p = TestProxy::with_rules(pg, RULES).await;
    let c = client(&p, "mallory", "mallory_pw", "guard_tx").await;
    // Simple protocol: BEGIN; INSERT; refused DELETE; COMMIT → rolled back.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO tasks (owner, note) VALUES ('m', 'tx-simple')")
        .await
        .unwrap();
    assert!(c.simple_query("DELETE FROM customers").await.is_err());
    // The server agrees the transaction failed: further statements are refused by it.
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "25P02");
    let commit = c.simple_query("COMMIT").await.unwrap();
    let tag = commit.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert!(tag.is_some());
    // Extended protocol, inside a transaction object.
    let mut c2 = client(&p, "mallory", "mallory_pw", "guard_tx").await;
    let tx = c2.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO tasks (owner, note) VALUES ('m', 'tx-extended')",
        &[],
    )
    .await
    .unwrap();
    assert!(tx
        .execute("DELETE FROM deals WHERE id = $1", &[&1i64])
        .await
        .is_err());
    // As after a server error, COMMIT of the aborted transaction rolls it back.
    tx.commit().await.unwrap();
    assert_eq!(
        pg.psql_super(
            "guard_tx",
            "SELECT count(*) FROM tasks WHERE note LIKE 'tx-%'"
        ),
        "0"
    );
    // Refused multi-statement string inside a block: nothing of it runs either.
    c.simple_query("BEGIN").await.unwrap();
    assert!(c
        .simple_query("INSERT INTO tasks (owner, note) VALUES ('m', 'tx-multi'); TRUNCATE deals")
        .await
        .is_err());
    c.simple_query("ROLLBACK").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        pg.psql_super(
            "guard_tx",
            "SELECT count(*) FROM tasks WHERE note LIKE 'tx-%'"
        ),
        "0"
    );
    assert_eq!(
        pg.psql_super("guard_tx", "SELECT count(*) FROM deals"),
        "400"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_revokes_an_allow_rule_takes_effect_at_once() {
    let pg = database("guard_reload");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, RULES).unwrap();
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(pg, move |s| s.rules = Some(path)).await;
    let alice = client(&p, "alice", "alice_pw", "guard_reload").await;
    let other = client(&p, "alice", "alice_pw", "guard_reload").await;
    // alice prepares an allowed DELETE (extended protocol); her other session prepares nothing.
    let stmt = alice
        .prepare("DELETE FROM tasks WHERE id = $1")
        .await
        .unwrap();
    alice.execute(&stmt, &[&1i64]).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
    std::fs::write(&file, "[settings]\nprotected = [\"delete\"]\n").unwrap();
    p.proxy.reload_rules().unwrap();
    // The prepared DELETE is now refused: its session ends rather than run it.
    let err = alice.execute(&stmt, &[&2i64]).await.unwrap_err();
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("rules changed"), "{err:?}");
    // The other session goes on under the new rules.
    let err = other
        .simple_query("DELETE FROM tasks WHERE id = 2")
        .await
        .unwrap_err();
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .starts_with("pgveil: DELETE on public.tasks"));
    assert_eq!(
        pg.psql_super("guard_reload", "SELECT count(*) FROM tasks"),
        "99"
    );
    p.shutdown().await;
}

#[test]
fn explain_names_what_a_statement_touches_and_the_rule() {
    let pg = database("guard_explain");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/guard_explain",
        common::SUPERUSER_PASSWORD,
        pg.port
    );
    let explain = |role: &str, sql: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["explain", "--rules", dir.path().to_str().unwrap()])
            .args(["--role", role, "--upstream-url", &url, sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
        common::stdout(&out)
    };
    let text = explain(
        "mallory",
        "WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d",
    );
    assert!(text.contains("touches: delete customers"), "{text}");
    assert!(text.contains("decision: refused"), "{text}");
    assert!(
        text.contains("error: 42501 pgveil: DELETE on public.customers"),
        "{text}"
    );
    assert!(text.contains("rules.toml:2"), "{text}");
    let text = explain("alice", "DELETE FROM tasks WHERE id = 1");
    assert!(text.contains("guard: allowed"), "{text}");
    let text = explain("alice", "DELETE FROM tasks");
    assert!(text.contains("requires a WHERE clause"), "{text}");
    let text = explain("crm_admin", "DROP TABLE deals");
    assert!(text.contains("guard: none applies"), "{text}");
}

/// A decision cached for a statement's shape must not outlive the names it was made on:
/// once `SET search_path` brings `public` in, the same DELETE means public.customers.
#[tokio::test]
async fn a_search_path_change_invalidates_cached_decisions() {
    let pg = database("guard_path");
    pg.psql_super(
        "guard_path",
        "CREATE TABLE sandbox.customers (id int); INSERT INTO sandbox.customers VALUES (1), (2); \
         ALTER TABLE sandbox.customers OWNER TO mallory; \
         ALTER ROLE mallory IN DATABASE guard_path SET search_path = sandbox",
    );
    let p = TestProxy::with_rules(pg, RULES).await;
    let c = client(&p, "mallory", "mallory_pw", "guard_path").await;
    // sandbox.customers: allowed, and the decision is cached for this shape.
    c.simple_query("DELETE FROM customers WHERE id = 1")
        .await
        .unwrap();
    // In one string: the DELETE after the SET reads names along the new path.
    let other = client(&p, "mallory", "mallory_pw", "guard_path").await;
    assert_refused(
        &other,
        "SET search_path = public, sandbox; DELETE FROM customers WHERE id = 2",
        "DELETE",
    )
    .await;
    c.simple_query("SET search_path = public, sandbox")
        .await
        .unwrap();
    assert_refused(&c, "DELETE FROM customers WHERE id = 2", "DELETE").await;
    assert_eq!(
        pg.psql_super("guard_path", "SELECT count(*) FROM public.customers"),
        "200"
    );
    p.shutdown().await;
}

/// The guard reads statements with the server's lexer: where a comment ends, what a
/// `U&` name stands for, and how deep a statement may nest without taking the process down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_reads_tokens_as_the_server_does() {
    let pg = database("guard_lexer");
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", "guard_lexer").await;
    let tasks = || pg.psql_super("guard_lexer", "SELECT count(*) FROM tasks");
    let before = tasks();
    // A `--` comment ends at a carriage return for the server: an allowed DELETE first
    // (its verdict is cached), then the same bytes up to the comment followed by one that
    // has no WHERE clause. The shape of both once looked alike.
    alice
        .simple_query("DELETE FROM tasks WHERE id = -1 -- done\n")
        .await
        .unwrap();
    assert_refused_for(
        &alice,
        "DELETE FROM tasks WHERE id = -1 -- done\r; DELETE FROM tasks",
        "requires a WHERE clause",
    )
    .await;
    assert_eq!(tasks(), before);
    // `U&"\0074asks"` is tasks: the same rule applies to it.
    assert_refused_for(
        &alice,
        r#"DELETE FROM U&"\0074asks""#,
        "requires a WHERE clause",
    )
    .await;
    alice
        .simple_query(r#"DELETE FROM U&"!0074asks" UESCAPE '!' WHERE id = -1"#)
        .await
        .unwrap();
    assert_eq!(tasks(), before);

    // A megabyte of left-nested expression: refused for a guarded role, forwarded (and
    // answered by the server) for an exempt one; the process serves on either way.
    let deep = format!("SELECT 1{}", "+1".repeat(500_000));
    let mallory = client(&p, "mallory", "mallory_pw", "guard_lexer").await;
    let err = mallory.simple_query(&deep).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");
    let admin = client(&p, "crm_admin", "admin_pw", "guard_lexer").await;
    let _ = admin.simple_query(&deep).await;
    let nested = format!("SELECT {}1{}", "(".repeat(500_000), ")".repeat(500_000));
    let _ = mallory.simple_query(&nested).await;
    let _ = admin.simple_query(&nested).await;
    let fresh = client(&p, "alice", "alice_pw", "guard_lexer").await;
    let one: i32 = fresh.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    mallory.simple_query("SELECT 1").await.unwrap();
    p.shutdown().await;
}

/// With a client_encoding whose second bytes include `\` (SJIS), the server reads a
/// literal ending elsewhere than a UTF-8 reading does: one allowed DELETE for a UTF-8
/// reader is, for the server, that DELETE and one without a WHERE clause. The guard reads
/// the text decoded as the server decodes it, and refuses non-ASCII text while the
/// encoding may be changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_other_client_encodings_are_not_misread() {
    let pg = database("guard_encoding");
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", "guard_encoding").await;
    let tasks = || pg.psql_super("guard_encoding", "SELECT count(*) FROM tasks");
    let before = tasks();
    // In SJIS the bytes C3 81 5C are two characters: the backslash is part of the second.
    let attack = "DELETE FROM tasks WHERE id = -1 AND note = E'\u{c1}\\'; DELETE FROM tasks; --'";
    alice
        .simple_query("SET client_encoding = 'SJIS'")
        .await
        .unwrap();
    assert_refused_for(&alice, attack, "requires a WHERE clause").await;
    assert_eq!(tasks(), before);
    // Pipelined behind the SET, before the server has confirmed it.
    alice
        .simple_query("SET client_encoding = 'UTF8'")
        .await
        .unwrap();
    let (set, hidden) = tokio::join!(
        alice.simple_query("SET client_encoding = 'SJIS'"),
        alice.simple_query(attack)
    );
    set.unwrap();
    // Refused either way: as unreadable while the SET is in flight, or, if the server
    // confirmed it first, as the DELETE without a WHERE clause that SJIS makes of it.
    let err = hidden.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501", "{err}");
    let message = db.message();
    assert!(
        message.contains("client_encoding is possibly changing")
            || message.contains("requires a WHERE clause"),
        "{message}"
    );
    assert_eq!(tasks(), before);
    // In UTF8 the same text is one string literal, and the DELETE runs as pgveil read it.
    alice
        .simple_query("SET client_encoding = 'UTF8'")
        .await
        .unwrap();
    alice.simple_query(attack).await.unwrap();
    assert_eq!(tasks(), before);
    p.shutdown().await;
}

/// A temporary view named like a table a rule covers turns an allowed DELETE into one
/// through the view, from its base table: the server searches pg_temp first. A name the
/// session may have created a relation under also means pg_temp's, which the rule does not
/// cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_view_does_not_stand_in_for_an_allowed_table() {
    let pg = database("guard_temp_view");
    let p = TestProxy::with_rules(pg, RULES).await;
    let mallory = client(&p, "mallory", "mallory_pw", "guard_temp_view").await;
    let before = inventory(pg, "guard_temp_view");
    mallory
        .simple_query("SET search_path = sandbox, public")
        .await
        .unwrap();
    // Allowed: mallory may delete from sandbox.*.
    mallory
        .simple_query("DELETE FROM notes WHERE id = -1")
        .await
        .unwrap();
    mallory
        .simple_query("CREATE TEMP VIEW notes AS SELECT * FROM public.customers")
        .await
        .unwrap();
    // The same statement as before (its decision was cached) and another.
    assert_refused(&mallory, "DELETE FROM notes WHERE id = -1", "DELETE").await;
    assert_refused(&mallory, "DELETE FROM notes WHERE id = 1", "DELETE").await;
    assert_eq!(inventory(pg, "guard_temp_view"), before);
    // In one string: the DELETE after the CREATE means the view too.
    let other = client(&p, "mallory", "mallory_pw", "guard_temp_view").await;
    other
        .simple_query("SET search_path = sandbox, public")
        .await
        .unwrap();
    assert_refused(
        &other,
        "CREATE TEMP VIEW notes AS SELECT * FROM public.customers; DELETE FROM notes WHERE id = 1",
        "DELETE",
    )
    .await;
    assert_eq!(inventory(pg, "guard_temp_view"), before);
    p.shutdown().await;
}

/// A function called in attribute notation (`t.wipe_all` is `wipe_all(t)`) runs like any
/// other call: a user-defined one that deletes is code pgveil cannot see into, refused
/// under `unanalysable = "deny"`; a column of the same name elsewhere is still a column.
#[tokio::test]
async fn functions_in_attribute_notation_do_not_slip_past_the_guard() {
    let db = "guard_attribute";
    let pg = database(db);
    pg.psql_super(
        db,
        "CREATE FUNCTION public.wipe_all(anyelement) RETURNS int LANGUAGE sql AS \
         'WITH d AS (DELETE FROM public.customers RETURNING 1) SELECT count(*)::int FROM d'; \
         GRANT EXECUTE ON FUNCTION public.wipe_all(anyelement) TO mallory",
    );
    let before = inventory(pg, db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let c = client(&p, "mallory", "mallory_pw", db).await;
    for sql in [
        "SELECT t.wipe_all FROM tasks t LIMIT 1",
        "SELECT tasks.wipe_all FROM tasks LIMIT 1",
        "SELECT x.wipe_all FROM (SELECT 1 AS a) x",
        "SELECT public.tasks.wipe_all FROM tasks LIMIT 1",
    ] {
        assert_refused_for(&c, sql, "cannot analyse").await;
        assert_eq!(inventory(pg, db), before, "{sql}");
    }
    // Qualified columns stay columns.
    c.simple_query("SELECT t.note FROM tasks t LIMIT 1")
        .await
        .unwrap();
    p.shutdown().await;
}
