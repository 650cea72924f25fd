//! Masking that no SQL gets around (spec section 3). As `alice` (crm_support, masked) no
//! clear value, nor a distinctive part of one (the hidden middle digits of a phone, the
//! local part of an e-mail, the national ID, the card number), may reach the client,
//! whatever the statement's form, over the simple and the extended protocol, in text and
//! binary format. Statements that pgveil cannot prove safe are refused with 42501 and the
//! session stays usable. Exempt roles and unmasked columns see exactly what a direct
//! connection sees.

mod common;

use std::sync::OnceLock;

use common::keyed::{binary_copy_fields, copy_bytes};
use common::simple_rows;
use common::{output, psql_cmd, shared, stderr, stdout, PgCluster, TestProxy};

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

[[mask]]
column = "customers.national_id"
function = "redact"
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.card_number"
function = "tokenize"
key_env = "PGVEIL_TEST_TOKEN_KEY"
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.birth_date"
function = "date_trunc"
unit = "year"
unmasked_for = ["crm_admin"]

[[mask]]
column = "customers.balance"
function = "round"
step = 1000
unmasked_for = ["crm_admin"]

[[mask]]
column = "contacts.value"
function = "deny"
unmasked_for = ["crm_admin"]

[[mask]]
column = "leads.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]
"#;

/// The shared cluster plus objects an attacker might use: a view over the masked table
/// and a SECURITY DEFINER function that reads it.
fn cluster() -> &'static PgCluster {
    static SETUP: OnceLock<()> = OnceLock::new();
    let pg = shared();
    SETUP.get_or_init(|| {
        pg.psql_super(
            "crm",
            "CREATE VIEW customer_view AS SELECT * FROM customers; \
             GRANT SELECT ON customer_view TO crm_base; \
             CREATE FUNCTION leak() RETURNS SETOF text LANGUAGE sql SECURITY DEFINER AS 'SELECT phone FROM customers'; \
             CREATE SCHEMA other; CREATE TABLE other.customers (id int, phone text); \
             INSERT INTO other.customers VALUES (1, 'not-secret'); \
             GRANT USAGE ON SCHEMA other TO crm_base; GRANT SELECT ON other.customers TO crm_base; \
             CREATE VIEW customer_contact_view AS SELECT id, full_name, phone, email FROM customers; \
             CREATE VIEW nested_view (cid, mail) AS SELECT id, email FROM customer_contact_view WHERE id < 10; \
             CREATE MATERIALIZED VIEW customer_mv AS SELECT id, phone FROM customers; \
             GRANT SELECT ON customer_contact_view, nested_view, customer_mv TO crm_base; \
             CREATE TABLE leads (id int, region text, phone text) PARTITION BY LIST (region); \
             CREATE TABLE leads_eu PARTITION OF leads FOR VALUES IN ('eu'); \
             CREATE TABLE leads_asia (phone text, region text, id int); \
             ALTER TABLE leads ATTACH PARTITION leads_asia FOR VALUES IN ('asia'); \
             INSERT INTO leads VALUES (1, 'eu', '13955556666'), (2, 'asia', '13977778888'); \
             GRANT SELECT ON leads, leads_eu, leads_asia TO crm_base; \
             CREATE VIEW keyed_copy_view AS SELECT id, full_name, phone, email, national_id, card_number FROM customers; \
             GRANT SELECT ON keyed_copy_view TO crm_base; \
             CREATE VIEW keyed_view_2 AS SELECT * FROM keyed_copy_view WHERE id < 100; \
             CREATE VIEW keyed_view_3 AS SELECT id, card_number AS card, phone FROM keyed_view_2; \
             CREATE VIEW keyed_view_computed AS SELECT id, upper(card) AS card FROM keyed_view_3; \
             CREATE VIEW keyed_view_sorted AS SELECT id, card FROM keyed_view_3 ORDER BY card; \
             CREATE VIEW keyed_view_filtered AS SELECT id, card FROM keyed_view_3 WHERE card LIKE '4%'; \
             CREATE VIEW keyed_view_distinct AS SELECT DISTINCT card FROM keyed_view_3; \
             GRANT SELECT ON keyed_view_2, keyed_view_3, keyed_view_computed, keyed_view_sorted, \
               keyed_view_filtered, keyed_view_distinct TO crm_base; \
             ANALYZE customers",
        );
    });
    pg
}

async fn proxy() -> (TestProxy, tempfile::TempDir) {
    common::keyed::set_test_key();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(cluster(), move |s| s.rules = Some(path)).await;
    (p, dir)
}

/// Distinctive fragments of every masked value, read directly as the superuser.
fn secrets() -> &'static Vec<String> {
    static SECRETS: OnceLock<Vec<String>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let rows = cluster().psql_super(
            "crm",
            "SELECT substr(phone, 1, 7), split_part(email, '@', 1), national_id, card_number FROM customers",
        );
        let mut out: Vec<String> = rows
            .lines()
            .flat_map(|l| l.split('|').map(str::to_string).collect::<Vec<_>>())
            .filter(|s| s.len() >= 4)
            .collect();
        out.extend(
            cluster()
                .psql_super("crm", "SELECT value FROM contacts")
                .lines()
                .map(str::to_string),
        );
        out.extend(
            cluster()
                .psql_super("crm", "SELECT substr(phone, 1, 7) FROM leads")
                .lines()
                .map(str::to_string),
        );
        out
    })
}

fn assert_no_secret(text: &str, context: &str) {
    for s in secrets() {
        assert!(
            !text.contains(s.as_str()),
            "{context}: clear value fragment {s:?} leaked in {text:?}"
        );
    }
}

#[tokio::test]
async fn masked_role_gets_masked_values_in_text() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let rows = simple_rows(&alice, "SELECT * FROM customers ORDER BY id LIMIT 20")
        .await
        .unwrap();
    assert_no_secret(&rows, "SELECT *");
    let first: Vec<&str> = rows.lines().next().unwrap().split('|').collect();
    // id | full_name | phone | email | national_id | card_number | birth_date | balance | created_at
    assert_eq!(first[0], "1");
    assert_eq!(first[1], "Customer 1");
    assert_eq!(first[2], "139****7919");
    assert_eq!(first[3], "u***@example.com");
    assert_eq!(first[4], "****");
    assert!(first[5].starts_with("tok_"), "{}", first[5]);
    assert_eq!(first[6], "1960-01-01");
    assert_eq!(first[7], "0");
    // Bare references, aliases, qualified names and joins are masked in flight too.
    for sql in [
        "SELECT phone, email FROM customers WHERE id = 1",
        "SELECT c.phone AS p, c.email AS e FROM customers c JOIN deals d ON d.customer_id = c.id WHERE c.id = 1 LIMIT 1",
        "SELECT public.customers.phone, customers.email FROM customers WHERE id = 1",
        "SELECT t.* FROM customers t WHERE id = 1",
        "SELECT \"phone\", EMAIL FROM PUBLIC.\"customers\" WHERE id = 1",
    ] {
        let rows = simple_rows(&alice, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(rows.contains("139****7919"), "{sql}: {rows}");
        assert!(rows.contains("u***@example.com"), "{sql}: {rows}");
        assert_no_secret(&rows, sql);
    }
}

#[tokio::test]
async fn masked_role_gets_masked_values_in_binary() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let stmt = alice
        .prepare("SELECT phone, email, national_id, card_number, birth_date, balance FROM customers WHERE id = $1")
        .await
        .unwrap();
    let row = alice.query_one(&stmt, &[&1i64]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "139****7919");
    assert_eq!(row.get::<_, String>(1), "u***@example.com");
    assert_eq!(row.get::<_, String>(2), "****");
    let token: String = row.get(3);
    assert!(token.starts_with("tok_"));
    assert_eq!(
        row.get::<_, RawDate>(4).0,
        pgveil::policy::pgtypes::days_from_civil(1960, 1, 1) as i32
    );
    assert_eq!(row.get::<_, RawNumeric>(5).0, "0");
    // The token decodes to the clear card number for someone who holds the key.
    let clear = cluster().psql_super("crm", "SELECT card_number FROM customers WHERE id = 1");
    let decoded =
        pgveil::policy::mask::decode_token(common::keyed::TEST_KEY.as_bytes(), &token).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), clear);
    let all = alice.query("SELECT * FROM customers", &[]).await.unwrap();
    assert_eq!(all.len(), 200);
    for r in &all {
        let phone: String = r.get(2);
        assert!(
            phone.starts_with("139") && &phone[3..7] == "****",
            "{phone}"
        );
    }
}

struct RawDate(i32);
impl<'a> tokio_postgres::types::FromSql<'a> for RawDate {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawDate(i32::from_be_bytes(raw.try_into()?)))
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::DATE
    }
}

struct RawNumeric(String);
impl<'a> tokio_postgres::types::FromSql<'a> for RawNumeric {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawNumeric(
            pgveil::policy::pgtypes::numeric_from_binary(raw).ok_or("bad numeric")?,
        ))
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::NUMERIC
    }
}

fn is_refusal(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.code().code() == "42501" && d.message().starts_with("pgveil:"))
}

/// Forms that cannot be computed on masked values: refused.
const REFUSED: &[&str] = &[
    "SELECT json_agg(c) FROM customers c",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT row_to_json(c.*) FROM customers c",
    "SELECT c FROM customers c",
    "SELECT customers FROM customers",
    "SELECT (c).phone FROM customers c",
    "SELECT phone(c) FROM customers c",
    "SELECT c::text FROM customers c",
    "SELECT upper((c.*)::text) FROM customers c",
    "SELECT length((c.*)::text) FROM customers c",
    "SELECT (public.customers.*)::text FROM customers",
    "SELECT md5((customers.*)::text) FROM customers",
    "SELECT s FROM (SELECT * FROM customers) s",
    "WITH x AS (SELECT * FROM customers) SELECT x FROM x",
    "SELECT a.id FROM customers a JOIN customers b USING (phone)",
    "SELECT * FROM customers NATURAL JOIN customers",
    "SELECT x FROM customers AS c(a, b, x)",
    // (`COPY customers TO STDOUT`, keyed column and all, is masked in flight now: see
    // `keyed_masks_apply_to_copy_to_stdout`.)
    "UPDATE customers SET full_name = full_name WHERE id = 1 RETURNING customers",
    "SELECT query_to_xml('select phone from customers', true, true, '')",
    // ts_rewrite runs its second argument as a query.
    "SELECT ts_rewrite('x'::tsquery, 'SELECT ''x''::tsquery, string_agg(phone, '' | '')::tsquery FROM customers')",
    "SELECT * FROM pg_stats WHERE tablename = 'customers'",
    "SELECT most_common_vals::text FROM pg_catalog.pg_stats",
    "SELECT phone FROM customer_mv",
    "SELECT leak()",
    "SELECT * FROM leak()",
    "SELECT public.leak()",
    "SELECT value FROM contacts",
    "SELECT * FROM contacts",
    "SELECT upper(value) FROM contacts",
    "SELECT set_config('search_path', 'other', false)",
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT phone FROM customers LIMIT 1); END $$",
    "SELECT xmlagg(xmlelement(name p, phone)) FROM customers",
    // Keyed masks exist only in flight: their columns may only be returned as they are.
    "SELECT upper(card_number) FROM customers",
    "SELECT id FROM customers WHERE card_number LIKE '4111%'",
    "SELECT DISTINCT card_number FROM customers",
    "SELECT card_number FROM customers ORDER BY 1",
    "SELECT * FROM customers ORDER BY 3",
    "SELECT 1; SELECT upper(card_number) FROM customers",
    // A whole row of a table with a keyed mask, built by ROW() or in an ARRAY subquery.
    "SELECT ROW(c.*) FROM customers c",
    "SELECT ARRAY(SELECT c FROM customers c)",
    // A CTE is only in scope where PostgreSQL sees it: these name the real relations.
    "SELECT most_common_vals::text FROM pg_stats WHERE EXISTS (WITH pg_stats AS (SELECT 1) SELECT 1 FROM pg_stats)",
    // An alias reused for another table at another level still names the masked one here.
    "SELECT row_to_json(t) FROM customers t WHERE EXISTS (SELECT 1 FROM deals t)",
    // A whole row of an INSERT's target in RETURNING.
    "INSERT INTO customers (id, full_name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET full_name = customers.full_name RETURNING customers",
];

