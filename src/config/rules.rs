//! Rules (`rules/*.toml`, spec section 2): raw serde structs with `deny_unknown_fields`,
//! validated into typed rules. Every problem of every file is reported at once, each with
//! `file:line`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::predicate::Predicate;

/// All problems found in a rule set, one per line as `file:line: message`.
#[derive(Debug, Error)]
#[error("{}", .problems.join("\n"))]
pub struct RulesError {
    pub problems: Vec<String>,
}

/// The kinds of statement a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    Drop,
    Alter,
    Create,
    Grant,
    Revoke,
    CopyFrom,
    CopyTo,
    Call,
    Do,
    Set,
    Other,
}

impl StatementKind {
    /// The name rules and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Truncate => "truncate",
            StatementKind::Drop => "drop",
            StatementKind::Alter => "alter",
            StatementKind::Create => "create",
            StatementKind::Grant => "grant",
            StatementKind::Revoke => "revoke",
            StatementKind::CopyFrom => "copy_from",
            StatementKind::CopyTo => "copy_to",
            StatementKind::Call => "call",
            StatementKind::Do => "do",
            StatementKind::Set => "set",
            StatementKind::Other => "other",
        }
    }
}

/// What to do with a statement pgveil cannot analyse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unanalysable {
    #[default]
    Deny,
    Allow,
}

/// `[schema.]table.column`, folded as PostgreSQL folds unquoted identifiers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnRef {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// Where a rule was written, for messages and `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum MaskFunction {
    Redact { replacement: Option<String> },
    Partial { keep_first: usize, keep_last: usize },
    Email,
    Hash { key_env: String },
    Tokenize { key_env: String },
    Null,
    Constant { value: String },
    DateTrunc { unit: TruncUnit },
    Round { step: f64 },
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncUnit {
    Year,
    Month,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MaskRule {
    pub column: ColumnRef,
    pub function: MaskFunction,
    pub unmasked_for: Vec<String>,
    pub searchable: bool,
    pub origin: Origin,
}

/// `[[filter]]`: the rows of a table that sessions holding `roles` see and change.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterRule {
    pub schema: String,
    pub table: String,
    /// Sessions holding any of these roles (`"*"`: every role) are filtered...
    pub roles: Vec<String>,
    /// ...unless they hold one of these.
    pub unfiltered_for: Vec<String>,
    /// The `where` as written.
    pub condition: String,
    pub predicate: Predicate,
    pub origin: Origin,
}

impl FilterRule {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AllowRule {
    pub roles: Vec<String>,
    pub statements: Vec<StatementKind>,
    pub tables: Vec<String>,
    pub require_where: bool,
    /// The most rows one DELETE (or UPDATE) this rule allows may remove (or change); a
    /// statement over it is rolled back and refused.
    pub max_rows: Option<u64>,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecycleRule {
    pub schema: String,
    pub table: String,
    pub retention_days: u32,
    pub origin: Origin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertAction {
    Block,
    Log,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AlertRule {
    pub roles: Vec<String>,
    pub max_rows_per_minute: u64,
    pub action: AlertAction,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub unanalysable: Unanalysable,
    pub protected: Vec<StatementKind>,
    /// Roles whose members may use the admin console (`--admin-listen`); none by default.
    pub admin_roles: Vec<String>,
    /// Where `[settings]` was written; `None` when the defaults hold.
    pub origin: Option<Origin>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            unanalysable: Unanalysable::Deny,
            protected: vec![
                StatementKind::Delete,
                StatementKind::Truncate,
                StatementKind::Drop,
            ],
            admin_roles: Vec::new(),
            origin: None,
        }
    }
}

/// A validated, merged rule set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    pub settings: Settings,
    pub masks: Vec<MaskRule>,
    pub allows: Vec<AllowRule>,
    pub recycles: Vec<RecycleRule>,
    pub alerts: Vec<AlertRule>,
    pub filters: Vec<FilterRule>,
    /// The files the rules came from, in merge order.
    pub files: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    settings: Option<Spanned<toml::Value>>,
    #[serde(default)]
    mask: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    allow: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    recycle: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    alert: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    filter: Vec<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    unanalysable: Option<Unanalysable>,
    protected: Option<Vec<StatementKind>>,
    admin_roles: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    column: String,
    function: String,
    keep_first: Option<usize>,
    keep_last: Option<usize>,
    replacement: Option<String>,
    key_env: Option<String>,
    value: Option<String>,
    unit: Option<TruncUnit>,
    step: Option<f64>,
    #[serde(default)]
    unmasked_for: Vec<String>,
    #[serde(default)]
    searchable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    roles: Vec<String>,
    statements: Vec<StatementKind>,
    tables: Vec<String>,
    #[serde(default)]
    require_where: bool,
    max_rows: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecycle {
    table: String,
    #[serde(default = "default_retention")]
    retention_days: u32,
}

fn default_retention() -> u32 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    table: String,
    roles: Vec<String>,
    #[serde(rename = "where")]
    condition: String,
    #[serde(default)]
    unfiltered_for: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    roles: Vec<String>,
    max_rows_per_minute: u64,
    action: AlertAction,
}

impl Rules {
    /// Loads a rules file, or every `*.toml` in a directory (sorted by name), merged.
    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let files = rule_files(path).map_err(|p| RulesError { problems: vec![p] })?;
        let mut rules = Rules::default();
        let mut settings_from: Option<PathBuf> = None;
        let mut problems = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let mut ctx = FileCtx {
                        path: &file,
                        text: &text,
                        problems: &mut problems,
                    };
                    ctx.merge_into(&mut rules, &mut settings_from);
                }
                Err(e) => problems.push(format!("{}: {e}", file.display())),
            }
            rules.files.push(file);
        }
        if problems.is_empty() {
            Ok(rules)
        } else {
            Err(RulesError { problems })
        }
    }
}

