//! The admin console's commands, as PgBouncer's operators type them: read from the text
//! of a simple query, run against the proxy, answered as tables of text and numbers. The
//! protocol side (`admin/mod.rs`) turns a [`Reply`] into messages.

use std::sync::Arc;

use thiserror::Error;

use crate::config::rules::{MaskFunction, Rules, StatementKind};
use crate::proxy::Proxy;
use crate::sessions::Totals;

/// One command of the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    ShowClients,
    ShowStats,
    ShowRules,
    ShowConfig,
    ShowGrants,
    ShowVersion,
    Help,
    Reload,
    Kill(u64),
}

/// What went wrong, with the SQLSTATE the client sees.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    NoSuchSession(String),
    #[error("{0}")]
    NotAvailable(String),
    #[error("{0}")]
    ReloadFailed(String),
}

impl CommandError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CommandError::Syntax(_) => "42601",
            CommandError::NoSuchSession(_) => "42704",
            CommandError::NotAvailable(_) => "0A000",
            CommandError::ReloadFailed(_) => "F0000",
        }
    }
}

const COMMANDS: &str = "SHOW CLIENTS, SHOW STATS, SHOW RULES, SHOW CONFIG, SHOW GRANTS, \
                        SHOW VERSION, SHOW HELP, RELOAD, KILL session_id";

impl Command {
    /// Reads one command; case and surrounding blanks do not matter.
    pub fn parse(text: &str) -> Result<Command, CommandError> {
        let words: Vec<String> = text
            .split_whitespace()
            .map(|w| w.to_ascii_uppercase())
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        Ok(match words.as_slice() {
            ["SHOW", "CLIENTS"] | ["SHOW", "SESSIONS"] => Command::ShowClients,
            ["SHOW", "STATS"] => Command::ShowStats,
            ["SHOW", "RULES"] => Command::ShowRules,
            ["SHOW", "CONFIG"] => Command::ShowConfig,
            ["SHOW", "GRANTS"] => Command::ShowGrants,
            ["SHOW", "VERSION"] => Command::ShowVersion,
            ["SHOW", "HELP"] | ["HELP"] => Command::Help,
            ["RELOAD"] => Command::Reload,
            ["KILL", id] => Command::Kill(id.parse().map_err(|_| {
                CommandError::Syntax(format!(
                    "KILL takes a session id (a number from SHOW CLIENTS), not {id:?}"
                ))
            })?),
            _ => {
                let shown: String = text.trim().chars().take(80).collect();
                return Err(CommandError::Syntax(format!(
                    "pgveil admin console: unknown command {shown:?}; commands: {COMMANDS}"
                )));
            }
        })
    }
}

/// One cell.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(Option<String>),
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(Some(s.to_string()))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(Some(s))
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Text(Some(if b { "yes" } else { "no" }.into()))
    }
}

/// Whether a column holds text or numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int,
}

/// A result set.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Value>>,
}

/// The answer to one command.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Table(Table),
    /// A command that changes something: its tag.
    Done(&'static str),
}

/// Runs `cmd`; `admin` names who asked, for the log.
pub async fn run(cmd: &Command, proxy: &Arc<Proxy>, admin: &str) -> Result<Reply, CommandError> {
    Ok(match cmd {
        Command::ShowClients => Reply::Table(clients(proxy)),
        Command::ShowStats => Reply::Table(stats(proxy)),
        Command::ShowRules => Reply::Table(rules(&proxy.rules.load())),
        Command::ShowConfig => Reply::Table(config(proxy)),
        Command::ShowVersion => Reply::Table(Table {
            columns: vec![("version", ColumnType::Text)],
            rows: vec![vec![format!("pgveil {}", env!("CARGO_PKG_VERSION")).into()]],
        }),
        Command::Help => Reply::Table(Table {
            columns: vec![
                ("command", ColumnType::Text),
                ("what it does", ColumnType::Text),
            ],
            rows: HELP
                .iter()
                .map(|(c, w)| vec![(*c).into(), (*w).into()])
                .collect(),
        }),
        Command::ShowGrants => {
            return Err(CommandError::NotAvailable(
                "pgveil: no grants to show: this pgveil has no just-in-time unmasking \
                 ([[unmask]] rules and grants)"
                    .into(),
            ))
        }
        Command::Reload => {
            tracing::info!(admin = ?admin, "reload requested from the admin console");
            proxy.reload().map_err(|e| {
                CommandError::ReloadFailed(format!(
                    "pgveil: reload refused, the old rules and certificates stay in force:\n{e}"
                ))
            })?;
            Reply::Done("RELOAD")
        }
        Command::Kill(id) => {
            kill(proxy, *id, admin).await?;
            Reply::Done("KILL")
        }
    })
}

