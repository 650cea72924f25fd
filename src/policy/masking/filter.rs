//! Row filters (`[[filter]]`) applied to a statement by rewriting it, after masking:
//! every reference to a filtered table in FROM (joins, subqueries, CTEs, inlined views,
//! `COPY (SELECT ...)`, cursors, CREATE ... AS) becomes a derived table that holds only
//! the rows the filter lets through; UPDATE and DELETE get the filter in their WHERE; a
//! write that could put a row outside the filter is refused unless its values prove it
//! inside; any other statement naming a filtered table is refused.
//!
//! A condition of the statement could be evaluated on rows the filter hides, before the
//! filter (the planner orders conditions by cost), and leak them through an error or a
//! side effect. So unless every condition is harmless (column references, constants,
//! parameters, comparisons, AND, OR, NOT, IS NULL, EXISTS and scalar subqueries, the
//! comparisons then spelled `OPERATOR(pg_catalog.…)`), the derived tables end with
//! `OFFSET 0`, which the planner neither flattens nor pushes conditions into, and the
//! WHERE of an UPDATE or DELETE runs only on visible rows
//! (`CASE WHEN filter THEN where ELSE false END`).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    visit_relations, AssignmentTarget, CopySource, Expr, FromTable, Ident, ObjectName, Query,
    SetExpr, Statement, TableAlias, TableFactor, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{fold, kind_of, name_parts, Context, Refusal, UNKNOWN_RELATION};
use crate::catalog::Relation;
use crate::policy::filters::TableFilter;
use crate::predicate::Predicate;
use crate::sql::conditions;

/// The alias the filtered table takes inside its derived table.
const INNER: &str = "pgveil_row_filter";

