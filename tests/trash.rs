//! The recycle bin (spec section 4): rows removed by allowed DELETEs and TRUNCATEs of
//! recycled tables, cascades included, are kept with who removed them, listed, restored
//! (parents before children, never over an existing key) and purged; the guard refuses to
//! delete from a recycled table whose capture is not intact (triggers missing, disabled or
//! altered, `pgveil_trash.capture()` replaced or altered), naming why.

mod common;

use std::process::Command;
use std::sync::OnceLock;

use common::{stderr, stdout, PgCluster, TestProxy, SUPERUSER_PASSWORD};

const RULES: &str = r#"
[[allow]]
roles = ["crm_admin"]
statements = ["delete", "truncate", "drop"]
tables = ["*"]

[[allow]]
roles = ["crm_support"]
statements = ["delete"]
tables = ["public.tasks"]
require_where = true

[[allow]]
roles = ["crm_sales"]
statements = ["delete"]
tables = ["public.deals"]
require_where = true

[[allow]]
roles = ["crm_sales"]
statements = ["drop"]
tables = ["public.deals"]

[[recycle]]
table = "public.customers"

[[recycle]]
table = "contacts"
retention_days = 7

[[recycle]]
table = "public.deals"

[[recycle]]
table = "public.tasks"
"#;

fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| PgCluster::start(Default::default()))
}

struct Bin {
    db: String,
    rules: tempfile::TempDir,
}

impl Bin {
    fn new(db: &str) -> Bin {
        cluster().create_crm_db(db);
        let rules = tempfile::tempdir().unwrap();
        std::fs::write(rules.path().join("rules.toml"), RULES).unwrap();
        Bin {
            db: db.to_string(),
            rules,
        }
    }

    fn url(&self) -> String {
        self.url_as("postgres", SUPERUSER_PASSWORD)
    }

    fn url_as(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{}",
            cluster().port,
            self.db
        )
    }

    fn pgveil(&self, args: &[&str]) -> std::process::Output {
        self.pgveil_at(&self.url(), args)
    }

    fn pgveil_at(&self, url: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgveil"));
        cmd.args(args).args(["--upstream-url", url]);
        cmd.output().unwrap()
    }

    fn rules_dir(&self) -> String {
        self.rules.path().to_str().unwrap().to_string()
    }

    fn init(&self) {
        let rules = self.rules.path().to_str().unwrap().to_string();
        let out = self.pgveil(&["trash", "init", "--rules", &rules]);
        assert!(out.status.success(), "trash init: {}", stderr(&out));
        assert!(stdout(&out).contains("recycling public.customers (retention 30 days)"));
        assert!(stdout(&out).contains("recycling public.contacts (retention 7 days)"));
    }

    /// Every kept row, as `trash list --json` prints it.
    fn kept(&self, table: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["trash", "list", "--json", "--limit", "1000000"];
        if let Some(t) = table {
            args.extend(["--table", t]);
        }
        let out = self.pgveil(&args);
        assert!(out.status.success(), "trash list: {}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn sql(&self, sql: &str) -> String {
        cluster().psql_super(&self.db, sql)
    }

    async fn proxy(&self) -> TestProxy {
        let path = self.rules.path().to_path_buf();
        TestProxy::start(cluster(), move |s| s.rules = Some(path)).await
    }

    async fn client(&self, p: &TestProxy, user: &str, password: &str) -> tokio_postgres::Client {
        common::connect(&p.conn_str(user, password, &self.db)).await
    }
}