/// Forms that run, computed on masked values by the server.
const REWRITTEN: &[&str] = &[
    "SELECT upper(phone) FROM customers",
    "SELECT phone || '' FROM customers",
    "SELECT substr(phone, 4, 4) FROM customers",
    "SELECT CAST(phone AS text) FROM customers",
    "SELECT string_agg(phone, ',') FROM customers",
    "SELECT id, phone FROM customers WHERE phone LIKE '1391%'",
    "SELECT id, email FROM customers WHERE email = 'user1@example.com'",
    "SELECT id, phone FROM customers ORDER BY phone",
    "SELECT phone AS p FROM customers ORDER BY p",
    "SELECT phone FROM customers ORDER BY 1",
    "SELECT DISTINCT phone FROM customers",
    "SELECT national_id, count(*) FROM customers GROUP BY national_id",
    "SELECT phone FROM customers UNION SELECT 'x'",
    "SELECT * FROM (SELECT phone FROM customers) s",
    "WITH x AS (SELECT phone, email FROM customers) SELECT * FROM x",
    "SELECT (SELECT phone FROM customers LIMIT 1)",
    "SELECT x FROM customers c, LATERAL (SELECT c.phone AS x) l",
    "SELECT id FROM customers c WHERE EXISTS (SELECT 1 WHERE c.phone LIKE '1391%')",
    "SELECT jsonb_build_object('p', phone, 'e', email) FROM customers",
    "SELECT ARRAY[phone, email, national_id] FROM customers",
    "SELECT phone COLLATE \"C\" FROM customers",
    "SELECT balance * 1, birth_date + 1 FROM customers",
    "SELECT sum(balance), min(birth_date), max(email) FROM customers",
    "SELECT 1; SELECT upper(phone) FROM customers",
    "SELECT id FROM customers LIMIT 1 OFFSET (SELECT length(phone) FROM customers LIMIT 1)",
    "UPDATE customers SET full_name = full_name WHERE id = 1 RETURNING phone, email",
    "SELECT ARRAY(SELECT phone FROM customers)",
    "SELECT ARRAY(SELECT email FROM customers WHERE phone LIKE '1391%')",
    "SELECT ROW(phone, email, national_id) FROM customers",
    // A CTE named like a masked table, elsewhere in the statement or defined over it.
    "SELECT phone, email FROM customers WHERE EXISTS (WITH customers AS (SELECT 1) SELECT 1 FROM customers)",
    "WITH customers AS (SELECT id, phone, email FROM customers) SELECT phone, upper(email) FROM customers",
    "WITH a AS (SELECT 1 AS phone), customers AS (SELECT phone FROM customers) SELECT * FROM customers",
    // An alias reused for another table in a subquery.
    "SELECT c.phone, upper(c.email) FROM customers c WHERE EXISTS (SELECT 1 FROM deals c)",
    "SELECT (SELECT c.phone FROM customers c LIMIT 1) FROM deals c",
    // Unicode-escaped names are the columns they spell.
    r#"SELECT U&"\0070hone", upper(U&"!0065mail" UESCAPE '!') FROM customers"#,
    // RETURNING of an INSERT that updates on conflict.
    "INSERT INTO customers (id, full_name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET full_name = customers.full_name RETURNING upper(phone), email, national_id",
    "INSERT INTO customers AS c (id, full_name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET full_name = c.full_name WHERE excluded.full_name <> '' RETURNING c.phone || '', c.email",
    // A qualifier named excluded outside ON CONFLICT is no proposed row.
    "SELECT upper(excluded.phone) FROM (SELECT phone FROM customers) excluded",
    "SELECT excluded.phone || '' FROM customers c, LATERAL (SELECT c.phone) excluded",
];

#[tokio::test]
async fn refused_forms_over_the_simple_protocol() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in REFUSED {
        match simple_rows(&alice, sql).await {
            Ok(rows) => panic!("{sql} ran and returned {rows:?}"),
            Err(e) => assert!(
                is_refusal(&e),
                "{sql}: expected a pgveil refusal, got {e:?}"
            ),
        }
        // The session stays usable after each refusal.
        assert_eq!(
            simple_rows(&alice, "SELECT 1").await.unwrap(),
            "1|\n",
            "after {sql}"
        );
    }
}

#[tokio::test]
async fn refused_forms_over_the_extended_protocol() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in REFUSED.iter().filter(|s| !s.contains("; ")) {
        let err = alice.query(*sql, &[]).await.expect_err(sql);
        assert!(
            is_refusal(&err),
            "{sql}: expected a pgveil refusal, got {err:?}"
        );
        let row = alice.query_one("SELECT 2::int", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2, "after {sql}");
    }
}

#[tokio::test]
async fn rewritten_forms_compute_on_masked_values() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in REWRITTEN {
        let rows = simple_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_no_secret(&rows, sql);
    }
    for sql in REWRITTEN.iter().filter(|s| !s.contains("; ")) {
        let rows = alice.simple_query(sql).await.map(|_| ());
        assert!(rows.is_ok(), "{sql}");
        // Extended protocol and binary results: same rewrite on Parse.
        let stmt = alice
            .prepare(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert!(alice.query(&stmt, &[]).await.is_ok(), "{sql}");
        // Every column's raw bytes (a Row's Debug shows no values).
        let text = extended_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_no_secret(&text, sql);
    }
    // Predicates compare masked values: a search by clear prefix finds nothing ...
    assert_eq!(
        simple_rows(
            &alice,
            "SELECT count(*) FROM customers WHERE phone LIKE '1391%'"
        )
        .await
        .unwrap(),
        "0|\n"
    );
    // ... while the masked form matches every row.
    assert_eq!(
        simple_rows(
            &alice,
            "SELECT count(*) FROM customers WHERE phone LIKE '139****%'"
        )
        .await
        .unwrap(),
        "200|\n"
    );
    assert_eq!(
        simple_rows(&alice, "SELECT upper(email) FROM customers WHERE id = 1")
            .await
            .unwrap(),
        "U***@EXAMPLE.COM|\n"
    );
    assert_eq!(
        simple_rows(&alice, "SELECT balance + 1 FROM customers WHERE id = 16")
            .await
            .unwrap(),
        "1001|\n"
    );
    // A cast that cannot apply to the masked value fails on the server: safe.
    let e = simple_rows(&alice, "SELECT phone::bigint FROM customers")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22P02", "{e:?}");
}

#[tokio::test]
async fn partitions_and_children_inherit_their_parents_masks() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for (sql, want) in [
        (
            "SELECT phone FROM leads ORDER BY id",
            "139****6666|\n139****8888|\n",
        ),
        ("SELECT phone FROM leads_eu", "139****6666|\n"),
        // A partition whose columns are in another order (other attribute numbers).
        ("SELECT phone FROM leads_asia", "139****8888|\n"),
        ("SELECT * FROM leads_asia", "139****8888|asia|2|\n"),
        ("SELECT upper(phone) FROM leads_asia", "139****8888|\n"),
    ] {
        let rows = simple_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(rows, want, "{sql}");
    }
    let row = alice
        .query_one("SELECT phone FROM leads_asia", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "139****8888");
}

#[tokio::test]
async fn rules_reload_reaches_running_sessions() {
    let (p, dir) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let admin = p.connect("crm_admin", "admin_pw").await;
    let q = "SELECT full_name FROM customers WHERE id = 1";
    // Prepared before the reload: it must not run unmasked after it.
    let stmt = alice
        .prepare("SELECT upper(full_name) FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(simple_rows(&alice, q).await.unwrap(), "Customer 1|\n");
    let extra = "\n[[mask]]\ncolumn = \"customers.full_name\"\nfunction = \"redact\"\nunmasked_for = [\"crm_admin\"]\n";
    std::fs::write(dir.path().join("rules.toml"), format!("{RULES}{extra}")).unwrap();
    p.proxy.reload_rules().unwrap();
    // The session whose masks changed is ended at its next statement ...
    let e = alice
        .query(&stmt, &[])
        .await
        .expect_err("old plans must not run");
    assert!(format!("{e:?}").contains("rules changed"), "{e:?}");
    // ... a new one gets the new mask, in flight and in SQL ...
    let alice = p.connect("alice", "alice_pw").await;
    assert_eq!(simple_rows(&alice, q).await.unwrap(), "****|\n");
    assert_eq!(
        simple_rows(
            &alice,
            "SELECT upper(full_name) FROM customers WHERE id = 1"
        )
        .await
        .unwrap(),
        "****|\n"
    );
    // ... and a session the reload does not concern goes on.
    assert_eq!(simple_rows(&admin, q).await.unwrap(), "Customer 1|\n");
}

#[tokio::test]
async fn first_masks_end_sessions_that_cannot_apply_them() {
    common::keyed::set_test_key();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), "").unwrap();
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(cluster(), move |s| s.rules = Some(path)).await;
    let (alice, conn) = tokio_postgres::connect(
        &p.conn_str("alice", "alice_pw", "crm"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    assert!(
        simple_rows(&alice, "SELECT phone FROM customers WHERE id = 1")
            .await
            .unwrap()
            .starts_with("13910007919")
    );
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    p.proxy.reload_rules().unwrap();
    // No catalog was ever loaded for this session: it is closed rather than left unmasked.
    let r = simple_rows(&alice, "SELECT phone FROM customers WHERE id = 1").await;
    let e = r.expect_err("the session must not run unmasked");
    assert!(format!("{e:?}").contains("rules changed"), "{e:?}");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn)
        .await
        .expect("the session ends");
    let alice = p.connect("alice", "alice_pw").await;
    assert_eq!(
        simple_rows(&alice, "SELECT phone FROM customers WHERE id = 1")
            .await
            .unwrap(),
        "139****7919|\n"
    );
}

#[tokio::test]
async fn server_errors_do_not_carry_clear_rows() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    // A NOT NULL or CHECK violation makes the server print the whole failing row in
    // DETAIL; a unique violation prints the key. None of it may reach a masked role.
    for sql in [
        "UPDATE customers SET full_name = NULL WHERE id = 1",
        "UPDATE customers SET id = 2 WHERE id = 1",
    ] {
        let e = alice.simple_query(sql).await.expect_err(sql);
        let db = e.as_db_error().expect("a server error");
        assert!(db.detail().is_none(), "{sql}: DETAIL {:?}", db.detail());
        assert_no_secret(&format!("{db:?}"), sql);
        let e = alice.query(sql, &[]).await.expect_err(sql);
        assert_no_secret(&format!("{:?}", e.as_db_error()), sql);
    }
    // Exempt roles keep the server's full error.
    let admin = p.connect("crm_admin", "admin_pw").await;
    let e = admin
        .simple_query("UPDATE customers SET full_name = NULL WHERE id = 1")
        .await
        .unwrap_err();
    assert!(e.as_db_error().unwrap().detail().is_some());
}

#[tokio::test]
async fn views_over_masked_tables_are_inlined_and_masked() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let rows = simple_rows(&alice, "SELECT * FROM customer_contact_view WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(rows, "1|Customer 1|139****7919|u***@example.com|\n");
    let rows = simple_rows(
        &alice,
        "SELECT v.phone FROM customer_contact_view v ORDER BY v.id LIMIT 1",
    )
    .await
    .unwrap();
    assert_eq!(rows, "139****7919|\n");
    let rows = simple_rows(&alice, "SELECT upper(mail) FROM nested_view WHERE cid = 1")
        .await
        .unwrap();
    assert_eq!(rows, "U***@EXAMPLE.COM|\n");
    let rows = simple_rows(
        &alice,
        "SELECT count(*) FROM customer_contact_view WHERE phone LIKE '1391%'",
    )
    .await
    .unwrap();
    assert_eq!(rows, "0|\n");
    let all = simple_rows(&alice, "SELECT * FROM public.customer_contact_view")
        .await
        .unwrap();
    assert_eq!(all.lines().count(), 200);
    assert_no_secret(&all, "view");
    // The exempt role reads the view as it is.
    let admin = p.connect("crm_admin", "admin_pw").await;
    let rows = simple_rows(
        &admin,
        "SELECT phone FROM customer_contact_view WHERE id = 1",
    )
    .await
    .unwrap();
    assert_eq!(rows, "13910007919|\n");
}