/// Applies the session's filters to `stmt`; whether it changed.
pub(super) fn apply(stmt: &mut Statement, ctx: &Context<'_>) -> Result<bool, Refusal> {
    if ctx.filters.is_empty() {
        return Ok(false);
    }
    let kind = kind_of(stmt);
    // Code the server runs later, where this pass never sees it (a trigger fires on the
    // session's own table; a procedure's body is a string).
    if matches!(
        stmt,
        Statement::CreateFunction(_)
            | Statement::CreateProcedure { .. }
            | Statement::CreateTrigger(_)
            | Statement::Call(_)
    ) {
        let reason = "it defines or runs code (a function, procedure or trigger body) whose SQL no row filter would reach";
        return Err(refusal(kind, "(code)", reason, ctx.filters.any_origin()));
    }
    // Every place the statement names a filtered table must be one the rewrite covers.
    let mut named = 0usize;
    let mut unknown = None;
    let mut first: Option<(String, Option<crate::config::rules::Origin>)> = None;
    // Views over a filtered table were replaced by their definitions before this pass;
    // one still named is one whose definition pgveil could not read (or that stands
    // where a definition cannot: the target of a write, a materialized view).
    let mut view_left = None;
    let mut statistics = None;
    // A column of a type from outside pg_catalog (an extension's, a domain) may compare
    // with operators pg_catalog does not have: its statements take the barrier.
    let mut outside_types = false;
    let _ = visit_relations(stmt, |name| {
        if let Some(parts) = name_parts(name) {
            if is_statistics(&parts) {
                statistics = Some(parts.join("."));
            }
            let outside =
                |r: &Arc<Relation>| r.columns.iter().any(|c| c.type_oid >= FIRST_NORMAL_OID);
            outside_types |= match parts.as_slice() {
                [n] => ctx.catalog.named(n).any(outside),
                [schema, n] | [_, schema, n] => {
                    ctx.catalog.relation(schema, n).is_some_and(outside)
                }
                _ => false,
            };
        }
        match lookup(name, ctx) {
            Lookup::Filtered(rel, f) => {
                named += 1;
                first.get_or_insert_with(|| (rel.qualified(), f.origin().cloned()));
            }
            Lookup::Pending(t) => unknown = Some(t),
            Lookup::View(view, table) => {
                view_left.get_or_insert((view, table));
            }
            Lookup::Ambiguous(rel) => {
                unknown = Some(format!("{} (and others of its name)", rel.qualified()))
            }
            Lookup::Plain => {}
        }
        ControlFlow::<()>::Continue(())
    });
    if let Some(table) = unknown {
        return Err(refusal(kind, table, UNKNOWN_RELATION, None));
    }
    if let Some(view) = statistics.or_else(|| statistics_function(stmt)) {
        let reason = "activity statistics count the rows a statement read, hidden ones included";
        let origin = ctx.filters.any_origin();
        return Err(refusal(kind, view, reason, origin));
    }
    // EXPLAIN EXECUTE plans a prepared statement this pass saw when it was prepared.
    if let Statement::Explain { statement, .. } = &*stmt {
        if matches!(statement.as_ref(), Statement::Execute { .. }) {
            let reason = "a plan tells how many rows the row filter hides that match the statement's conditions";
            return Err(refusal(
                kind,
                "(prepared statement)",
                reason,
                ctx.filters.any_origin(),
            ));
        }
    }
    if let Some((view, table)) = view_left {
        return Err(view_refusal(kind, &view, &table, ctx));
    }
    // Names the relation visitor does not reach.
    let direct: Vec<&ObjectName> = match &*stmt {
        Statement::Copy {
            source: CopySource::Table { table_name, .. },
            ..
        } => vec![table_name],
        Statement::Truncate(t) => t.table_names.iter().map(|t| &t.name).collect(),
        _ => Vec::new(),
    };
    for name in direct {
        if let Lookup::Filtered(rel, f) = lookup(name, ctx) {
            let reason =
                "it would reach rows the filter hides (COPY (SELECT ...) TO can be filtered)";
            return Err(refusal(kind, rel.qualified(), reason, f.origin()));
        }
    }
    if named == 0 {
        return Ok(false);
    }
    // A plan shows how many rows the filter removed next to the statement's own condition
    // (EXPLAIN ANALYZE counts them; EXPLAIN estimates them from statistics over every row).
    if matches!(stmt, Statement::Explain { .. }) {
        let (table, origin) = first.unwrap_or_default();
        let reason =
            "a plan tells how many rows the row filter hides that match the statement's conditions";
        return Err(refusal(kind, table, reason, origin.as_ref()));
    }
    let harmless = !outside_types && conditions::harmless(stmt);
    let mut rewrite = Rewrite {
        ctx,
        barrier: !harmless,
        skip: HashSet::new(),
        handled: 0,
        refused: None,
    };
    let _ = stmt.visit(&mut rewrite);
    if let Some(r) = rewrite.refused {
        return Err(r);
    }
    if rewrite.handled < named {
        let reason =
            "the statement names a filtered table where pgveil cannot apply its row filter";
        let (table, origin) = first.unwrap_or_default();
        return Err(refusal(kind, table, reason, origin.as_ref()));
    }
    if harmless {
        conditions::spell_comparisons(stmt);
    }
    Ok(true)
}

/// OIDs below this are PostgreSQL's own objects (`FirstNormalObjectId`).
const FIRST_NORMAL_OID: u32 = 16384;

/// The cumulative statistics views (`pg_stat_*`, `pg_statio_*`): their counters move with
/// every row a statement reads, the rows the filter then drops included.
fn is_statistics(parts: &[String]) -> bool {
    match parts {
        [n] | [_, n] | [_, _, n] => {
            (parts.len() == 1 || parts[parts.len() - 2] == "pg_catalog")
                && (n.starts_with("pg_stat_") || n.starts_with("pg_statio_"))
        }
        _ => false,
    }
}

