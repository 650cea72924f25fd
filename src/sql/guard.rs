//! What a query string does, as the statement guard needs to know it: every access by
//! kind (delete, truncate, drop, ...) with the names it targets, wherever the statement
//! hides it (a CTE, `EXPLAIN ANALYZE`, `PREPARE`, `COPY (...)`, a `MERGE` action), and the
//! session-level effects later statements depend on (`SET search_path`, `PREPARE`,
//! `EXECUTE`). Pure: names are resolved and rules applied by `policy::guard`.
//!
//! What cannot be analysed is said so, with the reason: a parse failure, code pgveil
//! cannot see into (a user-defined function, `DO`, `CALL`, a trigger or function body),
//! built-ins that run SQL given as text.

use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterTableOperation, CopySource, Expr, FromTable, MergeAction, ObjectName, ObjectType,
    OnConflictAction, OnInsert, Query, Reset, Set, Statement, TableFactor, TableObject,
    TableWithJoins, Visit, Visitor,
};

use super::scope::CteScope;
use super::{fold, is_dangerous, is_grammar_function, kind_of, name_parts};
use crate::catalog::Catalog;
use crate::config::rules::StatementKind;

/// One thing a statement does to one named object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: StatementKind,
    pub target: Target,
    /// For DELETE and UPDATE: a WHERE clause that references at least one column
    /// (`WHERE true` does not count).
    pub has_where: bool,
    /// The target of the string's top-level DELETE or UPDATE itself (not of one in a
    /// WITH, PREPARE, EXPLAIN, MERGE or INSERT ... ON CONFLICT): the rows of this access
    /// are the ones its command tag counts.
    pub top: bool,
    /// For a top-level DELETE or UPDATE: whether it has a RETURNING list.
    pub returning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A relation, by its folded name parts as written (resolved against the catalog and
    /// the session's search_path later). `cascade`: `TRUNCATE/DROP ... CASCADE`.
    Relation { parts: Vec<String>, cascade: bool },
    /// Every relation of a schema (`DROP SCHEMA`).
    Schema(String),
    /// A non-relation object (function, index, role, ...), by its folded name.
    Object(String),
    /// Everything (`DROP DATABASE`, `GRANT ... ON ALL TABLES`, ...).
    Everything,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Relation { parts, .. } => f.write_str(&parts.join(".")),
            Target::Schema(s) => write!(f, "{s}.*"),
            Target::Object(o) => f.write_str(o),
            Target::Everything => f.write_str("*"),
        }
    }
}

/// A change to what the session knows, applied when the statement is forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// `SET search_path`: the schemas named; `None` for `RESET`/`DEFAULT`.
    SearchPath(Option<Vec<String>>),
    /// `PREPARE name AS ...` with what the prepared statement does.
    Prepare(String, Vec<Access>),
    /// `EXECUTE name`: does what `name` was prepared to do.
    Execute(String),
    /// A table the statement creates (temporary or not), unknown to the cached catalog.
    Created(String),
}

/// A function the statement calls, by its folded name parts as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub parts: Vec<String>,
    /// Called in FROM (a set-returning function), where grammar-only functions cannot be.
    pub in_from: bool,
    /// Maybe called in attribute notation: `q.f` is `f(q)` when q has no column f. Only a
    /// user-defined function of that name makes it a call that counts (the built-ins that
    /// run SQL take no row); otherwise it is a column.
    pub attribute: bool,
}

/// Everything the guard needs from one query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementFacts {
    /// The kind of each top-level statement, as audit records and messages name it.
    pub kinds: Vec<&'static str>,
    pub accesses: Vec<Access>,
    pub effects: Vec<Effect>,
    /// Functions called (whether each is built in is the catalog's to say).
    pub calls: Vec<Call>,
    /// Why the string cannot be analysed, if it cannot (functions aside).
    pub unanalysable: Option<String>,
}

impl StatementFacts {
    fn unanalysable(reason: impl Into<String>) -> StatementFacts {
        StatementFacts {
            unanalysable: Some(reason.into()),
            ..Default::default()
        }
    }

