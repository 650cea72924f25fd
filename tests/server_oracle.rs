//! The server as the oracle of pgveil's reading of SQL (spec sections 3 to 6). Generated
//! statements full of the forms where a reader can disagree with PostgreSQL (quoted and
//! `U&` names, escapes, adjacent literals, comments that end at a carriage return,
//! shadowing CTEs, aliases reused across query levels, LATERAL, ON CONFLICT, RETURNING,
//! several statements in one string) are given to the real server and to pgveil:
//!
//! - the lexer: the value the server returns for a literal, the name it gives a column,
//!   and how many statements it runs are what `sql::lex` reads;
//! - the analysis: every relation the server's plan scans (EXPLAIN VERBOSE) is among the
//!   relations the audit analysis names;
//! - masking end to end: whatever the generated statement, a masked role never receives a
//!   fragment of a clear value (the rows are the server's own answer).

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use common::{shared, PgCluster, TestProxy, SUPERUSER_PASSWORD};
use pgveil::sql::analysis::{Analysis, FactsCache};
use pgveil::sql::lex::{lex, Kind, Strings};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio_postgres::SimpleQueryMessage;

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
"#;

fn cluster() -> &'static PgCluster {
    shared()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn superuser() -> tokio_postgres::Client {
    let pg = cluster();
    let port = pg.addr().rsplit(':').next().unwrap().to_string();
    common::connect(&format!(
        "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=crm"
    ))
    .await
}

/// Every result set of a query string: its column names and rows (text).
type Results = Vec<(Vec<String>, Vec<Vec<Option<String>>>)>;

async fn results(c: &tokio_postgres::Client, sql: &str) -> Result<Results, tokio_postgres::Error> {
    let mut out: Results = Vec::new();
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                out.push((cols.iter().map(|c| c.name().to_string()).collect(), vec![]))
            }
            SimpleQueryMessage::Row(r) => {
                if out.is_empty() {
                    let names = r.columns().iter().map(|c| c.name().to_string()).collect();
                    out.push((names, vec![]));
                }
                let row = (0..r.len()).map(|i| r.get(i).map(str::to_string)).collect();
                out.last_mut().unwrap().1.push(row);
            }
            SimpleQueryMessage::CommandComplete(_) => {}
            _ => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The lexer against the server.

/// Text that is awkward inside literals and names: quotes, backslashes, `$`, newlines,
/// comment starts, non-ASCII.
fn awkward() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "Z",
            "'",
            "''",
            "\"",
            "\\",
            "\\\\",
            "$",
            "$$",
            "--",
            "/*",
            "*/",
            ";",
            " ",
            "\n",
            "\r",
            "é",
            "漢",
            "\u{1F600}",
            "0",
            "x41",
            "u00e9",
        ]),
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

/// A string literal in one of its spellings (any text; the server decides whether it is
/// valid).
fn literal() -> impl Strategy<Value = String> {
    let plain = awkward().prop_map(|t| format!("'{}'", t.replace('\'', "''")));
    let escaped = prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "\\'",
            "''",
            "\\\\",
            "\\n",
            "\\t",
            "\\b",
            "\\x41",
            "\\x4",
            "\\101",
            "\\7",
            "\\u00e9",
            "\\U0001F600",
            "\\uD83D\\uDE00",
            "\\q",
            "é",
            "\\\"",
            "\\x",
            "\\u12",
        ]),
        0..5,
    )
    .prop_map(|p| format!("E'{}'", p.concat()));
    let unicode = prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "\\0041",
            "\\+01F600",
            "\\\\",
            "''",
            "\\00e9",
            "\\D83D\\DE00",
            "\\12",
        ]),
        0..4,
    )
    .prop_map(|p| format!("U&'{}'", p.concat()));
    let uescape = prop::collection::vec(prop::sample::select(vec!["a", "!0041", "!!", "\\"]), 0..4)
        .prop_map(|p| format!("U&'{}' UESCAPE '!'", p.concat()));
    let dollar = awkward().prop_filter("no tag inside", |t| !t.contains("$q$"));
    let dollar = dollar.prop_map(|t| format!("$q${t}$q$"));
    // Adjacent literals separated by whitespace with a newline (and maybe a comment)
    // are one literal; without a newline they are a syntax error.
    let adjacent = (
        awkward(),
        awkward(),
        prop::sample::select(vec!["\n", " \n ", " -- c\n", "\r", " ", "/* c */\n"]),
    )
        .prop_map(|(a, b, sep)| {
            format!(
                "'{}'{sep}'{}'",
                a.replace('\'', "''"),
                b.replace('\'', "''")
            )
        });
    prop_oneof![plain, escaped, unicode, uescape, dollar, adjacent]
}