/// A `pg_stat_get_*` function the statement calls (the statistics views' source).
fn statistics_function(stmt: &Statement) -> Option<String> {
    let mut found = None;
    let _ = sqlparser::ast::visit_expressions(stmt, |e| {
        if let Expr::Function(f) = e {
            let name = f.name.0.last().and_then(|p| p.as_ident()).map(fold);
            if let Some(n) = name.filter(|n| n.starts_with("pg_stat_")) {
                found = Some(n);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    found
}

enum Lookup<'a> {
    Plain,
    Filtered(Arc<Relation>, &'a Arc<TableFilter>),
    /// A view or materialized view that reads a filtered table (`Relation`, the table).
    View(Arc<Relation>, Arc<Relation>),
    /// A bare name that filtered tables in several schemas bear.
    Ambiguous(Arc<Relation>),
    /// A filter names a table of this name that the catalog does not have yet.
    Pending(String),
}

/// Whether `name` (as written) means a filtered table. A bare name that some filtered
/// table bears, in any schema, is taken as it: the session may change its search_path in
/// ways the analysis cannot follow.
fn lookup<'a>(name: &ObjectName, ctx: &Context<'a>) -> Lookup<'a> {
    let Some(parts) = name_parts(name) else {
        return Lookup::Plain;
    };
    let filters = ctx.filters;
    let filtered = |r: &Arc<Relation>| filters.of_table(r.oid).map(|f| (r.clone(), f));
    let found = match parts.as_slice() {
        [n] => {
            if let Some(_o) = filters.pending_table(n, ctx.catalog) {
                return Lookup::Pending(n.clone());
            }
            let mut found = ctx.catalog.named(n).filter_map(filtered);
            let first = found.next();
            // Filtered tables of one name in several schemas: which one the server reads
            // depends on the search_path, so no one filter can be chosen.
            if let (Some((rel, _)), Some(_)) = (&first, found.next()) {
                return Lookup::Ambiguous(rel.clone());
            }
            first
        }
        [schema, n] | [_, schema, n] => {
            if filters.pending(schema, n).is_some() {
                return Lookup::Pending(format!("{schema}.{n}"));
            }
            ctx.catalog.relation(schema, n).and_then(filtered)
        }
        _ => None,
    };
    if let Some((rel, f)) = found {
        return Lookup::Filtered(rel, f);
    }
    let reads = |r: &Arc<Relation>| {
        let table = filters.view_reads_filtered(r.oid)?;
        Some((r.clone(), ctx.catalog.by_oid(table)?.clone()))
    };
    let view = match parts.as_slice() {
        [n] => ctx.catalog.named(n).find_map(reads),
        [schema, n] | [_, schema, n] => ctx.catalog.relation(schema, n).and_then(reads),
        _ => None,
    };
    match view {
        Some((view, table)) => Lookup::View(view, table),
        None => Lookup::Plain,
    }
}

fn view_refusal(
    kind: &'static str,
    view: &Relation,
    table: &Relation,
    ctx: &Context<'_>,
) -> Refusal {
    let reason = format!(
        "it reads filtered table {}, and pgveil cannot apply the row filter inside it{}",
        table.qualified(),
        match view.kind {
            'm' => " (a materialized view holds rows computed without the filter)",
            _ => " (its definition could not be read, or it is the target of a write)",
        }
    );
    let origin = ctx.filters.of_table(table.oid).and_then(|f| f.origin());
    refusal(kind, view.qualified(), reason, origin)
}

fn refusal(
    kind: &'static str,
    table: impl Into<String>,
    reason: impl Into<String>,
    rule: Option<&crate::config::rules::Origin>,
) -> Refusal {
    Refusal {
        kind,
        table: table.into(),
        reason: reason.into(),
        rule: rule.cloned(),
    }
}

struct Rewrite<'a, 'b> {
    ctx: &'b Context<'a>,
    barrier: bool,
    /// TableFactors (by address) that are the targets of an UPDATE or DELETE.
    skip: HashSet<usize>,
    /// Filtered names the rewrite covered.
    handled: usize,
    refused: Option<Refusal>,
}

impl Rewrite<'_, '_> {
    fn refuse(&mut self, r: Refusal) -> ControlFlow<()> {
        self.refused = Some(r);
        ControlFlow::Break(())
    }

    /// The filter of a table the statement names; `None` when it has none, or when it
    /// has one that cannot apply (then the refusal is recorded: see [`Self::flow`]).
    fn target(&mut self, name: &ObjectName, kind: &'static str) -> Option<Target> {
        match self.lookup_target(name, kind) {
            Ok(t) => t,
            Err(r) => {
                self.refused = Some(r);
                None
            }
        }
    }

    /// How the walk goes on after [`Self::target`] gave nothing: it stops on a refusal.
    fn flow(&self) -> ControlFlow<()> {
        match self.refused {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    }

    fn lookup_target(
        &self,
        name: &ObjectName,
        kind: &'static str,
    ) -> Result<Option<Target>, Refusal> {
        match lookup(name, self.ctx) {
            Lookup::Plain => Ok(None),
            Lookup::Pending(t) => Err(refusal(kind, t, UNKNOWN_RELATION, None)),
            Lookup::View(view, table) => Err(view_refusal(kind, &view, &table, self.ctx)),
            Lookup::Ambiguous(rel) => {
                let reason =
                    "filtered tables of this name are in several schemas: qualify the name";
                Err(refusal(kind, rel.qualified(), reason, None))
            }
            Lookup::Filtered(rel, f) => {
                if let Some(why) = &f.broken {
                    return Err(refusal(kind, rel.qualified(), why.clone(), f.origin()));
                }
                Ok(Some(Target {
                    rel,
                    filter: f.clone(),
                }))
            }
        }
    }

    /// Adds the filter to the `where` of an UPDATE or DELETE of `t` (referred to as
    /// `qualifier`, its TableFactor at `addr`), or refuses the statement.
    fn restrict(
        &mut self,
        t: &Target,
        qualifier: &str,
        addr: usize,
        selection: &mut Option<Expr>,
        kind: &'static str,
    ) -> ControlFlow<()> {
        self.skip.insert(addr);
        let filter = t.filter.sql(qualifier);
        let sql = match selection.take() {
            None => filter,
            Some(w) if self.barrier => {
                format!("{filter} AND CASE WHEN {filter} THEN ({w}) ELSE false END")
            }
            Some(w) => format!("{filter} AND ({w})"),
        };
        match Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&sql)
            .and_then(|mut p| p.parse_expr())
        {
            Ok(e) => {
                *selection = Some(e);
                self.handled += 1;
                ControlFlow::Continue(())
            }
            Err(e) => {
                let reason = format!("pgveil could not add the row filter: {e}");
                self.refuse(refusal(kind, t.rel.qualified(), reason, None))
            }
        }
    }
}

struct Target {
    rel: Arc<Relation>,
    filter: Arc<TableFilter>,
}

/// The name a target table is referred to by in its statement.
fn qualifier(name: &ObjectName, alias: Option<&TableAlias>) -> String {
    match alias {
        Some(a) => fold(&a.name),
        None => name_parts(name)
            .and_then(|p| p.last().cloned())
            .unwrap_or_default(),
    }
}

impl VisitorMut for Rewrite<'_, '_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &mut Statement) -> ControlFlow<()> {
        let kind = kind_of(stmt);
        match stmt {
            Statement::Update(u) => {
                let TableFactor::Table { name, alias, .. } = &u.table.relation else {
                    return ControlFlow::Continue(());
                };
                let Some(target) = self.target(name, kind) else {
                    return self.flow();
                };
                let q = qualifier(name, alias.as_ref());
                // A row the UPDATE moves must stay visible: some condition must be all
                // `column = value`, each of its columns set to its very value.
                let assigned: Vec<(String, Option<Predicate>)> = u
                    .assignments
                    .iter()
                    .flat_map(|a| {
                        let cols: Vec<&ObjectName> = match &a.target {
                            AssignmentTarget::ColumnName(c) => vec![c],
                            AssignmentTarget::Tuple(cs) => cs.iter().collect(),
                        };
                        let single = cols.len() == 1;
                        cols.into_iter().filter_map(move |c| {
                            let col = name_parts(c)?.last()?.clone();
                            let value = if single {
                                Predicate::of_expr(&a.value)
                            } else {
                                None
                            };
                            Some((col, value))
                        })
                    })
                    .collect();
                let filter_cols = target.filter.columns();
                if assigned
                    .iter()
                    .any(|(c, _)| filter_cols.contains(&c.as_str()))
                {
                    let proven = target.filter.proven_by(|col, value| {
                        assigned
                            .iter()
                            .any(|(c, v)| c == col && v.as_ref() == Some(value))
                    });
                    if !proven {
                        let reason = format!(
                            "the UPDATE sets a column the row filter reads ({}), so it could move a row out of sight",
                            filter_cols.join(", ")
                        );
                        let r =
                            refusal(kind, target.rel.qualified(), reason, target.filter.origin());
                        return self.refuse(r);
                    }
                }
                let addr = &u.table.relation as *const TableFactor as usize;
                return self.restrict(&target, &q, addr, &mut u.selection, kind);
            }
            Statement::Delete(d) => {
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
                let Some(TableFactor::Table { name, alias, .. }) =
                    from.first().map(|t| &t.relation)
                else {
                    return ControlFlow::Continue(());
                };
                let Some(target) = self.target(name, kind) else {
                    return self.flow();
                };
                let q = qualifier(name, alias.as_ref());
                let addr = from
                    .first()
                    .map_or(0, |t| &t.relation as *const TableFactor as usize);
                return self.restrict(&target, &q, addr, &mut d.selection, kind);
            }
            Statement::Insert(i) => {
                let sqlparser::ast::TableObject::TableName(name) = &i.table else {
                    return ControlFlow::Continue(());
                };
                let Some(target) = self.target(name, kind) else {
                    return self.flow();
                };
                if let Err(reason) = insert_proven(i, &target.filter) {
                    let r = refusal(kind, target.rel.qualified(), reason, target.filter.origin());
                    return self.refuse(r);
                }
                self.handled += 1;
            }
            Statement::Merge(m) => {
                if let TableFactor::Table { name, .. } = &m.table {
                    if let Some(t) = self.target(name, kind) {
                        let reason = "MERGE could change or insert rows the filter hides";
                        let r = refusal(kind, t.rel.qualified(), reason, t.filter.origin());
                        return self.refuse(r);
                    }
                }
            }
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                ..
            } => {
                if let Some(t) = self.target(table_name, kind) {
                    let reason = "COPY into or out of a filtered table cannot be filtered (COPY (SELECT ...) TO can)";
                    let r = refusal(kind, t.rel.qualified(), reason, t.filter.origin());
                    return self.refuse(r);
                }
            }
            _ => {}
        }
        self.flow()
    }

    fn post_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        let addr = tf as *const TableFactor as usize;
        if self.skip.contains(&addr) {
            return ControlFlow::Continue(());
        }
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = tf
        else {
            return ControlFlow::Continue(());
        };
        let Some(target) = self.target(name, "select") else {
            return self.flow();
        };
        if target.rel.kind == 'm' {
            let reason = "a materialized view was computed from rows the filter hides";
            let r = refusal(
                "select",
                target.rel.qualified(),
                reason,
                target.filter.origin(),
            );
            return self.refuse(r);
        }
        let sql = format!(
            "SELECT * FROM {name} AS \"{INNER}\" WHERE {}{}",
            target.filter.sql(INNER),
            if self.barrier { " OFFSET 0" } else { "" }
        );
        let subquery: Box<Query> = match Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&sql)
            .and_then(|mut p| p.parse_query())
        {
            Ok(q) => q,
            Err(e) => {
                let reason = format!("pgveil could not add the row filter: {e}");
                return self.refuse(refusal("select", target.rel.qualified(), reason, None));
            }
        };
        let alias = alias.clone().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: Ident::with_quote(
                '"',
                name_parts(name)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_default(),
            ),
            columns: Vec::new(),
            at: None,
        });
        *tf = TableFactor::Derived {
            lateral: false,
            subquery,
            alias: Some(alias),
            sample: None,
        };
        self.handled += 1;
        ControlFlow::Continue(())
    }
}