    /// Whether the same verdict holds for every string of the same shape (see
    /// `Lexed::shape`): true unless the string changes session state.
    pub fn shape_independent(&self) -> bool {
        self.effects.is_empty()
    }

    /// The facts of a string whose statements have these facts, in order.
    pub fn merge<'f>(parts: impl IntoIterator<Item = &'f StatementFacts>) -> StatementFacts {
        let mut all = StatementFacts::default();
        for part in parts {
            all.kinds.extend_from_slice(&part.kinds);
            all.accesses.extend_from_slice(&part.accesses);
            all.effects.extend_from_slice(&part.effects);
            all.calls.extend_from_slice(&part.calls);
            if all.unanalysable.is_none() {
                all.unanalysable.clone_from(&part.unanalysable);
            }
        }
        all
    }
}

/// Why a statement that calls `calls` cannot be analysed: the first function the catalog
/// does not know as built in (code pgveil cannot see into).
pub fn opaque_call(calls: &[Call], catalog: &Catalog) -> Option<String> {
    calls
        .iter()
        .find(|c| match c.attribute {
            // (A column of that name anywhere is taken for the column.)
            true => c.parts.last().is_some_and(|f| {
                catalog.is_user_function(f)
                    && !catalog
                        .relations()
                        .any(|r| r.columns.iter().any(|col| col.name == *f))
            }),
            false => !is_builtin_call(&c.parts, c.in_from, catalog),
        })
        .map(|c| {
            format!(
                "it calls {}, a function that is not built in",
                c.parts.join(".")
            )
        })
}

/// Whether a call of the function named `parts` (folded, as written) is of one PostgreSQL
/// ships: `information_schema`'s by the catalog's word, any other only unqualified or in
/// `pg_catalog`, built in (or grammar-only, outside FROM) and not shadowed by a user
/// function of the same name.
pub fn is_builtin_call(parts: &[String], in_from: bool, catalog: &Catalog) -> bool {
    let bare = parts.last().map(String::as_str).unwrap_or_default();
    match parts {
        [schema, _] if schema == "information_schema" => {
            catalog.is_builtin_function(&parts.join("."))
        }
        _ => {
            let qualified_builtin =
                parts.len() == 1 || (parts.len() == 2 && parts[0] == "pg_catalog");
            qualified_builtin
                && (catalog.is_builtin_function(bare) || (!in_from && is_grammar_function(bare)))
                && !catalog.is_user_function(bare)
        }
    }
}

/// The facts of one parsed statement, or of one pgveil cannot parse (`None`).
pub fn analyse_statement(stmt: Option<&Statement>) -> StatementFacts {
    let Some(stmt) = stmt else {
        return StatementFacts::unanalysable("pgveil cannot parse it");
    };
    let mut facts = StatementFacts {
        kinds: vec![kind_of(stmt)],
        ..Default::default()
    };
    let mut walk = Walk {
        facts: &mut facts,
        ctes: CteScope::default(),
        seen: 0,
        top: None,
    };
    let _ = stmt.visit(&mut walk);
    facts
}

struct Walk<'a> {
    facts: &'a mut StatementFacts,
    ctes: CteScope,
    /// Statements visited so far (the first is the top-level one).
    seen: usize,
    /// While the top-level DELETE or UPDATE is being read: whether it has RETURNING.
    top: Option<bool>,
}