/// What identifies the current state of the rules files: each file with its modification
/// time and size. A change means the rules should be reloaded.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
    rule_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, modified, len)
        })
        .collect()
}

fn rule_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
    problems: &'a mut Vec<String>,
}

impl FileCtx<'_> {
    fn origin(&self, offset: usize) -> Origin {
        Origin {
            file: self.path.to_path_buf(),
            line: super::line_of(self.text, offset),
        }
    }

    fn problem(&mut self, origin: &Origin, message: impl fmt::Display) {
        self.problems.push(format!("{origin}: {message}"));
    }

    fn merge_into(&mut self, rules: &mut Rules, settings_from: &mut Option<PathBuf>) {
        let raw: RawFile = match toml::from_str(self.text) {
            Ok(raw) => raw,
            Err(e) => {
                let at = super::location(self.path, self.text, e.span());
                self.problems
                    .push(format!("{at}: {}", one_line(e.message())));
                return;
            }
        };
        if let Some(s) = raw.settings {
            let origin = self.origin(s.span().start);
            if let Some(prev) = settings_from.replace(self.path.to_path_buf()) {
                let msg = format!("[settings] already given in {}", prev.display());
                self.problem(&origin, msg);
            } else if let Some(settings) = self.entry::<RawSettings>(s, "settings") {
                rules.settings.origin = Some(settings.0.clone());
                rules.settings.unanalysable = settings.1.unanalysable.unwrap_or_default();
                if let Some(p) = settings.1.protected {
                    rules.settings.protected = p;
                }
                rules.settings.admin_roles = settings.1.admin_roles.unwrap_or_default();
                if rules.settings.admin_roles.iter().any(|r| r == "*") {
                    let msg = "admin_roles cannot be \"*\" (every role would be an admin); name the roles";
                    self.problem(&settings.0, msg.to_string());
                }
            }
        }
        for m in raw.mask {
            if let Some((origin, m)) = self.entry::<RawMask>(m, "mask") {
                if let Some(rule) = self.mask(origin, m) {
                    rules.masks.push(rule);
                }
            }
        }
        for a in raw.allow {
            if let Some((origin, a)) = self.entry::<RawAllow>(a, "allow") {
                if let Some(max) = a.max_rows {
                    let uncounted: Vec<&str> = a
                        .statements
                        .iter()
                        .filter(|k| !matches!(k, StatementKind::Delete | StatementKind::Update))
                        .map(|k| k.as_str())
                        .collect();
                    if max == 0 {
                        self.problem(&origin, "max_rows must be at least 1");
                    }
                    if !uncounted.is_empty() {
                        self.problem(
                            &origin,
                            format!(
                                "max_rows limits delete and update, which pgveil can count; {} cannot be limited: put it in a rule of its own",
                                uncounted.join(", ")
                            ),
                        );
                    }
                }
                rules.allows.push(AllowRule {
                    roles: a.roles,
                    statements: a.statements,
                    tables: a.tables.iter().map(|t| t.to_ascii_lowercase()).collect(),
                    require_where: a.require_where,
                    max_rows: a.max_rows,
                    origin,
                });
            }
        }
        for r in raw.recycle {
            if let Some((origin, r)) = self.entry::<RawRecycle>(r, "recycle") {
                match parse_qualified(&r.table, 2) {
                    Some(mut parts) => {
                        let table = parts.pop().unwrap_or_default();
                        let schema = parts.pop().unwrap_or_else(|| "public".into());
                        rules.recycles.push(RecycleRule {
                            schema,
                            table,
                            retention_days: r.retention_days,
                            origin,
                        });
                    }
                    None => self.problem(&origin, format!("bad table name {:?}", r.table)),
                }
            }
        }
        for f in raw.filter {
            if let Some((origin, f)) = self.entry::<RawFilter>(f, "filter") {
                if let Some(rule) = self.filter(origin, f) {
                    rules.filters.push(rule);
                }
            }
        }
        for a in raw.alert {
            if let Some((origin, a)) = self.entry::<RawAlert>(a, "alert") {
                rules.alerts.push(AlertRule {
                    roles: a.roles,
                    max_rows_per_minute: a.max_rows_per_minute,
                    action: a.action,
                    origin,
                });
            }
        }
    }

    /// Deserializes one table of the file, reporting a problem at its line on failure.
    fn entry<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: Spanned<toml::Value>,
        what: &str,
    ) -> Option<(Origin, T)> {
        let origin = self.origin(value.span().start);
        match T::deserialize(value.into_inner()) {
            Ok(v) => Some((origin, v)),
            Err(e) => {
                self.problem(&origin, format!("[{what}]: {}", one_line(e.message())));
                None
            }
        }
    }

    fn filter(&mut self, origin: Origin, f: RawFilter) -> Option<FilterRule> {
        let Some(mut parts) = parse_qualified(&f.table, 2) else {
            self.problem(&origin, format!("bad table name {:?}", f.table));
            return None;
        };
        if f.roles.is_empty() {
            self.problem(&origin, "a filter names no role (\"*\" is every role)");
            return None;
        }
        let predicate = match Predicate::parse(&f.condition) {
            Ok(p) => p,
            Err(e) => {
                self.problem(&origin, format!("filter on {}: {e}", f.table));
                return None;
            }
        };
        let table = parts.pop().unwrap_or_default();
        let schema = parts.pop().unwrap_or_else(|| "public".into());
        Some(FilterRule {
            schema,
            table,
            roles: f.roles,
            unfiltered_for: f.unfiltered_for,
            condition: f.condition,
            predicate,
            origin,
        })
    }

    fn mask(&mut self, origin: Origin, m: RawMask) -> Option<MaskRule> {
        let Some(mut parts) = parse_qualified(&m.column, 3).filter(|p| p.len() >= 2) else {
            let msg = format!("mask column {:?} is not [schema.]table.column", m.column);
            self.problem(&origin, msg);
            return None;
        };
        let column = parts.pop().unwrap_or_default();
        let table = parts.pop().unwrap_or_default();
        let schema = parts.pop().unwrap_or_else(|| "public".into());
        let function = match mask_function(&m) {
            Ok(f) => f,
            Err(msg) => {
                self.problem(&origin, format!("mask on {}: {msg}", m.column));
                return None;
            }
        };
        Some(MaskRule {
            column: ColumnRef {
                schema,
                table,
                column,
            },
            function,
            unmasked_for: m.unmasked_for,
            searchable: m.searchable,
            origin,
        })
    }
}