#[tokio::test]
async fn copy_cursors_prepare_and_ctas_see_masked_values() {
    use futures_util::TryStreamExt;
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let stream = alice
        .copy_out("COPY (SELECT id, phone, email FROM customers ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert_eq!(text.lines().count(), 200);
    assert!(
        text.starts_with("1\t139****7919\tu***@example.com\n"),
        "{text:.80}"
    );
    assert_no_secret(&text, "COPY (SELECT ...) TO STDOUT");
    // COPY of the table itself is expanded to its columns and masked the same way.
    let stream = alice
        .copy_out("COPY customers (id, phone, email, national_id, balance) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert_eq!(text.lines().count(), 200);
    assert!(
        text.lines()
            .any(|l| l == "1\t139****7919\tu***@example.com\t****\t0"),
        "{text:.120}"
    );
    assert_no_secret(&text, "COPY customers TO STDOUT");
    for (setup, read) in [
        (
            "PREPARE p AS SELECT phone, email FROM customers",
            "EXECUTE p",
        ),
        (
            "CREATE TEMP TABLE stolen AS SELECT phone, email FROM customers",
            "SELECT * FROM stolen",
        ),
        (
            "SELECT phone, email INTO TEMP stolen2 FROM customers",
            "SELECT * FROM stolen2",
        ),
        (
            "BEGIN; DECLARE cur CURSOR FOR SELECT phone, email FROM customers",
            "FETCH 50 FROM cur",
        ),
    ] {
        alice
            .batch_execute(setup)
            .await
            .unwrap_or_else(|e| panic!("{setup}: {e:?}"));
        let rows = simple_rows(&alice, read)
            .await
            .unwrap_or_else(|e| panic!("{read}: {e:?}"));
        assert!(rows.contains("139****"), "{read}: {rows}");
        assert_no_secret(&rows, read);
    }
    alice.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn search_path_games_do_not_unmask() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    // Whatever schema `customers` resolves to, the masked table's columns stay masked:
    // here the server reads other.customers, and pgveil masks it as if it were the masked
    // table (over-masking, never under-masking).
    alice
        .batch_execute("SET search_path = other, public")
        .await
        .unwrap();
    let rows = simple_rows(&alice, "SELECT upper(phone) FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(rows, "NOT***CRET|\n");
    let e = simple_rows(&alice, "SELECT upper(card_number) FROM customers")
        .await
        .unwrap_err();
    assert!(is_refusal(&e), "{e:?}");
    // A function that shadows a built-in earlier in search_path never sees a clear value:
    // the masks call pg_catalog's functions by their qualified names.
    cluster().psql_super(
        "crm",
        "CREATE OR REPLACE FUNCTION other.left(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1'; \
         GRANT EXECUTE ON FUNCTION other.left(text, integer) TO PUBLIC",
    );
    alice
        .batch_execute("SET search_path = other, public, pg_catalog")
        .await
        .unwrap();
    let rows = simple_rows(
        &alice,
        "SELECT upper(phone) FROM public.customers WHERE id = 1",
    )
    .await
    .unwrap();
    assert_eq!(rows, "139****7919|\n");
    alice
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    let rows = simple_rows(&alice, "SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(rows, "139****7919|\n");
    // SET ROLE to an exempt role is not possible for alice, and never widens what the
    // login identity sees.
    assert!(alice.batch_execute("SET ROLE crm_admin").await.is_err());
}

/// A relation the session creates is its own only once the server created it, and never
/// when its name could mean a masked relation.
#[tokio::test]
async fn relations_the_session_creates_do_not_shadow_masked_ones() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    // The server refuses this CREATE (the name is taken): public.customers stays masked.
    alice
        .batch_execute("CREATE TABLE customers (id int, phone text)")
        .await
        .unwrap_err();
    let rows = simple_rows(
        &alice,
        "SELECT phone, upper(email) FROM customers WHERE id = 1",
    )
    .await
    .unwrap();
    assert_no_secret(&rows, "after a refused CREATE TABLE");
    assert_eq!(rows, "139****7919|U***@EXAMPLE.COM|\n");
    // A temporary table of the same name exists, but a search path that names pg_temp
    // after public reads public.customers again.
    alice
        .batch_execute("CREATE TEMP TABLE customers (id int, phone text, email text)")
        .await
        .unwrap();
    alice
        .batch_execute("SET search_path = public, pg_temp")
        .await
        .unwrap();
    for sql in [
        "SELECT phone, upper(email) FROM customers WHERE id = 1",
        "SELECT id, phone FROM customers WHERE id = 1",
    ] {
        let rows = simple_rows(&alice, sql).await.unwrap();
        assert_no_secret(&rows, sql);
        assert!(rows.contains("139****7919"), "{sql}: {rows}");
    }
    // With the default path the session reads its own (empty) table, masked by name.
    alice.batch_execute("RESET search_path").await.unwrap();
    let rows = simple_rows(&alice, "SELECT phone FROM customers")
        .await
        .unwrap();
    assert_eq!(rows, "");
    // A table of a new name, created in a query string that fails, is not the
    // session's: reading the name is refused as unknown rather than trusted.
    alice
        .batch_execute("CREATE TEMP TABLE scratch (a int); SELECT 1/0")
        .await
        .unwrap_err();
    let e = simple_rows(&alice, "SELECT * FROM scratch")
        .await
        .unwrap_err();
    assert!(is_refusal(&e), "{e:?}");
    alice
        .batch_execute("CREATE TEMP TABLE scratch (a int)")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&alice, "SELECT * FROM scratch").await.unwrap(),
        ""
    );
}

/// In SJIS the bytes C3 81 5C are two characters, the backslash part of the second: what
/// reads as one string literal in UTF-8 is, for the server, a literal and then a column.
#[tokio::test]
async fn text_in_another_client_encoding_is_refused_not_misread() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let attack = "SELECT E'\u{c1}\\' , upper(phone) FROM customers --'";
    alice
        .batch_execute("SET client_encoding = 'SJIS'")
        .await
        .unwrap();
    let e = simple_rows(&alice, attack).await.unwrap_err();
    assert!(is_refusal(&e), "{e:?}");
    // ASCII text reads alike in every client encoding: it is analysed as usual.
    let rows = simple_rows(&alice, "SELECT upper(phone) FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(rows, "139****7919|\n");
}

/// What drivers send on their own: MOVE (psycopg2's scroll, asyncpg's forward), FETCH
/// without FROM, and catalog helpers of information_schema (JDBC's metadata calls). They
/// run for a masked role, and what they return is masked.
#[tokio::test]
async fn cursor_moves_and_catalog_helpers_run_masked() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    alice
        .batch_execute(
            "BEGIN; DECLARE c SCROLL CURSOR FOR SELECT id, phone FROM customers ORDER BY id",
        )
        .await
        .unwrap();
    let rows = simple_rows(&alice, "FETCH 2 c").await.unwrap();
    assert_eq!(rows.lines().count(), 2, "{rows}");
    assert_no_secret(&rows, "FETCH 2 c");
    for sql in [
        "MOVE ABSOLUTE 5 FROM \"c\"",
        "MOVE FORWARD 2 IN c",
        "MOVE c",
        "MOVE BACKWARD ALL c",
    ] {
        alice
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let rows = simple_rows(&alice, "FETCH NEXT c").await.unwrap();
    assert!(rows.starts_with("1|139****"), "{rows}");
    alice.batch_execute("COMMIT").await.unwrap();
    // A function PostgreSQL ships in information_schema is built in ...
    let rows = simple_rows(
        &alice,
        "SELECT (information_schema._pg_expandarray(ARRAY[10, 20])).n",
    )
    .await
    .unwrap();
    assert_eq!(rows, "1|\n2|\n");
    // ... one a superuser put there and gave away is not.
    cluster().psql_super(
        "crm",
        "CREATE OR REPLACE FUNCTION information_schema.peek() RETURNS text LANGUAGE sql AS 'SELECT phone FROM public.customers LIMIT 1'; \
         ALTER FUNCTION information_schema.peek() OWNER TO crm_admin; \
         GRANT EXECUTE ON FUNCTION information_schema.peek() TO PUBLIC",
    );
    let p2 = proxy().await;
    let alice = p2.0.connect("alice", "alice_pw").await;
    let e = simple_rows(&alice, "SELECT information_schema.peek()")
        .await
        .unwrap_err();
    assert!(is_refusal(&e), "{e:?}");
}

/// The tags of a raw session's replies up to ReadyForQuery (or a FATAL error), and the
/// text of its DataRows and errors.
async fn reply(s: &mut tokio::net::TcpStream) -> (Vec<u8>, String) {
    let mut tags = Vec::new();
    let mut data = String::new();
    while let Some((tag, body)) = common::read_message(s).await {
        tags.push(tag);
        if tag == b'D' || tag == b'E' {
            data.push_str(&String::from_utf8_lossy(&body));
        }
        if tag == b'Z' || tag == b'E' && body.starts_with(b"SFATAL") {
            break;
        }
    }
    (tags, data)
}

/// pgjdbc from a statement's sixth execution on: Bind and Execute of a server-prepared
/// statement with no Describe, its columns known from the first portal's description.
/// The rows come back masked instead of ending the session.
#[tokio::test]
async fn later_portals_of_a_described_statement_need_no_describe() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    let (p, _d) = proxy().await;
    cluster().psql_super("crm", "GRANT SELECT ON customers TO trust_user");
    let mut s = common::raw_session(&p.addr_string(), "trust_user", "crm").await;
    let sync = write::frame(b'S', |_| {});
    let describe_portal = write::frame(b'D', |b| b.extend_from_slice(b"P\0"));
    let mut batch = Vec::new();
    batch.extend_from_slice(
        write::parse(
            "S_1",
            "SELECT id, phone FROM customers WHERE id <= 2 ORDER BY id",
        )
        .raw(),
    );
    batch.extend_from_slice(write::bind("", "S_1").raw());
    batch.extend_from_slice(describe_portal.raw());
    batch.extend_from_slice(write::execute("").raw());
    batch.extend_from_slice(sync.raw());
    s.write_all(&batch).await.unwrap();
    let (tags, data) = reply(&mut s).await;
    assert_eq!(tags, b"12TDDCZ");
    assert_no_secret(&data, "described portal");
    for _ in 0..3 {
        let mut batch = Vec::new();
        batch.extend_from_slice(write::bind("", "S_1").raw());
        batch.extend_from_slice(write::execute("").raw());
        batch.extend_from_slice(sync.raw());
        s.write_all(&batch).await.unwrap();
        let (tags, data) = reply(&mut s).await;
        assert_eq!(tags, b"2DDCZ", "{data}");
        assert!(data.contains("139****"), "{data}");
        assert_no_secret(&data, "portal without Describe");
    }
}

/// A client that never describes (Parse, Bind, Execute, Sync: rows it decodes from its own
/// knowledge) gets its rows masked, in text and binary format, a named portal fetched in
/// parts included, and the session goes on: pgveil describes the portal itself and keeps
/// the answer to itself.
#[tokio::test]
async fn statements_no_one_described_are_described_by_pgveil_unseen() {
    use pgveil::protocol::write;
    use tokio::io::AsyncWriteExt;
    let (p, _d) = proxy().await;
    cluster().psql_super("crm", "GRANT SELECT ON customers TO trust_user");
    let mut s = common::raw_session(&p.addr_string(), "trust_user", "crm").await;
    let sql = "SELECT id, phone FROM customers WHERE id <= 3 ORDER BY id";
    // Unnamed statement and portal, text results.
    let mut batch = Vec::new();
    batch.extend_from_slice(write::parse("", sql).raw());
    batch.extend_from_slice(write::bind("", "").raw());
    batch.extend_from_slice(write::execute("").raw());
    batch.extend_from_slice(write::frame(b'S', |_| {}).raw());
    s.write_all(&batch).await.unwrap();
    let (tags, data) = reply(&mut s).await;
    assert_eq!(tags, b"12DDDCZ", "{data}");
    assert!(data.contains("139****"), "{data}");
    assert_no_secret(&data, "never described");
    // A named statement, a named portal with binary results, fetched two rows at a time.
    let mut batch = Vec::new();
    batch.extend_from_slice(write::parse("S_9", sql).raw());
    batch.extend_from_slice(
        write::frame(b'B', |b| {
            b.extend_from_slice(b"P_9\0S_9\0");
            b.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
        })
        .raw(),
    );
    batch.extend_from_slice(
        write::frame(b'E', |b| {
            b.extend_from_slice(b"P_9\0");
            b.extend_from_slice(&2i32.to_be_bytes());
        })
        .raw(),
    );
    batch.extend_from_slice(
        write::frame(b'E', |b| {
            b.extend_from_slice(b"P_9\0");
            b.extend_from_slice(&2i32.to_be_bytes());
        })
        .raw(),
    );
    batch.extend_from_slice(write::frame(b'S', |_| {}).raw());
    s.write_all(&batch).await.unwrap();
    let (tags, data) = reply(&mut s).await;
    assert_eq!(tags, b"12DDsDCZ", "{data}");
    assert!(data.contains("139****"), "{data}");
    assert_no_secret(&data, "named portal, binary, in parts");
    s.write_all(write::query("SELECT 1").raw()).await.unwrap();
    let (tags, _) = reply(&mut s).await;
    assert_eq!(tags, b"TDCZ");
    // An SQL cursor is a portal too: run by a protocol Execute of its name, which no Bind
    // made, its rows are masked all the same.
    s.write_all(
        write::query(
            "BEGIN; DECLARE sqlcur CURSOR FOR SELECT id, phone, card_number FROM customers ORDER BY id",
        )
        .raw(),
    )
    .await
    .unwrap();
    let (tags, data) = reply(&mut s).await;
    assert_eq!(tags, b"CCZ", "{data}");
    let mut batch = Vec::new();
    batch.extend_from_slice(
        write::frame(b'E', |b| {
            b.extend_from_slice(b"sqlcur\0");
            b.extend_from_slice(&3i32.to_be_bytes());
        })
        .raw(),
    );
    batch.extend_from_slice(write::frame(b'S', |_| {}).raw());
    s.write_all(&batch).await.unwrap();
    let (tags, data) = reply(&mut s).await;
    assert!(tags.ends_with(b"Z"), "{tags:?} {data}");
    assert!(!data.contains("SFATAL"), "{data}");
    assert!(data.contains("tok_"), "the keyed mask in flight: {data}");
    assert_no_secret(&data, "Execute of an SQL cursor");
    s.write_all(write::query("COMMIT").raw()).await.unwrap();
    let (tags, _) = reply(&mut s).await;
    assert_eq!(tags, b"CZ");
}