impl Walk<'_> {
    fn access(&mut self, kind: StatementKind, target: Target, has_where: bool) {
        self.facts.accesses.push(Access {
            kind,
            target,
            has_where,
            top: self.top.is_some(),
            returning: self.top.unwrap_or(false),
        });
    }

    fn relation(&mut self, kind: StatementKind, name: &ObjectName, cascade: bool, has_where: bool) {
        let target = match name_parts(name) {
            Some(parts) => Target::Relation { parts, cascade },
            None => Target::Everything,
        };
        self.access(kind, target, has_where);
    }

    fn relations_of(&mut self, kind: StatementKind, twj: &TableWithJoins, has_where: bool) {
        let factors = std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation));
        for tf in factors {
            match tf {
                TableFactor::Table { name, .. } => self.relation(kind, name, false, has_where),
                TableFactor::NestedJoin {
                    table_with_joins, ..
                } => self.relations_of(kind, table_with_joins, has_where),
                _ => self.access(kind, Target::Everything, has_where),
            }
        }
    }

    fn cannot(&mut self, reason: impl Into<String>) {
        if self.facts.unanalysable.is_none() {
            self.facts.unanalysable = Some(reason.into());
        }
    }

    fn function(&mut self, name: &ObjectName, in_from: bool) {
        let Some(parts) = name_parts(name) else {
            return self.cannot("it calls a function pgveil cannot name");
        };
        let bare = parts.last().map(String::as_str).unwrap_or_default();
        if is_dangerous(bare) {
            return self.cannot(format!(
                "it calls {}, which runs SQL or changes settings behind the analysis",
                parts.join(".")
            ));
        }
        self.facts.calls.push(Call {
            parts,
            in_from,
            attribute: false,
        });
    }

    fn statement(&mut self, stmt: &Statement) {
        use StatementKind as K;
        match stmt {
            Statement::Insert(i) => {
                let kind_target = match &i.table {
                    TableObject::TableName(n) => n.clone(),
                    _ => return self.access(K::Insert, Target::Everything, false),
                };
                self.relation(K::Insert, &kind_target, false, false);
                if let Some(OnInsert::OnConflict(oc)) = &i.on {
                    if let OnConflictAction::DoUpdate(du) = &oc.action {
                        self.relation(K::Update, &kind_target, false, du.selection.is_some());
                    }
                }
            }
            Statement::Update(u) => {
                let has_where = real_where(u.selection.as_ref());
                self.relations_of(K::Update, &u.table, has_where);
            }
            Statement::Delete(d) => {
                let has_where = real_where(d.selection.as_ref());
                for name in &d.tables {
                    self.relation(K::Delete, name, false, has_where);
                }
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
                for twj in from {
                    self.relations_of(K::Delete, twj, has_where);
                }
            }
            Statement::Merge(m) => {
                let target = match &m.table {
                    TableFactor::Table { name, .. } => name_parts(name)
                        .map(|parts| Target::Relation {
                            parts,
                            cascade: false,
                        })
                        .unwrap_or(Target::Everything),
                    _ => Target::Everything,
                };
                self.access(K::Merge, target.clone(), false);
                for clause in &m.clauses {
                    let kind = match clause.action {
                        MergeAction::Delete { .. } => K::Delete,
                        MergeAction::Update(_) => K::Update,
                        MergeAction::Insert(_) => K::Insert,
                        _ => continue,
                    };
                    self.access(kind, target.clone(), false);
                }
            }
            Statement::Truncate(t) => {
                let cascade = matches!(t.cascade, Some(sqlparser::ast::CascadeOption::Cascade));
                for target in &t.table_names {
                    self.relation(K::Truncate, &target.name, cascade, false);
                }
            }
            Statement::Drop {
                object_type,
                names,
                cascade,
                ..
            } => {
                for name in names {
                    match object_type {
                        ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => {
                            self.relation(K::Drop, name, *cascade, false)
                        }
                        ObjectType::Schema => {
                            let schema = name_parts(name).and_then(|p| p.last().cloned());
                            let target = schema.map(Target::Schema).unwrap_or(Target::Everything);
                            self.access(K::Drop, target, false)
                        }
                        ObjectType::Database => self.access(K::Drop, Target::Everything, false),
                        _ => {
                            let target = name_parts(name)
                                .map(|p| Target::Object(p.join(".")))
                                .unwrap_or(Target::Everything);
                            self.access(K::Drop, target, false)
                        }
                    }
                }
            }
            Statement::DropFunction(d) => {
                for f in &d.func_desc {
                    let target = name_parts(&f.name)
                        .map(|p| Target::Object(p.join(".")))
                        .unwrap_or(Target::Everything);
                    self.access(K::Drop, target, false);
                }
            }
            // Dropping a trigger removes what it guards (the recycle bin's capture, for
            // one): it counts as a drop on its table.
            Statement::DropTrigger(d) => match &d.table_name {
                Some(table) => self.relation(K::Drop, table, false, false),
                None => self.access(K::Drop, Target::Everything, false),
            },
            Statement::DropDomain(_)
            | Statement::DropProcedure { .. }
            | Statement::DropSecret { .. }
            | Statement::DropPolicy(_)
            | Statement::DropConnector { .. }
            | Statement::DropExtension(_)
            | Statement::DropOperator(_)
            | Statement::DropOperatorFamily(_)
            | Statement::DropOperatorClass(_) => self.access(K::Drop, Target::Everything, false),
            Statement::Copy { source, to, .. } => {
                let kind = if *to { K::CopyTo } else { K::CopyFrom };
                match source {
                    CopySource::Table { table_name, .. } => {
                        self.relation(kind, table_name, false, false)
                    }
                    CopySource::Query(_) => self.access(kind, Target::Everything, false),
                }
            }
            Statement::AlterTable(at) => {
                self.relation(K::Alter, &at.name, false, false);
                if at.operations.iter().any(destroys) {
                    self.relation(K::Drop, &at.name, false, false);
                }
            }
            Statement::Grant(_) => self.access(K::Grant, Target::Everything, false),
            Statement::Revoke(_) => self.access(K::Revoke, Target::Everything, false),
            Statement::Call(_) => self.cannot("CALL runs a procedure pgveil cannot see into"),
            Statement::CreateFunction(_)
            | Statement::CreateProcedure { .. }
            | Statement::CreateTrigger(_) => self.cannot(
                "it defines code (a function, procedure or trigger body) pgveil cannot see into",
            ),
            Statement::CreateTable(ct) => {
                self.relation(K::Create, &ct.name, false, false);
                if let Some(name) = name_parts(&ct.name).and_then(|p| p.last().cloned()) {
                    self.facts.effects.push(Effect::Created(name));
                }
            }
            // A view (temporary ones are searched first) can stand in for a table a rule
            // covers, and writing through it writes its base table: later names that
            // could mean it also mean pg_temp's.
            Statement::CreateView(cv) => {
                self.relation(K::Create, &cv.name, false, false);
                if let Some(name) = name_parts(&cv.name).and_then(|p| p.last().cloned()) {
                    self.facts.effects.push(Effect::Created(name));
                }
            }
            Statement::Set(Set::SingleAssignment {
                variable, values, ..
            }) => {
                self.access(K::Set, Target::Everything, false);
                if name_parts(variable)
                    .is_some_and(|p| p.last().is_some_and(|v| v == "session_replication_role"))
                {
                    // In replica mode ordinary triggers (the recycle bin's capture among
                    // them) do not fire.
                    self.cannot("SET session_replication_role changes which triggers fire, the recycle bin's among them");
                }
                if name_parts(variable)
                    .is_some_and(|p| p.last().is_some_and(|v| v == "search_path"))
                {
                    self.facts
                        .effects
                        .push(Effect::SearchPath(search_path_values(values)));
                }
            }
            Statement::Set(_) => self.access(K::Set, Target::Everything, false),
            Statement::Reset(r) => {
                let search_path = match &r.reset {
                    Reset::ALL => true,
                    Reset::ConfigurationParameter(p) => {
                        name_parts(p).is_some_and(|p| p.last().is_some_and(|v| v == "search_path"))
                    }
                    _ => false,
                };
                if search_path {
                    self.facts.effects.push(Effect::SearchPath(None));
                }
            }
            Statement::Prepare {
                name, statement, ..
            } => {
                // The prepared statement's accesses are counted here too (the visitor
                // walks into it), so a PREPARE of what the role may not do is refused.
                let mut inner = StatementFacts::default();
                // (Run by EXECUTE, which no row limit can wrap: nothing in it is top-level.)
                let mut walk = Walk {
                    facts: &mut inner,
                    ctes: CteScope::default(),
                    seen: 1,
                    top: None,
                };
                let _ = statement.visit(&mut walk);
                if let Some(reason) = inner.unanalysable {
                    self.cannot(reason);
                }
                self.facts.calls.extend(inner.calls);
                self.facts
                    .effects
                    .push(Effect::Prepare(fold(name), inner.accesses));
            }
            Statement::Execute {
                name: Some(name), ..
            } => match name_parts(name) {
                Some(parts) => self.facts.effects.push(Effect::Execute(parts.join("."))),
                None => self.cannot("EXECUTE of a statement pgveil cannot name"),
            },
            Statement::Execute { name: None, .. } => self.cannot("EXECUTE IMMEDIATE"),
            _ => {}
        }
    }
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        self.seen += 1;
        self.top = match stmt {
            Statement::Delete(d) if self.seen == 1 => Some(d.returning.is_some()),
            Statement::Update(u) if self.seen == 1 => Some(u.returning.is_some()),
            _ => None,
        };
        self.statement(stmt);
        self.top = None;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.ctes.leave();
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.ctes.enter(q);
        if let sqlparser::ast::SetExpr::Select(s) = q.body.as_ref() {
            if let Some(into) = &s.into {
                let created = into.targets.first().and_then(|t| match t {
                    Expr::Identifier(i) => Some(fold(i)),
                    Expr::CompoundIdentifier(p) => p.last().map(fold),
                    _ => None,
                });
                self.facts
                    .effects
                    .push(Effect::Created(created.unwrap_or_default()));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table {
                name, args: None, ..
            } => {
                let parts = name_parts(name);
                let cte = parts.as_deref().is_some_and(|p| self.ctes.is_cte(p));
                if !cte {
                    let target = parts
                        .map(|parts| Target::Relation {
                            parts,
                            cascade: false,
                        })
                        .unwrap_or(Target::Everything);
                    self.access(StatementKind::Select, target, false);
                }
            }
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => self.function(name, true),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Function(f) => self.function(&f.name, false),
            Expr::CompoundIdentifier(p) if p.len() >= 2 => self.facts.calls.push(Call {
                parts: vec![fold(&p[p.len() - 1])],
                in_from: false,
                attribute: true,
            }),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Whether an ALTER TABLE operation counts as a drop: it loses a column's contents
/// (DROP COLUMN; ALTER COLUMN ... TYPE, which rewrites every value, `USING` a constant
/// included), takes rows or the table out from under the rules that name it (DETACH or
/// DROP PARTITION, RENAME, RENAME COLUMN, OWNER TO), or stops a trigger or rule from
/// firing in ordinary sessions (DISABLE, ENABLE REPLICA): the recycle bin's capture is a
/// trigger.
fn destroys(op: &AlterTableOperation) -> bool {
    use sqlparser::ast::AlterColumnOperation;
    matches!(
        op,
        AlterTableOperation::DropColumn { .. }
            | AlterTableOperation::AlterColumn {
                op: AlterColumnOperation::SetDataType { .. },
                ..
            }
            | AlterTableOperation::DisableTrigger { .. }
            | AlterTableOperation::DisableRule { .. }
            | AlterTableOperation::EnableReplicaTrigger { .. }
            | AlterTableOperation::EnableReplicaRule { .. }
            | AlterTableOperation::DropPartitions { .. }
            | AlterTableOperation::DetachPartition { .. }
            | AlterTableOperation::RenameTable { .. }
            | AlterTableOperation::RenameColumn { .. }
            | AlterTableOperation::OwnerTo { .. }
    )
}

/// A WHERE clause that mentions a column: `WHERE true` or `WHERE 1 = 1` limit nothing.
fn real_where(selection: Option<&Expr>) -> bool {
    struct Columns(bool);
    impl Visitor for Columns {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let Some(expr) = selection else {
        return false;
    };
    let mut columns = Columns(false);
    let _ = expr.visit(&mut columns);
    columns.0
}

/// The schemas a `SET search_path` names; `None` for `DEFAULT`.
fn search_path_values(values: &[Expr]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        match v {
            Expr::Identifier(i)
                if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default") =>
            {
                return None
            }
            Expr::Identifier(i) => out.push(fold(i)),
            Expr::Value(v) => {
                // `SET search_path = 'a, b'` is one string holding a list.
                let text = v.to_string();
                let text = text.trim_matches('\'');
                out.extend(
                    text.split(',')
                        .map(|s| s.trim().trim_matches('"').to_string())
                        .filter(|s| !s.is_empty()),
                );
            }
            other => out.push(other.to_string().to_lowercase()),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::crm_catalog;

    use crate::sql::analysis::guard_facts as analyse;
    use crate::sql::lex::Strings;

    fn facts(sql: &str) -> StatementFacts {
        let mut f = analyse(sql, Strings::Standard);
        if f.unanalysable.is_none() {
            f.unanalysable = opaque_call(&f.calls, &crm_catalog());
        }
        f
    }

    fn kinds_on(sql: &str) -> Vec<(StatementKind, String)> {
        facts(sql)
            .accesses
            .into_iter()
            .filter(|a| a.kind != StatementKind::Select)
            .map(|a| (a.kind, a.target.to_string()))
            .collect()
    }

    #[test]
    fn finds_deletes_wherever_they_hide() {
        use StatementKind::Delete;
        let del = |t: &str| (Delete, t.to_string());
        for (sql, expect) in [
            ("DELETE FROM customers", vec![del("customers")]),
            (
                "WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d",
                vec![del("customers")],
            ),
            (
                "EXPLAIN ANALYZE DELETE FROM public.customers",
                vec![del("public.customers")],
            ),
            (
                "COPY (DELETE FROM customers RETURNING *) TO STDOUT",
                vec![(StatementKind::CopyTo, "*".into()), del("customers")],
            ),
            (
                "DELETE FROM \"Customers\" USING deals WHERE deals.id = 1",
                vec![del("Customers")],
            ),
            (
                "SELECT 1; DELETE FROM customers WHERE id = 2",
                vec![del("customers")],
            ),
        ] {
            assert_eq!(kinds_on(sql), expect, "{sql}");
        }
        let merge = kinds_on(
            "MERGE INTO customers c USING deals d ON c.id = d.customer_id WHEN MATCHED THEN DELETE",
        );
        assert!(merge.contains(&del("customers")), "{merge:?}");
        let prepared = facts("PREPARE p AS DELETE FROM customers WHERE id = $1");
        assert!(prepared.accesses.iter().any(|a| a.kind == Delete));
        assert!(
            matches!(&prepared.effects[..], [Effect::Prepare(n, a)] if n == "p" && a.iter().any(|a| a.kind == Delete))
        );
        assert_eq!(
            facts("EXECUTE p(1)").effects,
            vec![Effect::Execute("p".into())]
        );
    }

    #[test]
    fn where_clauses_that_limit_nothing_do_not_count() {
        let has_where = |sql: &str| {
            facts(sql)
                .accesses
                .iter()
                .find(|a| a.kind == StatementKind::Delete)
                .unwrap()
                .has_where
        };
        assert!(has_where("DELETE FROM tasks WHERE id = 3"));
        assert!(!has_where("DELETE FROM tasks"));
        assert!(!has_where("DELETE FROM tasks WHERE true"));
        assert!(!has_where("DELETE FROM tasks WHERE 1 = 1 OR 2 > 1"));
    }

    #[test]
    fn only_cannot_be_analysed_but_truncate_only_can() {
        // sqlparser reads ONLY as a table named `only`: what it touches is unknown.
        for sql in [
            "DELETE FROM ONLY customers WHERE id = 1",
            "UPDATE ONLY customers SET phone = '1'",
            "SELECT * FROM ONLY customers",
        ] {
            assert!(facts(sql).unanalysable.is_some(), "{sql}");
        }
        // TRUNCATE ONLY is read correctly.
        assert_eq!(
            kinds_on("TRUNCATE ONLY customers"),
            vec![(StatementKind::Truncate, "customers".into())]
        );
    }

    #[test]
    fn truncate_drop_and_alter() {
        use StatementKind::*;
        assert_eq!(
            kinds_on("TRUNCATE a, ONLY s.b CASCADE"),
            vec![(Truncate, "a".into()), (Truncate, "s.b".into())]
        );
        let f = facts("TRUNCATE a CASCADE");
        assert!(matches!(
            &f.accesses[0].target,
            Target::Relation { cascade: true, .. }
        ));
        assert_eq!(
            kinds_on("DROP SCHEMA s CASCADE"),
            vec![(Drop, "s.*".into())]
        );
        assert_eq!(kinds_on("DROP DATABASE crm"), vec![(Drop, "*".into())]);
        assert_eq!(
            kinds_on("ALTER TABLE customers DROP COLUMN phone"),
            vec![(Alter, "customers".into()), (Drop, "customers".into())]
        );
        assert_eq!(
            kinds_on("ALTER TABLE customers DISABLE TRIGGER ALL"),
            vec![(Alter, "customers".into()), (Drop, "customers".into())]
        );
        for sql in [
            "ALTER TABLE ONLY customers ENABLE REPLICA TRIGGER pgveil_trash_delete",
            "ALTER TABLE IF EXISTS customers ALTER COLUMN phone TYPE text USING ''",
            "ALTER TABLE customers ALTER phone SET DATA TYPE varchar(3)",
            "ALTER TABLE customers RENAME TO old_customers",
            "ALTER TABLE customers RENAME COLUMN phone TO ph",
            "ALTER TABLE customers OWNER TO someone",
            "ALTER TABLE customers ADD COLUMN x int, DROP COLUMN phone",
        ] {
            assert!(kinds_on(sql).contains(&(Drop, "customers".into())), "{sql}");
        }
        for sql in [
            "ALTER TABLE customers ALTER COLUMN phone SET DEFAULT ''",
            "ALTER TABLE customers ENABLE TRIGGER pgveil_trash_delete",
            "ALTER TABLE customers ADD COLUMN x int",
        ] {
            assert!(
                !kinds_on(sql).contains(&(Drop, "customers".into())),
                "{sql}"
            );
        }
        assert!(facts("SET session_replication_role = replica")
            .unanalysable
            .is_some());
    }

    #[test]
    fn what_cannot_be_analysed() {
        for sql in [
            "DO $$ BEGIN DELETE FROM customers; END $$",
            "CALL purge()",
            "SELECT my_cleanup()",
            "SELECT public.lower('x')",
            "SELECT query_to_xml('delete from customers returning *', true, false, '')",
            "SELECT dblink_exec('delete from customers')",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DELETE FROM customers'",
            "CREATE TRIGGER t AFTER INSERT ON deals FOR EACH ROW EXECUTE FUNCTION f()",
            "DELETE FROM customers WHERE CURRENT OF c",
        ] {
            assert!(facts(sql).unanalysable.is_some(), "{sql}");
        }
        // With standard_conforming_strings off the server reads `\'` as a quote: the
        // DELETE is inside the string; with it on, or while it may be changing, not.
        let hidden = "SELECT '\\'; DELETE FROM customers; --'";
        let read = |strings| analyse(hidden, strings);
        assert_eq!(read(Strings::Escaped).kinds, vec!["select"]);
        assert_eq!(read(Strings::Standard).kinds, vec!["select", "delete"]);
        assert!(read(Strings::Unknown).unanalysable.is_some());
        assert!(
            facts("SELECT upper(name), now(), coalesce(1, 2) FROM customers")
                .unanalysable
                .is_none()
        );
    }

    #[test]
    fn session_effects() {
        assert_eq!(
            facts("SET search_path TO crm, \"Other\"").effects,
            vec![Effect::SearchPath(Some(vec!["crm".into(), "Other".into()]))]
        );
        assert_eq!(
            facts("SET search_path = 'a, b'").effects,
            vec![Effect::SearchPath(Some(vec!["a".into(), "b".into()]))]
        );
        assert_eq!(facts("RESET ALL").effects, vec![Effect::SearchPath(None)]);
        assert_eq!(
            facts("SET search_path = DEFAULT").effects,
            vec![Effect::SearchPath(None)]
        );
        assert!(facts("SELECT * FROM customers WHERE id = 1").shape_independent());
        assert!(!facts("CREATE TEMP TABLE x (a int)").shape_independent());
    }
}