/// A column name in one of its spellings.
fn name() -> impl Strategy<Value = String> {
    let plain = prop::collection::vec(
        prop::sample::select(vec!["a", "B", "é", "_", "1", "$"]),
        1..5,
    )
    .prop_map(|p| format!("x{}", p.concat()));
    let quoted = awkward().prop_map(|t| format!("\"{}\"", t.replace('"', "\"\"")));
    let unicode = prop::collection::vec(
        prop::sample::select(vec!["a", "\\0070", "\\+01F600", "\\\\", "\"\"", "Z"]),
        0..4,
    )
    .prop_map(|p| format!("U&\"{}\"", p.concat()));
    let long = (64usize..70).prop_map(|n| "l".repeat(n));
    prop_oneof![plain, quoted, unicode, long]
}

/// Separators between statements: comments that end at `\n`, at `\r`, or never.
fn separator() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        ";",
        "; -- c\n",
        " -- c\r;",
        " -- c;\r",
        "/* ; */;",
        "/* /* ; */ */;",
        " -- ;\n;",
        " --\r\n;",
    ])
    .prop_map(str::to_string)
}

#[test]
fn the_lexer_reads_literals_names_and_statements_as_the_server_does() {
    let rt = runtime();
    let client = rt.block_on(superuser());
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    // A literal's value.
    runner
        .run(&literal(), |lit| {
            let sql = format!("SELECT {lit}");
            let ours = lex(&sql, Strings::Standard);
            let theirs = rt.block_on(results(&client, &sql));
            match (ours, theirs) {
                (Ok(l), Ok(r)) => {
                    let values: Vec<&str> = l
                        .tokens
                        .iter()
                        .filter(|t| matches!(t.kind, Kind::Str | Kind::DollarStr))
                        .map(|t| t.value.as_ref())
                        .collect();
                    prop_assert_eq!(values.len(), 1, "{:?}: {:?}", sql, l.tokens);
                    let value = r[0].1[0][0].clone().unwrap_or_default();
                    let ours = match l.tokens[1].kind {
                        Kind::DollarStr => {
                            let v = values[0];
                            v["$q$".len()..v.len() - "$q$".len()].to_string()
                        }
                        _ => values[0].to_string(),
                    };
                    prop_assert_eq!(ours, value, "{:?}", sql);
                }
                // The server rejects a statement pgveil could read only for its syntax
                // (two literals side by side), never for a literal pgveil decoded.
                (Ok(l), Err(e)) => {
                    let syntax = e.as_db_error().is_some_and(|d| d.code().code() == "42601");
                    let literals = l
                        .tokens
                        .iter()
                        .filter(|t| matches!(t.kind, Kind::Str | Kind::DollarStr))
                        .count();
                    prop_assert!(
                        syntax && literals != 1,
                        "{:?}: read {:?}, server: {}",
                        sql,
                        l.tokens,
                        e
                    );
                }
                // ... and pgveil refuses nothing the server reads.
                (Err(why), Ok(r)) => {
                    prop_assert!(false, "{:?}: server read {:?}, pgveil: {}", sql, r, why);
                }
                (Err(_), Err(_)) => {}
            }
            Ok(())
        })
        .unwrap();
    // A column's name.
    runner
        .run(&name(), |name| {
            let sql = format!("SELECT 1 AS {name}");
            let ours = lex(&sql, Strings::Standard);
            let theirs = rt.block_on(results(&client, &sql));
            if let (Ok(l), Ok(r)) = (ours, theirs) {
                let named = l.tokens.last().unwrap();
                prop_assert!(matches!(named.kind, Kind::Word | Kind::QuotedIdent));
                let folded = named.folded();
                prop_assert_eq!(folded.as_ref(), r[0].0[0].as_str(), "{:?}", sql);
            }
            Ok(())
        })
        .unwrap();
    // Where statements end.
    runner
        .run(
            &prop::collection::vec((literal(), separator()), 1..4),
            |parts| {
                let sql: String = parts
                    .iter()
                    .map(|(lit, sep)| format!("SELECT {lit} AS v{sep}"))
                    .collect();
                let (Ok(l), Ok(r)) = (
                    lex(&sql, Strings::Standard),
                    rt.block_on(results(&client, &sql)),
                ) else {
                    return Ok(());
                };
                prop_assert_eq!(l.statements().len(), r.len(), "{:?}", sql);
                Ok(())
            },
        )
        .unwrap();
    // With standard_conforming_strings off, plain literals read escapes.
    rt.block_on(client.simple_query("SET standard_conforming_strings = off"))
        .unwrap();
    runner
        .run(&awkward(), |t| {
            let sql = format!("SELECT '{}'", t.replace('\'', "''"));
            let ours = lex(&sql, Strings::Escaped);
            let theirs = rt.block_on(results(&client, &sql));
            if let (Ok(l), Ok(r)) = (ours, theirs) {
                if l.tokens.len() == 2 {
                    let value = r[0].1[0][0].clone().unwrap_or_default();
                    prop_assert_eq!(l.tokens[1].value.as_ref(), value.as_str(), "{:?}", sql);
                }
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// The analysis against the server's plans, and masking end to end.

/// A relation reference: the masked table under another spelling, or another table.
fn relation() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "customers",
        "public.customers",
        "\"customers\"",
        "U&\"\\0063ustomers\"",
        "deals",
        "tasks",
    ])
}

/// A reference to a masked column (or a harmless one), possibly qualified.
fn column(alias: &'static str) -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "phone",
        "email",
        "national_id",
        "U&\"\\0070hone\"",
        "\"email\"",
        "id",
        "upper(phone)",
        "phone || ''",
        "substr(email, 1, 20)",
    ])
    .prop_flat_map(move |c| {
        prop::bool::ANY.prop_map(move |q| {
            if q && !c.contains('(') && !c.contains('|') {
                format!("{alias}.{c}")
            } else {
                c.to_string()
            }
        })
    })
}

