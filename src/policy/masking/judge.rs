//! Judging each use of a masked column in one statement: left for in-flight masking,
//! replaced by its SQL mask, served by masking the whole table, or refused.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, Distinct, Expr, GroupByExpr, OrderByKind, Query, Select, SelectItem,
    SetExpr, Statement, TableFactor, Value,
};

use super::facts::{classify, returning, Facts, Scope, Use};
use super::rewrite::{masking_select, Substitution, Substitutions};
use super::{refuse, Verdict};
use crate::policy::{sqlmask, ColumnMask};
use crate::sql::fold;
use std::sync::Arc;

/// Judges every use of a masked column in `stmt`, filling `subs` with the rewrites it
/// needs; `Err` carries the refusal. `alone`: the statement is the only one of its string.
pub(super) fn check_masked(
    stmt: &Statement,
    kind: &'static str,
    facts: &Facts,
    scope: &Scope<'_>,
    first: &str,
    subs: &mut Substitutions,
    alone: bool,
) -> Result<(), Verdict> {
    if facts.nested_returning_wildcard {
        let reason = "RETURNING * of a statement inside a CTE or COPY would return masked columns in clear; name the columns";
        return Err(refuse(kind, first, reason, None));
    }
    let top = outermost_select(stmt, kind, first, alone)?;
    let mut whole = WholeRows::new(scope, kind);
    whole_row_forms(facts, scope, &mut whole, first)?;
    let mut zones = in_flight_zones(top, facts, scope, &mut whole, kind, first)?;
    returning_zones(stmt, scope, &mut zones, kind)?;
    for (addr, parts, sql) in &facts.idents {
        judge_use(*addr, parts, sql, scope, &zones, &mut whole, kind, subs)?;
    }
    if whole.needed {
        // An INSERT's target cannot be replaced by a masking subquery.
        if let Some((_, rel, _)) = scope.masked_refs.iter().find(|(a, _, _)| *a == 0) {
            let reason = "a whole-row reference to the target would carry masked columns in clear";
            return Err(refuse(kind, rel.qualified(), reason, None));
        }
        for (addr, rel, alias) in scope.masked_refs.iter().filter(|(a, _, _)| *a != 0) {
            let sql = masking_select(rel, scope.masks_of(rel));
            let name = alias.clone().unwrap_or_else(|| rel.name.clone());
            subs.tables.insert(*addr, (sql, name));
        }
    }
    Ok(())
}

/// The outermost SELECT, whose bare output columns in-flight masking can cover; `None`
/// for statements whose results no RowDescription describes (every masked reference in
/// them is computed masked in SQL). Other kinds may not read masked tables at all.
fn outermost_select<'s>(
    stmt: &'s Statement,
    kind: &'static str,
    first: &str,
    alone: bool,
) -> Result<Option<(&'s Query, &'s Select)>, Verdict> {
    // `COPY (SELECT ...) TO STDOUT` sent on its own: its rows are masked in flight from
    // pgveil's description of the inner query, which reports each column's origin as a
    // query's RowDescription does.
    if let Some(q) = super::copy::in_flight_query(stmt).filter(|_| alone) {
        if let SetExpr::Select(s) = q.body.as_ref() {
            return Ok(Some((q, s.as_ref())));
        }
    }
    match stmt {
        Statement::Query(q) => Ok(match q.body.as_ref() {
            SetExpr::Select(s) => Some((q.as_ref(), s.as_ref())),
            _ => None,
        }),
        // A cursor's rows come back described like a query's (FETCH's RowDescription
        // carries the cursor query's column origins): its outermost SELECT list is masked
        // in flight too.
        Statement::Declare { stmts } => Ok(match stmts.as_slice() {
            [d] => d.for_query.as_deref().and_then(|q| match q.body.as_ref() {
                SetExpr::Select(s) => Some((q, s.as_ref())),
                _ => None,
            }),
            _ => None,
        }),
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Prepare { .. }
        | Statement::Explain { .. }
        | Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::Copy {
            source: sqlparser::ast::CopySource::Query(_),
            ..
        }
        | Statement::Copy { to: false, .. } => Ok(None),
        _ => Err(refuse(
            kind,
            first,
            "statements of this kind may not read masked tables",
            None,
        )),
    }
}

/// Whole-row uses (`SELECT c`, `row_to_json(c)`, `c.*` passed on, `*` in a subquery,
/// NATURAL JOIN, JOIN USING) need the table itself masked: it is replaced by a derived
/// table that masks every column, which is possible when every mask on it has a SQL form.
/// Keyless masks are idempotent, so column substitutions on top do no harm.
struct WholeRows {
    maskable: bool,
    needed: bool,
    kind: &'static str,
}