#[tokio::test]
async fn refusal_inside_a_transaction_aborts_it_like_a_server_error() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    alice
        .batch_execute("BEGIN; INSERT INTO tasks (owner, note) VALUES ('alice', 'must not commit')")
        .await
        .unwrap();
    let e = alice
        .batch_execute("SELECT upper(card_number) FROM customers")
        .await
        .unwrap_err();
    assert!(is_refusal(&e));
    let e = alice.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.code().unwrap().code(),
        "25P02",
        "the transaction is aborted on the server"
    );
    alice.batch_execute("COMMIT").await.unwrap();
    let n = cluster().psql_super(
        "crm",
        "SELECT count(*) FROM tasks WHERE note = 'must not commit'",
    );
    assert_eq!(n, "0");
}

#[tokio::test]
async fn exempt_role_and_unmasked_columns_match_direct() {
    let (p, _d) = proxy().await;
    let queries = [
        "SELECT * FROM customers ORDER BY id",
        "SELECT id, full_name, created_at FROM customers ORDER BY id",
        "SELECT * FROM deals ORDER BY id",
        "SELECT upper(full_name), count(*) FROM customers GROUP BY 1 ORDER BY 1 LIMIT 5",
    ];
    for (user, pw, exempt) in [
        ("crm_admin", "admin_pw", true),
        ("alice", "alice_pw", false),
    ] {
        let via = p.connect(user, pw).await;
        let direct = common::connect(&format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=crm",
            cluster().port
        ))
        .await;
        for sql in queries {
            if !exempt && sql.contains('*') && sql.contains("customers") {
                continue;
            }
            let a = simple_rows(&via, sql).await.unwrap();
            let b = simple_rows(&direct, sql).await.unwrap();
            assert_eq!(a, b, "{user}: {sql}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_as_two_roles() {
    let (p, _d) = proxy().await;
    let sql = "SELECT phone, email FROM customers WHERE id = 2";
    let mut admin = psql_cmd(&p.addr_string(), "crm_admin", "admin_pw", "crm");
    admin.args(["-c", sql]);
    let out = output(admin).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "13910015838|user2@example.com");
    let mut alice = psql_cmd(&p.addr_string(), "alice", "alice_pw", "crm");
    alice.args(["-c", sql]);
    let out = output(alice).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "139****5838|u***@example.com");
    let mut attack = psql_cmd(&p.addr_string(), "alice", "alice_pw", "crm");
    attack.args(["-c", "SELECT lower(card_number) FROM customers"]);
    let out = output(attack).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "pgveil: SELECT on public.customers.card_number is not allowed for role \"alice\""
        ),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("PL/pgSQL"),
        "the refusal carries no server context: {}",
        stderr(&out)
    );
    assert_no_secret(&stdout(&out), "psql attack");
}

fn pgveil_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn admin_url() -> String {
    format!(
        "postgres://postgres:{}@127.0.0.1:{}/crm",
        common::SUPERUSER_PASSWORD,
        cluster().port
    )
}

#[test]
fn check_against_the_database_names_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.toml"),
        r#"[[mask]]
column = "customers.no_such_column"
function = "null"

[[mask]]
column = "customers.balance"
function = "email"

[[mask]]
column = "customers.card_number"
function = "hash"
key_env = "PGVEIL_TEST_UNSET_KEY"

[[mask]]
column = "customers.phone"
function = "partial"
keep_first = 3
unmasked_for = ["no_such_role"]
searchable = true