/// A SELECT over customers dressed in shadowing CTEs, reused aliases, LATERAL and
/// subqueries: what it returns is the server's reading.
fn select() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(column("c"), 1..3),
        relation(),
        prop::sample::select(vec!["c", "t", "customers", "x"]),
        prop::sample::select(vec![
            "",
            "WITH customers AS (SELECT 1 AS id) ",
            "WITH x AS (SELECT id, phone, email FROM customers) ",
            "WITH RECURSIVE customers AS (SELECT 1 AS id UNION ALL SELECT id + 1 FROM customers WHERE id < 2) ",
        ]),
        prop::sample::select(vec![
            "",
            " WHERE EXISTS (WITH customers AS (SELECT 1) SELECT 1 FROM customers)",
            " WHERE EXISTS (SELECT 1 FROM deals c)",
            " WHERE c.id IN (SELECT customer_id FROM deals t)",
            ", LATERAL (SELECT 1 AS one FROM deals x) l",
            " JOIN deals d ON d.customer_id = c.id",
        ]),
        prop::sample::select(vec!["", " -- note\r", " /* note */", "; SELECT 1"]),
    )
        .prop_map(|(cols, rel, alias, with, tail, end)| {
            let list = cols.join(", ").replace("c.", &format!("{alias}."));
            let tail = tail.replace("c.id", &format!("{alias}.id"));
            format!("{with}SELECT {list} FROM {rel} {alias}{tail} LIMIT 3{end}")
        })
}

/// INSERT ... ON CONFLICT ... RETURNING over the masked table (a no-op update of row 1).
fn upsert() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(column("c"), 1..3),
        prop::sample::select(vec!["", " AS c"]),
    )
        .prop_map(|(cols, alias)| {
            let target = if alias.is_empty() { "customers" } else { "c" };
            let list = cols.join(", ").replace("c.", &format!("{target}."));
            format!(
                "INSERT INTO customers{alias} (id, full_name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET full_name = {target}.full_name RETURNING {list}"
            )
        })
}

/// Distinctive fragments of every clear value of the masked columns.
fn secrets() -> Vec<String> {
    let rows = cluster().psql_super(
        "crm",
        "SELECT substr(phone, 1, 7), split_part(email, '@', 1), national_id FROM customers",
    );
    rows.lines()
        .flat_map(|l| l.split('|').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| s.len() >= 4)
        .collect()
}