impl WholeRows {
    fn new(scope: &Scope<'_>, kind: &'static str) -> WholeRows {
        let maskable = scope.masked.iter().all(|(_, cols)| {
            cols.values().all(|m| {
                sqlmask::mask_sql(&m.definition, "x", &m.type_name, m.class.is_text()).is_some()
            })
        });
        WholeRows {
            maskable,
            needed: false,
            kind,
        }
    }

    fn need(&mut self, reason: &str, table: impl Into<String>) -> Result<(), Verdict> {
        if self.maskable {
            self.needed = true;
            Ok(())
        } else {
            let reason = format!("{reason}, and a mask on the table exists only in flight");
            Err(refuse(self.kind, table, reason, None))
        }
    }
}

fn whole_row_forms(
    facts: &Facts,
    scope: &Scope<'_>,
    whole: &mut WholeRows,
    first: &str,
) -> Result<(), Verdict> {
    if facts.expr_wildcard {
        whole.need("`*` inside an expression is a whole row", first)?;
    }
    if facts.natural_join {
        whole.need("NATURAL JOIN compares masked columns", first)?;
    }
    for c in &facts.using_columns {
        if let Some(m) = scope.masked_column(c) {
            whole.need("JOIN USING compares a masked column", m.column.to_string())?;
        }
    }
    for r in &facts.row_args {
        if let Some(rel) = r.last().and_then(|n| scope.masked_relation(n)) {
            whole.need(
                "a whole row of a masked table is passed to a function",
                rel.qualified(),
            )?;
        }
    }
    Ok(())
}

/// Where masked columns may appear unchanged: bare references in the outermost SELECT
/// list (masked in flight) and, for `searchable` masks, the outermost WHERE.
#[derive(Default)]
struct Zones {
    bare: HashSet<usize>,
    searchable: HashSet<usize>,
}

fn in_flight_zones(
    top: Option<(&Query, &Select)>,
    facts: &Facts,
    scope: &Scope<'_>,
    whole: &mut WholeRows,
    kind: &'static str,
    first: &str,
) -> Result<Zones, Verdict> {
    let mut zones = Zones::default();
    let Some((query, select)) = top else {
        if !facts.wildcard_selects.is_empty() {
            whole.need(
                "`*` over a masked table outside the outermost SELECT list",
                first,
            )?;
        }
        return Ok(zones);
    };
    let mut bare_aliases: HashSet<String> = HashSet::new();
    let mut wildcard_output = false;
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(fold(alias))),
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                wildcard_output = true;
                if let Some(d) = deny_in_scope(scope) {
                    let table = d.column.to_string();
                    return Err(refuse(
                        kind,
                        table,
                        "the column's mask is deny",
                        Some(&d.origin),
                    ));
                }
                continue;
            }
            _ => continue,
        };
        let Some(parts) = bare_parts(expr) else {
            continue;
        };
        if let Use::Column(_) = classify(&parts, scope) {
            zones.bare.insert(expr as *const Expr as usize);
            bare_aliases.insert(alias.unwrap_or_else(|| parts.last().cloned().unwrap_or_default()));
        }
    }
    // Sorting, grouping or de-duplicating by a masked output column, or storing it
    // (SELECT INTO), would use its clear value: such columns are masked in SQL instead.
    let by_alias = facts.idents.iter().any(|(addr, parts, _)| {
        parts.len() == 1 && bare_aliases.contains(&parts[0]) && !zones.bare.contains(addr)
    });
    let leak = ordering_leak(query, select).is_some() || by_alias || facts.select_into;
    if leak && wildcard_output && scope_has_masks(scope) {
        let reason = "`*` output cannot be masked in SQL for ORDER BY, GROUP BY, DISTINCT or INTO";
        return Err(refuse(kind, first, reason, None));
    }
    if leak {
        zones.bare.clear();
    } else {
        passed_through(select, facts, scope, &mut zones);
    }
    if let Some(w) = &select.selection {
        let _ = visit_expressions(w, |e: &Expr| {
            zones.searchable.insert(e as *const Expr as usize);
            ControlFlow::<()>::Continue(())
        });
    }
    let top_addr = select as *const Select as usize;
    if facts.wildcard_selects.iter().any(|&s| s != top_addr) {
        whole.need(
            "`*` inside a subquery or CTE would pass masked columns on",
            first,
        )?;
    }
    Ok(zones)
}