[[mask]]
column = "missing_table.x"
function = "null"
"#,
    )
    .unwrap();
    let out = pgveil_cli(
        &[
            "check",
            "--rules",
            dir.path().to_str().unwrap(),
            "--upstream-url",
            &admin_url(),
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (line, needle) in [
        ("r.toml:1:", "does not exist"),
        ("r.toml:1:", "warning"),
        ("r.toml:21:", "warning"),
        ("r.toml:5:", "cannot apply to a column of type numeric"),
        ("r.toml:9:", "PGVEIL_TEST_UNSET_KEY"),
        ("r.toml:14:", "no_such_role"),
        ("r.toml:14:", "warning"),
        ("r.toml:21:", "missing_table"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(line) && l.contains(needle)),
            "{line} {needle}:\n{text}"
        );
    }
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let out = pgveil_cli(
        &["check", "--rules", sample, "--upstream-url", &admin_url()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn explain_shows_masks_per_column_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let url = admin_url();
    let explain = |role: &str, sql: &str| {
        let args = [
            "explain",
            "--rules",
            dir.path().to_str().unwrap(),
            "--role",
            role,
            "--upstream-url",
            &url,
            sql,
        ];
        let out = pgveil_cli(
            &args,
            &[(common::keyed::TEST_KEY_ENV, common::keyed::TEST_KEY)],
        );
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = explain("alice", "SELECT id, phone FROM customers");
    assert!(text.contains("statement: select"), "{text}");
    assert!(text.contains("column 1 id: none"), "{text}");
    assert!(text.contains("column 2 phone: partial (rule"), "{text}");
    let text = explain("alice", "SELECT upper(card_number) FROM customers");
    assert!(
        text.contains("decision: refused") && text.contains("rules.toml:19"),
        "{text}"
    );
    let text = explain("alice", "SELECT upper(phone) FROM customers");
    assert!(
        text.contains("decision: rewritten") && text.contains("pg_catalog.left"),
        "{text}"
    );
    let text = explain("crm_admin", "SELECT phone FROM customers");
    assert!(text.contains("column 1 phone: none"), "{text}");
}

#[test]
fn token_decode_reverses_tokenize() {
    let m = pgveil::policy::mask::Masker::new(
        &pgveil::config::rules::MaskFunction::Tokenize {
            key_env: "PGVEIL_TEST_CLI_KEY".into(),
        },
        pgveil::policy::pgtypes::TypeClass::Text,
        "text",
    );
    assert!(m.is_err(), "no key in the environment yet");
    std::env::set_var("PGVEIL_TEST_CLI_KEY", "k1 k1 k1 k1 k1 k1 k1 k1 k1 k1 k1 k1");
    let m = pgveil::policy::mask::Masker::new(
        &pgveil::config::rules::MaskFunction::Tokenize {
            key_env: "PGVEIL_TEST_CLI_KEY".into(),
        },
        pgveil::policy::pgtypes::TypeClass::Text,
        "text",
    )
    .unwrap()
    .unwrap();
    let mut tok = Vec::new();
    assert!(m.apply(
        pgveil::policy::pgtypes::TypeClass::Text,
        false,
        b"4111000015485863",
        &mut tok
    ));
    let tok = String::from_utf8(tok).unwrap();
    let out = pgveil_cli(
        &["token", "decode", "--key-env", "K", &tok],
        &[("K", "k1 k1 k1 k1 k1 k1 k1 k1 k1 k1 k1 k1")],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4111000015485863"
    );
    let out = pgveil_cli(
        &["token", "decode", "--key-env", "K", &tok],
        &[("K", "wrong")],
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn searchable_masks_compare_clear_values_but_return_masked_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.toml"),
        "[[mask]]\ncolumn = \"customers.phone\"\nfunction = \"partial\"\nkeep_first = 3\nkeep_last = 4\nsearchable = true\nunmasked_for = [\"crm_admin\"]\n",
    )
    .unwrap();
    let path = dir.path().to_path_buf();
    let p = TestProxy::start(cluster(), move |s| s.rules = Some(path)).await;
    let alice = p.connect("alice", "alice_pw").await;
    // A support agent finds a customer by the full phone number they were given ...
    let rows = simple_rows(
        &alice,
        "SELECT id, phone FROM customers WHERE phone = '13910007919'",
    )
    .await
    .unwrap();
    assert_eq!(rows, "1|139****7919|\n");
    let row = alice
        .query_one(
            "SELECT id, phone FROM customers WHERE phone = $1",
            &[&"13910015838"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "139****5838");
    // ... but every other use still sees the masked value.
    let rows = simple_rows(
        &alice,
        "SELECT upper(phone) FROM customers WHERE phone = '13910007919'",
    )
    .await
    .unwrap();
    assert_eq!(rows, "139****7919|\n");
    // Predicates anywhere in the outermost WHERE compare clear values (that is what
    // `searchable` allows, and why `check` warns); elsewhere the column is masked.
    let rows = simple_rows(
        &alice,
        "SELECT count(*) FROM customers WHERE id IN (SELECT id FROM customers WHERE phone LIKE '1391000%')",
    )
    .await
    .unwrap();
    assert_eq!(rows, "1|\n");
    let rows = simple_rows(
        &alice,
        "SELECT (SELECT count(*) FROM customers c2 WHERE c2.phone LIKE '1391000%')",
    )
    .await
    .unwrap();
    assert_eq!(
        rows, "0|\n",
        "outside the outermost WHERE a searchable column is masked"
    );
}

#[tokio::test]
async fn whole_rows_of_keyless_masked_tables_are_masked_whole() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for (sql, want) in [
        (
            "SELECT l FROM leads l ORDER BY l.id",
            "(1,eu,139****6666)|\n(2,asia,139****8888)|\n",
        ),
        (
            "SELECT row_to_json(l) FROM leads l WHERE l.id = 1",
            "{\"id\":1,\"region\":\"eu\",\"phone\":\"139****6666\"}|\n",
        ),
        (
            "SELECT row_to_json(l.*)::text FROM leads_asia l",
            "{\"phone\":\"139****8888\",\"region\":\"asia\",\"id\":2}|\n",
        ),
        (
            "SELECT s FROM (SELECT * FROM leads WHERE id = 1) s",
            "(1,eu,139****6666)|\n",
        ),
        (
            "SELECT count(*) FROM leads a JOIN leads b USING (phone)",
            "2|\n",
        ),
        (
            "SELECT (l).phone FROM leads l WHERE id = 2",
            "139****8888|\n",
        ),
    ] {
        let rows = simple_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(rows, want, "{sql}");
        assert_no_secret(&rows, sql);
        // Every column's raw bytes (a Row's Debug shows no values).
        let got = extended_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_no_secret(&got, sql);
    }
}

#[tokio::test]
async fn refused_parse_answered_on_flush_without_sync() {
    use tokio::io::AsyncWriteExt;
    let (p, _d) = proxy().await;
    cluster().psql_super("crm", "GRANT crm_base TO trust_user");
    let mut s = common::raw_session(&p.addr_string(), "trust_user", "crm").await;
    // Parse + Describe + Flush, then wait: drivers that describe before binding do this.
    let sql = "SELECT upper(card_number) FROM customers";
    let mut parse = vec![b'P'];
    let body = [&b"s1\0"[..], sql.as_bytes(), b"\0", &0i16.to_be_bytes()].concat();
    parse.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    parse.extend_from_slice(&body);
    parse.extend_from_slice(b"D\0\0\0\x08Ss1\0");
    parse.extend_from_slice(b"H\0\0\0\x04");
    s.write_all(&parse).await.unwrap();
    let body = common::expect_error(&mut s)
        .await
        .expect("the refusal, before any Sync");
    assert_eq!(common::sqlstate_of(&body), "42501");
    // Sync then ends the failed batch, as after a server error, and the session goes on.
    s.write_all(b"S\0\0\0\x04").await.unwrap();
    loop {
        let (tag, body) = common::read_message(&mut s).await.expect("ReadyForQuery");
        if tag == b'Z' {
            assert_eq!(body, b"I");
            break;
        }
        assert_ne!(tag, b'E', "only one error for one refusal");
    }
    s.write_all(b"Q\0\0\0\x0dSELECT 1\0").await.unwrap();
    let (tag, _) = common::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'T');
}

/// Keyed masks (tokenize) where rows come back through an SQL cursor: DECLARE, then FETCH
/// over the simple protocol, the extended protocol (binary results) and from a BINARY
/// cursor (a protocol Execute of the cursor's name: see the test of portals in parts).
/// Every form gives the token a plain
/// SELECT gives; a keyed column passed through an expression inside the cursor's query
/// stays refused.
#[tokio::test]
async fn keyed_masks_apply_to_rows_fetched_from_a_cursor() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let tokens: Vec<String> = alice
        .query(
            "SELECT card_number FROM customers WHERE id <= 3 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tokens.iter().all(|t| t.starts_with("tok_")), "{tokens:?}");
    let declare = "DECLARE c CURSOR FOR SELECT id, card_number, phone FROM customers WHERE id <= 3 ORDER BY id";
    // Simple protocol.
    alice.batch_execute("BEGIN").await.unwrap();
    alice.batch_execute(declare).await.unwrap();
    let rows = simple_rows(&alice, "FETCH 3 FROM c").await.unwrap();
    assert_no_secret(&rows, "FETCH (simple)");
    let fetched: Vec<&str> = rows.lines().map(|l| l.split('|').nth(1).unwrap()).collect();
    assert_eq!(fetched, tokens, "{rows}");
    alice.batch_execute("CLOSE c").await.unwrap();
    // Extended protocol, binary results.
    alice.batch_execute(declare).await.unwrap();
    let rows = alice.query("FETCH 3 FROM c", &[]).await.unwrap();
    let fetched: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(fetched, tokens);
    assert!(rows.iter().all(|r| r.get::<_, String>(2).contains("****")));
    alice.batch_execute("CLOSE c").await.unwrap();
    // A BINARY cursor sends binary rows even over the simple protocol.
    alice
        .batch_execute(&declare.replace("DECLARE c CURSOR", "DECLARE c BINARY CURSOR"))
        .await
        .unwrap();
    let msgs = alice.simple_query("FETCH 3 FROM c").await.unwrap();
    let mut binary = Vec::new();
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            binary.push(r.get(1).unwrap_or_default().to_string());
        }
    }
    assert_eq!(binary, tokens);
    alice.batch_execute("COMMIT").await.unwrap();
    // Adversarial: a keyed column through an expression inside the cursor is refused.
    for sql in [
        "DECLARE c CURSOR FOR SELECT upper(card_number) FROM customers",
        "DECLARE c CURSOR FOR SELECT card_number || '' FROM customers",
        "DECLARE c CURSOR FOR SELECT id FROM customers ORDER BY card_number",
        "DECLARE c CURSOR FOR SELECT card_number FROM customers UNION SELECT 'x'",
    ] {
        alice.batch_execute("BEGIN").await.unwrap();
        let e = alice.batch_execute(sql).await.unwrap_err();
        assert!(is_refusal(&e), "{sql}: {e:?}");
        alice.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// Keyed masks (tokenize) and the others in RETURNING lists: returned bare or by `*`,
/// masked in flight (the server marks each returned column's origin), over both
/// protocols; the token is the one a SELECT gives. Expressions over a keyed column, and
/// whole rows, stay refused.
#[tokio::test]
async fn keyed_masks_apply_to_returning_lists() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let token: String = alice
        .query_one("SELECT card_number FROM customers WHERE id = 4", &[])
        .await
        .unwrap()
        .get(0);
    alice.batch_execute("BEGIN").await.unwrap();
    for returning in [
        "id, card_number, phone",
        "*",
        "c.card_number AS card, c.phone",
    ] {
        let sql = format!(
            "UPDATE customers AS c SET full_name = c.full_name WHERE c.id = 4 RETURNING {returning}"
        );
        let rows = simple_rows(&alice, &sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_no_secret(&rows, &sql);
        assert!(rows.contains(&token), "{sql}: {rows}");
        assert!(rows.contains("139****"), "{sql}: {rows}");
        let rows = alice
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        let columns: Vec<String> = (0..row.len())
            .filter_map(|i| row.try_get::<_, String>(i).ok())
            .collect();
        assert!(columns.contains(&token), "{sql}: {columns:?}");
        assert_no_secret(&columns.join("|"), &sql);
    }
    // An INSERT's RETURNING masks what was just written.
    let rows = simple_rows(
        &alice,
        "INSERT INTO customers (full_name, phone, card_number) \
         VALUES ('New', '13955556666', '4111999988887777') RETURNING card_number, phone",
    )
    .await
    .unwrap();
    assert!(!rows.contains("4111999988887777"), "{rows}");
    assert!(!rows.contains("13955556666"), "{rows}");
    assert!(
        rows.starts_with("tok_") && rows.contains("139****6666"),
        "{rows}"
    );
    alice.batch_execute("ROLLBACK").await.unwrap();
    for sql in [
        "UPDATE customers SET full_name = full_name WHERE id = 4 RETURNING upper(card_number)",
        "UPDATE customers SET full_name = full_name WHERE id = 4 RETURNING card_number || ''",
        "UPDATE customers SET full_name = full_name WHERE id = 4 RETURNING customers",
        "UPDATE customers SET full_name = full_name WHERE id = 4 RETURNING row_to_json(customers)",
    ] {
        let e = simple_rows(&alice, sql).await.unwrap_err();
        assert!(is_refusal(&e), "{sql}: {e:?}");
    }
}

/// Keyed masks through a view over the masked table (`customer_view` is `SELECT * FROM
/// customers`): its columns returned bare or by `*` are masked in flight, with the tokens
/// a SELECT of the table gives, over both protocols; any other use of a keyed column of the
/// view (an expression, a predicate, sorting, de-duplicating, a join) stays refused.
#[tokio::test]
async fn keyed_masks_apply_through_views() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let tokens: Vec<String> = alice
        .query(
            "SELECT card_number FROM customers WHERE id <= 3 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for sql in [
        "SELECT * FROM customer_view WHERE id <= 3 ORDER BY id",
        "SELECT v.id, v.card_number AS card, v.phone FROM customer_view v WHERE v.id <= 3 ORDER BY v.id",
        "SELECT id, card_number FROM public.customer_view WHERE id IN (1, 2, 3) ORDER BY id LIMIT 3",
    ] {
        let rows = simple_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_no_secret(&rows, sql);
        for t in &tokens {
            assert!(rows.contains(t.as_str()), "{sql}: {t} not in {rows}");
        }
        let rows = alice
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let text: Vec<String> = rows
            .iter()
            .flat_map(|r| (0..r.len()).filter_map(|i| r.try_get::<_, String>(i).ok()))
            .collect();
        assert_no_secret(&text.join("|"), sql);
        for t in &tokens {
            assert!(text.contains(t), "{sql} (extended): {t} not in {text:?}");
        }
    }
    for sql in [
        "SELECT upper(card_number) FROM customer_view",
        "SELECT id FROM customer_view WHERE card_number LIKE '4111%'",
        "SELECT card_number FROM customer_view ORDER BY card_number",
        "SELECT DISTINCT card_number FROM customer_view",
        "SELECT count(DISTINCT card_number) FROM customer_view",
        "SELECT * FROM customer_view ORDER BY 6",
        "SELECT a.id FROM customer_view a JOIN customer_view b ON a.card_number = b.card_number",
        "SELECT card_number, row_number() OVER (ORDER BY card_number) FROM customer_view",
        "SELECT v FROM customer_view v",
        "SELECT row_to_json(v) FROM customer_view v",
        "SELECT (v).card_number FROM customer_view v",
        "SELECT v::text FROM customer_view v",
        "SELECT v.card_number AS k FROM customer_view v ORDER BY k",
        "SELECT v.card_number AS k FROM customer_view v WHERE v.id = 1 GROUP BY k",
        "SELECT c FROM customer_view AS v(i, n, p, e, ni, c)",
        "SELECT v.card_number FROM customer_view v, LATERAL (SELECT v.card_number AS x) l",
        "SELECT (SELECT v.card_number) FROM customer_view v",
        "SELECT a.id FROM customer_view a JOIN customer_view b USING (card_number)",
        "SELECT * FROM customer_view NATURAL JOIN customers",
        "SELECT card_number INTO TEMP stolen_cards FROM customer_view",
    ] {
        let e = simple_rows(&alice, sql).await.unwrap_err();
        assert!(is_refusal(&e), "{sql}: {e:?}");
    }
    // Views over keyless masks only: the same forms never return a clear value either.
    for sql in [
        "SELECT v FROM customer_contact_view v",
        "SELECT row_to_json(v) FROM customer_contact_view v WHERE v.id = 1",
        "SELECT v::text FROM customer_contact_view v",
        "SELECT (v).phone FROM customer_contact_view v",
        "SELECT p FROM customer_contact_view AS v(i, n, p, e)",
        "SELECT v.phone AS k FROM customer_contact_view v ORDER BY k LIMIT 3",
        "SELECT * FROM customer_contact_view",
        "SELECT phone, email FROM customer_contact_view WHERE phone LIKE '139%' LIMIT 3",
    ] {
        match simple_rows(&alice, sql).await {
            Err(e) => assert!(is_refusal(&e), "{sql}: {e:?}"),
            Ok(rows) => assert_no_secret(&rows, sql),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attack on masked columns passed through derived tables (views inlined as derived
// tables, and derived tables written by hand), over both protocols.
// ---------------------------------------------------------------------------------------

/// Any column's raw bytes, whatever its type and format (binary results included).
struct AnyRaw(Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for AnyRaw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyRaw(Some(raw.to_vec())))
    }
    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyRaw(None))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// What one attempt gave: a pgveil refusal, a server error (the statement did not run),
/// or rows (every column's bytes, lossily as text, `|`-separated).
#[derive(Debug)]
enum Outcome {
    Refused,
    ServerError(String),
    Rows(String),
}

impl Outcome {
    fn of(r: Result<String, tokio_postgres::Error>) -> Outcome {
        match r {
            Ok(rows) => Outcome::Rows(rows),
            Err(e) if is_refusal(&e) => Outcome::Refused,
            Err(e) => Outcome::ServerError(
                e.as_db_error()
                    .map(|d| format!("{} {}", d.code().code(), d.message()))
                    .unwrap_or_else(|| e.to_string()),
            ),
        }
    }

    fn leaked(&self) -> Option<String> {
        match self {
            Outcome::Rows(rows) => secrets()
                .iter()
                .find(|s| rows.contains(s.as_str()))
                .map(|s| format!("clear fragment {s:?} in {}", clip(rows))),
            _ => None,
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
}

/// The statement over the extended protocol (tokio-postgres asks for binary results),
/// every column of every row as its raw bytes.
async fn extended_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let rows = client.query(sql, &[]).await?;
    let mut out = String::new();
    for r in rows {
        for i in 0..r.len() {
            match r.get::<_, AnyRaw>(i).0 {
                Some(b) => out.push_str(&String::from_utf8_lossy(&b)),
                None => out.push_str("NULL"),
            }
            out.push('|');
        }
        out.push('\n');
    }
    Ok(out)
}

/// How a form must come out for a masked role.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Must {
    /// Refused, failed on the server, or rows with no clear value.
    NotLeak,
    /// Computes on (or orders, filters, groups by) a keyed column's clear value: must
    /// not run (a pgveil refusal, or a server error).
    NotRun,
}

async fn probe(client: &tokio_postgres::Client, sql: &str) -> (Outcome, Outcome) {
    let simple = Outcome::of(simple_rows(client, sql).await);
    let extended = Outcome::of(extended_rows(client, sql).await);
    // The session stays usable whatever happened.
    assert_eq!(
        simple_rows(client, "SELECT 1").await.unwrap(),
        "1|\n",
        "after {sql}"
    );
    (simple, extended)
}

/// Problems with one form: each protocol's outcome against what it must be.
fn judge_form(sql: &str, must: Must, simple: &Outcome, extended: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    for (proto, o) in [("simple", simple), ("extended/binary", extended)] {
        if let Some(l) = o.leaked() {
            problems.push(format!("LEAK [{proto}] {sql}\n    {l}"));
        } else if must == Must::NotRun {
            if let Outcome::Rows(rows) = o {
                problems.push(format!(
                    "INFERENCE RAN [{proto}] {sql}\n    returned {}",
                    clip(rows)
                ));
            }
        }
    }
    problems
}

/// Attack forms on masked columns passed through derived tables (views inlined as
/// derived tables, and derived tables written by hand) that pgveil withstands: each is
/// refused, fails on the server, or returns no clear value; forms that compute on,
/// filter, sort or group by a keyed column's value do not run.
const DERIVED_TABLE_ATTACKS: &[(Must, &str)] = &[
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE true"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(x.c) FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE x.c LIKE '4111%'"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE x.c IS NULL"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY x.c LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY x.c COLLATE "C" LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY 1 LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT v.* FROM customer_view v ORDER BY 6 LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers ORDER BY card_number LIMIT 1) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers ORDER BY 1 LIMIT 1) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers ORDER BY 1 LIMIT 1) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers ORDER BY card_number FETCH FIRST 1 ROWS WITH TIES) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers ORDER BY id FETCH FIRST 3 ROWS WITH TIES) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers TABLESAMPLE BERNOULLI (100) REPEATABLE (1)) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers LIMIT 5 OFFSET 2) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number FROM (SELECT card_number FROM customers WHERE id < 5 FOR UPDATE) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number, y.card_number FROM (SELECT id, card_number FROM customers) x JOIN (SELECT id, card_number FROM customers) y ON x.id = y.id"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.id FROM (SELECT id, card_number FROM customers) x JOIN (SELECT id, card_number FROM customers) y ON x.card_number = y.card_number"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.card_number FROM (SELECT card_number AS phone, phone AS card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.a, x.b FROM (SELECT card_number AS a, card_number AS b FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT X.CARD_NUMBER FROM (SELECT CARD_NUMBER FROM CUSTOMERS) X"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(X.CARD_NUMBER) FROM (SELECT "card_number" FROM customers) "x""#,
    ),
    (
        Must::NotRun,
        r#"SELECT x."Card_Number" FROM (SELECT card_number AS "Card_Number" FROM customers) x ORDER BY "Card_Number""#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(x.card_number) FROM (SELECT public.customers.card_number FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(deals.c) FROM (SELECT card_number AS c FROM customers) deals"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(customers.c) FROM (SELECT card_number AS c FROM customers) customers"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT customers.card_number FROM (SELECT card_number FROM customers) customers"#,
    ),
    (
        Must::NotRun,
        r#"SELECT unnest(ARRAY[x.c]) FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c, generate_series(1, 2) FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, count(*) FROM (SELECT card_number AS c FROM customers) x GROUP BY GROUPING SETS ((x.c), ())"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c, v.n FROM (SELECT card_number AS c FROM customers) x, (VALUES (1), (2)) v(n)"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT * FROM (VALUES ((SELECT card_number FROM customers LIMIT 1))) v(c)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT (v.card_number) FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT v.card_number COLLATE "C" FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT ARRAY[v.card_number] FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT ROW(v.card_number) FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT to_jsonb(v.card_number) FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT v.card_number::bytea FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT DISTINCT v.card_number FROM customer_view v"#,
    ),
    (
        Must::NotRun,
        r#"SELECT DISTINCT x.id, x.c FROM (SELECT id, card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, lag(x.c) OVER (ORDER BY x.id) FROM (SELECT id, card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, row_number() OVER w FROM (SELECT id, card_number AS c FROM customers) x WINDOW w AS (ORDER BY x.c)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.id FROM (SELECT id, card_number FROM customers) x WHERE EXISTS (SELECT 1 WHERE x.card_number LIKE '4111%')"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE EXISTS (SELECT 1 FROM deals d WHERE c LIKE '4111%')"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE x IS NOT NULL"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.* FROM (SELECT id, card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT y.c FROM (SELECT x.c FROM (SELECT card_number AS c FROM customers) x) y"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT y.card_number FROM (SELECT * FROM customer_view) y"#,
    ),
    (
        Must::NotLeak,
        r#"WITH w AS (SELECT card_number FROM customers) SELECT x.card_number FROM (SELECT card_number FROM w) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers UNION ALL SELECT 'x') x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, l.u FROM (SELECT card_number AS c FROM customers) x, LATERAL (SELECT upper(x.c) AS u) l"#,
    ),
    (
        Must::NotRun,
        r#"SELECT max(x.c) FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT count(DISTINCT x) FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT json_agg(x) FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT jsonb_agg(x.*) FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT (x.*)::text FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT (x).row_to_json FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT (SELECT x.c) FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(x.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaay) FROM (SELECT card_number AS aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaax FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT upper(x.U&"\0063") FROM (SELECT card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY x LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY x.* LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.id FROM (SELECT id, card_number FROM customers) x GROUP BY x.id HAVING max(x.card_number) > '4'"#,
    ),
    (
        Must::NotRun,
        r#"SELECT (x.card_number).upper FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT (x.card_number).text FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT upper(x.card_number) FROM (TABLE customers) x"#,
    ),
    (Must::NotLeak, r#"TABLE customer_view"#),
    (Must::NotLeak, r#"TABLE customers"#),
    (Must::NotLeak, r#"SELECT * FROM (TABLE customer_view) x"#),
    (
        Must::NotRun,
        r#"SELECT x.id AS c, x.c AS id FROM (SELECT id, card_number AS c FROM customers) x ORDER BY id LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT * FROM (SELECT card_number AS c FROM customers) x ORDER BY c LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x, (SELECT card_number AS c FROM customers) y WHERE y.c > x.c LIMIT 3"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x, LATERAL (SELECT 1) l"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x WHERE x.c IN (SELECT card_number FROM customers WHERE id = 1)"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT nv.mail FROM nested_view nv ORDER BY (1)"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT nv.row_to_json FROM nested_view nv"#,
    ),
    (Must::NotLeak, r#"SELECT * FROM nested_view"#),
    (
        Must::NotLeak,
        r#"SELECT x.id, x.c FROM (SELECT id, card_number AS c FROM customers) x WHERE x.id < 3 ORDER BY x.id"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) AS x(c)"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c, y.c FROM (SELECT card_number AS c FROM customers) x, (SELECT phone AS c FROM customers) y LIMIT 3"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c, k FROM customers k) x"#,
    ),
    (Must::NotLeak, r#"SELECT m.row_to_json FROM customer_mv m"#),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x FETCH FIRST 2 ROWS ONLY"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT DISTINCT ON (id) card_number AS c FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT ALL card_number AS c FROM customers) x LIMIT 2"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers WINDOW w AS (ORDER BY (1))) x LIMIT 1"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT card_number AS c, row_number() OVER (ORDER BY (1)) FROM customers) x LIMIT 1"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT v.card_number FROM customer_view v WHERE v.id IN (SELECT id FROM customers ORDER BY (1) LIMIT 1)"#,
    ),
];

/// Attack forms that leak today (see `leaks_found_by_the_attack`). Whole rows reach
/// functions by attribute notation (`x.row_to_json` is `row_to_json(x)`: PostgreSQL
/// calls a one-argument function named like a field of a row), which the analysis takes
/// for a column `row_to_json` of `x` that no mask names; and a position in parentheses
/// (`ORDER BY (1)`, `GROUP BY (1)`) is still a position to PostgreSQL, while the analysis
/// only knows bare numbers.
const LEAKING_ATTACKS: &[(Must, &str)] = &[
    (
        Must::NotLeak,
        r#"SELECT x.row_to_json FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT v.row_to_json FROM customer_view v"#,
    ),
    (Must::NotLeak, r#"SELECT v.to_jsonb FROM customer_view v"#),
    (Must::NotLeak, r#"SELECT v.record_out FROM customer_view v"#),
    (
        Must::NotLeak,
        r#"SELECT v.quote_literal FROM customer_contact_view v"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.json_agg FROM (SELECT card_number FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.jsonb_build_array FROM (SELECT phone, email FROM customers) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.j FROM (SELECT k.row_to_json AS j FROM customers k) x"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT x.c FROM (SELECT c.to_jsonb->>'national_id' AS c FROM customers c) x"#,
    ),
    (
        Must::NotLeak,
        r#"WITH w AS (SELECT c.row_to_json AS j FROM customers c) SELECT j FROM w"#,
    ),
    (Must::NotLeak, r#"SELECT c.row_to_json FROM customers c"#),
    (Must::NotLeak, r#"SELECT customers.to_json FROM customers"#),
    (
        Must::NotLeak,
        r#"SELECT public.customers.record_out FROM customers"#,
    ),
    (
        Must::NotLeak,
        r#"SELECT c.to_jsonb->>'card_number' FROM customers c"#,
    ),
    (Must::NotLeak, r#"SELECT k.row_to_json FROM contacts k"#),
    (Must::NotLeak, r#"SELECT l.row_to_json FROM leads l"#),
    (
        Must::NotRun,
        r#"SELECT v.card_number FROM customer_view v WHERE v.row_to_json::text LIKE '%"card_number":"4111000015%'"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT c.card_number AS c FROM customers c WHERE c.to_jsonb->>'card_number' LIKE '4111000015%') x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY (1) LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT * FROM (SELECT card_number FROM customers) x ORDER BY ((1)) DESC LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers ORDER BY (1) LIMIT 1) x"#,
    ),
    (
        Must::NotRun,
        r#"SELECT * FROM customer_view ORDER BY (6) LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT card_number FROM customers ORDER BY (1) LIMIT 3"#,
    ),
    (
        Must::NotRun,
        r#"SELECT id, card_number FROM customers ORDER BY (2)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, count(*) FROM (SELECT card_number AS c FROM customers) x GROUP BY (1)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c, count(*) FROM (SELECT card_number AS c FROM customers) x GROUP BY ROLLUP (1)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT x.c FROM (SELECT card_number AS c FROM customers) x GROUP BY GROUPING SETS ((1))"#,
    ),
    (
        Must::NotRun,
        r#"SELECT card_number, count(*) FROM customers GROUP BY (1)"#,
    ),
    (
        Must::NotRun,
        r#"SELECT card_number, count(*) FROM customers GROUP BY CUBE (1)"#,
    ),
];

fn short(o: &Outcome) -> String {
    match o {
        Outcome::Refused => "refused".to_string(),
        Outcome::ServerError(e) => format!("server error {}", clip(e)),
        Outcome::Rows(r) => format!("rows {}", clip(r).replace('\n', "\\n")),
    }
}

/// Each form over the simple and the extended protocol (binary results).
async fn statement_forms(client: &tokio_postgres::Client, forms: &[(Must, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (must, sql) in forms {
        let (simple, extended) = probe(client, sql).await;
        eprintln!(
            "{sql}\n  simple: {}\n  extended: {}",
            short(&simple),
            short(&extended)
        );
        problems.extend(judge_form(sql, *must, &simple, &extended));
    }
    problems
}

async fn in_tx(
    client: &tokio_postgres::Client,
    sql: &str,
    extended: bool,
) -> Result<String, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await.unwrap();
    let r = if extended {
        extended_rows(client, sql).await
    } else {
        simple_rows(client, sql).await
    };
    client.batch_execute("ROLLBACK").await.unwrap();
    r
}

/// Statements that write (run in a transaction rolled back), over both protocols.
async fn writing_forms(client: &tokio_postgres::Client, forms: &[(Must, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (must, sql) in forms {
        let simple = Outcome::of(in_tx(client, sql, false).await);
        let extended = Outcome::of(in_tx(client, sql, true).await);
        eprintln!(
            "{sql}\n  simple: {}\n  extended: {}",
            short(&simple),
            short(&extended)
        );
        problems.extend(judge_form(sql, *must, &simple, &extended));
    }
    problems
}

async fn copy_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    use futures_util::StreamExt;
    let stream = client.copy_out(sql).await?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `COPY (query) TO STDOUT`: no RowDescription, so nothing can be masked in flight.
async fn copy_forms(client: &tokio_postgres::Client, forms: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for sql in forms {
        let o = Outcome::of(copy_rows(client, sql).await);
        eprintln!("{sql}\n  copy: {}", short(&o));
        problems.extend(judge_form(sql, Must::NotLeak, &o, &Outcome::Refused));
        assert_eq!(
            simple_rows(client, "SELECT 1").await.unwrap(),
            "1|\n",
            "after {sql}"
        );
    }
    problems
}

/// DECLARE (simple protocol), then FETCH over the simple and the extended protocol.
async fn cursor_forms(client: &tokio_postgres::Client, forms: &[(Must, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (must, declare) in forms {
        problems.extend(setup_then_read(client, declare, "FETCH 3 FROM k", *must).await);
    }
    problems
}

/// A statement that stores rows in a table (CREATE TABLE AS, SELECT INTO, a view) named
/// `stolen`, then the table read back.
async fn stored_forms(client: &tokio_postgres::Client, forms: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for sql in forms {
        problems.extend(setup_then_read(client, sql, "SELECT * FROM stolen", Must::NotLeak).await);
    }
    problems
}

/// In a transaction rolled back after: `setup` over the simple protocol, then `read` over
/// the simple and (in a second transaction) the extended protocol, judged as `must` says.
async fn setup_then_read(
    client: &tokio_postgres::Client,
    setup: &str,
    read: &str,
    must: Must,
) -> Vec<String> {
    let mut outcomes = Vec::new();
    for extended in [false, true] {
        client.batch_execute("BEGIN").await.unwrap();
        let o = match simple_rows(client, setup).await {
            Err(e) => Outcome::of(Err(e)),
            Ok(_) => Outcome::of(if extended {
                extended_rows(client, read).await
            } else {
                simple_rows(client, read).await
            }),
        };
        client.batch_execute("ROLLBACK").await.unwrap();
        outcomes.push(o);
    }
    let what = format!("{setup}; {read}");
    eprintln!(
        "{what}\n  simple: {}\n  extended: {}",
        short(&outcomes[0]),
        short(&outcomes[1])
    );
    judge_form(&what, must, &outcomes[0], &outcomes[1])
}

/// Every attack form pgveil withstands today, over both protocols: refused, failed on
/// the server, or no clear value returned; nothing that computes on, filters, sorts or
/// groups by a keyed column's clear value runs.
#[tokio::test]
async fn attacks_on_masked_columns_through_derived_tables() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let mut problems = statement_forms(&alice, DERIVED_TABLE_ATTACKS).await;
    problems.extend(
        writing_forms(
            &alice,
            &[
                (Must::NotLeak, "INSERT INTO tasks (owner, note) SELECT 'attack', x.c FROM (SELECT card_number AS c FROM customers WHERE id = 1) x RETURNING note"),
                (Must::NotLeak, "UPDATE customers SET full_name = x.c FROM (SELECT id, card_number AS c FROM customers) x WHERE x.id = customers.id AND customers.id = 1 RETURNING customers.full_name"),
                (Must::NotLeak, "UPDATE customers SET full_name = x.c FROM (SELECT id, phone AS c FROM customers) x WHERE x.id = customers.id AND customers.id = 1 RETURNING customers.full_name"),
                (Must::NotLeak, "UPDATE customers c SET full_name = x.c FROM (SELECT id, card_number AS c FROM customers) x WHERE x.id = c.id AND c.id = 1 RETURNING x.c"),
                (Must::NotLeak, "UPDATE customers c SET full_name = c.full_name FROM (SELECT id, card_number AS c FROM customers) x WHERE x.id = c.id AND c.id = 1 RETURNING x.row_to_json"),
                (Must::NotLeak, "DELETE FROM tasks t USING (SELECT card_number AS c FROM customers) x WHERE false RETURNING x.row_to_json"),
            ],
        )
        .await,
    );
    problems.extend(
        copy_forms(
            &alice,
            &[
                "COPY (SELECT v.record_out FROM customer_view v) TO STDOUT",
                "COPY (SELECT x.c FROM (SELECT card_number AS c FROM customers) x) TO STDOUT",
                "COPY (SELECT x.c FROM (SELECT phone AS c FROM customers) x) TO STDOUT",
                "COPY (SELECT * FROM customer_view) TO STDOUT",
            ],
        )
        .await,
    );
    problems.extend(
        cursor_forms(
            &alice,
            &[
                (Must::NotLeak, "DECLARE k CURSOR FOR SELECT x.c FROM (SELECT card_number AS c FROM customers) x"),
                (Must::NotLeak, "DECLARE k CURSOR FOR SELECT * FROM customer_view"),
                (Must::NotLeak, "DECLARE k BINARY CURSOR FOR SELECT v.id, v.card_number, v.phone FROM customer_view v"),
                (Must::NotRun, "DECLARE k CURSOR FOR SELECT x.c FROM (SELECT card_number AS c FROM customers) x ORDER BY x.c"),
            ],
        )
        .await,
    );
    problems.extend(
        stored_forms(
            &alice,
            &[
                "CREATE TEMP TABLE stolen AS SELECT x.c FROM (SELECT card_number AS c FROM customers) x",
                "CREATE TEMP TABLE stolen AS SELECT x.c FROM (SELECT phone AS c FROM customers) x",
                "SELECT x.c INTO TEMP stolen FROM (SELECT card_number AS c FROM customers) x",
                "CREATE TEMP VIEW stolen AS SELECT x.c FROM (SELECT phone AS c FROM customers) x",
            ],
        )
        .await,
    );
    // The pass-through itself still works: the tokens a plain SELECT gives.
    let token: String = alice
        .query_one("SELECT card_number FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    let got: String = alice
        .query_one(
            "SELECT x.c FROM (SELECT id, card_number AS c FROM customers) x WHERE x.id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, token);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// What an attack pass found (each form returned a clear value, or ran an ordering or
/// grouping on a keyed column's clear value) and what is fixed: a function called in
/// attribute notation (`t.row_to_json` is `row_to_json(t)`, a whole row) is a whole-row
/// use, and a position in parentheses (`ORDER BY (1)`, `GROUP BY ROLLUP (1)`) is a
/// position. The message lists every form that still gets through.
#[tokio::test]
async fn whole_rows_in_attribute_notation_and_positions_in_parentheses_are_caught() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let mut problems = statement_forms(&alice, LEAKING_ATTACKS).await;
    // Several statements in one simple query.
    let sql = "SELECT 1; SELECT v.row_to_json FROM customer_view v";
    let o = Outcome::of(simple_rows(&alice, sql).await);
    problems.extend(judge_form(sql, Must::NotLeak, &o, &Outcome::Refused));
    problems.extend(
        writing_forms(
            &alice,
            &[
                (Must::NotLeak, "UPDATE customers c SET full_name = c.full_name WHERE c.id = 1 RETURNING c.row_to_json"),
                (Must::NotLeak, "INSERT INTO tasks (owner, note) SELECT 'attack', c.record_out FROM customers c WHERE c.id = 1 RETURNING note"),
            ],
        )
        .await,
    );
    problems.extend(
        copy_forms(
            &alice,
            &["COPY (SELECT c.row_to_json FROM customers c) TO STDOUT"],
        )
        .await,
    );
    problems.extend(
        cursor_forms(
            &alice,
            &[
                (Must::NotLeak, "DECLARE k CURSOR FOR SELECT v.to_jsonb FROM customer_view v"),
                (Must::NotLeak, "DECLARE k BINARY CURSOR FOR SELECT x.row_to_json FROM (SELECT card_number FROM customers) x"),
                (Must::NotRun, "DECLARE k CURSOR FOR SELECT card_number FROM customers ORDER BY (1)"),
            ],
        )
        .await,
    );
    problems.extend(
        stored_forms(
            &alice,
            &["CREATE TEMP TABLE stolen AS SELECT c.row_to_json AS c FROM customers c"],
        )
        .await,
    );

    // ORDER BY (position) sorts a keyless column by its clear value: the order differs
    // from the one its masked values give (ORDER BY 2 is rewritten to sort masked values).
    let ids = |rows: &str| -> Vec<String> {
        rows.lines()
            .map(|l| l.split('|').next().unwrap().to_string())
            .collect()
    };
    let masked = simple_rows(&alice, "SELECT id, phone FROM customers ORDER BY 2, id")
        .await
        .unwrap();
    let sql = "SELECT id, phone FROM customers ORDER BY (2), id";
    if let Ok(paren) = simple_rows(&alice, sql).await {
        let clear = cluster().psql_super("crm", "SELECT id FROM customers ORDER BY phone, id");
        let clear: Vec<String> = clear.lines().map(|l| l.trim().to_string()).collect();
        if ids(&paren) != ids(&masked) {
            problems.push(format!(
                "INFERENCE RAN [simple] {sql}\n    rows come in the order of the clear phone numbers ({}), not of the masked ones",
                if ids(&paren) == clear { "exactly" } else { "not exactly" }
            ));
        }
    }

    // The same with a keyed column and rows the attacker inserts: bisection recovers a
    // card number, digit for digit, from the order alone.
    let clear_card = cluster()
        .psql_super("crm", "SELECT card_number FROM customers WHERE id = 1")
        .trim()
        .to_string();
    let (mut lo, mut hi) = (4_000_000_000_000_000u64, 4_999_999_999_999_999u64);
    let mut ran = true;
    while lo < hi {
        let m = lo + (hi - lo) / 2;
        alice.batch_execute("BEGIN").await.unwrap();
        alice
            .batch_execute(&format!(
                "INSERT INTO customers (full_name, card_number) VALUES ('zz probe', '{m}')"
            ))
            .await
            .unwrap();
        let r = simple_rows(
            &alice,
            "SELECT full_name, card_number FROM customers WHERE id = 1 OR full_name = 'zz probe' ORDER BY (2), full_name",
        )
        .await;
        alice.batch_execute("ROLLBACK").await.unwrap();
        let Ok(rows) = r else {
            ran = false;
            break;
        };
        assert_no_secret(&rows, "bisection step");
        if rows.starts_with("Customer 1|") {
            hi = m;
        } else {
            lo = m + 1;
        }
    }
    if ran {
        let recovered = lo.to_string();
        problems.push(format!(
            "INFERENCE RAN [simple] INSERT INTO customers (full_name, card_number) VALUES ('zz probe', '<guess>'); \
             SELECT full_name, card_number FROM customers WHERE id = 1 OR full_name = 'zz probe' ORDER BY (2), full_name\n    \
             bisection over the order recovered card number {recovered} of customer 1 ({})",
            if recovered == clear_card { "the clear value" } else { "not the clear value" }
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// A user-defined function called in attribute notation (`l.leak_any` is `leak_any(l)`)
/// is a call like any other: refused for masked roles. This one takes any row and reads
/// the customers table with its owner's rights.
#[tokio::test]
async fn user_functions_in_attribute_notation_are_refused() {
    cluster().psql_super(
        "crm",
        "CREATE OR REPLACE FUNCTION public.leak_any(anyelement) RETURNS text LANGUAGE sql \
         SECURITY DEFINER AS 'SELECT phone FROM public.customers ORDER BY id LIMIT 1'; \
         GRANT EXECUTE ON FUNCTION public.leak_any(anyelement) TO crm_base",
    );
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in [
        "SELECT l.leak_any FROM leads l",
        "SELECT leads.leak_any FROM leads",
        "SELECT x.leak_any FROM (SELECT id, phone FROM leads) x",
        "SELECT leak_any(l) FROM leads l",
    ] {
        match simple_rows(&alice, sql).await {
            Err(e) => assert!(is_refusal(&e), "{sql}: {e:?}"),
            Ok(rows) => panic!("{sql} ran: {rows}"),
        }
        match extended_rows(&alice, sql).await {
            Err(e) => assert!(is_refusal(&e), "{sql} (extended): {e:?}"),
            Ok(rows) => panic!("{sql} (extended) ran: {rows}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Keyed masks in COPY ... TO STDOUT.

async fn keyed_proxy() -> TestProxy {
    common::keyed::set_test_key();
    TestProxy::with_rules(cluster(), common::keyed::KEYED_RULES).await
}

/// Per customer id (1 to 5): (card token, e-mail hash, masked phone) as a SELECT of the
/// table returns them through pgveil.
async fn selected_masks(alice: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    alice
        .query(
            "SELECT card_number, email, phone FROM customers WHERE id <= 5 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The fields of each text or CSV line (unquoted; CSV's quoting is simple here).
fn copy_fields(text: &str, delimiter: char) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| {
            l.split(delimiter)
                .map(|f| f.trim_matches('"').to_string())
                .collect()
        })
        .collect()
}

/// `psql -c` sends the COPY as a simple query.
async fn psql_copy(p: &TestProxy, user: &str, password: &str, sql: &str) -> (bool, String, String) {
    let mut cmd = psql_cmd(&p.addr_string(), user, password, "crm");
    cmd.args(["-X", "-c", sql]);
    let out = output(cmd).await;
    (out.status.success(), stdout(&out), stderr(&out))
}

/// Keyed masks (tokenize, hash) and keyless ones in every form of `COPY ... TO STDOUT`:
/// of the table, of a column list, of a query, of a query over a view; text, CSV (with
/// a header, other delimiters, forced quotes) and binary; over the extended protocol
/// (tokio-postgres) and the simple one (psql). Each gives, row by row, the very token,
/// hash and masked phone a SELECT gives, the token decodes back to the card number, and
/// no clear value is in any output. An exempt role's COPY is the server's own output.
#[tokio::test]
async fn keyed_masks_apply_to_copy_to_stdout() {
    let p = keyed_proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let want = selected_masks(&alice).await;
    assert!(
        want.iter()
            .all(|(t, h, _)| t.starts_with("tok_") && h.len() == 32),
        "{want:?}"
    );
    // (statement, delimiter, index of id, card, email, phone in each row, binary)
    let all = "id, full_name, phone, email, national_id, card_number";
    let forms: Vec<(String, char, [usize; 4], bool)> = vec![
        ("COPY customers TO STDOUT".into(), '\t', [0, 5, 3, 2], false),
        ("COPY customers (id, card_number, email, phone) TO STDOUT (HEADER)".into(), '\t', [0, 1, 2, 3], false),
        ("COPY public.customers (phone, email, card_number, id) TO STDOUT WITH CSV HEADER".into(), ',', [3, 2, 1, 0], false),
        (format!("COPY (SELECT {all} FROM customers WHERE id <= 5 ORDER BY id) TO STDOUT"), '\t', [0, 5, 3, 2], false),
        ("COPY (SELECT c.id, c.card_number AS card, c.email, c.phone FROM customers c WHERE c.id <= 5 ORDER BY c.id) TO STDOUT (FORMAT csv, DELIMITER ';', FORCE_QUOTE (card, email))".into(), ';', [0, 1, 2, 3], false),
        ("COPY (SELECT * FROM keyed_copy_view WHERE id <= 5 ORDER BY id) TO STDOUT (FORMAT csv)".into(), ',', [0, 5, 3, 2], false),
        ("COPY (SELECT id::text, card_number, email, phone FROM customers WHERE id <= 5 ORDER BY id) TO STDOUT (FORMAT binary)".into(), ' ', [0, 1, 2, 3], true),
        ("COPY (SELECT id, card_number, email, phone FROM customers WHERE id <= 5 ORDER BY id) TO STDOUT (NULL '\\N', DELIMITER '|')".into(), '|', [0, 1, 2, 3], false),
    ];
    for (sql, delimiter, [id, card, email, phone], binary) in &forms {
        let check = |rows: Vec<Vec<String>>, how: &str| {
            if sql.contains("HEADER") {
                // The column names, untouched.
                assert_eq!(rows[0][*email], "email", "{sql} ({how})");
            }
            let rows: Vec<_> = rows.into_iter().filter(|r| r[*id] != "id").collect();
            let mut seen = 0;
            for r in &rows {
                let Ok(n) = r[*id].parse::<usize>() else {
                    panic!("{sql} ({how}): no id in {r:?}");
                };
                assert_no_secret(&r.join("|"), sql);
                if n <= 5 {
                    let (t, h, ph) = &want[n - 1];
                    assert_eq!(
                        (&r[*card], &r[*email], &r[*phone]),
                        (t, h, ph),
                        "{sql} ({how})"
                    );
                    seen += 1;
                }
            }
            assert_eq!(seen, 5, "{sql} ({how}): {rows:?}");
        };
        // Nothing in flight: a backslash in a literal reads as the server reads it.
        simple_rows(&alice, "SELECT 1").await.unwrap();
        let data = copy_bytes(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let rows = if *binary {
            binary_copy_fields(&data)
        } else {
            copy_fields(&String::from_utf8(data).unwrap(), *delimiter)
        };
        check(rows, "extended");
        if !binary {
            let (ok, out, err) = psql_copy(&p, "alice", "alice_pw", sql).await;
            assert!(ok, "{sql} (psql): {err}");
            check(copy_fields(&out, *delimiter), "simple");
        }
    }
    // The token decodes back to the card number.
    let card = cluster().psql_super("crm", "SELECT card_number FROM customers WHERE id = 1");
    let out = common::pgveil(&[
        "token",
        "decode",
        "--key-env",
        "PGVEIL_TEST_TOKEN_KEY",
        &want[0].0,
    ]);
    assert!(out.status.success(), "{}", common::output_text(&out));
    assert_eq!(stdout(&out).trim(), card.trim());
    // An exempt role gets the server's own bytes.
    let admin = p.connect("crm_admin", "admin_pw").await;
    let sql =
        "COPY (SELECT id, card_number, email FROM customers ORDER BY id) TO STDOUT (FORMAT csv)";
    let through = copy_bytes(&admin, sql).await.unwrap();
    let direct = cluster().psql_super("crm", sql);
    assert_eq!(String::from_utf8(through).unwrap().trim(), direct.trim());
}

/// What must stay refused or withheld: a keyed column computed on, sorted or filtered
/// inside the COPY's query, a COPY to a file, options under which a masked value could
/// pass for NULL, encodings whose rows pgveil cannot read, a COPY of masked columns inside
/// a string of several statements. The session stays usable after each; a COPY inside a
/// transaction block behaves as on the server (its error aborts the block).
#[tokio::test]
async fn keyed_copy_forms_that_cannot_be_masked_stay_refused() {
    let p = keyed_proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    for sql in [
        "COPY (SELECT upper(card_number) FROM customers) TO STDOUT",
        "COPY (SELECT card_number || '' FROM customers) TO STDOUT",
        "COPY (SELECT id FROM customers ORDER BY card_number) TO STDOUT",
        "COPY (SELECT card_number FROM customers ORDER BY 1) TO STDOUT",
        "COPY (SELECT DISTINCT email FROM customers) TO STDOUT",
        "COPY (SELECT id FROM customers WHERE email LIKE 'user1%') TO STDOUT",
        "COPY (SELECT card_number FROM customers UNION SELECT 'x') TO STDOUT",
        "COPY (SELECT c FROM customers c) TO STDOUT",
        "COPY (SELECT row_to_json(c) FROM customers c) TO STDOUT",
        "COPY (SELECT x.k FROM (SELECT card_number AS k FROM customers ORDER BY 1) x) TO STDOUT",
        "COPY (SELECT card_number FROM customers) TO '/tmp/pgveil_stolen'",
        "COPY (SELECT card_number FROM customers) TO PROGRAM 'cat'",
        "COPY customers TO '/tmp/pgveil_stolen'",
        "COPY (SELECT card_number FROM customers) TO STDOUT (NULL '4111')",
        "COPY (SELECT email FROM customers) TO STDOUT (NULL '')",
        "COPY (SELECT card_number FROM customers) TO STDOUT (ENCODING 'SJIS')",
        "COPY (SELECT card_number FROM customers) TO STDOUT (FORMAT csv, FORCE_NOT_NULL (card_number))",
    ] {
        let e = copy_bytes(&alice, sql).await.unwrap_err();
        assert!(is_refusal(&e), "{sql}: {e:?}");
        let (ok, out, err) = psql_copy(&p, "alice", "alice_pw", sql).await;
        assert!(!ok && err.contains("pgveil:"), "{sql} (psql): {out} {err}");
        assert_no_secret(&out, sql);
        assert_eq!(simple_rows(&alice, "SELECT 1").await.unwrap(), "1|\n");
    }
    // Several statements: the COPY's rows could not be described ahead of it.
    let (ok, out, err) = psql_copy(
        &p,
        "alice",
        "alice_pw",
        "SELECT 1; COPY (SELECT card_number FROM customers) TO STDOUT",
    )
    .await;
    assert!(!ok && err.contains("pgveil:"), "{out} {err}");
    assert_no_secret(&out, "multi-statement COPY");
    // A client_encoding whose text pgveil cannot read: withheld; binary still works.
    alice
        .batch_execute("SET client_encoding = 'SJIS'")
        .await
        .unwrap();
    let e = copy_bytes(&alice, "COPY (SELECT card_number FROM customers) TO STDOUT")
        .await
        .unwrap_err();
    assert!(is_refusal(&e), "{e:?}");
    let data = copy_bytes(
        &alice,
        "COPY (SELECT id, card_number FROM customers WHERE id = 1) TO STDOUT (FORMAT binary)",
    )
    .await
    .unwrap();
    let rows = binary_copy_fields(&data);
    assert!(rows[0][1].starts_with("tok_"), "{rows:?}");
    alice.batch_execute("RESET client_encoding").await.unwrap();
    // Inside a transaction block: the COPY runs in the block; a COPY the server refuses
    // fails as it would directly, and the block is aborted.
    alice.batch_execute("BEGIN").await.unwrap();
    let data = copy_bytes(
        &alice,
        "COPY (SELECT id, card_number FROM customers WHERE id = 1) TO STDOUT",
    )
    .await
    .unwrap();
    assert!(String::from_utf8(data).unwrap().starts_with("1\ttok_"));
    let e = copy_bytes(
        &alice,
        "COPY (SELECT card_number, no_such_column FROM customers) TO STDOUT",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42703"), "{e:?}");
    let e = alice.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e:?}");
    alice.batch_execute("ROLLBACK").await.unwrap();
    let (ok, _, err) = psql_copy(
        &p,
        "alice",
        "alice_pw",
        "COPY (SELECT card_number, no_such_column FROM customers) TO STDOUT",
    )
    .await;
    assert!(!ok && err.contains("no_such_column"), "{err}");
}

/// Views over views over the masked table (two and three levels, a column renamed on the
/// way): a keyed column returned bare at every level is masked in flight with the token a
/// SELECT of the table gives, in a SELECT, a cursor's FETCH and a COPY, over both
/// protocols. A level that computes on it, sorts, filters or de-duplicates by it (in a view
/// or in the statement, under any name it takes) stays refused.
#[tokio::test]
async fn keyed_masks_apply_through_views_over_views() {
    let (p, _d) = proxy().await;
    let alice = p.connect("alice", "alice_pw").await;
    let tokens: Vec<String> = alice
        .query(
            "SELECT card_number FROM customers WHERE id <= 3 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let has_tokens = |text: &str, what: &str| {
        assert_no_secret(text, what);
        for t in &tokens {
            assert!(text.contains(t.as_str()), "{what}: {t} not in {text}");
        }
    };
    for sql in [
        "SELECT * FROM keyed_view_2 WHERE id <= 3 ORDER BY id",
        "SELECT id, card FROM keyed_view_3 WHERE id <= 3 ORDER BY id",
        "SELECT v.card AS c, v.phone FROM keyed_view_3 v WHERE v.id <= 3 ORDER BY v.id",
        "SELECT x.card FROM (SELECT id, card FROM keyed_view_3) x WHERE x.id <= 3 ORDER BY x.id",
        "SELECT x.c FROM (SELECT id, card_number AS c FROM customer_view) x WHERE x.id <= 3 ORDER BY x.id",
    ] {
        let rows = simple_rows(&alice, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        has_tokens(&rows, sql);
        let rows = alice
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let text: Vec<String> = rows
            .iter()
            .flat_map(|r| (0..r.len()).filter_map(|i| r.try_get::<_, String>(i).ok()))
            .collect();
        has_tokens(&text.join("|"), sql);
    }
    let copied = copy_rows(
        &alice,
        "COPY (SELECT id, card FROM keyed_view_3 WHERE id <= 3 ORDER BY id) TO STDOUT",
    )
    .await
    .unwrap();
    has_tokens(&copied, "COPY over a view over a view");
    alice.batch_execute("BEGIN").await.unwrap();
    alice
        .batch_execute(
            "DECLARE k CURSOR FOR SELECT id, card FROM keyed_view_3 WHERE id <= 3 ORDER BY id",
        )
        .await
        .unwrap();
    let fetched = simple_rows(&alice, "FETCH 3 FROM k").await.unwrap();
    has_tokens(&fetched, "FETCH over a view over a view");
    alice.batch_execute("COMMIT").await.unwrap();
    for sql in [
        "SELECT card FROM keyed_view_computed",
        "SELECT card FROM keyed_view_sorted",
        "SELECT card FROM keyed_view_filtered",
        "SELECT card FROM keyed_view_distinct",
        "SELECT upper(card) FROM keyed_view_3",
        "SELECT card FROM keyed_view_3 ORDER BY card",
        "SELECT id FROM keyed_view_3 WHERE card LIKE '4111%'",
        "SELECT card_number FROM keyed_view_2 ORDER BY 1",
        "SELECT x.c FROM (SELECT y.card AS c FROM (SELECT card FROM keyed_view_3) y) x ORDER BY x.c",
        "SELECT * FROM (SELECT v.card_number AS k FROM keyed_view_2 v) x WHERE x.k LIKE '4%'",
        "SELECT x.k FROM (SELECT v.card AS k FROM keyed_view_3 v WHERE v.card > '4') x",
        "SELECT x.k FROM (SELECT max(v.card) AS k FROM keyed_view_3 v) x",
        "SELECT x.k FROM (SELECT v.card AS k FROM keyed_view_3 v GROUP BY v.card) x",
        "SELECT a.card FROM keyed_view_3 a JOIN keyed_view_2 b ON a.card = b.card_number",
        "SELECT count(*) FROM keyed_view_3 GROUP BY card",
        "SELECT x FROM (SELECT card FROM keyed_view_3) x",
    ] {
        let e = simple_rows(&alice, sql).await.unwrap_err();
        assert!(is_refusal(&e), "{sql}: {e:?}");
        let e = alice.query(sql, &[]).await.unwrap_err();
        assert!(is_refusal(&e), "{sql} (extended): {e:?}");
    }
}