/// The relations (schema.table) every scan in an EXPLAIN (FORMAT JSON) plan reads.
fn scanned(plan: &serde_json::Value, out: &mut BTreeSet<String>) {
    match plan {
        serde_json::Value::Object(m) => {
            if let (Some(rel), Some(schema)) = (m.get("Relation Name"), m.get("Schema")) {
                out.insert(format!(
                    "{}.{}",
                    schema.as_str().unwrap_or(""),
                    rel.as_str().unwrap_or("")
                ));
            }
            m.values().for_each(|v| scanned(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| scanned(v, out)),
        _ => {}
    }
}

/// The columns (by name) a plan's expressions read: every `alias.column` in what the
/// statement returns (the top node's output) and in every node's conditions and keys,
/// whatever the alias. (A scan's own output may list every column of its table, read or
/// not, so only the top one counts.)
fn columns_read(plan: &serde_json::Value, out: &mut BTreeSet<String>) {
    if let Some(top) = plan.pointer("/0/Plan/Output").and_then(|o| o.as_array()) {
        for e in top.iter().filter_map(|e| e.as_str()) {
            qualified_columns(e, out);
        }
    }
    conditions_read(plan, out);
}

fn conditions_read(plan: &serde_json::Value, out: &mut BTreeSet<String>) {
    match plan {
        serde_json::Value::Object(m) => {
            for (key, v) in m {
                let exprs: Vec<&str> = match v {
                    serde_json::Value::String(s)
                        if key.ends_with("Cond") || key.ends_with("Filter") =>
                    {
                        vec![s.as_str()]
                    }
                    serde_json::Value::Array(a) if key.ends_with("Key") => {
                        a.iter().filter_map(|e| e.as_str()).collect()
                    }
                    _ => Vec::new(),
                };
                for e in exprs {
                    qualified_columns(e, out);
                }
                conditions_read(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| conditions_read(v, out)),
        _ => {}
    }
}

/// The column of each `a.b` (or `a.b.c`) in an expression as EXPLAIN prints it: the
/// last of names joined by dots (names unquoted or double-quoted; literals skipped).
fn qualified_columns(expr: &str, out: &mut BTreeSet<String>) {
    enum T {
        Word(String),
        Dot,
        Other,
    }
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                }
                tokens.push(T::Other);
            }
            '"' => {
                let mut name = String::new();
                while let Some(c) = chars.next() {
                    if c == '"' && chars.peek() == Some(&'"') {
                        chars.next();
                        name.push('"');
                    } else if c == '"' {
                        break;
                    } else {
                        name.push(c);
                    }
                }
                tokens.push(T::Word(name));
            }
            '.' => tokens.push(T::Dot),
            c if c.is_alphabetic() || c == '_' => {
                let mut name = c.to_string();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '$' {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(T::Word(name));
            }
            _ => tokens.push(T::Other),
        }
    }
    for i in 1..tokens.len() {
        if let (T::Dot, T::Word(name)) = (&tokens[i - 1], &tokens[i]) {
            let last = !matches!(tokens.get(i + 1), Some(T::Dot));
            let after_word = i >= 2 && matches!(tokens[i - 2], T::Word(_));
            if last && after_word {
                out.insert(name.clone());
            }
        }
    }
}

#[test]
fn what_the_server_reads_is_what_pgveil_analysed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let path = dir.path().to_path_buf();
    let proxy = rt.block_on(TestProxy::start(cluster(), move |s| s.rules = Some(path)));
    let alice = rt.block_on(proxy.connect("alice", "alice_pw"));
    let direct = rt.block_on(superuser());
    let secrets = secrets();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let statement = prop_oneof![3 => select(), 1 => upsert()];
    runner
        .run(&statement, |sql| {
            // Masking: the rows alice gets hold no clear fragment.
            if let Ok(r) = rt.block_on(results(&alice, &sql)) {
                let text = format!("{r:?}");
                for s in &secrets {
                    prop_assert!(
                        !text.contains(s.as_str()),
                        "{:?} leaked {:?}: {}",
                        sql,
                        s,
                        text
                    );
                }
            }
            // The analysis: each relation the server scans is one the audit names.
            let lexed = lex(&sql, Strings::Standard).unwrap();
            for range in lexed.statements() {
                let part = &sql[range.clone()];
                let explain = format!("EXPLAIN (VERBOSE, FORMAT JSON) {part}");
                let Ok(r) = rt.block_on(results(&direct, &format!("BEGIN; {explain}; ROLLBACK")))
                else {
                    let _ = rt.block_on(direct.simple_query("ROLLBACK"));
                    continue;
                };
                let plan: serde_json::Value =
                    serde_json::from_str(r[0].1[0][0].as_deref().unwrap()).unwrap();
                let mut read = BTreeSet::new();
                scanned(&plan, &mut read);
                // The one analysis of the statement, as a session makes it.
                let part_lexed = lex(part, Strings::Standard).unwrap();
                let analysis = Analysis::new(&part_lexed);
                let all = analysis.facts(&mut FactsCache::default());
                prop_assert_eq!(all.len(), 1, "{:?}", part);
                let facts = &all[0].audit;
                // Every column the plan reads is one the analysis names (or all are).
                let mut columns = BTreeSet::new();
                columns_read(&plan, &mut columns);
                for col in &columns {
                    prop_assert!(
                        facts.all_columns || facts.columns.contains(col),
                        "{:?}: the server reads column {} but the analysis names {:?}",
                        part,
                        col,
                        facts.columns
                    );
                }
                let named: BTreeSet<String> = facts
                    .relations
                    .iter()
                    .map(|p| p.last().cloned().unwrap_or_default())
                    .collect();
                for rel in &read {
                    let table = rel.rsplit('.').next().unwrap();
                    prop_assert!(
                        named.contains(table),
                        "{:?}: the server reads {} but the analysis names {:?}",
                        part,
                        rel,
                        named
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    rt.block_on(proxy.shutdown());
}
