//! The recycle bin (spec section 4): rows removed by DELETE (and TRUNCATE) from a table
//! with a `[[recycle]]` rule are kept in schema `pgveil_trash` (one typed bin table per
//! recycled table) with who removed them, when and by which statement, until the table's
//! retention has passed.
//!
//! Capture happens in the database, in statement-level triggers that `pgveil trash init`
//! installs, not in a rewrite of the client's statement: a trigger also sees rows removed
//! by `ON DELETE CASCADE`, by functions and by clients that bypass pgveil, it keeps
//! `DELETE n` and `RETURNING` exactly as the server produces them, and a transition table
//! copies a 100,000-row DELETE in one set-based INSERT of the rows as they are. pgveil's guard refuses a DELETE or
//! TRUNCATE of a recycled table while its capture is not intact: a trigger missing,
//! disabled or altered, or `pgveil_trash.capture()` replaced or altered (see
//! [`crate::catalog::Catalog::recycle_bin_problem`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

use crate::config::rules::Rules;

#[derive(Debug, Error)]
pub enum TrashError {
    #[error("{0}")]
    Database(String),
    #[error("{0}")]
    Refused(String),
}

impl From<tokio_postgres::Error> for TrashError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                TrashError::Database(format!("{} (SQLSTATE {})", db.message(), db.code().code()))
            }
            None => TrashError::Database(e.to_string()),
        }
    }
}

/// The body of `pgveil_trash.capture()` (its `prosrc`) as `trash init` installs it: the
/// catalog compares the installed function's body with this text's digest.
macro_rules! capture_body {
    () => {
        r#"
DECLARE
    bin text;
    deletion bigint;
    cols text;
    missing record;
BEGIN
    SELECT t.bin INTO bin FROM pgveil_trash.tables t
    WHERE t.table_schema = TG_TABLE_SCHEMA AND t.table_name = TG_TABLE_NAME;
    IF bin IS NULL THEN
        RAISE EXCEPTION 'pgveil: %.% has no recycle bin; run pgveil trash init', TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END IF;
    FOR missing IN
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS typ FROM pg_attribute a
        WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
        AND NOT EXISTS (SELECT 1 FROM pg_attribute b
            WHERE b.attrelid = format('pgveil_trash.%I', bin)::regclass
            AND b.attname = a.attname AND NOT b.attisdropped)
    LOOP
        EXECUTE format('ALTER TABLE pgveil_trash.%I ADD COLUMN %I %s', bin, missing.attname, missing.typ);
    END LOOP;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols FROM pg_attribute a
    WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
    deletion := nextval('pgveil_trash.ids');
    INSERT INTO pgveil_trash.deletions (id, table_schema, table_name, operation, statement)
    VALUES (deletion, TG_TABLE_SCHEMA, TG_TABLE_NAME, lower(TG_OP), current_query());
    IF TG_OP = 'DELETE' THEN
        EXECUTE format('INSERT INTO pgveil_trash.%I (pgveil_deletion, %s) SELECT $1, %s FROM pgveil_trash_old',
                       bin, cols, cols) USING deletion;
    ELSE
        EXECUTE format('INSERT INTO pgveil_trash.%I (pgveil_deletion, %s) SELECT $1, %s FROM ONLY %I.%I',
                       bin, cols, cols, TG_TABLE_SCHEMA, TG_TABLE_NAME) USING deletion;
    END IF;
    RETURN NULL;
END
"#
    };
}

/// The `search_path` `pgveil_trash.capture()` runs with.
macro_rules! capture_search_path {
    () => {
        "pg_catalog, pg_temp"
    };
}

/// The schema, the registry of recycled tables, the deletion log, and the capture and
/// purge functions. Idempotent.
///
/// Each recycled table has its own bin table `pgveil_trash.t_<oid>` with the table's
/// columns (typed, copied as they are: no per-row conversion, which is what keeps a large
/// DELETE cheap) plus `pgveil_id` (the kept row's id) and `pgveil_deletion` (the
/// deletion event in `pgveil_trash.deletions`: when, by whom, which statement). A column
/// added to the table later is added to its bin at the next capture; the bin never loses
/// one.
const SCHEMA_SQL: &str = concat!(
    r#"
CREATE SCHEMA IF NOT EXISTS pgveil_trash;
REVOKE ALL ON SCHEMA pgveil_trash FROM PUBLIC;
GRANT USAGE ON SCHEMA pgveil_trash TO PUBLIC;
CREATE SEQUENCE IF NOT EXISTS pgveil_trash.ids;
CREATE TABLE IF NOT EXISTS pgveil_trash.tables (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    bin text NOT NULL UNIQUE,
    retention_days integer NOT NULL CHECK (retention_days > 0),
    PRIMARY KEY (table_schema, table_name)
);
CREATE TABLE IF NOT EXISTS pgveil_trash.deletions (
    id bigint PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    deleted_by text NOT NULL DEFAULT session_user,
    txid bigint NOT NULL DEFAULT txid_current(),
    statement text
);
CREATE INDEX IF NOT EXISTS deletions_by_time ON pgveil_trash.deletions (deleted_at);
REVOKE ALL ON ALL TABLES IN SCHEMA pgveil_trash FROM PUBLIC;
REVOKE ALL ON SEQUENCE pgveil_trash.ids FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgveil_trash.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = "#,
    capture_search_path!(),
    " AS $fn$",
    capture_body!(),
    r#"$fn$;
REVOKE ALL ON FUNCTION pgveil_trash.capture() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgveil_trash.purge() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    rec record;
    n bigint;
    total bigint := 0;
BEGIN
    FOR rec IN SELECT bin, retention_days FROM pgveil_trash.tables LOOP
        EXECUTE format('DELETE FROM pgveil_trash.%I b USING pgveil_trash.deletions d '
                       'WHERE b.pgveil_deletion = d.id AND d.deleted_at < now() - make_interval(days => %s)',
                       rec.bin, rec.retention_days);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    DELETE FROM pgveil_trash.deletions d WHERE d.deleted_at < now() - make_interval(days => coalesce(
        (SELECT t.retention_days FROM pgveil_trash.tables t
         WHERE t.table_schema = d.table_schema AND t.table_name = d.table_name), 30));
    RETURN total;
END
$fn$;
GRANT EXECUTE ON FUNCTION pgveil_trash.purge() TO PUBLIC;
"#
);