#[tokio::test]
async fn deleted_rows_and_their_cascades_are_kept_and_restored() {
    let bin = Bin::new("trash_roundtrip");
    bin.init();
    let before = bin.sql("SELECT (SELECT count(*) FROM customers) || ' ' || (SELECT count(*) FROM contacts) || ' ' || (SELECT count(*) FROM deals)");
    let snapshot = bin.sql("SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c");
    let since =
        bin.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    // The client sees the server's own answer: DELETE n and RETURNING rows.
    let rows = admin
        .query(
            "DELETE FROM customers WHERE id IN (1, 2) RETURNING id, full_name",
            &[],
        )
        .await
        .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(rows[0].get::<_, String>(1), "Customer 1");
    let n = admin
        .execute("DELETE FROM customers WHERE id = 3", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Kept: the customers, and the contacts and deals the foreign keys cascaded to.
    let kept = bin.kept(None);
    let count = |t: &str| kept.iter().filter(|k| k["table"] == t).count();
    assert_eq!(
        (
            count("public.customers"),
            count("public.contacts"),
            count("public.deals")
        ),
        (3, 3, 6)
    );
    assert!(kept
        .iter()
        .all(|k| k["deleted_by"] == "crm_admin" && k["operation"] == "delete"));
    let two = kept
        .iter()
        .find(|k| k["table"] == "public.customers" && k["row"]["id"] == 2)
        .unwrap();
    assert_eq!(two["row"]["email"], "user2@example.com");
    // trash list, as a table and as JSON.
    let out = bin.pgveil(&["trash", "list", "--table", "customers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("public.customers")
            && text.contains("crm_admin")
            && text.contains("(3 rows)"),
        "{text}"
    );
    let out = bin.pgveil(&["trash", "list", "--json", "--table", "public.deals"]);
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["table"], "public.deals");
    assert!(lines[0]["statement"]
        .as_str()
        .unwrap()
        .contains("DELETE FROM customers"));
    // Restore by time range: children went into the bin before their parents; the restore
    // puts parents back first.
    let out = bin.pgveil(&["trash", "restore", "--since", &since]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("restored 12 rows"),
        "{}",
        stdout(&out)
    );
    p.shutdown().await;
    assert_eq!(bin.sql("SELECT (SELECT count(*) FROM customers) || ' ' || (SELECT count(*) FROM contacts) || ' ' || (SELECT count(*) FROM deals)"), before);
    assert_eq!(
        bin.sql("SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c"),
        snapshot
    );
    assert!(bin.kept(None).is_empty());
}

#[tokio::test]
async fn restore_never_overwrites_an_existing_key() {
    let bin = Bin::new("trash_conflict");
    bin.init();
    let p = bin.proxy().await;
    let alice = bin.client(&p, "alice", "alice_pw").await;
    alice
        .simple_query("DELETE FROM tasks WHERE id IN (5, 6)")
        .await
        .unwrap();
    p.shutdown().await;
    // Someone reuses id 5 meanwhile.
    bin.sql("INSERT INTO tasks (id, owner, note) VALUES (5, 'carol', 'new task')");
    let ids: Vec<String> = bin.kept(None).iter().map(|k| k["id"].to_string()).collect();
    let out = bin.pgveil(&["trash", "restore", "--table", "tasks"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("kept row {} of public.tasks", ids[0])),
        "{err}"
    );
    assert!(err.contains("Key (id)=(5) already exists"), "{err}");
    assert!(err.contains("nothing was restored"), "{err}");
    assert_eq!(bin.sql("SELECT count(*) FROM tasks WHERE id = 6"), "0");
    assert_eq!(bin.sql("SELECT note FROM tasks WHERE id = 5"), "new task");
    // --skip-conflicts restores the other row and keeps the conflicting one in the bin.
    let out = bin.pgveil(&[
        "trash",
        "restore",
        "--id",
        &ids[0],
        "--id",
        &ids[1],
        "--skip-conflicts",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 1 rows"), "{}", stdout(&out));
    assert_eq!(bin.sql("SELECT count(*) FROM tasks WHERE id = 6"), "1");
    assert_eq!(bin.sql("SELECT note FROM tasks WHERE id = 5"), "new task");
    assert_eq!(bin.kept(None).len(), 1);
    // A restore must name its rows.
    let out = bin.pgveil(&["trash", "restore"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn truncate_is_kept_too_and_purge_honours_retention() {
    let bin = Bin::new("trash_purge");
    bin.init();
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin.simple_query("TRUNCATE tasks").await.unwrap();
    let tasks = bin.kept(Some("tasks"));
    assert_eq!(tasks.len(), 100);
    assert!(tasks.iter().all(|k| k["operation"] == "truncate"));
    admin
        .simple_query("DELETE FROM contacts WHERE id <= 10")
        .await
        .unwrap();
    p.shutdown().await;
    // Age the kept rows: contacts keep 7 days, tasks 30.
    bin.sql("UPDATE pgveil_trash.deletions SET deleted_at = now() - interval '10 days'");
    let out = bin.pgveil(&["trash", "purge"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "purged 10 kept rows");
    assert_eq!(bin.kept(None).len(), 100);
    // serve purges on its own: a fresh pgveil does so at the first connection.
    bin.sql("UPDATE pgveil_trash.deletions SET deleted_at = now() - interval '31 days' WHERE table_name = 'tasks'");
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin
        .simple_query("DELETE FROM deals WHERE id <= 5")
        .await
        .unwrap();
    assert_eq!(bin.kept(None).len(), 5);
    // The bin itself is not readable by ordinary roles.
    let alice = bin.client(&p, "alice", "alice_pw").await;
    for sql in [
        "SELECT * FROM pgveil_trash.deletions",
        "SELECT * FROM pgveil_trash.tables",
    ] {
        let err = alice.simple_query(sql).await.unwrap_err();
        assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{sql}");
    }
    p.shutdown().await;
    let out = bin.pgveil(&["trash", "purge", "--older-than-days", "0"]);
    assert_eq!(stdout(&out).trim(), "purged 5 kept rows");
}

#[tokio::test]
async fn no_delete_of_a_recycled_table_without_its_triggers() {
    let bin = Bin::new("trash_missing");
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    let err = admin
        .simple_query("DELETE FROM customers WHERE id = 1")
        .await
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.starts_with("pgveil: DELETE on public.customers"),
        "{message}"
    );
    assert!(message.contains("pgveil trash init"), "{message}");
    assert!(admin.simple_query("TRUNCATE tasks").await.is_err());
    // Deleting from a table without a recycle rule is unaffected.
    bin.sql("CREATE TABLE scratch (id int); GRANT ALL ON scratch TO crm_admin; INSERT INTO scratch VALUES (1)");
    p.proxy.catalogs.clear();
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin.simple_query("DELETE FROM scratch").await.unwrap();
    // After `trash init`, new sessions see the triggers and may delete.
    bin.init();
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin
        .simple_query("DELETE FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(bin.kept(Some("customers")).len(), 1);
    // A column added after `trash init` is kept too (the bin grows with the table).
    bin.sql("ALTER TABLE tasks ADD COLUMN priority int DEFAULT 3");
    admin
        .simple_query("DELETE FROM tasks WHERE id = 7")
        .await
        .unwrap();
    let kept = bin.kept(Some("tasks"));
    assert_eq!(kept[0]["row"]["priority"], 3, "{kept:?}");
    let out = bin.pgveil(&["trash", "restore", "--table", "tasks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(bin.sql("SELECT priority FROM tasks WHERE id = 7"), "3");
    // A disabled trigger counts as missing.
    bin.sql("ALTER TABLE customers DISABLE TRIGGER pgveil_trash_delete");
    p.proxy.catalogs.clear();
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    assert!(admin
        .simple_query("DELETE FROM customers WHERE id = 2")
        .await
        .is_err());
    assert_eq!(bin.sql("SELECT count(*) FROM customers WHERE id = 2"), "1");
    p.shutdown().await;
}

/// The capture cannot be switched off, nor a column's contents wiped, by a role that owns
/// a recycled table but has no rule for drops (issue: destruction has more forms than
/// DELETE); a role whose rule allows drops may, and then its DELETEs are refused until the
/// bin is set up again, because pgveil reads the catalog again after DDL it sees.
#[tokio::test]
async fn the_capture_cannot_be_switched_off_and_columns_cannot_be_wiped() {
    let bin = Bin::new("trash_capture");
    bin.init();
    bin.sql("ALTER TABLE tasks OWNER TO alice; ALTER TABLE deals OWNER TO carol");
    let p = bin.proxy().await;
    let alice = bin.client(&p, "alice", "alice_pw").await;
    let before = bin.sql("SELECT count(*), string_agg(note, ',' ORDER BY id) FROM tasks");
    for sql in [
        "ALTER TABLE tasks ENABLE REPLICA TRIGGER pgveil_trash_delete",
        "ALTER TABLE tasks ENABLE REPLICA TRIGGER ALL",
        "ALTER TABLE tasks DISABLE TRIGGER pgveil_trash_delete",
        "ALTER TABLE tasks ALTER COLUMN note TYPE text USING 'wiped'",
        "ALTER TABLE tasks ALTER COLUMN note SET DATA TYPE varchar(1) USING ''",
        "ALTER TABLE tasks ALTER COLUMN due TYPE date USING NULL",
        "ALTER TABLE tasks RENAME TO tasks_elsewhere",
        "ALTER TABLE tasks RENAME COLUMN note TO old_note",
        "ALTER TABLE tasks OWNER TO carol",
        "ALTER TABLE tasks DROP COLUMN note",
        "SET session_replication_role = replica",
        "SET LOCAL session_replication_role TO 'replica'",
    ] {
        let err = alice
            .simple_query(sql)
            .await
            .expect_err(&format!("not refused: {sql}"));
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "42501", "{sql}: {}", db.message());
        assert!(
            db.message().starts_with("pgveil: "),
            "{sql}: {}",
            db.message()
        );
    }
    // Harmless forms still run.
    alice
        .simple_query("ALTER TABLE tasks ALTER COLUMN note SET DEFAULT 'n/a'")
        .await
        .unwrap();
    assert_eq!(
        bin.sql("SELECT tgenabled FROM pg_trigger WHERE tgname = 'pgveil_trash_delete' AND tgrelid = 'tasks'::regclass"),
        "O"
    );
    assert_eq!(
        bin.sql("SELECT count(*), string_agg(note, ',' ORDER BY id) FROM tasks"),
        before
    );
    // carol may drop from deals: the ENABLE REPLICA runs, and her DELETE with a WHERE
    // (allowed while the bin captures it) is then refused: the capture no longer fires.
    let carol = bin.client(&p, "carol", "carol_pw").await;
    carol
        .simple_query("ALTER TABLE deals ENABLE REPLICA TRIGGER pgveil_trash_delete")
        .await
        .unwrap();
    let deals = bin.sql("SELECT count(*) FROM deals");
    let err = carol
        .simple_query("DELETE FROM deals WHERE id = 1")
        .await
        .expect_err("a DELETE without the capture ran");
    assert!(
        err.as_db_error().unwrap().message().contains("recycle bin"),
        "{err:?}"
    );
    assert_eq!(bin.sql("SELECT count(*) FROM deals"), deals);
    // Set to replica mode behind pgveil's back: new sessions see it.
    bin.sql("ALTER TABLE tasks ENABLE REPLICA TRIGGER pgveil_trash_delete");
    p.proxy.catalogs.clear();
    let alice = bin.client(&p, "alice", "alice_pw").await;
    assert!(alice
        .simple_query("DELETE FROM tasks WHERE id = 3")
        .await
        .is_err());
    assert_eq!(bin.sql("SELECT count(*) FROM tasks WHERE id = 3"), "1");
    // `trash init` puts the capture back in its ordinary mode.
    bin.init();
    p.proxy.catalogs.clear();
    let alice = bin.client(&p, "alice", "alice_pw").await;
    alice
        .simple_query("DELETE FROM tasks WHERE id = 3")
        .await
        .unwrap();
    assert_eq!(bin.kept(Some("tasks")).len(), 1);
    p.shutdown().await;
}

/// The kept id of the row of `table` whose column `id` is `id`.
fn kept_id(kept: &[serde_json::Value], table: &str, id: i64) -> String {
    kept.iter()
        .find(|k| k["table"] == table && k["row"]["id"] == id)
        .unwrap_or_else(|| panic!("no kept row {table} id={id} in {kept:?}"))["id"]
        .to_string()
}

/// Restoring children whose parent stays in the bin while another row took the parent's
/// key would put the real rows under the impostor (the foreign key is satisfied by it):
/// the restore is refused, naming the kept parent, and nothing is put back; restoring the
/// parent with them, once the impostor is gone, works.
#[tokio::test]
async fn restore_refuses_to_put_children_under_a_forged_parent() {
    let bin = Bin::new("trash_forged_table");
    bin.init();
    // Customer 5 goes, with its deals 4 and 204 and contact 5 (ON DELETE CASCADE).
    bin.sql("DELETE FROM customers WHERE id = 5");
    bin.sql("INSERT INTO customers (id, full_name) VALUES (5, 'Forged')");
    let kept = bin.kept(None);
    let customer = kept_id(&kept, "public.customers", 5);
    let deals = [
        kept_id(&kept, "public.deals", 4),
        kept_id(&kept, "public.deals", 204),
    ];
    let forged_children =
        "SELECT (SELECT count(*) FROM deals WHERE customer_id = 5) + (SELECT count(*) FROM contacts WHERE customer_id = 5)";
    let out = bin.pgveil(&["trash", "restore", "--table", "deals"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("nothing was restored"), "{err}");
    for deal in &deals {
        assert!(
            err.contains(&format!(
                "kept row {deal} of public.deals: its key (customer_id)=(5) belonged to kept row {customer} of public.customers"
            )),
            "{err}"
        );
    }
    assert!(err.contains("which is not in this restore"), "{err}");
    assert!(
        err.contains(&format!("Restore kept row {customer} too, or resolve the row now holding (id)=(5) in public.customers")),
        "{err}"
    );
    assert_eq!(bin.sql(forged_children), "0");
    assert_eq!(bin.kept(Some("deals")).len(), 2);
    // --skip-conflicts leaves them in the bin too (and the contact, restored alone).
    for table in ["deals", "contacts"] {
        let out = bin.pgveil(&["trash", "restore", "--table", table, "--skip-conflicts"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("restored 0 rows"), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("belonged to kept row"),
            "{}",
            stdout(&out)
        );
    }
    assert_eq!(bin.sql(forged_children), "0");
    assert_eq!(bin.kept(None).len(), 4);
    // Once the impostor is gone (kept in the bin in its turn), the real customer goes back
    // with its deals.
    bin.sql("DELETE FROM customers WHERE id = 5");
    let out = bin.pgveil(&[
        "trash", "restore", "--id", &customer, "--id", &deals[0], "--id", &deals[1],
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 3 rows"), "{}", stdout(&out));
    assert_eq!(
        bin.sql("SELECT full_name || ' ' || (SELECT count(*) FROM deals WHERE customer_id = 5) FROM customers WHERE id = 5"),
        "Customer 5 2"
    );
}

/// A full restore with --skip-conflicts: the parent whose key was taken is a conflict, so
/// its cascaded children stay in the bin with it instead of going under the impostor; the
/// unrelated rows are restored. Without --skip-conflicts nothing is.
#[tokio::test]
async fn restore_skip_conflicts_leaves_children_of_a_conflicting_parent_in_the_bin() {
    let bin = Bin::new("trash_forged_all");
    bin.init();
    let since =
        bin.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin
        .simple_query("DELETE FROM customers WHERE id = 5")
        .await
        .unwrap();
    // Unrelated: deal 9 (customer 10) and task 7.
    admin
        .simple_query("DELETE FROM deals WHERE id = 9")
        .await
        .unwrap();
    admin
        .simple_query("DELETE FROM tasks WHERE id = 7")
        .await
        .unwrap();
    p.shutdown().await;
    bin.sql("INSERT INTO customers (id, full_name) VALUES (5, 'Forged')");
    let kept = bin.kept(None);
    assert_eq!(kept.len(), 6, "{kept:?}");
    let customer = kept_id(&kept, "public.customers", 5);
    let deal = kept_id(&kept, "public.deals", 4);
    let contact = kept_id(&kept, "public.contacts", 5);
    let state = "SELECT (SELECT count(*) FROM deals WHERE customer_id = 5) || ' ' || \
                 (SELECT count(*) FROM contacts WHERE customer_id = 5) || ' ' || \
                 (SELECT count(*) FROM deals WHERE id = 9) || ' ' || \
                 (SELECT count(*) FROM tasks WHERE id = 7) || ' ' || \
                 (SELECT full_name FROM customers WHERE id = 5)";
    let out = bin.pgveil(&["trash", "restore", "--since", &since]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("Key (id)=(5) already exists"), "{err}");
    assert!(
        err.contains(&format!("kept row {deal} of public.deals: its key (customer_id)=(5) belonged to kept row {customer} of public.customers")),
        "{err}"
    );
    assert_eq!(bin.sql(state), "0 0 0 0 Forged");
    let out = bin.pgveil(&["trash", "restore", "--since", &since, "--skip-conflicts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("restored 2 rows"), "{text}");
    assert!(
        text.contains("public.deals: 1") && text.contains("public.tasks: 1"),
        "{text}"
    );
    for (row, table) in [(&deal, "deals"), (&contact, "contacts")] {
        assert!(
            text.contains(&format!(
                "skipped: kept row {row} of public.{table}: its key (customer_id)=(5) belonged to kept row {customer} of public.customers, deleted with it or after it, which is in this restore but could not be restored"
            )),
            "{text}"
        );
    }
    assert_eq!(bin.sql(state), "0 0 1 1 Forged");
    let mut left: Vec<String> = bin
        .kept(None)
        .iter()
        .map(|k| k["table"].as_str().unwrap().to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "public.contacts",
            "public.customers",
            "public.deals",
            "public.deals"
        ]
    );
}

/// What the check must not refuse: a parent restored with its children, and a child
/// whose key was held, before it, by an older row kept in the bin (deleted before the
/// child, so not its parent).
#[tokio::test]
async fn restore_puts_parents_and_children_back_and_ignores_older_rows_of_the_key() {
    let bin = Bin::new("trash_forged_legit");
    bin.init();
    let before = bin.sql("SELECT count(*) FROM deals WHERE customer_id = 7");
    bin.sql("DELETE FROM customers WHERE id = 7");
    let kept = bin.kept(None);
    let ids: Vec<String> = kept.iter().map(|k| k["id"].to_string()).collect();
    let mut args = vec!["trash", "restore"];
    for id in &ids {
        args.extend(["--id", id]);
    }
    let out = bin.pgveil(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 4 rows"), "{}", stdout(&out));
    assert_eq!(
        bin.sql("SELECT count(*) FROM deals WHERE customer_id = 7"),
        before
    );
    assert!(bin.kept(None).is_empty());
    // Customer 8 goes (with its deals); a new customer takes id 8 and has a deal, which is
    // deleted on its own later. The old customer 8 in the bin is not that deal's parent.
    bin.sql("DELETE FROM customers WHERE id = 8");
    bin.sql("INSERT INTO customers (id, full_name) VALUES (8, 'New 8')");
    bin.sql("INSERT INTO deals (id, customer_id, title, amount) VALUES (1000, 8, 'New deal', 10)");
    bin.sql("DELETE FROM deals WHERE id = 1000");
    let deal = kept_id(&bin.kept(None), "public.deals", 1000);
    let out = bin.pgveil(&["trash", "restore", "--id", &deal]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 1 rows"), "{}", stdout(&out));
    assert_eq!(
        bin.sql("SELECT c.full_name FROM deals d JOIN customers c ON c.id = d.customer_id WHERE d.id = 1000"),
        "New 8"
    );
}

/// Composite foreign keys, several foreign keys on one table, and grandchildren: a store
/// references a region by (country, code) and a customer by owner_id; shelves reference
/// stores.
#[tokio::test]
async fn restore_checks_composite_and_several_foreign_keys_down_to_grandchildren() {
    let bin = Bin::new("trash_forged_composite");
    std::fs::write(
        bin.rules.path().join("rules.toml"),
        format!(
            "{RULES}\n[[recycle]]\ntable = \"public.regions\"\n\n[[recycle]]\ntable = \"public.stores\"\n\n[[recycle]]\ntable = \"public.shelves\"\n"
        ),
    )
    .unwrap();
    bin.sql(
        "CREATE TABLE regions (country text, code text, name text, PRIMARY KEY (country, code)); \
         CREATE TABLE stores (id int PRIMARY KEY, country text NOT NULL, region text NOT NULL, \
             owner_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE, \
             FOREIGN KEY (country, region) REFERENCES regions (country, code) ON DELETE CASCADE); \
         CREATE TABLE shelves (id int PRIMARY KEY, store_id int NOT NULL REFERENCES stores (id) ON DELETE CASCADE); \
         INSERT INTO regions VALUES ('fr', 'idf', 'Ile-de-France'), ('fr', 'ara', 'Auvergne'); \
         INSERT INTO stores VALUES (1, 'fr', 'idf', 11), (2, 'fr', 'ara', 12), (3, 'fr', 'ara', 13); \
         INSERT INTO shelves VALUES (10, 1), (11, 1), (20, 2), (30, 3)",
    );
    bin.init();
    // The region goes with store 1 and its shelves; a new region takes its key.
    bin.sql("DELETE FROM regions WHERE code = 'idf'");
    bin.sql("INSERT INTO regions VALUES ('fr', 'idf', 'Forged')");
    // Customer 12 goes with store 2 and shelf 20; a new customer takes id 12.
    bin.sql("DELETE FROM customers WHERE id = 12");
    bin.sql("INSERT INTO customers (id, full_name) VALUES (12, 'Forged')");
    // Shelf 30 goes alone: restorable.
    bin.sql("DELETE FROM shelves WHERE id = 30");
    let kept = bin.kept(None);
    let region = kept
        .iter()
        .find(|k| k["table"] == "public.regions")
        .unwrap()["id"]
        .to_string();
    let store1 = kept_id(&kept, "public.stores", 1);
    let store2 = kept_id(&kept, "public.stores", 2);
    let customer = kept_id(&kept, "public.customers", 12);
    let out = bin.pgveil(&["trash", "restore", "--table", "stores"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("kept row {store1} of public.stores: its key (country, region)=(fr, idf) belonged to kept row {region} of public.regions")),
        "{err}"
    );
    assert!(
        err.contains("resolve the row now holding (country, code)=(fr, idf) in public.regions"),
        "{err}"
    );
    assert!(
        err.contains(&format!("kept row {store2} of public.stores: its key (owner_id)=(12) belonged to kept row {customer} of public.customers")),
        "{err}"
    );
    assert_eq!(bin.sql("SELECT count(*) FROM stores"), "1");
    // A restore of the stores and shelves: the stores stay in the bin, so their shelves
    // wait for a parent that does not come back; shelf 30 goes back.
    let out = bin.pgveil(&["trash", "restore", "--table", "stores", "--skip-conflicts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 0 rows"), "{}", stdout(&out));
    let out = bin.pgveil(&["trash", "restore", "--table", "shelves", "--skip-conflicts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored 1 rows"), "{}", stdout(&out));
    assert_eq!(
        bin.sql("SELECT string_agg(s.id || ':' || s.store_id, ',' ORDER BY s.id) FROM shelves s"),
        "30:3"
    );
    // With the forged store 1 too, shelves 10 and 11 would go under it: their kept parent
    // (store 1) conflicts, so they are refused as well.
    bin.sql("INSERT INTO stores VALUES (1, 'fr', 'ara', 13)");
    let out = bin.pgveil(&["trash", "restore", "--table", "shelves"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "its key (store_id)=(1) belonged to kept row {store1} of public.stores"
        )),
        "{err}"
    );
    assert_eq!(bin.sql("SELECT count(*) FROM shelves"), "1");
}

/// Who changes the capture directly on the server.
#[derive(Clone, Copy, PartialEq)]
enum Actor {
    /// crm_admin: owns the recycled tables and ran `trash init`, so it owns the bin and
    /// `pgveil_trash.capture()` too.
    Owner,
    Superuser,
}

/// One way of making the capture keep nothing while its triggers keep their names.
struct Tampering {
    db: &'static str,
    actor: Actor,
    sql: &'static str,
    /// What pgveil then refuses through a crm_admin session, and the rows it would remove.
    statement: &'static str,
    table: &'static str,
    rows: &'static str,
    /// What the refusal and `check` must name.
    problem: &'static str,
    /// Whether `trash init` must run as a superuser to repair it.
    repair_as_superuser: bool,
}

/// A recycled CRM database whose tables crm_admin owns and where crm_admin ran `trash
/// init` (the common setup: the bin and the capture function are then crm_admin's).
fn owned_bin(db: &str) -> Bin {
    let bin = Bin::new(db);
    bin.sql(&format!(
        "ALTER TABLE customers OWNER TO crm_admin; ALTER TABLE contacts OWNER TO crm_admin; \
         ALTER TABLE deals OWNER TO crm_admin; ALTER TABLE tasks OWNER TO crm_admin; \
         GRANT CREATE ON DATABASE {db} TO crm_admin; GRANT CREATE ON SCHEMA public TO crm_admin"
    ));
    bin.init_as_owner();
    bin
}

impl Bin {
    fn init_as_owner(&self) {
        let url = self.url_as("crm_admin", "admin_pw");
        let out = self.pgveil_at(&url, &["trash", "init", "--rules", &self.rules_dir()]);
        assert!(out.status.success(), "trash init: {}", stderr(&out));
    }

    fn owner_sql(&self, sql: &str) {
        let out = common::psql_cmd(&cluster().addr(), "crm_admin", "admin_pw", &self.db)
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", stderr(&out));
    }

    /// `pgveil check --upstream-url`'s output; it passes (a missing or altered capture is
    /// a warning, as before `trash init`).
    fn check(&self) -> String {
        let out = self.pgveil(&["check", "--rules", &self.rules_dir()]);
        assert!(
            out.status.success(),
            "check: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }
}

/// After `t.sql`, a DELETE (or TRUNCATE) of the recycled table through pgveil is refused
/// naming the problem, the rows are still there, and `check` names it; `trash init`
/// repairs the capture, and then the statement runs and its rows are in the bin.
async fn tampered_capture_is_refused_until_init(t: Tampering) {
    let bin = owned_bin(t.db);
    assert!(!bin.check().contains("warning"));
    match t.actor {
        Actor::Owner => bin.owner_sql(t.sql),
        Actor::Superuser => {
            bin.sql(t.sql);
        }
    }
    let count = format!("SELECT count(*) FROM {} WHERE {}", t.table, t.rows);
    let before = bin.sql(&count);
    assert_ne!(before, "0");
    // pgveil reads the catalog when it starts serving the database.
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    let err = admin
        .simple_query(t.statement)
        .await
        .expect_err(&format!("not refused after {}: {}", t.sql, t.statement));
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().code(), "42501", "{}", db.message());
    assert!(
        db.message()
            .contains("the recycle bin is not set up for this table")
            && db.message().contains(t.problem),
        "{}",
        db.message()
    );
    assert_eq!(bin.sql(&count), before, "rows gone after {}", t.sql);
    let out = bin.check();
    assert!(
        out.contains(&format!(
            "warning: the recycle bin is not set up for public.{}",
            t.table
        )) && out.contains(t.problem),
        "{out}"
    );
    // `trash init` puts the capture back.
    if t.repair_as_superuser {
        bin.init();
    } else {
        bin.init_as_owner();
    }
    assert!(!bin.check().contains("warning"));
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin.simple_query(t.statement).await.unwrap();
    assert_eq!(bin.sql(&count), "0");
    let kept = bin.kept(Some(t.table));
    assert_eq!(kept.len().to_string(), before, "{kept:?}");
    p.shutdown().await;
}

const DELETE_TWO: &str = "DELETE FROM customers WHERE id = 2";

#[tokio::test]
async fn a_capture_trigger_calling_another_function_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_function",
        actor: Actor::Owner,
        sql: "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$; \
              DROP TRIGGER pgveil_trash_delete ON customers; \
              CREATE TRIGGER pgveil_trash_delete AFTER DELETE ON customers \
              REFERENCING OLD TABLE AS pgveil_trash_old FOR EACH STATEMENT EXECUTE FUNCTION public.noop()",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "trigger pgveil_trash_delete on public.customers calls public.noop(), not pgveil_trash.capture()",
        repair_as_superuser: false,
    })
    .await;
}

#[tokio::test]
async fn a_capture_trigger_with_a_when_condition_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_when",
        actor: Actor::Owner,
        sql: "CREATE OR REPLACE TRIGGER pgveil_trash_delete AFTER DELETE ON customers \
              REFERENCING OLD TABLE AS pgveil_trash_old FOR EACH STATEMENT WHEN (false) \
              EXECUTE FUNCTION pgveil_trash.capture()",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "trigger pgveil_trash_delete on public.customers has a WHEN condition",
        repair_as_superuser: false,
    })
    .await;
}

#[tokio::test]
async fn a_capture_trigger_on_another_event_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_event",
        actor: Actor::Owner,
        sql: "CREATE OR REPLACE TRIGGER pgveil_trash_delete AFTER INSERT ON customers \
              FOR EACH STATEMENT EXECUTE FUNCTION pgveil_trash.capture()",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "trigger pgveil_trash_delete on public.customers fires AFTER INSERT FOR EACH STATEMENT, \
                  not AFTER DELETE FOR EACH STATEMENT as pgveil installs it",
        repair_as_superuser: false,
    })
    .await;
}

#[tokio::test]
async fn a_row_level_capture_trigger_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_level",
        actor: Actor::Owner,
        sql: "CREATE OR REPLACE TRIGGER pgveil_trash_delete AFTER DELETE ON customers \
              REFERENCING OLD TABLE AS pgveil_trash_old FOR EACH ROW \
              EXECUTE FUNCTION pgveil_trash.capture()",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "fires AFTER DELETE FOR EACH ROW, not AFTER DELETE FOR EACH STATEMENT",
        repair_as_superuser: false,
    })
    .await;
}

/// AFTER TRUNCATE, the capture would copy an empty table.
#[tokio::test]
async fn a_truncate_capture_moved_after_the_truncate_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_timing",
        actor: Actor::Owner,
        sql: "CREATE OR REPLACE TRIGGER pgveil_trash_truncate AFTER TRUNCATE ON tasks \
              FOR EACH STATEMENT EXECUTE FUNCTION pgveil_trash.capture()",
        statement: "TRUNCATE tasks",
        table: "tasks",
        rows: "true",
        problem: "trigger pgveil_trash_truncate on public.tasks fires AFTER TRUNCATE FOR EACH STATEMENT, \
                  not BEFORE TRUNCATE FOR EACH STATEMENT as pgveil installs it",
        repair_as_superuser: false,
    })
    .await;
}

