//! The statement guard's decision (spec section 4), a pure function that denies by
//! default: a statement runs only if, for every access of a protected kind, some
//! `[[allow]]` rule of the session's roles covers that kind and every table the access may
//! touch. Names are resolved the way the server could resolve them: an unqualified name
//! counts as every relation of that name in any schema the session's search_path has
//! named, so a search_path change cannot slip a table past a rule.

use std::collections::{HashMap, HashSet};

use super::Refusal;
use crate::catalog::Catalog;
use crate::config::rules::{AllowRule, Origin, RecycleRule, Rules, StatementKind, Unanalysable};
use crate::identity::SessionIdentity;
use crate::sql::guard::{Access, StatementFacts, Target};

/// Proof that a statement may run (the alternative is a [`Refusal`]), and the row limit
/// it runs under, if an `[[allow]]` rule with `max_rows` is what lets it run.
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    pub limit: Option<RowLimit>,
}

/// What the server's error says when a statement limited by `max_rows` went over it: with
/// a word no client can know (drawn once per process), so that a client's own error
/// cannot pass for a refusal.
fn limit_marker() -> &'static str {
    static MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| format!("pgveil-max-rows-{:016x}:", rand::random::<u64>()))
}

/// The most rows a statement's top-level DELETE or UPDATE may remove or change: over it,
/// the statement is rolled back and refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowLimit {
    pub rows: u64,
    pub kind: StatementKind,
    /// The table as refusals name it.
    pub table: String,
    /// Whether the statement has a RETURNING list of its own.
    pub returning: bool,
    /// The `[[allow]]` rule that sets the limit.
    pub rule: Origin,
}

impl RowLimit {
    /// The refusal of a statement that removed (or changed) `rows` rows, over the limit.
    pub fn exceeded(&self, rows: u64) -> Refusal {
        let did = match self.kind {
            StatementKind::Delete => "remove",
            _ => "change",
        };
        Refusal {
            kind: self.kind.as_str(),
            table: self.table.clone(),
            reason: format!(
                "it would {did} {rows} rows, and the rule that allows it allows at most {} (max_rows); nothing was done",
                self.rows
            ),
            rule: Some(self.rule.clone()),
        }
    }

    /// The statement `sql` (one DELETE or UPDATE, as the server will read it) made to
    /// count its own rows and fail, as a whole, when they are over the limit: in a WITH
    /// whose query counts the rows it returns and raises an error carrying
    /// a marker and the count. The statement's effects (recycle-bin captures
    /// included) are undone with it, in or out of a transaction block. Without RETURNING,
    /// its one row is the count; with it, its rows are the statement's own.
    pub fn wrap(&self, sql: &str) -> String {
        let sql = sql.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
        let over = format!(
            "pg_catalog.count(*) OPERATOR(pg_catalog.>) {}::pg_catalog.int8",
            self.rows
        );
        let raise = |ty: &str| {
            format!(
                "('{}' OPERATOR(pg_catalog.||) pg_catalog.count(*)::pg_catalog.text)::pg_catalog.{ty}",
                limit_marker()
            )
        };
        if self.returning {
            format!(
                "WITH pgveil_rows AS (\n{sql}\n) SELECT * FROM pgveil_rows WHERE \
                 (SELECT CASE WHEN {over} THEN {} ELSE true END FROM pgveil_rows)",
                raise("bool")
            )
        } else {
            format!(
                "WITH pgveil_rows AS (\n{sql}\nRETURNING 1) SELECT CASE WHEN {over} THEN {} \
                 ELSE pg_catalog.count(*) END FROM pgveil_rows",
                raise("int8")
            )
        }
    }

    /// The command tag the client expects of the statement, for `rows` rows.
    pub fn tag(&self, rows: u64) -> String {
        format!("{} {rows}", self.kind.as_str().to_uppercase())
    }