/// The version of the recycle bin's schema this pgveil installs and works with;
/// `pgveil_trash.meta` holds the installed one (`schema_version`). Version 1 is the schema
/// before it carried a version (no `meta` table).
pub const SCHEMA_VERSION: i32 = 2;

/// The steps that bring an installed bin from each version to the next, in order: the
/// SQL that turns version `from` into `from + 1`. `trash init` runs those the installed
/// bin needs, in its one transaction.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS pgveil_trash.meta (key text PRIMARY KEY, value text NOT NULL); \
     REVOKE ALL ON pgveil_trash.meta FROM PUBLIC; \
     GRANT SELECT ON pgveil_trash.meta TO PUBLIC",
)];

/// The installed bin's schema version: `None` when no bin is installed.
pub async fn installed_version(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<i32>, TrashError> {
    let row = client
        .query_one(
            "SELECT pg_catalog.to_regnamespace('pgveil_trash') IS NOT NULL, \
             pg_catalog.to_regclass('pgveil_trash.meta') IS NOT NULL",
            &[],
        )
        .await?;
    let (schema, meta): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    if !schema {
        return Ok(None);
    }
    if !meta {
        return Ok(Some(1));
    }
    let version = client
        .query_opt(
            "SELECT value FROM pgveil_trash.meta WHERE key = 'schema_version'",
            &[],
        )
        .await?
        .map(|r| r.try_get::<_, String>(0))
        .transpose()?;
    match version.map(|v| v.parse::<i32>()) {
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(_)) => Err(TrashError::Refused(
            "pgveil_trash.meta holds a schema_version that is not a number".into(),
        )),
        None => Ok(Some(1)),
    }
}

/// Brings the bin's schema to [`SCHEMA_VERSION`] (inside `init`'s transaction, before the
/// idempotent install): what it did, for the report. A bin of a newer pgveil is refused.
async fn upgrade(tx: &tokio_postgres::Transaction<'_>) -> Result<String, TrashError> {
    let installed = installed_version(tx).await?;
    if let Some(v) = installed.filter(|v| *v > SCHEMA_VERSION) {
        return Err(TrashError::Refused(format!(
            "the recycle bin was set up by a newer pgveil (schema version {v}; this pgveil knows up to {SCHEMA_VERSION}): run that version's trash init, or upgrade pgveil"
        )));
    }
    tx.batch_execute(SCHEMA_SQL).await?;
    let mut version = installed.unwrap_or(1);
    while version < SCHEMA_VERSION {
        let Some((_, sql)) = MIGRATIONS.iter().find(|(from, _)| *from == version) else {
            return Err(TrashError::Refused(format!(
                "no upgrade of the recycle bin from schema version {version}"
            )));
        };
        tx.batch_execute(sql).await?;
        version += 1;
    }
    tx.execute(
        "INSERT INTO pgveil_trash.meta VALUES ('schema_version', $1) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&SCHEMA_VERSION.to_string()],
    )
    .await?;
    Ok(match installed {
        None => format!("recycle bin schema version {SCHEMA_VERSION} installed\n"),
        Some(v) if v < SCHEMA_VERSION => {
            format!("recycle bin schema upgraded from version {v} to {SCHEMA_VERSION}\n")
        }
        Some(_) => String::new(),
    })
}

/// The capture triggers `trash init` installs on each recycled table.
pub const DELETE_TRIGGER: &str = "pgveil_trash_delete";
pub const TRUNCATE_TRIGGER: &str = "pgveil_trash_truncate";