/// Same language, SECURITY DEFINER and search_path: only the body tells.
#[tokio::test]
async fn a_replaced_capture_function_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_body",
        actor: Actor::Owner,
        sql: "CREATE OR REPLACE FUNCTION pgveil_trash.capture() RETURNS trigger LANGUAGE plpgsql \
              SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$BEGIN RETURN NULL; END$fn$",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "pgveil_trash.capture() was replaced: its body is not the one pgveil installs",
        repair_as_superuser: false,
    })
    .await;
}

#[tokio::test]
async fn a_capture_function_no_longer_security_definer_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_invoker",
        actor: Actor::Owner,
        sql: "ALTER FUNCTION pgveil_trash.capture() SECURITY INVOKER",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "pgveil_trash.capture() is not SECURITY DEFINER",
        repair_as_superuser: false,
    })
    .await;
}

#[tokio::test]
async fn a_capture_function_with_another_search_path_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_path",
        actor: Actor::Owner,
        sql: "ALTER FUNCTION pgveil_trash.capture() SET search_path = public, pg_catalog",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "pgveil_trash.capture() runs with settings \"search_path=public, pg_catalog\", \
                  not \"search_path=pg_catalog, pg_temp\"",
        repair_as_superuser: false,
    })
    .await;
}

/// Its new owner could replace it; `trash init` gives it back (as a superuser: the role
/// that ran it no longer owns the function).
#[tokio::test]
async fn a_capture_function_given_to_another_owner_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_owner",
        actor: Actor::Superuser,
        sql: "ALTER FUNCTION pgveil_trash.capture() OWNER TO alice",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "pgveil_trash.capture() is owned by alice, not by crm_admin, the owner of schema pgveil_trash",
        repair_as_superuser: true,
    })
    .await;
}

