//! The recycle bin (spec section 4): rows removed by DELETE (and TRUNCATE) from a table
//! with a `[[recycle]]` rule are kept in `pgveil_trash.rows` with who removed them, when,
//! from which table and by which statement, until the table's retention has passed.
//!
//! Capture happens in the database, in statement-level triggers that `pgveil trash init`
//! installs, not in a rewrite of the client's statement: a trigger also sees rows removed
//! by `ON DELETE CASCADE`, by functions and by clients that bypass pgveil, it keeps
//! `DELETE n` and `RETURNING` exactly as the server produces them, and a transition table
//! copies a 100,000-row DELETE in one set-based INSERT. pgveil's guard refuses a DELETE or
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

/// The schema, the bin, and the capture and purge functions. Idempotent.
const SCHEMA_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgveil_trash;
REVOKE ALL ON SCHEMA pgveil_trash FROM PUBLIC;
GRANT USAGE ON SCHEMA pgveil_trash TO PUBLIC;
CREATE TABLE IF NOT EXISTS pgveil_trash.tables (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    retention_days integer NOT NULL CHECK (retention_days > 0),
    PRIMARY KEY (table_schema, table_name)
);
CREATE TABLE IF NOT EXISTS pgveil_trash.rows (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    deleted_by text NOT NULL DEFAULT session_user,
    txid bigint NOT NULL DEFAULT txid_current(),
    statement text,
    row_data jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_by_table_and_time
    ON pgveil_trash.rows (table_schema, table_name, deleted_at);
REVOKE ALL ON ALL TABLES IN SCHEMA pgveil_trash FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgveil_trash.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO pgveil_trash.rows (table_schema, table_name, operation, statement, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', current_query(), to_jsonb(o)
        FROM pgveil_trash_old o;
    ELSE
        EXECUTE format(
            'INSERT INTO pgveil_trash.rows (table_schema, table_name, operation, statement, row_data) '
            'SELECT %L, %L, %L, current_query(), to_jsonb(t) FROM ONLY %I.%I t',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, 'truncate', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION pgveil_trash.capture() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgveil_trash.purge() RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    WITH gone AS (
        DELETE FROM pgveil_trash.rows r
        WHERE r.deleted_at < now() - make_interval(days => coalesce(
            (SELECT t.retention_days FROM pgveil_trash.tables t
             WHERE t.table_schema = r.table_schema AND t.table_name = r.table_name), 30))
        RETURNING 1)
    SELECT count(*) FROM gone
$fn$;
GRANT EXECUTE ON FUNCTION pgveil_trash.purge() TO PUBLIC;
"#;

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
        tx.execute(
            "INSERT INTO pgveil_trash.tables VALUES ($1, $2, $3) ON CONFLICT (table_schema, table_name) \
             DO UPDATE SET retention_days = EXCLUDED.retention_days",
            &[&r.schema, &r.table, &(r.retention_days as i32)],
        )
        .await?;
        tx.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER pgveil_trash_delete AFTER DELETE ON {table} \
             REFERENCING OLD TABLE AS pgveil_trash_old FOR EACH STATEMENT \
             EXECUTE FUNCTION pgveil_trash.capture(); \
             CREATE OR REPLACE TRIGGER pgveil_trash_truncate BEFORE TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION pgveil_trash.capture(); \
             ALTER TABLE {table} ENABLE TRIGGER pgveil_trash_delete; \
             ALTER TABLE {table} ENABLE TRIGGER pgveil_trash_truncate"
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
             WHERE t.tgname IN ('pgveil_trash_delete', 'pgveil_trash_truncate')",
            &[],
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
            "DROP TRIGGER IF EXISTS pgveil_trash_delete ON {name}; \
             DROP TRIGGER IF EXISTS pgveil_trash_truncate ON {name}"
        ))
        .await?;
        tx.execute(
            "DELETE FROM pgveil_trash.tables WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &table],
        )
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
    /// A WHERE clause over `pgveil_trash.rows` with its text parameters.
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
            conds.push(format!("table_schema = {s} AND table_name = {t}"));
        }
        if let Some(since) = &self.since {
            let p = param(since.clone(), &mut params);
            conds.push(format!("deleted_at >= {p}::text::timestamptz"));
        }
        if let Some(until) = &self.until {
            let p = param(until.clone(), &mut params);
            conds.push(format!("deleted_at <= {p}::text::timestamptz"));
        }
        if !self.ids.is_empty() {
            let list: Vec<String> = self.ids.iter().map(i64::to_string).collect();
            let p = param(format!("{{{}}}", list.join(",")), &mut params);
            conds.push(format!("id = ANY ({p}::text::bigint[])"));
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

/// `pgveil trash list`.
pub async fn list(client: &Client, sel: &Selection, limit: i64) -> Result<Vec<Kept>, TrashError> {
    let (filter, params) = sel.filter();
    let sql = format!(
        "SELECT id, table_schema || '.' || table_name, operation, \
         to_char(deleted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), deleted_by, \
         statement, row_data::text FROM pgveil_trash.rows WHERE {filter} ORDER BY id LIMIT {limit}"
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = client.query(&sql, &refs).await?;
    Ok(rows
        .iter()
        .map(|r| Kept {
            id: r.get(0),
            table: r.get(1),
            operation: r.get(2),
            deleted_at: r.get(3),
            deleted_by: r.get(4),
            statement: r.get(5),
            row: serde_json::from_str(r.get::<_, &str>(6)).unwrap_or(serde_json::Value::Null),
        })
        .collect())
}

/// `pgveil trash purge`: removes kept rows past their table's retention, or older than
/// `older_than_days` when given. Returns how many.
pub async fn purge(client: &Client, older_than_days: Option<u32>) -> Result<i64, TrashError> {
    let row = match older_than_days {
        None => client.query_one(PURGE_SQL, &[]).await?,
        Some(days) => {
            client
                .query_one(
                    "WITH gone AS (DELETE FROM pgveil_trash.rows \
                     WHERE deleted_at < now() - make_interval(days => $1) RETURNING 1) \
                     SELECT count(*) FROM gone",
                    &[&(days as i32)],
                )
                .await?
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
    let tx = client.transaction().await?;
    let (filter, params) = sel.filter();
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = tx
        .query(
            &format!(
                "SELECT id, table_schema, table_name, row_data::text FROM pgveil_trash.rows \
                 WHERE {filter} ORDER BY id FOR UPDATE"
            ),
            &refs,
        )
        .await?;
    if rows.is_empty() {
        return Err(TrashError::Refused("no kept rows match".into()));
    }
    // Pending rows by table: (trash id, row JSON).
    let mut pending: BTreeMap<(String, String), Vec<(i64, String)>> = BTreeMap::new();
    for r in &rows {
        pending
            .entry((r.get(1), r.get(2)))
            .or_default()
            .push((r.get(0), r.get(3)));
    }
    let mut restored = Restored::default();
    let mut done_ids: Vec<i64> = Vec::new();
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
            let columns = insertable_columns(&tx, &key.0, &key.1).await?;
            match insert_rows(&tx, &key, &columns, &batch).await? {
                Outcome::Inserted => {
                    progress = true;
                    *restored
                        .by_table
                        .entry(format!("{}.{}", key.0, key.1))
                        .or_default() += batch.len();
                    done_ids.extend(batch.iter().map(|(id, _)| *id));
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
                                done_ids.push(row.0);
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
    let ids: Vec<String> = done_ids.iter().map(i64::to_string).collect();
    tx.execute(
        "DELETE FROM pgveil_trash.rows WHERE id = ANY ($1::text::bigint[])",
        &[&format!("{{{}}}", ids.join(","))],
    )
    .await?;
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

/// Columns a restore writes: not dropped, not generated.
async fn insertable_columns(
    tx: &Transaction<'_>,
    schema: &str,
    table: &str,
) -> Result<Vec<String>, TrashError> {
    let rows = tx
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 \
             AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            &[&schema, &table],
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

/// Inserts `rows` into their table inside a savepoint; key and foreign-key violations
/// roll back to it and are reported, other errors end the restore.
async fn insert_rows(
    tx: &Transaction<'_>,
    (schema, table): &(String, String),
    columns: &[String],
    rows: &[(i64, String)],
) -> Result<Outcome, TrashError> {
    let json = format!(
        "[{}]",
        rows.iter()
            .map(|(_, r)| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let cols = columns.join(", ");
    let target = qualified(schema, table);
    tx.batch_execute("SAVEPOINT pgveil_restore").await?;
    let sql = format!(
        "INSERT INTO {target} ({cols}) OVERRIDING SYSTEM VALUE \
         SELECT {cols} FROM jsonb_populate_recordset(NULL::{target}, $1::text::jsonb)"
    );
    match tx.execute(&sql, &[&json]).await {
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