/// `pg_trigger.tgtype` of [`DELETE_TRIGGER`] as `trash init` creates it: `AFTER DELETE ...
/// FOR EACH STATEMENT` is `TRIGGER_TYPE_DELETE` (1 << 3) alone (no `TRIGGER_TYPE_ROW`
/// 1 << 0, `TRIGGER_TYPE_BEFORE` 1 << 1 or `TRIGGER_TYPE_INSTEAD` 1 << 6 bit).
pub const DELETE_TRIGGER_TYPE: i16 = 1 << 3;
/// `pg_trigger.tgtype` of [`TRUNCATE_TRIGGER`]: `BEFORE TRUNCATE ... FOR EACH STATEMENT`
/// is `TRIGGER_TYPE_BEFORE` (1 << 1) with `TRIGGER_TYPE_TRUNCATE` (1 << 5).
pub const TRUNCATE_TRIGGER_TYPE: i16 = (1 << 1) | (1 << 5);
/// The transition table of [`DELETE_TRIGGER`] (`REFERENCING OLD TABLE AS ...`), which
/// [`CAPTURE_BODY`] reads the deleted rows from.
pub const TRANSITION_TABLE: &str = "pgveil_trash_old";

/// Schema and name of the function both capture triggers call.
pub const CAPTURE_FUNCTION: (&str, &str) = ("pgveil_trash", "capture");
/// The body `trash init` installs for `pgveil_trash.capture()`, as `pg_proc.prosrc` holds it.
pub const CAPTURE_BODY: &str = capture_body!();
/// The language of `pgveil_trash.capture()`.
pub const CAPTURE_LANGUAGE: &str = "plpgsql";
/// The settings of `pgveil_trash.capture()` as `pg_proc.proconfig` holds them (one entry).
pub const CAPTURE_CONFIG: &str = concat!("search_path=", capture_search_path!());

/// SHA-256 of [`CAPTURE_BODY`], lowercase hex: what the catalog compares the installed
/// body's digest with.
pub fn capture_body_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        use sha2::Digest;
        crate::audit::record::hex(&sha2::Sha256::digest(CAPTURE_BODY.as_bytes()))
    })
}

/// What `serve` runs once a day per database (any session may call it: it only removes
/// rows past their retention).
pub const PURGE_SQL: &str = "SELECT pgveil_trash.purge()";

/// `"name"` as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// `pgveil trash init`: installs the bin and the triggers of every `[[recycle]]` table,
/// and removes pgveil's triggers from tables no longer recycled. Returns a report.
///
/// It also puts back a capture that was altered since: `pgveil_trash.capture()`'s body,
/// `SECURITY DEFINER` and settings (`CREATE OR REPLACE`), its owner (the owner of schema
/// `pgveil_trash`), and each table's two triggers as init creates them (`CREATE OR
/// REPLACE TRIGGER` replaces function, timing, events, level and `WHEN`; a constraint
/// trigger of the same name, which it cannot replace, is dropped first), enabled.
pub async fn init(client: &mut Client, rules: &Rules) -> Result<String, TrashError> {
    let tx = client.transaction().await?;
    let upgraded = upgrade(&tx).await?;
    // CREATE OR REPLACE keeps the function's owner: give it back to the bin's.
    let owners = tx
        .query_one(
            "SELECT pg_catalog.pg_get_userbyid(p.proowner)::text, \
             pg_catalog.pg_get_userbyid(n.nspowner)::text \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0",
            &[&CAPTURE_FUNCTION.0, &CAPTURE_FUNCTION.1],
        )
        .await?;
    let (owner, bin_owner): (String, String) = (owners.try_get(0)?, owners.try_get(1)?);
    if owner != bin_owner {
        tx.batch_execute(&format!(
            "ALTER FUNCTION pgveil_trash.capture() OWNER TO {}",
            quote_ident(&bin_owner)
        ))
        .await?;
    }
    let mut report = upgraded;
    for r in &rules.recycles {
        let exists = tx
            .query_opt(
                "SELECT c.relkind::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
                 ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&r.schema, &r.table],
            )
            .await?;
        match exists.map(|row| row.get::<_, String>(0)) {
            Some(kind) if kind == "r" || kind == "p" => {}
            Some(_) => {
                return Err(TrashError::Refused(format!(
                    "{}: {}.{} is not a table",
                    r.origin, r.schema, r.table
                )))
            }
            None => {
                return Err(TrashError::Refused(format!(
                    "{}: table {}.{} does not exist",
                    r.origin, r.schema, r.table
                )))
            }
        }
        let table = qualified(&r.schema, &r.table);
        let bin: String = tx
            .query_one(
                "INSERT INTO pgveil_trash.tables VALUES ($1, $2, 't_' || $4::text::regclass::oid, $3) \
                 ON CONFLICT (table_schema, table_name) \
                 DO UPDATE SET retention_days = EXCLUDED.retention_days RETURNING bin",
                &[&r.schema, &r.table, &(r.retention_days as i32), &table],
            )
            .await?
            .get(0);
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS pgveil_trash.{} (\
             pgveil_id bigint NOT NULL DEFAULT nextval('pgveil_trash.ids'), \
             pgveil_deletion bigint NOT NULL, LIKE {table}); \
             REVOKE ALL ON pgveil_trash.{} FROM PUBLIC",
            quote_ident(&bin),
            quote_ident(&bin)
        ))
        .await?;
        let constraint_triggers = tx
            .query(
                "SELECT tgname::text FROM pg_catalog.pg_trigger \
                 WHERE tgrelid = $1::text::regclass AND tgname IN ($2, $3) AND tgconstraint <> 0",
                &[&table, &DELETE_TRIGGER, &TRUNCATE_TRIGGER],
            )
            .await?;
        for row in constraint_triggers {
            let name: String = row.try_get(0)?;
            tx.batch_execute(&format!("DROP TRIGGER {} ON {table}", quote_ident(&name)))
                .await?;
        }
        tx.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER {DELETE_TRIGGER} AFTER DELETE ON {table} \
             REFERENCING OLD TABLE AS {TRANSITION_TABLE} FOR EACH STATEMENT \
             EXECUTE FUNCTION pgveil_trash.capture(); \
             CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION pgveil_trash.capture(); \
             ALTER TABLE {table} ENABLE TRIGGER {DELETE_TRIGGER}; \
             ALTER TABLE {table} ENABLE TRIGGER {TRUNCATE_TRIGGER}"
        ))
        .await?;
        let _ = writeln!(
            report,
            "recycling {}.{} (retention {} days)",
            r.schema, r.table, r.retention_days
        );
    }
    let installed = tx
        .query(
            "SELECT DISTINCT n.nspname::text, c.relname::text FROM pg_catalog.pg_trigger t \
             JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgname IN ($1, $2)",
            &[&DELETE_TRIGGER, &TRUNCATE_TRIGGER],
        )
        .await?;
    for row in installed {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        if rules
            .recycles
            .iter()
            .any(|r| r.schema == schema && r.table == table)
        {
            continue;
        }
        let name = qualified(&schema, &table);
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {DELETE_TRIGGER} ON {name}; \
             DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {name}"
        ))
        .await?;

        let _ = writeln!(
            report,
            "no longer recycling {schema}.{table} (its kept rows stay until purged)"
        );
    }
    tx.commit().await?;
    if rules.recycles.is_empty() {
        report.push_str("no [[recycle]] rules: nothing to recycle\n");
    }
    Ok(report)
}