const HELP: &[(&str, &str)] = &[
    (
        "SHOW CLIENTS",
        "the sessions past authentication, what they do and have done",
    ),
    (
        "SHOW STATS",
        "per database: sessions, statements, rows, masked rows, refusals, bytes",
    ),
    (
        "SHOW RULES",
        "the rules in force, each with the file and line it came from",
    ),
    ("SHOW CONFIG", "the settings pgveil runs with"),
    (
        "SHOW GRANTS",
        "just-in-time unmasking grants (not in this version)",
    ),
    ("SHOW VERSION", "pgveil's version"),
    (
        "RELOAD",
        "read the rules and TLS certificate files again, as SIGHUP does",
    ),
    (
        "KILL session_id",
        "end a session now; a statement it runs is cancelled",
    ),
];

fn clients(proxy: &Proxy) -> Table {
    let rows = proxy
        .sessions
        .list()
        .into_iter()
        .map(|s| {
            let id = &s.identity;
            let t = s.counters.totals();
            vec![
                id.session_id.into(),
                id.user.clone().into(),
                id.database.clone().into(),
                id.client_addr.to_string().into(),
                id.application_name.clone().into(),
                s.activity().as_str().into(),
                crate::audit::record::timestamp(s.since).into(),
                s.tls.into(),
                s.masked().into(),
                s.guarded().into(),
                t.statements.into(),
                t.rows.into(),
                t.refusals.into(),
            ]
        })
        .collect();
    Table {
        columns: vec![
            ("session", ColumnType::Int),
            ("user", ColumnType::Text),
            ("database", ColumnType::Text),
            ("address", ColumnType::Text),
            ("application_name", ColumnType::Text),
            ("state", ColumnType::Text),
            ("since", ColumnType::Text),
            ("tls", ColumnType::Text),
            ("masked", ColumnType::Text),
            ("guarded", ColumnType::Text),
            ("statements", ColumnType::Int),
            ("rows", ColumnType::Int),
            ("refusals", ColumnType::Int),
        ],
        rows,
    }
}

fn stats(proxy: &Proxy) -> Table {
    let counted = |db: String, sessions: u64, t: Totals| {
        vec![
            db.into(),
            sessions.into(),
            t.statements.into(),
            t.rows.into(),
            t.masked_rows.into(),
            t.refusals.into(),
            t.bytes_received.into(),
            t.bytes_sent.into(),
        ]
    };
    let rows = proxy
        .sessions
        .stats()
        .into_iter()
        .map(|d| counted(d.database, d.sessions, d.totals))
        .collect();
    Table {
        columns: vec![
            ("database", ColumnType::Text),
            ("sessions", ColumnType::Int),
            ("statements", ColumnType::Int),
            ("rows", ColumnType::Int),
            ("masked_rows", ColumnType::Int),
            ("refusals", ColumnType::Int),
            ("bytes_received", ColumnType::Int),
            ("bytes_sent", ColumnType::Int),
        ],
        rows,
    }
}

fn snake<T: std::fmt::Debug>(v: &T) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn kinds(k: &[StatementKind]) -> String {
    k.iter().map(snake).collect::<Vec<_>>().join(", ")
}

fn mask_function(f: &MaskFunction) -> String {
    match f {
        MaskFunction::Redact { replacement: None } => "redact".into(),
        MaskFunction::Redact {
            replacement: Some(r),
        } => format!("redact (replacement {r:?})"),
        MaskFunction::Partial {
            keep_first,
            keep_last,
        } => format!("partial (keep_first {keep_first}, keep_last {keep_last})"),
        MaskFunction::Email => "email".into(),
        MaskFunction::Hash { key_env } => format!("hash (key from ${key_env})"),
        MaskFunction::Tokenize { key_env } => format!("tokenize (key from ${key_env})"),
        MaskFunction::Null => "null".into(),
        MaskFunction::Constant { value } => format!("constant ({value:?})"),
        MaskFunction::DateTrunc { unit } => format!("date_trunc ({})", snake(unit)),
        MaskFunction::Round { step } => format!("round (step {step})"),
        MaskFunction::Deny => "deny".into(),
    }
}