    /// The rows counted in the server's error for a statement over its limit (see
    /// [`Self::wrap`]); `None` for any other error.
    pub fn counted(message: &str) -> Option<u64> {
        let marker = limit_marker();
        let at = message.find(marker)? + marker.len();
        let digits: String = message[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    /// The refusal of a limited statement sent with others in one query string, whose
    /// rows pgveil could not count apart.
    pub fn not_alone(&self) -> Refusal {
        Refusal {
            kind: self.kind.as_str(),
            table: self.table.clone(),
            reason: format!(
                "the rule that allows it limits it to {} rows (max_rows): send it as a query of its own, not with other statements in one string",
                self.rows
            ),
            rule: Some(self.rule.clone()),
        }
    }

    /// The tighter of two limits on one statement.
    fn tighter(a: Option<RowLimit>, b: Option<RowLimit>) -> Option<RowLimit> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.rows < a.rows { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// What names mean in this session when a statement arrives.
pub struct Names<'a> {
    pub catalog: &'a Catalog,
    /// Every schema the session's search_path has held (a union: it only grows, so a
    /// rolled-back `SET` cannot leave the guard behind the server).
    pub search_path: &'a [String],
    /// Tables the session created, unknown to the cached catalog.
    pub created: &'a HashSet<String>,
}

/// The guard of one session: the rules that concern its roles.
#[derive(Debug, Clone)]
pub struct GuardPolicy {
    protected: Vec<StatementKind>,
    protected_by: Option<Origin>,
    allows: Vec<AllowRule>,
    recycles: Vec<RecycleRule>,
    unanalysable: Unanalysable,
    /// Every protected kind is allowed on every table without conditions: only the
    /// recycle-bin check can refuse anything.
    allows_everything: bool,
}

impl GuardPolicy {
    /// The guard for a session with these roles; `None` when nothing can be refused to it
    /// (every protected kind allowed on every table without conditions, and no recycle
    /// rule to enforce), so its statements need no analysis.
    pub fn for_session(rules: &Rules, identity: &SessionIdentity) -> Option<GuardPolicy> {
        let allows: Vec<AllowRule> = rules
            .allows
            .iter()
            .filter(|a| identity.has_any_role(&a.roles))
            .cloned()
            .collect();
        let unconditional = |k: &StatementKind| {
            allows.iter().any(|a| {
                a.statements.contains(k)
                    && !a.require_where
                    && a.max_rows.is_none()
                    && a.tables.iter().any(|t| t == "*")
            })
        };
        let allows_everything = rules.settings.protected.iter().all(unconditional);
        if allows_everything && rules.recycles.is_empty() {
            return None;
        }
        Some(GuardPolicy {
            protected: rules.settings.protected.clone(),
            protected_by: rules.settings.origin.clone(),
            allows,
            recycles: rules.recycles.clone(),
            unanalysable: rules.settings.unanalysable,
            allows_everything,
        })
    }

    /// Whether the session deletes from recycled tables only while their capture is in
    /// place (so its catalog must follow schema changes).
    pub fn recycles(&self) -> bool {
        !self.recycles.is_empty()
    }

    /// Whether an `[[allow]]` rule of the session sets `max_rows` (whose check reads the
    /// foreign keys, so the session's catalog must follow schema changes).
    pub fn limits(&self) -> bool {
        self.allows.iter().any(|a| a.max_rows.is_some())
    }

    /// Whether only the recycle-bin check can refuse anything to this session (so with
    /// the recycle bin in place, it needs no guard at all).
    pub fn allows_everything(&self) -> bool {
        self.allows_everything
    }

    /// A fingerprint of what this guard decides, to tell whether a rules reload changed it.
    pub fn fingerprint(guard: Option<&GuardPolicy>) -> String {
        match guard {
            None => String::new(),
            Some(g) => format!(
                "{:?}|{:?}|{:?}|{:?}",
                g.protected,
                g.allows
                    .iter()
                    .map(|a| (&a.statements, &a.tables, a.require_where, a.max_rows))
                    .collect::<Vec<_>>(),
                g.recycles
                    .iter()
                    .map(|r| (&r.schema, &r.table))
                    .collect::<Vec<_>>(),
                g.unanalysable
            ),
        }
    }

    /// Decides whether the statement with these facts may run. `executed` holds what
    /// SQL-level `EXECUTE`s in it run (looked up by the session).
    pub fn authorize(
        &self,
        facts: &StatementFacts,
        executed: &[Access],
        names: &Names<'_>,
    ) -> Result<Permit, Refusal> {
        let mut limit = None;
        for access in facts.accesses.iter().chain(executed) {
            limit = RowLimit::tighter(limit, self.check(access, names)?);
        }
        if let Some(reason) = &facts.unanalysable {
            let applies = !self.protected.is_empty() || !self.recycles.is_empty();
            if applies && self.unanalysable == Unanalysable::Deny {
                return Err(Refusal::unanalysable(
                    format!(
                        "pgveil cannot analyse it ({reason}), so it counts as touching every table; settings.unanalysable is \"deny\""
                    ),
                    self.protected_by.clone(),
                ));
            }
        }
        Ok(Permit { limit })
    }

    /// Whether `access` may run, and under which row limit.
    fn check(&self, access: &Access, names: &Names<'_>) -> Result<Option<RowLimit>, Refusal> {
        let recycling = matches!(access.kind, StatementKind::Delete | StatementKind::Truncate)
            && !self.recycles.is_empty();
        let protected = self.protected.contains(&access.kind);
        if !protected && !recycling {
            return Ok(None);
        }
        let kind = access.kind.as_str();
        let mut limit = None;
        for table in resolve(&access.target, access.kind, names) {
            if recycling {
                self.check_recycle(kind, &table, names)?;
            }
            if !protected {
                continue;
            }
            let covering: Vec<&AllowRule> = self
                .allows
                .iter()
                .filter(|a| a.statements.contains(&access.kind))
                .filter(|a| a.tables.iter().any(|p| glob_matches(p, &table)))
                .collect();
            let allowing: Vec<&&AllowRule> = covering
                .iter()
                .filter(|a| !a.require_where || access.has_where)
                .collect();
            if !allowing.is_empty() {
                // The most the rules allow: unlimited if one of them sets no limit.
                let most = match allowing.iter().any(|a| a.max_rows.is_none()) {
                    true => None,
                    false => allowing.iter().max_by_key(|a| a.max_rows),
                };
                if let Some(rule) = most {
                    let rows = rule.max_rows.unwrap_or_default();
                    if !access.top {
                        return Err(Refusal {
                            kind,
                            table,
                            reason: format!(
                                "the rule that allows it limits it to {rows} rows (max_rows), which pgveil counts only for a DELETE or UPDATE sent as a statement of its own, not inside WITH, PREPARE, EXPLAIN, MERGE or INSERT ... ON CONFLICT"
                            ),
                            rule: Some(rule.origin.clone()),
                        });
                    }
                    // Rows a foreign key's action changes elsewhere are not the statement's
                    // own: the limit could not hold.
                    let cascades = table
                        .split_once('.')
                        .and_then(|(schema, name)| names.catalog.relation(schema, name));
                    if cascades.is_some_and(|r| {
                        names
                            .catalog
                            .cascades(r.oid, access.kind == StatementKind::Update)
                    }) {
                        return Err(Refusal {
                            kind,
                            table,
                            reason: format!(
                                "the rule that allows it limits it to {rows} rows (max_rows), and a foreign key's ON {} action (CASCADE, SET NULL or SET DEFAULT) changes rows beyond the ones pgveil counts",
                                access.kind.as_str().to_uppercase()
                            ),
                            rule: Some(rule.origin.clone()),
                        });
                    }
                    let this = RowLimit {
                        rows,
                        kind: access.kind,
                        table,
                        returning: access.returning,
                        rule: rule.origin.clone(),
                    };
                    limit = RowLimit::tighter(limit, Some(this));
                }
                continue;
            }
            return Err(match covering.first() {
                Some(rule) => Refusal {
                    kind,
                    table,
                    reason: "the rule that allows it requires a WHERE clause that names a column"
                        .into(),
                    rule: Some(rule.origin.clone()),
                },
                None => Refusal {
                    kind,
                    table,
                    reason: format!(
                        "{kind} is protected and no [[allow]] rule for the role covers this table{}",
                        if self.protected_by.is_none() {
                            " (protected by default)"
                        } else {
                            ""
                        }
                    ),
                    rule: self.protected_by.clone(),
                },
            });
        }
        Ok(limit)
    }

    /// A DELETE or TRUNCATE of a recycled table runs only while its recycle-bin trigger is
    /// in place and intact ([`Catalog::trash_trigger_problem`]): without it, the rows would
    /// be gone for good. The refusal names what is wrong.
    ///
    /// [`Catalog::trash_trigger_problem`]: crate::catalog::Catalog::trash_trigger_problem
    fn check_recycle(
        &self,
        kind: &'static str,
        table: &str,
        names: &Names<'_>,
    ) -> Result<(), Refusal> {
        let trigger = if kind == "delete" {
            crate::trash::DELETE_TRIGGER
        } else {
            crate::trash::TRUNCATE_TRIGGER
        };
        let concerned = self
            .recycles
            .iter()
            .filter(|r| table == "*" || format!("{}.{}", r.schema, r.table) == table);
        for rule in concerned {
            let problem = match names.catalog.relation(&rule.schema, &rule.table) {
                Some(r) => names.catalog.trash_trigger_problem(r.oid, trigger),
                None => Some(format!(
                    "table {}.{} does not exist",
                    rule.schema, rule.table
                )),
            };
            if let Some(problem) = problem {
                return Err(Refusal {
                    kind,
                    table: format!("{}.{}", rule.schema, rule.table),
                    reason: format!("the recycle bin is not set up for this table ({problem}; run `pgveil trash init`), so deleted rows could not be kept"),
                    rule: Some(rule.origin.clone()),
                });
            }
        }
        Ok(())
    }
}

/// Every `schema.name` an access may touch; `*` for everything.
fn resolve(target: &Target, kind: StatementKind, names: &Names<'_>) -> Vec<String> {
    let catalog = names.catalog;
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    match target {
        Target::Everything => push("*".into()),
        Target::Schema(schema) => {
            push(format!("{schema}.*"));
            for r in catalog.relations().filter(|r| &r.schema == schema) {
                push(r.qualified());
            }
        }
        Target::Object(name) if name.contains('.') => push(name.clone()),
        Target::Object(name) => {
            for s in names.search_path {
                push(format!("{s}.{name}"));
            }
        }
        Target::Relation { parts, cascade } => {
            let (schemas, name): (Vec<&str>, &str) = match parts.as_slice() {
                [name] => (names.search_path.iter().map(String::as_str).collect(), name),
                [schema, name] | [_, schema, name] => (vec![schema.as_str()], name),
                _ => {
                    push("*".into());
                    return out;
                }
            };
            let found: Vec<_> = schemas
                .iter()
                .filter_map(|s| catalog.relation(s, name))
                .collect();
            if parts.len() == 1 && names.created.contains(name) {
                push(format!("pg_temp.{name}"));
            }
            if found.is_empty() {
                // Unknown to the cached catalog: every place it could be.
                for s in &schemas {
                    push(format!("{s}.{name}"));
                }
            }
            let modifies = matches!(
                kind,
                StatementKind::Delete
                    | StatementKind::Update
                    | StatementKind::Insert
                    | StatementKind::Merge
                    | StatementKind::Truncate
            );
            for rel in found {
                push(rel.qualified());
                // Writing through a view writes its tables.
                if modifies && rel.kind == 'v' {
                    for oid in &rel.reads {
                        if let Some(t) = catalog.by_oid(*oid) {
                            push(t.qualified());
                        }
                    }
                }
                if *cascade && kind == StatementKind::Truncate {
                    for oid in catalog.referencing(rel.oid) {
                        if let Some(t) = catalog.by_oid(oid) {
                            push(t.qualified());
                        }
                    }
                }
                if *cascade && kind == StatementKind::Drop {
                    for view in catalog.relations().filter(|v| v.reads.contains(&rel.oid)) {
                        push(view.qualified());
                    }
                }
            }
        }
    }
    out
}

/// Whether a rule's table glob matches `schema.table`. A glob without a schema means the
/// `public` schema, as in mask rules; `*` alone matches everything.
pub fn glob_matches(pattern: &str, table: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if table == "*" {
        return false;
    }
    let qualified;
    let pattern = if pattern.contains('.') {
        pattern
    } else {
        qualified = format!("public.{pattern}");
        &qualified
    };
    wildcard(pattern.as_bytes(), table.as_bytes())
}

/// `*` matches any run of bytes, `?` one byte; everything else itself.
fn wildcard(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// SQL-level prepared statements of a session and what each does.
pub type Prepared = HashMap<String, Vec<Access>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::Rules;
    use crate::policy::masking::testing::crm_context;
    use crate::sql::analysis::guard_facts as analyse;

    fn rules(toml: &str) -> Rules {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.toml"), toml).unwrap();
        Rules::load(dir.path()).unwrap()
    }

    fn identity(roles: &[&str]) -> SessionIdentity {
        SessionIdentity::offline("alice", roles, "")
    }

    fn decide(toml: &str, roles: &[&str], sql: &str) -> Result<Permit, Refusal> {
        let rules = rules(toml);
        let Some(guard) = GuardPolicy::for_session(&rules, &identity(roles)) else {
            return Ok(Permit { limit: None });
        };
        crm_context(|ctx| {
            let mut facts = analyse(sql, crate::sql::Strings::Standard);
            if facts.unanalysable.is_none() {
                facts.unanalysable = crate::sql::guard::opaque_call(&facts.calls, ctx.catalog);
            }
            let names = Names {
                catalog: ctx.catalog,
                search_path: &["alice".to_string(), "public".to_string()],
                created: &HashSet::new(),
            };
            guard.authorize(&facts, &[], &names)
        })
    }

    const LIMITED: &str = r#"
[settings]
protected = ["delete", "update"]

[[allow]]
roles = ["crm_support"]
statements = ["delete"]
tables = ["public.deals"]
max_rows = 5

[[allow]]
roles = ["crm_support"]
statements = ["delete", "update"]
tables = ["public.*"]
max_rows = 20
"#;

    #[test]
    fn max_rows_limits_a_top_level_delete_or_update_to_the_most_generous_rule() {
        let support = ["alice", "crm_support"];
        let limit = |toml: &str, sql: &str| decide(toml, &support, sql).unwrap().limit;
        let l = limit(LIMITED, "DELETE FROM deals WHERE id > 0").unwrap();
        assert_eq!(
            (l.rows, l.kind, l.table.as_str()),
            (20, StatementKind::Delete, "public.deals")
        );
        assert!(!l.returning);
        assert!(l.rule.to_string().ends_with(":11"), "{}", l.rule);
        let l = limit(
            LIMITED,
            "UPDATE public.tasks SET note = '' WHERE id > 0 RETURNING *",
        )
        .unwrap();
        assert_eq!((l.rows, l.kind), (20, StatementKind::Update));
        assert!(l.returning);
        assert_eq!(limit(LIMITED, "SELECT * FROM deals"), None);
        // A rule without max_rows that allows it too: no limit.
        let unlimited = format!(
            "{LIMITED}\n[[allow]]\nroles = [\"crm_support\"]\nstatements = [\"delete\"]\ntables = [\"deals\"]\n"
        );
        assert_eq!(limit(&unlimited, "DELETE FROM deals WHERE id > 0"), None);
        // Rows pgveil could not count apart: refused.
        for sql in [
            "WITH d AS (DELETE FROM deals RETURNING 1) SELECT count(*) FROM d",
            "PREPARE p AS DELETE FROM deals",
            "EXPLAIN ANALYZE DELETE FROM deals",
            "INSERT INTO deals (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET amount = 0",
        ] {
            let refusal = decide(LIMITED, &support, sql).unwrap_err();
            assert!(
                refusal.reason.contains("of its own"),
                "{sql}: {}",
                refusal.reason
            );
        }
    }

    #[test]
    fn a_limited_statement_counts_its_rows_and_fails_as_a_whole_over_the_limit() {
        let support = ["alice", "crm_support"];
        let l = decide(LIMITED, &support, "DELETE FROM deals WHERE id > 0")
            .unwrap()
            .limit
            .unwrap();
        let wrapped = l.wrap("DELETE FROM deals WHERE id > 0 -- all of them\n ;\n");
        assert!(wrapped.starts_with("WITH pgveil_rows AS (\nDELETE FROM deals WHERE id > 0 -- all of them\nRETURNING 1)"), "{wrapped}");
        assert!(
            wrapped.contains("OPERATOR(pg_catalog.>) 20::pg_catalog.int8"),
            "{wrapped}"
        );
        assert_eq!(l.tag(3), "DELETE 3");
        assert_eq!(
            RowLimit::counted(&format!(
                "invalid input syntax for type bigint: \"{}4711\"",
                limit_marker()
            )),
            Some(4711)
        );
        // A client's own error with a marker it made up is its own error.
        assert_eq!(
            RowLimit::counted("invalid input syntax for type bigint: \"pgveil-max-rows:4711\""),
            None
        );
        assert!(wrapped.contains(limit_marker()));
        assert_eq!(
            RowLimit::counted("invalid input syntax for type bigint: \"x\""),
            None
        );
        let message = l.exceeded(4711).message("alice");
        assert!(message.contains("it would remove 4711 rows, and the rule that allows it allows at most 20 (max_rows); nothing was done"), "{message}");
    }

    const SUPPORT: &str = r#"
[[allow]]
roles = ["crm_support"]
statements = ["delete"]
tables = ["public.deals"]
require_where = true
"#;

    #[test]
    fn protected_by_default() {
        let denied = decide("", &["alice"], "DELETE FROM customers WHERE id = 1").unwrap_err();
        assert_eq!(denied.kind, "delete");
        assert_eq!(denied.table, "public.customers");
        assert!(denied
            .message("alice")
            .starts_with("pgveil: DELETE on public.customers is not allowed for role \"alice\""));
        assert!(decide("", &["alice"], "TRUNCATE deals").is_err());
        assert!(decide("", &["alice"], "DROP TABLE deals").is_err());
        assert!(decide("", &["alice"], "UPDATE deals SET amount = 0").is_ok());
        assert!(decide(
            "[settings]\nprotected = []\n",
            &["alice"],
            "DELETE FROM deals"
        )
        .is_ok());
    }

    #[test]
    fn allow_rules_with_roles_tables_and_where() {
        let support = ["alice", "crm_support"];
        assert!(decide(SUPPORT, &support, "DELETE FROM deals WHERE id = 1").is_ok());
        assert!(decide(
            SUPPORT,
            &support,
            "DELETE FROM public.\"deals\" WHERE id = 1"
        )
        .is_ok());
        let no_where = decide(SUPPORT, &support, "DELETE FROM deals").unwrap_err();
        assert!(no_where.reason.contains("WHERE"), "{no_where:?}");
        assert!(no_where.rule.is_some());
        assert!(decide(SUPPORT, &support, "DELETE FROM deals WHERE true").is_err());
        assert!(decide(SUPPORT, &support, "DELETE FROM customers WHERE id = 1").is_err());
        assert!(decide(SUPPORT, &["alice"], "DELETE FROM deals WHERE id = 1").is_err());
        assert!(decide(SUPPORT, &support, "TRUNCATE deals").is_err());
        // One refused part refuses the whole string.
        assert!(decide(
            SUPPORT,
            &support,
            "DELETE FROM deals WHERE id = 1; DELETE FROM customers WHERE id = 1"
        )
        .is_err());
    }

    #[test]
    fn unanalysable_statements_touch_everything() {
        let support = ["alice", "crm_support"];
        assert!(decide(SUPPORT, &support, "SELECT cleanup()").is_err());
        assert!(decide(SUPPORT, &support, "DO $$ BEGIN END $$").is_err());
        let allow = format!("[settings]\nunanalysable = \"allow\"\n{SUPPORT}");
        assert!(decide(&allow, &support, "SELECT cleanup()").is_ok());
        let admin = "[[allow]]\nroles = [\"crm_admin\"]\nstatements = [\"delete\", \"truncate\", \"drop\"]\ntables = [\"*\"]\n";
        assert!(decide(admin, &["bob", "crm_admin"], "SELECT cleanup()").is_ok());
        assert!(decide(admin, &["bob", "crm_admin"], "DROP DATABASE crm").is_ok());
        assert!(decide(admin, &["alice"], "SELECT cleanup()").is_err());
    }

    #[test]
    fn unqualified_names_count_in_every_schema_of_the_path() {
        let sandbox =
            "[[allow]]\nroles = [\"*\"]\nstatements = [\"delete\"]\ntables = [\"alice.*\"]\n";
        // `customers` exists in public: a rule for alice.* does not cover it.
        assert!(decide(sandbox, &["alice"], "DELETE FROM customers").is_err());
        assert!(decide(sandbox, &["alice"], "DELETE FROM alice.customers").is_ok());
    }

    #[test]
    fn globs() {
        assert!(glob_matches("*", "s.t"));
        assert!(glob_matches("*", "*"));
        assert!(!glob_matches("public.*", "*"));
        assert!(glob_matches("public.*", "public.tasks"));
        assert!(glob_matches("tasks", "public.tasks"));
        assert!(!glob_matches("tasks", "crm.tasks"));
        assert!(glob_matches("public.task?", "public.tasks"));
        assert!(glob_matches("*.tasks", "crm.tasks"));
        assert!(!glob_matches("public.t*s", "public.tasks_x"));
        assert!(glob_matches("public.pgbench_*", "public.pgbench_accounts"));
    }
}