/// Which kept rows a command is about.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// `[schema.]table`; schema defaults to public.
    pub table: Option<String>,
    /// RFC 3339 or anything PostgreSQL reads as timestamptz.
    pub since: Option<String>,
    pub until: Option<String>,
    pub ids: Vec<i64>,
}

impl Selection {
    /// A WHERE clause over a bin `b` joined to its deletions `d`, with its text parameters.
    fn filter(&self) -> (String, Vec<String>) {
        let mut conds = vec!["true".to_string()];
        let mut params = Vec::new();
        let param = |v: String, params: &mut Vec<String>| {
            params.push(v);
            format!("${}", params.len())
        };
        if let Some(t) = &self.table {
            let (schema, table) = match t.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => ("public".to_string(), t.clone()),
            };
            let s = param(schema, &mut params);
            let t = param(table, &mut params);
            conds.push(format!("d.table_schema = {s} AND d.table_name = {t}"));
        }
        if let Some(since) = &self.since {
            let p = param(since.clone(), &mut params);
            conds.push(format!("d.deleted_at >= {p}::text::timestamptz"));
        }
        if let Some(until) = &self.until {
            let p = param(until.clone(), &mut params);
            conds.push(format!("d.deleted_at <= {p}::text::timestamptz"));
        }
        if !self.ids.is_empty() {
            let list: Vec<String> = self.ids.iter().map(i64::to_string).collect();
            let p = param(format!("{{{}}}", list.join(",")), &mut params);
            conds.push(format!("b.pgveil_id = ANY ({p}::text::bigint[])"));
        }
        (conds.join(" AND "), params)
    }
}

/// One kept row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Kept {
    pub id: i64,
    pub table: String,
    pub operation: String,
    pub deleted_at: String,
    pub deleted_by: String,
    pub statement: Option<String>,
    pub row: serde_json::Value,
}