/// A parser message on one line, so that every problem is one line of output.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The function of a raw mask, checking it has the options it needs and no others.
fn mask_function(m: &RawMask) -> Result<MaskFunction, String> {
    let given: Vec<&str> = [
        ("keep_first", m.keep_first.is_some()),
        ("keep_last", m.keep_last.is_some()),
        ("replacement", m.replacement.is_some()),
        ("key_env", m.key_env.is_some()),
        ("value", m.value.is_some()),
        ("unit", m.unit.is_some()),
        ("step", m.step.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| *k)
    .collect();
    let allowed: &[&str] = match m.function.as_str() {
        "redact" => &["replacement"],
        "partial" => &["keep_first", "keep_last"],
        "hash" | "tokenize" => &["key_env"],
        "constant" => &["value"],
        "date_trunc" => &["unit"],
        "round" => &["step"],
        "email" | "null" | "deny" => &[],
        other => {
            return Err(format!(
                "unknown function {other:?} (expected redact, partial, email, hash, tokenize, null, constant, date_trunc, round or deny)"
            ))
        }
    };
    if let Some(extra) = given.iter().find(|k| !allowed.contains(k)) {
        return Err(format!("option {extra} does not apply to {}", m.function));
    }
    let need = |v: Option<String>, key: &str| v.ok_or(format!("{} needs {key}", m.function));
    Ok(match m.function.as_str() {
        "redact" => MaskFunction::Redact {
            replacement: m.replacement.clone(),
        },
        "partial" => MaskFunction::Partial {
            keep_first: m.keep_first.unwrap_or(0),
            keep_last: m.keep_last.unwrap_or(0),
        },
        "email" => MaskFunction::Email,
        "hash" => MaskFunction::Hash {
            key_env: need(m.key_env.clone(), "key_env")?,
        },
        "tokenize" => MaskFunction::Tokenize {
            key_env: need(m.key_env.clone(), "key_env")?,
        },
        "null" => MaskFunction::Null,
        "constant" => MaskFunction::Constant {
            value: need(m.value.clone(), "value")?,
        },
        "date_trunc" => MaskFunction::DateTrunc {
            unit: m
                .unit
                .ok_or("date_trunc needs unit = \"year\" or \"month\"")?,
        },
        "round" => {
            let step = m.step.ok_or("round needs step")?;
            if !(step.is_finite() && step > 0.0) {
                return Err("round step must be a positive number".into());
            }
            MaskFunction::Round { step }
        }
        _ => MaskFunction::Deny,
    })
}

/// Splits a dotted name into at most `max` identifiers, folding unquoted ones to lower
/// case and keeping `"Quoted"` ones as written (`""` inside quotes is one quote).
pub fn parse_qualified(name: &str, max: usize) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = name.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$' || c == '*') {
                    return None;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return None,
        }
    }
    (parts.len() <= max).then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Rules, RulesError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text).unwrap();
        Rules::load(&p)
    }

    #[test]
    fn max_rows_limits_only_what_can_be_counted() {
        let rule = |statements: &str, max: u64| {
            format!("[[allow]]\nroles = [\"r\"]\nstatements = {statements}\ntables = [\"*\"]\nmax_rows = {max}\n")
        };
        let r = load_str(&rule(r#"["delete", "update"]"#, 10)).unwrap();
        assert_eq!(r.allows[0].max_rows, Some(10));
        let e = load_str(&rule(r#"["delete", "truncate"]"#, 10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncate cannot be limited"), "{e}");
        let e = load_str(&rule(r#"["delete"]"#, 0)).unwrap_err().to_string();
        assert!(e.contains("max_rows must be at least 1"), "{e}");
    }

    #[test]
    fn empty_rules_protect_by_default() {
        let r = load_str("").unwrap();
        assert_eq!(
            r.settings.protected,
            vec![
                StatementKind::Delete,
                StatementKind::Truncate,
                StatementKind::Drop
            ]
        );
        assert_eq!(r.settings.unanalysable, Unanalysable::Deny);
    }

    #[test]
    fn contract_example_loads() {
        let r = load_str(
            r#"
[settings]
unanalysable = "deny"
protected = ["delete", "truncate", "drop"]

[[mask]]
column = "public.customers.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["crm_admin"]

[[mask]]
column = "Customers.\"Email\""
function = "email"

[[allow]]
roles = ["crm_support"]
statements = ["delete"]
tables = ["public.tasks"]
require_where = true

[[recycle]]
table = "public.customers"
retention_days = 30

[[alert]]
roles = ["*"]
max_rows_per_minute = 10000
action = "block"
"#,
        )
        .unwrap();
        assert_eq!(r.masks.len(), 2);
        assert_eq!(r.masks[0].column.to_string(), "public.customers.phone");
        assert_eq!(
            r.masks[0].function,
            MaskFunction::Partial {
                keep_first: 3,
                keep_last: 4
            }
        );
        assert_eq!(r.masks[1].column.to_string(), "public.customers.Email");
        assert_eq!(r.masks[0].origin.line, 6);
        assert!(r.allows[0].require_where);
        assert_eq!(r.recycles[0].table, "customers");
        assert_eq!(r.alerts[0].action, AlertAction::Block);
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let err = load_str(
            r#"[[mask]]
column = "customers.phone"
function = "scramble"

[[mask]]
column = "phone"
function = "redact"

[[mask]]
column = "customers.card"
function = "tokenize"

[[allow]]
roles = ["x"]
statements = ["remove"]
tables = ["*"]
"#,
        )
        .unwrap_err();
        let p = &err.problems;
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p[0].contains("r.toml:1") && p[0].contains("scramble"),
            "{p:?}"
        );
        assert!(
            p[1].contains("r.toml:5") && p[1].contains("table.column"),
            "{p:?}"
        );
        assert!(
            p[2].contains("r.toml:9") && p[2].contains("key_env"),
            "{p:?}"
        );
        assert!(
            p[3].contains("r.toml:13") && p[3].contains("remove"),
            "{p:?}"
        );
    }

    #[test]
    fn admin_roles_cannot_be_everyone() {
        let err = load_str("[settings]\nadmin_roles = [\"ops\", \"*\"]\n").unwrap_err();
        assert!(err.to_string().contains("admin_roles cannot be"), "{err}");
        let r = load_str("[settings]\nadmin_roles = [\"ops\"]\n").unwrap();
        assert_eq!(r.settings.admin_roles, vec!["ops".to_string()]);
    }

    #[test]
    fn options_that_do_not_apply_are_refused() {
        let err = load_str("[[mask]]\ncolumn = \"t.c\"\nfunction = \"email\"\nkeep_first = 2\n")
            .unwrap_err();
        assert!(err.problems[0].contains("keep_first"), "{err}");
        let err = load_str("[[mask]]\ncolumn = \"t.c\"\nfunction = \"round\"\nstep = -1.0\n")
            .unwrap_err();
        assert!(err.problems[0].contains("positive"), "{err}");
        let err = load_str("[settings]\nprotected = [\"delete\"]\nbogus = 1\n").unwrap_err();
        assert!(err.problems[0].contains("bogus"), "{err}");
    }

    #[test]
    fn directory_is_merged_and_duplicate_settings_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "[settings]\nprotected = []\n").unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "[[mask]]\ncolumn = \"t.c\"\nfunction = \"null\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let r = Rules::load(dir.path()).unwrap();
        assert!(r.settings.protected.is_empty());
        assert_eq!(r.masks.len(), 1);
        assert_eq!(r.files.len(), 2);
        std::fs::write(
            dir.path().join("c.toml"),
            "[settings]\nunanalysable = \"allow\"\n",
        )
        .unwrap();
        let err = Rules::load(dir.path()).unwrap_err();
        assert!(err.problems[0].contains("c.toml:1"), "{err}");
    }

    #[test]
    fn qualified_names_fold_like_postgres() {
        assert_eq!(
            parse_qualified("Public.Customers", 2),
            Some(vec!["public".into(), "customers".into()])
        );
        assert_eq!(
            parse_qualified("\"My \"\"T\"\"\".x", 2),
            Some(vec!["My \"T\"".into(), "x".into()])
        );
        assert_eq!(parse_qualified("a..b", 3), None);
        assert_eq!(parse_qualified("a.b.c.d", 3), None);
        assert_eq!(parse_qualified("a b", 3), None);
    }
}