/// `CREATE OR REPLACE TRIGGER` cannot replace a constraint trigger: `trash init` drops it.
#[tokio::test]
async fn a_constraint_trigger_in_place_of_the_capture_is_refused() {
    tampered_capture_is_refused_until_init(Tampering {
        db: "tamper_constraint",
        actor: Actor::Superuser,
        sql: "DROP TRIGGER pgveil_trash_delete ON customers; \
              CREATE CONSTRAINT TRIGGER pgveil_trash_delete AFTER DELETE ON customers \
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pgveil_trash.capture()",
        statement: DELETE_TWO,
        table: "customers",
        rows: "id = 2",
        problem: "trigger pgveil_trash_delete on public.customers is a constraint trigger",
        repair_as_superuser: false,
    })
    .await;
}

/// Through pgveil, the same change is seen at once: the session that made it, and one
/// whose rules allow it every DELETE, reads the catalog again before its next statement.
#[tokio::test]
async fn a_capture_replaced_through_pgveil_is_refused_in_the_same_session() {
    let bin = owned_bin("tamper_through");
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    let other = bin.client(&p, "crm_admin", "admin_pw").await;
    admin.simple_query("SELECT 1").await.unwrap();
    admin
        .simple_query(
            "CREATE OR REPLACE FUNCTION pgveil_trash.capture() RETURNS trigger LANGUAGE plpgsql \
             SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$BEGIN RETURN NULL; END$fn$",
        )
        .await
        .unwrap();
    for session in [&admin, &other] {
        let err = session
            .simple_query(DELETE_TWO)
            .await
            .expect_err("a DELETE ran after the capture was replaced");
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(
            message.contains("pgveil_trash.capture() was replaced"),
            "{message}"
        );
    }
    assert_eq!(bin.sql("SELECT count(*) FROM customers WHERE id = 2"), "1");
    p.shutdown().await;
}

