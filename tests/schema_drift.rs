//! Masks follow the schema the server has, not the one pgveil read: a masked table created
//! after pgveil started (directly on the server or through pgveil), a masked column added,
//! a table dropped and created again, a view created over a masked table, a table renamed
//! into a masked name. In sessions that were running across the change and in new ones,
//! over the simple and the extended protocol, no clear value reaches a masked role: the
//! statement is answered masked (pgveil reads the catalog again on the session's own
//! connection) or refused, never in clear.

mod common;

use common::{shared, PgCluster, TestProxy, SUPERUSER_PASSWORD};

const RULES: &str = r#"
# The schema owner's DDL through pgveil (a rename counts as a drop).
[[allow]]
roles = ["postgres"]
statements = ["delete", "truncate", "drop"]
tables = ["*"]

[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.later.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.made_here.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.customers.nickname"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.recreated.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.renamed.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.renamed_here.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.made_in_block.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.later_in_block.secret"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.columns_renamed.secret"
function = "redact"
unmasked_for = ["crm_admin"]
"#;

fn database(name: &str) -> &'static PgCluster {
    let pg = shared();
    pg.create_crm_db(name);
    pg.psql_super(
        name,
        "GRANT CREATE ON SCHEMA public TO alice; \
         CREATE TABLE recreated (id int, secret text); \
         INSERT INTO recreated VALUES (1, 'topsecret-old'); \
         GRANT SELECT ON recreated TO crm_base; \
         CREATE TABLE plain (id int, secret text); \
         INSERT INTO plain VALUES (1, 'topsecret-renamed'); \
         GRANT SELECT ON plain TO crm_base; \
         CREATE VIEW plain_view AS SELECT id, secret FROM plain; \
         GRANT SELECT ON plain_view TO crm_base; \
         CREATE TABLE plain2 (id int, secret text); \
         INSERT INTO plain2 VALUES (1, 'topsecret-renamed-directly'); \
         CREATE VIEW plain2_view AS SELECT id, secret FROM plain2; \
         CREATE TABLE columns_renamed (id int, other text); \
         INSERT INTO columns_renamed VALUES (1, 'topsecret-column'); \
         CREATE VIEW columns_view AS SELECT id, other FROM columns_renamed; \
         GRANT SELECT ON plain2, plain2_view, columns_renamed, columns_view TO crm_base",
    );
    pg
}

async fn client(p: &TestProxy, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
    common::connect(&p.conn_str(user, password, db)).await
}

/// An error with the server's message and detail.
fn error_text(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} {:?}", db.code().code(), db.message(), db.detail()),
        None => e.to_string(),
    }
}

/// Every value of a statement's rows, over the simple protocol (`Err`: its error).
async fn simple(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    let msgs = c.simple_query(sql).await.map_err(error_text)?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect())
}

/// The same over the extended protocol (binary results): text columns as they came,
/// integers in decimal, other columns as `?`.
async fn extended(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    let rows = c.query(sql, &[]).await.map_err(error_text)?;
    Ok(rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    if let Ok(v) = r.try_get::<_, Option<String>>(i) {
                        v.unwrap_or_else(|| "NULL".into())
                    } else if let Ok(Some(v)) = r.try_get::<_, Option<i32>>(i) {
                        v.to_string()
                    } else if let Ok(Some(v)) = r.try_get::<_, Option<i64>>(i) {
                        v.to_string()
                    } else {
                        "?".into()
                    }
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect())
}

/// Runs `sql` until it is answered (a statement refused or withheld once, while pgveil
/// reads the catalog again, is run again), asserting that no answer holds `clear`.
async fn answered(c: &tokio_postgres::Client, sql: &str, clear: &str, ext: bool) -> Vec<String> {
    let mut last = String::new();
    for _ in 0..3 {
        let got = if ext {
            extended(c, sql).await
        } else {
            simple(c, sql).await
        };
        match got {
            Ok(rows) => {
                let text = rows.join("\n");
                assert!(!text.contains(clear), "{sql}: {clear} in clear: {text}");
                return rows;
            }
            Err(e) => {
                assert!(!e.contains(clear), "{sql}: {clear} in an error: {e}");
                last = e;
            }
        }
    }
    panic!("{sql}: never answered: {last}")
}