/// Derived tables in the outermost FROM (a view that reads a masked table is inlined as
/// one), and derived tables in theirs, to any depth (a view over a view), pass a masked
/// column they return bare on unchanged when nothing else in the statement uses it: every
/// level returns it bare (or by `*` at the top) or not at all, nothing filters, joins,
/// sorts or groups by it under any name it takes on the way, and each derived table's own
/// query is a plain SELECT that neither de-duplicates nor sorts or groups by position. The
/// server then reports the base column as the result column's origin (RowDescription
/// follows a subquery's output to its source), and it is masked in flight like a bare
/// column of the outermost SELECT, keyed masks included.
fn passed_through(select: &Select, facts: &Facts, scope: &Scope<'_>, zones: &mut Zones) {
    // Whole rows (passed to a function, `*` in an expression, compared by NATURAL JOIN or
    // USING) would carry the clear values out with no origin: nothing passes through then.
    if facts.expr_wildcard
        || !facts.row_args.is_empty()
        || facts.natural_join
        || !facts.using_columns.is_empty()
        || facts.select_into
    {
        return;
    }
    // Bare references in the outermost SELECT list, whatever they name.
    let top_bare: HashSet<usize> = select
        .projection
        .iter()
        .filter_map(item_expr)
        .filter(|(e, _)| bare_parts(e).is_some())
        .map(|(e, _)| e as *const Expr as usize)
        .collect();
    // Output names of the outermost SELECT list, used elsewhere (ORDER BY an alias), would
    // sort or filter by the clear value.
    let top_names: HashSet<String> = select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => p.last().map(fold),
            _ => None,
        })
        .collect();
    let mut chain = Vec::new();
    derived_selects(select, facts, &mut chain);
    // The bare SELECT-list items of those derived tables: (address, output name, the
    // name it reads, whether it is a masked column).
    let items: Vec<(usize, String, String, bool)> = chain
        .iter()
        .flat_map(|inner| inner.projection.iter().filter_map(item_expr))
        .filter_map(|(expr, alias)| {
            let parts = bare_parts(expr)?;
            let source = parts.last().cloned()?;
            let masked = matches!(classify(&parts, scope), Use::Column(_));
            let name = alias.unwrap_or_else(|| source.clone());
            Some((expr as *const Expr as usize, name, source, masked))
        })
        .collect();
    let passing: HashSet<usize> = top_bare
        .iter()
        .copied()
        .chain(items.iter().map(|(a, ..)| *a))
        .collect();
    if facts
        .idents
        .iter()
        .any(|(a, p, _)| !passing.contains(a) && p.len() == 1 && top_names.contains(&p[0]))
    {
        return;
    }
    for (addr, name, source, masked) in &items {
        if !masked {
            continue;
        }
        // Every name the value takes on its way up: its own, and (by name, which may
        // take in more than the one path) the names of the items that pass it on.
        let mut names: HashSet<&str> = [name.as_str(), source.as_str()].into();
        loop {
            let before = names.len();
            for (_, n, s, _) in &items {
                if names.contains(s.as_str()) {
                    names.insert(n.as_str());
                }
            }
            if names.len() == before {
                break;
            }
        }
        // Any other reference by one of those names, anywhere but bare in a SELECT list
        // that passes it on, could compute on the clear value.
        let used_elsewhere = facts.idents.iter().any(|(a, p, _)| {
            a != addr
                && !passing.contains(a)
                && p.last().is_some_and(|l| names.contains(l.as_str()))
        });
        if !used_elsewhere {
            zones.bare.insert(*addr);
        }
    }
}

/// The queries of the derived tables in `select`'s FROM, and in theirs, that can pass a
/// column on unchanged: not LATERAL, their columns not renamed by the alias, no whole-row
/// reference to them, a plain SELECT that does not de-duplicate, sort or group by
/// position, nor store its rows.
fn derived_selects<'q>(select: &'q Select, facts: &Facts, out: &mut Vec<&'q Select>) {
    let factors = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
    for factor in factors {
        let TableFactor::Derived {
            lateral: false,
            subquery,
            alias,
            ..
        } = factor
        else {
            continue;
        };
        let Some(alias) = alias.as_ref().filter(|a| a.columns.is_empty()) else {
            continue;
        };
        let table = fold(&alias.name);
        if facts
            .idents
            .iter()
            .any(|(_, p, _)| p.len() == 1 && p[0] == table)
        {
            continue;
        }
        let SetExpr::Select(inner) = subquery.body.as_ref() else {
            continue;
        };
        if ordering_leak(subquery, inner).is_some() || inner.into.is_some() {
            continue;
        }
        out.push(inner);
        derived_selects(inner, facts, out);
    }
}

/// A SELECT-list item's expression and its output alias, if it is an expression.
fn item_expr(item: &SelectItem) -> Option<(&Expr, Option<String>)> {
    match item {
        SelectItem::UnnamedExpr(e) => Some((e, None)),
        SelectItem::ExprWithAlias { expr, alias } => Some((expr, Some(fold(alias)))),
        _ => None,
    }
}