/// The bin's schema carries its version (pgveil_trash.meta); `trash init` installs the
/// current one, upgrades an older bin in place (its kept rows stay), and refuses a bin
/// set up by a newer pgveil; `check` says when an upgrade is due.
#[tokio::test]
async fn the_bin_schema_carries_a_version_and_upgrades_itself() {
    let bin = Bin::new("trash_version");
    bin.init();
    let version = || {
        bin.sql("SELECT value FROM pgveil_trash.meta WHERE key = 'schema_version'")
            .trim()
            .to_string()
    };
    assert_eq!(version(), pgveil::trash::SCHEMA_VERSION.to_string());
    let p = bin.proxy().await;
    let admin = bin.client(&p, "crm_admin", "admin_pw").await;
    admin
        .batch_execute("DELETE FROM contacts WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(bin.kept(Some("contacts")).len(), 1);
    // A bin from before versions: no meta table.
    bin.sql("DROP TABLE pgveil_trash.meta");
    let rules = bin.rules_dir();
    let out = bin.pgveil(&["check", "--rules", &rules]);
    assert!(
        stdout(&out).contains("the recycle bin's schema is version 1; run `pgveil trash init`"),
        "{}",
        stdout(&out)
    );
    let out = bin.pgveil(&["trash", "init", "--rules", &rules]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("recycle bin schema upgraded from version 1 to 2"),
        "{}",
        stdout(&out)
    );
    assert_eq!(version(), "2");
    assert_eq!(bin.kept(Some("contacts")).len(), 1, "kept rows survive");
    // A newer pgveil's bin is left alone.
    bin.sql("UPDATE pgveil_trash.meta SET value = '99' WHERE key = 'schema_version'");
    let out = bin.pgveil(&["trash", "init", "--rules", &rules]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("newer pgveil (schema version 99"),
        "{}",
        stderr(&out)
    );
    assert_eq!(version(), "99");
    let out = bin.pgveil(&["check", "--rules", &rules]);
    assert!(
        stdout(&out).contains("set up by a newer pgveil"),
        "{}",
        stdout(&out)
    );
}