/// The server's own word on a statement, as the superuser.
fn direct(pg: &PgCluster, db: &str, sql: &str) {
    pg.psql_super(db, sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_table_created_after_pgveil_started_is_masked() {
    let db = "drift_created";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    // The session works before the table exists (its only other mask resolved).
    assert_eq!(
        simple(&running, "SELECT count(*) FROM deals")
            .await
            .unwrap()
            .len(),
        1
    );
    direct(
        pg,
        db,
        "CREATE TABLE later (id int, secret text); \
         INSERT INTO later VALUES (1, 'topsecret-later'); GRANT SELECT ON later TO crm_base",
    );
    for ext in [false, true] {
        let rows = answered(
            &running,
            "SELECT id, secret FROM later",
            "topsecret-later",
            ext,
        )
        .await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        let rows = answered(
            &running,
            "SELECT upper(secret) FROM later",
            "TOPSECRET-LATER",
            ext,
        )
        .await;
        assert_eq!(rows.len(), 1, "{rows:?}");
    }
    let new = client(&p, "alice", "alice_pw", db).await;
    for ext in [false, true] {
        answered(&new, "SELECT * FROM later", "topsecret-later", ext).await;
    }
    // The exempt role reads it in clear: the mask is the rule's, not a blanket refusal.
    let admin = client(&p, "crm_admin", "admin_pw", db).await;
    let rows = simple(&admin, "SELECT secret FROM later").await.unwrap();
    assert_eq!(rows, vec!["topsecret-later".to_string()]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_table_the_session_creates_is_masked() {
    let db = "drift_made_here";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", db).await;
    simple(&alice, "CREATE TABLE made_here (id int, secret text)")
        .await
        .unwrap();
    answered(
        &alice,
        "INSERT INTO made_here VALUES (1, 'topsecret-here')",
        "topsecret-here",
        false,
    )
    .await;
    for ext in [false, true] {
        let rows = answered(
            &alice,
            "SELECT secret FROM made_here",
            "topsecret-here",
            ext,
        )
        .await;
        assert_eq!(rows.len(), 1, "{rows:?}");
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_column_added_later_is_masked() {
    let db = "drift_column";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    simple(&running, "SELECT id FROM customers WHERE id = 1")
        .await
        .unwrap();
    direct(
        pg,
        db,
        "ALTER TABLE customers ADD COLUMN nickname text; \
         UPDATE customers SET nickname = 'nick-secret-' || id",
    );
    for ext in [false, true] {
        for sql in [
            "SELECT nickname FROM customers WHERE id = 1",
            "SELECT * FROM customers WHERE id = 1",
            "SELECT upper(nickname) FROM customers WHERE id = 1",
            "SELECT c FROM customers c WHERE id = 1",
        ] {
            answered(&running, sql, "nick-secret", ext).await;
            answered(&running, sql, "NICK-SECRET", ext).await;
        }
    }
    let new = client(&p, "alice", "alice_pw", db).await;
    answered(&new, "SELECT * FROM customers", "nick-secret", false).await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_table_dropped_and_created_again_is_masked() {
    let db = "drift_recreated";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let simple_session = client(&p, "alice", "alice_pw", db).await;
    let extended_session = client(&p, "alice", "alice_pw", db).await;
    // Masked before: and the verdict on these texts is cached.
    answered(
        &simple_session,
        "SELECT secret FROM recreated",
        "topsecret-old",
        false,
    )
    .await;
    answered(
        &extended_session,
        "SELECT secret FROM recreated",
        "topsecret-old",
        true,
    )
    .await;
    direct(
        pg,
        db,
        "DROP TABLE recreated; CREATE TABLE recreated (id int, secret text); \
         INSERT INTO recreated VALUES (1, 'topsecret-new'); GRANT SELECT ON recreated TO crm_base",
    );
    // The verdict on the text still holds, but the rows come from a relation the catalog
    // does not have: withheld, and the catalog is read again before the next statement.
    for (session, ext) in [(&simple_session, false), (&extended_session, true)] {
        let first = if ext {
            extended(session, "SELECT secret FROM recreated").await
        } else {
            simple(session, "SELECT secret FROM recreated").await
        };
        let err = first.expect_err("rows of an unknown relation were forwarded");
        assert!(err.contains("withheld"), "{err}");
        assert!(!err.contains("topsecret-new"), "{err}");
    }
    let rows = answered(
        &simple_session,
        "SELECT secret FROM recreated",
        "topsecret-new",
        false,
    )
    .await;
    assert_eq!(rows.len(), 1);
    let rows = answered(
        &extended_session,
        "SELECT secret FROM recreated",
        "topsecret-new",
        true,
    )
    .await;
    assert_eq!(rows.len(), 1);
    // The session goes on.
    simple(&simple_session, "SELECT 1").await.unwrap();
    extended(&extended_session, "SELECT 1").await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_created_over_a_masked_table_is_not_read_in_clear() {
    let db = "drift_view";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    simple(&running, "SELECT 1").await.unwrap();
    let phone = pg.psql_super(db, "SELECT substr(phone, 4, 4) FROM customers WHERE id = 7");
    let clear = pg.psql_super(db, "SELECT phone FROM customers WHERE id = 7");
    direct(
        pg,
        db,
        "CREATE VIEW contact_view AS SELECT id, phone FROM customers; \
         GRANT SELECT ON contact_view TO crm_base",
    );
    for ext in [false, true] {
        for sql in [
            "SELECT phone FROM contact_view WHERE id = 7",
            "SELECT * FROM contact_view WHERE id = 7",
        ] {
            let got = if ext {
                extended(&running, sql).await
            } else {
                simple(&running, sql).await
            };
            let text = format!("{got:?}");
            assert!(!text.contains(&clear), "{sql}: {text}");
            assert!(!text.contains(&phone), "{sql}: {text}");
        }
    }
    p.shutdown().await;
}

/// A table renamed into a masked name through pgveil (another session's statement): every
/// masked session reads the catalog again before its next statement, so even the view
/// that read the table under its old name is no way around the mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_renamed_into_a_masked_name_through_pgveil_is_masked() {
    let db = "drift_renamed";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    // Unmasked before the rename.
    let rows = simple(&running, "SELECT secret FROM plain_view")
        .await
        .unwrap();
    assert_eq!(rows, vec!["topsecret-renamed".to_string()]);
    let owner = client(&p, "postgres", SUPERUSER_PASSWORD, db).await;
    simple(&owner, "ALTER TABLE plain RENAME TO renamed")
        .await
        .unwrap();
    for ext in [false, true] {
        answered(
            &running,
            "SELECT secret FROM renamed",
            "topsecret-renamed",
            ext,
        )
        .await;
        answered(
            &running,
            "SELECT secret FROM plain_view",
            "topsecret-renamed",
            ext,
        )
        .await;
    }
    p.shutdown().await;
}

/// The session's own tables (created after its catalog was read, temporary ones too) are
/// not taken for changed ones, alone or joined with unmasked tables, in a transaction
/// block too; a statement that joins one with a masked table whose relation changed gets
/// no rows of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_own_tables_are_not_taken_for_changed_ones() {
    let db = "drift_own";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", db).await;
    let clear = pg.psql_super(db, "SELECT phone FROM customers WHERE id = 1");
    simple(
        &alice,
        "CREATE TEMP TABLE mine AS SELECT id, phone FROM customers WHERE id < 5",
    )
    .await
    .unwrap();
    for ext in [false, true] {
        let rows = answered(&alice, "SELECT id, phone FROM mine", &clear, ext).await;
        assert_eq!(rows.len(), 4, "{rows:?}");
    }
    simple(&alice, "BEGIN").await.unwrap();
    simple(&alice, "CREATE TEMP TABLE mine2 (id int)")
        .await
        .unwrap();
    simple(&alice, "INSERT INTO mine2 VALUES (1)")
        .await
        .unwrap();
    let rows = simple(
        &alice,
        "SELECT m.id, d.amount FROM mine2 m JOIN deals d ON d.id = m.id",
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    simple(&alice, "COMMIT").await.unwrap();
    // (The CREATE TABLE above has the session read the catalog again here, before the
    // masked table changes behind pgveil's back.)
    simple(&alice, "SELECT 1").await.unwrap();
    direct(
        pg,
        db,
        "DROP TABLE recreated; CREATE TABLE recreated (id int, secret text); \
         INSERT INTO recreated VALUES (1, 'topsecret-new'); GRANT SELECT ON recreated TO crm_base",
    );
    for sql in [
        "SELECT m.id, r.secret FROM mine m, recreated r",
        "SELECT r.secret FROM recreated r JOIN mine m ON m.id = r.id",
        "SELECT m.*, r.* FROM mine m, recreated r",
    ] {
        answered(&alice, sql, "topsecret-new", false).await;
    }
    p.shutdown().await;
}

/// The same behind pgveil's back: a table, and a column, renamed into masked names
/// directly on the server, read through views created under the old names by a session
/// that was running across the rename. Nothing but the names changed (OIDs and attribute
/// numbers stay), so the session asks the server, before each batch, whether what its
/// pending masks name exists yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_renamed_into_masked_ones_behind_pgveils_back_are_masked() {
    let db = "drift_renamed_directly";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    let rows = simple(&running, "SELECT secret FROM plain2_view")
        .await
        .unwrap();
    assert_eq!(rows, vec!["topsecret-renamed-directly".to_string()]);
    let rows = simple(&running, "SELECT other FROM columns_view")
        .await
        .unwrap();
    assert_eq!(rows, vec!["topsecret-column".to_string()]);
    direct(
        pg,
        db,
        "ALTER TABLE plain2 RENAME TO renamed_here; \
         ALTER TABLE columns_renamed RENAME COLUMN other TO secret",
    );
    for ext in [false, true] {
        for (sql, clear) in [
            (
                "SELECT secret FROM plain2_view",
                "topsecret-renamed-directly",
            ),
            ("SELECT * FROM plain2_view", "topsecret-renamed-directly"),
            ("SELECT other FROM columns_view", "topsecret-column"),
            ("SELECT upper(other) FROM columns_view", "TOPSECRET-COLUMN"),
        ] {
            answered(&running, sql, clear, ext).await;
        }
    }
    p.shutdown().await;
}

/// The same DDL through pgveil (the schema owner's session): a masked column added, a
/// masked table dropped and created again, a view created over a masked table. Running
/// masked sessions read the catalog again before their next statement; new ones start
/// from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_pgveil_is_followed_by_running_and_new_sessions() {
    let db = "drift_through";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    answered(
        &running,
        "SELECT secret FROM recreated",
        "topsecret-old",
        false,
    )
    .await;
    let clear_phone = pg.psql_super(db, "SELECT phone FROM customers WHERE id = 7");
    let owner = client(&p, "postgres", SUPERUSER_PASSWORD, db).await;
    for ddl in [
        "ALTER TABLE customers ADD COLUMN nickname text",
        "DROP TABLE recreated",
        "CREATE TABLE recreated (id int, secret text)",
        "CREATE VIEW contact_view AS SELECT id, phone FROM customers",
    ] {
        simple(&owner, ddl)
            .await
            .unwrap_or_else(|e| panic!("{ddl}: {e}"));
    }
    direct(
        pg,
        db,
        "UPDATE customers SET nickname = 'nick-secret-' || id; \
         INSERT INTO recreated VALUES (1, 'topsecret-new'); \
         GRANT SELECT ON recreated, contact_view TO crm_base",
    );
    let new = client(&p, "alice", "alice_pw", db).await;
    for session in [&running, &new] {
        for ext in [false, true] {
            for (sql, clear) in [
                ("SELECT nickname FROM customers WHERE id = 1", "nick-secret"),
                ("SELECT * FROM customers WHERE id = 1", "nick-secret"),
                ("SELECT secret FROM recreated", "topsecret-new"),
                (
                    "SELECT phone FROM contact_view WHERE id = 7",
                    clear_phone.as_str(),
                ),
            ] {
                answered(session, sql, clear, ext).await;
            }
        }
    }
    p.shutdown().await;
}

/// Inside a transaction block, a masked table the block itself creates, and one another
/// session creates while the block is open, are answered masked at the first try (a
/// refusal would abort the block): pgveil reads the catalog in a savepoint it rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_a_transaction_block_new_masked_tables_are_masked_not_refused() {
    let db = "drift_in_block";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", db).await;
    for ext in [false, true] {
        simple(&alice, "BEGIN").await.unwrap();
        simple(&alice, "CREATE TABLE made_in_block (id int, secret text)")
            .await
            .unwrap();
        simple(
            &alice,
            "INSERT INTO made_in_block VALUES (1, 'topsecret-in-block')",
        )
        .await
        .unwrap();
        let sql = "SELECT id, secret FROM made_in_block";
        let rows = match ext {
            false => simple(&alice, sql).await,
            true => extended(&alice, sql).await,
        }
        .unwrap_or_else(|e| panic!("{sql} (extended: {ext}): {e}"));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(!rows[0].contains("topsecret"), "{rows:?}");
        // The block went on as it was: its search_path and its work.
        assert_eq!(
            simple(&alice, "SHOW search_path").await.unwrap(),
            vec!["\"$user\", public".to_string()]
        );
        simple(&alice, "ROLLBACK").await.unwrap();
    }
    simple(&alice, "BEGIN").await.unwrap();
    simple(&alice, "SELECT count(*) FROM deals").await.unwrap();
    direct(
        pg,
        db,
        "CREATE TABLE later_in_block (id int, secret text); \
         INSERT INTO later_in_block VALUES (1, 'topsecret-later-in-block'); \
         GRANT SELECT ON later_in_block TO crm_base",
    );
    for ext in [false, true] {
        let sql = "SELECT secret FROM later_in_block";
        let rows = match ext {
            false => simple(&alice, sql).await,
            true => extended(&alice, sql).await,
        }
        .unwrap_or_else(|e| panic!("{sql} (extended: {ext}): {e}"));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(!rows[0].contains("topsecret"), "{rows:?}");
    }
    simple(&alice, "COMMIT").await.unwrap();
    p.shutdown().await;
}

/// When pgveil's catalog read inside a block fails (here a lock it cannot get in time),
/// the session ends (57P01) rather than judge the block's statements by a schema known to
/// be out of date; the server rolls the block back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catalog_read_inside_a_block_ends_the_session() {
    let db = "drift_block_failed";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", db).await;
    simple(&alice, "BEGIN").await.unwrap();
    simple(&alice, "SET LOCAL lock_timeout = '300ms'")
        .await
        .unwrap();
    // Holds what pgveil's catalog query reads (and nothing the block's own work needs).
    let holder = common::connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname={db}",
        pg.port
    ))
    .await;
    holder
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_rewrite IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // DDL through pgveil: the session reads the catalog again before its next statement.
    simple(&alice, "CREATE TABLE kept_in_block (id int)")
        .await
        .unwrap();
    let err = simple(&alice, "SELECT count(*) FROM deals")
        .await
        .unwrap_err();
    assert!(
        err.starts_with("57P01") && err.contains("could not be read again"),
        "{err}"
    );
    assert!(
        simple(&alice, "SELECT 1").await.is_err(),
        "the session ended"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        pg.psql_super(db, "SELECT to_regclass('kept_in_block') IS NOT NULL"),
        "f"
    );
    let again = client(&p, "alice", "alice_pw", db).await;
    assert_eq!(
        simple(&again, "SELECT 2").await.unwrap(),
        vec!["2".to_string()]
    );
    p.shutdown().await;
}

/// The same over the extended protocol alone: the probe rides at the head of each batch,
/// in its own implicit transaction, and when a name changed into a masked one it stops the
/// batch (40001, "run it again": nothing ran); the next try reads the catalog first and is
/// masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_batches_carry_the_probe_and_stop_when_a_name_changed() {
    let db = "drift_pipelined_probe";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let running = client(&p, "alice", "alice_pw", db).await;
    let sql = "SELECT secret FROM plain2_view";
    let rows = extended(&running, sql).await.unwrap();
    assert_eq!(rows, vec!["topsecret-renamed-directly".to_string()]);
    direct(pg, db, "ALTER TABLE plain2 RENAME TO renamed_here");
    let e = extended(&running, sql).await.unwrap_err();
    assert!(e.starts_with("40001: pgveil: "), "{e}");
    assert!(!e.contains("topsecret"), "{e}");
    let rows = extended(&running, sql).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].contains("topsecret"), "{rows:?}");
    // DISCARD ALL drops the probe's statement on the server: it is prepared again.
    running.batch_execute("DISCARD ALL").await.unwrap();
    for _ in 0..2 {
        let rows = extended(&running, "SELECT secret FROM renamed_here")
            .await
            .unwrap();
        assert!(!rows[0].contains("topsecret"), "{rows:?}");
    }
    p.shutdown().await;
}