/// Every rule in force: kind, what it names, what it does, which roles it concerns, and
/// where it was written.
fn rules(r: &Rules) -> Table {
    let mut rows: Vec<Vec<Value>> = Vec::new();
    let s = &r.settings;
    let origin = s
        .origin
        .as_ref()
        .map_or("(defaults)".to_string(), |o| o.to_string());
    rows.push(vec![
        "settings".into(),
        "protected".into(),
        kinds(&s.protected).into(),
        "".into(),
        origin.clone().into(),
    ]);
    rows.push(vec![
        "settings".into(),
        "unanalysable".into(),
        snake(&s.unanalysable).into(),
        "".into(),
        origin.clone().into(),
    ]);
    rows.push(vec![
        "settings".into(),
        "admin_roles".into(),
        "".into(),
        s.admin_roles.join(", ").into(),
        origin.into(),
    ]);
    for m in &r.masks {
        let mut what = mask_function(&m.function);
        if m.searchable {
            what.push_str(", searchable");
        }
        rows.push(vec![
            "mask".into(),
            m.column.to_string().into(),
            what.into(),
            format!("unmasked for: {}", m.unmasked_for.join(", ")).into(),
            m.origin.to_string().into(),
        ]);
    }
    for a in &r.allows {
        let mut what = kinds(&a.statements);
        if a.require_where {
            what.push_str(", WHERE required");
        }
        if let Some(n) = a.max_rows {
            what.push_str(&format!(", at most {n} rows"));
        }
        rows.push(vec![
            "allow".into(),
            a.tables.join(", ").into(),
            what.into(),
            a.roles.join(", ").into(),
            a.origin.to_string().into(),
        ]);
    }
    for c in &r.recycles {
        rows.push(vec![
            "recycle".into(),
            format!("{}.{}", c.schema, c.table).into(),
            format!("kept {} days", c.retention_days).into(),
            "".into(),
            c.origin.to_string().into(),
        ]);
    }
    for a in &r.alerts {
        rows.push(vec![
            "alert".into(),
            "".into(),
            format!(
                "{} past {} sensitive rows a minute",
                snake(&a.action),
                a.max_rows_per_minute
            )
            .into(),
            a.roles.join(", ").into(),
            a.origin.to_string().into(),
        ]);
    }
    Table {
        columns: vec![
            ("kind", ColumnType::Text),
            ("target", ColumnType::Text),
            ("action", ColumnType::Text),
            ("roles", ColumnType::Text),
            ("origin", ColumnType::Text),
        ],
        rows,
    }
}

/// The settings pgveil runs with, as `--config` names them. Paths, addresses and choices,
/// never key material.
fn config(proxy: &Proxy) -> Table {
    let c = &proxy.config;
    let opt = |v: Option<String>| Value::Text(v);
    let path = |p: &std::path::Path| Value::from(p.display().to_string());
    let l = &c.limits;
    let secs = |d: std::time::Duration| Value::from(d.as_secs());
    let mut rows: Vec<(&str, Value)> = vec![
        ("listen", c.listen.clone().into()),
        ("upstream", c.upstream.clone().into()),
        ("rules", path(&c.rules_path)),
        (
            "audit_log",
            opt(c.audit.as_ref().map(|_| c.audit_log.clone())),
        ),
        (
            "tls_cert",
            opt(c.client_tls.as_ref().map(|t| t.0.display().to_string())),
        ),
        (
            "tls_key",
            opt(c.client_tls.as_ref().map(|t| t.1.display().to_string())),
        ),
        ("require_tls", c.require_tls.into()),
        (
            "upstream_tls",
            snake(&c.upstream_tls).replace('_', "-").into(),
        ),
        (
            "upstream_ca",
            opt(c.upstream_ca.as_ref().map(|p| p.display().to_string())),
        ),
        ("metrics", opt(c.metrics.map(|m| m.to_string()))),
        ("admin_listen", opt(c.admin.clone())),
        ("max_client_conn", (l.max_client_conn as u64).into()),
        ("handshake_timeout_secs", secs(l.handshake_timeout)),
        (
            "client_idle_timeout_secs",
            secs(l.client_idle_timeout.unwrap_or_default()),
        ),
        ("connect_timeout_secs", secs(l.connect_timeout)),
        ("shutdown_grace_secs", secs(l.shutdown_grace)),
        ("max_message_bytes", (l.max_message_bytes as u64).into()),
        ("worker_threads", (l.worker_threads as u64).into()),
    ];
    if let Some(a) = &c.audit {
        let w = &a.writer;
        rows.push(("audit_redact", a.redact.into()));
        rows.push(("audit_max_bytes", w.max_bytes.into()));
        rows.push((
            "audit_flush",
            match w.flush {
                crate::audit::FlushPolicy::Always => "always".to_string(),
                crate::audit::FlushPolicy::Interval(d) => {
                    format!("interval ({} ms)", d.as_millis())
                }
            }
            .into(),
        ));
    }
    Table {
        columns: vec![("key", ColumnType::Text), ("value", ColumnType::Text)],
        rows: rows
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Int(n) => Value::from(n.to_string()),
                    t => t,
                };
                vec![k.into(), v]
            })
            .collect(),
    }
}

