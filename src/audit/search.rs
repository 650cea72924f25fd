//! `pgveil audit search`: filters records for review, printed as a table for people or as
//! the original JSON lines for `jq`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Conditions a record must meet; `None` matches everything.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub user: Option<String>,
    /// `schema.table`, or a bare table name matching it in any schema.
    pub table: Option<String>,
    pub decision: Option<String>,
    pub kind: Option<String>,
    pub event: Option<String>,
    pub session: Option<u64>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

/// Reads `2026-11-23T05:57:31Z`, `2026-11-23T05:57:31.5+01:00` or `2026-11-23` (midnight UTC).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let day = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &day)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| format!("{s:?} is not an RFC 3339 time or a YYYY-MM-DD date"))
}

impl Filter {
    pub fn matches(&self, r: &serde_json::Value) -> bool {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str());
        if self.user.as_deref().is_some_and(|u| s("user") != Some(u)) {
            return false;
        }
        if self
            .decision
            .as_deref()
            .is_some_and(|d| s("decision") != Some(d))
        {
            return false;
        }
        if self.kind.as_deref().is_some_and(|k| s("kind") != Some(k)) {
            return false;
        }
        if self.event.as_deref().is_some_and(|e| s("event") != Some(e)) {
            return false;
        }
        if self
            .session
            .is_some_and(|id| r.get("session").and_then(|v| v.as_u64()) != Some(id))
        {
            return false;
        }
        if let Some(want) = &self.table {
            let tables = r.get("tables").and_then(|t| t.as_array());
            let hit = tables.is_some_and(|ts| {
                ts.iter().filter_map(|t| t.as_str()).any(|t| {
                    t == want || (!want.contains('.') && t.rsplit('.').next() == Some(want))
                })
            });
            if !hit {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(ts) = s("ts").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) else {
                return false;
            };
            if self.since.is_some_and(|since| ts < since) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
        }
        true
    }
}

/// Prints the records of `files` that match; returns how many did. Lines that are not
/// JSON (a torn last line) are skipped with a note on stderr.
pub fn search(
    files: &[PathBuf],
    filter: &Filter,
    json: bool,
    out: &mut impl Write,
) -> std::io::Result<u64> {
    let mut matched = 0;
    if !json {
        writeln!(
            out,
            "{:<27} {:>5} {:<12} {:<8} {:<8} {:>6} {:<24} statement",
            "ts", "sess", "user", "kind", "decision", "rows", "tables"
        )?;
    }
    for path in files {
        let reader = std::io::BufReader::new(std::fs::File::open(path)?);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line?;
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(&line) else {
                eprintln!("{}:{}: not a record, skipped", path.display(), i + 1);
                continue;
            };
            if !filter.matches(&record) {
                continue;
            }
            matched += 1;
            if json {
                out.write_all(&line)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", table_row(&record))?;
            }
        }
    }
    Ok(matched)
}

fn table_row(r: &serde_json::Value) -> String {
    let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let list = |k: &str| {
        r.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let kind = match s("event") {
        "statement" | "" => s("kind").to_string(),
        event => event.to_string(),
    };
    let decision =
        r.get("decision")
            .and_then(|v| v.as_str())
            .unwrap_or(if s("sqlstate").is_empty() {
                ""
            } else {
                "error"
            });
    let rows = r
        .get("rows")
        .and_then(|v| v.as_u64())
        .map(|n| n.to_string())
        .unwrap_or_default();
    let mut text = s("statement").to_string();
    if text.is_empty() {
        text = s("message").to_string();
    }
    let mut statement: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if statement.chars().count() > 80 {
        statement = statement.chars().take(77).collect::<String>() + "...";
    }
    let masked = list("masked_columns");
    if !masked.is_empty() {
        statement = format!("{statement}  [masked: {masked}]");
    }
    let clear = list("unmasked_columns");
    if !clear.is_empty() {
        statement = format!("{statement}  [read in clear: {clear}]");
    }
    let converted = s("converted_from");
    if !converted.is_empty() {
        statement = format!("{statement}  [converted from {converted}]");
    }
    format!(
        "{:<27} {:>5} {:<12} {:<8} {:<8} {:>6} {:<24} {}",
        s("ts"),
        r.get("session").and_then(|v| v.as_u64()).unwrap_or(0),
        s("user"),
        kind,
        decision,
        rows,
        list("tables"),
        statement
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_combine() {
        let r = json!({"user":"alice","tables":["public.customers"],"decision":"masked",
            "kind":"select","ts":"2026-11-23T05:00:00.000000Z","session":3,"event":"statement"});
        let mut f = Filter {
            table: Some("customers".into()),
            ..Default::default()
        };
        assert!(f.matches(&r));
        f.table = Some("public.customers".into());
        f.user = Some("alice".into());
        f.since = Some(parse_time("2026-11-23").unwrap());
        f.until = Some(parse_time("2026-11-23T06:00:00Z").unwrap());
        assert!(f.matches(&r));
        f.decision = Some("blocked".into());
        assert!(!f.matches(&r));
        f.decision = None;
        f.table = Some("sales.customers".into());
        assert!(!f.matches(&r));
        f.table = None;
        f.until = Some(parse_time("2026-11-23T05:00:00Z").unwrap());
        assert!(!f.matches(&r));
        assert!(parse_time("yesterday").is_err());
    }
}