/// Whether every row an INSERT writes satisfies the filter: plain VALUES rows naming
/// their columns, where for some condition made only of `column = value`, each row sets
/// every such column to that very value. No ON CONFLICT.
fn insert_proven(i: &sqlparser::ast::Insert, filter: &TableFilter) -> Result<(), String> {
    // DO UPDATE could change a hidden row; DO NOTHING would tell, quietly, which values
    // hidden rows hold in a unique column.
    if i.on.is_some() {
        return Err("ON CONFLICT could change a row the filter hides, or tell which values hidden rows hold".into());
    }
    let unproven = || {
        format!(
            "pgveil cannot prove the new rows satisfy the row filter: write VALUES that set {} to what the filter requires",
            filter.columns().join(", ")
        )
    };
    let rows = match i.source.as_deref().map(|q| q.body.as_ref()) {
        Some(SetExpr::Values(v)) => &v.rows,
        _ => return Err(unproven()),
    };
    let columns: Vec<String> = i
        .columns
        .iter()
        .filter_map(|c| name_parts(c).and_then(|p| p.last().cloned()))
        .collect();
    let proven = filter.proven_by(|col, value| {
        columns.iter().position(|c| c == col).is_some_and(|at| {
            rows.iter()
                .all(|row| row.get(at).and_then(Predicate::of_expr).as_ref() == Some(value))
        })
    });
    if proven {
        Ok(())
    } else {
        Err(unproven())
    }
}