/// The bins: (schema, table, bin table), in table order.
async fn bins(client: &Client) -> Result<Vec<(String, String, String)>, TrashError> {
    let rows = client
        .query(
            "SELECT table_schema, table_name, bin FROM pgveil_trash.tables ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

fn params_of(params: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// `pgveil trash list`: kept rows, oldest first.
pub async fn list(client: &Client, sel: &Selection, limit: i64) -> Result<Vec<Kept>, TrashError> {
    let (filter, params) = sel.filter();
    let mut out = Vec::new();
    for (_, _, bin) in bins(client).await? {
        let sql = format!(
            "SELECT b.pgveil_id, d.table_schema || '.' || d.table_name, d.operation, \
             to_char(d.deleted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), d.deleted_by, \
             d.statement, (to_jsonb(b) - 'pgveil_id' - 'pgveil_deletion')::text \
             FROM pgveil_trash.{} b JOIN pgveil_trash.deletions d ON d.id = b.pgveil_deletion \
             WHERE {filter} ORDER BY b.pgveil_id LIMIT {limit}",
            quote_ident(&bin)
        );
        for r in client.query(&sql, &params_of(&params)).await? {
            out.push(Kept {
                id: r.get(0),
                table: r.get(1),
                operation: r.get(2),
                deleted_at: r.get(3),
                deleted_by: r.get(4),
                statement: r.get(5),
                row: serde_json::from_str(r.get::<_, &str>(6)).unwrap_or(serde_json::Value::Null),
            });
        }
    }
    out.sort_by_key(|k| k.id);
    out.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(out)
}

/// `pgveil trash purge`: removes kept rows past their table's retention, or older than
/// `older_than_days` when given. Returns how many.
pub async fn purge(client: &Client, older_than_days: Option<u32>) -> Result<i64, TrashError> {
    let row = match older_than_days {
        None => client.query_one(PURGE_SQL, &[]).await?,
        Some(days) => {
            let mut total = 0i64;
            for (_, _, bin) in bins(client).await? {
                total += client
                    .execute(
                        &format!(
                            "DELETE FROM pgveil_trash.{} b USING pgveil_trash.deletions d \
                             WHERE b.pgveil_deletion = d.id AND d.deleted_at < now() - make_interval(days => $1)",
                            quote_ident(&bin)
                        ),
                        &[&(days as i32)],
                    )
                    .await? as i64;
            }
            client
                .execute(
                    "DELETE FROM pgveil_trash.deletions WHERE deleted_at < now() - make_interval(days => $1)",
                    &[&(days as i32)],
                )
                .await?;
            return Ok(total);
        }
    };
    Ok(row.get(0))
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct Restored {
    pub by_table: BTreeMap<String, usize>,
    /// Rows not restored, with why (only with `skip_conflicts`).
    pub skipped: Vec<String>,
}

/// A kept row: its id and its bin.
type KeptRow = (i64, String);

/// `pgveil trash restore`: puts the selected rows back into their tables and removes
/// them from the bin, in one transaction. A row whose key exists again in its table is
/// not overwritten: the restore is refused, naming each such row, unless
/// `skip_conflicts`, which restores the others. Rows go back parents first, whatever
/// order they were deleted in.
///
/// Nor is a row put under a parent that is not its own: when a foreign key of a restored
/// row points at a key whose original row is kept in the referenced table's bin (deleted
/// in the same transaction as the row or after it) and that kept row is not restored
/// too, the key is held by another row now. That is a conflict as well, found after the
/// inserts and before anything is committed; with `skip_conflicts` the restore is run
/// again without such rows (their own children then wait for a parent that does not
/// come back, and stay in the bin too), until no restored row is under a parent not its
/// own.
pub async fn restore(
    client: &mut Client,
    sel: &Selection,
    skip_conflicts: bool,
) -> Result<Restored, TrashError> {
    if sel.table.is_none() && sel.ids.is_empty() && sel.since.is_none() && sel.until.is_none() {
        return Err(TrashError::Refused(
            "name the rows to restore: --table, --id, --since or --until".into(),
        ));
    }
    let all_bins = bins(client).await?;
    let tx = client.transaction().await?;
    let (filter, params) = sel.filter();
    // Pending rows by table: (kept row id, its bin).
    let mut pending: BTreeMap<(String, String), Vec<KeptRow>> = BTreeMap::new();
    for (schema, table, bin) in all_bins {
        let rows = tx
            .query(
                &format!(
                    "SELECT b.pgveil_id FROM pgveil_trash.{} b \
                     JOIN pgveil_trash.deletions d ON d.id = b.pgveil_deletion \
                     WHERE {filter} ORDER BY b.pgveil_id FOR UPDATE OF b",
                    quote_ident(&bin)
                ),
                &params_of(&params),
            )
            .await?;
        for r in rows {
            pending
                .entry((schema.clone(), table.clone()))
                .or_default()
                .push((r.get(0), bin.clone()));
        }
    }
    if pending.is_empty() {
        return Err(TrashError::Refused("no kept rows match".into()));
    }
    let selected: BTreeSet<KeptRow> = pending.values().flatten().cloned().collect();
    let fks = recycled_foreign_keys(&tx).await?;
    // Each run restores what it can after this savepoint; a run that put rows under a
    // parent not their own is rolled back to it and, with skip_conflicts, run again
    // without them, until none is.
    tx.batch_execute("SAVEPOINT pgveil_restore_run").await?;
    let mut excluded: BTreeSet<KeptRow> = BTreeSet::new();
    let mut not_their_parent: Vec<String> = Vec::new();
    let run = loop {
        let run = restore_passes(&tx, &pending, &excluded).await?;
        let forged = forged_relationships(&tx, &fks, &run.done, &selected).await?;
        if forged.is_empty() {
            break run;
        }
        if !skip_conflicts {
            let mut conflicts = run.conflicts;
            conflicts.extend(forged.into_iter().map(|(_, why)| why));
            tx.rollback().await?;
            return Err(refused(&conflicts));
        }
        tx.batch_execute("ROLLBACK TO SAVEPOINT pgveil_restore_run")
            .await?;
        for (row, why) in forged {
            excluded.insert(row);
            not_their_parent.push(why);
        }
    };
    let mut conflicts = run.conflicts;
    conflicts.extend(not_their_parent);
    if !conflicts.is_empty() && !skip_conflicts {
        tx.rollback().await?;
        return Err(refused(&conflicts));
    }
    let restored = Restored {
        by_table: run.by_table,
        skipped: conflicts,
    };
    let mut by_bin: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, bin) in &run.done {
        by_bin.entry(bin.clone()).or_default().push(id.to_string());
    }
    for (bin, ids) in by_bin {
        tx.execute(
            &format!(
                "DELETE FROM pgveil_trash.{} WHERE pgveil_id = ANY ($1::text::bigint[])",
                quote_ident(&bin)
            ),
            &[&format!("{{{}}}", ids.join(","))],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(restored)
}

fn refused(conflicts: &[String]) -> TrashError {
    TrashError::Refused(format!(
        "restore refused, nothing was restored:\n{}\n(--skip-conflicts restores the other rows)",
        conflicts.join("\n")
    ))
}

/// One run of a restore's passes.
struct Run {
    by_table: BTreeMap<String, usize>,
    /// The rows inserted.
    done: Vec<KeptRow>,
    /// The rows not inserted, with why.
    conflicts: Vec<String>,
}

/// Inserts the `pending` rows but the `excluded` ones back into their tables, in passes:
/// each pass restores what it can; rows whose parent is still in the bin wait for a
/// later pass. Stops when a pass makes no progress.
async fn restore_passes(
    tx: &Transaction<'_>,
    pending: &BTreeMap<(String, String), Vec<KeptRow>>,
    excluded: &BTreeSet<KeptRow>,
) -> Result<Run, TrashError> {
    let mut pending: BTreeMap<(String, String), Vec<KeptRow>> = pending
        .iter()
        .map(|(table, rows)| {
            let rows = rows
                .iter()
                .filter(|row| !excluded.contains(*row))
                .cloned()
                .collect();
            (table.clone(), rows)
        })
        .collect();
    let mut run = Run {
        by_table: BTreeMap::new(),
        done: Vec::new(),
        conflicts: Vec::new(),
    };
    let mut waiting_reason: BTreeMap<i64, String> = BTreeMap::new();
    loop {
        let mut progress = false;
        let tables: Vec<(String, String)> = pending.keys().cloned().collect();
        for key in tables {
            let batch = pending.remove(&key).unwrap_or_default();
            if batch.is_empty() {
                continue;
            }
            let columns = insertable_columns(tx, &key.0, &key.1, &batch[0].1).await?;
            match insert_rows(tx, &key, &columns, &batch).await? {
                Outcome::Inserted => {
                    progress = true;
                    *run.by_table
                        .entry(format!("{}.{}", key.0, key.1))
                        .or_default() += batch.len();
                    run.done.extend(batch.iter().cloned());
                }
                Outcome::Failed(_) => {
                    // Row by row: find which conflict and which wait for a parent.
                    let mut left = Vec::new();
                    for row in batch {
                        match insert_rows(tx, &key, &columns, std::slice::from_ref(&row)).await? {
                            Outcome::Inserted => {
                                progress = true;
                                *run.by_table
                                    .entry(format!("{}.{}", key.0, key.1))
                                    .or_default() += 1;
                                run.done.push(row.clone());
                            }
                            Outcome::Failed(Failure::Conflict(detail)) => run.conflicts.push(format!(
                                "kept row {} of {}.{}: {detail} Not restored: pgveil does not overwrite an existing row.",
                                row.0, key.0, key.1
                            )),
                            Outcome::Failed(Failure::Waiting(detail)) => {
                                waiting_reason.insert(row.0, detail);
                                left.push(row);
                            }
                        }
                    }
                    if !left.is_empty() {
                        pending.insert(key, left);
                    }
                }
            }
        }
        if pending.is_empty() || !progress {
            break;
        }
    }
    for ((schema, table), rows) in &pending {
        for (id, _) in rows {
            let why = waiting_reason.get(id).cloned().unwrap_or_default();
            run.conflicts.push(format!(
                "kept row {id} of {schema}.{table}: {why} Not restored: the row it references is neither in the table nor among the rows restored."
            ));
        }
    }
    Ok(run)
}

/// A foreign key from one recycled table to another (or to itself), with both bins and
/// the key's columns on each side, in the constraint's order.
struct RecycledForeignKey {
    child: String,
    child_bin: String,
    child_columns: Vec<String>,
    parent: String,
    parent_bin: String,
    parent_columns: Vec<String>,
}

/// The foreign keys, as the catalog has them now (`conkey`, `confkey`), whose table and
/// referenced table are both recycled and whose columns are all in both bins (a column
/// a bin lacks was never captured, so there is no kept value to compare).
async fn recycled_foreign_keys(
    tx: &Transaction<'_>,
) -> Result<Vec<RecycledForeignKey>, TrashError> {
    let columns = |key: &str, rel: &str| {
        format!(
            "ARRAY(SELECT a.attname::text FROM unnest(k.{key}) WITH ORDINALITY AS u(attnum, i) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.{rel} AND a.attnum = u.attnum \
             ORDER BY u.i)"
        )
    };
    let in_bin = |key: &str, rel: &str, bin: &str| {
        format!(
            "NOT EXISTS (SELECT 1 FROM unnest(k.{key}) AS u(attnum) \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.{rel} AND a.attnum = u.attnum \
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute b \
                 WHERE b.attrelid = to_regclass(format('pgveil_trash.%I', {bin}.bin)) \
                 AND b.attname = a.attname AND NOT b.attisdropped))"
        )
    };
    let sql = format!(
        "SELECT ct.table_schema || '.' || ct.table_name, ct.bin, {}, \
         pt.table_schema || '.' || pt.table_name, pt.bin, {} \
         FROM pg_catalog.pg_constraint k \
         JOIN pg_catalog.pg_class cc ON cc.oid = k.conrelid \
         JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace \
         JOIN pgveil_trash.tables ct ON ct.table_schema = cn.nspname AND ct.table_name = cc.relname \
         JOIN pg_catalog.pg_class pc ON pc.oid = k.confrelid \
         JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
         JOIN pgveil_trash.tables pt ON pt.table_schema = pn.nspname AND pt.table_name = pc.relname \
         WHERE k.contype = 'f' AND k.conparentid = 0 AND {} AND {} \
         ORDER BY 1, k.conname",
        columns("conkey", "conrelid"),
        columns("confkey", "confrelid"),
        in_bin("conkey", "conrelid", "ct"),
        in_bin("confkey", "confrelid", "pt"),
    );
    let mut out = Vec::new();
    for r in tx.query(&sql, &[]).await? {
        let fk = RecycledForeignKey {
            child: r.try_get(0)?,
            child_bin: r.try_get(1)?,
            child_columns: r.try_get(2)?,
            parent: r.try_get(3)?,
            parent_bin: r.try_get(4)?,
            parent_columns: r.try_get(5)?,
        };
        if !fk.child_columns.is_empty() && fk.child_columns.len() == fk.parent_columns.len() {
            out.push(fk);
        }
    }
    Ok(out)
}

/// Restored rows (`done`, not yet removed from their bins) that a foreign key now
/// attaches to a row that is not their parent, each with why.
///
/// A kept row's parent is the kept row of the referenced table's bin with the key its
/// foreign key holds that was deleted in the same transaction as the row or after it
/// (the earliest such, by deletion id: a cascade captures the parent first and its
/// children after it in the same transaction; a row of that key deleted in an earlier
/// transaction, before the child, was an older, unrelated one). If that kept parent is not
/// among the rows restored (not selected, or selected but its key exists again), the
/// restored row's key points at another row now: the row now holding the key.
async fn forged_relationships(
    tx: &Transaction<'_>,
    fks: &[RecycledForeignKey],
    done: &[KeptRow],
    selected: &BTreeSet<KeptRow>,
) -> Result<Vec<(KeptRow, String)>, TrashError> {
    let mut by_bin: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (id, bin) in done {
        by_bin.entry(bin.as_str()).or_default().push(*id);
    }
    let mut out: Vec<(KeptRow, String)> = Vec::new();
    for fk in fks {
        let Some(children) = by_bin.get(fk.child_bin.as_str()) else {
            continue;
        };
        let parents = by_bin
            .get(fk.parent_bin.as_str())
            .cloned()
            .unwrap_or_default();
        let on = fk
            .child_columns
            .iter()
            .zip(&fk.parent_columns)
            .map(|(c, p)| format!("bp.{} = bc.{}", quote_ident(p), quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let key = fk
            .child_columns
            .iter()
            .map(|c| format!("bc.{}::text", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT f.child, f.parent, f.key FROM (\
                 SELECT DISTINCT ON (bc.pgveil_id) bc.pgveil_id AS child, bp.pgveil_id AS parent, \
                 concat_ws(', ', {key}) AS key \
                 FROM pgveil_trash.{} bc JOIN unnest($1::bigint[]) AS r(id) ON r.id = bc.pgveil_id \
                 JOIN pgveil_trash.deletions dc ON dc.id = bc.pgveil_deletion \
                 JOIN pgveil_trash.{} bp ON {on} \
                 JOIN pgveil_trash.deletions dp ON dp.id = bp.pgveil_deletion \
                 WHERE dp.id >= dc.id OR dp.txid = dc.txid \
                 ORDER BY bc.pgveil_id, dp.id, bp.pgveil_id) f \
             WHERE NOT EXISTS (SELECT 1 FROM unnest($2::bigint[]) AS r(id) WHERE r.id = f.parent) \
             ORDER BY f.child",
            quote_ident(&fk.child_bin),
            quote_ident(&fk.parent_bin),
        );
        for r in tx.query(&sql, &[children, &parents]).await? {
            let child: i64 = r.try_get(0)?;
            let parent: i64 = r.try_get(1)?;
            let key: String = r.try_get(2)?;
            let state = if selected.contains(&(parent, fk.parent_bin.clone())) {
                "is in this restore but could not be restored"
            } else {
                "is not in this restore"
            };
            out.push((
                (child, fk.child_bin.clone()),
                format!(
                    "kept row {child} of {}: its key ({})=({key}) belonged to kept row {parent} of {}, \
                     deleted with it or after it, which {state}. Not restored: the key would point at \
                     another row of {} now, not at the row it belonged to. Restore kept row {parent} too, \
                     or resolve the row now holding ({})=({key}) in {}.",
                    fk.child,
                    fk.child_columns.join(", "),
                    fk.parent,
                    fk.parent,
                    fk.parent_columns.join(", "),
                    fk.parent,
                ),
            ));
        }
    }
    Ok(out)
}

enum Outcome {
    Inserted,
    Failed(Failure),
}

enum Failure {
    /// A unique key exists already (the server's detail names it).
    Conflict(String),
    /// A foreign key points at a row not (yet) there.
    Waiting(String),
}

/// Columns a restore writes: in the table now (not dropped, not generated) and in its bin.
async fn insertable_columns(
    tx: &Transaction<'_>,
    schema: &str,
    table: &str,
    bin: &str,
) -> Result<Vec<String>, TrashError> {
    let rows = tx
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 \
             AND NOT a.attisdropped AND a.attgenerated = '' \
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute b \
                 WHERE b.attrelid = format('pgveil_trash.%I', $3::text)::regclass \
                 AND b.attname = a.attname AND NOT b.attisdropped) \
             ORDER BY a.attnum",
            &[&schema, &table, &bin],
        )
        .await?;
    if rows.is_empty() {
        return Err(TrashError::Refused(format!(
            "table {schema}.{table} no longer exists; its kept rows cannot be restored"
        )));
    }
    Ok(rows
        .iter()
        .map(|r| quote_ident(r.get::<_, &str>(0)))
        .collect())
}

/// Inserts kept `rows` (id, bin) into their table inside a savepoint; key and foreign-key violations
/// roll back to it and are reported, other errors end the restore.
async fn insert_rows(
    tx: &Transaction<'_>,
    (schema, table): &(String, String),
    columns: &[String],
    rows: &[(i64, String)],
) -> Result<Outcome, TrashError> {
    let ids = format!(
        "{{{}}}",
        rows.iter()
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let bin = rows.first().map(|(_, b)| b.as_str()).unwrap_or_default();
    let cols = columns.join(", ");
    let target = qualified(schema, table);
    tx.batch_execute("SAVEPOINT pgveil_restore").await?;
    let sql = format!(
        "INSERT INTO {target} ({cols}) OVERRIDING SYSTEM VALUE \
         SELECT {cols} FROM pgveil_trash.{} WHERE pgveil_id = ANY ($1::text::bigint[]) ORDER BY pgveil_id",
        quote_ident(bin)
    );
    match tx.execute(&sql, &[&ids]).await {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT pgveil_restore").await?;
            Ok(Outcome::Inserted)
        }
        Err(e) => {
            let code = e.code().cloned();
            let detail = e
                .as_db_error()
                .map(|d| d.detail().unwrap_or(d.message()).to_string())
                .unwrap_or_else(|| e.to_string());
            tx.batch_execute("ROLLBACK TO SAVEPOINT pgveil_restore")
                .await?;
            match code {
                Some(c)
                    if c == SqlState::UNIQUE_VIOLATION || c == SqlState::EXCLUSION_VIOLATION =>
                {
                    Ok(Outcome::Failed(Failure::Conflict(detail)))
                }
                Some(c) if c == SqlState::FOREIGN_KEY_VIOLATION => {
                    Ok(Outcome::Failed(Failure::Waiting(detail)))
                }
                _ => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_checks_the_capture_init_installs() {
        assert!(SCHEMA_SQL.contains(&format!(
            "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger\nLANGUAGE {CAPTURE_LANGUAGE} \
             SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn${CAPTURE_BODY}$fn$;",
            CAPTURE_FUNCTION.0, CAPTURE_FUNCTION.1
        )));
        assert_eq!(CAPTURE_CONFIG, "search_path=pg_catalog, pg_temp");
        assert!(CAPTURE_BODY.contains(&format!(" FROM {TRANSITION_TABLE}'")));
        assert_eq!(capture_body_digest().len(), 64);
        assert_eq!((DELETE_TRIGGER_TYPE, TRUNCATE_TRIGGER_TYPE), (8, 34));
    }
}