/// The catalog read a drift asks for can fail (here: a view it must describe is locked by
/// another session, and the user set a short lock_timeout). The session must not go on
/// with the schema it knows to be out of date: a table renamed into a masked name would
/// then be read in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_cannot_be_read_again_ends_the_session() {
    let db = "drift_unreadable";
    let pg = database(db);
    let p = TestProxy::with_rules(pg, RULES).await;
    let alice = client(&p, "alice", "alice_pw", db).await;
    let sql = "SELECT secret FROM plain2_view";
    assert_eq!(
        simple(&alice, sql).await.unwrap(),
        vec!["topsecret-renamed-directly".to_string()]
    );
    simple(&alice, "SET lock_timeout = '200ms'").await.unwrap();
    direct(pg, db, "ALTER TABLE plain2 RENAME TO renamed_here");
    let locker = common::connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname={db}",
        pg.port
    ))
    .await;
    locker
        .batch_execute("BEGIN; LOCK TABLE plain_view IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let got = simple(&alice, sql).await;
        assert!(
            !format!("{got:?}").contains("topsecret"),
            "read in clear with a stale schema: {got:?} after {answers:?}"
        );
        answers.push(got);
    }
    assert!(
        answers.iter().any(|a| a
            .as_ref()
            .is_err_and(|e| e.contains("could not be read again"))),
        "{answers:?}"
    );
    locker.batch_execute("ROLLBACK").await.unwrap();
    // A new session reads the schema and masks.
    let again = client(&p, "alice", "alice_pw", db).await;
    let rows = simple(&again, sql).await.unwrap();
    assert!(!rows[0].contains("topsecret"), "{rows:?}");
    p.shutdown().await;
}
