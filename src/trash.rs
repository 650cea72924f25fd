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
//! TRUNCATE of a recycled table while the triggers are missing or disabled.

use std::collections::BTreeMap;
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

/// The schema, the registry of recycled tables, the deletion log, and the capture and
/// purge functions. Idempotent.
///
/// Each recycled table has its own bin table `pgveil_trash.t_<oid>` with the table's
/// columns (typed, copied as they are: no per-row conversion, which is what keeps a large
/// DELETE cheap) plus `pgveil_id` (the kept row's id) and `pgveil_deletion` (the
/// deletion event in `pgveil_trash.deletions`: when, by whom, which statement). A column
/// added to the table later is added to its bin at the next capture; the bin never loses
/// one.
const SCHEMA_SQL: &str = r#"
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
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
$fn$;
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
"#;

/// The capture triggers `trash init` installs on each recycled table.
pub const DELETE_TRIGGER: &str = "pgveil_trash_delete";
pub const TRUNCATE_TRIGGER: &str = "pgveil_trash_truncate";

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
pub async fn init(client: &mut Client, rules: &Rules) -> Result<String, TrashError> {
    let tx = client.transaction().await?;
    tx.batch_execute(SCHEMA_SQL).await?;
    let mut report = String::new();
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
        tx.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER {DELETE_TRIGGER} AFTER DELETE ON {table} \
             REFERENCING OLD TABLE AS pgveil_trash_old FOR EACH STATEMENT \
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

/// `pgveil trash restore`: puts the selected rows back into their tables and removes
/// them from the bin, in one transaction. A row whose key exists again in its table is
/// not overwritten: the restore is refused, naming each such row, unless
/// `skip_conflicts`, which restores the others. Rows go back parents first, whatever
/// order they were deleted in (a cascade keeps children before their parent).
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
    let mut pending: BTreeMap<(String, String), Vec<(i64, String)>> = BTreeMap::new();
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
    let mut restored = Restored::default();
    let mut done_ids: Vec<(i64, String)> = Vec::new();
    let mut conflicts: Vec<String> = Vec::new();
    let mut waiting_reason: BTreeMap<i64, String> = BTreeMap::new();
    // Each pass restores what it can; rows whose parent is still in the bin wait for a
    // later pass. Stops when a pass makes no progress.
    loop {
        let mut progress = false;
        let tables: Vec<(String, String)> = pending.keys().cloned().collect();
        for key in tables {
            let batch = pending.remove(&key).unwrap_or_default();
            if batch.is_empty() {
                continue;
            }
            let columns = insertable_columns(&tx, &key.0, &key.1, &batch[0].1).await?;
            match insert_rows(&tx, &key, &columns, &batch).await? {
                Outcome::Inserted => {
                    progress = true;
                    *restored
                        .by_table
                        .entry(format!("{}.{}", key.0, key.1))
                        .or_default() += batch.len();
                    done_ids.extend(batch.iter().cloned());
                }
                Outcome::Failed(_) => {
                    // Row by row: find which conflict and which wait for a parent.
                    let mut left = Vec::new();
                    for row in batch {
                        match insert_rows(&tx, &key, &columns, std::slice::from_ref(&row)).await? {
                            Outcome::Inserted => {
                                progress = true;
                                *restored
                                    .by_table
                                    .entry(format!("{}.{}", key.0, key.1))
                                    .or_default() += 1;
                                done_ids.push(row.clone());
                            }
                            Outcome::Failed(Failure::Conflict(detail)) => conflicts.push(format!(
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
            conflicts.push(format!(
                "kept row {id} of {schema}.{table}: {why} Not restored: the row it references is neither in the table nor among the rows restored."
            ));
        }
    }
    if !conflicts.is_empty() && !skip_conflicts {
        tx.rollback().await?;
        return Err(TrashError::Refused(format!(
            "restore refused, nothing was restored:\n{}\n(--skip-conflicts restores the other rows)",
            conflicts.join("\n")
        )));
    }
    restored.skipped = conflicts;
    let mut by_bin: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, bin) in &done_ids {
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