/// Ends session `id`: its relay stops at once and tells the client; a statement the
/// server is running for it is cancelled.
async fn kill(proxy: &Arc<Proxy>, id: u64, admin: &str) -> Result<(), CommandError> {
    let Some(session) = proxy.sessions.get(id) else {
        return Err(CommandError::NoSuchSession(format!(
            "pgveil: no session {id} (SHOW CLIENTS lists them)"
        )));
    };
    if !proxy.shutdown.kill(id) {
        return Err(CommandError::NoSuchSession(format!(
            "pgveil: session {id} is already ending"
        )));
    }
    tracing::info!(admin = ?admin, session = id, "session killed from the admin console");
    // A cancel that reaches the backend before it starts the statement it was sent does
    // nothing: sent again a little later, it stops what runs then. A cancel of an idle
    // backend, or one gone, is ignored.
    if let Some(key) = session.server_key {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for wait in [0, 200, 1000] {
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                if let Err(e) = crate::session::upstream::cancel(&proxy, key).await {
                    tracing::warn!(
                        session = id,
                        "cancelling the killed session's statement: {e}"
                    );
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_as_operators_type_them() {
        assert_eq!(
            Command::parse("show clients").unwrap(),
            Command::ShowClients
        );
        assert_eq!(
            Command::parse("  SHOW   Stats ").unwrap(),
            Command::ShowStats
        );
        assert_eq!(Command::parse("kill 42").unwrap(), Command::Kill(42));
        assert_eq!(Command::parse("reload").unwrap(), Command::Reload);
        for bad in [
            "kill",
            "kill x",
            "show",
            "select 1",
            "drop table t",
            "KILL 1 2",
        ] {
            let e = Command::parse(bad).unwrap_err();
            assert_eq!(e.sqlstate(), "42601", "{bad}");
        }
    }

    #[test]
    fn rules_name_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.toml");
        std::fs::write(
            &file,
            "[settings]\nadmin_roles = [\"ops\"]\n\n[[mask]]\ncolumn = \"customers.phone\"\n\
             function = \"partial\"\nkeep_first = 3\nkeep_last = 4\nunmasked_for = [\"crm_admin\"]\n",
        )
        .unwrap();
        let r = Rules::load(&file).unwrap();
        let t = rules(&r);
        let text: Vec<String> = t
            .rows
            .iter()
            .map(|row| {
                row.iter()
                    .map(|v| match v {
                        Value::Text(t) => t.clone().unwrap_or_default(),
                        Value::Int(n) => n.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        assert!(text
            .iter()
            .any(|l| l.starts_with("settings|admin_roles||ops|")));
        let mask = text.iter().find(|l| l.starts_with("mask|")).unwrap();
        assert!(
            mask.starts_with("mask|public.customers.phone|partial (keep_first 3, keep_last 4)|unmasked for: crm_admin|"),
            "{mask}"
        );
        assert!(mask.ends_with("r.toml:4"), "{mask}");
    }
}
