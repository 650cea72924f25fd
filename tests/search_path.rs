//! pgveil's own SQL runs on the user's connection, under a search_path the user chooses
//! (a startup option, `SET`, a per-role or per-database setting). A user who can create
//! objects in any schema can put operators, types and casts there that shadow the
//! catalog's. Here such a user (mallory, who owns schema `mall`) shadows every comparison
//! operator for the types pgveil's queries compare with one that is always true, and the
//! types pgveil casts to with ones whose cast from the real type raises the value it
//! receives. Masks, identity and the admin console must hold whichever way the search_path
//! is set.

mod common;

use common::{stderr, ClusterOptions, PgCluster, TestProxy};

const RULES: &str = r#"
[settings]
admin_roles = ["crm_admin"]

[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "public.customers.balance"
function = "round"
step = 1000
unmasked_for = ["crm_admin"]
"#;

const TYPES: [&str; 10] = [
    "oid", "name", "text", "\"char\"", "int2", "int4", "int8", "bool", "regclass", "numeric",
];
const OPERATORS: [&str; 10] = ["=", "<>", "<", ">", "<=", ">=", "~~", "!~~", "~", "!~"];

/// Mallory's schema: every operator above for every type pair above, always true; and
/// types `mall.text` and `mall.numeric` whose casts from the real types raise the value.
fn hostile_schema() -> String {
    let mut sql = String::from(
        "CREATE FUNCTION mall.yes(anyelement, anyelement) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT true';\n",
    );
    for (i, t) in TYPES.iter().enumerate() {
        for (j, u) in TYPES.iter().enumerate() {
            sql.push_str(&format!(
                "CREATE FUNCTION mall.yes_{i}_{j}(pg_catalog.{t}, pg_catalog.{u}) RETURNS bool \
                 LANGUAGE sql IMMUTABLE AS 'SELECT true';\n",
                t = t.trim_matches('"'),
                u = u.trim_matches('"'),
            ));
            for op in OPERATORS {
                sql.push_str(&format!(
                    "CREATE OPERATOR mall.{op} (LEFTARG = pg_catalog.{t}, RIGHTARG = pg_catalog.{u}, \
                     FUNCTION = mall.yes_{i}_{j});\n",
                    t = t.trim_matches('"'),
                    u = u.trim_matches('"'),
                ));
            }
        }
    }
    for (ty, from) in [("text", ["name", "text"]), ("numeric", ["numeric", "int4"])] {
        sql.push_str(&format!(
            "CREATE TYPE mall.{ty} AS (leaked pg_catalog.text);\n"
        ));
        for f in from {
            sql.push_str(&format!(
                "CREATE FUNCTION mall.leak_{ty}_{f}(v pg_catalog.{f}) RETURNS mall.{ty} LANGUAGE plpgsql AS \
                 $$BEGIN RAISE EXCEPTION 'LEAKED<%>', v; END$$;\n\
                 CREATE CAST (pg_catalog.{f} AS mall.{ty}) WITH FUNCTION mall.leak_{ty}_{f}(pg_catalog.{f}) AS IMPLICIT;\n"
            ));
        }
    }
    sql
}

fn cluster() -> PgCluster {
    let c = PgCluster::start(ClusterOptions::default());
    c.psql_super(
        "crm",
        "CREATE ROLE mallory LOGIN PASSWORD 'mallory_pw' IN ROLE crm_support; \
         CREATE SCHEMA mall AUTHORIZATION mallory",
    );
    let mut psql = common::psql_cmd(&c.addr(), "mallory", "mallory_pw", "crm");
    psql.args(["-c", &hostile_schema()]);
    let out = psql.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Eve shadows one operator only, the one membership is joined on.
    c.psql_super(
        "crm",
        "CREATE ROLE eve LOGIN PASSWORD 'eve_pw' IN ROLE crm_support; \
         CREATE SCHEMA evil AUTHORIZATION eve",
    );
    let mut psql = common::psql_cmd(&c.addr(), "eve", "eve_pw", "crm");
    psql.args([
        "-c",
        "CREATE FUNCTION evil.yes(oid, oid) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT true'; \
         CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.yes)",
    ]);
    let out = psql.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Frank shadows the integer comparisons with ones that are always false, and one
    // customer's phone is short: the partial mask's CASE must still pick all stars.
    c.psql_super(
        "crm",
        "CREATE ROLE frank LOGIN PASSWORD 'frank_pw' IN ROLE crm_support; \
         CREATE SCHEMA falsy AUTHORIZATION frank; \
         UPDATE customers SET phone = '5550123' WHERE id = 2",
    );
    let mut ops = String::from(
        "CREATE FUNCTION falsy.no(int4, int4) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT false';\n",
    );
    for op in OPERATORS {
        ops.push_str(&format!(
            "CREATE OPERATOR falsy.{op} (LEFTARG = int4, RIGHTARG = int4, FUNCTION = falsy.no);\n"
        ));
    }
    let mut psql = common::psql_cmd(&c.addr(), "frank", "frank_pw", "crm");
    psql.args(["-c", &ops]);
    let out = psql.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    c
}

/// No clear phone or balance (nor the leaking cast's message) in what `client` reads.
async fn holds(how: &str, client: &tokio_postgres::Client, phone: &str, balance: &str) {
    let shown = answer(client, "SHOW search_path").await;
    assert!(
        shown.starts_with("mall") || shown.starts_with("evil"),
        "{how}: {shown}"
    );
    for sql in [
        "SELECT phone, balance FROM customers WHERE id = 1",
        "SELECT phone || '' AS p, balance + 0 AS b FROM customers WHERE id = 1",
        "SELECT pg_catalog.upper(phone), balance * 1 FROM public.customers WHERE id = 1",
        "SELECT id FROM customers WHERE balance > 0 AND phone LIKE '1%' ORDER BY id LIMIT 1",
    ] {
        let got = answer(client, sql).await;
        assert!(
            !got.contains(phone) && !got.contains(balance) && !got.contains("LEAKED"),
            "{how}: {sql} read in clear: {got}"
        );
    }
    let masked = answer(client, "SELECT phone FROM customers WHERE id = 1").await;
    assert!(masked.contains("****"), "{how}: {masked}");
}

/// What a query returns, or its error's message, through `client`.
async fn answer(client: &tokio_postgres::Client, sql: &str) -> String {
    match common::simple_rows(client, sql).await {
        Ok(rows) => rows,
        Err(e) => format!(
            "ERROR {}",
            e.as_db_error()
                .map_or(e.to_string(), |d| d.message().to_string())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masks_and_identity_hold_under_a_hostile_search_path() {
    let c = cluster();
    let clear = c.psql_super("crm", "SELECT phone, balance FROM customers WHERE id = 1");
    let (phone, balance) = clear.trim().split_once('|').unwrap();
    let p = TestProxy::with_rules(&c, RULES).await;
    let hostile = "mall, pg_catalog, public";
    // Eve first: her one operator made her a member of every role before.
    let eve = common::connect(&format!(
        "{} options='-c search_path=evil,pg_catalog,public'",
        p.conn_str("eve", "eve_pw", "crm"),
    ))
    .await;
    holds("one operator", &eve, phone, balance).await;
    let frank = common::connect(&format!(
        "{} options='-c search_path=falsy,pg_catalog,public'",
        p.conn_str("frank", "frank_pw", "crm"),
    ))
    .await;
    for sql in [
        "SELECT phone || '' FROM customers WHERE id = 2",
        "SELECT pg_catalog.lower(phone) FROM customers WHERE id = 2",
    ] {
        let got = answer(&frank, sql).await;
        assert!(
            !got.contains("5550123") && got.contains("*******"),
            "always-false comparisons: {sql}: {got}"
        );
    }
    // Set three ways: a startup option, SET in the session, the role's own setting.
    let by_option = common::connect(&format!(
        "{} options='-c search_path={}'",
        p.conn_str("mallory", "mallory_pw", "crm"),
        hostile.replace(' ', "")
    ))
    .await;
    let by_set = p.connect("mallory", "mallory_pw").await;
    by_set
        .simple_query(&format!("SET search_path = {hostile}"))
        .await
        .unwrap();
    c.psql_super(
        "crm",
        &format!("ALTER ROLE mallory IN DATABASE crm SET search_path = {hostile}"),
    );
    let by_role = p.connect("mallory", "mallory_pw").await;
    for (how, client) in [
        ("option", &by_option),
        ("SET", &by_set),
        ("role setting", &by_role),
    ] {
        holds(how, client, phone, balance).await;
    }
    // The roles the proxy recorded are the user's memberships only.
    for user in ["mallory", "eve"] {
        let roles = p
            .proxy
            .sessions
            .list()
            .into_iter()
            .find(|s| s.identity.user == user)
            .unwrap()
            .identity
            .roles
            .clone();
        assert_eq!(roles, vec!["crm_base", "crm_support", user]);
    }

    // The admin console reads membership with the same query.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap().to_string();
    tokio::spawn(pgveil::admin::serve(listener, p.proxy.clone()));
    let mut cmd = common::psql_cmd(&admin, "mallory", "mallory_pw", "crm");
    cmd.env("PGSSLMODE", "disable").args(["-c", "SHOW CONFIG"]);
    let out = common::output(cmd).await;
    assert!(!out.status.success(), "mallory got into the admin console");
    p.shutdown().await;
}