/// The folded name parts of a bare column reference (`phone`, `c.phone`).
fn bare_parts(expr: &Expr) -> Option<Vec<String>> {
    match expr {
        Expr::Identifier(i) => Some(vec![fold(i)]),
        Expr::CompoundIdentifier(p) => Some(p.iter().map(fold).collect()),
        _ => None,
    }
}

/// One column-like reference: left alone (in flight, or searchable), replaced by its SQL
/// mask, served by masking its whole table, or refused.
#[allow(clippy::too_many_arguments)]
fn judge_use(
    addr: usize,
    parts: &[String],
    sql: &str,
    scope: &Scope<'_>,
    zones: &Zones,
    whole: &mut WholeRows,
    kind: &'static str,
    subs: &mut Substitutions,
) -> Result<(), Verdict> {
    match classify(parts, scope) {
        Use::Column(m) if m.is_deny() => Err(refuse(
            kind,
            m.column.to_string(),
            "the column's mask is deny",
            Some(&m.origin),
        )),
        Use::Column(_) if zones.bare.contains(&addr) => Ok(()),
        Use::Column(m) if m.searchable && zones.searchable.contains(&addr) => Ok(()),
        Use::Column(m) => match sqlmask::mask_sql(&m.definition, sql, &m.type_name, m.class.is_text()) {
            Some(masked) => {
                let name = parts.last().cloned().unwrap_or_default();
                subs.exprs.insert(addr, Substitution { sql: masked, name });
                Ok(())
            }
            None => Err(refuse(
                kind,
                m.column.to_string(),
                format!(
                    "masked column {} ({} mask) can only be returned as is, not used in an expression, predicate or subquery",
                    m.column.column, m.function
                ),
                Some(&m.origin),
            )),
        },
        Use::WholeRow(table) => whole.need("a whole-row reference would carry masked columns in clear", table),
        Use::None => Ok(()),
    }
}

fn scope_has_masks(scope: &Scope<'_>) -> bool {
    !scope.masked.is_empty()
}

fn deny_in_scope<'a>(scope: &Scope<'a>) -> Option<&'a Arc<ColumnMask>> {
    scope
        .masked
        .iter()
        .flat_map(|(_, cols)| cols.values())
        .find(|m| m.is_deny())
}

/// A RETURNING list's rows come back described like a query's (the server marks each
/// returned column's origin): masked columns returned bare, and `*`, are masked in
/// flight; other uses are judged like any other (computed masked in SQL, or refused).
fn returning_zones(
    stmt: &Statement,
    scope: &Scope<'_>,
    zones: &mut Zones,
    kind: &'static str,
) -> Result<(), Verdict> {
    let Some(items) = returning(stmt) else {
        return Ok(());
    };
    for item in items {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                if let Some(d) = deny_in_scope(scope) {
                    let table = d.column.to_string();
                    let reason = "the column's mask is deny";
                    return Err(refuse(kind, table, reason, Some(&d.origin)));
                }
                continue;
            }
            _ => continue,
        };
        if let Some(Use::Column(_)) = bare_parts(expr).map(|p| classify(&p, scope)) {
            zones.bare.insert(expr as *const Expr as usize);
        }
    }
    Ok(())
}

/// DISTINCT, or ORDER BY / GROUP BY by position, would compute on clear values of the
/// masked output columns.
fn ordering_leak(query: &Query, select: &Select) -> Option<&'static str> {
    if matches!(
        select.distinct,
        Some(Distinct::Distinct) | Some(Distinct::On(_))
    ) {
        return Some("DISTINCT would compare masked columns in clear");
    }
    if let Some(ob) = &query.order_by {
        match &ob.kind {
            OrderByKind::All(_) => return Some("ORDER BY ALL would sort by masked columns"),
            OrderByKind::Expressions(exprs) => {
                if exprs.iter().any(|o| positional(&o.expr)) {
                    return Some("ORDER BY position would sort by clear values");
                }
            }
        }
    }
    match &select.group_by {
        GroupByExpr::All(_) => Some("GROUP BY ALL would group by masked columns"),
        GroupByExpr::Expressions(exprs, _) if exprs.iter().any(positional) => {
            Some("GROUP BY position would group by clear values")
        }
        _ => None,
    }
}

/// Whether an ORDER BY or GROUP BY item names an output column by position, as the server
/// reads it: a number, in parentheses too (`ORDER BY (1)`), and inside ROLLUP, CUBE and
/// GROUPING SETS.
fn positional(e: &Expr) -> bool {
    match e {
        Expr::Value(v) => matches!(v.value, Value::Number(..)),
        Expr::Nested(inner) => positional(inner),
        Expr::Rollup(sets) | Expr::Cube(sets) | Expr::GroupingSets(sets) => {
            sets.iter().flatten().any(positional)
        }
        Expr::Tuple(items) => items.iter().any(positional),
        _ => false,
    }
}
